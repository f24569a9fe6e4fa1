// DeepSeek-V3 weights check, placement and forward pass (see deepseek_v3.h).
#include "engine/deepseek_v3.h"

#include <iostream>
#include <set>

#include "engine/kv_cache.h"
#include "engine/weight_names.h"

namespace dilu {

namespace {

bool is_float(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

}  // namespace

std::vector<std::string> check_checkpoint(const ModelConfig& config, const Checkpoint& checkpoint) {
  std::vector<std::string> problems;
  std::set<std::string> expected;
  for (const WeightSpec& spec : model_weight_specs(config)) {
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
    if (expected.count(name)) continue;
    if (layer_of(name) >= config.num_hidden_layers) continue;  // MTP layers: skipped on purpose
    problems.push_back("unexpected tensor '" + name + "' (not part of a model with this config.json)");
  }
  return problems;
}

DeepseekV3::DeepseekV3(const ModelConfig& config, const Checkpoint& ckpt, Ops& ops)
    : config_(config), ops_(ops), rope_(make_rope_table(config)) {
  std::vector<std::string> problems = check_checkpoint(config, ckpt);
  if (!problems.empty()) {
    std::string msg = "checkpoint " + ckpt.dir().string() + " does not match its config.json (" +
                      std::to_string(problems.size()) + " problem(s)):";
    const size_t shown = std::min<size_t>(problems.size(), 50);
    for (size_t i = 0; i < shown; ++i) msg += "\n  " + problems[i];
    if (shown < problems.size()) msg += "\n  ... and " + std::to_string(problems.size() - shown) + " more";
    throw UserError(msg + "\nUse a complete checkpoint whose config.json describes it.");
  }
  int64_t mtp_tensors = 0;
  for (const std::string& name : ckpt.names()) mtp_tensors += layer_of(name) >= config.num_hidden_layers;
  if (mtp_tensors > 0)
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
  auto swiglu = [&](const std::string& prefix) {
    return ExpertWeights{lin(prefix + "gate_proj.weight"), lin(prefix + "up_proj.weight"),
                         lin(prefix + "down_proj.weight")};
  };

  embed_tokens_ = ops.place_embedding(ckpt.tensor("model.embed_tokens.weight"));
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const std::string a = p + "self_attn.";
    LayerWeights lw;
    lw.input_layernorm = vec(p + "input_layernorm.weight");
    lw.post_attention_layernorm = vec(p + "post_attention_layernorm.weight");
    if (config.q_lora_rank) {
      lw.attn.q_a_proj = lin(a + "q_a_proj.weight");
      lw.attn.q_a_layernorm = vec(a + "q_a_layernorm.weight");
      lw.attn.q_b_proj = lin(a + "q_b_proj.weight");
    } else {
      lw.attn.q_b_proj = lin(a + "q_proj.weight");
    }
    lw.attn.kv_a_proj_with_mqa = lin(a + "kv_a_proj_with_mqa.weight");
    lw.attn.kv_a_layernorm = vec(a + "kv_a_layernorm.weight");
    lw.attn.kv_b = ops.dequantize(lin(a + "kv_b_proj.weight"));
    lw.attn.o_proj = lin(a + "o_proj.weight");
    lw.is_moe = config.is_moe_layer(l);
    if (lw.is_moe) {
      lw.router = vec(p + "mlp.gate.weight");
      if (ckpt.contains(p + "mlp.gate.e_score_correction_bias")) lw.router_bias = vec(p + "mlp.gate.e_score_correction_bias");
      for (int64_t e = 0; e < config.n_routed_experts; ++e)
        lw.experts.push_back(swiglu(p + "mlp.experts." + std::to_string(e) + "."));
      if (config.n_shared_experts > 0) lw.shared_expert = swiglu(p + "mlp.shared_experts.");
    } else {
      lw.mlp = swiglu(p + "mlp.");
    }
    layers_.push_back(std::move(lw));
  }
  norm_ = vec("model.norm.weight");
  const std::string head = config.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  lm_head_ = ops.place_linear(ckpt.tensor(head), Tensor(), 0, 0);
}

Tensor DeepseekV3::forward(const StepInput& step, KvCache& cache) {
  const ModelConfig& c = config_;
  const int64_t t_count = static_cast<int64_t>(step.token_ids.size()), d = c.hidden_size;
  const DType act = ops_.activation_dtype();
  Tensor x = ops_.empty(act, {t_count, d});         // residual stream [T, D]
  Tensor h = ops_.empty(act, {t_count, d});         // normalized input of a sublayer [T, D]
  Tensor y = ops_.empty(act, {t_count, d});         // sublayer output [T, D]
  ops_.embedding(embed_tokens_, step.token_ids, x);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& lw = layers_[static_cast<size_t>(l)];
    ops_.rms_norm(x, lw.input_layernorm, static_cast<float>(c.rms_norm_eps), h);
    attention(l, h, step, cache, y);
    ops_.add(x, y);
    ops_.rms_norm(x, lw.post_attention_layernorm, static_cast<float>(c.rms_norm_eps), h);
    mlp(lw, h, y);
    ops_.add(x, y);
  }
  const int64_t n = static_cast<int64_t>(step.logit_rows.size());
  Tensor last = ops_.empty(act, {n, d});
  ops_.gather_rows(x, step.logit_rows, last);
  ops_.rms_norm(last, norm_, static_cast<float>(c.rms_norm_eps), last);
  Tensor logits = ops_.empty(DType::F32, {n, c.vocab_size});
  ops_.linear(last, lm_head_, logits);
  return logits;
}

