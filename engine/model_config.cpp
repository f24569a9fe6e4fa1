// Reading, validating and writing config.json in the DeepSeek-V3 format.
#include "engine/model_config.h"

#include <cmath>
#include <numbers>
#include <set>
#include <string_view>

#include <nlohmann/json.hpp>

#include "engine/json_file.h"
#include "kernels/error.h"

namespace dilu {

namespace {

using json = nlohmann::json;

// Reads typed fields of one JSON object, collecting the name of the file in every message.
class FieldReader {
 public:
  FieldReader(const json& j, std::string origin) : j_(j), origin_(std::move(origin)) {}

  bool has(const std::string& key) const { return j_.contains(key) && !j_.at(key).is_null(); }

  int64_t integer(const std::string& key) const {
    require(key);
    const json& v = j_.at(key);
    DILU_USER_CHECK(v.is_number_integer(), origin_, ": field '", key, "' must be an integer, got ", v.dump());
    return v.get<int64_t>();
  }
  int64_t integer_or(const std::string& key, int64_t fallback) const { return has(key) ? integer(key) : fallback; }
  std::optional<int64_t> optional_integer(const std::string& key) const {
    return has(key) ? std::optional<int64_t>(integer(key)) : std::nullopt;
  }
  double number(const std::string& key) const {
    require(key);
    const json& v = j_.at(key);
    DILU_USER_CHECK(v.is_number(), origin_, ": field '", key, "' must be a number, got ", v.dump());
    return v.get<double>();
  }
  double number_or(const std::string& key, double fallback) const { return has(key) ? number(key) : fallback; }
  bool boolean_or(const std::string& key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& v = j_.at(key);
    DILU_USER_CHECK(v.is_boolean(), origin_, ": field '", key, "' must be true or false, got ", v.dump());
    return v.get<bool>();
  }
  std::string string_or(const std::string& key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const json& v = j_.at(key);
    DILU_USER_CHECK(v.is_string(), origin_, ": field '", key, "' must be a string, got ", v.dump());
    return v.get<std::string>();
  }

