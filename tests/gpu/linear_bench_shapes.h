// The block linears of bench/linear_bench.cpp (DeepSeek-R1 on one GPU, FP8 with 128 x 128 weight
// blocks), timed there at 1, 4 and 16 rows. tests/gpu/cuda_ops_test.cpp (CudaFp8Block) checks
// each against the CPU at 1 and 4 rows.
#pragma once

#include <cstdint>

namespace dilu {

struct LinearBenchShape {
  const char* name;
  int64_t n, k;
};

inline constexpr LinearBenchShape kLinearBenchShapes[] = {
    {"q_a 1536x7168", 1536, 7168},           {"kv_a 576x7168", 576, 7168},
    {"q_b 24576x1536", 24576, 1536},         {"o_proj 7168x16384", 7168, 16384},
    {"dense gate 18432x7168", 18432, 7168},  {"dense down 7168x18432", 7168, 18432},
    {"shared gate 2048x7168", 2048, 7168},   {"shared down 7168x2048", 7168, 2048},
};

}  // namespace dilu
