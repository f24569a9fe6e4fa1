// The model's shape, read from a checkpoint's config.json (DeepSeek-V3 format) and validated
// once. Names follow the paper and config.json; nothing is inferred from a dimension.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace dilu {

struct RopeScaling {  // config.json "rope_scaling" of type "yarn"
  double factor = 1.0;
  int64_t original_max_position_embeddings = 0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
  std::optional<double> attention_factor;  // overrides the derived cos/sin scale when given
  bool truncate = true;
};

struct FP8Quantization {  // config.json "quantization_config" with quant_method "fp8"
  int64_t block_out = 128;  // weight_block_size[0]: rows of W per scale
  int64_t block_in = 128;   // weight_block_size[1]: columns of W per scale
  std::string activation_scheme = "dynamic";
  std::string fmt = "e4m3";
};

struct ModelConfig {
  std::string model_type = "deepseek_v3";
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;                // D
  int64_t intermediate_size = 0;          // dense MLP width
  int64_t moe_intermediate_size = 0;      // one routed expert's width
  int64_t num_hidden_layers = 0;          // L (the MTP layers come after these)
  int64_t num_nextn_predict_layers = 0;   // MTP layers stored as layers L..L+n-1; skipped
  int64_t num_attention_heads = 0;        // H
  int64_t num_key_value_heads = 0;        // informational in MLA
  int64_t n_shared_experts = 0;
  int64_t n_routed_experts = 0;           // E
  double routed_scaling_factor = 1.0;
  int64_t first_k_dense_replace = 0;      // layers [0, k) are dense
  int64_t moe_layer_freq = 1;
  int64_t num_experts_per_tok = 0;        // top-k experts per token
  int64_t n_group = 1;
  int64_t topk_group = 1;
  bool norm_topk_prob = true;
  std::string topk_method = "noaux_tc";
  std::string scoring_func = "sigmoid";
  std::optional<int64_t> q_lora_rank;     // null: queries use q_proj directly (V2-Lite)
  int64_t kv_lora_rank = 0;               // latent width cached per token
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;
  std::string hidden_act = "silu";
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool rope_interleave = true;
  std::optional<RopeScaling> rope_scaling;  // null: plain RoPE
  bool attention_bias = false;
  bool tie_word_embeddings = false;
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;     // config "eos_token_id": an int or a list
  std::string torch_dtype = "bfloat16";
  std::optional<FP8Quantization> quantization;  // present: FP8 block-scaled linear weights

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  bool is_moe_layer(int64_t layer) const {
    return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  // Softmax scale of attention: qk_head_dim^-0.5, times mscale^2 under YaRN with mscale_all_dim.
  double softmax_scale() const;
};

// Parses and validates; throws UserError naming `origin` (the file) and the offending field.
ModelConfig model_config_from_json(const nlohmann::json& j, const std::string& origin);
ModelConfig load_model_config(const std::filesystem::path& model_dir);
// The config.json text dilu writes (the published DeepSeek-V3 layout).
nlohmann::json model_config_to_json(const ModelConfig& c);

// YaRN / RoPE frequencies as Hugging Face transformers computes them: qk_rope_head_dim/2 inverse
// frequencies and the cos/sin scale ("attention factor").
struct RopeTable {
  std::vector<float> inv_freq;
  float attention_factor = 1.0f;
};
RopeTable make_rope_table(const ModelConfig& c);

}  // namespace dilu
