// How fast can the decode GEMV's copy structure read a weight matrix, and what do its products
// cost? A stand-alone probe of grouped_fp8_stream_kernel's loop (kernels/cuda/kernels.cu): blocks
// of 4 warps, each warp streaming 16 weight rows through its own ring of S stages of 128 bytes a
// row in shared memory, filled by cp.async S - 1 stages ahead. Nothing is multiplied unless asked:
//   stream        the copies only (each stage's bytes XORed into a register);
//   mma+x         the product's work without its scales: one activation row's stage copied
//                 through L1 too, and the stage's m16n8k32 FP8 products;
//   mma+x+scales  with the weight and activation scales loaded by __ldg after the products and
//                 the promotion of the sums, as the kernel did in session 29.
// Layouts: row (the weights as stored, row-major) or tiled (each warp's 16 x 128-byte stage one
// contiguous 2 KB tile). Grids: a block per 64 columns times `splits` of K, or persistent (every
// resident block slot, each warp a contiguous run of the (16 rows, 128 K) units).
// Each case is timed over 21 launches, rotating over copies of the matrix in a 1 GiB buffer so
// that no launch reads another's bytes from L2, against the device copy bandwidth (read + write of
// 1 GiB, as `dilu bench` measures it).
// Usage: dilu_stream_probe [layouts|residency|compute]
// Results: docs/device-runs/2026-11-24-h100-session29.log, sections 2-4.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

#define PROBE_CHECK(x)                                                                     \
  do {                                                                                     \
    const cudaError_t e = (x);                                                             \
    if (e != cudaSuccess) {                                                                \
      std::fprintf(stderr, "dilu_stream_probe: %s: %s\n", #x, cudaGetErrorString(e));      \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

constexpr int kWarps = 4;
enum Mode { kStream = 0, kMmaScales = 1, kMma = 2 };

__device__ __forceinline__ void cp16(uint32_t s, const void* g, bool hint) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (hint) asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;\n" ::"r"(s), "l"(g));
  else asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(g));
#endif
}
__device__ __forceinline__ void cp16_ca(uint32_t s, const void* g, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(g), "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void wait_groups() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
__device__ __forceinline__ void mma_fp8(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                        uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}
__device__ __forceinline__ int piece_at(int r, int p) { return 16 * (p ^ ((r & 1) << 2)); }

struct Inputs {
  const uint8_t* xq;  // one activation row (FP8), K bytes
  const float* xs;    // its scales, K / 128
  const float* ws;    // the weights' scales, [N / 128, K / 128]
};

// tiled: each (16 rows, 128 K) unit contiguous; splits: K chunks a column block (grid z);
// persistent: every warp a contiguous run of units (the grid is the resident slots).
template <int S, bool kTiled, bool kHint, int kMode>
__global__ void __launch_bounds__(kWarps * 32)
    probe_kernel(const uint8_t* w, int64_t n, int64_t k, int persistent, Inputs in, unsigned* sink) {
  constexpr int kStage = kMode == kStream ? 2048 : 3072;  // 16 weight rows, then 8 activation rows
  extern __shared__ __align__(128) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint8_t* ring = smem + warp * S * kStage;
  const int64_t kb_total = k / 128, tiles = n / 16;
  int64_t u_begin, u_end;
  if (persistent) {
    const int64_t g = static_cast<int64_t>(blockIdx.x) * kWarps + warp, all = static_cast<int64_t>(gridDim.x) * kWarps;
    u_begin = g * tiles * kb_total / all;
    u_end = (g + 1) * tiles * kb_total / all;
  } else {
    const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
    if (tile >= tiles) return;
    const int64_t chunk = (kb_total + gridDim.z - 1) / gridDim.z;
    const int64_t kb0 = blockIdx.z * chunk, kb1 = kb0 + chunk < kb_total ? kb0 + chunk : kb_total;
    u_begin = tile * kb_total + kb0;
    u_end = tile * kb_total + kb1;
  }
  const int piece = lane & 7, row0 = lane >> 3;
  auto issue = [&](int64_t u) {
    if (u < u_end) {
      const int64_t tile = u / kb_total, kb = u % kb_total;
      const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(ring + (u % S) * kStage));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = row0 + 4 * j;
        const uint8_t* src = kTiled ? w + (tile * kb_total + kb) * 2048 + r * 128 + 16 * piece
                                    : w + (tile * 16 + r) * k + kb * 128 + 16 * piece;
        cp16(s + r * 128 + piece_at(r, piece), src, kHint);
      }
      if (kMode != kStream) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int r = row0 + 4 * j;
          cp16_ca(s + 2048 + r * 128 + piece_at(r, piece), r < 1 ? in.xq + kb * 128 + 16 * piece : in.xq, r < 1);
        }
      }
    }
    commit();
  };
  for (int i = 0; i < S - 1; ++i) issue(u_begin + i);
  unsigned bits = 0;
  float part[4] = {0, 0, 0, 0}, acc[4] = {0, 0, 0, 0};
  for (int64_t u = u_begin; u < u_end; ++u) {
    issue(u + S - 1);
    wait_groups<S - 1>();
    __syncwarp();
    const uint8_t* slot = ring + (u % S) * kStage;
    if (kMode == kStream) {
      const uint4 v = *reinterpret_cast<const uint4*>(slot + lane * 64);
      bits ^= v.x + v.y * 3 + v.z * 5 + v.w * 7;
    } else {
      const int gid = lane >> 2, quad = lane & 3;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int p = 4 * half + quad;
        const uint4 wa = *reinterpret_cast<const uint4*>(slot + gid * 128 + piece_at(gid, p));
        const uint4 wb = *reinterpret_cast<const uint4*>(slot + (gid + 8) * 128 + piece_at(gid, p));
        const uint4 xv = *reinterpret_cast<const uint4*>(slot + 2048 + gid * 128 + piece_at(gid, p));
        mma_fp8(part, wa.x, wb.x, wa.y, wb.y, xv.x, xv.y);
        mma_fp8(part, wa.z, wb.z, wa.w, wb.w, xv.z, xv.w);
      }
      const int64_t kb = u % kb_total;
      const float wsc = kMode == kMma ? 1.0f : __ldg(in.ws + (u / kb_total) / 8 * kb_total + kb);
      const float xsc = kMode == kMma ? 1.0f : __ldg(in.xs + kb);
      acc[0] += part[0] * wsc * xsc;
      acc[1] += part[1] * wsc;
      acc[2] += part[2] * wsc * xsc;
      acc[3] += part[3] * wsc;
      part[0] = part[1] = part[2] = part[3] = 0.0f;
    }
    __syncwarp();
  }
  wait_groups<0>();
  if (bits == 0x12345678u || acc[0] + acc[1] + acc[2] + acc[3] == 1.2345f) sink[0] = bits;  // keeps the loop
}

