// Exact host conversions between the checkpoint element types and FP32.
#include "kernels/dtype.h"

#include <array>
#include <bit>
#include <cmath>
#include <cstring>

#include "kernels/error.h"

namespace dilu {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::F8E4M3: return 1;
    case DType::I32: return 4;
    case DType::I64: return 8;
    case DType::U8: return 1;
  }
  DILU_CHECK(false, "unknown dtype");
}

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::F8E4M3: return "F8_E4M3";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
    case DType::U8: return "U8";
  }
  DILU_CHECK(false, "unknown dtype");
}

std::optional<DType> dtype_from_name(std::string_view name) {
  for (DType t : {DType::F32, DType::BF16, DType::F16, DType::F8E4M3, DType::I32, DType::I64, DType::U8})
    if (dtype_name(t) == name) return t;
  return std::nullopt;
}

float bf16_to_f32(uint16_t v) { return std::bit_cast<float>(static_cast<uint32_t>(v) << 16); }

uint16_t f32_to_bf16(float v) {
  uint32_t u = std::bit_cast<uint32_t>(v);
  if (std::isnan(v)) return static_cast<uint16_t>((u >> 16) | 0x40);
  uint32_t rounding = 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

float f16_to_f32(uint16_t v) {
  uint32_t sign = (v >> 15) & 1, exp = (v >> 10) & 0x1f, mant = v & 0x3ff;
  float mag;
  if (exp == 0) mag = std::ldexp(static_cast<float>(mant), -24);
  else if (exp == 31) mag = mant ? std::nanf("") : INFINITY;
  else mag = std::ldexp(static_cast<float>(mant | 0x400), static_cast<int>(exp) - 25);
  return sign ? -mag : mag;
}

namespace {
// Rounds |v| to the nearest value of a binary format with `mant_bits` stored mantissa bits and
// minimum normal exponent `emin`, ties to even. Returns the rounded magnitude as a float.
float round_to_format(float mag, int mant_bits, int emin) {
  if (mag == 0.0f) return 0.0f;
  int e;
  std::frexp(mag, &e);  // mag = f * 2^e with f in [0.5, 1)
  int exp = std::max(e - 1, emin);  // unbiased exponent of the leading bit (clamped for subnormals)
  float quantum = std::ldexp(1.0f, exp - mant_bits);
  float q = mag / quantum;  // exact: power-of-two scaling
  float r = std::nearbyint(q);  // default rounding mode: ties to even
  return r * quantum;
}
}  // namespace

uint16_t f32_to_f16(float v) {
  uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  if (std::isnan(v)) return 0x7e00;
  float mag = round_to_format(std::fabs(v), 10, -14);
  if (mag >= 65520.0f || std::isinf(v)) return sign | 0x7c00;
  if (mag == 0.0f) return sign;
  int e;
  std::frexp(mag, &e);
  int exp = e - 1;
  if (exp < -14) {  // subnormal
    return sign | static_cast<uint16_t>(std::lround(std::ldexp(mag, 24)));
  }
  uint32_t mant = static_cast<uint32_t>(std::lround(std::ldexp(mag, 10 - exp))) & 0x3ff;
  return sign | static_cast<uint16_t>((exp + 15) << 10) | static_cast<uint16_t>(mant);
}

namespace {
std::array<float, 256> make_fp8_table() {
  std::array<float, 256> t{};
  for (int i = 0; i < 256; ++i) {
    int sign = (i >> 7) & 1, exp = (i >> 3) & 0xf, mant = i & 7;
    float mag;
    if (exp == 0xf && mant == 7) mag = std::nanf("");
    else if (exp == 0) mag = std::ldexp(static_cast<float>(mant), -9);
    else mag = std::ldexp(static_cast<float>(8 + mant), exp - 10);
    t[static_cast<size_t>(i)] = sign ? -mag : mag;
  }
  return t;
}
const std::array<float, 256> kFp8Table = make_fp8_table();
}  // namespace

float fp8e4m3_to_f32(uint8_t v) { return kFp8Table[v]; }

uint8_t f32_to_fp8e4m3(float v) {
  if (std::isnan(v)) return 0x7f;
  uint8_t sign = std::signbit(v) ? 0x80 : 0;
  float mag = std::min(round_to_format(std::fabs(v), 3, -6), 448.0f);
  if (mag == 0.0f) return sign;
  int e;
  std::frexp(mag, &e);
  int exp = e - 1;
  if (exp < -6) return sign | static_cast<uint8_t>(std::lround(std::ldexp(mag, 9)));
  uint32_t mant = static_cast<uint32_t>(std::lround(std::ldexp(mag, 3 - exp))) & 7;
  return sign | static_cast<uint8_t>((exp + 7) << 3) | static_cast<uint8_t>(mant);
}

void convert_to_f32(DType src_type, const void* src, float* dst, size_t n) {
  switch (src_type) {
    case DType::F32: std::memcpy(dst, src, n * sizeof(float)); return;
    case DType::BF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::F16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case DType::F8E4M3: {
      const auto* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = kFp8Table[s[i]];
      return;
    }
    default: DILU_CHECK(false, "convert_to_f32: ", dtype_name(src_type), " is not a floating type");
  }
}

}  // namespace dilu
