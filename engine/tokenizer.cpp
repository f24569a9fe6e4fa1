// See tokenizer.h. Encoding: check UTF-8 → split out added tokens (two passes, as `tokenizers`) →
// pre-tokenizer regex splits → BPE merges by rank per pre-token (cached) → bos/eos.
#include "engine/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <bit>
#include <deque>
#include <functional>
#include <limits>
#include <mutex>
#include <unordered_map>

#include "engine/json_file.h"
#include "kernels/error.h"

namespace dilu {

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

// ---- UTF-8 -------------------------------------------------------------------------------------

struct Utf8Step {
  size_t length;  // bytes of the character, or of the maximal invalid subpart
  bool valid;
  bool truncated;  // a valid prefix that ran into the end of the input
};

// One step of the Unicode "maximal subpart" decoding (Table 3-7), which Rust's from_utf8_lossy
// and therefore `tokenizers` use to put U+FFFD into decoded text.
Utf8Step utf8_step(std::string_view s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return {1, true, false};
  size_t need = 0;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    need = 1;
  } else if (c == 0xE0) {
    need = 2, lo = 0xA0;
  } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
    need = 2;
  } else if (c == 0xED) {
    need = 2, hi = 0x9F;
  } else if (c == 0xF0) {
    need = 3, lo = 0x90;
  } else if (c >= 0xF1 && c <= 0xF3) {
    need = 3;
  } else if (c == 0xF4) {
    need = 3, hi = 0x8F;
  } else {
    return {1, false, false};
  }
  for (size_t k = 1; k <= need; ++k) {
    if (i + k >= s.size()) return {k, false, true};
    const auto d = static_cast<unsigned char>(s[i + k]);
    if (d < lo || d > hi) return {k, false, false};
    lo = 0x80, hi = 0xBF;
  }
  return {need + 1, true, false};
}

// Appends `s` with each invalid subpart replaced by U+FFFD. Unless `final`, stops before a trailing
// incomplete character (it may be completed by the next token) and returns the bytes consumed.
size_t append_utf8_lossy(std::string_view s, bool final, std::string& out) {
  size_t run = 0, i = 0;
  while (i < s.size()) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const Utf8Step step = utf8_step(s, i);
    if (step.valid) {
      i += step.length;
      continue;
    }
    out.append(s.substr(run, i - run));
    if (step.truncated && !final) return i;
    out.append("\xEF\xBF\xBD");
    i += step.length;
    run = i;
  }
  out.append(s.substr(run));
  return s.size();
}

void check_utf8(std::string_view text) {
  for (size_t i = 0; i < text.size();) {
    if (static_cast<unsigned char>(text[i]) < 0x80) {
      ++i;
      continue;
    }
    const Utf8Step step = utf8_step(text, i);
    DILU_USER_CHECK(step.valid, "text to tokenize is not valid UTF-8 (byte offset ", i,
                    "); send prompts as UTF-8 text, or as prompt_token_ids");
    i += step.length;
  }
}

// Decodes the (valid) character at s[i].
char32_t code_point_at(std::string_view s, size_t i, size_t* length) {
  const auto c = static_cast<unsigned char>(s[i]);
  const size_t n = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  char32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  *length = n;
  return cp;
}

size_t previous_char_start(std::string_view s, size_t i) {
  do --i;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80);
  return i;
}

// Unicode White_Space: what Rust's `\s` (added tokens' lstrip/rstrip) and Oniguruma's `\s` match.
bool is_white_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// GPT-2's bytes_to_unicode: every byte gets a printable character, so that vocabularies can be
// stored as text. Bytes map to themselves where printable, the rest to U+0100.. in byte order.
struct ByteLevelAlphabet {
  std::array<char32_t, 256> to_char{};
  std::array<int16_t, 0x144> to_byte{};  // -1: not a byte-level character
  ByteLevelAlphabet() {
    to_byte.fill(-1);
    char32_t next = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_char[static_cast<size_t>(b)] = printable ? static_cast<char32_t>(b) : next++;
      to_byte[to_char[static_cast<size_t>(b)]] = static_cast<int16_t>(b);
    }
  }
};

const ByteLevelAlphabet& byte_level() {
  static const ByteLevelAlphabet alphabet;
  return alphabet;
}

// The raw bytes a byte-level token stands for; nullopt when it has other characters.
std::optional<std::string> byte_level_decode(std::string_view token) {
  std::string bytes;
  for (size_t i = 0; i < token.size();) {
    size_t n = 0;
    const char32_t cp = code_point_at(token, i, &n);
    if (cp >= byte_level().to_byte.size() || byte_level().to_byte[cp] < 0) return std::nullopt;
    bytes.push_back(static_cast<char>(byte_level().to_byte[cp]));
    i += n;
  }
  return bytes;
}

// ---- Regexes (PCRE2 with JIT) ------------------------------------------------------------------

