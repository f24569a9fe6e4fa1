// The DeepSeek-V3 forward pass described through the op interface: embedding, L decoder layers
// (MLA attention in absorbed form; dense MLP or MoE with a shared expert), final norm, lm_head.
// Owns its weights on the backend's device; per-step data arrives through StepInput.
#pragma once

#include <memory>
#include <unordered_map>
#include <vector>

#include "engine/model_config.h"
#include "engine/safetensors.h"
#include "kernels/ops.h"
#include "parallel/communicator.h"

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
  MlaWeight kv_b;                        // [H*(nope+v), C]: W_UK and W_UV per head (Ops::place_mla_kv_b)
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
  std::vector<ExpertWeights> experts;  // [E / tp] this rank's experts
  std::optional<ExpertWeights> shared_expert;
};

// This rank's share of a tensor-parallel group. Attention heads, the dense and shared MLPs and
// the vocabulary (embedding, lm_head) are split evenly; routed experts are placed whole (rank r
// holds experts [r·E/tp, (r+1)·E/tp)); norms, q_a, kv_a and the router are replicated. Partial
// outputs are summed by one all-reduce after attention and one after the MLP/MoE.
struct TensorParallel {
  int rank = 0;
  int size = 1;
  Communicator* comm = nullptr;  // required when size > 1
};

// The layers a pipeline stage holds: [first_layer, end_layer). The first stage also holds the
// embedding, the last the final norm and lm_head.
struct PipelineStage {
  int64_t first_layer = 0;
  int64_t end_layer = -1;  // -1: through the last layer
  bool is_first() const { return first_layer == 0; }
};

class DeepseekV3 {
 public:
  // Checks the checkpoint against the config (every problem reported at once, by name) and
  // places this rank's share of the weights on the backend (reading only its slices from the
  // memory map). Throws UserError before any compute on a mismatch.
  DeepseekV3(const ModelConfig& config, const Checkpoint& checkpoint, Ops& ops, TensorParallel tp = {},
             PipelineStage stage = {});

  const ModelConfig& config() const { return config_; }
  // An upper bound of the scratch one step of at most `max_tokens` tokens and `max_logit_rows`
  // logits rows needs on a rank of a `tp`-way tensor-parallel group (sizes the GPU arena).
  static int64_t step_scratch_bytes(const ModelConfig& config, int64_t max_tokens, int64_t max_logit_rows, int tp);
  // Bytes of weights this rank holds (its share under tensor parallelism).
  int64_t weight_bytes() const { return weight_bytes_; }
  // Runs every token of the step through the model, writing each token's latent cache entry,
  // and returns the logits [logit_rows, V] (FP32, on the device). With graphs enabled, a decode
  // step's logits stay valid until the next forward().
  Tensor forward(const StepInput& step, KvCache& cache);
  // Decode steps (every token wants its logits) of up to max_tokens tokens run as graphs where
  // the backend captures them (Ops::enable_graphs; single-rank models only): a step shape's
  // second occurrence is captured, later ones replay it. Sets the graphs' scratch aside, so call
  // it before sizing the KV cache from the free memory. Returns whether graphs are on.
  bool enable_graphs(int64_t max_tokens);
  struct GraphCounts {
    int64_t captured = 0;  // step shapes captured
    int64_t replayed = 0;  // steps run as a replay
    int64_t failed = 0;    // step shapes whose capture failed (they run eagerly)
  };
  const GraphCounts& graph_counts() const { return graph_counts_; }
  // The same in pieces, for pipeline stages: the first stage embeds, every stage runs its layers
  // on the hidden states x [T, D] (cache layer i is the stage's i-th layer), the last one applies
  // the head (the logits of step.logit_rows).
  Tensor embed(const StepInput& step);
  void run_layers(Tensor& x, const StepInput& step, KvCache& cache);
  Tensor head(const Tensor& x, const StepInput& step);
  int64_t num_stage_layers() const { return static_cast<int64_t>(layers_.size()); }
  bool is_last_stage() const { return last_stage_; }

 private:
  void attention(int64_t layer, const Tensor& x, const StepInput& step, KvCache& cache, Tensor& out);
  MlaParams mla_params() const;  // this rank's heads
  void mlp(const LayerWeights& lw, const Tensor& x, Tensor& out);

  void all_reduce(Tensor& t);
  Tensor forward_eager(const StepInput& step, KvCache& cache);
  Tensor forward_graph(uint64_t key, const StepInput& step, KvCache& cache);

  // A decode step shape's graph: seen once (not yet captured), captured, or failed to capture.
  struct StepGraph {
    std::shared_ptr<void> exec;
    Tensor logits;  // in the graphs' scratch, rewritten by each replay
    bool failed = false;
  };

  ModelConfig config_;
  Ops& ops_;
  TensorParallel tp_;
  bool first_stage_ = true;
  bool last_stage_ = true;
  int64_t weight_bytes_ = 0;
  int64_t local_heads_ = 0;    // H / tp
  int64_t first_expert_ = 0;   // of the routed experts this rank holds
  int64_t vocab_first_ = 0;    // first token id of this rank's vocabulary shard
  int64_t vocab_shard_ = 0;    // rows per vocabulary shard: ceil(V / tp) (the last one padded)
  RopeTable rope_;
  Tensor embed_tokens_;  // [V / tp, D] this rank's vocabulary rows
  std::vector<LayerWeights> layers_;
  Tensor norm_;          // [D]
  LinearWeight lm_head_; // [ceil(V / tp), D] this rank's vocabulary rows (zero-padded)
  int64_t graph_max_tokens_ = 0;  // 0: no graphs
  GraphCounts graph_counts_;
  std::unordered_map<uint64_t, StepGraph> graphs_;  // by Ops::stage_step's shape key
};

// Checks names, shapes and dtypes of a checkpoint against the config without loading anything;
// returns the list of problems (empty when it matches). MTP layers are ignored. The check stops at
// kCheckpointProblemsMax problems: a config that disagrees with a checkpoint of R1's size (a wrong
// expert count) would otherwise list and format hundreds of thousands.
constexpr size_t kCheckpointProblemsMax = 1000;
std::vector<std::string> check_checkpoint(const ModelConfig& config, const Checkpoint& checkpoint);

}  // namespace dilu
