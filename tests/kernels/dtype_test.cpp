// Host conversions between checkpoint element types and FP32, checked exhaustively where the
// code space is small (FP8: 256 codes, BF16/F16: 65536) against formulas written out here.
#include "kernels/dtype.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <gtest/gtest.h>

namespace dilu {
namespace {

// float8_e4m3fn from its definition: bias 7, no infinities, S.1111.111 is NaN.
double fp8_reference(int code) {
  const int sign = (code >> 7) & 1, exp = (code >> 3) & 0xf, mant = code & 7;
  if (exp == 0xf && mant == 7) return std::numeric_limits<double>::quiet_NaN();
  const double mag = exp == 0 ? mant * std::ldexp(1.0, -9) : (1.0 + mant / 8.0) * std::ldexp(1.0, exp - 7);
  return sign ? -mag : mag;
}

// IEEE binary16 from its definition.
double f16_reference(int code) {
  const int sign = (code >> 15) & 1, exp = (code >> 10) & 0x1f, mant = code & 0x3ff;
  double mag;
  if (exp == 0x1f) mag = mant ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (exp == 0) mag = mant * std::ldexp(1.0, -24);
  else mag = (1.0 + mant / 1024.0) * std::ldexp(1.0, exp - 15);
  return sign ? -mag : mag;
}

bool is_fp8_nan(int code) { return (code & 0x7f) == 0x7f; }

TEST(Fp8E4M3, DecodesAll256Codes) {
  for (int c = 0; c < 256; ++c) {
    const float got = fp8e4m3_to_f32(static_cast<uint8_t>(c));
    const double want = fp8_reference(c);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << "code 0x" << std::hex << c;
    } else {
      EXPECT_EQ(static_cast<double>(got), want) << "code 0x" << std::hex << c;
      EXPECT_EQ(std::signbit(got), (c & 0x80) != 0) << "code 0x" << std::hex << c;
    }
  }
  EXPECT_TRUE(std::isnan(fp8e4m3_to_f32(0x7f)));
  EXPECT_TRUE(std::isnan(fp8e4m3_to_f32(0xff)));
  EXPECT_EQ(fp8e4m3_to_f32(0x7e), 448.0f);
  EXPECT_EQ(fp8e4m3_to_f32(0xfe), -448.0f);
  EXPECT_EQ(fp8e4m3_to_f32(0x78), 256.0f);  // no infinity: exponent 15 holds normal numbers
  EXPECT_EQ(fp8e4m3_to_f32(0x08), std::ldexp(1.0f, -6));  // smallest normal
  for (int m = 0; m < 8; ++m) EXPECT_EQ(fp8e4m3_to_f32(static_cast<uint8_t>(m)), std::ldexp(static_cast<float>(m), -9));
  // The largest finite magnitude is 448: every non-NaN code is at most that.
  for (int c = 0; c < 256; ++c)
    if (!is_fp8_nan(c)) {
      EXPECT_LE(std::fabs(fp8e4m3_to_f32(static_cast<uint8_t>(c))), 448.0f);
    }
}

TEST(Fp8E4M3, EncodeRoundTripsEveryFiniteCode) {
  for (int c = 0; c < 256; ++c) {
    if (is_fp8_nan(c)) continue;
    EXPECT_EQ(f32_to_fp8e4m3(fp8e4m3_to_f32(static_cast<uint8_t>(c))), c) << "code 0x" << std::hex << c;
  }
}

TEST(Fp8E4M3, RoundsToNearestEvenAtEveryMidpoint) {
  // Between each pair of adjacent non-negative codes (the code order is the value order), the
  // midpoint goes to the even code, and a hair either side goes to the nearer one.
  for (int c = 0; c + 1 <= 0x7e; ++c) {
    const float lo = fp8e4m3_to_f32(static_cast<uint8_t>(c)), hi = fp8e4m3_to_f32(static_cast<uint8_t>(c + 1));
    const float mid = (lo + hi) / 2;  // exact: both have few significant bits
    ASSERT_EQ(static_cast<double>(mid), (static_cast<double>(lo) + hi) / 2);
    const int even = (c % 2 == 0) ? c : c + 1;
    EXPECT_EQ(f32_to_fp8e4m3(mid), even) << "midpoint " << mid;
    EXPECT_EQ(f32_to_fp8e4m3(-mid), even | 0x80) << "midpoint " << -mid;
    EXPECT_EQ(f32_to_fp8e4m3(std::nextafter(mid, 0.0f)), c) << "below midpoint " << mid;
    EXPECT_EQ(f32_to_fp8e4m3(std::nextafter(mid, 1000.0f)), c + 1) << "above midpoint " << mid;
  }
  // Below half the smallest subnormal (2^-10) is zero, keeping the sign.
  EXPECT_EQ(f32_to_fp8e4m3(std::ldexp(1.0f, -11)), 0x00);
  EXPECT_EQ(f32_to_fp8e4m3(-std::ldexp(1.0f, -11)), 0x80);
  EXPECT_EQ(f32_to_fp8e4m3(std::ldexp(1.0f, -10)), 0x00);  // tie with 0 and 2^-9: even is 0
  EXPECT_EQ(f32_to_fp8e4m3(std::ldexp(3.0f, -10)), 0x02);  // tie 1 vs 2 (x 2^-9): even is 2
  EXPECT_EQ(f32_to_fp8e4m3(0.0f), 0x00);
  EXPECT_EQ(f32_to_fp8e4m3(-0.0f), 0x80);
}

TEST(Fp8E4M3, SaturatesToPlusMinus448) {
  for (float v : {448.0f, 449.0f, 464.0f, 479.0f, 480.0f, 1000.0f, 65504.0f, 1e30f, std::numeric_limits<float>::max()}) {
    EXPECT_EQ(f32_to_fp8e4m3(v), 0x7e) << v;
    EXPECT_EQ(f32_to_fp8e4m3(-v), 0xfe) << -v;
  }
  EXPECT_TRUE(std::isnan(fp8e4m3_to_f32(f32_to_fp8e4m3(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(Bf16, RoundTripsEveryNonNanCode) {
  for (int c = 0; c < 65536; ++c) {
    const float f = bf16_to_f32(static_cast<uint16_t>(c));
    EXPECT_EQ(std::bit_cast<uint32_t>(f), static_cast<uint32_t>(c) << 16);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(f)))) << c;
      continue;
    }
    ASSERT_EQ(f32_to_bf16(f), c) << "code 0x" << std::hex << c;
  }
}

TEST(Bf16, RoundsToNearestEven) {
  auto bits = [](uint32_t u) { return std::bit_cast<float>(u); };
  EXPECT_EQ(f32_to_bf16(bits(0x3f808000u)), 0x3f80);  // tie, even below
  EXPECT_EQ(f32_to_bf16(bits(0x3f818000u)), 0x3f82);  // tie, even above
  EXPECT_EQ(f32_to_bf16(bits(0x3f807fffu)), 0x3f80);
  EXPECT_EQ(f32_to_bf16(bits(0x3f808001u)), 0x3f81);
  EXPECT_EQ(f32_to_bf16(bits(0xbf818000u)), 0xbf82);  // negative tie
  EXPECT_EQ(f32_to_bf16(bits(0x00008000u)), 0x0000);  // subnormal tie
  EXPECT_EQ(f32_to_bf16(bits(0x00018000u)), 0x0002);
  EXPECT_EQ(f32_to_bf16(bits(0x7f7fffffu)), 0x7f80);  // FLT_MAX rounds up to infinity
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  // A NaN whose payload sits only in the dropped bits stays NaN (not infinity).
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(bits(0x7f800001u)))));
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(bits(0xff800001u)))));
}

