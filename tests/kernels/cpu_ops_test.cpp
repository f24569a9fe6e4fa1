// The CPU backend's ops against naive double-precision references on random inputs. Outputs are
// poisoned with NaN before each op so that an element it forgets to write cannot pass. Unless a
// test says otherwise the tolerance is relative to the sum of the magnitudes of the terms that
// were added: FP32 accumulation over n terms errs by about sqrt(n) * 6e-8 of that sum, so 1e-5
// leaves a wide margin while still catching any wrong term.
#include "kernels/cpu/cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/dtype.h"

namespace dilu {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr double kRel = 1e-5;

class CpuOpsTest : public ::testing::Test {
 protected:
  std::unique_ptr<Ops> ops = make_cpu_ops(2);
  std::mt19937 rng{1234};

  std::vector<float> uniform(size_t n, float lo = -1.0f, float hi = 1.0f) {
    std::uniform_real_distribution<float> dist(lo, hi);
    std::vector<float> v(n);
    for (float& x : v) x = dist(rng);
    return v;
  }
  Tensor f32(Shape shape, const std::vector<float>& values) {
    Tensor t = Tensor::host(DType::F32, std::move(shape));
    EXPECT_EQ(static_cast<size_t>(t.numel()), values.size());
    std::copy(values.begin(), values.end(), t.data<float>());
    return t;
  }
  Tensor poisoned(Shape shape) {
    Tensor t = Tensor::host(DType::F32, std::move(shape));
    std::fill(t.data<float>(), t.data<float>() + t.numel(), kNaN);
    return t;
  }
};

// ---- linear -----------------------------------------------------------------------------------

struct LinearCase {
  DType dtype;
  int64_t tokens, out, in, block_out, block_in;
};

// A random weight of the case's dtype and its exact FP32 value (what the op must compute with).
struct RandomWeight {
  Tensor weight, scale_inv;
  std::vector<double> exact;  // [out, in]
};

RandomWeight random_weight(std::mt19937& rng, const LinearCase& c) {
  RandomWeight r;
  r.exact.resize(static_cast<size_t>(c.out * c.in));
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  if (c.dtype == DType::F32) {
    r.weight = Tensor::host(DType::F32, {c.out, c.in});
    for (int64_t i = 0; i < c.out * c.in; ++i) r.exact[static_cast<size_t>(i)] = r.weight.data<float>()[i] = dist(rng);
  } else if (c.dtype == DType::BF16) {
    r.weight = Tensor::host(DType::BF16, {c.out, c.in});
    for (int64_t i = 0; i < c.out * c.in; ++i) {
      const uint16_t b = f32_to_bf16(dist(rng));
      r.weight.data<uint16_t>()[i] = b;
      r.exact[static_cast<size_t>(i)] = bf16_to_f32(b);
    }
  } else {
    const int64_t so = (c.out + c.block_out - 1) / c.block_out, si = (c.in + c.block_in - 1) / c.block_in;
    r.weight = Tensor::host(DType::F8E4M3, {c.out, c.in});
    r.scale_inv = Tensor::host(DType::F32, {so, si});
    std::uniform_real_distribution<float> scale_dist(0.001f, 0.01f);
    for (int64_t i = 0; i < so * si; ++i) r.scale_inv.data<float>()[i] = scale_dist(rng);
    std::uniform_int_distribution<int> code_dist(0, 255);
    for (int64_t j = 0; j < c.out; ++j)
      for (int64_t i = 0; i < c.in; ++i) {
        int code;
        do code = code_dist(rng);
        while ((code & 0x7f) == 0x7f);  // no NaN codes
        r.weight.data<uint8_t>()[j * c.in + i] = static_cast<uint8_t>(code);
        const float s = r.scale_inv.data<float>()[(j / c.block_out) * si + i / c.block_in];
        // The exact dequantized weight is the FP32 product (one rounding), as the reference model.
        r.exact[static_cast<size_t>(j * c.in + i)] = fp8e4m3_to_f32(static_cast<uint8_t>(code)) * s;
      }
  }
  return r;
}

class LinearTest : public CpuOpsTest, public ::testing::WithParamInterface<LinearCase> {};

TEST_P(LinearTest, MatchesDoubleReference) {
  const LinearCase c = GetParam();
  const RandomWeight rw = random_weight(rng, c);
  LinearWeight w = ops->place_linear(rw.weight, rw.scale_inv, c.block_out, c.block_in);
  ASSERT_EQ(w.out_features(), c.out);
  ASSERT_EQ(w.in_features(), c.in);
  Tensor x = f32({c.tokens, c.in}, uniform(static_cast<size_t>(c.tokens * c.in)));
  Tensor out = poisoned({c.tokens, c.out});
  ops->linear(x, w, out);
  for (int64_t t = 0; t < c.tokens; ++t)
    for (int64_t j = 0; j < c.out; ++j) {
      double ref = 0, mag = 0;
      for (int64_t i = 0; i < c.in; ++i) {
        const double term = static_cast<double>(x.data<float>()[t * c.in + i]) * rw.exact[static_cast<size_t>(j * c.in + i)];
        ref += term;
        mag += std::fabs(term);
      }
      ASSERT_NEAR(out.data<float>()[t * c.out + j], ref, kRel * mag + 1e-12) << "token " << t << " row " << j;
    }

  // dequantize() gives the exact FP32 weight, bit for bit.
  Tensor deq = ops->dequantize(w);
  ASSERT_EQ(deq.shape(), (Shape{c.out, c.in}));
  for (int64_t i = 0; i < c.out * c.in; ++i)
    ASSERT_EQ(static_cast<double>(deq.data<float>()[i]), rw.exact[static_cast<size_t>(i)]) << "element " << i;
}

INSTANTIATE_TEST_SUITE_P(
    Cases, LinearTest,
    ::testing::Values(LinearCase{DType::F32, 5, 23, 37, 0, 0}, LinearCase{DType::F32, 1, 1, 1, 0, 0},
                      LinearCase{DType::BF16, 3, 64, 129, 0, 0},
                      // FP8: 128x128 blocks with partial blocks in both dimensions (like kv_a_proj's 576 rows)
                      LinearCase{DType::F8E4M3, 4, 200, 300, 128, 128},
                      // small blocks, shapes not multiples of them
                      LinearCase{DType::F8E4M3, 3, 70, 45, 32, 32},
                      // rectangular blocks, a single partial block in each direction
                      LinearCase{DType::F8E4M3, 2, 17, 150, 16, 64}, LinearCase{DType::F8E4M3, 1, 5, 7, 128, 128}),
    [](const ::testing::TestParamInfo<LinearCase>& param_info) {
      const LinearCase& c = param_info.param;
      return std::string(dtype_name(c.dtype) == "F8_E4M3" ? "FP8" : dtype_name(c.dtype)) + "_" +
             std::to_string(c.tokens) + "x" + std::to_string(c.out) + "x" + std::to_string(c.in) + "_b" +
             std::to_string(c.block_out) + "x" + std::to_string(c.block_in);
    });

TEST_F(CpuOpsTest, LinearWithNoTokensWritesNothing) {
  const RandomWeight rw = random_weight(rng, {DType::F8E4M3, 0, 9, 33, 8, 8});
  LinearWeight w = ops->place_linear(rw.weight, rw.scale_inv, 8, 8);
  Tensor x = Tensor::host(DType::F32, {0, 33});
  Tensor out = Tensor::host(DType::F32, {0, 9});
  ops->linear(x, w, out);  // must not crash or touch memory
  SUCCEED();
}

// ---- rms_norm ---------------------------------------------------------------------------------

void expect_rms_norm(const std::vector<float>& x, const std::vector<float>& w, int64_t rows, int64_t width, float eps,
                     const float* got, const char* what) {
  const int64_t d = static_cast<int64_t>(w.size());
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(x[static_cast<size_t>(r * width + i)]) * x[static_cast<size_t>(r * width + i)];
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(d) + eps);
    for (int64_t i = 0; i < d; ++i) {
      const double ref = w[static_cast<size_t>(i)] * (x[static_cast<size_t>(r * width + i)] * inv);
      // A sum of d squares and three products: rel 1e-5.
      ASSERT_NEAR(got[r * width + i], ref, kRel * std::fabs(ref) + 1e-7) << what << " row " << r << " col " << i;
    }
  }
}

