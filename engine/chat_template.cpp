// See chat_template.h. Each renderer mirrors its template's Jinja statement by statement, quirks
// included (they are what the model saw in training); the template texts are at the end of the file.
#include "engine/chat_template.h"

#include <algorithm>
#include <array>
#include <cstddef>
#include <utility>

#include <nlohmann/json.hpp>

#include "kernels/error.h"

namespace dilu {

using json = nlohmann::json;

namespace {

// ---------------------------------------------------------------------------------------------
// Messages

std::string at_message(size_t i) { return "messages[" + std::to_string(i) + "]"; }

std::string short_dump(const json& value) {
  std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  return text.size() > 80 ? text.substr(0, 77) + "..." : text;
}

// A string, or a list of {"type": "text", "text": ...} parts joined with "\n" as vLLM joins them.
std::string parse_content(const json& content, const std::string& at) {
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array())
    throw UserError(at + ": 'content' must be a string or a list of text parts, got " + content.type_name());
  std::string text;
  for (size_t k = 0; k < content.size(); ++k) {
    const json& part = content[k];
    const bool is_text = part.is_object() && part.contains("type") && part["type"] == "text" &&
                         part.contains("text") && part["text"].is_string();
    if (!is_text)
      throw UserError(at + ".content[" + std::to_string(k) +
                      "]: only text parts {\"type\": \"text\", \"text\": \"...\"} can be rendered, got " +
                      short_dump(part));
    if (k > 0) text += '\n';
    text += part["text"].get_ref<const std::string&>();
  }
  return text;
}

const json& string_field(const json& object, const char* key, const std::string& at) {
  if (!object.contains(key)) throw UserError(at + " has no '" + key + "'");
  const json& value = object[key];
  if (!value.is_string()) throw UserError(at + "." + key + " must be a string, got " + value.type_name());
  return value;
}

ChatToolCall parse_tool_call(const json& call, const std::string& at) {
  if (!call.is_object())
    throw UserError(at + " must be an object {\"type\": \"function\", \"function\": {\"name\": ..., "
                         "\"arguments\": ...}}, got " + short_dump(call));
  ChatToolCall out;
  out.type = string_field(call, "type", at).get<std::string>();
  if (!call.contains("function") || !call["function"].is_object())
    throw UserError(at + " has no 'function' object with 'name' and 'arguments'");
  const json& function = call["function"];
  out.name = string_field(function, "name", at + ".function").get<std::string>();
  if (function.contains("arguments") && !function["arguments"].is_string())
    throw UserError(at + ".function.arguments must be a string of JSON text, as the OpenAI API sends it (the "
                         "chat template pastes it verbatim), got " + function["arguments"].type_name());
  out.arguments = string_field(function, "arguments", at + ".function").get<std::string>();
  return out;
}

ChatMessage parse_message(const json& m, size_t index) {
  const std::string at = at_message(index);
  if (!m.is_object()) throw UserError(at + " must be an object with 'role' and 'content', got " + short_dump(m));
  if (!m.contains("role")) throw UserError(at + " has no 'role' (system, user, assistant or tool)");
  if (!m["role"].is_string()) throw UserError(at + ".role must be a string, got " + short_dump(m["role"]));
  ChatMessage out;
  out.role = m["role"].get<std::string>();
  static constexpr std::array<std::string_view, 4> kRoles = {"system", "user", "assistant", "tool"};
  if (std::find(kRoles.begin(), kRoles.end(), out.role) == kRoles.end())
    throw UserError(at + ": unknown role '" + out.role +
                    "'; the DeepSeek chat templates render system, user, assistant and tool messages");

  if (m.contains("tool_calls") && !m["tool_calls"].is_null()) {
    const json& calls = m["tool_calls"];
    if (out.role != "assistant") throw UserError(at + ": only assistant messages may have 'tool_calls'");
    if (!calls.is_array() || calls.empty())
      throw UserError(at + ".tool_calls must be a non-empty list (leave it out when there are none), got " +
                      short_dump(calls));
    for (size_t k = 0; k < calls.size(); ++k)
      out.tool_calls.push_back(parse_tool_call(calls[k], at + ".tool_calls[" + std::to_string(k) + "]"));
  }

  // The OpenAI API lets an assistant turn with tool calls leave its content out or null; the
  // templates see that as `content is none`. Every other message needs text.
  const bool may_be_null = !out.tool_calls.empty();
  if (!m.contains("content") || m["content"].is_null()) {
    if (!may_be_null)
      throw UserError(at + " (" + out.role + ") has " + (m.contains("content") ? "null 'content'" : "no 'content'") +
                      "; only an assistant message with tool_calls may go without text");
    out.content_is_null = true;
  } else {
    out.content = parse_content(m["content"], at);
  }
  return out;
}

}  // namespace

