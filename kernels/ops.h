// The op interface every backend implements (CPU reference now, CUDA next). The model describes
// computation through it and never touches device memory itself; each op checks dtypes and
// shapes at its boundary. Shapes use the paper's symbols: T tokens in the step, D hidden size,
// H heads, C = kv_lora_rank, R = qk_rope_head_dim, E routed experts, K experts per token.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kernels/tensor.h"

namespace dilu {

// A linear layer's weight W [out, in] as stored: F32/BF16/F16, or F8E4M3 with a block scale
// `scale_inv` [ceil(out/block_out), ceil(in/block_in)] so that W = fp8 * scale_inv per block.
struct LinearWeight {
  Tensor weight;     // [out, in]
  Tensor scale_inv;  // [ceil(out/block_out), ceil(in/block_in)] F32, only for F8E4M3 weights
  int64_t block_out = 0;
  int64_t block_in = 0;
  int64_t out_features() const { return weight.dim(0); }
  int64_t in_features() const { return weight.dim(1); }
};

// MLA's kv_b_proj [H*(nope+v), C] (W_UK [nope, C] then W_UV [v, C] per head) in the forms a backend
// computes with. `w` is W exactly dequantized to FP32; every backend has it. `split` and
// `split_scale` are the CUDA backend's own, for the absorptions on tensor cores, and are empty
// elsewhere: W's stored values (FP8 or BF16, exact in BF16) without their block scales, per head
// W_UK transposed then W_UV (kernels/cuda/kernels.h: mla_kv_b_split), and the scales per head and
// column [H, 2, C] (W_UK's, W_UV's), so that W = stored value * scale.
struct MlaWeight {
  Tensor w;
  Tensor split;
  Tensor split_scale;
  Tensor expand;  // the CUDA backend's expanded form for prefill (cuda::mla_kv_b_expand), or undefined
  MlaWeight() = default;
  MlaWeight(Tensor f32) : w(std::move(f32)) {}  // NOLINT(google-explicit-constructor): the FP32 form alone
  size_t nbytes() const {
    return w.nbytes() + (split.defined() ? split.nbytes() + split_scale.nbytes() : 0) +
           (expand.defined() ? expand.nbytes() : 0);
  }
};

struct ExpertWeights {  // one SwiGLU MLP: down(silu(gate(x)) * up(x))
  LinearWeight gate;  // [F, D]
  LinearWeight up;    // [F, D]
  LinearWeight down;  // [D, F]
};

// DeepSeek-V3 "noaux_tc" routing parameters.
struct RouterParams {
  int64_t num_experts = 0;    // E
  int64_t top_k = 0;          // K
  int64_t n_group = 1;
  int64_t topk_group = 1;
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
};

// One step's attention layout: which sequence each token belongs to, where it sits, and the
// blocks of the paged latent cache each sequence reads. Host-side integers; backends copy them.
struct AttentionLayout {
  std::vector<int32_t> token_seq;       // [T] sequence index of each token
  std::vector<int32_t> token_pos;       // [T] position of each token (attends to 0..pos)
  std::vector<int64_t> token_slot;      // [T] cache slot (block * block_size + offset) written by the token
  std::vector<std::vector<int32_t>> block_tables;  // [S][blocks] cache blocks of each sequence
  int64_t block_size = 0;
};

struct MlaParams {
  int64_t num_heads = 0;         // H
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;  // R
  int64_t kv_lora_rank = 0;      // C
  int64_t v_head_dim = 0;
  float softmax_scale = 1.0f;
};

// One row of a device-side sampling request (backends that sample where the logits are).
// `uniform` is the host's counter-based draw (engine/sampler.h: sample_uniform), so a token
// depends only on the request, never on the backend's batch.
struct SampleSpec {
  int32_t row = 0;  // row of the logits
  double temperature = 0.0;  // < 1e-5: greedy (first index of the maximum)
  double top_p = 1.0;
  int64_t top_k = 0;
  double min_p = 0.0;
  double uniform = 0.0;  // in [0, 1)
  bool logprobs = false;
  int64_t top_logprobs = 0;  // [0, 20]
};

struct SampleOut {
  int32_t token = 0;
  float logprob = 0.0f;  // log_softmax of the raw logits at `token` (when logprobs)
  std::vector<std::pair<int32_t, float>> top;  // top_logprobs best, best first (when logprobs)
};

// A token id of the next step that the last begun sample draws (Ops::set_token_feed): step
// token `token` is the token of spec `draw` of that sample.
struct TokenFeed {
  int32_t token = 0;
  int32_t draw = 0;
};

class Ops {
 public:
  virtual ~Ops() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;
  // The dtype activations are kept in on this backend.
  virtual DType activation_dtype() const = 0;

