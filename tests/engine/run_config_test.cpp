// Run config: defaults, YAML files, --set precedence, the YAML round trip, and that every kind of
// user mistake is reported with the key and where it came from.
#include "engine/run_config.h"

#include <gtest/gtest.h>

#include <fstream>
#include <set>
#include <string>

#include "kernels/error.h"

namespace dilu {
namespace {

namespace fs = std::filesystem;

// Writes `text` to a fresh file under the test temp dir and returns its path.
fs::path write_yaml(const std::string& name, const std::string& text) {
  const fs::path path = fs::path(::testing::TempDir()) / ("run_config_test_" + name + ".yaml");
  std::ofstream(path) << text;
  return path;
}

// The UserError message of loading `file` + `overrides`; fails the test when nothing is thrown.
std::string load_error(const std::optional<fs::path>& file, const std::vector<std::string>& overrides) {
  try {
    load_run_config(file, overrides);
  } catch (const UserError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a UserError";
  return "";
}

std::string yaml_error(const std::string& name, const std::string& text) {
  return load_error(write_yaml(name, text), {});
}

std::string set_error(const std::string& override_text) { return load_error(std::nullopt, {override_text}); }

#define EXPECT_CONTAINS(text, part) EXPECT_NE(std::string(text).find(part), std::string::npos) << (text)

TEST(RunConfig, DefaultsWithoutFileOrOverrides) {
  const RunConfig config = load_run_config(std::nullopt, {});
  EXPECT_EQ(config, RunConfig{});
  EXPECT_EQ(config.backend, "auto");
  EXPECT_EQ(config.batch.max_seqs, 256);
  EXPECT_DOUBLE_EQ(config.kv.memory_fraction, 0.9);
}

TEST(RunConfig, EmptyAndCommentOnlyFilesGiveDefaults) {
  EXPECT_EQ(load_run_config(write_yaml("empty", ""), {}), RunConfig{});
  EXPECT_EQ(load_run_config(write_yaml("comments", "# nothing here\n"), {}), RunConfig{});
  EXPECT_EQ(load_run_config(write_yaml("empty_section", "batch:\n"), {}), RunConfig{});
}

TEST(RunConfig, LoadsYamlFile) {
  const RunConfig config = load_run_config(write_yaml("full", R"(
backend: cuda
parallel: {tp: 8, pp: 2, dp: 3, ep: 4, layer_split: "30,31"}
batch:
  max_seqs: 64
kv:
  memory_fraction: 0.5
  num_blocks: 1000
sampling:
  temperature: 0.7
  seed: 18446744073709551615
output:
  token_ids: false
)"),
                                               {});
  EXPECT_EQ(config.backend, "cuda");
  EXPECT_EQ(config.parallel.tp, 8);
  EXPECT_EQ(config.parallel.pp, 2);
  EXPECT_EQ(config.parallel.dp, 3);
  EXPECT_EQ(config.parallel.ep, 4);
  EXPECT_EQ(config.parallel.layer_split, "30,31");
  EXPECT_EQ(config.batch.max_seqs, 64);
  EXPECT_EQ(config.batch.max_tokens, 8192);  // untouched keys keep their defaults
  EXPECT_DOUBLE_EQ(config.kv.memory_fraction, 0.5);
  EXPECT_EQ(config.kv.num_blocks, 1000);
  EXPECT_DOUBLE_EQ(config.sampling.temperature, 0.7);
  EXPECT_EQ(config.sampling.seed, 18446744073709551615ULL);
  EXPECT_FALSE(config.output.token_ids);
}

TEST(RunConfig, OverridesApplyAfterFileInOrder) {
  const fs::path file = write_yaml("precedence", "parallel:\n  tp: 2\nbatch:\n  max_seqs: 32\n");
  const RunConfig config = load_run_config(
      file, {"parallel.tp=4", "parallel.tp=8", "sampling.temperature=0.7", "output.token_ids=false",
             "parallel.pp=2", "parallel.layer_split=30,31", "backend=auto"});
  EXPECT_EQ(config.parallel.tp, 8);
  EXPECT_EQ(config.batch.max_seqs, 32);  // from the file, not overridden
  EXPECT_DOUBLE_EQ(config.sampling.temperature, 0.7);
  EXPECT_FALSE(config.output.token_ids);
  EXPECT_EQ(config.parallel.layer_split, "30,31");
  EXPECT_EQ(config.backend, "auto");
}

TEST(RunConfig, OverrideValuesAreYamlScalars) {
  const RunConfig config =
      load_run_config(std::nullopt, {"backend=\"cuda\"", "sampling.top_p='0.95'", "parallel.layer_split="});
  EXPECT_EQ(config.backend, "cuda");
  EXPECT_DOUBLE_EQ(config.sampling.top_p, 0.95);
  EXPECT_EQ(config.parallel.layer_split, "");
  // An integer is a valid float; "010" is decimal ten, not octal.
  EXPECT_DOUBLE_EQ(load_run_config(std::nullopt, {"sampling.temperature=1"}).sampling.temperature, 1.0);
  EXPECT_EQ(load_run_config(std::nullopt, {"batch.max_seqs=010"}).batch.max_seqs, 10);
}

TEST(RunConfig, YamlRoundTripGivesSameConfig) {
  const RunConfig config = load_run_config(
      std::nullopt, {"backend=cuda", "parallel.tp=8", "parallel.pp=2", "parallel.layer_split=30,31",
                     "kv.memory_fraction=0.123456789012345", "sampling.temperature=0.1", "sampling.top_p=1e-3",
                     "sampling.seed=18446744073709551615", "output.token_ids=false", "cpu.threads=12"});
  const std::string yaml = run_config_to_yaml(config);
  EXPECT_EQ(load_run_config(write_yaml("round_trip", yaml), {}), config) << yaml;
  EXPECT_EQ(load_run_config(write_yaml("round_trip_defaults", run_config_to_yaml(RunConfig{})), {}), RunConfig{});
}

TEST(RunConfig, YamlPrintsEveryKey) {
  const std::string yaml = run_config_to_yaml(RunConfig{});
  EXPECT_CONTAINS(yaml, "backend: \"auto\"\n");
  EXPECT_CONTAINS(yaml, "parallel:\n  tp: 1\n");
  EXPECT_CONTAINS(yaml, "  memory_fraction: 0.9\n");
  EXPECT_CONTAINS(yaml, "  temperature: 0.0\n");
  for (const RunConfigKey& key : run_config_keys())
    EXPECT_CONTAINS(yaml, key.key.substr(key.key.rfind('.') + 1) + ": ");
}

TEST(RunConfig, KeyListDescribesEveryKey) {
  const auto& keys = run_config_keys();
  std::set<std::string> names;
  for (const RunConfigKey& key : keys) {
    EXPECT_TRUE(names.insert(key.key).second) << "duplicate key " << key.key;
    EXPECT_FALSE(key.help.empty()) << key.key;
    // Each default, set back through --set, must give the default config.
    EXPECT_EQ(load_run_config(std::nullopt, {key.key + "=" + key.default_value}), RunConfig{}) << key.key;
  }
  EXPECT_EQ(keys.size(), 24u);
  for (const char* required : {"parallel.tp", "parallel.pp", "parallel.dp", "parallel.ep", "backend",
                               "batch.max_seqs", "batch.max_tokens", "kv.block_size", "kv.memory_fraction",
                               "model.max_seq_len", "sampling.temperature", "output.token_ids"})
    EXPECT_TRUE(names.count(required)) << required;
  EXPECT_EQ(keys.front().key, "backend");
  EXPECT_EQ(keys.front().type, "string");
  EXPECT_EQ(keys[1].key, "parallel.tp");
  EXPECT_EQ(keys[1].type, "int");
  EXPECT_EQ(keys[1].default_value, "1");
}

TEST(RunConfig, ShippedDefaultYamlLoadsToDefaults) {
  const fs::path path = fs::path(DILU_SOURCE_DIR) / "configs/runs/default.yaml";
  EXPECT_EQ(load_run_config(path, {}), RunConfig{});
  std::ifstream in(path);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (const RunConfigKey& key : run_config_keys())  // every key is documented there
    EXPECT_CONTAINS(text, key.key.substr(key.key.rfind('.') + 1) + ": " + key.default_value);
}

TEST(RunConfigErrors, UnknownKeySuggestsClosest) {
  const std::string message = yaml_error("unknown", "batch:\n  max_seq: 4\n");
  EXPECT_CONTAINS(message, "batch.max_seq'");
  EXPECT_CONTAINS(message, "run_config_test_unknown.yaml:2");
  EXPECT_CONTAINS(message, "did you mean 'batch.max_seqs'");

  const std::string moved = set_error("batch.block_size=4");  // right name, wrong section
  EXPECT_CONTAINS(moved, "--set batch.block_size=4");
  EXPECT_CONTAINS(moved, "'kv.block_size'");

  EXPECT_CONTAINS(yaml_error("unknown_section", "paralel:\n  tp: 2\n"), "did you mean 'parallel'");
}

TEST(RunConfigErrors, UnknownKeyFarFromAnyListsSection) {
  const std::string message = set_error("batch.zzzzzzzz=1");
  EXPECT_CONTAINS(message, "unknown key 'batch.zzzzzzzz'");
  EXPECT_CONTAINS(message, "section 'batch' has keys: max_seqs, max_tokens");
  EXPECT_CONTAINS(yaml_error("unknown_top", "zzzzzzzz: 1\n"), "top-level keys are: backend, parallel");
}

TEST(RunConfigErrors, WrongTypes) {
  struct Case {
    std::string yaml, key, expected;
  };
  for (const Case& c : std::vector<Case>{
           {"batch:\n  max_seqs: abc\n", "batch.max_seqs", "expected an integer, got 'abc'"},
           {"batch:\n  max_seqs: 1.5\n", "batch.max_seqs", "expected an integer, got '1.5'"},
           {"batch:\n  max_seqs: 99999999999\n", "batch.max_seqs", "expected an integer"},
           {"output:\n  token_ids: maybe\n", "output.token_ids", "expected true or false, got 'maybe'"},
           {"kv:\n  memory_fraction: .nan\n", "kv.memory_fraction", "expected a number"},
           {"sampling:\n  seed: -1\n", "sampling.seed", "expected a non-negative integer"},
           {"batch:\n  max_seqs: {a: 1}\n", "batch.max_seqs", "got a mapping"},
           {"batch:\n  max_seqs:\n", "batch.max_seqs", "got no value"},
           {"batch: 3\n", "'batch' is a section", "got a scalar"},
           {"parallel: [1, 2]\n", "'parallel' is a section", "got a sequence"},
           {"- 1\n", "the run config is a section", "got a sequence"},
       }) {
    const std::string message = yaml_error("type", c.yaml);
    EXPECT_CONTAINS(message, "run_config_test_type.yaml:");
    EXPECT_CONTAINS(message, c.key);
    EXPECT_CONTAINS(message, c.expected);
  }
  const std::string set = set_error("batch.max_seqs=abc");
  EXPECT_CONTAINS(set, "--set batch.max_seqs=abc");
  EXPECT_CONTAINS(set, "expected an integer");
  EXPECT_CONTAINS(set_error("batch=4"), "'batch' is a section");
}

TEST(RunConfigErrors, OutOfRangeValues) {
  const std::vector<std::string> bad_overrides = {
      "parallel.tp=0", "parallel.pp=-1", "parallel.dp=0", "parallel.ep=-1", "batch.max_seqs=0",
      "batch.max_tokens=0", "kv.block_size=0", "kv.memory_fraction=0", "kv.memory_fraction=1.5",
      "kv.num_blocks=-1", "model.max_seq_len=-1", "sampling.temperature=-0.1", "sampling.top_p=0",
      "sampling.top_p=1.01", "sampling.top_k=-1", "sampling.max_tokens=-1", "cpu.threads=-1", "backend=gpu",
      "parallel.layer_split=30,,31", "parallel.layer_split=30,0", "parallel.layer_split=a",
      "parallel.layer_split=30,"};
  for (const std::string& bad : bad_overrides) {
    const std::string message = set_error(bad);
    EXPECT_CONTAINS(message, bad.substr(0, bad.find('=')));
    EXPECT_CONTAINS(message, "--set " + bad);
    EXPECT_CONTAINS(message, "must be");
  }
  const std::string from_file = yaml_error("range", "kv:\n  block_size: 0\n");
  EXPECT_CONTAINS(from_file, "run_config_test_range.yaml:2");
  EXPECT_CONTAINS(from_file, "kv.block_size = 0");
}

TEST(RunConfigErrors, LayerSplitMustMatchStages) {
  const std::string message = set_error("parallel.layer_split=30,31");
  EXPECT_CONTAINS(message, "parallel.layer_split lists 2 stages but parallel.pp = 1");
  EXPECT_NO_THROW(load_run_config(std::nullopt, {"parallel.layer_split=30,31", "parallel.pp=2"}));
}

TEST(RunConfigErrors, ReportsEveryInvalidValueAtOnce) {
  const std::string message = load_error(std::nullopt, {"parallel.tp=0", "batch.max_seqs=0"});
  EXPECT_CONTAINS(message, "parallel.tp = 0");
  EXPECT_CONTAINS(message, "batch.max_seqs = 0");
}

TEST(RunConfigErrors, MalformedOverride) {
  EXPECT_CONTAINS(set_error("foo"), "--set foo: expected KEY=VALUE");
  EXPECT_CONTAINS(set_error("=3"), "--set =3: expected KEY=VALUE");
  EXPECT_CONTAINS(set_error("backend=[cpu"), "--set backend=[cpu");
}

TEST(RunConfigErrors, YamlSyntaxErrorNamesFileAndLine) {
  const std::string message = yaml_error("syntax", "batch:\n  max_seqs: 4\n  max_tokens: [1, 2\n");
  EXPECT_CONTAINS(message, "run_config_test_syntax.yaml:");
  EXPECT_CONTAINS(message, "YAML syntax error");
}

TEST(RunConfigErrors, MissingFileOrDirectory) {
  const fs::path missing = fs::path(::testing::TempDir()) / "no_such_run_config.yaml";
  const std::string message = load_error(missing, {});
  EXPECT_CONTAINS(message, missing.string());
  EXPECT_CONTAINS(message, "not found");
  EXPECT_CONTAINS(load_error(fs::path(::testing::TempDir()), {}), "is a directory");
}

}  // namespace
}  // namespace dilu
