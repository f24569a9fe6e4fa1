// Input-line parsing: every line format (dilu prompt / messages / token ids, OpenAI Batch chat and
// completions) becomes a typed request; every bad line becomes an error naming its line and field.
#include "engine/request.h"

#include <gtest/gtest.h>

namespace dilu {
namespace {

using nlohmann::json;

RequestLimits limits() {
  RequestLimits l;
  l.vocab_size = 256;
  l.max_seq_len = 16;
  l.defaults.temperature = 0.0;
  l.defaults.max_tokens = 5;
  return l;
}

Request parse_ok(const std::string& text, int64_t line = 1, const RequestLimits& l = limits()) {
  auto r = parse_request(text, line, l);
  if (auto* e = std::get_if<RequestError>(&r)) {
    ADD_FAILURE() << "unexpected error: " << e->message;
    return {};
  }
  return std::get<Request>(r);
}

RequestError parse_bad(const std::string& text, int64_t line, const RequestLimits& l = limits()) {
  auto r = parse_request(text, line, l);
  if (!std::holds_alternative<RequestError>(r)) {
    ADD_FAILURE() << "expected an error for: " << text;
    return {};
  }
  return std::get<RequestError>(r);
}

TEST(ParseRequest, TokenIdLines) {
  Request a = parse_ok(R"({"id": "req-1", "prompt_token_ids": [0, 5, 255], "max_tokens": 3})", 4);
  EXPECT_EQ(a.line, 4);
  EXPECT_EQ(a.id, json("req-1"));
  EXPECT_EQ(a.kind, RequestKind::TokenIds);
  EXPECT_EQ(a.format, ResponseFormat::Dilu);
  EXPECT_EQ(a.prompt_token_ids, (std::vector<int32_t>{0, 5, 255}));
  EXPECT_EQ(a.sampling.max_tokens, 3);
  EXPECT_FALSE(a.sampling.ignore_eos);

  Request b = parse_ok(R"({"id": 17, "prompt_token_ids": [9], "ignore_eos": true})");
  EXPECT_TRUE(b.id.is_number_integer());
  EXPECT_EQ(b.sampling.max_tokens, 5) << "default from the run config";
  EXPECT_EQ(b.sampling.temperature, 0.0) << "default from the run config";
  EXPECT_TRUE(b.sampling.ignore_eos);

  EXPECT_EQ(parse_ok(R"({"id": 0, "prompt_token_ids": [1], "max_tokens": 0})").sampling.max_tokens, 0);
  // A prompt of exactly max_seq_len tokens is allowed.
  EXPECT_EQ(
      parse_ok(R"({"id": 1, "prompt_token_ids": [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]})").prompt_token_ids.size(),
      16u);
}

TEST(ParseRequest, TextAndChatLinesAreKeptUntokenized) {
  Request p = parse_ok(R"({"id": "p", "prompt": "Hello, 世界"})");
  EXPECT_EQ(p.kind, RequestKind::Completion);
  EXPECT_EQ(p.prompt_text, "Hello, 世界");
  EXPECT_TRUE(p.prompt_token_ids.empty());

  const json messages = json::parse(R"([{"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]},
      {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "content": "42", "tool_call_id": "c1"},
      {"role": "user", "content": ""}])");
  Request c = parse_ok(json{{"id", "c"}, {"messages", messages}}.dump());
  EXPECT_EQ(c.kind, RequestKind::Chat);
  EXPECT_EQ(c.messages, messages) << "kept as given for the chat template";
}

