// The CUDA backend's kernels (see kernels.h). Written for correctness and a structure that later
// speed work refines in place: one block per row for row ops, a tiled grouped GEMM with BF16
// math (weights dequantized in the tile loader), a warp-per-position online-softmax MLA kernel,
// and device-side MoE grouping so that no step needs the host to look at routing.
#include "kernels/cuda/kernels.h"
#include "kernels/random_fill.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

namespace dilu::cuda {

namespace {

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

void check_launch(const char* what) {
  const cudaError_t rc = cudaGetLastError();
  if (rc != cudaSuccess) throw std::runtime_error(std::string(what) + ": kernel launch failed: " + cudaGetErrorString(rc));
}

constexpr int kMaxDevices = 64;

// Programmatic dependent launch (sm_90+): a kernel launched with launch_pdl() may start while the
// kernel before it in the stream is still running. It calls pdl_wait() before it reads anything
// that kernel (or an earlier one) wrote, and before it writes anything; what it reads before, it
// must be sure no kernel of the step writes (weights). A kernel that calls
// pdl_launch_dependents() lets such a successor start once all its blocks have made the call,
// rather than when they finish. Both are no-ops below sm_90 and without the launch attribute.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
// The first statement of the small kernels between a step's GEMVs (norms, quantization, split-K
// sums, routing; launched with launch_pdl): the kernel lets its successor start at once, then
// waits for its predecessor. A chain of them (each resident before the next can start) reaches the
// next GEMV while the previous one is still finishing, so the GEMV's blocks take the SMs the
// previous one leaves and stream their first weights meanwhile.
__device__ __forceinline__ void pdl_enter() {
  pdl_launch_dependents();
  pdl_wait();
}

// An attribute of the current device, read once per device; 0 when there is no device.
int device_attribute(cudaDeviceAttr attr) {
  static std::mutex mu;
  static std::map<std::pair<int, int>, int> cache;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(dev, static_cast<int>(attr));
  auto it = cache.find(key);
  if (it == cache.end()) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, attr, dev) != cudaSuccess) v = 0;
    it = cache.emplace(key, v).first;
  }
  return it->second;
}

// DILU_PDL, a switch for measuring: 0 launches every kernel plainly, `gemv` only the GEMVs with
// launch_pdl (the small kernels between them plainly, as before the chain).
int pdl_mode() {
  static const int mode = [] {
    const char* v = std::getenv("DILU_PDL");
    const std::string s = v ? v : "";
    return s == "0" ? 0 : s == "gemv" ? 1 : 2;
  }();
  return mode;
}

// A launch that may overlap the previous kernel's end (see pdl_wait), on sm_90+ unless DILU_PDL=0
// is set; a plain launch elsewhere.
template <typename... Params, typename... Args>
void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, Args... args) {
  const bool off = pdl_mode() == 0;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = s;
  cudaLaunchAttribute attr[1] = {};
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = !off && device_attribute(cudaDevAttrComputeCapabilityMajor) >= 9 ? 1 : 0;
  const cudaError_t rc = cudaLaunchKernelEx(&config, kernel, args...);
  if (rc != cudaSuccess) {
    cudaGetLastError();  // a failed launch leaves no error for the next check_launch()
    throw std::runtime_error(std::string("kernel launch failed (grid ") + std::to_string(grid.x) + "x" +
                             std::to_string(grid.y) + "x" + std::to_string(grid.z) + ", block " +
                             std::to_string(block.x) + ", " + std::to_string(smem) +
                             " bytes of shared memory): " + cudaGetErrorString(rc));
  }
}

// The small kernels' launch (pdl_enter): launch_pdl unless DILU_PDL is 0 or `gemv`.
template <typename... Params, typename... Args>
void launch_chained(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, Args... args) {
  if (pdl_mode() == 2) {
    launch_pdl(kernel, grid, block, smem, s, args...);
  } else {
    kernel<<<grid, block, smem, s>>>(args...);
  }
}

// Above 48 KiB of dynamic shared memory a kernel must opt in, once per device; `allowed` is the
// kernel's own record of what each device allows it.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t smem, size_t (&allowed)[kMaxDevices], const char* what) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices)
    throw std::runtime_error(std::string(what) + ": no current device");
  if (smem <= allowed[device]) return;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": cannot allow " + std::to_string(smem) + " bytes of shared memory");
  allowed[device] = smem;
}

// Grid extent over groups: every group, or g.group_slots entries of g.group_list.
int64_t grid_groups(const GroupedGemm& g) { return g.group_list ? g.group_slots : g.groups; }

int grid_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(b < 65535 * 16 ? (b < 1 ? 1 : b) : 65535 * 16);
}

__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide sum for blockDim.x a multiple of 32 (<= 1024); every thread gets the result.
__device__ float block_sum(float v) {
  __shared__ float part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int i = 0; i < warps; ++i) total += part[i];
  return total;
}

// ---------------------------------------------------------------- conversions
__global__ void f32_to_bf16_kernel(const float* x, __nv_bfloat16* out, int64_t n) {
  pdl_enter();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(x[i]);
}

__global__ void bf16_to_f32_kernel(const __nv_bfloat16* x, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = __bfloat162float(x[i]);
}

__device__ __forceinline__ float load_weight(const void* w, WeightType type, int64_t i) {
  switch (type) {
    case WeightType::F32: return static_cast<const float*>(w)[i];
    case WeightType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(w)[i]);
    default: return static_cast<float>(static_cast<const __nv_fp8_e4m3*>(w)[i]);
  }
}

__global__ void dequantize_kernel(const void* w, WeightType type, const float* scale_inv, int64_t sc, int64_t rows,
                                  int64_t cols, int64_t bo, int64_t bi, float* out) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = load_weight(w, type, i);
    if (type == WeightType::FP8) v *= scale_inv[(i / cols / bo) * sc + (i % cols) / bi];
    out[i] = v;
  }
}

// A warp's 128 values (lane + 32 i) quantized to e4m3 with the scale amax / 448 (the CPU block
// path's rounding: x / scale, round to nearest even); returns the scale.
__device__ __forceinline__ float quantize_128(const float (&v)[4], __nv_fp8_e4m3* q, int lane) {
  float amax = 0.0f;
  for (int i = 0; i < 4; ++i) amax = fmaxf(amax, fabsf(v[i]));
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float s = amax > 0.0f ? amax / 448.0f : 1.0f;
  for (int i = 0; i < 4; ++i) q[lane + 32 * i] = __nv_fp8_e4m3(v[i] / s);
  return s;
}

__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// One warp per (row, 128-channel group). With `up`: the rows of silu(x) * up (silu_times, as
// silu_mul_kernel writes them) quantized without being written out.
__global__ void quantize_fp8_kernel(const float* x, int64_t rows, int64_t out_rows, int64_t cols, __nv_fp8_e4m3* q,
                                    float* scale, int64_t row_stride, int64_t group_stride, const float* up) {
  pdl_enter();
  const int64_t groups = cols / 128;
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= out_rows * groups) return;
  const int64_t row = warp / groups, g = warp % groups;
  const float* src = x + row * cols + g * 128;
  float v[4];
  for (int i = 0; i < 4; ++i) v[i] = row < rows ? src[lane + 32 * i] : 0.0f;
  if (up != nullptr && row < rows)
    for (int i = 0; i < 4; ++i) v[i] = silu_times(v[i], up[row * cols + g * 128 + lane + 32 * i]);
  const float s = quantize_128(v, q + row * cols + g * 128, lane);
  if (lane == 0) scale[row * row_stride + g * group_stride] = s;
}

// ---------------------------------------------------------------- row ops
__global__ void embedding_kernel(const void* table, int table_type, int64_t rows, int64_t dim, const int32_t* ids,
                                 int64_t first_id, float* out) {
  const int64_t t = blockIdx.x;
  const int64_t row = static_cast<int64_t>(ids[t]) - first_id;
  float* dst = out + t * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    float v = 0.0f;
    if (row >= 0 && row < rows) {
      const int64_t at = row * dim + i;
      if (table_type == 0) v = static_cast<const float*>(table)[at];
      else if (table_type == 1) v = __bfloat162float(static_cast<const __nv_bfloat16*>(table)[at]);
      else v = __half2float(static_cast<const __half*>(table)[at]);
    }
    dst[i] = v;
  }
}

// Rows of up to kNormPer values a thread are held in registers: every load of the row is issued
// before the first store (x and out may alias), instead of one dependent load-store pair at a time.
constexpr int kNormPer = 8;
// With q (rms_norm_quantize: no residual, d == width, at most kNormPer values a thread): the
// normalized row is also quantized as quantize_fp8_kernel would quantize `out` (q [rows, d], scale
// [rows, d / 128]), through a copy of the row in shared memory (d floats).
__global__ void rms_norm_kernel(float* x, const float* __restrict__ residual, const float* __restrict__ w, int64_t width,
                                int64_t d, float eps, float* out, __nv_fp8_e4m3* q, float* q_scale) {
  pdl_enter();
  float* xr = x + blockIdx.x * width;
  float* orow = out + blockIdx.x * width;
  float ss = 0.0f;
  if (d <= kNormPer * static_cast<int64_t>(blockDim.x)) {
    const float* rr = residual ? residual + blockIdx.x * width : nullptr;
    float v[kNormPer], r[kNormPer];
#pragma unroll
    for (int j = 0; j < kNormPer; ++j) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
      v[j] = i < d ? xr[i] : 0.0f;
      r[j] = rr && i < d ? rr[i] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kNormPer; ++j) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
      if (i >= d) continue;
      if (rr) {
        v[j] += r[j];
        xr[i] = v[j];
      }
      ss += v[j] * v[j];
    }
    ss = block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
    extern __shared__ float norm_row[];
#pragma unroll
    for (int j = 0; j < kNormPer; ++j) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
      if (i >= d) continue;
      const float o = w[i] * (v[j] * inv);
      orow[i] = o;
      if (q) norm_row[i] = o;
    }
    if (q == nullptr) return;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int64_t groups = d / 128;
    for (int64_t g = threadIdx.x >> 5; g < groups; g += blockDim.x >> 5) {
      float qv[4];
      for (int i = 0; i < 4; ++i) qv[i] = norm_row[g * 128 + lane + 32 * i];
      const float sc = quantize_128(qv, q + blockIdx.x * d + g * 128, lane);
      if (lane == 0) q_scale[blockIdx.x * groups + g] = sc;
    }
    return;
  }
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float v = xr[i];
    if (residual) {
      v += residual[blockIdx.x * width + i];
      xr[i] = v;
    }
    ss += v * v;
  }
  ss = block_sum(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) orow[i] = w[i] * (xr[i] * inv);
}

__global__ void gather_rows_kernel(const float* __restrict__ x, int64_t width, const int32_t* __restrict__ rows,
                                   float* __restrict__ out) {
  pdl_enter();
  const float* src = x + static_cast<int64_t>(rows[blockIdx.x]) * width;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) out[blockIdx.x * width + i] = src[i];
}

__global__ void add_kernel(float* x, const float* y, int64_t n) {
  pdl_enter();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] += y[i];
}

__global__ void silu_mul_kernel(const float* gate, const float* up, int64_t n, float* out) {
  pdl_enter();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = silu_times(gate[i], up[i]);
}

// Block (token t, slice y of its heads): the token's cos and sin, computed once into shared
// memory for all heads, then the rotations of the slice's (head, pair) items.
__global__ void rope_kernel(float* x, int64_t heads, int64_t width, int64_t offset, const int32_t* pos,
                            const float* inv_freq, int64_t half, float attention_factor) {
  pdl_enter();
  extern __shared__ float rope_cs[];  // [half] cos, [half] sin, times attention_factor
  const int64_t t = blockIdx.x;
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
    const float f = static_cast<float>(pos[t]) * inv_freq[i];
    rope_cs[i] = cosf(f) * attention_factor;
    rope_cs[half + i] = sinf(f) * attention_factor;
  }
  __syncthreads();
  const int hh = static_cast<int>(half), items = static_cast<int>(heads * half);
  for (int j = static_cast<int>(blockIdx.y * blockDim.x + threadIdx.x); j < items;
       j += static_cast<int>(gridDim.y * blockDim.x)) {
    const int head = j / hh, i = j % hh;
    const float c = rope_cs[i], s = rope_cs[hh + i];
    float* v = x + (t * heads + head) * width + offset;
    const float a = v[2 * i], b = v[2 * i + 1];
    v[2 * i] = a * c - b * s;
    v[2 * i + 1] = b * c + a * s;
  }
}

__global__ void cache_write_kernel(__nv_bfloat16* cache, const float* entry, const int64_t* slot, int64_t width) {
  pdl_enter();
  const int64_t t = blockIdx.x;
  __nv_bfloat16* dst = cache + slot[t] * width;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) dst[i] = __float2bfloat16_rn(entry[t * width + i]);
}

__global__ void concat_columns_kernel(const float* parts, int64_t p, int64_t n, int64_t wp, float* out, int64_t w) {
  const int64_t row = blockIdx.x;
  for (int64_t c = threadIdx.x; c < w; c += blockDim.x) {
    const int64_t part = c / wp, j = c % wp;
    out[row * w + c] = parts[(part * n + row) * wp + j];
  }
}

__global__ void argmax_kernel(const float* x, int64_t cols, int32_t* out) {
  const float* row = x + blockIdx.x * cols;
  float best = -INFINITY;
  int64_t idx = -1;
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
    const float v = row[i];
    if (idx < 0 || v > best) {  // ascending i per thread: the first maximum wins
      best = v;
      idx = i;
    }
  }
  __shared__ float sv[1024];
  __shared__ int64_t si[1024];
  sv[threadIdx.x] = best;
  si[threadIdx.x] = idx;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float ov = sv[threadIdx.x + s];
      const int64_t oi = si[threadIdx.x + s];
      const bool take = oi >= 0 && (si[threadIdx.x] < 0 || ov > sv[threadIdx.x] ||
                                    (ov == sv[threadIdx.x] && oi < si[threadIdx.x]));
      if (take) {
        sv[threadIdx.x] = ov;
        si[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<int32_t>(si[0] < 0 ? 0 : si[0]);
}

// ---------------------------------------------------------------- grouped GEMM
// 64 x 64 output tile per block of 256 threads (4 x 4 each), K in steps of 16.
constexpr int kTm = 64, kTn = 64, kTk = 16;

__global__ void __launch_bounds__(256) grouped_gemm_kernel(GroupedGemm g) {
  const int64_t group = g.group_list ? g.group_list[blockIdx.z] : static_cast<int64_t>(blockIdx.z);
  if (group < 0) return;
  int64_t row_begin = 0, row_end = g.rows;
  if (g.group_offsets) {
    row_begin = g.group_offsets[group];
    row_end = g.group_offsets[group + 1];
  }
  const int64_t r0 = row_begin + static_cast<int64_t>(blockIdx.y) * kTm;
  if (r0 >= row_end) return;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTn;
  const void* w = g.weights ? g.weights[group] : g.weight;
  const float* scale = g.type != WeightType::FP8 ? nullptr : (g.scales ? g.scales[group] : g.scale);
  const int64_t sc = g.scale_stride;

  __shared__ float xs[kTk][kTm + 1];
  __shared__ float ws[kTk][kTn + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < g.k; k0 += kTk) {
    for (int i = threadIdx.x; i < kTm * kTk; i += 256) {
      const int rr = i / kTk, kk = i % kTk;
      const int64_t r = r0 + rr, k = k0 + kk;
      float v = 0.0f;
      if (r < row_end && k < g.k) {
        const int64_t src = g.x_rows ? g.x_rows[r] : r;
        v = g.x[src * g.ldx + k];
        if (g.round_bf16) v = round_bf16(v);
      }
      xs[kk][rr] = v;
    }
    for (int i = threadIdx.x; i < kTn * kTk; i += 256) {
      const int nn = i / kTk, kk = i % kTk;
      const int64_t n = n0 + nn, k = k0 + kk;
      float v = 0.0f;
      if (n < g.n && k < g.k) {
        v = load_weight(w, g.type, n * g.k + k);
        if (scale) v *= scale[(n / g.block_out) * sc + k / g.block_in];
        if (g.round_bf16) v = round_bf16(v);
      }
      ws[kk][nn] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTk; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = xs[kk][ty * 4 + i];
        b[i] = ws[kk][tx * 4 + i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r0 + ty * 4 + i;
    if (r >= row_end) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx * 4 + j;
      if (n < g.n) g.out[r * g.ldo + n] = acc[i][j];
    }
  }
}

// ---------------------------------------------------------------- MLA
// q_lat[t, h, :] = q_nope[t, h, :] @ W_UK[h]  ([nope] x [nope, C])
__global__ void mla_absorb_q_kernel(MlaArgs a) {
  const int64_t t = blockIdx.x / a.h, head = blockIdx.x % a.h;
  extern __shared__ float qs[];
  const float* q = a.q + (t * a.h + head) * (a.nope + a.r);
  for (int64_t i = threadIdx.x; i < a.nope; i += blockDim.x) qs[i] = q[i];
  __syncthreads();
  const float* w_uk = a.kv_b + head * (a.nope + a.v) * a.c;
  for (int64_t k = threadIdx.x; k < a.c; k += blockDim.x) {
    float acc = 0.0f;
    for (int64_t i = 0; i < a.nope; ++i) acc = fmaf(qs[i], w_uk[i * a.c + k], acc);
    a.q_lat[(t * a.h + head) * a.c + k] = acc;
  }
}

constexpr int kMlaWarps = 4;
constexpr int kMaxC = 512, kMaxR = 64;

// One block per (token, head); each warp walks positions warp, warp + 4, ... with an online
// softmax, lanes own latent columns lane + 32 i; the warps' partial states are merged at the end.
__global__ void __launch_bounds__(kMlaWarps * 32) mla_attention_kernel(MlaArgs a) {
  const int64_t t = blockIdx.x / a.h, head = blockIdx.x % a.h;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t width = a.c + a.r;
  __shared__ float qs[kMaxC + kMaxR];
  __shared__ float wm[kMlaWarps], wl[kMlaWarps];
  __shared__ float wacc[kMlaWarps][kMaxC];
  for (int64_t i = threadIdx.x; i < a.c; i += blockDim.x)
    qs[i] = a.q_lat[(t * a.h + head) * a.c + i] * (a.q_scale ? a.q_scale[head * 2 * a.c + i] : 1.0f);
  for (int64_t i = threadIdx.x; i < a.r; i += blockDim.x) qs[a.c + i] = a.q[(t * a.h + head) * (a.nope + a.r) + a.nope + i];
  __syncthreads();
  const int64_t ctx = static_cast<int64_t>(a.token_pos[t]) + 1;
  const int32_t* table = a.tables + static_cast<int64_t>(a.token_seq[t]) * a.table_stride;
  float m = -INFINITY, l = 0.0f;
  float acc[kMaxC / 32];
#pragma unroll
  for (int i = 0; i < kMaxC / 32; ++i) acc[i] = 0.0f;
  for (int64_t j = warp; j < ctx; j += kMlaWarps) {
    const __nv_bfloat16* e =
        reinterpret_cast<const __nv_bfloat16*>(a.cache) + (static_cast<int64_t>(table[j / a.block_size]) * a.block_size + j % a.block_size) * width;
    float s = 0.0f;
    for (int64_t k = lane; k < width; k += 32) s = fmaf(qs[k], __bfloat162float(e[k]), s);
    s = warp_sum(s) * a.scale;
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new), p = expf(s - m_new);
    l = l * corr + p;
#pragma unroll
    for (int i = 0; i < kMaxC / 32; ++i) {
      const int64_t k = lane + 32 * i;
      if (k < a.c) acc[i] = acc[i] * corr + p * __bfloat162float(e[k]);
    }
    m = m_new;
  }
  if (lane == 0) {
    wm[warp] = m;
    wl[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kMaxC / 32; ++i) {
    const int64_t k = lane + 32 * i;
    if (k < a.c) wacc[warp][k] = acc[i];
  }
  __syncthreads();
  float big = -INFINITY;
  for (int w = 0; w < kMlaWarps; ++w) big = fmaxf(big, wm[w]);
  float denom = 0.0f, f[kMlaWarps];
  for (int w = 0; w < kMlaWarps; ++w) {
    f[w] = wl[w] > 0.0f ? expf(wm[w] - big) : 0.0f;
    denom += wl[w] * f[w];
  }
  for (int64_t k = threadIdx.x; k < a.c; k += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kMlaWarps; ++w) o += wacc[w][k] * f[w];
    a.o_lat[(t * a.h + head) * a.c + k] = o / denom;
  }
}

// out[t, head * v + i] = W_UV[head][i, :] . o_lat[t, head, :]
__global__ void mla_absorb_v_kernel(MlaArgs a) {
  const int64_t t = blockIdx.x / a.h, head = blockIdx.x % a.h;
  extern __shared__ float os[];
  for (int64_t k = threadIdx.x; k < a.c; k += blockDim.x) os[k] = a.o_lat[(t * a.h + head) * a.c + k];
  __syncthreads();
  const float* w_uv = a.kv_b + (head * (a.nope + a.v) + a.nope) * a.c;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t i = warp; i < a.v; i += warps) {
    float s = 0.0f;
    for (int64_t k = lane; k < a.c; k += 32) s = fmaf(w_uv[i * a.c + k], os[k], s);
    s = warp_sum(s);
    if (lane == 0) a.out[t * a.h * a.v + head * a.v + i] = s;
  }
}

// ---------------------------------------------------------------- MoE
// One block per token; the selection (a few hundred comparisons) runs on thread 0 with the CPU's
// order: stable by score, ties to the lower index.
// One block per token. Scores and the groups' top-2 sums in parallel; the group choice (a few
// groups) on one thread; then k rounds of a block-wide argmax (ties: the lowest expert id, as a
// scan in ascending order takes them).
__device__ __forceinline__ bool better_pick(float v, int i, float bv, int bi) {
  if (i < 0) return false;
  if (bi < 0) return true;
  return v > bv || (v == bv && i < bi);
}

// The warp's best (value, index) by better_pick, in every lane.
__device__ __forceinline__ void warp_best_pick(float& bv, int& bi) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better_pick(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
}

// A group's score: the sum of its two best biased scores (the best alone in a group of one).
__device__ __forceinline__ float group_score_of(const float* choice, int64_t first, int64_t count) {
  float a = -INFINITY, b = -INFINITY;
  for (int64_t e = first; e < first + count; ++e) {
    const float v = choice[e];
    if (v > a) {
      b = a;
      a = v;
    } else if (v > b) {
      b = v;
    }
  }
  return count >= 2 ? a + b : a;
}

__global__ void moe_select_kernel(const float* logits, const float* bias, int64_t e_count, int64_t k, int64_t n_group,
                                  int64_t topk_group, bool norm, float factor, int32_t* ids, float* weights) {
  pdl_enter();
  extern __shared__ float sm[];
  float* scores = sm;
  float* choice = sm + e_count;
  __shared__ float group_score[64];
  __shared__ float red_v[32];
  __shared__ int red_i[32];
  __shared__ unsigned long long kept_s;
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  for (int64_t e = threadIdx.x; e < e_count; e += blockDim.x) {
    const float s = 1.0f / (1.0f + expf(-logits[t * e_count + e]));
    scores[e] = s;
    choice[e] = s + (bias ? bias[e] : 0.0f);
  }
  __syncthreads();
  const int64_t per_group = e_count / n_group;
  if (threadIdx.x < n_group) group_score[threadIdx.x] = group_score_of(choice, threadIdx.x * per_group, per_group);
  __syncthreads();
  if (threadIdx.x == 0) {  // keep the topk_group best groups
    unsigned long long kept = 0;  // n_group <= 64
    for (int64_t pick = 0; pick < topk_group; ++pick) {
      int64_t best_g = -1;
      float best = 0.0f;
      for (int64_t gi = 0; gi < n_group; ++gi) {
        if (kept >> gi & 1ull) continue;
        if (best_g < 0 || group_score[gi] > best) {
          best = group_score[gi];
          best_g = gi;
        }
      }
      kept |= 1ull << best_g;
    }
    kept_s = kept;
  }
  __syncthreads();
  const unsigned long long kept = kept_s;
  for (int64_t e = threadIdx.x; e < e_count; e += blockDim.x)
    if (!(kept >> (e / per_group) & 1ull)) choice[e] = -INFINITY;
  __syncthreads();
  float sum = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    float bv = 0.0f;
    int bi = -1;
    for (int64_t e = threadIdx.x; e < e_count; e += blockDim.x) {
      const float v = choice[e];
      if (v != v) continue;  // NaN (already chosen)
      if (better_pick(v, static_cast<int>(e), bv, bi)) {
        bv = v;
        bi = static_cast<int>(e);
      }
    }
    warp_best_pick(bv, bi);
    if (lane == 0) {
      red_v[warp] = bv;
      red_i[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < warps; ++w)
        if (better_pick(red_v[w], red_i[w], bv, bi)) {
          bv = red_v[w];
          bi = red_i[w];
        }
      choice[bi] = NAN;
      ids[t * k + j] = bi;
      weights[t * k + j] = scores[bi];
      sum += scores[bi];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    for (int64_t j = 0; j < k; ++j) {
      float w = weights[t * k + j];
      if (norm) w /= (sum + 1e-20f);
      weights[t * k + j] = w * factor;
    }
  }
}

// better_pick's order of values as unsigned keys: larger is better; -0 ranks as +0; NaN below
// every number (at 1, above the 0 that marks no expert).
__device__ __forceinline__ uint32_t pick_order(float v) {
  if (v != v) return 1u;
  uint32_t b = __float_as_uint(v);
  if (b == 0x80000000u) b = 0;
  return b & 0x80000000u ? ~b : b | 0x80000000u;
}

// The same choice by one warp per token (at most 256 experts, at most 32 groups): lane l holds
// experts l + 32 i in registers; group scores by the lanes of the first n_group, the kept groups
// by rank (the better score first, the lower index on a tie: the order of the block kernel's
// picks), then k rounds of a warp argmax. The same picks, weights and sums, in the same order;
// no block barrier (the block kernel spends most of its time in 2 k of them).
constexpr int kSelectWarps = 4, kSelectPer = 8;
__global__ void __launch_bounds__(kSelectWarps * 32)
    moe_select_warp_kernel(const float* logits, const float* bias, int64_t t_count, int64_t e_count, int64_t k,
                           int64_t n_group, int64_t topk_group, bool norm, float factor, int32_t* ids, float* weights) {
  pdl_enter();
  extern __shared__ float sel_sm[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kSelectWarps + warp;
  if (t >= t_count) return;
  float* scores = sel_sm + static_cast<int64_t>(warp) * 2 * e_count;
  float* choice = scores + e_count;
  __shared__ float group_score[kSelectWarps][32];
  // Every logit and bias load issued before the first is used (from addresses clamped into the
  // row): guarded one by one, each waited on L2 in turn.
  float val[kSelectPer], logit[kSelectPer], shift[kSelectPer];
  const float* row = logits + t * e_count;
#pragma unroll
  for (int i = 0; i < kSelectPer; ++i) {
    const int64_t e = lane + 32 * i < e_count ? lane + 32 * i : e_count - 1;
    logit[i] = row[e];
    shift[i] = bias ? bias[e] : 0.0f;
  }
#pragma unroll
  for (int i = 0; i < kSelectPer; ++i) {
    const int64_t e = lane + 32 * i;
    val[i] = 0.0f;
    if (e < e_count) {
      const float sc = 1.0f / (1.0f + expf(-logit[i]));
      scores[e] = sc;
      val[i] = sc + shift[i];
      choice[e] = val[i];
    }
  }
  __syncwarp();
  // 32-bit: at most 256 experts here, and a 64-bit division is a long subroutine on the GPU.
  const int per_group = static_cast<int>(e_count) / static_cast<int>(n_group);
  if (lane < n_group) group_score[warp][lane] = group_score_of(choice, lane * per_group, per_group);
  __syncwarp();
  bool keep_group = false;
  if (lane < n_group) {
    const float mine = group_score[warp][lane];
    int better = 0;
    for (int g = 0; g < n_group; ++g) {
      const float o = group_score[warp][g];
      better += (o > mine || (o == mine && g < lane)) ? 1 : 0;
    }
    keep_group = better < topk_group;
  }
  const unsigned kept = __ballot_sync(0xffffffffu, keep_group);
#pragma unroll
  for (int i = 0; i < kSelectPer; ++i) {
    const int e = lane + 32 * i;
    if (e < e_count && !(kept >> (e / per_group) & 1u)) val[i] = -INFINITY;
  }
  // k rounds of a warp argmax by better_pick's order, as keys: the value's order (-0 as +0, NaN
  // below every number) above the complement of the expert id, so that the larger key is the
  // better pick; 0 for no expert. A round is the lane's best key, two warp max-reductions (its
  // upper then lower half) and the winner clearing its key. (Compared one by one, the lanes' 8
  // candidates and the 5 shuffle steps took about 230 instructions a round, most of a one-token
  // call's 12.7 us.)
  uint64_t key[kSelectPer];
#pragma unroll
  for (int i = 0; i < kSelectPer; ++i) {
    const int e = lane + 32 * i;
    key[i] = e < e_count ? static_cast<uint64_t>(pick_order(val[i])) << 32 | (0xffffffffu - static_cast<uint32_t>(e))
                         : 0;
  }
  __syncwarp();  // every lane's group scores are read: `choice` now holds the picks
  int32_t* picked = reinterpret_cast<int32_t*>(choice);
  float sum = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    uint64_t best = key[0];
#pragma unroll
    for (int i = 1; i < kSelectPer; ++i) best = key[i] > best ? key[i] : best;
    const uint32_t hi = static_cast<uint32_t>(best >> 32), lo = static_cast<uint32_t>(best);
    const uint32_t top_hi = __reduce_max_sync(0xffffffffu, hi);
    const uint32_t top_lo = __reduce_max_sync(0xffffffffu, hi == top_hi ? lo : 0u);
    const int bi = top_hi == 0 ? -1 : static_cast<int>(0xffffffffu - top_lo);
    const int mine = bi >= 0 && (bi & 31) == lane ? bi >> 5 : -1;  // the winner's slot, in its lane
#pragma unroll
    for (int i = 0; i < kSelectPer; ++i) key[i] = i == mine ? 0 : key[i];
    if (bi >= 0) sum += scores[bi];
    if (lane == 0) picked[j] = bi;
  }
  __syncwarp();
  for (int64_t j = lane; j < k; j += 32) {
    const int bi = picked[j];
    ids[t * k + j] = bi;
    float w = bi >= 0 ? scores[bi] : 0.0f;
    if (norm) w /= (sum + 1e-20f);
    weights[t * k + j] = w * factor;
  }
}

