// Fuzz target: model.safetensors.index.json, opened by Checkpoint::open beside two valid shards
// (and a few other files a checkpoint directory holds), as `dilu run` opens a model directory.
//
// What must hold for any index text: Checkpoint::open refuses it with a UserError, or the
// checkpoint it opens maps every tensor name of the index to the shard that really holds it, and
// every tensor it lists can be read.
#include <cstdint>
#include <set>
#include <string>

#include <nlohmann/json.hpp>

#include "engine/safetensors.h"
#include "fuzz/fuzz_util.h"

using namespace dilu;
using json = nlohmann::json;

namespace {

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

std::string shard(const json& header, const std::string& data) {
  const std::string h = header.dump();
  return le64(h.size()) + h + data;
}

// The directory: two shards as the seeds' index describes them, a config.json, a stray file.
const fuzz::fs::path& model_dir() {
  static const fuzz::fs::path dir = [] {
    const fuzz::fs::path d = fuzz::scratch() / "model";
    fuzz::fs::create_directories(d);
    const auto entry = [](const char* dtype, json shape, size_t b, size_t e) {
      return json{{"dtype", dtype}, {"shape", std::move(shape)}, {"data_offsets", {b, e}}};
    };
    fuzz::write_file(d / "model-00001-of-00002.safetensors",
                     shard({{"__metadata__", {{"format", "pt"}}},
                            {"a.weight", entry("F32", {2, 2}, 0, 16)},
                            {"b.bias", entry("BF16", {3}, 16, 22)}},
                           std::string(22, '\1')));
    fuzz::write_file(d / "model-00002-of-00002.safetensors",
                     shard({{"c.weight", entry("U8", {4}, 0, 4)}, {"empty", entry("F32", {0}, 4, 4)}},
                           std::string(4, '\2')));
    fuzz::write_file(d / "config.json", "{}");
    fuzz::write_file(d / "notes.txt", "not a shard");
    fuzz::fs::create_directories(d / "subdir");
    return d;
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fuzz::fs::path& dir = model_dir();
  fuzz::write_file(dir / "model.safetensors.index.json", std::string_view(reinterpret_cast<const char*>(data), size));
  std::optional<Checkpoint> c;
  if (!fuzz::user_errors_only([&] { c.emplace(Checkpoint::open(dir)); })) return 0;

  // Accepted: the index is a JSON object whose weight_map names exactly the tensors of the files
  // it names (the loader checked both directions).
  const json index = json::parse(std::string_view(reinterpret_cast<const char*>(data), size));
  const json& map = index.at("weight_map");
  std::set<std::string> names;
  for (auto it = map.begin(); it != map.end(); ++it) {
    names.insert(it.key());
    DILU_FUZZ_ASSERT(c->contains(it.key()), "index entry not in the checkpoint: " + it.key());
  }
  for (const std::string& n : c->names()) {
    DILU_FUZZ_ASSERT(names.count(n) == 1, "checkpoint tensor missing from the index: " + n);
    const TensorInfo& info = c->info(n);
    Tensor t = c->tensor(n);
    DILU_FUZZ_ASSERT(t.nbytes() == info.end - info.begin, n + ": size differs from its span");
    volatile uint8_t sink = t.nbytes() ? static_cast<const uint8_t*>(t.raw())[t.nbytes() - 1] : 0;
    (void)sink;
  }
  return 0;
}
