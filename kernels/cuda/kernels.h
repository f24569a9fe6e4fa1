// Launchers of the CUDA backend's kernels (kernels.cu), in plain pointers so that the C++20
// host code (cuda_ops.cpp) and the C++17 device code share nothing but this header. Every
// launcher enqueues on `stream` (a cudaStream_t), allocates nothing and never synchronizes;
// sizes are element counts; a zero-sized launch is a no-op.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dilu::cuda {

// Weight storage types the GEMM kernels read.
enum class WeightType : int { F32 = 0, BF16 = 1, FP8 = 2 };

// ---- conversions ----
void f32_to_bf16(const float* x, uint16_t* out, int64_t n, void* stream);
// out[r, c] = w[r, c] * scale_inv[r / bo, c / bi] (w FP8 e4m3), or w (BF16/F32), as F32.
// scale_stride: floats per row of scale_inv (>= ceil(cols / bi)).
void dequantize_to_f32(const void* w, WeightType type, const float* scale_inv, int64_t scale_stride, int64_t rows,
                       int64_t cols, int64_t block_out, int64_t block_in, float* out, void* stream);
// Per token, per 128 input channels: scale = amax / 448 (1 for an all-zero group), q = x / scale
// in e4m3 (round to nearest even, saturating). x [rows, cols] with cols % 128 == 0; q
// [out_rows, cols] (out_rows >= rows: the rows past x are zeros with scale 1); the scale of
// (row, group g) at scale[row * row_stride + g * group_stride].
void quantize_fp8_per_token_128(const float* x, int64_t rows, int64_t out_rows, int64_t cols, uint8_t* q,
                                float* scale, int64_t row_stride, int64_t group_stride, void* stream);
// The same quantization of silu(gate) * up (as silu_mul computes it), without writing it out.
void silu_mul_quantize_fp8(const float* gate, const float* up, int64_t rows, int64_t out_rows, int64_t cols,
                           uint8_t* q, float* scale, int64_t row_stride, int64_t group_stride, void* stream);
void bf16_to_f32(const uint16_t* x, float* out, int64_t n, void* stream);

// ---- elementwise and row ops (F32 activations) ----
// out[t] = table[ids[t] - first_id] as F32, zeros outside [first_id, first_id + rows).
// table_type: 0 F32, 1 BF16, 2 F16.
void embedding(const void* table, int table_type, int64_t rows, int64_t dim, const int32_t* ids, int64_t n,
               int64_t first_id, float* out, void* stream);
// out[:, :d] = x[:, :d] * rsqrt(mean(x[:, :d]^2) + eps) * w; rows of width `width`. With `residual`
// non-null, first x += residual (all `width` columns... only the first d: d == width there).
void rms_norm(float* x, const float* residual, const float* w, int64_t rows, int64_t width, int64_t d, float eps,
              float* out, void* stream);
// rms_norm (no residual, d == width) whose rows are also quantized for the FP8 products as
// quantize_fp8_per_token_128(out, rows, rows, d, q, scale, d / 128, 1) would: the same bytes in one
// launch. False, having launched nothing, unless d is a multiple of 128 up to 8192.
bool rms_norm_quantize(const float* x, const float* w, int64_t rows, int64_t d, float eps, float* out, uint8_t* q,
                       float* scale, void* stream);
void gather_rows(const float* x, int64_t width, const int32_t* rows, int64_t n, float* out, void* stream);
// out[rows[i]] = x[i] for i < n, rows of width floats.
void scatter_rows(const float* x, int64_t width, const int32_t* rows, int64_t n, float* out, void* stream);
void add(float* x, const float* y, int64_t n, void* stream);
void silu_mul(const float* gate, const float* up, int64_t n, float* out, void* stream);
// Interleaved rotation of columns [offset, offset + 2 * half) of x [t, heads, width].
void rope(float* x, int64_t t, int64_t heads, int64_t width, int64_t offset, const int32_t* pos,
          const float* inv_freq, int64_t half, float attention_factor, void* stream);