TEST_F(CpuOpsTest, RmsNormWholeRows) {
  const int64_t rows = 6, width = 96;
  const float eps = 1e-6f;
  const auto xv = uniform(static_cast<size_t>(rows * width), -3.0f, 3.0f);
  const auto wv = uniform(static_cast<size_t>(width), 0.5f, 1.5f);
  Tensor x = f32({rows, width}, xv), w = f32({width}, wv), out = poisoned({rows, width});
  ops->rms_norm(x, w, eps, out);
  expect_rms_norm(xv, wv, rows, width, eps, out.data<float>(), "out");
  // In place (out aliases x), as the model normalizes q_lat and the cache entry.
  ops->rms_norm(x, w, eps, x);
  expect_rms_norm(xv, wv, rows, width, eps, x.data<float>(), "in place");
}

TEST_F(CpuOpsTest, RmsNormFirstColumnsOnly) {
  // The cache entry [C + R]: only the first C columns are normalized; the rotated key columns
  // must be left exactly as they were, in place and out of place.
  const int64_t rows = 5, width = 80, d = 64;
  const float eps = 1e-6f;
  const auto xv = uniform(static_cast<size_t>(rows * width), -2.0f, 2.0f);
  const auto wv = uniform(static_cast<size_t>(d), 0.5f, 1.5f);
  Tensor x = f32({rows, width}, xv), w = f32({d}, wv);
  Tensor out = f32({rows, width}, std::vector<float>(static_cast<size_t>(rows * width), 777.0f));
  ops->rms_norm(x, w, eps, out);
  expect_rms_norm(xv, wv, rows, width, eps, out.data<float>(), "out");
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = d; i < width; ++i) ASSERT_EQ(out.data<float>()[r * width + i], 777.0f) << r << "," << i;
  ops->rms_norm(x, w, eps, x);
  expect_rms_norm(xv, wv, rows, width, eps, x.data<float>(), "in place");
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = d; i < width; ++i) ASSERT_EQ(x.data<float>()[r * width + i], xv[static_cast<size_t>(r * width + i)]);
}

