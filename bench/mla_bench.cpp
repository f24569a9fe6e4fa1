// MLA attention on the GPU, reference kernels against cuda.kernels=fast, on DeepSeek-R1's shapes
// (128 heads on one GPU, latent 512 + rope 64, BF16 paged cache, F32 kv_b): for each decode
// batch and context, microseconds per call, the bytes a call must read (each token's cache once
// and kv_b once), the rate that makes, and its ratio to the device copy bandwidth measured in the
// same run (the ceiling of a memory-bound kernel). The case list (kMlaBenchShapes, also in
// tests/gpu/mla_bench_shapes.h) is the one tests/gpu/cuda_ops_test.cpp checks for correctness at
// small batch.
// Usage: dilu_mla_bench [--reps N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
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

double time_mla(Ops& ops, const MlaBenchShape& s, int reps) {
  const int64_t h = s.heads, nope = 128, r = 64, c = 512, v = 128, bs = 64, width = c + r;
  MlaParams p;
  p.num_heads = h;
  p.qk_nope_head_dim = nope;
  p.qk_rope_head_dim = r;
  p.kv_lora_rank = c;
  p.v_head_dim = v;
  p.softmax_scale = 0.1f;
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
  Tensor kv_b = ops.random_fill(DType::F32, {h * (nope + v), c}, 12, 0.0f, 0.05f);
  Tensor q = ops.random_fill(DType::F32, {s.batch, h, nope + r}, 13, 0.0f, 1.0f);
  Tensor out = ops.empty(DType::F32, {s.batch, h * v});
  ops.mla_attention(q, kv_b, cache, layout, p, out);  // warm-up (algorithm choice, shared memory opt-in)
  ops.synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) ops.mla_attention(q, kv_b, cache, layout, p, out);
  ops.synchronize();
  return 1e6 * std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 20;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
      reps = std::atoi(argv[++i]);
    } else {
      std::cerr << "usage: dilu_mla_bench [--reps N]\n";
      return 2;
    }
  }
  try {
    BackendOptions ref_o, fused_o, wg_o;
    ref_o.kernels = "reference";
    fused_o.kernels = "fast";
    fused_o.mla_core = "mma";
    wg_o.kernels = "fast";
    wg_o.mla_core = "wgmma";
    std::unique_ptr<Ops> ref = make_ops("cuda", ref_o);
    std::unique_ptr<Ops> fused = make_ops("cuda", fused_o);
    std::unique_ptr<Ops> wg = make_ops("cuda", wg_o);
    const double bw = fused->measure_copy_bandwidth(size_t{1} << 30);
    std::printf("dilu_mla_bench on %s: copy bandwidth %.0f GB/s; R1 MLA (C 512 + R 64, BF16 cache, F32 kv_b)\n",
                fused->device().str().c_str(), bw / 1e9);
    std::printf("(fused: the mma core; wgmma: the wgmma core where it runs, else the mma core again; the rate\n"
                " and its share of copy bandwidth are the faster one's)\n");
    std::printf("%-28s %12s %12s %12s %10s %12s %14s\n", "case", "reference us", "fused us", "wgmma us", "speed-up",
                "fused GB/s", "of copy bw");
    for (const MlaBenchShape& s : kMlaBenchShapes) {
      const double r_us = time_mla(*ref, s, reps), m_us = time_mla(*fused, s, reps), w_us = time_mla(*wg, s, reps);
      const double f_us = std::min(m_us, w_us);
      // What a call must read: each token's context in the cache, kv_b once, q and out.
      const double bytes = static_cast<double>(s.batch) * static_cast<double>(s.context) * 576.0 * 2.0 +
                           static_cast<double>(s.heads) * 256.0 * 512.0 * 4.0 +
                           static_cast<double>(s.batch * s.heads) * (192.0 + 128.0) * 4.0;
      const double gbs = bytes / (f_us * 1e-6) / 1e9;
      std::printf("%-28s %12.1f %12.1f %12.1f %9.2fx %12.0f %13.1f%%\n", s.name, r_us, m_us, w_us, r_us / f_us, gbs,
                  100.0 * gbs * 1e9 / bw);
    }
  } catch (const std::exception& e) {
    std::cerr << "dilu_mla_bench: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