TEST(ParseRequest, EverySamplingField) {
  Request r = parse_ok(R"({"id": "s", "prompt": "x", "max_tokens": 7, "temperature": 0.6, "top_p": 0.95, "top_k": 40,
      "min_p": 0.05, "seed": 1234, "stop": ["\n\n", "END"], "stop_token_ids": [1, 2], "ignore_eos": false, "n": 3,
      "logprobs": true, "top_logprobs": 5, "include_stop_str_in_output": true})");
  SamplingParams want;
  want.max_tokens = 7;
  want.temperature = 0.6;
  want.top_p = 0.95;
  want.top_k = 40;
  want.min_p = 0.05;
  want.seed = 1234;
  want.stop = {"\n\n", "END"};
  want.stop_token_ids = {1, 2};
  want.n = 3;
  want.logprobs = true;
  want.top_logprobs = 5;
  want.include_stop_str_in_output = true;
  EXPECT_EQ(r.sampling, want);

  // A single stop string, top_k -1 (off), a negative seed (mod 2^64), nulls as absent.
  Request s = parse_ok(R"({"id": "t", "prompt": "x", "stop": "###", "top_k": -1, "seed": -1, "temperature": null,
                           "n": null, "max_tokens": null})");
  EXPECT_EQ(s.sampling.stop, std::vector<std::string>{"###"});
  EXPECT_EQ(s.sampling.top_k, 0);
  EXPECT_EQ(s.sampling.seed, UINT64_MAX);
  EXPECT_EQ(s.sampling.temperature, 0.0);
  EXPECT_EQ(s.sampling.n, 1);
  EXPECT_EQ(s.sampling.max_tokens, 5);
  EXPECT_FALSE(s.sampling.seed == std::nullopt);
  EXPECT_EQ(parse_ok(R"({"id": 1, "prompt": "x"})").sampling.seed, std::nullopt);

  // vLLM's integer logprobs (the number of top tokens) are accepted in dilu lines too.
  Request l = parse_ok(R"({"id": "l", "prompt": "x", "logprobs": 3})");
  EXPECT_TRUE(l.sampling.logprobs);
  EXPECT_EQ(l.sampling.top_logprobs, 3);
  EXPECT_FALSE(parse_ok(R"({"id": "l", "prompt": "x", "logprobs": false, "top_logprobs": 0})").sampling.logprobs);
}

TEST(ParseRequest, OpenAIBatchChat) {
  Request r = parse_ok(R"({"custom_id": "req-9", "method": "POST", "url": "/v1/chat/completions",
      "body": {"model": "deepseek-ai/DeepSeek-R1", "messages": [{"role": "user", "content": "2+2?"}],
               "max_tokens": 100, "max_completion_tokens": 50, "temperature": 0.7, "logprobs": true, "top_logprobs": 2,
               "user": "me", "stream": false, "frequency_penalty": 0, "presence_penalty": 0.0, "n": 2, "seed": 5,
               "response_format": {"type": "text"}, "tool_choice": "none", "tools": [], "logit_bias": {},
               "metadata": {"k": "v"}, "stop": null}})",
                       3);
  EXPECT_EQ(r.format, ResponseFormat::OpenAIBatchChat);
  EXPECT_EQ(r.kind, RequestKind::Chat);
  EXPECT_EQ(r.id, json("req-9"));
  EXPECT_EQ(r.messages, json::parse(R"([{"role": "user", "content": "2+2?"}])"));
  EXPECT_EQ(r.sampling.max_tokens, 50) << "max_completion_tokens wins over the deprecated max_tokens";
  EXPECT_EQ(r.sampling.temperature, 0.7);
  EXPECT_TRUE(r.sampling.logprobs);
  EXPECT_EQ(r.sampling.top_logprobs, 2);
  EXPECT_EQ(r.sampling.n, 2);
  EXPECT_EQ(r.sampling.seed, 5u);
  EXPECT_EQ(parse_ok(R"({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 9}})")
                .sampling.max_tokens,
            9);
}

TEST(ParseRequest, OpenAIBatchCompletions) {
  auto line = [](const std::string& body) {
    return R"({"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": )" + body + "}";
  };
  Request text = parse_ok(line(R"({"model": "m", "prompt": "Once upon", "logprobs": 2, "echo": false, "best_of": 1})"));
  EXPECT_EQ(text.format, ResponseFormat::OpenAIBatchCompletion);
  EXPECT_EQ(text.kind, RequestKind::Completion);
  EXPECT_EQ(text.prompt_text, "Once upon");
  EXPECT_TRUE(text.sampling.logprobs);
  EXPECT_EQ(text.sampling.top_logprobs, 2);

  Request ids = parse_ok(line(R"({"prompt": [3, 4, 5]})"));
  EXPECT_EQ(ids.kind, RequestKind::TokenIds);
  EXPECT_EQ(ids.prompt_token_ids, (std::vector<int32_t>{3, 4, 5}));
  // A list holding one prompt is that prompt.
  EXPECT_EQ(parse_ok(line(R"({"prompt": ["only one"]})")).prompt_text, "only one");
  EXPECT_EQ(parse_ok(line(R"({"prompt": [[7, 8]]})")).prompt_token_ids, (std::vector<int32_t>{7, 8}));
  EXPECT_FALSE(parse_ok(line(R"({"prompt": "x"})")).sampling.logprobs);
}