struct Device {
  uint8_t* buf = nullptr;  // 1 GiB
  unsigned* sink = nullptr;
  Inputs in{};
  double copy_bw = 0;
};

// Microseconds a launch; `extra` shared bytes a block lower its residency; persistent: the grid
// is every resident block slot.
template <int S, bool kTiled, bool kHint, int kMode>
double run(const Device& d, int64_t n, int64_t k, int splits, bool persistent, size_t extra, int* per_sm_out) {
  const size_t smem = static_cast<size_t>(kWarps) * S * (kMode == kStream ? 2048 : 3072) + extra;
  auto kernel = probe_kernel<S, kTiled, kHint, kMode>;
  PROBE_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0, sms = 0;
  PROBE_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * 32, smem));
  PROBE_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  if (per_sm_out) *per_sm_out = per_sm;
  const unsigned blocks = static_cast<unsigned>((n / 16 + kWarps - 1) / kWarps);
  const dim3 grid =
      persistent ? dim3(static_cast<unsigned>(sms * per_sm)) : dim3(blocks, 1, static_cast<unsigned>(splits));
  const size_t bytes = static_cast<size_t>(n * k), copies = (size_t{1} << 30) / bytes;
  kernel<<<grid, kWarps * 32, smem>>>(d.buf, n, k, persistent ? 1 : 0, d.in, d.sink);
  cudaEvent_t a, b;
  PROBE_CHECK(cudaEventCreate(&a));
  PROBE_CHECK(cudaEventCreate(&b));
  constexpr int kReps = 21;
  PROBE_CHECK(cudaEventRecord(a));
  for (int i = 0; i < kReps; ++i)
    kernel<<<grid, kWarps * 32, smem>>>(d.buf + (i % copies) * bytes, n, k, persistent ? 1 : 0, d.in, d.sink);
  PROBE_CHECK(cudaEventRecord(b));
  PROBE_CHECK(cudaEventSynchronize(b));
  float ms = 0;
  PROBE_CHECK(cudaEventElapsedTime(&ms, a, b));
  PROBE_CHECK(cudaEventDestroy(a));
  PROBE_CHECK(cudaEventDestroy(b));
  return 1e3 * ms / kReps;
}

struct Shape {
  const char* name;
  int64_t n, k;
};
constexpr Shape kShapes[] = {
    {"qa+kva 2112x7168", 2112, 7168},         {"q_b 24576x1536", 24576, 1536},
    {"o_proj 7168x16384", 7168, 16384},       {"dense gate 18432x7168", 18432, 7168},
    {"dense gu 36864x7168", 36864, 7168},     {"dense down 7168x18432", 7168, 18432},
    {"shared gu 4096x7168", 4096, 7168},      {"shared down 7168x2048", 7168, 2048},
    {"8 experts gu 32768x7168", 32768, 7168}, {"8 experts down 57344x2048", 57344, 2048},
};

void report(const Device& d, const Shape& s, const char* what, double us) {
  const double bytes = static_cast<double>(s.n * s.k);
  std::printf("%-26s %-28s %8.1f us %6.0f GB/s %5.1f%%\n", s.name, what, us, bytes / us / 1e3,
              100.0 * bytes / (us * 1e-6) / d.copy_bw);
}

}  // namespace

