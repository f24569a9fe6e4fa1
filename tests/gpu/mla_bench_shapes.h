// The MLA decode shapes of bench/mla_bench.cpp (R1 with 128 heads on one GPU): one token per
// sequence at the given context. tests/gpu/cuda_ops_test.cpp checks each shape's context and
// heads for correctness against the CPU at a small batch (the CPU reference of the full batch
// would take minutes).
#pragma once

#include <cstdint>

namespace dilu {

struct MlaBenchShape {
  const char* name;
  int64_t heads, batch, context;
};

inline constexpr MlaBenchShape kMlaBenchShapes[] = {
    {"decode_b1_ctx1024", 128, 1, 1024},   {"decode_b1_ctx4096", 128, 1, 4096},
    {"decode_b32_ctx1024", 128, 32, 1024}, {"decode_b32_ctx4096", 128, 32, 4096},
    {"decode_b64_ctx1024", 128, 64, 1024}, {"decode_b128_ctx1024", 128, 128, 1024},
    {"decode_b256_ctx1024", 128, 256, 1024},
};

}  // namespace dilu
