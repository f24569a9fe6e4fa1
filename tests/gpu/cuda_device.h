// GPU tests (label "gpu"): why no CUDA device can run them, "" when one is visible. The tests skip
// with that reason on a machine without a GPU.
#pragma once

#include <cuda_runtime.h>

#include <string>

namespace dilu {

inline std::string missing_cuda_device() {
  int n = 0;
  const cudaError_t rc = cudaGetDeviceCount(&n);
  if (rc != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error
    return std::string("cudaGetDeviceCount: ") + cudaGetErrorString(rc);
  }
  return n > 0 ? std::string() : std::string("cudaGetDeviceCount found 0 devices");
}

}  // namespace dilu
