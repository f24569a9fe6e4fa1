// The CUDA backend (see cuda_ops.h): memory (persistent weights and cache, a step arena), the
// cuBLASLt GEMMs (BF16, and FP8 with DeepSeek's block scales), and each op's argument checks
// and kernel launches (kernels.h). One stream; the host waits only in synchronize() and the
// copies to the host, polling so that a collective error or timeout surfaces instead of a hang.
#include "kernels/cuda/cuda_ops.h"

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <bit>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <iostream>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>

#include "kernels/cuda/kernels.h"
#include "kernels/cuda/sampling.h"

namespace dilu {

namespace {

#define DILU_CU(call)                                                                                  \
  do {                                                                                                 \
    const cudaError_t dilu_rc = (call);                                                                \
    if (dilu_rc != cudaSuccess)                                                                        \
      throw std::runtime_error(std::string(#call) + " failed: " + cudaGetErrorString(dilu_rc));        \
  } while (0)

#define DILU_LT(call)                                                                                  \
  do {                                                                                                 \
    const cublasStatus_t dilu_st = (call);                                                             \
    if (dilu_st != CUBLAS_STATUS_SUCCESS)                                                              \
      throw std::runtime_error(std::string(#call) + " failed: cuBLAS status " + std::to_string(dilu_st)); \
  } while (0)

constexpr size_t kAlign = 256;
constexpr size_t kDefaultArena = size_t{256} << 20;
constexpr size_t kLtWorkspace = size_t{32} << 20;

size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

std::string mib(size_t bytes) { return std::to_string((bytes + (size_t{1} << 19)) >> 20) + " MiB"; }

// Step scratch: one device allocation made at start-up, handed out first-fit and returned (with
// coalescing) when the last tensor viewing a block goes away.
class Arena {
 public:
  explicit Arena(size_t bytes) : size_(round_up(std::max<size_t>(bytes, kAlign), kAlign)) {
    const cudaError_t rc = cudaMalloc(&base_, size_);
    if (rc != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      throw UserError("cannot allocate the GPU activation arena of " + mib(size_) + " (" + mib(free_b) + " free of " +
                      mib(total_b) + "): lower batch.max_tokens, or place fewer layers per GPU (parallel.pp/tp)");
    }
    free_[0] = size_;
  }
  ~Arena() { cudaFree(base_); }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  void* alloc(size_t bytes) {
    bytes = round_up(std::max<size_t>(bytes, 1), kAlign);
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second < bytes) continue;
      const size_t at = it->first, left = it->second - bytes;
      free_.erase(it);
      if (left > 0) free_[at + bytes] = left;
      used_[at] = bytes;
      in_use_ += bytes;
      peak_ = std::max(peak_, in_use_);
      return static_cast<uint8_t*>(base_) + at;
    }
    throw std::runtime_error("the GPU activation arena (" + mib(size_) + ") is exhausted: " + mib(in_use_) +
                             " in use, " + mib(bytes) + " more requested; lower batch.max_tokens");
  }

  // While held (Ops::begin_side() to join_side()), released blocks stay reserved: a kernel still
  // queued on one stream may use a block that a later allocation would hand to the other.
  void hold() {
    std::lock_guard<std::mutex> lock(mu_);
    ++holds_;
  }
  void unhold() {
    std::vector<const void*> pending;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (holds_ > 0 && --holds_ == 0) pending.swap(pending_);
    }
    for (const void* p : pending) release(p);
  }

  void release(const void* p) {
    const size_t at = static_cast<size_t>(static_cast<const uint8_t*>(p) - static_cast<uint8_t*>(base_));
    std::lock_guard<std::mutex> lock(mu_);
    if (holds_ > 0) {
      pending_.push_back(p);
      return;
    }
    auto u = used_.find(at);
    if (u == used_.end()) return;
    size_t begin = at, len = u->second;
    in_use_ -= len;
    used_.erase(u);
    auto next = free_.lower_bound(begin);
    if (next != free_.end() && next->first == begin + len) {
      len += next->second;
      next = free_.erase(next);
    }
    if (next != free_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second == begin) {
        begin = prev->first;
        len += prev->second;
        free_.erase(prev);
      }
    }
    free_[begin] = len;
  }

  size_t size() const { return size_; }
  size_t peak() const { return peak_; }

 private:
  void* base_ = nullptr;
  size_t size_;
  std::mutex mu_;
  std::map<size_t, size_t> free_;  // offset -> bytes
  std::map<size_t, size_t> used_;
  size_t in_use_ = 0, peak_ = 0;
  int holds_ = 0;
  std::vector<const void*> pending_;
};

int table_type(DType t) {
  switch (t) {
    case DType::F32: return 0;
    case DType::BF16: return 1;
    case DType::F16: return 2;
    default: DILU_CHECK(false, "embedding table of dtype ", dtype_name(t)); return 0;
  }
}

cuda::WeightType weight_type(DType t) {
  switch (t) {
    case DType::F32: return cuda::WeightType::F32;
    case DType::BF16: return cuda::WeightType::BF16;
    case DType::F8E4M3: return cuda::WeightType::FP8;
    default: DILU_CHECK(false, "linear weight of dtype ", dtype_name(t)); return cuda::WeightType::F32;
  }
}

class CudaOps final : public Ops {
  struct LtChoice {  // a cuBLASLt algorithm chosen for one shape (ok: found and accepted)
    bool ok = false;
    bool out_bf16 = false;
    cublasLtMatmulAlgo_t algo{};
  };

 public:
  explicit CudaOps(const BackendOptions& o) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      cudaGetLastError();
      throw UserError("backend 'cuda': no CUDA device is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES), or use "
                      "--set backend=cpu");
    }
    DILU_CU(cudaGetDevice(&device_));
    DILU_CU(cudaGetDeviceProperties(&props_, device_));
    DILU_CU(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    main_stream_ = stream_;
    DILU_CU(cudaStreamCreateWithFlags(&side_stream_, cudaStreamNonBlocking));
    DILU_CU(cudaEventCreateWithFlags(&fork_event_, cudaEventDisableTiming));
    DILU_CU(cudaEventCreateWithFlags(&join_event_, cudaEventDisableTiming));
    DILU_CU(cudaEventCreateWithFlags(&upload_event_, cudaEventDisableTiming));
    DILU_LT(cublasLtCreate(&lt_));
    DILU_CU(cudaMalloc(&lt_workspace_, kLtWorkspace));
    DILU_CU(cudaMalloc(&lt_workspace_side_, kLtWorkspace));
    const char* side_env = std::getenv("DILU_SIDE_STREAM");
    side_enabled_ = !(side_env && std::string(side_env) == "0");
    DILU_CU(cudaHostAlloc(&staging_, staging_bytes_, cudaHostAllocDefault));
    arena_ = std::make_shared<Arena>(o.arena_bytes > 0 ? static_cast<size_t>(o.arena_bytes) : kDefaultArena);
    routed_counter_ = allocate_persistent(DType::U8, {8});
    DILU_USER_CHECK(o.kernels == "reference" || o.kernels == "fast", "cuda.kernels must be reference or fast, got '",
                    o.kernels, "'");
    fast_ = o.kernels == "fast";
    graphs_ = o.graphs;
    mla_fused_ = fast_;
    const char* core_env = std::getenv("DILU_MLA_CORE");
    mla_core_ = core_env && *core_env ? core_env : o.mla_core;
    DILU_USER_CHECK(mla_core_ == "auto" || mla_core_ == "mma" || mla_core_ == "wgmma", "the MLA core (",
                    core_env && *core_env ? "DILU_MLA_CORE" : "BackendOptions::mla_core",
                    ") must be auto, mma or wgmma, got '", mla_core_, "'; unset DILU_MLA_CORE for the automatic choice");
    const char* absorb_env = std::getenv("DILU_MLA_ABSORB");
    mla_absorb_ = absorb_env && *absorb_env ? absorb_env : o.mla_absorb;
    DILU_USER_CHECK(mla_absorb_ == "auto" || mla_absorb_ == "f32" || mla_absorb_ == "bf16x3", "the MLA absorptions (",
                    absorb_env && *absorb_env ? "DILU_MLA_ABSORB" : "BackendOptions::mla_absorb",
                    ") must be auto, f32 or bf16x3, got '", mla_absorb_,
                    "'; unset DILU_MLA_ABSORB for the automatic choice");
    const char* prefill_env = std::getenv("DILU_MLA_PREFILL");
    mla_prefill_ = prefill_env && *prefill_env ? prefill_env : o.mla_prefill;
    DILU_USER_CHECK(mla_prefill_ == "auto" || mla_prefill_ == "absorbed" || mla_prefill_ == "expanded",
                    "MLA's prefill form (",
                    prefill_env && *prefill_env ? "DILU_MLA_PREFILL" : "BackendOptions::mla_prefill",
                    ") must be auto, absorbed or expanded, got '", mla_prefill_,
                    "'; unset DILU_MLA_PREFILL for the automatic choice");
    if (mla_fused_) {
      mla_split_bytes_ = size_t{16} << 20;
      mla_split_scratch_ = allocate_persistent(DType::U8, {static_cast<int64_t>(mla_split_bytes_)});
    }
    DILU_CU(cudaMemsetAsync(routed_counter_.raw(), 0, 8, stream_));
    DILU_CU(cudaStreamSynchronize(stream_));
    // Block-scaled FP8 GEMMs (VEC128 x BLK128x128 scales) exist in cuBLASLt >= 12.9 on sm_90 only.
    const bool block_ok = props_.major == 9 && cublasLtGetVersion() >= 120900;
    if (o.fp8_gemm == "block") {
      DILU_USER_CHECK(block_ok, "cuda.fp8_gemm=block needs an sm_90 GPU (H100/H200) and cuBLASLt >= 12.9; this is ",
                      props_.name, " (sm_", props_.major, props_.minor, "), cuBLASLt ", cublasLtGetVersion(),
                      ": use cuda.fp8_gemm=soft or auto");
      fp8_block_ = true;
    } else if (o.fp8_gemm == "auto") {
      fp8_block_ = block_ok;
    } else {
      DILU_USER_CHECK(o.fp8_gemm == "soft", "cuda.fp8_gemm must be auto, block or soft, not '", o.fp8_gemm, "'");
    }
  }

  ~CudaOps() override {
    reset_side();
    cudaStreamSynchronize(side_stream_);
    cudaStreamSynchronize(stream_);
    arena_.reset();
    cudaFreeHost(staging_);
    for (SampleSlot& sl : sample_slots_) {
      if (sl.host) cudaFreeHost(sl.host);
      if (sl.done) cudaEventDestroy(sl.done);
    }
    cudaFree(lt_workspace_);
    cudaFree(lt_workspace_side_);
    cublasLtDestroy(lt_);
    for (cudaEvent_t e : {fork_event_, join_event_, upload_event_}) cudaEventDestroy(e);
    for (auto& set : step_ev_)
      for (cudaEvent_t e : set)
        if (e) cudaEventDestroy(e);
    cudaStreamDestroy(side_stream_);
    cudaStreamDestroy(stream_);
  }

  // The side stream (Ops::begin_side): its ops launch on side_stream_ with their own cuBLASLt
  // workspace; the arenas keep released scratch until join_side(). DILU_SIDE_STREAM=0 runs them
  // in order on the one stream (for measuring).
  void begin_side() override {
    DILU_CHECK(side_state_ == 0, "begin_side() before the last side work was joined");
    side_state_ = 1;
    if (!side_enabled_) return;
    for (Arena* a : {arena_.get(), graph_arena_.get()})
      if (a) a->hold();
    DILU_CU(cudaEventRecord(fork_event_, main_stream_));
    DILU_CU(cudaStreamWaitEvent(side_stream_, fork_event_, 0));
    stream_ = side_stream_;
    std::swap(lt_workspace_, lt_workspace_side_);
  }
  void end_side() override {
    DILU_CHECK(side_state_ == 1, "end_side() without begin_side()");
    side_state_ = 2;
    if (!side_enabled_) return;
    DILU_CU(cudaEventRecord(join_event_, side_stream_));
    stream_ = main_stream_;
    std::swap(lt_workspace_, lt_workspace_side_);
    if (side_uploaded_) {  // the main stream's readers of what the side work uploaded
      DILU_CU(cudaStreamWaitEvent(main_stream_, upload_event_, 0));
      side_uploaded_ = false;
    }
  }
  void join_side() override {
    DILU_CHECK(side_state_ == 2, "join_side() without end_side()");
    side_state_ = 0;
    if (!side_enabled_) return;
    DILU_CU(cudaStreamWaitEvent(main_stream_, join_event_, 0));
    for (Arena* a : {arena_.get(), graph_arena_.get()})
      if (a) a->unhold();
  }
  // The main stream waits for side work that has ended but is not yet joined (Ops::moe_experts'
  // addend may come from it); join_side() still follows, and waits again at no cost.
  void wait_side_work() {
    if (side_enabled_ && side_state_ == 2) DILU_CU(cudaStreamWaitEvent(main_stream_, join_event_, 0));
  }
  // After an exception inside side work (a failed capture): back to the main stream.
  void reset_side() {
    if (side_state_ == 0) return;
    if (side_enabled_) {
      if (side_state_ == 1) std::swap(lt_workspace_, lt_workspace_side_);
      stream_ = main_stream_;
      if (!capturing_) cudaStreamSynchronize(side_stream_);
      for (Arena* a : {arena_.get(), graph_arena_.get()})
        if (a) a->unhold();
    }
    side_state_ = 0;
    side_uploaded_ = false;
  }

  Device device() const override { return Device{DeviceKind::CUDA, device_}; }
  std::string name() const override {
    return std::string("cuda (") + props_.name + ", FP8 GEMM " + (fp8_block_ ? "block-scaled" : "soft") + ")";
  }
  DType activation_dtype() const override { return DType::F32; }
  DType cache_dtype() const override { return DType::BF16; }

  size_t free_memory_bytes() const override {
    size_t free_b = 0, total_b = 0;
    DILU_CU(cudaMemGetInfo(&free_b, &total_b));
    return free_b;
  }