// cache [slots, width] BF16: cache[slot[t]] = bf16(entry[t]).
void cache_write(uint16_t* cache, const float* entry, const int64_t* slot, int64_t t, int64_t width, void* stream);
void concat_columns(const float* parts, int64_t p, int64_t n, int64_t wp, float* out, int64_t w, void* stream);
// Index of the first maximum of each row.
void argmax_rows(const float* x, int64_t rows, int64_t cols, int32_t* out, void* stream);

// ---- GEMM with BF16 math (soft FP8, MoE experts) and the F32 router GEMM ----
// out[r, n] = sum_k round(x[src(r), k]) * round(W_g[n, k]) for the rows r of group g:
// rows [group_offsets[g], group_offsets[g + 1]) (device array of groups + 1), or all `rows` rows
// when group_offsets is null (then one group). src(r) = x_rows[r] when x_rows is non-null, else
// r. W_g = weights[g] (device array of device pointers) [N, K] of `type`, FP8 with scales[g]
// [ceil(N / bo), ceil(K / bi)]. round() is round-to-BF16 when round_bf16, else identity (F32 math).
struct GroupedGemm {
  const float* x = nullptr;
  int64_t ldx = 0;
  const int32_t* x_rows = nullptr;
  const int32_t* group_offsets = nullptr;
  int64_t groups = 1;
  int64_t rows = 0;  // rows of the single group, or an upper bound of any group's rows
  const void* const* weights = nullptr;  // per group (device array), or null: `weight` for all
  const float* const* scales = nullptr;
  const void* weight = nullptr;
  const float* scale = nullptr;
  WeightType type = WeightType::BF16;
  int64_t n = 0, k = 0, block_out = 0, block_in = 0;
  int64_t scale_stride = 0;  // floats per row of the scales (>= ceil(K / bi))
  bool round_bf16 = true;
  // FP8 activations for grouped_fp8: row r's K bytes at xq + r * ldx, its K/128 scales at
  // xscale + r * lds.
  const uint8_t* xq = nullptr;
  const float* xscale = nullptr;
  int64_t lds = 0;
  float* out = nullptr;
  int64_t ldo = 0;
  // Optional: the grid covers only group_slots groups, the ids in group_list (device; -1 past the
  // non-empty ones, as moe_active_groups writes them). Decode's few rows select few of many experts.
  const int32_t* group_list = nullptr;
  int64_t group_slots = 0;
  // Optional, grouped_fp8 at most 16 rows a group (grouped_fp8_pairs): a second matrix of the
  // same inputs ([n2, k], its own scales, per group or one), written to out2; one launch, one
  // split-sum pass for both. n2 == 0: none.
  const void* const* weights2 = nullptr;
  const float* const* scales2 = nullptr;
  const void* weight2 = nullptr;
  const float* scale2 = nullptr;
  int64_t n2 = 0, scale_stride2 = 0;
  float* out2 = nullptr;
  int64_t ldo2 = 0;
};
void grouped_gemm(const GroupedGemm& g, void* stream);
// The same product by a kernel for groups of few rows (cuda.kernels=fast, decode batches): every
// weight row read once per 16 rows of its group, K in chunks. Needs K % 4 == 0 (and FP8 scale
// blocks of whole quads): grouped_gemv_fits().
bool grouped_gemv_fits(const GroupedGemm& g);
void grouped_gemv(const GroupedGemm& g, void* stream);

// out[t, n] = sum_k bf16(x[t, k]) * w[n, k] for up to kBf16GemvMaxRows rows of x (F32, row stride
// ldx) against a BF16 weight [n, k] (row-major, 16-byte aligned), F32 sums: the BF16 linear's
// arithmetic (x rounded to BF16, as for cuBLASLt) in a kernel that streams the weight once at
// close to copy bandwidth (R1's 1.85 GB lm_head at decode). False, launching nothing, for shapes
// it does not take (k not a multiple of 8, too many rows, x too large for shared memory).
constexpr int64_t kBf16GemvMaxRows = 4;
bool bf16_gemv(const float* x, int64_t ldx, int64_t rows, const uint16_t* w, int64_t n, int64_t k, float* out,
               int64_t ldo, void* stream);