struct BadLine {
  const char* what;
  std::string text;
  std::string field;  // RequestError::field
  std::string words;  // must appear in the message
};

const std::string kChat =
    R"({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}], )";
const std::string kCompl =
    R"({"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi", )";

std::vector<BadLine> bad_lines() {
  return {
      {"invalid JSON", R"({"id": 1, "prompt_token_ids": [1, 2)", "", "not valid JSON"},
      {"trailing garbage", R"({"id": 1, "prompt_token_ids": [1]} x)", "", "not valid JSON"},
      {"lone surrogate", R"({"id": 1, "prompt": "a\ud800b"})", "", "lone UTF-16 surrogate"},
      {"lone low surrogate", R"({"id": 1, "prompt": "\udc00"})", "", "surrogate"},
      {"invalid UTF-8", "{\"id\": 1, \"prompt\": \"a\xff\"}", "", "UTF-8"},
      {"number overflow", R"({"id": 1, "prompt": "x", "temperature": 1e400})", "", "not valid JSON"},
      {"too deep", std::string(100, '[') + std::string(100, ']'), "", "nested deeper"},
      {"non-object", R"([1, 2, 3])", "", "JSON object"},
      {"string line", R"("hello")", "", "JSON object"},
      {"missing id", R"({"prompt_token_ids": [1]})", "id", "'id'"},
      {"id float", R"({"id": 1.5, "prompt_token_ids": [1]})", "id", "'id'"},
      {"id object", R"({"id": {"a": 1}, "prompt_token_ids": [1]})", "id", "'id'"},
      {"missing prompt", R"({"id": 1})", "prompt", "'prompt_token_ids'"},
      {"two prompts", R"({"id": 1, "prompt": "a", "messages": [{"role": "user", "content": "b"}]})", "prompt",
       "only one"},
      {"prompt not a list", R"({"id": 1, "prompt_token_ids": 5})", "prompt_token_ids", "'prompt_token_ids'"},
      {"empty token prompt", R"({"id": 1, "prompt_token_ids": []})", "prompt_token_ids", "empty"},
      {"empty text prompt", R"({"id": 1, "prompt": ""})", "prompt", "empty"},
      {"prompt a number", R"({"id": 1, "prompt": 5})", "prompt", "'prompt' must be a string"},
      {"token past vocab", R"({"id": 1, "prompt_token_ids": [1, 256]})", "prompt_token_ids", "256"},
      {"negative token", R"({"id": 1, "prompt_token_ids": [-1]})", "prompt_token_ids", "vocabulary"},
      {"huge token", R"({"id": 1, "prompt_token_ids": [18446744073709551615]})", "prompt_token_ids", "vocabulary"},
      {"token a string", R"({"id": 1, "prompt_token_ids": [1, "2"]})", "prompt_token_ids", "'prompt_token_ids'[1]"},
      {"token fractional", R"({"id": 1, "prompt_token_ids": [1.5]})", "prompt_token_ids", "not an integer"},
      {"prompt too long", R"({"id": 1, "prompt_token_ids": [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17]})",
       "prompt_token_ids", "max_seq_len"},
      {"max_tokens negative", R"({"id": 1, "prompt": "x", "max_tokens": -1})", "max_tokens", "'max_tokens'"},
      {"max_tokens fractional", R"({"id": 1, "prompt": "x", "max_tokens": 2.5})", "max_tokens", "'max_tokens'"},
      {"max_tokens string", R"({"id": 1, "prompt": "x", "max_tokens": "4"})", "max_tokens", "'max_tokens'"},
      {"temperature < 0", R"({"id": 1, "prompt": "x", "temperature": -1})", "temperature", "'temperature'"},
      {"temperature string", R"({"id": 1, "prompt": "x", "temperature": "hot"})", "temperature", "'temperature'"},
      {"top_p 0", R"({"id": 1, "prompt": "x", "top_p": 0})", "top_p", "(0, 1]"},
      {"top_p > 1", R"({"id": 1, "prompt": "x", "top_p": 1.5})", "top_p", "(0, 1]"},
      {"top_k < -1", R"({"id": 1, "prompt": "x", "top_k": -2})", "top_k", "'top_k'"},
      {"min_p > 1", R"({"id": 1, "prompt": "x", "min_p": 1.5})", "min_p", "[0, 1]"},
      {"min_p < 0", R"({"id": 1, "prompt": "x", "min_p": -0.1})", "min_p", "[0, 1]"},
      {"n 0", R"({"id": 1, "prompt": "x", "n": 0})", "n", "'n' must be >= 1"},
      {"n negative", R"({"id": 1, "prompt": "x", "n": -3})", "n", "'n'"},
      {"seed string", R"({"id": 1, "prompt": "x", "seed": "42"})", "seed", "'seed'"},
      {"stop number", R"({"id": 1, "prompt": "x", "stop": 5})", "stop", "'stop'"},
      {"stop list of numbers", R"({"id": 1, "prompt": "x", "stop": ["a", 5]})", "stop", "'stop'"},
      {"stop empty string", R"({"id": 1, "prompt": "x", "stop": [""]})", "stop", "empty string"},
      {"stop token past vocab", R"({"id": 1, "prompt": "x", "stop_token_ids": [300]})", "stop_token_ids", "vocabulary"},
      {"ignore_eos string", R"({"id": 1, "prompt": "x", "ignore_eos": "yes"})", "ignore_eos", "'ignore_eos'"},
      {"include_stop_str string", R"({"id": 1, "prompt": "x", "include_stop_str_in_output": 1})",
       "include_stop_str_in_output", "'include_stop_str_in_output'"},
      {"top_logprobs > 20", R"({"id": 1, "prompt": "x", "logprobs": true, "top_logprobs": 21})", "top_logprobs",
       "[0, 20]"},
      {"logprobs int > 20", R"({"id": 1, "prompt": "x", "logprobs": 21})", "logprobs", "[0, 20]"},
      {"top_logprobs without logprobs", R"({"id": 1, "prompt": "x", "top_logprobs": 2})", "top_logprobs",
       "'logprobs': true"},
      {"logprobs string", R"({"id": 1, "prompt": "x", "logprobs": "yes"})", "logprobs", "'logprobs'"},
      {"unknown field", R"({"id": 1, "prompt": "x", "max_token": 4})", "max_token", "'max_token'"},
      {"messages not a list", R"({"id": 1, "messages": "hi"})", "messages", "'messages'"},
      {"messages empty", R"({"id": 1, "messages": []})", "messages", "empty"},
      {"message not an object", R"({"id": 1, "messages": ["hi"]})", "messages[0]", "'messages[0]'"},
      {"unknown role", R"({"id": 1, "messages": [{"role": "narrator", "content": "x"}]})", "messages[0].role",
       "narrator"},
      {"missing role", R"({"id": 1, "messages": [{"content": "x"}]})", "messages[0].role", "'messages[0].role'"},
      {"content a number",
       R"({"id": 1, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]})",
       "messages[1].content", "'messages[1].content'"},
      {"content missing", R"({"id": 1, "messages": [{"role": "user"}]})", "messages[0].content", "no \"content\""},
      {"image part",
       R"({"id": 1, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})",
       "messages[0].content[0]", "text only"},
      {"text part without text", R"({"id": 1, "messages": [{"role": "user", "content": [{"type": "text"}]}]})",
       "messages[0].content[0]", "'messages[0].content[0]'"},
      // OpenAI Batch lines.
      {"missing custom_id", R"({"method": "POST", "url": "/v1/chat/completions", "body": {}})", "custom_id",
       "'custom_id'"},
      {"method GET", R"({"custom_id": "b", "method": "GET", "url": "/v1/chat/completions", "body": {}})", "method",
       "POST"},
      {"embeddings url", R"({"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {}})", "url",
       "/v1/embeddings"},
      {"body not an object", R"({"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": "x"})", "body",
       "'body'"},
      {"unknown top-level field",
       R"({"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {}, "x": 1})", "x", "'x'"},
      {"chat without messages", R"({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {}})",
       "body.messages", "'body.messages'"},
      {"chat unknown role",
       R"({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "robot", "content": "x"}]}})",
       "body.messages[0].role", "robot"},
      {"chat unknown body field", kChat + R"("temprature": 0.5}})", "body.temprature", "'body.temprature'"},
      {"chat stream true", kChat + R"("stream": true}})", "body.stream", "'body.stream'"},
      {"chat frequency penalty", kChat + R"("frequency_penalty": 0.5}})", "body.frequency_penalty", "would change"},
      {"chat presence penalty", kChat + R"("presence_penalty": -1}})", "body.presence_penalty", "would change"},
      {"chat logit_bias", kChat + R"("logit_bias": {"50256": -100}}})", "body.logit_bias", "'body.logit_bias'"},
      {"chat tools", kChat + R"("tools": [{"type": "function", "function": {"name": "f"}}]}})", "body.tools",
       "'body.tools'"},
      {"chat json schema", kChat + R"("response_format": {"type": "json_schema", "json_schema": {}}}})",
       "body.response_format", "'body.response_format'"},
      {"chat logprobs int", kChat + R"("logprobs": 3}})", "body.logprobs", "true or false"},
      {"chat top_logprobs > 20", kChat + R"("logprobs": true, "top_logprobs": 25}})", "body.top_logprobs", "[0, 20]"},
      {"chat n 0", kChat + R"("n": 0}})", "body.n", "'body.n'"},
      {"chat top_p 0", kChat + R"("top_p": 0.0}})", "body.top_p", "(0, 1]"},
      {"chat temperature < 0", kChat + R"("temperature": -0.5}})", "body.temperature", "'body.temperature'"},
      {"chat template kwargs", kChat + R"("chat_template_kwargs": {"thinking": true}}})", "body.chat_template_kwargs",
       "would change"},
      {"completions several prompts", kCompl.substr(0, kCompl.find("\"prompt\"")) + R"("prompt": ["a", "b"]}})",
       "body.prompt", "one prompt per line"},
      {"completions several token prompts", kCompl.substr(0, kCompl.find("\"prompt\"")) + R"("prompt": [[1], [2]]}})",
       "body.prompt", "one prompt per line"},
      {"completions empty prompt", kCompl.substr(0, kCompl.find("\"prompt\"")) + R"("prompt": ""}})", "body.prompt",
       "empty"},
      {"completions token past vocab", kCompl.substr(0, kCompl.find("\"prompt\"")) + R"("prompt": [1, 999]}})",
       "body.prompt", "vocabulary"},
      {"completions best_of", kCompl + R"("best_of": 3}})", "body.best_of", "'body.best_of'"},
      {"completions logprobs bool", kCompl + R"("logprobs": true}})", "body.logprobs", "an integer"},
      {"completions top_logprobs", kCompl + R"("top_logprobs": 2}})", "body.top_logprobs", "unknown field"},
      {"completions echo", kCompl + R"("echo": true}})", "body.echo", "'body.echo'"},
      {"completions suffix", kCompl + R"("suffix": "end"}})", "body.suffix", "'body.suffix'"},
  };
}

