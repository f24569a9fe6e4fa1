// `dilu bench` as a library call: for each batch size, random prompts of a fixed length run
// through the engine (ignore_eos, fixed output length) and the prefill and decode phases are
// timed separately. Backend-independent; the GPU roofline columns come with the CUDA backend.
#pragma once

#include <filesystem>
#include <iosfwd>
#include <vector>

#include "engine/run_config.h"

namespace dilu {

struct BenchOptions {
  std::filesystem::path model_dir;
  std::vector<int64_t> batch_sizes;  // each: that many requests, batch.max_seqs = it
  int64_t input_len = 128;
  int64_t output_len = 128;
  uint64_t seed = 0;
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
};

std::vector<BenchRow> run_bench(const BenchOptions& options, const RunConfig& config, std::ostream& log);

}  // namespace dilu
