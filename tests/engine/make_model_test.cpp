// make_model: the tiny presets written as BF16 and FP8 checkpoints, checked file by file against
// the name table, the preset, the FP8 block-scaling rules and determinism. Shards are parsed from
// their bytes here so that the checks do not depend on dilu's reader.
#include "engine/make_model.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <unistd.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

#include "engine/weight_names.h"
#include "kernels/dtype.h"
#include "kernels/error.h"

namespace dilu {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string read_all(const fs::path& p) {
  std::string bytes(fs::file_size(p), '\0');
  std::ifstream(p, std::ios::binary).read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return bytes;
}

struct Shard {
  json header;
  std::string data;  // the data section
};

Shard read_shard(const fs::path& p) {
  const std::string bytes = read_all(p);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  return {json::parse(bytes.substr(8, n)), bytes.substr(8 + n)};
}

// A checkpoint directory read back: every tensor's dtype, shape and bytes.
struct Loaded {
  json config, index;
  std::map<std::string, std::string> dtype;
  std::map<std::string, Shape> shape;
  std::map<std::string, std::string> bytes;
  std::map<std::string, std::string> file;  // from the shard headers

  explicit Loaded(const fs::path& dir) {
    config = json::parse(read_all(dir / "config.json"));
    index = json::parse(read_all(dir / "model.safetensors.index.json"));
    for (const auto& entry : fs::directory_iterator(dir)) {
      if (entry.path().extension() != ".safetensors") continue;
      const Shard s = read_shard(entry.path());
      for (const auto& [name, info] : s.header.items()) {
        if (name == "__metadata__") continue;
        EXPECT_EQ(file.count(name), 0u) << name << " appears in two shards";
        file[name] = entry.path().filename().string();
        dtype[name] = info["dtype"];
        shape[name] = info["shape"].get<Shape>();
        const auto o = info["data_offsets"].get<std::vector<size_t>>();
        bytes[name] = s.data.substr(o[0], o[1] - o[0]);
      }
    }
  }
  std::vector<float> values(const std::string& name) const {
    const std::string& b = bytes.at(name);
    const std::string& t = dtype.at(name);
    const DType dt = *dtype_from_name(t);
    std::vector<float> out(b.size() / dtype_size(dt));
    convert_to_f32(dt, b.data(), out.data(), out.size());
    return out;
  }
};

// One scratch directory per process (ctest runs tests as parallel processes), removed at exit.
const fs::path& scratch_root() {
  static const fs::path root = fs::path(::testing::TempDir()) / ("dilu_make_model_test_" + std::to_string(getpid()));
  return root;
}
class RemoveScratch : public ::testing::Environment {
  void TearDown() override { fs::remove_all(scratch_root()); }
};
[[maybe_unused]] ::testing::Environment* const remove_scratch = ::testing::AddGlobalTestEnvironment(new RemoveScratch);

fs::path make(const std::string& preset, CheckpointDType dtype, uint64_t seed, const std::string& dir_name) {
  MakeModelOptions o;
  o.preset = preset;
  o.out_dir = scratch_root() / dir_name;
  o.dtype = dtype;
  o.seed = seed;
  o.force = true;
  make_model(o);
  return o.out_dir;
}

// The tiny preset of seed 7 in both dtypes, written once for all the tests that only read them.
const fs::path& tiny_dir(CheckpointDType t) {
  static const fs::path bf16 = make("tiny", CheckpointDType::BF16, 7, "tiny-bf16");
  static const fs::path fp8 = make("tiny", CheckpointDType::FP8, 7, "tiny-fp8");
  return t == CheckpointDType::FP8 ? fp8 : bf16;
}

class MakeModelTest : public ::testing::TestWithParam<CheckpointDType> {
 protected:
  static const fs::path& dir(CheckpointDType t) { return tiny_dir(t); }
};

TEST_P(MakeModelTest, ConfigMatchesThePreset) {
  const Loaded m(dir(GetParam()));
  ModelConfig expected = preset_config("tiny");
  if (GetParam() == CheckpointDType::BF16) expected.quantization = std::nullopt;
  const ModelConfig read = model_config_from_json(m.config, "config.json");
  EXPECT_EQ(model_config_to_json(read), model_config_to_json(expected));
  EXPECT_EQ(m.config["torch_dtype"], "bfloat16");
  EXPECT_EQ(m.config.contains("quantization_config"), GetParam() == CheckpointDType::FP8);
  EXPECT_EQ(m.config["num_nextn_predict_layers"], 1);
}

TEST_P(MakeModelTest, IndexNamesEveryTensorOnceAndMatchesTheShards) {
  const Loaded m(dir(GetParam()));
  const ModelConfig c = model_config_from_json(m.config, "config.json");
  const bool fp8 = GetParam() == CheckpointDType::FP8;
  std::set<std::string> expected;
  for (const WeightSpec& s : model_weight_specs(c)) {
    EXPECT_TRUE(expected.insert(s.name).second);
    if (fp8 && s.fp8_in_r1) expected.insert(scale_name(s.name));
  }
  std::set<std::string> in_index;
  std::set<std::string> files;
  for (const auto& [name, file] : m.index["weight_map"].items()) {
    in_index.insert(name);
    files.insert(file.get<std::string>());
    EXPECT_EQ(m.file.count(name), 1u) << name << " is in the index but in no shard";
    if (m.file.count(name)) {
      EXPECT_EQ(m.file.at(name), file.get<std::string>()) << name;
    }
  }
  EXPECT_EQ(in_index, expected);
  EXPECT_EQ(m.file.size(), expected.size()) << "shards hold tensors the index does not name";

  // R1's naming: model-0000i-of-0000N.safetensors, N >= 2 even for a tiny model.
  ASSERT_GE(files.size(), 2u);
  for (size_t i = 0; i < files.size(); ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, files.size());
    EXPECT_EQ(files.count(name), 1u) << name;
  }
  uint64_t total = 0;
  for (const auto& [name, b] : m.bytes) total += b.size();
  EXPECT_EQ(m.index["metadata"]["total_size"].get<uint64_t>(), total);
  for (const auto& [name, file] : m.file) EXPECT_LT(layer_of(name), c.num_hidden_layers) << "MTP tensor " << name;
}

