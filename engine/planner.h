// The topology planner: from a model config, a cluster shape and a run config (no weights read),
// the TP/PP/DP/EP layout and layer split that fit in GPU memory with the best predicted decode rate.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "engine/model_config.h"
#include "engine/run_config.h"

namespace dilu {

// One GPU model's documented figures (docs/planner.md gives the source of each number).
struct GpuType {
  std::string name;               // "H100-80GB"
  uint64_t memory_bytes = 0;      // HBM usable by CUDA: nvidia-smi's total less the driver's reserve
  double hbm_bytes_per_s = 0;     // peak HBM bandwidth
  double nvlink_bytes_per_s = 0;  // NVLink per GPU, one direction (half the "bidirectional" figure)
  double ib_bytes_per_s = 0;      // inter-node per GPU, one direction (one NIC per GPU)
  double bf16_flops = 0;          // dense tensor-core peak, FLOP/s
  double fp8_flops = 0;           // dense tensor-core peak; 0: no FP8 units (FP8 runs as soft FP8)
  std::string note;               // one line for --help
  bool has_fp8() const { return fp8_flops > 0; }
};
const std::vector<GpuType>& gpu_types();
// The named type; throws UserError listing the valid names.
const GpuType& gpu_type(const std::string& name);

// Where the model runs: flags of `dilu plan`, or the MPI world under `dilu run` (World::num_nodes and
// World::local_size).
struct ClusterShape {
  int nodes = 1;
  int gpus_per_node = 8;
  GpuType gpu = gpu_type("H100-80GB");  // memory_bytes may be overridden (--gpu-memory)
  int total_gpus() const { return nodes * gpus_per_node; }
};

// How linear weights sit in GPU memory. SoftFP8: FP8 bytes + block scales in memory, dequantized
// inside the kernel (GPUs without FP8 units); BF16: every tensor at 2 bytes.
enum class WeightDType { FP8, SoftFP8, BF16 };
std::string_view weight_dtype_name(WeightDType dtype);  // "fp8", "soft-fp8", "bf16"
WeightDType parse_weight_dtype(const std::string& text);  // UserError naming --dtype

struct PlanOptions {
  // Unset: the checkpoint's (FP8 when config.json has quantization_config, else BF16), and soft FP8
  // for an FP8 checkpoint on a GPU without FP8 units.
  std::optional<WeightDType> dtype;
  // Fixed by the user; unset: chosen. RunConfig's ints cannot say "auto", so the caller decides
  // which of its parallel.* values are fixed (see split_parallel_overrides).
  std::optional<int> tp, pp, dp, ep;
  int64_t context_len = 0;  // mean tokens cached per sequence while decoding; 0: 4096, at most max_seq_len / 2
  bool suggest = true;      // on refusal, look for node counts, GPU types and dtypes that fit
};

// Takes parallel.tp/pp/dp/ep out of `--set` overrides: "auto" or 0 leaves the value to the planner
// (and is removed from `overrides`, which load_run_config then accepts); a number fixes it.
void split_parallel_overrides(std::vector<std::string>& overrides, PlanOptions& options);

struct ParallelLayout {
  int tp = 1, pp = 1, dp = 1;
  int ep = 1;  // expert-parallel ranks inside each TP group; each expert split tp/ep ways
  friend bool operator==(const ParallelLayout&, const ParallelLayout&) = default;
};

// One pipeline stage; byte figures are for its heaviest TP rank.
struct StagePlan {
  int64_t first_layer = 0, num_layers = 0;  // layers [first_layer, first_layer + num_layers)
  int64_t num_moe_layers = 0;
  bool has_embedding = false, has_lm_head = false;
  int first_rank = 0;                // world rank of its first TP rank in replica 0
  uint64_t weight_bytes = 0;         // parameters + FP8 block scales held by the rank
  uint64_t expert_bytes = 0;         // the routed experts' part of weight_bytes
  uint64_t runtime_bytes = 0;        // CUDA context, NCCL buffers, cuBLASLt workspace, graphs, slack
  uint64_t activation_bytes = 0;     // activations of batch.max_tokens tokens, and the logits
  uint64_t kv_bytes_per_token = 0;   // num_layers × (kv_lora_rank + qk_rope_head_dim) × 2 (BF16)
  uint64_t kv_bytes = 0;             // the KV cache: kv.memory_fraction of what is left, whole blocks
  int64_t kv_tokens = 0;             // its capacity
  uint64_t needed_bytes = 0;         // weights + workspace + one model.max_seq_len sequence's KV cache
  double step_seconds = 0;           // one micro-batch through this stage
  uint64_t workspace_bytes() const { return runtime_bytes + activation_bytes; }
};

// Per round (every sequence of a replica advances one token), seconds spent on each resource by the
// slowest stage's micro-batches; round_seconds also includes the pipeline bubble.
struct StepCost {
  double weights_s = 0;    // weight bytes read from HBM (experts: only those routed to)
  double kv_s = 0;         // KV-cache bytes read from HBM
  double compute_s = 0;    // tensor-core time where it exceeds the HBM time
  double allreduce_s = 0;  // TP all-reduces over NVLink
  double send_s = 0;       // PP sends (NVLink inside a node, InfiniBand across nodes)
};

struct LayoutPlan {
  ParallelLayout layout;
  std::vector<StagePlan> stages;
  bool fits = false;
  std::string refusal;          // why it does not fit (empty when it does)
  int64_t batch = 0;            // sequences per replica decoded together: batch.max_seqs or what KV holds
  int micro_batches = 1;
  StepCost cost;
  double round_seconds = 0;
  double bubble_factor = 1;     // round_seconds / (micro_batches × mean stage time)
  double tokens_per_s = 0;      // whole cluster: dp × batch / round_seconds
  uint64_t max_needed_bytes() const;
};

struct Plan {
  bool feasible = false;
  ClusterShape cluster;
  WeightDType dtype = WeightDType::FP8;
  int64_t max_seq_len = 0, context_len = 0;
  int64_t num_parameters = 0;        // the main model (MTP layers are not loaded)
  uint64_t model_weight_bytes = 0;   // the whole model in `dtype`, block scales included
  LayoutPlan best;                   // the chosen layout, or (refused) the one that comes closest
  std::vector<LayoutPlan> candidates;      // every layout considered, best first
  std::vector<std::string> suggestions;    // refused: what would fit
  std::string refusal_message() const;     // needed vs available per GPU, and the suggestions
};

// Chooses the layout. Throws UserError for contradictory inputs (a fixed parallel.tp that is not a
// power of two dividing the heads, tp × pp × dp ≠ GPUs, a layer_split that does not sum to the
// layers); a layout that merely does not fit is a refused Plan, not an exception.
Plan plan_layout(const ModelConfig& model, const ClusterShape& cluster, const RunConfig& run,
                 const PlanOptions& options);

// Layers per pipeline stage as `dilu run` places them and the planner predicts them:
// parallel.layer_split when given, else the split that balances the stages' weight bytes (the
// first stage also holds the embedding, the last the final norm and lm_head).
std::vector<int64_t> stage_layer_counts(const ModelConfig& model, const RunConfig& run, int tp, int pp);

// The report `dilu plan` prints, and its JSON form (same content).
std::string format_plan(const Plan& plan, const std::string& model_label);
nlohmann::json plan_to_json(const Plan& plan, const std::string& model_label);

// "80GiB", "141GB", "40960MiB", "96G" (binary), or plain bytes; throws UserError naming `what`.
uint64_t parse_byte_size(const std::string& text, const std::string& what);
std::string human_bytes(uint64_t bytes);  // "79.1 GiB"

}  // namespace dilu
