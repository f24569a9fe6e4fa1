// What the CUDA build links against and what devices it sees. Compiled only with DILU_CUDA;
// the op kernels of the CUDA backend join this folder in the CUDA-backend issue.
#pragma once

#include <cstdint>
#include <string>

namespace dilu::cuda {

// Number of visible CUDA devices; 0 when the driver or a device is missing (never throws).
int device_count();
// Binds this process to GPU local_rank % device_count (one rank per GPU); returns the device, or
// -1 when there is none.
int bind_device(int local_rank);
// The current device's name and its free and total memory; false when there is none.
bool current_device_memory(std::string* name, uint64_t* free_bytes, uint64_t* total_bytes);
// "cudart X.Y, cuBLASLt N, NCCL a.b.c", for logs and --version.
std::string library_versions();

// Exact FP8 block dequantization on the device: out[r, c] = bf16(w[r, c] * scale_inv[r / bo, c / bi]).
// w [rows, cols] float8_e4m3fn, scale_inv [ceil(rows/bo), ceil(cols/bi)] F32, out [rows, cols] BF16.
void dequantize_fp8_to_bf16(const uint8_t* w, const float* scale_inv, int64_t rows, int64_t cols, int64_t block_out,
                            int64_t block_in, uint16_t* out, void* stream);

}  // namespace dilu::cuda
