// Streaming writer of one safetensors file: every tensor is declared first (so the header can be
// written), then each tensor's bytes are produced in chunks, so a multi-GB tensor never sits in memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/tensor.h"

namespace dilu {

// Usage:
//   SafetensorsWriter w(path);
//   w.declare("a", DType::BF16, {4, 8});  w.declare("b", ...);
//   w.write_tensor(fill_a);  w.write_tensor(fill_b);   // declaration order
//   w.finish();
// The file is written as "<path>.partial" and renamed to `path` by finish(), so an interrupted
// run never leaves a file that looks complete. Without finish() the partial file is removed.
class SafetensorsWriter {
 public:
  // Fills `chunk` with the tensor's bytes starting at byte `offset` of that tensor.
  using FillFn = std::function<void(std::span<std::byte> chunk, uint64_t offset)>;
  static constexpr uint64_t kDefaultChunkBytes = 64ull << 20;

  // `metadata` becomes the header's "__metadata__" (omitted when empty); PyTorch-saved
  // checkpoints such as R1's carry {"format": "pt"}.
  explicit SafetensorsWriter(std::filesystem::path path,
                             std::map<std::string, std::string> metadata = {{"format", "pt"}});
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // Only before the first write_tensor(). Names must be unique and not "__metadata__".
  void declare(const std::string& name, DType dtype, const Shape& shape);

  // Writes the next declared tensor's data (the header goes out before the first one). `fill` is
  // called with consecutive chunks of at most `chunk_bytes` bytes (the last one may be shorter).
  void write_tensor(const FillFn& fill, uint64_t chunk_bytes = kDefaultChunkBytes);
  // The same from bytes already in memory (small tensors, tests).
  void write_tensor(std::span<const std::byte> bytes);

  // Checks that every declared tensor was written, closes and renames the file into place.
  // Throws UserError naming the file when the disk refuses (full, quota, I/O error).
  void finish();

  // Bytes of tensor data (what an index's "total_size" counts) and of the whole file.
  uint64_t data_bytes() const { return data_bytes_; }
  uint64_t file_bytes() const;
  const std::filesystem::path& path() const { return path_; }

 private:
  struct Entry {
    std::string name;
    DType dtype;
    Shape shape;
    uint64_t begin, end;  // byte offsets relative to the start of the data section
  };

  void write_header();
  void write_bytes(const void* data, size_t n);
  [[noreturn]] void fail(const std::string& what);

  std::filesystem::path path_, partial_path_;
  std::map<std::string, std::string> metadata_;
  std::vector<Entry> entries_;
  std::FILE* file_ = nullptr;
  uint64_t header_bytes_ = 0;  // 8-byte length prefix + padded JSON
  uint64_t data_bytes_ = 0;
  size_t next_ = 0;            // index of the next tensor to write
  bool header_written_ = false;
  bool finished_ = false;
  std::vector<std::byte> buffer_;
};

}  // namespace dilu
