// Input-line parsing (see request.h): dilu lines and OpenAI Batch API lines, every field checked
// with a message that names the line and the field; nothing is tokenized here.
#include "engine/request.h"

#include <cmath>
#include <set>

namespace dilu {

using json = nlohmann::json;

namespace {

// Lines nest no deeper than this; deeper ones are refused before parsing so that no later walk
// over a pathological line (printing it, rendering it) can exhaust the stack.
constexpr int kMaxDepth = 64;
// OpenAI's limit for top_logprobs, and vLLM's default max_logprobs.
constexpr int64_t kMaxTopLogprobs = 20;

struct LineError {
  std::string field;
  std::string message;
};

[[noreturn]] void fail(const std::string& field, const std::string& message) { throw LineError{field, message}; }

std::string quoted(const std::string& field) { return "'" + field + "'"; }

// A short, safe rendering of a user's value for a message: containers are described, not printed.
std::string brief(const json& v) {
  if (v.is_array()) return "a list of " + std::to_string(v.size()) + " item(s)";
  if (v.is_object()) return "an object";
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

std::string join_quoted(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "'" : ", '") + n + "'";
  return out;
}

// Deepest bracket nesting of a JSON text, strings skipped; stops counting past the limit.
int nesting_depth(const std::string& text) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
      if (deepest > kMaxDepth) break;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return deepest;
}

// nlohmann's parse message without its "[json.exception...] " prefix, with the two cases users
// meet most (broken text from another tool) explained.
std::string json_error_message(const json::exception& e) {
  std::string what = e.what();
  if (const size_t p = what.find("] "); p != std::string::npos) what = what.substr(p + 2);
  if (what.size() > 240) what = what.substr(0, 237) + "...";
  std::string hint;
  if (what.find("surrogate") != std::string::npos)
    hint =
        "a lone UTF-16 surrogate escape (\\ud800-\\udfff without its other half) is not text; the program "
        "that wrote this line produced broken Unicode; ";
  else if (what.find("UTF-8") != std::string::npos)
    hint = "the line is not valid UTF-8; ";
  return "not valid JSON: " + hint + "(" + what + ")";
}

// Reads the fields of one JSON object; `prefix` ("" or "body.") makes messages name the field as
// the user wrote it. A null value counts as absent, as in the OpenAI API.
class Fields {
 public:
  Fields(const json& obj, std::string prefix) : obj_(obj), prefix_(std::move(prefix)) {}

  const json* get(const std::string& key) const {
    const auto it = obj_.find(key);
    return it == obj_.end() || it->is_null() ? nullptr : &*it;
  }
  bool has(const std::string& key) const { return get(key) != nullptr; }
  std::string name(const std::string& key) const { return prefix_ + key; }

  int64_t integer(const std::string& key, int64_t lo, int64_t hi, const std::string& range) const {
    const json& v = *get(key);
    if (!v.is_number_integer()) fail(name(key), quoted(name(key)) + " must be an integer, got " + brief(v));
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
      fail(name(key), quoted(name(key)) + " must be " + range + ", got " + brief(v));
    const auto x = v.get<int64_t>();
    if (x < lo || x > hi) fail(name(key), quoted(name(key)) + " must be " + range + ", got " + brief(v));
    return x;
  }
  double number(const std::string& key) const {
    const json& v = *get(key);
    if (!v.is_number() || !std::isfinite(v.get<double>()))
      fail(name(key), quoted(name(key)) + " must be a number, got " + brief(v));
    return v.get<double>();
  }
  bool boolean(const std::string& key) const {
    const json& v = *get(key);
    if (!v.is_boolean()) fail(name(key), quoted(name(key)) + " must be true or false, got " + brief(v));
    return v.get<bool>();
  }
  std::string string(const std::string& key) const {
    const json& v = *get(key);
    if (!v.is_string()) fail(name(key), quoted(name(key)) + " must be a string, got " + brief(v));
    return v.get<std::string>();
  }

  // Every key of the object that is in none of the given sets, in the object's order.
  std::vector<std::string> unknown(std::initializer_list<const std::set<std::string>*> known) const {
    std::vector<std::string> out;
    for (auto it = obj_.begin(); it != obj_.end(); ++it) {
      bool found = false;
      for (const auto* set : known) found = found || set->count(it.key()) > 0;
      if (!found) out.push_back(name(it.key()));
    }
    return out;
  }

