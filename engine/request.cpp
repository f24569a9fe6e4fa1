// Input-line parsing and output records (see request.h).
#include "engine/request.h"

#include <set>

namespace dilu {

using json = nlohmann::json;

RequestLimits request_limits(const ModelConfig& model, const RunConfig& run) {
  RequestLimits l;
  l.vocab_size = model.vocab_size;
  l.max_seq_len = run.model.max_seq_len > 0 ? run.model.max_seq_len : model.max_position_embeddings;
  l.default_max_tokens = run.sampling.max_tokens;
  l.default_temperature = run.sampling.temperature;
  return l;
}

namespace {

struct LineError {
  std::string message;
};

[[noreturn]] void fail(const std::string& message) { throw LineError{message}; }

int64_t integer_field(const json& j, const char* key, int64_t min_value) {
  const json& v = j.at(key);
  if (!v.is_number_integer()) fail(std::string("'") + key + "' must be an integer, got " + v.dump());
  const int64_t x = v.get<int64_t>();
  if (x < min_value) fail(std::string("'") + key + "' must be >= " + std::to_string(min_value) + ", got " + v.dump());
  return x;
}

bool bool_field(const json& j, const char* key) {
  const json& v = j.at(key);
  if (!v.is_boolean()) fail(std::string("'") + key + "' must be true or false, got " + v.dump());
  return v.get<bool>();
}

double number_field(const json& j, const char* key) {
  const json& v = j.at(key);
  if (!v.is_number()) fail(std::string("'") + key + "' must be a number, got " + v.dump());
  return v.get<double>();
}

}  // namespace

std::variant<Request, RequestError> parse_request(const std::string& text, int64_t line, const RequestLimits& limits) {
  const std::string where = "line " + std::to_string(line) + ": ";
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    return RequestError{line, nullptr, where + "not valid JSON (" + e.what() + ")"};
  }
  json id = j.is_object() && j.contains("id") ? j["id"] : json(nullptr);
  try {
    if (!j.is_object()) fail("expected a JSON object per line, got " + j.dump().substr(0, 80));
    if (!j.contains("id")) fail("missing 'id' (a string or number that names the request in the output)");
    if (!id.is_string() && !id.is_number_integer()) fail("'id' must be a string or an integer, got " + id.dump());
    static const std::set<std::string> kKnown = {"id",   "prompt_token_ids", "max_tokens", "temperature", "ignore_eos",
                                                 "top_p", "top_k",          "seed",       "n",           "stop",
                                                 "logprobs", "top_logprobs", "prompt",    "messages"};
    for (auto it = j.begin(); it != j.end(); ++it)
      if (!kKnown.count(it.key()))
        fail("unknown field '" + it.key() +
             "'; a request line may hold id, prompt_token_ids, max_tokens, temperature, top_p, top_k, seed, "
             "ignore_eos, n, stop, logprobs, top_logprobs");
    // Fields of the full request format that this version accepts only at their neutral value.
    auto neutral = [&](const char* key, auto is_neutral, const char* what) {
      if (j.contains(key) && !j[key].is_null() && !is_neutral(j[key]))
        fail(std::string("'") + key + "' = " + j[key].dump() + ": " + what +
             " is not implemented in this version of dilu yet; leave it out");
    };
    neutral("n", [](const json& v) { return v == 1; }, "more than one sample per prompt");
    neutral("stop", [](const json& v) { return v.is_array() && v.empty(); }, "stop strings (they need the tokenizer)");
    neutral("logprobs", [](const json& v) { return v == false || v == 0; }, "returning logprobs");
    neutral("top_logprobs", [](const json& v) { return v == 0; }, "returning logprobs");
    if (j.contains("prompt") || j.contains("messages"))
      fail("text prompts ('prompt', 'messages') need the tokenizer, which this version of dilu does not have yet; "
           "give 'prompt_token_ids'");
    if (!j.contains("prompt_token_ids")) fail("missing 'prompt_token_ids' (a list of token ids)");

    Request r;
    r.line = line;
    r.id = id;
    const json& p = j["prompt_token_ids"];
    if (!p.is_array()) fail("'prompt_token_ids' must be a list of integers, got " + p.dump().substr(0, 80));
    if (p.empty()) fail("'prompt_token_ids' is empty; a prompt needs at least one token");
    for (size_t i = 0; i < p.size(); ++i) {
      if (!p[i].is_number_integer()) fail("'prompt_token_ids'[" + std::to_string(i) + "] is " + p[i].dump() + ", not an integer");
      const int64_t t = p[i].get<int64_t>();
      if (t < 0 || t >= limits.vocab_size)
        fail("'prompt_token_ids'[" + std::to_string(i) + "] = " + std::to_string(t) + " is outside the vocabulary [0, " +
             std::to_string(limits.vocab_size) + ")");
      r.prompt.push_back(static_cast<int32_t>(t));
    }
    if (static_cast<int64_t>(r.prompt.size()) > limits.max_seq_len)
      fail("prompt of " + std::to_string(r.prompt.size()) + " tokens is longer than model.max_seq_len = " +
           std::to_string(limits.max_seq_len) + "; shorten it or raise model.max_seq_len");
    r.max_tokens = j.contains("max_tokens") ? integer_field(j, "max_tokens", 0) : limits.default_max_tokens;
    r.ignore_eos = j.contains("ignore_eos") ? bool_field(j, "ignore_eos") : false;
    const double temperature = j.contains("temperature") ? number_field(j, "temperature") : limits.default_temperature;
    if (temperature < 0) fail("'temperature' must be >= 0");
    if (temperature > 0)
      fail("'temperature' > 0 asks for sampling, which this version of dilu does not implement yet (greedy only); "
           "use temperature 0");
    if (j.contains("top_p")) number_field(j, "top_p");
    if (j.contains("top_k")) integer_field(j, "top_k", -1);
    if (j.contains("seed")) integer_field(j, "seed", 0);
    return r;
  } catch (const LineError& e) {
    return RequestError{line, id, where + e.message};
  }
}

json completion_record(const Request& r, const std::vector<int32_t>& tokens, const std::string& finish_reason,
                       bool with_token_ids) {
  json out;
  out["id"] = r.id;
  if (with_token_ids) out["token_ids"] = tokens;
  out["finish_reason"] = finish_reason;
  out["usage"] = {{"prompt_tokens", r.prompt.size()}, {"completion_tokens", tokens.size()}};
  return out;
}

json error_record(const RequestError& e) {
  return json{{"id", e.id}, {"error", {{"message", e.message}, {"line", e.line}}}};
}

}  // namespace dilu
