// The DeepSeek-V3 forward pass with the paged latent cache, on the golden R1-structured FP8
// checkpoint: decoding token by token over the cache gives the logits of recomputing the whole
// prefix, and sequences batched in one step give the logits each gets alone. Also the
// checkpoint check, on a modified copy of that checkpoint.
#include "engine/deepseek_v3.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <span>

#include <gtest/gtest.h>

#include "engine/kv_cache.h"
#include "engine/safetensors_writer.h"
#include "kernels/cpu/cpu_ops.h"
#include "tests/test_util.h"

namespace dilu {
namespace {

namespace fs = std::filesystem;

// Logits of one token position: [V].
using Logits = std::vector<float>;

class DeepseekV3Test : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    config_ = new ModelConfig(load_model_config(test::golden_model("r1_fp8")));
    ckpt_ = new Checkpoint(Checkpoint::open(test::golden_model("r1_fp8")));
    ops_ = make_cpu_ops(2).release();
    model_ = new DeepseekV3(*config_, *ckpt_, *ops_);
  }
  static void TearDownTestSuite() {
    delete model_;
    delete ops_;
    delete ckpt_;
    delete config_;
  }

  // A cache whose every slot starts as NaN: a read of a slot no token wrote poisons the logits.
  static KvCache poisoned_cache(int64_t num_blocks, int64_t block_size) {
    KvCache cache(*ops_, config_->num_hidden_layers, num_blocks, block_size,
                  config_->kv_lora_rank + config_->qk_rope_head_dim);
    for (int64_t l = 0; l < config_->num_hidden_layers; ++l) {
      Tensor& t = cache.layer(l);
      std::fill(t.data<float>(), t.data<float>() + t.numel(), std::numeric_limits<float>::quiet_NaN());
    }
    return cache;
  }

  // One sequence's share of a step: its block table and the tokens at positions [start, start+n).
  struct Part {
    std::vector<int32_t> blocks;
    std::vector<int32_t> tokens;
    int64_t start = 0;
  };

  // Runs one step over several sequences (their tokens in the order given, or interleaved
  // token by token when `interleave`) and returns the logits of every token, per sequence.
  static std::vector<std::vector<Logits>> step(const std::vector<Part>& parts, KvCache& cache, bool interleave = false) {
    StepInput s;
    s.layout.block_size = cache.block_size();
    std::vector<std::pair<size_t, size_t>> order;  // (sequence, index in its part)
    size_t longest = 0;
    for (const Part& p : parts) longest = std::max(longest, p.tokens.size());
    if (interleave) {
      for (size_t i = 0; i < longest; ++i)
        for (size_t q = 0; q < parts.size(); ++q)
          if (i < parts[q].tokens.size()) order.push_back({q, i});
    } else {
      for (size_t q = 0; q < parts.size(); ++q)
        for (size_t i = 0; i < parts[q].tokens.size(); ++i) order.push_back({q, i});
    }
    for (const Part& p : parts) s.layout.block_tables.push_back(p.blocks);
    for (const auto& [q, i] : order) {
      const Part& p = parts[q];
      const int64_t pos = p.start + static_cast<int64_t>(i);
      s.token_ids.push_back(p.tokens[i]);
      s.layout.token_seq.push_back(static_cast<int32_t>(q));
      s.layout.token_pos.push_back(static_cast<int32_t>(pos));
      s.layout.token_slot.push_back(static_cast<int64_t>(p.blocks[static_cast<size_t>(pos / cache.block_size())]) *
                                        cache.block_size() + pos % cache.block_size());
      s.logit_rows.push_back(static_cast<int32_t>(s.logit_rows.size()));
    }
    Tensor logits = model_->forward(s, cache);
    const int64_t v = config_->vocab_size;
    EXPECT_EQ(logits.shape(), (Shape{static_cast<int64_t>(order.size()), v}));
    std::vector<std::vector<Logits>> out(parts.size());
    for (size_t q = 0; q < parts.size(); ++q) out[q].resize(parts[q].tokens.size());
    for (size_t row = 0; row < order.size(); ++row) {
      const float* r = logits.data<float>() + static_cast<int64_t>(row) * v;
      out[order[row].first][order[row].second] = Logits(r, r + v);
    }
    return out;
  }