 private:
  const json& obj_;
  std::string prefix_;
};

std::vector<int32_t> token_ids(const json& v, const std::string& field, int64_t vocab_size) {
  if (!v.is_array()) fail(field, quoted(field) + " must be a list of token ids, got " + brief(v));
  std::vector<int32_t> ids;
  ids.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const std::string at = quoted(field) + "[" + std::to_string(i) + "]";
    if (!v[i].is_number_integer()) fail(field, at + " is " + brief(v[i]) + ", not an integer");
    const bool too_big = v[i].is_number_unsigned() && v[i].get<uint64_t>() > static_cast<uint64_t>(INT64_MAX);
    const int64_t t = too_big ? INT64_MAX : v[i].get<int64_t>();
    if (t < 0 || t >= vocab_size)
      fail(field, at + " = " + brief(v[i]) + " is outside the vocabulary [0, " + std::to_string(vocab_size) + ")");
    ids.push_back(static_cast<int32_t>(t));
  }
  return ids;
}

// Light structural check of chat messages; the chat template checks the rest when it renders.
void check_messages(const json& m, const std::string& field) {
  static const std::set<std::string> kRoles = {"system", "user", "assistant", "tool"};
  if (!m.is_array()) fail(field, quoted(field) + " must be a list of {\"role\", \"content\"} objects, got " + brief(m));
  if (m.empty()) fail(field, quoted(field) + " is empty; a chat needs at least one message");
  for (size_t i = 0; i < m.size(); ++i) {
    const std::string at = field + "[" + std::to_string(i) + "]";
    const json& msg = m[i];
    if (!msg.is_object()) fail(at, quoted(at) + " must be an object with \"role\" and \"content\", got " + brief(msg));
    const auto role = msg.find("role");
    if (role == msg.end() || !role->is_string())
      fail(at + ".role", quoted(at + ".role") + " must be one of system, user, assistant, tool");
    if (!kRoles.count(role->get<std::string>()))
      fail(at + ".role", quoted(at + ".role") + " = " + brief(*role) +
                             " is not a role DeepSeek chat templates know (system, user, assistant, tool)");
    const auto content = msg.find("content");
    const std::string cf = at + ".content";
    if (content == msg.end() || content->is_null()) {
      const auto calls = msg.find("tool_calls");
      if (*role == "assistant" && calls != msg.end() && !calls->is_null()) continue;  // a tool call carries no text
      fail(cf, quoted(cf) + " is missing: the message has no \"content\"");
    }
    if (content->is_string()) continue;
    if (!content->is_array())
      fail(cf, quoted(cf) + " must be a string or a list of {\"type\": \"text\", \"text\": ...} parts, got " +
                   brief(*content));
    for (size_t j = 0; j < content->size(); ++j) {
      const json& part = (*content)[j];
      const std::string pf = cf + "[" + std::to_string(j) + "]";
      const bool text_part =
          part.is_object() && part.value("type", json()) == "text" && part.contains("text") && part["text"].is_string();
      if (!text_part)
        fail(pf, quoted(pf) + " must be {\"type\": \"text\", \"text\": \"...\"}; DeepSeek-V3 reads text only");
    }
  }
}

// The three dialects of sampling fields: dilu lines, Batch chat bodies, Batch completion bodies.
enum class Dialect { Dilu, Chat, Completions };

const std::set<std::string>& sampling_keys(Dialect d) {
  static const std::set<std::string> kCommon = {"max_tokens", "temperature", "top_p",    "top_k",
                                                "min_p",      "seed",        "stop",     "stop_token_ids",
                                                "ignore_eos", "n",           "logprobs", "include_stop_str_in_output"};
  static const std::set<std::string> kDilu = [] {
    auto s = kCommon;
    s.insert("top_logprobs");
    return s;
  }();
  static const std::set<std::string> kChat = [] {
    auto s = kCommon;
    s.insert({"top_logprobs", "max_completion_tokens"});
    return s;
  }();
  return d == Dialect::Dilu ? kDilu : d == Dialect::Chat ? kChat : kCommon;
}

