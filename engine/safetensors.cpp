// Memory-mapped, bounds-checked safetensors reading (see safetensors.h).
#include "engine/safetensors.h"

#include <cmath>

#include "engine/model_config.h"
#include "engine/weight_names.h"
#include "kernels/ops.h"
#include "kernels/random_fill.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include <nlohmann/json.hpp>

#include "engine/json_file.h"
#include "kernels/error.h"

namespace dilu {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // the format's own limit
const char* kRegenerate = "; the file is damaged or incomplete: copy or download it again";
}  // namespace

std::map<std::string, TensorInfo> parse_safetensors_header(std::string_view header_json, size_t data_size,
                                                           const std::string& origin) {
  json h;
  try {
    h = json::parse(header_json);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e400
    throw UserError(origin + ": safetensors header is not valid JSON (" + e.what() + ")" + kRegenerate);
  }
  DILU_USER_CHECK(h.is_object(), origin, ": safetensors header is not a JSON object", kRegenerate);
  std::map<std::string, TensorInfo> out;
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string where = origin + ": tensor '" + it.key() + "'";
    const json& e = it.value();
    DILU_USER_CHECK(e.is_object() && e.contains("dtype") && e.contains("shape") && e.contains("data_offsets"), where,
                    " needs dtype, shape and data_offsets", kRegenerate);
    DILU_USER_CHECK(e["dtype"].is_string(), where, ": dtype is not a string");
    auto dtype = dtype_from_name(e["dtype"].get<std::string>());
    DILU_USER_CHECK(dtype.has_value(), where, ": dtype ", e["dtype"].dump(),
                    " is not supported (dilu reads F32, BF16, F16, F8_E4M3, I32, I64, U8)");
    TensorInfo t;
    t.name = it.key();
    t.dtype = *dtype;
    DILU_USER_CHECK(e["shape"].is_array(), where, ": shape is not a list");
    uint64_t numel = 1;
    for (const json& d : e["shape"]) {
      DILU_USER_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0), where,
                      ": shape holds ", d.dump(), ", not a non-negative integer");
      uint64_t v = d.get<uint64_t>();
      DILU_USER_CHECK(v == 0 || numel <= std::numeric_limits<uint64_t>::max() / v, where, ": shape overflows");
      numel *= v;
      t.shape.push_back(static_cast<int64_t>(v));
    }
    const json& off = e["data_offsets"];
    DILU_USER_CHECK(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(),
                    where, ": data_offsets must be two non-negative integers", kRegenerate);
    uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
    DILU_USER_CHECK(b <= en && en <= data_size, where, ": data_offsets [", b, ", ", en,
                    "] point outside the file's data section of ", data_size, " bytes", kRegenerate);
    DILU_USER_CHECK(numel <= std::numeric_limits<uint64_t>::max() / dtype_size(t.dtype) &&
                        en - b == numel * dtype_size(t.dtype),
                    where, ": data_offsets span ", en - b, " bytes but shape ", shape_str(t.shape), " of ",
                    dtype_name(t.dtype), " needs ", numel * dtype_size(t.dtype), kRegenerate);
    t.begin = static_cast<size_t>(b);
    t.end = static_cast<size_t>(en);
    out.emplace(t.name, std::move(t));
  }
  // Tensors must not overlap (zero-sized ones may sit anywhere).
  std::vector<const TensorInfo*> by_offset;
  for (const auto& [name, t] : out)
    if (t.end > t.begin) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i)
    DILU_USER_CHECK(by_offset[i]->begin >= by_offset[i - 1]->end, origin, ": tensors '", by_offset[i - 1]->name,
                    "' and '", by_offset[i]->name, "' overlap in the file", kRegenerate);
  return out;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const fs::path& path) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->self_ = f;
  f->path_ = path;
  const std::string origin = path.string();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  DILU_USER_CHECK(fd >= 0, "cannot open '", origin, "': ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw UserError("cannot stat '" + origin + "': " + std::strerror(errno));
  }
  f->size_ = static_cast<size_t>(st.st_size);
  if (f->size_ > 0) {
    void* p = ::mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    DILU_USER_CHECK(p != MAP_FAILED, "cannot map '", origin, "': ", std::strerror(errno));
    f->map_ = static_cast<const uint8_t*>(p);
  } else {
    ::close(fd);
  }
  DILU_USER_CHECK(f->size_ >= 8, origin, ": file is ", f->size_, " bytes, too short for a safetensors header",
                  kRegenerate);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | f->map_[i];
  DILU_USER_CHECK(header_len <= kMaxHeaderBytes && header_len <= f->size_ - 8, origin, ": header length ", header_len,
                  " does not fit in a file of ", f->size_, " bytes", kRegenerate);
  f->data_start_ = 8 + static_cast<size_t>(header_len);
  std::string_view header(reinterpret_cast<const char*>(f->map_ + 8), static_cast<size_t>(header_len));
  f->tensors_ = parse_safetensors_header(header, f->size_ - f->data_start_, origin);
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(const_cast<uint8_t*>(map_), size_);
}