__global__ void moe_count_kernel(const int32_t* ids, int64_t pairs, int64_t first, int64_t local, int32_t* counters) {
  pdl_enter();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = ids[i] - first;
    if (e >= 0 && e < local) atomicAdd(&counters[e], 1);
  }
}

// By a whole block (moe_scan_kernel: one block of 1024 threads): exclusive scan of the counts
// into offsets, counters (global or shared memory) reset to the offsets. Chunks of blockDim
// experts, each scanned across warps in shared memory. With group_list, the non-empty experts'
// ids in order (a ballot per warp gives each its rank), then -1 to the end. Returns (to thread 0)
// the number of non-empty groups.
__device__ int32_t moe_scan_block(int32_t* counters, int64_t local, int32_t* offsets, int32_t* group_list,
                                  int64_t group_slots) {
  __shared__ int32_t warp_total[32], warp_live[32];
  __shared__ int32_t carry_s, live_s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (threadIdx.x == 0) carry_s = live_s = 0;
  __syncthreads();
  for (int64_t base = 0; base < local; base += blockDim.x) {
    const int64_t e = base + threadIdx.x;
    const int32_t c = e < local ? counters[e] : 0;
    int32_t incl = c;  // inclusive scan within the warp
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    const unsigned live = __ballot_sync(0xffffffffu, c > 0);  // the non-empty groups, in order
    if (lane == 31) warp_total[warp] = incl;
    if (lane == 0) warp_live[warp] = __popc(live);
    __syncthreads();
    int32_t before = carry_s, live_before = live_s;
    for (int w = 0; w < warp; ++w) {
      before += warp_total[w];
      live_before += warp_live[w];
    }
    const int32_t excl = before + incl - c;
    if (e < local) {
      offsets[e] = excl;
      counters[e] = excl;
    }
    live_before += __popc(live & ((1u << lane) - 1u));
    if (group_list && c > 0 && live_before < group_slots) group_list[live_before] = static_cast<int32_t>(e);
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) carry_s = excl + c;
    if (threadIdx.x == 0)
      for (int w = 0; w < warps; ++w) live_s += warp_live[w];
    __syncthreads();
  }
  if (threadIdx.x == 0) offsets[local] = carry_s;
  if (group_list)
    for (int64_t i = live_s + threadIdx.x; i < group_slots; i += blockDim.x) group_list[i] = -1;
  return live_s;
}

__global__ void moe_scan_kernel(int32_t* counters, int64_t local, int32_t* offsets, int32_t* group_list,
                                int64_t group_slots) {
  pdl_enter();
  moe_scan_block(counters, local, offsets, group_list, group_slots);
}

// moe_group and count_routed_kernel in one block, the counters in shared memory: at most
// kMoeGroupSmallPairs pairs and kMoeGroupSmallLocal experts (decode). The scatter's order within
// an expert's rows is that of shared-memory atomics, as moe_scatter_kernel's is of global ones.
constexpr int64_t kMoeGroupSmallPairs = 1024, kMoeGroupSmallLocal = 4096;
__global__ void __launch_bounds__(1024)
    moe_group_small_kernel(const int32_t* ids, int64_t pairs, int64_t k, int64_t first, int64_t local,
                           int32_t* offsets, int32_t* rows, int32_t* pair_row, int32_t* group_list,
                           int64_t group_slots, unsigned long long* routed, int64_t t, MoeGroupQuantize quant) {
  __shared__ int32_t cnt[kMoeGroupSmallLocal];
  __shared__ int32_t pair_e[kMoeGroupSmallPairs];
  for (int64_t e = threadIdx.x; e < local; e += blockDim.x) cnt[e] = 0;
  pdl_enter();
  __syncthreads();
  for (int64_t i = threadIdx.x; i < pairs; i += blockDim.x) {
    const int64_t e = ids[i] - first;
    const bool mine = e >= 0 && e < local;
    pair_e[i] = mine ? static_cast<int32_t>(e) : -1;
    if (mine) atomicAdd(&cnt[e], 1);
  }
  __syncthreads();
  const int32_t live = moe_scan_block(cnt, local, offsets, group_list, group_slots);
  for (int64_t i = threadIdx.x; i < pairs; i += blockDim.x) {
    const int32_t e = pair_e[i];
    if (e >= 0) {
      const int32_t at = atomicAdd(&cnt[e], 1);
      rows[at] = static_cast<int32_t>(i / k);
      pair_row[i] = at;
    } else {
      pair_row[i] = -1;
    }
  }
  if (routed && threadIdx.x == 0) atomicAdd(routed, static_cast<unsigned long long>(live));
  if (quant.x == nullptr) return;
  const int64_t groups = quant.d / 128;
  const int lane = threadIdx.x & 31;
  for (int64_t w = threadIdx.x >> 5; w < t * groups; w += blockDim.x >> 5) {  // as quantize_fp8_kernel
    const int64_t row = w / groups, g = w % groups;
    float v[4];
    for (int i = 0; i < 4; ++i) v[i] = quant.x[row * quant.d + g * 128 + lane + 32 * i];
    const float sc = quantize_128(v, reinterpret_cast<__nv_fp8_e4m3*>(quant.q) + row * quant.d + g * 128, lane);
    if (lane == 0) quant.scale[row * groups + g] = sc;
  }
}

__global__ void moe_scatter_kernel(const int32_t* ids, int64_t pairs, int64_t k, int64_t first, int64_t local,
                                   int32_t* cursors, int32_t* rows, int32_t* pair_row) {
  pdl_enter();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = ids[i] - first;
    if (e >= 0 && e < local) {
      const int32_t at = atomicAdd(&cursors[e], 1);
      rows[at] = static_cast<int32_t>(i / k);
      pair_row[i] = at;
    } else {
      pair_row[i] = -1;
    }
  }
}

__global__ void moe_silu_mul_kernel(float* gate, const float* up, const int32_t* offsets, int64_t local, int64_t f) {
  pdl_enter();
  const int64_t n = static_cast<int64_t>(offsets[local]) * f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    gate[i] = silu_times(gate[i], up[i]);
}

// One warp per (row, 128-channel group) of the rows in use.
__global__ void moe_silu_mul_fp8_kernel(const float* gate, const float* up, const int32_t* offsets, int64_t local,
                                        int64_t f, __nv_fp8_e4m3* q, float* scale) {
  pdl_enter();
  const int64_t groups = f / 128;
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= static_cast<int64_t>(offsets[local]) * groups) return;
  const int64_t at = warp * 128;  // row * f + group * 128
  float v[4];
  for (int i = 0; i < 4; ++i) v[i] = silu_times(gate[at + lane + 32 * i], up[at + lane + 32 * i]);
  const float s = quantize_128(v, q + at, lane);
  if (lane == 0) scale[warp] = s;
}

// Block (token, column chunk): out[t] = sum over the token's pairs, in ascending expert id (each
// id once; negative ids skipped), of weight x y[pair row] (rows < 0: other ranks' experts). The
// order comes from ranks computed in parallel by the first k threads. kVec: four columns a thread
// (d % 4 == 0), so a block covers 4 x blockDim columns.
template <bool kVec>
__global__ void moe_combine_kernel(const float* y, const int32_t* ids, const float* weights, const int32_t* pair_row,
                                   int64_t k, int64_t d, float* out, const float* addend) {
  pdl_enter();
  constexpr int kMaxK = 64;
  __shared__ int32_t s_id[kMaxK];
  __shared__ bool s_first[kMaxK];
  __shared__ int order[kMaxK];
  __shared__ int count;
  const int64_t t = blockIdx.x;
  const int j = static_cast<int>(threadIdx.x);
  if (j < k) s_id[j] = ids[t * k + j];
  if (j == 0) count = 0;
  __syncthreads();
  if (j < k) {
    bool first = s_id[j] >= 0;
    for (int i = 0; i < j; ++i) first = first && s_id[i] != s_id[j];
    s_first[j] = first;
  }
  __syncthreads();
  if (j < k && s_first[j]) {
    int rank = 0;
    for (int i = 0; i < k; ++i) rank += s_first[i] && s_id[i] < s_id[j];
    order[rank] = j;
    atomicAdd(&count, 1);
  }
  __syncthreads();
  const int n = count;
  if constexpr (kVec) {
    const int64_t c = 4 * (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x);
    if (c >= d) return;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int i = 0; i < n; ++i) {
      const int64_t pick = order[i];
      const int32_t r = pair_row[t * k + pick];
      if (r < 0) continue;
      const float w = weights[t * k + pick];
      const float4 v = *reinterpret_cast<const float4*>(y + static_cast<int64_t>(r) * d + c);
      acc.x += v.x * w;
      acc.y += v.y * w;
      acc.z += v.z * w;
      acc.w += v.w * w;
    }
    if (addend) {
      const float4 a = *reinterpret_cast<const float4*>(addend + t * d + c);
      acc.x += a.x;
      acc.y += a.y;
      acc.z += a.z;
      acc.w += a.w;
    }
    *reinterpret_cast<float4*>(out + t * d + c) = acc;
  } else {
    const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float acc = 0.0f;
    for (int i = 0; i < n; ++i) {
      const int64_t pick = order[i];
      const int32_t r = pair_row[t * k + pick];
      if (r >= 0) acc += y[static_cast<int64_t>(r) * d + c] * weights[t * k + pick];
    }
    out[t * d + c] = addend ? acc + addend[t * d + c] : acc;
  }
}

__global__ void random_fill_kernel(void* out, int dtype, int64_t n, uint64_t key, float center, float half_width) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = random_fill_value(key, static_cast<uint64_t>(i), center, half_width);
    if (dtype == 0) static_cast<float*>(out)[i] = v;
    else if (dtype == 1) static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
    else static_cast<__nv_fp8_e4m3*>(out)[i] = __nv_fp8_e4m3(v);
  }
}

__global__ void count_routed_kernel(const int32_t* offsets, int64_t local, unsigned long long* counter) {
  pdl_enter();
  unsigned long long used = 0;
  for (int64_t e = threadIdx.x; e < local; e += blockDim.x) used += offsets[e + 1] > offsets[e] ? 1 : 0;
  atomicAdd(counter, used);
}

__global__ void fill_u32_kernel(uint32_t* dst, uint32_t pattern, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = pattern;
}

}  // namespace

// ---------------------------------------------------------------- launchers
void f32_to_bf16(const float* x, uint16_t* out, int64_t n, void* stream) {
  if (n <= 0) return;
  launch_chained(f32_to_bf16_kernel, grid_for(n, 256), 256, 0, as_stream(stream), x, reinterpret_cast<__nv_bfloat16*>(out), n);
  check_launch("f32_to_bf16");
}

void bf16_to_f32(const uint16_t* x, float* out, int64_t n, void* stream) {
  if (n <= 0) return;
  bf16_to_f32_kernel<<<grid_for(n, 256), 256, 0, as_stream(stream)>>>(reinterpret_cast<const __nv_bfloat16*>(x), out, n);
  check_launch("bf16_to_f32");
}

void dequantize_to_f32(const void* w, WeightType type, const float* scale_inv, int64_t scale_stride, int64_t rows,
                       int64_t cols, int64_t block_out, int64_t block_in, float* out, void* stream) {
  if (rows * cols <= 0) return;
  dequantize_kernel<<<grid_for(rows * cols, 256), 256, 0, as_stream(stream)>>>(w, type, scale_inv, scale_stride, rows,
                                                                                cols, block_out, block_in, out);
  check_launch("dequantize");
}

// quantize_fp8_kernel's launch, with or without `up`.
static void launch_quantize_fp8(const float* x, const float* up, int64_t rows, int64_t out_rows, int64_t cols,
                                uint8_t* q, float* scale, int64_t row_stride, int64_t group_stride, void* stream) {
  const int64_t warps = out_rows * (cols / 128);
  if (warps <= 0) return;
  launch_chained(quantize_fp8_kernel, static_cast<int>((warps * 32 + 255) / 256), 256, 0, as_stream(stream), x,
                 rows, out_rows, cols, reinterpret_cast<__nv_fp8_e4m3*>(q), scale, row_stride, group_stride, up);
  check_launch(up ? "silu_mul_quantize_fp8" : "quantize_fp8");
}

void quantize_fp8_per_token_128(const float* x, int64_t rows, int64_t out_rows, int64_t cols, uint8_t* q,
                                float* scale, int64_t row_stride, int64_t group_stride, void* stream) {
  launch_quantize_fp8(x, nullptr, rows, out_rows, cols, q, scale, row_stride, group_stride, stream);
}

void silu_mul_quantize_fp8(const float* gate, const float* up, int64_t rows, int64_t out_rows, int64_t cols,
                           uint8_t* q, float* scale, int64_t row_stride, int64_t group_stride, void* stream) {
  launch_quantize_fp8(gate, up, rows, out_rows, cols, q, scale, row_stride, group_stride, stream);
}

void embedding(const void* table, int table_type, int64_t rows, int64_t dim, const int32_t* ids, int64_t n,
               int64_t first_id, float* out, void* stream) {
  if (n <= 0) return;
  embedding_kernel<<<static_cast<unsigned>(n), 256, 0, as_stream(stream)>>>(table, table_type, rows, dim, ids, first_id,
                                                                             out);
  check_launch("embedding");
}

void rms_norm(float* x, const float* residual, const float* w, int64_t rows, int64_t width, int64_t d, float eps,
              float* out, void* stream) {
  if (rows <= 0) return;
  // Wide rows take 1024 threads: each thread's loop is a chain of dependent loads.
  launch_chained(rms_norm_kernel, static_cast<unsigned>(rows), d >= 2048 ? 1024 : 256, 0, as_stream(stream), x,
                 residual, w, width, d, eps, out, static_cast<__nv_fp8_e4m3*>(nullptr), static_cast<float*>(nullptr));
  check_launch("rms_norm");
}

bool rms_norm_quantize(const float* x, const float* w, int64_t rows, int64_t d, float eps, float* out, uint8_t* q,
                       float* scale, void* stream) {
  const int threads = d >= 2048 ? 1024 : 256;  // as rms_norm
  if (rows <= 0 || d <= 0 || d % 128 != 0 || d > kNormPer * threads) return false;
  // x is only written with a residual, which this has not.
  launch_chained(rms_norm_kernel, static_cast<unsigned>(rows), threads, static_cast<size_t>(d) * sizeof(float),
                 as_stream(stream), const_cast<float*>(x), static_cast<const float*>(nullptr), w, d, d, eps, out,
                 reinterpret_cast<__nv_fp8_e4m3*>(q), scale);
  check_launch("rms_norm_quantize");
  return true;
}

void gather_rows(const float* x, int64_t width, const int32_t* rows, int64_t n, float* out, void* stream) {
  if (n <= 0) return;
  launch_chained(gather_rows_kernel, static_cast<unsigned>(n), 256, 0, as_stream(stream), x, width, rows, out);
  check_launch("gather_rows");
}

__global__ void scatter_rows_kernel(const float* __restrict__ x, int64_t width, const int32_t* __restrict__ rows,
                                    float* __restrict__ out) {
  float* dst = out + static_cast<int64_t>(rows[blockIdx.x]) * width;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) dst[i] = x[blockIdx.x * width + i];
}

void scatter_rows(const float* x, int64_t width, const int32_t* rows, int64_t n, float* out, void* stream) {
  if (n <= 0) return;
  scatter_rows_kernel<<<static_cast<unsigned>(n), 256, 0, as_stream(stream)>>>(x, width, rows, out);
  check_launch("scatter_rows");
}

void add(float* x, const float* y, int64_t n, void* stream) {
  if (n <= 0) return;
  launch_chained(add_kernel, grid_for(n, 256), 256, 0, as_stream(stream), x, y, n);
  check_launch("add");
}

void silu_mul(const float* gate, const float* up, int64_t n, float* out, void* stream) {
  if (n <= 0) return;
  launch_chained(silu_mul_kernel, grid_for(n, 256), 256, 0, as_stream(stream), gate, up, n, out);
  check_launch("silu_mul");
}

void rope(float* x, int64_t t, int64_t heads, int64_t width, int64_t offset, const int32_t* pos,
          const float* inv_freq, int64_t half, float attention_factor, void* stream) {
  if (t <= 0 || heads * half <= 0) return;
  if (heads * half >= (int64_t{1} << 31)) throw std::runtime_error("rope: more than 2^31 rotations a token");
  const dim3 grid(static_cast<unsigned>(t), static_cast<unsigned>(std::min<int64_t>((heads * half + 255) / 256, 16)));
  const size_t smem = static_cast<size_t>(2 * half) * sizeof(float);
  launch_chained(rope_kernel, grid, 256, smem, as_stream(stream), x, heads, width, offset, pos, inv_freq, half, attention_factor);
  check_launch("rope");
}

void cache_write(uint16_t* cache, const float* entry, const int64_t* slot, int64_t t, int64_t width, void* stream) {
  if (t <= 0) return;
  launch_chained(cache_write_kernel, static_cast<unsigned>(t), 256, 0, as_stream(stream), reinterpret_cast<__nv_bfloat16*>(cache),
                                                                              entry, slot, width);
  check_launch("cache_write");
}

void concat_columns(const float* parts, int64_t p, int64_t n, int64_t wp, float* out, int64_t w, void* stream) {
  if (n <= 0 || w <= 0) return;
  concat_columns_kernel<<<static_cast<unsigned>(n), 256, 0, as_stream(stream)>>>(parts, p, n, wp, out, w);
  check_launch("concat_columns");
}

void argmax_rows(const float* x, int64_t rows, int64_t cols, int32_t* out, void* stream) {
  if (rows <= 0) return;
  argmax_kernel<<<static_cast<unsigned>(rows), 1024, 0, as_stream(stream)>>>(x, cols, out);
  check_launch("argmax");
}

// ---------------------------------------------------------------- small-batch grouped GEMV
// For groups of few rows (decode: a handful of tokens per expert), where a 64-row tile would be
// mostly empty and its K loop latency-bound. A block covers kGvCols columns per warp x 8 warps of
// one group and every row of it, kGvRows rows at a time; K runs in chunks of kGvK. Each weight
// row's chunk is read once per row batch with 4-element loads, lane l taking elements
// 4l + 128j (coalesced in global memory; x from shared memory as float4, conflict-free). The
// arithmetic is the tiled kernel's: weights dequantized (times their block scale) and both
// operands rounded to BF16 when round_bf16, FP32 accumulation.
constexpr int kGvRows = 16, kGvCols = 4, kGvWarps = 8, kGvK = 512;

__device__ __forceinline__ void load4_weight(const void* w, WeightType type, int64_t i, float out[4]) {
  if (type == WeightType::FP8) {
    const uint32_t bits = *reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(w) + i);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      __nv_fp8_e4m3 f;
      f.__x = static_cast<__nv_fp8_storage_t>((bits >> (8 * e)) & 0xffu);
      out[e] = static_cast<float>(f);
    }
  } else if (type == WeightType::BF16) {
    const uint2 bits = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(w) + i);
    out[0] = __uint_as_float(bits.x << 16);
    out[1] = __uint_as_float(bits.x & 0xffff0000u);
    out[2] = __uint_as_float(bits.y << 16);
    out[3] = __uint_as_float(bits.y & 0xffff0000u);
  } else {
    const float4 v = *reinterpret_cast<const float4*>(static_cast<const float*>(w) + i);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  }
}

// The rows [begin, end) of the group of grid index idx (all rows without group offsets); false
// when none. The group is idx, or the idx-th entry of g.group_list (-1: no group).
__device__ __forceinline__ bool group_rows(const GroupedGemm& g, unsigned idx, int64_t& group, int64_t& begin,
                                           int64_t& end) {
  group = g.group_list ? g.group_list[idx] : static_cast<int64_t>(idx);
  begin = 0;
  end = g.rows;
  if (group < 0) return false;
  if (g.group_offsets) {
    begin = g.group_offsets[group];
    end = g.group_offsets[group + 1];
  }
  return begin < end;
}

__global__ void __launch_bounds__(kGvWarps * 32) grouped_gemv_kernel(GroupedGemm g) {
  int64_t group, row_begin, row_end;
  if (!group_rows(g, blockIdx.y, group, row_begin, row_end)) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n_first = (static_cast<int64_t>(blockIdx.x) * kGvWarps + warp) * kGvCols;
  const void* w = g.weights ? g.weights[group] : g.weight;
  const float* scale = g.type != WeightType::FP8 ? nullptr : (g.scales ? g.scales[group] : g.scale);
  __shared__ __align__(16) float xs[kGvRows][kGvK];
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kGvRows) {
    const int64_t rows = row_end - r0 < kGvRows ? row_end - r0 : kGvRows;
    float acc[kGvRows][kGvCols];
#pragma unroll
    for (int r = 0; r < kGvRows; ++r)
#pragma unroll
      for (int c = 0; c < kGvCols; ++c) acc[r][c] = 0.0f;
    for (int64_t k0 = 0; k0 < g.k; k0 += kGvK) {
      const int64_t kn = g.k - k0 < kGvK ? g.k - k0 : kGvK;
      __syncthreads();  // the previous chunk's readers are done
      for (int64_t i = threadIdx.x; i < kGvRows * kGvK; i += blockDim.x) {
        const int64_t r = i / kGvK, k = i % kGvK;
        float v = 0.0f;
        if (r < rows && k < kn) {
          const int64_t src = g.x_rows ? g.x_rows[r0 + r] : r0 + r;
          v = g.x[src * g.ldx + k0 + k];
          if (g.round_bf16) v = round_bf16(v);
        }
        xs[r][k] = v;
      }
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kGvCols; ++c) {
        const int64_t n = n_first + c;
        if (n >= g.n) break;
        for (int64_t kk = 4 * lane; kk < kn; kk += 128) {
          float wv[4];
          load4_weight(w, g.type, n * g.k + k0 + kk, wv);
          if (scale) {
            const float s = scale[(n / g.block_out) * g.scale_stride + (k0 + kk) / g.block_in];
#pragma unroll
            for (int e = 0; e < 4; ++e) wv[e] *= s;
          }
          if (g.round_bf16) {
#pragma unroll
            for (int e = 0; e < 4; ++e) wv[e] = round_bf16(wv[e]);
          }
#pragma unroll
          for (int r = 0; r < kGvRows; ++r) {
            if (r >= rows) break;
            const float4 xv = *reinterpret_cast<const float4*>(&xs[r][kk]);
            acc[r][c] = fmaf(xv.x, wv[0], fmaf(xv.y, wv[1], fmaf(xv.z, wv[2], fmaf(xv.w, wv[3], acc[r][c]))));
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kGvRows; ++r) {
#pragma unroll
      for (int c = 0; c < kGvCols; ++c) {
        const float s = warp_sum(acc[r][c]);
        const int64_t n = n_first + c;
        if (lane == 0 && r < rows && n < g.n) g.out[(r0 + r) * g.ldo + n] = s;
      }
    }
  }
}

bool grouped_gemv_fits(const GroupedGemm& g) {
  // 4-element loads: K a multiple of 4 (rows stay aligned), FP8 scale blocks of whole quads.
  return g.k % 4 == 0 && (g.type != WeightType::FP8 || g.block_in % 4 == 0) && g.ldx >= g.k;
}

void grouped_gemv(const GroupedGemm& g, void* stream) {
  if (g.rows <= 0 || g.n <= 0 || g.groups <= 0) return;
  if (!grouped_gemv_fits(g)) throw std::runtime_error("grouped_gemv: K must be a multiple of 4");
  if (g.type == WeightType::FP8 && g.scale_stride < (g.k + g.block_in - 1) / g.block_in)
    throw std::runtime_error("grouped_gemv: FP8 scale rows of " + std::to_string(g.scale_stride) + " floats for K " +
                             std::to_string(g.k));
  const int64_t cols_per_block = static_cast<int64_t>(kGvWarps) * kGvCols;
  const dim3 grid(static_cast<unsigned>((g.n + cols_per_block - 1) / cols_per_block), static_cast<unsigned>(grid_groups(g)));
  grouped_gemv_kernel<<<grid, kGvWarps * 32, 0, as_stream(stream)>>>(g);
  check_launch("grouped_gemv");
}

// ---------------------------------------------------------------- BF16 GEMV (lm_head at decode)

// A warp takes one weight row at a time (rows strided over the grid's warps), its lanes reading
// 16 contiguous bytes each, kBgLoads such loads in flight before any is used; x sits in shared
// memory as BF16. Three or four 8-warp blocks an SM keep about 86 KB of weights in flight an SM.
constexpr int kBgWarps = 8;
constexpr int kBgLoads = 7;  // R1's K = 7168 is 896 pieces of 16 bytes: 4 rounds of 7 a lane

__device__ __forceinline__ uint4 load_stream16(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ float bf16_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }
__device__ __forceinline__ float dot8_bf16(const uint4& a, const uint4& b, float acc) {
  acc = fmaf(bf16_lo(a.x), bf16_lo(b.x), acc);
  acc = fmaf(bf16_hi(a.x), bf16_hi(b.x), acc);
  acc = fmaf(bf16_lo(a.y), bf16_lo(b.y), acc);
  acc = fmaf(bf16_hi(a.y), bf16_hi(b.y), acc);
  acc = fmaf(bf16_lo(a.z), bf16_lo(b.z), acc);
  acc = fmaf(bf16_hi(a.z), bf16_hi(b.z), acc);
  acc = fmaf(bf16_lo(a.w), bf16_lo(b.w), acc);
  return fmaf(bf16_hi(a.w), bf16_hi(b.w), acc);
}
__device__ __forceinline__ uint32_t bf16_pair(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16;
}

template <int NT>
__global__ void __launch_bounds__(kBgWarps * 32)
    bf16_gemv_kernel(const float* __restrict__ x, int64_t ldx, int rows, const uint4* __restrict__ w, int64_t n,
                     int64_t k, float* __restrict__ out, int64_t ldo) {
  extern __shared__ uint4 xs[];  // NT rows of k / 8 pieces (8 BF16 each)
  const int64_t pieces = k / 8;
  const int lane = static_cast<int>(threadIdx.x & 31), warp = static_cast<int>(threadIdx.x >> 5);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBgWarps;
  int64_t row = static_cast<int64_t>(blockIdx.x) * kBgWarps + warp;
  uint4 v[kBgLoads];
  const auto issue = [&](int64_t r, int64_t p0) {
    const uint4* wr = w + r * pieces;
#pragma unroll
    for (int u = 0; u < kBgLoads; ++u) {
      const int64_t p = p0 + u * 32 + lane;
      v[u] = p < pieces ? load_stream16(wr + p) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  // The first row's weights (no kernel of a step writes them) are requested before the wait for
  // the kernel that wrote x.
  if (row < n) issue(row, 0);
  pdl_enter();
  for (int64_t i = threadIdx.x; i < NT * pieces; i += blockDim.x) {
    const int64_t t = i / pieces, p = i % pieces;
    uint4 q = make_uint4(0u, 0u, 0u, 0u);
    if (t < rows) {
      const float* src = x + t * ldx + p * 8;
      q = make_uint4(bf16_pair(src[0], src[1]), bf16_pair(src[2], src[3]), bf16_pair(src[4], src[5]),
                     bf16_pair(src[6], src[7]));
    }
    xs[i] = q;
  }
  __syncthreads();
  while (row < n) {
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
    for (int64_t p0 = 0; p0 < pieces; p0 += 32 * kBgLoads) {
      if (p0 > 0) issue(row, p0);
#pragma unroll
      for (int u = 0; u < kBgLoads; ++u) {
        const int64_t p = p0 + u * 32 + lane;
        if (p < pieces) {
#pragma unroll
          for (int t = 0; t < NT; ++t) acc[t] = dot8_bf16(v[u], xs[t * pieces + p], acc[t]);
        }
      }
    }
    const int64_t next = row + stride;
    if (next < n) issue(next, 0);  // in flight while this row's sums are reduced
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const float sum = warp_sum(acc[t]);
      if (lane == 0 && t < rows) out[t * ldo + row] = sum;
    }
    row = next;
  }
}

// One instantiation's launch: its shared-memory opt-in and its resident blocks an SM (per device
// and size: an occupancy query per call would cost host time on every eager step).
template <int NT>
void launch_bf16_gemv(const float* x, int64_t ldx, int64_t rows, const uint16_t* w, int64_t n, int64_t k, float* out,
                      int64_t ldo, cudaStream_t s) {
  const size_t smem = static_cast<size_t>(NT * k) * sizeof(uint16_t);
  static size_t allowed[kMaxDevices] = {};
  allow_dynamic_smem(bf16_gemv_kernel<NT>, smem, allowed, "bf16_gemv");
  static std::mutex mu;
  static std::map<std::pair<int, size_t>, int> per_sm;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) throw std::runtime_error("bf16_gemv: no current device");
  int resident = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = per_sm.find({dev, smem});
    if (it == per_sm.end()) {
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, bf16_gemv_kernel<NT>, kBgWarps * 32, smem) !=
          cudaSuccess) {
        cudaGetLastError();
        resident = 1;
      }
      it = per_sm.emplace(std::make_pair(dev, smem), resident < 1 ? 1 : resident).first;
    }
    resident = it->second;
  }
  const int64_t wanted = (n + kBgWarps - 1) / kBgWarps;
  const int64_t fill = static_cast<int64_t>(device_attribute(cudaDevAttrMultiProcessorCount)) * resident;
  const unsigned blocks = static_cast<unsigned>(wanted < fill ? wanted : fill);
  launch_pdl(bf16_gemv_kernel<NT>, dim3(blocks), dim3(kBgWarps * 32), smem, s, x, ldx, static_cast<int>(rows),
             reinterpret_cast<const uint4*>(w), n, k, out, ldo);
}

