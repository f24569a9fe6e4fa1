// The CUDA implementation of the op interface (kernels/ops.h). Activations stay FP32 between
// ops (as on the CPU, so both backends check the same contracts); GEMM inputs are converted to
// BF16, or quantized to FP8 per token per 128 channels for block-scaled FP8 weights, inside
// linear(). The latent cache is BF16. Weights are placed once at start-up; per-step scratch comes
// from an arena allocated at construction.
#pragma once

#include <memory>

#include "kernels/ops.h"

namespace dilu {

// Throws UserError when no GPU is visible.
std::unique_ptr<Ops> make_cuda_ops(const BackendOptions& options);

}  // namespace dilu