  // ---- memory ----
  // Bytes this backend can still allocate (host: MemAvailable; GPU: free device memory).
  virtual size_t free_memory_bytes() const = 0;
  // Scratch for one step (on the GPU: from the activation arena sized at start-up, never a
  // device allocation inside the step loop). Contents are undefined.
  virtual Tensor empty(DType dtype, Shape shape) = 0;
  // Memory that lives for the whole run (the KV cache): allocated once, at start-up.
  virtual Tensor allocate_persistent(DType dtype, Shape shape) { return empty(dtype, std::move(shape)); }
  // The dtype the paged latent cache is stored in (the CPU keeps F32; the GPU BF16).
  virtual DType cache_dtype() const { return activation_dtype(); }
  // Waits for queued device work (a no-op on the CPU). Throws when a device or collective
  // error (a dead peer, a timeout) surfaced.
  virtual void synchronize() {}
  // A check run while synchronize() waits (the NCCL communicators' error and timeout poll); it
  // throws to abandon the wait.
  virtual void add_wait_check(std::function<void()> check) { (void)check; }
  // The backend's stream (a cudaStream_t) for collectives to enqueue on; null on the CPU.
  virtual void* native_stream() const { return nullptr; }
  // A checkpoint vector (norm weight, bias) placed on the device as FP32.
  virtual Tensor place_vector(const Tensor& host) = 0;
  // A checkpoint matrix placed on the device in the form this backend computes with.
  virtual LinearWeight place_linear(const Tensor& weight, const Tensor& scale_inv, int64_t block_out,
                                    int64_t block_in) = 0;
  // An embedding table [V, D] placed on the device.
  virtual Tensor place_embedding(const Tensor& host) = 0;
  // W exactly dequantized to FP32 on the device, [out, in].
  virtual Tensor dequantize(const LinearWeight& w) = 0;
  // MLA's kv_b_proj placed by place_linear(), in the forms mla_attention() takes (MlaWeight),
  // for the heads and dimensions of p.
  virtual MlaWeight place_mla_kv_b(const LinearWeight& w, const MlaParams& p) {
    (void)p;
    return MlaWeight(dequantize(w));
  }
  virtual void copy_to_host(const Tensor& src, void* dst) = 0;
  virtual void copy_from_host(const void* src, Tensor& dst) = 0;
  // dst = src, both on this device, same dtype and size.
  virtual void copy(const Tensor& src, Tensor& dst) = 0;

