// `dilu make-model`: writes a random-weight checkpoint of a named preset in DeepSeek-R1's
// published layout, so the whole pipeline can be run and benchmarked without downloading weights.
#include <cstdio>
#include <memory>
#include <string>

#include "apps/commands.h"
#include "engine/make_model.h"
#include "engine/planner.h"

namespace dilu::app {

void add_make_model_command(CLI::App& root, Action& action) {
  std::string presets_help = "Model preset (required), one of:";
  for (const ModelPreset& p : model_presets())
    presets_help += "\n  " + std::string(p.name) + ": " + std::string(p.description);

  CLI::App* cmd = root.add_subcommand(
      "make-model",
      "Write a random-weight checkpoint of a preset in DeepSeek-R1's layout (config.json, sharded\n"
      "safetensors, model.safetensors.index.json), for tests, demos and benchmarks.");
  auto opts = std::make_shared<MakeModelOptions>();
  auto dtype = std::make_shared<std::string>("fp8");
  cmd->add_option("--preset", opts->preset, presets_help)->required();
  cmd->add_option("--out", opts->out_dir, "Directory to write (created; must be empty unless --force)")
      ->required();
  cmd->add_option("--dtype", *dtype,
                  "fp8: FP8 e4m3 linear weights with 128x128 block scales, as R1 ships; bf16: all BF16")
      ->check(CLI::IsMember({"bf16", "fp8"}))
      ->capture_default_str();
  cmd->add_option("--seed", opts->seed, "Seed of the random weights (same seed, same bytes)")->capture_default_str();
  cmd->add_option("--layers", opts->layers,
                  "Number of hidden layers instead of the preset's (for slices of r1-geometry; with fewer "
                  "layers than the dense prefix + 1, only layer 0 is dense)")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--force", opts->force, "Write into a non-empty directory, replacing a checkpoint there");
  cmd->add_option("--tokenizer", opts->tokenizer_dir,
                  "Directory with tokenizer.json and tokenizer_config.json to ship with the model (vocab_size, bos "
                  "and eos follow it), so that text prompts and chat messages work");

  cmd->callback([&action, opts, dtype] {
    action = [opts, dtype] {
      MakeModelOptions o = *opts;
      o.dtype = *dtype == "bf16" ? CheckpointDType::BF16 : CheckpointDType::FP8;
      o.progress = [](const std::string& line) {
        std::printf("%s\n", line.c_str());
        std::fflush(stdout);
      };
      const MakeModelSummary s = make_model(o);
      std::printf("%s checkpoint of preset %s (seed %llu) in %s: %zu files, %s (%llu bytes), %lld parameters\n",
                  *dtype == "bf16" ? "BF16" : "FP8", o.preset.c_str(), static_cast<unsigned long long>(o.seed),
                  o.out_dir.string().c_str(), s.files.size(), human_bytes(s.total_bytes).c_str(),
                  static_cast<unsigned long long>(s.total_bytes), static_cast<long long>(s.num_parameters));
      return 0;
    };
  });
}

}  // namespace dilu::app
