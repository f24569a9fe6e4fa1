// Memory-mapped safetensors reader: one file, or a sharded checkpoint through
// model.safetensors.index.json. Every header is bounds-checked against its file before any
// tensor is handed out, so a truncated or hostile file is rejected, never read out of bounds.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/tensor.h"

namespace dilu {

struct TensorInfo {
  std::string name;
  DType dtype;
  Shape shape;
  size_t begin = 0;  // byte offsets into the file's data section
  size_t end = 0;
};

class SafetensorsFile {
 public:
  // Maps the file and validates its header; throws UserError naming the file and the problem.
  static std::shared_ptr<SafetensorsFile> open(const std::filesystem::path& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  // A host tensor viewing the mapped bytes (copied only if the data is misaligned for its type).
  Tensor tensor(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  std::filesystem::path path_;
  const uint8_t* map_ = nullptr;
  size_t size_ = 0;
  size_t data_start_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::weak_ptr<SafetensorsFile> self_;
};

// Parses and checks a header (the JSON text) against the data section's size. Exposed for tests
// and fuzzing; `origin` names the file in messages.
std::map<std::string, TensorInfo> parse_safetensors_header(std::string_view header_json, size_t data_size,
                                                           const std::string& origin);

struct ModelConfig;
class Ops;

class Checkpoint {
 public:
  // Opens model.safetensors.index.json when present, else every *.safetensors in the directory.
  static Checkpoint open(const std::filesystem::path& model_dir);
  // A checkpoint without files, for benchmarks: every tensor `config` implies (FP8 with block
  // scales where R1 has them when config.quantization is set, BF16 otherwise, the router bias
  // F32), made on demand on `ops`'s device by Ops::random_fill with make-model's scales (linear
  // weights of std 1/sqrt(in), embeddings std 1, norms near 1). `ops` must outlive it.
  static Checkpoint synthetic(const ModelConfig& config, Ops& ops, uint64_t seed);

  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return where_.count(name) != 0 || synthetic_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;
  Tensor tensor(const std::string& name) const;
  const std::filesystem::path& dir() const { return dir_; }

 private:
  std::filesystem::path dir_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> where_;
  // Synthetic checkpoints: each tensor's info and how to make it.
  struct Recipe {
    uint64_t key = 0;
    float center = 0, half_width = 0;
  };
  std::map<std::string, std::pair<TensorInfo, Recipe>> synthetic_;
  Ops* ops_ = nullptr;
};

}  // namespace dilu
