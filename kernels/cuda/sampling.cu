// Token sampling on the GPU (kernels/cuda/sampling.h): one block of 1024 threads per row does what
// the host sampler (engine/sampler.cpp) does, with bit-identical float weights and exactly summed
// (fixed-point) masses, so it draws the host's token unless the uniform lies within rounding of a
// CDF step. Top-k, the nucleus and the top logprobs are radix selects on order keys: nothing sorts.
#include "kernels/cuda/sampling.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_reduce.cuh>

#include "kernels/error.h"

#define DILU_CUDA_CHECK(call)                                                                  \
  do {                                                                                         \
    cudaError_t dilu_cuda_rc = (call);                                                         \
    DILU_CHECK(dilu_cuda_rc == cudaSuccess, #call, ": ", cudaGetErrorString(dilu_cuda_rc));    \
  } while (0)

namespace dilu::cuda {

namespace {

constexpr int kThreads = 1024;  // one block per row
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr double kGreedyTemperature = 1e-5;  // as engine/sampler.cpp

// Order keys made unsigned (see order_key): where -inf and +inf fall; NaNs fall outside.
constexpr uint32_t kKeyNegInf = 0x007fffffu;
constexpr uint32_t kKeyPosInf = 0xff800000u;

// Weights p / p_max are <= 1. As fixed point w * 2^56 (< 2^57) their sums are exact and so
// independent of the order of addition: every threshold below is decided the same way at every
// level of a search, and the block's answer does not depend on its schedule. One fixed weight
// travels as three 19-bit chunks, so 32 lanes can add a chunk in 32-bit registers.
constexpr float kFixedScale = 0x1p56f;
constexpr int kChunkBits = 19;
constexpr unsigned long long kChunkMask = (1ull << kChunkBits) - 1;

// ---- scalar helpers: each float operation rounded as on the host (no FMA contraction) ----------

// The host's order_key (floats as int32 in float order, -0 == +0), as uint32: the sign bit
// flipped so that unsigned order is float order.
__device__ __forceinline__ uint32_t order_key(float x) {
  int32_t bits = __float_as_int(x);
  if (bits == INT32_MIN) bits = 0;  // -0 -> +0
  const int32_t key = bits ^ ((bits >> 31) & 0x7fffffff);
  return static_cast<uint32_t>(key) ^ 0x80000000u;
}

// engine/sampler.cpp's exp_nonpositive, operation for operation: exactly 0 below -87, for -inf
// and for NaN. Explicit rounding intrinsics keep nvcc from fusing into FMAs, which would change
// the last bit and with it the host's choice near a cut.
__device__ __forceinline__ float exp_nonpositive(float x) {
  const int32_t bits = __float_as_int(x);
  const int32_t vanish = (bits & 0x7fffffff) > 0x42ae0000 ? -1 : 0;  // |x| > 87, inf or NaN
  const float t = __int_as_float(bits & ~vanish);
  const int32_t n = __float2int_rz(__fsub_rn(__fmul_rn(t, 1.44269504088896341f), 0.5f));
  const float nf = __int2float_rn(n);
  const float r = __fadd_rn(__fsub_rn(t, __fmul_rn(nf, 0.693359375f)), __fmul_rn(nf, 2.12194440e-4f));
  float y = 1.9875691500e-4f;
  y = __fadd_rn(__fmul_rn(y, r), 1.3981999507e-3f);
  y = __fadd_rn(__fmul_rn(y, r), 8.3334519073e-3f);
  y = __fadd_rn(__fmul_rn(y, r), 4.1665795894e-2f);
  y = __fadd_rn(__fmul_rn(y, r), 1.6666665459e-1f);
  y = __fadd_rn(__fmul_rn(y, r), 5.0000001201e-1f);
  y = __fadd_rn(__fadd_rn(__fmul_rn(y, __fmul_rn(r, r)), r), 1.0f);
  const float scale = __int_as_float((n + 127) * (1 << 23));  // 2^n, n in [-126, 0]
  return __int_as_float(__float_as_int(__fmul_rn(y, scale)) & ~vanish);
}

__device__ __forceinline__ unsigned long long to_fixed(float w) { return __float2ull_rn(__fmul_rn(w, kFixedScale)); }

// A 128-bit unsigned sum of fixed weights (no __int128: -Wpedantic hosts).
struct U128 {
  unsigned long long lo, hi;
};
__device__ __forceinline__ U128 operator+(const U128& a, const U128& b) {
  U128 r{a.lo + b.lo, a.hi + b.hi};
  r.hi += r.lo < a.lo ? 1 : 0;
  return r;
}
__device__ __forceinline__ U128 widen(unsigned long long v) { return U128{v, 0}; }
__device__ __forceinline__ U128 mul(unsigned long long a, unsigned long long b) { return U128{a * b, __umul64hi(a, b)}; }
// Monotone in the value (so a threshold compared against it splits sums consistently).
__device__ __forceinline__ double to_double(const U128& v) {
  return __dadd_rn(__dmul_rn(__ull2double_rn(v.hi), 0x1p64), __ull2double_rn(v.lo));
}

// ---- warp and block reductions ------------------------------------------------------------------

__device__ __forceinline__ U128 shfl_up(const U128& v, int delta) {
  return U128{__shfl_up_sync(kFullMask, v.lo, delta), __shfl_up_sync(kFullMask, v.hi, delta)};
}
__device__ __forceinline__ U128 warp_sum(U128 v) {
  for (int m = 16; m > 0; m >>= 1) v = v + U128{__shfl_xor_sync(kFullMask, v.lo, m), __shfl_xor_sync(kFullMask, v.hi, m)};
  return v;
}
__device__ __forceinline__ U128 warp_exclusive_sum(U128 v) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (int d = 1; d < 32; d <<= 1) {
    const U128 t = shfl_up(v, d);
    if (lane >= d) v = v + t;
  }
  const U128 t = shfl_up(v, 1);
  return lane == 0 ? U128{0, 0} : t;
}
__device__ __forceinline__ uint32_t warp_exclusive_sum(uint32_t v) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (int d = 1; d < 32; d <<= 1) {
    const uint32_t t = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v += t;
  }
  const uint32_t t = __shfl_up_sync(kFullMask, v, 1);
  return lane == 0 ? 0u : t;
}

// The block's reduction of v, returned to every thread (CUB's tree: a fixed order).
template <class T, class Op>
__device__ T block_reduce(T v, Op op) {
  using Reduce = cub::BlockReduce<T, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ T result;
  const T r = Reduce(storage).Reduce(v, op);
  if (threadIdx.x == 0) result = r;
  __syncthreads();
  const T out = result;
  __syncthreads();  // storage and result may be reused at once
  return out;
}

struct ArgMax {
  uint32_t key;   // order key of the logit
  int32_t index;  // first index of that key
  int32_t bad;    // a NaN was seen
};
struct ArgMaxOp {
  __device__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    ArgMax r = a.key > b.key || (a.key == b.key && a.index < b.index) ? a : b;
    r.bad = a.bad | b.bad;
    return r;
  }
};
struct SumOp {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct MaxOp {
  __device__ int operator()(int a, int b) const { return a > b ? a : b; }
};

// ---- radix select --------------------------------------------------------------------------------

// Walking the selected elements by descending key, the first key at which the running measure
// (a count, or a fixed-point mass) reaches the goal.
struct Crossing {
  uint32_t key;     // the crossing key
  uint32_t above;   // elements with a larger key
  uint32_t ties;    // elements with exactly this key
  U128 mass_above;  // (mass) their mass
  double goal;      // (mass) top_p * total mass, fixed units
  int found;        // 0: the measure of all elements stays below the goal
};

struct RadixShared {
  uint32_t count[256];
  unsigned long long mass[3][256];  // 19-bit chunks of fixed weights, summed
  Crossing result;
};

__device__ __forceinline__ U128 bin_mass(const RadixShared& r, int b) {
  const unsigned long long c0 = r.mass[0][b], c1 = r.mass[1][b], c2 = r.mass[2][b];
  return U128{c0, 0} + U128{c1 << kChunkBits, c1 >> (64 - kChunkBits)} +
         U128{c2 << (2 * kChunkBits), c2 >> (64 - 2 * kChunkBits)};
}

// elem(i, key, fixed) says whether element i takes part and gives its key (larger is better)
// and, for kMass, its fixed-point weight. Count mode: the goal is goal_count elements. Mass mode:
// the goal is top_p of the total mass of the elements. Four passes of 8 bits; each builds a
// histogram of the next digit among the elements whose higher digits match the crossing so far
// (warp-aggregated shared atomics on integers: exact, so the order of arrival does not matter),
// then one warp finds the bin where the measure reaches the goal. Every thread must call it.
template <bool kMass, class Elem>
__device__ Crossing radix_select(int n, const Elem& elem, uint32_t goal_count, double top_p, RadixShared& r) {
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32;
  Crossing c{0u, 0u, 0u, U128{0, 0}, 0.0, 1};
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += kThreads) {
      r.count[b] = 0;
      if constexpr (kMass) r.mass[0][b] = r.mass[1][b] = r.mass[2][b] = 0;
    }
    __syncthreads();
    const uint32_t high = shift == 24 ? 0u : ~0u << (shift + 8);
    for (int base = 0; base < n; base += kThreads) {  // uniform trip count: whole warps below
      const int i = base + tid;
      uint32_t key = 0;
      unsigned long long fixed = 0;
      const bool in = i < n && elem(i, key, fixed) && (key & high) == c.key;
      if (!__any_sync(kFullMask, in)) continue;
      const unsigned bin = in ? (key >> shift) & 0xffu : 0x100u;
      const unsigned peers = __match_any_sync(kFullMask, bin);
      if (!in) continue;
      const bool leader = lane == __ffs(static_cast<int>(peers)) - 1;
      if (leader) atomicAdd(&r.count[bin], static_cast<uint32_t>(__popc(peers)));
      if constexpr (kMass) {
        const unsigned s0 = __reduce_add_sync(peers, static_cast<unsigned>(fixed & kChunkMask));
        const unsigned s1 = __reduce_add_sync(peers, static_cast<unsigned>((fixed >> kChunkBits) & kChunkMask));
        const unsigned s2 = __reduce_add_sync(peers, static_cast<unsigned>(fixed >> (2 * kChunkBits)));
        if (leader) {
          atomicAdd(&r.mass[0][bin], static_cast<unsigned long long>(s0));
          atomicAdd(&r.mass[1][bin], static_cast<unsigned long long>(s1));
          atomicAdd(&r.mass[2][bin], static_cast<unsigned long long>(s2));
        }
      }
    }
    __syncthreads();
    if (tid < 32) {
      // Lane l holds bins 255 - 8l - j (j = 0..7): lane 0 the largest keys. The crossing is the
      // first non-empty bin whose running measure reaches the goal; sums are exact, so the lane
      // found from the lane totals holds it.
      uint32_t lane_count = 0;
      U128 lane_mass{0, 0};
      for (int j = 0; j < 8; ++j) {
        const int b = 255 - 8 * lane - j;
        lane_count += r.count[b];
        if constexpr (kMass) lane_mass = lane_mass + bin_mass(r, b);
      }
      if constexpr (kMass) {
        if (shift == 24) c.goal = __dmul_rn(top_p, to_double(warp_sum(lane_mass)));
      }
      const double goal = c.goal;
      auto reached = [goal, goal_count](uint32_t count, const U128& mass) {
        if constexpr (kMass) {
          (void)count;
          return to_double(mass) >= goal;
        } else {
          (void)mass;
          return count >= goal_count;
        }
      };
      const uint32_t count_before = c.above + warp_exclusive_sum(lane_count);
      const U128 mass_before = c.mass_above + warp_exclusive_sum(lane_mass);
      const bool hit = lane_count > 0 && reached(count_before + lane_count, mass_before + lane_mass);
      const unsigned hits = __ballot_sync(kFullMask, hit);
      if (hits == 0 && lane == 0) {
        r.result = c;
        r.result.found = 0;
      }
      if (hits != 0 && lane == __ffs(static_cast<int>(hits)) - 1) {
        uint32_t count = count_before;
        U128 mass = mass_before;
        for (int j = 0; j < 8; ++j) {
          const int b = 255 - 8 * lane - j;
          const uint32_t bin_count = r.count[b];
          U128 m{0, 0};
          if constexpr (kMass) m = bin_mass(r, b);
          if (bin_count > 0 && reached(count + bin_count, mass + m)) {
            r.result = Crossing{c.key | (static_cast<uint32_t>(b) << shift), count, bin_count, mass, c.goal, 1};
            break;
          }
          count += bin_count;
          mass = mass + m;
        }
      }
    }
    __syncthreads();
    c = r.result;  // read before the next pass's first barrier; written only after it
    if (!c.found) break;
  }
  return c;
}