TEST(ParseRequest, BadLinesBecomeErrorsNamingTheLineAndField) {
  for (const BadLine& c : bad_lines()) {
    SCOPED_TRACE(c.what);
    const RequestError e = parse_bad(c.text, 42);
    EXPECT_EQ(e.line, 42);
    EXPECT_EQ(e.message.rfind("line 42: ", 0), 0u) << e.message;
    EXPECT_NE(e.message.find(c.words), std::string::npos) << e.message;
    EXPECT_EQ(e.field, c.field) << e.message;
    if (!c.field.empty()) {
      EXPECT_NE(e.message.find(c.field), std::string::npos) << "names the field: " << e.message;
    }
  }
}

TEST(ParseRequest, ErrorsKeepTheIdAndTheFormat) {
  EXPECT_EQ(parse_bad(R"({"id": "x7", "prompt_token_ids": []})", 3).id, json("x7"));
  EXPECT_EQ(parse_bad(R"({"id": 9, "prompt_token_ids": [999]})", 3).id, json(9));
  EXPECT_TRUE(parse_bad(R"({"prompt_token_ids": [1]})", 3).id.is_null());
  EXPECT_TRUE(parse_bad("{oops", 3).id.is_null());
  EXPECT_TRUE(parse_bad("[1]", 3).id.is_null());
  EXPECT_EQ(parse_bad("[1]", 3).format, ResponseFormat::Dilu);

  const RequestError b = parse_bad(kChat + R"("stream": true}})", 2);
  EXPECT_EQ(b.format, ResponseFormat::OpenAIBatchChat);
  EXPECT_EQ(b.id, json("b"));
  EXPECT_EQ(parse_bad(kCompl + R"("echo": true}})", 2).format, ResponseFormat::OpenAIBatchCompletion);
  // A broken Batch line is answered in the Batch shape when "custom_id" shows in its text.
  const RequestError broken = parse_bad(R"({"custom_id": "z", "method": "POST", "url")", 2);
  EXPECT_TRUE(is_openai_batch(broken.format));
  EXPECT_TRUE(broken.id.is_null());
}

