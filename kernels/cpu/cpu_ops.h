// The CPU backend: the reference. FP32 arithmetic over exactly dequantized weights, weights
// left where the checkpoint maps them (converted row by row inside the GEMM), OpenMP threads.
#pragma once

#include <memory>

#include "kernels/ops.h"

namespace dilu {
std::unique_ptr<Ops> make_cpu_ops(int threads);
}  // namespace dilu
