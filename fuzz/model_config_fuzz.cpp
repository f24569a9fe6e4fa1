// Fuzz target: a checkpoint's config.json, against a real (tiny) checkpoint, through the start-up
// steps `dilu run` takes before any compute: parse and validate the config, the arithmetic sized
// from it (RoPE table, step scratch, pipeline stages, request limits), the check of every tensor
// against it, and placing the weights.
//
// The first input byte picks the checkpoint (tests/golden/data: r1_fp8, v2lite_bf16); the rest is
// config.json. What must hold: a config that disagrees with the tensors, or makes no sense, is
// refused with a UserError (a clear message before compute); nothing else may escape, overflow
// (UBSan) or allocate without bound (libFuzzer's -rss_limit_mb / -malloc_limit_mb).
#include <cstdint>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "engine/deepseek_v3.h"
#include "engine/model_config.h"
#include "engine/planner.h"
#include "engine/request.h"
#include "engine/run_config.h"
#include "engine/safetensors.h"
#include "fuzz/fuzz_util.h"

using namespace dilu;
using json = nlohmann::json;

namespace {

const Checkpoint& checkpoint(int which) {
  static const Checkpoint r1 = Checkpoint::open(fuzz::source_dir() / "tests/golden/data/r1_fp8/model");
  static const Checkpoint v2 = Checkpoint::open(fuzz::source_dir() / "tests/golden/data/v2lite_bf16/model");
  return which ? v2 : r1;
}

Ops& ops() {
  static const std::unique_ptr<Ops> o = make_ops("cpu", 1);
  return *o;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const json j = json::parse(data + 1, data + size, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;  // read_json_file refuses it with a UserError (tested elsewhere)
  ModelConfig mc;
  if (!fuzz::user_errors_only([&] { mc = model_config_from_json(j, "config.json"); })) return 0;

  // What dilu writes for this config reads back.
  fuzz::user_errors_only([&] {
    const ModelConfig again = model_config_from_json(model_config_to_json(mc), "again");
    DILU_FUZZ_ASSERT(again.hidden_size == mc.hidden_size && again.num_hidden_layers == mc.num_hidden_layers,
                     "config.json written by dilu reads back differently");
  });
  const RunConfig run;
  fuzz::user_errors_only([&] {
    (void)mc.softmax_scale();
    (void)request_limits(mc, run);
    (void)DeepseekV3::step_scratch_bytes(mc, run.batch.max_tokens, run.batch.max_seqs, 1);
    (void)stage_layer_counts(mc, run, 1, 1);
  });
  const Checkpoint& ckpt = checkpoint(data[0] & 1);
  std::vector<std::string> problems;
  if (!fuzz::user_errors_only([&] { problems = check_checkpoint(mc, ckpt); })) return 0;
  fuzz::user_errors_only([&] {
    DeepseekV3 model(mc, ckpt, ops());
    DILU_FUZZ_ASSERT(problems.empty(), "a checkpoint with problems was placed");
  });
  return 0;
}