bool bf16_gemv(const float* x, int64_t ldx, int64_t rows, const uint16_t* w, int64_t n, int64_t k, float* out,
               int64_t ldo, void* stream) {
  if (rows < 1 || rows > kBf16GemvMaxRows || n < 1 || k < 8 || k % 8 != 0 || ldx < k ||
      reinterpret_cast<uintptr_t>(w) % 16 != 0)
    return false;
  const int nt = rows == 1 ? 1 : rows == 2 ? 2 : 4;
  if (static_cast<size_t>(nt * k) * sizeof(uint16_t) > 96 * 1024) return false;
  const cudaStream_t s = as_stream(stream);
  if (nt == 1) launch_bf16_gemv<1>(x, ldx, rows, w, n, k, out, ldo, s);
  else if (nt == 2) launch_bf16_gemv<2>(x, ldx, rows, w, n, k, out, ldo, s);
  else launch_bf16_gemv<4>(x, ldx, rows, w, n, k, out, ldo, s);
  check_launch("bf16_gemv");
  return true;
}

// ---------------------------------------------------------------- grouped GEMM on tensor cores
// cuda.kernels=fast, BF16 math (round_bf16) with FP8 or BF16 weights, K a multiple of 64: the
// same product as the tiled kernel (weights dequantized with their block scale and rounded to
// BF16, as transformers dequantizes them; activations rounded to BF16; FP32 sums) through
// mma.sync m16n8k16 BF16. (Applying the scale to each chunk's sum instead, exact but not
// transformers' arithmetic, moved greedy tokens of the FP8 golden cases off the reference.) A block of 8 warps covers 128 output
// columns of one group; warp w owns 16 of them (the MMA's M) and the group's rows (its N, 8 per
// MMA) come NT * 8 at a time, staged as BF16 in shared memory, K in stages of kMmaSub * 64.
// Each thread loads 16 consecutive weights of its two rows per 64-wide K chunk in one or two
// 16-byte loads; the MMA's K positions are permuted consistently for both operands (lane quad
// position q holds physical K 16q..16q+15 of the chunk; MMA step j takes 4j..4j+3 of them), so the
// sum is the same and no shuffle is needed. Weight loads of a stage are issued before the stage's
// activations are staged, so they are in flight together.
// Warps per block: 8 for decode's few rows (more blocks in flight), 16 for groups of many rows
// (each staged activation row serves twice the weights). Measured on an H100, R1 geometry.
constexpr int kMmaWarps = 8, kMmaCols = kMmaWarps * 16, kMmaWarpsWide = 16;

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// 16 FP8 weights (one uint4) times their block scale, rounded to BF16 pairs.
__device__ __forceinline__ void fp8x16_to_bf16(const uint4 w, float s, uint32_t out[8]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>((words[i] >> (16 * h)) & 0xffffu);
      const __half2_raw hr = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&hr));
      out[2 * i + h] = pack_bf16x2(f.x * s, f.y * s);
    }
  }
}

__device__ __forceinline__ void mma_bf16_16816(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // grouped_mma_fits() keeps pre-Ampere devices off this kernel
#endif
}

// A warp's NT accumulator tiles (m16n8: weight rows na = n0 + gid and nb = na + 8, pass rows
// 8 nt + 2 quad and + 1) to out, skipping rows past the pass and columns past N.
template <int NT>
__device__ __forceinline__ void store_tiles(const float (&acc)[NT][4], float* out, int64_t ldo, int64_t r0, int rows,
                                            int quad, int64_t na, int64_t nb, bool va, bool vb) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int r = nt * 8 + 2 * quad;
    float* o = out + (r0 + r) * ldo;
    if (r < rows) {
      if (va) o[na] = acc[nt][0];
      if (vb) o[nb] = acc[nt][2];
    }
    if (r + 1 < rows) {
      if (va) o[ldo + na] = acc[nt][1];
      if (vb) o[ldo + nb] = acc[nt][3];
    }
  }
}

template <int NT, bool kFp8, int W = kMmaWarps>
__global__ void __launch_bounds__(W * 32) grouped_mma_kernel(GroupedGemm g, int64_t k_chunk, float* partial) {
  constexpr int kSub = kFp8 ? 4 : 2;  // 64-wide K chunks per stage
  constexpr bool kPrefetch = NT <= 4;  // next stage's weights in registers (at NT 8: too many registers)
  constexpr int kStageK = kSub * 64, kRows = NT * 8, kPitch = kStageK + 8;  // BF16 elements per staged row
  int64_t group, row_begin, row_end;
  if (!group_rows(g, blockIdx.y, group, row_begin, row_end)) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, quad = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * (W * 16) + warp * 16;
  const int64_t na = n0 + gid, nb = na + 8;  // this thread's two weight rows
  const bool va = na < g.n, vb = nb < g.n;
  const void* w = g.weights ? g.weights[group] : g.weight;
  const float* scale = kFp8 ? (g.scales ? g.scales[group] : g.scale) : nullptr;
  const int64_t row_bytes = kFp8 ? g.k : 2 * g.k;
  // Split K (decode: few rows, few blocks): this block's K range, its sums to partial[z] (reduced
  // in split order by grouped_mma_reduce, so the result does not depend on timing).
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_chunk;
  const int64_t k_end = g.k < k_begin + k_chunk ? g.k : k_begin + k_chunk;
  float* out = partial ? partial + static_cast<int64_t>(blockIdx.z) * g.rows * g.n : g.out;
  const int64_t ldo = partial ? g.n : g.ldo;
  const uint8_t* wa = static_cast<const uint8_t*>(w) + na * row_bytes;
  const uint8_t* wb = static_cast<const uint8_t*>(w) + nb * row_bytes;
  const float* srow = kFp8 && n0 < g.n ? scale + (n0 / g.block_out) * g.scale_stride : nullptr;
  __shared__ __align__(16) __nv_bfloat16 xs[kRows][kPitch];
  __shared__ int64_t src_row[kRows];  // the activation row of each of the pass's rows

  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRows) {
    const int rows = static_cast<int>(row_end - r0 < kRows ? row_end - r0 : kRows);
    // Written before the first stage's barrier; read only between a stage's two barriers.
    for (int r = threadIdx.x; r < rows; r += blockDim.x) src_row[r] = (g.x_rows ? g.x_rows[r0 + r] : r0 + r) * g.ldx;
    float acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    // Weights of a stage: 16 per row and 64-wide chunk (FP8: one 16-byte load; BF16: two). The
    // next stage's are loaded before this one's activations are staged and multiplied.
    constexpr int kLoads = kFp8 ? 1 : 2;
    uint4 la[kSub][kLoads], lb[kSub][kLoads];
    auto load_stage = [&](int64_t k0, uint4 (&da)[kSub][kLoads], uint4 (&db)[kSub][kLoads]) {
      const int subs = static_cast<int>((k_end - k0) / 64 < kSub ? (k_end - k0) / 64 : kSub);
#pragma unroll
      for (int s = 0; s < kSub; ++s) {
#pragma unroll
        for (int l = 0; l < kLoads; ++l) {
          da[s][l] = db[s][l] = make_uint4(0, 0, 0, 0);
          if (s < subs) {
            const int64_t off = (kFp8 ? (k0 + 64 * s + 16 * quad) : 2 * (k0 + 64 * s + 16 * quad)) + 16 * l;
            if (va) da[s][l] = __ldg(reinterpret_cast<const uint4*>(wa + off));
            if (vb) db[s][l] = __ldg(reinterpret_cast<const uint4*>(wb + off));
          }
        }
      }
    };
    load_stage(k_begin, la, lb);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kStageK) {
      const int subs = static_cast<int>((k_end - k0) / 64 < kSub ? (k_end - k0) / 64 : kSub);
      uint4 na_[kSub][kLoads], nb_[kSub][kLoads];
      if (kPrefetch && k0 + kStageK < k_end) load_stage(k0 + kStageK, na_, nb_);
      if (!kPrefetch && k0 != k_begin) load_stage(k0, la, lb);
      float sc[kSub];
#pragma unroll
      for (int s = 0; s < kSub; ++s) sc[s] = kFp8 && srow && s < subs ? srow[(k0 + 64 * s) / g.block_in] : 1.0f;
      __syncthreads();  // the previous stage's readers are done
      const int width = subs * 64;
      for (int i = threadIdx.x; i < kRows * (kStageK / 4); i += blockDim.x) {
        const int r = i / (kStageK / 4), c4 = 4 * (i % (kStageK / 4));
        if (c4 >= width || r >= ((rows + 7) & ~7)) continue;  // rows past the last MMA tile: unread
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (r < rows) {
          v = *reinterpret_cast<const float4*>(g.x + src_row[r] + k0 + c4);
        }
        uint2 packed;
        packed.x = pack_bf16x2(v.x, v.y);
        packed.y = pack_bf16x2(v.z, v.w);
        *reinterpret_cast<uint2*>(&xs[r][c4]) = packed;
      }
      __syncthreads();
#pragma unroll
      for (int s = 0; s < kSub; ++s) {
        if (s >= subs) break;
        uint32_t pa[8], pb[8];
        if constexpr (kFp8) {  // weight x block scale, rounded to BF16 (transformers' dequantization)
          fp8x16_to_bf16(la[s][0], sc[s], pa);
          fp8x16_to_bf16(lb[s][0], sc[s], pb);
        } else {
          const uint32_t* ua = reinterpret_cast<const uint32_t*>(&la[s][0]);
          const uint32_t* ub = reinterpret_cast<const uint32_t*>(&lb[s][0]);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            pa[i] = ua[i];
            pb[i] = ub[i];
          }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          if (nt * 8 >= rows) break;
          const uint4* xp = reinterpret_cast<const uint4*>(&xs[nt * 8 + gid][64 * s + 16 * quad]);
          const uint4 x0 = xp[0], x1 = xp[1];
          const uint32_t xb[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
          for (int j = 0; j < 4; ++j)
            mma_bf16_16816(acc[nt], pa[2 * j], pb[2 * j], pa[2 * j + 1], pb[2 * j + 1], xb[2 * j], xb[2 * j + 1]);
        }
      }
      if (kPrefetch && k0 + kStageK < k_end) {
#pragma unroll
        for (int s = 0; s < kSub; ++s) {
#pragma unroll
          for (int l = 0; l < kLoads; ++l) {
            la[s][l] = na_[s][l];
            lb[s][l] = nb_[s][l];
          }
        }
      }
    }
    store_tiles<NT>(acc, out, ldo, r0, rows, quad, na, nb, va, vb);
  }
}

bool grouped_mma_fits(const GroupedGemm& g) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return device_attribute(cudaDevAttrComputeCapabilityMajor) >= 8 && g.round_bf16 && (g.type == WeightType::FP8 || g.type == WeightType::BF16) &&
         g.k % 64 == 0 && g.ldx % 4 == 0 && aligned(g.x) && (g.weights || aligned(g.weight)) &&
         (g.type != WeightType::FP8 || (g.block_in % 64 == 0 && g.block_out % 16 == 0));
}

// The split sums of `partial` [splits][rows][n] added in split order: columns below n_a to out,
// the rest (a second matrix's, grouped_fp8) to out2.
__global__ void grouped_mma_reduce_kernel(const float* partial, int64_t splits, int64_t rows, int64_t n,
                                          const int32_t* row_count, float* out, int64_t ldo, int64_t n_a,
                                          float* out2, int64_t ldo2) {
  pdl_enter();
  const int64_t used = row_count ? *row_count : rows;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < used * n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.0f;
    for (int64_t z = 0; z < splits; ++z) v += partial[z * rows * n + i];
    const int64_t r = i / n, c = i % n;
    if (c < n_a) out[r * ldo + c] = v;
    else out2[r * ldo2 + c - n_a] = v;
  }
}

// Splits of K that give few-row groups about 4 blocks per SM, each split at least `min_k` of K.
static int64_t k_splits(const GroupedGemm& g, int sms, int64_t min_k) {
  // Rows are spread over at most `rows` groups: few rows leave most groups empty.
  const int64_t active = g.groups < g.rows ? g.groups : g.rows;
  const int64_t blocks = (g.n + kMmaCols - 1) / kMmaCols * active;
  if (g.rows > 16 * g.groups || blocks >= 2 * static_cast<int64_t>(sms)) return 1;
  int64_t splits = (4 * static_cast<int64_t>(sms) + blocks - 1) / blocks;
  const int64_t most = g.k / min_k;
  if (splits > most) splits = most;
  return splits < 1 ? 1 : splits;
}

int64_t grouped_mma_splits(const GroupedGemm& g, int sms) { return k_splits(g, sms, 1024); }

void grouped_mma(const GroupedGemm& g, void* stream, int64_t splits, float* partial) {
  if (g.rows <= 0 || g.n <= 0 || g.groups <= 0) return;
  if (!grouped_mma_fits(g)) throw std::runtime_error("grouped_mma: operands outside the kernel's shapes");
  if (g.type == WeightType::FP8 && g.scale_stride < (g.k + g.block_in - 1) / g.block_in)
    throw std::runtime_error("grouped_mma: FP8 scale rows of " + std::to_string(g.scale_stride) + " floats for K " +
                             std::to_string(g.k));
  if (splits < 1 || (splits > 1 && partial == nullptr)) throw std::runtime_error("grouped_mma: bad split");
  // K per split: whole stages of 256 (FP8) or 128 (BF16), so every split but the last is full.
  const int64_t stage = g.type == WeightType::FP8 ? 256 : 128;
  const int64_t k_chunk = splits == 1 ? g.k : ((g.k + splits - 1) / splits + stage - 1) / stage * stage;
  splits = (g.k + k_chunk - 1) / k_chunk;
  float* part = splits > 1 ? partial : nullptr;
  const dim3 grid(static_cast<unsigned>((g.n + kMmaCols - 1) / kMmaCols), static_cast<unsigned>(grid_groups(g)),
                  static_cast<unsigned>(splits));
  // Rows per pass over the weights: 16 where groups average at most 4 rows, 32 up to 16 (decode:
  // the busiest experts of a step see a few times the average), else 64.
  const bool few = g.rows <= 4 * g.groups, some = g.rows <= 16 * g.groups;
  const bool fp8 = g.type == WeightType::FP8;
  cudaStream_t s = as_stream(stream);
  if (few && fp8) grouped_mma_kernel<2, true><<<grid, kMmaWarps * 32, 0, s>>>(g, k_chunk, part);
  else if (few) grouped_mma_kernel<2, false><<<grid, kMmaWarps * 32, 0, s>>>(g, k_chunk, part);
  else if (some && fp8) grouped_mma_kernel<4, true><<<grid, kMmaWarps * 32, 0, s>>>(g, k_chunk, part);
  else if (some) grouped_mma_kernel<4, false><<<grid, kMmaWarps * 32, 0, s>>>(g, k_chunk, part);
  else {
    const dim3 wide(static_cast<unsigned>((g.n + kMmaWarpsWide * 16 - 1) / (kMmaWarpsWide * 16)),
                    static_cast<unsigned>(grid_groups(g)), static_cast<unsigned>(splits));
    if (fp8) grouped_mma_kernel<8, true, kMmaWarpsWide><<<wide, kMmaWarpsWide * 32, 0, s>>>(g, k_chunk, part);
    else grouped_mma_kernel<8, false, kMmaWarpsWide><<<wide, kMmaWarpsWide * 32, 0, s>>>(g, k_chunk, part);
  }
  check_launch("grouped_mma");
  if (part) {
    const int32_t* row_count = g.group_offsets ? g.group_offsets + g.groups : nullptr;
    launch_chained(grouped_mma_reduce_kernel, grid_for(g.rows * g.n, 256), 256, 0, s, part, splits, g.rows, g.n,
                   row_count, g.out, g.ldo, g.n, static_cast<float*>(nullptr), int64_t{0});
    check_launch("grouped_mma_reduce");
  }
}

// ---------------------------------------------------------------- cp.async (sm_80+)
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes to the shared-space address s (zeros when !valid).
__device__ __forceinline__ void cp_async16_s(uint32_t s, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  cp_async16_s(smem_u32(smem), gmem, valid);
}
// The same with an L2 prefetch hint: the memory system also fetches the rest of the 256-byte
// aligned block into L2 (a row streamed 128 bytes a stage has its next stage's bytes on the way).
__device__ __forceinline__ void cp_async16_pf(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
#endif
}
// The same through L1 (.ca): for data that the block's other warps copy too.
__device__ __forceinline__ void cp_async16_ca(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
#endif
}
// 4 bytes through L1.
__device__ __forceinline__ void cp_async4_ca(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 4 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
// ---------------------------------------------------------------- block-scaled FP8 on tensor cores
// cuda.fp8_gemm=block with cuda.kernels=fast: mma.sync m16n8k32 e4m3 x e4m3 -> F32 (sm_89+).
// The layout is grouped_mma's (warp w: 16 weight rows as the MMA's M; the group's rows 8 per N
// tile, NT tiles a pass; stages of 128 K; each thread loads 16 consecutive weight bytes per row
// and 64-wide chunk), but both operands stay FP8: the weight bytes go to the MMA as loaded, and
// the activations, quantized beforehand, are staged as bytes. Within a 64-wide chunk lane quad q
// holds physical K 16q..16q+15; MMA step j takes bytes 8j..8j+7 of them (logical K 4q..4q+3 and
// 16+4q..16+4q+3), the same permutation for both operands. Each 128-wide K block is summed on
// its own (2 chunks x 2 steps) and added to the result times weight scale x activation scale,
// DeepSeek's promotion of FP8 partial sums to FP32 per 128 of K.
__device__ __forceinline__ void mma_fp8_16832(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                              uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // grouped_fp8_fits() keeps devices before sm_89 off this kernel
#endif
}

// One 128-wide K block's FP8 sums `part` (reset) into `acc` with their scales: s0 for the tile's
// even pass row, s1 for the odd one.
__device__ __forceinline__ void promote(float (&acc)[4], float (&part)[4], float s0, float s1) {
  acc[0] += part[0] * s0;
  acc[1] += part[1] * s1;
  acc[2] += part[2] * s0;
  acc[3] += part[3] * s1;
  part[0] = part[1] = part[2] = part[3] = 0.0f;
}

// The FP8 kernels' staged rows: 128 bytes (one 128-wide K stage) each, 16-byte piece p of row r
// at byte offset fp8_piece(r, p) (swizzled so a quarter warp's reads of rows 2i and 2i + 1,
// pieces 4s..4s+3, fall in distinct banks).
__device__ __forceinline__ int fp8_piece(int r, int p) { return 16 * (p ^ ((r & 1) << 2)); }

// This lane's 4 cp.async copies of a warp's 16 weight rows n0.. for the stage at k0 (zeros past g.n).
template <bool kPf = false>
__device__ __forceinline__ void fp8_copy_weights(uint8_t* dst, const uint8_t* w, int64_t n0, int64_t n, int64_t k,
                                                 int64_t k0, int lane) {
  const int piece = lane & 7, row0 = lane >> 3;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int r = row0 + 4 * j;
    const bool ok = n0 + r < n;
    if constexpr (kPf) cp_async16_pf(dst + r * 128 + fp8_piece(r, piece), ok ? w + (n0 + r) * k + k0 + 16 * piece : w, ok);
    else cp_async16(dst + r * 128 + fp8_piece(r, piece), ok ? w + (n0 + r) * k + k0 + 16 * piece : w, ok);
  }
}

// One stage's FP8 sums into part: the 16 weight rows staged at wslot times the pass's rows staged
// at xslot (NT tiles of 8, those below `rows`).
template <int NT>
__device__ __forceinline__ void fp8_stage_mma(float (&part)[NT][4], const uint8_t* wslot, const uint8_t* xslot,
                                              int rows, int gid, int quad) {
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int p = 4 * s + quad;
    const uint4 wa = *reinterpret_cast<const uint4*>(wslot + gid * 128 + fp8_piece(gid, p));
    const uint4 wb = *reinterpret_cast<const uint4*>(wslot + (gid + 8) * 128 + fp8_piece(gid, p));
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (nt * 8 >= rows) break;
      const int r = nt * 8 + gid;
      const uint4 xv = *reinterpret_cast<const uint4*>(xslot + r * 128 + fp8_piece(r, p));
      mma_fp8_16832(part[nt], wa.x, wb.x, wa.y, wb.y, xv.x, xv.y);
      mma_fp8_16832(part[nt], wa.z, wb.z, wa.w, wb.w, xv.z, xv.w);
    }
  }
}

// Prefill groups (many rows): a block of W warps covers W x 16 output columns, the group's rows
// come NT x 8 at a time. The K loop runs a ring of S stages of 128 K in shared memory, filled by
// cp.async S - 1 stages ahead: each warp copies its own 16 weight rows (fp8_copy_weights), the
// block the group's rows and their scales.
// One barrier a stage: it shows the stage to all and frees the slot the next copy refills.
template <int NT, int S, int W>
constexpr size_t fp8_staged_smem() {
  return static_cast<size_t>(S) * (W * 16 * 128 + NT * 8 * 128 + NT * 8 * 4);
}

template <int NT, int S, int W>
__global__ void __launch_bounds__(W * 32) grouped_fp8_kernel(GroupedGemm g, int64_t k_chunk, float* partial) {
  constexpr int kRows = NT * 8, kWBytes = W * 16 * 128, kXBytes = kRows * 128;
  constexpr int kStage = kWBytes + kXBytes + kRows * 4;
  extern __shared__ __align__(128) uint8_t fp8_stages[];
  int64_t group, row_begin, row_end;
  if (!group_rows(g, blockIdx.y, group, row_begin, row_end)) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, quad = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * (W * 16) + warp * 16;
  const int64_t na = n0 + gid, nb = na + 8;
  const bool va = na < g.n, vb = nb < g.n;
  const uint8_t* w = static_cast<const uint8_t*>(g.weights ? g.weights[group] : g.weight);
  const float* scale = g.scales ? g.scales[group] : g.scale;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_chunk;
  const int64_t k_end = g.k < k_begin + k_chunk ? g.k : k_begin + k_chunk;
  float* out = partial ? partial + static_cast<int64_t>(blockIdx.z) * g.rows * g.n : g.out;
  const int64_t ldo = partial ? g.n : g.ldo;
  // This warp's 16 rows lie in one scale block row (block_out % 16 == 0).
  const float* srow = n0 < g.n ? scale + (n0 / g.block_out) * g.scale_stride : nullptr;
  const int64_t stages = (k_end - k_begin) / 128;  // K % 128 == 0 (grouped_fp8_fits)
  __shared__ int64_t src_row[kRows];

  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRows) {
    const int rows = static_cast<int>(row_end - r0 < kRows ? row_end - r0 : kRows);
    const int tile_rows = (rows + 7) & ~7;
    __syncthreads();  // the last pass is done with src_row and the ring
    for (int r = threadIdx.x; r < rows; r += blockDim.x) src_row[r] = g.x_rows ? g.x_rows[r0 + r] : r0 + r;
    __syncthreads();
    auto issue = [&](int64_t st) {  // stage st into its slot; always one commit group
      if (st < stages) {
        const int64_t k0 = k_begin + 128 * st;
        uint8_t* slot = fp8_stages + (st % S) * kStage;
        fp8_copy_weights(slot + warp * 16 * 128, w, n0, g.n, g.k, k0, lane);
        uint8_t* xdst = slot + kWBytes;
        for (int i = threadIdx.x; i < tile_rows * 8; i += blockDim.x) {
          const int r = i >> 3, p = i & 7;
          const bool ok = r < rows;
          cp_async16_ca(xdst + r * 128 + fp8_piece(r, p), ok ? g.xq + src_row[r] * g.ldx + k0 + 16 * p : g.xq,
                        ok);
        }
        float* sdst = reinterpret_cast<float*>(slot + kWBytes + kXBytes);
        for (int r = threadIdx.x; r < tile_rows; r += blockDim.x)
          cp_async4_ca(sdst + r, r < rows ? g.xscale + src_row[r] * g.lds + k0 / 128 : g.xscale, r < rows);
      }
      cp_async_commit();
    };
#pragma unroll
    for (int st = 0; st < S - 1; ++st) issue(st);
    float acc[NT][4], part[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][e] = part[i][e] = 0.0f;
    for (int64_t st = 0; st < stages; ++st) {
      const float ws = srow ? __ldg(srow + (k_begin + 128 * st) / g.block_in) : 0.0f;
      cp_async_wait<S - 2>();  // stage st has landed (this thread's copies)
      __syncthreads();         // ... and every thread's; every warp is done with stage st - 1's slot
      issue(st + S - 1);
      const uint8_t* slot = fp8_stages + (st % S) * kStage;
      const float* xsc = reinterpret_cast<const float*>(slot + kWBytes + kXBytes);
      fp8_stage_mma<NT>(part, slot + warp * 16 * 128, slot + kWBytes, rows, gid, quad);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {  // the 128-wide K block: promote its sums with their scales
        if (nt * 8 >= rows) break;
        promote(acc[nt], part[nt], ws * xsc[nt * 8 + 2 * quad], ws * xsc[nt * 8 + 2 * quad + 1]);
      }
    }
    cp_async_wait<0>();
    store_tiles<NT>(acc, out, ldo, r0, rows, quad, na, nb, va, vb);
  }
}

// The same product for groups of few rows (decode), streamed: no block barrier. Each warp owns
// 16 weight rows and runs its own ring of S stages of 128 K in shared memory, filled by cp.async
// (weights past L1, the group's activation rows through L1, which the block's warps share), so
// S - 1 stages of weights are in flight per warp without holding registers. A stage's row is
// 128 bytes, its 16-byte pieces swizzled (piece p of row r at p ^ 4 (r & 1)) so that a quarter
// warp's reads (rows 2i and 2i + 1, pieces 4s..4s+3) fall in distinct banks.
constexpr int kFp8StreamWarps = 4;
template <int NT, int S>
constexpr size_t fp8_stream_smem() {
  return static_cast<size_t>(kFp8StreamWarps) * S * (16 + NT * 8) * 128;
}

