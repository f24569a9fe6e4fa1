// Random-weight checkpoints in exactly the published DeepSeek-R1 layout (config.json, sharded
// safetensors, model.safetensors.index.json), for tests, demos and benchmarks without real weights.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/model_config.h"

namespace dilu {

// A named model shape. The table lives in make_model.cpp; configs/models/<name>.yaml and
// configs/models/README.md describe the same presets for humans.
struct ModelPreset {
  std::string_view name;
  std::string_view description;  // one line, shown in `dilu make-model --help`
  ModelConfig (*config)();       // the full-size preset (FP8-quantized, like R1)
};
const std::vector<ModelPreset>& model_presets();

// The preset's config with `layers` hidden layers (0: the preset's own count). When `layers` leaves
// no MoE layer after the preset's dense ones (e.g. r1-geometry with fewer than 4 layers), layer 0
// stays dense and all later layers are MoE. Throws UserError naming the valid presets.
ModelConfig preset_config(const std::string& preset, int64_t layers = 0);

enum class CheckpointDType { BF16, FP8 };

struct MakeModelOptions {
  std::string preset;
  std::filesystem::path out_dir;
  CheckpointDType dtype = CheckpointDType::FP8;  // R1's own format
  uint64_t seed = 0;
  int64_t layers = 0;    // 0: the preset's default
  bool force = false;    // write into a non-empty directory (replacing an earlier checkpoint's files)
  // A directory with tokenizer.json and tokenizer_config.json to ship with the model: they are
  // copied, and vocab_size, bos and eos follow the tokenizer so text prompts work end to end.
  std::filesystem::path tokenizer_dir;
  std::function<void(const std::string&)> progress;  // optional: told about each file written
};

struct MakeModelSummary {
  std::vector<std::filesystem::path> files;  // in writing order, config.json last
  uint64_t total_bytes = 0;                  // all files on disk
  uint64_t tensor_bytes = 0;                 // the index's total_size
  int64_t num_parameters = 0;                // weight elements (block scales not counted)
};

// Writes the checkpoint. Deterministic: the same options give byte-identical files, and the
// BF16 and FP8 checkpoints of one seed hold the same underlying weights (FP8 is their quantization).
MakeModelSummary make_model(const MakeModelOptions& options);

}  // namespace dilu