SamplingParams read_sampling(const Fields& f, Dialect d, const RequestLimits& limits) {
  SamplingParams s = limits.defaults;
  // OpenAI deprecated max_tokens for chat in favour of max_completion_tokens, which wins (as vLLM).
  const std::string max_key =
      d == Dialect::Chat && f.has("max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  if (f.has(max_key)) s.max_tokens = f.integer(max_key, 0, INT64_MAX, "an integer >= 0");
  if (f.has("temperature")) {
    s.temperature = f.number("temperature");
    if (s.temperature < 0)
      fail(f.name("temperature"),
           quoted(f.name("temperature")) + " must be >= 0 (0: greedy), got " + brief(*f.get("temperature")));
  }
  if (f.has("top_p")) {
    s.top_p = f.number("top_p");
    if (!(s.top_p > 0 && s.top_p <= 1))
      fail(f.name("top_p"), quoted(f.name("top_p")) + " must be in (0, 1] (1: off), got " + brief(*f.get("top_p")));
  }
  if (f.has("top_k")) s.top_k = std::max<int64_t>(0, f.integer("top_k", -1, INT64_MAX, ">= 1, or 0 or -1 for off"));
  if (f.has("min_p")) {
    s.min_p = f.number("min_p");
    if (!(s.min_p >= 0 && s.min_p <= 1))
      fail(f.name("min_p"), quoted(f.name("min_p")) + " must be in [0, 1] (0: off), got " + brief(*f.get("min_p")));
  }
  if (f.has("seed")) {
    const json& v = *f.get("seed");
    if (!v.is_number_integer()) fail(f.name("seed"), quoted(f.name("seed")) + " must be an integer, got " + brief(v));
    // Negative seeds (allowed by OpenAI and vLLM) are taken modulo 2^64.
    s.seed = v.is_number_unsigned() ? v.get<uint64_t>() : static_cast<uint64_t>(v.get<int64_t>());
  }
  if (f.has("n")) s.n = f.integer("n", 1, INT64_MAX, ">= 1");
  if (f.has("ignore_eos")) s.ignore_eos = f.boolean("ignore_eos");
  if (f.has("include_stop_str_in_output")) s.include_stop_str_in_output = f.boolean("include_stop_str_in_output");
  if (const json* stop = f.get("stop")) {
    const std::string field = f.name("stop");
    s.stop.clear();
    if (stop->is_string()) {
      s.stop.push_back(stop->get<std::string>());
    } else if (stop->is_array()) {
      for (const json& x : *stop) {
        if (!x.is_string())
          fail(field, quoted(field) + " must be a string or a list of strings, got " + brief(x) + " in it");
        s.stop.push_back(x.get<std::string>());
      }
    } else {
      fail(field, quoted(field) + " must be a string or a list of strings, got " + brief(*stop));
    }
    for (const std::string& x : s.stop)
      if (x.empty()) fail(field, quoted(field) + " holds an empty string, which would stop before the first token");
  }
  if (const json* ids = f.get("stop_token_ids"))
    s.stop_token_ids = token_ids(*ids, f.name("stop_token_ids"), limits.vocab_size);

  // logprobs: a boolean plus top_logprobs (chat), an integer count (completions), either (dilu).
  const std::string top_range = "in [0, " + std::to_string(kMaxTopLogprobs) + "]";
  if (const json* lp = f.get("logprobs")) {
    if (lp->is_boolean() && d != Dialect::Completions) {
      s.logprobs = lp->get<bool>();
    } else if (lp->is_number_integer() && d != Dialect::Chat) {
      s.top_logprobs = f.integer("logprobs", 0, kMaxTopLogprobs, top_range);
      s.logprobs = true;
      if (f.has("top_logprobs"))
        fail(f.name("top_logprobs"),
             "give either an integer 'logprobs' (the number of top tokens) or 'logprobs': "
             "true with 'top_logprobs', not both");
    } else {
      fail(f.name("logprobs"), quoted(f.name("logprobs")) + " must be " +
                                   (d == Dialect::Chat          ? "true or false"
                                    : d == Dialect::Completions ? "an integer " + top_range
                                                                : "true, false or an integer " + top_range) +
                                   ", got " + brief(*lp));
    }
  }
  if (f.has("top_logprobs") && d != Dialect::Completions) {
    s.top_logprobs = f.integer("top_logprobs", 0, kMaxTopLogprobs, top_range);
    if (s.top_logprobs > 0 && !s.logprobs)
      fail(f.name("top_logprobs"), quoted(f.name("top_logprobs")) + " needs 'logprobs': true");
  }
  return s;
}

const std::set<std::string> kDiluPromptKeys = {"prompt", "messages", "prompt_token_ids"};

Request parse_dilu_line(const json& j, int64_t line, const RequestLimits& limits) {
  static const std::set<std::string> kId = {"id"};
  Fields f(j, "");
  if (!j.contains("id")) fail("id", "missing 'id' (a string or integer that names the request in the output)");
  if (!j["id"].is_string() && !j["id"].is_number_integer())
    fail("id", "'id' must be a string or an integer, got " + brief(j["id"]));
  if (const auto bad = f.unknown({&kId, &kDiluPromptKeys, &sampling_keys(Dialect::Dilu)}); !bad.empty())
    fail(
        bad.front(),
        "unknown field(s) " + join_quoted(bad) +
            "; a line holds 'id', one of 'prompt', 'messages', 'prompt_token_ids', " +
            "and optionally max_tokens, temperature, top_p, top_k, min_p, seed, stop, stop_token_ids, ignore_eos, n, " +
            "logprobs, top_logprobs, include_stop_str_in_output");

  Request r;
  r.line = line;
  r.id = j["id"];
  r.format = ResponseFormat::Dilu;
  int prompts = 0;
  for (const std::string& k : kDiluPromptKeys) prompts += f.has(k) ? 1 : 0;
  if (prompts == 0)
    fail("prompt", "missing the prompt: give one of 'prompt' (text), 'messages' (chat) or 'prompt_token_ids'");
  if (prompts > 1) fail("prompt", "give only one of 'prompt', 'messages' and 'prompt_token_ids'");
  if (f.has("prompt")) {
    r.kind = RequestKind::Completion;
    r.prompt_text = f.string("prompt");
    if (r.prompt_text.empty()) fail("prompt", "'prompt' is empty; give some text");
  } else if (f.has("messages")) {
    r.kind = RequestKind::Chat;
    check_messages(j["messages"], "messages");
    r.messages = j["messages"];
  } else {
    r.kind = RequestKind::TokenIds;
    r.prompt_token_ids = token_ids(j["prompt_token_ids"], "prompt_token_ids", limits.vocab_size);
    if (r.prompt_token_ids.empty())
      fail("prompt_token_ids", "'prompt_token_ids' is empty; a prompt needs at least one token");
  }
  r.sampling = read_sampling(f, Dialect::Dilu, limits);
  return r;
}

// Batch body fields that do not change the output, whatever their value (vLLM ignores them too):
// the model name (one model per run: the --model checkpoint answers every line), who asked, how
// the answer is stored or scheduled, streaming options, tool-call parallelism (no tools), the
// caller's request id, and return_token_ids (token ids in the output follow output.token_ids).
const std::set<std::string> kIgnoredBodyKeys = {
    "model",    "user",       "metadata",        "store", "service_tier", "stream_options", "parallel_tool_calls",
    "priority", "request_id", "return_token_ids"};

// Batch body fields accepted only at the value that leaves the output as dilu makes it: anything
// else would change the semantics (streaming, penalties, biases, tools, structured output, beam
// search, ...), which dilu does not implement, so the line gets an error naming the field.
struct NeutralField {
  const char* key;
  const char* neutral;  // JSON text of the accepted values, '|'-separated
  bool chat_only;
};
const std::vector<NeutralField>& neutral_body_fields() {
  static const std::vector<NeutralField> k = {
      {"stream", "false", false},
      {"frequency_penalty", "0", false},
      {"presence_penalty", "0", false},
      {"repetition_penalty", "1", false},
      {"length_penalty", "1", false},
      {"logit_bias", "{}", false},
      {"min_tokens", "0", false},
      {"use_beam_search", "false", false},
      {"skip_special_tokens", "true", false},
      {"spaces_between_special_tokens", "true", false},
      {"response_format", R"({"type": "text"})", false},
      {"echo", "false", false},
      {"suffix", R"("")", false},
      {"bad_words", "[]", false},
      {"allowed_token_ids", "", false},  // "": any value is refused
      {"prompt_logprobs", "", false},
      {"truncate_prompt_tokens", "", false},
      {"guided_json", "", false},
      {"guided_regex", "", false},
      {"guided_choice", "", false},
      {"guided_grammar", "", false},
      {"structured_outputs", "", false},
      {"logits_processors", "", false},
      {"tools", "[]", true},
      {"tool_choice", R"("none"|"auto")", true},
      {"functions", "[]", true},
      {"function_call", R"("none"|"auto")", true},
      {"add_generation_prompt", "true", true},
      {"continue_final_message", "false", true},
      {"add_special_tokens", "false", true},
      {"include_reasoning", "true", true},
      {"chat_template", "", true},
      {"chat_template_kwargs", "{}", true},
      {"documents", "", true},
      {"reasoning_effort", "", true},
      {"modalities", R"(["text"])", true},
      {"audio", "", true},
      {"prediction", "", true},
      {"web_search_options", "", true},
  };
  return k;
}

void check_neutral_fields(const Fields& f, Dialect d) {
  for (const NeutralField& nf : neutral_body_fields()) {
    if ((nf.chat_only && d != Dialect::Chat) || !f.has(nf.key)) continue;
    const json& v = *f.get(nf.key);
    std::string accepted = nf.neutral;
    bool ok = false;
    for (size_t start = 0; !accepted.empty() && start <= accepted.size();) {
      const size_t bar = std::min(accepted.find('|', start), accepted.size());
      ok = ok || v == json::parse(accepted.substr(start, bar - start));
      start = bar + 1;
    }
    if (ok) continue;
    const std::string field = f.name(nf.key);
    fail(field, quoted(field) + " = " + brief(v) + " would change the output and dilu does not support it; " +
                    (accepted.empty() ? "leave it out" : "leave it out or set it to " + accepted));
  }
}

Request parse_batch_line(const json& j, int64_t line, const RequestLimits& limits) {
  static const std::set<std::string> kTop = {"custom_id", "method", "url", "body"};
  Fields top(j, "");
  if (!top.has("custom_id")) fail("custom_id", "missing 'custom_id' (a string that names the request in the output)");
  if (!j["custom_id"].is_string() && !j["custom_id"].is_number_integer())
    fail("custom_id", "'custom_id' must be a string, got " + brief(j["custom_id"]));
  if (const auto bad = top.unknown({&kTop}); !bad.empty())
    fail(bad.front(),
         "unknown field(s) " + join_quoted(bad) + " in an OpenAI Batch line; it holds custom_id, method, url and body");
  if (!top.has("method") || !j["method"].is_string() || j["method"] != "POST")
    fail("method", "'method' must be \"POST\", got " + (top.has("method") ? brief(j["method"]) : "nothing"));
  if (!top.has("url") || !j["url"].is_string())
    fail("url", "'url' must be \"/v1/chat/completions\" or \"/v1/completions\"");
  const std::string url = j["url"].get<std::string>();
  if (url != "/v1/chat/completions" && url != "/v1/completions")
    fail("url", "'url' = " + brief(j["url"]) +
                    " is not served; dilu answers \"/v1/chat/completions\" and \"/v1/completions\"");
  if (!top.has("body") || !j["body"].is_object())
    fail("body", "'body' must be an object with the request, got " + (top.has("body") ? brief(j["body"]) : "nothing"));

  const json& body = j["body"];
  const Dialect d = url == "/v1/chat/completions" ? Dialect::Chat : Dialect::Completions;
  Fields f(body, "body.");
  static const std::set<std::string> kChatPrompt = {"messages"};
  static const std::set<std::string> kCompletionPrompt = {"prompt", "best_of"};
  static const std::set<std::string> kNeutral = [] {
    std::set<std::string> s;
    for (const NeutralField& nf : neutral_body_fields()) s.insert(nf.key);
    return s;
  }();
  if (const auto bad = f.unknown(
          {d == Dialect::Chat ? &kChatPrompt : &kCompletionPrompt, &sampling_keys(d), &kIgnoredBodyKeys, &kNeutral});
      !bad.empty())
    fail(bad.front(),
         "unknown field(s) " + join_quoted(bad) + " in the body of a " + url +
             " request; dilu reads messages/prompt, max_tokens" +
             (d == Dialect::Chat ? ", max_completion_tokens" : "") +
             ", temperature, top_p, top_k, min_p, seed, stop, stop_token_ids, n, logprobs" +
             (d == Dialect::Chat ? ", top_logprobs" : "") +
             ", ignore_eos, include_stop_str_in_output, and ignores model, user, metadata, store, service_tier, "
             "stream_options, parallel_tool_calls, priority, request_id, return_token_ids");
  check_neutral_fields(f, d);

  Request r;
  r.line = line;
  r.id = j["custom_id"];
  if (d == Dialect::Chat) {
    r.format = ResponseFormat::OpenAIBatchChat;
    r.kind = RequestKind::Chat;
    if (!f.has("messages")) fail("body.messages", "missing 'body.messages' (the chat to answer)");
    check_messages(body["messages"], "body.messages");
    r.messages = body["messages"];
  } else {
    r.format = ResponseFormat::OpenAIBatchCompletion;
    if (!f.has("prompt")) fail("body.prompt", "missing 'body.prompt' (text, or a list of token ids)");
    json prompt = body["prompt"];
    // A list of one prompt is that prompt; more than one would be several requests in one line.
    if (prompt.is_array() && prompt.size() == 1 && (prompt[0].is_string() || prompt[0].is_array()))
      prompt = json(prompt[0]);
    if (prompt.is_string()) {
      r.kind = RequestKind::Completion;
      r.prompt_text = prompt.get<std::string>();
      if (r.prompt_text.empty()) fail("body.prompt", "'body.prompt' is empty; give some text");
    } else if (prompt.is_array() && !prompt.empty() && (prompt[0].is_string() || prompt[0].is_array())) {
      fail("body.prompt", "'body.prompt' holds " + std::to_string(prompt.size()) +
                              " prompts; dilu takes one prompt per line: write one line per prompt");
    } else if (prompt.is_array()) {
      r.kind = RequestKind::TokenIds;
      r.prompt_token_ids = token_ids(prompt, "body.prompt", limits.vocab_size);
      if (r.prompt_token_ids.empty()) fail("body.prompt", "'body.prompt' is empty; a prompt needs at least one token");
    } else {
      fail("body.prompt", "'body.prompt' must be a string or a list of token ids, got " + brief(prompt));
    }
  }
  r.sampling = read_sampling(f, d, limits);
  if (f.has("best_of") && f.integer("best_of", 1, INT64_MAX, ">= 1") != r.sampling.n)
    fail("body.best_of",
         "'body.best_of' different from 'n' (keeping the best of several samples) is not supported; "
         "leave it out");
  return r;
}

}  // namespace