// The same product on tensor cores (mma.sync BF16, sm_80+): for BF16 math (round_bf16) with FP8
// or BF16 weights, K % 64 == 0, FP8 scale blocks of whole 64-wide chunks and 16-row tiles, x and
// its rows 16-byte aligned: grouped_mma_fits(). Any number of rows per group; each weight is read
// once per 16 (or, when groups average more than 16 rows, 64) rows of its group.
bool grouped_mma_fits(const GroupedGemm& g);
// K split over `splits` blocks (grouped_mma_splits: when few rows leave the GPU mostly idle),
// their sums in `partial` (splits x rows x n floats), added in split order.
int64_t grouped_mma_splits(const GroupedGemm& g, int sms);
void grouped_mma(const GroupedGemm& g, void* stream, int64_t splits = 1, float* partial = nullptr);
// The block-scaled FP8 product (cuda.fp8_gemm=block) on FP8 tensor cores (mma.sync e4m3, sm_89+):
// activations already quantized per row per 128 channels (quantize_fp8_per_token_128 with scales
// [row][K/128], or moe_silu_mul_fp8), FP8 weights with 128x128 block scales; each 128-wide K block
// is summed in FP32 on its own and added times (activation scale x weight scale), so the products
// are exactly the CPU block path's. Reads xq/xscale/lds (not x); x_rows, groups, split-K and the
// output as grouped_mma. Needs K % 128 == 0 and 16-byte aligned rows: grouped_fp8_fits().
bool grouped_fp8_fits(const GroupedGemm& g);
// Whether grouped_fp8 takes a second matrix (n2 > 0) for these rows: at most 16 a group.
bool grouped_fp8_pairs(const GroupedGemm& g);
// Split count for grouped_fp8; `partial` then holds splits x rows x (n + n2) floats.
int64_t grouped_fp8_splits(const GroupedGemm& g, int sms);
void grouped_fp8(const GroupedGemm& g, void* stream, int64_t splits = 1, float* partial = nullptr);

// ---- multi-head latent attention (absorbed form) ----
struct MlaArgs {
  const float* q = nullptr;         // [T, H, nope + R], rope applied
  const float* kv_b = nullptr;      // [H * (nope + v), C] F32: W_UK [nope, C] then W_UV [v, C] per head
  const uint16_t* cache = nullptr;  // [blocks, block_size, C + R] BF16
  const int32_t* token_seq = nullptr;
  const int32_t* token_pos = nullptr;
  const int32_t* tables = nullptr;  // [S, table_stride] block ids
  int64_t table_stride = 0;
  int64_t block_size = 0;
  int64_t t = 0, h = 0, nope = 0, r = 0, c = 0, v = 0;
  float scale = 1.0f;
  float* q_lat = nullptr;  // scratch [T, H, C]
  // With kv_b's split form (mla_kv_b_split): its scales [H, 2, C]. The split absorb-q leaves
  // W_UK's scales ([h, 0, :]) out of q_lat and the fast cores apply them as they load it. Null
  // when q_lat is complete (the F32 absorptions).
  const float* q_scale = nullptr;
  float* o_lat = nullptr;  // scratch [T, H, C]
  float* out = nullptr;    // [T, H * v]
};
// Supports C <= 512 and R <= 64 (DeepSeek-V3: 512 and 64).
void mla_attention(const MlaArgs& a, void* stream);

// The absorbed form's two per-head products, one thread block per (token, head) (the reference
// path): q_lat = q_nope @ W_UK[h]; out = o_lat @ W_UV[h]^T. mla_attention runs them around its core.
void mla_absorb_q(const MlaArgs& a, void* stream);
void mla_absorb_v(const MlaArgs& a, void* stream);