// ---- rope -------------------------------------------------------------------------------------

TEST_F(CpuOpsTest, RopeRotatesInterleavedPairsOfTheGivenColumns) {
  const int64_t tokens = 4, heads = 3, width = 20, offset = 6, half = 5;  // rope columns [6, 16)
  const std::vector<int32_t> pos = {0, 1, 17, 3001};
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) inv_freq[static_cast<size_t>(i)] = std::pow(10000.0f, -2.0f * static_cast<float>(i) / 10.0f);
  const float factor = 1.3f;
  const auto xv = uniform(static_cast<size_t>(tokens * heads * width));
  Tensor x = f32({tokens, heads, width}, xv);
  ops->rope(x, offset, pos, inv_freq, factor);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t base = (t * heads + h) * width;
      for (int64_t col = 0; col < width; ++col) {
        const bool rotated = col >= offset && col < offset + 2 * half;
        if (!rotated) {
          ASSERT_EQ(x.data<float>()[base + col], xv[static_cast<size_t>(base + col)]) << "untouched column " << col;
          continue;
        }
        const int64_t i = (col - offset) / 2;
        // The angle is formed in FP32 (as the reference model does: pos * inv_freq in float), so
        // the reference takes that angle too; cos/sin and the rotation are done in double.
        const double angle = static_cast<float>(pos[static_cast<size_t>(t)]) * inv_freq[static_cast<size_t>(i)];
        const double a = xv[static_cast<size_t>(base + offset + 2 * i)], b = xv[static_cast<size_t>(base + offset + 2 * i + 1)];
        const double cs = std::cos(angle) * factor, sn = std::sin(angle) * factor;
        const double ref = (col - offset) % 2 == 0 ? a * cs - b * sn : b * cs + a * sn;
        // Two products and a sum, cos/sin of |angle| < 3001 in FP32 (libm: < 1 ulp): 1e-5 of the
        // pair's magnitude.
        ASSERT_NEAR(x.data<float>()[base + col], ref, kRel * factor * (std::fabs(a) + std::fabs(b)))
            << "token " << t << " head " << h << " col " << col;
      }
    }
}