Tensor SafetensorsFile::tensor(const std::string& name) const {
  auto it = tensors_.find(name);
  DILU_CHECK(it != tensors_.end(), "tensor ", name, " not in ", path_.string());
  const TensorInfo& t = it->second;
  const uint8_t* p = map_ + data_start_ + t.begin;
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(t.dtype) != 0) {
    Tensor copy = Tensor::host(t.dtype, t.shape);
    if (t.end > t.begin) std::memcpy(copy.raw(), p, t.end - t.begin);  // an empty tensor has no buffer
    return copy;
  }
  std::shared_ptr<const void> keep = self_.lock();
  return Tensor(const_cast<uint8_t*>(p), t.dtype, t.shape, Device{}, std::move(keep));
}

Checkpoint Checkpoint::open(const fs::path& model_dir) {
  DILU_USER_CHECK(fs::is_directory(model_dir), "model directory '", model_dir.string(),
                  "' does not exist or is not a directory");
  Checkpoint c;
  c.dir_ = model_dir;
  const fs::path index_path = model_dir / "model.safetensors.index.json";
  std::vector<fs::path> shard_paths;
  std::map<std::string, std::string> weight_map;
  if (fs::exists(index_path)) {
    const json j = read_json_file(index_path);
    DILU_USER_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), index_path.string(),
                    ": needs a \"weight_map\" object mapping tensor names to shard files");
    std::vector<std::string> missing;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      DILU_USER_CHECK(it.value().is_string(), index_path.string(), ": weight_map entry '", it.key(),
                      "' is not a file name");
      std::string file = it.value().get<std::string>();
      DILU_USER_CHECK(file.find('/') == std::string::npos && file != ".." && !file.empty(), index_path.string(),
                      ": weight_map entry '", it.key(), "' names '", file, "', which is not a file in the directory");
      weight_map[it.key()] = file;
      if (std::find(shard_paths.begin(), shard_paths.end(), model_dir / file) == shard_paths.end()) {
        std::error_code ec;  // a name the file system refuses (too long: ENAMETOOLONG) is missing too
        if (!fs::exists(model_dir / file, ec)) missing.push_back(file);
        shard_paths.push_back(model_dir / file);
      }
    }
    if (!missing.empty()) {
      std::string list;
      for (const auto& m : missing) list += "\n  " + m;
      throw UserError(index_path.string() + " names " + std::to_string(missing.size()) +
                      " shard file(s) that are not in " + model_dir.string() + ":" + list +
                      "\nDownload the missing shards or fix the index.");
    }
  } else {
    for (const auto& e : fs::directory_iterator(model_dir))
      if (e.path().extension() == ".safetensors") shard_paths.push_back(e.path());
    std::sort(shard_paths.begin(), shard_paths.end());
    DILU_USER_CHECK(!shard_paths.empty(), model_dir.string(),
                    " holds no model.safetensors.index.json and no *.safetensors files");
  }
  for (const auto& p : shard_paths) {
    auto f = SafetensorsFile::open(p);
    for (const auto& [name, info] : f->tensors()) {
      auto prev = c.where_.find(name);
      DILU_USER_CHECK(prev == c.where_.end(), "tensor '", name, "' is stored twice: in ", prev->second->path().string(),
                      " and ", p.string());
      if (!weight_map.empty()) {
        auto w = weight_map.find(name);
        DILU_USER_CHECK(w != weight_map.end() && model_dir / w->second == p, p.string(), " holds tensor '", name,
                        "' but ", index_path.string(), " places it ",
                        w == weight_map.end() ? std::string("nowhere") : "in " + w->second);
      }
      c.where_[name] = f.get();
    }
    c.files_.push_back(std::move(f));
  }
  for (const auto& [name, file] : weight_map)
    DILU_USER_CHECK(c.where_.count(name), index_path.string(), " places tensor '", name, "' in ", file,
                    " but that file does not hold it");
  return c;
}

