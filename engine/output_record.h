// The output line that answers each input line: dilu's own shape, or the OpenAI Batch output
// format as `vllm run-batch` writes it, for finished requests and for failed ones.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/request.h"

namespace dilu {

struct TokenLogprob {
  int32_t token = 0;
  std::string text;  // the token's own text; may be the raw bytes of part of a UTF-8 character
  float logprob = 0.0f;
};

// The logprobs of one generated token (SampleResult of engine/sampler.h plus token texts).
struct PositionLogprobs {
  TokenLogprob chosen;
  std::vector<TokenLogprob> top;  // the request's top_logprobs best, best first
};

// One of the n samples of a finished request, as the run loop hands it over.
struct SampleOutput {
  std::vector<int32_t> token_ids;                // generated tokens, EOS / stop token included
  std::string text;                              // detokenized; stop string left out unless
                                                 // include_stop_str_in_output
  std::string finish_reason;                     // "stop" (EOS, stop token or string) | "length"
  nlohmann::json stop_reason;                    // as vLLM: the stop string or stop token id that
                                                 // matched; null for EOS and for "length"
  std::vector<PositionLogprobs> logprobs;        // one per generated token when the request asked
  std::optional<std::string> reasoning_content;  // the <think> text when output.split_reasoning is on
};

// What the records need beyond the request.
struct RecordContext {
  std::string model_name;      // "model" of OpenAI bodies (vLLM writes the --model it was given)
  int64_t created = 0;         // "created" of OpenAI bodies, unix seconds; 0: the current time
  uint64_t run_nonce = 0;      // mixed into batch_req_/req_/chatcmpl-/cmpl- ids with the line number:
                               // unique within a run, and across runs when each run draws its own
  bool with_token_ids = true;  // output.token_ids
};

// The record of a finished request, shaped by r.format; prompt_tokens is the prompt's length once
// encoded (usage counts completion tokens over all samples, as OpenAI and vLLM do).
//
// Dilu, n == 1: {"id", "text", "token_ids" (output.token_ids), "finish_reason", "stop_reason" (when
//   not null), "reasoning_content" (when split), "logprobs" (when asked: one {"token_id", "token",
//   "logprob", "top_logprobs": [{"token_id", "token", "logprob"}]} per token),
//   "usage": {"prompt_tokens", "completion_tokens"}}.
// Dilu, n > 1: {"id", "choices": [{"index", then the per-sample fields above}], "usage"}: one
//   sample keeps the flat shape earlier versions wrote, several need a list.
// OpenAI Batch: {"id": "batch_req_…", "custom_id", "response": {"status_code": 200, "request_id",
//   "body": chat.completion | text_completion}, "error": null}, bodies as vLLM's protocol.py;
//   "reasoning_content" in the chat message when split (DeepSeek's API name); "token_ids" per choice
//   only with output.token_ids (vLLM's field of the same name, sent when return_token_ids is set).
// Logprobs of -inf are written as -9999.0, as vLLM does, since JSON has no infinity.
nlohmann::json output_record(const Request& r, const std::vector<SampleOutput>& samples, int64_t prompt_tokens,
                             const RecordContext& ctx);

// The record of a line that could not be served.
// Dilu: {"id", "error": {"message", "line"}}.
// OpenAI Batch (vLLM's shape for a failed line): {"id": "batch_req_…", "custom_id" (null when
//   unreadable), "response": {"status_code": 400, "request_id", "body": null},
//   "error": {"code": "invalid_request", "message", "param" (the field, or null), "line"}}.
nlohmann::json error_record(const RequestError& e, const RecordContext& ctx = {});

}  // namespace dilu
