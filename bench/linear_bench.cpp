// The decode step's FP8 products on the GPU, on DeepSeek-R1's shapes (128 x 128 weight blocks):
// each block linear at 1, 4 and 16 rows, and the routed experts (gate, up, SiLU . mul, down,
// weighted sum) for 1, 4, 16 and 256 tokens of 8 experts each, and the BF16 lm_head at 1, 2 and 4
// rows. For each case: microseconds per call (replayed from a CUDA graph, as a decode step runs),
// the weight bytes a call must read, the
// rate that makes, and its ratio to the device copy bandwidth measured in the same run (the
// ceiling of a memory-bound kernel, and the bandwidth of `dilu bench`'s roofline).
// Usage: dilu_linear_bench [--reps N] [--kernels fast|reference] [--filter SUBSTRING]
// DILU_FP8_STREAM picks the decode kernel's earlier forms (kernels/cuda/kernels.cu) for comparing.
// The block linears' case list (tests/gpu/linear_bench_shapes.h) is checked by CudaFp8Block.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "kernels/ops.h"
#include "tests/gpu/linear_bench_shapes.h"

namespace {

using namespace dilu;

constexpr int64_t kHidden = 7168, kMoeInter = 2048, kExperts = 256, kTopK = 8;

LinearWeight random_fp8(Ops& ops, int64_t n, int64_t k, uint64_t key) {
  const Tensor w = ops.random_fill(DType::F8E4M3, {n, k}, key, 0.0f, 448.0f);
  const Tensor s = ops.random_fill(DType::F32, {(n + 127) / 128, (k + 127) / 128}, key + 1,
                                   1.0f / 448.0f / std::sqrt(static_cast<float>(k)), 0.0f);
  return ops.place_linear(w, s, 128, 128);
}

// Microseconds per call of `fn`: `reps` calls captured in one graph, the graph replayed 3 times.
double time_us(Ops& ops, const std::function<void()>& fn, int reps) {
  fn();  // warm-up: algorithm choices, shared-memory opt-ins
  ops.synchronize();
  ops.begin_capture();
  try {
    for (int i = 0; i < reps; ++i) fn();
  } catch (...) {
    ops.abort_capture();
    throw;
  }
  const std::shared_ptr<void> graph = ops.end_capture();
  ops.replay(graph);
  ops.synchronize();
  constexpr int kReplays = 3;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < kReplays; ++i) ops.replay(graph);
  ops.synchronize();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return 1e6 * s / (kReplays * reps);
}