  Tensor empty(DType dtype, Shape shape) override {
    Tensor probe(nullptr, dtype, shape, device(), nullptr);
    std::shared_ptr<Arena> arena = capturing_ ? graph_arena_ : arena_;  // a captured step's scratch: its own
    void* p = arena->alloc(probe.nbytes());
    return Tensor(p, dtype, std::move(shape), device(),
                  std::shared_ptr<const void>(p, [arena](const void* q) { arena->release(q); }));
  }

  Tensor allocate_persistent(DType dtype, Shape shape) override {
    Tensor probe(nullptr, dtype, shape, device(), nullptr);
    const size_t bytes = std::max<size_t>(probe.nbytes(), 1);
    void* p = nullptr;
    const cudaError_t rc = cudaMalloc(&p, bytes);
    if (rc != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      throw UserError("out of GPU memory on " + std::string(props_.name) + " (device " + std::to_string(device_) +
                      "): " + mib(bytes) + " more requested after " + mib(placed_) + " placed, " + mib(free_b) +
                      " free of " + mib(total_b) +
                      ". This rank's share of the model does not fit: run `dilu plan` for a layout that fits, "
                      "then raise parallel.tp or parallel.pp (or lower kv.memory_fraction / batch.max_tokens)");
    }
    placed_ += bytes;
    return Tensor(p, dtype, std::move(shape), device(), std::shared_ptr<const void>(p, [](const void* q) {
                    cudaFree(const_cast<void*>(q));
                  }));
  }

  Tensor upload(const Tensor& host, DType as) {
    if (!host.is_cpu()) {  // made on this device (random_fill): kept, or converted through the host
      check_device(host, "weight");
      if (host.dtype() == as) return host;
      Tensor h = Tensor::host(host.dtype(), host.shape());
      copy_to_host(host, h.raw());
      return upload(h, as);
    }
    Tensor out = allocate_persistent(as, host.shape());
    if (host.dtype() == as) {
      upload_bytes(out.raw(), host.raw(), host.nbytes());
      return out;
    }
    std::vector<float> f(static_cast<size_t>(host.numel()));
    convert_to_f32(host.dtype(), host.raw(), f.data(), f.size());
    if (as == DType::F32) {
      upload_bytes(out.raw(), f.data(), out.nbytes());
    } else {
      DILU_CHECK(as == DType::BF16, "upload as ", dtype_name(as));
      std::vector<uint16_t> b(f.size());
      for (size_t i = 0; i < f.size(); ++i) b[i] = f32_to_bf16(f[i]);
      upload_bytes(out.raw(), b.data(), out.nbytes());
    }
    return out;
  }

  Tensor place_vector(const Tensor& host) override { return upload(host, DType::F32); }

  LinearWeight place_linear(const Tensor& weight, const Tensor& scale_inv, int64_t block_out,
                            int64_t block_in) override {
    DILU_CHECK(weight.rank() == 2, "linear weight must be a matrix, got ", shape_str(weight.shape()));
    LinearWeight w;
    if (weight.dtype() == DType::F8E4M3) {
      DILU_CHECK(block_out > 0 && block_in > 0 && scale_inv.rank() == 2, "FP8 weight without block scale");
      w.weight = upload(weight, DType::F8E4M3);
      w.block_out = block_out;
      w.block_in = block_in;
      // Scale rows are kept padded to a multiple of 4 floats (zeros past ceil(K / bi)): the layout
      // cuBLASLt's BLK128x128 mode reads (see linear()); every other reader takes the row stride
      // from scale_inv.dim(1).
      Tensor scale_host = scale_inv;
      if (!scale_inv.is_cpu()) {
        scale_host = Tensor::host(scale_inv.dtype(), scale_inv.shape());
        copy_to_host(scale_inv, scale_host.raw());
      }
      const int64_t rows = scale_inv.dim(0), cols = scale_inv.dim(1), stride = (cols + 3) / 4 * 4;
      Tensor host_scale = Tensor::host(DType::F32, {rows, stride});
      std::vector<float> row(static_cast<size_t>(cols));
      const size_t esz = dtype_size(scale_inv.dtype());
      for (int64_t r = 0; r < rows; ++r) {
        convert_to_f32(scale_inv.dtype(), static_cast<const uint8_t*>(scale_host.raw()) + static_cast<size_t>(r * cols) * esz,
                       row.data(), row.size());
        std::copy(row.begin(), row.end(), host_scale.data<float>() + r * stride);
      }
      w.scale_inv = upload(host_scale, DType::F32);
    } else {
      w.weight = upload(weight, DType::BF16);  // BF16 math: F32/F16 weights are rounded once here
    }
    return w;
  }

  Tensor place_embedding(const Tensor& host) override {
    return upload(host, host.dtype() == DType::F8E4M3 ? DType::F32 : host.dtype());
  }

  Tensor dequantize(const LinearWeight& w) override {
    Tensor out = allocate_persistent(DType::F32, {w.out_features(), w.in_features()});
    cuda::dequantize_to_f32(w.weight.raw(), weight_type(w.weight.dtype()),
                            w.scale_inv.numel() > 0 ? w.scale_inv.data<float>() : nullptr,
                            w.scale_inv.rank() == 2 ? w.scale_inv.dim(1) : 0, w.out_features(),
                            w.in_features(), w.block_out, w.block_in, out.data<float>(), stream_);
    synchronize();
    return out;
  }

  // kv_b in FP32 (the reference kernels, the F32 absorptions) and, with the fast kernels, its
  // split form for the absorptions on tensor cores (cuda::mla_kv_b_split): the stored FP8 or BF16
  // values, exact in BF16, where each head's W_UK rows and W_UV rows fall in one row block of the
  // scales and the shapes suit the split kernels (R1's do).
  MlaWeight place_mla_kv_b(const LinearWeight& w, const MlaParams& p) override {
    MlaWeight m(dequantize(w));
    const int64_t h = p.num_heads, nope = p.qk_nope_head_dim, v = p.v_head_dim, c = p.kv_lora_rank;
    const bool fp8 = w.weight.dtype() == DType::F8E4M3;
    if (mla_fused_ && mla_prefill_ != "absorbed" && h > 0 && m.w.dim(0) == h * (nope + v) && m.w.dim(1) == c &&
        cuda::mla_expanded_shapes(nope, p.qk_rope_head_dim, v, c)) {
      m.expand = allocate_persistent(DType::BF16, {h * (nope + v), 2 * c});
      cuda::mla_kv_b_expand(m.w.data<float>(), h * (nope + v), c, static_cast<uint16_t*>(m.expand.raw()), stream_);
      synchronize();
    }
    if (!mla_fused_ || mla_absorb_ == "f32" || !(fp8 || w.weight.dtype() == DType::BF16)) return m;
    if (w.out_features() != h * (nope + v) || w.in_features() != c || h <= 0 ||
        !cuda::mla_split_shapes(c, v, nope, p.qk_rope_head_dim))
      return m;
    if (fp8)
      for (int64_t head = 0; head < h; ++head) {
        const int64_t r0 = head * (nope + v), bo = w.block_out;
        if (r0 / bo != (r0 + nope - 1) / bo || (r0 + nope) / bo != (r0 + nope + v - 1) / bo) return m;
      }
    m.split = allocate_persistent(DType::BF16, {h, (nope + v) * c});
    m.split_scale = allocate_persistent(DType::F32, {h, 2, c});
    cuda::mla_kv_b_split(w.weight.raw(), weight_type(w.weight.dtype()), fp8 ? w.scale_inv.data<float>() : nullptr,
                         fp8 ? w.scale_inv.dim(1) : 0, h, nope, v, c, w.block_out, w.block_in,
                         static_cast<uint16_t*>(m.split.raw()), m.split_scale.data<float>(), stream_);
    synchronize();
    return m;
  }

  void copy_to_host(const Tensor& src, void* dst) override {
    check_device(src, "copy_to_host source");
    size_t done = 0;
    const size_t total = src.nbytes();
    while (done < total) {
      const size_t n = std::min(staging_bytes_, total - done);
      DILU_CU(cudaMemcpyAsync(staging_, static_cast<const uint8_t*>(src.raw()) + done, n, cudaMemcpyDeviceToHost,
                              stream_));
      synchronize();
      std::memcpy(static_cast<uint8_t*>(dst) + done, staging_, n);
      done += n;
    }
  }
  void copy_from_host(const void* src, Tensor& dst) override {
    check_device(dst, "copy_from_host destination");
    if (dst.nbytes() > 0) DILU_CU(cudaMemcpyAsync(dst.raw(), src, dst.nbytes(), cudaMemcpyHostToDevice, stream_));
  }
  void copy(const Tensor& src, Tensor& dst) override {
    DILU_CHECK(src.dtype() == dst.dtype() && src.nbytes() == dst.nbytes(), "copy of ", shape_str(src.shape()), " into ",
               shape_str(dst.shape()));
    check_device(src, "copy source");
    check_device(dst, "copy destination");
    if (src.nbytes() > 0)
      DILU_CU(cudaMemcpyAsync(dst.raw(), src.raw(), src.nbytes(), cudaMemcpyDeviceToDevice, stream_));
  }

  // Polls the stream, yielding the core between polls for the first kSpin of a wait and sleeping
  // 50 us between them after that; the wait checks run every millisecond. A decode step ends in
  // this wait (the sampled tokens), so its wake-up is on every step's path: sleeping from 200 us
  // on, as before, woke the host 50-100 us after a 2 ms step ended (the OS's timer slack).
  void synchronize() override {
    wait_for([&] { return cudaStreamQuery(stream_); });
  }
  // The wait of synchronize() for any completion query (a stream's, an event's).
  template <class Query>
  void wait_for(const Query& query) {
    using namespace std::chrono;
    constexpr auto kSpin = milliseconds(20), kCheckEvery = milliseconds(1);
    const auto start = steady_clock::now();
    auto next_check = start;
    for (;;) {
      const cudaError_t rc = query();
      if (rc == cudaSuccess) return;
      if (rc != cudaErrorNotReady) {
        cudaGetLastError();
        throw std::runtime_error(std::string("CUDA error on ") + props_.name + " (device " + std::to_string(device_) +
                                 "): " + cudaGetErrorString(rc));
      }
      const auto now = steady_clock::now();
      if (now >= next_check) {
        for (auto& check : wait_checks_) check();
        next_check = now + kCheckEvery;
      }
      if (now - start < kSpin) std::this_thread::yield();
      else std::this_thread::sleep_for(microseconds(50));
    }
  }

  void add_wait_check(std::function<void()> check) override { wait_checks_.push_back(std::move(check)); }

  // ---- step graphs ----
  bool enable_graphs(int64_t scratch_bytes) override {
    if (!graphs_) return false;
    if (graph_arena_) return graph_arena_->size() >= static_cast<size_t>(scratch_bytes);
    try {
      graph_arena_ = std::make_shared<Arena>(static_cast<size_t>(scratch_bytes));
    } catch (const UserError&) {
      std::cerr << "dilu: no room on " << props_.name << " for the " << mib(static_cast<size_t>(scratch_bytes))
                << " of scratch that CUDA graphs of decode steps need; every step runs without one\n";
      return false;
    }
    return true;
  }

  uint64_t stage_step(std::span<const int32_t> token_ids, const AttentionLayout& layout,
                      std::span<const int32_t> logit_rows) override {
    DILU_CHECK(!capturing_, "stage_step() inside a capture");
    step_event(0);
    const size_t t = token_ids.size();
    DILU_CHECK(layout.token_pos.size() == t && layout.token_seq.size() == t && layout.token_slot.size() == t,
               "step layout of ", layout.token_pos.size(), " tokens for ", t);
    // The uploads embedding, rope, cache_write, mla_attention and gather_rows make.
    stage_ids(token_ids);
    upload_cached(kUpRopePos, layout.token_pos.data(), t * sizeof(int32_t), DType::I32);
    upload_cached(kUpSlots, layout.token_slot.data(), t * sizeof(int64_t), DType::I64);
    const MlaLayout m = mla_layout(layout);
    upload_cached(kUpRows, logit_rows.data(), logit_rows.size() * sizeof(int32_t), DType::I32);
    // What the launches keep besides the staged bytes: the token and row counts (every shape
    // and grid follows from them and the weights), the tables' stride and the staging buffers'
    // addresses (their epoch). The block size is the cache's, fixed for a run. 0 (run eagerly)
    // when a field does not fit its 16 bits.
    const uint64_t fields[] = {staging_epoch_, t, logit_rows.size(), static_cast<uint64_t>(m.stride)};
    uint64_t key = 0;
    for (uint64_t f : fields) {
      if (f > 0xffff) return 0;
      key = key << 16 | f;
    }
    return key;
  }

  void begin_capture() override {
    DILU_CHECK(graph_arena_ && !capturing_, "begin_capture() without enable_graphs(), or inside a capture");
    DILU_CU(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    capturing_ = true;
  }

  std::shared_ptr<void> end_capture() override {
    DILU_CHECK(capturing_, "end_capture() outside a capture");
    DILU_CHECK(side_state_ == 0, "end_capture() with side work not joined");
    capturing_ = false;
    cudaGraph_t graph = nullptr;
    cudaError_t rc = cudaStreamEndCapture(stream_, &graph);
    cudaGraphExec_t exec = nullptr;
    if (rc == cudaSuccess) rc = cudaGraphInstantiate(&exec, graph, 0);
    if (graph != nullptr) cudaGraphDestroy(graph);
    if (rc != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error(std::string("CUDA graph capture: ") + cudaGetErrorString(rc));
    }
    return std::shared_ptr<void>(exec, [](void* e) { cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(e)); });
  }

  void abort_capture() override {
    if (!capturing_) return;
    reset_side();
    capturing_ = false;
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(stream_, &graph);
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();
  }

  void replay(const std::shared_ptr<void>& graph) override {
    DILU_CHECK(graph != nullptr && !capturing_, "replay() of no graph, or inside a capture");
    step_event(1);
    DILU_CU(cudaGraphLaunch(static_cast<cudaGraphExec_t>(graph.get()), stream_));
    step_event(2);
  }

  void* native_stream() const override { return stream_; }

