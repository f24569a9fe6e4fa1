// GPU tests (label "gpu"): every op of the CUDA backend (kernels/ops.h; sample() is tested
// elsewhere) against the CPU reference backend, on random inputs over a grid of shapes: partial
// FP8 blocks, block sizes other than 128x128, one token, one-token prompts, empty batches (T = 0
// must be a no-op), F32/BF16/FP8 weights, both FP8 GEMM modes ("soft" and "block") and the R1
// shapes where they are cheap. Every output is poisoned (all bytes 0xff: NaN for F32 and BF16,
// -1 for I32) before the op, so an element the op forgets to write fails.
//
// Each tolerance comes from the CUDA backend's numerics and is derived next to its test:
//  - linear: x rounded to BF16 (RNE), weights BF16 (F32 weights and "soft" FP8 weights rounded to
//    BF16), FP32 accumulation. "block" FP8: x quantized per token per 128 channels to e4m3 with
//    scale amax/448, weights exact. Bounds are computed per output element on the host.
//  - the latent cache is BF16 on the GPU: cache_write rounds (exact against the CPU rounded);
//    mla_attention reads BF16 entries, F32 math elsewhere.
//  - elementwise F32 ops: GPU expf/sinf/cosf/rsqrtf differ from glibc by a few ulp.
//  - embedding, gather_rows, concat_columns, add, argmax, cache_write, dequantize: exact.
//
// Without a CUDA device every test is skipped. DILU_CUDA_OPS_STANDIN=emulate runs all comparisons
// against a CPU stand-in with the CUDA backend's rounding (BF16 GEMM inputs, e4m3 block
// quantization, BF16 cache; EmulatedCudaOps below): a check of this harness and of its bounds on a
// machine without a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "engine/model_config.h"
#include "kernels/dtype.h"
#include "kernels/ops.h"
#include "tests/gpu/cuda_device.h"
#include "tests/gpu/linear_bench_shapes.h"
#include "tests/gpu/mla_bench_shapes.h"

namespace dilu {
namespace {

// ---- rounding units and tolerances --------------------------------------------------------------

constexpr double kBf16Unit = 0x1p-9;  // BF16 round to nearest even: 8 significant bits
constexpr double kFp8Unit = 0x1p-4;   // e4m3 normals: 4 significant bits
// e4m3 subnormals are spaced 2^-9 apart (in units of the block scale): rounding errs by half that.
constexpr double kFp8SubnormalHalfStep = 0x1p-10;
constexpr double kF32Unit = 0x1p-24;
// FP32 elementwise math on both backends: glibc and CUDA's expf/sinf/cosf/rsqrtf are within 2 ulp
// (2.4e-7) of the exact values, and the only sums (rms_norm's mean of squares over <= 7168
// positive terms) err by about sqrt(n) * 2^-24 (5e-6 at n = 7168, halved by the square root):
// 1e-5 of the value leaves a margin over both backends' errors.
constexpr double kF32Rel = 1e-5;
// Statistical check of linear: the RMS error over all outputs must stay below this many times
// the root-sum-square of the per-term rounding bounds (independent roundings add in quadrature;
// their RMS is below 1/sqrt(3) of it, so 4 is > 6 standard deviations even for one output).
constexpr double kStatFactor = 4.0;
// Router: a token whose biased scores (or group scores) at the top-k (top-group) cut lie closer
// than this is a near tie that FP32 dot products of different order may break either way (the
// issue allows ties within 1e-5; 1e-4 keeps a margin for the D = 7168 dots).
constexpr double kRouteTieGap = 1e-4;
// Router weights: sigmoid of a length-D FP32 dot (realistic error sqrt(D) * 2^-24 * |partial
// sums| < 3e-6 absolute at D = 7168, |logit| < 5, less after the sigmoid's slope <= 1/4), one
// normalization and one scaling: 1e-5 relative, as the CUDA backend promises.
constexpr double kRouteWeightRel = 1e-5;
// mla_attention on identical (BF16-rounded) cache entries: the backends differ only in the order
// of FP32 sums (q_lat: 128 terms, scores: 576, the weighted latent: up to 1000, the output: 512)
// and in expf. Realistic errors are ~sqrt(n) * 2^-24 ~ 2e-6 of the sums of magnitudes; 1e-4 of
// sum_k |W_UV[i,k]| * sum_j p_j |c_jk| (a bound on |out_i| made of magnitudes) keeps a 10x
// margin over both backends and still sees an off-by-one context (a missing or extra entry
// moves the output by ~p_j |v_j|, 10x more than this at ctx 64).
constexpr double kMlaF32 = 1e-4;

// ---- device, backends -----------------------------------------------------------------------------

bool standin() {
  const char* s = std::getenv("DILU_CUDA_OPS_STANDIN");
  return s != nullptr && std::string(s) == "emulate";
}

float round_bf16(float v) { return bf16_to_f32(f32_to_bf16(v)); }

// The CUDA backend's numerics on the CPU (for DILU_CUDA_OPS_STANDIN=emulate only): linear rounds
// x to BF16 and uses BF16 weights (F32 weights rounded at placement, FP8 weights dequantized and
// rounded), or in block mode quantizes x per token per 128 channels to e4m3 (scale amax/448)
// against exact FP8 weights; the latent cache is BF16; moe_experts runs on that linear. Every
// other op is the CPU backend's.
class EmulatedCudaOps final : public Ops {
 public:
  explicit EmulatedCudaOps(bool block) : cpu_(make_ops("cpu", 0)), block_(block) {}
  Device device() const override { return cpu_->device(); }
  std::string name() const override { return std::string("emulated cuda, fp8 ") + (block_ ? "block" : "soft"); }
  DType activation_dtype() const override { return DType::F32; }
  DType cache_dtype() const override { return DType::BF16; }
  size_t free_memory_bytes() const override { return cpu_->free_memory_bytes(); }
  Tensor empty(DType dtype, Shape shape) override { return cpu_->empty(dtype, std::move(shape)); }
  Tensor place_vector(const Tensor& host) override { return cpu_->place_vector(host); }
  LinearWeight place_linear(const Tensor& weight, const Tensor& scale_inv, int64_t block_out,
                            int64_t block_in) override {
    if (weight.dtype() == DType::F8E4M3 || weight.dtype() == DType::BF16)
      return cpu_->place_linear(weight, scale_inv, block_out, block_in);
    Tensor b = Tensor::host(DType::BF16, weight.shape());
    std::vector<float> f(static_cast<size_t>(weight.numel()));
    convert_to_f32(weight.dtype(), weight.raw(), f.data(), f.size());
    for (size_t i = 0; i < f.size(); ++i) b.data<uint16_t>()[i] = f32_to_bf16(f[i]);
    return cpu_->place_linear(b, Tensor(), 0, 0);
  }
  Tensor place_embedding(const Tensor& host) override { return cpu_->place_embedding(host); }
  Tensor random_fill(DType dtype, Shape shape, uint64_t key, float center, float half_width) override {
    return cpu_->random_fill(dtype, std::move(shape), key, center, half_width);
  }
  int64_t take_routed_expert_count() override { return cpu_->take_routed_expert_count(); }
  double measure_copy_bandwidth(size_t bytes) override { return cpu_->measure_copy_bandwidth(bytes); }
  Tensor dequantize(const LinearWeight& w) override { return cpu_->dequantize(w); }
  void copy_to_host(const Tensor& src, void* dst) override { cpu_->copy_to_host(src, dst); }
  void copy_from_host(const void* src, Tensor& dst) override { cpu_->copy_from_host(src, dst); }
  void copy(const Tensor& src, Tensor& dst) override { cpu_->copy(src, dst); }
  void embedding(const Tensor& table, std::span<const int32_t> ids, Tensor& out, int64_t first_id) override {
    cpu_->embedding(table, ids, out, first_id);
  }
  void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& out) override { cpu_->rms_norm(x, w, eps, out); }
  void gather_rows(const Tensor& x, std::span<const int32_t> rows, Tensor& out) override {
    cpu_->gather_rows(x, rows, out);
  }
  void add(Tensor& x, const Tensor& y) override { cpu_->add(x, y); }
  void silu_mul(const Tensor& gate, const Tensor& up, Tensor& out) override { cpu_->silu_mul(gate, up, out); }
  void rope(Tensor& x, int64_t offset, std::span<const int32_t> pos, std::span<const float> inv_freq,
            float attention_factor) override {
    cpu_->rope(x, offset, pos, inv_freq, attention_factor);
  }
  void moe_route(const Tensor& x, const Tensor& gate, const Tensor& bias, const RouterParams& p, Tensor& ids,
                 Tensor& weights) override {
    cpu_->moe_route(x, gate, bias, p, ids, weights);
  }
  void concat_columns(const Tensor& parts, Tensor& out) override { cpu_->concat_columns(parts, out); }
  std::vector<int32_t> argmax(const Tensor& logits) override { return cpu_->argmax(logits); }

  void linear(const Tensor& x, const LinearWeight& w, Tensor& out) override {
    const int64_t t = x.dim(0), in = w.in_features();
    const bool fp8 = w.weight.dtype() == DType::F8E4M3;
    const bool block = fp8 && block_ && w.block_out == 128 && w.block_in == 128 && in % 128 == 0 && w.out_features() % 16 == 0;
    Tensor xe = Tensor::host(DType::F32, x.shape());
    const float* xp = x.data<float>();
    float* xq = xe.data<float>();
    for (int64_t r = 0; r < t; ++r)
      for (int64_t g = 0; g < in; g += (block ? 128 : in)) {
        const int64_t end = block ? std::min(in, g + 128) : in;
        float amax = 0.0f;
        for (int64_t i = g; i < end; ++i) amax = std::max(amax, std::fabs(xp[r * in + i]));
        const float scale = amax / 448.0f;
        for (int64_t i = g; i < end; ++i) {
          const float v = xp[r * in + i];
          xq[r * in + i] = !block ? round_bf16(v) : scale == 0.0f ? 0.0f : fp8e4m3_to_f32(f32_to_fp8e4m3(v / scale)) * scale;
        }
      }
    if (!fp8 || block) {
      cpu_->linear(xe, w, out);
      return;
    }
    Tensor wf = cpu_->dequantize(w);  // soft FP8: the weight rounded to BF16
    for (int64_t i = 0; i < wf.numel(); ++i) wf.data<float>()[i] = round_bf16(wf.data<float>()[i]);
    cpu_->linear(xe, cpu_->place_linear(wf, Tensor(), 0, 0), out);
  }

  void cache_write(Tensor& cache, const Tensor& entry, const AttentionLayout& layout) override {
    const int64_t width = cache.dim(2);
    for (size_t t = 0; t < layout.token_slot.size(); ++t)
      for (int64_t i = 0; i < width; ++i)
        cache.data<uint16_t>()[layout.token_slot[t] * width + i] =
            f32_to_bf16(entry.data<float>()[static_cast<int64_t>(t) * width + i]);
  }

  void mla_attention(const Tensor& q, const MlaWeight& w_kv_b, const Tensor& cache, const AttentionLayout& layout,
                     const MlaParams& p, Tensor& out) override {
    Tensor f = Tensor::host(DType::F32, cache.shape());
    convert_to_f32(DType::BF16, cache.raw(), f.data<float>(), static_cast<size_t>(cache.numel()));
    cpu_->mla_attention(q, w_kv_b, f, layout, p, out);
  }

  void moe_experts(const Tensor& x, std::span<const ExpertWeights> experts, const Tensor& ids, const Tensor& weights,
                   Tensor& out, int64_t first_expert, const Tensor* addend) override {
    const int64_t t_count = x.dim(0), d = x.dim(1), k = ids.dim(1);
    std::fill(out.data<float>(), out.data<float>() + out.numel(), 0.0f);
    for (size_t e = 0; e < experts.size(); ++e) {
      std::vector<std::pair<int64_t, float>> toks;
      for (int64_t t = 0; t < t_count; ++t)
        for (int64_t j = 0; j < k; ++j)
          if (ids.data<int32_t>()[t * k + j] - first_expert == static_cast<int64_t>(e))
            toks.push_back({t, weights.data<float>()[t * k + j]});
      if (toks.empty()) continue;
      const int64_t n = static_cast<int64_t>(toks.size()), f = experts[e].gate.out_features();
      Tensor xe = Tensor::host(DType::F32, {n, d}), g = Tensor::host(DType::F32, {n, f}),
             u = Tensor::host(DType::F32, {n, f}), y = Tensor::host(DType::F32, {n, d});
      for (int64_t i = 0; i < n; ++i)
        std::copy_n(x.data<float>() + toks[static_cast<size_t>(i)].first * d, d, xe.data<float>() + i * d);
      linear(xe, experts[e].gate, g);
      linear(xe, experts[e].up, u);
      cpu_->silu_mul(g, u, g);
      linear(g, experts[e].down, y);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < d; ++c)
          out.data<float>()[toks[static_cast<size_t>(i)].first * d + c] +=
              y.data<float>()[i * d + c] * toks[static_cast<size_t>(i)].second;
    }
    if (addend) cpu_->add(out, *addend);
  }

 private:
  std::unique_ptr<Ops> cpu_;
  bool block_;
};

// Why the GPU tests cannot run here ("" when a device is visible).
std::string no_cuda_device() { return standin() ? std::string() : missing_cuda_device(); }

struct Gpu {
  std::string mode;  // BackendOptions::fp8_gemm
  std::unique_ptr<Ops> ops;
  std::string kernels = "reference";  // BackendOptions::kernels
  bool block() const { return mode == "block"; }
};

// Fresh backends for every test: the CPU reference (one thread) and the CUDA backend in each FP8
// GEMM mode. (Fresh, also because the CUDA backend keeps per-layer expert tables keyed by the
// address of the expert span, which must stay put for a backend's lifetime.)
class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string why = no_cuda_device();
    if (!why.empty()) GTEST_SKIP() << "no CUDA device: " << why;
    cpu_ = make_ops("cpu", 1);
    for (const char* mode : {"soft", "block"}) {
      BackendOptions o;
      o.fp8_gemm = mode;
      o.kernels = "reference";
      try {
        gpus_.push_back({mode, standin() ? std::unique_ptr<Ops>(std::make_unique<EmulatedCudaOps>(std::string(mode) == "block"))
                                         : make_ops("cuda", o)});
      } catch (const UserError& e) {
        if (std::string(mode) != "block") throw;
        std::cout << "[   NOTE   ] fp8_gemm=block is not available on this GPU; block-mode comparisons skipped: "
                  << e.what() << "\n";
      }
    }
    // The fast kernels (cuda.kernels=fast) take every test the reference kernels take.
    // fp8_gemm=block with them: the FP8 tensor-core kernel (grouped_fp8) for experts and for
    // block-scaled linears of few tokens.
    if (!standin()) {
      BackendOptions o;
      o.fp8_gemm = "soft";
      o.kernels = "fast";
      gpus_.push_back({"soft", make_ops("cuda", o), "fast"});
      o.fp8_gemm = "block";
      try {
        gpus_.push_back({"block", make_ops("cuda", o), "fast"});
      } catch (const UserError&) {
        // not on this GPU: noted above
      }
    }
  }
  Ops& cpu() { return *cpu_; }

  std::unique_ptr<Ops> cpu_;
  std::vector<Gpu> gpus_;
  std::mt19937_64 rng_{20261122};
};

// ---- host data and transfers ----------------------------------------------------------------

