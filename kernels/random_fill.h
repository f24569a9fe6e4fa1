// The counter-based generator behind Ops::random_fill, shared by the CPU and CUDA backends so
// that both make the same bits: splitmix64's finalizer over (key, index).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DILU_HOST_DEVICE __host__ __device__
#else
#define DILU_HOST_DEVICE
#endif

namespace dilu {

DILU_HOST_DEVICE inline uint64_t random_fill_mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// center + half_width * u, u in [-1, 1) with 24 random bits.
DILU_HOST_DEVICE inline float random_fill_value(uint64_t key, uint64_t i, float center, float half_width) {
  const uint64_t bits = random_fill_mix(key + (i + 1) * 0x9e3779b97f4a7c15ULL) >> 40;
  const float u = static_cast<float>(bits) * (1.0f / 16777216.0f);
  return center + half_width * (2.0f * u - 1.0f);
}

}  // namespace dilu