// Per-thread matching state: PCRE2 code is shared, match data and the JIT stack are not.
struct MatchScratch {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
  pcre2_match_context* context = pcre2_match_context_create(nullptr);
  // Long runs of spaces make `\s+(?!\S)` backtrack deeply; 32 KiB (PCRE2's default) is too small.
  pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 64 * 1024 * 1024, nullptr);
  MatchScratch() {
    DILU_CHECK(data && context && stack, "out of memory creating PCRE2 match state");
    pcre2_jit_stack_assign(context, nullptr, stack);
  }
  ~MatchScratch() {
    pcre2_jit_stack_free(stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
  MatchScratch(const MatchScratch&) = delete;
  MatchScratch& operator=(const MatchScratch&) = delete;
};

std::string pcre2_message(int code) {
  std::array<PCRE2_UCHAR, 256> buffer{};
  pcre2_get_error_message(code, buffer.data(), buffer.size());
  return reinterpret_cast<const char*>(buffer.data());
}

// `tokenizers` runs its patterns on Oniguruma, where \s is Unicode White_Space (PCRE2's \s also
// takes U+180E), \w is letters, marks, numbers and connectors (PCRE2's lacks marks), \h is a hex
// digit (PCRE2's is horizontal space) and $ ends any line. Rewrite those to PCRE2 spellings.
std::string onig_to_pcre2(std::string_view p, const std::string& where) {
  constexpr std::string_view kWord = "\\p{L}\\p{M}\\p{N}\\p{Pc}";
  constexpr std::string_view kHex = "0-9a-fA-F";
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char e = p[++i];
      const auto set = [&](std::string_view members, bool negate) {
        DILU_USER_CHECK(!(in_class && negate), where, ": the pattern uses \\", e,
                        " inside [...], which dilu cannot translate from Oniguruma to PCRE2");
        if (in_class) {
          out += members;
        } else {
          out += negate ? "[^" : "[";
          out += members;
          out += ']';
        }
      };
      switch (e) {
        case 's': out += "\\p{White_Space}"; break;
        case 'S': out += "\\P{White_Space}"; break;
        case 'w': set(kWord, false); break;
        case 'W': set(kWord, true); break;
        case 'h': set(kHex, false); break;
        case 'H': set(kHex, true); break;
        default: out += '\\', out += e;
      }
      continue;
    }
    if (!in_class) {
      out += c;
      if (c == '[') {
        in_class = true;
        if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
        if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];  // a leading ] is a member
      }
      continue;
    }
    if (c == '[') {
      const size_t close = p.find(":]", i);
      DILU_USER_CHECK(i + 1 < p.size() && p[i + 1] == ':' && close != std::string_view::npos, where,
                      ": the pattern nests a character class ([...[...]...]), which PCRE2 does not support");
      out += p.substr(i, close + 2 - i);  // POSIX class such as [:alpha:]
      i = close + 1;
      continue;
    }
    if (c == ']') in_class = false;
    out += c;
  }
  return out;
}

class Regex {
 public:
  // `literal`: match `pattern` as plain text (a Split with a String pattern).
  Regex(const std::string& pattern, bool literal, const std::string& where) {
    pcre2_compile_context* cc = pcre2_compile_context_create(nullptr);
    pcre2_set_newline(cc, PCRE2_NEWLINE_LF);
    int error = 0;
    PCRE2_SIZE offset = 0;
    const std::string source = literal ? pattern : onig_to_pcre2(pattern, where);
    const uint32_t options = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP | PCRE2_MULTILINE);
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(source.data()), source.size(), options, &error, &offset, cc);
    pcre2_compile_context_free(cc);
    DILU_USER_CHECK(code_ != nullptr, where, ": cannot compile the regex '", pattern,
                    "' (PCRE2: ", pcre2_message(error), " at offset ", offset, ")");
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;  // without JIT support: interpreted, slower
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // The first match at or after `start`; false when there is none. `subject` is valid UTF-8.
  bool find(std::string_view subject, size_t start, MatchScratch& m, size_t* begin, size_t* end) const {
    const auto* s = reinterpret_cast<PCRE2_SPTR>(subject.data());
    const int rc = jit_ ? pcre2_jit_match(code_, s, subject.size(), start, 0, m.data, m.context)
                        : pcre2_match(code_, s, subject.size(), start, PCRE2_NO_UTF_CHECK, m.data, m.context);
    if (rc == PCRE2_ERROR_NOMATCH) return false;
    DILU_USER_CHECK(rc >= 0, "cannot pre-tokenize a text of ", subject.size(), " bytes (PCRE2: ", pcre2_message(rc),
                    "); split the text or report it with the tokenizer.json");
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(m.data);
    *begin = ovector[0];
    *end = ovector[1];
    return true;
  }

 private:
  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

// Appends the pieces of `piece` split by `re` with behavior Isolated: every match and every gap
// between matches is a piece. Empty matches split nothing; like Oniguruma's find_iter an empty
// match right where the previous one ended is skipped by one character.
void split_isolated(const Regex& re, std::string_view piece, MatchScratch& m, std::vector<std::string_view>& out) {
  size_t prev = 0, pos = 0, last_end = std::string_view::npos;
  size_t begin = 0, end = 0;
  while (pos <= piece.size() && re.find(piece, pos, m, &begin, &end)) {
    if (begin == end && end == last_end) {
      if (pos >= piece.size()) break;
      size_t n = 0;
      code_point_at(piece, pos, &n);
      pos += n;
      continue;
    }
    pos = last_end = end;
    if (begin > prev) out.push_back(piece.substr(prev, begin - prev));
    if (end > begin) out.push_back(piece.substr(begin, end - begin));
    prev = end;
  }
  if (prev < piece.size()) out.push_back(piece.substr(prev));
}

// ---- Added tokens ------------------------------------------------------------------------------

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
};

struct AddedMatch {
  size_t begin, end;
  int32_t token;  // index into the added-token list
};

// Byte trie over added-token contents with the aho-corasick LeftmostLongest semantics that
// `tokenizers` uses: the leftmost match wins, the longest among those; matches do not overlap.
class AddedTokenTrie {
 public:
  AddedTokenTrie() { root_.fill(-1); }

  void add(std::string_view content, int32_t token) {
    if (content.empty()) return;
    const auto first = static_cast<unsigned char>(content[0]);
    if (root_[first] < 0) root_[first] = new_node();
    int32_t node = root_[first];
    for (size_t i = 1; i < content.size(); ++i) {
      const int32_t child = find_child(node, static_cast<unsigned char>(content[i]));
      if (child >= 0) {
        node = child;
      } else {
        const int32_t created = new_node();
        nodes_[static_cast<size_t>(node)].children.emplace_back(static_cast<unsigned char>(content[i]), created);
        node = created;
      }
    }
    if (nodes_[static_cast<size_t>(node)].token < 0) nodes_[static_cast<size_t>(node)].token = token;
  }

