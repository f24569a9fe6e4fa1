// GPU tests (label "gpu"): overlapped steps (engine.h, StepOverlap). The CUDA backend queues step
// N + 1 before step N's draws reach the host, and feeds N's tokens into N + 1's ids on the device
// (Ops::set_token_feed): the tokens equal those of an engine that waits for every step, with and
// without step graphs, as sequences finish one by one. (Prompts joining later and sequences
// stopping early are the engine's own bookkeeping, tested on the CPU in tests/e2e/batching.sh.)
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine/deepseek_v3.h"
#include "engine/engine.h"
#include "engine/kv_cache.h"
#include "engine/make_model.h"
#include "engine/safetensors.h"
#include "kernels/ops.h"
#include "tests/gpu/cuda_device.h"

namespace dilu {
namespace {

// Token ids per (request, sample) from one engine over its own backend.
std::map<std::pair<int64_t, int64_t>, std::vector<int32_t>> run_engine(StepOverlap overlap, bool graphs,
                                                                        int64_t* steps_out) {
  const ModelConfig mc = preset_config("tiny");
  BackendOptions o;
  o.kernels = "fast";
  o.graphs = graphs;
  o.arena_bytes = DeepseekV3::step_scratch_bytes(mc, 512, 512, 1);
  std::unique_ptr<Ops> ops = make_ops("cuda", o);
  const Checkpoint ckpt = Checkpoint::synthetic(mc, *ops, 11);
  DeepseekV3 model(mc, ckpt, *ops);
  EXPECT_EQ(model.enable_graphs(8), graphs);
  constexpr int64_t kBs = 4;
  KvCache cache(*ops, mc.num_hidden_layers, 400, kBs, mc.kv_lora_rank + mc.qk_rope_head_dim);
  EngineOptions eo;
  eo.limits = {8, 256, kBs};
  eo.max_seq_len = 256;
  eo.overlap = overlap;
  Engine engine(model, *ops, cache, eo, nullptr);
  // Both engines must run the same batches (a batch of another size may round differently): every
  // request comes at once and ends by length (a sequence stopping early would leave a wasted row
  // in the overlapped engine's next step; a prompt joining later would wait a step longer there).
  // Greedy, seeded draws, logprobs, and two samples of one prompt.
  auto request = [&](int64_t handle, int64_t prompt_len, int64_t max_tokens, double temperature, int64_t n) {
    EngineRequest r;
    r.handle = handle;
    for (int64_t p = 0; p < prompt_len; ++p)
      r.prompt.push_back(static_cast<int32_t>((31 * p + 7 * handle + 3) % mc.vocab_size));
    r.sampling.max_tokens = max_tokens;
    r.sampling.temperature = temperature;
    r.sampling.ignore_eos = true;
    r.sampling.n = n;
    r.sampling.logprobs = handle % 2 == 1;
    r.sampling.top_logprobs = handle % 2 == 1 ? 3 : 0;
    r.seed = static_cast<uint64_t>(100 + handle);
    engine.submit(std::move(r));
  };
  request(0, 9, 20, 0.0, 1);
  request(1, 23, 7, 0.8, 1);
  request(2, 5, 16, 0.0, 2);
  request(3, 17, 12, 1.0, 1);
  request(4, 2, 30, 0.0, 1);
  std::map<std::pair<int64_t, int64_t>, std::vector<int32_t>> out;
  int64_t steps = 0;
  while (!engine.idle()) {
    for (const EngineResult& res : engine.step())
      for (size_t s = 0; s < res.samples.size(); ++s)
        out[{res.handle, static_cast<int64_t>(s)}] = res.samples[s].token_ids;
    ++steps;
  }
  if (steps_out) *steps_out = steps;
  return out;
}

void compare(bool graphs) {
  const std::string why = missing_cuda_device();
  if (!why.empty()) GTEST_SKIP() << "no CUDA device: " << why;
  int64_t steps_off = 0, steps_on = 0;
  const auto off = run_engine(StepOverlap::off, graphs, &steps_off);
  const auto on = run_engine(StepOverlap::automatic, graphs, &steps_on);
  ASSERT_EQ(off.size(), 6u);
  ASSERT_EQ(on.size(), off.size());
  for (const auto& [key, tokens] : off) {
    ASSERT_TRUE(on.count(key));
    EXPECT_EQ(on.at(key), tokens) << "request " << key.first << " sample " << key.second;
  }
  EXPECT_EQ(steps_on, steps_off) << "every request ends by length: no step is wasted";
}

TEST(OverlappedSteps, SameTokensAsWaitingStepsWithGraphs) { compare(true); }
TEST(OverlappedSteps, SameTokensAsWaitingStepsWithoutGraphs) { compare(false); }

}  // namespace
}  // namespace dilu