  // ---- ops ----
  // out[t] = table[ids[t] - first_id]; ids host-side, validated by the caller. Ids outside
  // [first_id, first_id + rows) give zero rows: a vocabulary shard fills only its own tokens.
  virtual void embedding(const Tensor& table, std::span<const int32_t> ids, Tensor& out, int64_t first_id = 0) = 0;
  // Normalizes the first d = w.numel() columns of each row of x [N, W] (W >= d):
  // out[:, :d] = x * rsqrt(mean(x^2) + eps) * w. Other columns of out are untouched; out may alias x.
  virtual void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& out) = 0;
  // out = rms_norm(x) @ W^T, as rms_norm() into `normed` and then linear() compute them (normed
  // holds the norm afterwards). A backend may fuse the two (the CUDA one at decode sizes: the norm
  // quantized for the FP8 product in the same kernel).
  virtual void rms_norm_linear(const Tensor& x, const Tensor& norm_w, float eps, Tensor& normed, const LinearWeight& w,
                               Tensor& out) {
    rms_norm(x, norm_w, eps, normed);
    linear(normed, w, out);
  }
  // x += y, then out = rms_norm(x) (the residual add fused into the norm where the backend can).
  virtual void add_rms_norm(Tensor& x, const Tensor& y, const Tensor& w, float eps, Tensor& out) {
    add(x, y);
    rms_norm(x, w, eps, out);
  }
  // out [N, W] = x[rows] for x [T, W].
  virtual void gather_rows(const Tensor& x, std::span<const int32_t> rows, Tensor& out) = 0;
  // x += y
  virtual void add(Tensor& x, const Tensor& y) = 0;
  // out [T, out] = x [T, in] @ W^T
  virtual void linear(const Tensor& x, const LinearWeight& w, Tensor& out) = 0;
  // Two products of the same input: out_a = x @ A^T, out_b = x @ B^T, each as linear() computes
  // it. A backend may run both at once (the CUDA one at decode sizes: x quantized once, one launch).
  virtual void linear2(const Tensor& x, const LinearWeight& a, Tensor& out_a, const LinearWeight& b, Tensor& out_b) {
    linear(x, a, out_a);
    linear(x, b, out_b);
  }
  // out = silu(gate) * up, all [T, F]
  virtual void silu_mul(const Tensor& gate, const Tensor& up, Tensor& out) = 0;
  // out = (silu(gate) * up) @ W^T, as silu_mul() and then linear() compute it; gate may be
  // overwritten. A backend may fuse the two (the CUDA one: silu(gate) * up quantized for the FP8
  // product without being written out).
  virtual void silu_mul_linear(Tensor& gate, const Tensor& up, const LinearWeight& w, Tensor& out) {
    silu_mul(gate, up, gate);
    linear(gate, w, out);
  }
  // Rotates interleaved pairs (x[2i], x[2i+1]) of columns [offset, offset + 2*inv_freq.size()) of
  // every row of x [T, N, W] by angle pos[t] * inv_freq[i], scaling cos and sin by attention_factor.
  virtual void rope(Tensor& x, int64_t offset, std::span<const int32_t> pos, std::span<const float> inv_freq,
                    float attention_factor) = 0;
  // Stores each token's cache entry [C + R] (normalized latent then rotated key) at its slot.
  // cache: [num_blocks, block_size, C + R]; entry: [T, C + R].
  virtual void cache_write(Tensor& cache, const Tensor& entry, const AttentionLayout& layout) = 0;
  // Multi-head latent attention in the absorbed form over the paged cache.
  // q [T, H, nope + R] (rope applied), kv_b from place_mla_kv_b() (or its FP32 form alone),
  // cache [num_blocks, block_size, C + R], out [T, H*v].
  virtual void mla_attention(const Tensor& q, const MlaWeight& kv_b, const Tensor& cache,
                             const AttentionLayout& layout, const MlaParams& p, Tensor& out) = 0;
  // Router: sigmoid scores of x [T, D] against gate [E, D] (FP32), biased group/expert choice,
  // unbiased weights. ids [T, K] I32, weights [T, K] F32.
  virtual void moe_route(const Tensor& x, const Tensor& gate, const Tensor& bias, const RouterParams& p,
                         Tensor& ids, Tensor& weights) = 0;
  // out [T, D] = sum_k weights[t,k] * expert_{ids[t,k]}(x[t]), summed in ascending expert order,
  // over the experts this rank holds: experts[i] is expert first_expert + i; others are skipped.
  // With `addend` [T, D] (the shared expert's output), out = that sum + addend, as add() would make it.
  // The addend may come from side work that has ended but is not joined yet (end_side() before,
  // join_side() after this call): the backend waits for it just before reading it, so the routed
  // experts' products need not wait for the shared expert.
  virtual void moe_experts(const Tensor& x, std::span<const ExpertWeights> experts, const Tensor& ids,
                           const Tensor& weights, Tensor& out, int64_t first_expert = 0,
                           const Tensor* addend = nullptr) = 0;
  // Called once per MoE layer after its experts are placed (before any step), so that a backend
  // can build what moe_experts() needs for them without allocating inside the step loop.
  virtual void prepare_experts(std::span<const ExpertWeights> experts) { (void)experts; }
  // out [N, W] from parts [P, N, Wp] holding consecutive column ranges of width Wp (the last
  // part may be padded past W): out[:, p*Wp + j] = parts[p, :, j].
  virtual void concat_columns(const Tensor& parts, Tensor& out) = 0;
  // Greedy choice per row of logits [N, V]: index of the first maximum.
  virtual std::vector<int32_t> argmax(const Tensor& logits) = 0;
  // Work that may run alongside other work (a second CUDA stream): the ops called between
  // begin_side() and end_side() follow everything called before begin_side(), may overlap the
  // ops called after end_side(), and precede every op called after join_side(). Each begin_side()
  // is followed by one end_side() and then one join_side() before the next. Backends without
  // streams run the ops in order (the default: nothing to do).
  virtual void begin_side() {}
  virtual void end_side() {}
  virtual void join_side() {}

