// MLA attention on the GPU, reference kernels against cuda.kernels=fast, on DeepSeek-R1's shapes
// (128 heads on one GPU, latent 512 + rope 64, BF16 paged cache, FP8 kv_b): for each decode
// batch and context, microseconds per call, the bytes a call must read (each token's cache once
// and kv_b once), the rate that makes, and its ratio to the device copy bandwidth measured in the
// same run (the ceiling of a memory-bound kernel). The case list (kMlaBenchShapes, also in
// tests/gpu/mla_bench_shapes.h) is the one tests/gpu/cuda_ops_test.cpp checks for correctness at
// small batch.
// Usage: dilu_mla_bench [--reps N] [--case NAME|prefill]
// The prefill table compares the absorbed and the expanded form of a prefill step.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "kernels/ops.h"
#include "tests/gpu/mla_bench_shapes.h"

namespace {

using namespace dilu;

struct Timing {
  double us = 0;
};

// R1's MLA widths for `h` heads.
MlaParams r1_mla(int64_t h) {
  MlaParams p;
  p.num_heads = h;
  p.qk_nope_head_dim = 128;
  p.qk_rope_head_dim = 64;
  p.kv_lora_rank = 512;
  p.v_head_dim = 128;
  p.softmax_scale = 0.1f;
  return p;
}

// kv_b as R1 stores it: FP8 with 128 x 128 block scales, placed as the model places it.
MlaWeight r1_kv_b(Ops& ops, const MlaParams& p) {
  const int64_t rows = p.num_heads * (p.qk_nope_head_dim + p.v_head_dim), c = p.kv_lora_rank;
  const Tensor wq = ops.random_fill(DType::F8E4M3, {rows, c}, 12, 0.0f, 448.0f);
  const Tensor sq = ops.random_fill(DType::F32, {rows / 128, c / 128}, 14, 0.05f / 448.0f, 0.0f);
  return ops.place_mla_kv_b(ops.place_linear(wq, sq, 128, 128), p);
}

double time_mla(Ops& ops, const MlaBenchShape& s, int reps) {
  const int64_t h = s.heads, nope = 128, r = 64, c = 512, v = 128, bs = 64, width = c + r;
  const MlaParams p = r1_mla(h);
  AttentionLayout layout;
  layout.block_size = bs;
  const int64_t blocks_per_seq = (s.context + bs - 1) / bs;
  for (int64_t i = 0; i < s.batch; ++i) {
    std::vector<int32_t> table;
    for (int64_t b = 0; b < blocks_per_seq; ++b) table.push_back(static_cast<int32_t>(i * blocks_per_seq + b));
    layout.block_tables.push_back(table);
    layout.token_seq.push_back(static_cast<int32_t>(i));
    layout.token_pos.push_back(static_cast<int32_t>(s.context - 1));
    layout.token_slot.push_back(i * blocks_per_seq * bs + s.context - 1);
  }
  Tensor cache = ops.random_fill(ops.cache_dtype(), {s.batch * blocks_per_seq, bs, width}, 11, 0.0f, 1.0f);
  const MlaWeight kv_b = r1_kv_b(ops, p);
  Tensor q = ops.random_fill(DType::F32, {s.batch, h, nope + r}, 13, 0.0f, 1.0f);
  Tensor out = ops.empty(DType::F32, {s.batch, h * v});
  ops.mla_attention(q, kv_b, cache, layout, p, out);  // warm-up (algorithm choice, shared memory opt-in)
  ops.synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) ops.mla_attention(q, kv_b, cache, layout, p, out);
  ops.synchronize();
  return 1e6 * std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
}

// A prefill step: `batch` prompts of `len` tokens, every position queried (the cache holds the
// prompts' entries). Microseconds per call.
double time_mla_prefill(Ops& ops, int64_t batch, int64_t len, int reps) {
  const int64_t h = 128, nope = 128, r = 64, c = 512, v = 128, bs = 64, width = c + r;
  const MlaParams p = r1_mla(h);
  AttentionLayout layout;
  layout.block_size = bs;
  const int64_t blocks_per_seq = (len + bs - 1) / bs;
  for (int64_t i = 0; i < batch; ++i) {
    std::vector<int32_t> table;
    for (int64_t b = 0; b < blocks_per_seq; ++b) table.push_back(static_cast<int32_t>(i * blocks_per_seq + b));
    layout.block_tables.push_back(table);
    for (int64_t j = 0; j < len; ++j) {
      layout.token_seq.push_back(static_cast<int32_t>(i));
      layout.token_pos.push_back(static_cast<int32_t>(j));
      layout.token_slot.push_back(i * blocks_per_seq * bs + j);
    }
  }
  const int64_t t = batch * len;
  Tensor cache = ops.random_fill(ops.cache_dtype(), {batch * blocks_per_seq, bs, width}, 11, 0.0f, 1.0f);
  const MlaWeight kv_b = r1_kv_b(ops, p);
  Tensor q = ops.random_fill(DType::F32, {t, h, nope + r}, 13, 0.0f, 1.0f);
  Tensor out = ops.empty(DType::F32, {t, h * v});
  ops.mla_attention(q, kv_b, cache, layout, p, out);
  ops.synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) ops.mla_attention(q, kv_b, cache, layout, p, out);
  ops.synchronize();
  return 1e6 * std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
}