// The absorptions on BF16 tensor cores with F32 accuracy ("split"): kv_b's stored values (FP8
// or BF16, each exact in BF16) are multiplied without their block scales, against the F32
// activations cut into three BF16 parts as they are loaded (x = hi + mid + lo, 24 bits):
//   q_lat = q_nope @ W_UK without W_UK's scales, which the fast cores apply (MlaArgs::q_scale);
//   out = (o_lat * W_UV's scales) @ W_UV^T.
// The split form of kv_b, per head: W_UK transposed ([C, nope]), then W_UV ([v, C]), in BF16;
// split_scale [H, 2, C] holds the scale of W_UK's and of W_UV's column j in head h (1 for BF16).
// Each head's W_UK rows, and its W_UV rows, must lie in one row block of the scales.
void mla_kv_b_split(const void* w, WeightType type, const float* scale_inv, int64_t scale_stride, int64_t h,
                    int64_t nope, int64_t v, int64_t c, int64_t block_out, int64_t block_in, uint16_t* split,
                    float* split_scale, void* stream);
// Whether the split absorptions take these widths on this device: sm_80+ (mma.sync), C, v and
// nope multiples of 8, nope + R of 4. mla_split_fits: and the call's operands are 16-byte aligned.
bool mla_split_shapes(int64_t c, int64_t v, int64_t nope, int64_t r);
bool mla_split_fits(const MlaArgs& a);
void mla_absorb_q_split(const MlaArgs& a, const uint16_t* split, void* stream);
void mla_absorb_v_split(const MlaArgs& a, const uint16_t* split, const float* split_scale, void* stream);
// The absorptions at a few tokens (decode): GEMVs over the split form, each weight row read once
// for all the tokens, in F32 arithmetic; q_lat complete (W_UK's scales applied, q_scale unused).
// mla_absorb_gemv_fits: at most kMlaGemvMaxTokens tokens, mla_split_fits, nope and C each 64,
// 128, 256 or 512, and C and v multiples of the kernels' rows a block (R1's: 64 and 16).
constexpr int64_t kMlaGemvMaxTokens = 8;
bool mla_absorb_gemv_fits(const MlaArgs& a);
void mla_absorb_q_gemv(const MlaArgs& a, const uint16_t* split, const float* split_scale, void* stream);
void mla_absorb_v_gemv(const MlaArgs& a, const uint16_t* split, const float* split_scale, void* stream);
// The core alone: o_lat from q_lat, the rope part of q and the cache, one block per (token, head).
void mla_core_reference(const MlaArgs& a, void* stream);

// The fused core: a block holds kMlaFusedHeads heads of one token and walks a range of its
// context in tiles of positions loaded once into shared memory for all of them. With splits > 1
// (at most kMlaMaxSplits) each token's context is cut into ranges of ceil(context / splits)
// positions rounded up to 64 (two cache tiles), worked out on the device from the token's
// position (so one launch serves any context; the splits past a short context are empty). Their
// partial softmax states go to part_o [splits, T, H, C], part_ml [splits, T, H, 2] and are merged
// into o_lat. C + R must be even, C <= 512. splits == 1 writes o_lat directly.
constexpr int kMlaFusedHeads = 16;
constexpr int kMlaMaxSplits = 32;
void mla_core_fused(const MlaArgs& a, int64_t splits, float* part_o, float* part_ml, void* stream);
// The same core on tensor cores (mma.sync BF16: the queries and the probabilities as hi + lo
// BF16 splits), 32-position cache tiles, two blocks per SM; same splits, scratch and combine. Needs C % 128 == 0,
// C <= 512, (C + R) % 16 == 0, C + R <= 640, sm_80+ and 96 KB of shared memory per block: mla_core_mma_fits().
bool mla_core_mma_fits(const MlaArgs& a);
void mla_core_mma(const MlaArgs& a, int64_t splits, float* part_o, float* part_ml, void* stream);
// The same on Hopper wgmma: 64 heads a block, R1's C = 512 and R = 64, heads a multiple of 64,
// an sm_90a image on a device of compute capability 9.0 (mla_core_wgmma_fits()).
constexpr int kMlaWgmmaHeads = 64;
// The fewest tokens for which the fast path runs the absorptions split (mla_kv_b_split) rather
// than as FP32 GEMMs (BackendOptions::mla_absorb = auto). On an H100 (dilu_mla_bench, context
// 1024, mma core) the split call takes 157.5 against 162.0 us at 32 tokens, 71.6 against 58.7 at 1.
constexpr int64_t kMlaSplitMinTokens = 32;
bool mla_core_wgmma_fits(const MlaArgs& a);
void mla_core_wgmma(const MlaArgs& a, int64_t splits, float* part_o, float* part_ml, void* stream);

