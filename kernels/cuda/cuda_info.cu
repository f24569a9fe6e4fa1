// CUDA device query, library versions, and the FP8 block-dequantization kernel.
#include "kernels/cuda/cuda_info.h"

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include "kernels/error.h"

#define DILU_CUDA_CHECK(call)                                                                  \
  do {                                                                                         \
    cudaError_t dilu_cuda_rc = (call);                                                         \
    DILU_CHECK(dilu_cuda_rc == cudaSuccess, #call, ": ", cudaGetErrorString(dilu_cuda_rc));    \
  } while (0)

namespace dilu::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

int bind_device(int local_rank) {
  const int n = device_count();
  if (n == 0) return -1;
  const int device = local_rank % n;
  DILU_CUDA_CHECK(cudaSetDevice(device));
  return device;
}

bool current_device_memory(std::string* name, uint64_t* free_bytes, uint64_t* total_bytes) {
  if (device_count() == 0) return false;
  int device = 0;
  cudaDeviceProp props{};
  size_t free_b = 0, total_b = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaGetDeviceProperties(&props, device) != cudaSuccess ||
      cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  *name = props.name;
  *free_bytes = free_b;
  *total_bytes = total_b;
  return true;
}

std::string library_versions() {
  int rt = 0;
  cudaRuntimeGetVersion(&rt);
  int nccl = 0;
  ncclGetVersion(&nccl);
  return "cudart " + std::to_string(rt / 1000) + "." + std::to_string(rt % 1000 / 10) + ", cuBLASLt " +
         std::to_string(cublasLtGetVersion()) + ", NCCL " + std::to_string(nccl);
}

namespace {
__global__ void dequantize_fp8_kernel(const __nv_fp8_e4m3* w, const float* scale_inv, int64_t rows, int64_t cols,
                                      int64_t block_out, int64_t block_in, __nv_bfloat16* out) {
  const int64_t n = rows * cols;
  const int64_t scale_cols = (cols + block_in - 1) / block_in;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    const float s = scale_inv[(r / block_out) * scale_cols + c / block_in];
    out[i] = __float2bfloat16(static_cast<float>(w[i]) * s);
  }
}
}  // namespace

void dequantize_fp8_to_bf16(const uint8_t* w, const float* scale_inv, int64_t rows, int64_t cols, int64_t block_out,
                            int64_t block_in, uint16_t* out, void* stream) {
  DILU_CHECK(block_out > 0 && block_in > 0, "block sizes must be positive");
  const int64_t n = rows * cols;
  if (n == 0) return;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
  dequantize_fp8_kernel<<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const __nv_fp8_e4m3*>(w), scale_inv, rows, cols, block_out, block_in,
      reinterpret_cast<__nv_bfloat16*>(out));
  DILU_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dilu::cuda