TEST_P(MakeModelTest, DTypesAndShapesFollowR1) {
  const Loaded m(dir(GetParam()));
  const ModelConfig c = model_config_from_json(m.config, "config.json");
  const bool fp8 = GetParam() == CheckpointDType::FP8;
  for (const WeightSpec& s : model_weight_specs(c)) {
    EXPECT_EQ(m.shape.at(s.name), s.shape) << s.name;
    const bool is_bias = s.name.ends_with("e_score_correction_bias");
    const std::string want = is_bias ? "F32" : (fp8 && s.fp8_in_r1) ? "F8_E4M3" : "BF16";
    EXPECT_EQ(m.dtype.at(s.name), want) << s.name;
    if (fp8 && s.fp8_in_r1) {
      const std::string sn = scale_name(s.name);
      ASSERT_EQ(m.dtype.count(sn), 1u) << sn;
      EXPECT_EQ(m.dtype.at(sn), "F32");
      EXPECT_EQ(m.shape.at(sn), scale_shape(s.shape, *c.quantization)) << sn;
    }
  }
}

TEST_P(MakeModelTest, ValuesHaveTheIntendedScales) {
  const Loaded m(dir(GetParam()));
  const ModelConfig c = model_config_from_json(m.config, "config.json");
  auto stddev = [](const std::vector<float>& v) {
    double s = 0;
    for (float x : v) s += static_cast<double>(x) * x;
    return std::sqrt(s / static_cast<double>(v.size()));
  };
  EXPECT_NEAR(stddev(m.values("model.embed_tokens.weight")), 1.0, 0.02);
  EXPECT_NEAR(stddev(m.values("lm_head.weight")), 1.0 / std::sqrt(c.hidden_size), 0.002);
  for (float x : m.values("model.layers.1.post_attention_layernorm.weight")) EXPECT_NEAR(x, 1.0f, 0.051f);
  const std::vector<float> bias = m.values("model.layers.1.mlp.gate.e_score_correction_bias");
  for (float x : bias) EXPECT_LE(std::fabs(x), 0.05f);
  EXPECT_GT(stddev(bias), 0.01) << "the bias should not be all zeros";
}

