// Token sampling: greedy, the top-k / top-p / min-p cuts against a double-precision reference,
// draws that depend only on (seed, sample index, position), the drawn distribution, and logprobs.
#include "engine/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <stdexcept>

namespace dilu {
namespace {

SamplingParams sampled(double temperature = 1.0) {
  SamplingParams p;
  p.temperature = temperature;
  return p;
}

std::vector<float> random_logits(int64_t vocab, uint32_t seed, float scale = 3.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> l(static_cast<size_t>(vocab));
  for (float& x : l) x = normal(rng);
  return l;
}

// What a draw may pick, computed the slow way: softmax(l / T) in double, a full sort (larger
// logit first, lower id on ties), top-k, the nucleus over what is left, min-p; then the inverse
// CDF walks the kept tokens in id order, as sample() does.
struct Reference {
  std::vector<int32_t> tokens;  // in the order the inverse CDF walks them
  std::vector<double> weights;

  Reference(const std::vector<float>& logits, const SamplingParams& p) {
    std::vector<int32_t> order(logits.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
    const double max_logit = *std::max_element(logits.begin(), logits.end());
    std::vector<double> w;
    for (const int32_t t : order) w.push_back(std::exp((logits[static_cast<size_t>(t)] - max_logit) / p.temperature));
    size_t keep = w.size();
    if (p.top_k > 0) keep = std::min<size_t>(keep, static_cast<size_t>(p.top_k));
    if (p.top_p < 1.0) {
      const double mass = std::accumulate(w.begin(), w.begin() + static_cast<std::ptrdiff_t>(keep), 0.0);
      double cum = 0.0;
      for (size_t i = 0; i < keep; ++i) {
        cum += w[i];
        if (cum >= p.top_p * mass) {
          keep = i + 1;
          break;
        }
      }
    }
    std::vector<std::pair<int32_t, double>> kept;
    for (size_t i = 0; i < keep; ++i)
      if (w[i] >= p.min_p) kept.emplace_back(order[i], w[i]);
    std::sort(kept.begin(), kept.end());
    for (const auto& [t, x] : kept) {
      tokens.push_back(t);
      weights.push_back(x);
    }
  }

  int32_t token(double u) const {
    const double total = std::accumulate(weights.begin(), weights.end(), 0.0);
    double cum = 0.0;
    for (size_t i = 0; i < tokens.size(); ++i) {
      cum += weights[i];
      if (cum > u * total) return tokens[i];
    }
    return tokens.back();
  }
};

TEST(Sampler, GreedyTakesTheFirstMaximum) {
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f, 1.9f};
  SamplingParams greedy;
  greedy.temperature = 0.0;
  for (int64_t pos = 0; pos < 5; ++pos) EXPECT_EQ(sample(logits, greedy, 123, 0, pos).token, 1);
  greedy.temperature = 1e-6;  // below vLLM's epsilon: greedy too
  EXPECT_EQ(sample(logits, greedy, 9, 3, 1).token, 1);
}

TEST(Sampler, SameKeySameTokenDifferentKeysDiffer) {
  const std::vector<float> logits = random_logits(1000, 1, 1.0f);  // a flat-ish distribution
  const SamplingParams p = sampled(1.0);
  std::vector<int32_t> a, b, other_seed, other_sample;
  for (int64_t pos = 0; pos < 64; ++pos) {
    a.push_back(sample(logits, p, 42, 0, pos).token);
    b.push_back(sample(logits, p, 42, 0, pos).token);
    other_seed.push_back(sample(logits, p, 43, 0, pos).token);
    other_sample.push_back(sample(logits, p, 42, 1, pos).token);
  }
  EXPECT_EQ(a, b);
  EXPECT_NE(a, other_seed);
  EXPECT_NE(a, other_sample);
  EXPECT_GT(std::set<int32_t>(a.begin(), a.end()).size(), 20u) << "positions draw independently";
}

TEST(Sampler, UniformIsAPureFunctionOfItsKey) {
  EXPECT_EQ(sample_uniform(1, 2, 3), sample_uniform(1, 2, 3));
  EXPECT_NE(sample_uniform(1, 2, 3), sample_uniform(1, 3, 2));
  EXPECT_NE(sample_uniform(2, 2, 3), sample_uniform(1, 2, 3));
  double mean = 0.0;
  for (int64_t i = 0; i < 100000; ++i) {
    const double u = sample_uniform(7, 0, i);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    mean += u / 100000;
  }
  EXPECT_NEAR(mean, 0.5, 0.005);
}

TEST(Sampler, TopKOneAndTinyTopPAreGreedy) {
  for (uint32_t s = 0; s < 20; ++s) {
    const std::vector<float> logits = random_logits(5000, s);
    const int32_t argmax = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    SamplingParams k1 = sampled(1.5);
    k1.top_k = 1;
    SamplingParams p0 = sampled(1.5);
    p0.top_p = 1e-9;
    SamplingParams m1 = sampled(1.5);
    m1.min_p = 1.0;
    EXPECT_EQ(sample(logits, k1, s, 0, 0).token, argmax);
    EXPECT_EQ(sample(logits, p0, s, 0, 0).token, argmax);
    EXPECT_EQ(sample(logits, m1, s, 0, 0).token, argmax);
  }
}

TEST(Sampler, MatchesTheFullSortReference) {
  // Real vocabulary size, every combination of cuts, many draws each.
  const std::vector<float> logits = random_logits(129280, 5);
  struct Case {
    double temperature, top_p;
    int64_t top_k;
    double min_p;
  };
  const std::vector<Case> cases = {{1.0, 1.0, 0, 0.0},  {0.7, 0.9, 0, 0.0},    {1.3, 0.5, 0, 0.0},
                                   {1.0, 1.0, 50, 0.0}, {1.0, 1.0, 2000, 0.0}, {0.8, 0.95, 40, 0.0},
                                   {1.0, 1.0, 0, 0.1},  {0.6, 0.9, 100, 0.05}, {2.0, 0.99, 0, 0.01}};
  for (const Case& c : cases) {
    SCOPED_TRACE("T=" + std::to_string(c.temperature) + " top_p=" + std::to_string(c.top_p) +
                 " top_k=" + std::to_string(c.top_k) + " min_p=" + std::to_string(c.min_p));
    SamplingParams p = sampled(c.temperature);
    p.top_p = c.top_p;
    p.top_k = c.top_k;
    p.min_p = c.min_p;
    const Reference reference(logits, p);
    int mismatches = 0;
    for (int64_t pos = 0; pos < 100; ++pos)
      mismatches += sample(logits, p, 11, 0, pos).token != reference.token(sample_uniform(11, 0, pos));
    // float weights against double ones may disagree only when u falls within ~1e-7 of a boundary.
    EXPECT_LE(mismatches, 1);
  }
}

TEST(Sampler, MinPDropsUnlikelyTokens) {
  // p = 0.5, 0.3, 0.15, 0.05: min_p 0.25 keeps p >= 0.125, i.e. the first three.
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
  SamplingParams p = sampled(1.0);
  p.min_p = 0.25;
  std::vector<int> counts(4);
  for (int64_t i = 0; i < 5000; ++i) ++counts[static_cast<size_t>(sample(logits, p, 3, 0, i).token)];
  EXPECT_EQ(counts[3], 0);
  EXPECT_GT(counts[2], 0);
}

// Pearson's chi-square of counts against probabilities.
double chi_square(const std::vector<int>& counts, const std::vector<double>& probs, int draws) {
  double x = 0.0;
  for (size_t i = 0; i < counts.size(); ++i) {
    const double expected = probs[i] * draws;
    if (expected == 0.0) {
      EXPECT_EQ(counts[i], 0) << "token " << i << " has probability 0";
      continue;
    }
    x += (counts[i] - expected) * (counts[i] - expected) / expected;
  }
  return x;
}

TEST(Sampler, DrawsFollowTheCutDistribution) {
  const std::vector<float> logits = {std::log(0.1f), std::log(0.2f), std::log(0.3f), std::log(0.4f)};
  struct Case {
    const char* what;
    SamplingParams p;
    std::vector<double> probs;
  };
  SamplingParams plain = sampled(1.0);
  SamplingParams cold = sampled(0.5);  // p^2 renormalized: 1, 4, 9, 16 over 30
  SamplingParams top2 = sampled(1.0);
  top2.top_k = 2;
  SamplingParams nucleus = sampled(1.0);  // 0.4 < 0.6 <= 0.4 + 0.3: the two best
  nucleus.top_p = 0.6;
  SamplingParams min_p = sampled(1.0);  // p >= 0.45 * 0.4 = 0.18: the three best
  min_p.min_p = 0.45;
  const std::vector<Case> cases = {
      {"plain", plain, {0.1, 0.2, 0.3, 0.4}},
      {"temperature 0.5", cold, {1 / 30.0, 4 / 30.0, 9 / 30.0, 16 / 30.0}},
      {"top_k 2", top2, {0, 0, 3 / 7.0, 4 / 7.0}},
      {"top_p 0.6", nucleus, {0, 0, 3 / 7.0, 4 / 7.0}},
      {"min_p 0.45", min_p, {0, 2 / 9.0, 3 / 9.0, 4 / 9.0}},
  };
  const int draws = 20000;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    std::vector<int> counts(4);
    for (int64_t i = 0; i < draws; ++i) ++counts[static_cast<size_t>(sample(logits, c.p, 2024, 0, i).token)];
    // At most 3 degrees of freedom; 16.27 is the 0.999 quantile of chi-square(3).
    EXPECT_LT(chi_square(counts, c.probs, draws), 16.27);
  }
}

TEST(Sampler, LogprobsAreTheRawLogSoftmax) {
  const std::vector<float> logits = random_logits(3000, 9);
  double max_logit = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (const float l : logits) sum += std::exp(l - max_logit);
  const double lse = max_logit + std::log(sum);
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });

  for (const double temperature : {0.0, 0.5, 1.7}) {
    SCOPED_TRACE(temperature);
    SamplingParams p = sampled(temperature);
    p.top_k = 30;  // cuts change the draw, never the reported logprobs
    p.logprobs = true;
    p.top_logprobs = 5;
    const SampleResult r = sample(logits, p, 1, 0, 0);
    EXPECT_NEAR(r.logprob, logits[static_cast<size_t>(r.token)] - lse, 1e-5);
    ASSERT_EQ(r.top.size(), 5u);
    for (size_t i = 0; i < 5; ++i) {
      EXPECT_EQ(r.top[i].first, order[i]);
      EXPECT_NEAR(r.top[i].second, logits[static_cast<size_t>(order[i])] - lse, 1e-5);
    }
  }
  // Over the whole vocabulary the probabilities sum to 1.
  SamplingParams all = sampled(0.0);
  all.logprobs = true;
  all.top_logprobs = 3000;
  double total = 0.0;
  for (const auto& [t, lp] : sample(logits, all, 0, 0, 0).top) total += std::exp(static_cast<double>(lp));
  EXPECT_NEAR(total, 1.0, 1e-4);
  // Without logprobs nothing is computed.
  const SampleResult none = sample(logits, sampled(0.0), 0, 0, 0);
  EXPECT_EQ(none.logprob, 0.0f);
  EXPECT_TRUE(none.top.empty());
}

