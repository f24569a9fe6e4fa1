// Tensor views and host allocation.
#include "kernels/tensor.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

namespace dilu {

std::string Device::str() const {
  return kind == DeviceKind::CPU ? std::string("cpu") : "cuda:" + std::to_string(index);
}

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << ']';
  return os.str();
}

Tensor::Tensor(void* data, DType dtype, Shape shape, Device device, std::shared_ptr<const void> keep_alive)
    : data_(data), dtype_(dtype), shape_(std::move(shape)), device_(device), keep_alive_(std::move(keep_alive)) {
  for (int64_t d : shape_) DILU_CHECK(d >= 0, "negative dimension in ", shape_str(shape_));
}

Tensor Tensor::host(DType dtype, Shape shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  const size_t bytes = static_cast<size_t>(n) * dtype_size(dtype);
  // calloc: zeroed, 16-byte aligned, and large blocks come as untouched pages from the kernel,
  // so a big KV cache costs memory only as it fills.
  void* p = bytes ? std::calloc(bytes, 1) : nullptr;
  DILU_CHECK(bytes == 0 || p != nullptr, "out of host memory allocating ", bytes, " bytes");
  std::shared_ptr<const void> owner(p, [](const void* q) { std::free(const_cast<void*>(q)); });
  return Tensor(p, dtype, std::move(shape), Device{}, std::move(owner));
}

int64_t Tensor::dim(int i) const {
  if (i < 0) i += rank();
  DILU_CHECK(i >= 0 && i < rank(), "dim ", i, " of a rank-", rank(), " tensor");
  return shape_[static_cast<size_t>(i)];
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

Tensor Tensor::view(Shape shape) const {
  Tensor t = *this;
  t.shape_ = std::move(shape);
  DILU_CHECK(t.numel() == numel(), "view ", shape_str(t.shape_), " of ", shape_str(shape_));
  return t;
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  DILU_CHECK(rank() >= 1 && 0 <= begin && begin <= end && end <= shape_[0], "rows [", begin, ", ", end,
             ") of ", shape_str(shape_));
  Tensor t = *this;
  size_t row_bytes = nbytes() / static_cast<size_t>(std::max<int64_t>(shape_[0], 1));
  t.data_ = static_cast<char*>(data_) + static_cast<size_t>(begin) * row_bytes;
  t.shape_[0] = end - begin;
  return t;
}

void check_failed(const char* expr, const char* file, int line, const std::string& message) {
  std::ostringstream os;
  os << "dilu: internal error at " << file << ':' << line << ": check `" << expr << "` failed";
  if (!message.empty()) os << ": " << message;
  os << "\n  This is a bug in dilu; please report it with the command line that triggered it.";
  throw std::logic_error(os.str());
}

}  // namespace dilu