void report(const std::string& name, double us, double bytes, double bw) {
  const double gbs = bytes / (us * 1e-6) / 1e9;
  std::printf("%-34s %10.1f %12.1f %10.0f %12.1f%%\n", name.c_str(), us, bytes / 1e6, gbs, 100.0 * gbs * 1e9 / bw);
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 20;
  std::string kernels = "fast", filter;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
      reps = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--kernels") == 0 && i + 1 < argc) {
      kernels = argv[++i];
    } else if (std::strcmp(argv[i], "--filter") == 0 && i + 1 < argc) {
      filter = argv[++i];
    } else {
      std::cerr << "usage: dilu_linear_bench [--reps N] [--kernels fast|reference] [--filter SUBSTRING]\n";
      return 2;
    }
  }
  const auto wanted = [&](const std::string& name) { return filter.empty() || name.find(filter) != std::string::npos; };
  try {
    BackendOptions o;
    o.kernels = kernels;
    std::unique_ptr<Ops> ops = make_ops("cuda", o);
    DILU_CHECK(ops->enable_graphs(int64_t{1} << 30), "dilu_linear_bench: no room for 1 GiB of graph scratch");
    const double bw = ops->measure_copy_bandwidth(size_t{1} << 30);
    const char* variant = std::getenv("DILU_FP8_STREAM");
    std::printf("dilu_linear_bench on %s: cuda.kernels=%s, DILU_FP8_STREAM=%s; copy bandwidth %.0f GB/s\n",
                ops->device().str().c_str(), kernels.c_str(), variant ? variant : "(default)", bw / 1e9);
    std::printf("%-34s %10s %12s %10s %13s\n", "case", "us", "weight MB", "GB/s", "of copy bw");
    uint64_t key = 0x11e7;
    for (const LinearBenchShape& c : kLinearBenchShapes) {
      if (!wanted(c.name)) continue;
      const LinearWeight w = random_fp8(*ops, c.n, c.k, key += 2);
      for (int64_t rows : {1, 4, 16}) {
        const Tensor x = ops->random_fill(DType::F32, {rows, c.k}, ++key, 0.0f, 1.0f);
        Tensor y = ops->empty(DType::F32, {rows, c.n});
        const double us = time_us(*ops, [&] { ops->linear(x, w, y); }, reps);
        report(std::string(c.name) + " rows " + std::to_string(rows), us, static_cast<double>(c.n * c.k), bw);
      }
    }
    if (wanted("lm_head")) {
      // R1's lm_head, BF16 [129280, 7168]: the decode kernel (cuda::bf16_gemv) unless
      // DILU_BF16_GEMV=0 keeps cuBLASLt.
      constexpr int64_t kVocab = 129280;
      const Tensor w = ops->random_fill(DType::BF16, {kVocab, kHidden}, key += 2, 0.0f, 0.05f);
      const LinearWeight lw = ops->place_linear(w, Tensor(), 0, 0);
      for (int64_t rows : {1, 2, 4}) {
        const Tensor x = ops->random_fill(DType::F32, {rows, kHidden}, ++key, 0.0f, 1.0f);
        Tensor y = ops->empty(DType::F32, {rows, kVocab});
        const double us = time_us(*ops, [&] { ops->linear(x, lw, y); }, reps);
        report("lm_head rows " + std::to_string(rows), us, 2.0 * static_cast<double>(kVocab * kHidden), bw);
      }
    }
    if (wanted("experts")) {
      std::vector<ExpertWeights> experts;
      for (int64_t e = 0; e < kExperts; ++e)
        experts.push_back({random_fp8(*ops, kMoeInter, kHidden, key += 2), random_fp8(*ops, kMoeInter, kHidden, key += 2),
                           random_fp8(*ops, kHidden, kMoeInter, key += 2)});
      ops->prepare_experts(experts);
      for (int64_t tokens : {1, 4, 16, 256}) {
        // Token t picks experts 37 t + 5 j (mod 256), j < 8: distinct within a token, spread over
        // the experts; the bytes count the experts picked at least once.
        std::vector<int32_t> ids(static_cast<size_t>(tokens * kTopK));
        std::vector<bool> used(kExperts, false);
        for (int64_t t = 0; t < tokens; ++t)
          for (int64_t j = 0; j < kTopK; ++j) {
            const int64_t e = (37 * t + 5 * j) % kExperts;
            ids[static_cast<size_t>(t * kTopK + j)] = static_cast<int32_t>(e);
            used[static_cast<size_t>(e)] = true;
          }
        int64_t picked = 0;
        for (bool u : used) picked += u ? 1 : 0;
        Tensor id_dev = ops->empty(DType::I32, {tokens, kTopK});
        ops->copy_from_host(ids.data(), id_dev);
        const Tensor weights = ops->random_fill(DType::F32, {tokens, kTopK}, ++key, 0.125f, 0.05f);
        const Tensor x = ops->random_fill(DType::F32, {tokens, kHidden}, ++key, 0.0f, 1.0f);
        Tensor y = ops->empty(DType::F32, {tokens, kHidden});
        const double us = time_us(*ops, [&] { ops->moe_experts(x, experts, id_dev, weights, y); }, reps);
        ops->take_routed_expert_count();
        report("experts tokens " + std::to_string(tokens) + " (" + std::to_string(picked) + " picked)", us,
               static_cast<double>(picked) * 3.0 * static_cast<double>(kMoeInter * kHidden), bw);
      }
    }
  } catch (const std::exception& e) {
    std::cerr << "dilu_linear_bench: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