 private:
  void require(const std::string& key) const {
    DILU_USER_CHECK(has(key), origin_, ": required field '", key,
                    "' is missing; a DeepSeek-V3 config.json must define it (compare with DeepSeek-R1's config.json)");
  }
  const json& j_;
  std::string origin_;
};

// Sizes past these bounds are no DeepSeek-V3 (R1: hidden 7168, vocab 129280, 163840 positions);
// bounding them keeps every size computed from them (scratch bytes, cache bytes) inside int64_t.
constexpr int64_t kMaxDim = int64_t{1} << 20;
constexpr int64_t kMaxTokens = int64_t{1} << 24;  // vocab_size, positions
// The checkpoint's tensor table (weight_names.cpp) holds a few names per layer and three per routed
// expert of each MoE layer, and start-up builds and checks it: these bounds keep that to megabytes
// and well under a second (R1: 61 layers, 58 x 256 = 14848 routed experts in all).
constexpr int64_t kMaxLayers = int64_t{1} << 12;
constexpr int64_t kMaxRoutedExperts = int64_t{1} << 15;  // MoE layers x n_routed_experts

void check_positive(const std::string& origin, const char* key, int64_t v, int64_t max = kMaxDim) {
  DILU_USER_CHECK(v > 0, origin, ": field '", key, "' must be positive, got ", v);
  DILU_USER_CHECK(v <= max, origin, ": field '", key, "' is ", v, "; at most ", max, " is supported");
}

double yarn_get_mscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

}  // namespace

ModelConfig model_config_from_json(const json& j, const std::string& origin) {
  DILU_USER_CHECK(j.is_object(), origin, ": expected a JSON object at the top level");
  FieldReader f(j, origin);
  ModelConfig c;
  c.model_type = f.string_or("model_type", "deepseek_v3");
  DILU_USER_CHECK(c.model_type == "deepseek_v3" || c.model_type == "deepseek_v2", origin, ": field 'model_type' is '",
                  c.model_type, "'; dilu runs DeepSeek-V3-architecture models (model_type \"deepseek_v3\")");
  c.vocab_size = f.integer("vocab_size");
  c.hidden_size = f.integer("hidden_size");
  c.intermediate_size = f.integer("intermediate_size");
  c.num_hidden_layers = f.integer("num_hidden_layers");
  c.num_nextn_predict_layers = f.integer_or("num_nextn_predict_layers", 0);
  c.num_attention_heads = f.integer("num_attention_heads");
  c.num_key_value_heads = f.integer_or("num_key_value_heads", c.num_attention_heads);
  c.n_routed_experts = f.integer_or("n_routed_experts", 0);
  c.n_shared_experts = f.integer_or("n_shared_experts", 0);
  c.moe_intermediate_size = f.integer_or("moe_intermediate_size", 0);
  c.routed_scaling_factor = f.number_or("routed_scaling_factor", 1.0);
  c.first_k_dense_replace = f.integer_or("first_k_dense_replace", 0);
  c.moe_layer_freq = f.integer_or("moe_layer_freq", 1);
  c.num_experts_per_tok = f.integer_or("num_experts_per_tok", 0);
  c.n_group = f.integer_or("n_group", 1);
  c.topk_group = f.integer_or("topk_group", 1);
  c.norm_topk_prob = f.boolean_or("norm_topk_prob", true);
  c.topk_method = f.string_or("topk_method", "noaux_tc");
  c.scoring_func = f.string_or("scoring_func", "sigmoid");
  c.q_lora_rank = f.optional_integer("q_lora_rank");
  c.kv_lora_rank = f.integer("kv_lora_rank");
  c.qk_nope_head_dim = f.integer("qk_nope_head_dim");
  c.qk_rope_head_dim = f.integer("qk_rope_head_dim");
  c.v_head_dim = f.integer("v_head_dim");
  c.hidden_act = f.string_or("hidden_act", "silu");
  c.max_position_embeddings = f.integer("max_position_embeddings");
  c.rms_norm_eps = f.number_or("rms_norm_eps", 1e-6);
  c.rope_theta = f.number_or("rope_theta", 10000.0);
  c.rope_interleave = f.boolean_or("rope_interleave", true);
  c.attention_bias = f.boolean_or("attention_bias", false);
  c.tie_word_embeddings = f.boolean_or("tie_word_embeddings", false);
  c.bos_token_id = f.optional_integer("bos_token_id");
  c.torch_dtype = f.string_or("torch_dtype", f.string_or("dtype", "bfloat16"));

  if (f.has("eos_token_id")) {
    const json& e = j.at("eos_token_id");
    if (e.is_number_integer()) {
      c.eos_token_ids.push_back(e.get<int64_t>());
    } else {
      DILU_USER_CHECK(e.is_array(), origin, ": field 'eos_token_id' must be an integer or a list of integers, got ",
                      e.dump());
      for (const json& x : e) {
        DILU_USER_CHECK(x.is_number_integer(), origin, ": field 'eos_token_id' must hold integers, got ", x.dump());
        c.eos_token_ids.push_back(x.get<int64_t>());
      }
    }
  }

  if (f.has("rope_scaling")) {
    const json& rs = j.at("rope_scaling");
    const std::string where = origin + ": field 'rope_scaling'";
    DILU_USER_CHECK(rs.is_object(), where, " must be an object or null");
    FieldReader r(rs, where);
    std::string type = r.string_or("type", r.string_or("rope_type", "default"));
    if (type != "default") {
      DILU_USER_CHECK(type == "yarn", where, " has type '", type, "'; dilu supports \"yarn\" (as DeepSeek-V3/R1) or null");
      RopeScaling y;
      y.factor = r.number("factor");
      y.original_max_position_embeddings = r.integer_or("original_max_position_embeddings", c.max_position_embeddings);
      y.beta_fast = r.number_or("beta_fast", 32.0);
      y.beta_slow = r.number_or("beta_slow", 1.0);
      y.mscale = r.number_or("mscale", 1.0);
      y.mscale_all_dim = r.number_or("mscale_all_dim", 0.0);
      if (r.has("attention_factor")) y.attention_factor = r.number("attention_factor");
      y.truncate = r.boolean_or("truncate", true);
      DILU_USER_CHECK(y.factor > 0, where, ".factor must be positive");
      check_positive(where, "original_max_position_embeddings", y.original_max_position_embeddings, kMaxTokens);
      c.rope_scaling = y;
    }
  }

  if (f.has("quantization_config")) {
    const json& q = j.at("quantization_config");
    const std::string where = origin + ": field 'quantization_config'";
    DILU_USER_CHECK(q.is_object(), where, " must be an object");
    FieldReader r(q, where);
    std::string method = r.string_or("quant_method", "");
    DILU_USER_CHECK(method == "fp8", where, ".quant_method is '", method,
                    "'; dilu reads DeepSeek's block-scaled \"fp8\" checkpoints (or unquantized ones)");
    FP8Quantization fq;
    fq.fmt = r.string_or("fmt", "e4m3");
    DILU_USER_CHECK(fq.fmt == "e4m3", where, ".fmt is '", fq.fmt, "'; only e4m3 is supported");
    fq.activation_scheme = r.string_or("activation_scheme", "dynamic");
    if (r.has("weight_block_size")) {
      const json& b = q.at("weight_block_size");
      DILU_USER_CHECK(b.is_array() && b.size() == 2 && b[0].is_number_integer() && b[1].is_number_integer() &&
                          b[0].get<int64_t>() > 0 && b[1].get<int64_t>() > 0,
                      where, ".weight_block_size must be two positive integers, got ", b.dump());
      fq.block_out = b[0].get<int64_t>();
      fq.block_in = b[1].get<int64_t>();
    }
    c.quantization = fq;
  }

  // Validation: every rule names its field.
  for (auto [key, v] : {std::pair{"vocab_size", c.vocab_size}, {"hidden_size", c.hidden_size},
                        {"intermediate_size", c.intermediate_size},
                        {"num_attention_heads", c.num_attention_heads}, {"kv_lora_rank", c.kv_lora_rank},
                        {"qk_nope_head_dim", c.qk_nope_head_dim}, {"qk_rope_head_dim", c.qk_rope_head_dim},
                        {"v_head_dim", c.v_head_dim}, {"max_position_embeddings", c.max_position_embeddings},
                        {"moe_layer_freq", c.moe_layer_freq}})
    check_positive(origin, key, v,
                   std::string_view(key) == "vocab_size" || std::string_view(key) == "max_position_embeddings" ? kMaxTokens
                                                                                                               : kMaxDim);
  DILU_USER_CHECK(c.qk_rope_head_dim % 2 == 0, origin, ": field 'qk_rope_head_dim' must be even (rope rotates pairs), got ",
                  c.qk_rope_head_dim);
  if (c.q_lora_rank) check_positive(origin, "q_lora_rank", *c.q_lora_rank);
  DILU_USER_CHECK(c.num_nextn_predict_layers >= 0 && c.num_nextn_predict_layers <= kMaxDim, origin,
                  ": field 'num_nextn_predict_layers' must be in [0, ", kMaxDim, "], got ", c.num_nextn_predict_layers);
  DILU_USER_CHECK(c.hidden_act == "silu", origin, ": field 'hidden_act' is '", c.hidden_act, "'; only \"silu\" is supported");
  DILU_USER_CHECK(!c.attention_bias, origin,
                  ": field 'attention_bias' is true; DeepSeek-V3 checkpoints have no attention biases and dilu "
                  "does not support them");
  DILU_USER_CHECK(c.rms_norm_eps > 0, origin, ": field 'rms_norm_eps' must be positive");
  DILU_USER_CHECK(c.rope_theta > 0, origin, ": field 'rope_theta' must be positive");
  DILU_USER_CHECK(c.first_k_dense_replace >= 0, origin, ": field 'first_k_dense_replace' must be >= 0");
  check_positive(origin, "num_hidden_layers", c.num_hidden_layers, kMaxLayers);
  int64_t moe_layers = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) moe_layers += c.is_moe_layer(l) ? 1 : 0;
  if (moe_layers > 0) {
    check_positive(origin, "n_routed_experts", c.n_routed_experts);
    DILU_USER_CHECK(c.n_routed_experts <= kMaxRoutedExperts / moe_layers, origin, ": field 'n_routed_experts' (",
                    c.n_routed_experts, ") times the ", moe_layers, " MoE layers is ", c.n_routed_experts * moe_layers,
                    " routed experts; at most ", kMaxRoutedExperts, " are supported");
    check_positive(origin, "moe_intermediate_size", c.moe_intermediate_size);
    check_positive(origin, "num_experts_per_tok", c.num_experts_per_tok);
    check_positive(origin, "n_group", c.n_group);
    check_positive(origin, "topk_group", c.topk_group);
    DILU_USER_CHECK(c.n_shared_experts >= 0 && c.n_shared_experts <= kMaxDim, origin,
                    ": field 'n_shared_experts' must be in [0, ", kMaxDim, "], got ", c.n_shared_experts);
    DILU_USER_CHECK(c.topk_method == "noaux_tc", origin, ": field 'topk_method' is '", c.topk_method,
                    "'; dilu implements DeepSeek-V3's \"noaux_tc\" routing");
    DILU_USER_CHECK(c.scoring_func == "sigmoid", origin, ": field 'scoring_func' is '", c.scoring_func,
                    "'; dilu implements DeepSeek-V3's \"sigmoid\" scoring");
    DILU_USER_CHECK(c.n_routed_experts % c.n_group == 0, origin, ": field 'n_routed_experts' (", c.n_routed_experts,
                    ") must be divisible by 'n_group' (", c.n_group, ")");
    DILU_USER_CHECK(c.n_routed_experts / c.n_group >= 2, origin,
                    ": each routing group needs at least 2 experts ('n_routed_experts' / 'n_group' = ",
                    c.n_routed_experts / c.n_group, ")");
    DILU_USER_CHECK(c.topk_group <= c.n_group, origin, ": field 'topk_group' (", c.topk_group,
                    ") must not exceed 'n_group' (", c.n_group, ")");
    DILU_USER_CHECK(c.num_experts_per_tok <= c.topk_group * (c.n_routed_experts / c.n_group), origin,
                    ": field 'num_experts_per_tok' (", c.num_experts_per_tok,
                    ") exceeds the experts in the chosen groups ('topk_group' x experts per group)");
  }
  for (int64_t e : c.eos_token_ids)
    DILU_USER_CHECK(e >= 0 && e < c.vocab_size, origin, ": field 'eos_token_id' ", e, " is outside the vocabulary [0, ",
                    c.vocab_size, ")");
  return c;
}

