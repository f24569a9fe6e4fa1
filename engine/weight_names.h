// The one table from checkpoint tensor names (the published DeepSeek-V3/R1 layout) to model
// parameters: each entry's shape, whether R1 stores it as FP8 with a block scale, and (for the
// parallel plan) which dimension a tensor-parallel shard splits.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/model_config.h"
#include "kernels/tensor.h"

namespace dilu {

enum class ShardDim : int8_t { None = -1, Rows = 0, Cols = 1 };

struct WeightSpec {
  std::string name;      // checkpoint name, e.g. "model.layers.3.self_attn.kv_b_proj.weight"
  Shape shape;           // [out, in] for linear weights
  bool fp8_in_r1;        // stored as float8_e4m3fn + "<name>_scale_inv" in FP8 checkpoints
  ShardDim shard;        // how tensor parallelism splits it (None: replicated or expert-placed)
};

// Every tensor of the main model (embedding, layers [0, num_hidden_layers), final norm, lm_head),
// in checkpoint order. MTP layers (index >= num_hidden_layers) are not part of it.
std::vector<WeightSpec> model_weight_specs(const ModelConfig& c);

// The block-scale tensor's name and shape for an FP8 weight.
std::string scale_name(const std::string& weight_name);
Shape scale_shape(const Shape& weight_shape, const FP8Quantization& q);

// Layer index of "model.layers.<i>.", or -1 for other names.
int64_t layer_of(const std::string& name);

}  // namespace dilu
