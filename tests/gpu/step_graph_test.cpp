// GPU tests (label "gpu"): decode steps replayed from CUDA graphs (cuda.graphs) give the logits
// of the same steps launched kernel by kernel, bit for bit, while the batch shrinks, contexts
// grow across cache blocks and the block tables' stride, and eager prefill steps come between.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "engine/deepseek_v3.h"
#include "engine/kv_cache.h"
#include "engine/make_model.h"
#include "engine/safetensors.h"
#include "kernels/ops.h"
#include "tests/gpu/cuda_device.h"

namespace dilu {
namespace {

// One model on its own backend instance, with or without graphs.
struct Side {
  std::unique_ptr<Ops> ops;
  std::unique_ptr<DeepseekV3> model;
  std::unique_ptr<KvCache> cache;
};

Side make_side(const ModelConfig& mc, const std::string& kernels, bool graphs, int64_t blocks, int64_t bs) {
  BackendOptions o;
  o.kernels = kernels;
  o.graphs = graphs;
  o.arena_bytes = DeepseekV3::step_scratch_bytes(mc, 512, 512, 1);
  Side s;
  s.ops = make_ops("cuda", o);
  const Checkpoint ckpt = Checkpoint::synthetic(mc, *s.ops, 11);
  s.model = std::make_unique<DeepseekV3>(mc, ckpt, *s.ops);
  EXPECT_EQ(s.model->enable_graphs(8), graphs);
  s.cache = std::make_unique<KvCache>(*s.ops, mc.num_hidden_layers, blocks, bs, mc.kv_lora_rank + mc.qk_rope_head_dim);
  return s;
}

struct Seq {
  std::vector<int32_t> tokens;
  std::vector<int32_t> blocks;
};

// The step of each listed sequence's last `count` tokens, its last token wanting logits; a
// sequence's block table lists the blocks its tokens fill.
StepInput make_step(const std::vector<Seq>& seqs, const std::vector<size_t>& which, int64_t count, int64_t bs) {
  StepInput in;
  in.layout.block_size = bs;
  for (size_t i = 0; i < which.size(); ++i) {
    const Seq& s = seqs[which[i]];
    const int64_t len = static_cast<int64_t>(s.tokens.size());
    in.layout.block_tables.emplace_back(s.blocks.begin(), s.blocks.begin() + (len + bs - 1) / bs);
    for (int64_t p = len - count; p < len; ++p) {
      in.token_ids.push_back(s.tokens[static_cast<size_t>(p)]);
      in.layout.token_seq.push_back(static_cast<int32_t>(i));
      in.layout.token_pos.push_back(static_cast<int32_t>(p));
      in.layout.token_slot.push_back(static_cast<int64_t>(s.blocks[static_cast<size_t>(p / bs)]) * bs + p % bs);
    }
    in.logit_rows.push_back(static_cast<int32_t>(in.token_ids.size() - 1));
  }
  return in;
}

std::vector<float> host_logits(Side& s, const StepInput& in) {
  const Tensor logits = s.model->forward(in, *s.cache);
  std::vector<float> h(static_cast<size_t>(logits.numel()));
  s.ops->copy_to_host(logits, h.data());
  return h;
}

void run_decode(const std::string& kernels) {
  const std::string why = missing_cuda_device();
  if (!why.empty()) GTEST_SKIP() << "no CUDA device: " << why;
  const ModelConfig mc = preset_config("tiny");
  constexpr int64_t kBs = 4, kSeqs = 5, kBlocksPerSeq = 40;
  Side eager = make_side(mc, kernels, false, kSeqs * kBlocksPerSeq, kBs);
  Side graph = make_side(mc, kernels, true, kSeqs * kBlocksPerSeq, kBs);

  // Prompts of 50-62 tokens; the decode steps take every context past 64 positions (16 blocks
  // of 4: the block tables' stride, rounded up to 16 blocks, grows from 16 to 32).
  std::vector<Seq> seqs(kSeqs);
  for (int64_t i = 0; i < kSeqs; ++i) {
    for (int64_t p = 0; p < 50 + 3 * i; ++p)
      seqs[static_cast<size_t>(i)].tokens.push_back(static_cast<int32_t>((37 * p + 11 * i + 1) % mc.vocab_size));
    for (int64_t b = 0; b < kBlocksPerSeq; ++b)
      seqs[static_cast<size_t>(i)].blocks.push_back(static_cast<int32_t>(i * kBlocksPerSeq + b));
  }
  int64_t steps = 0;
  // `count` tokens of each listed sequence (a prompt, or 1: decode); each one's next token is the
  // logits' argmax (the same on both sides).
  auto step = [&](const std::vector<size_t>& which, int64_t count) {
    const StepInput in = make_step(seqs, which, count, kBs);
    const std::vector<float> a = host_logits(eager, in), b = host_logits(graph, in);
    ASSERT_EQ(a.size(), b.size());
    ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0)
        << kernels << ": step " << steps << " of " << in.token_ids.size() << " tokens differs with graphs";
    const int64_t v = mc.vocab_size;
    for (size_t r = 0; r < which.size(); ++r) {
      const float* row = a.data() + static_cast<int64_t>(r) * v;
      seqs[which[r]].tokens.push_back(static_cast<int32_t>(std::max_element(row, row + v) - row));
    }
    ++steps;
  };
  auto prompt = [&](size_t i) { step({i}, static_cast<int64_t>(seqs[i].tokens.size())); };
  // Four prompts, decode, a fifth prompt joining (an eager step between replays), then the batch
  // shrinking as sequences finish.
  for (size_t i = 0; i < 4; ++i) prompt(i);
  for (int k = 0; k < 6; ++k) step({0, 1, 2, 3}, 1);
  prompt(4);
  for (int k = 0; k < 10; ++k) step({0, 1, 2, 3, 4}, 1);
  for (int k = 0; k < 8; ++k) step({0, 2, 3, 4}, 1);
  for (int k = 0; k < 6; ++k) step({2}, 1);

  const DeepseekV3::GraphCounts& c = graph.model->graph_counts();
  EXPECT_EQ(c.failed, 0);
  EXPECT_GE(c.captured, 4) << "batches of 4, 5, 4 and 1 sequences";
  EXPECT_GE(c.replayed, 20);
  EXPECT_EQ(eager.model->graph_counts().replayed, 0);
  std::cout << kernels << ": " << steps << " steps, " << c.captured << " graphs captured, " << c.replayed
            << " steps replayed\n";
}

TEST(StepGraphs, ReplayedDecodeStepsMatchEagerOnesWithFastKernels) { run_decode("fast"); }
TEST(StepGraphs, ReplayedDecodeStepsMatchEagerOnesWithReferenceKernels) { run_decode("reference"); }

}  // namespace
}  // namespace dilu
