// Output records (see output_record.h). Field names and nesting follow vLLM's
// entrypoints/openai/protocol.py and run_batch.py so that tools reading `vllm run-batch` files read ours.
#include "engine/output_record.h"

#include <cmath>
#include <cstdio>
#include <ctime>

namespace dilu {

using json = nlohmann::json;

namespace {

double finite_logprob(float x) { return std::isfinite(x) ? static_cast<double>(x) : -9999.0; }

// 24 hex digits from the run nonce, the line and what the id names: unique per line in a run.
std::string unique_hex(const RecordContext& ctx, int64_t line, const char* what) {
  const std::string key = std::string(what) + ":" + std::to_string(line);
  const uint64_t a = derive_seed(ctx.run_nonce, key);
  const uint64_t b = derive_seed(ctx.run_nonce ^ 0x5bd1e995ULL, key);
  char buf[25];
  std::snprintf(buf, sizeof buf, "%016llx%08llx", static_cast<unsigned long long>(a),
                static_cast<unsigned long long>(b >> 32));
  return buf;
}

int64_t created_time(const RecordContext& ctx) {
  return ctx.created != 0 ? ctx.created : static_cast<int64_t>(std::time(nullptr));
}

json bytes_of(const std::string& text) {
  json out = json::array();
  for (const char c : text) out.push_back(static_cast<unsigned char>(c));
  return out;
}

// Unicode characters in UTF-8 text (what Python's len() counts, for text_offset).
int64_t char_count(const std::string& text) {
  int64_t n = 0;
  for (const char c : text) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80 ? 1 : 0;
  return n;
}

int64_t completion_tokens(const std::vector<SampleOutput>& samples) {
  int64_t n = 0;
  for (const SampleOutput& s : samples) n += static_cast<int64_t>(s.token_ids.size());
  return n;
}

json dilu_logprobs(const SampleOutput& s) {
  json out = json::array();
  for (const PositionLogprobs& p : s.logprobs) {
    json top = json::array();
    for (const TokenLogprob& t : p.top)
      top.push_back({{"token_id", t.token}, {"token", t.text}, {"logprob", finite_logprob(t.logprob)}});
    out.push_back({{"token_id", p.chosen.token},
                   {"token", p.chosen.text},
                   {"logprob", finite_logprob(p.chosen.logprob)},
                   {"top_logprobs", std::move(top)}});
  }
  return out;
}

// The per-sample fields of a dilu record.
void add_dilu_sample(json& out, const Request& r, const SampleOutput& s, const RecordContext& ctx) {
  out["text"] = s.text;
  if (ctx.with_token_ids) out["token_ids"] = s.token_ids;
  out["finish_reason"] = s.finish_reason;
  if (!s.stop_reason.is_null()) out["stop_reason"] = s.stop_reason;
  if (s.reasoning_content) out["reasoning_content"] = *s.reasoning_content;
  if (r.sampling.logprobs) out["logprobs"] = dilu_logprobs(s);
}

json dilu_record(const Request& r, const std::vector<SampleOutput>& samples, int64_t prompt_tokens,
                 const RecordContext& ctx) {
  json out;
  out["id"] = r.id;
  if (samples.size() == 1) {
    add_dilu_sample(out, r, samples[0], ctx);
  } else {
    json choices = json::array();
    for (size_t i = 0; i < samples.size(); ++i) {
      json c;
      c["index"] = i;
      add_dilu_sample(c, r, samples[i], ctx);
      choices.push_back(std::move(c));
    }
    out["choices"] = std::move(choices);
  }
  out["usage"] = {{"prompt_tokens", prompt_tokens}, {"completion_tokens", completion_tokens(samples)}};
  return out;
}

// ChatCompletionLogProbs: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}.
json chat_logprobs(const SampleOutput& s) {
  json content = json::array();
  for (const PositionLogprobs& p : s.logprobs) {
    json top = json::array();
    for (const TokenLogprob& t : p.top)
      top.push_back({{"token", t.text}, {"logprob", finite_logprob(t.logprob)}, {"bytes", bytes_of(t.text)}});
    content.push_back({{"token", p.chosen.text},
                       {"logprob", finite_logprob(p.chosen.logprob)},
                       {"bytes", bytes_of(p.chosen.text)},
                       {"top_logprobs", std::move(top)}});
  }
  return {{"content", std::move(content)}};
}

// CompletionLogProbs: parallel lists; top_logprobs maps token text to logprob and, as OpenAI
// documents, always holds the sampled token too (so up to top_logprobs + 1 entries).
json completion_logprobs(const SampleOutput& s) {
  json tokens = json::array(), token_logprobs = json::array(), top = json::array(), offsets = json::array();
  int64_t offset = 0;
  for (const PositionLogprobs& p : s.logprobs) {
    tokens.push_back(p.chosen.text);
    token_logprobs.push_back(finite_logprob(p.chosen.logprob));
    json step = json::object();
    for (const TokenLogprob& t : p.top) step[t.text] = finite_logprob(t.logprob);
    step[p.chosen.text] = finite_logprob(p.chosen.logprob);
    top.push_back(std::move(step));
    offsets.push_back(offset);
    offset += char_count(p.chosen.text);
  }
  return {{"text_offset", std::move(offsets)},
          {"token_logprobs", std::move(token_logprobs)},
          {"tokens", std::move(tokens)},
          {"top_logprobs", std::move(top)}};
}

json batch_record(const Request& r, const std::vector<SampleOutput>& samples, int64_t prompt_tokens,
                  const RecordContext& ctx) {
  const bool chat = r.format == ResponseFormat::OpenAIBatchChat;
  json choices = json::array();
  for (size_t i = 0; i < samples.size(); ++i) {
    const SampleOutput& s = samples[i];
    json c;
    c["index"] = i;
    if (chat) {
      json message = {{"role", "assistant"}, {"content", s.text}};
      if (s.reasoning_content) message["reasoning_content"] = *s.reasoning_content;
      c["message"] = std::move(message);
      c["logprobs"] = r.sampling.logprobs ? chat_logprobs(s) : json();
    } else {
      c["text"] = s.text;
      if (s.reasoning_content) c["reasoning_content"] = *s.reasoning_content;
      c["logprobs"] = r.sampling.logprobs ? completion_logprobs(s) : json();
    }
    c["finish_reason"] = s.finish_reason;
    c["stop_reason"] = s.stop_reason;
    if (ctx.with_token_ids) c["token_ids"] = s.token_ids;
    choices.push_back(std::move(c));
  }
  const int64_t generated = completion_tokens(samples);
  json body = {
      {"id", (chat ? "chatcmpl-" : "cmpl-") + unique_hex(ctx, r.line, "body")},
      {"object", chat ? "chat.completion" : "text_completion"},
      {"created", created_time(ctx)},
      {"model", ctx.model_name},
      {"choices", std::move(choices)},
      {"usage",
       {{"prompt_tokens", prompt_tokens},
        {"completion_tokens", generated},
        {"total_tokens", prompt_tokens + generated}}},
  };
  return {{"id", "batch_req_" + unique_hex(ctx, r.line, "batch_req")},
          {"custom_id", r.id},
          {"response",
           {{"status_code", 200}, {"request_id", "req_" + unique_hex(ctx, r.line, "req")}, {"body", std::move(body)}}},
          {"error", nullptr}};
}

}  // namespace

json output_record(const Request& r, const std::vector<SampleOutput>& samples, int64_t prompt_tokens,
                   const RecordContext& ctx) {
  return is_openai_batch(r.format) ? batch_record(r, samples, prompt_tokens, ctx)
                                   : dilu_record(r, samples, prompt_tokens, ctx);
}

json error_record(const RequestError& e, const RecordContext& ctx) {
  if (!is_openai_batch(e.format)) return json{{"id", e.id}, {"error", {{"message", e.message}, {"line", e.line}}}};
  return {
      {"id", "batch_req_" + unique_hex(ctx, e.line, "batch_req")},
      {"custom_id", e.id},
      {"response", {{"status_code", 400}, {"request_id", "req_" + unique_hex(ctx, e.line, "req")}, {"body", nullptr}}},
      {"error",
       {{"code", "invalid_request"},
        {"message", e.message},
        {"param", e.field.empty() ? json() : json(e.field)},
        {"line", e.line}}}};
}

}  // namespace dilu