// The elements "in" a selection by key: a larger key than `key`, or this key and an index of at
// most `last` (the lowest indices among ties). The default takes everything.
struct Cut {
  uint32_t key = 0;
  int32_t last = INT32_MAX;
  __device__ bool in(uint32_t k, int32_t i) const { return k > key || (k == key && i <= last); }
};

// The n best logits (larger first, lower index on ties), 1 <= n <= vocab.
__device__ Cut best_logits(const float* x, int vocab, uint32_t n, RadixShared& r) {
  Cut cut;
  const Crossing c = radix_select<false>(
      vocab,
      [x](int i, uint32_t& key, unsigned long long&) {
        key = order_key(x[i]);
        return true;
      },
      n, 0.0, r);
  if (!c.found) return cut;
  cut.key = c.key;
  if (c.above + c.ties > n) {  // only the lowest indices of the tied logits: select on ~index
    const uint32_t tie_key = c.key;
    const Crossing t = radix_select<false>(
        vocab,
        [x, tie_key](int i, uint32_t& key, unsigned long long&) {
          key = ~static_cast<uint32_t>(i);
          return order_key(x[i]) == tie_key;
        },
        n - c.above, 0.0, r);
    cut.last = static_cast<int32_t>(~t.key);
  }
  return cut;
}