// ---- cache_write + mla_attention --------------------------------------------------------------

TEST_F(CpuOpsTest, CacheWriteStoresEachTokenAtItsSlot) {
  const int64_t blocks = 4, bs = 3, width = 5;
  Tensor cache = f32({blocks, bs, width}, std::vector<float>(static_cast<size_t>(blocks * bs * width), -1.0f));
  AttentionLayout layout;
  layout.block_size = bs;
  layout.token_slot = {7, 0, 11};
  const auto ev = uniform(3 * width);
  Tensor entry = f32({3, width}, ev);
  ops->cache_write(cache, entry, layout);
  for (int64_t slot = 0; slot < blocks * bs; ++slot) {
    const auto it = std::find(layout.token_slot.begin(), layout.token_slot.end(), slot);
    for (int64_t k = 0; k < width; ++k) {
      const float want = it == layout.token_slot.end() ? -1.0f : ev[static_cast<size_t>((it - layout.token_slot.begin()) * width + k)];
      ASSERT_EQ(cache.data<float>()[slot * width + k], want) << "slot " << slot;
    }
  }
}

TEST_F(CpuOpsTest, MlaAttentionMatchesExpandedNaiveMla) {
  // Two sequences over interleaved, out-of-order blocks; several query tokens per sequence at
  // different positions. The reference is MLA in its expanded form (per-head keys and values
  // materialized from the latent with kv_b), in double.
  MlaParams p;
  p.num_heads = 3;
  p.qk_nope_head_dim = 8;
  p.qk_rope_head_dim = 4;
  p.kv_lora_rank = 16;
  p.v_head_dim = 6;
  p.softmax_scale = 0.37f;
  const int64_t h = p.num_heads, nope = p.qk_nope_head_dim, r = p.qk_rope_head_dim, c = p.kv_lora_rank,
                v = p.v_head_dim, width = c + r, bs = 4, num_blocks = 10;
  AttentionLayout layout;
  layout.block_size = bs;
  layout.block_tables = {{7, 2, 5}, {1, 9}};  // seq 0: 10 tokens (last block partly used); seq 1: 6 tokens
  const std::vector<int64_t> seq_len = {10, 6};
  layout.token_seq = {0, 1, 0, 0, 1};
  layout.token_pos = {9, 5, 0, 4, 3};
  const int64_t tokens = static_cast<int64_t>(layout.token_seq.size());

  // Unused slots hold NaN: reading one would poison the output.
  Tensor cache = poisoned({num_blocks, bs, width});
  for (size_t s = 0; s < seq_len.size(); ++s)
    for (int64_t j = 0; j < seq_len[s]; ++j) {
      float* e = cache.data<float>() + (layout.block_tables[s][static_cast<size_t>(j / bs)] * bs + j % bs) * width;
      for (int64_t k = 0; k < width; ++k) e[k] = std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng);
    }
  const auto wv = uniform(static_cast<size_t>(h * (nope + v) * c), -0.5f, 0.5f);
  const auto qv = uniform(static_cast<size_t>(tokens * h * (nope + r)), -2.0f, 2.0f);
  Tensor w_kv_b = f32({h * (nope + v), c}, wv), q = f32({tokens, h, nope + r}, qv), out = poisoned({tokens, h * v});
  ops->mla_attention(q, w_kv_b, cache, layout, p, out);

  auto entry = [&](int64_t seq, int64_t j) {
    return cache.data<float>() + (layout.block_tables[static_cast<size_t>(seq)][static_cast<size_t>(j / bs)] * bs + j % bs) * width;
  };
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t seq = layout.token_seq[static_cast<size_t>(t)], ctx = layout.token_pos[static_cast<size_t>(t)] + 1;
    for (int64_t head = 0; head < h; ++head) {
      const float* qh = qv.data() + (t * h + head) * (nope + r);
      const float* w_uk = wv.data() + head * (nope + v) * c;
      const float* w_uv = w_uk + nope * c;
      std::vector<double> score(static_cast<size_t>(ctx));
      std::vector<std::vector<double>> value(static_cast<size_t>(ctx), std::vector<double>(static_cast<size_t>(v)));
      double vmax = 0, smax = -1e300;
      for (int64_t j = 0; j < ctx; ++j) {
        const float* e = entry(seq, j);
        double s = 0;
        for (int64_t i = 0; i < nope; ++i) {
          double k_nope = 0;  // key_nope[i] = W_UK[i] . latent
          for (int64_t k = 0; k < c; ++k) k_nope += static_cast<double>(w_uk[i * c + k]) * e[k];
          s += qh[i] * k_nope;
        }
        for (int64_t i = 0; i < r; ++i) s += static_cast<double>(qh[nope + i]) * e[c + i];
        score[static_cast<size_t>(j)] = s * p.softmax_scale;
        smax = std::max(smax, score[static_cast<size_t>(j)]);
        for (int64_t i = 0; i < v; ++i) {
          double val = 0;
          for (int64_t k = 0; k < c; ++k) val += static_cast<double>(w_uv[i * c + k]) * e[k];
          value[static_cast<size_t>(j)][static_cast<size_t>(i)] = val;
          vmax = std::max(vmax, std::fabs(val));
        }
      }
      double denom = 0;
      for (double& s : score) denom += (s = std::exp(s - smax));
      for (int64_t i = 0; i < v; ++i) {
        double ref = 0;
        for (int64_t j = 0; j < ctx; ++j) ref += score[static_cast<size_t>(j)] / denom * value[static_cast<size_t>(j)][static_cast<size_t>(i)];
        // The output is a convex combination of values; FP32 dot products of length C and
        // softmax weights off by a few ulp times |score| (< 20 here) keep it within 1e-5 of the
        // largest value.
        ASSERT_NEAR(out.data<float>()[t * h * v + head * v + i], ref, kRel * vmax)
            << "token " << t << " head " << head << " dim " << i;
      }
    }
  }
}