// FP8 weights follow DeepSeek's block scaling: every value fits 448 * scale_inv of its block, and
// each block's largest value is 448 * scale_inv. Dequantized, they are the BF16 checkpoint's
// weights of the same seed up to FP8 rounding.
TEST(MakeModel, Fp8BlocksAreScaledAndMatchTheBf16Weights) {
  const Loaded q(tiny_dir(CheckpointDType::FP8)), b(tiny_dir(CheckpointDType::BF16));
  const ModelConfig c = model_config_from_json(q.config, "config.json");
  const FP8Quantization& fq = *c.quantization;
  int checked = 0;
  for (const WeightSpec& s : model_weight_specs(c)) {
    if (!s.fp8_in_r1) continue;
    const std::string& raw = q.bytes.at(s.name);
    const std::vector<float> scales = q.values(scale_name(s.name));
    const std::vector<float> ref = b.values(s.name);
    const int64_t rows = s.shape[0], cols = s.shape[1];
    const int64_t block_cols = (cols + fq.block_in - 1) / fq.block_in;
    std::vector<float> block_max(scales.size(), 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t col = 0; col < cols; ++col) {
        const size_t i = static_cast<size_t>(r * cols + col);
        const size_t blk = static_cast<size_t>((r / fq.block_out) * block_cols + col / fq.block_in);
        const float v = fp8e4m3_to_f32(static_cast<uint8_t>(raw[i]));
        ASSERT_LE(std::fabs(v), 448.0f) << s.name;
        block_max[blk] = std::max(block_max[blk], std::fabs(v));
        // e4m3 keeps 3 mantissa bits (relative error <= 2^-4), with subnormal steps of 2^-9.
        const float w = v * scales[blk];
        ASSERT_NEAR(w, ref[i], 0.0625f * std::fabs(ref[i]) + scales[blk] * 0x1p-9f + 0.004f * std::fabs(ref[i]))
            << s.name << " [" << r << ", " << col << "]";
      }
    }
    for (size_t blk = 0; blk < scales.size(); ++blk) {
      EXPECT_GT(scales[blk], 0.0f) << s.name;
      EXPECT_EQ(block_max[blk], 448.0f) << s.name << " block " << blk;
    }
    ++checked;
  }
  EXPECT_GT(checked, 10);
}

INSTANTIATE_TEST_SUITE_P(BothDTypes, MakeModelTest,
                         ::testing::Values(CheckpointDType::BF16, CheckpointDType::FP8),
                         [](const auto& param_info) { return param_info.param == CheckpointDType::FP8 ? "fp8" : "bf16"; });

TEST(MakeModel, SameSeedSameBytesOtherSeedOtherBytes) {
  const fs::path a = make("tiny-nolora", CheckpointDType::FP8, 1, "seed1-a");
  const fs::path b = make("tiny-nolora", CheckpointDType::FP8, 1, "seed1-b");
  const fs::path other = make("tiny-nolora", CheckpointDType::FP8, 2, "seed2");
  size_t shards = 0;
  for (const auto& entry : fs::directory_iterator(a)) {
    const std::string name = entry.path().filename().string();
    EXPECT_EQ(read_all(a / name), read_all(b / name)) << name;
    if (name.ends_with(".safetensors")) {
      ++shards;
      EXPECT_NE(read_all(a / name), read_all(other / name)) << name;
    }
  }
  EXPECT_GE(shards, 2u);
  EXPECT_EQ(read_all(a / "config.json"), read_all(other / "config.json"));
}

TEST(MakeModel, NoLoraPresetUsesQProj) {
  const Loaded m(make("tiny-nolora", CheckpointDType::BF16, 0, "nolora"));
  EXPECT_TRUE(m.config["q_lora_rank"].is_null());
  EXPECT_TRUE(m.config["rope_scaling"].is_null());
  EXPECT_EQ(m.dtype.count("model.layers.0.self_attn.q_proj.weight"), 1u);
  EXPECT_EQ(m.dtype.count("model.layers.0.self_attn.q_a_proj.weight"), 0u);
}