std::vector<ChatMessage> parse_messages(const json& messages) {
  if (!messages.is_array())
    throw UserError("'messages' must be a list of {\"role\": ..., \"content\": ...} objects, got " +
                    std::string(messages.type_name()));
  if (messages.empty()) throw UserError("'messages' is empty; give at least one message");
  std::vector<ChatMessage> out;
  out.reserve(messages.size());
  for (size_t i = 0; i < messages.size(); ++i) out.push_back(parse_message(messages[i], i));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Renderers

namespace {

// Special-token texts the templates write as literals.
constexpr std::string_view kUser = "<｜User｜>";
constexpr std::string_view kAssistant = "<｜Assistant｜>";
constexpr std::string_view kEndOfSentence = "<｜end▁of▁sentence｜>";
constexpr std::string_view kToolCallsBegin = "<｜tool▁calls▁begin｜>";
constexpr std::string_view kToolCallsEnd = "<｜tool▁calls▁end｜>";
constexpr std::string_view kToolCallBegin = "<｜tool▁call▁begin｜>";
constexpr std::string_view kToolCallEnd = "<｜tool▁call▁end｜>";
constexpr std::string_view kToolSep = "<｜tool▁sep｜>";
constexpr std::string_view kToolOutputsBegin = "<｜tool▁outputs▁begin｜>";
constexpr std::string_view kToolOutputsEnd = "<｜tool▁outputs▁end｜>";
constexpr std::string_view kToolOutputBegin = "<｜tool▁output▁begin｜>";
constexpr std::string_view kToolOutputEnd = "<｜tool▁output▁end｜>";
constexpr std::string_view kThinkEnd = "</think>";

// Appends any number of pieces; keeps the renderers as close to the templates' `+` chains as C++ allows.
template <class... Pieces>
void emit(std::string& out, const Pieces&... pieces) {
  (out.append(pieces), ...);
}

// All templates: {{ bos_token }} then every system message's content, joined with "\n\n", wherever
// the system messages stand in the conversation.
std::string bos_and_system_prompt(const std::vector<ChatMessage>& messages, const std::string& bos) {
  std::string out = bos;
  bool is_first_sp = true;
  for (const ChatMessage& m : messages) {
    if (m.role != "system") continue;
    if (!is_first_sp) out += "\n\n";
    out += m.content;
    is_first_sp = false;
  }
  return out;
}

// `content.split('</think>')[-1]`: the text after the last "</think>" (it has no self-overlap, so
// the last match from the right is the last piece Python's split makes).
std::string_view after_last_think_end(std::string_view content) {
  const size_t at = content.rfind(kThinkEnd);
  return at == std::string_view::npos ? content : content.substr(at + kThinkEnd.size());
}

// `content.split('</think>', 1)[1]`: the text after the first "</think>".
std::string_view after_first_think_end(std::string_view content) {
  const size_t at = content.find(kThinkEnd);
  return at == std::string_view::npos ? content : content.substr(at + kThinkEnd.size());
}

// deepseek-v3. ns.is_first is never reset, so only the first tool call of the whole conversation
// opens with <｜Assistant｜><｜tool▁calls▁begin｜>, and <｜tool▁calls▁end｜> follows every later call
// (none after a lone first one). An assistant turn with text renders only its text.
std::string render_deepseek_v3(const std::vector<ChatMessage>& messages, const std::string& bos,
                               bool add_generation_prompt) {
  std::string out = bos_and_system_prompt(messages, bos);
  bool is_first = false, is_tool = false, is_output_first = true;
  for (const ChatMessage& m : messages) {
    if (m.role == "user") {
      is_tool = false;
      emit(out, kUser, m.content);
    } else if (m.role == "assistant" && m.content_is_null) {
      is_tool = false;
      for (const ChatToolCall& tool : m.tool_calls) {
        if (!is_first) {
          emit(out, kAssistant, kToolCallsBegin, kToolCallBegin, tool.type, kToolSep, tool.name, "\n```json\n",
               tool.arguments, "\n```", kToolCallEnd);
          is_first = true;
        } else {
          emit(out, "\n", kToolCallBegin, tool.type, kToolSep, tool.name, "\n```json\n", tool.arguments, "\n```",
               kToolCallEnd, kToolCallsEnd, kEndOfSentence);
        }
      }
    } else if (m.role == "assistant") {
      if (is_tool) {
        emit(out, kToolOutputsEnd, m.content, kEndOfSentence);
        is_tool = false;
      } else {
        emit(out, kAssistant, m.content, kEndOfSentence);
      }
    } else if (m.role == "tool") {
      is_tool = true;
      if (is_output_first) {
        emit(out, kToolOutputsBegin, kToolOutputBegin, m.content, kToolOutputEnd);
        is_output_first = false;
      } else {
        emit(out, "\n", kToolOutputBegin, m.content, kToolOutputEnd);
      }
    }
  }
  if (is_tool) out += kToolOutputsEnd;
  if (add_generation_prompt && !is_tool) out += kAssistant;
  return out;
}

// deepseek-r1 and deepseek-r1-early (the same template before "<think>\n" was added to its
// generation prompt). Earlier answers keep only what follows their last </think>; an answer right
// after tool outputs is kept whole. ns.is_first is never reset, as in deepseek-v3.
std::string render_deepseek_r1(const std::vector<ChatMessage>& messages, const std::string& bos,
                               bool add_generation_prompt, bool think_in_generation_prompt) {
  std::string out = bos_and_system_prompt(messages, bos);
  bool is_first = false, is_tool = false, is_output_first = true;
  for (const ChatMessage& m : messages) {
    if (m.role == "user") {
      is_tool = false;
      emit(out, kUser, m.content);
    } else if (m.role == "assistant" && !m.tool_calls.empty()) {  // 'tool_calls' in message
      is_tool = false;
      for (const ChatToolCall& tool : m.tool_calls) {
        if (!is_first) {
          if (m.content_is_null)
            emit(out, kAssistant, kToolCallsBegin);
          else
            emit(out, kAssistant, m.content, kToolCallsBegin);
          emit(out, kToolCallBegin, tool.type, kToolSep, tool.name, "\n```json\n", tool.arguments, "\n```",
               kToolCallEnd);
          is_first = true;
        } else {
          emit(out, "\n", kToolCallBegin, tool.type, kToolSep, tool.name, "\n```json\n", tool.arguments, "\n```",
               kToolCallEnd);
        }
      }
      emit(out, kToolCallsEnd, kEndOfSentence);
    } else if (m.role == "assistant") {
      if (is_tool) {
        emit(out, kToolOutputsEnd, m.content, kEndOfSentence);
        is_tool = false;
      } else {
        emit(out, kAssistant, after_last_think_end(m.content), kEndOfSentence);
      }
    } else if (m.role == "tool") {
      is_tool = true;
      if (is_output_first) {
        emit(out, kToolOutputsBegin, kToolOutputBegin, m.content, kToolOutputEnd);
        is_output_first = false;
      } else {
        emit(out, kToolOutputBegin, m.content, kToolOutputEnd);
      }
    }
  }
  if (is_tool) out += kToolOutputsEnd;
  if (add_generation_prompt && !is_tool) {
    out += kAssistant;
    if (think_in_generation_prompt) out += "<think>\n";
  }
  return out;
}

// deepseek-v3.1 with `thinking` undefined, i.e. false (non-thinking mode): every assistant turn that
// answers a user opens with <｜Assistant｜></think>, earlier answers keep what follows their first
// </think>, and the generation prompt (only after a user turn) is <｜Assistant｜></think>.
std::string render_deepseek_v31(const std::vector<ChatMessage>& messages, const std::string& bos,
                                bool add_generation_prompt) {
  std::string out = bos_and_system_prompt(messages, bos);
  bool is_first = false, is_tool = false, is_last_user = false;
  for (const ChatMessage& m : messages) {
    if (m.role == "user") {
      is_tool = false;
      is_first = false;
      is_last_user = true;
      emit(out, kUser, m.content);
    } else if (m.role == "assistant" && !m.tool_calls.empty()) {
      if (is_last_user) emit(out, kAssistant, kThinkEnd);
      is_last_user = false;
      is_first = false;
      is_tool = false;
      for (const ChatToolCall& tool : m.tool_calls) {
        if (!is_first) {
          if (!m.content_is_null) out += m.content;
          emit(out, kToolCallsBegin, kToolCallBegin, tool.name, kToolSep, tool.arguments, kToolCallEnd);
          is_first = true;
        } else {
          emit(out, kToolCallBegin, tool.name, kToolSep, tool.arguments, kToolCallEnd);
        }
      }
      emit(out, kToolCallsEnd, kEndOfSentence);
    } else if (m.role == "assistant") {
      // `message['prefix'] and thinking` would open with <think>; thinking is false here.
      if (is_last_user) emit(out, kAssistant, kThinkEnd);
      is_last_user = false;
      if (is_tool) {
        emit(out, m.content, kEndOfSentence);
        is_tool = false;
      } else {
        emit(out, after_first_think_end(m.content), kEndOfSentence);
      }
    } else if (m.role == "tool") {
      is_last_user = false;
      is_tool = true;
      emit(out, kToolOutputBegin, m.content, kToolOutputEnd);
    }
  }
  if (add_generation_prompt && is_last_user && !is_tool) emit(out, kAssistant, kThinkEnd);
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The known templates. Their texts are copied byte for byte from the checkpoints'
// tokenizer_config.json (tests/chat_template/README.md says from where, and a test keeps these
// equal to the files in tests/chat_template/templates/).

namespace {

// tests/chat_template/templates/deepseek-v3.jinja, byte for byte.
constexpr std::string_view kDeepseekV3Text =
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', "
    "is_first_sp=true) %}{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}{%- else %}{% set ns.system_prompt = ns.system_prompt + '\n"
    "\n"
    "' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}{{bos_token}}"
    "{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}"
    "{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' "
    "+ tool['function']['name'] + '\n"
    "' + '```json' + '\n"
    "' + tool['function']['arguments'] + '\n"
    "' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}"
    "{%- else %}{{'\n"
    "' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] "
    "+ '\n"
    "' + '```json' + '\n"
    "' + tool['function']['arguments'] + '\n"
    "' + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endfor %}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] "
    "is not none %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] "
    "+ '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}"
    "{%- else %}{{'\n"
    "<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}"
    "{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}"
    "{% endif %}";

// tests/chat_template/templates/deepseek-r1.jinja, byte for byte.
constexpr std::string_view kDeepseekR1Text =
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', "
    "is_first_sp=true) %}{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + "
    "message['content'] %}{%- endif %}{%- endif %}{%- endfor %}{{ bos_token }}"
    "{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none "
    "%}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + "
    "'<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] "
    "+ '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- else %}{{'<｜Assistant｜>' + message['content'] "
    "+ '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' "
    "+ tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' "
    "+ '<｜tool▁call▁end｜>'}}{%- endif %}{%- set ns.is_first = true -%}"
    "{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] "
    "+ '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}"
    "{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] "
    "+ '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}"
    "{%- else %}{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}"
    "{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}"
    "{% endif %}";

// tests/chat_template/templates/deepseek-r1-early.jinja, byte for byte.
constexpr std::string_view kDeepseekR1EarlyText =
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', "
    "is_first_sp=true) %}{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + "
    "message['content'] %}{%- endif %}{%- endif %}{%- endfor %}{{ bos_token }}"
    "{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none "
    "%}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + "
    "'<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] "
    "+ '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- else %}{{'<｜Assistant｜>' + message['content'] "
    "+ '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' "
    "+ tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' "
    "+ '<｜tool▁call▁end｜>'}}{%- endif %}{%- set ns.is_first = true -%}"
    "{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] "
    "+ '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}"
    "{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] "
    "+ '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}"
    "{%- else %}{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}"
    "{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}"
    "{% endif %}";

// tests/chat_template/templates/deepseek-v3.1.jinja, byte for byte.
constexpr std::string_view kDeepseekV31Text =
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{% if not thinking is defined %}{% set thinking = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, system_prompt='', is_first_sp=true, is_last_user=false) "
    "%}{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false "
    "%}{%- else %}{% set ns.system_prompt = ns.system_prompt + '\n"
    "\n"
    "' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}{{ bos_token }}"
    "{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{%- set ns.is_first = false -%}{%- set ns.is_last_user = true -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and message['tool_calls'] "
    "is defined and message['tool_calls'] is not none %}{%- if ns.is_last_user %}"
    "{{'<｜Assistant｜></think>'}}{%- endif %}{%- set ns.is_last_user = false -%}"
    "{%- set ns.is_first = false %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls'] "
    "%}{%- if not ns.is_first %}{%- if message['content'] is none %}{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>'+ "
    "tool['function']['name'] + '<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}"
    "{%- else %}{{message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['function']['name'] "
    "+ '<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- set ns.is_first = true -%}{%- else %}{{'<｜tool▁call▁begin｜>'+ tool['function']['name'] "
    "+ '<｜tool▁sep｜>' + tool['function']['arguments'] + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- if message['role'] == 'assistant' and (message['tool_calls'] is not defined or message['tool_calls'] "
    "is none) %}{%- if ns.is_last_user %}{{'<｜Assistant｜>'}}{%- if message['prefix'] is defined and "
    "message['prefix'] and thinking %}{{'<think>'}}  {%- else %}{{'</think>'}}"
    "{%- endif %}{%- endif %}{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}"
    "{{message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{%- set content = message['content'] -%}{%- if '</think>' in content %}"
    "{%- set content = content.split('</think>', 1)[1] -%}{%- endif %}{{content + '<｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_last_user = false -%}"
    "{%- set ns.is_tool = true -%}{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- endif %}{%- endfor -%}{%- if add_generation_prompt and ns.is_last_user and not ns.is_tool %}"
    "{{'<｜Assistant｜>'}}{%- if not thinking %}{{'</think>'}}{%- else %}"
    "{{'<think>'}}{%- endif %}{% endif %}";

// The entry listed first is the one people most likely have. DeepSeek-R1-0528 is missing on
// purpose: its template changed after release and no verbatim copy of it was found.
constexpr std::array<KnownChatTemplate, 4> kKnown = {{
    {"deepseek-r1", "deepseek-ai/DeepSeek-R1 (its current template, whose generation prompt ends in <think>)",
     kDeepseekR1Text},
    {"deepseek-v3", "deepseek-ai/DeepSeek-V3, DeepSeek-V3-0324", kDeepseekV3Text},
    {"deepseek-v3.1", "deepseek-ai/DeepSeek-V3.1, DeepSeek-V3.1-Terminus (non-thinking mode)", kDeepseekV31Text},
    {"deepseek-r1-early",
     "deepseek-ai/DeepSeek-R1 as of late January 2025, before <think> was added to the generation prompt",
     kDeepseekR1EarlyText},
}};

size_t utf8_chars(std::string_view text) {
  return static_cast<size_t>(std::count_if(text.begin(), text.end(), [](char c) {
    return (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  }));
}

// Up to `n` bytes of `text` from `at`, widened/narrowed to whole UTF-8 characters, as a JSON string.
std::string snippet(std::string_view text, size_t at, size_t n) {
  auto is_continuation = [&](size_t i) {
    return i < text.size() && (static_cast<unsigned char>(text[i]) & 0xC0) == 0x80;
  };
  while (at > 0 && is_continuation(at)) --at;
  size_t end = std::min(text.size(), at + n);
  while (is_continuation(end)) ++end;
  std::string piece(text.substr(at, end - at));
  if (end < text.size()) piece += "...";
  return json(piece).dump(-1, ' ', false, json::error_handler_t::replace);
}

[[noreturn]] void refuse_unknown(std::string_view text, const std::string& origin) {
  // The closest known template (longest common prefix plus suffix) shows where this one departs.
  const KnownChatTemplate* closest = nullptr;
  size_t best_score = 0, best_prefix = 0;
  for (const KnownChatTemplate& known : kKnown) {
    const auto differs = std::mismatch(text.begin(), text.end(), known.text.begin(), known.text.end()).first;
    const size_t prefix = static_cast<size_t>(differs - text.begin());
    size_t suffix = 0;
    const size_t limit = std::min(text.size(), known.text.size()) - prefix;
    while (suffix < limit && text[text.size() - 1 - suffix] == known.text[known.text.size() - 1 - suffix]) ++suffix;
    if (!closest || prefix + suffix > best_score) {
      closest = &known;
      best_score = prefix + suffix;
      best_prefix = prefix;
    }
  }
  std::string message = origin + ": its chat_template (" + std::to_string(utf8_chars(text)) +
                        " characters) is not one that dilu knows. dilu renders chat 'messages' with native "
                        "code written for these exact templates, and never approximates another one:\n";
  for (const KnownChatTemplate& known : kKnown)
    message += "  " + std::string(known.name) + ": " + std::string(known.models) + "\n";
  const size_t context_from = best_prefix >= 20 ? best_prefix - 20 : 0;
  message += "The closest is " + std::string(closest->name) + "; this template departs from it at character " +
             std::to_string(utf8_chars(text.substr(0, best_prefix))) + " (shown with what precedes it): expected " +
             snippet(closest->text, context_from, 80) + ", found " + snippet(text, context_from, 80) + ".\n" +
             "To proceed: use the tokenizer_config.json published with one of those checkpoints, or send "
             "this model's requests as 'prompt' (text you rendered yourself) or 'prompt_token_ids'.";
  throw UserError(message);
}

}  // namespace

std::span<const KnownChatTemplate> known_chat_templates() { return kKnown; }

ChatTemplate ChatTemplate::from_template_text(std::string_view text, const std::string& bos_token,
                                              const std::string& origin) {
  // Jinja drops one trailing newline of a template (keep_trailing_newline is off in transformers),
  // so a template saved with a final newline renders exactly the same.
  std::string_view body = text;
  if (!body.empty() && body.back() == '\n') body.remove_suffix(1);
  static constexpr std::array<Kind, 4> kKinds = {Kind::kDeepSeekR1, Kind::kDeepSeekV3, Kind::kDeepSeekV31,
                                                  Kind::kDeepSeekR1Early};
  for (size_t i = 0; i < kKnown.size(); ++i)
    if (body == kKnown[i].text) return ChatTemplate(kKinds[i], std::string(kKnown[i].name), bos_token);
  refuse_unknown(text, origin);
}

ChatTemplate ChatTemplate::from_tokenizer_config(const json& tokenizer_config, const std::string& origin) {
  if (!tokenizer_config.is_object()) throw UserError(origin + ": expected a JSON object");
  if (!tokenizer_config.contains("chat_template") || tokenizer_config["chat_template"].is_null())
    throw UserError(origin + " has no 'chat_template', so dilu cannot render chat 'messages' for this model; "
                             "send its requests as 'prompt' or 'prompt_token_ids' instead");
  const json& chat_template = tokenizer_config["chat_template"];
  std::string text;
  if (chat_template.is_string()) {
    text = chat_template.get<std::string>();
  } else if (chat_template.is_array()) {
    // transformers' named form: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
    std::string names;
    bool found = false;
    for (const json& entry : chat_template) {
      if (!entry.is_object() || !entry.contains("name") || !entry.contains("template") ||
          !entry["name"].is_string() || !entry["template"].is_string())
        throw UserError(origin + ": 'chat_template' as a list must hold {\"name\": ..., \"template\": ...} "
                                 "objects, got " + short_dump(entry));
      names += (names.empty() ? "'" : ", '") + entry["name"].get<std::string>() + "'";
      if (entry["name"] == "default") {
        text = entry["template"].get<std::string>();
        found = true;
      }
    }
    if (!found)
      throw UserError(origin + ": 'chat_template' lists templates named " + (names.empty() ? "nothing" : names) +
                      " but none named 'default', the one chat messages are rendered with");
  } else {
    throw UserError(origin + ": 'chat_template' must be a string or a list of {name, template}, got " +
                    std::string(chat_template.type_name()));
  }

  // The templates open with {{ bos_token }}: an AddedToken object {"content": ...} or a plain string.
  const json* bos = tokenizer_config.contains("bos_token") ? &tokenizer_config["bos_token"] : nullptr;
  if (bos && bos->is_object() && bos->contains("content")) bos = &(*bos)["content"];
  if (!bos || !bos->is_string())
    throw UserError(origin + " has no usable 'bos_token' (a string or {\"content\": ...}); the chat template "
                             "starts the prompt with it");
  return from_template_text(text, bos->get<std::string>(), origin);
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
  switch (kind_) {
    case Kind::kDeepSeekV3:
      return render_deepseek_v3(messages, bos_token_, add_generation_prompt);
    case Kind::kDeepSeekR1:
      return render_deepseek_r1(messages, bos_token_, add_generation_prompt, /*think_in_generation_prompt=*/true);
    case Kind::kDeepSeekR1Early:
      return render_deepseek_r1(messages, bos_token_, add_generation_prompt, /*think_in_generation_prompt=*/false);
    case Kind::kDeepSeekV31:
      return render_deepseek_v31(messages, bos_token_, add_generation_prompt);
  }
  DILU_CHECK(false, "unhandled chat template kind");
  return {};
}

bool ChatTemplate::opens_reasoning() const { return kind_ == Kind::kDeepSeekR1; }

}  // namespace dilu
