// Plain values packed into bytes and read back: the messages ranks send each other (a step and
// its sampled tokens, a rank's trace spans and load). Same machine layout on both sides: every
// rank runs the same binary on the same architecture.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/error.h"

namespace dilu {

inline void put_bytes(std::vector<uint8_t>& b, const void* p, size_t n) {
  if (n == 0) return;
  const size_t at = b.size();
  b.resize(at + n);  // not insert(): GCC 12 sees false overflows in its growth path (bug 105651 family)
  std::memcpy(b.data() + at, p, n);
}
template <class T>
void put_value(std::vector<uint8_t>& b, const T& v) {
  put_bytes(b, &v, sizeof v);
}
template <class T>
void put_vec(std::vector<uint8_t>& b, const std::vector<T>& v) {
  put_value<uint64_t>(b, v.size());
  put_bytes(b, v.data(), v.size() * sizeof(T));
}
inline void put_string(std::vector<uint8_t>& b, const std::string& s) {
  put_value<uint64_t>(b, s.size());
  put_bytes(b, s.data(), s.size());
}

// Reads what the put_* calls wrote, in the same order; a short message is a broken invariant.
struct ByteReader {
  const std::vector<uint8_t>& b;
  size_t at = 0;
  void get(void* p, size_t n) {
    DILU_CHECK(at + n <= b.size(), "truncated message");
    if (n) std::memcpy(p, b.data() + at, n);
    at += n;
  }
  template <class T>
  T value() {
    T v{};
    get(&v, sizeof v);
    return v;
  }
  template <class T>
  std::vector<T> vec() {
    std::vector<T> v(value<uint64_t>());
    get(v.data(), v.size() * sizeof(T));
    return v;
  }
  std::string string() {
    std::string s(value<uint64_t>(), '\0');
    get(s.data(), s.size());
    return s;
  }
};

}  // namespace dilu