  void find_all(std::string_view text, std::vector<AddedMatch>& out) const {
    out.clear();
    if (nodes_.empty()) return;
    for (size_t i = 0; i < text.size();) {
      int32_t node = root_[static_cast<unsigned char>(text[i])];
      size_t best_end = 0;
      int32_t best = -1;
      for (size_t j = i + 1; node >= 0; ++j) {
        if (nodes_[static_cast<size_t>(node)].token >= 0) best = nodes_[static_cast<size_t>(node)].token, best_end = j;
        if (j >= text.size()) break;
        node = find_child(node, static_cast<unsigned char>(text[j]));
      }
      if (best >= 0) {
        out.push_back({i, best_end, best});
        i = best_end;
      } else {
        ++i;
      }
    }
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> children;
    int32_t token = -1;
  };
  int32_t new_node() {
    nodes_.emplace_back();
    return static_cast<int32_t>(nodes_.size() - 1);
  }
  int32_t find_child(int32_t node, unsigned char byte) const {
    for (const auto& [b, child] : nodes_[static_cast<size_t>(node)].children)
      if (b == byte) return child;
    return -1;
  }
  std::array<int32_t, 256> root_{};
  std::vector<Node> nodes_;
};

// ---- BPE ---------------------------------------------------------------------------------------

// (left id, right id) → (rank, merged id), open addressing: the hottest lookup of encoding.
class MergeTable {
 public:
  struct Entry {
    uint32_t rank = kNone;
    int32_t merged = -1;
  };
  static constexpr uint32_t kNone = std::numeric_limits<uint32_t>::max();

  void reserve(size_t n) {
    size_t capacity = 16;
    while (capacity < 2 * n) capacity *= 2;
    keys_.assign(capacity, kEmpty);
    entries_.assign(capacity, Entry{});
    shift_ = 64 - static_cast<int>(std::countr_zero(capacity));
  }
  // Later duplicates replace earlier ones, as `tokenizers` builds its merge map.
  void insert(int32_t left, int32_t right, Entry entry) {
    const uint64_t key = pack(left, right);
    for (size_t i = slot(key);; i = (i + 1) & (keys_.size() - 1)) {
      if (keys_[i] == kEmpty || keys_[i] == key) {
        keys_[i] = key;
        entries_[i] = entry;
        return;
      }
    }
  }
  Entry find(int32_t left, int32_t right) const {
    const uint64_t key = pack(left, right);
    for (size_t i = slot(key);; i = (i + 1) & (keys_.size() - 1)) {
      if (keys_[i] == key) return entries_[i];
      if (keys_[i] == kEmpty) return Entry{};
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};
  static uint64_t pack(int32_t left, int32_t right) {
    return (uint64_t{static_cast<uint32_t>(left)} << 32) | static_cast<uint32_t>(right);
  }
  size_t slot(uint64_t key) const { return static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_); }
  std::vector<uint64_t> keys_;
  std::vector<Entry> entries_;
  int shift_ = 60;
};

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <class V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

// Pre-token → ids, shared by all threads: sharded so that threads rarely wait on one lock; a
// full shard is emptied (cheap, and a cache miss only costs one merge).
class BpeCache {
 public:
  explicit BpeCache(size_t capacity) : per_shard_(capacity / kShards), shards_(new Shard[kShards]) {}
  bool enabled() const { return per_shard_ > 0; }

  bool append_to(std::string_view word, size_t hash, std::vector<int32_t>& ids) const {
    Shard& shard = shards_[hash % kShards];
    std::lock_guard lock(shard.mutex);
    const auto it = shard.map.find(word);
    if (it == shard.map.end()) return false;
    ids.insert(ids.end(), it->second.begin(), it->second.end());
    return true;
  }
  void put(std::string_view word, size_t hash, std::span<const int32_t> ids) const {
    Shard& shard = shards_[hash % kShards];
    std::lock_guard lock(shard.mutex);
    if (shard.map.size() >= per_shard_) shard.map.clear();
    shard.map.emplace(std::string(word), std::vector<int32_t>(ids.begin(), ids.end()));
  }

 private:
  static constexpr size_t kShards = 64;
  struct Shard {
    std::mutex mutex;
    StringMap<std::vector<int32_t>> map;
  };
  size_t per_shard_;
  std::unique_ptr<Shard[]> shards_;
};

struct HeapSymbol {
  int32_t id, prev, next;
  bool alive;
};
struct MergeCandidate {
  uint64_t order;               // rank << 32 | position: lowest rank first, then leftmost
  int32_t left, right, merged;  // the pair when pushed; a popped entry whose pair changed is stale
};

// Everything one encode() call writes to; pooled so that encoding allocates little.
struct EncodeScratch {
  MatchScratch match;
  std::vector<AddedMatch> raw_matches, normalized_matches;
  std::vector<std::string_view> pieces, next_pieces;
  std::deque<std::string> owned;  // pieces made by ByteLevel's add_prefix_space
  std::vector<int32_t> symbols;
  std::vector<MergeTable::Entry> pairs;
  std::vector<HeapSymbol> heap_symbols;
  std::vector<MergeCandidate> heap;
};

class ScratchPool {
 public:
  std::unique_ptr<EncodeScratch> acquire() {
    {
      std::lock_guard lock(mutex_);
      if (!free_.empty()) {
        auto scratch = std::move(free_.back());
        free_.pop_back();
        return scratch;
      }
    }
    return std::make_unique<EncodeScratch>();
  }
  void release(std::unique_ptr<EncodeScratch> scratch) {
    std::lock_guard lock(mutex_);
    free_.push_back(std::move(scratch));
  }

 private:
  std::mutex mutex_;
  std::vector<std::unique_ptr<EncodeScratch>> free_;
};