  // ---- ops ----
  void embedding(const Tensor& table, std::span<const int32_t> ids, Tensor& out, int64_t first_id) override {
    check_f32(out, "embedding output");
    const int64_t d = table.dim(1), n = static_cast<int64_t>(ids.size());
    DILU_CHECK(out.dim(0) == n && out.dim(1) == d, "embedding shapes");
    if (n == 0) return;
    Tensor dev_ids = stage_ids(ids);
    cuda::embedding(table.raw(), table_type(table.dtype()), table.dim(0), d, dev_ids.data<int32_t>(), n, first_id,
                    out.data<float>(), stream_);
  }

  void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& out) override {
    check_f32(x, "rms_norm input");
    check_f32(w, "rms_norm weight");
    check_f32(out, "rms_norm output");
    const int64_t d = w.numel(), width = x.numel() == 0 ? d : x.dim(-1), rows = width == 0 ? 0 : x.numel() / width;
    DILU_CHECK(d <= width && out.numel() == x.numel() && (x.numel() == 0 || out.dim(-1) == width), "rms_norm: x ",
               shape_str(x.shape()), ", w ", shape_str(w.shape()), ", out ", shape_str(out.shape()));
    cuda::rms_norm(x.data<float>(), nullptr, w.data<float>(), rows, width, d, eps, out.data<float>(), stream_);
  }

  void add_rms_norm(Tensor& x, const Tensor& y, const Tensor& w, float eps, Tensor& out) override {
    check_f32(x, "add_rms_norm residual");
    check_f32(y, "add_rms_norm input");
    check_f32(w, "add_rms_norm weight");
    check_f32(out, "add_rms_norm output");
    const int64_t d = w.numel();
    if (x.numel() == 0) return;
    const int64_t width = x.dim(-1);
    if (d != width || y.numel() != x.numel() || out.numel() != x.numel()) {
      Ops::add_rms_norm(x, y, w, eps, out);
      return;
    }
    cuda::rms_norm(x.data<float>(), y.data<float>(), w.data<float>(), x.numel() / width, width, d, eps,
                   out.data<float>(), stream_);
  }

  void gather_rows(const Tensor& x, std::span<const int32_t> rows, Tensor& out) override {
    check_f32(x, "gather input");
    check_f32(out, "gather output");
    const int64_t width = x.dim(1);
    DILU_CHECK(out.dim(0) == static_cast<int64_t>(rows.size()) && out.dim(1) == width, "gather shapes");
    for (int32_t r : rows) DILU_CHECK(r >= 0 && r < x.dim(0), "gather row ", r);
    if (rows.empty()) return;
    Tensor dev_rows = upload_cached(kUpRows, rows.data(), rows.size() * sizeof(int32_t), DType::I32);
    cuda::gather_rows(x.data<float>(), width, dev_rows.data<int32_t>(), static_cast<int64_t>(rows.size()),
                      out.data<float>(), stream_);
  }

  void add(Tensor& x, const Tensor& y) override {
    check_f32(x, "add destination");
    check_f32(y, "add source");
    DILU_CHECK(x.numel() == y.numel(), "add shapes ", shape_str(x.shape()), " and ", shape_str(y.shape()));
    cuda::add(x.data<float>(), y.data<float>(), x.numel(), stream_);
  }

  void linear(const Tensor& x, const LinearWeight& w, Tensor& out) override {
    check_f32(x, "linear input");
    check_f32(out, "linear output");
    const int64_t t = x.dim(0), in = w.in_features(), n_out = w.out_features();
    DILU_CHECK(x.dim(1) == in && out.dim(0) == t && out.dim(1) == n_out, "linear: x ", shape_str(x.shape()), ", W ",
               shape_str(w.weight.shape()), ", out ", shape_str(out.shape()));
    check_device(w.weight, "linear weight");
    if (t == 0 || n_out == 0) return;
    const DType wt = w.weight.dtype();
    if (wt == DType::BF16) {
      // Decode rows (lm_head): a kernel streaming the weight once, near copy bandwidth; cuBLASLt
      // read R1's lm_head at 2843 GB/s against a copy's 3015. DILU_BF16_GEMV=0 keeps cuBLASLt
      // (a switch for measuring).
      if (fast_ && bf16_gemv_ &&
          cuda::bf16_gemv(x.data<float>(), in, t, static_cast<const uint16_t*>(w.weight.raw()), n_out, in,
                          out.data<float>(), n_out, stream_))
        return;
      Tensor xb = empty(DType::BF16, {t, in});
      cuda::f32_to_bf16(x.data<float>(), static_cast<uint16_t*>(xb.raw()), t * in, stream_);
      if (lt_matmul(CUDA_R_16BF, w.weight.raw(), nullptr, xb.raw(), nullptr, out.raw(), n_out, t, in)) return;
    } else if (wt == DType::F8E4M3 && fp8_block_ && w.block_out == 128 && w.block_in == 128 && in % 128 == 0 &&
               n_out % 16 == 0) {
      // cuBLASLt's scale tensors, as measured (tests/gpu/cuda_ops_test.cpp, CudaFp8Block, with
      // magnitudes varying per token and per group so that a misplaced scale shows): the
      // weight's 128x128 block scales [N/128, K/128] row-major (DeepSeek's layout) with rows
      // padded to a multiple of 4 floats; the activations' scales [K/128, T], T fastest. Token
      // counts that are not a multiple of 8 gave wrong results (1, 2, 3, 5, 6, 7, 33 did; 40 and
      // 64 did not), so the activations are padded with zero rows to a multiple of 8.
      const int64_t kb = in / 128;
      DILU_CHECK(w.scale_inv.dim(1) == (kb + 3) / 4 * 4, "FP8 scales not placed by this backend");
      if (fp8_small(x, w, out, nullptr, nullptr)) return;
      const Fp8Rows q = quantize_rows(x);
      if (fp8_lt_linear(q, w, out)) return;
    }
    // BF16 math in the tiled kernel: FP8 weights dequantized in its tile loader (soft FP8), and
    // whatever cuBLASLt declined.
    cuda::GroupedGemm g;
    g.x = x.data<float>();
    g.ldx = in;
    g.rows = t;
    g.weight = w.weight.raw();
    g.scale = wt == DType::F8E4M3 ? w.scale_inv.data<float>() : nullptr;
    g.type = weight_type(wt);
    g.n = n_out;
    g.k = in;
    g.block_out = w.block_out;
    g.block_in = w.block_in;
    g.scale_stride = wt == DType::F8E4M3 ? w.scale_inv.dim(1) : 0;
    g.round_bf16 = true;
    g.out = out.data<float>();
    g.ldo = n_out;
    gemm(g, t, kGemvDenseTokens);
  }

  // Activations quantized for cuBLASLt's block-scaled FP8 product: rows padded with zeros to a
  // multiple of 8 (t8), per-token scales per 128 channels as [K/128, t8]. With `up`, the rows of
  // silu(x) * up (as silu_mul computes them).
  struct Fp8Rows {
    Tensor q, scales;
    int64_t t = 0, t8 = 0;
  };
  Fp8Rows quantize_rows(const Tensor& x, const Tensor* up = nullptr) {
    Fp8Rows r;
    const int64_t in = x.dim(1);
    r.t = x.dim(0);
    r.t8 = (r.t + 7) / 8 * 8;
    r.q = empty(DType::U8, {r.t8, in});
    r.scales = empty(DType::F32, {in / 128, r.t8});
    if (up)
      cuda::silu_mul_quantize_fp8(x.data<float>(), up->data<float>(), r.t, r.t8, in, r.q.data<uint8_t>(),
                                  r.scales.data<float>(), 1, r.t8, stream_);
    else
      cuda::quantize_fp8_per_token_128(x.data<float>(), r.t, r.t8, in, r.q.data<uint8_t>(), r.scales.data<float>(),
                                       1, r.t8, stream_);
    return r;
  }
  // cuBLASLt's block-scaled FP8 product of quantized rows; false (nothing queued) if it declines.
  bool fp8_lt_linear(const Fp8Rows& q, const LinearWeight& w, Tensor& out) {
    const int64_t n_out = w.out_features();
    Tensor padded_out = q.t8 == q.t ? out : empty(DType::F32, {q.t8, n_out});
    if (!lt_matmul(CUDA_R_8F_E4M3, w.weight.raw(), w.scale_inv.data<float>(), q.q.raw(), q.scales.data<float>(),
                   padded_out.raw(), n_out, q.t8, w.in_features()))
      return false;
    if (q.t8 != q.t)
      DILU_CU(cudaMemcpyAsync(out.raw(), padded_out.raw(), out.nbytes(), cudaMemcpyDeviceToDevice, stream_));
    return true;
  }
  // Whether linear() takes w on cuBLASLt's block-scaled FP8 product for rows of x.
  bool fp8_lt_eligible(const Tensor& x, const LinearWeight& w) const {
    const int64_t in = w.in_features();
    return w.weight.dtype() == DType::F8E4M3 && fp8_block_ && w.block_out == 128 && w.block_in == 128 &&
           in % 128 == 0 && w.out_features() % 16 == 0 && x.dim(1) == in && w.scale_inv.rank() == 2 &&
           w.scale_inv.dim(1) == (in / 128 + 3) / 4 * 4;
  }

  // Few tokens (decode): the block-scaled FP8 product on FP8 tensor cores (grouped_fp8), weights
  // read once at close to bandwidth, where cuBLASLt reads them at about half of it (H100, M = 1).
  // x is quantized once for both products when a second weight is given (linear2), and one
  // launch covers both. False (nothing queued) when the operands are outside that kernel.
  // With `up`: the product of silu(x) * up (silu_mul_quantize_fp8: the bytes silu_mul() then the
  // quantization give). With `norm`: of rms_norm(x) (rms_norm_quantize, which also writes the norm
  // to norm->out).
  struct NormInput {
    const Tensor* w = nullptr;
    float eps = 0.0f;
    Tensor* out = nullptr;
  };
  bool fp8_small(const Tensor& x, const LinearWeight& w, Tensor& out, const LinearWeight* w2, Tensor* out2,
                 const Tensor* up = nullptr, const NormInput* norm = nullptr) {
    const int64_t t = x.dim(0), in = w.in_features(), kb = in / 128;
    const auto blocked = [&](const LinearWeight& v) {
      return v.weight.dtype() == DType::F8E4M3 && v.block_out == 128 && v.block_in == 128 && v.in_features() == in &&
             v.out_features() % 16 == 0 && v.scale_inv.dim(1) == (kb + 3) / 4 * 4;
    };
    if (!fast_ || !fp8_block_ || t > kFp8SmallTokens || in % 128 != 0 || !blocked(w) || (w2 && !blocked(*w2)))
      return false;
    cuda::GroupedGemm g;
    g.rows = t;
    g.weight = w.weight.raw();
    g.scale = w.scale_inv.data<float>();
    g.type = cuda::WeightType::FP8;
    g.n = w.out_features();
    g.k = in;
    g.block_out = 128;
    g.block_in = 128;
    g.scale_stride = w.scale_inv.dim(1);
    g.ldx = in;
    g.lds = kb;
    g.out = out.data<float>();
    g.ldo = g.n;
    if (w2) {
      g.weight2 = w2->weight.raw();
      g.scale2 = w2->scale_inv.data<float>();
      g.n2 = w2->out_features();
      g.scale_stride2 = w2->scale_inv.dim(1);
      g.out2 = out2->data<float>();
      g.ldo2 = g.n2;
    }
    Tensor xq = empty(DType::U8, {t, in});
    Tensor xs = empty(DType::F32, {t, kb});
    g.xq = xq.data<uint8_t>();
    g.xscale = xs.data<float>();
    if (!cuda::grouped_fp8_fits(g) || (w2 && !cuda::grouped_fp8_pairs(g))) return false;
    if (norm) {
      if (!cuda::rms_norm_quantize(x.data<float>(), norm->w->data<float>(), t, in, norm->eps, norm->out->data<float>(),
                                   xq.data<uint8_t>(), xs.data<float>(), stream_))
        return false;
    } else if (up) {
      cuda::silu_mul_quantize_fp8(x.data<float>(), up->data<float>(), t, t, in, xq.data<uint8_t>(), xs.data<float>(),
                                  kb, 1, stream_);
    } else {
      cuda::quantize_fp8_per_token_128(x.data<float>(), t, t, in, xq.data<uint8_t>(), xs.data<float>(), kb, 1,
                                       stream_);
    }
    fp8_gemm(g);
    return true;
  }

  void linear2(const Tensor& x, const LinearWeight& a, Tensor& out_a, const LinearWeight& b, Tensor& out_b) override {
    check_f32(x, "linear input");
    check_f32(out_a, "linear output");
    check_f32(out_b, "linear output");
    const int64_t t = x.dim(0);
    const bool shapes = x.dim(1) == a.in_features() && x.dim(1) == b.in_features() && out_a.dim(0) == t &&
                        out_b.dim(0) == t && out_a.dim(1) == a.out_features() && out_b.dim(1) == b.out_features();
    if (shapes && t > 0 && !a.weight.is_cpu() && !b.weight.is_cpu() && fp8_small(x, a, out_a, &b, &out_b)) return;
    // More rows (prefill, large decode batches): x quantized once for both cuBLASLt products.
    // (linear() makes the same products of the same quantized rows, bit for bit.)
    if (shapes && (!fast_ || t > kFp8SmallTokens) && fp8_lt_eligible(x, a) && fp8_lt_eligible(x, b)) {
      check_device(a.weight, "linear weight");
      check_device(b.weight, "linear weight");
      const Fp8Rows q = quantize_rows(x);
      if (!fp8_lt_linear(q, a, out_a)) linear(x, a, out_a);
      if (!fp8_lt_linear(q, b, out_b)) linear(x, b, out_b);
      return;
    }
    linear(x, a, out_a);
    linear(x, b, out_b);
  }