void DeepseekV3::attention(int64_t layer, const Tensor& x, const StepInput& step, KvCache& cache, Tensor& out) {
  const ModelConfig& c = config_;
  const AttentionWeights& w = layers_[static_cast<size_t>(layer)].attn;
  const int64_t t_count = x.dim(0), h = c.num_attention_heads, qk = c.qk_head_dim();
  const DType act = ops_.activation_dtype();
  const float eps = static_cast<float>(c.rms_norm_eps);

  // Queries: [T, H, nope + R], rope on the last R columns of each head.
  Tensor q = ops_.empty(act, {t_count, h * qk});
  if (w.q_a_proj) {
    Tensor q_lat = ops_.empty(act, {t_count, *c.q_lora_rank});
    ops_.linear(x, *w.q_a_proj, q_lat);
    ops_.rms_norm(q_lat, w.q_a_layernorm, eps, q_lat);
    ops_.linear(q_lat, w.q_b_proj, q);
  } else {
    ops_.linear(x, w.q_b_proj, q);
  }
  Tensor q3 = q.view({t_count, h, qk});
  ops_.rope(q3, c.qk_nope_head_dim, step.layout.token_pos, rope_.inv_freq, rope_.attention_factor);

  // Cache entry per token: [normalized latent (C) | rotated key (R)].
  Tensor entry = ops_.empty(act, {t_count, c.kv_lora_rank + c.qk_rope_head_dim});
  ops_.linear(x, w.kv_a_proj_with_mqa, entry);
  ops_.rms_norm(entry, w.kv_a_layernorm, eps, entry);
  Tensor entry3 = entry.view({t_count, 1, c.kv_lora_rank + c.qk_rope_head_dim});
  ops_.rope(entry3, c.kv_lora_rank, step.layout.token_pos, rope_.inv_freq, rope_.attention_factor);
  ops_.cache_write(cache.layer(layer), entry, step.layout);

  MlaParams p;
  p.num_heads = h;
  p.qk_nope_head_dim = c.qk_nope_head_dim;
  p.qk_rope_head_dim = c.qk_rope_head_dim;
  p.kv_lora_rank = c.kv_lora_rank;
  p.v_head_dim = c.v_head_dim;
  p.softmax_scale = static_cast<float>(c.softmax_scale());
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
    ops_.linear(x, e.gate, g);
    ops_.linear(x, e.up, u);
    ops_.silu_mul(g, u, g);
    ops_.linear(g, e.down, dst);
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
  ops_.moe_route(x, lw.router, lw.router_bias, rp, ids, weights);
  ops_.moe_experts(x, lw.experts, ids, weights, out);
  if (lw.shared_expert) {
    Tensor shared = ops_.empty(act, {t_count, c.hidden_size});
    swiglu(*lw.shared_expert, shared);
    ops_.add(out, shared);
  }
}

}  // namespace dilu
