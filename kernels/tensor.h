// A tensor is a typed, shaped view of memory that knows which device holds it. It owns nothing
// by itself: a shared keep-alive handle (an allocation, a memory map) keeps the bytes valid.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/error.h"

namespace dilu {

enum class DeviceKind : uint8_t { CPU, CUDA };

struct Device {
  DeviceKind kind = DeviceKind::CPU;
  int index = 0;
  bool operator==(const Device&) const = default;
  std::string str() const;
};

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);

// Row-major, contiguous.
class Tensor {
 public:
  Tensor() = default;
  Tensor(void* data, DType dtype, Shape shape, Device device, std::shared_ptr<const void> keep_alive);

  // Zero-initialized host memory.
  static Tensor host(DType dtype, Shape shape);

  bool defined() const { return data_ != nullptr || numel() == 0; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  bool is_cpu() const { return device_.kind == DeviceKind::CPU; }
  const Shape& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const;
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }

  void* raw() const { return data_; }
  template <class T>
  T* data() const {
    DILU_CHECK(dtype_matches<T>(), "tensor of dtype ", dtype_name(dtype_), " read with the wrong C++ type");
    return static_cast<T*>(data_);
  }

  // Same storage, new shape with the same number of elements.
  Tensor view(Shape shape) const;
  // Rows [begin, end) along dimension 0.
  Tensor rows(int64_t begin, int64_t end) const;

 private:
  template <class T>
  bool dtype_matches() const;

  void* data_ = nullptr;
  DType dtype_ = DType::F32;
  Shape shape_;
  Device device_;
  std::shared_ptr<const void> keep_alive_;
};

template <class T>
bool Tensor::dtype_matches() const {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, const float>) return dtype_ == DType::F32;
  else if constexpr (std::is_same_v<T, int32_t> || std::is_same_v<T, const int32_t>) return dtype_ == DType::I32;
  else if constexpr (std::is_same_v<T, int64_t> || std::is_same_v<T, const int64_t>) return dtype_ == DType::I64;
  else if constexpr (std::is_same_v<T, uint16_t> || std::is_same_v<T, const uint16_t>)
    return dtype_ == DType::BF16 || dtype_ == DType::F16;
  else if constexpr (std::is_same_v<T, uint8_t> || std::is_same_v<T, const uint8_t>)
    return dtype_ == DType::F8E4M3 || dtype_ == DType::U8;
  else return true;  // void / std::byte: untyped access
}

}  // namespace dilu
