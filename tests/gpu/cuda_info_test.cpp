// GPU tests (label "gpu"; run on a machine with an NVIDIA GPU): the CUDA build sees a device
// and its FP8 block dequantization equals the CPU reference bit for bit.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "kernels/cuda/cuda_info.h"
#include "kernels/dtype.h"

namespace dilu {
namespace {

#define DILU_NEEDS_GPU() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device visible: this test runs on a GPU machine"

TEST(CudaInfo, SeesADeviceAndItsLibraries) {
  DILU_NEEDS_GPU();
  EXPECT_GT(cuda::device_count(), 0);
  EXPECT_NE(cuda::library_versions().find("NCCL"), std::string::npos);
}

// Shapes with partial blocks in both dimensions, and block sizes other than 128.
TEST(CudaDequantize, MatchesCpuReferenceExactly) {
  DILU_NEEDS_GPU();
  struct Case { int64_t rows, cols, bo, bi; };
  for (Case c : {Case{576, 200, 128, 128}, Case{1, 1, 128, 128}, Case{300, 129, 32, 64}}) {
    std::mt19937 rng(static_cast<uint32_t>(c.rows * 31 + c.cols));
    std::vector<uint8_t> w(static_cast<size_t>(c.rows * c.cols));
    for (auto& b : w) {
      b = static_cast<uint8_t>(rng());
      if ((b & 0x7f) == 0x7f) b = 0x10;  // no NaN codes
    }
    const int64_t sr = (c.rows + c.bo - 1) / c.bo, sc = (c.cols + c.bi - 1) / c.bi;
    std::vector<float> scale(static_cast<size_t>(sr * sc));
    std::uniform_real_distribution<float> u(1e-4f, 1e-2f);
    for (auto& s : scale) s = u(rng);

    uint8_t* dw = nullptr;
    float* ds = nullptr;
    uint16_t* dout = nullptr;
    ASSERT_EQ(cudaMalloc(&dw, w.size()), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&ds, scale.size() * sizeof(float)), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dout, w.size() * sizeof(uint16_t)), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(dw, w.data(), w.size(), cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(ds, scale.data(), scale.size() * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemset(dout, 0xff, w.size() * sizeof(uint16_t)), cudaSuccess);  // poison: NaN bf16
    cuda::dequantize_fp8_to_bf16(dw, ds, c.rows, c.cols, c.bo, c.bi, dout, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<uint16_t> out(w.size());
    ASSERT_EQ(cudaMemcpy(out.data(), dout, out.size() * sizeof(uint16_t), cudaMemcpyDeviceToHost), cudaSuccess);
    cudaFree(dw);
    cudaFree(ds);
    cudaFree(dout);
    for (int64_t r = 0; r < c.rows; ++r)
      for (int64_t k = 0; k < c.cols; ++k) {
        const size_t i = static_cast<size_t>(r * c.cols + k);
        const float want = fp8e4m3_to_f32(w[i]) * scale[static_cast<size_t>((r / c.bo) * sc + k / c.bi)];
        ASSERT_EQ(out[i], f32_to_bf16(want)) << "row " << r << " col " << k << " of " << c.rows << "x" << c.cols;
      }
  }
}

}  // namespace
}  // namespace dilu
