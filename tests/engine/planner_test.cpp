// The topology planner: per-rank weight bytes of the tiny preset computed by hand, the R1 totals,
// the issue's verdicts for DeepSeek-R1 on H100/H200/H20/A800 clusters, the JSON shape and the CLI.
#include "engine/planner.h"

#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "engine/make_model.h"
#include "kernels/error.h"

namespace dilu {
namespace {

ClusterShape cluster(int nodes, int gpus_per_node, const std::string& gpu) {
  ClusterShape c;
  c.nodes = nodes;
  c.gpus_per_node = gpus_per_node;
  c.gpu = gpu_type(gpu);
  return c;
}

Plan plan_fixed(const ModelConfig& m, const ClusterShape& c, int tp, int pp, WeightDType dtype) {
  PlanOptions o;
  o.tp = tp;
  o.pp = pp;
  o.dtype = dtype;
  return plan_layout(m, c, RunConfig{}, o);
}

// The tiny preset (FP8, 128×128 blocks), by hand. Each FP8 matrix is its elements at 1 byte plus 4
// bytes per 128×128 block it touches; norms and the router at 2 bytes, the router bias at 4.
//   attention, TP-replicated: input/post norms 512 + 512, q_a [96,256] 24576+8, q_a norm 192,
//     kv_a [80,256] 20480+8, kv_a norm 128                                       = 46416
//   attention, TP-split (tp=1 | tp=2 per rank): q_b [384,96] 36876 | 18440, kv_b [512,64] 32784 | 16392,
//     o_proj [256,256] 65552 | 32776 (columns)                          = 135212 | 67608
//   dense MLP gate/up [512,256], down [256,512]: 3 × 131104 | 3 × 65552  = 393312 | 196656
//   MoE: router 8192 + bias 64; 16 experts of 3 × ([128,256] 32768+8) = 98328 each, whole on a rank
//     (tp=2: 8 per rank); shared expert 98328 | 3 × 16392 = 49176
//   embedding and lm_head [1024,256] BF16 524288 | 262144 each; final norm 512
constexpr uint64_t kAttention1 = 46416 + 135212, kAttention2 = 46416 + 67608;
constexpr uint64_t kDense1 = kAttention1 + 393312, kDense2 = kAttention2 + 196656;
constexpr uint64_t kMoe1 = kAttention1 + 8192 + 64 + 16 * 98328 + 98328;
constexpr uint64_t kMoe2 = kAttention2 + 8192 + 64 + 8 * 98328 + 49176;

TEST(Planner, TinyWeightBytesPerRankByHand) {
  const ModelConfig tiny = preset_config("tiny");
  const Plan one = plan_fixed(tiny, cluster(1, 2, "H100-80GB"), 1, 1, WeightDType::FP8);
  ASSERT_TRUE(one.feasible);
  EXPECT_EQ(one.best.layout, (ParallelLayout{1, 1, 2, 1}));
  EXPECT_EQ(one.best.stages[0].weight_bytes, 524288 + kDense1 + 3 * kMoe1 + 512 + 524288);
  EXPECT_EQ(one.best.stages[0].expert_bytes, 3u * 16 * 98328);
  EXPECT_EQ(one.model_weight_bytes, one.best.stages[0].weight_bytes);

  const Plan two = plan_fixed(tiny, cluster(1, 2, "H100-80GB"), 2, 1, WeightDType::FP8);
  ASSERT_TRUE(two.feasible);
  EXPECT_EQ(two.best.layout, (ParallelLayout{2, 1, 1, 2}));
  EXPECT_EQ(two.best.stages[0].weight_bytes, 262144 + kDense2 + 3 * kMoe2 + 512 + 262144);
  // KV per token: 4 layers × (64 + 16) × 2 bytes, the same on both TP ranks (MLA's latent is shared).
  EXPECT_EQ(two.best.stages[0].kv_bytes_per_token, 640u);
}

TEST(Planner, TinyPipelineSplitBalancesBytes) {
  // Stages [0,2) and [2,4): embedding + dense + MoE = 2960688 vs 2 MoE + norm + lm_head = 4247720;
  // 1|3 (6109180) and 3|1 (4822148) are heavier.
  const Plan p = plan_fixed(preset_config("tiny"), cluster(1, 2, "H100-80GB"), 1, 2, WeightDType::FP8);
  ASSERT_TRUE(p.feasible);
  ASSERT_EQ(p.best.stages.size(), 2u);
  EXPECT_EQ(p.best.stages[0].num_layers, 2);
  EXPECT_EQ(p.best.stages[0].weight_bytes, 524288 + kDense1 + kMoe1);
  EXPECT_EQ(p.best.stages[1].weight_bytes, 2 * kMoe1 + 512 + 524288);
  EXPECT_TRUE(p.best.stages[0].has_embedding);
  EXPECT_TRUE(p.best.stages[1].has_lm_head);
  EXPECT_EQ(p.best.stages[1].first_rank, 1);
}

TEST(Planner, WholeModelBytesMatchMakeModelCheckpoints) {
  // make-model's index total_size is what the checkpoint files hold, tensor by tensor.
  for (const auto& [dtype, ckpt] : {std::pair{WeightDType::FP8, CheckpointDType::FP8},
                                    std::pair{WeightDType::BF16, CheckpointDType::BF16}}) {
    MakeModelOptions o;
    o.preset = "tiny";
    o.dtype = ckpt;
    o.out_dir = std::filesystem::path(::testing::TempDir()) / ("planner_tiny_" + std::string(weight_dtype_name(dtype)));
    o.force = true;
    const MakeModelSummary written = make_model(o);
    const Plan p = plan_fixed(preset_config("tiny"), cluster(1, 1, "H100-80GB"), 1, 1, dtype);
    EXPECT_EQ(p.model_weight_bytes, written.tensor_bytes) << weight_dtype_name(dtype);
    EXPECT_EQ(p.num_parameters, written.num_parameters);
  }
}

TEST(Planner, R1TotalsLandOnThePublishedSizes) {
  const ModelConfig r1 = preset_config("r1-geometry");
  // The published FP8 checkpoint is ~689 GB: these 673 GB of the main model plus ~16 GB of the MTP
  // layer (its own MoE layer, embedding and head), which dilu does not load.
  const Plan fp8 = plan_layout(r1, cluster(1, 8, "H200-141GB"), RunConfig{}, PlanOptions{});
  EXPECT_EQ(fp8.dtype, WeightDType::FP8);
  EXPECT_GT(fp8.model_weight_bytes, 665e9);
  EXPECT_LT(fp8.model_weight_bytes, 680e9);
  EXPECT_NEAR(fp8.num_parameters / 1e9, 671.0, 1.0);
  PlanOptions bf16;
  bf16.dtype = WeightDType::BF16;
  const Plan b = plan_layout(r1, cluster(6, 8, "A800-40GB"), RunConfig{}, bf16);
  EXPECT_GT(b.model_weight_bytes, 1.33e12);
  EXPECT_LT(b.model_weight_bytes, 1.35e12);
}

struct Verdict {
  int nodes;
  const char* gpu;
  std::optional<WeightDType> dtype;
  bool fits;
};

TEST(Planner, R1VerdictsOfTheIssue) {
  const ModelConfig r1 = preset_config("r1-geometry");
  const Verdict cases[] = {
      {1, "H100-80GB", WeightDType::FP8, false}, {1, "H200-141GB", WeightDType::FP8, true},
      {2, "H100-80GB", WeightDType::FP8, true},  {2, "H20-96GB", WeightDType::FP8, true},
      {3, "A800-40GB", WeightDType::SoftFP8, true}, {3, "A800-40GB", std::nullopt, true},  // soft FP8 by default
      {3, "A800-40GB", WeightDType::BF16, false}, {6, "A800-40GB", WeightDType::BF16, true},
  };
  for (const Verdict& v : cases) {
    PlanOptions o;
    o.dtype = v.dtype;
    const Plan p = plan_layout(r1, cluster(v.nodes, 8, v.gpu), RunConfig{}, o);
    const std::string label = std::to_string(v.nodes) + " × 8 × " + v.gpu;
    EXPECT_EQ(p.feasible, v.fits) << label << "\n" << format_plan(p, "r1");
    if (p.feasible) {
      EXPECT_GT(p.best.tokens_per_s, 0) << label;
      for (const StagePlan& st : p.best.stages) EXPECT_GE(st.kv_tokens, p.max_seq_len) << label;
    } else {
      EXPECT_GT(p.best.max_needed_bytes(), p.cluster.gpu.memory_bytes) << label;
      EXPECT_FALSE(p.suggestions.empty()) << label;
    }
  }
}

TEST(Planner, R1OnOneH100NodeFailsOnWeightsPlusOverheadAndSuggestsWhatFits) {
  const Plan p = plan_layout(preset_config("r1-geometry"), cluster(1, 8, "H100-80GB"), RunConfig{}, PlanOptions{});
  ASSERT_FALSE(p.feasible);
  // Every TP-8 rank holds 1/8 of the model plus the replicated norms, q_a and kv_a: 79.3 GiB, under
  // the nominal 80 GiB and a hair over the 79.2 GiB CUDA can use; the runtime overhead settles it.
  const auto tp8 = std::find_if(p.candidates.begin(), p.candidates.end(),
                                [](const LayoutPlan& l) { return l.layout.tp == 8 && l.layout.pp == 1; });
  ASSERT_NE(tp8, p.candidates.end());
  EXPECT_LT(tp8->stages[0].weight_bytes, 80ull << 30);
  EXPECT_LT(tp8->stages[0].weight_bytes, p.cluster.gpu.memory_bytes + (1ull << 30));
  EXPECT_GT(tp8->stages[0].weight_bytes + tp8->stages[0].workspace_bytes(), p.cluster.gpu.memory_bytes);
  const std::string message = p.refusal_message();
  EXPECT_NE(message.find("needed per GPU"), std::string::npos) << message;
  EXPECT_NE(message.find("available per GPU 79.2 GiB"), std::string::npos) << message;
  EXPECT_NE(message.find("2 nodes × 8 × H100-80GB fit"), std::string::npos) << message;
  EXPECT_NE(message.find("H200-141GB"), std::string::npos) << message;
}

TEST(Planner, ChosenLayoutOnTwoH100NodesSpansBothWithTpInsideANode) {
  const Plan p = plan_layout(preset_config("r1-geometry"), cluster(2, 8, "H100-80GB"), RunConfig{}, PlanOptions{});
  ASSERT_TRUE(p.feasible);
  EXPECT_EQ(p.best.layout, (ParallelLayout{8, 2, 1, 8}));
  int64_t layers = 0;
  for (const StagePlan& st : p.best.stages) layers += st.num_layers;
  EXPECT_EQ(layers, 61);
}

TEST(Planner, FixedValuesAreHonouredAndContradictionsRefused) {
  const ModelConfig r1 = preset_config("r1-geometry");
  PlanOptions o;
  o.tp = 4;
  const Plan p = plan_layout(r1, cluster(2, 8, "H100-80GB"), RunConfig{}, o);
  for (const LayoutPlan& l : p.candidates) EXPECT_EQ(l.layout.tp, 4);
  o.tp = 16;
  EXPECT_THROW(plan_layout(r1, cluster(2, 8, "H100-80GB"), RunConfig{}, o), UserError);
  o.tp = 3;
  EXPECT_THROW(plan_layout(r1, cluster(2, 8, "H100-80GB"), RunConfig{}, o), UserError);
  o = PlanOptions{};
  o.dtype = WeightDType::FP8;
  EXPECT_THROW(plan_layout(r1, cluster(3, 8, "A800-40GB"), RunConfig{}, o), UserError);  // no FP8 units
  RunConfig run;
  run.parallel.layer_split = "30,30";
  o = PlanOptions{};
  EXPECT_THROW(plan_layout(r1, cluster(2, 8, "H100-80GB"), run, o), UserError);  // 60 of 61 layers
  run.parallel.layer_split = "30,31";
  const Plan split = plan_layout(r1, cluster(2, 8, "H100-80GB"), run, o);
  ASSERT_TRUE(split.feasible);
  EXPECT_EQ(split.best.stages[0].num_layers, 30);
}

TEST(Planner, SplitParallelOverrides) {
  std::vector<std::string> sets = {"parallel.tp=auto", "parallel.pp=2", "parallel.dp=0", "batch.max_seqs=64"};
  PlanOptions o;
  split_parallel_overrides(sets, o);
  EXPECT_FALSE(o.tp);
  EXPECT_EQ(o.pp, 2);
  EXPECT_FALSE(o.dp);
  EXPECT_EQ(sets, (std::vector<std::string>{"parallel.pp=2", "batch.max_seqs=64"}));
  sets = {"parallel.tp=eight"};
  EXPECT_THROW(split_parallel_overrides(sets, o), UserError);
}

TEST(Planner, ByteSizes) {
  EXPECT_EQ(parse_byte_size("80GiB", "--gpu-memory"), 80ull << 30);
  EXPECT_EQ(parse_byte_size("96G", "--gpu-memory"), 96ull << 30);
  EXPECT_EQ(parse_byte_size("141GB", "--gpu-memory"), 141000000000ull);
  EXPECT_EQ(parse_byte_size("40960MiB", "--gpu-memory"), 40ull << 30);
  EXPECT_THROW(parse_byte_size("lots", "--gpu-memory"), UserError);
  EXPECT_THROW(parse_byte_size("-1G", "--gpu-memory"), UserError);
}

TEST(Planner, GpuMemoryOverrideDecides) {
  ClusterShape c = cluster(1, 8, "H100-80GB");
  c.gpu.memory_bytes = 141ull << 30;
  EXPECT_TRUE(plan_layout(preset_config("r1-geometry"), c, RunConfig{}, PlanOptions{}).feasible);
}

TEST(Planner, JsonShape) {
  const Plan ok = plan_layout(preset_config("r1-geometry"), cluster(2, 8, "H100-80GB"), RunConfig{}, PlanOptions{});
  const nlohmann::json j = plan_to_json(ok, "r1-geometry");
  EXPECT_EQ(j["feasible"], true);
  EXPECT_EQ(j["dtype"], "fp8");
  EXPECT_EQ(j["cluster"]["gpu"], "H100-80GB");
  EXPECT_EQ(j["plan"]["tp"], 8);
  EXPECT_EQ(j["plan"]["pp"], 2);
  EXPECT_EQ(j["plan"]["stages"].size(), 2u);
  for (const char* key : {"weight_bytes", "workspace_bytes", "kv_bytes", "kv_tokens", "needed_bytes"})
    EXPECT_TRUE(j["plan"]["stages"][0].contains(key)) << key;
  EXPECT_GT(j["plan"]["tokens_per_s"].get<double>(), 0);
  EXPECT_GT(j["plan"]["tokens_per_s_per_gpu"].get<double>(), 0);
  EXPECT_FALSE(j.contains("suggestions"));

  const Plan refused = plan_layout(preset_config("r1-geometry"), cluster(1, 8, "H100-80GB"), RunConfig{}, PlanOptions{});
  const nlohmann::json r = plan_to_json(refused, "r1-geometry");
  EXPECT_EQ(r["feasible"], false);
  EXPECT_GT(r["needed_bytes_per_gpu"].get<uint64_t>(), r["available_bytes_per_gpu"].get<uint64_t>());
  EXPECT_FALSE(r["suggestions"].empty());
  EXPECT_EQ(r["plan"]["fits"], false);
}

// `dilu plan` itself: exit code 2 and the numbers on a refusal, 0 and the layout when it fits.
std::pair<int, std::string> run_dilu(const std::string& args) {
  const std::string command = std::string(DILU_BINARY) + " " + args + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  std::string out;
  char buffer[4096];
  for (size_t n; (n = fread(buffer, 1, sizeof buffer, pipe)) > 0;) out.append(buffer, n);
  const int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

TEST(PlanCommand, RefusesR1OnOneH100NodeWithTheNumbers) {
  const auto [code, out] = run_dilu("plan --model r1-geometry --nodes 1 --gpus-per-node 8 --gpu H100-80GB");
  EXPECT_EQ(code, 2) << out;
  for (const char* text : {"refused", "needed per GPU", "available per GPU 79.2 GiB", "2 nodes × 8 × H100-80GB fit"})
    EXPECT_NE(out.find(text), std::string::npos) << text << "\n" << out;
}

TEST(PlanCommand, JsonOfAFittingPlan) {
  const auto [code, out] = run_dilu("plan --model r1-geometry --nodes 1 --gpu H200-141GB --json --set batch.max_seqs=64");
  ASSERT_EQ(code, 0) << out;
  const nlohmann::json j = nlohmann::json::parse(out);
  EXPECT_EQ(j["feasible"], true);
  EXPECT_EQ(j["plan"]["tp"].get<int>() * j["plan"]["pp"].get<int>() * j["plan"]["dp"].get<int>(), 8);
}

TEST(PlanCommand, UserMistakesExitTwo) {
  EXPECT_EQ(run_dilu("plan --model no-such-model").first, 2);
  EXPECT_EQ(run_dilu("plan --model tiny --gpu B300").first, 2);
  EXPECT_EQ(run_dilu("plan --model tiny --set parallel.tp=16").first, 2);
}

}  // namespace
}  // namespace dilu
