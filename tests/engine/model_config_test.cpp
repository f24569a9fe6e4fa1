// config.json parsing: the golden checkpoints' configs load; every rejected field is named in the
// message together with the file; the RoPE/YaRN table and softmax scale follow the formulas.
#include "engine/model_config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <numbers>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/test_util.h"

namespace dilu {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using test::expect_user_error;

json golden_config(const std::string& name) {
  std::ifstream in(test::golden_model(name) / "config.json");
  return json::parse(in);
}

TEST(ModelConfig, ParsesEveryGoldenConfig) {
  int count = 0;
  for (const auto& e : fs::directory_iterator(fs::path(DILU_SOURCE_DIR) / "tests" / "golden" / "data")) {
    if (!fs::exists(e.path() / "model" / "config.json")) continue;
    SCOPED_TRACE(e.path().filename().string());
    const ModelConfig c = load_model_config(e.path() / "model");
    EXPECT_GT(c.hidden_size, 0);
    EXPECT_GT(c.vocab_size, 0);
    EXPECT_FALSE(c.eos_token_ids.empty());
    ++count;
  }
  EXPECT_GE(count, 6);
}

TEST(ModelConfig, ReadsR1Fields) {
  const ModelConfig c = load_model_config(test::golden_model("r1_fp8"));
  EXPECT_EQ(c.hidden_size, 144);
  EXPECT_EQ(c.num_hidden_layers, 3);
  EXPECT_EQ(c.num_nextn_predict_layers, 1);
  ASSERT_TRUE(c.q_lora_rank.has_value());
  EXPECT_EQ(*c.q_lora_rank, 136);
  EXPECT_EQ(c.kv_lora_rank, 112);
  EXPECT_EQ(c.qk_head_dim(), 64);
  EXPECT_EQ(c.n_group, 4);
  EXPECT_EQ(c.topk_group, 2);
  EXPECT_EQ(c.routed_scaling_factor, 2.5);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{1}));
  ASSERT_TRUE(c.quantization.has_value());
  EXPECT_EQ(c.quantization->block_out, 128);
  EXPECT_EQ(c.quantization->block_in, 128);
  ASSERT_TRUE(c.rope_scaling.has_value());
  EXPECT_EQ(c.rope_scaling->factor, 40.0);
  EXPECT_EQ(c.rope_scaling->original_max_position_embeddings, 4096);
  EXPECT_FALSE(c.is_moe_layer(0));  // first_k_dense_replace = 1
  EXPECT_TRUE(c.is_moe_layer(1));

  const ModelConfig v2 = load_model_config(test::golden_model("v2lite_bf16"));
  EXPECT_FALSE(v2.q_lora_rank.has_value());
  EXPECT_FALSE(v2.rope_scaling.has_value());
  EXPECT_FALSE(v2.quantization.has_value());
}

TEST(ModelConfig, EosTokenIdMayBeAList) {
  json j = golden_config("r1_fp8");
  j["eos_token_id"] = {1, 7};
  EXPECT_EQ(model_config_from_json(j, "cfg.json").eos_token_ids, (std::vector<int64_t>{1, 7}));
}

TEST(ModelConfig, QLoraRankNullIsAccepted) {
  json j = golden_config("r1_fp8");
  j["q_lora_rank"] = nullptr;
  EXPECT_FALSE(model_config_from_json(j, "cfg.json").q_lora_rank.has_value());
  j.erase("q_lora_rank");
  EXPECT_FALSE(model_config_from_json(j, "cfg.json").q_lora_rank.has_value());
}

struct BadConfig {
  const char* what;
  std::function<void(json&)> edit;
  std::string field;  // must appear in the message
};

