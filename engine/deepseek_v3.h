// The DeepSeek-V3 forward pass described through the op interface: embedding, L decoder layers
// (MLA attention in absorbed form; dense MLP or MoE with a shared expert), final norm, lm_head.
// Owns its weights on the backend's device; per-step data arrives through StepInput.
#pragma once

#include <memory>
#include <vector>

#include "engine/model_config.h"
#include "engine/safetensors.h"
#include "kernels/ops.h"

namespace dilu {

class KvCache;

struct StepInput {
  std::vector<int32_t> token_ids;    // [T]
  AttentionLayout layout;            // positions, sequences, cache slots
  std::vector<int32_t> logit_rows;   // tokens whose next-token logits are wanted (e.g. each sequence's last)
};

struct AttentionWeights {
  std::optional<LinearWeight> q_a_proj;  // [q_lora_rank, D] (q_lora models)
  Tensor q_a_layernorm;                  // [q_lora_rank]
  LinearWeight q_b_proj;                 // [H*(nope+R), q_lora_rank], or q_proj [H*(nope+R), D]
  LinearWeight kv_a_proj_with_mqa;       // [C + R, D]
  Tensor kv_a_layernorm;                 // [C]
  Tensor kv_b;                           // [H*(nope+v), C] dequantized: W_UK and W_UV per head
  LinearWeight o_proj;                   // [D, H*v]
};

struct LayerWeights {
  Tensor input_layernorm;           // [D]
  Tensor post_attention_layernorm;  // [D]
  AttentionWeights attn;
  bool is_moe = false;
  ExpertWeights mlp;                // dense layers
  Tensor router;                    // [E, D] F32
  Tensor router_bias;               // [E] F32 e_score_correction_bias
  std::vector<ExpertWeights> experts;  // [E]
  std::optional<ExpertWeights> shared_expert;
};

class DeepseekV3 {
 public:
  // Checks the checkpoint against the config (every problem reported at once, by name) and
  // places the weights on the backend. Throws UserError before any compute on a mismatch.
  DeepseekV3(const ModelConfig& config, const Checkpoint& checkpoint, Ops& ops);

  const ModelConfig& config() const { return config_; }
  // Runs every token of the step through the model, writing each token's latent cache entry,
  // and returns the logits [logit_rows, V] (FP32, on the device).
  Tensor forward(const StepInput& step, KvCache& cache);

 private:
  void attention(int64_t layer, const Tensor& x, const StepInput& step, KvCache& cache, Tensor& out);
  void mlp(const LayerWeights& lw, const Tensor& x, Tensor& out);

  ModelConfig config_;
  Ops& ops_;
  RopeTable rope_;
  Tensor embed_tokens_;  // [V, D]
  std::vector<LayerWeights> layers_;
  Tensor norm_;          // [D]
  LinearWeight lm_head_; // [V, D]
};

// Checks names, shapes and dtypes of a checkpoint against the config without loading anything;
// returns the list of problems (empty when it matches). MTP layers are ignored.
std::vector<std::string> check_checkpoint(const ModelConfig& config, const Checkpoint& checkpoint);

}  // namespace dilu
