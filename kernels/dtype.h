// Element types shared by checkpoints, tensors and kernels, with exact host conversions
// (FP8 e4m3fn, BF16, F16 <-> FP32) used by the CPU backend and the checkpoint writer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace dilu {

enum class DType : uint8_t { F32, BF16, F16, F8E4M3, I32, I64, U8 };

size_t dtype_size(DType t);
// The safetensors spelling: "F32", "BF16", "F16", "F8_E4M3", "I32", "I64", "U8".
std::string_view dtype_name(DType t);
std::optional<DType> dtype_from_name(std::string_view name);

float bf16_to_f32(uint16_t v);
uint16_t f32_to_bf16(float v);  // round to nearest even; NaN stays NaN
float f16_to_f32(uint16_t v);
uint16_t f32_to_f16(float v);   // round to nearest even
float fp8e4m3_to_f32(uint8_t v);  // float8_e4m3fn: no infinities, 0x7f/0xff are NaN, max 448
uint8_t f32_to_fp8e4m3(float v);  // round to nearest even, saturating to +-448

// Converts n elements of a floating type (F32, BF16, F16, F8E4M3) to FP32.
void convert_to_f32(DType src_type, const void* src, float* dst, size_t n);

}  // namespace dilu