// How many of the crossing's tied weights the nucleus takes: as the host, which adds them one by
// one (lowest index first) until the mass reaches the goal, and takes them all when it never does.
__device__ uint32_t ties_needed(const Crossing& c) {
  const unsigned long long f = to_fixed(__uint_as_float(c.key));
  if (f == 0) return c.ties;  // weights below 2^-57: they change no sum
  auto reached = [&c, f](uint32_t m) { return to_double(c.mass_above + mul(m, f)) >= c.goal; };
  const double need = (c.goal - to_double(c.mass_above)) / static_cast<double>(f);
  uint32_t m = need <= 1.0 ? 1u : need >= static_cast<double>(c.ties) ? c.ties : static_cast<uint32_t>(ceil(need));
  while (m > 1 && reached(m - 1)) --m;
  while (m < c.ties && !reached(m)) ++m;
  return m;
}

struct Shared {
  RadixShared radix;
  U128 warp_mass[kWarps];
  U128 draw_before;  // mass before the warp that holds the draw
  double draw_target;
  int draw_warp;
  int token;
  int top_count;
  uint32_t top_key[kMaxTopLogprobs];
  int32_t top_index[kMaxTopLogprobs];
};

// One row: p = softmax(logits / T) cut by top-k, the nucleus and min-p, then the inverse CDF at
// the uniform over the kept tokens in id order. Every thread returns the token.
__device__ int draw_token(const float* x, int vocab, const SampleRowParams& p, float max_logit, int argmax,
                          Shared& sh) {
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const auto inv_t = static_cast<float>(1.0 / static_cast<double>(p.temperature));
  auto weight = [max_logit, inv_t](float xi) { return exp_nonpositive(__fmul_rn(__fsub_rn(xi, max_logit), inv_t)); };

  Cut top_k;  // candidates by logit
  if (p.top_k > 0 && p.top_k < vocab) top_k = best_logits(x, vocab, static_cast<uint32_t>(p.top_k), sh.radix);

  Cut nucleus;  // by weight bits (weights are >= 0, so their bits order as they do)
  if (p.top_p < 1.0f) {
    const Crossing c = radix_select<true>(
        vocab,
        [x, top_k, weight](int i, uint32_t& key, unsigned long long& fixed) {
          const float xi = x[i];
          if (!top_k.in(order_key(xi), i)) return false;
          const float w = weight(xi);
          if (!(w > 0.0f)) return false;
          key = __float_as_uint(w);
          fixed = to_fixed(w);
          return true;
        },
        0u, static_cast<double>(p.top_p), sh.radix);
    if (c.found) {  // else rounding kept the total below the goal: the host keeps everything too
      nucleus.key = c.key;
      const uint32_t keep = ties_needed(c);
      if (keep < c.ties) {
        const uint32_t tau = c.key;
        const Crossing t = radix_select<false>(
            vocab,
            [x, top_k, weight, tau](int i, uint32_t& key, unsigned long long&) {
              const float xi = x[i];
              key = ~static_cast<uint32_t>(i);
              return top_k.in(order_key(xi), i) && __float_as_uint(weight(xi)) == tau;
            },
            keep, 0.0, sh.radix);
        nucleus.last = static_cast<int32_t>(~t.key);
      }
    }
  }
  // min-p: weights are p / p_max, so the threshold is min_p itself, compared as bits.
  const uint32_t min_p_bits = p.min_p > 0.0f ? __float_as_uint(p.min_p) : 0u;
  auto kept = [x, top_k, nucleus, min_p_bits, weight](int i) {
    const float xi = x[i];
    if (!top_k.in(order_key(xi), i)) return 0.0f;
    const float w = weight(xi);
    const uint32_t bits = __float_as_uint(w);
    return nucleus.in(bits, i) && bits >= min_p_bits ? w : 0.0f;
  };

  // Each warp owns a contiguous run of ids; the mass of each run, then the run where the CDF
  // passes u * total, then that run walked in id order.
  const int run = ((vocab + kWarps - 1) / kWarps + 31) / 32 * 32;
  const int begin = min(warp * run, vocab), end = min(begin + run, vocab);
  U128 mass{0, 0};
  for (int i = begin + lane; i < end; i += 32) mass = mass + widen(to_fixed(kept(i)));
  mass = warp_sum(mass);
  if (lane == 0) sh.warp_mass[warp] = mass;
  __syncthreads();
  if (tid == 0) {  // (loops not unrolled: 32 hoisted 128-bit loads would spill)
    U128 total{0, 0};
#pragma unroll 1
    for (int w = 0; w < kWarps; ++w) total = total + sh.warp_mass[w];
    const double target = __dmul_rn(p.uniform, to_double(total));
    U128 before{0, 0};
    int pick = -1;
#pragma unroll 1
    for (int w = 0; w < kWarps; ++w) {
      const U128 next = before + sh.warp_mass[w];
      if (to_double(next) > target) {
        pick = w;
        break;
      }
      before = next;
    }
    sh.draw_warp = pick;
    sh.draw_before = before;
    sh.draw_target = target;
    sh.token = argmax;  // overwritten below
  }
  __syncthreads();
  const int pick = sh.draw_warp;
  if (pick < 0) {
    // The CDF never passed the target: u within rounding of 1 (or nothing kept, outside the
    // contract). The host then takes the last kept token.
    int last = -1;
    for (int i = tid; i < vocab; i += kThreads)
      if (kept(i) > 0.0f) last = i;
    last = block_reduce(last, MaxOp{});
    return last >= 0 ? last : argmax;
  }
  if (warp == pick) {
    U128 before = sh.draw_before;
    const double target = sh.draw_target;
    for (int base = begin; base < end; base += 32) {
      const int i = base + lane;
      const float w = i < end ? kept(i) : 0.0f;
      unsigned long long cum = to_fixed(w);  // inclusive scan: 32 weights < 2^62
      for (int d = 1; d < 32; d <<= 1) {
        const unsigned long long t = __shfl_up_sync(kFullMask, cum, d);
        if (lane >= d) cum += t;
      }
      // Exact sums: the run's mass passes the target, so some positive weight in it does.
      const unsigned hits = __ballot_sync(kFullMask, w > 0.0f && to_double(before + widen(cum)) > target);
      if (hits != 0) {
        if (lane == 0) sh.token = base + __ffs(static_cast<int>(hits)) - 1;
        break;
      }
      before = before + widen(__shfl_sync(kFullMask, cum, 31));
    }
  }
  __syncthreads();
  return sh.token;
}