  // ---- step graphs (CUDA graphs; other backends have none) ----
  // A decode step's work recorded once and replayed: the same kernels on the same scratch with
  // no per-launch host work. What a captured step reads from the host (token ids, the attention
  // layout, the logits rows) is staged first, into buffers whose addresses stay fixed.
  //
  // Sets aside `scratch_bytes` of device memory that only captured steps allocate from; false
  // when this backend does not capture (the CPU one, cuda.graphs=false) or the memory is not
  // there (the caller then runs every step eagerly).
  virtual bool enable_graphs(int64_t scratch_bytes) {
    (void)scratch_bytes;
    return false;
  }
  // Uploads a step's host inputs (what embedding, rope, cache_write, mla_attention and
  // gather_rows read) to the staging buffers, and returns the step's shape key: two steps with
  // the same key launch the same kernels with the same arguments, so one's graph serves both.
  // Changes no result: the ops called afterwards find these inputs staged.
  virtual uint64_t stage_step(std::span<const int32_t> token_ids, const AttentionLayout& layout,
                              std::span<const int32_t> logit_rows) {
    (void)token_ids;
    (void)layout;
    (void)logit_rows;
    return 0;
  }
  // Records the work queued until end_capture() instead of running it; empty() hands out the
  // graph scratch meanwhile. The ops' host inputs must have been staged (stage_step).
  virtual void begin_capture() { DILU_CHECK(false, "backend ", name(), " captures no graphs"); }
  // The recorded work, ready to replay; throws (after leaving capture mode) when the capture
  // failed. A captured step has not run: replay() runs it.
  virtual std::shared_ptr<void> end_capture() { return nullptr; }
  // Leaves capture mode after an exception, discarding what was recorded.
  virtual void abort_capture() {}
  // Runs a captured step on the inputs staged last.
  virtual void replay(const std::shared_ptr<void>& graph) { (void)graph; }

  // ---- benchmarks ----
  // A tensor that lives for the run, made where it is used: element i is center + half_width * u
  // rounded to `dtype` (F32, BF16 or F8E4M3), u in [-1, 1) from a counter-based hash of (key, i).
  // Every backend makes the same bits (random weights for benchmarks without a checkpoint file).
  virtual Tensor random_fill(DType dtype, Shape shape, uint64_t key, float center, float half_width) = 0;
  // Experts that received at least one token, summed over moe_experts() calls since the last
  // call (the routed-expert bytes of a step's roofline). Waits for queued work; while a begun
  // sample is not finished, counts only the steps up to the last finished sample (a step's count
  // ends with its sample) and does not wait.
  virtual int64_t take_routed_expert_count() = 0;
  // Memory bandwidth in bytes/s (read + write) of a copy of `bytes` within this device's memory.
  virtual double measure_copy_bandwidth(size_t bytes) = 0;

  // Sampling where the logits are: true when this backend implements sample() (the CUDA one);
  // the CPU backend's caller samples on the host (engine/sampler.h) with the same semantics.
  virtual bool has_device_sampler() const { return false; }
  // One token (and logprobs) per spec from logits [N, V] F32.
  virtual std::vector<SampleOut> sample(const Tensor& logits, std::span<const SampleSpec> specs) {
    (void)logits;
    (void)specs;
    DILU_CHECK(false, "backend ", name(), " has no device sampler");
    return {};
  }