// With a second matrix (g.n2 > 0, linear2 and the experts' gate and up): the blocks past the
// first matrix's column blocks take the second's columns, its weights, scales and output; split
// sums go to `partial` as one product of n + n2 columns.
template <int NT, int S, bool kPf>
__global__ void __launch_bounds__(kFp8StreamWarps * 32) grouped_fp8_stream_kernel(GroupedGemm g, int64_t k_chunk,
                                                                                    float* partial) {
  constexpr int kRows = NT * 8, kWBytes = 16 * 128, kStage = (16 + kRows) * 128;
  extern __shared__ __align__(128) uint8_t fp8_ring[];
  // Launched with launch_pdl: with the rows known up front (one weight matrix, rows in order) the
  // first stages' weights are requested before waiting for the previous kernel; otherwise the
  // group's rows come from it, and the wait comes first.
  const bool prefetch = g.group_offsets == nullptr && g.group_list == nullptr && g.x_rows == nullptr;
  pdl_launch_dependents();
  if (!prefetch) pdl_wait();
  int64_t group, row_begin, row_end;
  if (!group_rows(g, blockIdx.y, group, row_begin, row_end)) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, quad = lane & 3;
  const int64_t blocks_a = (g.n + kFp8StreamWarps * 16 - 1) / (kFp8StreamWarps * 16);
  const bool second = blockIdx.x >= blocks_a;  // only with g.n2 > 0 (the grid's width)
  const int64_t n = second ? g.n2 : g.n;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) - (second ? blocks_a : 0)) * (kFp8StreamWarps * 16) + warp * 16;
  if (n0 >= n) return;  // no block barrier below: a warp without rows may leave
  uint8_t* ring = fp8_ring + static_cast<size_t>(warp) * S * kStage;
  const int64_t na = n0 + gid, nb = na + 8;
  const bool va = na < n, vb = nb < n;
  const uint8_t* w = static_cast<const uint8_t*>(
      second ? (g.weights2 ? g.weights2[group] : g.weight2) : (g.weights ? g.weights[group] : g.weight));
  const float* srow = (second ? (g.scales2 ? g.scales2[group] : g.scale2) : (g.scales ? g.scales[group] : g.scale)) +
                      (n0 / g.block_out) * (second ? g.scale_stride2 : g.scale_stride);
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_chunk;
  const int64_t k_end = g.k < k_begin + k_chunk ? g.k : k_begin + k_chunk;
  const int64_t n_all = g.n + g.n2;
  float* out = partial ? partial + static_cast<int64_t>(blockIdx.z) * g.rows * n_all + (second ? g.n : 0)
                       : (second ? g.out2 : g.out);
  const int64_t ldo = partial ? n_all : second ? g.ldo2 : g.ldo;
  // This lane's copies per stage: piece (lane & 7) of rows (lane >> 3) + 4j.
  const int piece = lane & 7, row0 = lane >> 3;
  const int64_t stages = (k_end - k_begin) / 128;

  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRows) {
    const int rows = static_cast<int>(row_end - r0 < kRows ? row_end - r0 : kRows);
    const uint8_t* xsrc[kRows / 4];  // the lane's activation rows (null: past the group)
#pragma unroll
    for (int j = 0; j < kRows / 4; ++j) {
      const int r = row0 + 4 * j;
      xsrc[j] = r < rows ? g.xq + (g.x_rows ? g.x_rows[r0 + r] : r0 + r) * g.ldx + 16 * piece : nullptr;
    }
    const float* xs_lo[NT];  // scales of the rows this lane's sums belong to (2 quad, 2 quad + 1)
    const float* xs_hi[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int r = nt * 8 + 2 * quad;
      xs_lo[nt] = r < rows ? g.xscale + (g.x_rows ? g.x_rows[r0 + r] : r0 + r) * g.lds : nullptr;
      xs_hi[nt] = r + 1 < rows ? g.xscale + (g.x_rows ? g.x_rows[r0 + r + 1] : r0 + r + 1) * g.lds : nullptr;
    }
    auto issue_weights = [&](int64_t st) {
      if (st < stages) fp8_copy_weights<kPf>(ring + (st % S) * kStage, w, n0, n, g.k, k_begin + 128 * st, lane);
    };
    auto issue_rows = [&](int64_t st) {
      if (st >= stages) return;
      const int64_t k0 = k_begin + 128 * st;
      uint8_t* dst = ring + (st % S) * kStage + kWBytes;
#pragma unroll
      for (int j = 0; j < kRows / 4; ++j) {
        const int r = row0 + 4 * j;
        const uint8_t* src = xsrc[j];
        cp_async16_ca(dst + r * 128 + fp8_piece(r, piece), src ? src + k0 : g.xq, src != nullptr);
      }
    };
    auto issue = [&](int64_t st) {  // stage st into its slot; always one commit group
      issue_weights(st);
      issue_rows(st);
      cp_async_commit();
    };
    if (prefetch && r0 == row_begin) {
      // The first S - 1 stages' weights as one (older) commit group, then, once the previous
      // kernel is done, their activation rows a group each: the loop's wait<S - 1> still finds
      // stage st complete.
#pragma unroll
      for (int st = 0; st < S - 1; ++st) issue_weights(st);
      cp_async_commit();
      pdl_wait();
#pragma unroll
      for (int st = 0; st < S - 1; ++st) {
        issue_rows(st);
        cp_async_commit();
      }
    } else {
#pragma unroll
      for (int st = 0; st < S - 1; ++st) issue(st);
    }
    float acc[NT][4], part[NT][4];  // part: the stage's 128-K block, promoted and reset at its end
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][e] = part[i][e] = 0.0f;
    for (int64_t st = 0; st < stages; ++st) {
      issue(st + S - 1);
      cp_async_wait<S - 1>();  // stage st has landed (this lane's copies)
      __syncwarp();            // ... and every lane's
      const uint8_t* slot = ring + (st % S) * kStage;
      fp8_stage_mma<NT>(part, slot, slot + kWBytes, rows, gid, quad);
      const int64_t kb = (k_begin + 128 * st) / 128;
      const float ws = __ldg(srow + kb);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if (nt * 8 >= rows) break;
        promote(acc[nt], part[nt], xs_lo[nt] ? ws * __ldg(xs_lo[nt] + kb) : 0.0f,
                xs_hi[nt] ? ws * __ldg(xs_hi[nt] + kb) : 0.0f);
      }
      __syncwarp();  // the slot is read before the next issue refills it
    }
    cp_async_wait<0>();
    __syncwarp();
    store_tiles<NT>(acc, out, ldo, r0, rows, quad, na, nb, va, vb);
  }
}

bool grouped_fp8_fits(const GroupedGemm& g) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const int cc = device_attribute(cudaDevAttrComputeCapabilityMajor) * 10 +
                 device_attribute(cudaDevAttrComputeCapabilityMinor);
  return cc >= 89 && g.type == WeightType::FP8 && g.xq && g.xscale && g.k % 128 == 0 && g.ldx % 16 == 0 &&
         g.lds >= g.k / 128 && aligned(g.xq) && (g.weights || aligned(g.weight)) && g.block_in == 128 &&
         g.block_out % 16 == 0 && g.block_out > 0 && (g.n2 == 0 || g.weights2 || aligned(g.weight2));
}

// The staged (prefill) kernel's ring: 4 stages of 41 KB.
constexpr int kFp8StagedStages = 4;
// Ring depths: 6 stages at up to 16 rows a pass (the base form of the few-rows kernel below), 4 at
// up to 32 (the some-rows kernel); two blocks of 4 warps per SM either way.
constexpr int kFp8StreamStagesFew = 6, kFp8StreamStagesSome = 4;

// The few-rows kernel (at most 4 rows a group on average): one 8-row tile a pass and 9 stages, the
// weights' copies with L2 prefetch hints (the some-rows kernel too). DILU_FP8_STREAM, a switch for
// measuring, picks the earlier forms: base (two 8-row tiles, 6 stages, no hints), pf (base with
// the hints), n1 (this without the hints). H100, 4 layers: 2.27 -> 2.25 ms a step at batch 1,
// 3.44 -> 3.37 at 4, 6.86 -> 6.68 at 16 (docs/device-runs/2026-11-23-h100-session19.log).
// Copying each row's weights 256 or 512 contiguous bytes at a time (two or four stages a copy)
// was slower at every batch (docs/device-runs/2026-11-23-h100-session20.log).
int fp8_stream_variant() {
  static const int v = [] {
    const char* e = std::getenv("DILU_FP8_STREAM");
    const std::string s = e ? e : "";
    return s == "base" ? 0 : s == "pf" ? 1 : s == "n1" ? 2 : 3;
  }();
  return v;
}
constexpr int kFp8StreamStagesN1 = 9;
size_t fp8_stream_few_smem() {
  return fp8_stream_variant() >= 2 ? fp8_stream_smem<1, kFp8StreamStagesN1>() : fp8_stream_smem<2, kFp8StreamStagesFew>();
}
template <int NT, int S, bool kPf>
void launch_fp8_stream(dim3 grid, cudaStream_t s, const GroupedGemm& g, int64_t k_chunk, float* part) {
  constexpr size_t smem = fp8_stream_smem<NT, S>();
  static size_t allowed[kMaxDevices] = {};
  allow_dynamic_smem(grouped_fp8_stream_kernel<NT, S, kPf>, smem, allowed, "grouped_fp8");
  launch_pdl(grouped_fp8_stream_kernel<NT, S, kPf>, grid, kFp8StreamWarps * 32, smem, s, g, k_chunk, part);
}

bool grouped_fp8_pairs(const GroupedGemm& g) { return g.rows <= 16 * g.groups; }

// Groups of more than 4 and at most kFp8StreamMidRows rows on average (decode at 256 tokens over
// R1's 256 experts: 8) take the few-rows kernel's base form with the L2 hints, 16-row tiles and
// 6 stages, rather than the some-rows kernel's 32-row tiles and 4 stages: 5 stages of weights in
// flight a warp instead of 3, and a second pass over an expert's weights only past 16 rows. H100,
// 4 layers, batch 256: 17.71 and 17.90 -> 17.11 and 17.04 ms a step (docs/device-runs/
// 2026-11-24-h100-session24.log, section 10). At 12 and 16 rows on average (batches 384 and 512)
// the two measured the same (section 14): the some-rows kernel keeps that range.
constexpr int64_t kFp8StreamMidRows = 8;
bool fp8_stream_mid(const GroupedGemm& g) { return g.rows > 4 * g.groups && g.rows <= kFp8StreamMidRows * g.groups; }

// The column blocks of the decode kernel's grid: the first matrix's, then the second's.
int64_t fp8_stream_column_blocks(const GroupedGemm& g) {
  const int64_t per_block = kFp8StreamWarps * 16;
  return (g.n + per_block - 1) / per_block + (g.n2 + per_block - 1) / per_block;
}

// The staged (prefill) kernel: as grouped_mma. The decode kernel: its blocks are 64 columns wide
// and two fit an SM (shared memory), so the split count is chosen by waves of resident blocks, a
// wave costing its blocks' 128-K stages plus about 4 stages of pipeline fill (a partly filled last
// wave costs a full one); the smaller count on a tie. Splits of at least 512 of K. DILU_FP8_SPLITS
// fixes the count (a switch for measuring).
int64_t grouped_fp8_splits(const GroupedGemm& g, int sms) {
  if (g.rows > 16 * g.groups) return k_splits(g, sms, 512);
  const int64_t active = g.groups < g.rows ? g.groups : g.rows;
  const int64_t blocks = fp8_stream_column_blocks(g) * active;
  const size_t smem = g.rows <= 4 * g.groups     ? fp8_stream_few_smem()
                      : fp8_stream_mid(g)        ? fp8_stream_smem<2, kFp8StreamStagesFew>()
                                                 : fp8_stream_smem<4, kFp8StreamStagesSome>();
  const int64_t per_sm = static_cast<int64_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor)) /
                         static_cast<int64_t>(smem + 1024);
  const int64_t slots = static_cast<int64_t>(sms) * (per_sm < 1 ? 1 : per_sm);
  const int64_t stages = g.k / 128, most = g.k / 512 < 1 ? 1 : g.k / 512;
  static const int64_t forced = [] {
    const char* e = std::getenv("DILU_FP8_SPLITS");
    return e ? std::atoll(e) : 0;
  }();
  if (forced > 0) return forced < most ? forced : most;
  constexpr int64_t kFill = 4;  // stages' worth of a block's start
  int64_t best = 1, best_cost = 0;
  for (int64_t splits = 1; splits <= most; ++splits) {
    const int64_t waves = (blocks * splits + slots - 1) / slots;
    const int64_t cost = waves * (kFill + (stages + splits - 1) / splits);
    if (splits == 1 || cost < best_cost) {
      best = splits;
      best_cost = cost;
    }
  }
  return best;
}

// The prefill form on Hopper wgmma (defined with the MLA wgmma core, below).
static bool grouped_fp8_wgmma_fits(const GroupedGemm& g);
static void grouped_fp8_wgmma(const GroupedGemm& g, cudaStream_t s, int64_t splits, int64_t k_chunk, float* part);
// DILU_FP8_WIDE=mma keeps groups of many rows on the mma.sync staged kernel where the wgmma one
// runs (a switch for measuring and testing).
static bool fp8_wide_mma_forced() {
  static const bool forced = [] {
    const char* e = std::getenv("DILU_FP8_WIDE");
    return e != nullptr && std::string(e) == "mma";
  }();
  return forced;
}

void grouped_fp8(const GroupedGemm& g, void* stream, int64_t splits, float* partial) {
  if (g.rows <= 0 || (g.n <= 0 && g.n2 <= 0) || g.groups <= 0) return;
  if (!grouped_fp8_fits(g)) throw std::runtime_error("grouped_fp8: operands outside the kernel's shapes");
  if (g.scale_stride < g.k / 128 || (g.n2 > 0 && g.scale_stride2 < g.k / 128))
    throw std::runtime_error("grouped_fp8: FP8 scale rows of " + std::to_string(g.scale_stride) + " floats for K " +
                             std::to_string(g.k));
  if (g.n2 > 0 && !grouped_fp8_pairs(g))
    throw std::runtime_error("grouped_fp8: a second matrix needs at most 16 rows a group");
  if (splits < 1 || (splits > 1 && partial == nullptr)) throw std::runtime_error("grouped_fp8: bad split");
  const int64_t stage = 128;
  const int64_t k_chunk = splits == 1 ? g.k : ((g.k + splits - 1) / splits + stage - 1) / stage * stage;
  splits = (g.k + k_chunk - 1) / k_chunk;
  float* part = splits > 1 ? partial : nullptr;
  const bool few = g.rows <= 4 * g.groups, some = g.rows <= 16 * g.groups;
  cudaStream_t s = as_stream(stream);
  const dim3 stream_grid(static_cast<unsigned>(fp8_stream_column_blocks(g)), static_cast<unsigned>(grid_groups(g)),
                         static_cast<unsigned>(splits));
  if (few) {
    switch (fp8_stream_variant()) {
      case 1: launch_fp8_stream<2, kFp8StreamStagesFew, true>(stream_grid, s, g, k_chunk, part); break;
      case 2: launch_fp8_stream<1, kFp8StreamStagesN1, false>(stream_grid, s, g, k_chunk, part); break;
      case 3: launch_fp8_stream<1, kFp8StreamStagesN1, true>(stream_grid, s, g, k_chunk, part); break;
      default: launch_fp8_stream<2, kFp8StreamStagesFew, false>(stream_grid, s, g, k_chunk, part);
    }
  } else if (fp8_stream_mid(g)) {
    launch_fp8_stream<2, kFp8StreamStagesFew, true>(stream_grid, s, g, k_chunk, part);
  } else if (some) {
    if (fp8_stream_variant() % 2 == 1) launch_fp8_stream<4, kFp8StreamStagesSome, true>(stream_grid, s, g, k_chunk, part);
    else launch_fp8_stream<4, kFp8StreamStagesSome, false>(stream_grid, s, g, k_chunk, part);
  } else if (!fp8_wide_mma_forced() && grouped_fp8_wgmma_fits(g)) {
    grouped_fp8_wgmma(g, s, splits, k_chunk, part);
  } else {
    const dim3 wide(static_cast<unsigned>((g.n + kMmaWarpsWide * 16 - 1) / (kMmaWarpsWide * 16)),
                    static_cast<unsigned>(grid_groups(g)), static_cast<unsigned>(splits));
    constexpr size_t smem = fp8_staged_smem<8, kFp8StagedStages, kMmaWarpsWide>();
    static size_t allowed[kMaxDevices] = {};
    allow_dynamic_smem(grouped_fp8_kernel<8, kFp8StagedStages, kMmaWarpsWide>, smem, allowed, "grouped_fp8");
    grouped_fp8_kernel<8, kFp8StagedStages, kMmaWarpsWide><<<wide, kMmaWarpsWide * 32, smem, s>>>(g, k_chunk, part);
  }
  check_launch("grouped_fp8");
  if (part) {
    const int32_t* row_count = g.group_offsets ? g.group_offsets + g.groups : nullptr;
    const int64_t n_all = g.n + g.n2;
    launch_chained(grouped_mma_reduce_kernel, grid_for(g.rows * n_all, 256), 256, 0, s, part, splits, g.rows, n_all,
                   row_count, g.out, g.ldo, g.n, g.out2, g.ldo2);
    check_launch("grouped_fp8_reduce");
  }
}

void grouped_gemm(const GroupedGemm& g, void* stream) {
  if (g.rows <= 0 || g.n <= 0 || g.groups <= 0) return;
  if (g.type == WeightType::FP8 && g.scale_stride < (g.k + g.block_in - 1) / g.block_in)
    throw std::runtime_error("grouped_gemm: FP8 scale rows of " + std::to_string(g.scale_stride) + " floats for K " +
                             std::to_string(g.k));
  const dim3 grid(static_cast<unsigned>((g.n + kTn - 1) / kTn), static_cast<unsigned>((g.rows + kTm - 1) / kTm),
                  static_cast<unsigned>(grid_groups(g)));
  grouped_gemm_kernel<<<grid, 256, 0, as_stream(stream)>>>(g);
  check_launch("grouped_gemm");
}

void mla_absorb_q(const MlaArgs& a, void* stream) {
  if (a.t <= 0 || a.h <= 0) return;
  mla_absorb_q_kernel<<<static_cast<unsigned>(a.t * a.h), 128, static_cast<size_t>(a.nope) * sizeof(float),
                        as_stream(stream)>>>(a);
  check_launch("mla_absorb_q");
}

void mla_absorb_v(const MlaArgs& a, void* stream) {
  if (a.t <= 0 || a.h <= 0) return;
  mla_absorb_v_kernel<<<static_cast<unsigned>(a.t * a.h), 128, static_cast<size_t>(a.c) * sizeof(float),
                        as_stream(stream)>>>(a);
  check_launch("mla_absorb_v");
}

void mla_core_reference(const MlaArgs& a, void* stream) {
  if (a.t <= 0 || a.h <= 0) return;
  if (a.c > kMaxC || a.r > kMaxR)
    throw std::runtime_error("mla_attention: kv_lora_rank " + std::to_string(a.c) + " / rope dim " +
                             std::to_string(a.r) + " above the kernel's 512 / 64");
  mla_attention_kernel<<<static_cast<unsigned>(a.t * a.h), kMlaWarps * 32, 0, as_stream(stream)>>>(a);
  check_launch("mla_attention");
}

void mla_attention(const MlaArgs& a, void* stream) {
  mla_absorb_q(a, stream);
  mla_core_reference(a, stream);
  mla_absorb_v(a, stream);
}

// ---------------------------------------------------------------- MLA, fused core
// Block (token t, head group g, split s): 8 warps, 2 heads each (kMlaFusedHeads = 16). Shared
// memory: the group's queries [16][C + R] F32 and a tile of kTile cached positions [kTile][C + R]
// BF16 with rows padded by one 32-bit word (lane p reads row p: no bank conflicts). Scores: lane p
// of a warp is position p of the tile, one 576-long dot product per head. Softmax: online, per
// head, over the tiles. Output: lane l owns latent columns l + 32 i, accumulating every position
// of the tile with its probability taken from the lane that scored it.
constexpr int kMlaTile = 32, kMlaFusedWarps = 8;
static_assert(kMlaFusedHeads == 2 * kMlaFusedWarps, "two heads per warp");

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// A token's positions per context split (kernels.h): the context over the splits, rounded up to
// 64 (two cache tiles). From the token's own context, so that a launch serves any context.
__device__ __forceinline__ int64_t mla_split_chunk(int64_t ctx, int64_t splits) {
  return ((ctx + splits - 1) / splits + 63) / 64 * 64;
}

__global__ void __launch_bounds__(kMlaFusedWarps * 32)
    mla_core_fused_kernel(MlaArgs a, int64_t splits, float* part_o, float* part_ml) {
  const int64_t groups = (a.h + kMlaFusedHeads - 1) / kMlaFusedHeads;
  const int64_t t = blockIdx.x / groups, group = blockIdx.x % groups, split = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t width = a.c + a.r, row_words = width / 2 + 1;
  extern __shared__ float smem[];
  float* qs = smem;                                                          // [16][width]
  uint32_t* tile = reinterpret_cast<uint32_t*>(smem + kMlaFusedHeads * width);  // [kTile][row_words]

  const int64_t head0 = group * kMlaFusedHeads;
  for (int64_t i = threadIdx.x; i < kMlaFusedHeads * width; i += blockDim.x) {
    const int64_t hl = i / width, k = i % width, head = head0 + hl;
    float v = 0.0f;
    if (head < a.h)
      v = k < a.c ? a.q_lat[(t * a.h + head) * a.c + k] * (a.q_scale ? a.q_scale[head * 2 * a.c + k] : 1.0f)
                  : a.q[(t * a.h + head) * (a.nope + a.r) + a.nope + (k - a.c)];
    qs[i] = v;
  }
  const int64_t ctx = static_cast<int64_t>(a.token_pos[t]) + 1;
  const int64_t chunk = mla_split_chunk(ctx, splits);
  const int64_t begin = split * chunk, end = ctx < begin + chunk ? ctx : begin + chunk;
  const int32_t* table = a.tables + static_cast<int64_t>(a.token_seq[t]) * a.table_stride;
  const int64_t ha = head0 + 2 * warp, hb = ha + 1;  // this warp's heads (may be past H)
  const float* qa = qs + (2 * warp) * width;
  const float* qb = qa + width;
  constexpr int kCols = kMaxC / 32;
  float ma = -INFINITY, mb = -INFINITY, la = 0.0f, lb = 0.0f;
  float acc_a[kCols], acc_b[kCols];
#pragma unroll
  for (int i = 0; i < kCols; ++i) acc_a[i] = acc_b[i] = 0.0f;
  __syncthreads();

  for (int64_t j0 = begin; j0 < end; j0 += kMlaTile) {
    // The tile: kTile positions x width/2 words, position-major; past `end`: zeros.
    const int64_t words = width / 2;
    for (int64_t i = threadIdx.x; i < kMlaTile * words; i += blockDim.x) {
      const int64_t p = i / words, w = i % words, j = j0 + p;
      uint32_t v = 0;
      if (j < end) {
        const int64_t slot = static_cast<int64_t>(table[j / a.block_size]) * a.block_size + j % a.block_size;
        v = reinterpret_cast<const uint32_t*>(a.cache + slot * width)[w];
      }
      tile[p * row_words + w] = v;
    }
    __syncthreads();
    // Scores of position j0 + lane for both heads.
    float sa = 0.0f, sb = 0.0f;
    const uint32_t* row = tile + lane * row_words;
    for (int64_t w = 0; w < words; ++w) {
      const uint32_t pair = row[w];
      const float x0 = __uint_as_float(pair << 16), x1 = __uint_as_float(pair & 0xffff0000u);
      sa = fmaf(qa[2 * w], x0, fmaf(qa[2 * w + 1], x1, sa));
      sb = fmaf(qb[2 * w], x0, fmaf(qb[2 * w + 1], x1, sb));
    }
    const bool valid = j0 + lane < end;
    sa = valid ? sa * a.scale : -INFINITY;
    sb = valid ? sb * a.scale : -INFINITY;
    const float na = fmaxf(ma, warp_max(sa)), nb = fmaxf(mb, warp_max(sb));  // finite: lane 0 is valid
    const float ca = expf(ma - na), cb = expf(mb - nb);
    const float pa = expf(sa - na), pb = expf(sb - nb);
    la = la * ca + warp_sum(pa);
    lb = lb * cb + warp_sum(pb);
    ma = na;
    mb = nb;
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      acc_a[i] *= ca;
      acc_b[i] *= cb;
    }
    const int64_t valid_n = end - j0 < kMlaTile ? end - j0 : kMlaTile;
    const uint16_t* tile16 = reinterpret_cast<const uint16_t*>(tile);
    for (int p = 0; p < valid_n; ++p) {
      const float wa = __shfl_sync(0xffffffffu, pa, p), wb = __shfl_sync(0xffffffffu, pb, p);
      const uint16_t* r16 = tile16 + static_cast<int64_t>(p) * row_words * 2;
#pragma unroll
      for (int i = 0; i < kCols; ++i) {
        const int64_t k = lane + 32 * i;
        if (k < a.c) {
          const float x = __uint_as_float(static_cast<uint32_t>(r16[k]) << 16);
          acc_a[i] = fmaf(wa, x, acc_a[i]);
          acc_b[i] = fmaf(wb, x, acc_b[i]);
        }
      }
    }
    __syncthreads();  // the tile is overwritten next
  }

  auto store = [&](int64_t head, float m, float l, const float* acc) {
    if (head >= a.h) return;
    const int64_t th = t * a.h + head;
    if (splits == 1) {
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
      for (int i = 0; i < kCols; ++i) {
        const int64_t k = lane + 32 * i;
        if (k < a.c) a.o_lat[th * a.c + k] = acc[i] * inv;
      }
      return;
    }
    const int64_t at = split * a.t * a.h + th;
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      const int64_t k = lane + 32 * i;
      if (k < a.c) part_o[at * a.c + k] = acc[i];
    }
    if (lane == 0) {
      part_ml[2 * at] = m;
      part_ml[2 * at + 1] = l;
    }
  };
  store(ha, ma, la, acc_a);
  store(hb, mb, lb, acc_b);
}

// o_lat[t, h] = the splits' partial states merged: sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M).
// One block per (token, head): the first warp turns the (at most 32) splits' statistics into
// factors e^(m_s - M) once, then every thread merges its float4 columns (scalar when C % 4 != 0).
__global__ void mla_combine_kernel(MlaArgs a, int64_t splits, const float* part_o, const float* part_ml) {
  pdl_enter();
  const int64_t th = blockIdx.x, rows = a.t * a.h;  // rows: one split's (token, head) count
  __shared__ float factor[kMlaMaxSplits];
  __shared__ float inv_denom;
  if (threadIdx.x < 32) {
    const int s = static_cast<int>(threadIdx.x);
    const float* ml = part_ml + 2 * (s * rows + th);
    const bool live = s < splits && ml[1] > 0.0f;
    const float m = live ? ml[0] : -INFINITY, l = live ? ml[1] : 0.0f;
    const float big = warp_max(m);
    const float f = live ? expf(m - big) : 0.0f;
    const float denom = warp_sum(l * f);
    if (s < splits) factor[s] = f;
    if (s == 0) inv_denom = denom > 0.0f ? 1.0f / denom : 0.0f;
  }
  __syncthreads();
  const int ns = static_cast<int>(splits), c = static_cast<int>(a.c);
  const float inv = inv_denom;
  const float* src = part_o + th * a.c;
  float* dst = a.o_lat + th * a.c;
  const int64_t split_stride = rows * a.c;
  if (c % 4 == 0) {
    for (int k = 4 * static_cast<int>(threadIdx.x); k < c; k += 4 * static_cast<int>(blockDim.x)) {
      float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (int s = 0; s < ns; ++s) {
        const float f = factor[s];
        if (f == 0.0f) continue;  // an empty split: its partials may be unwritten
        const float4 x = *reinterpret_cast<const float4*>(src + s * split_stride + k);
        o.x = fmaf(x.x, f, o.x);
        o.y = fmaf(x.y, f, o.y);
        o.z = fmaf(x.z, f, o.z);
        o.w = fmaf(x.w, f, o.w);
      }
      *reinterpret_cast<float4*>(dst + k) = make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
    }
  } else {
    for (int k = static_cast<int>(threadIdx.x); k < c; k += static_cast<int>(blockDim.x)) {
      float o = 0.0f;
      for (int s = 0; s < ns; ++s)
        if (factor[s] != 0.0f) o = fmaf(src[s * split_stride + k], factor[s], o);
      dst[k] = o * inv;
    }
  }
}

// Blocks (token x head group, split) of the fused and the tensor-core MLA cores.
static dim3 mla_grid(const MlaArgs& a, int64_t splits) {
  const int64_t groups = (a.h + kMlaFusedHeads - 1) / kMlaFusedHeads;
  return dim3(static_cast<unsigned>(a.t * groups), static_cast<unsigned>(splits));
}

// The splits' partial softmax states merged into o_lat (nothing to do for one split).
static void mla_combine(const MlaArgs& a, int64_t splits, const float* part_o, const float* part_ml, void* stream) {
  if (splits <= 1) return;
  if (splits > kMlaMaxSplits) throw std::runtime_error("mla_combine: more than 32 context splits");
  launch_chained(mla_combine_kernel, static_cast<unsigned>(a.t * a.h), 128, 0, as_stream(stream), a, splits, part_o,
                 part_ml);
  check_launch("mla_combine");
}

void mla_core_fused(const MlaArgs& a, int64_t splits, float* part_o, float* part_ml, void* stream) {
  if (a.t <= 0 || a.h <= 0) return;
  const int64_t width = a.c + a.r;
  if (a.c > kMaxC || width % 2 != 0)
    throw std::runtime_error("mla_core_fused: kv_lora_rank " + std::to_string(a.c) + " + rope dim " +
                             std::to_string(a.r) + " (needs C <= 512 and an even C + R)");
  if (splits < 1 || splits > kMlaMaxSplits || (splits > 1 && (part_o == nullptr || part_ml == nullptr)))
    throw std::runtime_error("mla_core_fused: bad split");
  const size_t smem = (static_cast<size_t>(kMlaFusedHeads * width) +
                       static_cast<size_t>(kMlaTile) * static_cast<size_t>(width / 2 + 1)) * sizeof(float);
  static size_t allowed[kMaxDevices] = {};
  allow_dynamic_smem(mla_core_fused_kernel, smem, allowed, "mla_core_fused");
  mla_core_fused_kernel<<<mla_grid(a, splits), kMlaFusedWarps * 32, smem, as_stream(stream)>>>(a, splits, part_o, part_ml);
  check_launch("mla_core_fused");
  mla_combine(a, splits, part_o, part_ml, stream);
}