RequestError request_error(const Request& r, std::string field, const std::string& what) {
  return RequestError{r.line, r.id, "line " + std::to_string(r.line) + ": " + what, r.format, std::move(field)};
}

RequestLimits request_limits(const ModelConfig& model, const RunConfig& run) {
  RequestLimits l;
  l.vocab_size = model.vocab_size;
  l.max_seq_len = run.model.max_seq_len > 0 ? run.model.max_seq_len : model.max_position_embeddings;
  l.defaults.temperature = run.sampling.temperature;
  l.defaults.top_p = run.sampling.top_p;
  l.defaults.top_k = std::max(0, run.sampling.top_k);
  l.defaults.max_tokens = run.sampling.max_tokens;
  return l;
}

uint64_t request_seed(const Request& r, uint64_t run_seed) {
  return r.sampling.seed ? *r.sampling.seed : derive_seed(run_seed, r.id.dump());
}

std::variant<Request, RequestError> parse_request(const std::string& text, int64_t line, const RequestLimits& limits) {
  const std::string where = "line " + std::to_string(line) + ": ";
  // Before the line parses, a "custom_id" in its text is the best guess that it is a Batch line.
  ResponseFormat format =
      text.find("\"custom_id\"") != std::string::npos ? ResponseFormat::OpenAIBatchChat : ResponseFormat::Dilu;
  if (nesting_depth(text) > kMaxDepth)
    return RequestError{line, nullptr,
                        where + "not valid JSON: nested deeper than " + std::to_string(kMaxDepth) + " levels", format,
                        ""};
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    return RequestError{line, nullptr, where + json_error_message(e), format, ""};
  }
  if (!j.is_object())
    return RequestError{line, nullptr, where + "expected a JSON object per line, got " + brief(j), format, ""};
  const bool batch = j.contains("custom_id") || j.contains("body") || j.contains("url") || j.contains("method");
  format = batch ? (j.value("url", json()) == "/v1/completions" ? ResponseFormat::OpenAIBatchCompletion
                                                                : ResponseFormat::OpenAIBatchChat)
                 : ResponseFormat::Dilu;
  const char* id_key = batch ? "custom_id" : "id";
  const json id = j.contains(id_key) && (j[id_key].is_string() || j[id_key].is_number_integer()) ? j[id_key] : json();
  try {
    Request r = batch ? parse_batch_line(j, line, limits) : parse_dilu_line(j, line, limits);
    if (r.kind == RequestKind::TokenIds && static_cast<int64_t>(r.prompt_token_ids.size()) > limits.max_seq_len)
      fail(batch ? "body.prompt" : "prompt_token_ids",
           quoted(batch ? "body.prompt" : "prompt_token_ids") + " holds " + std::to_string(r.prompt_token_ids.size()) +
               " tokens, more than model.max_seq_len = " + std::to_string(limits.max_seq_len) +
               "; shorten it or raise model.max_seq_len");
    return r;
  } catch (const LineError& e) {
    return RequestError{line, id, where + e.message, format, e.field};
  }
}

}  // namespace dilu