  // FP32 throughout, but the same arithmetic on both sides except for the number of tokens in
  // a GEMM and the vector alignment of rows: 1e-5 of the largest logit.
  static void expect_same_logits(const Logits& got, const Logits& want, const std::string& what) {
    ASSERT_EQ(got.size(), want.size());
    float scale = 0;
    for (float w : want) {
      ASSERT_TRUE(std::isfinite(w)) << what;
      scale = std::max(scale, std::fabs(w));
    }
    for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], 1e-5f * scale) << what << ", vocab " << i;
  }

  static ModelConfig* config_;
  static Checkpoint* ckpt_;
  static Ops* ops_;
  static DeepseekV3* model_;
};

ModelConfig* DeepseekV3Test::config_ = nullptr;
Checkpoint* DeepseekV3Test::ckpt_ = nullptr;
Ops* DeepseekV3Test::ops_ = nullptr;
DeepseekV3* DeepseekV3Test::model_ = nullptr;

const std::vector<int32_t> kTokens = {5, 17, 200, 3, 99, 42, 7, 255, 128, 64, 0, 31};

TEST_F(DeepseekV3Test, IncrementalDecodeMatchesRecomputingThePrefix) {
  // Prefill 5 tokens, then one token per step over the cache (blocks of 4, out of order).
  const int64_t prefill = 5, len = static_cast<int64_t>(kTokens.size());
  const std::vector<int32_t> blocks = {6, 1, 4};
  KvCache cache = poisoned_cache(8, 4);
  std::vector<Logits> incremental;
  auto first = step({{blocks, std::vector<int32_t>(kTokens.begin(), kTokens.begin() + prefill), 0}}, cache);
  incremental = first[0];
  for (int64_t p = prefill; p < len; ++p)
    incremental.push_back(step({{blocks, {kTokens[static_cast<size_t>(p)]}, p}}, cache)[0][0]);
  ASSERT_EQ(static_cast<int64_t>(incremental.size()), len);

  // Recompute each prefix in one step on a fresh cache with other blocks.
  for (int64_t p = 0; p < len; ++p) {
    KvCache fresh = poisoned_cache(4, 4);
    auto full = step({{{3, 0, 2}, std::vector<int32_t>(kTokens.begin(), kTokens.begin() + p + 1), 0}}, fresh);
    expect_same_logits(incremental[static_cast<size_t>(p)], full[0][static_cast<size_t>(p)],
                       "position " + std::to_string(p));
  }
  // The cache is really used: decoding the last token against a cache holding a different
  // prefix gives different logits.
  KvCache other = poisoned_cache(8, 4);
  std::vector<int32_t> changed(kTokens.begin(), kTokens.end() - 1);
  changed[0] = 77;
  step({{blocks, changed, 0}}, other);
  const Logits last = step({{blocks, {kTokens.back()}, len - 1}}, other)[0][0];
  float diff = 0;
  for (size_t i = 0; i < last.size(); ++i) diff = std::max(diff, std::fabs(last[i] - incremental.back()[i]));
  EXPECT_GT(diff, 1e-3f);
}

