// Output records: golden JSON for dilu lines (one and several samples) and for OpenAI Batch chat
// and completion lines (vLLM run-batch layout), logprobs in each format, and error records.
#include "engine/output_record.h"

#include <gtest/gtest.h>

#include <ctime>
#include <limits>
#include <regex>
#include <set>

namespace dilu {
namespace {

using nlohmann::json;

RequestLimits limits() {
  RequestLimits l;
  l.vocab_size = 1000;
  l.max_seq_len = 64;
  l.defaults.temperature = 0.0;
  l.defaults.max_tokens = 8;
  return l;
}

Request parse_ok(const std::string& text, int64_t line = 1) {
  auto r = parse_request(text, line, limits());
  if (auto* e = std::get_if<RequestError>(&r)) {
    ADD_FAILURE() << "unexpected error: " << e->message;
    return {};
  }
  return std::get<Request>(r);
}

RequestError parse_bad(const std::string& text, int64_t line) {
  auto r = parse_request(text, line, limits());
  if (!std::holds_alternative<RequestError>(r)) {
    ADD_FAILURE() << "expected an error for: " << text;
    return {};
  }
  return std::get<RequestError>(r);
}

RecordContext context(bool with_token_ids = true) {
  RecordContext c;
  c.model_name = "DeepSeek-R1";
  c.created = 1700000000;
  c.run_nonce = 99;
  c.with_token_ids = with_token_ids;
  return c;
}

SampleOutput sample_output(std::vector<int32_t> ids, std::string text, std::string finish, json stop_reason = nullptr) {
  SampleOutput s;
  s.token_ids = std::move(ids);
  s.text = std::move(text);
  s.finish_reason = std::move(finish);
  s.stop_reason = std::move(stop_reason);
  return s;
}

PositionLogprobs position(int32_t token, std::string text, float logprob, std::vector<TokenLogprob> top) {
  return PositionLogprobs{TokenLogprob{token, std::move(text), logprob}, std::move(top)};
}

// Checks the generated ids' shapes, then replaces them so the rest can be compared exactly.
void expect_and_blank_ids(json& record, const std::string& body_prefix) {
  const std::regex hex24("[0-9a-f]{24}");
  ASSERT_TRUE(record["id"].is_string());
  const std::string id = record["id"];
  EXPECT_EQ(id.rfind("batch_req_", 0), 0u) << id;
  EXPECT_TRUE(std::regex_match(id.substr(10), hex24)) << id;
  record["id"] = "ID";
  if (record["response"].is_object()) {
    const std::string rid = record["response"]["request_id"];
    EXPECT_EQ(rid.rfind("req_", 0), 0u) << rid;
    EXPECT_TRUE(std::regex_match(rid.substr(4), hex24)) << rid;
    record["response"]["request_id"] = "RID";
    json& body = record["response"]["body"];
    if (body.is_object()) {
      const std::string bid = body["id"];
      EXPECT_EQ(bid.rfind(body_prefix, 0), 0u) << bid;
      EXPECT_TRUE(std::regex_match(bid.substr(body_prefix.size()), hex24)) << bid;
      body["id"] = "BID";
    }
  }
}

TEST(OutputRecord, DiluOneSample) {
  const Request r = parse_ok(R"({"id": "a", "prompt": "Hi"})");
  EXPECT_EQ(output_record(r, {sample_output({7, 8}, "Hello", "stop")}, 3, context()), json::parse(R"(
      {"id": "a", "text": "Hello", "token_ids": [7, 8], "finish_reason": "stop",
       "usage": {"prompt_tokens": 3, "completion_tokens": 2}})"));

  SampleOutput s = sample_output({7, 8, 9}, "Hello", "stop", "END");
  s.reasoning_content = "The user greets me.";
  EXPECT_EQ(output_record(r, {s}, 3, context(false)), json::parse(R"(
      {"id": "a", "text": "Hello", "finish_reason": "stop", "stop_reason": "END",
       "reasoning_content": "The user greets me.", "usage": {"prompt_tokens": 3, "completion_tokens": 3}})"));
}

TEST(OutputRecord, DiluSeveralSamplesWithLogprobs) {
  const Request r = parse_ok(R"({"id": 5, "prompt_token_ids": [1, 2], "n": 2, "logprobs": true, "top_logprobs": 1})");
  SampleOutput a = sample_output({4}, "x", "length");
  a.logprobs = {position(4, "x", -0.5f, {{4, "x", -0.5f}})};
  SampleOutput b = sample_output({6, 2}, "yz", "stop", 2);
  b.logprobs = {position(6, "yz", -0.25f, {{3, "w", -0.125f}}),
                position(2, "", -std::numeric_limits<float>::infinity(), {{3, "w", -1.0f}})};
  EXPECT_EQ(output_record(r, {a, b}, 2, context()), json::parse(R"(
      {"id": 5,
       "choices": [
         {"index": 0, "text": "x", "token_ids": [4], "finish_reason": "length",
          "logprobs": [{"token_id": 4, "token": "x", "logprob": -0.5,
                        "top_logprobs": [{"token_id": 4, "token": "x", "logprob": -0.5}]}]},
         {"index": 1, "text": "yz", "token_ids": [6, 2], "finish_reason": "stop", "stop_reason": 2,
          "logprobs": [{"token_id": 6, "token": "yz", "logprob": -0.25,
                        "top_logprobs": [{"token_id": 3, "token": "w", "logprob": -0.125}]},
                       {"token_id": 2, "token": "", "logprob": -9999.0,
                        "top_logprobs": [{"token_id": 3, "token": "w", "logprob": -1.0}]}]}],
       "usage": {"prompt_tokens": 2, "completion_tokens": 3}})"));
}

TEST(OutputRecord, OpenAIBatchChatCompletion) {
  const Request r = parse_ok(R"({"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
      "body": {"model": "x", "messages": [{"role": "user", "content": "2+2?"}], "logprobs": true, "top_logprobs": 1}})");
  SampleOutput s = sample_output({19, 1}, "4", "stop");
  s.reasoning_content = "2+2=4";
  s.logprobs = {position(19, "4", -0.25f, {{19, "4", -0.25f}}), position(1, "é", -0.5f, {{1, "é", -0.5f}})};
  json record = output_record(r, {s}, 10, context());
  expect_and_blank_ids(record, "chatcmpl-");
  EXPECT_EQ(record, json::parse(R"(
      {"id": "ID", "custom_id": "req-1",
       "response": {"status_code": 200, "request_id": "RID",
         "body": {"id": "BID", "object": "chat.completion", "created": 1700000000, "model": "DeepSeek-R1",
           "choices": [{"index": 0,
             "message": {"role": "assistant", "content": "4", "reasoning_content": "2+2=4"},
             "logprobs": {"content": [
               {"token": "4", "logprob": -0.25, "bytes": [52], "top_logprobs": [{"token": "4", "logprob": -0.25, "bytes": [52]}]},
               {"token": "é", "logprob": -0.5, "bytes": [195, 169], "top_logprobs": [{"token": "é", "logprob": -0.5, "bytes": [195, 169]}]}]},
             "finish_reason": "stop", "stop_reason": null, "token_ids": [19, 1]}],
           "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}},
       "error": null})"));

  // Without logprobs or token ids: "logprobs": null, no "token_ids"; several choices.
  const Request plain = parse_ok(R"({"custom_id": "req-2", "method": "POST", "url": "/v1/chat/completions",
      "body": {"messages": [{"role": "user", "content": "hi"}], "n": 2}})");
  json two = output_record(plain, {sample_output({5}, "a", "length"), sample_output({6}, "b", "stop", "\n")}, 4,
                           context(false));
  expect_and_blank_ids(two, "chatcmpl-");
  EXPECT_EQ(two["response"]["body"]["choices"], json::parse(R"([
      {"index": 0, "message": {"role": "assistant", "content": "a"}, "logprobs": null, "finish_reason": "length", "stop_reason": null},
      {"index": 1, "message": {"role": "assistant", "content": "b"}, "logprobs": null, "finish_reason": "stop", "stop_reason": "\n"}])"));
  EXPECT_EQ(two["response"]["body"]["usage"],
            json::parse(R"({"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6})"));
}

TEST(OutputRecord, OpenAIBatchTextCompletion) {
  const Request r = parse_ok(R"({"custom_id": "c-1", "method": "POST", "url": "/v1/completions",
      "body": {"model": "x", "prompt": "Once", "logprobs": 1}})");
  SampleOutput s = sample_output({11, 12, 13}, "é t", "length");
  s.logprobs = {position(11, "é", -0.125f, {{10, "e", -0.0625f}}), position(12, " ", -0.5f, {{12, " ", -0.5f}}),
                position(13, "t", -1.0f, {{14, "s", -0.75f}})};
  json record = output_record(r, {s}, 2, context());
  expect_and_blank_ids(record, "cmpl-");
  EXPECT_EQ(record, json::parse(R"(
      {"id": "ID", "custom_id": "c-1",
       "response": {"status_code": 200, "request_id": "RID",
         "body": {"id": "BID", "object": "text_completion", "created": 1700000000, "model": "DeepSeek-R1",
           "choices": [{"index": 0, "text": "é t",
             "logprobs": {"tokens": ["é", " ", "t"], "token_logprobs": [-0.125, -0.5, -1.0],
                          "top_logprobs": [{"e": -0.0625, "é": -0.125}, {" ": -0.5}, {"s": -0.75, "t": -1.0}],
                          "text_offset": [0, 1, 2]},
             "finish_reason": "length", "stop_reason": null, "token_ids": [11, 12, 13]}],
           "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}}},
       "error": null})"));
}

TEST(OutputRecord, BatchIdsAreUniquePerLineAndRun) {
  const std::string line = R"({"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"prompt": "a"}})";
  std::set<std::string> ids;
  for (int64_t n = 1; n <= 1000; ++n) {
    const json rec = output_record(parse_ok(line, n), {sample_output({1}, "b", "length")}, 1, context());
    ids.insert(rec["id"].get<std::string>());
    ids.insert(rec["response"]["request_id"].get<std::string>());
    ids.insert(rec["response"]["body"]["id"].get<std::string>());
  }
  EXPECT_EQ(ids.size(), 3000u);
  const Request r = parse_ok(line, 7);
  const json a = output_record(r, {sample_output({1}, "b", "length")}, 1, context());
  EXPECT_EQ(a, output_record(r, {sample_output({1}, "b", "length")}, 1, context())) << "deterministic";
  RecordContext other = context();
  other.run_nonce = 100;
  EXPECT_NE(a["id"], output_record(r, {sample_output({1}, "b", "length")}, 1, other)["id"]);
  // created 0 means now.
  other.created = 0;
  const auto created = output_record(r, {sample_output({1}, "b", "length")}, 1, other)["response"]["body"]["created"];
  EXPECT_NEAR(created.get<double>(), static_cast<double>(std::time(nullptr)), 5.0);
}

TEST(ErrorRecord, DiluShape) {
  const RequestError e = parse_bad(R"({"id": 5, "prompt_token_ids": []})", 11);
  const json er = error_record(e);
  EXPECT_EQ(er, (json{{"id", 5}, {"error", {{"message", e.message}, {"line", 11}}}}));
  EXPECT_EQ(error_record(parse_bad("{oops", 2))["id"], nullptr);
}

TEST(ErrorRecord, BatchShape) {
  const RequestError e = parse_bad(R"({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
      "body": {"messages": [{"role": "user", "content": "x"}], "stream": true}})",
                                   6);
  json er = error_record(e, context());
  expect_and_blank_ids(er, "");
  EXPECT_EQ(
      er,
      (json{{"id", "ID"},
            {"custom_id", "b"},
            {"response", {{"status_code", 400}, {"request_id", "RID"}, {"body", nullptr}}},
            {"error", {{"code", "invalid_request"}, {"message", e.message}, {"param", "body.stream"}, {"line", 6}}}}));

  json broken = error_record(parse_bad(R"({"custom_id": "b", "method": )", 9), context());
  expect_and_blank_ids(broken, "");
  EXPECT_TRUE(broken["custom_id"].is_null());
  EXPECT_TRUE(broken["error"]["param"].is_null());
  EXPECT_EQ(broken["error"]["line"], 9);
  EXPECT_EQ(broken["response"]["status_code"], 400);
}

TEST(ErrorRecord, EveryBadLineNamesItsLineAndField) {
  const std::string chat = R"({"custom_id": "q", "method": "POST", "url": "/v1/chat/completions", "body": )";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"id": 1, "prompt": "x", "n": 0})", "n"},
      {R"({"id": 1, "prompt": "x", "top_p": 0})", "top_p"},
      {R"({"id": 1, "messages": [{"role": "wizard", "content": "x"}]})", "messages[0].role"},
      {R"({"id": 1, "messages": [{"role": "user", "content": {"a": 1}}]})", "messages[0].content"},
      {chat + R"({"messages": [{"role": "user", "content": "x"}], "n": 0}})", "body.n"},
      {chat + R"({"messages": [{"role": "user", "content": "x"}], "top_p": 2}})", "body.top_p"},
      {chat + R"({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 5}}})", "body.logit_bias"},
      {chat + R"({"messages": [{"role": "user", "content": "x"}], "mystery": 1}})", "body.mystery"},
      {chat + R"({"messages": [{"role": "bot", "content": "x"}]}})", "body.messages[0].role"},
  };
  int64_t line = 100;
  for (const auto& [text, field] : cases) {
    SCOPED_TRACE(text);
    ++line;
    const RequestError e = parse_bad(text, line);
    const json er = error_record(e, context());
    const json& err = er["error"];
    const std::string message = err["message"];
    EXPECT_EQ(message.rfind("line " + std::to_string(line) + ": ", 0), 0u) << message;
    EXPECT_NE(message.find("'" + field + "'"), std::string::npos) << message;
    EXPECT_EQ(err["line"], line);
    if (is_openai_batch(e.format)) {
      EXPECT_EQ(err["param"], field);
      EXPECT_EQ(er["custom_id"], "q");
    } else {
      EXPECT_EQ(er["id"], 1);
    }
  }
}

}  // namespace
}  // namespace dilu
