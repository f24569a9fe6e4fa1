// One input line turned into a typed request (not yet tokenized), or into the error that answers
// it. Knows every line format of the design (dilu lines and OpenAI Batch API lines). Plain C++.
#pragma once

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/model_config.h"
#include "engine/run_config.h"
#include "engine/sampler.h"

namespace dilu {

enum class RequestKind {
  Completion,  // "prompt": text, encoded as is (BOS per the tokenizer config)
  Chat,        // "messages": rendered by the chat template, then encoded
  TokenIds,    // "prompt_token_ids", or a Batch /v1/completions "prompt" given as a list of ints
};

// Which shape the answer takes (engine/output_record.h).
enum class ResponseFormat {
  Dilu,                   // {"id", "prompt" | "messages" | "prompt_token_ids", ...} lines
  OpenAIBatchChat,        // {"custom_id", "method", "url": "/v1/chat/completions", "body"}
  OpenAIBatchCompletion,  // {"custom_id", "method", "url": "/v1/completions", "body"}
};

inline bool is_openai_batch(ResponseFormat f) { return f != ResponseFormat::Dilu; }

struct Request {
  int64_t line = 0;   // 1-based line number in the input file
  nlohmann::json id;  // "id" (dilu) or "custom_id" (Batch), echoed as given
  RequestKind kind = RequestKind::TokenIds;
  ResponseFormat format = ResponseFormat::Dilu;
  std::string prompt_text;                // Completion: non-empty
  nlohmann::json messages;                // Chat: the non-empty JSON array as given (checked lightly)
  std::vector<int32_t> prompt_token_ids;  // TokenIds: non-empty, in the vocabulary; else empty
  SamplingParams sampling;                // every field resolved (line, else run-config default)
};

struct RequestError {
  int64_t line = 0;
  nlohmann::json id;                             // the line's id / custom_id, null when unreadable
  std::string message;                           // starts with "line N: "
  ResponseFormat format = ResponseFormat::Dilu;  // Batch lines get Batch-shaped error records
  std::string field{};                           // the offending field ("body.top_p"), "" if none
};

// An error for a request that parsed but cannot be served (found by the run loop: duplicate id,
// prompt too long once tokenized, ...). `what` is the message without the "line N: " prefix.
RequestError request_error(const Request& r, std::string field, const std::string& what);

// What the parser needs to know about the model and the run.
struct RequestLimits {
  int64_t vocab_size = 0;
  int64_t max_seq_len = 0;  // prompt + completion tokens at most; longer token-id prompts are refused
  SamplingParams defaults;  // for fields a line leaves out
};

// vocab and max_seq_len from the checkpoint (model.max_seq_len overrides), defaults from
// `sampling.*` (temperature, top_p, top_k, max_tokens; the rest at their neutral values).
RequestLimits request_limits(const ModelConfig& model, const RunConfig& run);

// Parses one JSONL line. Never throws on bad input: a bad line becomes a RequestError naming the
// line and the field. Does not tokenize and does not look for duplicate ids (the run loop does).
std::variant<Request, RequestError> parse_request(const std::string& text, int64_t line, const RequestLimits& limits);

// The seed of a request's draws: its own "seed", else derive_seed(run_seed, id as JSON text).
uint64_t request_seed(const Request& r, uint64_t run_seed);

}  // namespace dilu