TEST_F(DeepseekV3Test, SequencesBatchedInOneStepMatchEachAlone) {
  // Sequence A over blocks {0, 2, 4}, B over {1, 3, 5} (blocks of 3, interleaved): prefill 7
  // and 5 tokens in one step, then decode two tokens of each in shared steps.
  const std::vector<int32_t> a(kTokens.begin(), kTokens.begin() + 9), b = {250, 8, 8, 61, 2, 190, 33};
  const int64_t pa = 7, pb = 5;
  for (bool interleave : {false, true}) {
    SCOPED_TRACE(interleave ? "tokens interleaved" : "tokens grouped");
    KvCache cache = poisoned_cache(6, 3);
    const std::vector<int32_t> ba = {0, 2, 4}, bb = {1, 3, 5};
    auto pre = step({{ba, std::vector<int32_t>(a.begin(), a.begin() + pa), 0},
                     {bb, std::vector<int32_t>(b.begin(), b.begin() + pb), 0}},
                    cache, interleave);
    std::vector<Logits> got_a = pre[0], got_b = pre[1];
    for (int64_t k = 0; k < 2; ++k) {
      auto dec = step({{ba, {a[static_cast<size_t>(pa + k)]}, pa + k}, {bb, {b[static_cast<size_t>(pb + k)]}, pb + k}},
                      cache, interleave);
      got_a.push_back(dec[0][0]);
      got_b.push_back(dec[1][0]);
    }
    // Each alone, whole prefix in one step.
    KvCache alone_a = poisoned_cache(3, 3), alone_b = poisoned_cache(3, 3);
    auto want_a = step({{{0, 1, 2}, std::vector<int32_t>(a.begin(), a.begin() + pa + 2), 0}}, alone_a)[0];
    auto want_b = step({{{0, 1, 2}, std::vector<int32_t>(b.begin(), b.begin() + pb + 2), 0}}, alone_b)[0];
    ASSERT_EQ(got_a.size(), want_a.size());
    ASSERT_EQ(got_b.size(), want_b.size());
    for (size_t p = 0; p < want_a.size(); ++p) expect_same_logits(got_a[p], want_a[p], "A position " + std::to_string(p));
    for (size_t p = 0; p < want_b.size(); ++p) expect_same_logits(got_b[p], want_b[p], "B position " + std::to_string(p));
  }
}

TEST_F(DeepseekV3Test, LogitRowsSelectTokens) {
  KvCache cache = poisoned_cache(2, 4);
  auto all = step({{{0, 1}, {9, 8, 7}, 0}}, cache);
  KvCache cache2 = poisoned_cache(2, 4);
  StepInput s;
  s.token_ids = {9, 8, 7};
  s.layout.block_size = 4;
  s.layout.block_tables = {{0, 1}};
  s.layout.token_seq = {0, 0, 0};
  s.layout.token_pos = {0, 1, 2};
  s.layout.token_slot = {0, 1, 2};
  s.logit_rows = {2, 0};
  Tensor logits = model_->forward(s, cache2);
  ASSERT_EQ(logits.shape(), (Shape{2, config_->vocab_size}));
  const float* r = logits.data<float>();
  expect_same_logits(Logits(r, r + config_->vocab_size), all[0][2], "row 2");
  expect_same_logits(Logits(r + config_->vocab_size, r + 2 * config_->vocab_size), all[0][0], "row 0");
}

// ---- check_checkpoint -------------------------------------------------------------------------

// Copies the golden checkpoint into one safetensors file of `dir`, minus `drop`, with `reshape`
// tensors written with their first dimension one shorter, plus `extra` small tensors.
void copy_checkpoint(const Checkpoint& src, const fs::path& dir, const std::set<std::string>& drop,
                     const std::set<std::string>& reshape, const std::vector<std::string>& extra) {
  SafetensorsWriter w(dir / "model.safetensors");
  std::vector<std::pair<std::string, std::string>> data;
  for (const std::string& name : src.names()) {
    if (drop.count(name)) continue;
    Tensor t = src.tensor(name);
    Shape shape = t.shape();
    size_t bytes = t.nbytes();
    if (reshape.count(name)) {
      bytes -= bytes / static_cast<size_t>(shape[0]);
      shape[0] -= 1;
    }
    w.declare(name, t.dtype(), shape);
    data.emplace_back(name, std::string(static_cast<const char*>(t.raw()), bytes));
  }
  for (const std::string& name : extra) {
    w.declare(name, DType::F32, {2});
    data.emplace_back(name, std::string(8, '\0'));
  }
  for (const auto& [name, bytes] : data)
    w.write_tensor(std::as_bytes(std::span<const char>(bytes.data(), bytes.size())));
  w.finish();
}