// ---- MLA prefill in the expanded form ----
// Where a step's queries are most of their contexts (prefill), keys and values per context
// position cost less than the absorbed form's per-query work: R1's scores are nope + R = 192 wide
// and its outputs v = 128 wide, against C + R = 576 and C = 512 absorbed.
// kv_b's expanded form: row i = [hi(W[i, :]) | lo(W[i, :])] of the F32 kv_b [rows, C], BF16
// [rows, 2C] (W = hi + lo to 16 bits). Against [lat | lat] one BF16 GEMM gives the keys' nope
// part and the values of a head to about 2^-16 of F32.
void mla_kv_b_expand(const float* w, int64_t rows, int64_t c, uint16_t* expand, void* stream);
// The cache entries at slots [P] (cache [.., C + R] BF16): lat2 [P, 2C] = [lat | lat], rope [P, R].
// C and R multiples of 8.
void mla_gather_latent(const uint16_t* cache, int64_t c, int64_t r, const int32_t* slots, int64_t p, uint16_t* lat2,
                       uint16_t* rope, void* stream);
// Attention of expanded keys and values, heads h0 .. h0 + hg: a block per (tile, head). A tile is
// up to kMlaExpandedRows query rows of one sequence: tiles [n_tiles, 4] = (first entry in rows,
// row count, the sequence's first position in kv and rope, keys to read = its last row's
// position + 1); rows lists token indices. Each row attends to the keys up to its own position.
// The products run on BF16 tensor cores with both operands as hi + lo (F32 accuracy to about
// 2^-16, as the absorbed cores).
constexpr int64_t kMlaExpandedRows = 128;
// BackendOptions::mla_prefill = auto takes the expanded form for the sequences with two or more
// tokens in a step and a context of at most kMlaExpandedMaxContext positions a token, from
// kMlaExpandedMinTokens such tokens a step.
constexpr int64_t kMlaExpandedMinTokens = 256;
constexpr int64_t kMlaExpandedMaxContext = 4;
struct MlaExpandedArgs {
  const float* q = nullptr;          // [T, H, nope + R], rope applied
  const float* kv = nullptr;         // [P, hg, nope + v] F32: keys' nope part, then values
  const uint16_t* rope = nullptr;    // [P, R] BF16: the rope keys, shared by the heads
  const int32_t* tiles = nullptr;    // [n_tiles, 4]
  const int32_t* rows = nullptr;     // token indices
  const int32_t* token_pos = nullptr;  // [T]
  int64_t n_tiles = 0, h = 0, h0 = 0, hg = 0, nope = 0, r = 0, v = 0;
  float scale = 1.0f;
  float* out = nullptr;  // [T, H * v]
};
// The widths built: R1's (nope 128, R 64, v 128) and the golden models' (32, 16, 32), C % 8 == 0, sm_80+.
bool mla_expanded_shapes(int64_t nope, int64_t r, int64_t v, int64_t c);
void mla_attention_expanded(const MlaExpandedArgs& a, void* stream);

