// Host-side choice of one sequence's next token from its FP32 logits: greedy, or temperature,
// top-k, top-p and min-p with a counter-based draw, so a seeded request is the same in any batch.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dilu {

// How one request is generated. Parsed from its input line (engine/request.h); fields the line
// leaves out come from the run config's `sampling.*`.
struct SamplingParams {
  double temperature = 1.0;      // < 1e-5 (0 included): greedy, as vLLM
  double top_p = 1.0;            // (0, 1]; 1: off
  int64_t top_k = 0;             // 0: off (a line's -1 is stored as 0)
  double min_p = 0.0;            // [0, 1]; drop tokens with p < min_p * p_max; 0: off
  std::optional<uint64_t> seed;  // none: derived from the run seed and the request id
  int64_t n = 1;                 // samples of one prompt
  int64_t max_tokens = 0;        // completion tokens at most, per sample
  bool ignore_eos = false;
  std::vector<std::string> stop;        // stop strings, matched on the detokenized text
  std::vector<int32_t> stop_token_ids;  // stop tokens besides EOS (they count even with ignore_eos)
  bool include_stop_str_in_output = false;
  bool logprobs = false;     // return the chosen token's logprob per position
  int64_t top_logprobs = 0;  // and this many most likely tokens, [0, 20]
  friend bool operator==(const SamplingParams&, const SamplingParams&) = default;
};

struct SampleResult {
  int32_t token = 0;
  // OpenAI/vLLM semantics: log_softmax of the RAW logits (before temperature, top-k, top-p,
  // min-p). Filled only when params.logprobs is on; logprob is 0 and top empty otherwise.
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top;  // params.top_logprobs best (token, logprob), best first
};

// Picks the next token from logits [V]. Greedy takes the first index of the maximum. Otherwise
// p = softmax(logits / temperature), cut to the top_k largest, then to the nucleus (the shortest
// run of the largest p, ties by lower id, whose mass reaches top_p of what is left), then tokens
// with p < min_p * p_max are dropped (HF's order; the min-p cut commutes with top-k), and one
// token is drawn by inverse CDF over the kept tokens in id order, with the uniform of
// sample_uniform(seed, sample_index, position).
// Pure and thread-safe: the caller may sample many sequences in parallel.
// Cost for V = 129280: one vectorized exp pass over V (a top-k selection instead when top_k is
// on), a linear-time selection for top_p; nothing sorts the vocabulary.
SampleResult sample(std::span<const float> logits, const SamplingParams& params, uint64_t seed, int64_t sample_index,
                    int64_t position);

// The draw's uniform in [0, 1): a pure function of (seed, sample index within n, position), so a
// token never depends on the batch, the rank count or what was sampled before. `position` is the
// index of the token within its completion (0 for the first generated token).
double sample_uniform(uint64_t seed, int64_t sample_index, int64_t position);

// The seed of a request that gives none: a hash of the run's `sampling.seed` and the request's
// key (the run loop passes the id as JSON text, e.g. `"a"` or `17`), so two requests of one run
// draw independently and a rerun of the same file draws the same tokens.
uint64_t derive_seed(uint64_t run_seed, std::string_view request_key);

}  // namespace dilu