// The prefill table: the absorbed form (the automatic core and absorptions) against the expanded
// form, for one and eight 1024-token prompts. The rate is the absorbed form's multiply-adds
// (dilu bench's count: 128 heads x (2 C + R) per query and position, and the absorptions), the
// one the prefill row of dilu bench credits.
void prefill_table(int reps) {
  std::printf("\nprefill (128 heads, every position of each prompt queried; us per call)\n");
  std::printf("%-22s %12s %12s %9s %18s\n", "case", "absorbed", "expanded", "speed-up", "TFLOP/s (absorbed count)");
  for (const int64_t batch : {int64_t{1}, int64_t{8}}) {
    const int64_t len = 1024;
    double us[2] = {0, 0};
    int i = 0;
    for (const char* form : {"absorbed", "expanded"}) {
      BackendOptions o;
      o.kernels = "fast";
      o.mla_prefill = form;
      o.arena_bytes = int64_t{12} << 30;
      std::unique_ptr<Ops> ops = make_ops("cuda", o);
      us[i++] = time_mla_prefill(*ops, batch, len, reps);
    }
    const double pairs = static_cast<double>(batch) * static_cast<double>(len) * static_cast<double>(len + 1) / 2.0;
    const double flops = 2.0 * (pairs * 128.0 * 1088.0 + static_cast<double>(batch * len) * 128.0 * 2.0 * 128.0 * 512.0);
    const std::string name = "prefill_b" + std::to_string(batch) + "_len" + std::to_string(len);
    std::printf("%-22s %12.1f %12.1f %8.2fx %9.1f -> %6.1f\n", name.c_str(), us[0], us[1], us[0] / us[1],
                flops / (us[0] * 1e-6) / 1e12, flops / (us[1] * 1e-6) / 1e12);
  }
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 20;
  std::string only;  // one case of kMlaBenchShapes, or all
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
      reps = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--case") == 0 && i + 1 < argc) {
      only = argv[++i];
    } else {
      std::cerr << "usage: dilu_mla_bench [--reps N] [--case NAME]\n";
      return 2;
    }
  }
  if (!only.empty() && only != "prefill" && std::none_of(std::begin(kMlaBenchShapes), std::end(kMlaBenchShapes),
                                    [&](const MlaBenchShape& s) { return only == s.name; })) {
    std::cerr << "dilu_mla_bench: no case named '" << only << "'; the cases are";
    for (const MlaBenchShape& s : kMlaBenchShapes) std::cerr << " " << s.name;
    std::cerr << " prefill";
    std::cerr << "\n";
    return 2;
  }
  try {
    // The reference kernels, then the fast ones with each MLA core and each form of absorptions.
    BackendOptions ref_o;
    ref_o.kernels = "reference";
    std::unique_ptr<Ops> ref = make_ops("cuda", ref_o);
    struct Variant {
      const char* core;
      const char* absorb;
      std::unique_ptr<Ops> ops;
    };
    std::vector<Variant> fast;
    for (const char* absorb : {"f32", "bf16x3"})
      for (const char* core : {"mma", "wgmma"}) {
        BackendOptions o;
        o.kernels = "fast";
        o.mla_core = core;
        o.mla_absorb = absorb;
        fast.push_back({core, absorb, make_ops("cuda", o)});
      }
    {  // The automatic choices (at most 8 tokens: the absorptions as GEMVs over the split form).
      BackendOptions o;
      o.kernels = "fast";
      fast.push_back({"auto", "auto", make_ops("cuda", o)});
    }
    const double bw = ref->measure_copy_bandwidth(size_t{1} << 30);
    std::printf("dilu_mla_bench on %s: copy bandwidth %.0f GB/s; R1 MLA (C 512 + R 64, BF16 cache, FP8 kv_b)\n",
                ref->device().str().c_str(), bw / 1e9);
    std::printf("(us per call, absorptions included. Fast columns: core/absorptions; wgmma runs where its shapes\n"
                " fit, else the mma core again. The rate and its share of copy bandwidth are the fastest's, on\n"
                " the bytes a call must read: each token's context in the cache, kv_b once as F32, q and out)\n");
    std::printf("%-22s %10s", "case", "reference");
    for (const Variant& f : fast) std::printf(" %13s", (std::string(f.core) + "/" + f.absorb).c_str());
    std::printf(" %9s %9s %11s\n", "speed-up", "GB/s", "of copy bw");
    for (const MlaBenchShape& s : kMlaBenchShapes) {
      if (!only.empty() && only != s.name) continue;
      const double r_us = time_mla(*ref, s, reps);
      std::printf("%-22s %10.1f", s.name, r_us);
      double best = 1e300;
      for (const Variant& f : fast) {
        const double us = time_mla(*f.ops, s, reps);
        best = std::min(best, us);
        std::printf(" %13.1f", us);
      }
      const double bytes = static_cast<double>(s.batch) * static_cast<double>(s.context) * 576.0 * 2.0 +
                           static_cast<double>(s.heads) * 256.0 * 512.0 * 4.0 +
                           static_cast<double>(s.batch * s.heads) * (192.0 + 128.0) * 4.0;
      const double gbs = bytes / (best * 1e-6) / 1e9;
      std::printf(" %8.2fx %9.0f %10.1f%%\n", r_us / best, gbs, 100.0 * gbs * 1e9 / bw);
    }
    if (only.empty() || only == "prefill") prefill_table(std::max(1, reps / 4));
  } catch (const std::exception& e) {
    std::cerr << "dilu_mla_bench: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