std::vector<float> uniform(std::mt19937_64& rng, size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

size_t numel(const Shape& s) {
  size_t n = 1;
  for (int64_t d : s) n *= static_cast<size_t>(d);
  return n;
}

Tensor to_device(Ops& ops, DType dtype, const Shape& shape, const void* src) {
  Tensor t = ops.empty(dtype, shape);
  if (t.nbytes() > 0) ops.copy_from_host(src, t);
  return t;
}

Tensor upload(Ops& ops, const Shape& shape, const std::vector<float>& v) {
  EXPECT_EQ(numel(shape), v.size());
  return to_device(ops, DType::F32, shape, v.data());
}

Tensor upload_i32(Ops& ops, const Shape& shape, const std::vector<int32_t>& v) {
  EXPECT_EQ(numel(shape), v.size());
  return to_device(ops, DType::I32, shape, v.data());
}

// All bytes 0xff: NaN in F32 and BF16, -1 in I32.
void poison(Ops& ops, Tensor& t) {
  if (t.nbytes() == 0) return;
  const std::vector<uint8_t> bytes(t.nbytes(), 0xff);
  ops.copy_from_host(bytes.data(), t);
}

Tensor poisoned(Ops& ops, DType dtype, const Shape& shape) {
  Tensor t = ops.empty(dtype, shape);
  poison(ops, t);
  return t;
}

template <class T>
std::vector<T> download(Ops& ops, const Tensor& t) {
  ops.synchronize();
  std::vector<T> v(t.nbytes() / sizeof(T));
  if (!v.empty()) ops.copy_to_host(t, v.data());
  return v;
}

bool is_poison(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b == 0xffffffffu;
}

// A host tensor of `dtype` holding `values` (converted; exact for F32).
Tensor host_tensor(DType dtype, const Shape& shape, const std::vector<float>& values) {
  Tensor t = Tensor::host(dtype, shape);
  for (size_t i = 0; i < values.size(); ++i) {
    if (dtype == DType::F32) t.data<float>()[i] = values[i];
    else if (dtype == DType::BF16) t.data<uint16_t>()[i] = f32_to_bf16(values[i]);
    else t.data<uint16_t>()[i] = f32_to_f16(values[i]);
  }
  return t;
}

// The values a host tensor of F32/BF16/F16 holds, as FP32.
std::vector<float> host_values(const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  convert_to_f32(t.dtype(), t.raw(), v.data(), v.size());
  return v;
}

// ---- comparisons -------------------------------------------------------------------------------

// |got[i] - want[i]| <= tol(i) everywhere (NaN fails). Reports the first failures and returns
// the largest |got - want| / tol.
template <class Tol>
double expect_close(const std::vector<float>& got, const std::vector<float>& want, Tol tol, const std::string& what) {
  EXPECT_EQ(got.size(), want.size()) << what;
  size_t bad = 0;
  double worst = 0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i])), t = tol(i);
    if (!(err <= t)) {
      if (++bad <= 5)
        ADD_FAILURE() << what << ": element " << i << ": got " << got[i] << ", want " << want[i] << " (|diff| " << err
                      << " > tolerance " << t << ")";
    } else if (t > 0) {
      worst = std::max(worst, err / t);
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements outside the tolerance";
  return worst;
}

// Equal values (a NaN anywhere fails; +0 == -0).
void expect_equal(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  expect_close(got, want, [](size_t) { return 0.0; }, what);
}

template <class T>
void expect_same_bits(const std::vector<T>& got, const std::vector<T>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0 && ++bad <= 5)
      ADD_FAILURE() << what << ": element " << i << " differs";
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements differ";
}

void note(const std::string& line) { std::cout << "[   STAT   ] " << line << "\n"; }

// ---- random weights -------------------------------------------------------------------------

std::string dtype_label(DType t) { return t == DType::F8E4M3 ? "FP8" : std::string(dtype_name(t)); }

// A linear weight as a checkpoint holds it, and the exact FP32 value of each element (the FP8
// value times its block scale, one FP32 rounding, as the reference model and the CPU backend).
struct HostLinear {
  DType dtype = DType::F32;
  Tensor weight, scale_inv;
  int64_t block_out = 0, block_in = 0;
  std::vector<float> exact;  // [out, in]
};

HostLinear random_linear(std::mt19937_64& rng, DType dtype, int64_t out, int64_t in, int64_t bo, int64_t bi,
                         float range = 1.0f) {
  HostLinear h;
  h.dtype = dtype;
  const size_t n = static_cast<size_t>(out * in);
  h.exact.resize(n);
  std::uniform_real_distribution<float> dist(-range, range);
  if (dtype == DType::F32 || dtype == DType::BF16) {
    std::vector<float> v(n);
    for (float& x : v) x = dist(rng);
    h.weight = host_tensor(dtype, {out, in}, v);
    h.exact = host_values(h.weight);
    return h;
  }
  h.block_out = bo;
  h.block_in = bi;
  const int64_t so = (out + bo - 1) / bo, si = (in + bi - 1) / bi;
  h.weight = Tensor::host(DType::F8E4M3, {out, in});
  h.scale_inv = Tensor::host(DType::F32, {so, si});
  // Scales such that |w| <= range, as amax/448 quantization gives.
  std::uniform_real_distribution<float> scale_dist(0.5f * range / 448.0f, range / 448.0f);
  for (int64_t i = 0; i < so * si; ++i) h.scale_inv.data<float>()[i] = scale_dist(rng);
  uint8_t* codes = h.weight.data<uint8_t>();
  for (size_t i = 0; i < n; i += 8) {
    uint64_t r = rng();
    for (size_t b = 0; b < 8 && i + b < n; ++b, r >>= 8) {
      uint8_t code = static_cast<uint8_t>(r & 0xff);
      if ((code & 0x7f) == 0x7f) code ^= 1;  // no NaN codes
      codes[i + b] = code;
    }
  }
  std::array<float, 256> value{};
  for (int c = 0; c < 256; ++c) value[static_cast<size_t>(c)] = fp8e4m3_to_f32(static_cast<uint8_t>(c));
  for (int64_t j = 0; j < out; ++j) {
    const float* srow = h.scale_inv.data<float>() + (j / bo) * si;
    for (int64_t i = 0; i < in; ++i) {
      const size_t k = static_cast<size_t>(j * in + i);
      h.exact[k] = value[codes[k]] * srow[i / bi];
    }
  }
  return h;
}

LinearWeight place(Ops& ops, const HostLinear& h) {
  return ops.place_linear(h.weight, h.scale_inv, h.block_out, h.block_in);
}

// ---- the GPU's linear error bound -------------------------------------------------------------

enum class GemmMath { Bf16, Fp8Block };

struct RowBound {
  double bound = 0;   // bound on |GPU - exact| for this output
  double sigma2 = 0;  // sum of the squared per-term rounding bounds
  double mag = 0;     // sum_i |x_i| |w_i|
};

// Per-128-channel scales of block-mode FP8 quantization: amax / 448 of each group of |x|.
std::vector<double> group_scales(const double* a, const double* dx, int64_t in) {
  std::vector<double> s(static_cast<size_t>((in + 127) / 128), 0.0);
  for (int64_t i = 0; i < in; ++i)
    s[static_cast<size_t>(i / 128)] =
        std::max(s[static_cast<size_t>(i / 128)], a[i] + (dx ? dx[static_cast<size_t>(i)] : 0.0));
  for (double& v : s) v /= 448.0;
  return s;
}

// One output of the GPU's linear, sum_i w_i x_i, against the exact product, where |x_i| <= a_i
// and x_i may already be off by dx_i (null: exact input). Per term:
//   BF16 math: x rounded to BF16, |dx| <= 2^-9 |x|; w rounded to BF16 too unless stored as BF16.
//   FP8 block: x quantized per 128 channels to e4m3 with scale s = amax/448: |dx| <= 2^-4 |x|
//     (normals) + 2^-10 s (subnormals); w exact. The term bound is doubled (the issue's 2^-3):
//     room for Hopper's FP8 tensor-core accumulation, which keeps fewer bits than FP32.
//   |x~ w~ - x w| <= ex |w| + |x| ew + ex ew.
// Plus the FP32 accumulation of `in` terms (n 2^-24 of the magnitudes, worst case), the CPU
// reference's own error (1e-5 of the magnitudes, asserted by tests/kernels/cpu_ops_test.cpp), and
// in block mode a BF16 rounding of the output (cuBLASLt may only have a BF16-output kernel):
// 2^-9 |y| <= 2^-9 of the magnitudes.
RowBound row_bound(const double* a, const double* dx, const float* w, int64_t in, bool w_is_bf16, GemmMath math,
                   const std::vector<double>& gscale) {
  RowBound r;
  for (int64_t i = 0; i < in; ++i) {
    const double ai = a[i] + (dx ? dx[i] : 0.0), wi = std::fabs(static_cast<double>(w[i]));
    double ex, ew;
    if (math == GemmMath::Bf16) {
      ex = kBf16Unit * ai;
      ew = w_is_bf16 ? 0.0 : kBf16Unit * wi;
    } else {
      ex = kFp8Unit * ai + kFp8SubnormalHalfStep * gscale[static_cast<size_t>(i / 128)];
      ew = 0.0;
    }
    const double term = ex * wi + ai * ew + ex * ew;
    r.sigma2 += term * term;
    r.bound += (math == GemmMath::Fp8Block ? 2.0 : 1.0) * term + (dx ? wi * dx[i] : 0.0);
    r.mag += ai * wi;
  }
  r.bound += (static_cast<double>(in) * kF32Unit + kF32Rel + (math == GemmMath::Fp8Block ? kBf16Unit : 0.0)) * r.mag;
  return r;
}

GemmMath math_of(const Gpu& g, DType weight_dtype) {
  return g.block() && weight_dtype == DType::F8E4M3 ? GemmMath::Fp8Block : GemmMath::Bf16;
}

// ---- linear + dequantize ----------------------------------------------------------------------

struct LinearCase {
  DType dtype;
  int64_t tokens, out, in, block_out, block_in;
};

std::string linear_name(const LinearCase& c) {
  std::string s = dtype_label(c.dtype) + "_T" + std::to_string(c.tokens) + "_" + std::to_string(c.out) + "x" +
                  std::to_string(c.in);
  if (c.dtype == DType::F8E4M3) s += "_b" + std::to_string(c.block_out) + "x" + std::to_string(c.block_in);
  return s;
}

class CudaLinear : public CudaOps, public ::testing::WithParamInterface<LinearCase> {};

TEST_P(CudaLinear, MatchesWithinGemmRounding) {
  const LinearCase c = GetParam();
  const HostLinear hw = random_linear(rng_, c.dtype, c.out, c.in, c.block_out, c.block_in);
  const std::vector<float> xv = uniform(rng_, static_cast<size_t>(c.tokens * c.in), -1.0f, 1.0f);

  LinearWeight wc = place(cpu(), hw);
  Tensor xc = upload(cpu(), {c.tokens, c.in}, xv), oc = poisoned(cpu(), DType::F32, {c.tokens, c.out});
  cpu().linear(xc, wc, oc);
  const std::vector<float> want = download<float>(cpu(), oc);

  for (Gpu& g : gpus_) {
    SCOPED_TRACE("fp8_gemm=" + g.mode + ", kernels=" + g.kernels);
    Ops& ops = *g.ops;
    LinearWeight wg = place(ops, hw);
    ASSERT_EQ(wg.out_features(), c.out);
    ASSERT_EQ(wg.in_features(), c.in);

    // dequantize: the exact FP32 weight. F32 weights are kept as BF16 by the CUDA backend (its
    // "form it computes with"), so there either the exact value or its BF16 rounding.
    const std::vector<float> deq = download<float>(ops, ops.dequantize(wg));
    ASSERT_EQ(deq.size(), hw.exact.size());
    size_t deq_bad = 0;
    for (size_t i = 0; i < deq.size(); ++i) {
      const bool ok = deq[i] == hw.exact[i] || (c.dtype == DType::F32 && deq[i] == round_bf16(hw.exact[i]));
      if (!ok && ++deq_bad <= 3) ADD_FAILURE() << "dequantize element " << i << ": " << deq[i] << " vs " << hw.exact[i];
    }
    EXPECT_EQ(deq_bad, 0u) << "dequantize is not exact";

    Tensor xg = upload(ops, {c.tokens, c.in}, xv), og = poisoned(ops, DType::F32, {c.tokens, c.out});
    ops.linear(xg, wg, og);
    const std::vector<float> got = download<float>(ops, og);
    ASSERT_EQ(got.size(), want.size());
    if (c.tokens == 0) continue;  // an empty batch: the call above must only not fail

    const GemmMath math = math_of(g, c.dtype);
    std::vector<double> bound(got.size()), sigma2(got.size()), mag(got.size());
    std::vector<double> a(static_cast<size_t>(c.in));
    for (int64_t t = 0; t < c.tokens; ++t) {
      for (int64_t i = 0; i < c.in; ++i) a[static_cast<size_t>(i)] = std::fabs(xv[static_cast<size_t>(t * c.in + i)]);
      const std::vector<double> gs = group_scales(a.data(), nullptr, c.in);
      for (int64_t j = 0; j < c.out; ++j) {
        const RowBound rb = row_bound(a.data(), nullptr, hw.exact.data() + j * c.in, c.in, c.dtype == DType::BF16, math, gs);
        const size_t k = static_cast<size_t>(t * c.out + j);
        bound[k] = rb.bound;
        sigma2[k] = rb.sigma2;
        mag[k] = rb.mag;
      }
    }
    const double worst =
        expect_close(got, want, [&](size_t i) { return bound[i]; }, "linear " + linear_name(c) + " [" + g.mode + "]");
    // Statistical check: the RMS error over all outputs against the per-term rounding bounds
    // added in quadrature (plus a random-walk FP32 accumulation allowance for both backends,
    // 4 sqrt(n) 2^-24 of the magnitudes). A wrong block scale or a dropped block shows here even
    // where the worst-case bound above is too loose to see it.
    double err2 = 0, thr_sig2 = 0, thr_acc2 = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double e = static_cast<double>(got[i]) - static_cast<double>(want[i]);
      err2 += e * e;
      thr_sig2 += sigma2[i];
      const double acc = 4.0 * std::sqrt(static_cast<double>(c.in)) * kF32Unit * mag[i];
      thr_acc2 += acc * acc;
    }
    const double n = static_cast<double>(got.size());
    const double rms = std::sqrt(err2 / n), rms_sigma = std::sqrt(thr_sig2 / n), rms_acc = std::sqrt(thr_acc2 / n);
    EXPECT_LE(rms, kStatFactor * rms_sigma + rms_acc)
        << "RMS error " << rms << " against a per-term rounding scale of " << rms_sigma;
    std::ostringstream s;
    s << "linear " << linear_name(c) << " [" << g.mode << "]: max |err|/bound " << std::setprecision(3) << worst
      << ", RMS err / RMS sigma " << (rms_sigma > 0 ? rms / rms_sigma : 0.0);
    note(s.str());
  }
}