// ---------------------------------------------------------------- MLA, core on tensor cores
// cuda.kernels=fast where C % 128 == 0, C <= 512, (C + R) % 16 == 0 and C + R <= 640 (R1: 512 +
// 64). Block (token t, 16 heads, split s), 8 warps, two blocks per SM (96 KB of shared memory,
// at most 128 registers a thread). The queries live in registers as BF16 pairs hi + lo
// (hi = bf16(q), lo = bf16(q - hi): 16 significant bits, near the F32 kernel's accuracy): warp w
// holds the 16-wide K steps w * S / 8 .. of the C + R columns (S = (C + R) / 16 steps, 4 or 5 a
// warp for R1), so no warp reads them from shared memory again. The cache comes in tiles of 32
// positions, double-buffered through cp.async. Per tile:
//   scores: warp w multiplies its K steps of the queries with the tile's 32 positions (B
//     fragments by ldmatrix) and leaves a partial 16 x 32 in shared memory;
//   softmax: warp w sums the 8 partials of heads 2w, 2w + 1 (lane = position), keeps their
//     running max and sum in registers, and writes the probabilities as hi + lo BF16;
//   output: warp w owns latent columns 64w..64w+63 for all 16 heads; the cache's columns enter
//     through ldmatrix.trans.
// Three barriers a tile. Every loop index is 32-bit: 64-bit division costs more than a tile's MMAs.
constexpr int kMmaTile = 32, kMlaMmaWarps = 8, kMlaQSteps = 5;
constexpr int kMlaPart = kMmaTile + 8;  // pitch of the partial scores (F32) and probabilities (BF16)
static_assert(kMmaTile * 8 == kMlaMmaWarps * 32, "the tile loader's thread layout");
static_assert(kMlaFusedHeads == 2 * kMlaMmaWarps, "two heads a warp in the softmax, one m16 tile of heads");

// Four 8x8 BF16 matrices from shared memory (kTrans: transposed), rows addressed by lanes 8i..8i+7.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t s, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(s));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(s));
#else
  r0 = r1 = r2 = r3 = 0;
#endif
}
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(const void* smem, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  ldmatrix_x4<kTrans>(smem_u32(smem), r0, r1, r2, r3);
}

// hi + lo BF16 pairs of (x, y): hi = bf16(v), lo = bf16(v - hi).
__device__ __forceinline__ void split_bf16x2(float x, float y, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  const float2 hf = __bfloat1622float2(h);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = pack_bf16x2(x - hf.x, y - hf.y);
}

// ---- MLA absorptions on tensor cores: kv_b's split form, the activations in three BF16 parts ----

// One thread per element of the split form (per head: W_UK transposed [C, nope], then W_UV
// [v, C]), and per (head, column) the two scales.
__global__ void mla_kv_b_split_kernel(const void* w, WeightType type, const float* scale_inv, int64_t sc, int64_t h,
                                      int64_t nope, int64_t v, int64_t c, int64_t bo, int64_t bi,
                                      __nv_bfloat16* split, float* split_scale) {
  const int64_t per_head = (nope + v) * c, n = h * per_head;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t head = i / per_head, j = i % per_head;
    const int64_t row = j < c * nope ? j % nope : nope + (j - c * nope) / c;
    const int64_t col = j < c * nope ? j / nope : (j - c * nope) % c;
    split[i] = __float2bfloat16_rn(load_weight(w, type, (head * (nope + v) + row) * c + col));  // exact
  }
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < h * 2 * c;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t head = i / (2 * c), part = (i / c) % 2, col = i % c;
    const int64_t row = head * (nope + v) + part * nope;
    split_scale[i] = type == WeightType::FP8 ? scale_inv[(row / bo) * sc + col / bi] : 1.0f;
  }
}

// x = hi + mid + lo: each part the BF16 rounding of what the ones before leave (F32's 24 bits).
__device__ __forceinline__ void split_bf16x3(float x, __nv_bfloat16& hi, __nv_bfloat16& mid, __nv_bfloat16& lo) {
  hi = __float2bfloat16_rn(x);
  const float r = x - __bfloat162float(hi);
  mid = __float2bfloat16_rn(r);
  lo = __float2bfloat16_rn(r - __bfloat162float(mid));
}

// One batch entry (head) b of a split GEMM: C[m, n] = sum_k (A[m, k] s[k]) B[n, k] for F32 A
// (rows at a + b a_batch + m lda), an optional per-k scale s (+ b s_batch), BF16 B stored K-major
// (w + b w_batch + n K), F32 C (c + b c_batch + m ldc). N and K multiples of 8 (mla_split_fits).
struct SplitGemm {
  const float* a = nullptr;
  int64_t lda = 0, a_batch = 0;
  const float* s = nullptr;
  int64_t s_batch = 0;
  const __nv_bfloat16* w = nullptr;
  int64_t w_batch = 0;
  float* c = nullptr;
  int64_t ldc = 0, c_batch = 0;
  int64_t m = 0, n = 0, k = 0;
};
// BK 64 against 32: the split absorptions of a batch of 256 took 138 against 147 us (Nsight Compute).
constexpr int kSgBM = 64, kSgBN = 128, kSgBK = 64;

// A block computes a 64 x 128 tile of C, K in steps of BK = kSgBK: A's tile is loaded to registers a step
// ahead, split into its three BF16 parts and stored; B's tile comes through a double-buffered
// cp.async ring. Warp w owns rows 32 (w / 4).. and columns 32 (w % 4)..: per 16-wide K step, 2 x 4
// m16n8k16 tiles, each multiplied by the three parts of A (lo first) into one F32 accumulator.
// Staged rows are BK + 8 BF16s apart (ldmatrix's eight rows on distinct banks).
__global__ void __launch_bounds__(256) split_gemm_kernel(SplitGemm g) {
  constexpr int BK = kSgBK, kPitch = BK + 8, kAPer = BK / 4;  // A: columns a thread
  extern __shared__ __align__(16) unsigned char sg_smem[];
  auto as = reinterpret_cast<__nv_bfloat16(*)[kSgBM][kPitch]>(sg_smem);                                  // [3]
  auto bs = reinterpret_cast<__nv_bfloat16(*)[kSgBN][kPitch]>(sg_smem + 3 * kSgBM * kPitch * 2);  // [2]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, quad = lane & 3;
  const int64_t b = blockIdx.z, m0 = static_cast<int64_t>(blockIdx.y) * kSgBM, n0 = static_cast<int64_t>(blockIdx.x) * kSgBN;
  const float* a = g.a + b * g.a_batch;
  const float* s = g.s ? g.s + b * g.s_batch : nullptr;
  const __nv_bfloat16* w = g.w + b * g.w_batch + n0 * g.k;
  // A: this thread's BK / 4 columns of row tid / 4; B: pieces of 16 bytes, rows tid / (BK / 8) + ...
  const int a_row = tid >> 2, a_col = (tid & 3) * kAPer;
  const bool a_ok = m0 + a_row < g.m;
  const float* a_src = a + (m0 + a_row) * g.lda + a_col;
  float4 x[kAPer / 4];
  auto load_a = [&](int64_t k0) {  // zeros past M and K
#pragma unroll
    for (int i = 0; i < kAPer / 4; ++i) {
      const bool in_k = k0 + a_col + 4 * i < g.k;
      x[i] = a_ok && in_k ? *reinterpret_cast<const float4*>(a_src + k0 + 4 * i) : make_float4(0.f, 0.f, 0.f, 0.f);
      if (s && in_k) {
        const float4 f = *reinterpret_cast<const float4*>(s + k0 + a_col + 4 * i);
        x[i].x *= f.x, x[i].y *= f.y, x[i].z *= f.z, x[i].w *= f.w;
      }
    }
  };
  auto store_a = [&] {
#pragma unroll
    for (int i = 0; i < kAPer / 8; ++i) {
      __align__(16) __nv_bfloat16 p[3][8];
      const float v[8] = {x[2 * i].x,     x[2 * i].y,     x[2 * i].z,     x[2 * i].w,
                          x[2 * i + 1].x, x[2 * i + 1].y, x[2 * i + 1].z, x[2 * i + 1].w};
#pragma unroll
      for (int j = 0; j < 8; ++j) split_bf16x3(v[j], p[0][j], p[1][j], p[2][j]);
#pragma unroll
      for (int q = 0; q < 3; ++q)
        *reinterpret_cast<uint4*>(&as[q][a_row][a_col + 8 * i]) = *reinterpret_cast<const uint4*>(p[q]);
    }
  };
  auto load_b = [&](int buf, int64_t k0) {  // zeros past N and K
    constexpr int kPieces = BK / 8, kRowsPer = 256 / kPieces;
#pragma unroll
    for (int i = 0; i < kSgBN / kRowsPer; ++i) {
      const int row = tid / kPieces + kRowsPer * i, col = (tid % kPieces) * 8;
      const bool ok = n0 + row < g.n && k0 + col < g.k;
      cp_async16(&bs[buf][row][col], ok ? w + row * g.k + k0 + col : w, ok);
    }
    cp_async_commit();
  };

  float acc[2][4][4] = {};
  const int wm = 32 * (warp >> 2), wn = 32 * (warp & 3);
  const int64_t steps = (g.k + BK - 1) / BK;
  load_a(0);
  load_b(0, 0);
  for (int64_t st = 0; st < steps; ++st) {
    store_a();
    if (st + 1 < steps) {
      load_b(static_cast<int>((st + 1) & 1), (st + 1) * BK);
      load_a((st + 1) * BK);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int buf = static_cast<int>(st & 1);
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      uint32_t bf[4][2];
#pragma unroll
      for (int j = 0; j < 2; ++j)
        ldmatrix_x4<false>(&bs[buf][wn + 16 * j + (lane & 7) + ((lane >> 4) << 3)][ks + ((lane >> 3) & 1) * 8],
                           bf[2 * j][0], bf[2 * j][1], bf[2 * j + 1][0], bf[2 * j + 1][1]);
#pragma unroll
      for (int q = 2; q >= 0; --q)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          uint32_t af[4];
          ldmatrix_x4<false>(&as[q][wm + 16 * i + (lane & 15)][ks + (lane >> 4) * 8], af[0], af[1], af[2], af[3]);
#pragma unroll
          for (int j = 0; j < 4; ++j) mma_bf16_16816(acc[i][j], af[0], af[1], af[2], af[3], bf[j][0], bf[j][1]);
        }
    }
    __syncthreads();
  }
  float* c = g.c + b * g.c_batch;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = m0 + wm + 16 * i + gid + 8 * h;
      if (row >= g.m) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col = n0 + wn + 8 * j + 2 * quad;
        if (col < g.n) *reinterpret_cast<float2*>(c + row * g.ldc + col) = make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
      }
    }
}

// 63 KB of shared memory a block, opted into once. (100 registers: two blocks an SM; three, at
// 80 registers, measured the same.)
void launch_split_gemm(const SplitGemm& g, int64_t batch, cudaStream_t stream) {
  constexpr size_t smem = static_cast<size_t>(3 * kSgBM + 2 * kSgBN) * (kSgBK + 8) * 2;
  static size_t allowed[kMaxDevices] = {};
  allow_dynamic_smem(split_gemm_kernel, smem, allowed, "split_gemm");
  const dim3 grid(static_cast<unsigned>((g.n + kSgBN - 1) / kSgBN), static_cast<unsigned>((g.m + kSgBM - 1) / kSgBM),
                  static_cast<unsigned>(batch));
  split_gemm_kernel<<<grid, 256, smem, stream>>>(g);
}


__global__ void __launch_bounds__(kMlaMmaWarps * 32, 2)
    mla_core_mma_kernel(MlaArgs a, int64_t splits, float* part_o, float* part_ml) {
  pdl_enter();
  const int64_t groups = (a.h + kMlaFusedHeads - 1) / kMlaFusedHeads;
  const int64_t t = blockIdx.x / groups, group = blockIdx.x % groups, split = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, quad = lane & 3;
  const int c = static_cast<int>(a.c), width = c + static_cast<int>(a.r), pitch = width + 8;  // BF16 a staged row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* tiles = reinterpret_cast<__nv_bfloat16*>(smem_raw);     // [2][kMmaTile][pitch]
  float* part = reinterpret_cast<float*>(tiles + 2 * kMmaTile * pitch);  // [warps][16][kMlaPart] partial scores
  __nv_bfloat16* p_hi = reinterpret_cast<__nv_bfloat16*>(part + kMlaMmaWarps * kMlaFusedHeads * kMlaPart);
  __nv_bfloat16* p_lo = p_hi + kMlaFusedHeads * kMlaPart;                   // [16][kMlaPart] each
  float* stat_c = reinterpret_cast<float*>(p_lo + kMlaFusedHeads * kMlaPart);  // [16] this tile's correction
  float* stat_m = stat_c + kMlaFusedHeads;                                   // [16] final max, sum
  float* stat_l = stat_m + kMlaFusedHeads;

  // This warp's K steps of the queries, as m16k16 A fragments (rows: heads; zero past a.h).
  const int64_t head0 = group * kMlaFusedHeads;
  const int heads = static_cast<int>(a.h - head0 < kMlaFusedHeads ? a.h - head0 : kMlaFusedHeads);
  const int steps = width / 16, base = steps / kMlaMmaWarps, rem = steps % kMlaMmaWarps;
  const int my_steps = base + (warp < rem ? 1 : 0), step0 = warp * base + (warp < rem ? warp : rem);
  uint32_t qh[kMlaQSteps][4], ql[kMlaQSteps][4];
  {
    const float* qlat = a.q_lat + (t * a.h + head0) * a.c;
    const float* qrope = a.q + (t * a.h + head0) * (a.nope + a.r) + a.nope;
    const int qstride = static_cast<int>(a.nope + a.r);
    // Columns col, col + 1 (col even; C even, so both on one side of C).
    const float* qscale = a.q_scale ? a.q_scale + head0 * 2 * c : nullptr;  // [heads, 2, C]
    auto q2 = [&](int hl, int col) {
      if (hl >= heads) return make_float2(0.0f, 0.0f);
      if (col >= c) return *reinterpret_cast<const float2*>(qrope + hl * qstride + col - c);
      float2 x = *reinterpret_cast<const float2*>(qlat + hl * c + col);
      if (qscale) {
        const float2 f = *reinterpret_cast<const float2*>(qscale + hl * 2 * c + col);
        x.x *= f.x, x.y *= f.y;
      }
      return x;
    };
#pragma unroll
    for (int s = 0; s < kMlaQSteps; ++s) {
      qh[s][0] = qh[s][1] = qh[s][2] = qh[s][3] = ql[s][0] = ql[s][1] = ql[s][2] = ql[s][3] = 0u;
      if (s < my_steps) {
        const int k = 16 * (step0 + s) + 2 * quad;
        const float2 v0 = q2(gid, k), v1 = q2(gid + 8, k), v2 = q2(gid, k + 8), v3 = q2(gid + 8, k + 8);
        split_bf16x2(v0.x, v0.y, qh[s][0], ql[s][0]);
        split_bf16x2(v1.x, v1.y, qh[s][1], ql[s][1]);
        split_bf16x2(v2.x, v2.y, qh[s][2], ql[s][2]);
        split_bf16x2(v3.x, v3.y, qh[s][3], ql[s][3]);
      }
    }
  }
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};  // heads 2 warp, 2 warp + 1

  const int64_t ctx = static_cast<int64_t>(a.token_pos[t]) + 1;
  const int64_t chunk = mla_split_chunk(ctx, splits);
  const int64_t begin = split * chunk, end = ctx < begin + chunk ? ctx : begin + chunk;
  const int32_t* table = a.tables + static_cast<int64_t>(a.token_seq[t]) * a.table_stride;
  // Tile loader: thread i copies position i / 8 of the tile, 16-byte pieces i % 8 + 8j of its row.
  // Addresses in shared space are 32-bit byte offsets computed once; a tile adds its buffer's.
  const int pieces = width / 8, bs = static_cast<int>(a.block_size);
  const bool bs_pow2 = (bs & (bs - 1)) == 0;
  const int bs_shift = __ffs(bs) - 1;
  const int lp = threadIdx.x >> 3, lfirst = threadIdx.x & 7;
  const uint32_t tiles_s = smem_u32(tiles), buf_bytes = static_cast<uint32_t>(kMmaTile * pitch * 2);
  const uint32_t load_s = tiles_s + static_cast<uint32_t>((lp * pitch + 8 * lfirst) * 2);
  constexpr int kLoadSteps = 16 * kMlaQSteps * kMlaMmaWarps / 64;  // 16-byte pieces a thread, at most
  auto load_tile = [&](int buf, int64_t j0) {
    const int64_t j = j0 + lp;
    const bool valid = j < end;
    const uint16_t* src = a.cache;
    if (valid) {
      const int jj = static_cast<int>(j);  // positions fit 32 bits (token_pos is int32)
      const int blk = bs_pow2 ? jj >> bs_shift : jj / bs, off = bs_pow2 ? jj & (bs - 1) : jj % bs;
      src += (static_cast<int64_t>(table[blk]) * bs + off) * width;
    }
    src += 8 * lfirst;
    const uint32_t dst = load_s + buf * buf_bytes;
#pragma unroll
    for (int i = 0; i < kLoadSteps; ++i)
      if (lfirst + 8 * i < pieces) cp_async16_s(dst + 128 * i, src + 64 * i, valid);
  };

  const int cols = c / kMlaMmaWarps;  // latent columns per warp (64 for C = 512)
  const int ntiles = cols / 8;
  const int mi = lane >> 3, ri = lane & 7;  // ldmatrix: lane's matrix and row
  // ldmatrix row addresses of this lane: the cache rows as the scores' B (this warp's first K
  // step), as the output's B (transposed; this warp's columns), and the probabilities as A.
  const uint32_t k_lane = tiles_s + static_cast<uint32_t>(((8 * (mi >> 1) + ri) * pitch + 16 * step0 + 8 * (mi & 1)) * 2);
  const uint32_t k_next = static_cast<uint32_t>(16 * pitch * 2);  // the next 16 positions
  const uint32_t v_lane = tiles_s + static_cast<uint32_t>((((mi & 1) * 8 + ri) * pitch + warp * cols + (mi >> 1) * 8) * 2);
  const uint32_t p_lane = smem_u32(p_hi) + static_cast<uint32_t>(((ri + 8 * (mi & 1)) * kMlaPart + 8 * (mi >> 1)) * 2);
  constexpr uint32_t kPLo = kMlaFusedHeads * kMlaPart * 2;  // p_lo - p_hi in bytes
  float acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;

  if (begin < end) load_tile(0, begin);
  cp_async_commit();
  int buf = 0;
  for (int64_t j0 = begin; j0 < end; j0 += kMmaTile, buf ^= 1) {
    cp_async_wait<0>();
    __syncthreads();  // this tile visible to all; every warp done with the last tile's buffer
    if (j0 + kMmaTile < end) load_tile(buf ^ 1, j0 + kMmaTile);
    cp_async_commit();
    {  // partial scores: this warp's K steps, the tile's 32 positions (4 n-tiles, hi and lo)
      float s[4][4] = {};
      const uint32_t kb = k_lane + buf * buf_bytes;
#pragma unroll
      for (int st = 0; st < kMlaQSteps; ++st) {
        if (st < my_steps) {
#pragma unroll
          for (int n = 0; n < 4; n += 2) {
            uint32_t b0, b1, b2, b3;
            ldmatrix_x4<false>(kb + 32 * st + (n / 2) * k_next, b0, b1, b2, b3);
            mma_bf16_16816(s[n], qh[st][0], qh[st][1], qh[st][2], qh[st][3], b0, b1);
            mma_bf16_16816(s[n + 1], qh[st][0], qh[st][1], qh[st][2], qh[st][3], b2, b3);
            mma_bf16_16816(s[n], ql[st][0], ql[st][1], ql[st][2], ql[st][3], b0, b1);
            mma_bf16_16816(s[n + 1], ql[st][0], ql[st][1], ql[st][2], ql[st][3], b2, b3);
          }
        }
      }
      float* pw = part + warp * kMlaFusedHeads * kMlaPart;
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        const int col = 8 * n + 2 * quad;
        *reinterpret_cast<float2*>(pw + gid * kMlaPart + col) = make_float2(s[n][0], s[n][1]);
        *reinterpret_cast<float2*>(pw + (gid + 8) * kMlaPart + col) = make_float2(s[n][2], s[n][3]);
      }
    }
    __syncthreads();
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {  // online softmax of heads 2 warp, 2 warp + 1; lane = position
      const int hl = 2 * warp + hh;
      float s = 0.0f;
#pragma unroll
      for (int w = 0; w < kMlaMmaWarps; ++w) s += part[(w * kMlaFusedHeads + hl) * kMlaPart + lane];
      const bool valid = j0 + lane < end;
      s = valid ? s * a.scale : -INFINITY;
      const float m_new = fmaxf(m_run[hh], warp_max(s));  // finite: position j0 is valid
      const float p = valid ? expf(s - m_new) : 0.0f;
      const float corr = expf(m_run[hh] - m_new);
      l_run[hh] = l_run[hh] * corr + warp_sum(p);
      m_run[hh] = m_new;
      const __nv_bfloat16 ph = __float2bfloat16_rn(p);
      p_hi[hl * kMlaPart + lane] = ph;
      p_lo[hl * kMlaPart + lane] = __float2bfloat16_rn(p - __bfloat162float(ph));
      if (lane == 0) stat_c[hl] = corr;
    }
    __syncthreads();
    {  // acc = acc * corr + P (16 x 32) . V (32 x cols of this warp)
      const float ca = stat_c[gid], cb = stat_c[gid + 8];
      if (__any_sync(0xffffffffu, ca != 1.0f || cb != 1.0f)) {  // once the maxima settle, mostly not
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          acc[i][0] *= ca;
          acc[i][1] *= ca;
          acc[i][2] *= cb;
          acc[i][3] *= cb;
        }
      }
      const uint32_t vb = v_lane + buf * buf_bytes;
#pragma unroll
      for (int k = 0; k < kMmaTile; k += 16) {
        uint32_t ah0, ah1, ah2, ah3, al0, al1, al2, al3;
        ldmatrix_x4<false>(p_lane + 2 * k, ah0, ah1, ah2, ah3);
        ldmatrix_x4<false>(p_lane + kPLo + 2 * k, al0, al1, al2, al3);
#pragma unroll
        for (int n = 0; n < 8; n += 2) {
          if (n >= ntiles) break;
          uint32_t b0, b1, b2, b3;
          ldmatrix_x4<true>(vb + k * k_next / 16 + 16 * n, b0, b1, b2, b3);
          mma_bf16_16816(acc[n], ah0, ah1, ah2, ah3, b0, b1);
          mma_bf16_16816(acc[n + 1], ah0, ah1, ah2, ah3, b2, b3);
          mma_bf16_16816(acc[n], al0, al1, al2, al3, b0, b1);
          mma_bf16_16816(acc[n + 1], al0, al1, al2, al3, b2, b3);
        }
      }
    }
  }
  cp_async_wait<0>();
  if (lane == 0) {
    stat_m[2 * warp] = m_run[0];
    stat_m[2 * warp + 1] = m_run[1];
    stat_l[2 * warp] = l_run[0];
    stat_l[2 * warp + 1] = l_run[1];
  }
  __syncthreads();  // the statistics (also when this split is empty)

  const int64_t at0 = split * a.t * a.h + t * a.h;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int hl = gid + 8 * hh;
    const int64_t head = head0 + hl;
    if (head >= a.h) continue;
    const float l = stat_l[hl];
    const float inv = splits == 1 ? (l > 0.0f ? 1.0f / l : 0.0f) : 1.0f;
    float* dst = splits == 1 ? a.o_lat + (t * a.h + head) * a.c : part_o + (at0 + head) * a.c;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (i >= ntiles) break;
      const int col = warp * cols + 8 * i + 2 * quad;
      *reinterpret_cast<float2*>(dst + col) = make_float2(acc[i][2 * hh] * inv, acc[i][2 * hh + 1] * inv);
    }
  }
  if (splits > 1 && threadIdx.x < kMlaFusedHeads && head0 + threadIdx.x < a.h) {
    part_ml[2 * (at0 + head0 + threadIdx.x)] = stat_m[threadIdx.x];
    part_ml[2 * (at0 + head0 + threadIdx.x) + 1] = stat_l[threadIdx.x];
  }
}

static size_t mla_core_mma_smem(int64_t width) {
  const size_t pitch = static_cast<size_t>(width) + 8;
  return 2 * kMmaTile * pitch * 2 + kMlaMmaWarps * kMlaFusedHeads * kMlaPart * 4 + 2 * kMlaFusedHeads * kMlaPart * 2 +
         3 * kMlaFusedHeads * 4;
}

bool mla_core_mma_fits(const MlaArgs& a) {
  const int64_t width = a.c + a.r;
  return device_attribute(cudaDevAttrComputeCapabilityMajor) >= 8 && a.c % 128 == 0 && a.c <= 512 &&
         width % 16 == 0 && width <= 16 * kMlaQSteps * kMlaMmaWarps && a.nope % 4 == 0 && a.r % 4 == 0 &&
         reinterpret_cast<uintptr_t>(a.q) % 16 == 0 && reinterpret_cast<uintptr_t>(a.q_lat) % 16 == 0 &&
         mla_core_mma_smem(width) <= static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
}

void mla_core_mma(const MlaArgs& a, int64_t splits, float* part_o, float* part_ml, void* stream) {
  if (a.t <= 0 || a.h <= 0) return;
  if (!mla_core_mma_fits(a)) throw std::runtime_error("mla_core_mma: shapes or device outside the kernel's");
  if (splits < 1 || splits > kMlaMaxSplits || (splits > 1 && (part_o == nullptr || part_ml == nullptr)))
    throw std::runtime_error("mla_core_mma: bad split");
  const size_t smem = mla_core_mma_smem(a.c + a.r);
  static size_t allowed[kMaxDevices] = {};
  allow_dynamic_smem(mla_core_mma_kernel, smem, allowed, "mla_core_mma");
  launch_chained(mla_core_mma_kernel, mla_grid(a, splits), kMlaMmaWarps * 32, smem, as_stream(stream), a, splits,
                 part_o, part_ml);
  check_launch("mla_core_mma");
  mla_combine(a, splits, part_o, part_ml, stream);
}

// ---------------------------------------------------------------- MLA, core on Hopper wgmma
// cuda.kernels=fast at large batch on sm_90a (R1's C = 512, R = 64, heads a multiple of 64).
// Block (token t, 64 heads, split s), two warpgroups, one block per SM (225 KB of shared memory,
// 16-byte aligned as wgmma asks).
// Every operand sits in shared memory in the no-swizzle core-matrix layout (8 rows x 16 bytes,
// 128 contiguous bytes), which serves a cached row both as a K-major row of the scores' B and as
// an N-major row of the output's B:
//   queries: hi + lo BF16 (16 significant bits, as the mma.sync core), 64 heads x 576, loaded
//     once; element (head, k) at (head / 8) * 9216 + (k / 8) * 128 + (head % 8) * 16 + (k % 8) * 2;
//   cache tiles: 32 positions x 576, double-buffered through cp.async, same layout;
//   probabilities: hi + lo BF16, 64 heads x 32 positions.
// Per tile (four barriers):
//   scores: warpgroup g multiplies K steps 18g..18g+17 of the queries (hi and lo) with all 32
//     positions (36 wgmma m64n32k16), so each reads half the queries from shared memory (the
//     queries' reads dominate: with 16 positions a warpgroup over all of K, the batch-256 call
//     took 813 us, against 761); the two swap the partial scores of each other's 16 positions
//     through the probabilities' buffers;
//   softmax: each finishes its 16 positions, and the two exchange their row maxima;
//   output: each accumulates its 256 latent columns for all 64 heads (m64n256k16,
//     probabilities hi and lo) in 128 registers a thread, and waits for them before the next tile.
// The next tile's copies are issued after the first barrier, when both buffers' readers are done.
constexpr int kWgHeads = kMlaWgmmaHeads, kWgTile = 32, kWgThreads = 256, kWgC = 512, kWgR = 64, kWgWidth = kWgC + kWgR;
constexpr int kWgChunks = kWgWidth / 8;                                      // 16-byte pieces of a row
constexpr uint32_t kWgGroupBytes = kWgChunks * 128;                          // 8 rows of core matrices
constexpr uint32_t kWgQBytes = kWgHeads / 8 * kWgGroupBytes;                 // 73728
constexpr uint32_t kWgTileBytes = kWgTile / 8 * kWgGroupBytes;               // 36864
constexpr uint32_t kWgPBytes = kWgHeads * kWgTile * 2;                       // 4096
constexpr size_t kWgSmem = 2 * kWgQBytes + 2 * kWgTileBytes + 2 * kWgPBytes + 4 * kWgHeads * sizeof(float);

