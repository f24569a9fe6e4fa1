// The safetensors writer (see safetensors_writer.h). Format: an 8-byte little-endian header
// length, a JSON header padded with spaces to a multiple of 8, then the tensors' bytes back to back.
#include "engine/safetensors_writer.h"

#include <cerrno>
#include <cstring>
#include <system_error>

#include <nlohmann/json.hpp>

#include "kernels/error.h"

namespace dilu {

SafetensorsWriter::SafetensorsWriter(std::filesystem::path path, std::map<std::string, std::string> metadata)
    : path_(std::move(path)), metadata_(std::move(metadata)) {
  partial_path_ = path_;
  partial_path_ += ".partial";
  file_ = std::fopen(partial_path_.c_str(), "wb");
  if (!file_) fail("cannot create it");
}

SafetensorsWriter::~SafetensorsWriter() {
  if (file_) std::fclose(file_);
  if (!finished_) {
    std::error_code ignored;
    std::filesystem::remove(partial_path_, ignored);
  }
}

void SafetensorsWriter::fail(const std::string& what) {
  const int err = errno;
  std::string message = "cannot write " + path_.string() + ": " + what;
  if (err != 0) message += std::string(" (") + std::strerror(err) + ")";
  if (err == ENOSPC || err == EDQUOT) message += "; free some space or choose another --out directory";
  if (file_) std::fclose(file_);
  file_ = nullptr;
  std::error_code ignored;
  std::filesystem::remove(partial_path_, ignored);
  throw UserError(message);
}

void SafetensorsWriter::declare(const std::string& name, DType dtype, const Shape& shape) {
  DILU_CHECK(!header_written_, "declare(\"", name, "\") after tensor data was written");
  DILU_CHECK(!name.empty() && name != "__metadata__", "bad tensor name \"", name, "\"");
  for (const Entry& e : entries_) DILU_CHECK(e.name != name, "tensor \"", name, "\" declared twice");
  uint64_t n = 1;
  for (int64_t d : shape) {
    DILU_CHECK(d >= 0, "negative dimension in ", shape_str(shape), " of ", name);
    n *= static_cast<uint64_t>(d);
  }
  const uint64_t bytes = n * dtype_size(dtype);
  entries_.push_back({name, dtype, shape, data_bytes_, data_bytes_ + bytes});
  data_bytes_ += bytes;
}

void SafetensorsWriter::write_bytes(const void* data, size_t n) {
  if (n == 0) return;
  errno = 0;
  if (std::fwrite(data, 1, n, file_) != n) fail("write failed");
}

void SafetensorsWriter::write_header() {
  // Declaration order in the JSON too, so the header reads like the data section.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  for (const Entry& e : entries_) {
    header[e.name] = {{"dtype", std::string(dtype_name(e.dtype))}, {"shape", e.shape},
                      {"data_offsets", {e.begin, e.end}}};
  }
  std::string text = header.dump();
  // Padding keeps the data section 8-byte aligned, as the reference implementation does.
  text.append((8 - text.size() % 8) % 8, ' ');
  unsigned char length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<unsigned char>(static_cast<uint64_t>(text.size()) >> (8 * i));
  write_bytes(length, sizeof length);
  write_bytes(text.data(), text.size());
  header_bytes_ = sizeof length + text.size();
  header_written_ = true;
}

void SafetensorsWriter::write_tensor(const FillFn& fill, uint64_t chunk_bytes) {
  DILU_CHECK(file_ && !finished_, "write_tensor on a closed writer of ", path_.string());
  DILU_CHECK(next_ < entries_.size(), "write_tensor called more often than tensors were declared in ",
             path_.string());
  DILU_CHECK(chunk_bytes > 0, "chunk_bytes must be positive");
  if (!header_written_) write_header();
  const Entry& e = entries_[next_];
  const uint64_t total = e.end - e.begin;
  for (uint64_t offset = 0; offset < total; offset += chunk_bytes) {
    const size_t n = static_cast<size_t>(std::min(chunk_bytes, total - offset));
    if (buffer_.size() < n) buffer_.resize(n);
    std::span<std::byte> chunk(buffer_.data(), n);
    fill(chunk, offset);
    write_bytes(chunk.data(), n);
  }
  ++next_;
}

void SafetensorsWriter::write_tensor(std::span<const std::byte> bytes) {
  DILU_CHECK(next_ < entries_.size(), "write_tensor called more often than tensors were declared in ",
             path_.string());
  const Entry& e = entries_[next_];
  DILU_CHECK(bytes.size() == e.end - e.begin, "tensor ", e.name, " needs ", e.end - e.begin, " bytes, got ",
             bytes.size());
  DILU_CHECK(file_ && !finished_, "write_tensor on a closed writer of ", path_.string());
  if (!header_written_) write_header();
  write_bytes(bytes.data(), bytes.size());
  ++next_;
}

void SafetensorsWriter::finish() {
  DILU_CHECK(file_ && !finished_, "finish() called twice on ", path_.string());
  DILU_CHECK(next_ == entries_.size(), path_.string(), ": ", entries_.size() - next_,
             " declared tensors were not written");
  if (!header_written_) write_header();  // a file with no tensors still has a header
  errno = 0;
  // fclose reports errors that buffered writes deferred (a full disk is often noticed only here).
  if (std::fflush(file_) != 0) fail("flush failed");
  std::FILE* f = file_;
  file_ = nullptr;
  errno = 0;
  if (std::fclose(f) != 0) fail("close failed");
  std::error_code ec;
  std::filesystem::rename(partial_path_, path_, ec);
  if (ec) {
    errno = ec.value();
    fail("cannot rename " + partial_path_.filename().string() + " into place");
  }
  finished_ = true;
}

uint64_t SafetensorsWriter::file_bytes() const {
  DILU_CHECK(header_written_, "file_bytes() before the header was written");
  return header_bytes_ + data_bytes_;
}

}  // namespace dilu