// ---- moe_route --------------------------------------------------------------------------------

struct RouteCase {
  int64_t experts, top_k, n_group, topk_group;
  bool norm, with_bias;
  float scale;
};

class MoeRouteTest : public CpuOpsTest, public ::testing::WithParamInterface<RouteCase> {};

TEST_P(MoeRouteTest, ChoosesTopKOfBiasedScoresInTopGroupsWeightsByUnbiasedScores) {
  const RouteCase rc = GetParam();
  const int64_t tokens = 24, d = 32, per_group = rc.experts / rc.n_group;
  const auto xv = uniform(static_cast<size_t>(tokens * d));
  const auto gv = uniform(static_cast<size_t>(rc.experts * d), -0.5f, 0.5f);
  // A bias large enough to change choices (DeepSeek's correction bias is of the scores' order).
  const auto bv = uniform(static_cast<size_t>(rc.experts), -0.3f, 0.3f);
  Tensor x = f32({tokens, d}, xv), gate = f32({rc.experts, d}, gv);
  Tensor bias = rc.with_bias ? f32({rc.experts}, bv) : Tensor();
  RouterParams p;
  p.num_experts = rc.experts;
  p.top_k = rc.top_k;
  p.n_group = rc.n_group;
  p.topk_group = rc.topk_group;
  p.norm_topk_prob = rc.norm;
  p.routed_scaling_factor = rc.scale;
  Tensor ids = Tensor::host(DType::I32, {tokens, rc.top_k});
  std::fill(ids.data<int32_t>(), ids.data<int32_t>() + ids.numel(), -7);
  Tensor weights = poisoned({tokens, rc.top_k});
  ops->moe_route(x, gate, bias, p, ids, weights);

  int64_t bias_changed_choice = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<double> score(static_cast<size_t>(rc.experts)), biased(score.size());
    for (int64_t e = 0; e < rc.experts; ++e) {
      double logit = 0;
      for (int64_t i = 0; i < d; ++i) logit += static_cast<double>(xv[static_cast<size_t>(t * d + i)]) * gv[static_cast<size_t>(e * d + i)];
      score[static_cast<size_t>(e)] = 1.0 / (1.0 + std::exp(-logit));
      biased[static_cast<size_t>(e)] = score[static_cast<size_t>(e)] + (rc.with_bias ? bv[static_cast<size_t>(e)] : 0.0);
    }
    // Groups ranked by the sum of their two best biased scores.
    std::vector<double> group_score(static_cast<size_t>(rc.n_group));
    for (int64_t g = 0; g < rc.n_group; ++g) {
      std::vector<double> s(biased.begin() + g * per_group, biased.begin() + (g + 1) * per_group);
      std::sort(s.rbegin(), s.rend());
      group_score[static_cast<size_t>(g)] = s[0] + s[1];
    }
    std::vector<int64_t> groups(static_cast<size_t>(rc.n_group));
    std::iota(groups.begin(), groups.end(), 0);
    std::sort(groups.begin(), groups.end(), [&](int64_t a, int64_t b) { return group_score[static_cast<size_t>(a)] > group_score[static_cast<size_t>(b)]; });
    if (rc.topk_group < rc.n_group) {
      ASSERT_GT(group_score[static_cast<size_t>(groups[static_cast<size_t>(rc.topk_group - 1)])] -
                    group_score[static_cast<size_t>(groups[static_cast<size_t>(rc.topk_group)])],
                1e-6)
          << "near tie between groups: pick another seed";
    }
    std::vector<int64_t> candidates;
    for (int64_t gi = 0; gi < rc.topk_group; ++gi)
      for (int64_t e = groups[static_cast<size_t>(gi)] * per_group; e < (groups[static_cast<size_t>(gi)] + 1) * per_group; ++e)
        candidates.push_back(e);
    std::sort(candidates.begin(), candidates.end(), [&](int64_t a, int64_t b) { return biased[static_cast<size_t>(a)] > biased[static_cast<size_t>(b)]; });
    ASSERT_GT(biased[static_cast<size_t>(candidates[static_cast<size_t>(rc.top_k - 1)])] -
                  biased[static_cast<size_t>(candidates[static_cast<size_t>(rc.top_k)])],
              1e-6)
        << "near tie between experts: pick another seed";
    const std::set<int64_t> want(candidates.begin(), candidates.begin() + rc.top_k);

    // Would the unbiased scores alone have chosen differently? (The bias must matter somewhere.)
    std::vector<int64_t> unbiased_order(static_cast<size_t>(rc.experts));
    std::iota(unbiased_order.begin(), unbiased_order.end(), 0);
    std::sort(unbiased_order.begin(), unbiased_order.end(), [&](int64_t a, int64_t b) { return score[static_cast<size_t>(a)] > score[static_cast<size_t>(b)]; });
    bias_changed_choice += std::set<int64_t>(unbiased_order.begin(), unbiased_order.begin() + rc.top_k) != want;

    std::set<int64_t> got;
    double sum = 0;
    for (int64_t e : want) sum += score[static_cast<size_t>(e)];
    for (int64_t k = 0; k < rc.top_k; ++k) {
      const int32_t e = ids.data<int32_t>()[t * rc.top_k + k];
      ASSERT_TRUE(want.count(e)) << "token " << t << " chose expert " << e;
      got.insert(e);
      const double ref = score[static_cast<size_t>(e)] / (rc.norm ? sum : 1.0) * rc.scale;
      // A sigmoid of a length-32 dot product and one normalization: 1e-5 relative.
      EXPECT_NEAR(weights.data<float>()[t * rc.top_k + k], ref, kRel * ref) << "token " << t << " expert " << e;
    }
    EXPECT_EQ(got, want) << "token " << t << ": expert chosen twice";
  }
  if (rc.with_bias) {
    EXPECT_GT(bias_changed_choice, 0) << "test data too weak: the bias never changed a choice";
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, MoeRouteTest,
                         ::testing::Values(RouteCase{16, 4, 4, 2, true, true, 2.5f},   // R1-like, grouped
                                           RouteCase{16, 3, 8, 3, true, true, 1.0f},   // two experts per group
                                           RouteCase{12, 2, 1, 1, true, true, 1.5f},   // ungrouped
                                           RouteCase{16, 4, 4, 2, false, true, 2.5f},  // no normalization
                                           RouteCase{10, 3, 1, 1, true, false, 1.0f}));  // no correction bias