TEST(MakeModel, RefusesANonEmptyDirectoryWithoutForce) {
  const fs::path dir = scratch_root() / "non-empty";
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::ofstream(dir / "keep.txt") << "user data";
  std::ofstream(dir / "model-00009-of-00009.safetensors") << "stale shard of an earlier checkpoint";
  MakeModelOptions o;
  o.preset = "tiny";
  o.out_dir = dir;
  EXPECT_THROW(make_model(o), UserError);
  o.force = true;
  const MakeModelSummary s = make_model(o);
  EXPECT_TRUE(fs::exists(dir / "keep.txt"));
  EXPECT_FALSE(fs::exists(dir / "model-00009-of-00009.safetensors"));
  EXPECT_EQ(s.files.back().filename(), "config.json");
  uint64_t on_disk = 0;
  for (const fs::path& f : s.files) on_disk += fs::file_size(f);
  EXPECT_EQ(s.total_bytes, on_disk);
  int64_t params = 0;
  for (const WeightSpec& w : model_weight_specs(preset_config("tiny"))) {
    int64_t n = 1;
    for (int64_t d : w.shape) n *= d;
    params += n;
  }
  EXPECT_EQ(s.num_parameters, params);
}

TEST(MakeModel, PresetsAndLayerOverride) {
  try {
    preset_config("huge");
    FAIL() << "expected UserError";
  } catch (const UserError& e) {
    const std::string message = e.what();
    for (const ModelPreset& p : model_presets()) EXPECT_NE(message.find(p.name), std::string::npos) << message;
  }
  const ModelConfig r1 = preset_config("r1-geometry");
  EXPECT_EQ(r1.num_hidden_layers, 61);
  EXPECT_EQ(r1.first_k_dense_replace, 3);
  EXPECT_EQ(preset_config("r1-geometry", 10).first_k_dense_replace, 3);
  EXPECT_EQ(preset_config("r1-geometry", 4).first_k_dense_replace, 3);
  for (int64_t n : {1, 2, 3}) {
    const ModelConfig c = preset_config("r1-geometry", n);
    EXPECT_EQ(c.num_hidden_layers, n);
    EXPECT_EQ(c.first_k_dense_replace, 1) << n << " layers: layer 0 dense, the rest MoE";
  }
  EXPECT_EQ(preset_config("tiny", 1).first_k_dense_replace, 1);
  EXPECT_EQ(preset_config("tiny", 6).num_hidden_layers, 6);
}

// configs/models/<preset>.yaml describe the presets for humans in config.json's keys; they must
// not drift from the table in make_model.cpp.
json yaml_to_json(const YAML::Node& n) {
  if (n.IsMap()) {
    json j = json::object();
    for (const auto& kv : n) j[kv.first.as<std::string>()] = yaml_to_json(kv.second);
    return j;
  }
  if (n.IsSequence()) {
    json j = json::array();
    for (const auto& v : n) j.push_back(yaml_to_json(v));
    return j;
  }
  if (n.IsNull()) return nullptr;
  int64_t i;
  double d;
  bool b;
  if (YAML::convert<int64_t>::decode(n, i)) return i;
  if (YAML::convert<double>::decode(n, d)) return d;
  if (YAML::convert<bool>::decode(n, b)) return b;
  return n.as<std::string>();
}

TEST(MakeModel, PresetYamlFilesMatchTheTable) {
  for (const ModelPreset& p : model_presets()) {
    const fs::path path = fs::path(DILU_SOURCE_DIR) / "configs" / "models" / (std::string(p.name) + ".yaml");
    ASSERT_TRUE(fs::exists(path)) << path;
    const json from_yaml = yaml_to_json(YAML::LoadFile(path.string()));
    const ModelConfig c = model_config_from_json(from_yaml, path.string());
    EXPECT_EQ(model_config_to_json(c), model_config_to_json(p.config())) << path;
  }
}

}  // namespace
}  // namespace dilu