  void silu_mul_linear(Tensor& gate, const Tensor& up, const LinearWeight& w, Tensor& out) override {
    check_f32(gate, "silu_mul gate");
    check_f32(up, "silu_mul up");
    check_f32(out, "linear output");
    const int64_t t = gate.dim(0);
    // Past decode sizes, cuBLASLt's FP8 product (as linear() takes it) of silu(gate) * up quantized
    // straight from gate and up: the same bytes as silu_mul() then linear()'s quantization.
    if (t > 0 && up.numel() == gate.numel() && out.dim(0) == t && out.dim(1) == w.out_features() &&
        (!fast_ || t > kFp8SmallTokens) && fp8_lt_eligible(gate, w) && !w.weight.is_cpu()) {
      check_device(w.weight, "linear weight");
      if (fp8_lt_linear(quantize_rows(gate, &up), w, out)) return;
    }
    // Decode sizes: the small-batch kernel's input quantized from gate and up the same way.
    if (t > 0 && up.numel() == gate.numel() && gate.dim(1) == w.in_features() && out.dim(0) == t &&
        out.dim(1) == w.out_features() && !w.weight.is_cpu() && fp8_small(gate, w, out, nullptr, nullptr, &up))
      return;
    Ops::silu_mul_linear(gate, up, w, out);
  }

  void rms_norm_linear(const Tensor& x, const Tensor& norm_w, float eps, Tensor& normed, const LinearWeight& w,
                       Tensor& out) override {
    check_f32(x, "rms_norm input");
    check_f32(norm_w, "rms_norm weight");
    check_f32(normed, "rms_norm output");
    check_f32(out, "linear output");
    const int64_t t = x.dim(0);
    const NormInput norm{&norm_w, eps, &normed};
    // Decode sizes: the norm and the small-batch kernel's input quantization in one kernel.
    if (t > 0 && x.rank() == 2 && norm_w.numel() == x.dim(1) && normed.numel() == x.numel() &&
        x.dim(1) == w.in_features() && out.dim(0) == t && out.dim(1) == w.out_features() && !w.weight.is_cpu() &&
        fp8_small(x, w, out, nullptr, nullptr, nullptr, &norm))
      return;
    Ops::rms_norm_linear(x, norm_w, eps, normed, w, out);
  }

  // The grouped GEMM of a step of `tokens` tokens. With cuda.kernels=fast: tensor cores where the
  // operands fit them (experts at any batch; a single weight once the step has more than
  // `gemv_tokens` tokens: below that a lone matrix gives the MMA kernel too few blocks), else the
  // small-batch GEMV up to `gemv_tokens` tokens. Otherwise, and for what neither takes, the tiled
  // FP32 kernel.
  static constexpr int64_t kGemvDenseTokens = 32, kGemvExpertTokens = 256;
  // The most tokens whose experts' inputs moe_group_small quantizes in its one block.
  static constexpr int64_t kGroupQuantizeTokens = 8;
  // Block-scaled FP8 linears of at most this many tokens run on grouped_fp8, not cuBLASLt.
  static constexpr int64_t kFp8SmallTokens = 16;
  void gemm(const cuda::GroupedGemm& g, int64_t tokens, int64_t gemv_tokens) {
    const bool small = tokens <= gemv_tokens && cuda::grouped_gemv_fits(g);
    if (fast_ && cuda::grouped_mma_fits(g) && (g.groups > 1 || !small)) {
      const int64_t splits = cuda::grouped_mma_splits(g, props_.multiProcessorCount);
      Tensor partial = splits > 1 ? empty(DType::F32, {splits * g.rows * g.n}) : Tensor();
      cuda::grouped_mma(g, stream_, splits, splits > 1 ? partial.data<float>() : nullptr);
    }
    else if (fast_ && small) cuda::grouped_gemv(g, stream_);
    else cuda::grouped_gemm(g, stream_);
  }

  // The block-scaled FP8 product on FP8 tensor cores (g.xq and g.xscale set), split over K when
  // few rows leave the GPU idle.
  void fp8_gemm(const cuda::GroupedGemm& g) {
    const int64_t splits = cuda::grouped_fp8_splits(g, props_.multiProcessorCount);
    Tensor partial = splits > 1 ? empty(DType::F32, {splits * g.rows * (g.n + g.n2)}) : Tensor();
    cuda::grouped_fp8(g, stream_, splits, splits > 1 ? partial.data<float>() : nullptr);
  }

  void silu_mul(const Tensor& gate, const Tensor& up, Tensor& out) override {
    check_f32(gate, "silu_mul gate");
    check_f32(up, "silu_mul up");
    check_f32(out, "silu_mul output");
    DILU_CHECK(gate.numel() == up.numel() && out.numel() == up.numel(), "silu_mul shapes");
    cuda::silu_mul(gate.data<float>(), up.data<float>(), gate.numel(), out.data<float>(), stream_);
  }

  void rope(Tensor& x, int64_t offset, std::span<const int32_t> pos, std::span<const float> inv_freq,
            float attention_factor) override {
    check_f32(x, "rope input");
    DILU_CHECK(x.rank() == 3 && x.dim(0) == static_cast<int64_t>(pos.size()) &&
                   offset + 2 * static_cast<int64_t>(inv_freq.size()) <= x.dim(2),
               "rope: x ", shape_str(x.shape()), " offset ", offset);
    if (pos.empty() || inv_freq.empty()) return;
    Tensor dev_pos = upload_cached(kUpRopePos, pos.data(), pos.size() * sizeof(int32_t), DType::I32);
    Tensor dev_freq = upload_cached(kUpRopeFreq, inv_freq.data(), inv_freq.size() * sizeof(float), DType::F32);
    cuda::rope(x.data<float>(), x.dim(0), x.dim(1), x.dim(2), offset, dev_pos.data<int32_t>(), dev_freq.data<float>(),
               static_cast<int64_t>(inv_freq.size()), attention_factor, stream_);
  }

  void cache_write(Tensor& cache, const Tensor& entry, const AttentionLayout& layout) override {
    DILU_CHECK(cache.dtype() == DType::BF16 && !cache.is_cpu(), "the GPU latent cache is BF16 on the device");
    check_f32(entry, "kv cache entry");
    const int64_t width = cache.dim(2), slots = cache.dim(0) * cache.dim(1);
    const int64_t t = static_cast<int64_t>(layout.token_slot.size());
    DILU_CHECK(entry.dim(1) == width && entry.dim(0) == t, "cache_write shapes");
    for (int64_t s : layout.token_slot) DILU_CHECK(s >= 0 && s < slots, "cache slot ", s, " outside ", slots);
    if (t == 0) return;
    Tensor dev_slots = upload_cached(kUpSlots, layout.token_slot.data(), static_cast<size_t>(t) * sizeof(int64_t), DType::I64);
    cuda::cache_write(static_cast<uint16_t*>(cache.raw()), entry.data<float>(), dev_slots.data<int64_t>(), t, width,
                      stream_);
  }

  void mla_attention(const Tensor& q, const MlaWeight& kv_b, const Tensor& cache, const AttentionLayout& layout,
                     const MlaParams& p, Tensor& out) override {
    const Tensor& w_kv_b = kv_b.w;
    check_f32(q, "mla query");
    check_f32(w_kv_b, "mla kv_b weight");
    check_f32(out, "mla output");
    DILU_CHECK(cache.dtype() == DType::BF16 && !cache.is_cpu(), "the GPU latent cache is BF16 on the device");
    const int64_t t = q.dim(0), h = p.num_heads, nope = p.qk_nope_head_dim, r = p.qk_rope_head_dim,
                  c = p.kv_lora_rank, v = p.v_head_dim, bs = layout.block_size;
    DILU_CHECK(q.rank() == 3 && q.dim(1) == h && q.dim(2) == nope + r, "mla q ", shape_str(q.shape()));
    DILU_CHECK(w_kv_b.dim(0) == h * (nope + v) && w_kv_b.dim(1) == c, "mla kv_b ", shape_str(w_kv_b.shape()));
    DILU_CHECK(cache.dim(2) == c + r && cache.dim(1) == bs, "mla cache ", shape_str(cache.shape()));
    DILU_CHECK(out.dim(0) == t && out.dim(1) == h * v, "mla out ", shape_str(out.shape()));
    DILU_CHECK(static_cast<int64_t>(layout.token_seq.size()) == t && static_cast<int64_t>(layout.token_pos.size()) == t,
               "mla layout of ", layout.token_seq.size(), " tokens for ", t);
    if (t == 0) return;
    for (int64_t i = 0; i < t; ++i) {
      const int32_t seq = layout.token_seq[static_cast<size_t>(i)];
      DILU_CHECK(seq >= 0 && static_cast<size_t>(seq) < layout.block_tables.size(), "token sequence ", seq);
      const auto& blocks = layout.block_tables[static_cast<size_t>(seq)];
      DILU_CHECK(static_cast<int64_t>(blocks.size()) * bs > layout.token_pos[static_cast<size_t>(i)],
                 "block table too short for position ", layout.token_pos[static_cast<size_t>(i)]);
      for (int32_t b : blocks) DILU_CHECK(b >= 0 && b < cache.dim(0), "cache block ", b, " outside ", cache.dim(0));
    }
    if (mla_fused_ && mla_prefill_ != "absorbed" && kv_b.expand.defined() && !capturing_) {
      // Prompts (a sequence with two or more tokens in this step, at least a quarter of its
      // context) in the expanded form; the other tokens (decode rows beside them) gathered, in the
      // absorbed form, and scattered back. Forced (mla_prefill=expanded): every token expanded.
      // (Decode steps, one token a sequence, stay absorbed even at tiny contexts: their replays
      // from a CUDA graph, which never expand, then match their eager first run.)
      std::map<int32_t, std::pair<int64_t, int32_t>> seqs;  // seq -> (tokens, last position)
      for (int64_t i = 0; i < t; ++i) {
        auto& [n, last] = seqs.try_emplace(layout.token_seq[static_cast<size_t>(i)], 0, 0).first->second;
        ++n;
        last = std::max(last, layout.token_pos[static_cast<size_t>(i)]);
      }
      std::vector<int32_t> expanded, rest;
      for (int64_t i = 0; i < t; ++i) {
        const auto& [n, last] = seqs.at(layout.token_seq[static_cast<size_t>(i)]);
        const bool prompt = n >= 2 && cuda::kMlaExpandedMaxContext * n >= last + 1;
        (mla_prefill_ == "expanded" || prompt ? expanded : rest).push_back(static_cast<int32_t>(i));
      }
      if (!expanded.empty() && mla_expanded(q, kv_b, cache, layout, p, expanded, out)) {
        if (rest.empty()) return;
        AttentionLayout sub;
        sub.block_size = bs;
        sub.block_tables = layout.block_tables;
        for (int32_t i : rest) {
          sub.token_seq.push_back(layout.token_seq[static_cast<size_t>(i)]);
          sub.token_pos.push_back(layout.token_pos[static_cast<size_t>(i)]);
        }
        const int64_t tr = static_cast<int64_t>(rest.size());
        const Tensor d_rest = upload_cached(kUpMlaRest, rest.data(), rest.size() * sizeof(int32_t), DType::I32);
        Tensor q_sub = empty(DType::F32, {tr, h, nope + r}), out_sub = empty(DType::F32, {tr, h * v});
        cuda::gather_rows(q.data<float>(), h * (nope + r), d_rest.data<int32_t>(), tr, q_sub.data<float>(), stream_);
        mla_absorbed(q_sub, kv_b, cache, sub, p, out_sub);
        cuda::scatter_rows(out_sub.data<float>(), h * v, d_rest.data<int32_t>(), tr, out.data<float>(), stream_);
        return;
      }
    }
    mla_absorbed(q, kv_b, cache, layout, p, out);
  }