INSTANTIATE_TEST_SUITE_P(
    Grid, CudaLinear,
    ::testing::Values(
        // FP8, 128x128 blocks: partial blocks in either dimension, one row / one column.
        LinearCase{DType::F8E4M3, 3, 200, 144, 128, 128}, LinearCase{DType::F8E4M3, 2, 1, 129, 128, 128},
        LinearCase{DType::F8E4M3, 1, 129, 1, 128, 128}, LinearCase{DType::F8E4M3, 4, 144, 200, 128, 128},
        LinearCase{DType::F8E4M3, 0, 144, 200, 128, 128}, LinearCase{DType::F8E4M3, 300, 200, 144, 128, 128},
        LinearCase{DType::F8E4M3, 17, 256, 512, 128, 128},
        // The golden checkpoints' o_proj (144 x 128) and its neighbours: one K block, partial N block.
        LinearCase{DType::F8E4M3, 3, 144, 128, 128, 128}, LinearCase{DType::F8E4M3, 40, 144, 128, 128, 128},
        LinearCase{DType::F8E4M3, 40, 256, 128, 128, 128}, LinearCase{DType::F8E4M3, 40, 144, 256, 128, 128},
        LinearCase{DType::F8E4M3, 40, 576, 7168, 128, 128},
        // R1: kv_a_proj (576 rows: 4.5 blocks), q_a_proj at T = 1..4, o_proj-like, q_b with 16 heads.
        LinearCase{DType::F8E4M3, 1, 576, 7168, 128, 128}, LinearCase{DType::F8E4M3, 1, 1536, 7168, 128, 128},
        LinearCase{DType::F8E4M3, 2, 1536, 7168, 128, 128}, LinearCase{DType::F8E4M3, 3, 1536, 7168, 128, 128},
        LinearCase{DType::F8E4M3, 4, 1536, 7168, 128, 128}, LinearCase{DType::F8E4M3, 2, 7168, 2048, 128, 128},
        LinearCase{DType::F8E4M3, 3, 3072, 1536, 128, 128},
        // FP8 with smaller blocks (block mode falls back to soft for these).
        LinearCase{DType::F8E4M3, 3, 70, 45, 32, 64}, LinearCase{DType::F8E4M3, 5, 100, 200, 32, 64},
        LinearCase{DType::F8E4M3, 1, 33, 129, 32, 64}, LinearCase{DType::F8E4M3, 64, 96, 128, 32, 64},
        LinearCase{DType::F8E4M3, 0, 33, 129, 32, 64}, LinearCase{DType::F8E4M3, 2, 17, 150, 16, 64},
        // BF16 (the BF16 checkpoints; lm_head-like widths).
        LinearCase{DType::BF16, 1, 1, 1, 0, 0}, LinearCase{DType::BF16, 3, 64, 129, 0, 0},
        LinearCase{DType::BF16, 0, 64, 129, 0, 0}, LinearCase{DType::BF16, 4, 1536, 7168, 0, 0},
        LinearCase{DType::BF16, 2, 2000, 7168, 0, 0}, LinearCase{DType::BF16, 64, 256, 512, 0, 0},
        LinearCase{DType::BF16, 40, 200, 512, 0, 0}, LinearCase{DType::F8E4M3, 70, 1000, 256, 128, 128},
        // BF16 at up to 4 rows with K a multiple of 8 (cuda::bf16_gemv): one row, a partial last
        // round of loads (K = 1032), three rows in the 4-row form, one 16-byte piece a row.
        LinearCase{DType::BF16, 1, 4001, 7168, 0, 0}, LinearCase{DType::BF16, 3, 37, 1032, 0, 0},
        LinearCase{DType::BF16, 2, 5, 8, 0, 0},
        // F32 (tensor-parallel slices dequantized on the host).
        LinearCase{DType::F32, 5, 23, 37, 0, 0}, LinearCase{DType::F32, 2, 300, 576, 0, 0},
        LinearCase{DType::F32, 0, 23, 37, 0, 0}, LinearCase{DType::F32, 1, 1, 1, 0, 0}),
    [](const ::testing::TestParamInfo<LinearCase>& param_info) { return linear_name(param_info.param); });

// ---- rms_norm, add_rms_norm -------------------------------------------------------------------

struct NormCase {
  int64_t rows, width, d;
};

TEST_F(CudaOps, RmsNormFirstColumnsInAndOutOfPlace) {
  const float eps = 1e-6f;
  for (const NormCase c : {NormCase{1, 7168, 7168}, NormCase{4, 7168, 7168}, NormCase{5, 1536, 1536},
                           NormCase{6, 576, 512}, NormCase{3, 144, 144}, NormCase{2, 80, 64}, NormCase{7, 200, 200},
                           NormCase{1, 1, 1}, NormCase{0, 7168, 7168}}) {
    const std::string what = "rms_norm " + std::to_string(c.rows) + "x" + std::to_string(c.width) + " d " +
                             std::to_string(c.d);
    SCOPED_TRACE(what);
    const std::vector<float> xv = uniform(rng_, static_cast<size_t>(c.rows * c.width), -3.0f, 3.0f);
    // The norm weight as a checkpoint holds it (BF16), placed by place_vector as FP32.
    const Tensor w_host = host_tensor(DType::BF16, {c.d}, uniform(rng_, static_cast<size_t>(c.d), 0.5f, 1.5f));
    const std::vector<float> w_exact = host_values(w_host);

    Tensor xc = upload(cpu(), {c.rows, c.width}, xv), oc = poisoned(cpu(), DType::F32, {c.rows, c.width});
    Tensor wc = cpu().place_vector(w_host);
    cpu().rms_norm(xc, wc, eps, oc);
    cpu().rms_norm(xc, wc, eps, xc);
    const std::vector<float> want = download<float>(cpu(), oc), want_inplace = download<float>(cpu(), xc);

    for (Gpu& g : gpus_) {
      Ops& ops = *g.ops;
      Tensor wg = ops.place_vector(w_host);
      expect_equal(download<float>(ops, wg), w_exact, "place_vector of a BF16 norm weight");
      Tensor xg = upload(ops, {c.rows, c.width}, xv), og = poisoned(ops, DType::F32, {c.rows, c.width});
      ops.rms_norm(xg, wg, eps, og);
      const std::vector<float> got = download<float>(ops, og);
      ASSERT_EQ(got.size(), want.size());
      // kF32Rel: see its comment (a mean of d squares, rsqrtf, two products).
      std::vector<float> head_got, head_want;
      for (int64_t r = 0; r < c.rows; ++r)
        for (int64_t i = 0; i < c.width; ++i) {
          const size_t k = static_cast<size_t>(r * c.width + i);
          if (i < c.d) {
            head_got.push_back(got[k]);
            head_want.push_back(want[k]);
          } else {
            ASSERT_TRUE(is_poison(got[k])) << "column " << i << " >= d of row " << r << " was written";
          }
        }
      expect_close(head_got, head_want, [&](size_t i) { return kF32Rel * std::fabs(head_want[i]) + 1e-37; },
                   what + " [" + g.mode + "]");
      // In place: the columns past d keep the input exactly.
      ops.rms_norm(xg, wg, eps, xg);
      const std::vector<float> got_inplace = download<float>(ops, xg);
      ASSERT_EQ(got_inplace.size(), want_inplace.size());
      for (size_t k = 0; k < got_inplace.size(); ++k) {
        const int64_t i = static_cast<int64_t>(k) % c.width;
        if (i >= c.d) {
          ASSERT_EQ(got_inplace[k], xv[k]) << "in place: column " << i << " changed";
        }
      }
      expect_close(got_inplace, want_inplace, [&](size_t i) { return kF32Rel * std::fabs(want_inplace[i]) + 1e-37; },
                   what + " in place [" + g.mode + "]");
    }
  }
}

TEST_F(CudaOps, AddRmsNormAddsTheResidualThenNormalizes) {
  const float eps = 1e-6f;
  for (const NormCase c : {NormCase{3, 7168, 7168}, NormCase{1, 144, 144}, NormCase{2, 576, 512},
                           NormCase{0, 7168, 7168}}) {
    const std::string what = "add_rms_norm " + std::to_string(c.rows) + "x" + std::to_string(c.width) + " d " +
                             std::to_string(c.d);
    SCOPED_TRACE(what);
    const size_t n = static_cast<size_t>(c.rows * c.width);
    const std::vector<float> xv = uniform(rng_, n, -3.0f, 3.0f), yv = uniform(rng_, n, -1.0f, 1.0f);
    const Tensor w_host = host_tensor(DType::F32, {c.d}, uniform(rng_, static_cast<size_t>(c.d), 0.5f, 1.5f));
    Tensor xc = upload(cpu(), {c.rows, c.width}, xv), yc = upload(cpu(), {c.rows, c.width}, yv);
    Tensor oc = poisoned(cpu(), DType::F32, {c.rows, c.width}), wc = cpu().place_vector(w_host);
    cpu().add_rms_norm(xc, yc, wc, eps, oc);
    const std::vector<float> want_x = download<float>(cpu(), xc), want = download<float>(cpu(), oc);
    for (Gpu& g : gpus_) {
      Ops& ops = *g.ops;
      Tensor xg = upload(ops, {c.rows, c.width}, xv), yg = upload(ops, {c.rows, c.width}, yv);
      Tensor og = poisoned(ops, DType::F32, {c.rows, c.width}), wg = ops.place_vector(w_host);
      ops.add_rms_norm(xg, yg, wg, eps, og);
      // x + y: one correctly rounded FP32 addition on both backends, so exact.
      expect_equal(download<float>(ops, xg), want_x, what + " residual [" + g.mode + "]");
      const std::vector<float> got = download<float>(ops, og);
      ASSERT_EQ(got.size(), want.size());
      for (size_t k = 0; k < got.size(); ++k) {
        const int64_t i = static_cast<int64_t>(k) % c.width;
        if (i >= c.d) {
          ASSERT_TRUE(is_poison(got[k])) << "column " << i << " >= d was written";
        } else {
          ASSERT_NEAR(got[k], want[k], kF32Rel * std::fabs(want[k]) + 1e-37) << what << " element " << k;
        }
      }
    }
  }
}

// ---- embedding, gather_rows, add, silu_mul, concat_columns, argmax ----------------------------

TEST_F(CudaOps, EmbeddingIsExactIncludingShardRowsOutsideTheTable) {
  struct Case {
    DType dtype;
    int64_t rows, dim, first_id;
    std::vector<int32_t> ids;
  };
  std::vector<int32_t> many(9);
  for (int32_t& id : many) id = static_cast<int32_t>(rng_() % 2048);
  many[3] = many[7];  // a repeated token
  const std::vector<Case> cases = {
      {DType::BF16, 2048, 7168, 0, many},              // R1 width, BF16 table
      {DType::BF16, 2048, 7168, 0, {2047}},            // one token
      {DType::BF16, 2048, 7168, 0, {}},                // empty batch
      {DType::F32, 50, 96, 100, {99, 100, 149, 150, 120, 100, 0}},  // vocabulary shard [100, 150)
      {DType::F16, 30, 40, 0, {29, 0, 13}},
  };
  for (const Case& c : cases) {
    const std::string what = "embedding " + dtype_label(c.dtype) + " " + std::to_string(c.rows) + "x" +
                             std::to_string(c.dim) + " first " + std::to_string(c.first_id) + " T " +
                             std::to_string(c.ids.size());
    SCOPED_TRACE(what);
    const Tensor table = host_tensor(c.dtype, {c.rows, c.dim},
                                     uniform(rng_, static_cast<size_t>(c.rows * c.dim), -2.0f, 2.0f));
    const int64_t t = static_cast<int64_t>(c.ids.size());
    Tensor tc = cpu().place_embedding(table), oc = poisoned(cpu(), DType::F32, {t, c.dim});
    cpu().embedding(tc, c.ids, oc, c.first_id);
    const std::vector<float> want = download<float>(cpu(), oc);
    for (Gpu& g : gpus_) {
      Ops& ops = *g.ops;
      Tensor tg = ops.place_embedding(table), og = poisoned(ops, DType::F32, {t, c.dim});
      ops.embedding(tg, c.ids, og, c.first_id);
      expect_equal(download<float>(ops, og), want, what + " [" + g.mode + "]");  // conversion to FP32 is exact
    }
  }
}

TEST_F(CudaOps, GatherRowsIsExact) {
  struct Case {
    int64_t tokens, width;
    std::vector<int32_t> rows;
  };
  for (const Case& c : {Case{37, 7168, {36, 0, 5, 5, 36, 17}}, Case{3, 1, {2}}, Case{1, 144, {0}},
                        Case{5, 7168, {}}}) {
    SCOPED_TRACE("gather " + std::to_string(c.rows.size()) + " of " + std::to_string(c.tokens));
    const std::vector<float> xv = uniform(rng_, static_cast<size_t>(c.tokens * c.width), -1.0f, 1.0f);
    const int64_t n = static_cast<int64_t>(c.rows.size());
    Tensor xc = upload(cpu(), {c.tokens, c.width}, xv), oc = poisoned(cpu(), DType::F32, {n, c.width});
    cpu().gather_rows(xc, c.rows, oc);
    const std::vector<float> want = download<float>(cpu(), oc);
    for (Gpu& g : gpus_) {
      Ops& ops = *g.ops;
      Tensor xg = upload(ops, {c.tokens, c.width}, xv), og = poisoned(ops, DType::F32, {n, c.width});
      ops.gather_rows(xg, c.rows, og);
      expect_same_bits(download<float>(ops, og), want, "gather_rows [" + g.mode + "]");
    }
  }
}

TEST_F(CudaOps, AddIsExact) {
  // One correctly rounded FP32 addition per element on both backends: bit-identical.
  for (const Shape& shape : {Shape{4, 7168}, Shape{1, 1}, Shape{3, 129}, Shape{0, 7168}}) {
    SCOPED_TRACE("add " + shape_str(shape));
    const std::vector<float> xv = uniform(rng_, numel(shape), -4.0f, 4.0f), yv = uniform(rng_, numel(shape), -4.0f, 4.0f);
    Tensor xc = upload(cpu(), shape, xv), yc = upload(cpu(), shape, yv);
    cpu().add(xc, yc);
    const std::vector<float> want = download<float>(cpu(), xc);
    for (Gpu& g : gpus_) {
      Ops& ops = *g.ops;
      Tensor xg = upload(ops, shape, xv), yg = upload(ops, shape, yv);
      ops.add(xg, yg);
      expect_same_bits(download<float>(ops, xg), want, "add [" + g.mode + "]");
    }
  }
}

// Side work (Ops::begin_side .. join_side, a second stream on the GPU): the same results, bit for
// bit, as the same ops in order, with the side and the main ops each allocating and releasing
// scratch (the arena must not hand a block in use on one stream to the other) and each running
// linears (decode-size GEMVs and, at 40 rows, cuBLASLt with its own workspace); repeated, since
// a begin_side must follow the last join_side.
TEST_F(CudaOps, SideWorkMatchesTheSameOpsInOrder) {
  const int64_t d = 1024, f = 512;
  const HostLinear w1 = random_linear(rng_, DType::F8E4M3, f, d, 128, 128);
  const HostLinear w2 = random_linear(rng_, DType::F8E4M3, d, f, 128, 128);
  const HostLinear w3 = random_linear(rng_, DType::F8E4M3, f, d, 128, 128);
  for (int64_t t : {int64_t{1}, int64_t{40}}) {
    const std::vector<float> xv = uniform(rng_, static_cast<size_t>(t * d), -1.0f, 1.0f);
    for (Gpu& g : gpus_) {
      SCOPED_TRACE("T " + std::to_string(t) + ", fp8_gemm=" + g.mode + ", kernels=" + g.kernels);
      Ops& ops = *g.ops;
      const LinearWeight l1 = place(ops, w1), l2 = place(ops, w2), l3 = place(ops, w3);
      Tensor x = upload(ops, {t, d}, xv);
      auto run = [&](bool side) {
        Tensor a = ops.empty(DType::F32, {t, d}), m = ops.empty(DType::F32, {t, f});
        for (int rep = 0; rep < 3; ++rep) {
          if (side) ops.begin_side();
          {
            Tensor h = ops.empty(DType::F32, {t, f});
            ops.linear(x, l1, h);
            ops.silu_mul(h, h, h);
            ops.linear(h, l2, a);
          }
          if (side) ops.end_side();
          {
            Tensor h = ops.empty(DType::F32, {t, f}), u = ops.empty(DType::F32, {t, f});
            ops.linear2(x, l3, h, l1, u);
            ops.add(h, u);
            ops.copy(h, m);
          }
          if (side) ops.join_side();
          ops.add(a, x);
        }
        return std::make_pair(download<float>(ops, a), download<float>(ops, m));
      };
      const auto plain = run(false), side = run(true);
      expect_same_bits(side.first, plain.first, "side work's output");
      expect_same_bits(side.second, plain.second, "main work's output");
    }
  }
}