TEST(Sampler, ChosenLogprobCountsTiesAndMaskedTokens) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> logits = {1.0f, -inf, 1.0f, 0.0f};
  SamplingParams p = sampled(1.0);
  p.logprobs = true;
  p.top_logprobs = 4;
  for (int64_t pos = 0; pos < 200; ++pos) {
    const SampleResult r = sample(logits, p, 5, 0, pos);
    ASSERT_NE(r.token, 1) << "a -inf logit is never drawn";
    ASSERT_EQ(r.top.size(), 4u);
    EXPECT_EQ(r.top[0].first, 0);  // ties: lower id first
    EXPECT_EQ(r.top[1].first, 2);
    EXPECT_EQ(r.top[3].first, 1);
    EXPECT_TRUE(std::isinf(r.top[3].second));
  }
}

TEST(Sampler, TiesAtACutGoToTheLowerIds) {
  // Equal logits: top-p 0.35 of ten equal tokens keeps four (0.4 is the first mass >= 0.35), and
  // top-k keeps the k lowest ids, for the small-k buffer and the large-k histogram alike.
  const std::vector<float> flat(10, 0.5f);
  SamplingParams nucleus = sampled(1.0);
  nucleus.top_p = 0.35;
  std::set<int32_t> seen;
  for (int64_t i = 0; i < 2000; ++i) seen.insert(sample(flat, nucleus, 1, 0, i).token);
  EXPECT_EQ(seen, (std::set<int32_t>{0, 1, 2, 3}));

  const std::vector<float> wide(300, -2.0f);
  for (const int64_t k : {3, 100}) {
    SCOPED_TRACE(k);
    SamplingParams top_k = sampled(1.0);
    top_k.top_k = k;
    std::set<int32_t> drawn;
    for (int64_t i = 0; i < 3000; ++i) drawn.insert(sample(wide, top_k, 2, 0, i).token);
    EXPECT_EQ(static_cast<int64_t>(drawn.size()), k);
    EXPECT_EQ(*drawn.rbegin(), k - 1);
  }
}

TEST(Sampler, NaNLogitsAreABrokenInvariant) {
  // A NaN logit means a broken forward pass (DILU_CHECK), whatever its sign bit.
  std::vector<float> logits(200, 0.0f);
  for (const float nan : {-std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::quiet_NaN()}) {
    logits[150] = nan;
    for (const double temperature : {0.0, 1.0}) {
      try {
        sample(logits, sampled(temperature), 0, 0, 0);
        ADD_FAILURE() << "no error for a NaN logit";
      } catch (const std::logic_error& e) {
        EXPECT_NE(std::string(e.what()).find("NaN"), std::string::npos) << e.what();
      }
    }
  }
}

TEST(DeriveSeed, DependsOnRunSeedAndKey) {
  EXPECT_EQ(derive_seed(1, "\"a\""), derive_seed(1, "\"a\""));
  EXPECT_NE(derive_seed(1, "\"a\""), derive_seed(2, "\"a\""));
  EXPECT_NE(derive_seed(1, "\"a\""), derive_seed(1, "\"b\""));
  EXPECT_NE(derive_seed(0, ""), 0u);
}

}  // namespace
}  // namespace dilu