TEST(F16, DecodesAndRoundTripsEveryCode) {
  for (int c = 0; c < 65536; ++c) {
    const float f = f16_to_f32(static_cast<uint16_t>(c));
    const double want = f16_reference(c);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(f)) << c;
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f)))) << c;
      continue;
    }
    ASSERT_EQ(static_cast<double>(f), want) << "code 0x" << std::hex << c;
    ASSERT_EQ(f32_to_f16(f), c) << "code 0x" << std::hex << c;
  }
}

TEST(F16, RoundsToNearestEvenAtEveryMidpoint) {
  // Adjacent positive finite codes c, c+1 (subnormals included): midpoint to even, either side
  // to the nearer one.
  for (int c = 0; c + 1 <= 0x7bff; ++c) {
    const float lo = f16_to_f32(static_cast<uint16_t>(c)), hi = f16_to_f32(static_cast<uint16_t>(c + 1));
    const float mid = (lo + hi) / 2;
    const int even = (c % 2 == 0) ? c : c + 1;
    ASSERT_EQ(f32_to_f16(mid), even) << "midpoint " << mid;
    ASSERT_EQ(f32_to_f16(-mid), even | 0x8000) << "midpoint " << -mid;
    ASSERT_EQ(f32_to_f16(std::nextafter(mid, 0.0f)), c) << mid;
    ASSERT_EQ(f32_to_f16(std::nextafter(mid, 1e9f)), c + 1) << mid;
  }
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7bff);  // below the midpoint to 65536: stays at 65504
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // the midpoint ties to "even" infinity
  EXPECT_EQ(f32_to_f16(1e6f), 0x7c00);
  EXPECT_EQ(f32_to_f16(-1e6f), 0xfc00);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);  // tie 0 vs smallest subnormal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -26)), 0x0000);
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
}