TEST_F(CudaOps, SiluMulWithinFewUlpInAndOutOfPlace) {
  for (const Shape& shape : {Shape{1, 2048}, Shape{3, 2048}, Shape{4, 18432}, Shape{3, 129}, Shape{1, 1},
                             Shape{0, 2048}}) {
    SCOPED_TRACE("silu_mul " + shape_str(shape));
    std::vector<float> gv = uniform(rng_, numel(shape), -8.0f, 8.0f);
    const std::vector<float> uv = uniform(rng_, numel(shape), -2.0f, 2.0f);
    // Saturating arguments: exp overflows to inf (silu -> -0) or the result is tiny.
    const float extremes[] = {-100.0f, -90.0f, -80.0f, -30.0f, 30.0f, 90.0f, 0.0f};
    for (size_t i = 0; i < std::min(gv.size(), std::size(extremes)); ++i) gv[i * 3 % gv.size()] = extremes[i];
    Tensor gc = upload(cpu(), shape, gv), uc = upload(cpu(), shape, uv), oc = poisoned(cpu(), DType::F32, shape);
    cpu().silu_mul(gc, uc, oc);
    const std::vector<float> want = download<float>(cpu(), oc);
    // expf (2 ulp), a division and a product: kF32Rel; the absolute 1e-37 covers results the
    // GPU may flush to zero below FLT_MIN.
    auto tol = [&](size_t i) { return kF32Rel * std::fabs(want[i]) + 1e-37; };
    for (Gpu& g : gpus_) {
      Ops& ops = *g.ops;
      Tensor gg = upload(ops, shape, gv), ug = upload(ops, shape, uv), og = poisoned(ops, DType::F32, shape);
      ops.silu_mul(gg, ug, og);
      expect_close(download<float>(ops, og), want, tol, "silu_mul [" + g.mode + "]");
      ops.silu_mul(gg, ug, gg);  // in place, as the model calls it
      expect_close(download<float>(ops, gg), want, tol, "silu_mul in place [" + g.mode + "]");
    }
  }
}

TEST_F(CudaOps, ConcatColumnsIsExact) {
  struct Case {
    int64_t parts, n, wp, w;
  };
  // One part; a padded last part; R1's 129280-token vocabulary in 8 shards of 16160; an empty
  // batch; single columns.
  for (const Case c : {Case{1, 3, 10, 10}, Case{4, 5, 7, 25}, Case{8, 2, 16160, 129280}, Case{3, 0, 5, 13},
                       Case{2, 1, 1, 2}, Case{3, 2, 4, 9}}) {
    SCOPED_TRACE("concat " + std::to_string(c.parts) + "x" + std::to_string(c.n) + "x" + std::to_string(c.wp) +
                 " -> " + std::to_string(c.w));
    const std::vector<float> pv = uniform(rng_, static_cast<size_t>(c.parts * c.n * c.wp), -5.0f, 5.0f);
    Tensor pc = upload(cpu(), {c.parts, c.n, c.wp}, pv), oc = poisoned(cpu(), DType::F32, {c.n, c.w});
    cpu().concat_columns(pc, oc);
    const std::vector<float> want = download<float>(cpu(), oc);
    for (Gpu& g : gpus_) {
      Ops& ops = *g.ops;
      Tensor pg = upload(ops, {c.parts, c.n, c.wp}, pv), og = poisoned(ops, DType::F32, {c.n, c.w});
      ops.concat_columns(pg, og);
      expect_same_bits(download<float>(ops, og), want, "concat_columns [" + g.mode + "]");
    }
  }
}

TEST_F(CudaOps, ArgmaxTakesTheFirstMaximum) {
  const float inf = std::numeric_limits<float>::infinity();
  struct Case {
    int64_t n, v;
    std::vector<float> values;
  };
  std::vector<Case> cases = {
      {5, 4, {1, 3, 3, 2, -inf, -inf, -5, -inf, 7, 7, 7, 7, 0, -1, -2, 9, -0.0f, 0.0f, -1, -1}},
      {1, 1, {-3}},
      {2, 3, {-inf, -inf, -inf, 2, 2, 1}},  // all -inf: index 0
      {0, 129280, {}},
  };
  // R1's vocabulary: random rows with the maximum planted twice, far apart (the first wins),
  // at the ends, and once only.
  Case big{5, 129280, uniform(rng_, 5 * 129280, -20.0f, 20.0f)};
  auto plant = [&](int64_t row, int64_t col, float v) { big.values[static_cast<size_t>(row * big.v + col)] = v; };
  plant(0, 100000, 50.0f);
  plant(0, 5, 50.0f);
  plant(1, 129279, 50.0f);
  plant(2, 0, 50.0f);
  plant(2, 129279, 50.0f);
  plant(3, 64000, 50.0f);
  plant(3, 64001, 50.0f);
  plant(4, 77777, 21.0f);
  cases.push_back(big);
  for (const Case& c : cases) {
    SCOPED_TRACE("argmax " + std::to_string(c.n) + "x" + std::to_string(c.v));
    Tensor lc = upload(cpu(), {c.n, c.v}, c.values);
    const std::vector<int32_t> want = cpu().argmax(lc);
    ASSERT_EQ(static_cast<int64_t>(want.size()), c.n);
    for (Gpu& g : gpus_) {
      Tensor lg = upload(*g.ops, {c.n, c.v}, c.values);
      EXPECT_EQ(g.ops->argmax(lg), want) << g.mode;
    }
  }
}

// ---- rope ----------------------------------------------------------------------------------------

// R1's YaRN frequencies (factor 40 on 4096 positions, qk_rope_head_dim 64) and cos/sin scale.
RopeTable r1_rope() {
  ModelConfig c;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.rope_theta = 10000.0;
  c.max_position_embeddings = 163840;
  RopeScaling y;
  y.factor = 40.0;
  y.original_max_position_embeddings = 4096;
  y.beta_fast = 32.0;
  y.beta_slow = 1.0;
  y.mscale = 1.0;
  y.mscale_all_dim = 1.0;
  c.rope_scaling = y;
  return make_rope_table(c);
}

TEST_F(CudaOps, RopeRotatesTheGivenColumnsOnly) {
  struct Case {
    std::string name;
    int64_t tokens, n, width, offset;
    std::vector<float> inv_freq;
    float factor;
    std::vector<int32_t> pos;
  };
  const RopeTable r1 = r1_rope();
  std::vector<float> small(5);
  for (size_t i = 0; i < small.size(); ++i) small[i] = std::pow(10000.0f, -2.0f * static_cast<float>(i) / 10.0f);
  const std::vector<Case> cases = {
      {"R1 queries", 6, 16, 192, 128, r1.inv_freq, r1.attention_factor, {0, 1, 63, 4096, 100000, 163839}},
      {"R1 cache entries", 4, 1, 576, 512, r1.inv_freq, r1.attention_factor, {0, 5, 64, 1000}},
      {"R1 one token", 1, 16, 192, 128, r1.inv_freq, r1.attention_factor, {7}},
      {"small, factor 1.3", 4, 3, 20, 6, small, 1.3f, {0, 1, 17, 3001}},
      {"empty batch", 0, 16, 192, 128, r1.inv_freq, r1.attention_factor, {}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE("rope " + c.name);
    const Shape shape{c.tokens, c.n, c.width};
    const std::vector<float> xv = uniform(rng_, numel(shape), -1.0f, 1.0f);
    Tensor xc = upload(cpu(), shape, xv);
    cpu().rope(xc, c.offset, c.pos, c.inv_freq, c.factor);
    const std::vector<float> want = download<float>(cpu(), xc);
    const int64_t end = c.offset + 2 * static_cast<int64_t>(c.inv_freq.size());
    for (Gpu& g : gpus_) {
      Ops& ops = *g.ops;
      Tensor xg = upload(ops, shape, xv);
      ops.rope(xg, c.offset, c.pos, c.inv_freq, c.factor);
      const std::vector<float> got = download<float>(ops, xg);
      // Rotated columns: both backends form the angle pos * inv_freq with one FP32 multiply (the
      // same float), then cosf/sinf (within 2 ulp at any argument) and two products and a sum:
      // kF32Rel of the pair's magnitude. Other columns are untouched: exact.
      expect_close(got, want,
                   [&](size_t k) {
                     const int64_t col = static_cast<int64_t>(k) % c.width;
                     if (col < c.offset || col >= end) return 0.0;
                     const size_t pair = k - static_cast<size_t>((col - c.offset) % 2);
                     return kF32Rel * c.factor * (std::fabs(xv[pair]) + std::fabs(xv[pair + 1]));
                   },
                   "rope " + c.name + " [" + g.mode + "]");
    }
  }
}

// ---- cache_write ----------------------------------------------------------------------------------

// The cache as the CPU would hold it, in the GPU's cache dtype: every slot the CPU wrote rounded
// to BF16 (exact when the cache is F32), every other slot still poisoned.
void expect_cache_matches(Ops& gpu, const Tensor& gpu_cache, const std::vector<float>& cpu_cache, const std::string& what) {
  if (gpu_cache.dtype() == DType::F32) {
    expect_same_bits(download<float>(gpu, gpu_cache), cpu_cache, what);
    return;
  }
  ASSERT_EQ(gpu_cache.dtype(), DType::BF16) << what;
  const std::vector<uint16_t> got = download<uint16_t>(gpu, gpu_cache);
  std::vector<uint16_t> want(cpu_cache.size());
  for (size_t i = 0; i < want.size(); ++i) want[i] = is_poison(cpu_cache[i]) ? uint16_t{0xffff} : f32_to_bf16(cpu_cache[i]);
  expect_same_bits(got, want, what);
}

TEST_F(CudaOps, CacheWriteRoundsEachEntryIntoItsSlotOnly) {
  struct Case {
    int64_t blocks, bs, width;
    std::vector<int64_t> slots;
  };
  std::vector<int64_t> r1_slots(20 * 64);
  std::iota(r1_slots.begin(), r1_slots.end(), 0);
  std::shuffle(r1_slots.begin(), r1_slots.end(), rng_);
  r1_slots.resize(100);
  for (const Case& c : {Case{4, 3, 5, {7, 0, 11}}, Case{20, 64, 576, r1_slots}, Case{2, 64, 576, {127}},
                        Case{2, 64, 576, {}}}) {
    SCOPED_TRACE("cache_write of " + std::to_string(c.slots.size()) + " entries of " + std::to_string(c.width));
    AttentionLayout layout;
    layout.block_size = c.bs;
    layout.token_slot = c.slots;
    const int64_t t = static_cast<int64_t>(c.slots.size());
    const std::vector<float> ev = uniform(rng_, static_cast<size_t>(t * c.width), -3.0f, 3.0f);
    Tensor cc = cpu().allocate_persistent(cpu().cache_dtype(), {c.blocks, c.bs, c.width});
    poison(cpu(), cc);
    Tensor ec = upload(cpu(), {t, c.width}, ev);
    cpu().cache_write(cc, ec, layout);
    const std::vector<float> want = download<float>(cpu(), cc);
    for (Gpu& g : gpus_) {
      Ops& ops = *g.ops;
      Tensor cg = ops.allocate_persistent(ops.cache_dtype(), {c.blocks, c.bs, c.width});
      poison(ops, cg);
      Tensor eg = upload(ops, {t, c.width}, ev);
      ops.cache_write(cg, eg, layout);
      expect_cache_matches(ops, cg, want, "cache [" + g.mode + "]");
    }
  }
}

// ---- mla_attention ------------------------------------------------------------------------------

struct MlaCase {
  std::string name;
  int64_t h, nope, r, c, v, bs;
  std::vector<int64_t> seq_len;
  std::vector<std::pair<int32_t, int32_t>> queries;  // (sequence, position)
  float scale;
  DType kv_b_dtype;
  int64_t kv_b_block_out, kv_b_block_in;
};

// R1's softmax scale: qk_head_dim^-0.5 * mscale(40, 1)^2.
const float kR1SoftmaxScale =
    static_cast<float>(std::pow(192.0, -0.5) * std::pow(0.1 * std::log(40.0) + 1.0, 2.0));

// Every case also with the wgmma core forced (BackendOptions::mla_core; R1's shapes with a
// multiple of 64 heads on an sm_90a build and device, else the mma core again), and with the
// split BF16 absorptions forced (BackendOptions::mla_absorb; wherever kv_b has a split form) under
// each core, since the automatic choices take them only where a batch fills the GPU.
class CudaMla : public CudaOps, public ::testing::WithParamInterface<MlaCase> {
 protected:
  void SetUp() override {
    CudaOps::SetUp();
    if (IsSkipped() || standin()) return;
    struct Variant {
      const char *core, *absorb, *prefill;
    };
    for (const Variant& v : {Variant{"wgmma", "f32", "absorbed"}, Variant{"wgmma", "bf16x3", "absorbed"},
                             Variant{"mma", "bf16x3", "absorbed"}, Variant{"auto", "auto", "expanded"}}) {
      BackendOptions o;
      o.fp8_gemm = "soft";
      o.kernels = "fast";
      o.mla_core = v.core;
      o.mla_absorb = v.absorb;
      o.mla_prefill = v.prefill;
      gpus_.push_back({"soft", make_ops("cuda", o),
                       std::string("fast, mla_core=") + v.core + ", mla_absorb=" + v.absorb + ", mla_prefill=" + v.prefill});
    }
  }
};

TEST_P(CudaMla, MatchesWithinBf16CacheRounding) {
  const MlaCase mc = GetParam();
  const int64_t h = mc.h, nope = mc.nope, r = mc.r, c = mc.c, v = mc.v, width = c + r, bs = mc.bs;
  MlaParams p;
  p.num_heads = h;
  p.qk_nope_head_dim = nope;
  p.qk_rope_head_dim = r;
  p.kv_lora_rank = c;
  p.v_head_dim = v;
  p.softmax_scale = mc.scale;

  // Block tables from a shuffled pool with spare blocks: a read of a block or slot no token
  // wrote hits poison and fails.
  AttentionLayout layout;
  layout.block_size = bs;
  int64_t needed = 0;
  for (int64_t len : mc.seq_len) needed += (len + bs - 1) / bs;
  const int64_t num_blocks = needed + 3;
  std::vector<int32_t> pool(static_cast<size_t>(num_blocks));
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng_);
  size_t next = 0;
  for (int64_t len : mc.seq_len) {
    std::vector<int32_t> blocks;
    for (int64_t b = 0; b < (len + bs - 1) / bs; ++b) blocks.push_back(pool[next++]);
    layout.block_tables.push_back(blocks);
  }
  auto slot_of = [&](int64_t seq, int64_t pos) {
    return static_cast<int64_t>(layout.block_tables[static_cast<size_t>(seq)][static_cast<size_t>(pos / bs)]) * bs +
           pos % bs;
  };

  // Every sequence's entries, written in a shuffled order: [normalized latent (C) | key (R)].
  AttentionLayout write;
  write.block_size = bs;
  for (size_t s = 0; s < mc.seq_len.size(); ++s)
    for (int64_t j = 0; j < mc.seq_len[s]; ++j) write.token_slot.push_back(slot_of(static_cast<int64_t>(s), j));
  std::shuffle(write.token_slot.begin(), write.token_slot.end(), rng_);
  const int64_t n_entries = static_cast<int64_t>(write.token_slot.size());
  const std::vector<float> ev = uniform(rng_, static_cast<size_t>(n_entries * width), -1.0f, 1.0f);

  for (const auto& [seq, pos] : mc.queries) {
    layout.token_seq.push_back(seq);
    layout.token_pos.push_back(pos);
    layout.token_slot.push_back(slot_of(seq, pos));
  }
  const int64_t t_count = static_cast<int64_t>(mc.queries.size());
  const Shape cache_shape{num_blocks, bs, width};

  const HostLinear kv_b = random_linear(rng_, mc.kv_b_dtype, h * (nope + v), c, mc.kv_b_block_out, mc.kv_b_block_in,
                                        0.2f);
  const std::vector<float> qv = uniform(rng_, static_cast<size_t>(t_count * h * (nope + r)), -2.0f, 2.0f);

  // CPU on the F32 entries, and on the entries rounded as the GPU's cache holds them.
  Tensor w_cpu = cpu().dequantize(place(cpu(), kv_b));
  const std::vector<float> w = download<float>(cpu(), w_cpu);
  auto run_cpu = [&](const std::vector<float>& entries) {
    Tensor cache = cpu().allocate_persistent(cpu().cache_dtype(), cache_shape);
    poison(cpu(), cache);
    Tensor e = upload(cpu(), {n_entries, width}, entries);
    cpu().cache_write(cache, e, write);
    Tensor q = upload(cpu(), {t_count, h, nope + r}, qv), out = poisoned(cpu(), DType::F32, {t_count, h * v});
    cpu().mla_attention(q, w_cpu, cache, layout, p, out);
    return std::make_pair(download<float>(cpu(), out), download<float>(cpu(), cache));
  };
  const auto [want, cpu_cache] = run_cpu(ev);

  for (Gpu& g : gpus_) {
    SCOPED_TRACE("fp8_gemm=" + g.mode + ", kernels=" + g.kernels);
    Ops& ops = *g.ops;
    const MlaWeight w_gpu = ops.place_mla_kv_b(place(ops, kv_b), p);
    // The bounds below assume both backends use the same W: dequantize is exact on both.
    expect_same_bits(download<float>(ops, w_gpu.w), w, "dequantized kv_b");
    // The split form (the fast kernels', unless mla_absorb=f32) exists where C, v and nope are
    // multiples of 8 and each head's W_UK rows and W_UV rows lie in one row block of the scales:
    // in every case but small (v = 6) and odd_widths_prefill (a head's rows across two blocks).
    bool one_block = c % 8 == 0 && v % 8 == 0 && nope % 8 == 0;
    for (int64_t head = 0; head < h && mc.kv_b_dtype == DType::F8E4M3; ++head) {
      const int64_t r0 = head * (nope + v), bo = mc.kv_b_block_out;
      one_block = one_block && r0 / bo == (r0 + nope - 1) / bo && (r0 + nope) / bo == (r0 + nope + v - 1) / bo;
    }
    const bool splits = g.kernels.starts_with("fast") && g.kernels.find("mla_absorb=f32") == std::string::npos;
    EXPECT_EQ(w_gpu.split.defined(), splits && one_block) << "kv_b's split form";
    // The expanded form exists for R1's widths and the golden models' with the fast kernels
    // unless mla_prefill=absorbed. Forced (mla_prefill=expanded), it runs for every token of these
    // cases: their scratch is within its floor of 64 MiB.
    const bool expanded_widths = (nope == 128 && r == 64 && v == 128) || (nope == 32 && r == 16 && v == 32);
    EXPECT_EQ(w_gpu.expand.defined(), g.kernels.starts_with("fast") &&
                                          g.kernels.find("mla_prefill=absorbed") == std::string::npos &&
                                          expanded_widths)
        << "kv_b's expanded form";
    Tensor cache = ops.allocate_persistent(ops.cache_dtype(), cache_shape);
    poison(ops, cache);
    Tensor e = upload(ops, {n_entries, width}, ev);
    ops.cache_write(cache, e, write);
    expect_cache_matches(ops, cache, cpu_cache, "cache");
    Tensor q = upload(ops, {t_count, h, nope + r}, qv), out = poisoned(ops, DType::F32, {t_count, h * v});
    ops.mla_attention(q, w_gpu, cache, layout, p, out);
    const std::vector<float> got = download<float>(ops, out);
    ASSERT_EQ(got.size(), want.size());
    if (t_count == 0) continue;

    const bool bf16_cache = ops.cache_dtype() == DType::BF16;
    std::vector<float> rounded = ev;
    if (bf16_cache)
      for (float& x : rounded) x = round_bf16(x);
    const std::vector<float> want_rounded = bf16_cache ? run_cpu(rounded).first : want;

    // Entry j of sequence s as the GPU reads it.
    std::vector<const float*> entry_at(static_cast<size_t>(num_blocks * bs), nullptr);
    for (int64_t i = 0; i < n_entries; ++i)
      entry_at[static_cast<size_t>(write.token_slot[static_cast<size_t>(i)])] = rounded.data() + i * width;

    // Bounds per output, from magnitudes computed in double on the entries the GPU reads:
    //   M_i = sum_k |W_UV[i,k]| O_k with O_k = sum_j p_j |c_jk| (|out_i| <= M_i);
    //   tight (against the CPU on the same rounded entries): kMlaF32 * M_i;
    //   derived (against the CPU on the F32 entries): BF16 rounding moves each entry by at most
    //     2^-9 of itself, so each score s_j by at most d_j = 2^-9 * scale * (sum_k |q_lat_k|
    //     |c_jk| + sum |q_rope| |k_j|); with D = max_j d_j the softmax weights move by at most
    //     p_j (e^{2D} - 1), and out_i = sum_j p_j W_UV c_j by at most
    //     ((e^{2D} - 1)(1 + 2^-9) + 2^-9) M_i, times 1.01 for M taken on rounded entries.
    std::vector<double> tight(got.size()), derived(got.size());
    std::vector<double> q_lat(static_cast<size_t>(c)), o_mag(static_cast<size_t>(c));
    for (int64_t t = 0; t < t_count; ++t) {
      const int64_t seq = layout.token_seq[static_cast<size_t>(t)], ctx = layout.token_pos[static_cast<size_t>(t)] + 1;
      for (int64_t head = 0; head < h; ++head) {
        const float* qh = qv.data() + (t * h + head) * (nope + r);
        const float* w_uk = w.data() + head * (nope + v) * c;
        const float* w_uv = w_uk + nope * c;
        std::fill(q_lat.begin(), q_lat.end(), 0.0);
        for (int64_t i = 0; i < nope; ++i)
          for (int64_t k = 0; k < c; ++k) q_lat[static_cast<size_t>(k)] += static_cast<double>(qh[i]) * w_uk[i * c + k];
        std::vector<double> s(static_cast<size_t>(ctx));
        double smax = -1e300, dmax = 0;
        for (int64_t j = 0; j < ctx; ++j) {
          const float* e_j = entry_at[static_cast<size_t>(slot_of(seq, j))];
          double dot = 0, mag = 0;
          for (int64_t k = 0; k < c; ++k) {
            dot += q_lat[static_cast<size_t>(k)] * e_j[k];
            mag += std::fabs(q_lat[static_cast<size_t>(k)] * e_j[k]);
          }
          for (int64_t k = 0; k < r; ++k) {
            dot += static_cast<double>(qh[nope + k]) * e_j[c + k];
            mag += std::fabs(static_cast<double>(qh[nope + k]) * e_j[c + k]);
          }
          s[static_cast<size_t>(j)] = dot * mc.scale;
          smax = std::max(smax, s[static_cast<size_t>(j)]);
          dmax = std::max(dmax, kBf16Unit * mc.scale * mag);
        }
        double denom = 0;
        for (double& x : s) denom += (x = std::exp(x - smax));
        std::fill(o_mag.begin(), o_mag.end(), 0.0);
        for (int64_t j = 0; j < ctx; ++j) {
          const float* e_j = entry_at[static_cast<size_t>(slot_of(seq, j))];
          const double pj = s[static_cast<size_t>(j)] / denom;
          for (int64_t k = 0; k < c; ++k) o_mag[static_cast<size_t>(k)] += pj * std::fabs(e_j[k]);
        }
        const double grow = (std::exp(2.0 * dmax) - 1.0) * (1.0 + kBf16Unit) + kBf16Unit;
        for (int64_t i = 0; i < v; ++i) {
          double m = 0;
          for (int64_t k = 0; k < c; ++k) m += std::fabs(static_cast<double>(w_uv[i * c + k])) * o_mag[static_cast<size_t>(k)];
          const size_t o = static_cast<size_t>((t * h + head) * v + i);
          tight[o] = kMlaF32 * m;
          derived[o] = (bf16_cache ? 1.01 * grow * m : 0.0) + tight[o];
        }
      }
    }
    const double worst_tight = expect_close(got, want_rounded, [&](size_t i) { return tight[i]; },
                                            "mla " + mc.name + " against the CPU on the same BF16 entries");
    const double worst_derived = expect_close(got, want, [&](size_t i) { return derived[i]; },
                                              "mla " + mc.name + " against the CPU on F32 entries");
    std::ostringstream s;
    s << "mla " << mc.name << " [" << g.mode << ", " << g.kernels << "]: max |err|/tight bound " << std::setprecision(3) << worst_tight
      << ", max |err|/derived BF16 bound " << worst_derived;
    note(s.str());
  }
}