TEST(ModelConfig, ErrorsNameTheFileAndTheField) {
  const std::vector<BadConfig> cases = {
      {"missing hidden_size", [](json& j) { j.erase("hidden_size"); }, "'hidden_size'"},
      {"hidden_size null", [](json& j) { j["hidden_size"] = nullptr; }, "'hidden_size'"},
      {"hidden_size zero", [](json& j) { j["hidden_size"] = 0; }, "'hidden_size'"},
      {"q_lora_rank string", [](json& j) { j["q_lora_rank"] = "136"; }, "'q_lora_rank'"},
      {"vocab_size fractional", [](json& j) { j["vocab_size"] = 256.5; }, "'vocab_size'"},
      {"eos list with a non-int", [](json& j) { j["eos_token_id"] = json::array({1, "2"}); }, "'eos_token_id'"},
      {"eos string", [](json& j) { j["eos_token_id"] = "1"; }, "'eos_token_id'"},
      {"eos outside vocab", [](json& j) { j["eos_token_id"] = 256; }, "'eos_token_id'"},
      {"topk_group > n_group", [](json& j) { j["topk_group"] = 5; }, "'topk_group'"},
      {"experts not divisible by n_group", [](json& j) { j["n_routed_experts"] = 10; }, "'n_routed_experts'"},
      {"top-k beyond chosen groups", [](json& j) { j["num_experts_per_tok"] = 5; }, "'num_experts_per_tok'"},
      {"unknown rope_scaling type", [](json& j) { j["rope_scaling"]["type"] = "linear"; }, "'rope_scaling'"},
      {"rope_scaling without factor", [](json& j) { j["rope_scaling"].erase("factor"); }, "'factor'"},
      {"quant_method gptq", [](json& j) { j["quantization_config"]["quant_method"] = "gptq"; }, "quant_method"},
      {"fp8 block size", [](json& j) { j["quantization_config"]["weight_block_size"] = {128}; }, "weight_block_size"},
      {"attention_bias true", [](json& j) { j["attention_bias"] = true; }, "'attention_bias'"},
      {"odd rope dim", [](json& j) { j["qk_rope_head_dim"] = 31; }, "'qk_rope_head_dim'"},
      {"softmax scoring", [](json& j) { j["scoring_func"] = "softmax"; }, "'scoring_func'"},
      {"model_type llama", [](json& j) { j["model_type"] = "llama"; }, "'model_type'"},
      {"hidden_act gelu", [](json& j) { j["hidden_act"] = "gelu"; }, "'hidden_act'"},
      {"norm_topk_prob string", [](json& j) { j["norm_topk_prob"] = "yes"; }, "'norm_topk_prob'"},
      // A config the fuzzer found: bounded fields whose product made a tensor table of gigabytes.
      {"too many layers", [](json& j) { j["num_hidden_layers"] = 65536; }, "'num_hidden_layers'"},
      {"too many experts in all", [](json& j) { j["num_hidden_layers"] = 4096, j["n_routed_experts"] = 4096, j["n_group"] = 1, j["topk_group"] = 1; },
       "'n_routed_experts'"},
  };
  for (const BadConfig& c : cases) {
    SCOPED_TRACE(c.what);
    json j = golden_config("r1_fp8");
    c.edit(j);
    expect_user_error([&] { model_config_from_json(j, "/some/dir/config.json"); }, {"/some/dir/config.json", c.field});
  }
  // The rope type and quant method say what was found.
  json j = golden_config("r1_fp8");
  j["rope_scaling"]["type"] = "linear";
  expect_user_error([&] { model_config_from_json(j, "c.json"); }, {"linear"});
  j = golden_config("r1_fp8");
  j["quantization_config"]["quant_method"] = "gptq";
  expect_user_error([&] { model_config_from_json(j, "c.json"); }, {"gptq"});
  expect_user_error([&] { model_config_from_json(json::array(), "c.json"); }, {"c.json"});
}

TEST(ModelConfig, LoadReportsMissingOrInvalidFiles) {
  const fs::path dir = test::scratch_dir();
  expect_user_error([&] { load_model_config(dir / "absent"); }, {(dir / "absent").string()});
  expect_user_error([&] { load_model_config(dir); }, {(dir / "config.json").string()});
  test::write_bytes(dir / "config.json", "{\"hidden_size\": ");
  expect_user_error([&] { load_model_config(dir); }, {(dir / "config.json").string(), "JSON"});
}

TEST(ModelConfig, WrittenJsonReadsBackTheSameConfig) {
  for (const char* name : {"r1_fp8", "v2lite_bf16", "fp8_ungrouped_yarn"}) {
    SCOPED_TRACE(name);
    const ModelConfig a = load_model_config(test::golden_model(name));
    const ModelConfig b = model_config_from_json(model_config_to_json(a), "written");
    EXPECT_EQ(model_config_to_json(b), model_config_to_json(a));
    EXPECT_EQ(b.q_lora_rank, a.q_lora_rank);
    EXPECT_EQ(b.eos_token_ids, a.eos_token_ids);
    EXPECT_EQ(b.rope_scaling.has_value(), a.rope_scaling.has_value());
    EXPECT_EQ(b.quantization.has_value(), a.quantization.has_value());
  }
}

