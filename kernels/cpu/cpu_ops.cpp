// CPU implementation of the op interface (see cpu_ops.h). Every op checks its arguments at the
// boundary, then runs plain loops; OpenMP splits the widest independent dimension.
#include "kernels/cpu/cpu_ops.h"

#include "kernels/random_fill.h"

#include <omp.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <utility>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

namespace dilu {

namespace {

void check_f32(const Tensor& t, const char* what) {
  DILU_CHECK(t.is_cpu() && t.dtype() == DType::F32, what, " must be an F32 CPU tensor, got ", dtype_name(t.dtype()),
             " on ", t.device().str());
}

float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// Row j of W, exactly dequantized to FP32 into `dst` [in].
void weight_row(const LinearWeight& w, int64_t j, float* dst) {
  const int64_t in = w.in_features();
  const size_t esz = dtype_size(w.weight.dtype());
  const auto* row = static_cast<const uint8_t*>(w.weight.raw()) + static_cast<size_t>(j * in) * esz;
  convert_to_f32(w.weight.dtype(), row, dst, static_cast<size_t>(in));
  if (w.weight.dtype() == DType::F8E4M3) {
    const float* scale = w.scale_inv.data<float>() + (j / w.block_out) * w.scale_inv.dim(1);
    for (int64_t b = 0; b * w.block_in < in; ++b) {
      const float s = scale[b];
      const int64_t end = std::min(in, (b + 1) * w.block_in);
      for (int64_t i = b * w.block_in; i < end; ++i) dst[i] *= s;
    }
  }
}

class CpuOps final : public Ops {
 public:
  // threads 0: one per core this process may run on (a launcher may have bound it to fewer).
  CpuOps(int threads, bool fp8_activations) : fp8_activations_(fp8_activations) {
    if (threads <= 0) {
      cpu_set_t set;
      CPU_ZERO(&set);
      threads = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : omp_get_num_procs();
    }
    omp_set_num_threads(std::max(threads, 1));
  }
  Device device() const override { return Device{}; }
  std::string name() const override { return fp8_activations_ ? "cpu (FP8 activations)" : "cpu"; }
  DType activation_dtype() const override { return DType::F32; }

  size_t free_memory_bytes() const override {
    return static_cast<size_t>(sysconf(_SC_AVPHYS_PAGES)) * static_cast<size_t>(sysconf(_SC_PAGESIZE));
  }

  Tensor empty(DType dtype, Shape shape) override { return Tensor::host(dtype, std::move(shape)); }

  Tensor place_vector(const Tensor& host) override {
    Tensor out = Tensor::host(DType::F32, host.shape());
    convert_to_f32(host.dtype(), host.raw(), out.data<float>(), static_cast<size_t>(host.numel()));
    return out;
  }

  LinearWeight place_linear(const Tensor& weight, const Tensor& scale_inv, int64_t block_out,
                            int64_t block_in) override {
    DILU_CHECK(weight.rank() == 2, "linear weight must be a matrix, got ", shape_str(weight.shape()));
    LinearWeight w;
    w.weight = weight;  // stays in the checkpoint's mapping; rows are converted inside linear()
    if (weight.dtype() == DType::F8E4M3) {
      DILU_CHECK(block_out > 0 && block_in > 0 && scale_inv.rank() == 2, "FP8 weight without block scale");
      w.scale_inv = place_vector(scale_inv);  // F32 [ceil(out/bo), ceil(in/bi)]
      w.block_out = block_out;
      w.block_in = block_in;
    }
    return w;
  }

  Tensor place_embedding(const Tensor& host) override { return host; }

  Tensor dequantize(const LinearWeight& w) override {
    Tensor out = Tensor::host(DType::F32, {w.out_features(), w.in_features()});
    float* o = out.data<float>();
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < w.out_features(); ++j) weight_row(w, j, o + j * w.in_features());
    return out;
  }

  void copy_to_host(const Tensor& src, void* dst) override { std::memcpy(dst, src.raw(), src.nbytes()); }
  void copy_from_host(const void* src, Tensor& dst) override { std::memcpy(dst.raw(), src, dst.nbytes()); }
  void copy(const Tensor& src, Tensor& dst) override {
    DILU_CHECK(src.dtype() == dst.dtype() && src.nbytes() == dst.nbytes(), "copy of ", shape_str(src.shape()), " into ",
               shape_str(dst.shape()));
    std::memcpy(dst.raw(), src.raw(), src.nbytes());
  }

