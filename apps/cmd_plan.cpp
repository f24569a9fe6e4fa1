// `dilu plan`: the parallel layout (TP/PP/DP/EP, layer split) a model needs on a cluster, with
// per-rank memory and a predicted decode rate, or a refusal (exit 2) saying what would fit.
#include <filesystem>
#include <iostream>
#include <memory>

#include <nlohmann/json.hpp>

#include "apps/commands.h"
#include "engine/make_model.h"
#include "engine/model_config.h"
#include "engine/planner.h"
#include "engine/run_config.h"
#include "kernels/error.h"

namespace dilu::app {

namespace {

struct PlanFlags {
  std::string model, config, gpu = "H100-80GB", gpu_memory, dtype;
  int nodes = 1, gpus_per_node = 8;
  int64_t context_len = 0;
  std::vector<std::string> sets;
  bool json = false;
};

// A checkpoint directory's config.json, or a preset's; no weight is read either way.
ModelConfig model_of(const std::string& model) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(model, ec)) return load_model_config(model);
  for (const ModelPreset& p : model_presets())
    if (p.name == model) return preset_config(model);
  std::string presets;
  for (const ModelPreset& p : model_presets()) presets += (presets.empty() ? "" : ", ") + std::string(p.name);
  throw UserError("--model '" + model + "' is neither a checkpoint directory nor a preset (" + presets + ")");
}

int plan(const PlanFlags& f) {
  PlanOptions options;
  std::vector<std::string> sets = f.sets;
  split_parallel_overrides(sets, options);
  std::optional<std::filesystem::path> config_file;
  if (!f.config.empty()) config_file = f.config;
  const RunConfig run = load_run_config(config_file, sets);
  // A YAML file's parallel.* are fixed as well, where they differ from the defaults.
  const ParallelConfig defaults;
  if (!options.tp && run.parallel.tp != defaults.tp) options.tp = run.parallel.tp;
  if (!options.pp && run.parallel.pp != defaults.pp) options.pp = run.parallel.pp;
  if (!options.dp && run.parallel.dp != defaults.dp) options.dp = run.parallel.dp;
  if (!options.ep && run.parallel.ep != defaults.ep) options.ep = run.parallel.ep;
  if (!f.dtype.empty()) options.dtype = parse_weight_dtype(f.dtype);
  options.context_len = f.context_len;

  ClusterShape cluster;
  cluster.nodes = f.nodes;
  cluster.gpus_per_node = f.gpus_per_node;
  cluster.gpu = gpu_type(f.gpu);
  if (!f.gpu_memory.empty()) cluster.gpu.memory_bytes = parse_byte_size(f.gpu_memory, "--gpu-memory");

  const Plan p = plan_layout(model_of(f.model), cluster, run, options);
  if (f.json) std::cout << plan_to_json(p, f.model).dump(2) << "\n";
  else std::cout << format_plan(p, f.model);
  if (!p.feasible) std::cerr << "dilu: plan: " << p.refusal_message() << "\n";
  return p.feasible ? 0 : 2;
}

}  // namespace

void add_plan_command(CLI::App& root, Action& action) {
  auto flags = std::make_shared<PlanFlags>();
  std::string gpus = "GPU type (its memory, HBM/NVLink/IB bandwidths and FP8 support; docs/planner.md):";
  for (const GpuType& t : gpu_types()) gpus += "\n  " + t.name + ": " + t.note;
  CLI::App* cmd = root.add_subcommand(
      "plan", "Choose TP/PP/DP/EP and the layer split for a model on a cluster; print per-rank memory and the\n"
              "predicted decode rate, or refuse (exit 2) with the numbers and what would fit. No weights are read.");
  cmd->add_option("--model", flags->model, "Checkpoint directory (its config.json) or a preset name, e.g. r1-geometry")
      ->required();
  cmd->add_option("--nodes", flags->nodes, "Number of nodes")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--gpus-per-node", flags->gpus_per_node, "GPUs per node")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--gpu", flags->gpu, gpus)->capture_default_str();
  cmd->add_option("--gpu-memory", flags->gpu_memory,
                  "Usable memory per GPU instead of the type's (80GiB, 141GB, 40960MiB; G = GiB)");
  cmd->add_option("--dtype", flags->dtype,
                  "Weights in memory: fp8, soft-fp8 (FP8 bytes, dequantized in the kernel) or bf16; default: the "
                  "checkpoint's, soft-fp8 for FP8 on GPUs without FP8")
      ->check(CLI::IsMember({"fp8", "soft-fp8", "bf16"}));
  cmd->add_option("--context-len", flags->context_len,
                  "Mean tokens cached per sequence while decoding (default: 4096, at most half of model.max_seq_len)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--config", flags->config, "YAML run configuration")->check(CLI::ExistingFile);
  cmd->add_option("--set", flags->sets,
                  "Override one run-config key (repeatable): model.max_seq_len, batch.max_seqs, batch.max_tokens, "
                  "kv.memory_fraction, kv.block_size, kv.num_blocks; parallel.tp/pp/dp/ep fix a value (auto: chosen), "
                  "parallel.layer_split fixes the split")
      ->allow_extra_args(false);
  cmd->add_flag("--json", flags->json, "Print the plan as JSON");
  cmd->callback([flags, &action] { action = [flags] { return plan(*flags); }; });
}

}  // namespace dilu::app