  // The absorbed form (the fast kernels' decode path, and the reference kernels').
  void mla_absorbed(const Tensor& q, const MlaWeight& kv_b, const Tensor& cache, const AttentionLayout& layout,
                    const MlaParams& p, Tensor& out) {
    const Tensor& w_kv_b = kv_b.w;
    const int64_t t = q.dim(0), h = p.num_heads, nope = p.qk_nope_head_dim, r = p.qk_rope_head_dim,
                  c = p.kv_lora_rank, v = p.v_head_dim, bs = layout.block_size;
    const MlaLayout dev = mla_layout(layout);
    Tensor q_lat = empty(DType::F32, {t, h, c}), o_lat = empty(DType::F32, {t, h, c});
    const bool split_wanted =
        mla_fused_ && kv_b.split.defined() && (mla_absorb_ == "bf16x3" || t >= cuda::kMlaSplitMinTokens);
    if (mla_fused_ && kv_b.split.defined())
      DILU_CHECK(kv_b.split.numel() == w_kv_b.numel() && kv_b.split_scale.numel() == h * 2 * c,
                 "mla kv_b split form ", shape_str(kv_b.split.shape()), " for ", shape_str(w_kv_b.shape()));
    cuda::MlaArgs a;
    a.q = q.data<float>();
    a.kv_b = w_kv_b.data<float>();
    a.cache = static_cast<const uint16_t*>(cache.raw());
    a.token_seq = dev.seq.data<int32_t>();
    a.token_pos = dev.pos.data<int32_t>();
    a.tables = dev.tables.data<int32_t>();
    a.table_stride = dev.stride;
    a.block_size = bs;
    a.t = t;
    a.h = h;
    a.nope = nope;
    a.r = r;
    a.c = c;
    a.v = v;
    a.scale = p.softmax_scale;
    a.q_lat = q_lat.data<float>();
    a.o_lat = o_lat.data<float>();
    a.out = out.data<float>();
    if (!mla_fused_) {
      cuda::mla_attention(a, stream_);
      return;
    }
    // Fused: the absorptions as one strided-batched SGEMM over heads each (W read once per step,
    // not once per token), the core with all heads of a block sharing each tile of the cache,
    // the context split over blocks when the batch alone cannot fill the GPU.
    //   q_lat[t, h, :] = q[t, h, :nope] @ W_UK[h]: column-major C x T = (C x nope) (nope x T)
    //   split (cuda::mla_kv_b_split): q_lat without W_UK's scales, which the core applies.
    const bool split = split_wanted && cuda::mla_split_fits(a);
    const uint16_t* w_split = kv_b.split.defined() ? static_cast<const uint16_t*>(kv_b.split.raw()) : nullptr;
    // A few tokens (decode), automatic choice: GEMVs over the split form, which reads half the
    // F32 form's bytes and joins the chain of programmatic launches (cuBLAS breaks it).
    const bool gemv = mla_absorb_ == "auto" && kv_b.split.defined() && cuda::mla_absorb_gemv_fits(a);
    if (gemv) {
      cuda::mla_absorb_q_gemv(a, w_split, kv_b.split_scale.data<float>(), stream_);
    } else if (split) {
      cuda::mla_absorb_q_split(a, w_split, stream_);
      a.q_scale = kv_b.split_scale.data<float>();
    } else if (!lt_sgemm_batched(false, c, t, nope, a.kv_b, c, (nope + v) * c, a.q, h * (nope + r), nope + r, a.q_lat,
                                 h * c, c, h)) {
      cuda::mla_absorb_q(a, stream_);
    }
    // The wgmma core (64 heads a block, one block an SM) where its blocks fill at least half the
    // SMs before the context is split, or where asked for; the mma core (16 heads a block, two an
    // SM) else. On an H100 (dilu_mla_bench, context 1024) the wgmma core is slower at 32 tokens
    // (64 blocks: 197 against 160 us a call) and faster from 64 (212 against 270 us).
    const int64_t sms = props_.multiProcessorCount;
    const bool wgmma = mla_core_ != "mma" && cuda::mla_core_wgmma_fits(a) &&
                       (mla_core_ == "wgmma" || 2 * t * (h / cuda::kMlaWgmmaHeads) >= sms);
    const int64_t group_heads = wgmma ? cuda::kMlaWgmmaHeads : cuda::kMlaFusedHeads;
    const int64_t groups = (h + group_heads - 1) / group_heads;
    const int64_t target = (wgmma ? 1 : 2) * sms;
    int64_t splits = 1;
    if (t * groups < target) {
      splits = std::min<int64_t>((target + t * groups - 1) / (t * groups), cuda::kMlaMaxSplits);
      // The partial states must fit the persistent split scratch.
      const int64_t per_split = t * h * (c + 2) * static_cast<int64_t>(sizeof(float));
      splits = std::max<int64_t>(1, std::min<int64_t>(splits, static_cast<int64_t>(mla_split_bytes_) / per_split));
    }
    float* part_o = nullptr;
    float* part_ml = nullptr;
    if (splits > 1) {
      part_o = static_cast<float*>(mla_split_scratch_.raw());
      part_ml = part_o + splits * t * h * c;
    }
    if (wgmma) cuda::mla_core_wgmma(a, splits, part_o, part_ml, stream_);
    else if (cuda::mla_core_mma_fits(a)) cuda::mla_core_mma(a, splits, part_o, part_ml, stream_);
    else cuda::mla_core_fused(a, splits, part_o, part_ml, stream_);
    //   out[t, h*v + i] = o_lat[t, h, :] . W_UV[h][i, :]: column-major v x T = (C x v)^T (C x T)
    //   split: (o_lat * W_UV's scales) against W_UV's stored values.
    if (gemv) {
      cuda::mla_absorb_v_gemv(a, w_split, kv_b.split_scale.data<float>(), stream_);
    } else if (split) {
      cuda::mla_absorb_v_split(a, w_split, kv_b.split_scale.data<float>(), stream_);
    } else if (!lt_sgemm_batched(true, v, t, c, a.kv_b + nope * c, c, (nope + v) * c, a.o_lat, h * c, c, a.out, h * v,
                                 v, h)) {
      cuda::mla_absorb_v(a, stream_);
    }
  }

  // MLA in the expanded form (cuda::mla_attention_expanded) where it is chosen and runs: the
  // tokens grouped by sequence and sorted by position into tiles, each sequence's context (up to
  // its last query's position) gathered from the cache, and per group of heads one BF16 GEMM for
  // the keys and values, then attention. Its scratch is held to what the absorbed form's latent
  // queries and outputs would take (2 T H C floats, which step_scratch_bytes counts), with at
  // least 64 MiB when forced. Returns false, having written nothing, where the absorbed form runs.
  bool mla_expanded(const Tensor& q, const MlaWeight& kv_b, const Tensor& cache, const AttentionLayout& layout,
                    const MlaParams& p, std::span<const int32_t> tokens, Tensor& out) {
    const int64_t t = static_cast<int64_t>(tokens.size()), h = p.num_heads, nope = p.qk_nope_head_dim,
                  r = p.qk_rope_head_dim, c = p.kv_lora_rank, v = p.v_head_dim, bs = layout.block_size;
    if (mla_prefill_ == "auto" && t < cuda::kMlaExpandedMinTokens) return false;
    // Tokens by sequence, in position order; a sequence's context is up to its last query.
    std::map<int32_t, std::vector<std::pair<int32_t, int32_t>>> by_seq;  // seq -> (position, token)
    for (int32_t i : tokens)
      by_seq[layout.token_seq[static_cast<size_t>(i)]].push_back({layout.token_pos[static_cast<size_t>(i)], i});
    int64_t positions = 0;
    for (auto& [seq, toks] : by_seq) {
      std::sort(toks.begin(), toks.end());
      positions += toks.back().first + 1;
    }
    // Scratch: lat2 and rope per position, then hg heads' keys and values per position.
    const int64_t budget = std::max<int64_t>(2 * t * h * c * 4, mla_prefill_ == "expanded" ? int64_t{64} << 20 : 0);
    const int64_t fixed = positions * (2 * c + r) * 2, per_head = positions * (nope + v) * 4;
    if (fixed + per_head > budget) return false;
    int64_t hg = std::min<int64_t>(h, (budget - fixed) / per_head);
    while (h % hg != 0) --hg;  // equal groups: one cuBLASLt shape

    std::vector<int32_t> slots, rows, tiles;
    slots.reserve(static_cast<size_t>(positions));
    rows.reserve(static_cast<size_t>(t));
    for (const auto& [seq, toks] : by_seq) {
      const auto& table = layout.block_tables[static_cast<size_t>(seq)];
      const int64_t kv0 = static_cast<int64_t>(slots.size()), ctx = toks.back().first + 1;
      for (int64_t j = 0; j < ctx; ++j)
        slots.push_back(static_cast<int32_t>(table[static_cast<size_t>(j / bs)] * bs + j % bs));
      for (size_t i = 0; i < toks.size(); i += cuda::kMlaExpandedRows) {
        const size_t n = std::min<size_t>(cuda::kMlaExpandedRows, toks.size() - i);
        tiles.insert(tiles.end(), {static_cast<int32_t>(rows.size()), static_cast<int32_t>(n),
                                   static_cast<int32_t>(kv0), toks[i + n - 1].first + 1});
        for (size_t k = i; k < i + n; ++k) rows.push_back(toks[k].second);
      }
    }
    const Tensor d_slots = upload_cached(kUpMlaSlots, slots.data(), slots.size() * sizeof(int32_t), DType::I32);
    const Tensor d_rows = upload_cached(kUpMlaRows, rows.data(), rows.size() * sizeof(int32_t), DType::I32);
    const Tensor d_tiles = upload_cached(kUpMlaTiles, tiles.data(), tiles.size() * sizeof(int32_t), DType::I32);
    const Tensor d_pos = upload_cached(kUpMlaPos, layout.token_pos.data(), layout.token_pos.size() * sizeof(int32_t),
                                       DType::I32);
    Tensor lat2 = empty(DType::BF16, {positions, 2 * c}), rope = empty(DType::BF16, {positions, r});
    Tensor kv = empty(DType::F32, {positions, hg * (nope + v)});
    cuda::mla_gather_latent(static_cast<const uint16_t*>(cache.raw()), c, r, d_slots.data<int32_t>(), positions,
                            static_cast<uint16_t*>(lat2.raw()), static_cast<uint16_t*>(rope.raw()), stream_);
    cuda::MlaExpandedArgs a;
    a.q = q.data<float>();
    a.kv = kv.data<float>();
    a.rope = static_cast<const uint16_t*>(rope.raw());
    a.tiles = d_tiles.data<int32_t>();
    a.rows = d_rows.data<int32_t>();
    a.token_pos = d_pos.data<int32_t>();
    a.n_tiles = static_cast<int64_t>(tiles.size() / 4);
    a.h = h;
    a.hg = hg;
    a.nope = nope;
    a.r = r;
    a.v = v;
    a.scale = p.softmax_scale;
    a.out = out.data<float>();
    const auto* w2 = static_cast<const uint16_t*>(kv_b.expand.raw());
    for (int64_t h0 = 0; h0 < h; h0 += hg) {
      // kv [P, hg (nope + v)] = [lat | lat] [P, 2C] x expand[h0 ..]^T: hi and lo summed in one K.
      if (!lt_matmul(CUDA_R_16BF, w2 + h0 * (nope + v) * 2 * c, nullptr, lat2.raw(), nullptr, kv.raw(),
                     hg * (nope + v), positions, 2 * c)) {
        DILU_CHECK(h0 == 0, "cuBLASLt took the first group of heads' expansion but not a later one");
        return false;
      }
      a.h0 = h0;
      cuda::mla_attention_expanded(a, stream_);
    }
    return true;
  }

  // The token count whose algorithm serves n: n itself up to 16 (decode's small batches keep their
  // own choice), else the next power of two.
  static int64_t lt_bucket(int64_t n) {
    return n <= 16 ? n : static_cast<int64_t>(std::bit_ceil(static_cast<uint64_t>(n)));
  }

  // cuBLASLt's first choice for a matmul within our workspace (and, with align16, for operands
  // that are 16-byte aligned).
  LtChoice lt_heuristic(cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t la, cublasLtMatrixLayout_t lb,
                        cublasLtMatrixLayout_t ld, bool align16) {
    LtChoice choice;
    cublasLtMatmulPreference_t pref = nullptr;
    DILU_LT(cublasLtMatmulPreferenceCreate(&pref));
    const size_t ws = kLtWorkspace;
    const uint32_t align = 16;
    DILU_LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    if (align16)
      for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
        DILU_LT(cublasLtMatmulPreferenceSetAttribute(pref, attr, &align, sizeof(align)));
    cublasLtMatmulHeuristicResult_t h{};
    int found = 0;
    if (cublasLtMatmulAlgoGetHeuristic(lt_, desc, la, lb, ld, ld, pref, 1, &h, &found) != CUBLAS_STATUS_SUCCESS)
      found = 0;
    if (found > 0) {
      choice.ok = true;
      choice.algo = h.algo;
    }
    cublasLtMatmulPreferenceDestroy(pref);
    return choice;
  }

