// Turns a request's prompt (token ids, text, or chat messages) into the token ids the model
// reads, exactly as `dilu run` and `dilu tokenize` both need it: one place, one behaviour.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/chat_template.h"
#include "engine/request.h"
#include "engine/tokenizer.h"

namespace dilu {

class PromptEncoder {
 public:
  // Loads tokenizer.json and the chat template when the directory has them. A chat template the
  // engine cannot render exactly is refused here, at start-up (UserError).
  explicit PromptEncoder(const std::filesystem::path& model_dir);
  const Tokenizer* tokenizer() const { return tokenizer_.get(); }
  const ChatTemplate* chat_template() const { return template_ ? &*template_ : nullptr; }

  // Token ids of the request's prompt. Text prompts get BOS as the tokenizer config says
  // (add_bos_token); chat prompts are rendered by the template, which writes BOS itself, and
  // are encoded without adding another. Throws UserError (a message for the request's error
  // record) when the prompt cannot be encoded: no tokenizer, no template, bad messages.
  std::vector<int32_t> encode(const Request& r) const;
  // Plain text without special tokens (`dilu tokenize` {"text": ...} lines).
  std::vector<int32_t> encode_text(const std::string& text) const;

 private:
  std::unique_ptr<Tokenizer> tokenizer_;
  std::optional<ChatTemplate> template_;
};

// R1-style output split into reasoning and answer: the text before "</think>" is reasoning
// (an opening "<think>" is dropped); with no "</think>", everything is reasoning when the
// prompt opened it (`opened`), else everything is the answer.
struct ReasoningSplit {
  std::optional<std::string> reasoning;
  std::string content;
};
ReasoningSplit split_reasoning(const std::string& text, bool opened);

}  // namespace dilu
