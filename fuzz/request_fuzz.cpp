// Fuzz target: one input line as `dilu run` reads it, in every format (dilu "prompt", "messages",
// "prompt_token_ids" lines; OpenAI Batch /v1/chat/completions and /v1/completions lines).
//
// What must hold for any bytes:
// - parse_request never throws: a bad line becomes a RequestError whose message starts with
//   "line N: " and the run goes on;
// - the record that answers the line (output_record for a request, error_record for an error)
//   dumps as the writer dumps it and reads back as one JSON object on one line;
// - chat messages that passed the parser either render with every known chat template or are
//   refused with a UserError (never another exception);
// - the request's seed is computable.
#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/chat_template.h"
#include "engine/output_record.h"
#include "engine/request.h"
#include "fuzz/fuzz_util.h"

using namespace dilu;
using json = nlohmann::json;

namespace {

const std::vector<ChatTemplate>& templates() {
  static const std::vector<ChatTemplate> all = [] {
    std::vector<ChatTemplate> t;
    for (const KnownChatTemplate& k : known_chat_templates())
      t.push_back(ChatTemplate::from_template_text(k.text, "<｜begin▁of▁sentence｜>", "fuzz"));
    return t;
  }();
  return all;
}

// What JsonlWriter::write puts in the file, read back.
void check_record(const json& record) {
  const std::string line = record.dump(-1, ' ', false, json::error_handler_t::replace);
  DILU_FUZZ_ASSERT(line.find('\n') == std::string::npos, "a record spans several lines");
  const json back = json::parse(line, nullptr, /*allow_exceptions=*/false);
  DILU_FUZZ_ASSERT(back.is_object(), "a record does not read back as a JSON object: " + line.substr(0, 200));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  // The first byte picks the limits (a small vocabulary and context reach the range checks).
  const uint8_t knobs = data[0];
  RequestLimits limits;
  limits.vocab_size = (knobs & 1) ? 129280 : 64;
  limits.max_seq_len = (knobs & 2) ? 163840 : 8;
  limits.defaults.temperature = (knobs & 4) ? 0.6 : 0.0;
  limits.defaults.max_tokens = 16;
  const std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  const int64_t line_no = 1 + (knobs >> 3);

  std::variant<Request, RequestError> parsed;
  try {
    parsed = parse_request(text, line_no, limits);
  } catch (const std::exception& e) {
    fuzz::bug(std::string("parse_request threw: ") + e.what());
  }
  RecordContext ctx;
  ctx.model_name = "fuzz";
  ctx.created = 1;
  ctx.run_nonce = 42;
  ctx.with_token_ids = (knobs & 8) != 0;

  if (const auto* err = std::get_if<RequestError>(&parsed)) {
    const std::string prefix = "line " + std::to_string(line_no) + ": ";
    DILU_FUZZ_ASSERT(err->message.rfind(prefix, 0) == 0, "error message without its line: " + err->message);
    DILU_FUZZ_ASSERT(err->line == line_no, "error record names another line");
    DILU_FUZZ_ASSERT(err->id.is_null() || err->id.is_string() || err->id.is_number_integer(), "odd id type");
    fuzz::user_errors_only([&] { check_record(error_record(*err, ctx)); });
    return 0;
  }
  const Request& r = std::get<Request>(parsed);
  DILU_FUZZ_ASSERT(r.id.is_string() || r.id.is_number_integer(), "a request without a usable id");
  switch (r.kind) {
    case RequestKind::Completion:
      DILU_FUZZ_ASSERT(!r.prompt_text.empty(), "empty text prompt accepted");
      break;
    case RequestKind::TokenIds:
      DILU_FUZZ_ASSERT(!r.prompt_token_ids.empty(), "empty token prompt accepted");
      DILU_FUZZ_ASSERT(static_cast<int64_t>(r.prompt_token_ids.size()) <= limits.max_seq_len, "prompt too long");
      for (int32_t t : r.prompt_token_ids)
        DILU_FUZZ_ASSERT(t >= 0 && t < limits.vocab_size, "token id outside the vocabulary accepted");
      break;
    case RequestKind::Chat: {
      std::vector<ChatMessage> messages;
      if (fuzz::user_errors_only([&] { messages = parse_messages(r.messages); }))
        for (const ChatTemplate& t : templates())
          fuzz::user_errors_only([&] {
            const std::string prompt = t.render(messages, /*add_generation_prompt=*/true);
            DILU_FUZZ_ASSERT(prompt.rfind(t.bos_token(), 0) == 0, t.name() + ": prompt does not start with BOS");
          });
      break;
    }
  }
  const SamplingParams& s = r.sampling;
  DILU_FUZZ_ASSERT(s.n >= 1 && s.max_tokens >= 0 && s.temperature >= 0, "sampling out of range");
  DILU_FUZZ_ASSERT(s.top_p > 0 && s.top_p <= 1 && s.min_p >= 0 && s.min_p <= 1, "sampling out of range");
  DILU_FUZZ_ASSERT(s.top_logprobs >= 0 && s.top_logprobs <= 20, "top_logprobs out of range");
  (void)request_seed(r, 7);

  // A finished answer, as the run loop would hand it over (a few samples, with logprobs).
  std::vector<SampleOutput> samples(static_cast<size_t>(std::min<int64_t>(s.n, 3)));
  for (size_t i = 0; i < samples.size(); ++i) {
    SampleOutput& o = samples[i];
    o.token_ids = {1, 2, static_cast<int32_t>(i)};
    o.text = i == 0 ? r.prompt_text : "\xff\xfe broken utf-8";
    o.finish_reason = i == 1 ? "stop" : "length";
    o.stop_reason = s.stop.empty() ? json() : json(s.stop.front());
    if (s.logprobs)
      for (int32_t t : o.token_ids)
        o.logprobs.push_back({{t, "\xe4\xb8", -0.5f}, std::vector<TokenLogprob>(static_cast<size_t>(s.top_logprobs),
                                                                                {t, "x", -1e30f})});
  }
  fuzz::user_errors_only([&] { check_record(output_record(r, samples, 3, ctx)); });
  return 0;
}
