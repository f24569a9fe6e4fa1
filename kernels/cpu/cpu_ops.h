// The CPU backend: the reference. FP32 arithmetic over exactly dequantized weights, weights
// left where the checkpoint maps them (converted row by row inside the GEMM), OpenMP threads.
#pragma once

#include <memory>

#include "kernels/ops.h"

namespace dilu {
// fp8_activations: quantize a linear's input per token per 128 channels to e4m3 (scale amax / 448)
// for FP8 weights with 128x128 blocks, as the CUDA backend's block-scaled FP8 GEMM (and
// DeepSeek's own act_quant) does: the reference for that path. Off: exact FP32 inputs.
std::unique_ptr<Ops> make_cpu_ops(int threads, bool fp8_activations = false);
}  // namespace dilu