// ---- RoPE table and softmax scale -------------------------------------------------------------

TEST(RopeTable, PlainRopeIsInverseThetaPowers) {
  json j = golden_config("r1_fp8");
  j["rope_scaling"] = nullptr;
  j["rope_theta"] = 10000;
  const ModelConfig c = model_config_from_json(j, "cfg.json");
  const RopeTable t = make_rope_table(c);
  const int64_t d = c.qk_rope_head_dim;
  ASSERT_EQ(static_cast<int64_t>(t.inv_freq.size()), d / 2);
  EXPECT_EQ(t.attention_factor, 1.0f);
  for (int64_t i = 0; i < d / 2; ++i) {
    const double want = 1.0 / std::pow(10000.0, 2.0 * static_cast<double>(i) / static_cast<double>(d));
    // Computed in FP32 as transformers does (powf, then a division): a few ulp.
    EXPECT_NEAR(t.inv_freq[static_cast<size_t>(i)], want, 1e-6 * want) << "i = " << i;
  }
  EXPECT_DOUBLE_EQ(c.softmax_scale(), 1.0 / std::sqrt(64.0));
}

TEST(RopeTable, YarnBlendsExtrapolationAndInterpolation) {
  // R1's rope: dim 64, theta 1e4, factor 40, original 4096, beta_fast 32, beta_slow 1:
  // the correction range is [floor(10.47), ceil(22.5)] = [10, 23].
  json j = golden_config("r1_fp8");
  const ModelConfig c = model_config_from_json(j, "cfg.json");
  ASSERT_EQ(c.qk_rope_head_dim, 32);
  j["qk_rope_head_dim"] = 64;
  j["qk_nope_head_dim"] = 128;
  const ModelConfig r1 = model_config_from_json(j, "cfg.json");
  const RopeTable t = make_rope_table(r1);
  ASSERT_EQ(t.inv_freq.size(), 32u);
  const double dim = 64, theta = 10000, factor = 40, orig = 4096;
  auto correction = [&](double rot) { return dim * std::log(orig / (rot * 2 * std::numbers::pi)) / (2 * std::log(theta)); };
  const double low = std::floor(correction(32)), high = std::ceil(correction(1));
  ASSERT_EQ(low, 10.0);
  ASSERT_EQ(high, 23.0);
  for (int i = 0; i < 32; ++i) {
    const double extrapolation = 1.0 / std::pow(theta, 2.0 * i / dim);
    const double interpolation = extrapolation / factor;
    const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
    const double want = interpolation * ramp + extrapolation * (1.0 - ramp);
    EXPECT_NEAR(t.inv_freq[static_cast<size_t>(i)], want, 2e-6 * want) << "i = " << i;  // FP32 arithmetic
  }
  // mscale == mscale_all_dim: the cos/sin factor cancels to 1.
  EXPECT_FLOAT_EQ(t.attention_factor, 1.0f);
  // Softmax scale: qk_head_dim^-0.5 * (0.1 ln(factor) + 1)^2 with mscale_all_dim 1.
  const double m = 0.1 * std::log(40.0) + 1.0;
  EXPECT_NEAR(r1.softmax_scale(), std::pow(192.0, -0.5) * m * m, 1e-12);
  EXPECT_NEAR(c.softmax_scale(), std::pow(64.0, -0.5) * m * m, 1e-12);

  // mscale_all_dim absent (0): no softmax correction; the cos/sin factor is 0.1 ln(factor) + 1.
  j["rope_scaling"].erase("mscale_all_dim");
  j["rope_scaling"].erase("mscale");
  const ModelConfig plain = model_config_from_json(j, "cfg.json");
  EXPECT_NEAR(plain.softmax_scale(), std::pow(192.0, -0.5), 1e-12);
  EXPECT_NEAR(make_rope_table(plain).attention_factor, m, 1e-6);
}

}  // namespace
}  // namespace dilu