std::vector<std::pair<int32_t, int32_t>> last_tokens(const std::vector<int64_t>& lens) {
  std::vector<std::pair<int32_t, int32_t>> q;
  for (size_t s = 0; s < lens.size(); ++s) q.push_back({static_cast<int32_t>(s), static_cast<int32_t>(lens[s] - 1)});
  return q;
}

std::vector<MlaCase> mla_cases() {
  std::vector<MlaCase> cases;
  // R1 with 16 local heads (tp 8): contexts 1, 63, 64, 65 and 1000 over blocks of 64, each
  // sequence's last token plus earlier positions (a prefill's rows, across block boundaries).
  const std::vector<int64_t> r1_lens = {1, 63, 64, 65, 1000};
  std::vector<std::pair<int32_t, int32_t>> r1_q = last_tokens(r1_lens);
  for (auto sp : {std::pair<int32_t, int32_t>{4, 0}, {4, 500}, {4, 998}, {3, 63}, {3, 64}, {2, 0}}) r1_q.push_back(sp);
  cases.push_back({"R1_contexts_1_63_64_65_1000", 16, 128, 64, 512, 128, 64, r1_lens, r1_q, kR1SoftmaxScale,
                   DType::F8E4M3, 128, 128});
  cases.push_back({"R1_decode_T1_ctx1000", 16, 128, 64, 512, 128, 64, {1000}, {{0, 999}}, kR1SoftmaxScale,
                   DType::F8E4M3, 128, 128});
  cases.push_back({"R1_single_token_prompt", 16, 128, 64, 512, 128, 64, {1}, {{0, 0}}, kR1SoftmaxScale, DType::F8E4M3,
                   128, 128});
  // Small shapes as in tests/kernels/cpu_ops_test.cpp, and odd widths (C = 40) with blocks of 3.
  cases.push_back({"small", 3, 8, 4, 16, 6, 4, {10, 6}, {{0, 9}, {1, 5}, {0, 0}, {0, 4}, {1, 3}}, 0.37f, DType::BF16,
                   0, 0});
  std::vector<std::pair<int32_t, int32_t>> odd_q = last_tokens({7, 1, 20});
  for (int32_t pos = 0; pos < 19; ++pos) odd_q.push_back({2, pos});
  cases.push_back({"odd_widths_prefill", 5, 16, 8, 40, 24, 3, {7, 1, 20}, odd_q, 0.25f, DType::F8E4M3, 32, 64});
  cases.push_back({"empty_batch", 16, 128, 64, 512, 128, 64, {65}, {}, kR1SoftmaxScale, DType::F8E4M3, 128, 128});
  // All 128 heads of one GPU (eight head groups of the fused kernel) over a decode batch of
  // contexts 1..1500: the fused path splits these contexts over blocks and merges the splits.
  const std::vector<int64_t> batch_lens = {1500, 1000, 257, 64, 33, 1};
  cases.push_back({"R1_128_heads_decode_batch", 128, 128, 64, 512, 128, 64, batch_lens, last_tokens(batch_lens),
                   kR1SoftmaxScale, DType::F8E4M3, 128, 128});
  // Eight decode rows, the most that the automatic choice takes as GEMVs (cuda::kMlaGemvMaxTokens),
  // and nine, the fewest it takes as F32 GEMMs.
  const std::vector<int64_t> lens8 = {300, 1, 64, 65, 129, 7, 200, 33}, lens9 = {300, 1, 64, 65, 129, 7, 200, 33, 2};
  cases.push_back({"R1_decode_8_rows", 16, 128, 64, 512, 128, 64, lens8, last_tokens(lens8), kR1SoftmaxScale,
                   DType::F8E4M3, 128, 128});
  cases.push_back({"R1_decode_9_rows", 16, 128, 64, 512, 128, 64, lens9, last_tokens(lens9), kR1SoftmaxScale,
                   DType::F8E4M3, 128, 128});
  // bench/mla_bench.cpp's shapes, two sequences each (the full and half context).
  for (const MlaBenchShape& s : kMlaBenchShapes) {
    const std::vector<int64_t> lens = {s.context, s.context / 2};
    cases.push_back({std::string("bench_") + s.name, s.heads, 128, 64, 512, 128, 64, lens, last_tokens(lens),
                     kR1SoftmaxScale, DType::F8E4M3, 128, 128});
  }
  // Heads not a multiple of the fused kernel's group (20 = 16 + 4), a prefill's rows.
  std::vector<std::pair<int32_t, int32_t>> ragged_q = last_tokens({90, 40});
  for (int32_t pos = 0; pos < 40; pos += 3) ragged_q.push_back({1, pos});
  cases.push_back({"R1_20_heads_prefill", 20, 128, 64, 512, 128, 64, {90, 40}, ragged_q, kR1SoftmaxScale,
                   DType::F8E4M3, 128, 128});
  // The golden models' widths (nope 32, R 16, C 48, v 32): the split absorptions' tails in N, K
  // and M (71 rows: 64 + 7), past kMlaSplitMinTokens.
  std::vector<std::pair<int32_t, int32_t>> tails_q = last_tokens({70, 9});
  for (int32_t pos = 0; pos < 69; ++pos) tails_q.push_back({0, pos});
  cases.push_back({"golden_widths_prefill", 4, 32, 16, 48, 32, 16, {70, 9}, tails_q, 0.3f, DType::F8E4M3, 128, 128});
  // A prefill of 72 rows plus a decode row over 128 heads (eight head groups, 73 tokens).
  std::vector<std::pair<int32_t, int32_t>> wide_q = last_tokens({72, 300});
  for (int32_t pos = 0; pos < 71; ++pos) wide_q.push_back({0, pos});
  cases.push_back({"R1_128_heads_prefill_73_rows", 128, 128, 64, 512, 128, 64, {72, 300}, wide_q, kR1SoftmaxScale,
                   DType::F8E4M3, 128, 128});
  // Whole prompts of 200 and 129 tokens (the expanded form's 64-row tiles, a partial last tile),
  // in an interleaved token order.
  std::vector<std::pair<int32_t, int32_t>> full_q;
  for (int32_t pos = 0; pos < 200; ++pos) {
    full_q.push_back({0, pos});
    if (pos < 129) full_q.push_back({1, pos});
  }
  cases.push_back({"R1_prefill_200_and_129", 16, 128, 64, 512, 128, 64, {200, 129}, full_q, kR1SoftmaxScale,
                   DType::F8E4M3, 128, 128});
  // A prompt's second chunk (positions 100..249 over a context of 250 already cached) beside a
  // whole prompt of 70.
  std::vector<std::pair<int32_t, int32_t>> chunk_q;
  for (int32_t pos = 100; pos < 250; ++pos) chunk_q.push_back({0, pos});
  for (int32_t pos = 0; pos < 70; ++pos) chunk_q.push_back({1, pos});
  cases.push_back({"R1_prefill_second_chunk", 16, 128, 64, 512, 128, 64, {250, 70}, chunk_q, kR1SoftmaxScale,
                   DType::F8E4M3, 128, 128});
  // A 300-token prompt beside three decode rows: with mla_prefill=auto (the plain fast variants)
  // the prompt runs expanded and the decode rows absorbed, gathered and scattered back.
  std::vector<std::pair<int32_t, int32_t>> mixed_q = {{1, 999}};
  for (int32_t pos = 0; pos < 300; ++pos) mixed_q.push_back({0, pos});
  mixed_q.push_back({2, 499});
  mixed_q.push_back({3, 64});
  cases.push_back({"R1_prefill_beside_decode_rows", 16, 128, 64, 512, 128, 64, {300, 1000, 500, 65}, mixed_q,
                   kR1SoftmaxScale, DType::F8E4M3, 128, 128});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Grid, CudaMla, ::testing::ValuesIn(mla_cases()),
                         [](const ::testing::TestParamInfo<MlaCase>& param_info) { return param_info.param.name; });

