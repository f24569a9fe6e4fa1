// Chat templates: dilu's native renderers must equal the real templates rendered by a Jinja engine
// (@huggingface/jinja, via tests/chat_template/render.mjs) byte for byte; plus refusals and message parsing.
#include "engine/chat_template.h"

#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <set>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/test_util.h"

namespace dilu {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using test::expect_user_error;

const char* const kBos = "<｜begin▁of▁sentence｜>";

fs::path chat_template_dir() { return fs::path(DILU_SOURCE_DIR) / "tests" / "chat_template"; }

std::string template_file(const std::string& name) {
  return test::read_bytes(chat_template_dir() / "templates" / (name + ".jinja"));
}

// A tokenizer_config.json as the DeepSeek checkpoints ship it, with `chat_template` as given.
json tokenizer_config(const json& chat_template) {
  return json{{"add_bos_token", true},
              {"bos_token", {{"__type", "AddedToken"}, {"content", kBos}, {"lstrip", false}}},
              {"eos_token", {{"__type", "AddedToken"}, {"content", "<｜end▁of▁sentence｜>"}}},
              {"chat_template", chat_template}};
}

ChatTemplate known(const std::string& name) {
  return ChatTemplate::from_tokenizer_config(tokenizer_config(template_file(name)), "test tokenizer_config.json");
}

// Where two renderings first differ, for a readable failure.
std::string first_difference(const std::string& want, const std::string& got) {
  size_t i = 0;
  while (i < want.size() && i < got.size() && want[i] == got[i]) ++i;
  auto around = [&](const std::string& s) {
    const size_t from = i < 20 ? 0 : i - 20;
    return json(s.substr(from, 60)).dump(-1, ' ', false, json::error_handler_t::replace);
  };
  return "first difference at byte " + std::to_string(i) + ": want " + around(want) + ", got " + around(got);
}

// Runs `command`, returning its standard output and exit status.
std::pair<std::string, int> run(const std::string& command) {
  std::string out;
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return {"", -1};
  char buffer[65536];
  for (size_t n; (n = fread(buffer, 1, sizeof buffer, pipe)) > 0;) out.append(buffer, n);
  const int status = pclose(pipe);
  return {out, WIFEXITED(status) ? WEXITSTATUS(status) : -1};
}

TEST(ChatTemplateReference, EveryConversationRendersAsTheJinjaTemplateDoes) {
  const fs::path dir = chat_template_dir();
  ASSERT_TRUE(fs::is_directory(dir / "node_modules" / "@huggingface" / "jinja"))
      << "The reference renderer is not installed. Run tests/chat_template/install.sh (npm ci in "
      << dir.string() << "; needs node 18+ and npm), then rerun this test.";
  const fs::path stderr_file = test::scratch_dir() / "render.stderr";
  const auto [stdout_text, status] =
      run("node '" + (dir / "render.mjs").string() + "' 2>'" + stderr_file.string() + "'");
  ASSERT_EQ(status, 0) << "node " << (dir / "render.mjs").string() << " failed (status " << status
                       << "; 127 means node is not on PATH):\n" << test::read_bytes(stderr_file);
  const json reference = json::parse(stdout_text);

  std::map<std::string, json> conversations;
  for (const json& c : json::parse(test::read_bytes(dir / "conversations.json"))) conversations[c["id"]] = c;
  ASSERT_GE(conversations.size(), 15u);

  std::map<std::string, ChatTemplate> templates;
  for (const KnownChatTemplate& t : known_chat_templates())
    templates.emplace(std::string(t.name), known(std::string(t.name)));

  size_t compared = 0;
  for (const json& r : reference["results"]) {
    const std::string name = r["template"], id = r["conversation"];
    const bool add_generation_prompt = r["add_generation_prompt"];
    SCOPED_TRACE(name + " / " + id + " / add_generation_prompt=" + (add_generation_prompt ? "true" : "false"));
    ASSERT_TRUE(templates.count(name)) << "tests/chat_template/templates/" << name << ".jinja has no native renderer";
    const std::string want = r["text"];
    const std::string got = templates.at(name).render(parse_messages(conversations.at(id)["messages"]),
                                                      add_generation_prompt);
    EXPECT_EQ(got, want) << first_difference(want, got);
    ++compared;
  }
  EXPECT_EQ(compared, templates.size() * conversations.size() * 2) << "render.mjs skipped something";
  std::cout << "compared " << compared << " renderings with " << reference["renderer"].get<std::string>() << "\n";
}

TEST(ChatTemplate, TableHoldsExactlyTheTemplateFiles) {
  std::set<std::string> files;
  for (const auto& entry : fs::directory_iterator(chat_template_dir() / "templates"))
    if (entry.path().extension() == ".jinja") files.insert(entry.path().stem().string());
  std::set<std::string> names;
  for (const KnownChatTemplate& t : known_chat_templates()) {
    names.insert(std::string(t.name));
    EXPECT_EQ(t.text, template_file(std::string(t.name))) << t.name << " differs from its file";
    EXPECT_EQ(known(std::string(t.name)).name(), t.name);
  }
  EXPECT_EQ(files, names);
}

TEST(ChatTemplate, RendersBosFromTheConfigAndOnlyR1OpensReasoning) {
  const std::vector<ChatMessage> hi = {{"user", "Hi", false, {}}};
  EXPECT_EQ(known("deepseek-r1").render(hi, true), std::string(kBos) + "<｜User｜>Hi<｜Assistant｜><think>\n");
  EXPECT_EQ(known("deepseek-r1").render(hi, false), std::string(kBos) + "<｜User｜>Hi");
  EXPECT_EQ(known("deepseek-r1-early").render(hi, true), std::string(kBos) + "<｜User｜>Hi<｜Assistant｜>");
  EXPECT_EQ(known("deepseek-v3").render(hi, true), std::string(kBos) + "<｜User｜>Hi<｜Assistant｜>");
  EXPECT_EQ(known("deepseek-v3.1").render(hi, true), std::string(kBos) + "<｜User｜>Hi<｜Assistant｜></think>");
  EXPECT_TRUE(known("deepseek-r1").opens_reasoning());
  EXPECT_FALSE(known("deepseek-r1-early").opens_reasoning());
  EXPECT_FALSE(known("deepseek-v3").opens_reasoning());
  EXPECT_FALSE(known("deepseek-v3.1").opens_reasoning());

  // A plain-string bos_token works as well as an AddedToken object.
  json config = tokenizer_config(template_file("deepseek-v3"));
  config["bos_token"] = "<s>";
  EXPECT_EQ(ChatTemplate::from_tokenizer_config(config, "x").render(hi, false), "<s><｜User｜>Hi");
}

TEST(ChatTemplate, UnknownTemplatesAreRefusedNamingTheKnownOnes) {
  std::string edited = template_file("deepseek-r1");
  edited.replace(edited.find("<think>\\n"), 9, "<think>");
  expect_user_error([&] { ChatTemplate::from_tokenizer_config(tokenizer_config(edited), "/m/tokenizer_config.json"); },
                    {"/m/tokenizer_config.json", "not one that dilu knows", "deepseek-r1", "deepseek-v3",
                     "deepseek-v3.1", "deepseek-r1-early", "closest is deepseek-r1", "never approximates",
                     "'prompt_token_ids'"});
  const std::string chatml =
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
      "'<|im_end|>\n'}}{% endfor %}";
  expect_user_error([&] { ChatTemplate::from_tokenizer_config(tokenizer_config(chatml), "cfg"); },
                    {"cfg", "not one that dilu knows", "found \"{% for message in messages %}"});
  expect_user_error([&] { ChatTemplate::from_template_text("", kBos, "chat_template.jinja"); },
                    {"chat_template.jinja", "0 characters"});
  // Jinja drops one trailing newline, so a template saved with one is the same template.
  EXPECT_EQ(ChatTemplate::from_template_text(template_file("deepseek-v3") + "\n", kBos, "f").name(), "deepseek-v3");
  // Whitespace inside the template does change what some template renders, so it is not ignored.
  const std::string indented = std::string(1, ' ').append(template_file("deepseek-v3"));
  expect_user_error([&] { ChatTemplate::from_template_text(indented, kBos, "f"); },
                    {"closest is deepseek-v3", "character 0"});
}

TEST(ChatTemplate, ConfigForms) {
  const json list = json::array({{{"name", "tool_use"}, {"template", "{{ tools }}"}},
                                 {{"name", "default"}, {"template", template_file("deepseek-v3.1")}}});
  EXPECT_EQ(ChatTemplate::from_tokenizer_config(tokenizer_config(list), "c").name(), "deepseek-v3.1");

  const json no_default =
      json::array({{{"name", "tool_use"}, {"template", "x"}}, {{"name", "rag"}, {"template", "y"}}});
  expect_user_error([&] { ChatTemplate::from_tokenizer_config(tokenizer_config(no_default), "c"); },
                    {"c:", "'tool_use', 'rag'", "none named 'default'"});
  expect_user_error([&] { ChatTemplate::from_tokenizer_config(tokenizer_config(json::array({"x"})), "c"); },
                    {"{\"name\": ..., \"template\": ...}"});
  expect_user_error([&] { ChatTemplate::from_tokenizer_config(tokenizer_config(42), "c"); },
                    {"'chat_template' must be a string or a list"});

  json config = tokenizer_config(template_file("deepseek-r1"));
  config.erase("chat_template");
  expect_user_error([&] { ChatTemplate::from_tokenizer_config(config, "/m/tokenizer_config.json"); },
                    {"/m/tokenizer_config.json has no 'chat_template'", "'prompt_token_ids'"});
  config = tokenizer_config(template_file("deepseek-r1"));
  config["bos_token"] = nullptr;
  expect_user_error([&] { ChatTemplate::from_tokenizer_config(config, "c"); }, {"c has no usable 'bos_token'"});
  expect_user_error([&] { ChatTemplate::from_tokenizer_config(json::array(), "c"); }, {"c: expected a JSON object"});
}

TEST(ParseMessages, ReadsOpenAIMessages) {
  const auto m = parse_messages(json::parse(R"([
    {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    {"role": "user", "content": "hi", "name": "alice"},
    {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                          "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
    {"role": "tool", "tool_call_id": "1", "content": "r"},
    {"role": "assistant", "content": "done", "tool_calls": null}
  ])"));
  ASSERT_EQ(m.size(), 5u);
  EXPECT_EQ(m[0].content, "a\nb") << "text parts are joined with a newline, as vLLM joins them";
  EXPECT_EQ(m[1].role, "user");
  EXPECT_EQ(m[1].content, "hi");
  EXPECT_TRUE(m[2].content_is_null) << "an assistant turn with tool calls may leave content out";
  ASSERT_EQ(m[2].tool_calls.size(), 1u);
  EXPECT_EQ(m[2].tool_calls[0].type, "function");
  EXPECT_EQ(m[2].tool_calls[0].name, "f");
  EXPECT_EQ(m[2].tool_calls[0].arguments, "{\"x\": 1}");
  EXPECT_TRUE(m[4].tool_calls.empty()) << "\"tool_calls\": null is read as absent";
  EXPECT_FALSE(m[4].content_is_null);
}

TEST(ParseMessages, ErrorsNameTheMessageAndTheProblem) {
  auto bad = [](const char* text, std::initializer_list<std::string> words) {
    expect_user_error([&] { parse_messages(json::parse(text)); }, words);
  };
  bad(R"({"role": "user"})", {"'messages' must be a list"});
  bad(R"([])", {"'messages' is empty"});
  bad(R"(["hi"])", {"messages[0] must be an object"});
  bad(R"([{"content": "hi"}])", {"messages[0] has no 'role'"});
  bad(R"([{"role": 3, "content": "hi"}])", {"messages[0].role must be a string"});
  bad(R"([{"role": "user", "content": "a"}, {"role": "developer", "content": "b"}])",
      {"messages[1]", "unknown role 'developer'", "system, user, assistant and tool"});
  bad(R"([{"role": "user"}])", {"messages[0] (user) has no 'content'"});
  bad(R"([{"role": "user", "content": null}])", {"messages[0] (user) has null 'content'", "tool_calls"});
  bad(R"([{"role": "assistant", "content": null}])", {"messages[0] (assistant) has null 'content'"});
  bad(R"([{"role": "user", "content": 42}])", {"messages[0]: 'content' must be a string or a list of text parts",
                                                 "number"});
  bad(R"([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])",
      {"messages[0].content[0]: only text parts", "image_url"});
  bad(R"([{"role": "user", "content": "a", "tool_calls": [{}]}])",
      {"messages[0]: only assistant messages may have 'tool_calls'"});
  bad(R"([{"role": "assistant", "content": "a", "tool_calls": []}])",
      {"messages[0].tool_calls must be a non-empty list"});
  bad(R"([{"role": "assistant", "content": null, "tool_calls": [{"type": "function",
          "function": {"name": "f", "arguments": {"x": 1}}}]}])",
      {"messages[0].tool_calls[0].function.arguments must be a string of JSON text", "object"});
  bad(R"([{"role": "assistant", "content": null,
          "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}])",
      {"messages[0].tool_calls[0].function has no 'name'"});
  bad(R"([{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}])",
      {"messages[0].tool_calls[0] has no 'type'"});
}

}  // namespace
}  // namespace dilu
