// DeepSeek-V3 weights check, placement and forward pass (see deepseek_v3.h).
#include "engine/deepseek_v3.h"

#include <cstring>
#include <iostream>
#include <unordered_set>

#include "engine/kv_cache.h"
#include "engine/weight_names.h"

namespace dilu {

namespace {

bool is_float(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

}  // namespace

std::vector<std::string> check_checkpoint(const ModelConfig& config, const Checkpoint& checkpoint) {
  std::vector<std::string> problems;
  std::unordered_set<std::string> expected;
  for (const WeightSpec& spec : model_weight_specs(config)) {
    if (problems.size() >= kCheckpointProblemsMax) return problems;
    expected.insert(spec.name);
    if (!checkpoint.contains(spec.name)) {
      problems.push_back("missing tensor '" + spec.name + "' (expected shape " + shape_str(spec.shape) + ")");
      continue;
    }
    const TensorInfo& t = checkpoint.info(spec.name);
    if (t.shape != spec.shape)
      problems.push_back("tensor '" + spec.name + "' has shape " + shape_str(t.shape) + " but config.json implies " +
                         shape_str(spec.shape));
    if (t.dtype == DType::F8E4M3) {
      if (!spec.fp8_in_r1) {
        problems.push_back("tensor '" + spec.name + "' is F8_E4M3, but DeepSeek-V3 keeps it in a float type");
      } else if (!config.quantization) {
        problems.push_back("tensor '" + spec.name +
                           "' is F8_E4M3 but config.json has no quantization_config (quant_method fp8)");
      } else {
        const std::string s = scale_name(spec.name);
        expected.insert(s);
        if (!checkpoint.contains(s)) {
          problems.push_back("FP8 tensor '" + spec.name + "' has no block scale '" + s + "'");
        } else {
          const TensorInfo& si = checkpoint.info(s);
          Shape want = spec.shape.size() == 2 ? scale_shape(spec.shape, *config.quantization) : Shape{};
          if (si.shape != want)
            problems.push_back("block scale '" + s + "' has shape " + shape_str(si.shape) + ", expected " +
                               shape_str(want) + " for weight_block_size [" +
                               std::to_string(config.quantization->block_out) + ", " +
                               std::to_string(config.quantization->block_in) + "]");
          if (!is_float(si.dtype))
            problems.push_back("block scale '" + s + "' has dtype " + std::string(dtype_name(si.dtype)));
        }
      }
    } else if (!is_float(t.dtype)) {
      problems.push_back("tensor '" + spec.name + "' has dtype " + std::string(dtype_name(t.dtype)) +
                         "; expected F32, BF16, F16 or F8_E4M3");
    }
  }
  for (const std::string& name : checkpoint.names()) {
    if (problems.size() >= kCheckpointProblemsMax) break;
    if (expected.count(name)) continue;
    if (layer_of(name) >= config.num_hidden_layers) continue;  // MTP layers: skipped on purpose
    problems.push_back("unexpected tensor '" + name + "' (not part of a model with this config.json)");
  }
  return problems;
}

namespace {

// A checkpoint tensor in host memory: itself (a view of the memory map), or a copy of one that
// lives on the device (random weights made there, Checkpoint::synthetic).
Tensor on_host(Ops& ops, const Tensor& t) {
  if (t.is_cpu()) return t;
  Tensor h = Tensor::host(t.dtype(), t.shape());
  ops.copy_to_host(t, h.raw());
  return h;
}

// Rows [r0, r1) and columns [c0, c1) of a checkpoint matrix, exactly dequantized to FP32 on the
// host. Only those rows' bytes are touched in the memory map.
Tensor dequantize_slice(Ops& ops, const Checkpoint& ckpt, const std::string& name, int64_t r0, int64_t r1, int64_t c0,
                        int64_t c1, const std::optional<FP8Quantization>& q) {
  const Tensor w = on_host(ops, ckpt.tensor(name));
  const int64_t cols = w.dim(1);
  DILU_CHECK(0 <= r0 && r0 <= r1 && r1 <= w.dim(0) && 0 <= c0 && c0 <= c1 && c1 <= cols, "slice of ", name);
  Tensor out = Tensor::host(DType::F32, {r1 - r0, c1 - c0});
  const size_t esz = dtype_size(w.dtype());
  Tensor scale;
  if (w.dtype() == DType::F8E4M3) scale = on_host(ops, ckpt.tensor(scale_name(name)));
  std::vector<float> scale_row;
  for (int64_t r = r0; r < r1; ++r) {
    float* dst = out.data<float>() + (r - r0) * (c1 - c0);
    const auto* src = static_cast<const uint8_t*>(w.raw()) + static_cast<size_t>(r * cols + c0) * esz;
    convert_to_f32(w.dtype(), src, dst, static_cast<size_t>(c1 - c0));
    if (w.dtype() == DType::F8E4M3) {
      const int64_t sc = scale.dim(1);
      scale_row.resize(static_cast<size_t>(sc));
      const auto* srow = static_cast<const uint8_t*>(scale.raw()) +
                         static_cast<size_t>((r / q->block_out) * sc) * dtype_size(scale.dtype());
      convert_to_f32(scale.dtype(), srow, scale_row.data(), static_cast<size_t>(sc));
      for (int64_t c = c0; c < c1; ++c) dst[c - c0] *= scale_row[static_cast<size_t>(c / q->block_in)];
    }
  }
  return out;
}

}  // namespace

namespace {
int64_t bytes_of(const LinearWeight& w) { return static_cast<int64_t>(w.weight.nbytes() + w.scale_inv.nbytes()); }
int64_t bytes_of(const ExpertWeights& e) { return bytes_of(e.gate) + bytes_of(e.up) + bytes_of(e.down); }
}  // namespace

DeepseekV3::DeepseekV3(const ModelConfig& config, const Checkpoint& ckpt, Ops& ops, TensorParallel tp,
                       PipelineStage stage)
    : config_(config), ops_(ops), tp_(tp), rope_(make_rope_table(config)) {
  const int64_t end_layer = stage.end_layer < 0 ? config.num_hidden_layers : stage.end_layer;
  DILU_CHECK(0 <= stage.first_layer && stage.first_layer < end_layer && end_layer <= config.num_hidden_layers,
             "bad pipeline stage [", stage.first_layer, ", ", end_layer, ")");
  first_stage_ = stage.is_first();
  last_stage_ = end_layer == config.num_hidden_layers;
  std::vector<std::string> problems = check_checkpoint(config, ckpt);
  if (!problems.empty()) {
    std::string msg = "checkpoint " + ckpt.dir().string() + " does not match its config.json (" +
                      std::to_string(problems.size()) +
                      (problems.size() >= kCheckpointProblemsMax ? " problems; the check stops there" : " problem(s)") +
                      "):";
    const size_t shown = std::min<size_t>(problems.size(), 50);
    for (size_t i = 0; i < shown; ++i) msg += "\n  " + problems[i];
    if (shown < problems.size()) msg += "\n  ... and " + std::to_string(problems.size() - shown) + " more";
    throw UserError(msg + "\nUse a complete checkpoint whose config.json describes it.");
  }
  const int64_t n = tp.size, r = tp.rank;
  DILU_CHECK(n >= 1 && r >= 0 && r < n && (n == 1 || tp.comm != nullptr), "bad tensor-parallel shard");
  auto divisible = [&](const char* field, int64_t v) {
    DILU_USER_CHECK(v % n == 0, "parallel.tp = ", n, " must divide the model's ", field, " (", v,
                    "); choose a tensor-parallel size that divides it");
  };
  divisible("num_attention_heads", config.num_attention_heads);
  if (n > 1) {
    divisible("intermediate_size", config.intermediate_size);
    if (config.n_routed_experts > 0) {
      divisible("n_routed_experts", config.n_routed_experts);
      divisible("moe_intermediate_size x n_shared_experts", config.moe_intermediate_size * config.n_shared_experts);
    }
  }
  local_heads_ = config.num_attention_heads / n;
  vocab_shard_ = (config.vocab_size + n - 1) / n;
  vocab_first_ = r * vocab_shard_;

  int64_t mtp_tensors = 0;
  for (const std::string& name : ckpt.names()) mtp_tensors += layer_of(name) >= config.num_hidden_layers;
  if (mtp_tensors > 0 && r == 0)
    std::cerr << "dilu: skipping " << mtp_tensors << " tensors of the multi-token-prediction layer(s) (layer index >= "
              << config.num_hidden_layers << "); dilu decodes without speculative MTP\n";

  const int64_t block_out = config.quantization ? config.quantization->block_out : 0;
  const int64_t block_in = config.quantization ? config.quantization->block_in : 0;
  auto vec = [&](const std::string& name) { return ops.place_vector(ckpt.tensor(name)); };
  auto lin = [&](const std::string& name) {
    Tensor w = ckpt.tensor(name);
    Tensor s = w.dtype() == DType::F8E4M3 ? ckpt.tensor(scale_name(name)) : Tensor();
    return ops.place_linear(w, s, block_out, block_in);
  };
  // Shards: this rank's rows (column-parallel) or columns (row-parallel) of a matrix, kept in
  // the checkpoint's dtype (rows: a view of the memory map; columns: a copy of just those bytes)
  // when the cut falls on a block-scale boundary, else exactly dequantized to FP32.
  auto lin_rows = [&](const std::string& name, int64_t rows_per_rank) {
    if (n == 1) return lin(name);
    const int64_t r0 = r * rows_per_rank, r1 = r0 + rows_per_rank;
    const Tensor w = ckpt.tensor(name);
    if (w.dtype() != DType::F8E4M3) return ops.place_linear(w.rows(r0, r1), Tensor(), 0, 0);
    if (r0 % block_out == 0) {
      const Tensor scale = ckpt.tensor(scale_name(name));
      return ops.place_linear(w.rows(r0, r1), scale.rows(r0 / block_out, (r1 + block_out - 1) / block_out), block_out,
                              block_in);
    }
    const int64_t cols = w.dim(1);
    return ops.place_linear(dequantize_slice(ops, ckpt, name, r0, r1, 0, cols, config.quantization), Tensor(), 0, 0);
  };
  auto lin_cols = [&](const std::string& name, int64_t cols_per_rank) {
    if (n == 1) return lin(name);
    const int64_t c0 = r * cols_per_rank, c1 = c0 + cols_per_rank;
    const Tensor w = on_host(ops, ckpt.tensor(name));
    const int64_t rows = w.dim(0), cols = w.dim(1);
    const bool fp8 = w.dtype() == DType::F8E4M3;
    if (fp8 && c0 % block_in != 0)
      return ops.place_linear(dequantize_slice(ops, ckpt, name, 0, rows, c0, c1, config.quantization), Tensor(), 0, 0);
    const size_t esz = dtype_size(w.dtype());
    Tensor part = Tensor::host(w.dtype(), {rows, c1 - c0});
    for (int64_t i = 0; i < rows; ++i)
      std::memcpy(static_cast<uint8_t*>(part.raw()) + static_cast<size_t>(i * (c1 - c0)) * esz,
                  static_cast<const uint8_t*>(w.raw()) + static_cast<size_t>(i * cols + c0) * esz,
                  static_cast<size_t>(c1 - c0) * esz);
    if (!fp8) return ops.place_linear(part, Tensor(), 0, 0);
    const Tensor scale = on_host(ops, ckpt.tensor(scale_name(name)));
    const int64_t s0 = c0 / block_in, s1 = (c1 + block_in - 1) / block_in, sc = scale.dim(1);
    Tensor part_scale = Tensor::host(DType::F32, {scale.dim(0), s1 - s0});
    std::vector<float> row(static_cast<size_t>(sc));
    for (int64_t i = 0; i < scale.dim(0); ++i) {
      convert_to_f32(scale.dtype(), static_cast<const uint8_t*>(scale.raw()) + static_cast<size_t>(i * sc) * dtype_size(scale.dtype()),
                     row.data(), static_cast<size_t>(sc));
      std::memcpy(part_scale.data<float>() + i * (s1 - s0), row.data() + s0, static_cast<size_t>(s1 - s0) * sizeof(float));
    }
    return ops.place_linear(part, part_scale, block_out, block_in);
  };
  auto swiglu = [&](const std::string& prefix) {
    return ExpertWeights{lin(prefix + "gate_proj.weight"), lin(prefix + "up_proj.weight"),
                         lin(prefix + "down_proj.weight")};
  };
  auto swiglu_sharded = [&](const std::string& prefix, int64_t width) {
    return ExpertWeights{lin_rows(prefix + "gate_proj.weight", width / n), lin_rows(prefix + "up_proj.weight", width / n),
                         lin_cols(prefix + "down_proj.weight", width / n)};
  };

  if (first_stage_) {
    const Tensor embed = ckpt.tensor("model.embed_tokens.weight");
    embed_tokens_ = ops.place_embedding(embed.rows(std::min(vocab_first_, config.vocab_size),
                                                   std::min(vocab_first_ + vocab_shard_, config.vocab_size)));
  }
  const int64_t qk = config.qk_head_dim(), kv_b_rows = config.qk_nope_head_dim + config.v_head_dim;
  for (int64_t l = stage.first_layer; l < end_layer; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const std::string a = p + "self_attn.";
    LayerWeights lw;
    lw.input_layernorm = vec(p + "input_layernorm.weight");
    lw.post_attention_layernorm = vec(p + "post_attention_layernorm.weight");
    if (config.q_lora_rank) {
      lw.attn.q_a_proj = lin(a + "q_a_proj.weight");
      lw.attn.q_a_layernorm = vec(a + "q_a_layernorm.weight");
      lw.attn.q_b_proj = lin_rows(a + "q_b_proj.weight", local_heads_ * qk);
    } else {
      lw.attn.q_b_proj = lin_rows(a + "q_proj.weight", local_heads_ * qk);
    }
    lw.attn.kv_a_proj_with_mqa = lin(a + "kv_a_proj_with_mqa.weight");
    lw.attn.kv_a_layernorm = vec(a + "kv_a_layernorm.weight");
    lw.attn.kv_b = ops.place_mla_kv_b(lin_rows(a + "kv_b_proj.weight", local_heads_ * kv_b_rows), mla_params());
    lw.attn.o_proj = lin_cols(a + "o_proj.weight", local_heads_ * config.v_head_dim);
    lw.is_moe = config.is_moe_layer(l);
    if (lw.is_moe) {
      lw.router = vec(p + "mlp.gate.weight");
      if (ckpt.contains(p + "mlp.gate.e_score_correction_bias")) lw.router_bias = vec(p + "mlp.gate.e_score_correction_bias");
      const int64_t per_rank = config.n_routed_experts / n;
      first_expert_ = r * per_rank;
      for (int64_t e = first_expert_; e < first_expert_ + per_rank; ++e)
        lw.experts.push_back(swiglu(p + "mlp.experts." + std::to_string(e) + "."));
      if (config.n_shared_experts > 0)
        lw.shared_expert = swiglu_sharded(p + "mlp.shared_experts.", config.moe_intermediate_size * config.n_shared_experts);
    } else {
      lw.mlp = n == 1 ? swiglu(p + "mlp.") : swiglu_sharded(p + "mlp.", config.intermediate_size);
    }
    layers_.push_back(std::move(lw));
  }
  if (last_stage_) {
    norm_ = vec("model.norm.weight");
    const std::string head = config.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
    if (n == 1) {
      lm_head_ = ops.place_linear(ckpt.tensor(head), Tensor(), 0, 0);
    } else {
      // Every shard has ceil(V / tp) rows so that the logits gather evenly; the last one is
      // zero-padded past the vocabulary, and those columns are dropped after the gather.
      Tensor shard = Tensor::host(DType::F32, {vocab_shard_, config.hidden_size});
      const int64_t end = std::min(vocab_first_ + vocab_shard_, config.vocab_size);
      if (end > vocab_first_) {
        Tensor part = dequantize_slice(ops, ckpt, head, vocab_first_, end, 0, config.hidden_size, std::nullopt);
        std::memcpy(shard.raw(), part.raw(), part.nbytes());
      }
      lm_head_ = ops.place_linear(shard, Tensor(), 0, 0);
    }
  }
  for (const LayerWeights& lw : layers_)
    if (lw.is_moe) ops.prepare_experts(lw.experts);
  weight_bytes_ = static_cast<int64_t>(embed_tokens_.nbytes() + norm_.nbytes()) +
                  (lm_head_.weight.defined() && lm_head_.weight.rank() == 2 ? bytes_of(lm_head_) : 0);
  for (const LayerWeights& lw : layers_) {
    const AttentionWeights& a = lw.attn;
    weight_bytes_ += static_cast<int64_t>(lw.input_layernorm.nbytes() + lw.post_attention_layernorm.nbytes() +
                                          a.q_a_layernorm.nbytes() + a.kv_a_layernorm.nbytes() + a.kv_b.nbytes() +
                                          lw.router.nbytes() + lw.router_bias.nbytes());
    weight_bytes_ += (a.q_a_proj ? bytes_of(*a.q_a_proj) : 0) + bytes_of(a.q_b_proj) + bytes_of(a.kv_a_proj_with_mqa) +
                     bytes_of(a.o_proj) + (lw.is_moe ? 0 : bytes_of(lw.mlp)) +
                     (lw.shared_expert ? bytes_of(*lw.shared_expert) : 0);
    for (const ExpertWeights& e : lw.experts) weight_bytes_ += bytes_of(e);
  }
}

MlaParams DeepseekV3::mla_params() const {
  MlaParams p;
  p.num_heads = local_heads_;
  p.qk_nope_head_dim = config_.qk_nope_head_dim;
  p.qk_rope_head_dim = config_.qk_rope_head_dim;
  p.kv_lora_rank = config_.kv_lora_rank;
  p.v_head_dim = config_.v_head_dim;
  p.softmax_scale = static_cast<float>(config_.softmax_scale());
  return p;
}

int64_t DeepseekV3::step_scratch_bytes(const ModelConfig& c, int64_t max_tokens, int64_t max_logit_rows, int tp) {
  const int64_t d = c.hidden_size, h = c.num_attention_heads / tp, qk = c.qk_head_dim(), lat = c.kv_lora_rank,
                r = c.qk_rope_head_dim, k = c.num_experts_per_tok, e = c.n_routed_experts;
  const int64_t dense_f = c.intermediate_size / tp, shared_f = c.moe_intermediate_size * c.n_shared_experts / tp;
  // Every tensor one layer may hold at once, per token, in 4-byte words (an over-estimate: not
  // all of them are alive together): residual, norm output, sublayer output, GEMM input copies,
  // queries, q LoRA, cache entry, attention output, the latent query and output of MLA, the
  // dense or shared MLP, and the routed experts' rows (K per token).
  const int64_t words = 3 * d + 2 * d + h * qk + c.q_lora_rank.value_or(0) + lat + r + h * c.v_head_dim + 2 * h * lat +
                        2 * std::max(dense_f, shared_f) + d + e + 4 * k + 2 * k * c.moe_intermediate_size + k * d;
  const int64_t vocab_shard = (c.vocab_size + tp - 1) / tp;
  const int64_t logits = max_logit_rows * (c.vocab_size + (tp + 1) * vocab_shard + 2 * c.vocab_size);
  return 4 * (words * max_tokens + logits) + (int64_t{64} << 20);
}

void DeepseekV3::all_reduce(Tensor& t) {
  if (tp_.size > 1) tp_.comm->all_reduce_sum(t);
}

Tensor DeepseekV3::forward(const StepInput& step, KvCache& cache) {
  DILU_CHECK(first_stage_ && last_stage_, "forward() runs the whole model; a pipeline stage uses embed/run_layers/head");
  const int64_t t = static_cast<int64_t>(step.token_ids.size());
  if (graph_max_tokens_ > 0 && t > 0 && t <= graph_max_tokens_ && static_cast<int64_t>(step.logit_rows.size()) == t) {
    const uint64_t key = ops_.stage_step(step.token_ids, step.layout, step.logit_rows);
    if (key != 0) return forward_graph(key, step, cache);
  }
  return forward_eager(step, cache);
}

Tensor DeepseekV3::forward_eager(const StepInput& step, KvCache& cache) {
  Tensor x = embed(step);
  run_layers(x, step, cache);
  return head(x, step);
}

bool DeepseekV3::enable_graphs(int64_t max_tokens) {
  graph_max_tokens_ = 0;
  graphs_.clear();
  if (max_tokens < 1 || tp_.size != 1 || !first_stage_ || !last_stage_) return false;
  if (!ops_.enable_graphs(step_scratch_bytes(config_, max_tokens, max_tokens, 1))) return false;
  graph_max_tokens_ = max_tokens;
  return true;
}

// A shape's first step runs eagerly (it also makes the backend's one-time choices: GEMM
// algorithms, kernel attributes); the second is captured and replayed; later ones replay. A
// capture that fails (an op the backend cannot record) leaves that shape eager, with a warning.
Tensor DeepseekV3::forward_graph(uint64_t key, const StepInput& step, KvCache& cache) {
  // A replay skips the ops' own checks of the layout against the cache: they are made here.
  const int64_t bs = step.layout.block_size, blocks = cache.num_blocks();
  DILU_CHECK(bs == cache.block_size(), "step layout block size ", bs, " against the cache's ", cache.block_size());
  for (int64_t slot : step.layout.token_slot) DILU_CHECK(slot >= 0 && slot < blocks * bs, "cache slot ", slot);
  for (size_t i = 0; i < step.token_ids.size(); ++i) {
    const int32_t seq = step.layout.token_seq[i];
    DILU_CHECK(seq >= 0 && static_cast<size_t>(seq) < step.layout.block_tables.size(), "token sequence ", seq);
    const std::vector<int32_t>& table = step.layout.block_tables[static_cast<size_t>(seq)];
    DILU_CHECK(static_cast<int64_t>(table.size()) * bs > step.layout.token_pos[i], "block table too short for position ",
               step.layout.token_pos[i]);
  }
  for (const std::vector<int32_t>& table : step.layout.block_tables)
    for (int32_t b : table) DILU_CHECK(b >= 0 && b < blocks, "cache block ", b, " outside ", blocks);

  auto found = graphs_.find(key);
  if (found == graphs_.end()) {
    constexpr size_t kMaxGraphs = 64;  // batch shapes kept; a run past them starts over
    if (graphs_.size() >= kMaxGraphs) graphs_.clear();
    graphs_.emplace(key, StepGraph{});
    return forward_eager(step, cache);
  }
  StepGraph& g = found->second;
  if (g.failed) return forward_eager(step, cache);
  if (!g.exec) {
    try {
      ops_.begin_capture();
      Tensor logits = forward_eager(step, cache);
      g.exec = ops_.end_capture();
      g.logits = logits;
      ++graph_counts_.captured;
    } catch (const std::exception& e) {
      ops_.abort_capture();
      g = StepGraph{};
      g.failed = true;
      ++graph_counts_.failed;
      std::cerr << "dilu: capturing a decode step of " << step.token_ids.size()
                << " tokens as a graph failed, so steps of that shape run without one: " << e.what() << "\n";
      return forward_eager(step, cache);
    }
  }
  ops_.replay(g.exec);
  ++graph_counts_.replayed;
  return g.logits;
}

Tensor DeepseekV3::embed(const StepInput& step) {
  DILU_CHECK(first_stage_, "only the first pipeline stage embeds");
  Tensor x = ops_.empty(ops_.activation_dtype(), {static_cast<int64_t>(step.token_ids.size()), config_.hidden_size});
  ops_.embedding(embed_tokens_, step.token_ids, x, vocab_first_);
  all_reduce(x);  // each token's row comes from the one rank holding it; the others add zeros
  return x;
}

void DeepseekV3::run_layers(Tensor& x, const StepInput& step, KvCache& cache) {
  const ModelConfig& c = config_;
  const int64_t t_count = x.dim(0), d = c.hidden_size;
  const DType act = ops_.activation_dtype();
  Tensor h = ops_.empty(act, {t_count, d});  // normalized input of a sublayer [T, D]
  Tensor y = ops_.empty(act, {t_count, d});  // sublayer output [T, D]
  const float eps = static_cast<float>(c.rms_norm_eps);
  // Each sublayer's residual add is fused into the norm that follows it; the last one stands alone.
  for (int64_t l = 0; l < num_stage_layers(); ++l) {
    const LayerWeights& lw = layers_[static_cast<size_t>(l)];
    if (l == 0) ops_.rms_norm(x, lw.input_layernorm, eps, h);
    else ops_.add_rms_norm(x, y, lw.input_layernorm, eps, h);
    attention(l, h, step, cache, y);
    all_reduce(y);
    ops_.add_rms_norm(x, y, lw.post_attention_layernorm, eps, h);
    mlp(lw, h, y);
    all_reduce(y);
  }
  if (num_stage_layers() > 0) ops_.add(x, y);
}

Tensor DeepseekV3::head(const Tensor& x, const StepInput& step) {
  DILU_CHECK(last_stage_, "only the last pipeline stage has the head");
  const ModelConfig& c = config_;
  const int64_t n = static_cast<int64_t>(step.logit_rows.size()), d = c.hidden_size;
  Tensor last = ops_.empty(ops_.activation_dtype(), {n, d});
  ops_.gather_rows(x, step.logit_rows, last);
  ops_.rms_norm(last, norm_, static_cast<float>(c.rms_norm_eps), last);
  Tensor logits = ops_.empty(DType::F32, {n, c.vocab_size});
  if (tp_.size == 1) {
    ops_.linear(last, lm_head_, logits);
    return logits;
  }
  Tensor local = ops_.empty(DType::F32, {n, vocab_shard_});
  ops_.linear(last, lm_head_, local);
  Tensor parts = ops_.empty(DType::F32, {tp_.size, n, vocab_shard_});
  tp_.comm->all_gather(local, parts);
  ops_.concat_columns(parts, logits);
  return logits;
}

// Whether a step's independent chains run as side work (Ops::begin_side): up to 8 tokens.
// Measured on an H100 (docs/perf/r1-geometry-h100-side.md): with the shared expert joined before
// the routed experts, a step of one token gained 3% and steps of 2 and 4 tokens lost 2-3%. Since
// moe_experts waits for the shared expert only before its combine (session 29,
// docs/perf/r1-geometry-h100-host-phases.md), steps of 2, 4 and 8 tokens gain 2% with both side
// sections, and 16 tokens moved within noise.
namespace {
constexpr int64_t kSideWorkMaxTokens = 8;
bool side_work(int64_t tokens) { return tokens <= kSideWorkMaxTokens; }
}  // namespace

void DeepseekV3::attention(int64_t layer, const Tensor& x, const StepInput& step, KvCache& cache, Tensor& out) {
  const ModelConfig& c = config_;
  const AttentionWeights& w = layers_[static_cast<size_t>(layer)].attn;
  const int64_t t_count = x.dim(0), h = local_heads_, qk = c.qk_head_dim();
  const DType act = ops_.activation_dtype();
  const float eps = static_cast<float>(c.rms_norm_eps);

  // Queries: [T, H, nope + R], rope on the last R columns of each head. Cache entry per token:
  // [normalized latent (C) | rotated key (R)]. The two down-projections of x share one linear2.
  Tensor q = ops_.empty(act, {t_count, h * qk});
  Tensor entry = ops_.empty(act, {t_count, c.kv_lora_rank + c.qk_rope_head_dim});
  Tensor q_lat;
  if (w.q_a_proj) {
    q_lat = ops_.empty(act, {t_count, *c.q_lora_rank});
    ops_.linear2(x, *w.q_a_proj, q_lat, w.kv_a_proj_with_mqa, entry);
  } else {
    ops_.linear2(x, w.q_b_proj, q, w.kv_a_proj_with_mqa, entry);
  }
  // The cache entry's chain of small kernels on the side, alongside the queries' q_b stream.
  const bool side = side_work(t_count);
  if (side) ops_.begin_side();
  ops_.rms_norm(entry, w.kv_a_layernorm, eps, entry);
  Tensor entry3 = entry.view({t_count, 1, c.kv_lora_rank + c.qk_rope_head_dim});
  ops_.rope(entry3, c.kv_lora_rank, step.layout.token_pos, rope_.inv_freq, rope_.attention_factor);
  ops_.cache_write(cache.layer(layer), entry, step.layout);
  if (side) ops_.end_side();

  if (w.q_a_proj) ops_.rms_norm_linear(q_lat, w.q_a_layernorm, eps, q_lat, w.q_b_proj, q);
  Tensor q3 = q.view({t_count, h, qk});
  ops_.rope(q3, c.qk_nope_head_dim, step.layout.token_pos, rope_.inv_freq, rope_.attention_factor);
  if (side) ops_.join_side();

  const MlaParams p = mla_params();
  Tensor attn = ops_.empty(act, {t_count, h * c.v_head_dim});
  ops_.mla_attention(q3, w.kv_b, cache.layer(layer), step.layout, p, attn);
  ops_.linear(attn, w.o_proj, out);
}

void DeepseekV3::mlp(const LayerWeights& lw, const Tensor& x, Tensor& out) {
  const ModelConfig& c = config_;
  const int64_t t_count = x.dim(0);
  const DType act = ops_.activation_dtype();
  auto swiglu = [&](const ExpertWeights& e, Tensor& dst) {
    const int64_t f = e.gate.out_features();
    Tensor g = ops_.empty(act, {t_count, f}), u = ops_.empty(act, {t_count, f});
    ops_.linear2(x, e.gate, g, e.up, u);
    ops_.silu_mul_linear(g, u, e.down, dst);
  };
  if (!lw.is_moe) {
    swiglu(lw.mlp, out);
    return;
  }
  RouterParams rp;
  rp.num_experts = c.n_routed_experts;
  rp.top_k = c.num_experts_per_tok;
  rp.n_group = c.n_group;
  rp.topk_group = c.topk_group;
  rp.norm_topk_prob = c.norm_topk_prob;
  rp.routed_scaling_factor = static_cast<float>(c.routed_scaling_factor);
  Tensor ids = ops_.empty(DType::I32, {t_count, rp.top_k});
  Tensor weights = ops_.empty(DType::F32, {t_count, rp.top_k});
  // The shared expert on the side: its weight stream overlaps the routing's chain of small
  // kernels (router, selection, grouping), which leaves the GPU's bandwidth mostly idle.
  Tensor shared;
  const bool side = side_work(t_count);
  if (lw.shared_expert) {
    shared = ops_.empty(act, {t_count, c.hidden_size});
    if (side) ops_.begin_side();
    swiglu(*lw.shared_expert, shared);
    if (side) ops_.end_side();
  }
  ops_.moe_route(x, lw.router, lw.router_bias, rp, ids, weights);
  // The shared expert's output is added by the routed experts' combine (as add() would), which
  // waits for the side work itself: the routed experts' products start once the routing is done.
  ops_.moe_experts(x, lw.experts, ids, weights, out, first_expert_, lw.shared_expert ? &shared : nullptr);
  if (lw.shared_expert && side) ops_.join_side();
}

}  // namespace dilu