Checkpoint Checkpoint::synthetic(const ModelConfig& config, Ops& ops, uint64_t seed) {
  Checkpoint c;
  c.dir_ = "<random weights>";
  c.ops_ = &ops;
  const float sqrt3 = std::sqrt(3.0f);  // a uniform [-a, a] has std a / sqrt(3)
  auto key_of = [&](const std::string& name) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const char ch : name) h = (h ^ static_cast<unsigned char>(ch)) * 0x100000001b3ULL;
    return random_fill_mix(h ^ random_fill_mix(seed));
  };
  auto add = [&](const std::string& name, DType dtype, Shape shape, float center, float half_width) {
    TensorInfo info;
    info.name = name;
    info.dtype = dtype;
    info.shape = std::move(shape);
    c.synthetic_[name] = {info, Recipe{key_of(name), center, half_width}};
  };
  for (const WeightSpec& spec : model_weight_specs(config)) {
    if (spec.name.ends_with("e_score_correction_bias")) {
      add(spec.name, DType::F32, spec.shape, 0.0f, 0.05f);
    } else if (spec.shape.size() == 1) {
      add(spec.name, DType::BF16, spec.shape, 1.0f, 0.05f);
    } else if (spec.name == "model.embed_tokens.weight") {
      add(spec.name, DType::BF16, spec.shape, 0.0f, sqrt3);
    } else {
      const float std_a = sqrt3 / std::sqrt(static_cast<float>(spec.shape[1]));
      if (config.quantization && spec.fp8_in_r1) {
        // FP8 codes spread over the whole e4m3 range; one scale per block brings them to std_a.
        add(spec.name, DType::F8E4M3, spec.shape, 0.0f, 448.0f);
        add(scale_name(spec.name), DType::F32, scale_shape(spec.shape, *config.quantization), std_a / 448.0f, 0.0f);
      } else {
        add(spec.name, DType::BF16, spec.shape, 0.0f, std_a);
      }
    }
  }
  return c;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size() + synthetic_.size());
  for (const auto& [name, f] : where_) out.push_back(name);
  for (const auto& [name, recipe] : synthetic_) out.push_back(name);
  return out;
}

const TensorInfo& Checkpoint::info(const std::string& name) const {
  if (auto s = synthetic_.find(name); s != synthetic_.end()) return s->second.first;
  auto it = where_.find(name);
  DILU_CHECK(it != where_.end(), "tensor ", name, " not in checkpoint ", dir_.string());
  return it->second->tensors().at(name);
}

Tensor Checkpoint::tensor(const std::string& name) const {
  if (auto s = synthetic_.find(name); s != synthetic_.end()) {
    const auto& [info, r] = s->second;
    return ops_->random_fill(info.dtype, info.shape, r.key, r.center, r.half_width);
  }
  auto it = where_.find(name);
  DILU_CHECK(it != where_.end(), "tensor ", name, " not in checkpoint ", dir_.string());
  return it->second->tensor(name);
}

}  // namespace dilu