TEST(ConvertToF32, MatchesTheScalarConversions) {
  std::vector<uint16_t> h(65536);
  for (int c = 0; c < 65536; ++c) h[static_cast<size_t>(c)] = static_cast<uint16_t>(c);
  std::vector<float> out(h.size());
  convert_to_f32(DType::BF16, h.data(), out.data(), h.size());
  for (int c = 0; c < 65536; ++c)
    ASSERT_EQ(std::bit_cast<uint32_t>(out[static_cast<size_t>(c)]),
              std::bit_cast<uint32_t>(bf16_to_f32(static_cast<uint16_t>(c))));
  convert_to_f32(DType::F16, h.data(), out.data(), h.size());
  for (int c = 0; c < 65536; ++c) {
    const float want = f16_to_f32(static_cast<uint16_t>(c));
    if (std::isnan(want)) ASSERT_TRUE(std::isnan(out[static_cast<size_t>(c)]));
    else ASSERT_EQ(out[static_cast<size_t>(c)], want);
  }
  std::vector<uint8_t> b(256);
  for (int c = 0; c < 256; ++c) b[static_cast<size_t>(c)] = static_cast<uint8_t>(c);
  convert_to_f32(DType::F8E4M3, b.data(), out.data(), b.size());
  for (int c = 0; c < 256; ++c) {
    const float want = fp8e4m3_to_f32(static_cast<uint8_t>(c));
    if (std::isnan(want)) ASSERT_TRUE(std::isnan(out[static_cast<size_t>(c)]));
    else ASSERT_EQ(out[static_cast<size_t>(c)], want);
  }
  const std::vector<float> f = {1.5f, -0.0f, 3e38f};
  std::vector<float> g(3);
  convert_to_f32(DType::F32, f.data(), g.data(), 3);
  EXPECT_EQ(std::memcmp(f.data(), g.data(), sizeof(float) * 3), 0);
}

TEST(DType, NamesAndSizesRoundTrip) {
  for (DType t : {DType::F32, DType::BF16, DType::F16, DType::F8E4M3, DType::I32, DType::I64, DType::U8}) {
    auto back = dtype_from_name(dtype_name(t));
    ASSERT_TRUE(back.has_value()) << dtype_name(t);
    EXPECT_EQ(*back, t);
  }
  EXPECT_EQ(dtype_name(DType::F8E4M3), "F8_E4M3");
  EXPECT_EQ(dtype_size(DType::F8E4M3), 1u);
  EXPECT_EQ(dtype_size(DType::BF16), 2u);
  EXPECT_EQ(dtype_size(DType::I64), 8u);
  EXPECT_FALSE(dtype_from_name("F8_E5M2").has_value());
  EXPECT_FALSE(dtype_from_name("f32").has_value());
}

}  // namespace
}  // namespace dilu