struct PreTokenizerStep {
  std::unique_ptr<Regex> regex;  // Split's pattern, or GPT-2's for ByteLevel with use_regex
  bool byte_level = false;
  bool add_prefix_space = false;
};

// The pre-token split of GPT-2, which ByteLevel applies when use_regex is true.
constexpr const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Words at most this long are merged by rescanning all pairs (fastest for short words); longer
// ones with a heap. Both pick the lowest-ranked, then leftmost pair, so they agree exactly.
constexpr size_t kLinearMergeLimit = 48;
// `tokenizers` caches words up to 256 characters; longer ones are rare and would bloat the cache.
constexpr size_t kMaxCachedWord = 256;

constexpr uint8_t kHasToken = 1, kSpecial = 2;

}  // namespace

struct Tokenizer::Impl {
  explicit Impl(const TokenizerOptions& options) : cache(options.cache_entries) {}

  nlohmann::json config;
  std::vector<std::string> tokens;        // by id: tokenizer.json spelling
  std::vector<std::string> token_bytes;   // by id: what decode() emits
  std::vector<uint8_t> token_flags;       // by id: kHasToken | kSpecial
  StringMap<int32_t> token_ids;           // spelling → id; added tokens take precedence
  StringMap<int32_t> model_ids_by_bytes;  // raw bytes → model id (for ignore_merges)
  std::array<int32_t, 256> byte_ids{};    // the model id of each single byte, -1 when absent
  MergeTable merges;
  std::optional<int32_t> unk_id;
  bool fuse_unk = false;
  bool ignore_merges = false;

  std::vector<AddedToken> added;
  AddedTokenTrie raw_trie;           // added tokens with normalized false, matched first
  AddedTokenTrie normalized_trie;    // the rest, matched in what the first pass left
  std::unique_ptr<Regex> word_char;  // Rust's \w, for single_word; only built when needed

  std::vector<PreTokenizerStep> pre_tokenizer;
  std::vector<int32_t> prefix, suffix;  // added by encode(..., true)
  std::optional<int32_t> bos, eos;

  BpeCache cache;
  mutable ScratchPool scratch_pool;

  bool is_word_char(std::string_view text, size_t i, MatchScratch& m) const {
    size_t n = 0, begin = 0, end = 0;
    code_point_at(text, i, &n);
    return word_char->find(text.substr(i, n), 0, m, &begin, &end);
  }

  // `tokenizers`' AddedVocabulary::find_matches: calls f(piece, id) in order, id -1 for text
  // between added tokens; single_word, lstrip and rstrip as there.
  template <class F>
  void split_added(std::string_view text, const AddedTokenTrie& trie, std::vector<AddedMatch>& matches, MatchScratch& m,
                   F&& f) const {
    if (text.empty()) return;
    trie.find_all(text, matches);
    size_t start_offset = 0;
    for (const AddedMatch& match : matches) {
      const AddedToken& token = added[static_cast<size_t>(match.token)];
      size_t start = match.begin, stop = match.end;
      if (token.single_word) {
        const bool start_space = start == 0 || !is_word_char(text, previous_char_start(text, start), m);
        const bool stop_space = stop == text.size() || !is_word_char(text, stop, m);
        if (!start_space || !stop_space) continue;
      }
      if (token.lstrip) {
        size_t new_start = start;
        while (new_start > 0) {
          size_t n = 0;
          const size_t p = previous_char_start(text, new_start);
          if (!is_white_space(code_point_at(text, p, &n))) break;
          new_start = p;
        }
        start = std::max(new_start, start_offset);
      }
      if (token.rstrip) {
        size_t n = 0;
        while (stop < text.size() && is_white_space(code_point_at(text, stop, &n))) stop += n;
      }
      if (start_offset < start) f(text.substr(start_offset, start - start_offset), -1);
      f(text.substr(start, stop - start), token.id);
      start_offset = stop;
    }
    if (start_offset < text.size()) f(text.substr(start_offset), -1);
  }

  void encode_plain(std::string_view text, std::vector<int32_t>& ids, EncodeScratch& s) const {
    s.pieces.assign(1, text);
    s.owned.clear();
    for (const PreTokenizerStep& step : pre_tokenizer) {
      s.next_pieces.clear();
      for (std::string_view piece : s.pieces) {
        if (step.add_prefix_space && piece.front() != ' ') {
          std::string& spaced = s.owned.emplace_back(1, ' ');
          spaced.append(piece);
          piece = spaced;
        }
        if (step.regex) {
          split_isolated(*step.regex, piece, s.match, s.next_pieces);
        } else {
          s.next_pieces.push_back(piece);
        }
      }
      std::swap(s.pieces, s.next_pieces);
    }
    for (std::string_view piece : s.pieces) bpe(piece, ids, s);
  }

  void bpe(std::string_view word, std::vector<int32_t>& ids, EncodeScratch& s) const {
    if (ignore_merges) {
      const auto it = model_ids_by_bytes.find(word);
      if (it != model_ids_by_bytes.end()) return ids.push_back(it->second);
    }
    if (word.size() == 1 && byte_ids[static_cast<unsigned char>(word[0])] >= 0)
      return ids.push_back(byte_ids[static_cast<unsigned char>(word[0])]);
    const bool cacheable = cache.enabled() && word.size() <= kMaxCachedWord;
    const size_t hash = cacheable ? StringHash{}(word) : 0;
    if (cacheable && cache.append_to(word, hash, ids)) return;
    merge_word(word, s);
    ids.insert(ids.end(), s.symbols.begin(), s.symbols.end());
    if (cacheable) cache.put(word, hash, s.symbols);
  }