// The first maximum of a few rows, spread over many blocks (sample_rows' first pass where the rows
// alone would leave most SMs idle): block (part, r) scans logits [part * kPartSpan, + kPartSpan) of
// row r, as sample_rows_kernel's scan does, into parts[r * gridDim.x + part]. One 1024-thread
// block a row read R1's 129280 logits in 17.5 us (Nsight Compute): one SM's share of bandwidth.
constexpr int kPartThreads = 256;
constexpr int kPartSpan = 4 * 4 * kPartThreads;  // four float4 loads a thread
constexpr int64_t kSplitMaxRows = 32;             // more rows fill the GPU on their own

__device__ __forceinline__ void visit_logit(ArgMax& best, float v, int i) {
  const uint32_t key = order_key(v);
  best.bad |= key < kKeyNegInf || key > kKeyPosInf ? 1 : 0;
  if (key > best.key) best = ArgMax{key, i, best.bad};
}

__global__ void __launch_bounds__(kPartThreads)
    argmax_parts_kernel(const float* __restrict__ logits, int vocab, const SampleRowParams* __restrict__ params,
                        ArgMax* __restrict__ parts) {
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32, warp = tid / 32;
  const float* x = logits + static_cast<int64_t>(params[blockIdx.y].row) * vocab;
  const int begin = static_cast<int>(blockIdx.x) * kPartSpan, end = min(begin + kPartSpan, vocab);
  ArgMax best{0u, INT32_MAX, 0};
  int done = begin;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0) {  // begin is a multiple of 4: quads stay aligned
    const float4* x4 = reinterpret_cast<const float4*>(x);
    const int q_end = end / 4;
    float4 v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int q = begin / 4 + j * kPartThreads + tid;
      v[j] = q < q_end ? x4[q] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int q = begin / 4 + j * kPartThreads + tid;
      if (q >= q_end) break;
      visit_logit(best, v[j].x, 4 * q);
      visit_logit(best, v[j].y, 4 * q + 1);
      visit_logit(best, v[j].z, 4 * q + 2);
      visit_logit(best, v[j].w, 4 * q + 3);
    }
    done = 4 * q_end;
  }
  for (int i = done + tid; i < end; i += kPartThreads) visit_logit(best, x[i], i);
  // Max key, then lowest index, with the NaN flags or'ed: the same answer in any order.
  for (int m = 16; m > 0; m >>= 1) {
    const ArgMax o{__shfl_xor_sync(kFullMask, best.key, m), __shfl_xor_sync(kFullMask, best.index, m),
                   __shfl_xor_sync(kFullMask, best.bad, m)};
    best = ArgMaxOp{}(best, o);
  }
  __shared__ ArgMax warp_best[kPartThreads / 32];
  if (lane == 0) warp_best[warp] = best;
  __syncthreads();
  if (tid == 0) {
    for (int w = 1; w < kPartThreads / 32; ++w) best = ArgMaxOp{}(best, warp_best[w]);
    parts[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = best;
  }
}

