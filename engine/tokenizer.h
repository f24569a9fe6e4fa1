// Byte-level BPE tokenizer read from a checkpoint's tokenizer.json and tokenizer_config.json (Hugging
// Face format); encodes and decodes exactly as the `tokenizers` library does for DeepSeek-V3/R1.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace dilu {

struct TokenizerOptions {
  // Pre-tokens remembered with their BPE result, over all threads. Text repeats words, so this
  // saves most merge work; 0 turns it off (the benchmark measures the uncached path that way).
  size_t cache_entries = size_t{1} << 16;
};

// What is supported, and why it is enough: normalizer null (or an empty Sequence); pre_tokenizer
// Split (behavior Isolated, regex or string pattern) and ByteLevel, alone or in a Sequence that ends
// with ByteLevel; model BPE without dropout or byte fallback; decoder ByteLevel; post_processor
// ByteLevel, TemplateProcessing or a Sequence of them. That covers DeepSeek-V3/R1's files and the
// GPT-2 and Llama-3 layouts; anything else is a UserError naming the component. Regexes run
// on PCRE2 (JIT), with `\s`, `\w`, `\h` and `$` translated to their Oniguruma meaning, which is
// what the `tokenizers` library uses.
//
// Thread-safe: every const method may be called from several threads at once.
class Tokenizer {
 public:
  // nullptr when the directory has no tokenizer.json (token-id-only runs still work); UserError
  // naming the file on a malformed or unsupported one. tokenizer_config.json is optional.
  static std::unique_ptr<Tokenizer> load(const std::filesystem::path& model_dir, const TokenizerOptions& options = {});
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Added tokens (special or not) are matched in the text first, always, as `tokenizers` does
  // (so a prompt containing "<｜User｜>" gets that token's id); the rest is pre-tokenized and
  // merged. add_special_tokens adds what transformers adds: for tokenizer_configs that carry
  // add_bos_token/add_eos_token (LlamaTokenizerFast, as DeepSeek's do) bos/eos accordingly,
  // otherwise the tokenizer.json TemplateProcessing. UserError when text is not valid UTF-8.
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const;

  // Ids without a token (e.g. the model's padded vocabulary rows past the tokenizer's) decode to
  // nothing, as in `tokenizers`; invalid UTF-8 from partial byte tokens becomes U+FFFD.
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens) const;

  // Tokens in their tokenizer.json spelling (byte-level form, e.g. "Ġthe" for " the").
  std::optional<int32_t> token_to_id(std::string_view token) const;
  std::optional<std::string> id_to_token(int32_t id) const;

  std::optional<int32_t> bos_id() const;  // tokenizer_config bos_token
  std::optional<int32_t> eos_id() const;  // tokenizer_config eos_token
  // Whether encode(text, true) starts with bos_id().
  bool add_bos_token() const;
  // One past the largest id of the vocabulary and the added tokens.
  int64_t vocab_size() const;
  // An added token marked "special" (skipped by decode(..., true)).
  bool is_special(int32_t id) const;
  // tokenizer_config.json (an empty object when there is none), for the chat template code.
  const nlohmann::json& config() const;

 private:
  friend class DecodeStream;
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Incremental detokenizer for streaming output: feed ids one at a time; push() returns only
// complete UTF-8 text (never half a character) and flush() the rest. The concatenation of all
// pieces equals decode() of all ids, because byte-level decoding only concatenates bytes. The
// tokenizer must outlive the stream; one stream per sequence, not shared between threads.
class DecodeStream {
 public:
  DecodeStream(const Tokenizer& tokenizer, bool skip_special_tokens);
  std::string push(int32_t id);
  std::string flush();

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_tokens_;
  std::string pending_;  // bytes of a character whose remaining bytes have not arrived yet
};

}  // namespace dilu