TEST(ParseRequest, RunDefaultsApplyAndLinesOverrideThem) {
  RequestLimits l = limits();
  l.defaults.temperature = 0.6;
  l.defaults.top_p = 0.9;
  l.defaults.top_k = 20;
  const Request d = parse_ok(R"({"id": 1, "prompt_token_ids": [1]})", 2, l);
  EXPECT_EQ(d.sampling.temperature, 0.6);
  EXPECT_EQ(d.sampling.top_p, 0.9);
  EXPECT_EQ(d.sampling.top_k, 20);
  const Request g = parse_ok(R"({"id": 1, "prompt_token_ids": [1], "temperature": 0, "top_k": 0})", 2, l);
  EXPECT_EQ(g.sampling.temperature, 0.0);
  EXPECT_EQ(g.sampling.top_k, 0);
}

TEST(RequestLimits, FromModelAndRunConfig) {
  ModelConfig m;
  m.vocab_size = 300;
  m.max_position_embeddings = 4096;
  RunConfig run;
  run.sampling.max_tokens = 12;
  run.sampling.temperature = 0.3;
  run.sampling.top_p = 0.8;
  run.sampling.top_k = 7;
  RequestLimits l = request_limits(m, run);
  EXPECT_EQ(l.vocab_size, 300);
  EXPECT_EQ(l.max_seq_len, 4096);
  EXPECT_EQ(l.defaults.max_tokens, 12);
  EXPECT_EQ(l.defaults.temperature, 0.3);
  EXPECT_EQ(l.defaults.top_p, 0.8);
  EXPECT_EQ(l.defaults.top_k, 7);
  EXPECT_EQ(l.defaults.n, 1);
  run.model.max_seq_len = 64;
  EXPECT_EQ(request_limits(m, run).max_seq_len, 64);
}