  void merge_word(std::string_view word, EncodeScratch& s) const {
    std::vector<int32_t>& symbols = s.symbols;
    symbols.clear();
    bool previous_unk = false;
    for (const char c : word) {
      const int32_t id = byte_ids[static_cast<unsigned char>(c)];
      if (id >= 0) {
        symbols.push_back(id), previous_unk = false;
      } else if (unk_id && !(fuse_unk && previous_unk)) {
        symbols.push_back(*unk_id), previous_unk = true;
      }  // no unk token: `tokenizers` drops the byte
    }
    if (symbols.size() < 2) return;
    if (symbols.size() <= kLinearMergeLimit) {
      merge_linear(s);
    } else {
      merge_heap(s);
    }
  }

  void merge_linear(EncodeScratch& s) const {
    std::vector<int32_t>& sym = s.symbols;
    std::vector<MergeTable::Entry>& pairs = s.pairs;  // pairs[i]: merge of sym[i], sym[i+1]
    pairs.resize(sym.size() - 1);
    for (size_t i = 0; i + 1 < sym.size(); ++i) pairs[i] = merges.find(sym[i], sym[i + 1]);
    while (!pairs.empty()) {
      size_t best = 0;
      for (size_t i = 1; i < pairs.size(); ++i)
        if (pairs[i].rank < pairs[best].rank) best = i;
      if (pairs[best].rank == MergeTable::kNone) break;
      sym[best] = pairs[best].merged;
      sym.erase(sym.begin() + static_cast<ptrdiff_t>(best) + 1);
      pairs.erase(pairs.begin() + static_cast<ptrdiff_t>(best));
      if (best < pairs.size()) pairs[best] = merges.find(sym[best], sym[best + 1]);
      if (best > 0) pairs[best - 1] = merges.find(sym[best - 1], sym[best]);
    }
  }

  // `tokenizers`' Word::merge_all: a min-heap of (rank, position) over a linked list of symbols.
  void merge_heap(EncodeScratch& s) const {
    std::vector<HeapSymbol>& sym = s.heap_symbols;
    std::vector<MergeCandidate>& heap = s.heap;
    const auto later = [](const MergeCandidate& a, const MergeCandidate& b) { return a.order > b.order; };
    const auto add = [&](int32_t pos) {
      const HeapSymbol& left = sym[static_cast<size_t>(pos)];
      const int32_t right = sym[static_cast<size_t>(left.next)].id;
      const MergeTable::Entry e = merges.find(left.id, right);
      if (e.rank == MergeTable::kNone) return false;
      heap.push_back({(uint64_t{e.rank} << 32) | static_cast<uint32_t>(pos), left.id, right, e.merged});
      return true;
    };
    const auto push = [&](int32_t pos) {
      if (add(pos)) std::push_heap(heap.begin(), heap.end(), later);
    };
    const auto n = static_cast<int32_t>(s.symbols.size());
    sym.resize(s.symbols.size());
    for (int32_t i = 0; i < n; ++i)
      sym[static_cast<size_t>(i)] = {s.symbols[static_cast<size_t>(i)], i - 1, i + 1 < n ? i + 1 : -1, true};
    heap.clear();
    for (int32_t i = 0; i + 1 < n; ++i) add(i);
    std::make_heap(heap.begin(), heap.end(), later);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), later);
      const MergeCandidate top = heap.back();
      heap.pop_back();
      const auto pos = static_cast<int32_t>(top.order & 0xFFFFFFFFu);
      HeapSymbol& cur = sym[static_cast<size_t>(pos)];
      if (!cur.alive || cur.next < 0 || cur.id != top.left) continue;
      HeapSymbol& right = sym[static_cast<size_t>(cur.next)];
      if (right.id != top.right) continue;
      cur.id = top.merged;
      right.alive = false;
      cur.next = right.next;
      if (cur.next >= 0) sym[static_cast<size_t>(cur.next)].prev = pos;
      if (cur.prev >= 0) push(cur.prev);
      if (cur.next >= 0) push(pos);
    }
    s.symbols.clear();
    for (int32_t i = 0; i >= 0; i = sym[static_cast<size_t>(i)].next)
      s.symbols.push_back(sym[static_cast<size_t>(i)].id);
  }
};

// ---- Loading -----------------------------------------------------------------------------------

namespace {

// Reads typed fields of tokenizer.json / tokenizer_config.json; every message names the file and
// the path of the field inside it.
class Reader {
 public:
  explicit Reader(std::string file) : file_(std::move(file)) {}

  [[noreturn]] void fail(const std::string& where, const std::string& what) const {
    throw UserError(file_ + ": " + where + " " + what);
  }
  std::string at(const std::string& where) const { return file_ + ": " + where; }
  static std::string field(const std::string& where, const std::string& key) {
    return where.empty() ? key : where + "." + key;
  }
  const json* find(const json& obj, const std::string& key) const {
    const auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }
  const json& object(const json& obj, const std::string& key, const std::string& where) const {
    const json* v = find(obj, key);
    if (!v) fail(field(where, key), "is missing");
    if (!v->is_object()) fail(field(where, key), "must be an object, got " + v->dump().substr(0, 80));
    return *v;
  }
  const json& array(const json& obj, const std::string& key, const std::string& where) const {
    const json* v = find(obj, key);
    if (!v || !v->is_array()) fail(field(where, key), "must be a list");
    return *v;
  }
  std::string string(const json& obj, const std::string& key, const std::string& where) const {
    const json* v = find(obj, key);
    if (!v || !v->is_string()) fail(field(where, key), "must be a string");
    return v->get<std::string>();
  }
  bool boolean(const json& obj, const std::string& key, bool fallback, const std::string& where) const {
    const json* v = find(obj, key);
    if (!v) return fallback;
    if (!v->is_boolean()) fail(field(where, key), "must be true or false, got " + v->dump());
    return v->get<bool>();
  }
  int32_t id(const json& v, const std::string& where) const {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= kMaxId)
      fail(where, "must be a token id in [0, " + std::to_string(kMaxId) + "), got " + v.dump());
    return static_cast<int32_t>(v.get<int64_t>());
  }
  [[noreturn]] void unsupported(const std::string& where, const std::string& type, const std::string& supported) const {
    fail(where, "has type '" + type + "', which dilu does not support (it supports " + supported +
                    "); dilu reads byte-level BPE tokenizers such as DeepSeek-V3's");
  }