ModelConfig load_model_config(const std::filesystem::path& model_dir) {
  namespace fs = std::filesystem;
  DILU_USER_CHECK(fs::is_directory(model_dir), "model directory '", model_dir.string(),
                  "' does not exist or is not a directory; pass --model a Hugging Face checkpoint directory");
  const fs::path path = model_dir / "config.json";
  const json j = read_json_file(path);
  return model_config_from_json(j, path.string());
}

json model_config_to_json(const ModelConfig& c) {
  json j;
  j["architectures"] = {"DeepseekV3ForCausalLM"};
  j["attention_bias"] = c.attention_bias;
  j["attention_dropout"] = 0.0;
  j["auto_map"] = {{"AutoConfig", "configuration_deepseek.DeepseekV3Config"},
                   {"AutoModel", "modeling_deepseek.DeepseekV3Model"},
                   {"AutoModelForCausalLM", "modeling_deepseek.DeepseekV3ForCausalLM"}};
  j["bos_token_id"] = c.bos_token_id ? json(*c.bos_token_id) : json(nullptr);
  j["eos_token_id"] = c.eos_token_ids.size() == 1 ? json(c.eos_token_ids[0]) : json(c.eos_token_ids);
  j["ep_size"] = 1;
  j["first_k_dense_replace"] = c.first_k_dense_replace;
  j["hidden_act"] = c.hidden_act;
  j["hidden_size"] = c.hidden_size;
  j["initializer_range"] = 0.02;
  j["intermediate_size"] = c.intermediate_size;
  j["kv_lora_rank"] = c.kv_lora_rank;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["model_type"] = c.model_type;
  j["moe_intermediate_size"] = c.moe_intermediate_size;
  j["moe_layer_freq"] = c.moe_layer_freq;
  j["n_group"] = c.n_group;
  j["n_routed_experts"] = c.n_routed_experts;
  j["n_shared_experts"] = c.n_shared_experts;
  j["norm_topk_prob"] = c.norm_topk_prob;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_experts_per_tok"] = c.num_experts_per_tok;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["num_nextn_predict_layers"] = c.num_nextn_predict_layers;
  j["q_lora_rank"] = c.q_lora_rank ? json(*c.q_lora_rank) : json(nullptr);
  j["qk_nope_head_dim"] = c.qk_nope_head_dim;
  j["qk_rope_head_dim"] = c.qk_rope_head_dim;
  if (c.quantization) {
    j["quantization_config"] = {{"activation_scheme", c.quantization->activation_scheme},
                                {"fmt", c.quantization->fmt},
                                {"quant_method", "fp8"},
                                {"weight_block_size", {c.quantization->block_out, c.quantization->block_in}}};
  }
  j["rms_norm_eps"] = c.rms_norm_eps;
  if (c.rope_scaling) {
    const RopeScaling& y = *c.rope_scaling;
    j["rope_scaling"] = {{"beta_fast", y.beta_fast},
                         {"beta_slow", y.beta_slow},
                         {"factor", y.factor},
                         {"mscale", y.mscale},
                         {"mscale_all_dim", y.mscale_all_dim},
                         {"original_max_position_embeddings", y.original_max_position_embeddings},
                         {"type", "yarn"}};
    if (y.attention_factor) j["rope_scaling"]["attention_factor"] = *y.attention_factor;
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["rope_theta"] = c.rope_theta;
  j["routed_scaling_factor"] = c.routed_scaling_factor;
  j["scoring_func"] = c.scoring_func;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["topk_group"] = c.topk_group;
  j["topk_method"] = c.topk_method;
  j["torch_dtype"] = c.torch_dtype;
  j["transformers_version"] = "4.46.3";
  j["use_cache"] = true;
  j["v_head_dim"] = c.v_head_dim;
  j["vocab_size"] = c.vocab_size;
  return j;
}

double ModelConfig::softmax_scale() const {
  double scale = 1.0 / std::sqrt(static_cast<double>(qk_head_dim()));
  if (rope_scaling && rope_scaling->mscale_all_dim != 0.0) {
    double m = yarn_get_mscale(rope_scaling->factor, rope_scaling->mscale_all_dim);
    scale *= m * m;
  }
  return scale;
}

// Mirrors transformers' _compute_yarn_parameters (in float32 where it computes in float32), so
// that frequencies match the reference bit for bit where possible.
RopeTable make_rope_table(const ModelConfig& c) {
  const int64_t dim = c.qk_rope_head_dim;
  const int64_t half = dim / 2;
  RopeTable t;
  t.inv_freq.resize(static_cast<size_t>(half));
  std::vector<float> pos_freqs(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    // torch: base ** (arange(0, dim, 2).float() / dim) in float32
    float expo = static_cast<float>(2 * i) / static_cast<float>(dim);
    pos_freqs[static_cast<size_t>(i)] = std::pow(static_cast<float>(c.rope_theta), expo);
  }
  if (!c.rope_scaling) {
    for (int64_t i = 0; i < half; ++i) t.inv_freq[static_cast<size_t>(i)] = 1.0f / pos_freqs[static_cast<size_t>(i)];
    t.attention_factor = 1.0f;
    return t;
  }
  const RopeScaling& y = *c.rope_scaling;
  // transformers 5 uses rope_scaling.factor as given (it derives max_position_embeddings /
  // original_max_position_embeddings only when factor is absent, which config parsing rejects).
  const double factor = y.factor;
  const double original = static_cast<double>(y.original_max_position_embeddings);
  if (y.attention_factor) {
    t.attention_factor = static_cast<float>(*y.attention_factor);
  } else if (y.mscale != 0.0 && y.mscale_all_dim != 0.0) {
    t.attention_factor = static_cast<float>(yarn_get_mscale(factor, y.mscale) / yarn_get_mscale(factor, y.mscale_all_dim));
  } else {
    t.attention_factor = static_cast<float>(yarn_get_mscale(factor, 1.0));
  }
  auto correction_dim = [&](double rotations) {
    return (static_cast<double>(dim) * std::log(original / (rotations * 2 * std::numbers::pi))) /
           (2 * std::log(c.rope_theta));
  };
  double low = correction_dim(y.beta_fast), high = correction_dim(y.beta_slow);
  if (y.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;
  for (int64_t i = 0; i < half; ++i) {
    float ramp = (static_cast<float>(i) - static_cast<float>(low)) / static_cast<float>(high - low);
    ramp = std::clamp(ramp, 0.0f, 1.0f);
    float extrapolation_factor = 1.0f - ramp;
    float extrapolation = 1.0f / pos_freqs[static_cast<size_t>(i)];
    float interpolation = 1.0f / (static_cast<float>(factor) * pos_freqs[static_cast<size_t>(i)]);
    t.inv_freq[static_cast<size_t>(i)] =
        interpolation * (1.0f - extrapolation_factor) + extrapolation * extrapolation_factor;
  }
  return t;
}

}  // namespace dilu