TEST(RequestSeed, OwnSeedElseDerivedFromRunSeedAndId) {
  const Request seeded = parse_ok(R"({"id": "a", "prompt": "x", "seed": 77})");
  EXPECT_EQ(request_seed(seeded, 1), 77u);
  EXPECT_EQ(request_seed(seeded, 2), 77u);
  const Request a = parse_ok(R"({"id": "a", "prompt": "x"})");
  const Request b = parse_ok(R"({"id": "b", "prompt": "x"})");
  const Request one = parse_ok(R"({"id": 1, "prompt": "x"})");
  const Request one_str = parse_ok(R"({"id": "1", "prompt": "x"})");
  EXPECT_EQ(request_seed(a, 5), request_seed(a, 5));
  EXPECT_NE(request_seed(a, 5), request_seed(b, 5));
  EXPECT_NE(request_seed(a, 5), request_seed(a, 6));
  EXPECT_NE(request_seed(one, 5), request_seed(one_str, 5));
}

TEST(RequestError, FromAParsedRequest) {
  const Request r = parse_ok(kChat + R"("n": 2}})", 8);
  const RequestError e = request_error(r, "body.messages", "prompt of 9000 tokens is too long");
  EXPECT_EQ(e.line, 8);
  EXPECT_EQ(e.id, json("b"));
  EXPECT_EQ(e.format, ResponseFormat::OpenAIBatchChat);
  EXPECT_EQ(e.field, "body.messages");
  EXPECT_EQ(e.message, "line 8: prompt of 9000 tokens is too long");
}

}  // namespace
}  // namespace dilu