  static constexpr int64_t kMaxId = int64_t{1} << 26;

 private:
  std::string file_;
};

void read_normalizer(const Reader& r, const json& j) {
  const json* n = r.find(j, "normalizer");
  if (!n) return;
  const std::string type = r.string(*n, "type", "normalizer");
  // An empty Sequence (DeepSeek-V3's) does nothing; real normalizers (NFC, NFKC, Lowercase...)
  // would need Unicode tables dilu does not carry.
  if (type == "Sequence" && r.array(*n, "normalizers", "normalizer").empty()) return;
  r.unsupported("normalizer", type, "null or an empty Sequence");
}

void read_pre_tokenizer_step(const Reader& r, const json& p, const std::string& where, bool last,
                             std::vector<PreTokenizerStep>& steps) {
  const std::string type = r.string(p, "type", where);
  if (type == "Sequence") {
    const json& list = r.array(p, "pretokenizers", where);
    for (size_t i = 0; i < list.size(); ++i)
      read_pre_tokenizer_step(r, list[i], where + ".pretokenizers[" + std::to_string(i) + "]",
                              last && i + 1 == list.size(), steps);
    return;
  }
  PreTokenizerStep step;
  if (type == "Split") {
    const std::string behavior = r.string(p, "behavior", where);
    // `invert` only swaps which pieces count as matches; with Isolated every piece is kept.
    if (behavior != "Isolated")
      r.fail(where + ".behavior", "is '" + behavior + "', which dilu does not support (it supports Isolated)");
    const json& pattern = r.object(p, "pattern", where);
    if (const json* regex = r.find(pattern, "Regex"); regex && regex->is_string()) {
      step.regex = std::make_unique<Regex>(regex->get<std::string>(), false, r.at(where + ".pattern"));
    } else if (const json* literal = r.find(pattern, "String"); literal && literal->is_string()) {
      step.regex = std::make_unique<Regex>(literal->get<std::string>(), true, r.at(where + ".pattern"));
    } else {
      r.fail(where + ".pattern", "must be {\"Regex\": ...} or {\"String\": ...}");
    }
  } else if (type == "ByteLevel") {
    step.byte_level = true;
    step.add_prefix_space = r.boolean(p, "add_prefix_space", true, where);
    if (r.boolean(p, "use_regex", true, where)) step.regex = std::make_unique<Regex>(kGpt2Pattern, false, r.at(where));
  } else {
    r.unsupported(where, type, "Split, ByteLevel and Sequence");
  }
  if (step.byte_level && !last)
    r.fail(where, "is followed by other pre-tokenizers; dilu needs ByteLevel to be the last one");
  steps.push_back(std::move(step));
}

// TemplateProcessing's "single" template → the special ids around the sequence.
void read_template(const Reader& r, const json& p, const std::string& where, std::vector<int32_t>& prefix,
                   std::vector<int32_t>& suffix) {
  const json& single = r.array(p, "single", where);
  const json& specials = r.object(p, "special_tokens", where);
  bool seen_sequence = false;
  for (size_t i = 0; i < single.size(); ++i) {
    const std::string item = where + ".single[" + std::to_string(i) + "]";
    if (r.find(single[i], "Sequence")) {
      seen_sequence = true;
    } else if (const json* special = r.find(single[i], "SpecialToken")) {
      const std::string name = r.string(*special, "id", item + ".SpecialToken");
      const json& entry = r.object(specials, name, where + ".special_tokens");
      for (const json& id : r.array(entry, "ids", where + ".special_tokens." + name))
        (seen_sequence ? suffix : prefix).push_back(r.id(id, where + ".special_tokens." + name + ".ids[]"));
    } else {
      r.fail(item, "must hold a Sequence or a SpecialToken");
    }
  }
}

void read_post_processor(const Reader& r, const json& p, const std::string& where, std::vector<int32_t>& prefix,
                         std::vector<int32_t>& suffix) {
  const std::string type = r.string(p, "type", where);
  if (type == "ByteLevel") return;  // only adjusts offsets, which dilu does not report
  if (type == "TemplateProcessing") return read_template(r, p, where, prefix, suffix);
  if (type == "Sequence") {
    const json& list = r.array(p, "processors", where);
    for (size_t i = 0; i < list.size(); ++i)
      read_post_processor(r, list[i], where + ".processors[" + std::to_string(i) + "]", prefix, suffix);
    return;
  }
  r.unsupported(where, type, "ByteLevel, TemplateProcessing and Sequence");
}