  // D_b = op(A_b) B_b for b < batch, column-major, F32 throughout (FP32 math, no TF32): A_b at
  // a + b * stride_a ([m, k] after op; stored [k, m] when trans_a), B_b [k, n], D_b [m, n].
  // Returns false (and remembers it) where cuBLASLt has no algorithm or the operands are not
  // 16-byte aligned; the caller then runs its own kernel.
  bool lt_sgemm_batched(bool trans_a, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, int64_t stride_a,
                        const float* b, int64_t ldb, int64_t stride_b, float* d, int64_t ldd, int64_t stride_d,
                        int64_t batch) {
    auto aligned = [](const void* p, int64_t stride, int64_t ld) {
      return reinterpret_cast<uintptr_t>(p) % 16 == 0 && stride % 4 == 0 && ld % 4 == 0;
    };
    if (!aligned(a, stride_a, lda) || !aligned(b, stride_b, ldb) || !aligned(d, stride_d, ldd)) return false;
    const auto key = std::make_tuple(trans_a, m, n, k, lda, stride_a, ldb, stride_b, ldd, stride_d, batch);
    auto it = sgemm_algos_.find(key);
    if (it != sgemm_algos_.end() && !it->second.ok) return false;
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
    DILU_LT(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_n = CUBLAS_OP_N;
    DILU_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
    DILU_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n)));
    auto layout = [&](cublasLtMatrixLayout_t* l, int64_t rows, int64_t cols, int64_t ldx, int64_t stride) {
      DILU_LT(cublasLtMatrixLayoutCreate(l, CUDA_R_32F, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ldx));
      const int32_t count = static_cast<int32_t>(batch);
      DILU_LT(cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
      DILU_LT(cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
    };
    layout(&la, trans_a ? k : m, trans_a ? m : k, lda, stride_a);
    layout(&lb, k, n, ldb, stride_b);
    layout(&ld, m, n, ldd, stride_d);
    auto cleanup = [&] {
      cublasLtMatrixLayoutDestroy(ld);
      cublasLtMatrixLayoutDestroy(lb);
      cublasLtMatrixLayoutDestroy(la);
      cublasLtMatmulDescDestroy(desc);
    };
    if (it == sgemm_algos_.end()) {
      // A new token count n. A heuristic search costs host time (milliseconds for cuBLASLt's
      // tensor-core kernels, docs/cuda.md) and decode's n changes every step as sequences finish,
      // so the search runs once per bucket of n (lt_bucket); a count inside the bucket takes the
      // bucket's algorithm when cuBLASLt accepts it for the exact shape (cublasLtMatmulAlgoCheck),
      // else its own search.
      const int64_t nb = lt_bucket(n);
      auto bucket_key = key;
      std::get<2>(bucket_key) = nb;
      auto bit = sgemm_buckets_.find(bucket_key);
      if (bit == sgemm_buckets_.end()) {
        cublasLtMatrixLayout_t lbb = nullptr, ldb_ = nullptr;
        layout(&lbb, k, nb, ldb, stride_b);
        layout(&ldb_, m, nb, ldd, stride_d);
        bit = sgemm_buckets_.emplace(bucket_key, lt_heuristic(desc, la, lbb, ldb_, true)).first;
        cublasLtMatrixLayoutDestroy(ldb_);
        cublasLtMatrixLayoutDestroy(lbb);
      }
      LtChoice choice;
      if (bit->second.ok) {
        cublasLtMatmulHeuristicResult_t check{};
        if (cublasLtMatmulAlgoCheck(lt_, desc, la, lb, ld, ld, &bit->second.algo, &check) == CUBLAS_STATUS_SUCCESS &&
            check.workspaceSize <= kLtWorkspace)
          choice = bit->second;
      }
      if (!choice.ok) choice = lt_heuristic(desc, la, lb, ld, true);
      it = sgemm_algos_.emplace(key, choice).first;
      if (!choice.ok) {
        cleanup();
        return false;
      }
    }
    const float alpha = 1.0f, beta = 0.0f;
    const cublasStatus_t st = cublasLtMatmul(lt_, desc, &alpha, a, la, b, lb, &beta, d, ld, d, ld, &it->second.algo,
                                             lt_workspace_, kLtWorkspace, stream_);
    cleanup();
    if (st != CUBLAS_STATUS_SUCCESS) {
      it->second.ok = false;  // this shape runs the caller's kernel from now on
      return false;
    }
    return true;
  }

  void moe_route(const Tensor& x, const Tensor& gate, const Tensor& bias, const RouterParams& p, Tensor& ids,
                 Tensor& weights) override {
    check_f32(x, "router input");
    check_f32(gate, "router weight");
    check_f32(weights, "router weights");
    const int64_t t = x.dim(0), d = x.dim(1), e = p.num_experts, k = p.top_k;
    DILU_CHECK(gate.dim(0) == e && gate.dim(1) == d, "router weight ", shape_str(gate.shape()));
    DILU_CHECK(ids.dtype() == DType::I32 && ids.dim(0) == t && ids.dim(1) == k, "router ids");
    DILU_CHECK(p.n_group >= 1 && e % p.n_group == 0 && p.topk_group <= p.n_group && k <= e, "router groups");
    if (t == 0) return;
    Tensor logits = empty(DType::F32, {t, e});
    cuda::GroupedGemm g;  // F32 math: the expert choice is as sharp as the reference's
    g.x = x.data<float>();
    g.ldx = d;
    g.rows = t;
    g.weight = gate.raw();
    g.type = cuda::WeightType::F32;
    g.n = e;
    g.k = d;
    g.round_bf16 = false;
    g.out = logits.data<float>();
    g.ldo = e;
    // fast: at a few tokens a GEMV in the chain of programmatic launches (cuda::router_gemv), else
    // cuBLASLt's FP32 GEMM (the tiled kernels would run a GEMV on a few blocks).
    //   logits: column-major E x T = (D x E)^T (D x T)
    if (fast_ && cuda::router_gemv_fits(t, d, g.x, gate.data<float>()))
      cuda::router_gemv(g.x, t, d, gate.data<float>(), e, g.out, stream_);
    else if (!fast_ ||
             !lt_sgemm_batched(true, e, t, d, gate.data<float>(), d, 0, x.data<float>(), d, 0, g.out, e, 0, 1))
      gemm(g, t, kGemvDenseTokens);
    const float* bp = bias.defined() && bias.numel() > 0 ? bias.data<float>() : nullptr;
    cuda::moe_select(logits.data<float>(), bp, t, e, k, p.n_group, p.topk_group, p.norm_topk_prob,
                     p.routed_scaling_factor, ids.data<int32_t>(), weights.data<float>(), stream_);
  }

  void moe_experts(const Tensor& x, std::span<const ExpertWeights> experts, const Tensor& ids, const Tensor& weights,
                   Tensor& out, int64_t first_expert, const Tensor* addend) override {
    check_f32(x, "experts input");
    check_f32(out, "experts output");
    const int64_t t = x.dim(0), d = x.dim(1), k = ids.dim(1), local = static_cast<int64_t>(experts.size());
    DILU_CHECK(out.dim(0) == t && out.dim(1) == d && ids.dtype() == DType::I32 && weights.dim(1) == k,
               "moe_experts shapes");
    if (addend) {
      check_f32(*addend, "experts addend");
      DILU_CHECK(addend->numel() == out.numel(), "moe_experts addend shape");
    }
    if (t == 0) return;
    if (local == 0) {
      if (addend) {
        wait_side_work();
        DILU_CU(cudaMemcpyAsync(out.raw(), addend->raw(), out.nbytes(), cudaMemcpyDeviceToDevice, stream_));
      } else {
        DILU_CU(cudaMemsetAsync(out.raw(), 0, out.nbytes(), stream_));
      }
      return;
    }
    const ExpertTable& table = expert_table(experts);
    const int64_t f = experts[0].gate.out_features(), pairs = t * k;
    Tensor offsets = empty(DType::I32, {local + 1});
    Tensor rows = empty(DType::I32, {pairs}), pair_row = empty(DType::I32, {pairs});
    // Fewer pairs than experts (decode's small batches): the expert GEMMs' grids cover only the
    // experts selected, listed on the device, instead of every expert with most blocks idle.
    const int64_t slots = std::min(local, pairs);
    Tensor group_list;
    int32_t* list = nullptr;
    if (fast_ && slots < local) {
      group_list = empty(DType::I32, {slots});
      list = group_list.data<int32_t>();
    }
    Tensor g = empty(DType::F32, {pairs, f}), u = empty(DType::F32, {pairs, f}), y = empty(DType::F32, {pairs, d});
    // fp8_gemm=block: the experts' inputs quantized per token per 128 channels, as the block-scaled
    // linears' (and the CPU block path's, whose experts run through linear()), on FP8 tensor cores.
    const bool fp8 = fast_ && fp8_block_ && table.type == cuda::WeightType::FP8 && table.block_out == 128 &&
                     table.block_in == 128 && d % 128 == 0 && f % 128 == 0;
    Tensor xq, xsc, hq, hsc;
    if (fp8) {
      xq = empty(DType::U8, {t, d});
      xsc = empty(DType::F32, {t, d / 128});
    }
    // Decode's few pairs (fast kernels): grouped and counted by one block in one launch, which
    // also quantizes the inputs of at most kGroupQuantizeTokens tokens (more are too many bytes
    // for one SM: batches of 64 and 128 lost 2-3% a step).
    auto* routed = static_cast<unsigned long long*>(routed_counter_.raw());
    cuda::MoeGroupQuantize quant;
    if (fp8 && t <= kGroupQuantizeTokens) quant = {x.data<float>(), d, xq.data<uint8_t>(), xsc.data<float>()};
    const bool small = fast_ && cuda::moe_group_small(ids.data<int32_t>(), t, k, first_expert, local,
                                                      offsets.data<int32_t>(), rows.data<int32_t>(),
                                                      pair_row.data<int32_t>(), list, slots, routed, quant, stream_);
    if (!small) {
      Tensor counters = empty(DType::I32, {local});
      cuda::moe_group(ids.data<int32_t>(), t, k, first_expert, local, counters.data<int32_t>(),
                      offsets.data<int32_t>(), rows.data<int32_t>(), pair_row.data<int32_t>(), list, slots, stream_);
      cuda::count_routed_experts(offsets.data<int32_t>(), local, routed, stream_);
    }
    if (fp8 && !(small && quant.x))
      cuda::quantize_fp8_per_token_128(x.data<float>(), t, t, d, xq.data<uint8_t>(), xsc.data<float>(), d / 128, 1,
                                       stream_);
    // With `dst2`, projection 1 (up) too, as grouped_fp8's second matrix of the same rows.
    auto run = [&](const float* in, int64_t ldx, const int32_t* in_rows, int proj, int64_t n_out, int64_t k_in,
                   float* dst, const uint8_t* q = nullptr, const float* qs = nullptr, float* dst2 = nullptr) {
      cuda::GroupedGemm gg;
      gg.x = in;
      gg.ldx = ldx;
      gg.x_rows = in_rows;
      gg.group_offsets = offsets.data<int32_t>();
      gg.groups = local;
      gg.rows = pairs;
      gg.weights = table.weights[proj];
      gg.scales = table.scales[proj];
      gg.type = table.type;
      gg.n = n_out;
      gg.k = k_in;
      gg.block_out = table.block_out;
      gg.block_in = table.block_in;
      gg.scale_stride = table.scale_stride[proj];
      gg.round_bf16 = true;
      gg.out = dst;
      gg.ldo = n_out;
      gg.group_list = list;
      gg.group_slots = list ? slots : 0;
      if (dst2) {
        gg.weights2 = table.weights[1];
        gg.scales2 = table.scales[1];
        gg.n2 = n_out;
        gg.scale_stride2 = table.scale_stride[1];
        gg.out2 = dst2;
        gg.ldo2 = n_out;
      }
      if (q) {
        gg.xq = q;
        gg.xscale = qs;
        gg.lds = k_in / 128;
        // `fp8` above implies the kernel's shapes (sm_90, 128x128 blocks, widths of whole blocks).
        DILU_CHECK(cuda::grouped_fp8_fits(gg), "grouped_fp8 declined an expert projection of ", n_out, " x ", k_in);
        fp8_gemm(gg);
        return;
      }
      gemm(gg, t, kGemvExpertTokens);
    };
    const uint8_t* xq_p = fp8 ? xq.data<uint8_t>() : nullptr;
    const float* xsc_p = fp8 ? xsc.data<float>() : nullptr;
    // Decode batches (at most 16 rows an expert on average): gate and up in one launch.
    cuda::GroupedGemm shape;
    shape.rows = pairs;
    shape.groups = local;
    if (fp8 && cuda::grouped_fp8_pairs(shape)) {
      run(x.data<float>(), d, rows.data<int32_t>(), 0, f, d, g.data<float>(), xq_p, xsc_p, u.data<float>());
    } else {
      run(x.data<float>(), d, rows.data<int32_t>(), 0, f, d, g.data<float>(), xq_p, xsc_p);
      run(x.data<float>(), d, rows.data<int32_t>(), 1, f, d, u.data<float>(), xq_p, xsc_p);
    }
    if (fp8) {
      hq = empty(DType::U8, {pairs, f});
      hsc = empty(DType::F32, {pairs, f / 128});
      cuda::moe_silu_mul_fp8(g.data<float>(), u.data<float>(), offsets.data<int32_t>(), local, pairs, f,
                             hq.data<uint8_t>(), hsc.data<float>(), stream_);
    } else {
      cuda::moe_silu_mul(g.data<float>(), u.data<float>(), offsets.data<int32_t>(), local, pairs, f, stream_);
    }
    run(g.data<float>(), f, nullptr, 2, d, f, y.data<float>(), fp8 ? hq.data<uint8_t>() : nullptr,
        fp8 ? hsc.data<float>() : nullptr);
    if (addend) wait_side_work();
    cuda::moe_combine(y.data<float>(), ids.data<int32_t>(), weights.data<float>(), pair_row.data<int32_t>(), t, k, d,
                      out.data<float>(), addend ? addend->data<float>() : nullptr, stream_);
  }

  void prepare_experts(std::span<const ExpertWeights> experts) override {
    if (!experts.empty()) expert_table(experts);
  }

  void concat_columns(const Tensor& parts, Tensor& out) override {
    check_f32(parts, "concat parts");
    check_f32(out, "concat output");
    const int64_t p = parts.dim(0), n = parts.dim(1), wp = parts.dim(2), w = out.dim(1);
    DILU_CHECK(out.dim(0) == n && p * wp >= w, "concat_columns: parts ", shape_str(parts.shape()), ", out ",
               shape_str(out.shape()));
    cuda::concat_columns(parts.data<float>(), p, n, wp, out.data<float>(), w, stream_);
  }

  std::vector<int32_t> argmax(const Tensor& logits) override {
    check_f32(logits, "logits");
    const int64_t n = logits.dim(0);
    std::vector<int32_t> result(static_cast<size_t>(n));
    if (n == 0) return result;
    Tensor dev = empty(DType::I32, {n});
    cuda::argmax_rows(logits.data<float>(), n, logits.dim(1), dev.data<int32_t>(), stream_);
    copy_to_host(dev, result.data());
    return result;
  }

  Tensor random_fill(DType dtype, Shape shape, uint64_t key, float center, float half_width) override {
    const int code = dtype == DType::F32 ? 0 : dtype == DType::BF16 ? 1 : dtype == DType::F8E4M3 ? 2 : -1;
    DILU_CHECK(code >= 0, "random_fill of ", dtype_name(dtype));
    Tensor out = allocate_persistent(dtype, std::move(shape));
    cuda::random_fill(out.raw(), code, out.numel(), key, center, half_width, stream_);
    return out;
  }

  int64_t take_routed_expert_count() override {
    // A begun sample's step is still running: its count comes with its sample.
    if (!pending_samples_.empty()) return std::exchange(routed_done_, 0);
    unsigned long long n = 0;
    Tensor view(routed_counter_.raw(), DType::U8, {8}, device(), nullptr);
    copy_to_host(view, &n);
    DILU_CU(cudaMemsetAsync(routed_counter_.raw(), 0, 8, stream_));
    return static_cast<int64_t>(n) + std::exchange(routed_done_, 0);
  }

  double measure_copy_bandwidth(size_t bytes) override {
    // Outside the step arena (a benchmark's set-up, not a step): the arena of a small model is
    // smaller than the copy.
    Tensor a = allocate_persistent(DType::U8, {static_cast<int64_t>(bytes)}),
           b = allocate_persistent(DType::U8, {static_cast<int64_t>(bytes)});
    DILU_CU(cudaMemsetAsync(a.raw(), 1, bytes, stream_));
    cudaEvent_t start = nullptr, stop = nullptr;
    DILU_CU(cudaEventCreate(&start));
    DILU_CU(cudaEventCreate(&stop));
    constexpr int kReps = 10;
    DILU_CU(cudaMemcpyAsync(b.raw(), a.raw(), bytes, cudaMemcpyDeviceToDevice, stream_));  // warm-up
    DILU_CU(cudaEventRecord(start, stream_));
    for (int r = 0; r < kReps; ++r)
      DILU_CU(cudaMemcpyAsync(b.raw(), a.raw(), bytes, cudaMemcpyDeviceToDevice, stream_));
    DILU_CU(cudaEventRecord(stop, stream_));
    synchronize();
    float ms = 0;
    DILU_CU(cudaEventElapsedTime(&ms, start, stop));
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    return 2.0 * static_cast<double>(bytes) * kReps / (static_cast<double>(ms) * 1e-3);
  }

  bool has_device_sampler() const override { return true; }

  std::vector<SampleOut> sample(const Tensor& logits, std::span<const SampleSpec> specs) override {
    DILU_CHECK(pending_samples_.empty(), "sample() while a begun sample is not finished");
    begin_sample(logits, specs);
    return finish_sample();
  }

  bool has_token_feed() const override { return true; }

  // The draws go to a persistent device buffer (which the next step's token feed reads) and from
  // there to one of two page-locked host buffers, with the step's routed-expert count; an event
  // marks their arrival. Two begun samples use different host buffers.
  void begin_sample(const Tensor& logits, std::span<const SampleSpec> specs) override {
    check_f32(logits, "logits");
    DILU_CHECK(!capturing_, "begin_sample() inside a capture");
    DILU_CHECK(pending_samples_.size() < 2, "a third sample begun before the first finished");
    const int64_t rows = static_cast<int64_t>(specs.size()), vocab = logits.dim(1);
    std::vector<cuda::SampleRowParams> params(specs.size());
    for (size_t i = 0; i < specs.size(); ++i) {
      const SampleSpec& s = specs[i];
      DILU_CHECK(s.row >= 0 && s.row < logits.dim(0), "sample row ", s.row);
      DILU_CHECK(s.top_logprobs >= 0 && s.top_logprobs <= cuda::kMaxTopLogprobs, "top_logprobs ", s.top_logprobs);
      params[i] = cuda::SampleRowParams{s.row, static_cast<float>(s.temperature), static_cast<float>(s.top_p),
                                        static_cast<int32_t>(s.top_k), static_cast<float>(s.min_p), s.uniform,
                                        s.logprobs ? 1 : 0, static_cast<int32_t>(s.top_logprobs)};
    }
    const size_t result_bytes = specs.size() * sizeof(cuda::SampleRowResult);
    if (sample_dev_rows_ < rows) {
      const int64_t cap = std::max<int64_t>(256, static_cast<int64_t>(std::bit_ceil(static_cast<uint64_t>(rows))));
      sample_dev_ = allocate_persistent(DType::U8, {cap * static_cast<int64_t>(sizeof(cuda::SampleRowResult))});
      sample_dev_rows_ = cap;
    }
    auto* dev_results = static_cast<cuda::SampleRowResult*>(sample_dev_.raw());
    if (rows > 0) {
      Tensor dev_params = empty(DType::U8, {static_cast<int64_t>(params.size() * sizeof(cuda::SampleRowParams))});
      copy_from_host(params.data(), dev_params);
      const size_t ws_bytes = cuda::sample_rows_workspace_bytes(rows, vocab);
      Tensor ws = empty(DType::U8, {static_cast<int64_t>(std::max<size_t>(ws_bytes, 1))});
      cuda::sample_rows(logits.data<float>(), vocab, reinterpret_cast<const cuda::SampleRowParams*>(dev_params.raw()),
                        dev_results, rows, ws.raw(), ws_bytes, stream_);
    }
    PendingSample ps;
    ps.slot = next_sample_slot_;
    next_sample_slot_ ^= 1;
    ps.specs.assign(specs.begin(), specs.end());
    SampleSlot& sl = sample_slots_[static_cast<size_t>(ps.slot)];
    const size_t need = result_bytes + sizeof(unsigned long long);
    if (sl.bytes < need) {  // not in use: at most two are begun, and they alternate
      if (sl.host) DILU_CU(cudaFreeHost(sl.host));
      sl.host = nullptr;
      sl.bytes = std::max<size_t>(need, 64 * 1024);
      DILU_CU(cudaHostAlloc(&sl.host, sl.bytes, cudaHostAllocDefault));
    }
    if (!sl.done) DILU_CU(cudaEventCreateWithFlags(&sl.done, cudaEventDisableTiming));
    auto* host = static_cast<uint8_t*>(sl.host);
    if (result_bytes > 0)
      DILU_CU(cudaMemcpyAsync(host, dev_results, result_bytes, cudaMemcpyDeviceToHost, stream_));
    // The step's routed experts end with its sample (take_routed_expert_count).
    DILU_CU(cudaMemcpyAsync(host + result_bytes, routed_counter_.raw(), sizeof(unsigned long long),
                            cudaMemcpyDeviceToHost, stream_));
    DILU_CU(cudaMemsetAsync(routed_counter_.raw(), 0, sizeof(unsigned long long), stream_));
    DILU_CU(cudaEventRecord(sl.done, stream_));
    step_event(3);
    feed_.clear();
    last_sample_rows_ = rows;
    pending_samples_.push_back(std::move(ps));
  }

  std::vector<SampleOut> finish_sample() override {
    DILU_CHECK(!pending_samples_.empty(), "finish_sample() with no sample begun");
    const PendingSample ps = std::move(pending_samples_.front());
    pending_samples_.pop_front();
    const SampleSlot& sl = sample_slots_[static_cast<size_t>(ps.slot)];
    wait_for([&] { return cudaEventQuery(sl.done); });
    const auto* host = static_cast<const cuda::SampleRowResult*>(sl.host);
    unsigned long long routed = 0;
    std::memcpy(&routed, static_cast<const uint8_t*>(sl.host) + ps.specs.size() * sizeof(cuda::SampleRowResult),
                sizeof routed);
    routed_done_ += static_cast<int64_t>(routed);
    std::vector<SampleOut> result(ps.specs.size());
    for (size_t i = 0; i < ps.specs.size(); ++i) {
      DILU_CHECK(host[i].token >= 0, "logits row ", ps.specs[i].row, " is NaN or all -inf: no token can be chosen");
      result[i].token = host[i].token;
      if (!ps.specs[i].logprobs) continue;
      result[i].logprob = host[i].logprob;
      for (int64_t j = 0; j < ps.specs[i].top_logprobs; ++j)
        result[i].top.push_back({host[i].top_ids[j], host[i].top_logprobs[j]});
    }
    return result;
  }

  void set_token_feed(std::span<const TokenFeed> feed) override { feed_.assign(feed.begin(), feed.end()); }

 private:
  struct ExpertTable {
    const void* const* weights[3] = {};  // device arrays of the experts' gate, up, down pointers
    const float* const* scales[3] = {};
    cuda::WeightType type = cuda::WeightType::BF16;
    int64_t block_out = 0, block_in = 0;
    int64_t scale_stride[3] = {};
    std::vector<const void*> host_ptrs;  // what `storage` holds: checked on every use
    Tensor storage;
  };

  // The device pointer arrays of one layer's experts, made at the first step and kept. The
  // cache is keyed by the span's address, which a later model may reuse: an entry is used only
  // while every pointer it holds is still the experts' own.
  const ExpertTable& expert_table(std::span<const ExpertWeights> experts) {
    const auto key = std::make_pair(static_cast<const void*>(experts.data()), experts.size());
    const size_t n = experts.size();
    auto it = expert_tables_.find(key);
    if (it != expert_tables_.end()) {
      const std::vector<const void*>& p = it->second.host_ptrs;
      bool same = true;
      for (size_t e = 0; e < n && same; ++e)
        same = p[e] == experts[e].gate.weight.raw() && p[n + e] == experts[e].up.weight.raw() &&
               p[2 * n + e] == experts[e].down.weight.raw() &&
               p[3 * n + e] == (experts[e].gate.scale_inv.numel() > 0 ? experts[e].gate.scale_inv.raw() : nullptr) &&
               p[4 * n + e] == (experts[e].up.scale_inv.numel() > 0 ? experts[e].up.scale_inv.raw() : nullptr) &&
               p[5 * n + e] == (experts[e].down.scale_inv.numel() > 0 ? experts[e].down.scale_inv.raw() : nullptr);
      if (same) return it->second;
      expert_tables_.erase(it);
    }
    ExpertTable table;
    const LinearWeight& first = experts[0].gate;
    table.type = weight_type(first.weight.dtype());
    table.block_out = first.block_out;
    table.block_in = first.block_in;
    std::vector<const void*> ptrs(6 * n, nullptr);
    for (size_t e = 0; e < n; ++e) {
      const LinearWeight* ws[3] = {&experts[e].gate, &experts[e].up, &experts[e].down};
      for (int p = 0; p < 3; ++p) {
        DILU_CHECK(ws[p]->weight.dtype() == first.weight.dtype() && ws[p]->block_out == first.block_out &&
                       ws[p]->block_in == first.block_in,
                   "experts of one layer must share dtype and block size");
        DILU_CHECK(ws[p]->weight.shape() == (p == 2 ? experts[0].down.weight.shape() : first.weight.shape()),
                   "experts of one layer must share shapes");
        ptrs[static_cast<size_t>(p) * n + e] = ws[p]->weight.raw();
        ptrs[(3 + static_cast<size_t>(p)) * n + e] = ws[p]->scale_inv.numel() > 0 ? ws[p]->scale_inv.raw() : nullptr;
      }
    }
    const LinearWeight* firsts[3] = {&experts[0].gate, &experts[0].up, &experts[0].down};
    for (int p = 0; p < 3; ++p) table.scale_stride[p] = firsts[p]->scale_inv.rank() == 2 ? firsts[p]->scale_inv.dim(1) : 0;
    table.host_ptrs = ptrs;
    table.storage = allocate_persistent(DType::U8, {static_cast<int64_t>(ptrs.size() * sizeof(void*))});
    upload_bytes(table.storage.raw(), ptrs.data(), ptrs.size() * sizeof(void*));
    auto* base = static_cast<const void**>(table.storage.raw());
    for (int p = 0; p < 3; ++p) {
      table.weights[p] = base + static_cast<size_t>(p) * n;
      table.scales[p] = reinterpret_cast<const float* const*>(base + (3 + static_cast<size_t>(p)) * n);
    }
    return expert_tables_.emplace(key, std::move(table)).first->second;
  }

  void check_f32(const Tensor& t, const char* what) const {
    DILU_CHECK(t.dtype() == DType::F32 && t.device() == device(), what, " must be an F32 tensor on ", device().str(),
               ", got ", dtype_name(t.dtype()), " on ", t.device().str());
  }
  void check_device(const Tensor& t, const char* what) const {
    DILU_CHECK(t.device() == device(), what, " must be on ", device().str(), ", got ", t.device().str());
  }

  // Host to device on the compute stream, waited for. Not cudaMemcpy: it runs on the legacy
  // default stream, which the (non-blocking) compute stream does not wait for, and from pageable
  // memory (the checkpoint's memory map) it returns once the bytes are staged, before the DMA
  // lands; a kernel could then read a weight still in flight.
  void upload_bytes(void* dst, const void* src, size_t bytes) {
    if (bytes == 0) return;
    DILU_CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
    DILU_CU(cudaStreamSynchronize(stream_));
  }

  // A step's host inputs (token ids, the layout, the logits rows) on the device, one buffer of
  // each kind: uploaded when the bytes change and reused while they do not (every layer of a step
  // reads the same layout). The buffers are persistent and keep their address while large
  // enough, so a captured step reads whatever stage_step() put there last; a buffer that grows
  // moves, and staging_epoch_ (part of every shape key) retires the graphs that read the old one.
  enum UploadSlot {
    kUpIds,
    kUpSeq,
    kUpPos,
    kUpTables,
    kUpSlots,
    kUpRopePos,
    kUpRopeFreq,
    kUpRows,
    kUpMlaSlots,
    kUpMlaRows,
    kUpMlaTiles,
    kUpMlaPos,
    kUpMlaRest,
    kUpSlotCount
  };
  struct CachedUpload {
    std::vector<uint8_t> host;
    Tensor buffer;  // U8, persistent
    bool valid = false;
  };
  std::array<CachedUpload, kUpSlotCount> uploads_;
  uint64_t staging_epoch_ = 0;
  Tensor upload_cached(UploadSlot slot, const void* src, size_t bytes, DType dtype) {
    CachedUpload& c = uploads_[slot];
    const auto* b = static_cast<const uint8_t*>(src);
    const bool same = c.valid && c.host.size() == bytes && std::equal(c.host.begin(), c.host.end(), b);
    if (!same) {
      // Inside a capture the upload would be recorded with this step's bytes: stage_step() must
      // have staged them (the capture then fails cleanly and the step runs eagerly).
      DILU_CHECK(!capturing_, "a captured step reads host input (upload slot ", static_cast<int>(slot),
                 ") that stage_step() did not stage");
      if (!c.buffer.defined() || c.buffer.nbytes() < bytes) {
        const size_t cap = std::max<size_t>(4096, std::bit_ceil(bytes));
        c.buffer = allocate_persistent(DType::U8, {static_cast<int64_t>(cap)});
        ++staging_epoch_;
      }
      c.host.assign(b, b + bytes);
      c.valid = true;
      if (bytes > 0)
        DILU_CU(cudaMemcpyAsync(c.buffer.raw(), c.host.data(), bytes, cudaMemcpyHostToDevice, stream_));
      if (bytes > 0 && stream_ == side_stream_) {  // later readers on the main stream wait for it
        DILU_CU(cudaEventRecord(upload_event_, side_stream_));
        side_uploaded_ = true;
      }
    }
    return Tensor(c.buffer.raw(), dtype, {static_cast<int64_t>(bytes / dtype_size(dtype))}, device(),
                  std::make_shared<Tensor>(c.buffer));
  }

  // The step's token ids on the device (slot kUpIds), with the token feed (set_token_feed) applied
  // outside a capture: the fed buffer no longer holds its host bytes, so the next upload of equal
  // bytes is not skipped. A capture records the embedding's read of the buffer stage_step() fed.
  Tensor stage_ids(std::span<const int32_t> ids) {
    if (ids_fed_ && !capturing_) {
      uploads_[kUpIds].valid = false;
      ids_fed_ = false;
    }
    Tensor dev = upload_cached(kUpIds, ids.data(), ids.size() * sizeof(int32_t), DType::I32);
    if (feed_.empty() || capturing_) return dev;
    std::vector<int32_t> pairs;
    for (const TokenFeed& f : feed_) {
      DILU_CHECK(f.token >= 0 && static_cast<size_t>(f.token) < ids.size() && f.draw >= 0 && f.draw < last_sample_rows_,
                 "token feed (", f.token, " <- draw ", f.draw, ") outside a step of ", ids.size(), " tokens and ",
                 last_sample_rows_, " draws");
      pairs.push_back(f.token);
      pairs.push_back(f.draw);
    }
    if (feed_dev_.numel() < static_cast<int64_t>(pairs.size()))
      feed_dev_ = allocate_persistent(DType::I32,
                                      {std::max<int64_t>(512, static_cast<int64_t>(std::bit_ceil(pairs.size())))});
    DILU_CU(cudaMemcpyAsync(feed_dev_.raw(), pairs.data(), pairs.size() * sizeof(int32_t), cudaMemcpyHostToDevice,
                            stream_));
    cuda::feed_tokens(dev.data<int32_t>(), feed_dev_.data<int32_t>(), static_cast<int64_t>(feed_.size()),
                      static_cast<const cuda::SampleRowResult*>(sample_dev_.raw()), stream_);
    ids_fed_ = true;
    return dev;
  }

  // The attention layout on the device: each token's sequence and position, and the block tables
  // padded to one stride, rounded up to 16 blocks so that the stride (which a captured step keeps)
  // changes seldom as the contexts grow.
  struct MlaLayout {
    Tensor seq, pos, tables;
    int64_t stride = 16;
  };
  MlaLayout mla_layout(const AttentionLayout& layout) {
    MlaLayout m;
    int64_t longest = 1;
    for (const auto& b : layout.block_tables) longest = std::max<int64_t>(longest, static_cast<int64_t>(b.size()));
    m.stride = (longest + 15) / 16 * 16;
    tables_host_.assign(layout.block_tables.size() * static_cast<size_t>(m.stride), 0);
    for (size_t s = 0; s < layout.block_tables.size(); ++s)
      std::copy(layout.block_tables[s].begin(), layout.block_tables[s].end(),
                tables_host_.begin() + static_cast<ptrdiff_t>(s * static_cast<size_t>(m.stride)));
    m.seq = upload_cached(kUpSeq, layout.token_seq.data(), layout.token_seq.size() * sizeof(int32_t), DType::I32);
    m.pos = upload_cached(kUpPos, layout.token_pos.data(), layout.token_pos.size() * sizeof(int32_t), DType::I32);
    m.tables = upload_cached(kUpTables, tables_host_.data(), tables_host_.size() * sizeof(int32_t), DType::I32);
    return m;
  }
  std::vector<int32_t> tables_host_;


  // D [n, m] (column-major; row-major [m, n] F32) = op(A = W [n, k] row-major) * B (x [m, k]
  // row-major), through cuBLASLt. FP8: A and B e4m3 with BLK128x128 and VEC128 scales. Returns
  // false (and remembers it) when cuBLASLt has no algorithm for the shape.
  bool lt_matmul(cudaDataType_t ab, const void* a, const float* a_scale, const void* b, const float* b_scale, void* d,
                 int64_t n, int64_t m, int64_t k) {
    const bool fp8 = ab == CUDA_R_8F_E4M3;
    const auto key = std::make_tuple(static_cast<int>(ab), n, m, k);
    auto it = lt_algos_.find(key);
    if (it != lt_algos_.end() && !it->second.ok) return false;

    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr, lbf = nullptr;
    DILU_LT(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
    DILU_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof(op_t)));
    DILU_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n)));
    if (fp8) {
      const cublasLtMatmulMatrixScale_t blk = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F,
                                        vec = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
      DILU_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &blk, sizeof(blk)));
      DILU_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &vec, sizeof(vec)));
      DILU_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof(a_scale)));
      DILU_LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof(b_scale)));
    }
    DILU_LT(cublasLtMatrixLayoutCreate(&la, ab, static_cast<uint64_t>(k), static_cast<uint64_t>(n), k));
    DILU_LT(cublasLtMatrixLayoutCreate(&lb, ab, static_cast<uint64_t>(k), static_cast<uint64_t>(m), k));
    DILU_LT(cublasLtMatrixLayoutCreate(&ld, CUDA_R_32F, static_cast<uint64_t>(n), static_cast<uint64_t>(m), n));
    DILU_LT(cublasLtMatrixLayoutCreate(&lbf, CUDA_R_16BF, static_cast<uint64_t>(n), static_cast<uint64_t>(m), n));
    auto cleanup = [&] {
      cublasLtMatrixLayoutDestroy(lbf);
      cublasLtMatrixLayoutDestroy(ld);
      cublasLtMatrixLayoutDestroy(lb);
      cublasLtMatrixLayoutDestroy(la);
      cublasLtMatmulDescDestroy(desc);
    };
    if (it == lt_algos_.end()) {
      // F32 output first; FP8 falls back to BF16 output (converted) where F32 has no kernel.
      auto search = [&](cublasLtMatrixLayout_t lb_x, cublasLtMatrixLayout_t ld_x, cublasLtMatrixLayout_t lbf_x) {
        LtChoice choice = lt_heuristic(desc, la, lb_x, ld_x, false);
        if (!choice.ok && fp8) {
          choice = lt_heuristic(desc, la, lb_x, lbf_x, false);
          choice.out_bf16 = choice.ok;
        }
        return choice;
      };
      // A new token count m: one heuristic search per bucket of m (lt_bucket; searches cost
      // milliseconds of host time, and decode's m changes every step), the bucket's algorithm
      // taken where cuBLASLt accepts it for the exact shape (as lt_sgemm_batched).
      const int64_t mb = lt_bucket(m);
      const auto bucket_key = std::make_tuple(static_cast<int>(ab), n, mb, k);
      auto bit = lt_buckets_.find(bucket_key);
      if (bit == lt_buckets_.end()) {
        cublasLtMatrixLayout_t lbb = nullptr, ldb_ = nullptr, lbfb = nullptr;
        DILU_LT(cublasLtMatrixLayoutCreate(&lbb, ab, static_cast<uint64_t>(k), static_cast<uint64_t>(mb), k));
        DILU_LT(cublasLtMatrixLayoutCreate(&ldb_, CUDA_R_32F, static_cast<uint64_t>(n), static_cast<uint64_t>(mb), n));
        DILU_LT(cublasLtMatrixLayoutCreate(&lbfb, CUDA_R_16BF, static_cast<uint64_t>(n), static_cast<uint64_t>(mb), n));
        bit = lt_buckets_.emplace(bucket_key, search(lbb, ldb_, lbfb)).first;
        cublasLtMatrixLayoutDestroy(lbfb);
        cublasLtMatrixLayoutDestroy(ldb_);
        cublasLtMatrixLayoutDestroy(lbb);
      }
      LtChoice choice;
      if (bit->second.ok) {
        const cublasLtMatrixLayout_t lo = bit->second.out_bf16 ? lbf : ld;
        cublasLtMatmulHeuristicResult_t check{};
        if (cublasLtMatmulAlgoCheck(lt_, desc, la, lb, lo, lo, &bit->second.algo, &check) == CUBLAS_STATUS_SUCCESS &&
            check.workspaceSize <= kLtWorkspace)
          choice = bit->second;
      }
      if (!choice.ok) choice = search(lb, ld, lbf);
      it = lt_algos_.emplace(key, choice).first;
      if (!choice.ok) {
        cleanup();
        return false;
      }
    }
    const LtChoice& c = it->second;
    const float alpha = 1.0f, beta = 0.0f;
    Tensor tmp;
    void* dst = d;
    if (c.out_bf16) {
      tmp = empty(DType::BF16, {m, n});
      dst = tmp.raw();
    }
    const cublasLtMatrixLayout_t lo = c.out_bf16 ? lbf : ld;
    const cublasStatus_t st = cublasLtMatmul(lt_, desc, &alpha, a, la, b, lb, &beta, dst, lo, dst, lo, &c.algo,
                                             lt_workspace_, kLtWorkspace, stream_);
    cleanup();
    if (st != CUBLAS_STATUS_SUCCESS)
      throw std::runtime_error("cublasLtMatmul (" + std::string(fp8 ? "FP8 block-scaled" : "BF16") + ", n " +
                               std::to_string(n) + ", m " + std::to_string(m) + ", k " + std::to_string(k) +
                               ") failed: cuBLAS status " + std::to_string(st));
    if (c.out_bf16) cuda::bf16_to_f32(static_cast<const uint16_t*>(dst), static_cast<float*>(d), m * n, stream_);
    return true;
  }

  int device_ = 0;
  cudaDeviceProp props_{};
  cudaStream_t stream_ = nullptr;  // where ops launch: main_stream_, or side_stream_ in side work
  cudaStream_t main_stream_ = nullptr, side_stream_ = nullptr;
  cudaEvent_t fork_event_ = nullptr, join_event_ = nullptr, upload_event_ = nullptr;
  int side_state_ = 0;  // 0 none, 1 inside begin_side/end_side, 2 waiting for join_side
  bool side_enabled_ = true, side_uploaded_ = false;
  cublasLtHandle_t lt_ = nullptr;
  void* lt_workspace_ = nullptr;
  void* lt_workspace_side_ = nullptr;
  // DILU_STEP_EVENTS=1 (a switch for measuring): the phases of replayed steps on the GPU's clock,
  // their means printed to stderr every 32 steps. upload: stage_step() to the graph's launch;
  // graph: its launch to its end; sample: its end to the sampled tokens on the host; gap: from
  // there to the next stage_step() (the host's own work between steps; with overlapped steps
  // the next step is queued already). Events 0-3 mark them; three sets rotate, so a step's are
  // read when the step after next begins, with no wait on a step still queued.
  bool step_events_on_ = std::getenv("DILU_STEP_EVENTS") != nullptr;
  cudaEvent_t step_ev_[3][4] = {};
  int step_cur_ = 0, step_have_[3] = {};  // step_have_: bit i set once event i of the set is recorded
  int64_t step_n_ = 0;
  double step_sum_[4] = {};
  void step_event(int i) {
    if (!step_events_on_ || capturing_) return;
    if (!step_ev_[0][0])
      for (auto& set : step_ev_)
        for (auto& e : set) DILU_CU(cudaEventCreate(&e));
    if (i > 0) {
      DILU_CU(cudaEventRecord(step_ev_[step_cur_][i], stream_));
      step_have_[step_cur_] |= 1 << i;
      return;
    }
    step_cur_ = (step_cur_ + 1) % 3;
    DILU_CU(cudaEventRecord(step_ev_[step_cur_][0], stream_));
    step_have_[step_cur_] = 1;
    const int a = (step_cur_ + 1) % 3, b = (step_cur_ + 2) % 3;  // the step before last, the last
    if (step_have_[a] != 15 || (step_have_[b] & 1) == 0) return;  // an eager step, or the first
    step_have_[a] = 0;
    DILU_CU(cudaEventSynchronize(step_ev_[b][0]));
    const cudaEvent_t marks[5] = {step_ev_[a][0], step_ev_[a][1], step_ev_[a][2], step_ev_[a][3], step_ev_[b][0]};
    for (int k = 0; k < 4; ++k) {
      float ms = 0;
      DILU_CU(cudaEventElapsedTime(&ms, marks[k], marks[k + 1]));
      step_sum_[k] += ms;
    }
    if (++step_n_ < 32) return;
    const double us = 1e3 / static_cast<double>(step_n_);
    std::fprintf(stderr, "dilu: step phases over %lld steps (DILU_STEP_EVENTS): upload %.1f, graph %.1f, sample %.1f, "
                 "gap %.1f us\n", static_cast<long long>(step_n_), us * step_sum_[0], us * step_sum_[1],
                 us * step_sum_[2], us * step_sum_[3]);
    for (double& v : step_sum_) v = 0;
    step_n_ = 0;
  }

  // Samples (begin_sample/finish_sample) and the token feed.
  struct SampleSlot {
    void* host = nullptr;  // page-locked: the draws, then the step's routed-expert count
    size_t bytes = 0;
    cudaEvent_t done = nullptr;
  };
  struct PendingSample {
    int slot = 0;
    std::vector<SampleSpec> specs;
  };
  std::array<SampleSlot, 2> sample_slots_;
  int next_sample_slot_ = 0;
  std::deque<PendingSample> pending_samples_;
  Tensor sample_dev_;  // the last sample's draws (cuda::SampleRowResult), which a feed reads
  int64_t sample_dev_rows_ = 0;
  int64_t last_sample_rows_ = 0;
  int64_t routed_done_ = 0;  // routed experts of the steps whose samples finished, not yet taken
  std::vector<TokenFeed> feed_;
  Tensor feed_dev_;  // I32 pairs (token, draw)
  bool ids_fed_ = false;  // the kUpIds buffer holds fed tokens, not its host bytes

  void* staging_ = nullptr;
  size_t staging_bytes_ = size_t{16} << 20;
  std::shared_ptr<Arena> arena_;
  Tensor routed_counter_;  // experts with tokens, summed over moe_experts() calls
  bool fp8_block_ = false;
  size_t placed_ = 0;
  std::vector<std::function<void()>> wait_checks_;
  std::map<std::pair<const void*, size_t>, ExpertTable> expert_tables_;
  std::map<std::tuple<int, int64_t, int64_t, int64_t>, LtChoice> lt_algos_, lt_buckets_;  // lt_matmul's
  std::map<std::tuple<bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>,
           LtChoice>
      sgemm_algos_, sgemm_buckets_;  // per exact shape; per bucket of n (lt_bucket)
  bool fast_ = false;       // cuda.kernels=fast
  bool bf16_gemv_ = [] {     // DILU_BF16_GEMV=0: BF16 linears of few rows on cuBLASLt
    const char* e = std::getenv("DILU_BF16_GEMV");
    return !(e && std::string(e) == "0");
  }();
  bool mla_fused_ = false;  // the fused MLA kernels (fast)
  std::string mla_core_ = "auto";  // BackendOptions::mla_core
  std::string mla_absorb_ = "auto";  // BackendOptions::mla_absorb
  std::string mla_prefill_ = "auto";  // BackendOptions::mla_prefill
  bool graphs_ = false;     // cuda.graphs
  bool capturing_ = false;  // between begin_capture() and end_capture()
  std::shared_ptr<Arena> graph_arena_;  // captured steps' scratch (enable_graphs)
  Tensor mla_split_scratch_;   // fused MLA: the context splits' partial softmax states
  size_t mla_split_bytes_ = 0;
};

}  // namespace

std::unique_ptr<Ops> make_cuda_ops(const BackendOptions& options) { return std::make_unique<CudaOps>(options); }

}  // namespace dilu