// ---- MoE ----
// Router choice from logits [T, E] (F32, before the sigmoid): noaux_tc with groups, as the CPU.
// The router's F32 logits [t, e] = x [t, d] . gate [e, d]^T at a few tokens (decode), a block per
// expert, in the chain of programmatic launches. router_gemv_fits: 1..kRouterGemvMaxTokens tokens,
// d a multiple of 4 up to 8192, x and gate 16-byte aligned.
constexpr int64_t kRouterGemvMaxTokens = 8;
bool router_gemv_fits(int64_t t, int64_t d, const float* x, const float* gate);
void router_gemv(const float* x, int64_t t, int64_t d, const float* gate, int64_t e, float* logits, void* stream);
void moe_select(const float* logits, const float* bias, int64_t t, int64_t e, int64_t k, int64_t n_group,
                int64_t topk_group, bool norm_topk_prob, float routed_scaling_factor, int32_t* ids, float* weights,
                void* stream);
// Groups the (token, k) pairs routed to experts [first, first + local) by expert: offsets
// [local + 1], rows [T * K] (token of each grouped row), pair_row [T * K] (grouped row of each
// pair, -1 for another rank's expert). counters: scratch [local] int32. With group_list (device,
// [group_slots]): the non-empty experts' local ids in ascending order, then -1 (GroupedGemm's
// group_list; group_slots >= min(local, T * K) holds them all).
void moe_group(const int32_t* ids, int64_t t, int64_t k, int64_t first, int64_t local, int32_t* counters,
               int32_t* offsets, int32_t* rows, int32_t* pair_row, int32_t* group_list, int64_t group_slots,
               void* stream);
// moe_group, count_routed_experts (routed may be null) and, with quant.x, the experts' inputs
// quantized as quantize_fp8_per_token_128(x, t, t, d, q, scale, d / 128, 1) does, in one launch of
// one block, where the pairs (T * K) are at most 1024 and the local experts at most 4096; false,
// having launched nothing, otherwise. The rows come out grouped the same way (their order within
// a group, as moe_group's, is the atomics' order; no result depends on it).
struct MoeGroupQuantize {
  const float* x = nullptr;  // [T, d], d % 128 == 0
  int64_t d = 0;
  uint8_t* q = nullptr;  // [T, d] FP8 e4m3
  float* scale = nullptr;  // [T, d / 128]
};
bool moe_group_small(const int32_t* ids, int64_t t, int64_t k, int64_t first, int64_t local, int32_t* offsets,
                     int32_t* rows, int32_t* pair_row, int32_t* group_list, int64_t group_slots,
                     unsigned long long* routed, const MoeGroupQuantize& quant, void* stream);
// gate <- silu(gate) * up for the first offsets[local] rows of width f.
void moe_silu_mul(float* gate, const float* up, const int32_t* offsets, int64_t local, int64_t max_rows, int64_t f,
                  void* stream);
// The same h = silu(gate) * up, quantized per row per 128 channels as quantize_fp8_per_token_128
// does (q [rows, f], scale [rows, f / 128]) for grouped_fp8; f % 128 == 0.
void moe_silu_mul_fp8(const float* gate, const float* up, const int32_t* offsets, int64_t local, int64_t max_rows,
                      int64_t f, uint8_t* q, float* scale, void* stream);
// out[t] = sum over its pairs in ascending expert id of weight * y[pair_row] (zero when none), then
// + addend[t] unless addend is null.
void moe_combine(const float* y, const int32_t* ids, const float* weights, const int32_t* pair_row, int64_t t,
                 int64_t k, int64_t d, float* out, const float* addend, void* stream);

// Ops::random_fill on the device: dtype 0 F32, 1 BF16, 2 F8E4M3 (kernels/random_fill.h's values).
void random_fill(void* out, int dtype, int64_t n, uint64_t key, float center, float half_width, void* stream);
// counter[0] += number of experts with at least one row (offsets [local + 1] from moe_group).
void count_routed_experts(const int32_t* offsets, int64_t local, unsigned long long* counter, void* stream);

// Fills n 32-bit words with `pattern`.
void fill_u32(void* dst, uint32_t pattern, int64_t n, void* stream);

}  // namespace dilu::cuda