// ---- moe_route ------------------------------------------------------------------------------------

struct RouteCase {
  std::string name;
  int64_t tokens, d, experts, top_k, n_group, topk_group;
  bool norm, with_bias;
  float scale;
  DType gate_dtype;
};

class CudaMoeRoute : public CudaOps, public ::testing::WithParamInterface<RouteCase> {};

TEST_P(CudaMoeRoute, SameExpertsAwayFromTiesSameWeights) {
  const RouteCase rc = GetParam();
  const int64_t t_count = rc.tokens, d = rc.d, e_count = rc.experts, k = rc.top_k;
  const int64_t per_group = e_count / rc.n_group;
  const std::vector<float> xv = uniform(rng_, static_cast<size_t>(t_count * d), -1.0f, 1.0f);
  // Logits with a standard deviation of about 1.5 whatever D (sigmoid scores across (0, 1)).
  const float gr = 4.5f / std::sqrt(static_cast<float>(d));
  const Tensor gate_host = host_tensor(rc.gate_dtype, {e_count, d}, uniform(rng_, static_cast<size_t>(e_count * d), -gr, gr));
  const Tensor bias_host = host_tensor(DType::F32, {e_count}, uniform(rng_, static_cast<size_t>(e_count), -0.2f, 0.2f));
  const std::vector<float> gv = host_values(gate_host), bv = host_values(bias_host);
  RouterParams p;
  p.num_experts = e_count;
  p.top_k = k;
  p.n_group = rc.n_group;
  p.topk_group = rc.topk_group;
  p.norm_topk_prob = rc.norm;
  p.routed_scaling_factor = rc.scale;

  auto route = [&](Ops& ops) {
    Tensor x = upload(ops, {t_count, d}, xv), gate = ops.place_vector(gate_host);
    Tensor bias = rc.with_bias ? ops.place_vector(bias_host) : Tensor();
    Tensor ids = poisoned(ops, DType::I32, {t_count, k}), weights = poisoned(ops, DType::F32, {t_count, k});
    ops.moe_route(x, gate, bias, p, ids, weights);
    return std::make_pair(download<int32_t>(ops, ids), download<float>(ops, weights));
  };
  const auto [want_ids, want_w] = route(cpu());

  // The reference choice in double, and how close each token is to a tie at a cut.
  std::vector<std::set<int32_t>> choice(static_cast<size_t>(t_count));
  std::vector<bool> near_tie(static_cast<size_t>(t_count), false);
  for (int64_t t = 0; t < t_count; ++t) {
    std::vector<double> biased(static_cast<size_t>(e_count));
    for (int64_t e = 0; e < e_count; ++e) {
      double logit = 0;
      for (int64_t i = 0; i < d; ++i)
        logit += static_cast<double>(xv[static_cast<size_t>(t * d + i)]) * gv[static_cast<size_t>(e * d + i)];
      biased[static_cast<size_t>(e)] = 1.0 / (1.0 + std::exp(-logit)) + (rc.with_bias ? bv[static_cast<size_t>(e)] : 0.0);
    }
    std::vector<double> group_score(static_cast<size_t>(rc.n_group));
    for (int64_t g = 0; g < rc.n_group; ++g) {
      std::vector<double> s(biased.begin() + g * per_group, biased.begin() + (g + 1) * per_group);
      std::sort(s.rbegin(), s.rend());
      group_score[static_cast<size_t>(g)] = s[0] + (s.size() > 1 ? s[1] : 0.0);
    }
    std::vector<int64_t> groups(static_cast<size_t>(rc.n_group));
    std::iota(groups.begin(), groups.end(), 0);
    std::sort(groups.begin(), groups.end(),
              [&](int64_t a, int64_t b) { return group_score[static_cast<size_t>(a)] > group_score[static_cast<size_t>(b)]; });
    bool tie = false;
    if (rc.topk_group < rc.n_group)
      tie |= group_score[static_cast<size_t>(groups[static_cast<size_t>(rc.topk_group - 1)])] -
                 group_score[static_cast<size_t>(groups[static_cast<size_t>(rc.topk_group)])] <
             kRouteTieGap;
    std::vector<int64_t> cand;
    for (int64_t gi = 0; gi < rc.topk_group; ++gi)
      for (int64_t e = groups[static_cast<size_t>(gi)] * per_group; e < (groups[static_cast<size_t>(gi)] + 1) * per_group; ++e)
        cand.push_back(e);
    std::sort(cand.begin(), cand.end(),
              [&](int64_t a, int64_t b) { return biased[static_cast<size_t>(a)] > biased[static_cast<size_t>(b)]; });
    if (static_cast<int64_t>(cand.size()) > k)
      tie |= biased[static_cast<size_t>(cand[static_cast<size_t>(k - 1)])] - biased[static_cast<size_t>(cand[static_cast<size_t>(k)])] <
             kRouteTieGap;
    near_tie[static_cast<size_t>(t)] = tie;
    for (int64_t j = 0; j < k; ++j) choice[static_cast<size_t>(t)].insert(static_cast<int32_t>(cand[static_cast<size_t>(j)]));
  }
  const int64_t ties = std::count(near_tie.begin(), near_tie.end(), true);
  EXPECT_LE(ties * 4, t_count) << "test data too close to ties: " << ties << " of " << t_count << " tokens skipped";

  for (Gpu& g : gpus_) {
    SCOPED_TRACE("fp8_gemm=" + g.mode + ", kernels=" + g.kernels);
    const auto [ids, w] = route(*g.ops);
    ASSERT_EQ(ids.size(), want_ids.size());
    ASSERT_EQ(w.size(), want_w.size());
    for (int64_t t = 0; t < t_count; ++t) {
      if (near_tie[static_cast<size_t>(t)]) continue;
      // Compared as (expert, weight) pairs: the order within a token's top-k is not part of the
      // contract (moe_experts sums in expert order whatever it is).
      std::map<int32_t, float> got_pairs, want_pairs;
      for (int64_t j = 0; j < k; ++j) {
        const size_t i = static_cast<size_t>(t * k + j);
        got_pairs[ids[i]] = w[i];
        want_pairs[want_ids[i]] = want_w[i];
      }
      ASSERT_EQ(static_cast<int64_t>(got_pairs.size()), k) << "token " << t << ": an expert chosen twice (or poison)";
      std::set<int32_t> got_set, want_set;
      for (const auto& [e, wt] : got_pairs) got_set.insert(e);
      for (const auto& [e, wt] : want_pairs) want_set.insert(e);
      EXPECT_EQ(want_set, choice[static_cast<size_t>(t)]) << "the CPU's choice for token " << t;
      ASSERT_EQ(got_set, want_set) << "token " << t;
      for (const auto& [e, want_weight] : want_pairs)
        EXPECT_NEAR(got_pairs[e], want_weight, kRouteWeightRel * std::fabs(want_weight)) << "token " << t << " expert " << e;
    }
  }
  if (t_count > 0) note("moe_route " + rc.name + ": " + std::to_string(ties) + " of " + std::to_string(t_count) +
                        " tokens skipped as near ties");
}

INSTANTIATE_TEST_SUITE_P(
    Grid, CudaMoeRoute,
    ::testing::Values(
        // R1: 256 experts, 8 groups of 32, top-4 groups, 8 per token, D = 7168, BF16 router weight.
        RouteCase{"R1", 64, 7168, 256, 8, 8, 4, true, true, 2.5f, DType::BF16},
        RouteCase{"R1_T1", 1, 7168, 256, 8, 8, 4, true, true, 2.5f, DType::BF16},
        // The most tokens of the fast kernels' router GEMV (cuda::kRouterGemvMaxTokens), and a narrow D.
        RouteCase{"R1_T8", 8, 7168, 256, 8, 8, 4, true, true, 2.5f, DType::BF16},
        RouteCase{"narrow_T8", 8, 36, 16, 4, 4, 2, true, true, 2.5f, DType::F32},
        RouteCase{"grouped_16", 24, 32, 16, 4, 4, 2, true, true, 2.5f, DType::F32},
        RouteCase{"two_per_group", 24, 32, 16, 3, 8, 3, true, true, 1.0f, DType::F32},
        RouteCase{"ungrouped_no_norm", 24, 144, 12, 3, 1, 1, false, true, 2.5f, DType::BF16},
        RouteCase{"no_bias", 24, 32, 10, 3, 1, 1, true, false, 1.0f, DType::F32},
        RouteCase{"v2lite_like", 16, 2048, 64, 6, 1, 1, true, true, 1.0f, DType::BF16},
        // Past the one-warp-per-token kernel (256 experts, 32 groups): the block kernel.
        RouteCase{"wide_512", 12, 64, 512, 8, 8, 4, true, true, 2.5f, DType::F32},
        RouteCase{"groups_64", 12, 64, 256, 8, 64, 8, true, true, 2.5f, DType::F32},
        RouteCase{"empty_batch", 0, 7168, 256, 8, 8, 4, true, true, 2.5f, DType::BF16}),
    [](const ::testing::TestParamInfo<RouteCase>& param_info) { return param_info.param.name; });

// ---- moe_experts ----------------------------------------------------------------------------------

struct MoeCase {
  std::string name;
  DType dtype;
  int64_t tokens, d, f, total_experts, local, first, k, block_out, block_in;
  bool hot = false;  // every token also routed to expert `first` (a step whose routing piles up)
};

class CudaMoeExperts : public CudaOps, public ::testing::WithParamInterface<MoeCase> {};

TEST_P(CudaMoeExperts, MatchesWithinTwoGemmLayers) {
  const MoeCase mc = GetParam();
  const int64_t t_count = mc.tokens, d = mc.d, f = mc.f, k = mc.k;
  // Weights scaled like N(0, 1/fan_in) layers: hidden values of order 1.
  std::vector<std::array<HostLinear, 3>> experts;
  for (int64_t e = 0; e < mc.local; ++e)
    experts.push_back({random_linear(rng_, mc.dtype, f, d, mc.block_out, mc.block_in, 2.0f / std::sqrt(static_cast<float>(d))),
                       random_linear(rng_, mc.dtype, f, d, mc.block_out, mc.block_in, 2.0f / std::sqrt(static_cast<float>(d))),
                       random_linear(rng_, mc.dtype, d, f, mc.block_out, mc.block_in, 2.0f / std::sqrt(static_cast<float>(f)))});
  // Distinct experts per token in a shuffled order, some of this rank's, some other ranks'
  // (skipped), one local expert without tokens when there are several.
  std::vector<int32_t> idv;
  for (int64_t t = 0; t < t_count; ++t) {
    std::set<int32_t> row;
    if (mc.hot) row.insert(static_cast<int32_t>(mc.first));
    const int64_t locals = std::min<int64_t>(1 + t % 2, std::min(k, std::max<int64_t>(mc.local - 1, 1)));
    while (static_cast<int64_t>(row.size()) < locals)
      row.insert(static_cast<int32_t>(mc.first + static_cast<int64_t>(rng_() % static_cast<uint64_t>(std::max<int64_t>(mc.local - 1, 1)))));
    while (static_cast<int64_t>(row.size()) < k) {
      const int64_t id = static_cast<int64_t>(rng_() % static_cast<uint64_t>(mc.total_experts));
      if (mc.local > 1 && id == mc.first + mc.local - 1) continue;  // the local expert left without tokens
      row.insert(static_cast<int32_t>(id));
    }
    std::vector<int32_t> shuffled(row.begin(), row.end());
    std::shuffle(shuffled.begin(), shuffled.end(), rng_);
    idv.insert(idv.end(), shuffled.begin(), shuffled.end());
  }
  const std::vector<float> wv = uniform(rng_, static_cast<size_t>(t_count * k), 0.1f, 1.0f);
  const std::vector<float> xv = uniform(rng_, static_cast<size_t>(t_count * d), -1.0f, 1.0f);

  auto run = [&](Ops& ops) {
    std::vector<ExpertWeights> placed;
    for (const auto& e : experts) placed.push_back({place(ops, e[0]), place(ops, e[1]), place(ops, e[2])});
    Tensor x = upload(ops, {t_count, d}, xv), ids = upload_i32(ops, {t_count, k}, idv), w = upload(ops, {t_count, k}, wv);
    Tensor out = poisoned(ops, DType::F32, {t_count, d});
    ops.moe_experts(x, placed, ids, w, out, mc.first);
    return download<float>(ops, out);
  };
  const std::vector<float> want = run(cpu());
  // The same with an addend (the shared expert's output): out + addend as add() makes it, bit for bit.
  const std::vector<float> addv = uniform(rng_, static_cast<size_t>(t_count * d), -2.0f, 2.0f);
  auto run_added = [&](Ops& ops, const std::vector<float>& plain) {
    std::vector<ExpertWeights> placed;
    for (const auto& e : experts) placed.push_back({place(ops, e[0]), place(ops, e[1]), place(ops, e[2])});
    Tensor x = upload(ops, {t_count, d}, xv), ids = upload_i32(ops, {t_count, k}, idv), w = upload(ops, {t_count, k}, wv);
    Tensor add = upload(ops, {t_count, d}, addv), out = poisoned(ops, DType::F32, {t_count, d});
    ops.moe_experts(x, placed, ids, w, out, mc.first, &add);
    Tensor sum = upload(ops, {t_count, d}, plain);
    ops.add(sum, add);
    expect_equal(download<float>(ops, out), download<float>(ops, sum), "moe_experts with an addend");
  };
  run_added(cpu(), want);

  for (Gpu& g : gpus_) {
    SCOPED_TRACE("fp8_gemm=" + g.mode + ", kernels=" + g.kernels);
    const std::vector<float> got = run(*g.ops);
    ASSERT_EQ(got.size(), want.size());
    run_added(*g.ops, got);
    if (t_count == 0) continue;
    // Bound through the two layers, per token t and output o, summed over the token's local
    // experts with |weight|:
    //   gate/up: G, U exact; errG, errU = row_bound(x) (the linear bound above).
    //   h = silu(G) U: |dh| <= |silu(G)| errU + 1.1 errG (|U| + errU) (silu' <= 1.1) plus kF32Rel
    //     of the magnitudes for expf and the division.
    //   down: y_o = sum_i wd_oi h~_i: row_bound with inputs |h| off by dh, which adds
    //     sum_i |wd_oi| dh_i and rounds (|h| + dh) as the layer's input.
    //   out: weight * y summed over experts in FP32 (1e-6 of the magnitudes), and the CPU's own
    //     error (kF32Rel of its magnitudes as in tests/kernels/cpu_ops_test.cpp).
    const GemmMath math = math_of(g, mc.dtype);
    const bool bf16w = mc.dtype == DType::BF16;
    std::vector<double> tol(got.size(), 0.0);
    std::vector<double> ax(static_cast<size_t>(d)), ah(static_cast<size_t>(f)), dh(static_cast<size_t>(f)),
        hm(static_cast<size_t>(f));
    for (int64_t t = 0; t < t_count; ++t) {
      for (int64_t i = 0; i < d; ++i) ax[static_cast<size_t>(i)] = std::fabs(xv[static_cast<size_t>(t * d + i)]);
      const std::vector<double> gs_x = group_scales(ax.data(), nullptr, d);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = idv[static_cast<size_t>(t * k + j)] - mc.first;
        if (e < 0 || e >= mc.local) continue;
        const double wgt = std::fabs(wv[static_cast<size_t>(t * k + j)]);
        const auto& ex = experts[static_cast<size_t>(e)];
        for (int64_t i = 0; i < f; ++i) {
          const float* wg_row = ex[0].exact.data() + i * d;
          const float* wu_row = ex[1].exact.data() + i * d;
          double gval = 0, uval = 0;
          for (int64_t c = 0; c < d; ++c) {
            gval += static_cast<double>(xv[static_cast<size_t>(t * d + c)]) * wg_row[c];
            uval += static_cast<double>(xv[static_cast<size_t>(t * d + c)]) * wu_row[c];
          }
          const RowBound bg = row_bound(ax.data(), nullptr, wg_row, d, bf16w, math, gs_x);
          const RowBound bu = row_bound(ax.data(), nullptr, wu_row, d, bf16w, math, gs_x);
          const double silu = gval / (1.0 + std::exp(-gval));
          const size_t ii = static_cast<size_t>(i);
          ah[ii] = std::fabs(silu * uval);
          dh[ii] = std::fabs(silu) * bu.bound + 1.1 * bg.bound * (std::fabs(uval) + bu.bound) +
                   kF32Rel * (std::fabs(silu) + 1.1 * bg.bound) * (std::fabs(uval) + bu.bound);
          hm[ii] = (std::fabs(silu) + bg.mag) * (std::fabs(uval) + bu.mag);  // the CPU test's error scale
        }
        const std::vector<double> gs_h = group_scales(ah.data(), dh.data(), f);
        for (int64_t o = 0; o < d; ++o) {
          const float* wd_row = ex[2].exact.data() + o * f;
          const RowBound bd = row_bound(ah.data(), dh.data(), wd_row, f, bf16w, math, gs_h);
          double cpu_mag = 0;
          for (int64_t i = 0; i < f; ++i) cpu_mag += std::fabs(static_cast<double>(wd_row[i])) * hm[static_cast<size_t>(i)];
          tol[static_cast<size_t>(t * d + o)] += wgt * (bd.bound + 1e-6 * bd.mag + kF32Rel * cpu_mag);
        }
      }
    }
    const double worst = expect_close(got, want, [&](size_t i) { return tol[i]; }, "moe_experts " + mc.name);
    std::ostringstream s;
    s << "moe_experts " << mc.name << " [" << g.mode << "]: max |err|/bound " << std::setprecision(3) << worst;
    note(s.str());
  }
}