// ---- moe_experts ------------------------------------------------------------------------------

TEST_F(CpuOpsTest, MoeExpertsSumsWeightedSwigluExperts) {
  const int64_t tokens = 7, d = 40, f = 24, k = 2, num_experts = 6;
  const DType kinds[] = {DType::F32, DType::BF16, DType::F8E4M3};
  std::vector<ExpertWeights> experts;
  struct Exact { std::vector<double> gate, up, down; };
  std::vector<Exact> exact;
  for (int64_t e = 0; e < num_experts; ++e) {
    const DType t = kinds[e % 3];
    const RandomWeight g = random_weight(rng, {t, 0, f, d, 16, 16}), u = random_weight(rng, {t, 0, f, d, 16, 16}),
                       dn = random_weight(rng, {t, 0, d, f, 16, 16});
    experts.push_back({ops->place_linear(g.weight, g.scale_inv, 16, 16), ops->place_linear(u.weight, u.scale_inv, 16, 16),
                       ops->place_linear(dn.weight, dn.scale_inv, 16, 16)});
    exact.push_back({g.exact, u.exact, dn.exact});
  }
  // Expert 4 gets no token; expert 5 appears in several tokens; ids are not sorted within a row.
  const std::vector<int32_t> idv = {5, 0, 1, 5, 3, 2, 0, 5, 5, 1, 2, 3, 1, 0};
  const auto wv = uniform(static_cast<size_t>(tokens * k), 0.1f, 1.0f);
  const auto xv = uniform(static_cast<size_t>(tokens * d), -2.0f, 2.0f);
  Tensor ids = Tensor::host(DType::I32, {tokens, k});
  std::copy(idv.begin(), idv.end(), ids.data<int32_t>());
  Tensor weights = f32({tokens, k}, wv), x = f32({tokens, d}, xv), out = poisoned({tokens, d});
  ops->moe_experts(x, experts, ids, weights, out);
  {  // With an addend (the shared expert's output): the same sums, then + addend as add() makes it.
    Tensor add = f32({tokens, d}, xv), added = poisoned({tokens, d});
    ops->moe_experts(x, experts, ids, weights, added, 0, &add);
    for (int64_t i = 0; i < tokens * d; ++i)
      ASSERT_EQ(added.data<float>()[i], out.data<float>()[i] + add.data<float>()[i]) << "element " << i;
  }

  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<double> ref(static_cast<size_t>(d), 0.0), mag(static_cast<size_t>(d), 0.0);
    for (int64_t j = 0; j < k; ++j) {
      const Exact& ex = exact[static_cast<size_t>(idv[static_cast<size_t>(t * k + j)])];
      const double wgt = wv[static_cast<size_t>(t * k + j)];
      std::vector<double> hidden(static_cast<size_t>(f)), hidden_mag(static_cast<size_t>(f));
      for (int64_t i = 0; i < f; ++i) {
        double g = 0, u = 0, gm = 0, um = 0;
        for (int64_t c = 0; c < d; ++c) {
          const double xi = xv[static_cast<size_t>(t * d + c)];
          g += ex.gate[static_cast<size_t>(i * d + c)] * xi;
          u += ex.up[static_cast<size_t>(i * d + c)] * xi;
          gm += std::fabs(ex.gate[static_cast<size_t>(i * d + c)] * xi);
          um += std::fabs(ex.up[static_cast<size_t>(i * d + c)] * xi);
        }
        const double silu = g / (1.0 + std::exp(-g));
        hidden[static_cast<size_t>(i)] = silu * u;
        hidden_mag[static_cast<size_t>(i)] = (std::fabs(silu) + gm) * (std::fabs(u) + um);  // error scale of the product
      }
      for (int64_t o = 0; o < d; ++o)
        for (int64_t i = 0; i < f; ++i) {
          ref[static_cast<size_t>(o)] += wgt * ex.down[static_cast<size_t>(o * f + i)] * hidden[static_cast<size_t>(i)];
          mag[static_cast<size_t>(o)] += std::fabs(wgt * ex.down[static_cast<size_t>(o * f + i)]) * hidden_mag[static_cast<size_t>(i)];
        }
    }
    for (int64_t o = 0; o < d; ++o)
      ASSERT_NEAR(out.data<float>()[t * d + o], ref[static_cast<size_t>(o)], kRel * mag[static_cast<size_t>(o)])
          << "token " << t << " column " << o;
  }
}