// `parts` (num_parts a row, from argmax_parts_kernel) when the row's maximum was found in a first
// pass; null: this kernel scans the row.
__global__ void __launch_bounds__(kThreads, 1)
    sample_rows_kernel(const float* __restrict__ logits, int vocab, const SampleRowParams* __restrict__ params,
                       SampleRowResult* __restrict__ results, const ArgMax* __restrict__ parts, int num_parts) {
  __shared__ Shared sh;
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32;
  const SampleRowParams p = params[blockIdx.x];
  const float* x = logits + static_cast<int64_t>(p.row) * vocab;
  SampleRowResult& out = results[blockIdx.x];

  ArgMax best{0u, INT32_MAX, 0};
  const auto visit = [&](float v, int i) { visit_logit(best, v, i); };
  // A row on 16 bytes (R1's 129280 logits): float4 loads, kLoads of them issued before any is
  // compared (R1's row in 4 such rounds), each thread's ids still in increasing order. One load
  // at a time, a row of 129280 waited on memory 126 times a thread: 25-31 us a row (Nsight
  // Compute); 17.5 us with a scalar tail after whole rounds of 4 float4 loads.
  constexpr int kLoads = 8;
  int done = 0;
  if (parts != nullptr) {
    if (tid < num_parts) best = parts[static_cast<int64_t>(blockIdx.x) * num_parts + tid];
    done = vocab;
  } else if (reinterpret_cast<uintptr_t>(x) % 16 == 0) {
    const float4* x4 = reinterpret_cast<const float4*>(x);
    const int quads = vocab / 4;
    for (int base = 0; base < quads; base += kLoads * kThreads) {
      float4 v[kLoads];
#pragma unroll
      for (int j = 0; j < kLoads; ++j) {
        const int q = base + j * kThreads + tid;
        v[j] = q < quads ? x4[q] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
#pragma unroll
      for (int j = 0; j < kLoads; ++j) {
        const int q = base + j * kThreads + tid;
        if (q >= quads) break;
        visit(v[j].x, 4 * q);
        visit(v[j].y, 4 * q + 1);
        visit(v[j].z, 4 * q + 2);
        visit(v[j].w, 4 * q + 3);
      }
    }
    done = 4 * quads;
  }
  for (int i = done + tid; i < vocab; i += kThreads) visit(x[i], i);
  best = block_reduce(best, ArgMaxOp{});
  if (best.bad != 0 || best.key == kKeyNegInf) {
    // A NaN (the host aborts) or nothing but -inf: no token. The caller checks for -1.
    if (tid < kMaxTopLogprobs) {
      out.top_ids[tid] = -1;
      out.top_logprobs[tid] = __int_as_float(0x7fc00000);
    }
    if (tid == 0) {
      out.token = -1;
      out.logprob = __int_as_float(0x7fc00000);
    }
    return;
  }
  const int argmax = best.index;
  const float max_logit = x[argmax];
  const bool greedy = static_cast<double>(p.temperature) < kGreedyTemperature;
  const int token = greedy || p.top_k == 1 || vocab == 1 ? argmax : draw_token(x, vocab, p, max_logit, argmax, sh);

  // Logprobs: log_softmax of the raw logits, the normalizer summed in double as on the host.
  int top = 0;
  double lse = 0.0;
  if (p.logprobs != 0) {
    double sum = 0.0;
    for (int i = tid; i < vocab; i += kThreads) sum += static_cast<double>(exp_nonpositive(__fsub_rn(x[i], max_logit)));
    sum = block_reduce(sum, SumOp{});
    lse = static_cast<double>(max_logit) + log(sum);
    top = min(max(p.top_logprobs, 0), min(kMaxTopLogprobs, vocab));
    if (top > 0) {
      const Cut cut = best_logits(x, vocab, static_cast<uint32_t>(top), sh.radix);
      if (tid == 0) sh.top_count = 0;
      __syncthreads();
      for (int i = tid; i < vocab; i += kThreads) {
        const uint32_t key = order_key(x[i]);
        if (cut.in(key, i)) {
          const int slot = atomicAdd(&sh.top_count, 1);
          if (slot < kMaxTopLogprobs) {
            sh.top_key[slot] = key;
            sh.top_index[slot] = i;
          }
        }
      }
      __syncthreads();
    }
  }
  if (tid == 0) {
    out.token = token;
    out.logprob = p.logprobs != 0 ? static_cast<float>(static_cast<double>(x[token]) - lse) : 0.0f;
  }
  if (tid < 32) {
    // Gathered in arrival order; each lane places its entry by its rank (best first, ties by id).
    if (lane < top) {
      const uint32_t key = sh.top_key[lane];
      const int32_t index = sh.top_index[lane];
      int rank = 0;
      for (int j = 0; j < top; ++j)
        rank += sh.top_key[j] > key || (sh.top_key[j] == key && sh.top_index[j] < index) ? 1 : 0;
      out.top_ids[rank] = index;
      out.top_logprobs[rank] = static_cast<float>(static_cast<double>(x[index]) - lse);
    } else if (lane < kMaxTopLogprobs) {
      out.top_ids[lane] = -1;
      out.top_logprobs[lane] = 0.0f;
    }
  }
}

__global__ void feed_tokens_kernel(int32_t* __restrict__ ids, const int32_t* __restrict__ feed, int64_t n,
                                   const SampleRowResult* __restrict__ results) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    ids[feed[2 * i]] = results[feed[2 * i + 1]].token;
}

}  // namespace

