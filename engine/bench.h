// `dilu bench` as a library call: for each batch size, random prompts of a fixed length run
// through the engine (ignore_eos, fixed output length) and the prefill and decode phases are
// timed separately. Backend-independent; the GPU roofline columns come with the CUDA backend.
#pragma once

#include <filesystem>
#include <iosfwd>
#include <vector>

#include "engine/run_config.h"
#include "parallel/groups.h"

namespace dilu {

struct BenchOptions {
  std::filesystem::path model_dir;  // a checkpoint directory, or (random_weights) a preset name
  bool random_weights = false;      // no checkpoint file: weights made on the device (Checkpoint::synthetic)
  int64_t layers = 0;               // random_weights: hidden layers instead of the config's (0: keep)
  std::vector<int64_t> batch_sizes;  // each: that many requests, batch.max_seqs = it
  int64_t input_len = 128;
  int64_t output_len = 128;
  uint64_t seed = 0;
  // Before each batch size's timed run, an untimed one of the same prompts with 3 output tokens:
  // the one-time work of a shape (cuBLASLt's algorithm searches, the decode step's CUDA graph
  // capture) stays out of the figures, as in a long offline job that pays it once.
  bool warmup = true;
  // Write DIR/rank-NNNNN.h5 (with its /bench table) and DIR/timeline.json (docs/traces.md) and
  // log what recording cost; empty: no files.
  std::filesystem::path trace_dir;
  // The ranks when launched by mpirun/srun (each benchmarks on its own; traces are gathered on
  // rank 0); null: one process.
  const ParallelGroups* groups = nullptr;
};

struct BenchRow {
  int64_t batch = 0;
  double prefill_seconds = 0;   // steps that held prompt tokens
  double decode_seconds = 0;    // steps of decode tokens only
  int64_t prefill_tokens = 0;
  int64_t decode_tokens = 0;
  int64_t decode_steps = 0;
  double prefill_tok_s() const { return prefill_tokens / std::max(prefill_seconds, 1e-12); }
  double decode_tok_s() const { return decode_tokens / std::max(decode_seconds, 1e-12); }
  double ms_per_decode_step() const { return 1e3 * decode_seconds / std::max<int64_t>(decode_steps, 1); }
  // Rooflines: what the decode steps must read (every weight once except the routed experts,
  // of which those the steps selected, counted; the KV cache of each context) over the device
  // bandwidth measured in the same run; and prefill FLOPs over the measured GEMM peak.
  double decode_roofline_seconds = 0;
  double routed_experts_per_step = 0;  // distinct experts with tokens, summed over MoE layers
  double bandwidth_bytes_s = 0;        // measured: a large copy within device memory
  double prefill_flops = 0;            // 2 x multiply-adds of the prefill steps
  double gemm_peak_flops = 0;          // measured: the best FP8 (or BF16) linear on the layer's shapes; 0: not measured
  double decode_roofline_ratio() const { return decode_seconds / std::max(decode_roofline_seconds, 1e-12); }
  int64_t layers = 0;                 // hidden layers of the model benchmarked
  int gpus = 1;                        // tp x pp of the replica: the roofline splits the bytes over them
  double all_reduce_seconds = 0;       // tp > 1: one all-reduce of [batch, hidden], measured alone
  double prefill_flops_s() const { return prefill_flops / std::max(prefill_seconds, 1e-12); }
};

std::vector<BenchRow> run_bench(const BenchOptions& options, const RunConfig& config, std::ostream& log);

}  // namespace dilu