INSTANTIATE_TEST_SUITE_P(
    Grid, CudaMoeExperts,
    ::testing::Values(
        // r1_fp8's expert shapes: hidden 144 (128 + a partial block), 32 wide.
        MoeCase{"FP8_144x32_b128", DType::F8E4M3, 33, 144, 32, 8, 8, 0, 3, 128, 128},
        // Block-aligned widths (the shapes block-mode GEMMs take).
        MoeCase{"FP8_512x256_b128", DType::F8E4M3, 9, 512, 256, 6, 6, 0, 2, 128, 128},
        MoeCase{"FP8_200x72_b32x64", DType::F8E4M3, 6, 200, 72, 5, 5, 0, 2, 32, 64},
        // An expert-parallel shard: experts [8, 12) of 16 on this rank.
        MoeCase{"BF16_shard_8_of_16", DType::BF16, 12, 96, 16, 16, 4, 8, 4, 0, 0},
        MoeCase{"F32_40x24", DType::F32, 7, 40, 24, 6, 6, 0, 2, 0, 0},
        MoeCase{"FP8_one_token", DType::F8E4M3, 1, 144, 32, 8, 8, 0, 3, 128, 128},
        // R1: D 7168, 2048 wide, 8 of 256 experts per token, 3 of them on this rank.
        MoeCase{"R1_3_local_of_256", DType::F8E4M3, 2, 7168, 2048, 256, 3, 100, 8, 128, 128},
        // The tensor-core kernel (cuda.kernels=fast): groups of many rows (several 64-row passes),
        // BF16 weights, and output widths that end inside a 16-row MMA tile.
        MoeCase{"FP8_512x256_many_rows", DType::F8E4M3, 200, 512, 256, 8, 8, 0, 6, 128, 128},
        MoeCase{"BF16_256x192_many_rows", DType::BF16, 40, 256, 192, 8, 8, 0, 4, 0, 0},
        MoeCase{"FP8_256x136_partial_tile", DType::F8E4M3, 20, 256, 136, 8, 8, 0, 4, 128, 128},
        MoeCase{"FP8_320x200_b32x64", DType::F8E4M3, 24, 320, 200, 6, 6, 0, 3, 32, 64},
        // Split K (few rows): decode of one and of three tokens.
        MoeCase{"BF16_2048x1024_one_token", DType::BF16, 1, 2048, 1024, 8, 8, 0, 2, 0, 0},
        MoeCase{"FP8_4096x2048_three_tokens", DType::F8E4M3, 3, 4096, 2048, 16, 16, 0, 4, 128, 128},
        // One hot expert among many light ones (48 and 100 rows, past one 16- or 32-row pass of
        // grouped_fp8's streamed kernel: several passes over its weights).
        MoeCase{"FP8_hot_expert_few_rows", DType::F8E4M3, 48, 256, 128, 64, 64, 0, 4, 128, 128, true},
        MoeCase{"FP8_hot_expert_some_rows", DType::F8E4M3, 100, 256, 128, 64, 64, 0, 8, 128, 128, true},
        // Between 4 and 8 rows a group on average (the streamed kernel's 16-row tiles with 6
        // stages, as decode at 256 tokens over 256 experts), with a hot expert (64 rows: four
        // passes) and with an output width ending inside an MMA tile.
        MoeCase{"FP8_hot_expert_mid_rows", DType::F8E4M3, 64, 256, 128, 64, 64, 0, 6, 128, 128, true},
        MoeCase{"FP8_256x136_mid_rows", DType::F8E4M3, 12, 256, 136, 8, 8, 0, 4, 128, 128},
        // Prefill's groups (more than 16 rows a group): on sm_90a the wgmma kernel, 128-row passes
        // past 64 rows a group on average (a hot expert: three passes; an output width of three
        // column blocks), 64-row passes below.
        MoeCase{"FP8_1024x256_prefill_rows", DType::F8E4M3, 256, 1024, 256, 8, 8, 0, 4, 128, 128},
        MoeCase{"FP8_hot_expert_prefill_rows", DType::F8E4M3, 300, 512, 384, 16, 16, 0, 6, 128, 128, true},
        MoeCase{"FP8_768x256_some_prefill_rows", DType::F8E4M3, 64, 768, 256, 16, 16, 0, 8, 128, 128},
        MoeCase{"empty_batch", DType::F8E4M3, 0, 144, 32, 8, 8, 0, 3, 128, 128}),
    [](const ::testing::TestParamInfo<MoeCase>& param_info) { return param_info.param.name; });

// ---- memory: placement, copies, properties ------------------------------------------------------

TEST_F(CudaOps, MemoryPlacementAndCopiesAreExact) {
  for (Gpu& g : gpus_) {
    SCOPED_TRACE("fp8_gemm=" + g.mode + ", kernels=" + g.kernels);
    Ops& ops = *g.ops;
    EXPECT_FALSE(ops.name().empty());
    EXPECT_EQ(ops.activation_dtype(), DType::F32);
    if (!standin()) {
      EXPECT_EQ(ops.device().kind, DeviceKind::CUDA);
      EXPECT_EQ(ops.cache_dtype(), DType::BF16);
    }
    EXPECT_GT(ops.free_memory_bytes(), size_t{0});

    // Round trips through copy_from_host / copy_to_host, and device-to-device copies (whole
    // tensors and the row views KvCache::copy_blocks uses).
    const std::vector<float> fv = uniform(rng_, 3 * 1000, -1e3f, 1e3f);
    Tensor a = upload(ops, {3, 1000}, fv);
    EXPECT_EQ(download<float>(ops, a), fv);
    Tensor b = poisoned(ops, DType::F32, {3, 1000});
    ops.copy(a, b);
    EXPECT_EQ(download<float>(ops, b), fv);
    Tensor row = b.rows(2, 3);
    ops.copy(a.rows(0, 1), row);
    std::vector<float> expect = fv;
    std::copy(fv.begin(), fv.begin() + 1000, expect.begin() + 2000);
    EXPECT_EQ(download<float>(ops, b), expect);
    const std::vector<int32_t> iv = {-1, 0, 7, 2147483647};
    EXPECT_EQ(download<int32_t>(ops, upload_i32(ops, {4}, iv)), iv);
    const std::vector<uint16_t> hv = {0, 1, 0x7f80, 0xffff, 0x3f80};
    Tensor bf = to_device(ops, DType::BF16, {5}, hv.data());
    EXPECT_EQ(download<uint16_t>(ops, bf), hv);
    Tensor empty = ops.empty(DType::F32, {0, 7168}), empty2 = ops.empty(DType::F32, {0, 7168});
    ops.copy(empty, empty2);
    EXPECT_TRUE(download<float>(ops, empty).empty());
    Tensor persistent = ops.allocate_persistent(DType::F32, {2, 3});
    const std::vector<float> pv = {1, 2, 3, 4, 5, 6};
    ops.copy_from_host(pv.data(), persistent);
    EXPECT_EQ(download<float>(ops, persistent), pv);

    // place_vector: F32, BF16 and F16 checkpoint vectors become exact FP32.
    for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
      const Tensor host = host_tensor(dt, {37}, uniform(rng_, 37, -3.0f, 3.0f));
      expect_equal(download<float>(ops, ops.place_vector(host)), host_values(host),
                   "place_vector " + dtype_label(dt));
    }
    ops.synchronize();
  }
}

// ---- empty batches everywhere -------------------------------------------------------------------

TEST_F(CudaOps, EmptyBatchesAreNoOps) {
  for (Gpu& g : gpus_) {
    SCOPED_TRACE("fp8_gemm=" + g.mode + ", kernels=" + g.kernels);
    Ops& ops = *g.ops;
    const int64_t d = 144;
    Tensor x = ops.empty(DType::F32, {0, d}), y = ops.empty(DType::F32, {0, d}), out = ops.empty(DType::F32, {0, d});
    Tensor w = ops.place_vector(host_tensor(DType::F32, {d}, std::vector<float>(static_cast<size_t>(d), 1.0f)));
    const Tensor table = host_tensor(DType::BF16, {10, d}, std::vector<float>(static_cast<size_t>(10 * d), 0.5f));
    Tensor tab = ops.place_embedding(table);
    ops.embedding(tab, std::span<const int32_t>(), out);
    ops.rms_norm(x, w, 1e-6f, out);
    ops.add_rms_norm(x, y, w, 1e-6f, out);
    ops.gather_rows(x, std::span<const int32_t>(), out);
    ops.add(x, y);
    ops.silu_mul(x, y, out);
    const HostLinear hw = random_linear(rng_, DType::F8E4M3, 200, d, 128, 128);
    LinearWeight lw = place(ops, hw);
    Tensor lout = ops.empty(DType::F32, {0, 200});
    ops.linear(x, lw, lout);
    Tensor q = ops.empty(DType::F32, {0, 4, 48});
    const std::vector<float> inv_freq(8, 0.5f);
    ops.rope(q, 32, std::span<const int32_t>(), inv_freq, 1.0f);

    // cache_write of no tokens leaves the cache as it was; attention over no tokens.
    Tensor cache = ops.allocate_persistent(ops.cache_dtype(), {2, 4, 48});
    poison(ops, cache);
    AttentionLayout layout;
    layout.block_size = 4;
    layout.block_tables = {{0, 1}};
    Tensor entry = ops.empty(DType::F32, {0, 48});
    ops.cache_write(cache, entry, layout);
    const std::vector<uint8_t> bytes = download<uint8_t>(ops, cache);
    EXPECT_TRUE(std::all_of(bytes.begin(), bytes.end(), [](uint8_t b) { return b == 0xff; }))
        << "cache_write of an empty batch changed the cache";
    MlaParams p;
    p.num_heads = 4;
    p.qk_nope_head_dim = 32;
    p.qk_rope_head_dim = 16;
    p.kv_lora_rank = 32;
    p.v_head_dim = 32;
    Tensor kv_b = ops.dequantize(place(ops, random_linear(rng_, DType::BF16, 4 * 64, 32, 0, 0)));
    Tensor attn = ops.empty(DType::F32, {0, 4 * 32});
    ops.mla_attention(q, kv_b, cache, layout, p, attn);

    RouterParams rp;
    rp.num_experts = 8;
    rp.top_k = 2;
    Tensor gate = ops.place_vector(host_tensor(DType::F32, {8, d}, std::vector<float>(static_cast<size_t>(8 * d), 0.1f)));
    Tensor ids = ops.empty(DType::I32, {0, 2}), weights = ops.empty(DType::F32, {0, 2});
    ops.moe_route(x, gate, Tensor(), rp, ids, weights);
    std::vector<ExpertWeights> experts;
    experts.push_back({lw, lw, place(ops, random_linear(rng_, DType::F8E4M3, d, 200, 128, 128))});
    ops.moe_experts(x, experts, ids, weights, out);
    Tensor parts = ops.empty(DType::F32, {3, 0, 5}), cat = ops.empty(DType::F32, {0, 13});
    ops.concat_columns(parts, cat);
    EXPECT_TRUE(ops.argmax(ops.empty(DType::F32, {0, 320})).empty());
    ops.synchronize();
  }
}

// With no routed expert on this rank, moe_experts writes zeros, or its addend when given one.
TEST_F(CudaOps, MoeExpertsWithNoLocalExpertsWritesZeros) {
  const int64_t t = 3, d = 144, k = 2;
  const std::vector<int32_t> idv = {0, 1, 2, 3, 4, 5};
  const std::vector<float> xv = uniform(rng_, static_cast<size_t>(t * d), -1.0f, 1.0f), wv(static_cast<size_t>(t * k), 0.5f);
  for (Gpu& g : gpus_) {
    Ops& ops = *g.ops;
    Tensor x = upload(ops, {t, d}, xv), ids = upload_i32(ops, {t, k}, idv), w = upload(ops, {t, k}, wv);
    Tensor out = poisoned(ops, DType::F32, {t, d});
    ops.moe_experts(x, std::span<const ExpertWeights>(), ids, w, out, 0);
    expect_equal(download<float>(ops, out), std::vector<float>(static_cast<size_t>(t * d), 0.0f), "no local experts");
    Tensor add = upload(ops, {t, d}, xv);
    ops.moe_experts(x, std::span<const ExpertWeights>(), ids, w, out, 0, &add);
    expect_equal(download<float>(ops, out), xv, "no local experts, an addend");
  }
}

