// See prompt_encoder.h.
#include "engine/prompt_encoder.h"

#include "kernels/error.h"

namespace dilu {

PromptEncoder::PromptEncoder(const std::filesystem::path& model_dir) : tokenizer_(Tokenizer::load(model_dir)) {
  if (tokenizer_ && tokenizer_->config().contains("chat_template"))
    template_ = ChatTemplate::from_tokenizer_config(tokenizer_->config(),
                                                    (model_dir / "tokenizer_config.json").string());
}

std::vector<int32_t> PromptEncoder::encode_text(const std::string& text) const {
  DILU_USER_CHECK(tokenizer_ != nullptr,
                  "text needs the model's tokenizer, and the model directory has no tokenizer.json; give token ids");
  return tokenizer_->encode(text, /*add_special_tokens=*/false);
}

std::vector<int32_t> PromptEncoder::encode(const Request& r) const {
  switch (r.kind) {
    case RequestKind::TokenIds:
      return r.prompt_token_ids;
    case RequestKind::Completion:
      DILU_USER_CHECK(tokenizer_ != nullptr,
                      "'prompt' text needs the model's tokenizer, and the model directory has no tokenizer.json; "
                      "give 'prompt_token_ids' instead");
      return tokenizer_->encode(r.prompt_text, /*add_special_tokens=*/true);
    case RequestKind::Chat: {
      DILU_USER_CHECK(tokenizer_ != nullptr,
                      "'messages' need the model's tokenizer and chat template, and the model directory has no "
                      "tokenizer.json");
      DILU_USER_CHECK(template_.has_value(),
                      "'messages' need a chat template, and tokenizer_config.json has no \"chat_template\"");
      const std::string text = template_->render(parse_messages(r.messages), /*add_generation_prompt=*/true);
      return tokenizer_->encode(text, /*add_special_tokens=*/false);
    }
  }
  DILU_CHECK(false, "unknown request kind");
}

ReasoningSplit split_reasoning(const std::string& text, bool opened) {
  static const std::string kOpen = "<think>", kClose = "</think>";
  std::string_view t = text;
  bool started = opened;
  if (t.substr(0, kOpen.size()) == kOpen) {
    t.remove_prefix(kOpen.size());
    started = true;
  }
  const size_t close = t.find(kClose);
  if (close == std::string_view::npos) {
    if (started) return {std::string(t), ""};
    return {std::nullopt, text};
  }
  ReasoningSplit s;
  s.reasoning = std::string(t.substr(0, close));
  std::string_view rest = t.substr(close + kClose.size());
  while (!rest.empty() && rest.front() == '\n') rest.remove_prefix(1);  // DeepSeek's API drops them too
  s.content = std::string(rest);
  return s;
}

}  // namespace dilu