// A shared-memory matrix descriptor without swizzling: start address, leading-dimension byte
// offset (K-major: to the next 8 K columns; N-major: to the next 8 K rows), stride-dimension byte
// offset (K-major: to the next 8 M/N rows; N-major: to the next 8 N columns).
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32);
}
__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_wait_all() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
// Generic-proxy writes to shared memory (stores, cp.async) made visible to wgmma's reads.
__device__ __forceinline__ void fence_proxy_async_smem() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// After a wait: the accumulators' values come from here on (the compiler must not read them earlier).
template <int N>
__device__ __forceinline__ void wgmma_settle(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D (64 x 32, F32, += unless !accumulate) = A (64 x 16) . B (16 x 32), both K-major in shared
// memory: the scores of the wgmma MLA core.
__device__ __forceinline__ void wgmma_m64n32k16_tn(float (&d)[16], uint64_t da, uint64_t db, int accumulate) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(da), "l"(db), "r"(accumulate));
#endif
}
// D (64 x 256 as two 64 x 128 halves d0, d1, F32, += unless !accumulate) = A (64 x 16,
// K-major) . B (16 x 256, N-major), both from shared memory: the P . V product of the wgmma MLA core.
__device__ __forceinline__ void wgmma_m64n256k16_nt(float (&d0)[64], float (&d1)[64], uint64_t da, uint64_t db,
                                                    int accumulate) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, %128, %129, p, 1, 1, 0, 1;\n}\n"
      : "+f"(d0[0]), "+f"(d0[1]), "+f"(d0[2]), "+f"(d0[3]), "+f"(d0[4]), "+f"(d0[5]), "+f"(d0[6]), "+f"(d0[7]), "+f"(d0[8]), "+f"(d0[9]), "+f"(d0[10]), "+f"(d0[11]), "+f"(d0[12]), "+f"(d0[13]), "+f"(d0[14]), "+f"(d0[15]), "+f"(d0[16]), "+f"(d0[17]), "+f"(d0[18]), "+f"(d0[19]), "+f"(d0[20]), "+f"(d0[21]), "+f"(d0[22]), "+f"(d0[23]), "+f"(d0[24]), "+f"(d0[25]), "+f"(d0[26]), "+f"(d0[27]), "+f"(d0[28]), "+f"(d0[29]), "+f"(d0[30]), "+f"(d0[31]), "+f"(d0[32]), "+f"(d0[33]), "+f"(d0[34]), "+f"(d0[35]), "+f"(d0[36]), "+f"(d0[37]), "+f"(d0[38]), "+f"(d0[39]), "+f"(d0[40]), "+f"(d0[41]), "+f"(d0[42]), "+f"(d0[43]), "+f"(d0[44]), "+f"(d0[45]), "+f"(d0[46]), "+f"(d0[47]), "+f"(d0[48]), "+f"(d0[49]), "+f"(d0[50]), "+f"(d0[51]), "+f"(d0[52]), "+f"(d0[53]), "+f"(d0[54]), "+f"(d0[55]), "+f"(d0[56]), "+f"(d0[57]), "+f"(d0[58]), "+f"(d0[59]), "+f"(d0[60]), "+f"(d0[61]), "+f"(d0[62]), "+f"(d0[63]), "+f"(d1[0]), "+f"(d1[1]), "+f"(d1[2]), "+f"(d1[3]), "+f"(d1[4]), "+f"(d1[5]), "+f"(d1[6]), "+f"(d1[7]), "+f"(d1[8]), "+f"(d1[9]), "+f"(d1[10]), "+f"(d1[11]), "+f"(d1[12]), "+f"(d1[13]), "+f"(d1[14]), "+f"(d1[15]), "+f"(d1[16]), "+f"(d1[17]), "+f"(d1[18]), "+f"(d1[19]), "+f"(d1[20]), "+f"(d1[21]), "+f"(d1[22]), "+f"(d1[23]), "+f"(d1[24]), "+f"(d1[25]), "+f"(d1[26]), "+f"(d1[27]), "+f"(d1[28]), "+f"(d1[29]), "+f"(d1[30]), "+f"(d1[31]), "+f"(d1[32]), "+f"(d1[33]), "+f"(d1[34]), "+f"(d1[35]), "+f"(d1[36]), "+f"(d1[37]), "+f"(d1[38]), "+f"(d1[39]), "+f"(d1[40]), "+f"(d1[41]), "+f"(d1[42]), "+f"(d1[43]), "+f"(d1[44]), "+f"(d1[45]), "+f"(d1[46]), "+f"(d1[47]), "+f"(d1[48]), "+f"(d1[49]), "+f"(d1[50]), "+f"(d1[51]), "+f"(d1[52]), "+f"(d1[53]), "+f"(d1[54]), "+f"(d1[55]), "+f"(d1[56]), "+f"(d1[57]), "+f"(d1[58]), "+f"(d1[59]), "+f"(d1[60]), "+f"(d1[61]), "+f"(d1[62]), "+f"(d1[63])
      : "l"(da), "l"(db), "r"(accumulate));
#endif
}

__global__ void __launch_bounds__(kWgThreads, 1)
    mla_core_wgmma_kernel(MlaArgs a, int64_t splits, float* part_o, float* part_ml) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  const int groups = static_cast<int>(a.h / kWgHeads);
  const int t = static_cast<int>(blockIdx.x) / groups, group = static_cast<int>(blockIdx.x) % groups;
  const int split = static_cast<int>(blockIdx.y);
  const int tid = static_cast<int>(threadIdx.x), wg = tid >> 7, wq = (tid >> 5) & 3, lane = tid & 31;
  const int gid = lane >> 2, quad = lane & 3;
  constexpr uint32_t kWgPGroupBytes = kWgTile / 8 * 128;  // 8 heads of probabilities
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* q_hi_p = smem_raw;
  unsigned char* q_lo_p = q_hi_p + kWgQBytes;
  unsigned char* tiles_p = q_lo_p + kWgQBytes;
  unsigned char* p_hi_p = tiles_p + 2 * kWgTileBytes;
  unsigned char* p_lo_p = p_hi_p + kWgPBytes;
  float* smax = reinterpret_cast<float*>(p_lo_p + kWgPBytes);  // [2][64]: each warpgroup's row maxima
  float* ssum = smax + 2 * kWgHeads;                            // [2][64]: and its row sums at the end
  const int64_t head0 = static_cast<int64_t>(group) * kWgHeads;

  const int ctx = a.token_pos[t] + 1;  // positions fit 32 bits (token_pos is int32)
  const int chunk = static_cast<int>(mla_split_chunk(ctx, splits));
  const int begin = split * chunk, end = ctx < begin + chunk ? ctx : begin + chunk;
  const int32_t* table = a.tables + static_cast<int64_t>(a.token_seq[t]) * a.table_stride;
  const int bs = static_cast<int>(a.block_size);
  const uint32_t tiles_s = smem_u32(tiles_p);
  // Tile loader: thread i copies row (i % 8) of each 8-position group, pieces i / 8 + 32j.
  const int lrow = tid & 7, lpiece = tid >> 3;
  auto load_tile = [&](int buf, int j0) {
#pragma unroll
    for (int g = 0; g < kWgTile / 8; ++g) {
      const int j = j0 + 8 * g + lrow;
      const bool valid = j < end;
      const uint16_t* src = a.cache;
      if (valid) src += (static_cast<int64_t>(table[j / bs]) * bs + j % bs) * kWgWidth;
      const uint32_t dst = tiles_s + static_cast<uint32_t>(buf) * kWgTileBytes + static_cast<uint32_t>(g) * kWgGroupBytes +
                           static_cast<uint32_t>(lrow) * 16;
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        const int piece = lpiece + 32 * k;
        if (piece < kWgChunks) cp_async16_s(dst + static_cast<uint32_t>(piece) * 128, src + 8 * piece, valid);
      }
    }
  };

  float o[2][64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[0][i] = o[1][i] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};  // rows r0 and r0 + 8, own positions' sums
  const int r0 = 16 * wq + gid;
  const uint64_t dq_hi = wgmma_desc(smem_u32(q_hi_p), 128, kWgGroupBytes);
  const uint64_t dq_lo = wgmma_desc(smem_u32(q_lo_p), 128, kWgGroupBytes);
  const uint64_t dp_hi = wgmma_desc(smem_u32(p_hi_p), 128, kWgPGroupBytes);
  const uint64_t dp_lo = wgmma_desc(smem_u32(p_lo_p), 128, kWgPGroupBytes);
  // This thread's probabilities in the core-matrix layout: rows r0, r0 + 8, positions 16 wg + 2 quad (+ 8).
  const uint32_t p_off = static_cast<uint32_t>(r0 >> 3) * kWgPGroupBytes + static_cast<uint32_t>(2 * wg) * 128 +
                         static_cast<uint32_t>(r0 & 7) * 16 + static_cast<uint32_t>(quad) * 4;

  if (begin < end) load_tile(0, begin);  // on its way while the queries are converted
  cp_async_commit();
  {  // The queries as hi + lo BF16 in core-matrix layout: 8 columns of a head a thread and step,
     // 9 steps' loads in flight at once (18 steps a thread). Piece i (16 bytes) is head
     // i / 576 * 8 + i % 8, columns 8 ((i / 8) % 72).., at byte 16 i: the stores of a warp are contiguous.
    const float* qlat = a.q_lat + (static_cast<int64_t>(t) * a.h + head0) * kWgC;
    const int qstride = static_cast<int>(a.nope + a.r);
    const float* qrope = a.q + (static_cast<int64_t>(t) * a.h + head0) * qstride + a.nope;
    const float* qscale = a.q_scale ? a.q_scale + static_cast<int64_t>(head0) * 2 * kWgC : nullptr;  // [64, 2, C]
    constexpr int kSteps = kWgHeads * kWgChunks / kWgThreads, kBatch = 9;
    static_assert(kSteps % kBatch == 0, "whole batches of query loads");
#pragma unroll 1
    for (int b = 0; b < kSteps; b += kBatch) {
      float4 x[kBatch][2];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int i = tid + (b + u) * kWgThreads, hd = i / (8 * kWgChunks) * 8 + (i & 7), kc = (i >> 3) % kWgChunks;
        const float* src = kc < kWgC / 8 ? qlat + hd * kWgC + 8 * kc : qrope + hd * qstride + 8 * (kc - kWgC / 8);
        x[u][0] = *reinterpret_cast<const float4*>(src);
        x[u][1] = *reinterpret_cast<const float4*>(src + 4);
        if (qscale && kc < kWgC / 8) {
          const float4 f0 = *reinterpret_cast<const float4*>(qscale + hd * 2 * kWgC + 8 * kc);
          const float4 f1 = *reinterpret_cast<const float4*>(qscale + hd * 2 * kWgC + 8 * kc + 4);
          x[u][0].x *= f0.x, x[u][0].y *= f0.y, x[u][0].z *= f0.z, x[u][0].w *= f0.w;
          x[u][1].x *= f1.x, x[u][1].y *= f1.y, x[u][1].z *= f1.z, x[u][1].w *= f1.w;
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const uint32_t off = static_cast<uint32_t>(tid + (b + u) * kWgThreads) * 16;  // the layout is piece i at 16 i
        uint4 hi, lo;
        split_bf16x2(x[u][0].x, x[u][0].y, hi.x, lo.x);
        split_bf16x2(x[u][0].z, x[u][0].w, hi.y, lo.y);
        split_bf16x2(x[u][1].x, x[u][1].y, hi.z, lo.z);
        split_bf16x2(x[u][1].z, x[u][1].w, hi.w, lo.w);
        *reinterpret_cast<uint4*>(q_hi_p + off) = hi;
        *reinterpret_cast<uint4*>(q_lo_p + off) = lo;
      }
    }
  }
  int buf = 0;
  for (int j0 = begin; j0 < end; j0 += kWgTile, buf ^= 1) {
    cp_async_wait<0>();
    fence_proxy_async_smem();
    __syncthreads();  // this tile visible to all; both warpgroups done with the last tile
    if (j0 + kWgTile < end) load_tile(buf ^ 1, j0 + kWgTile);
    cp_async_commit();
    const uint32_t tile = tiles_s + static_cast<uint32_t>(buf) * kWgTileBytes;

    float s[8];
    {  // Scores: warpgroup g multiplies K steps 18g..18g+17 of the queries (hi and lo, two
       // accumulator chains) with all 32 positions of the tile, so each reads half the queries.
      float sc[2][16] = {};
      const uint64_t db = wgmma_desc(tile, 128, kWgGroupBytes);
      constexpr int kHalf = kWgWidth / 32;  // K steps a warpgroup
      const int ks0 = kHalf * wg;
      wgmma_fence();
#pragma unroll
      for (int i = 0; i < kHalf; ++i) {
        const int ks = ks0 + i;
        wgmma_m64n32k16_tn(sc[0], dq_hi + 16 * ks, db + 16 * ks, i > 0 ? 1 : 0);
        wgmma_m64n32k16_tn(sc[1], dq_lo + 16 * ks, db + 16 * ks, i > 0 ? 1 : 0);
      }
      wgmma_commit();
      wgmma_wait_all();
      wgmma_settle(sc[0]);
      wgmma_settle(sc[1]);
      // sc[.][4j + 0, 1]: row r0, positions 8j + 2 quad (+1); [4j + 2, 3]: row r0 + 8. This
      // warpgroup keeps positions 16 wg.. (j = 2 wg, 2 wg + 1) and hands the other 16 to its
      // partner through the probabilities' buffers (free: both finished the last output product
      // before the tile's first barrier).
      float keep[8], send[8];  // (selects: an index that depends on wg would put sc in local memory)
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float lo8 = sc[0][e] + sc[1][e], hi8 = sc[0][e + 8] + sc[1][e + 8];
        keep[e] = wg == 0 ? lo8 : hi8;
        send[e] = wg == 0 ? hi8 : lo8;
      }
      float* xch = reinterpret_cast<float*>(p_hi_p);  // [2 (receiver)][64 rows][16 positions]
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        float* d = xch + (1 - wg) * kWgHeads * 16 + r0 * 16 + 8 * jj + 2 * quad;
        *reinterpret_cast<float2*>(d) = make_float2(send[4 * jj], send[4 * jj + 1]);
        *reinterpret_cast<float2*>(d + 8 * 16) = make_float2(send[4 * jj + 2], send[4 * jj + 3]);
      }
      __syncthreads();
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const float* d = xch + wg * kWgHeads * 16 + r0 * 16 + 8 * jj + 2 * quad;
        const float2 x0 = *reinterpret_cast<const float2*>(d), x1 = *reinterpret_cast<const float2*>(d + 8 * 16);
        s[4 * jj] = keep[4 * jj] + x0.x;
        s[4 * jj + 1] = keep[4 * jj + 1] + x0.y;
        s[4 * jj + 2] = keep[4 * jj + 2] + x1.x;
        s[4 * jj + 3] = keep[4 * jj + 3] + x1.y;
      }
    }
    // s[4j + 0, 1]: row r0, positions 16 wg + 8j + 2 quad (+1); s[4j + 2, 3]: row r0 + 8.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int pos = j0 + 16 * wg + 8 * (e >> 2) + 2 * quad + (e & 1);
      s[e] = pos < end ? s[e] * a.scale : -INFINITY;
      mx[(e >> 1) & 1] = fmaxf(mx[(e >> 1) & 1], s[e]);
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 1));
      mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 2));
    }
    if (quad == 0) {
      smax[wg * kWgHeads + r0] = mx[0];
      smax[wg * kWgHeads + r0 + 8] = mx[1];
    }
    __syncthreads();  // both warpgroups' maxima (the partials are read: the buffers take probabilities next)
    float corr[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int row = r0 + 8 * rr;
      const float m_new = fmaxf(m_run[rr], fmaxf(smax[row], smax[kWgHeads + row]));  // finite: position j0 is valid
      corr[rr] = expf(m_run[rr] - m_new);
      m_run[rr] = m_new;
    }
    float p[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) p[e] = expf(s[e] - m_run[(e >> 1) & 1]);
    l_run[0] = l_run[0] * corr[0] + (p[0] + p[1] + p[4] + p[5]);
    l_run[1] = l_run[1] * corr[1] + (p[2] + p[3] + p[6] + p[7]);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        uint32_t hi, lo;
        split_bf16x2(p[4 * j + 2 * rr], p[4 * j + 2 * rr + 1], hi, lo);
        const uint32_t off = p_off + static_cast<uint32_t>(j) * 128 + static_cast<uint32_t>(rr) * kWgPGroupBytes;
        *reinterpret_cast<uint32_t*>(p_hi_p + off) = hi;
        *reinterpret_cast<uint32_t*>(p_lo_p + off) = lo;
      }
    }
    fence_proxy_async_smem();
    if (__any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) {  // once the maxima settle, mostly not
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
#pragma unroll
        for (int i = 0; i < 64; i += 4) {
          o[hf][i] *= corr[0];
          o[hf][i + 1] *= corr[0];
          o[hf][i + 2] *= corr[1];
          o[hf][i + 3] *= corr[1];
        }
    }
    __syncthreads();  // all probabilities written
    {  // o += P (64 x 32) . V (32 x this warpgroup's 256 columns), probabilities hi and lo
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kWgTile / 16; ++ks) {
        const uint64_t dv = wgmma_desc(tile + static_cast<uint32_t>(2 * ks) * kWgGroupBytes + static_cast<uint32_t>(wg) * 32 * 128,
                                       kWgGroupBytes, 128);
        wgmma_m64n256k16_nt(o[0], o[1], dp_hi + 16 * ks, dv, 1);
        wgmma_m64n256k16_nt(o[0], o[1], dp_lo + 16 * ks, dv, 1);
      }
      wgmma_commit();
      wgmma_wait_all();
      wgmma_settle(o[0]);
      wgmma_settle(o[1]);
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    l_run[rr] += __shfl_xor_sync(0xffffffffu, l_run[rr], 1);
    l_run[rr] += __shfl_xor_sync(0xffffffffu, l_run[rr], 2);
  }
  if (quad == 0) {
    ssum[wg * kWgHeads + r0] = l_run[0];
    ssum[wg * kWgHeads + r0 + 8] = l_run[1];
  }
  __syncthreads();  // both warpgroups' sums (also when this split is empty)
  const int64_t at0 = static_cast<int64_t>(split) * a.t * a.h + static_cast<int64_t>(t) * a.h;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int row = r0 + 8 * rr;
    const float l = ssum[row] + ssum[kWgHeads + row];
    const int64_t head = head0 + row;
    const float inv = splits == 1 ? (l > 0.0f ? 1.0f / l : 0.0f) : 1.0f;
    float* dst = (splits == 1 ? a.o_lat + (static_cast<int64_t>(t) * a.h + head) * kWgC : part_o + (at0 + head) * kWgC) +
                 wg * 256 + 2 * quad;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
#pragma unroll
      for (int j = 0; j < 16; ++j)
        *reinterpret_cast<float2*>(dst + hf * 128 + 8 * j) =
            make_float2(o[hf][4 * j + 2 * rr] * inv, o[hf][4 * j + 2 * rr + 1] * inv);
    if (splits > 1 && wg == 0 && quad == 0) {
      part_ml[2 * (at0 + head)] = m_run[rr];
      part_ml[2 * (at0 + head) + 1] = l;
    }
  }
#endif
}

// The wgmma core runs only from an sm_90a image on a device of compute capability 9.0.
static bool wgmma_image_here() {
  static std::mutex mu;
  static std::map<int, bool> known;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(dev);
  if (it == known.end()) {
    cudaFuncAttributes attr{};
    const bool ok = device_attribute(cudaDevAttrComputeCapabilityMajor) == 9 &&
                    device_attribute(cudaDevAttrComputeCapabilityMinor) == 0 &&
                    cudaFuncGetAttributes(&attr, mla_core_wgmma_kernel) == cudaSuccess && attr.binaryVersion == 90;
    it = known.emplace(dev, ok).first;
  }
  return it->second;
}

bool mla_core_wgmma_fits(const MlaArgs& a) {
  return a.c == kWgC && a.r == kWgR && a.h % kWgHeads == 0 && a.nope % 4 == 0 &&
         reinterpret_cast<uintptr_t>(a.q) % 16 == 0 && reinterpret_cast<uintptr_t>(a.q_lat) % 16 == 0 &&
         wgmma_image_here() &&
         kWgSmem <= static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
}

void mla_core_wgmma(const MlaArgs& a, int64_t splits, float* part_o, float* part_ml, void* stream) {
  if (a.t <= 0 || a.h <= 0) return;
  if (!mla_core_wgmma_fits(a)) throw std::runtime_error("mla_core_wgmma: shapes or device outside the kernel's");
  if (splits < 1 || splits > kMlaMaxSplits || (splits > 1 && (part_o == nullptr || part_ml == nullptr)))
    throw std::runtime_error("mla_core_wgmma: bad split");
  static size_t allowed[kMaxDevices] = {};
  allow_dynamic_smem(mla_core_wgmma_kernel, kWgSmem, allowed, "mla_core_wgmma");
  const dim3 grid(static_cast<unsigned>(a.t * (a.h / kWgHeads)), static_cast<unsigned>(splits));
  mla_core_wgmma_kernel<<<grid, kWgThreads, kWgSmem, as_stream(stream)>>>(a, splits, part_o, part_ml);
  check_launch("mla_core_wgmma");
  mla_combine(a, splits, part_o, part_ml, stream);
}

// ---------------------------------------------------------------- block-scaled FP8 GEMM on Hopper wgmma
// grouped_fp8 for groups of many rows (prefill's experts) on sm_90a: the staged kernel's
// arithmetic (each 128-wide K block summed on its own in FP32, then added times weight scale x
// activation scale) with the products on wgmma instead of mma.sync.
// Block: one tile, 128 weight rows (output columns) x BN rows of one group; three warpgroups.
// Tiles run in group order (blockIdx.y over an upper bound of their count), so the tiles that
// read a group's weights run side by side and those come from DRAM about once.
//   Warpgroups 0 and 1 multiply: warpgroup w takes weight rows 64w..64w+63 as wgmma's M (A) and
//   the tile's rows as its N (B), both K-major from shared memory. Per stage (128 of K): four
//   m64nBNk32 products into one of two register sets, promoted (times the stage's scales) into
//   the FP32 sums while the next stage's run in the other set.
//   Warpgroup 2 copies the stages through a ring of S slots by cp.async, each slot with a "full"
//   barrier (the copies landed) and an "empty" one (both multiplying warpgroups done with it),
//   so the two multiply and promote out of step with each other and with the copies.
// Measured in docs/perf/r1-geometry-h100-prefill-wgmma.md; a persistent form (blocks walking
// the tiles, the ring running across them) was slower in dilu bench and was dropped.
// Shared memory (from a 1024-byte aligned base): S slots, each the 128 weight rows then the BN
// activation rows of a stage, 128 bytes a row, in wgmma's 128-byte swizzle (16-byte piece c of
// row r at r * 128 + 16 (c ^ (r % 8))): the eight lanes that copy a row read its 128 bytes as one
// request and write them to distinct banks. Then the slots' BN activation scales, then the barriers.
constexpr int kF8wThreads = 384, kF8wCols = 128;
// setmaxnreg budgets: the block holds what ptxas gives 384 threads (168 a thread); if the two
// multiplying warpgroups ask for more than the copying one gives back, setmaxnreg.inc never returns.
constexpr int kF8wCopyRegs = 40, kF8wMathRegs = 232;
static_assert(128 * kF8wCopyRegs + 256 * kF8wMathRegs <= kF8wThreads * (65536 / kF8wThreads / 8 * 8),
              "warpgroup register budgets within the block's registers");
template <int BN>
__host__ __device__ constexpr int fp8_wgmma_stages() { return BN >= 128 ? 6 : 8; }
template <int BN>
__host__ __device__ constexpr size_t fp8_wgmma_stage_bytes() { return static_cast<size_t>(kF8wCols * 128 + BN * 128); }
template <int BN>
constexpr size_t fp8_wgmma_smem() {
  return 1024 + fp8_wgmma_stages<BN>() * (fp8_wgmma_stage_bytes<BN>() + BN * 4 + 2 * 8);
}
// A shared-memory matrix descriptor for K-major rows of 128 bytes in the 128-byte swizzle (8-row
// atoms 1024 bytes apart, 1024-byte aligned).
__device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Warpgroup register budgets (sm_90a): the copying warpgroup gives registers back, the
// multiplying ones take them.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
__device__ __forceinline__ void mbar_init(uint32_t bar, unsigned count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}
// Arrives at the barrier when this thread's cp.async copies issued so far have landed.
__device__ __forceinline__ void mbar_arrive_cp_async(uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
#endif
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#endif
}

// D (64 x N, F32, += unless !accumulate) = A (64 x 32) . B (32 x N), e4m3, both K-major in
// shared memory.
template <int N>
__device__ __forceinline__ void wgmma_fp8(float (&d)[N / 2], uint64_t da, uint64_t db, int accumulate);
template <>
__device__ __forceinline__ void wgmma_fp8<64>(float (&d)[32], uint64_t da, uint64_t db, int accumulate) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(accumulate));
#endif
}
template <>
__device__ __forceinline__ void wgmma_fp8<128>(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(accumulate));
#endif
}

