// Host-side token sampling (see sampler.h). Weights are floats, sums doubles, all in a fixed
// order, so a draw is reproducible bit for bit; nothing sorts the vocabulary.
#include "engine/sampler.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>

#include "kernels/error.h"

namespace dilu {

namespace {

// Below this temperature vLLM samples greedily too: 1/T would overflow the exponent anyway.
constexpr double kGreedyTemperature = 1e-5;

uint64_t mix64(uint64_t x) {  // splitmix64 finalizer: a bijection with full avalanche
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// exp(x) for x <= 0, within 2 ulp of expf (Cephes' polynomial); exactly 0 below -87, for -inf
// (a masked token never draws) and for NaN. Masks instead of branches, so that loops over the
// vocabulary vectorize even under -ftrapping-math (which forbids if-converting float compares).
inline float exp_nonpositive(float x) {
  const auto bits = std::bit_cast<int32_t>(x);
  const int32_t vanish = (bits & 0x7fffffff) > 0x42ae0000 ? -1 : 0;  // |x| > 87, inf or NaN
  const float t = std::bit_cast<float>(bits & ~vanish);
  const auto n = static_cast<int32_t>(t * 1.44269504088896341f - 0.5f);  // round(t / ln 2), t <= 0
  const auto nf = static_cast<float>(n);
  const float r = t - nf * 0.693359375f + nf * 2.12194440e-4f;  // t - n ln 2 in two parts
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const auto scale = std::bit_cast<float>(static_cast<int32_t>((n + 127) * (1 << 23)));  // 2^n, n in [-126, 0]
  return std::bit_cast<float>(std::bit_cast<int32_t>(y * scale) & ~vanish);
}

// Sum in double with eight running sums: a fixed order (so bit-reproducible) without the latency
// chain of one accumulator.
double sum_of(std::span<const float> w) {
  double part[8] = {};
  const size_t body = w.size() / 8 * 8;
  for (size_t i = 0; i < body; i += 8)
    for (size_t j = 0; j < 8; ++j) part[j] += static_cast<double>(w[i + j]);
  for (size_t i = body; i < w.size(); ++i) part[i - body] += static_cast<double>(w[i]);
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Floats as int32 in the same order (-0 and +0 equal; NaNs outside [key(-inf), key(+inf)]):
// integer max/min vectorize where float ones may not.
inline int32_t order_key(float x) {
  const auto bits = std::bit_cast<int32_t>(x + 0.0f);  // + 0 turns -0 into +0
  return bits ^ ((bits >> 31) & 0x7fffffff);
}

// The largest order key of each block of kBlock logits: one vectorized pass that lets the
// searches below skip every block that cannot hold what they look for. Aborts on NaN (of either
// sign): a broken forward pass, not a user error.
constexpr size_t kBlock = 64;
std::vector<int32_t> block_max_keys(std::span<const float> logits) {
  std::vector<int32_t> out((logits.size() + kBlock - 1) / kBlock);
  int32_t lo = INT32_MAX, hi = INT32_MIN;
  for (size_t b = 0; b < out.size(); ++b) {
    const size_t begin = b * kBlock, end = std::min(begin + kBlock, logits.size());
    int32_t m = INT32_MIN, block_lo = INT32_MAX;
    for (size_t i = begin; i < end; ++i) {
      const int32_t k = order_key(logits[i]);
      m = k > m ? k : m;
      block_lo = k < block_lo ? k : block_lo;
    }
    out[b] = m;
    hi = m > hi ? m : hi;
    lo = block_lo < lo ? block_lo : lo;
  }
  const float inf = std::numeric_limits<float>::infinity();
  DILU_CHECK(lo >= order_key(-inf) && hi <= order_key(inf), "NaN among the logits: the forward pass is broken");
  return out;
}

// The first index of the largest logit.
int32_t first_argmax(std::span<const float> logits, const std::vector<int32_t>& block_max) {
  const int32_t hi = *std::max_element(block_max.begin(), block_max.end());
  size_t b = 0;
  while (block_max[b] != hi) ++b;
  for (size_t i = b * kBlock;; ++i)
    if (order_key(logits[i]) == hi) return static_cast<int32_t>(i);
}

// The n best token ids (larger logit first, lower id on ties), best first. A small n keeps a
// sorted buffer and skips every block whose maximum cannot beat the worst kept logit; a large n
// counts tokens per bucket of logit values to find where the n-th best falls, and sorts only that
// bucket.
std::vector<int32_t> best_tokens(std::span<const float> logits, const std::vector<int32_t>& block_max, int64_t n) {
  const auto vocab = static_cast<int64_t>(logits.size());
  n = std::min(n, vocab);
  auto before = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::vector<int32_t> out;
  if (n <= 0) return out;
  if (n <= 64) {
    out.reserve(static_cast<size_t>(n) + 1);
    int32_t worst = INT32_MIN;  // order key of the worst kept logit once the buffer is full
    for (size_t b = 0; b < block_max.size(); ++b) {
      // A logit equal to the worst kept one loses to it (higher id), so only larger ones enter.
      if (static_cast<int64_t>(out.size()) == n && block_max[b] <= worst) continue;
      const auto end = static_cast<int32_t>(std::min<size_t>((b + 1) * kBlock, logits.size()));
      for (auto i = static_cast<int32_t>(b * kBlock); i < end; ++i) {
        if (static_cast<int64_t>(out.size()) == n && order_key(logits[static_cast<size_t>(i)]) <= worst) continue;
        out.insert(std::upper_bound(out.begin(), out.end(), i, before), i);
        if (static_cast<int64_t>(out.size()) > n) out.pop_back();
        if (static_cast<int64_t>(out.size()) == n) worst = order_key(logits[static_cast<size_t>(out.back())]);
      }
    }
    return out;
  }
  auto bucket_of = [](float x) { return (static_cast<uint32_t>(order_key(x)) ^ 0x80000000u) >> 16; };
  std::vector<int32_t> count(65536, 0);
  for (const float l : logits) ++count[bucket_of(l)];
  uint32_t bucket = 65536;
  int64_t above = 0;
  while (bucket-- > 0 && above + count[bucket] < n) above += count[bucket];
  std::vector<int32_t> edge;
  for (int32_t i = 0; i < vocab; ++i) {
    const uint32_t b = bucket_of(logits[static_cast<size_t>(i)]);
    if (b > bucket)
      out.push_back(i);
    else if (b == bucket)
      edge.push_back(i);
  }
  std::sort(edge.begin(), edge.end(), before);
  out.insert(out.end(), edge.begin(), edge.begin() + (n - above));
  std::sort(out.begin(), out.end(), before);
  return out;
}

// log(sum(exp(logits))): the normalizer of the raw log_softmax, in chunks that stay in cache.
double log_sum_exp(std::span<const float> logits, float max_logit) {
  constexpr size_t kChunk = 1024;
  float chunk[kChunk];
  double sum = 0.0;
  for (size_t begin = 0; begin < logits.size(); begin += kChunk) {
    const size_t n = std::min(kChunk, logits.size() - begin);
    for (size_t i = 0; i < n; ++i) chunk[i] = exp_nonpositive(logits[begin + i] - max_logit);
    sum += sum_of({chunk, n});
  }
  return static_cast<double>(max_logit) + std::log(sum);
}

// The index drawn by inverse CDF at u over weights w (zeros never drawn), walking w in order.
// Chunk sums let the walk skip ahead; the order of every addition is fixed.
size_t inverse_cdf(std::span<const float> w, double u) {
  constexpr size_t kChunk = 1024;
  std::vector<double> chunk_sums;
  double total = 0.0;
  for (size_t begin = 0; begin < w.size(); begin += kChunk) {
    chunk_sums.push_back(sum_of(w.subspan(begin, std::min(kChunk, w.size() - begin))));
    total += chunk_sums.back();
  }
  const double target = u * total;
  double cum = 0.0;
  size_t last = 0;  // the last positive weight seen: the answer when rounding leaves cum <= target
  for (size_t c = 0; c < chunk_sums.size(); ++c) {
    const size_t begin = c * kChunk, end = std::min(begin + kChunk, w.size());
    if (cum + chunk_sums[c] <= target && c + 1 < chunk_sums.size()) {
      cum += chunk_sums[c];
      for (size_t i = end; i-- > begin;)
        if (w[i] > 0.0f) {
          last = i;
          break;
        }
      continue;
    }
    for (size_t i = begin; i < end; ++i) {
      if (!(w[i] > 0.0f)) continue;
      cum += static_cast<double>(w[i]);
      last = i;
      if (cum > target) return i;
    }
  }
  return last;
}

// The nucleus of weights w (each in [0, 1]): in descending order (ties by position), the shortest
// prefix whose mass reaches `goal`. Returned as a threshold: every weight above `tau` is in, and
// of the weights equal to it the first `tie_keep` (by position). A histogram over the top 16 bits
// of the weights (their order as integers is their order as floats) finds the bucket where the
// nucleus ends; only that bucket is sorted. Linear, and no unpredictable branch over V.
struct Nucleus {
  float tau = 0.0f;
  int64_t tie_keep = 0;  // of tie_count weights equal to tau
  int64_t tie_count = 0;
};
Nucleus find_nucleus(std::span<const float> w, double goal) {
  constexpr uint32_t kBuckets = (std::bit_cast<uint32_t>(1.0f) >> 16) + 2;  // weights <= 1 (+ rounding)
  auto bucket_of = [](float x) { return std::min(std::bit_cast<uint32_t>(x) >> 16, kBuckets - 1); };
  std::vector<double> mass(kBuckets, 0.0);
  for (const float x : w) mass[bucket_of(x)] += static_cast<double>(x);
  uint32_t b = kBuckets;
  double above = 0.0;
  while (b-- > 0 && above + mass[b] < goal) above += mass[b];
  if (b >= kBuckets) return {};                 // rounding kept the total below goal: keep everything (tau 0)
  std::vector<std::pair<float, int64_t>> edge;  // (weight, position) of bucket b
  for (size_t i = 0; i < w.size(); ++i)
    if (bucket_of(w[i]) == b) edge.emplace_back(w[i], static_cast<int64_t>(i));
  std::sort(edge.begin(), edge.end(), [](const auto& x, const auto& y) {
    return x.first > y.first || (x.first == y.first && x.second < y.second);
  });
  size_t last = 0;  // the last weight in, in sorted order
  for (; last + 1 < edge.size(); ++last) {
    above += static_cast<double>(edge[last].first);
    if (above >= goal) break;
  }
  Nucleus out{edge[last].first, 0, 0};
  for (size_t i = 0; i < edge.size(); ++i) {
    out.tie_keep += i <= last && edge[i].first == out.tau ? 1 : 0;
    out.tie_count += edge[i].first == out.tau ? 1 : 0;
  }
  return out;
}

// Zeroes the weights below `floor`. Weights are >= 0, so their bits compare as integers: a
// mask, not a branch, and the loop vectorizes.
void keep_at_least(std::vector<float>& w, float floor) {
  const auto floor_bits = std::bit_cast<int32_t>(floor);
  for (float& x : w) {
    const auto bits = std::bit_cast<int32_t>(x);
    x = std::bit_cast<float>(bits & (bits >= floor_bits ? -1 : 0));
  }
}

// The token of a sampled (temperature > 0) request; see sample() in sampler.h. Works on the
// candidates in id order throughout: the cuts only decide membership, so nothing is sorted.
int32_t draw_token(std::span<const float> logits, const std::vector<int32_t>& block_max, const SamplingParams& params,
                   float max_logit, double u) {
  const auto vocab = static_cast<int64_t>(logits.size());
  const auto inv_t = static_cast<float>(1.0 / params.temperature);
  // Candidates (all tokens, or the top k in id order) and their weights p / p_max.
  std::vector<int32_t> ids;
  if (params.top_k > 0 && params.top_k < vocab) {
    ids = best_tokens(logits, block_max, params.top_k);
    std::sort(ids.begin(), ids.end());
  }
  const bool all = ids.empty();
  const size_t count = all ? static_cast<size_t>(vocab) : ids.size();
  std::vector<float> w(count);
  if (all) {
    for (size_t i = 0; i < count; ++i) w[i] = exp_nonpositive((logits[i] - max_logit) * inv_t);
  } else {
    for (size_t i = 0; i < count; ++i)
      w[i] = exp_nonpositive((logits[static_cast<size_t>(ids[i])] - max_logit) * inv_t);
  }

  if (params.top_p < 1.0) {
    const Nucleus nucleus = find_nucleus(w, params.top_p * sum_of(w));
    keep_at_least(w, nucleus.tau);
    if (nucleus.tie_keep < nucleus.tie_count) {  // rare: only the first tie_keep ties are in
      int64_t ties = nucleus.tie_keep;
      for (float& x : w)
        if (x == nucleus.tau && ties-- <= 0) x = 0.0f;
    }
  }
  // min-p: weights are relative to p_max, so the threshold is min_p itself. The argmax (w = 1)
  // survives every cut, so the draw never runs out of tokens.
  if (params.min_p > 0.0) keep_at_least(w, static_cast<float>(params.min_p));
  const size_t drawn = inverse_cdf(w, u);
  return all ? static_cast<int32_t>(drawn) : ids[drawn];
}

}  // namespace

double sample_uniform(uint64_t seed, int64_t sample_index, int64_t position) {
  const uint64_t h = mix64(mix64(mix64(seed) ^ static_cast<uint64_t>(sample_index)) ^ static_cast<uint64_t>(position));
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

uint64_t derive_seed(uint64_t run_seed, std::string_view request_key) {
  uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a over the key, then mixed with the run seed
  for (const char c : request_key) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ULL;
  return mix64(h ^ mix64(run_seed));
}

SampleResult sample(std::span<const float> logits, const SamplingParams& params, uint64_t seed, int64_t sample_index,
                    int64_t position) {
  DILU_CHECK(!logits.empty(), "sample() needs at least one logit");
  const std::vector<int32_t> block_max = block_max_keys(logits);
  const int32_t argmax = first_argmax(logits, block_max);
  const float max_logit = logits[static_cast<size_t>(argmax)];
  DILU_CHECK(max_logit > -std::numeric_limits<float>::infinity(), "every logit is -inf: no token can be chosen");

  SampleResult result;
  result.token = params.temperature < kGreedyTemperature
                     ? argmax
                     : draw_token(logits, block_max, params, max_logit, sample_uniform(seed, sample_index, position));
  if (params.logprobs) {
    const double lse = log_sum_exp(logits, max_logit);
    auto logprob = [&](int32_t t) {
      return static_cast<float>(static_cast<double>(logits[static_cast<size_t>(t)]) - lse);
    };
    result.logprob = logprob(result.token);
    for (const int32_t t : best_tokens(logits, block_max, params.top_logprobs)) result.top.emplace_back(t, logprob(t));
  }
  return result;
}

}  // namespace dilu