  void embedding(const Tensor& table, std::span<const int32_t> ids, Tensor& out, int64_t first_id) override {
    check_f32(out, "embedding output");
    const int64_t d = table.dim(1);
    DILU_CHECK(out.dim(0) == static_cast<int64_t>(ids.size()) && out.dim(1) == d, "embedding shapes");
    const size_t esz = dtype_size(table.dtype());
    for (size_t t = 0; t < ids.size(); ++t) {
      float* dst = out.data<float>() + static_cast<int64_t>(t) * d;
      const int64_t row = ids[t] - first_id;
      if (row < 0 || row >= table.dim(0)) {
        std::fill(dst, dst + d, 0.0f);
        continue;
      }
      const auto* src = static_cast<const uint8_t*>(table.raw()) + static_cast<size_t>(row * d) * esz;
      convert_to_f32(table.dtype(), src, dst, static_cast<size_t>(d));
    }
  }

  void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& out) override {
    check_f32(x, "rms_norm input");
    check_f32(w, "rms_norm weight");
    check_f32(out, "rms_norm output");
    const int64_t d = w.numel(), width = x.dim(-1), rows = x.numel() / width;
    DILU_CHECK(d <= width && out.numel() == x.numel() && out.dim(-1) == width, "rms_norm: x ", shape_str(x.shape()),
               ", w ", shape_str(w.shape()), ", out ", shape_str(out.shape()));
    const float* xp = x.data<float>();
    const float* wp = w.data<float>();
    float* op = out.data<float>();
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = xp + r * width;
      float* orow = op + r * width;
      const float inv = 1.0f / std::sqrt(dot(xr, xr, d) / static_cast<float>(d) + eps);
      for (int64_t i = 0; i < d; ++i) orow[i] = wp[i] * (xr[i] * inv);
    }
  }

  void gather_rows(const Tensor& x, std::span<const int32_t> rows, Tensor& out) override {
    check_f32(x, "gather input");
    check_f32(out, "gather output");
    const int64_t width = x.dim(1);
    DILU_CHECK(out.dim(0) == static_cast<int64_t>(rows.size()) && out.dim(1) == width, "gather shapes");
    for (size_t i = 0; i < rows.size(); ++i) {
      DILU_CHECK(rows[i] >= 0 && rows[i] < x.dim(0), "gather row ", rows[i]);
      std::memcpy(out.data<float>() + static_cast<int64_t>(i) * width, x.data<float>() + rows[i] * width,
                  static_cast<size_t>(width) * sizeof(float));
    }
  }

  void add(Tensor& x, const Tensor& y) override {
    check_f32(x, "add destination");
    check_f32(y, "add source");
    DILU_CHECK(x.numel() == y.numel(), "add shapes ", shape_str(x.shape()), " and ", shape_str(y.shape()));
    float* a = x.data<float>();
    const float* b = y.data<float>();
    for (int64_t i = 0; i < x.numel(); ++i) a[i] += b[i];
  }

  void linear(const Tensor& x, const LinearWeight& w, Tensor& out) override {
    check_f32(x, "linear input");
    check_f32(out, "linear output");
    const int64_t t_count = x.dim(0), in = w.in_features(), n_out = w.out_features();
    DILU_CHECK(x.dim(1) == in && out.dim(0) == t_count && out.dim(1) == n_out, "linear: x ", shape_str(x.shape()),
               ", W ", shape_str(w.weight.shape()), ", out ", shape_str(out.shape()));
    const float* xp = x.data<float>();
    float* op = out.data<float>();
    const bool is_f32 = w.weight.dtype() == DType::F32;
    // The CUDA block-scaled FP8 path's input rounding (same eligibility as there).
    std::vector<float> xq;
    if (fp8_activations_ && w.weight.dtype() == DType::F8E4M3 && w.block_out == 128 && w.block_in == 128 &&
        in % 128 == 0 && n_out % 16 == 0) {
      xq.assign(xp, xp + t_count * in);
      for (int64_t g = 0; g < t_count * in; g += 128) {
        float amax = 0.0f;
        for (int64_t i = g; i < g + 128; ++i) amax = std::max(amax, std::fabs(xq[static_cast<size_t>(i)]));
        const float scale = amax > 0.0f ? amax / 448.0f : 1.0f;
        for (int64_t i = g; i < g + 128; ++i) {
          const uint8_t q = f32_to_fp8e4m3(xq[static_cast<size_t>(i)] / scale);
          float v = 0.0f;
          convert_to_f32(DType::F8E4M3, &q, &v, 1);
          xq[static_cast<size_t>(i)] = v * scale;
        }
      }
      xp = xq.data();
    }
    // Each weight row is converted once per step and used for every token: weights are read
    // once per step, whatever the batch.
#pragma omp parallel
    {
      std::vector<float> row(is_f32 ? 0 : static_cast<size_t>(in));
#pragma omp for schedule(static)
      for (int64_t j = 0; j < n_out; ++j) {
        const float* wr;
        if (is_f32) {
          wr = w.weight.data<float>() + j * in;
        } else {
          weight_row(w, j, row.data());
          wr = row.data();
        }
        for (int64_t t = 0; t < t_count; ++t) op[t * n_out + j] = dot(xp + t * in, wr, in);
      }
    }
  }

  void silu_mul(const Tensor& gate, const Tensor& up, Tensor& out) override {
    check_f32(gate, "silu_mul gate");
    check_f32(up, "silu_mul up");
    check_f32(out, "silu_mul output");
    DILU_CHECK(gate.numel() == up.numel() && out.numel() == up.numel(), "silu_mul shapes");
    const float* g = gate.data<float>();
    const float* u = up.data<float>();
    float* o = out.data<float>();
    for (int64_t i = 0; i < gate.numel(); ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }

  void rope(Tensor& x, int64_t offset, std::span<const int32_t> pos, std::span<const float> inv_freq,
            float attention_factor) override {
    check_f32(x, "rope input");
    DILU_CHECK(x.rank() == 3 && x.dim(0) == static_cast<int64_t>(pos.size()) &&
                   offset + 2 * static_cast<int64_t>(inv_freq.size()) <= x.dim(2),
               "rope: x ", shape_str(x.shape()), " offset ", offset);
    const int64_t n = x.dim(1), width = x.dim(2), half = static_cast<int64_t>(inv_freq.size());
    float* xp = x.data<float>();
    std::vector<float> cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
    for (size_t t = 0; t < pos.size(); ++t) {
      // As the reference: freqs = pos * inv_freq in FP32, then cos/sin times the attention factor.
      for (int64_t i = 0; i < half; ++i) {
        const float f = static_cast<float>(pos[t]) * inv_freq[static_cast<size_t>(i)];
        cs[static_cast<size_t>(i)] = std::cos(f) * attention_factor;
        sn[static_cast<size_t>(i)] = std::sin(f) * attention_factor;
      }
      for (int64_t r = 0; r < n; ++r) {
        float* v = xp + (static_cast<int64_t>(t) * n + r) * width + offset;
        for (int64_t i = 0; i < half; ++i) {
          const float a = v[2 * i], b = v[2 * i + 1];
          v[2 * i] = a * cs[static_cast<size_t>(i)] - b * sn[static_cast<size_t>(i)];
          v[2 * i + 1] = b * cs[static_cast<size_t>(i)] + a * sn[static_cast<size_t>(i)];
        }
      }
    }
  }

  void cache_write(Tensor& cache, const Tensor& entry, const AttentionLayout& layout) override {
    check_f32(cache, "kv cache");
    check_f32(entry, "kv cache entry");
    const int64_t width = cache.dim(2), slots = cache.dim(0) * cache.dim(1);
    DILU_CHECK(entry.dim(1) == width && entry.dim(0) == static_cast<int64_t>(layout.token_slot.size()),
               "cache_write shapes");
    for (size_t t = 0; t < layout.token_slot.size(); ++t) {
      const int64_t slot = layout.token_slot[t];
      DILU_CHECK(slot >= 0 && slot < slots, "cache slot ", slot, " outside ", slots);
      std::memcpy(cache.data<float>() + slot * width, entry.data<float>() + static_cast<int64_t>(t) * width,
                  static_cast<size_t>(width) * sizeof(float));
    }
  }

  void mla_attention(const Tensor& q, const MlaWeight& kv_b, const Tensor& cache, const AttentionLayout& layout,
                     const MlaParams& p, Tensor& out) override {
    const Tensor& w_kv_b = kv_b.w;
    check_f32(q, "mla query");
    check_f32(w_kv_b, "mla kv_b weight");
    check_f32(cache, "kv cache");
    check_f32(out, "mla output");
    const int64_t t_count = q.dim(0), h = p.num_heads, nope = p.qk_nope_head_dim, r = p.qk_rope_head_dim,
                  c = p.kv_lora_rank, v = p.v_head_dim, width = c + r, bs = layout.block_size;
    DILU_CHECK(q.rank() == 3 && q.dim(1) == h && q.dim(2) == nope + r, "mla q ", shape_str(q.shape()));
    DILU_CHECK(w_kv_b.dim(0) == h * (nope + v) && w_kv_b.dim(1) == c, "mla kv_b ", shape_str(w_kv_b.shape()));
    DILU_CHECK(cache.dim(2) == width && cache.dim(1) == bs, "mla cache ", shape_str(cache.shape()));
    DILU_CHECK(out.dim(0) == t_count && out.dim(1) == h * v, "mla out ", shape_str(out.shape()));
    const float* qp = q.data<float>();
    const float* wp = w_kv_b.data<float>();
    const float* kv = cache.data<float>();
    float* op = out.data<float>();
#pragma omp parallel
    {
      std::vector<float> q_lat(static_cast<size_t>(c)), o_lat(static_cast<size_t>(c)), scores;
#pragma omp for collapse(2) schedule(dynamic)
      for (int64_t t = 0; t < t_count; ++t) {
        for (int64_t head = 0; head < h; ++head) {
          const float* qh = qp + (t * h + head) * (nope + r);
          const float* w_uk = wp + head * (nope + v) * c;  // [nope, C]
          const float* w_uv = w_uk + nope * c;             // [v, C]
          // Absorb W_UK into the query: q_lat = q_nope @ W_UK  [C]
          std::fill(q_lat.begin(), q_lat.end(), 0.0f);
          for (int64_t i = 0; i < nope; ++i) {
            const float qi = qh[i];
            const float* wrow = w_uk + i * c;
#pragma omp simd
            for (int64_t k = 0; k < c; ++k) q_lat[static_cast<size_t>(k)] += qi * wrow[k];
          }
          const int32_t seq = layout.token_seq[static_cast<size_t>(t)];
          const int64_t ctx = layout.token_pos[static_cast<size_t>(t)] + 1;
          const auto& blocks = layout.block_tables[static_cast<size_t>(seq)];
          DILU_CHECK(static_cast<int64_t>(blocks.size()) * bs >= ctx, "block table too short for position ", ctx - 1);
          scores.resize(static_cast<size_t>(ctx));
          float max_score = -std::numeric_limits<float>::infinity();
          for (int64_t j = 0; j < ctx; ++j) {
            const float* e = kv + (static_cast<int64_t>(blocks[static_cast<size_t>(j / bs)]) * bs + j % bs) * width;
            const float s = (dot(q_lat.data(), e, c) + dot(qh + nope, e + c, r)) * p.softmax_scale;
            scores[static_cast<size_t>(j)] = s;
            max_score = std::max(max_score, s);
          }
          float denom = 0.0f;
          for (float& s : scores) {
            s = std::exp(s - max_score);
            denom += s;
          }
          std::fill(o_lat.begin(), o_lat.end(), 0.0f);
          for (int64_t j = 0; j < ctx; ++j) {
            const float* e = kv + (static_cast<int64_t>(blocks[static_cast<size_t>(j / bs)]) * bs + j % bs) * width;
            const float pj = scores[static_cast<size_t>(j)] / denom;
#pragma omp simd
            for (int64_t k = 0; k < c; ++k) o_lat[static_cast<size_t>(k)] += pj * e[k];
          }
          // Absorb W_UV into the output: out_h = W_UV @ o_lat  [v]
          float* oh = op + t * h * v + head * v;
          for (int64_t i = 0; i < v; ++i) oh[i] = dot(w_uv + i * c, o_lat.data(), c);
        }
      }
    }
  }

  void moe_route(const Tensor& x, const Tensor& gate, const Tensor& bias, const RouterParams& p, Tensor& ids,
                 Tensor& weights) override {
    check_f32(x, "router input");
    check_f32(gate, "router weight");
    const int64_t t_count = x.dim(0), d = x.dim(1), e_count = p.num_experts, k = p.top_k;
    const int64_t per_group = e_count / p.n_group;
    DILU_CHECK(gate.dim(0) == e_count && gate.dim(1) == d, "router weight ", shape_str(gate.shape()));
    DILU_CHECK(ids.dtype() == DType::I32 && ids.dim(0) == t_count && ids.dim(1) == k, "router ids");
    check_f32(weights, "router weights");
    const float* bp = bias.defined() && bias.numel() > 0 ? bias.data<float>() : nullptr;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < t_count; ++t) {
      std::vector<float> scores(static_cast<size_t>(e_count)), choice(static_cast<size_t>(e_count));
      for (int64_t e = 0; e < e_count; ++e) {
        const float logit = dot(x.data<float>() + t * d, gate.data<float>() + e * d, d);
        scores[static_cast<size_t>(e)] = 1.0f / (1.0f + std::exp(-logit));
        choice[static_cast<size_t>(e)] = scores[static_cast<size_t>(e)] + (bp ? bp[e] : 0.0f);
      }
      // Group score: sum of the group's two best biased scores; keep the topk_group best groups.
      std::vector<float> group_score(static_cast<size_t>(p.n_group));
      for (int64_t g = 0; g < p.n_group; ++g) {
        std::vector<float> s(choice.begin() + g * per_group, choice.begin() + (g + 1) * per_group);
        std::partial_sort(s.begin(), s.begin() + 2, s.end(), std::greater<float>());
        group_score[static_cast<size_t>(g)] = s[0] + s[1];
      }
      std::vector<int64_t> groups(static_cast<size_t>(p.n_group));
      std::iota(groups.begin(), groups.end(), 0);
      std::stable_sort(groups.begin(), groups.end(), [&](int64_t a, int64_t b) {
        return group_score[static_cast<size_t>(a)] > group_score[static_cast<size_t>(b)];
      });
      std::vector<bool> keep(static_cast<size_t>(p.n_group), false);
      for (int64_t g = 0; g < p.topk_group; ++g) keep[static_cast<size_t>(groups[static_cast<size_t>(g)])] = true;
      // Experts of dropped groups cannot be chosen (transformers 5 and DeepSeek's code mask
      // them with -inf; the configuration guarantees top_k experts remain).
      for (int64_t e = 0; e < e_count; ++e)
        if (!keep[static_cast<size_t>(e / per_group)]) choice[static_cast<size_t>(e)] = -std::numeric_limits<float>::infinity();
      std::vector<int64_t> order(static_cast<size_t>(e_count));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return choice[static_cast<size_t>(a)] > choice[static_cast<size_t>(b)];
      });
      int32_t* id_row = ids.data<int32_t>() + t * k;
      float* w_row = weights.data<float>() + t * k;
      float sum = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        id_row[j] = static_cast<int32_t>(order[static_cast<size_t>(j)]);
        w_row[j] = scores[static_cast<size_t>(order[static_cast<size_t>(j)])];
        sum += w_row[j];
      }
      for (int64_t j = 0; j < k; ++j) {
        if (p.norm_topk_prob) w_row[j] /= (sum + 1e-20f);
        w_row[j] *= p.routed_scaling_factor;
      }
    }
  }

  void moe_experts(const Tensor& x, std::span<const ExpertWeights> experts, const Tensor& ids, const Tensor& weights,
                   Tensor& out, int64_t first_expert, const Tensor* addend) override {
    check_f32(x, "experts input");
    check_f32(out, "experts output");
    if (addend) {
      check_f32(*addend, "experts addend");
      DILU_CHECK(addend->numel() == out.numel(), "moe_experts addend shape");
    }
    const int64_t t_count = x.dim(0), d = x.dim(1), k = ids.dim(1);
    std::fill(out.data<float>(), out.data<float>() + out.numel(), 0.0f);
    // Tokens routed to each expert, in token order.
    std::vector<std::vector<std::pair<int64_t, float>>> routed(experts.size());
    for (int64_t t = 0; t < t_count; ++t)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = ids.data<int32_t>()[t * k + j] - first_expert;
        if (e < 0 || static_cast<size_t>(e) >= experts.size()) continue;  // another rank's expert
        routed[static_cast<size_t>(e)].push_back({t, weights.data<float>()[t * k + j]});
      }
    for (size_t e = 0; e < experts.size(); ++e) {
      const auto& toks = routed[e];
      if (toks.empty()) continue;
      ++routed_experts_;
      const int64_t n = static_cast<int64_t>(toks.size()), f = experts[e].gate.out_features();
      Tensor xe = Tensor::host(DType::F32, {n, d}), g = Tensor::host(DType::F32, {n, f}),
             u = Tensor::host(DType::F32, {n, f}), y = Tensor::host(DType::F32, {n, d});
      for (int64_t i = 0; i < n; ++i)
        std::memcpy(xe.data<float>() + i * d, x.data<float>() + toks[static_cast<size_t>(i)].first * d,
                    static_cast<size_t>(d) * sizeof(float));
      linear(xe, experts[e].gate, g);
      linear(xe, experts[e].up, u);
      silu_mul(g, u, g);
      linear(g, experts[e].down, y);
      for (int64_t i = 0; i < n; ++i) {
        float* o = out.data<float>() + toks[static_cast<size_t>(i)].first * d;
        const float wgt = toks[static_cast<size_t>(i)].second;
        const float* yr = y.data<float>() + i * d;
        for (int64_t c = 0; c < d; ++c) o[c] += yr[c] * wgt;
      }
    }
    if (addend) add(out, *addend);
  }

  void concat_columns(const Tensor& parts, Tensor& out) override {
    check_f32(parts, "concat parts");
    check_f32(out, "concat output");
    const int64_t p_count = parts.dim(0), n = parts.dim(1), wp = parts.dim(2), w = out.dim(1);
    DILU_CHECK(out.dim(0) == n && p_count * wp >= w, "concat_columns: parts ", shape_str(parts.shape()), ", out ",
               shape_str(out.shape()));
    for (int64_t p = 0; p < p_count; ++p)
      for (int64_t i = 0; i < n; ++i) {
        const int64_t cols = std::min(wp, w - p * wp);
        if (cols <= 0) continue;
        std::memcpy(out.data<float>() + i * w + p * wp, parts.data<float>() + (p * n + i) * wp,
                    static_cast<size_t>(cols) * sizeof(float));
      }
  }

  Tensor random_fill(DType dtype, Shape shape, uint64_t key, float center, float half_width) override {
    Tensor out = Tensor::host(dtype, std::move(shape));
    const int64_t n = out.numel();
    DILU_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F8E4M3, "random_fill of ",
               dtype_name(dtype));