template <int BN>
__global__ void __launch_bounds__(kF8wThreads, 1)
    grouped_fp8_wgmma_kernel(GroupedGemm g, int64_t k_chunk, float* partial) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int S = fp8_wgmma_stages<BN>(), kAcc = BN / 2;
  constexpr uint32_t kWBytes = kF8wCols * 128;
  constexpr uint32_t kStage = static_cast<uint32_t>(fp8_wgmma_stage_bytes<BN>());
  extern __shared__ __align__(128) uint8_t f8w_dyn[];
  __shared__ int64_t tile[3];  // this block's group, first row and the group's end (group -1: none)
  const int tid = threadIdx.x, wg = tid >> 7;
  const int64_t n_block = static_cast<int64_t>(blockIdx.x) * kF8wCols;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_chunk;
  const int64_t k_end = g.k < k_begin + k_chunk ? g.k : k_begin + k_chunk;
  const int64_t stages = (k_end - k_begin) / 128;  // K % 128 == 0 (grouped_fp8_fits)
  uint8_t* const f8w_smem = f8w_dyn + ((1024 - (smem_u32(f8w_dyn) & 1023)) & 1023);
  const uint32_t base = smem_u32(f8w_smem);
  float* const scales_smem = reinterpret_cast<float*>(f8w_smem + S * kStage);  // slot s at + BN s
  const uint32_t full = base + S * kStage + S * BN * 4, empty = full + 8 * S;  // barrier of slot s at + 8 s
  if (tid < 32) {
    // Tile blockIdx.y of the groups' BN-row tiles in group order (the grid's y covers an upper
    // bound of their count), so the tiles that read a group's weights run side by side.
    if (tid == 0) tile[0] = -1;
    __syncwarp();
    const int64_t y = blockIdx.y;
    int64_t before = 0;
    for (int64_t first = 0; first < g.groups && before <= y; first += 32) {
      const int64_t gi = first + tid;
      int64_t b = 0, e = 0;
      if (gi < g.groups) {
        b = g.group_offsets ? g.group_offsets[gi] : 0;
        e = g.group_offsets ? g.group_offsets[gi + 1] : g.rows;
      }
      const int64_t count = (e - b + BN - 1) / BN;
      int64_t incl = count;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int64_t v = __shfl_up_sync(0xffffffffu, incl, o);
        if (tid >= o) incl += v;
      }
      const int64_t at = before + incl - count;
      if (y >= at && y < at + count) {
        tile[0] = gi;
        tile[1] = b + (y - at) * BN;
        tile[2] = e;
      }
      before += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (tid == 0) {
      for (int i = 0; i < S; ++i) {
        mbar_init(full + 8 * i, 128);   // the copying warpgroup's threads
        mbar_init(empty + 8 * i, 256);  // the multiplying warpgroups' threads
      }
    }
  }
  __syncthreads();
  if (tile[0] < 0) return;
  const int64_t group = tile[0], row_begin = tile[1], row_end = tile[2] < row_begin + BN ? tile[2] : row_begin + BN;

  if (wg == 2) {  // ---- copies
    setmaxnreg_dec<kF8wCopyRegs>();
    // Piece i (16 bytes) of a slot's matrix is row i / 8, K bytes 16 (i % 8): a warp copies four
    // whole rows. This thread's pieces: rows prow + 16 j. Offsets in 32 bits
    // (grouped_fp8_wgmma_fits), few registers: this warpgroup runs on kF8wCopyRegs a thread.
    const int p = tid - 256, prow = p >> 3, pcol = p & 7;
    const uint32_t poff = static_cast<uint32_t>(prow * 128 + 16 * (pcol ^ (prow & 7)));
    const int w_rows = static_cast<int>(g.n - n_block < kF8wCols ? g.n - n_block : kF8wCols) - prow;
    const uint8_t* wrow = static_cast<const uint8_t*>(g.weights ? g.weights[group] : g.weight) +
                          (n_block + prow) * g.k + 16 * pcol + k_begin;
    const int64_t w_step = 16 * g.k;
    int xoff[BN / 16];  // the tile's rows of the (gathered) input, + 16 pcol; -1 past the group
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) {
      const int64_t r = row_begin + prow + 16 * j;
      xoff[j] = r < row_end ? static_cast<int>((g.x_rows ? g.x_rows[r] : r) * g.ldx + 16 * pcol) : -1;
    }
    const int64_t rs = row_begin + p;
    const int soff =
        p < BN && rs < row_end ? static_cast<int>((g.x_rows ? g.x_rows[rs] : rs) * g.lds + k_begin / 128) : -1;
    const uint8_t* xq = g.xq + k_begin;
    for (int st = 0; st < static_cast<int>(stages); ++st) {
      const int slot = st % S;
      if (st >= S) mbar_wait(empty + 8 * slot, static_cast<uint32_t>((st / S - 1) & 1));
      const int k0 = 128 * st;
      const uint32_t sw = base + slot * kStage, sx = sw + kWBytes;
#pragma unroll
      for (int j = 0; j < kF8wCols / 16; ++j)
        cp_async16_s(sw + poff + j * 2048, 16 * j < w_rows ? wrow + j * w_step + k0 : wrow, 16 * j < w_rows);
#pragma unroll
      for (int j = 0; j < BN / 16; ++j)
        cp_async16_s(sx + poff + j * 2048, xq + (xoff[j] < 0 ? 0 : xoff[j] + k0), xoff[j] >= 0);
      if (p < BN) cp_async4_ca(scales_smem + slot * BN + p, g.xscale + (soff < 0 ? 0 : soff + st), soff >= 0);
      mbar_arrive_cp_async(full + 8 * slot);
    }
    cp_async_wait<0>();
    return;
  }

  // ---- products: warpgroup wg's 64 weight rows
  setmaxnreg_inc<kF8wMathRegs>();
  const int warp = (tid >> 5) & 3, lane = tid & 31, gid = lane >> 2, quad = lane & 3;
  const int64_t n_wg = n_block + wg * 64;
  const float* scale = g.scales ? g.scales[group] : g.scale;
  // The warpgroup's 64 rows lie in one scale block row (block_out % 64 == 0).
  const float* srow = n_wg < g.n ? scale + (n_wg / g.block_out) * g.scale_stride + k_begin / 128 : nullptr;
  // Two register sets for the products: stage st + 1's run while stage st's are promoted.
  float acc[kAcc], tmp0[kAcc], tmp1[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = tmp0[i] = tmp1[i] = 0.0f;
  auto multiply = [&](int64_t st, float(&tmp)[kAcc]) {  // stage st's products into tmp, committed
    const int slot = static_cast<int>(st % S);
    mbar_wait(full + 8 * slot, static_cast<uint32_t>((st / S) & 1));
    fence_proxy_async_smem();  // the copies' writes, seen here, made visible to wgmma
    const uint32_t sa = base + slot * kStage + static_cast<uint32_t>(wg) * 64 * 128;
    const uint32_t sb = base + slot * kStage + kWBytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_fp8<BN>(tmp, wgmma_desc_sw128(sa + 32 * kk), wgmma_desc_sw128(sb + 32 * kk), kk > 0);
    wgmma_commit();
  };
  auto promote = [&](int64_t st, float(&tmp)[kAcc]) {  // stage st's products (waited for) into acc
    wgmma_settle(tmp);
    const int slot = static_cast<int>(st % S);
    const float ws = srow ? __ldg(srow + st) : 0.0f;
    // Accumulator i: weight row 16 warp + gid (+ 8 for i % 4 >= 2), tile row 8 (i / 4) + 2 quad + i % 2.
    const float* xs = scales_smem + slot * BN;
    float2 sc[BN / 8];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) sc[j] = *reinterpret_cast<const float2*>(xs + 8 * j + 2 * quad);
    mbar_arrive(empty + 8 * slot);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const float s0 = ws * sc[j].x, s1 = ws * sc[j].y;
      acc[4 * j + 0] += tmp[4 * j + 0] * s0;
      acc[4 * j + 1] += tmp[4 * j + 1] * s1;
      acc[4 * j + 2] += tmp[4 * j + 2] * s0;
      acc[4 * j + 3] += tmp[4 * j + 3] * s1;
    }
  };
  multiply(0, tmp0);
  int64_t st = 0;
  for (; st + 2 < stages; st += 2) {  // stage st's products in flight in tmp0
    multiply(st + 1, tmp1);
    wgmma_wait<1>();
    promote(st, tmp0);
    multiply(st + 2, tmp0);
    wgmma_wait<1>();
    promote(st + 1, tmp1);
  }
  if (st + 1 < stages) {
    multiply(st + 1, tmp1);
    wgmma_wait<1>();
    promote(st, tmp0);
    wgmma_wait<0>();
    promote(st + 1, tmp1);
  } else {
    wgmma_wait<0>();
    promote(st, tmp0);
  }
  // Out through shared memory, whole rows at a time: once both warpgroups are done with the ring
  // (named barrier 1: the 256 multiplying threads), warpgroup wg puts its 64 x BN tile at floats
  // [wg BN 68, (wg + 1) BN 68), row r (of the tile) at r x 68 (the pad keeps a warp's writes in
  // distinct banks), then writes each row's 64 floats to out as 16-byte pieces.
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
  constexpr int kPad = 68;
  static_assert(2 * BN * kPad * sizeof(float) <= S * kStage, "the output tiles fit in the ring");
  float* tile_out = reinterpret_cast<float*>(f8w_smem) + wg * BN * kPad;
  const int cn = 16 * warp + gid;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    const int r = 8 * j + 2 * quad;
    tile_out[r * kPad + cn] = acc[4 * j + 0];
    tile_out[(r + 1) * kPad + cn] = acc[4 * j + 1];
    tile_out[r * kPad + cn + 8] = acc[4 * j + 2];
    tile_out[(r + 1) * kPad + cn + 8] = acc[4 * j + 3];
  }
  asm volatile("bar.sync %0, 128;\n" ::"r"(2 + wg) : "memory");
  if (n_wg < g.n) {  // g.n % 64 == 0 (grouped_fp8_wgmma_fits): the warpgroup's columns are all in
    float* out = partial ? partial + static_cast<int64_t>(blockIdx.z) * g.rows * g.n : g.out;
    const int64_t ldo = partial ? g.n : g.ldo;
    const int rows = static_cast<int>(row_end - row_begin), t = tid & 127, c4 = t & 15;
    for (int r = t >> 4; r < rows; r += 8)
      *reinterpret_cast<float4*>(out + (row_begin + r) * ldo + n_wg + 4 * c4) =
          *reinterpret_cast<const float4*>(tile_out + r * kPad + 4 * c4);
  }
#endif
}

// The wgmma kernel's shapes: an sm_90a image on a 9.0 device, each warpgroup's 64 weight rows in
// one scale block row and all inside N, 16-byte aligned output rows, every group in the grid (no
// group list), and input offsets in 32 bits (the input rows, gathered or not, index rows < g.rows).
static bool grouped_fp8_wgmma_fits(const GroupedGemm& g) {
  constexpr int64_t kInt = int64_t{1} << 31;  // the copies' 32-bit offsets
  return g.group_list == nullptr && g.rows * g.ldx < kInt && g.rows * g.lds < kInt && g.n % 64 == 0 &&
         g.ldo % 4 == 0 && reinterpret_cast<uintptr_t>(g.out) % 16 == 0 && g.block_out % 64 == 0 && g.block_in == 128 && wgmma_image_here() &&
         fp8_wgmma_smem<128>() <= static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
}

template <int BN>
void launch_fp8_wgmma(const GroupedGemm& g, cudaStream_t s, int64_t splits, int64_t k_chunk, float* part) {
  constexpr size_t smem = fp8_wgmma_smem<BN>();
  static size_t allowed[kMaxDevices] = {};
  allow_dynamic_smem(grouped_fp8_wgmma_kernel<BN>, smem, allowed, "grouped_fp8");
  // y: an upper bound of the groups' BN-row tiles (the kernel finds its own).
  const dim3 grid(static_cast<unsigned>((g.n + kF8wCols - 1) / kF8wCols),
                  static_cast<unsigned>((g.rows + BN - 1) / BN + g.groups), static_cast<unsigned>(splits));
  grouped_fp8_wgmma_kernel<BN><<<grid, kF8wThreads, smem, s>>>(g, k_chunk, part);
}

// Groups of more than 64 rows on average take 128-row passes; fewer, 64-row ones.
static void grouped_fp8_wgmma(const GroupedGemm& g, cudaStream_t s, int64_t splits, int64_t k_chunk, float* part) {
  if (g.rows > 64 * g.groups) launch_fp8_wgmma<128>(g, s, splits, k_chunk, part);
  else launch_fp8_wgmma<64>(g, s, splits, k_chunk, part);
}

// The router's logits at a few tokens: logits[t, e] = x[t, :] . gate[e, :], F32. A block per
// expert: its 8 warps each hold an eighth of the row in registers (requested before the previous
// kernel's results are waited for), then dot it with every token's x and sum across the warps.
constexpr int kRouterWarps = 8, kRouterMaxF4 = 8;  // d <= 8 warps x 32 lanes x 8 float4 = 8192
__global__ void __launch_bounds__(kRouterWarps * 32) router_gemv_kernel(const float* x, int64_t t_count, int64_t d,
                                                                       const float* gate, int64_t e_count,
                                                                       float* logits) {
  __shared__ float part[kRouterWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t e = blockIdx.x;
  const int n4 = static_cast<int>(d / 4);  // float4s a row
  const float4* w = reinterpret_cast<const float4*>(gate + e * d);
  float4 wr[kRouterMaxF4];
#pragma unroll
  for (int i = 0; i < kRouterMaxF4; ++i) {
    const int j = (i * kRouterWarps + warp) * 32 + lane;
    wr[i] = j < n4 ? __ldg(w + j) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  pdl_enter();
#pragma unroll 1
  for (int64_t t = 0; t < t_count; ++t) {
    const float4* xr = reinterpret_cast<const float4*>(x + t * d);
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kRouterMaxF4; ++i) {
      const int j = (i * kRouterWarps + warp) * 32 + lane;
      if (j < n4) {
        const float4 xv = xr[j];
        s = fmaf(wr[i].x, xv.x, fmaf(wr[i].y, xv.y, fmaf(wr[i].z, xv.z, fmaf(wr[i].w, xv.w, s))));
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) part[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < kRouterWarps; ++i) sum += part[i];
      logits[t * e_count + e] = sum;
    }
    __syncthreads();
  }
}

bool router_gemv_fits(int64_t t, int64_t d, const float* x, const float* gate) {
  auto al16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return t >= 1 && t <= kRouterGemvMaxTokens && d % 4 == 0 && d <= 4 * 32 * kRouterWarps * kRouterMaxF4 && al16(x) &&
         al16(gate);
}

void router_gemv(const float* x, int64_t t, int64_t d, const float* gate, int64_t e, float* logits, void* stream) {
  if (!router_gemv_fits(t, d, x, gate)) throw std::runtime_error("router_gemv: shapes it does not take");
  launch_chained(router_gemv_kernel, static_cast<unsigned>(e), kRouterWarps * 32, 0, as_stream(stream), x, t, d, gate,
                 e, logits);
  check_launch("router_gemv");
}

void moe_select(const float* logits, const float* bias, int64_t t, int64_t e, int64_t k, int64_t n_group,
                int64_t topk_group, bool norm_topk_prob, float routed_scaling_factor, int32_t* ids, float* weights,
                void* stream) {
  if (t <= 0) return;
  if (n_group > 64) throw std::runtime_error("moe_select: more than 64 expert groups");
  if (e <= 32 * kSelectPer && n_group <= 32 && n_group > 0 && e % n_group == 0) {
    launch_chained(moe_select_warp_kernel, static_cast<unsigned>((t + kSelectWarps - 1) / kSelectWarps),
                   kSelectWarps * 32, static_cast<size_t>(kSelectWarps * 2 * e) * sizeof(float), as_stream(stream),
                   logits, bias, t, e, k, n_group, topk_group, norm_topk_prob, routed_scaling_factor, ids, weights);
    check_launch("moe_select");
    return;
  }
  launch_chained(moe_select_kernel, static_cast<unsigned>(t), 256, static_cast<size_t>(2 * e) * sizeof(float), as_stream(stream),
      logits, bias, e, k, n_group, topk_group, norm_topk_prob, routed_scaling_factor, ids, weights);
  check_launch("moe_select");
}

void moe_group(const int32_t* ids, int64_t t, int64_t k, int64_t first, int64_t local, int32_t* counters,
               int32_t* offsets, int32_t* rows, int32_t* pair_row, int32_t* group_list, int64_t group_slots,
               void* stream) {
  cudaStream_t s = as_stream(stream);
  if (cudaMemsetAsync(counters, 0, static_cast<size_t>(local) * sizeof(int32_t), s) != cudaSuccess)
    throw std::runtime_error("moe_group: cudaMemsetAsync failed");
  const int64_t pairs = t * k;
  if (pairs > 0) {
    launch_chained(moe_count_kernel, grid_for(pairs, 256), 256, 0, s, ids, pairs, first, local, counters);
    check_launch("moe_count");
  }
  launch_chained(moe_scan_kernel, 1, 1024, 0, s, counters, local, offsets, group_list, group_slots);
  check_launch("moe_scan");
  if (pairs > 0) {
    launch_chained(moe_scatter_kernel, grid_for(pairs, 256), 256, 0, s, ids, pairs, k, first, local, counters, rows, pair_row);
    check_launch("moe_scatter");
  }
}

bool moe_group_small(const int32_t* ids, int64_t t, int64_t k, int64_t first, int64_t local, int32_t* offsets,
                     int32_t* rows, int32_t* pair_row, int32_t* group_list, int64_t group_slots,
                     unsigned long long* routed, const MoeGroupQuantize& quant, void* stream) {
  const int64_t pairs = t * k;
  if (pairs > kMoeGroupSmallPairs || local > kMoeGroupSmallLocal || local <= 0 || (quant.x && quant.d % 128 != 0))
    return false;
  launch_chained(moe_group_small_kernel, 1, 1024, 0, as_stream(stream), ids, pairs, k, first, local, offsets, rows,
                 pair_row, group_list, group_slots, routed, t, quant);
  check_launch("moe_group_small");
  return true;
}

void moe_silu_mul(float* gate, const float* up, const int32_t* offsets, int64_t local, int64_t max_rows, int64_t f,
                  void* stream) {
  if (max_rows * f <= 0) return;
  launch_chained(moe_silu_mul_kernel, grid_for(max_rows * f, 256), 256, 0, as_stream(stream), gate, up, offsets, local, f);
  check_launch("moe_silu_mul");
}

void moe_silu_mul_fp8(const float* gate, const float* up, const int32_t* offsets, int64_t local, int64_t max_rows,
                      int64_t f, uint8_t* q, float* scale, void* stream) {
  if (max_rows * f <= 0) return;
  if (f % 128 != 0) throw std::runtime_error("moe_silu_mul_fp8: width " + std::to_string(f) + " is not a multiple of 128");
  const int64_t warps = max_rows * (f / 128);
  launch_chained(moe_silu_mul_fp8_kernel, static_cast<int>((warps * 32 + 255) / 256), 256, 0, as_stream(stream), 
      gate, up, offsets, local, f, reinterpret_cast<__nv_fp8_e4m3*>(q), scale);
  check_launch("moe_silu_mul_fp8");
}

void moe_combine(const float* y, const int32_t* ids, const float* weights, const int32_t* pair_row, int64_t t,
                 int64_t k, int64_t d, float* out, const float* addend, void* stream) {
  if (t <= 0) return;
  if (k > 64) throw std::runtime_error("moe_combine: more than 64 experts per token");
  const bool vec = d % 4 == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(addend) % 16 == 0;
  const int64_t per_block = vec ? 4 * 256 : 256;
  const dim3 grid(static_cast<unsigned>(t), static_cast<unsigned>((d + per_block - 1) / per_block));
  const auto kernel = vec ? moe_combine_kernel<true> : moe_combine_kernel<false>;
  launch_chained(kernel, grid, 256, 0, as_stream(stream), y, ids, weights, pair_row, k, d, out, addend);
  check_launch("moe_combine");
}

void random_fill(void* out, int dtype, int64_t n, uint64_t key, float center, float half_width, void* stream) {
  if (n <= 0) return;
  random_fill_kernel<<<grid_for(n, 256), 256, 0, as_stream(stream)>>>(out, dtype, n, key, center, half_width);
  check_launch("random_fill");
}

void count_routed_experts(const int32_t* offsets, int64_t local, unsigned long long* counter, void* stream) {
  if (local <= 0) return;
  launch_chained(count_routed_kernel, 1, 256, 0, as_stream(stream), offsets, local, counter);
  check_launch("count_routed_experts");
}

void fill_u32(void* dst, uint32_t pattern, int64_t n, void* stream) {
  if (n <= 0) return;
  fill_u32_kernel<<<grid_for(n, 256), 256, 0, as_stream(stream)>>>(static_cast<uint32_t*>(dst), pattern, n);
  check_launch("fill_u32");
}

void mla_kv_b_split(const void* w, WeightType type, const float* scale_inv, int64_t scale_stride, int64_t h,
                    int64_t nope, int64_t v, int64_t c, int64_t block_out, int64_t block_in, uint16_t* split,
                    float* split_scale, void* stream) {
  if (h <= 0) return;
  mla_kv_b_split_kernel<<<grid_for(h * (nope + v) * c, 256), 256, 0, as_stream(stream)>>>(
      w, type, scale_inv, scale_stride, h, nope, v, c, block_out, block_in, reinterpret_cast<__nv_bfloat16*>(split),
      split_scale);
  check_launch("mla_kv_b_split");
}

bool mla_split_shapes(int64_t c, int64_t v, int64_t nope, int64_t r) {
  return device_attribute(cudaDevAttrComputeCapabilityMajor) >= 8 && c % 8 == 0 && v % 8 == 0 && nope % 8 == 0 &&
         (nope + r) % 4 == 0;
}

bool mla_split_fits(const MlaArgs& a) {
  auto al16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return mla_split_shapes(a.c, a.v, a.nope, a.r) && al16(a.q) && al16(a.q_lat) && al16(a.o_lat) && al16(a.out);
}

void mla_absorb_q_split(const MlaArgs& a, const uint16_t* split, void* stream) {
  if (a.t <= 0 || a.h <= 0) return;
  SplitGemm g;
  g.a = a.q;
  g.lda = a.h * (a.nope + a.r);
  g.a_batch = a.nope + a.r;
  g.w = reinterpret_cast<const __nv_bfloat16*>(split);
  g.w_batch = (a.nope + a.v) * a.c;
  g.c = a.q_lat;
  g.ldc = a.h * a.c;
  g.c_batch = a.c;
  g.m = a.t;
  g.n = a.c;
  g.k = a.nope;
  launch_split_gemm(g, a.h, as_stream(stream));
  check_launch("mla_absorb_q_split");
}

void mla_absorb_v_split(const MlaArgs& a, const uint16_t* split, const float* split_scale, void* stream) {
  if (a.t <= 0 || a.h <= 0) return;
  SplitGemm g;
  g.a = a.o_lat;
  g.lda = a.h * a.c;
  g.a_batch = a.c;
  g.s = split_scale + a.c;
  g.s_batch = 2 * a.c;
  g.w = reinterpret_cast<const __nv_bfloat16*>(split) + a.c * a.nope;
  g.w_batch = (a.nope + a.v) * a.c;
  g.c = a.out;
  g.ldc = a.h * a.v;
  g.c_batch = a.v;
  g.m = a.t;
  g.n = a.v;
  g.k = a.c;
  launch_split_gemm(g, a.h, as_stream(stream));
  check_launch("mla_absorb_v_split");
}

// The absorptions at a few tokens (at most kMlaGemvMaxTokens) as GEMVs over kv_b's split form:
// each weight row is read once into registers and dotted with every token's activations, where
// the F32 GEMMs read kv_b in F32 (twice the bytes) and the split GEMMs' tiles are mostly empty.
// kLanes lanes hold a row, 8 BF16 values (16 bytes) per chunk, kChunks chunks; a group of lanes
// takes kRows rows and a block's rows lie in one head.
//   kV false: q_lat[t, h, j] = s_k[h, j] * sum_i W_UK^T[h][j, i] q[t, h, i]  (C rows a head, nope long)
//   kV true:  out[t, h v + i] = sum_j W_UV[h][i, j] (o_lat[t, h, j] s_v[h, j])  (v rows a head, C long)
// The weights are requested before the previous kernel's results are waited for.
template <bool kV, int kLanes, int kChunks, int kRows>
__global__ void __launch_bounds__(256, kChunks > 1 ? 3 : 4)
    mla_absorb_gemv_kernel(MlaArgs a, const uint4* split, const float* scale) {
  constexpr int kGroups = 256 / kLanes;
  const int lane = static_cast<int>(threadIdx.x) % kLanes, group = static_cast<int>(threadIdx.x) / kLanes;
  const int rows_per_head = static_cast<int>(kV ? a.v : a.c), len = static_cast<int>(kV ? a.c : a.nope);
  const int block_row = static_cast<int>(blockIdx.x) * kGroups * kRows;
  const int head = block_row / rows_per_head;
  const int row0 = block_row % rows_per_head + group * kRows;
  // The head's W_UK^T [C, nope], then its W_UV [v, C], in 16-byte chunks.
  const uint4* w = split + (static_cast<int64_t>(head) * (a.nope + a.v) * a.c + (kV ? a.c * a.nope : 0)) / 8;
  uint4 wr[kRows][kChunks];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < kChunks; ++m)
      wr[r][m] = __ldg(w + (static_cast<int64_t>(row0 + r) * len) / 8 + lane + kLanes * m);
  pdl_enter();
#pragma unroll 1
  for (int64_t t = 0; t < a.t; ++t) {
    const float* x = kV ? a.o_lat + (t * a.h + head) * a.c : a.q + (t * a.h + head) * (a.nope + a.r);
    float acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
#pragma unroll
    for (int m = 0; m < kChunks; ++m) {
      const int col = (lane + kLanes * m) * 8;
      const float4 lo = *reinterpret_cast<const float4*>(x + col), hi = *reinterpret_cast<const float4*>(x + col + 4);
      float xv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
      if (kV) {  // W_UV's scales per column, applied to o_lat as it is loaded
        const float* sp = scale + (2 * head + 1) * a.c + col;
        asm volatile("" : "+l"(sp));  // loaded per token, not held in registers across the loop
        const float4 slo = __ldg(reinterpret_cast<const float4*>(sp));
        const float4 shi = __ldg(reinterpret_cast<const float4*>(sp + 4));
        const float sc[8] = {slo.x, slo.y, slo.z, slo.w, shi.x, shi.y, shi.z, shi.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) xv[e] *= sc[e];
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        uint32_t u[4] = {wr[r][m].x, wr[r][m].y, wr[r][m].z, wr[r][m].w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          // Opaque to the compiler, so the values are widened per token, not held widened in
          // registers across the loop (twice the registers: spills, fewer blocks an SM).
          asm volatile("" : "+r"(u[e]));
          acc[r] = fmaf(__uint_as_float(u[e] << 16), xv[2 * e], acc[r]);
          acc[r] = fmaf(__uint_as_float(u[e] & 0xffff0000u), xv[2 * e + 1], acc[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float s = acc[r];
#pragma unroll
      for (int off = kLanes / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (lane == 0) {
        const int row = row0 + r;
        if (kV) a.out[t * a.h * a.v + static_cast<int64_t>(head) * a.v + row] = s;
        else a.q_lat[(t * a.h + head) * a.c + row] = s * __ldg(scale + 2 * head * a.c + row);
      }
    }
  }
}

// The rows of one chunk of lanes: a row of `len` values in kLanes * kChunks chunks of 8.
template <bool kV, int kRows>
static bool launch_absorb_gemv(const MlaArgs& a, const uint16_t* split, const float* scale, int64_t len,
                               int64_t rows_per_head, cudaStream_t s) {
  const auto* w = reinterpret_cast<const uint4*>(split);
  auto go = [&](auto kernel, int64_t lanes) {
    const int64_t rows_per_block = 256 / lanes * kRows;
    if (rows_per_head % rows_per_block != 0) return false;
    launch_chained(kernel, static_cast<unsigned>(a.h * rows_per_head / rows_per_block), 256, 0, s, a, w, scale);
    check_launch(kV ? "mla_absorb_v_gemv" : "mla_absorb_q_gemv");
    return true;
  };
  switch (len) {
    case 64: return go(mla_absorb_gemv_kernel<kV, 8, 1, kRows>, 8);
    case 128: return go(mla_absorb_gemv_kernel<kV, 16, 1, kRows>, 16);
    case 256: return go(mla_absorb_gemv_kernel<kV, 32, 1, kRows>, 32);
    case 512: return go(mla_absorb_gemv_kernel<kV, 32, 2, kRows>, 32);
    default: return false;
  }
}

bool mla_absorb_gemv_fits(const MlaArgs& a) {
  auto rows_ok = [](int64_t len, int64_t rows, int64_t k_rows) {
    const int64_t lanes = std::min<int64_t>(32, len / 8);
    return (len == 64 || len == 128 || len == 256 || len == 512) && rows % (256 / lanes * k_rows) == 0;
  };
  return a.t >= 1 && a.t <= kMlaGemvMaxTokens && mla_split_fits(a) && a.h * std::max(a.c, a.v) < (int64_t{1} << 30) &&
         rows_ok(a.nope, a.c, 4) && rows_ok(a.c, a.v, 2);
}

void mla_absorb_q_gemv(const MlaArgs& a, const uint16_t* split, const float* split_scale, void* stream) {
  if (!mla_absorb_gemv_fits(a) || !launch_absorb_gemv<false, 4>(a, split, split_scale, a.nope, a.c, as_stream(stream)))
    throw std::runtime_error("mla_absorb_q_gemv: shapes it does not take (check mla_absorb_gemv_fits)");
}

void mla_absorb_v_gemv(const MlaArgs& a, const uint16_t* split, const float* split_scale, void* stream) {
  if (!mla_absorb_gemv_fits(a) || !launch_absorb_gemv<true, 2>(a, split, split_scale, a.c, a.v, as_stream(stream)))
    throw std::runtime_error("mla_absorb_v_gemv: shapes it does not take (check mla_absorb_gemv_fits)");
}

// ---- MLA prefill in the expanded form ---------------------------------------------------------
// Keys and values per context position (k = [W_UK lat | rope key], v = W_UV lat), then attention
// with nope + R = 192 wide scores and 128 wide outputs (R1): 320 multiply-adds per head and
// position pair, against the absorbed form's 2 C + R = 1088. See mla_attention_expanded.

// expand[r] = [hi(w[r, :]) | lo(w[r, :])], hi = bf16(w), lo = bf16(w - hi).
__global__ void mla_kv_b_expand_kernel(const float* w, int64_t rows, int64_t c, __nv_bfloat16* expand) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows * c;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / c, col = i % c;
    const float x = w[i];
    const __nv_bfloat16 hi = __float2bfloat16_rn(x);
    expand[row * 2 * c + col] = hi;
    expand[row * 2 * c + c + col] = __float2bfloat16_rn(x - __bfloat162float(hi));
  }
}

// lat2[p] = [lat | lat] and rope[p] of the cache entry at slots[p], 16 bytes a thread.
__global__ void mla_gather_latent_kernel(const uint4* cache, int64_t c, int64_t r, const int32_t* slots, int64_t p,
                                         uint4* lat2, uint4* rope) {
  const int64_t w = (c + r) / 8, cw = c / 8, rw = r / 8;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p * w;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / w, col = i % w;
    const uint4 x = cache[static_cast<int64_t>(slots[row]) * w + col];
    if (col < cw) {
      lat2[row * 2 * cw + col] = x;
      lat2[row * 2 * cw + cw + col] = x;
    } else {
      rope[row * rw + col - cw] = x;
    }
  }
}

// The online softmax of a 16-row x 32-key score tile held as four m16n8 accumulator tiles:
// x[4n + e] is row r0 + 8 ((e >> 1) & 1) (pos[that]), key key0 + 8n + 2 quad + (e & 1). Masks the
// keys past each row's position, scales into log2 units, and leaves the probabilities in x, the
// rows' running maxima and (this thread's partial) sums updated, and the factors alpha by which
// the outputs must be rescaled.
__device__ __forceinline__ void mx_softmax_tile(float (&x)[16], int key0, int quad, const int (&pos)[2],
                                                float scale_log2, float (&m_run)[2], float (&l_run)[2],
                                                float (&alpha)[2]) {
  float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int e = 0; e < 16; ++e) {
    const int key = key0 + 8 * (e >> 2) + 2 * quad + (e & 1), i = (e >> 1) & 1;
    x[e] = key <= pos[i] ? x[e] * scale_log2 : -INFINITY;
    tmax[i] = fmaxf(tmax[i], x[e]);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    tmax[i] = fmaxf(tmax[i], __shfl_xor_sync(0xffffffffu, tmax[i], 1));
    tmax[i] = fmaxf(tmax[i], __shfl_xor_sync(0xffffffffu, tmax[i], 2));
    const float m_new = fmaxf(m_run[i], tmax[i]);  // finite: key 0 is in every row's first tile
    alpha[i] = exp2f(m_run[i] - m_new);
    m_run[i] = m_new;
    l_run[i] *= alpha[i];
  }
#pragma unroll
  for (int e = 0; e < 16; ++e) {
    x[e] = exp2f(x[e] - m_run[(e >> 1) & 1]);
    l_run[(e >> 1) & 1] += x[e];
  }
}

// The end of a tile of rows: each row's output (this thread's columns 8j + 2 quad, + 1 of rows
// r0 and r0 + 8, as m16n8 accumulator tiles o[4j + e]) over its softmax sum, for the rows < rows.
template <int kV>
__device__ __forceinline__ void mx_store_rows(const float (&o)[kV / 2], float (&l_run)[2], int r0, int rows,
                                              const int32_t* tile_rows, int64_t h, int64_t head, int quad,
                                              float* out) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
    l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = r0 + 8 * i;
    if (row >= rows) continue;
    const float inv = 1.0f / l_run[i];
    float* dst = out + static_cast<int64_t>(tile_rows[row]) * h * kV + head * kV + 2 * quad;
#pragma unroll
    for (int j = 0; j < kV / 8; ++j)
      *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
  }
}