// ---- the block-scaled FP8 GEMM against the CPU with the same input rounding ----------------------
// Both sides quantize x per token per 128 channels to e4m3 the same way, so they multiply the same
// numbers: what differs is FP32 accumulation order and, where cuBLASLt only offers a BF16 output,
// one BF16 rounding of the result (2^-9 relative). The magnitudes of x vary by up to 2^±5 between
// tokens and between 128-channel groups, so that a scale read for the wrong token or group (a
// layout mistake) shows as a large error, which equal-magnitude random inputs would hide.
TEST(CudaFp8Block, MatchesTheCpuWithTheSameRounding) {
  const std::string why = no_cuda_device();
  if (!why.empty()) GTEST_SKIP() << "no CUDA device: " << why;
  BackendOptions o;
  o.fp8_gemm = "block";
  std::unique_ptr<Ops> cpu = make_ops("cpu", o), gpu = make_ops("cuda", o);
  struct Shape3 { int64_t t, n, k; };
  std::mt19937 rng(2024);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<Shape3> cases = {Shape3{1, 256, 256}, Shape3{3, 256, 256}, Shape3{5, 144, 256}, Shape3{40, 256, 512},
                               Shape3{2, 256, 128}, Shape3{40, 144, 128}, Shape3{7, 576, 7168}, Shape3{33, 1536, 7168},
                               Shape3{6, 512, 384}, Shape3{33, 256, 384}, Shape3{64, 512, 256}};
  for (const LinearBenchShape& b : kLinearBenchShapes)  // dilu_linear_bench's cases, at 1 and 4 rows
    for (int64_t t : {1, 4}) cases.push_back(Shape3{t, b.n, b.k});
  for (const Shape3 c : cases) {
    SCOPED_TRACE("T " + std::to_string(c.t) + ", N " + std::to_string(c.n) + ", K " + std::to_string(c.k));
    const int64_t sr = (c.n + 127) / 128, sc = (c.k + 127) / 128;
    Tensor w = Tensor::host(DType::F8E4M3, {c.n, c.k}), scale = Tensor::host(DType::F32, {sr, sc});
    for (int64_t i = 0; i < c.n * c.k; ++i) {
      uint8_t b = static_cast<uint8_t>(rng());
      if ((b & 0x7f) == 0x7f) b = 0x30;  // no NaN codes
      w.data<uint8_t>()[i] = b;
    }
    for (int64_t i = 0; i < sr * sc; ++i) scale.data<float>()[i] = std::ldexp(1.0f, static_cast<int>(rng() % 7) - 9);
    std::vector<float> x(static_cast<size_t>(c.t * c.k));
    for (int64_t t = 0; t < c.t; ++t)
      for (int64_t i = 0; i < c.k; ++i)
        x[static_cast<size_t>(t * c.k + i)] = u(rng) * std::ldexp(1.0f, static_cast<int>((t * 3 + (i / 128) * 5) % 11) - 5);
    std::vector<float> out[2];
    Ops* both[2] = {cpu.get(), gpu.get()};
    for (int side = 0; side < 2; ++side) {
      Ops& ops = *both[side];
      const LinearWeight lw = ops.place_linear(w, scale, 128, 128);
      Tensor xt = ops.empty(DType::F32, {c.t, c.k}), ot = ops.empty(DType::F32, {c.t, c.n});
      ops.copy_from_host(x.data(), xt);
      std::vector<float> nan(static_cast<size_t>(c.t * c.n), std::numeric_limits<float>::quiet_NaN());
      ops.copy_from_host(nan.data(), ot);
      ops.linear(xt, lw, ot);
      out[side].resize(nan.size());
      ops.copy_to_host(ot, out[side].data());
    }
    // |x| <= 2^5 groupwise, |w| <= 448 * 2^-3: the magnitude sum per output bounds the error.
    std::vector<float> wf(static_cast<size_t>(c.n * c.k));
    convert_to_f32(DType::F8E4M3, w.data<uint8_t>(), wf.data(), wf.size());
    int64_t bad = 0;
    double worst = 0;
    for (int64_t t = 0; t < c.t; ++t)
      for (int64_t j = 0; j < c.n; ++j) {
        double mag = 0;
        const float* wr = wf.data() + j * c.k;
        const float* xr = x.data() + t * c.k;
        for (int64_t i0 = 0; i0 < c.k; i0 += 128) {
          float part = 0.0f;
          for (int64_t i = i0; i < std::min<int64_t>(i0 + 128, c.k); ++i) part += std::fabs(xr[i] * wr[i]);
          mag += static_cast<double>(part) * scale.data<float>()[(j / 128) * sc + i0 / 128];
        }
        const size_t at = static_cast<size_t>(t * c.n + j);
        const double err = std::fabs(static_cast<double>(out[1][at]) - out[0][at]);
        // The same products on both sides: FP32 accumulation order (K * 2^-24 of the magnitudes)
        // and, where cuBLASLt offers only a BF16 output, 2^-9 of |out| <= the magnitudes. A
        // misplaced scale is off by factors up to 2^10 on a group's terms.
        const double tol = std::ldexp(mag, -9) + static_cast<double>(c.k) * std::ldexp(mag, -24) + 1e-6;
        worst = std::max(worst, err / tol);
        if (!(err <= tol) && ++bad <= 3)
          ADD_FAILURE() << "element (" << t << ", " << j << "): gpu " << out[1][at] << ", cpu " << out[0][at]
                        << ", tolerance " << tol;
      }
    std::cout << "[   STAT   ] fp8 block T " << c.t << " N " << c.n << " K " << c.k << ": max err/tolerance " << worst
              << "\n";
    EXPECT_EQ(bad, 0);
  }
}

// linear2 (two weights of one input; on the GPU at decode sizes one quantization and one launch
// whose blocks cover both matrices, split sums included; at more rows one quantization for two
// cuBLASLt products) against the CPU's two linear() calls, and there bit for bit against the GPU's
// (at decode sizes the one launch may split K otherwise than two would: within the bound only).
TEST(CudaFp8Block, Linear2MatchesTwoLinears) {
  const std::string why = no_cuda_device();
  if (!why.empty()) GTEST_SKIP() << "no CUDA device: " << why;
  BackendOptions o;
  o.fp8_gemm = "block";
  std::unique_ptr<Ops> cpu = make_ops("cpu", o), gpu = make_ops("cuda", o);
  struct Case { int64_t t, na, nb, k; };
  std::mt19937 rng(77);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  // R1's q_a and kv_a (576 rows: a scale block half used), split and unsplit K, a ragged second
  // matrix, 16 rows, and 20 and 64 rows (past the decode kernel: cuBLASLt, 20 rows padded to 24).
  for (const Case c : {Case{1, 1536, 576, 7168}, Case{3, 256, 144, 512}, Case{16, 512, 512, 384},
                       Case{2, 144, 2048, 256}, Case{20, 256, 144, 256}, Case{64, 512, 1536, 1024}}) {
    SCOPED_TRACE("T " + std::to_string(c.t) + ", N " + std::to_string(c.na) + " + " + std::to_string(c.nb) + ", K " +
                 std::to_string(c.k));
    const int64_t sc = (c.k + 127) / 128;
    auto random_weight = [&](int64_t n, Tensor& w, Tensor& scale) {
      w = Tensor::host(DType::F8E4M3, {n, c.k});
      scale = Tensor::host(DType::F32, {(n + 127) / 128, sc});
      for (int64_t i = 0; i < n * c.k; ++i) {
        uint8_t b = static_cast<uint8_t>(rng());
        if ((b & 0x7f) == 0x7f) b = 0x30;  // no NaN codes
        w.data<uint8_t>()[i] = b;
      }
      for (int64_t i = 0; i < scale.numel(); ++i) scale.data<float>()[i] = std::ldexp(1.0f, static_cast<int>(rng() % 7) - 9);
    };
    Tensor wa, sa, wb, sb;
    random_weight(c.na, wa, sa);
    random_weight(c.nb, wb, sb);
    std::vector<float> x(static_cast<size_t>(c.t * c.k));
    for (float& v : x) v = u(rng) * 4.0f;
    std::vector<float> out[3][2];
    Ops* sides[3] = {cpu.get(), gpu.get(), gpu.get()};  // CPU linear() twice, GPU linear2, GPU linear() twice
    for (int side = 0; side < 3; ++side) {
      Ops& ops = *sides[side];
      const LinearWeight la = ops.place_linear(wa, sa, 128, 128), lb = ops.place_linear(wb, sb, 128, 128);
      Tensor xt = ops.empty(DType::F32, {c.t, c.k}), oa = ops.empty(DType::F32, {c.t, c.na}),
             ob = ops.empty(DType::F32, {c.t, c.nb});
      ops.copy_from_host(x.data(), xt);
      std::vector<float> nan_a(static_cast<size_t>(c.t * c.na), std::numeric_limits<float>::quiet_NaN()),
          nan_b(static_cast<size_t>(c.t * c.nb), std::numeric_limits<float>::quiet_NaN());
      ops.copy_from_host(nan_a.data(), oa);
      ops.copy_from_host(nan_b.data(), ob);
      if (side == 1) {
        ops.linear2(xt, la, oa, lb, ob);
      } else {
        ops.linear(xt, la, oa);
        ops.linear(xt, lb, ob);
      }
      out[side][0].resize(nan_a.size());
      out[side][1].resize(nan_b.size());
      ops.copy_to_host(oa, out[side][0].data());
      ops.copy_to_host(ob, out[side][1].data());
    }
    int64_t bad = 0;
    for (int m = 0; m < 2; ++m) {
      const Tensor& w = m == 0 ? wa : wb;
      const Tensor& scale = m == 0 ? sa : sb;
      const int64_t n = m == 0 ? c.na : c.nb;
      for (int64_t t = 0; t < c.t; ++t)
        for (int64_t j = 0; j < n; ++j) {
          double mag = 0;
          for (int64_t i = 0; i < c.k; ++i) {
            float wv = 0.0f;
            convert_to_f32(DType::F8E4M3, w.data<uint8_t>() + j * c.k + i, &wv, 1);
            mag += std::fabs(static_cast<double>(x[static_cast<size_t>(t * c.k + i)]) * wv *
                             scale.data<float>()[(j / 128) * sc + i / 128]);
          }
          const size_t at = static_cast<size_t>(t * n + j);
          const double err = std::fabs(static_cast<double>(out[1][m][at]) - out[0][m][at]);
          const double tol = std::ldexp(mag, -9) + static_cast<double>(c.k) * std::ldexp(mag, -24) + 1e-6;
          if (!(err <= tol) && ++bad <= 3)
            ADD_FAILURE() << "matrix " << m << " element (" << t << ", " << j << "): gpu " << out[1][m][at] << ", cpu "
                          << out[0][m][at] << ", tolerance " << tol;
        }
    }
    EXPECT_EQ(bad, 0);
    for (int m = 0; m < 2 && c.t > 16; ++m) {
      ASSERT_EQ(out[1][m].size(), out[2][m].size());
      EXPECT_EQ(0, std::memcmp(out[1][m].data(), out[2][m].data(), out[1][m].size() * sizeof(float)))
          << "matrix " << m << ": linear2 differs from two linear() calls on the GPU";
    }
  }
}

// An FP8 weight [n, k] of random codes (no NaN) with power-of-two 128 x 128 block scales, placed.
LinearWeight random_fp8_linear(Ops& ops, std::mt19937& rng, int64_t n, int64_t k) {
  Tensor w = Tensor::host(DType::F8E4M3, {n, k}), scale = Tensor::host(DType::F32, {(n + 127) / 128, k / 128});
  for (int64_t i = 0; i < n * k; ++i) {
    uint8_t b = static_cast<uint8_t>(rng());
    if ((b & 0x7f) == 0x7f) b = 0x30;  // no NaN codes
    w.data<uint8_t>()[i] = b;
  }
  for (int64_t i = 0; i < scale.numel(); ++i)
    scale.data<float>()[i] = std::ldexp(1.0f, static_cast<int>(rng() % 7) - 9);
  return ops.place_linear(w, scale, 128, 128);
}

// silu_mul_linear (the CUDA backend: silu(gate) * up quantized for the FP8 product without being
// written out, for the small-batch kernel at decode sizes and for cuBLASLt past them) against
// silu_mul() then linear() on the GPU, bit for bit, at decode and prefill row counts (20 rows are
// padded to 24 for cuBLASLt).
TEST(CudaFp8Block, SiluMulLinearMatchesTheTwoOps) {
  const std::string why = no_cuda_device();
  if (!why.empty()) GTEST_SKIP() << "no CUDA device: " << why;
  BackendOptions o;
  o.fp8_gemm = "block";
  std::unique_ptr<Ops> gpu = make_ops("cuda", o);
  std::mt19937 rng(78);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  const int64_t f = 512, n = 384;
  const LinearWeight lw = random_fp8_linear(*gpu, rng, n, f);
  for (const int64_t t : {int64_t{1}, int64_t{3}, int64_t{20}, int64_t{64}}) {
    SCOPED_TRACE("T " + std::to_string(t));
    std::vector<float> gv(static_cast<size_t>(t * f)), uv(gv.size());
    for (float& v : gv) v = u(rng);
    for (float& v : uv) v = u(rng);
    std::vector<float> out[2];
    for (int side = 0; side < 2; ++side) {
      Tensor g = gpu->empty(DType::F32, {t, f}), up = gpu->empty(DType::F32, {t, f});
      Tensor res = gpu->empty(DType::F32, {t, n});
      gpu->copy_from_host(gv.data(), g);
      gpu->copy_from_host(uv.data(), up);
      if (side == 0) {
        gpu->silu_mul_linear(g, up, lw, res);
      } else {
        gpu->silu_mul(g, up, g);
        gpu->linear(g, lw, res);
      }
      out[side].resize(static_cast<size_t>(t * n));
      gpu->copy_to_host(res, out[side].data());
    }
    EXPECT_EQ(0, std::memcmp(out[0].data(), out[1].data(), out[0].size() * sizeof(float)));
    bool finite = true;
    for (float v : out[0]) finite = finite && std::isfinite(v);
    EXPECT_TRUE(finite);
  }
}

// rms_norm_linear against rms_norm then linear(), bit for bit: at decode sizes (the norm and the
// quantization in one kernel, d = 1536 as R1's q_a norm and d = 7168 on 1024 threads, x aliasing
// the norm's output as the model calls it) and past them (the two ops).
TEST(CudaFp8Block, RmsNormLinearMatchesTheTwoOps) {
  const std::string why = no_cuda_device();
  if (!why.empty()) GTEST_SKIP() << "no CUDA device: " << why;
  BackendOptions o;
  o.fp8_gemm = "block";
  std::unique_ptr<Ops> gpu = make_ops("cuda", o);
  std::mt19937 rng(79);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f), wu(0.5f, 1.5f);
  const int64_t n = 256;
  for (const int64_t d : {int64_t{1536}, int64_t{7168}}) {
    const LinearWeight lw = random_fp8_linear(*gpu, rng, n, d);
    std::vector<float> nv(static_cast<size_t>(d));
    for (float& v : nv) v = wu(rng);
    Tensor norm_w = gpu->empty(DType::F32, {d});
    gpu->copy_from_host(nv.data(), norm_w);
    for (const int64_t t : {int64_t{1}, int64_t{5}, int64_t{16}, int64_t{20}}) {
      SCOPED_TRACE("d " + std::to_string(d) + ", T " + std::to_string(t));
      std::vector<float> xv(static_cast<size_t>(t * d));
      for (float& v : xv) v = u(rng);
      std::vector<float> out[2], normed[2];
      for (int side = 0; side < 2; ++side) {
        Tensor x = gpu->empty(DType::F32, {t, d}), res = gpu->empty(DType::F32, {t, n});
        gpu->copy_from_host(xv.data(), x);
        if (side == 0) {
          gpu->rms_norm_linear(x, norm_w, 1e-6f, x, lw, res);
        } else {
          gpu->rms_norm(x, norm_w, 1e-6f, x);
          gpu->linear(x, lw, res);
        }
        out[side].resize(static_cast<size_t>(t * n));
        normed[side].resize(xv.size());
        gpu->copy_to_host(res, out[side].data());
        gpu->copy_to_host(x, normed[side].data());
      }
      EXPECT_EQ(0, std::memcmp(normed[0].data(), normed[1].data(), normed[0].size() * sizeof(float)));
      EXPECT_EQ(0, std::memcmp(out[0].data(), out[1].data(), out[0].size() * sizeof(float)));
      bool finite = true;
      for (float v : out[0]) finite = finite && std::isfinite(v);
      EXPECT_TRUE(finite);
    }
  }
}

}  // namespace
}  // namespace dilu
