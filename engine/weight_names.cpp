// The checkpoint name table (see weight_names.h).
#include "engine/weight_names.h"

#include <charconv>

namespace dilu {

namespace {
void add_mlp(std::vector<WeightSpec>& out, const std::string& prefix, int64_t d, int64_t width, ShardDim up_shard,
             ShardDim down_shard) {
  out.push_back({prefix + "gate_proj.weight", {width, d}, true, up_shard});
  out.push_back({prefix + "up_proj.weight", {width, d}, true, up_shard});
  out.push_back({prefix + "down_proj.weight", {d, width}, true, down_shard});
}
}  // namespace

std::vector<WeightSpec> model_weight_specs(const ModelConfig& c) {
  std::vector<WeightSpec> w;
  const int64_t d = c.hidden_size, h = c.num_attention_heads;
  w.push_back({"model.embed_tokens.weight", {c.vocab_size, d}, false, ShardDim::Rows});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    w.push_back({p + "input_layernorm.weight", {d}, false, ShardDim::None});
    const std::string a = p + "self_attn.";
    if (c.q_lora_rank) {
      w.push_back({a + "q_a_proj.weight", {*c.q_lora_rank, d}, true, ShardDim::None});
      w.push_back({a + "q_a_layernorm.weight", {*c.q_lora_rank}, false, ShardDim::None});
      w.push_back({a + "q_b_proj.weight", {h * c.qk_head_dim(), *c.q_lora_rank}, true, ShardDim::Rows});
    } else {
      w.push_back({a + "q_proj.weight", {h * c.qk_head_dim(), d}, true, ShardDim::Rows});
    }
    w.push_back({a + "kv_a_proj_with_mqa.weight", {c.kv_lora_rank + c.qk_rope_head_dim, d}, true, ShardDim::None});
    w.push_back({a + "kv_a_layernorm.weight", {c.kv_lora_rank}, false, ShardDim::None});
    w.push_back({a + "kv_b_proj.weight", {h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}, true,
                 ShardDim::Rows});
    w.push_back({a + "o_proj.weight", {d, h * c.v_head_dim}, true, ShardDim::Cols});
    w.push_back({p + "post_attention_layernorm.weight", {d}, false, ShardDim::None});
    if (c.is_moe_layer(l)) {
      const std::string m = p + "mlp.";
      w.push_back({m + "gate.weight", {c.n_routed_experts, d}, false, ShardDim::None});
      if (c.topk_method == "noaux_tc")
        w.push_back({m + "gate.e_score_correction_bias", {c.n_routed_experts}, false, ShardDim::None});
      for (int64_t e = 0; e < c.n_routed_experts; ++e)
        add_mlp(w, m + "experts." + std::to_string(e) + ".", d, c.moe_intermediate_size, ShardDim::None,
                ShardDim::None);
      if (c.n_shared_experts > 0)
        add_mlp(w, m + "shared_experts.", d, c.moe_intermediate_size * c.n_shared_experts, ShardDim::Rows,
                ShardDim::Cols);
    } else {
      add_mlp(w, p + "mlp.", d, c.intermediate_size, ShardDim::Rows, ShardDim::Cols);
    }
  }
  w.push_back({"model.norm.weight", {d}, false, ShardDim::None});
  if (!c.tie_word_embeddings) w.push_back({"lm_head.weight", {c.vocab_size, d}, false, ShardDim::Rows});
  return w;
}

std::string scale_name(const std::string& weight_name) { return weight_name + "_scale_inv"; }

Shape scale_shape(const Shape& weight_shape, const FP8Quantization& q) {
  DILU_CHECK(weight_shape.size() == 2, "block scales are for matrices, got ", shape_str(weight_shape));
  return {(weight_shape[0] + q.block_out - 1) / q.block_out, (weight_shape[1] + q.block_in - 1) / q.block_in};
}

int64_t layer_of(const std::string& name) {
  static const std::string kPrefix = "model.layers.";
  if (name.rfind(kPrefix, 0) != 0) return -1;
  int64_t layer = -1;
  const char* begin = name.data() + kPrefix.size();
  auto [ptr, ec] = std::from_chars(begin, name.data() + name.size(), layer);
  if (ec != std::errc() || ptr == begin || *ptr != '.') return -1;
  return layer;
}

}  // namespace dilu