#pragma omp parallel for schedule(static) if (n >= (1 << 18))
    for (int64_t i = 0; i < n; ++i) {
      const float v = random_fill_value(key, static_cast<uint64_t>(i), center, half_width);
      if (dtype == DType::F32) out.data<float>()[i] = v;
      else if (dtype == DType::BF16) out.data<uint16_t>()[i] = f32_to_bf16(v);
      else out.data<uint8_t>()[i] = f32_to_fp8e4m3(v);
    }
    return out;
  }

  int64_t take_routed_expert_count() override { return std::exchange(routed_experts_, 0); }

  double measure_copy_bandwidth(size_t bytes) override {
    std::vector<uint8_t> a(bytes, 1), b(bytes);
    const auto t0 = std::chrono::steady_clock::now();
    constexpr int kReps = 3;
    for (int r = 0; r < kReps; ++r) std::memcpy(b.data(), a.data(), bytes);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return 2.0 * static_cast<double>(bytes) * kReps / dt;
  }

  std::vector<int32_t> argmax(const Tensor& logits) override {
    check_f32(logits, "logits");
    const int64_t n = logits.dim(0), v = logits.dim(1);
    std::vector<int32_t> out(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const float* row = logits.data<float>() + i * v;
      out[static_cast<size_t>(i)] = static_cast<int32_t>(std::max_element(row, row + v) - row);
    }
    return out;
  }

 private:
  bool fp8_activations_ = false;
  int64_t routed_experts_ = 0;
};

}  // namespace

std::unique_ptr<Ops> make_cpu_ops(int threads, bool fp8_activations) {
  return std::make_unique<CpuOps>(threads, fp8_activations);
}

}  // namespace dilu