// One block: up to kMxRows query rows of one sequence (a tile: MlaExpandedArgs::tiles) and one
// head; a warp per 16 rows. Keys and values come kMxKeys positions a tile: loaded as F32 into
// registers a tile ahead, cut into BF16 hi + lo and stored to the other of two shared-memory
// buffers while this one is multiplied (one barrier a tile). mma.sync m16n8k16
// with F32 sums, each product as hi * hi + hi * lo + lo * hi (the rope keys, BF16 in the cache,
// have no lo part), so scores and outputs keep F32's accuracy to about 2^-16 as the absorbed
// cores' do. Online softmax in registers, FlashAttention-2 style.
constexpr int kMxRows = static_cast<int>(kMlaExpandedRows), kMxKeys = 32;
constexpr int kMxThreads = 2 * kMxRows;  // a warp per 16 rows

template <int kNope, int kR, int kV>
struct MxLayout {
  static constexpr int kQk = kNope + kR, kQkP = kQk + 8, kNopeP = kNope + 8, kVP = kV + 8;
  static constexpr int kQh = 0, kQl = kQh + kMxRows * kQkP, kKh = kQl + kMxRows * kQkP, kKl = kKh + kMxKeys * kQkP,
                       kVh = kKl + kMxKeys * kNopeP, kVl = kVh + kMxKeys * kVP, kBuf = kVl + kMxKeys * kVP - kKh,
                       kEnd = kKh + 2 * kBuf;  // two buffers of keys and values
  static constexpr size_t kBytes = static_cast<size_t>(kEnd) * 2;
  static constexpr int kKvF4 = kMxKeys * (kNope + kV) / 4 / kMxThreads;  // float4 loads a thread and tile
  static constexpr int kRopeU4 = (kMxKeys * kR / 8 + kMxThreads - 1) / kMxThreads;
  static_assert(kMxKeys * (kNope + kV) / 4 % kMxThreads == 0, "whole float4 loads a thread");
  static_assert(kNope % 16 == 0 && kR % 16 == 0 && kV % 16 == 0, "whole MMA steps");
};

template <int kNope, int kR, int kV>
__global__ void __launch_bounds__(kMxThreads, 1) mla_expanded_kernel(MlaExpandedArgs a) {
  using L = MxLayout<kNope, kR, kV>;
  constexpr int kQk = L::kQk;
  extern __shared__ __align__(16) __nv_bfloat16 mx_smem[];
  __nv_bfloat16* qh = mx_smem + L::kQh;
  __nv_bfloat16* ql = mx_smem + L::kQl;
  __nv_bfloat16* const kh = mx_smem + L::kKh;  // buffer 0; buffer 1 is L::kBuf elements on
  __nv_bfloat16* const kl = mx_smem + L::kKl;
  __nv_bfloat16* const vh = mx_smem + L::kVh;
  __nv_bfloat16* const vl = mx_smem + L::kVl;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int4 tile = reinterpret_cast<const int4*>(a.tiles)[blockIdx.x];
  const int row0 = tile.x, rows = tile.y, kv_len = tile.w;
  const int64_t kv0 = tile.z;
  const int64_t head = a.h0 + blockIdx.y, hg_col = static_cast<int64_t>(blockIdx.y) * (kNope + kV);
  const int64_t kv_ld = a.hg * (kNope + kV);

  // The queries, hi and lo; rows past the tile are zeros.
  for (int i = tid; i < kMxRows * kQk / 4; i += kMxThreads) {
    const int row = i / (kQk / 4), col = 4 * (i % (kQk / 4));
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row < rows) {
      const int64_t tok = a.rows[row0 + row];
      x = *reinterpret_cast<const float4*>(a.q + (tok * a.h + head) * kQk + col);
    }
    uint32_t h0, l0, h1, l1;
    split_bf16x2(x.x, x.y, h0, l0);
    split_bf16x2(x.z, x.w, h1, l1);
    *reinterpret_cast<uint2*>(qh + row * L::kQkP + col) = make_uint2(h0, h1);
    *reinterpret_cast<uint2*>(ql + row * L::kQkP + col) = make_uint2(l0, l1);
  }
  // Each thread's two rows (g and g + 8 of its warp's 16) and their positions; rows past the
  // tile take the last row's position (their outputs are not stored).
  int pos[2];
  for (int i = 0; i < 2; ++i) {
    const int row = min(warp * 16 + g + 8 * i, rows - 1);
    pos[i] = a.token_pos[a.rows[row0 + row]];
  }
  const int warp_last = a.token_pos[a.rows[row0 + min(warp * 16 + 15, rows - 1)]];
  int warp_max = warp_last;
  for (int i = 0; i < 16; ++i) warp_max = max(warp_max, a.token_pos[a.rows[row0 + min(warp * 16 + i, rows - 1)]]);

  float4 kv_reg[L::kKvF4];
  uint4 rope_reg[L::kRopeU4];
  auto load_tile = [&](int key0) {
#pragma unroll
    for (int j = 0; j < L::kKvF4; ++j) {
      const int i = tid + j * kMxThreads, key = i / ((kNope + kV) / 4), col = 4 * (i % ((kNope + kV) / 4));
      kv_reg[j] = key0 + key < kv_len
                      ? *reinterpret_cast<const float4*>(a.kv + (kv0 + key0 + key) * kv_ld + hg_col + col)
                      : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int j = 0; j < L::kRopeU4; ++j) {
      const int i = tid + j * kMxThreads, key = i / (kR / 8), col = 8 * (i % (kR / 8));
      rope_reg[j] = key < kMxKeys && key0 + key < kv_len
                        ? *reinterpret_cast<const uint4*>(a.rope + (kv0 + key0 + key) * kR + col)
                        : make_uint4(0, 0, 0, 0);
    }
  };
  auto store_tile = [&](int buf) {
    const int b = buf * L::kBuf;
#pragma unroll
    for (int j = 0; j < L::kKvF4; ++j) {
      const int i = tid + j * kMxThreads, key = i / ((kNope + kV) / 4), col = 4 * (i % ((kNope + kV) / 4));
      uint32_t h0, l0, h1, l1;
      split_bf16x2(kv_reg[j].x, kv_reg[j].y, h0, l0);
      split_bf16x2(kv_reg[j].z, kv_reg[j].w, h1, l1);
      if (col < kNope) {
        *reinterpret_cast<uint2*>(kh + b + key * L::kQkP + col) = make_uint2(h0, h1);
        *reinterpret_cast<uint2*>(kl + b + key * L::kNopeP + col) = make_uint2(l0, l1);
      } else {
        *reinterpret_cast<uint2*>(vh + b + key * L::kVP + col - kNope) = make_uint2(h0, h1);
        *reinterpret_cast<uint2*>(vl + b + key * L::kVP + col - kNope) = make_uint2(l0, l1);
      }
    }
#pragma unroll
    for (int j = 0; j < L::kRopeU4; ++j) {
      const int i = tid + j * kMxThreads, key = i / (kR / 8), col = 8 * (i % (kR / 8));
      if (key < kMxKeys) *reinterpret_cast<uint4*>(kh + b + key * L::kQkP + kNope + col) = rope_reg[j];
    }
  };

  constexpr int kOT = kV / 8;  // output n-tiles
  float o[4 * kOT];  // m16n8 accumulator tiles: o[4n + e]
#pragma unroll
  for (int i = 0; i < 4 * kOT; ++i) o[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const float scale_log2 = a.scale * 1.4426950408889634f;

  // ldmatrix lane addresses (shared-space bytes): A (queries) rows lane % 16 of the warp, 8
  // columns further for lanes 16..31; B (keys) rows of 8 keys (+8 for lanes 16..31), 8 columns
  // further for lanes 8..15 and 24..31; V (transposed) keys lane % 16, 8 columns further for
  // lanes 16..31.
  const uint32_t a_off = static_cast<uint32_t>(((warp * 16 + lane % 16) * L::kQkP + (lane / 16) * 8) * 2);
  const int b_key = (lane & 7) + ((lane >> 4) << 3), b_col = ((lane >> 3) & 1) * 8;
  const uint32_t qh_s = smem_u32(qh) + a_off, ql_s = smem_u32(ql) + a_off;
  const uint32_t kh_s = smem_u32(kh) + static_cast<uint32_t>((b_key * L::kQkP + b_col) * 2);
  const uint32_t kl_s = smem_u32(kl) + static_cast<uint32_t>((b_key * L::kNopeP + b_col) * 2);
  const uint32_t v_off = static_cast<uint32_t>(((lane & 15) * L::kVP + (lane >> 4) * 8) * 2);
  const uint32_t vh_s = smem_u32(vh) + v_off, vl_s = smem_u32(vl) + v_off;

  const int n_tiles = (kv_len + kMxKeys - 1) / kMxKeys;
  load_tile(0);
  store_tile(0);
  __syncthreads();  // the queries and the first tile
  for (int it = 0; it < n_tiles; ++it) {
    const int key0 = it * kMxKeys;
    const uint32_t boff = static_cast<uint32_t>((it & 1) * L::kBuf * 2);
    if (it + 1 < n_tiles) load_tile(key0 + kMxKeys);
    if (key0 <= warp_max) {  // else every key of this tile is past the warp's rows
      // Scores: 16 rows x 32 keys, s[4n + e] as m16n8 accumulator tile n.
      float s[16];
#pragma unroll
      for (int e = 0; e < 16; ++e) s[e] = 0.f;
#pragma unroll 2
      for (int ks = 0; ks < kQk / 16; ++ks) {
        uint32_t ah[4], al[4];
        ldmatrix_x4<false>(qh_s + ks * 32, ah[0], ah[1], ah[2], ah[3]);
        ldmatrix_x4<false>(ql_s + ks * 32, al[0], al[1], al[2], al[3]);
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          float* s0 = s + 8 * np;
          float* s1 = s0 + 4;
          uint32_t bh[4];
          ldmatrix_x4<false>(kh_s + boff + static_cast<uint32_t>((np * 16 * L::kQkP + ks * 16) * 2), bh[0], bh[1],
                             bh[2], bh[3]);
          mma_bf16_16816(s0, ah[0], ah[1], ah[2], ah[3], bh[0], bh[1]);
          mma_bf16_16816(s1, ah[0], ah[1], ah[2], ah[3], bh[2], bh[3]);
          mma_bf16_16816(s0, al[0], al[1], al[2], al[3], bh[0], bh[1]);
          mma_bf16_16816(s1, al[0], al[1], al[2], al[3], bh[2], bh[3]);
          if (ks < kNope / 16) {
            uint32_t bl[4];
            ldmatrix_x4<false>(kl_s + boff + static_cast<uint32_t>((np * 16 * L::kNopeP + ks * 16) * 2), bl[0], bl[1],
                               bl[2], bl[3]);
            mma_bf16_16816(s0, ah[0], ah[1], ah[2], ah[3], bl[0], bl[1]);
            mma_bf16_16816(s1, ah[0], ah[1], ah[2], ah[3], bl[2], bl[3]);
          }
        }
      }
      float alpha[2];
      mx_softmax_tile(s, key0, t4, pos, scale_log2, m_run, l_run, alpha);
#pragma unroll
      for (int i = 0; i < 4 * kOT; ++i) o[i] *= alpha[(i >> 1) & 1];
      // Outputs: probabilities (A, from the score registers) times values, 16 keys a step.
#pragma unroll
      for (int kk = 0; kk < kMxKeys / 16; ++kk) {
        uint32_t ph[4], pl[4];
#pragma unroll
        for (int f = 0; f < 4; ++f) split_bf16x2(s[8 * kk + 2 * f], s[8 * kk + 2 * f + 1], ph[f], pl[f]);
#pragma unroll
        for (int np = 0; np < kOT / 2; ++np) {
          const uint32_t off = static_cast<uint32_t>((kk * 16 * L::kVP + np * 16) * 2);
          uint32_t bh[4], bl[4];
          ldmatrix_x4<true>(vh_s + boff + off, bh[0], bh[1], bh[2], bh[3]);
          ldmatrix_x4<true>(vl_s + boff + off, bl[0], bl[1], bl[2], bl[3]);
          float* o0 = o + 8 * np;
          float* o1 = o0 + 4;
          mma_bf16_16816(o0, ph[0], ph[1], ph[2], ph[3], bh[0], bh[1]);
          mma_bf16_16816(o1, ph[0], ph[1], ph[2], ph[3], bh[2], bh[3]);
          mma_bf16_16816(o0, ph[0], ph[1], ph[2], ph[3], bl[0], bl[1]);
          mma_bf16_16816(o1, ph[0], ph[1], ph[2], ph[3], bl[2], bl[3]);
          mma_bf16_16816(o0, pl[0], pl[1], pl[2], pl[3], bh[0], bh[1]);
          mma_bf16_16816(o1, pl[0], pl[1], pl[2], pl[3], bh[2], bh[3]);
        }
      }
    }
    // The next tile into the other buffer, whose last readers (tile it - 1) passed the barrier
    // before this tile.
    if (it + 1 < n_tiles) store_tile((it + 1) & 1);
    __syncthreads();
  }
  mx_store_rows<kV>(o, l_run, warp * 16 + g, rows, a.rows + row0, a.h, head, t4, a.out);
}

// ---- The same attention on Hopper wgmma (R1's widths, sm_90a) ----
// Block: the same tile of 128 query rows and one head, three warpgroups. Warpgroup 2 copies the
// keys and values (F32 from the expansion, cut into hi + lo as it stores them; the rope keys as
// they are) into a ring of kMxwStages stages with a "full" and an "empty" mbarrier each.
// Warpgroups 0 and 1 each take 64 of the rows: scores by wgmma m64n32k16 with the queries and the
// keys from shared memory (hi * hi + lo * hi + hi * lo: 32 a tile), the softmax in registers,
// then the outputs by wgmma m64n128k16 with the probabilities (hi, lo) as A from registers and the
// values (hi, lo) as an N-major B (6 a tile). The two multiplying warpgroups run apart; each
// waits for its own products only.
// Operands are in the no-swizzle core-matrix layout (8 rows x 16 bytes, 128 contiguous bytes):
// element (row, k) of a matrix with C 8-column chunks at (row / 8) * C * 128 + (k / 8) * 128 +
// (row % 8) * 16 + (k % 8) * 2.
constexpr int kMxwKeys = 32, kMxwStages = 3, kMxwThreads = 384;
constexpr uint32_t kMxwQGroup = 24 * 128, kMxwQBytes = 128 / 8 * kMxwQGroup;  // 192 dims; 128 rows
constexpr uint32_t kMxwKhGroup = 24 * 128, kMxwNGroup = 16 * 128;             // keys 192 wide; 128 wide
// The keys' lo parts (nope only) as 8-row groups of the same 192-wide pitch right after the hi
// parts: rows 32..63 of one 64-row B, so that one m64n64k16 multiplies the queries' hi part with
// both.
constexpr uint32_t kMxwKh = 0, kMxwKl = kMxwKh + 4 * kMxwKhGroup, kMxwVh = kMxwKl + 4 * kMxwKhGroup,
                   kMxwVl = kMxwVh + 4 * kMxwNGroup, kMxwStage = kMxwVl + 4 * kMxwNGroup;
constexpr size_t kMxwSmem = 2 * kMxwQBytes + kMxwStages * kMxwStage + 2 * kMxwStages * 8;
static_assert(kMxRows == 128 && kMxwKeys == kMxKeys, "two multiplying warpgroups of 64 rows; the same key tiles");

// D (64 x 64, F32, += unless !accumulate) = A (64 x 16) . B (16 x 64), both K-major in shared memory.
__device__ __forceinline__ void wgmma_m64n64k16_tn(float (&d)[32], uint64_t da, uint64_t db, int accumulate) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(accumulate));
#endif
}
// D (64 x 128, F32, +=) = A (64 x 16, BF16 from registers: mma.m16n8k16's A fragment for the
// warp's 16 rows) . B (16 x 128, N-major in shared memory).
__device__ __forceinline__ void wgmma_m64n128k16_rs_nt(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
#endif
}

__global__ void __launch_bounds__(kMxwThreads, 1) mla_expanded_wgmma_kernel(MlaExpandedArgs a) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(128) unsigned char mxw_smem[];
  const int tid = static_cast<int>(threadIdx.x), wg = tid >> 7, wq = (tid >> 5) & 3, lane = tid & 31;
  const int gid = lane >> 2, quad = lane & 3;
  const int4 tile = reinterpret_cast<const int4*>(a.tiles)[blockIdx.x];
  const int row0 = tile.x, rows = tile.y, kv_len = tile.w;
  const int64_t kv0 = tile.z;
  const int64_t head = a.h0 + blockIdx.y, hg_col = static_cast<int64_t>(blockIdx.y) * 256, kv_ld = a.hg * 256;
  const uint32_t q_hi = smem_u32(mxw_smem), q_lo = q_hi + kMxwQBytes, stages = q_hi + 2 * kMxwQBytes;
  const uint32_t full = stages + kMxwStages * kMxwStage, empty = full + 8 * kMxwStages;
  const int n_tiles = (kv_len + kMxwKeys - 1) / kMxwKeys;

  // The queries, hi and lo: piece i (8 dims of a row) at byte 16 i, row 8 (i / 192) + i % 8.
  for (int i = tid; i < 128 * 24; i += kMxwThreads) {
    const int rest = i >> 3, row = (rest / 24) * 8 + (i & 7), chunk = rest % 24;
    float4 x0 = make_float4(0.f, 0.f, 0.f, 0.f), x1 = x0;
    if (row < rows) {
      const float* src = a.q + (static_cast<int64_t>(a.rows[row0 + row]) * a.h + head) * 192 + 8 * chunk;
      x0 = *reinterpret_cast<const float4*>(src);
      x1 = *reinterpret_cast<const float4*>(src + 4);
    }
    uint4 hi, lo;
    split_bf16x2(x0.x, x0.y, hi.x, lo.x);
    split_bf16x2(x0.z, x0.w, hi.y, lo.y);
    split_bf16x2(x1.x, x1.y, hi.z, lo.z);
    split_bf16x2(x1.z, x1.w, hi.w, lo.w);
    *reinterpret_cast<uint4*>(mxw_smem + 16 * i) = hi;
    *reinterpret_cast<uint4*>(mxw_smem + kMxwQBytes + 16 * i) = lo;
  }
  if (tid == 0)
    for (int i = 0; i < kMxwStages; ++i) {
      mbar_init(full + 8 * i, 128);   // the copying warpgroup's threads
      mbar_init(empty + 8 * i, 256);  // the multiplying warpgroups' threads
    }
  fence_proxy_async_smem();
  __syncthreads();

  if (wg == 2) {  // ---- copies
    const int p = tid - 256;
    for (int it = 0; it < n_tiles; ++it) {
      const int sidx = it % kMxwStages, key0 = it * kMxwKeys;
      if (it >= kMxwStages) mbar_wait(empty + 8 * sidx, static_cast<uint32_t>((it / kMxwStages - 1) & 1));
      unsigned char* st = mxw_smem + 2 * kMxwQBytes + sidx * kMxwStage;
      // Item i: 8 columns (chunk, 0..15 keys' nope part, 16..31 values) of key 8 grp + i % 8; a
      // warp's 32 items are 4 neighbouring chunks of 8 keys (8 rows of 128 bytes to load, 4 core
      // matrices to store). With 32 keys a warp, each load instruction touched 32 rows: the L1's
      // wavefronts were the limit (L1/TEX 85% busy).
      float4 x[8][2];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int i = p + 128 * j, h = i >> 5, key = (h & 3) * 8 + (i & 7), chunk = 4 * (h >> 2) + ((i >> 3) & 3);
        if (key0 + key < kv_len) {
          const float* src = a.kv + (kv0 + key0 + key) * kv_ld + hg_col + 8 * chunk;
          x[j][0] = *reinterpret_cast<const float4*>(src);
          x[j][1] = *reinterpret_cast<const float4*>(src + 4);
        } else {
          x[j][0] = x[j][1] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
      }
      uint4 rp[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int i = p + 128 * j, h = i >> 5, key = (h & 3) * 8 + (i & 7), chunk = 4 * (h >> 2) + ((i >> 3) & 3);
        rp[j] = key0 + key < kv_len ? *reinterpret_cast<const uint4*>(a.rope + (kv0 + key0 + key) * 64 + 8 * chunk)
                                    : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int i = p + 128 * j, h = i >> 5, grp = h & 3, chunk = 4 * (h >> 2) + ((i >> 3) & 3), r8 = (i & 7) * 16;
        uint4 hi, lo;
        split_bf16x2(x[j][0].x, x[j][0].y, hi.x, lo.x);
        split_bf16x2(x[j][0].z, x[j][0].w, hi.y, lo.y);
        split_bf16x2(x[j][1].x, x[j][1].y, hi.z, lo.z);
        split_bf16x2(x[j][1].z, x[j][1].w, hi.w, lo.w);
        if (chunk < 16) {
          *reinterpret_cast<uint4*>(st + kMxwKh + grp * kMxwKhGroup + chunk * 128 + r8) = hi;
          *reinterpret_cast<uint4*>(st + kMxwKl + grp * kMxwKhGroup + chunk * 128 + r8) = lo;
        } else {
          *reinterpret_cast<uint4*>(st + kMxwVh + grp * kMxwNGroup + (chunk - 16) * 128 + r8) = hi;
          *reinterpret_cast<uint4*>(st + kMxwVl + grp * kMxwNGroup + (chunk - 16) * 128 + r8) = lo;
        }
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int i = p + 128 * j, h = i >> 5, grp = h & 3, chunk = 4 * (h >> 2) + ((i >> 3) & 3), r8 = (i & 7) * 16;
        *reinterpret_cast<uint4*>(st + kMxwKh + grp * kMxwKhGroup + (16 + chunk) * 128 + r8) = rp[j];
      }
      fence_proxy_async_smem();
      mbar_arrive(full + 8 * sidx);
    }
    return;
  }

  // ---- products: this warpgroup's rows 64 wg .. 64 wg + 63; this thread's r0 and r0 + 8
  const int r0 = 64 * wg + 16 * wq + gid;
  int pos[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) pos[i] = a.token_pos[a.rows[row0 + min(r0 + 8 * i, rows - 1)]];
  // The tile's rows are in position order: the warpgroup's last row has its largest position.
  const int wg_max = a.token_pos[a.rows[row0 + min(64 * wg + 63, rows - 1)]];
  const bool any_rows = 64 * wg < rows;
  const uint64_t dq_hi = wgmma_desc(q_hi + static_cast<uint32_t>(wg) * 8 * kMxwQGroup, 128, kMxwQGroup);
  const uint64_t dq_lo = wgmma_desc(q_lo + static_cast<uint32_t>(wg) * 8 * kMxwQGroup, 128, kMxwQGroup);
  const float scale_log2 = a.scale * 1.4426950408889634f;
  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  for (int it = 0; it < n_tiles; ++it) {
    const int sidx = it % kMxwStages, key0 = it * kMxwKeys;
    mbar_wait(full + 8 * sidx, static_cast<uint32_t>((it / kMxwStages) & 1));
    const uint32_t st = stages + static_cast<uint32_t>(sidx) * kMxwStage;
    if (any_rows && key0 <= wg_max) {  // else every key of the tile is past this warpgroup's rows
      float sc[16];
      {  // Two chains: the queries' hi part against the keys' hi and lo parts (nope, one
         // m64n64k16 a step), and the rest (lo queries against hi keys, the rope steps).
        float s2[32], s1[16];
        const uint64_t dk = wgmma_desc(st + kMxwKh, 128, kMxwKhGroup);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < 12; ++ks) {
          if (ks < 8) wgmma_m64n64k16_tn(s2, dq_hi + 16 * ks, dk + 16 * ks, ks > 0 ? 1 : 0);
          else wgmma_m64n32k16_tn(s1, dq_hi + 16 * ks, dk + 16 * ks, 1);
          wgmma_m64n32k16_tn(s1, dq_lo + 16 * ks, dk + 16 * ks, ks > 0 ? 1 : 0);
        }
        wgmma_commit();
        wgmma_wait_all();
        wgmma_settle(s2);
        wgmma_settle(s1);
#pragma unroll
        for (int e = 0; e < 16; ++e) sc[e] = (s2[e] + s2[16 + e]) + s1[e];
      }
      // sc[4j + 0, 1]: row r0, keys key0 + 8j + 2 quad (+1); sc[4j + 2, 3]: row r0 + 8.
      float alpha[2];
      mx_softmax_tile(sc, key0, quad, pos, scale_log2, m_run, l_run, alpha);
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        o[4 * j] *= alpha[0];
        o[4 * j + 1] *= alpha[0];
        o[4 * j + 2] *= alpha[1];
        o[4 * j + 3] *= alpha[1];
      }
      uint32_t ph[2][4], pl[2][4];
#pragma unroll
      for (int kk = 0; kk < 2; ++kk)
#pragma unroll
        for (int f = 0; f < 4; ++f) split_bf16x2(sc[8 * kk + 2 * f], sc[8 * kk + 2 * f + 1], ph[kk][f], pl[kk][f]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        const uint32_t v = st + static_cast<uint32_t>(2 * kk) * kMxwNGroup;
        const uint64_t dv_hi = wgmma_desc(v + kMxwVh, kMxwNGroup, 128), dv_lo = wgmma_desc(v + kMxwVl, kMxwNGroup, 128);
        wgmma_m64n128k16_rs_nt(o, ph[kk], dv_hi);
        wgmma_m64n128k16_rs_nt(o, ph[kk], dv_lo);
        wgmma_m64n128k16_rs_nt(o, pl[kk], dv_hi);
      }
      wgmma_commit();
      wgmma_wait_all();
      wgmma_settle(o);
    }
    mbar_arrive(empty + 8 * sidx);
  }
  mx_store_rows<128>(o, l_run, r0, rows, a.rows + row0, a.h, head, quad, a.out);
#endif
}

void mla_kv_b_expand(const float* w, int64_t rows, int64_t c, uint16_t* expand, void* stream) {
  if (rows <= 0 || c <= 0) return;
  mla_kv_b_expand_kernel<<<grid_for(rows * c, 256), 256, 0, as_stream(stream)>>>(
      w, rows, c, reinterpret_cast<__nv_bfloat16*>(expand));
  check_launch("mla_kv_b_expand");
}

void mla_gather_latent(const uint16_t* cache, int64_t c, int64_t r, const int32_t* slots, int64_t p, uint16_t* lat2,
                       uint16_t* rope, void* stream) {
  if (p <= 0) return;
  mla_gather_latent_kernel<<<grid_for(p * (c + r) / 8, 256), 256, 0, as_stream(stream)>>>(
      reinterpret_cast<const uint4*>(cache), c, r, slots, p, reinterpret_cast<uint4*>(lat2),
      reinterpret_cast<uint4*>(rope));
  check_launch("mla_gather_latent");
}

bool mla_expanded_shapes(int64_t nope, int64_t r, int64_t v, int64_t c) {
  return device_attribute(cudaDevAttrComputeCapabilityMajor) >= 8 && c % 8 == 0 &&
         ((nope == 128 && r == 64 && v == 128) || (nope == 32 && r == 16 && v == 32));
}

template <int kNope, int kR, int kV>
void launch_mla_expanded(const MlaExpandedArgs& a, cudaStream_t s) {
  static size_t allowed[kMaxDevices] = {};
  const size_t smem = MxLayout<kNope, kR, kV>::kBytes;
  allow_dynamic_smem(mla_expanded_kernel<kNope, kR, kV>, smem, allowed, "mla_expanded");
  mla_expanded_kernel<kNope, kR, kV><<<dim3(static_cast<unsigned>(a.n_tiles), static_cast<unsigned>(a.hg)),
                                       kMxThreads, smem, s>>>(a);
}

// DILU_MLA_EXPANDED=mma keeps R1's widths on the mma.sync kernel, for measuring.
bool mla_expanded_wgmma_here(const MlaExpandedArgs& a) {
  static const bool mma = [] {
    const char* v = std::getenv("DILU_MLA_EXPANDED");
    return v != nullptr && std::string(v) == "mma";
  }();
  return !mma && a.nope == 128 && a.r == 64 && a.v == 128 && wgmma_image_here() &&
         kMxwSmem <= static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
}

void mla_attention_expanded(const MlaExpandedArgs& a, void* stream) {
  if (a.n_tiles <= 0 || a.hg <= 0) return;
  if (mla_expanded_wgmma_here(a)) {
    static size_t allowed[kMaxDevices] = {};
    allow_dynamic_smem(mla_expanded_wgmma_kernel, kMxwSmem, allowed, "mla_expanded_wgmma");
    mla_expanded_wgmma_kernel<<<dim3(static_cast<unsigned>(a.n_tiles), static_cast<unsigned>(a.hg)), kMxwThreads,
                                kMxwSmem, as_stream(stream)>>>(a);
  } else if (a.nope == 128 && a.r == 64 && a.v == 128) launch_mla_expanded<128, 64, 128>(a, as_stream(stream));
  else if (a.nope == 32 && a.r == 16 && a.v == 32) launch_mla_expanded<32, 16, 32>(a, as_stream(stream));
  else throw std::runtime_error("mla_attention_expanded: widths not built (mla_expanded_shapes)");
  check_launch("mla_attention_expanded");
}

}  // namespace dilu::cuda
