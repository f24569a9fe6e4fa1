// Input-line parsing: good lines become requests; every bad line becomes an error record whose
// message starts with its line number; output record shapes.
#include "engine/request.h"

#include <gtest/gtest.h>

namespace dilu {
namespace {

using nlohmann::json;

RequestLimits limits() {
  RequestLimits l;
  l.vocab_size = 256;
  l.max_seq_len = 16;
  l.default_max_tokens = 5;
  l.default_temperature = 0.0;
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

TEST(ParseRequest, GoodLines) {
  Request a = parse_ok(R"({"id": "req-1", "prompt_token_ids": [0, 5, 255], "max_tokens": 3})", 4);
  EXPECT_EQ(a.line, 4);
  EXPECT_EQ(a.id, json("req-1"));
  EXPECT_EQ(a.prompt, (std::vector<int32_t>{0, 5, 255}));
  EXPECT_EQ(a.max_tokens, 3);
  EXPECT_FALSE(a.ignore_eos);

  Request b = parse_ok(R"({"id": 17, "prompt_token_ids": [9], "ignore_eos": true, "temperature": 0, "top_p": 1.0,
                           "top_k": 0, "seed": 3})");
  EXPECT_EQ(b.id, json(17));
  EXPECT_TRUE(b.id.is_number_integer());
  EXPECT_EQ(b.max_tokens, 5) << "default from the run config";
  EXPECT_TRUE(b.ignore_eos);

  Request c = parse_ok(R"({"id": 0, "prompt_token_ids": [1], "max_tokens": 0})");
  EXPECT_EQ(c.max_tokens, 0);
  // A prompt of exactly max_seq_len tokens is allowed.
  Request d = parse_ok(R"({"id": 1, "prompt_token_ids": [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]})");
  EXPECT_EQ(d.prompt.size(), 16u);
}

struct BadLine {
  const char* what;
  std::string text;
  std::string words;  // must appear in the message
};

TEST(ParseRequest, BadLinesBecomeErrorsNamingTheLine) {
  const std::vector<BadLine> cases = {
      {"invalid JSON", R"({"id": 1, "prompt_token_ids": [1, 2)", "not valid JSON"},
      {"trailing garbage", R"({"id": 1, "prompt_token_ids": [1]} x)", "not valid JSON"},
      {"non-object", R"([1, 2, 3])", "JSON object"},
      {"string line", R"("hello")", "JSON object"},
      {"missing id", R"({"prompt_token_ids": [1]})", "'id'"},
      {"id float", R"({"id": 1.5, "prompt_token_ids": [1]})", "'id'"},
      {"id object", R"({"id": {"a": 1}, "prompt_token_ids": [1]})", "'id'"},
      {"missing prompt", R"({"id": 1})", "'prompt_token_ids'"},
      {"prompt not a list", R"({"id": 1, "prompt_token_ids": 5})", "'prompt_token_ids'"},
      {"empty prompt", R"({"id": 1, "prompt_token_ids": []})", "empty"},
      {"token past vocab", R"({"id": 1, "prompt_token_ids": [1, 256]})", "256"},
      {"negative token", R"({"id": 1, "prompt_token_ids": [-1]})", "vocabulary"},
      {"token a string", R"({"id": 1, "prompt_token_ids": [1, "2"]})", "'prompt_token_ids'[1]"},
      {"token fractional", R"({"id": 1, "prompt_token_ids": [1.5]})", "not an integer"},
      {"prompt too long", R"({"id": 1, "prompt_token_ids": [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17]})",
       "max_seq_len"},
      {"max_tokens negative", R"({"id": 1, "prompt_token_ids": [1], "max_tokens": -1})", "'max_tokens'"},
      {"max_tokens fractional", R"({"id": 1, "prompt_token_ids": [1], "max_tokens": 2.5})", "'max_tokens'"},
      {"max_tokens string", R"({"id": 1, "prompt_token_ids": [1], "max_tokens": "4"})", "'max_tokens'"},
      {"temperature > 0", R"({"id": 1, "prompt_token_ids": [1], "temperature": 0.7})", "'temperature'"},
      {"temperature < 0", R"({"id": 1, "prompt_token_ids": [1], "temperature": -1})", "'temperature'"},
      {"ignore_eos string", R"({"id": 1, "prompt_token_ids": [1], "ignore_eos": "yes"})", "'ignore_eos'"},
      {"unknown field", R"({"id": 1, "prompt_token_ids": [1], "max_token": 4})", "'max_token'"},
      {"text prompt", R"({"id": 1, "prompt": "Hello"})", "tokenizer"},
      {"chat messages", R"({"id": 1, "messages": [{"role": "user", "content": "hi"}]})", "tokenizer"},
  };
  for (const BadLine& c : cases) {
    SCOPED_TRACE(c.what);
    const RequestError e = parse_bad(c.text, 42);
    EXPECT_EQ(e.line, 42);
    EXPECT_EQ(e.message.rfind("line 42: ", 0), 0u) << e.message;
    EXPECT_NE(e.message.find(c.words), std::string::npos) << e.message;
  }
}

TEST(ParseRequest, FieldsNotImplementedYetAreAcceptedOnlyAtTheirNeutralValue) {
  const Request r = parse_ok(R"({"id": 1, "prompt_token_ids": [1], "n": 1, "stop": [], "logprobs": false,
                                 "top_logprobs": 0})");
  EXPECT_EQ(r.prompt.size(), 1u);
  const std::vector<std::pair<std::string, json>> cases = {
      {"n", 2}, {"stop", json::array({"end"})}, {"logprobs", true}, {"top_logprobs", 5}};
  for (const auto& [key, value] : cases) {
    SCOPED_TRACE(key);
    json line = {{"id", 1}, {"prompt_token_ids", {1}}};
    line[key] = value;
    const RequestError e = parse_bad(line.dump(), 6);
    EXPECT_EQ(e.message.rfind("line 6: ", 0), 0u) << e.message;
    EXPECT_NE(e.message.find("'" + key + "'"), std::string::npos) << e.message;
  }
}

TEST(ParseRequest, ErrorKeepsTheIdWhenThereIsOne) {
  EXPECT_EQ(parse_bad(R"({"id": "x7", "prompt_token_ids": []})", 3).id, json("x7"));
  EXPECT_EQ(parse_bad(R"({"id": 9, "prompt_token_ids": [999]})", 3).id, json(9));
  EXPECT_TRUE(parse_bad(R"({"prompt_token_ids": [1]})", 3).id.is_null());
  EXPECT_TRUE(parse_bad("{oops", 3).id.is_null());
  EXPECT_TRUE(parse_bad("[1]", 3).id.is_null());
}

TEST(ParseRequest, RunDefaultTemperatureAboveZeroIsRefused) {
  RequestLimits l = limits();
  l.default_temperature = 0.6;
  const RequestError e = parse_bad(R"({"id": 1, "prompt_token_ids": [1]})", 2, l);
  EXPECT_NE(e.message.find("temperature"), std::string::npos) << e.message;
  // A request may still ask for greedy decoding itself.
  EXPECT_EQ(parse_ok(R"({"id": 1, "prompt_token_ids": [1], "temperature": 0})", 2, l).prompt.size(), 1u);
}

TEST(RequestLimits, MaxSeqLenFallsBackToTheModel) {
  ModelConfig m;
  m.vocab_size = 300;
  m.max_position_embeddings = 4096;
  RunConfig run;
  run.sampling.max_tokens = 12;
  RequestLimits l = request_limits(m, run);
  EXPECT_EQ(l.vocab_size, 300);
  EXPECT_EQ(l.max_seq_len, 4096);
  EXPECT_EQ(l.default_max_tokens, 12);
  run.model.max_seq_len = 64;
  EXPECT_EQ(request_limits(m, run).max_seq_len, 64);
}

TEST(Records, CompletionAndErrorShapes) {
  Request r = parse_ok(R"({"id": "a", "prompt_token_ids": [1, 2, 3]})");
  const json c = completion_record(r, {7, 8}, "length", true);
  EXPECT_EQ(c, json::parse(R"({"id": "a", "token_ids": [7, 8], "finish_reason": "length",
                               "usage": {"prompt_tokens": 3, "completion_tokens": 2}})"));
  const json no_ids = completion_record(r, {7, 8}, "stop", false);
  EXPECT_FALSE(no_ids.contains("token_ids"));
  EXPECT_EQ(no_ids["finish_reason"], "stop");
  EXPECT_EQ(no_ids["usage"]["completion_tokens"], 2);

  const RequestError e = parse_bad(R"({"id": 5, "prompt_token_ids": []})", 11);
  const json er = error_record(e);
  EXPECT_EQ(er["id"], 5);
  ASSERT_TRUE(er["error"].is_object());
  EXPECT_EQ(er["error"]["line"], 11);
  EXPECT_EQ(er["error"]["message"], e.message);
  EXPECT_EQ(er.size(), 2u);
}

}  // namespace
}  // namespace dilu