// Parts a row when the row's maximum is found by argmax_parts_kernel first, else 0.
static int64_t argmax_parts(int64_t rows, int64_t vocab) {
  const int64_t parts = (vocab + kPartSpan - 1) / kPartSpan;
  return rows <= kSplitMaxRows && parts >= 2 && parts <= kThreads ? parts : 0;
}

size_t sample_rows_workspace_bytes(int64_t rows, int64_t vocab) {
  // The first pass's maxima; the later passes re-read the row's logits (from L2 for batches
  // whose logits fit there).
  return static_cast<size_t>(rows * argmax_parts(rows, vocab)) * sizeof(ArgMax);
}

void sample_rows(const float* logits, int64_t vocab, const SampleRowParams* params, SampleRowResult* results,
                 int64_t rows, void* workspace, size_t workspace_bytes, void* stream) {
  DILU_CHECK(vocab > 0 && vocab < (int64_t{1} << 30), "sample_rows: vocab ", vocab, " out of range");
  DILU_CHECK(rows >= 0 && rows <= INT32_MAX, "sample_rows: ", rows, " rows");
  DILU_CHECK(workspace_bytes >= sample_rows_workspace_bytes(rows, vocab), "sample_rows: workspace too small");
  if (rows == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t num_parts = argmax_parts(rows, vocab);
  ArgMax* parts = num_parts > 0 ? static_cast<ArgMax*>(workspace) : nullptr;
  if (parts != nullptr) {
    argmax_parts_kernel<<<dim3(static_cast<unsigned>(num_parts), static_cast<unsigned>(rows)), kPartThreads, 0, s>>>(
        logits, static_cast<int>(vocab), params, parts);
    DILU_CUDA_CHECK(cudaGetLastError());
  }
  sample_rows_kernel<<<static_cast<unsigned>(rows), kThreads, 0, s>>>(logits, static_cast<int>(vocab), params, results,
                                                                      parts, static_cast<int>(num_parts));
  DILU_CUDA_CHECK(cudaGetLastError());
}

void feed_tokens(int32_t* ids, const int32_t* feed, int64_t n, const SampleRowResult* results, void* stream) {
  if (n <= 0) return;
  const int64_t blocks = (n + 255) / 256;
  const unsigned grid = static_cast<unsigned>(blocks < 1024 ? blocks : 1024);
  feed_tokens_kernel<<<grid, 256, 0, static_cast<cudaStream_t>(stream)>>>(ids, feed, n, results);
  DILU_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dilu::cuda
