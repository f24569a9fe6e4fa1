// OpenAI-style chat messages turned into prompt text exactly as a checkpoint's chat_template renders
// them: known templates are recognized by their exact text and rendered by native code, never interpreted.
#pragma once

#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace dilu {

// One entry of an assistant turn's "tool_calls" (OpenAI format).
struct ChatToolCall {
  std::string type;       // "type", e.g. "function"; the V3/R1 templates print it
  std::string name;       // "function"."name"
  std::string arguments;  // "function"."arguments": JSON text, pasted verbatim by every template
};

struct ChatMessage {
  std::string role;     // system | user | assistant | tool
  std::string content;  // text; parts of a content list joined with "\n" (as vLLM does)
  // JSON null content: only on an assistant turn with tool calls. The V3/R1 templates test
  // `content is none` to choose between "tool calls only" and "text, then tool calls".
  bool content_is_null = false;
  // Assistant turns only. Empty = no tool calls: "tool_calls": null is read as absent (as vLLM
  // does) and an empty list is refused, because the templates test the key's presence.
  std::vector<ChatToolCall> tool_calls;
};

// Parses an OpenAI-style "messages" array. Throws UserError naming the message index and the
// problem: not an array, unknown or missing role, missing or mistyped content, malformed tool calls.
std::vector<ChatMessage> parse_messages(const nlohmann::json& messages);

// A chat template dilu renders natively, with where its exact text was taken from.
struct KnownChatTemplate {
  std::string_view name;    // e.g. "deepseek-r1"
  std::string_view models;  // the checkpoints that ship it
  std::string_view text;    // the template, byte for byte as in their tokenizer_config.json
};
std::span<const KnownChatTemplate> known_chat_templates();

class ChatTemplate {
 public:
  // From tokenizer_config.json's "chat_template" (a string, or a list of {name, template} of which
  // "default" is used) and "bos_token". Throws UserError naming `origin` when the template is not
  // one of known_chat_templates(): the message lists those and says how to proceed.
  static ChatTemplate from_tokenizer_config(const nlohmann::json& tokenizer_config, const std::string& origin);
  // The same for a template given as text (e.g. a checkpoint's chat_template.jinja file).
  static ChatTemplate from_template_text(std::string_view text, const std::string& bos_token,
                                         const std::string& origin);

  const std::string& name() const { return name_; }
  const std::string& bos_token() const { return bos_token_; }

  // The prompt text, starting with the BOS token's text as the template emits it (encode it without
  // adding another BOS), with the generation prompt appended when `add_generation_prompt`.
  std::string render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const;

  // True when the generation prompt ends inside the model's reasoning (R1's "<think>\n"): the
  // completion starts with reasoning text and has no opening <think> of its own.
  bool opens_reasoning() const;

 private:
  enum class Kind { kDeepSeekV3, kDeepSeekR1, kDeepSeekR1Early, kDeepSeekV31 };
  ChatTemplate(Kind kind, std::string name, std::string bos_token)
      : kind_(kind), name_(std::move(name)), bos_token_(std::move(bos_token)) {}

  Kind kind_;
  std::string name_;
  std::string bos_token_;
};

}  // namespace dilu