// ---- small ops --------------------------------------------------------------------------------

TEST_F(CpuOpsTest, ArgmaxTakesTheFirstMaximum) {
  const float inf = std::numeric_limits<float>::infinity();
  Tensor logits = f32({5, 4}, {1, 3, 3, 2,            // tie: first
                               -inf, -inf, -5, -inf,  // -inf elsewhere
                               7, 7, 7, 7,            // all equal: 0
                               0, -1, -2, 9,          // last
                               -0.0f, 0.0f, -1, -1}); // -0 == +0: first
  EXPECT_EQ(ops->argmax(logits), (std::vector<int32_t>{1, 2, 0, 3, 0}));
  Tensor one = f32({1, 1}, {-3});
  EXPECT_EQ(ops->argmax(one), (std::vector<int32_t>{0}));
}

TEST_F(CpuOpsTest, EmbeddingGatherAddSiluMul) {
  // Embedding rows of a BF16 table, converted exactly.
  Tensor table = Tensor::host(DType::BF16, {5, 3});
  for (int64_t i = 0; i < 15; ++i) table.data<uint16_t>()[i] = f32_to_bf16(static_cast<float>(i) * 0.25f - 1.0f);
  const std::vector<int32_t> tok = {4, 0, 4};
  Tensor emb = poisoned({3, 3});
  ops->embedding(table, tok, emb);
  for (int64_t t = 0; t < 3; ++t)
    for (int64_t c = 0; c < 3; ++c)
      EXPECT_EQ(emb.data<float>()[t * 3 + c], static_cast<float>(tok[static_cast<size_t>(t)] * 3 + c) * 0.25f - 1.0f);

  const std::vector<int32_t> rows = {2, 0};
  Tensor g = poisoned({2, 3});
  ops->gather_rows(emb, rows, g);
  for (int64_t c = 0; c < 3; ++c) {
    EXPECT_EQ(g.data<float>()[c], emb.data<float>()[6 + c]);
    EXPECT_EQ(g.data<float>()[3 + c], emb.data<float>()[c]);
  }

  const auto av = uniform(12), bv = uniform(12);
  Tensor a = f32({4, 3}, av), b = f32({4, 3}, bv);
  ops->add(a, b);
  for (size_t i = 0; i < 12; ++i) EXPECT_EQ(a.data<float>()[i], av[i] + bv[i]);

  const auto gv = uniform(12, -6.0f, 6.0f), uv = uniform(12);
  Tensor gate = f32({4, 3}, gv), up = f32({4, 3}, uv), out = poisoned({4, 3});
  ops->silu_mul(gate, up, out);
  for (size_t i = 0; i < 12; ++i) {
    const double ref = gv[i] / (1.0 + std::exp(-static_cast<double>(gv[i]))) * uv[i];
    EXPECT_NEAR(out.data<float>()[i], ref, kRel * std::fabs(ref) + 1e-7);  // exp, a division, a product
  }
}

}  // namespace
}  // namespace dilu
