// Token sampling on the GPU, with the host sampler's semantics (engine/sampler.h): greedy takes
// the first index of the maximum; otherwise p = softmax(logits / temperature), cut to the top_k
// largest, then to the nucleus (the shortest run of the largest p, ties by lower id, whose mass
// reaches top_p of what is left), then tokens with p < min_p * p_max are dropped, and one token
// is drawn by inverse CDF over the kept tokens in id order with the given uniform. Logprobs are
// log_softmax of the raw logits. Nothing but the small per-row results leaves the device.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dilu::cuda {

constexpr int kMaxTopLogprobs = 20;

struct SampleRowParams {  // device-side copy of one SampleSpec
  int32_t row;            // logits row
  float temperature;      // < 1e-5: greedy
  float top_p;            // (0, 1]
  int32_t top_k;          // 0: off
  float min_p;            // [0, 1]
  double uniform;         // [0, 1)
  int32_t logprobs;       // 0/1
  int32_t top_logprobs;   // [0, kMaxTopLogprobs]
};

struct SampleRowResult {
  int32_t token;
  float logprob;
  int32_t top_ids[kMaxTopLogprobs];
  float top_logprobs[kMaxTopLogprobs];
};

// Bytes of device workspace sample_rows needs for `rows` rows of `vocab` logits.
size_t sample_rows_workspace_bytes(int64_t rows, int64_t vocab);

// logits [*, vocab] F32 (device); params [rows] and results [rows] device arrays; workspace of
// sample_rows_workspace_bytes(rows, vocab) bytes. Enqueued on `stream` (a cudaStream_t); no
// allocation, no host synchronization.
void sample_rows(const float* logits, int64_t vocab, const SampleRowParams* params, SampleRowResult* results,
                 int64_t rows, void* workspace, size_t workspace_bytes, void* stream);

// The next step's token ids from a sample's results: ids[feed[2i]] = results[feed[2i + 1]].token
// for i < n (device arrays; Ops::set_token_feed). Enqueued on `stream`.
void feed_tokens(int32_t* ids, const int32_t* feed, int64_t n, const SampleRowResult* results, void* stream);

}  // namespace dilu::cuda