  // ---- overlapped steps: the next step queued before this one's tokens reach the host ----
  // True when this backend implements the three calls below (the CUDA one): sample() in two
  // halves, and the next step's token ids read on the device from the sample begun last.
  virtual bool has_token_feed() const { return false; }
  // Queues sample() and returns at once; finish_sample() waits for the draws. At most two samples
  // are begun and not finished; they finish in the order they began.
  virtual void begin_sample(const Tensor& logits, std::span<const SampleSpec> specs) {
    (void)logits;
    (void)specs;
    DILU_CHECK(false, "backend ", name(), " cannot overlap steps");
  }
  virtual std::vector<SampleOut> finish_sample() {
    DILU_CHECK(false, "backend ", name(), " cannot overlap steps");
    return {};
  }
  // The next step's token ids at these indices (whatever the host passes there) are the draws of
  // the last begun sample: embedding() and stage_step() read them on the device. Holds until the
  // next begin_sample().
  virtual void set_token_feed(std::span<const TokenFeed> feed) {
    DILU_CHECK(feed.empty(), "backend ", name(), " cannot overlap steps");
  }
};

// Binds the process to the GPU of its local rank when the CUDA build sees GPUs (mpirun and srun
// start one rank per GPU); returns the device index, or -1 (CPU-only build or no GPU).
int bind_local_device(int local_rank);

// The GPU this process is bound to (bind_local_device) as the planner should see it; nullopt on a
// machine without one, or a build without CUDA.
struct LocalGpu {
  std::string name;  // e.g. "NVIDIA H200"
  uint64_t free_bytes = 0, total_bytes = 0;
};
std::optional<LocalGpu> local_gpu();

// How the CUDA backend multiplies by FP8 weights: "block" (cuBLASLt FP8 with DeepSeek's block
// scales; activations quantized per token per 128 channels), "soft" (FP8 weights dequantized to
// BF16, BF16 math), "auto" (block where the GPU and cuBLASLt support it, else soft). On the CPU
// backend "block" rounds the FP8 linears' inputs the same way (the block path's reference);
// "auto" and "soft" keep its exact FP32 inputs.
struct BackendOptions {
  int cpu_threads = 0;
  std::string fp8_gemm = "auto";  // auto | block | soft
  int64_t arena_bytes = 0;        // GPU activation arena; 0: a default (256 MiB)
  std::string kernels = "fast";  // fast | reference: the CUDA backend's kernel set (cuda.kernels)
  bool graphs = true;             // decode steps as CUDA graphs (cuda.graphs)
  // The fast MLA core: auto (wgmma where it fills the GPU, else mma) | mma | wgmma (where it
  // runs at all). For tests and benches, not a run key; DILU_MLA_CORE overrides it.
  std::string mla_core = "auto";
  // The fast MLA absorptions: auto (bf16x3 from kMlaSplitMinTokens tokens where kv_b has its
  // split form, else f32) | f32 (FP32 cuBLASLt GEMMs) | bf16x3 (the activations as three BF16
  // parts against kv_b's stored values on tensor cores, wherever the split form exists). For
  // tests and benches; DILU_MLA_ABSORB overrides it.
  std::string mla_absorb = "auto";
  // MLA in prefill: auto (the expanded form where a step's queries are most of their contexts
  // and its scratch fits, kMlaExpandedMinTokens tokens up) | absorbed (always the absorbed form)
  // | expanded (wherever the expanded form runs: widths built, scratch, no capture). For tests
  // and benches; DILU_MLA_PREFILL overrides it.
  std::string mla_prefill = "auto";
};

// "cpu" always; "cuda" when built with it. Throws UserError for an unknown or unavailable name.
std::unique_ptr<Ops> make_ops(const std::string& backend, const BackendOptions& options);
inline std::unique_ptr<Ops> make_ops(const std::string& backend, int cpu_threads) {
  BackendOptions o;
  o.cpu_threads = cpu_threads;
  return make_ops(backend, o);
}

}  // namespace dilu
