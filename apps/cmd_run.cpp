// `dilu run`: flags -> typed configs -> engine::run_job, then the end-of-run summary.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "apps/commands.h"
#include "engine/jsonl_writer.h"
#include "engine/model_config.h"
#include "engine/planner.h"
#include "engine/run_config.h"
#include "engine/run_job.h"
#include "engine/version.h"
#include "kernels/ops.h"
#include "kernels/error.h"
#include "parallel/groups.h"
#include "parallel/world.h"

namespace dilu::app {

namespace {

// The CPU backend's "device" for the planner: each rank's share of the host's free memory and
// a typical host memory bandwidth; no FP8 units (FP8 weights stay FP8 and are dequantized).
GpuType host_as_device(int ranks_on_node) {
  GpuType t;
  t.name = "host-cpu";
  t.memory_bytes = static_cast<uint64_t>(sysconf(_SC_AVPHYS_PAGES)) * static_cast<uint64_t>(sysconf(_SC_PAGESIZE)) /
                   static_cast<uint64_t>(std::max(ranks_on_node, 1));
  t.hbm_bytes_per_s = 20e9;
  t.nvlink_bytes_per_s = 10e9;
  t.ib_bytes_per_s = 10e9;
  t.bf16_flops = 1e11;
  t.note = "this machine's memory, shared by the ranks on it";
  return t;
}

// The planner's view of this rank's GPU: the closest known type (its bandwidths and peaks) with
// the memory the device has free now. nullopt: no GPU, or the CPU backend was asked for.
std::optional<GpuType> local_gpu_as_device(const std::string& backend) {
  if (backend == "cpu") return std::nullopt;
  const std::optional<LocalGpu> g = local_gpu();
  if (!g) return std::nullopt;
  const std::string& n = g->name;
  const char* closest = "H100-80GB";
  if (n.find("H200") != std::string::npos) closest = "H200-141GB";
  else if (n.find("H800") != std::string::npos) closest = "H800-80GB";
  else if (n.find("H20") != std::string::npos) closest = "H20-96GB";
  else if (n.find("A800") != std::string::npos) closest = "A800-40GB";
  else if (n.find("A100") != std::string::npos) closest = g->total_bytes > (60ull << 30) ? "A100-80GB" : "A100-40GB";
  GpuType t = gpu_type(closest);
  t.memory_bytes = g->free_bytes;
  t.note = n + " (as " + t.name + "), the memory free on it now";
  t.name = n;
  return t;
}

struct RunFlags {
  std::string model, input, output, config, trace_dir;
  std::vector<std::string> sets;
  bool overwrite = false;
  bool no_resume = false;
};

// SIGINT / SIGTERM (Slurm's warning before a time limit) ask the run to stop cleanly; a second
// one ends the process at once.
std::atomic<bool> g_stop{false};
std::atomic<int> g_signal{0};
extern "C" void on_stop_signal(int sig) {
  if (g_stop.exchange(true)) std::_Exit(128 + sig);
  g_signal = sig;
}

std::string keys_help() {
  std::string s = "Run configuration keys (set in --config YAML or with --set key=value):\n";
  for (const RunConfigKey& k : run_config_keys())
    s += "  " + k.key + std::string(k.key.size() < 22 ? 22 - k.key.size() : 1, ' ') + k.type + " = " +
         k.default_value + "  " + k.help + "\n";
  return s;
}

int run(const RunFlags& f) {
  // First, so that a stop request during start-up is honoured too.
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
  int argc = 0;
  char** argv = nullptr;
  MpiSession mpi(&argc, &argv);
  const World& world = mpi.world();
  std::optional<std::filesystem::path> config_file;
  if (!f.config.empty()) config_file = f.config;
  // parallel.* = auto (or 0) leaves the layout to the planner, sized for this world.
  std::vector<std::string> sets = f.sets;
  PlanOptions plan_options;
  const size_t given = sets.size();
  split_parallel_overrides(sets, plan_options);
  const bool wants_plan = sets.size() != given;
  RunConfig cfg = load_run_config(config_file, sets);
  const int device = bind_local_device(world.local_rank);
  if (wants_plan) {
    const ModelConfig mc = load_model_config(f.model);
    // On GPUs the planner sizes the layout for this GPU; on the CPU backend for this host's
    // memory, shared by the ranks on it.
    const std::optional<GpuType> gpu = local_gpu_as_device(cfg.backend);
    ClusterShape cluster{world.num_nodes, world.local_size, gpu ? *gpu : host_as_device(world.local_size)};
    if (plan_options.tp) cfg.parallel.tp = *plan_options.tp;
    const Plan plan = plan_layout(mc, cluster, cfg, plan_options);
    DILU_USER_CHECK(plan.feasible, plan.refusal_message());
    const ParallelLayout& l = plan.best.layout;
    sets.push_back("parallel.tp=" + std::to_string(l.tp));
    sets.push_back("parallel.pp=" + std::to_string(l.pp));
    sets.push_back("parallel.dp=" + std::to_string(l.dp));
    cfg = load_run_config(config_file, sets);
    if (world.is_root())
      std::cout << "dilu: planner chose tp " << l.tp << " x pp " << l.pp << " x dp " << l.dp << " for " << world.size
                << " ranks on " << world.num_nodes << " node(s)\n";
  }
  const ParallelGroups groups = make_parallel_groups(world, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp);
  if (world.is_root())
    std::cout << "dilu " << version_string() << " | " << world.str() << " | tp " << groups.tp << ", pp " << groups.pp
              << ", dp " << groups.dp << (device >= 0 ? " | GPU " + std::to_string(device) + " per local rank" : std::string())
              << "\n"
              << "resolved run configuration:\n" << run_config_to_yaml(cfg) << std::flush;

  RunJobOptions o;
  o.model_dir = f.model;
  o.input = f.input;
  o.output = f.output;
  o.overwrite = f.overwrite;
  o.resume = !f.no_resume;
  o.stop = &g_stop;
  o.groups = &groups;
  o.trace_dir = f.trace_dir;
  RunSummary s;
  try {
    s = run_job(o, cfg, std::cerr);
  } catch (const SilentFailure&) {
    return 2;  // rank 0 reports it
  } catch (const AgreedFailure&) {
    throw;  // every rank stops by itself; main prints it once
  } catch (const std::exception& e) {
    if (world.size == 1) throw;
    // One rank failed: say so once, from that rank, and end every rank so that none waits in a
    // collective. Records already written stay valid for a resumed run.
    const bool user = dynamic_cast<const UserError*>(&e) != nullptr;
    const bool output = dynamic_cast<const OutputError*>(&e) != nullptr;
    std::cerr << "dilu: rank " << world.rank << " (" << world.hostname << "): " << (user ? "error: " : "") << e.what()
              << "\ndilu: stopping all " << world.size << " ranks\n"
              << std::flush;
    MpiSession::abort(output ? 4 : user ? 2 : 3);
  }
  // Each rank's share of the weights and its peak resident memory (VmHWM), for the record.
  {
    std::ifstream status("/proc/self/status");
    std::string line, hwm = "?";
    while (std::getline(status, line))
      if (line.rfind("VmHWM:", 0) == 0) hwm = line.substr(6);
    // One write per line: ranks share the launcher's stream, and a line written in pieces
    // interleaves with another rank's.
    const size_t first = hwm.find_first_not_of(" \t");
    std::ostringstream msg;
    msg << "dilu: rank " << world.rank << ": weights " << (s.weight_bytes >> 10) << " KiB, peak resident memory "
        << (first == std::string::npos ? hwm : hwm.substr(first)) << "\n";
    std::cerr << msg.str() << std::flush;
  }
  // Counts of every replica, summed on rank 0.
  s.requests_done = groups.world_comm->sum(s.requests_done);
  s.requests_failed = groups.world_comm->sum(s.requests_failed);
  s.requests_skipped = groups.world_comm->sum(s.requests_skipped);
  s.prompt_tokens = groups.world_comm->sum(s.prompt_tokens);
  s.completion_tokens = groups.world_comm->sum(s.completion_tokens);
  s.preemptions = groups.world_comm->sum(s.preemptions);
  s.interrupted = groups.world_comm->sum(s.interrupted ? 1 : 0) > 0;
  if (!world.is_root()) return s.interrupted ? 128 + g_signal.load() : (s.requests_failed > 0 ? 1 : 0);
  const double gen = std::max(s.generate_seconds, 1e-9);
  std::cout << std::fixed << std::setprecision(1) << "dilu: done: " << s.requests_done << " requests, "
            << s.requests_failed << " failed, " << s.requests_skipped << " skipped (answered earlier); "
            << s.prompt_tokens << " prompt tokens (" << s.prompt_tokens / gen
            << " tok/s), " << s.completion_tokens << " completion tokens (" << s.completion_tokens / gen
            << " tok/s); " << s.steps << " steps, " << s.preemptions << " preemptions; load " << s.load_seconds << " s, generation " << s.generate_seconds << " s, wall " << s.wall_seconds << " s; output "
            << f.output << "\n";
  // The slowest rank: the most time busy in steps (compute and host work; waiting in collectives
  // and for pipeline stages excluded), against the least busy one.
  if (!s.ranks.empty()) {
    auto busy_less = [](const RankLoad& a, const RankLoad& b) { return a.busy_s < b.busy_s; };
    const RankLoad& slow = *std::max_element(s.ranks.begin(), s.ranks.end(), busy_less);
    const RankLoad& fast = *std::min_element(s.ranks.begin(), s.ranks.end(), busy_less);
    std::cout << std::setprecision(2) << "dilu: slowest rank " << slow.rank << " (" << slow.hostname << "): busy "
              << slow.busy_s << " s, " << std::setprecision(0) << 100 * slow.busy_s / gen << "% of generation";
    if (s.ranks.size() > 1)
      std::cout << std::setprecision(2) << "; least busy rank " << fast.rank << ": " << fast.busy_s << " s ("
                << std::setprecision(0) << 100 * fast.busy_s / gen << "%)";
    std::cout << "\n";
  }
  if (!f.trace_dir.empty())
    std::cout << "dilu: traces in " << f.trace_dir << " (rank-*.h5, timeline.json); tables and plots: dilu report "
              << f.trace_dir << "\n";
  if (s.interrupted) {
    std::cerr << "dilu: stopped by signal " << g_signal.load() << "; finished requests are in " << f.output
              << ", run the same command again to resume\n";
    return 128 + g_signal.load();
  }
  if (s.requests_failed > 0) {
    std::cerr << "dilu: " << s.requests_failed << " input line(s) failed; their error records are in " << f.output
              << "\n";
    return 1;
  }
  return 0;
}

}  // namespace

void add_run_command(CLI::App& root, Action& action) {
  auto flags = std::make_shared<RunFlags>();
  CLI::App* cmd = root.add_subcommand("run", "Generate completions for every line of a JSONL prompts file.");
  cmd->add_option("--model", flags->model, "Hugging Face checkpoint directory (config.json + *.safetensors)")
      ->required();
  cmd->add_option("--input", flags->input,
                  "JSONL input, one request per line: {\"id\", \"prompt\" | \"messages\" | \"prompt_token_ids\", "
                  "\"max_tokens\", \"temperature\", \"top_p\", \"top_k\", \"min_p\", \"seed\", \"n\", \"stop\", "
                  "\"stop_token_ids\", \"ignore_eos\", \"logprobs\", \"top_logprobs\"}, or OpenAI Batch API lines "
                  "{\"custom_id\", \"method\", \"url\", \"body\"}")
      ->required();
  cmd->add_option("--output", flags->output,
                  "JSONL output, one record per input line, in completion order: {\"id\", \"text\", \"token_ids\", "
                  "\"finish_reason\", \"usage\"}, an OpenAI Batch response for Batch lines, or {\"id\", \"error\"}. "
                  "If it exists, the run resumes: lines it answers are skipped")
      ->required();
  cmd->add_option("--trace-dir", flags->trace_dir,
                  "Write per-rank traces there: DIR/rank-NNNNN.h5 (steps, requests, attributes) and DIR/timeline.json "
                  "(open in ui.perfetto.dev); 'dilu report DIR' turns them into tables and plots (docs/traces.md)");
  cmd->add_flag("--overwrite", flags->overwrite, "Start over: truncate an existing output instead of resuming");
  cmd->add_flag("--no-resume", flags->no_resume, "Refuse an existing non-empty output instead of resuming");
  cmd->add_option("--config", flags->config, "YAML run configuration (see configs/runs/default.yaml)")
      ->check(CLI::ExistingFile);
  cmd->add_option("--set", flags->sets,
                  "Override one configuration key, e.g. --set kv.block_size=32 (repeatable); parallel.tp/pp/dp=auto "
                  "lets the planner choose for the ranks launched")
      ->allow_extra_args(false);
  cmd->footer(keys_help());
  cmd->callback([flags, &action] { action = [flags] { return run(*flags); }; });
}

}  // namespace dilu::app