bool mentions(const std::vector<std::string>& problems, const std::string& name, const std::string& word) {
  return std::any_of(problems.begin(), problems.end(), [&](const std::string& p) {
    return p.find("'" + name + "'") != std::string::npos && p.find(word) != std::string::npos;
  });
}

TEST_F(DeepseekV3Test, GoldenCheckpointHasNoProblems) {
  EXPECT_EQ(check_checkpoint(*config_, *ckpt_), std::vector<std::string>{});
}

TEST_F(DeepseekV3Test, CheckCheckpointNamesEveryProblem) {
  const fs::path dir = test::scratch_dir();
  const std::string missing = "model.layers.1.self_attn.kv_a_layernorm.weight";
  const std::string missing_scale = "model.layers.2.mlp.experts.3.up_proj.weight_scale_inv";
  const std::string reshaped = "model.layers.0.self_attn.o_proj.weight";
  const std::string reshaped_scale = "model.layers.1.self_attn.q_b_proj.weight_scale_inv";
  const std::string reshaped_norm = "model.norm.weight";
  const std::string unexpected = "model.layers.1.mlp.experts.99.up_proj.weight";
  const std::string stray = "model.extra_head.weight";
  ASSERT_TRUE(ckpt_->contains(missing));
  ASSERT_TRUE(ckpt_->contains(missing_scale));
  ASSERT_TRUE(ckpt_->contains(reshaped_scale));
  copy_checkpoint(*ckpt_, dir, {missing, missing_scale}, {reshaped, reshaped_scale, reshaped_norm}, {unexpected, stray});
  const Checkpoint bad = Checkpoint::open(dir);
  const std::vector<std::string> problems = check_checkpoint(*config_, bad);
  EXPECT_TRUE(mentions(problems, missing, "missing")) << ::testing::PrintToString(problems);
  EXPECT_TRUE(mentions(problems, missing_scale, "no block scale")) << ::testing::PrintToString(problems);
  EXPECT_TRUE(mentions(problems, reshaped, "shape [143, 128]")) << ::testing::PrintToString(problems);
  EXPECT_TRUE(mentions(problems, reshaped_scale, "shape")) << ::testing::PrintToString(problems);
  EXPECT_TRUE(mentions(problems, reshaped_norm, "shape [143]")) << ::testing::PrintToString(problems);
  EXPECT_TRUE(mentions(problems, unexpected, "unexpected")) << ::testing::PrintToString(problems);
  EXPECT_TRUE(mentions(problems, stray, "unexpected")) << ::testing::PrintToString(problems);
  EXPECT_EQ(problems.size(), 7u) << ::testing::PrintToString(problems);
  // MTP layer tensors (layer 3 of a 3-layer model) are skipped, not reported.
  for (const std::string& p : problems) EXPECT_EQ(p.find("model.layers.3."), std::string::npos) << p;

  // The model refuses to load, listing the problems.
  test::expect_user_error([&] { DeepseekV3 m(*config_, bad, *ops_); }, {dir.string(), missing, reshaped, unexpected});
}

TEST_F(DeepseekV3Test, CheckCheckpointStopsAtItsLimit) {
  ModelConfig many = *config_;
  many.n_routed_experts = 2048;  // 3 projections of 2032 absent experts a MoE layer, and their scales
  const std::vector<std::string> problems = check_checkpoint(many, *ckpt_);
  EXPECT_EQ(problems.size(), kCheckpointProblemsMax);
  test::expect_user_error([&] { DeepseekV3 m(many, *ckpt_, *ops_); },
                          {ckpt_->dir().string(), std::to_string(kCheckpointProblemsMax) + " problems; the check stops there",
                           "... and " + std::to_string(kCheckpointProblemsMax - 50) + " more"});
}

}  // namespace
}  // namespace dilu
