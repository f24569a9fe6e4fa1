// One input line turned into a typed request, or into the error record that answers it.
// Plain C++: no model, no device.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/model_config.h"
#include "engine/run_config.h"

namespace dilu {

struct Request {
  int64_t line = 0;               // 1-based line number in the input file
  nlohmann::json id;              // echoed back as given (string or number)
  std::vector<int32_t> prompt;    // prompt token ids
  int64_t max_tokens = 0;         // completion tokens at most
  bool ignore_eos = false;
};

struct RequestError {
  int64_t line = 0;
  nlohmann::json id;              // null when the line has no readable id
  std::string message;            // starts with "line N: "
};

// What the request parser needs to know about the model and the run.
struct RequestLimits {
  int64_t vocab_size = 0;
  int64_t max_seq_len = 0;        // prompt + completion tokens at most
  int64_t default_max_tokens = 0;
  double default_temperature = 0.0;
};

RequestLimits request_limits(const ModelConfig& model, const RunConfig& run);

// Parses one JSONL line. Never throws on bad input: a bad line becomes a RequestError.
std::variant<Request, RequestError> parse_request(const std::string& text, int64_t line, const RequestLimits& limits);

// The output line for a finished request and for a failed one.
nlohmann::json completion_record(const Request& r, const std::vector<int32_t>& tokens, const std::string& finish_reason,
                                 bool with_token_ids);
nlohmann::json error_record(const RequestError& e);

}  // namespace dilu