int main(int argc, char** argv) {
  const char* table = argc > 1 ? argv[1] : "layouts";
  if (std::strcmp(table, "layouts") != 0 && std::strcmp(table, "residency") != 0 &&
      std::strcmp(table, "compute") != 0) {
    std::fprintf(stderr, "usage: dilu_stream_probe [layouts|residency|compute]\n");
    return 2;
  }
  Device d;
  uint8_t* dst = nullptr;
  const size_t big = size_t{1} << 30;
  PROBE_CHECK(cudaMalloc(&d.buf, big));
  PROBE_CHECK(cudaMalloc(&dst, big));
  PROBE_CHECK(cudaMalloc(&d.sink, 64));
  PROBE_CHECK(cudaMemset(d.buf, 1, big));
  uint8_t* xq = nullptr;
  float *xs = nullptr, *ws = nullptr;
  PROBE_CHECK(cudaMalloc(&xq, 65536));
  PROBE_CHECK(cudaMalloc(&xs, 65536));
  PROBE_CHECK(cudaMalloc(&ws, size_t{1} << 24));
  PROBE_CHECK(cudaMemset(xq, 0, 65536));
  PROBE_CHECK(cudaMemset(xs, 0, 65536));
  PROBE_CHECK(cudaMemset(ws, 0, size_t{1} << 24));
  d.in = Inputs{xq, xs, ws};
  cudaEvent_t a, b;
  PROBE_CHECK(cudaEventCreate(&a));
  PROBE_CHECK(cudaEventCreate(&b));
  PROBE_CHECK(cudaMemcpy(dst, d.buf, big, cudaMemcpyDeviceToDevice));
  PROBE_CHECK(cudaEventRecord(a));
  for (int i = 0; i < 5; ++i) PROBE_CHECK(cudaMemcpyAsync(dst, d.buf, big, cudaMemcpyDeviceToDevice));
  PROBE_CHECK(cudaEventRecord(b));
  PROBE_CHECK(cudaEventSynchronize(b));
  float ms = 0;
  PROBE_CHECK(cudaEventElapsedTime(&ms, a, b));
  d.copy_bw = 2.0 * static_cast<double>(big) * 5 / (ms * 1e-3);
  std::printf("dilu_stream_probe %s: copy bandwidth %.0f GB/s\n", table, d.copy_bw / 1e9);
  char label[64];
  for (const Shape& s : kShapes) {
    if (std::strcmp(table, "layouts") == 0) {
      for (int sp : {1, 2, 4}) {
        std::snprintf(label, sizeof label, "row S9 hint splits %d", sp);
        report(d, s, label, run<9, false, true, kStream>(d, s.n, s.k, sp, false, 0, nullptr));
      }
      report(d, s, "row S9 splits 2", run<9, false, false, kStream>(d, s.n, s.k, 2, false, 0, nullptr));
      report(d, s, "tiled S9 hint splits 2", run<9, true, true, kStream>(d, s.n, s.k, 2, false, 0, nullptr));
      report(d, s, "row S9 hint persistent", run<9, false, true, kStream>(d, s.n, s.k, 1, true, 0, nullptr));
      report(d, s, "tiled S9 hint persistent", run<9, true, true, kStream>(d, s.n, s.k, 1, true, 0, nullptr));
      report(d, s, "tiled S5 hint persistent", run<5, true, true, kStream>(d, s.n, s.k, 1, true, 0, nullptr));
      report(d, s, "tiled S13 hint persistent", run<13, true, true, kStream>(d, s.n, s.k, 1, true, 0, nullptr));
    } else if (std::strcmp(table, "residency") == 0) {
      for (int sp : {1, 2, 3, 4}) {
        int per_sm = 0;
        double us = run<9, false, true, kStream>(d, s.n, s.k, sp, false, 0, &per_sm);
        std::snprintf(label, sizeof label, "%d/SM S9 splits %d", per_sm, sp);
        report(d, s, label, us);
        us = run<9, false, true, kStream>(d, s.n, s.k, sp, false, 40000, &per_sm);
        std::snprintf(label, sizeof label, "%d/SM S9 splits %d", per_sm, sp);
        report(d, s, label, us);
        us = run<6, false, true, kStream>(d, s.n, s.k, sp, false, 0, &per_sm);
        std::snprintf(label, sizeof label, "%d/SM S6 splits %d", per_sm, sp);
        report(d, s, label, us);
      }
    } else {
      for (int sp : {2, 3, 4}) {
        std::snprintf(label, sizeof label, "stream S9 splits %d", sp);
        report(d, s, label, run<9, false, true, kStream>(d, s.n, s.k, sp, false, 0, nullptr));
        std::snprintf(label, sizeof label, "mma+x S9 splits %d", sp);
        report(d, s, label, run<9, false, true, kMma>(d, s.n, s.k, sp, false, 0, nullptr));
        std::snprintf(label, sizeof label, "mma+x+scales S9 splits %d", sp);
        report(d, s, label, run<9, false, true, kMmaScales>(d, s.n, s.k, sp, false, 0, nullptr));
      }
      report(d, s, "mma+x+scales S9 persistent", run<9, false, true, kMmaScales>(d, s.n, s.k, 1, true, 0, nullptr));
    }
  }
  return 0;
}