// A tokenizer_config token entry: a string, or an AddedToken object with "content".
std::optional<std::string> config_token(const Reader& r, const json& config, const std::string& key) {
  const json* v = r.find(config, key);
  if (!v) return std::nullopt;
  if (v->is_string()) return v->get<std::string>();
  if (v->is_object()) return r.string(*v, "content", key);
  r.fail(key, "must be a string or an object with \"content\", got " + v->dump());
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::load(const fs::path& model_dir, const TokenizerOptions& options) {
  const fs::path path = model_dir / "tokenizer.json";
  std::error_code ec;
  if (!fs::exists(path, ec)) return nullptr;
  const json j = read_json_file(path);
  const Reader r(path.string());
  if (!j.is_object()) r.fail("the top level", "must be a JSON object");
  auto m = std::make_unique<Impl>(options);

  read_normalizer(r, j);

  // Model: vocabulary and merges.
  const json& model = r.object(j, "model", "");
  if (const json* type = r.find(model, "type"); type && *type != "BPE")
    r.unsupported("model", type->is_string() ? type->get<std::string>() : type->dump(), "BPE");
  if (const json* dropout = r.find(model, "dropout");
      dropout && !(dropout->is_number() && dropout->get<double>() == 0.0))
    r.fail("model.dropout", "is " + dropout->dump() + "; dilu supports only BPE without dropout (null)");
  if (r.boolean(model, "byte_fallback", false, "model"))
    r.fail("model.byte_fallback", "is true; dilu supports byte-level BPE, which needs no byte fallback");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (const json* v = r.find(model, key); v && *v != "")
      r.fail(std::string("model.") + key, "is set; dilu does not support it");
  m->fuse_unk = r.boolean(model, "fuse_unk", false, "model");
  m->ignore_merges = r.boolean(model, "ignore_merges", false, "model");

  const json& vocab = r.object(model, "vocab", "model");
  StringMap<int32_t> model_ids;
  model_ids.reserve(vocab.size());
  int64_t max_id = -1;
  for (const auto& [token, id_json] : vocab.items()) {
    const int32_t id = r.id(id_json, "model.vocab[\"" + token + "\"]");
    model_ids.emplace(token, id);
    max_id = std::max<int64_t>(max_id, id);
  }
  if (const json* unk = r.find(model, "unk_token")) {
    if (!unk->is_string() || !model_ids.contains(unk->get<std::string>()))
      r.fail("model.unk_token", "must name a token of model.vocab, got " + unk->dump());
    m->unk_id = model_ids.at(unk->get<std::string>());
  }

  const json& merges = r.array(model, "merges", "model");
  m->merges.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const json& merge = merges[rank];
    const std::string where = "model.merges[" + std::to_string(rank) + "]";
    std::string left, right;
    if (merge.is_string()) {  // "a b" (tokenizers < 0.20)
      const auto text = merge.get<std::string>();
      const size_t space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos)
        r.fail(where, "must be two tokens separated by one space, got " + merge.dump());
      left = text.substr(0, space), right = text.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {  // ["a", "b"]
      left = merge[0].get<std::string>(), right = merge[1].get<std::string>();
    } else {
      r.fail(where, "must be \"a b\" or [\"a\", \"b\"], got " + merge.dump().substr(0, 80));
    }
    const auto l = model_ids.find(left), rt = model_ids.find(right), merged = model_ids.find(left + right);
    if (l == model_ids.end() || rt == model_ids.end() || merged == model_ids.end())
      r.fail(where, "(" + merge.dump() + ") uses or makes a token that is not in model.vocab");
    m->merges.insert(l->second, rt->second, {static_cast<uint32_t>(rank), merged->second});
  }

  // Added tokens.
  if (const json* added = r.find(j, "added_tokens")) {
    if (!added->is_array()) r.fail("added_tokens", "must be a list");
    for (size_t i = 0; i < added->size(); ++i) {
      const json& a = (*added)[i];
      const std::string where = "added_tokens[" + std::to_string(i) + "]";
      AddedToken t;
      t.content = r.string(a, "content", where);
      t.id = r.id(a.contains("id") ? a.at("id") : json(), where + ".id");
      t.special = r.boolean(a, "special", false, where);
      t.single_word = r.boolean(a, "single_word", false, where);
      t.lstrip = r.boolean(a, "lstrip", false, where);
      t.rstrip = r.boolean(a, "rstrip", false, where);
      t.normalized = r.boolean(a, "normalized", !t.special, where);
      max_id = std::max<int64_t>(max_id, t.id);
      m->added.push_back(std::move(t));
    }
  }

  // Id tables. Decoding follows the ByteLevel decoder: a token made only of byte-level characters
  // stands for those bytes, any other token (e.g. "<｜User｜>") for its own UTF-8 text.
  const auto size = static_cast<size_t>(max_id + 1);
  m->tokens.resize(size);
  m->token_bytes.resize(size);
  m->token_flags.assign(size, 0);
  m->byte_ids.fill(-1);
  m->model_ids_by_bytes.reserve(model_ids.size());
  for (const auto& [token, id] : model_ids) {
    const auto i = static_cast<size_t>(id);
    m->tokens[i] = token;
    m->token_flags[i] = kHasToken;
    const std::optional<std::string> bytes = byte_level_decode(token);
    m->token_bytes[i] = bytes.value_or(token);
    if (bytes) {
      if (bytes->size() == 1) m->byte_ids[static_cast<unsigned char>((*bytes)[0])] = id;
      m->model_ids_by_bytes.emplace(*bytes, id);
    }
  }
  m->token_ids = std::move(model_ids);
  for (size_t i = 0; i < m->added.size(); ++i) {
    const AddedToken& t = m->added[i];
    const auto id = static_cast<size_t>(t.id);
    m->tokens[id] = t.content;
    m->token_bytes[id] = byte_level_decode(t.content).value_or(t.content);
    m->token_flags[id] = static_cast<uint8_t>(kHasToken | (t.special ? kSpecial : 0));
    m->token_ids.insert_or_assign(t.content, t.id);
    (t.normalized ? m->normalized_trie : m->raw_trie).add(t.content, static_cast<int32_t>(i));
    if (t.single_word && !m->word_char)  // Rust regex's Unicode \w
      m->word_char =
          std::make_unique<Regex>(R"(\A[\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}])", false, "added_tokens");
  }

  // Pre-tokenizer: must end with ByteLevel, so that pieces can be merged as raw bytes.
  const json* pre = r.find(j, "pre_tokenizer");
  if (!pre) r.fail("pre_tokenizer", "is null; dilu needs a ByteLevel pre-tokenizer (byte-level BPE)");
  read_pre_tokenizer_step(r, *pre, "pre_tokenizer", true, m->pre_tokenizer);
  if (m->pre_tokenizer.empty() || !m->pre_tokenizer.back().byte_level)
    r.fail("pre_tokenizer", "has no ByteLevel step; dilu supports byte-level BPE only");

  const json* decoder = r.find(j, "decoder");
  if (!decoder) r.fail("decoder", "is null; dilu needs the ByteLevel decoder (byte-level BPE)");
  if (const std::string type = r.string(*decoder, "type", "decoder"); type != "ByteLevel")
    r.unsupported("decoder", type, "ByteLevel");

  std::vector<int32_t> template_prefix, template_suffix;
  if (const json* post = r.find(j, "post_processor"))
    read_post_processor(r, *post, "post_processor", template_prefix, template_suffix);

  // tokenizer_config.json: bos/eos, and what encode(..., add_special_tokens) adds.
  const fs::path config_path = model_dir / "tokenizer_config.json";
  m->config = fs::exists(config_path, ec) ? read_json_file(config_path) : json::object();
  const Reader c(config_path.string());
  if (!m->config.is_object()) c.fail("the top level", "must be a JSON object");
  const auto config_id = [&](const std::string& key) -> std::optional<int32_t> {
    const std::optional<std::string> token = config_token(c, m->config, key);
    if (!token) return std::nullopt;
    const auto it = m->token_ids.find(*token);
    if (it == m->token_ids.end()) c.fail(key, "'" + *token + "' is not a token of " + path.string());
    return it->second;
  };
  m->bos = config_id("bos_token");
  m->eos = config_id("eos_token");
  // transformers' LlamaTokenizerFast (DeepSeek's tokenizer_class) rebuilds the post-processor from
  // add_bos_token (default true) and add_eos_token (default false); other classes keep the file's.
  const std::string tokenizer_class = r.find(m->config, "tokenizer_class") && m->config["tokenizer_class"].is_string()
                                          ? m->config["tokenizer_class"].get<std::string>()
                                          : "";
  const bool llama_style = tokenizer_class.starts_with("LlamaTokenizer") ||
                           tokenizer_class.starts_with("CodeLlamaTokenizer") || r.find(m->config, "add_bos_token") ||
                           r.find(m->config, "add_eos_token");
  if (llama_style) {
    if (c.boolean(m->config, "add_bos_token", true, "")) {
      if (!m->bos) c.fail("add_bos_token", "is true but bos_token is not set; set bos_token or add_bos_token: false");
      m->prefix.push_back(*m->bos);
    }
    if (c.boolean(m->config, "add_eos_token", false, "")) {
      if (!m->eos) c.fail("add_eos_token", "is true but eos_token is not set; set eos_token or add_eos_token: false");
      m->suffix.push_back(*m->eos);
    }
  } else {
    m->prefix = std::move(template_prefix);
    m->suffix = std::move(template_suffix);
  }
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(m)));
}

