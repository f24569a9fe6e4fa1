// Random weights without a checkpoint file (benchmarks): Ops::random_fill is deterministic and
// in range, and Checkpoint::synthetic gives every tensor a config implies, in the layout
// check_checkpoint expects, so that the model builds and runs on it.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "engine/deepseek_v3.h"
#include "engine/kv_cache.h"
#include "engine/make_model.h"
#include "engine/safetensors.h"
#include "kernels/cpu/cpu_ops.h"

namespace dilu {
namespace {

TEST(RandomFill, SameKeySameBitsAndValuesInRange) {
  std::unique_ptr<Ops> ops = make_cpu_ops(1);
  const Tensor a = ops->random_fill(DType::F32, {1000}, 7, 1.0f, 0.5f);
  const Tensor b = ops->random_fill(DType::F32, {1000}, 7, 1.0f, 0.5f);
  const Tensor c = ops->random_fill(DType::F32, {1000}, 8, 1.0f, 0.5f);
  EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0);
  EXPECT_NE(std::memcmp(a.raw(), c.raw(), a.nbytes()), 0);
  double mean = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const float v = a.data<float>()[i];
    EXPECT_GE(v, 0.5f);
    EXPECT_LT(v, 1.5f);
    mean += v / 1000.0;
  }
  EXPECT_NEAR(mean, 1.0, 0.05);
  const Tensor q = ops->random_fill(DType::F8E4M3, {4096}, 3, 0.0f, 448.0f);
  for (int64_t i = 0; i < q.numel(); ++i) EXPECT_NE(q.data<uint8_t>()[i] & 0x7f, 0x7f) << "NaN code at " << i;
}

TEST(SyntheticCheckpoint, TinyModelBuildsAndRunsOnIt) {
  for (const bool fp8 : {true, false}) {
    ModelConfig config = preset_config("tiny");
    if (!fp8) config.quantization.reset();
    std::unique_ptr<Ops> ops = make_cpu_ops(2);
    const Checkpoint ckpt = Checkpoint::synthetic(config, *ops, 11);
    EXPECT_TRUE(check_checkpoint(config, ckpt).empty());
    EXPECT_EQ(ckpt.info("model.layers.1.mlp.experts.0.gate_proj.weight").dtype, fp8 ? DType::F8E4M3 : DType::BF16);
    DeepseekV3 model(config, ckpt, *ops);
    KvCache cache(*ops, config.num_hidden_layers, 2, 16, config.kv_lora_rank + config.qk_rope_head_dim);
    StepInput step;
    step.token_ids = {1, 2, 3, 4, 5};
    step.layout.block_size = 16;
    step.layout.block_tables = {{0}};
    for (int32_t i = 0; i < 5; ++i) {
      step.layout.token_seq.push_back(0);
      step.layout.token_pos.push_back(i);
      step.layout.token_slot.push_back(i);
    }
    step.logit_rows = {4};
    const Tensor logits = model.forward(step, cache);
    ASSERT_EQ(logits.shape(), (Shape{1, config.vocab_size}));
    float lo = logits.data<float>()[0], hi = lo;
    for (int64_t i = 0; i < logits.numel(); ++i) {
      const float v = logits.data<float>()[i];
      ASSERT_TRUE(std::isfinite(v)) << (fp8 ? "fp8" : "bf16") << " logit " << i;
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    EXPECT_GT(hi - lo, 0.1f) << "random weights give spread logits";
    EXPECT_LT(hi - lo, 100.0f) << "and tame ones (std 1/sqrt(in) per layer)";
    // 3 MoE layers, 5 tokens with 4 experts each out of 16: at least 4 and at most 16 per layer.
    const int64_t routed = ops->take_routed_expert_count();
    EXPECT_GE(routed, 3 * 4);
    EXPECT_LE(routed, 3 * 16);
  }
}

}  // namespace
}  // namespace dilu
