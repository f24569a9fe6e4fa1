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

class Checkpoint {
 public:
  // Opens model.safetensors.index.json when present, else every *.safetensors in the directory.
  static Checkpoint open(const std::filesystem::path& model_dir);

  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;
  Tensor tensor(const std::string& name) const;
  const std::filesystem::path& dir() const { return dir_; }

 private:
  std::filesystem::path dir_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> where_;
};

}  // namespace dilu