// ---- Encoding and decoding ---------------------------------------------------------------------

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  const Impl& m = *impl_;
  check_utf8(text);
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  if (add_special_tokens) ids.insert(ids.end(), m.prefix.begin(), m.prefix.end());
  std::unique_ptr<EncodeScratch> s = m.scratch_pool.acquire();
  try {
    m.split_added(text, m.raw_trie, s->raw_matches, s->match, [&](std::string_view piece, int32_t id) {
      if (id >= 0) return ids.push_back(id);
      m.split_added(piece, m.normalized_trie, s->normalized_matches, s->match, [&](std::string_view rest, int32_t id2) {
        if (id2 >= 0) return ids.push_back(id2);
        m.encode_plain(rest, ids, *s);
      });
    });
  } catch (...) {
    m.scratch_pool.release(std::move(s));
    throw;
  }
  m.scratch_pool.release(std::move(s));
  if (add_special_tokens) ids.insert(ids.end(), m.suffix.begin(), m.suffix.end());
  return ids;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  const Impl& m = *impl_;
  std::string bytes;
  for (const int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= m.tokens.size()) continue;
    const uint8_t flags = m.token_flags[static_cast<size_t>(id)];
    if (!(flags & kHasToken) || (skip_special_tokens && (flags & kSpecial))) continue;
    bytes += m.token_bytes[static_cast<size_t>(id)];
  }
  std::string text;
  text.reserve(bytes.size());
  append_utf8_lossy(bytes, true, text);
  return text;
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  const auto it = impl_->token_ids.find(token);
  return it == impl_->token_ids.end() ? std::nullopt : std::optional<int32_t>(it->second);
}

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= impl_->tokens.size() ||
      !(impl_->token_flags[static_cast<size_t>(id)] & kHasToken))
    return std::nullopt;
  return impl_->tokens[static_cast<size_t>(id)];
}

std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos; }
bool Tokenizer::add_bos_token() const {
  return impl_->bos && !impl_->prefix.empty() && impl_->prefix.front() == *impl_->bos;
}
int64_t Tokenizer::vocab_size() const { return static_cast<int64_t>(impl_->tokens.size()); }
const nlohmann::json& Tokenizer::config() const { return impl_->config; }

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->tokens.size() &&
         (impl_->token_flags[static_cast<size_t>(id)] & kSpecial);
}

DecodeStream::DecodeStream(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(&tokenizer), skip_special_tokens_(skip_special_tokens) {}

std::string DecodeStream::push(int32_t id) {
  const Tokenizer::Impl& m = *tokenizer_->impl_;
  if (id < 0 || static_cast<size_t>(id) >= m.tokens.size()) return {};
  const uint8_t flags = m.token_flags[static_cast<size_t>(id)];
  if (!(flags & kHasToken) || (skip_special_tokens_ && (flags & kSpecial))) return {};
  pending_ += m.token_bytes[static_cast<size_t>(id)];
  std::string text;
  pending_.erase(0, append_utf8_lossy(pending_, false, text));
  return text;
}

std::string DecodeStream::flush() {
  std::string text;
  append_utf8_lossy(pending_, true, text);
  pending_.clear();
  return text;
}

}  // namespace dilu
