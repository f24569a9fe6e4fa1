// `dilu bench`: prefill and decode throughput over a list of batch sizes, printed as a table
// with each row's ratio to batch 1 (the baseline batching must beat).
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "apps/commands.h"
#include "engine/bench.h"
#include "engine/run_config.h"
#include "engine/version.h"
#include "kernels/error.h"
#include "kernels/ops.h"
#include "parallel/groups.h"
#include "parallel/world.h"

namespace dilu::app {

namespace {

struct BenchFlags {
  std::string model, config, batch_sizes = "1,8,32", trace_dir;
  std::vector<std::string> sets;
  int64_t input_len = 128, output_len = 128, layers = 0;
  uint64_t seed = 0;
  bool random_weights = false;
  bool no_warmup = false;
};

std::vector<int64_t> parse_sizes(const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      const int64_t v = std::stoll(item, &used);
      DILU_USER_CHECK(used == item.size() && v >= 1, "--batch-sizes: '", item, "' is not a positive integer");
      out.push_back(v);
    } catch (const std::logic_error&) {
      throw UserError("--batch-sizes: '" + item + "' is not a positive integer");
    }
  }
  DILU_USER_CHECK(!out.empty(), "--batch-sizes needs at least one size, e.g. 1,8,32");
  return out;
}

int bench(const BenchFlags& f) {
  std::optional<std::filesystem::path> config_file;
  if (!f.config.empty()) config_file = f.config;
  const RunConfig cfg = load_run_config(config_file, f.sets);
  BenchOptions o;
  o.model_dir = f.model;
  o.batch_sizes = parse_sizes(f.batch_sizes);
  o.input_len = f.input_len;
  o.output_len = f.output_len;
  o.seed = f.seed;
  o.random_weights = f.random_weights;
  o.layers = f.layers;
  o.warmup = !f.no_warmup;
  // Under mpirun/srun, or with traces (named by world rank) or tensor/pipeline parallel, MPI
  // starts: a replica of parallel.tp x parallel.pp ranks benchmarks together (NCCL between GPUs),
  // every further replica on its own (dp = ranks / (tp x pp)), and rank 0 gathers the traces.
  const int tp = cfg.parallel.tp, pp = cfg.parallel.pp;
  const bool launched = std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") || std::getenv("PMIX_RANK");
  std::optional<MpiSession> mpi;
  ParallelGroups groups;
  bool prints = true;  // one table per replica, from its root
  if (!f.trace_dir.empty() || launched || tp * pp * cfg.parallel.dp > 1) {
    int argc = 0;
    char** argv = nullptr;
    mpi.emplace(&argc, &argv);
    const World& world = mpi->world();
    DILU_USER_CHECK(world.size % (tp * pp) == 0, "bench: ", world.size, " ranks are not a multiple of parallel.tp x "
                    "parallel.pp = ", tp * pp, "; launch tp x pp x dp ranks");
    const int dp = world.size / (tp * pp);
    DILU_USER_CHECK(cfg.parallel.dp == 1 || cfg.parallel.dp == dp, "bench: parallel.dp = ", cfg.parallel.dp,
                    " but ", world.size, " ranks at tp ", tp, " x pp ", pp, " make ", dp, " replicas");
    // One GPU per rank, as dilu run does: GPU local_rank mod GPUs (else every rank of a node
    // would measure on GPU 0).
    bind_local_device(world.local_rank);
    groups = make_parallel_groups(world, tp, pp, dp);
    o.groups = &groups;
    o.trace_dir = f.trace_dir;
    prints = groups.is_replica_root();
  }
  if (prints)
    std::cout << "dilu " << version_string() << " bench: model " << f.model << ", backend " << cfg.backend
              << ", input " << o.input_len << " tokens, output " << o.output_len << " tokens, greedy"
              << (o.warmup ? ", each batch size warmed up untimed first" : ", no warm-up")
              << (o.groups ? ", tp " + std::to_string(groups.tp) + " x pp " + std::to_string(groups.pp) + " x dp " +
                                 std::to_string(groups.dp) + " (this table: replica " + std::to_string(groups.dp_rank) +
                                 ")"
                           : std::string())
              << "\n";
  std::vector<BenchRow> rows;
  try {
    rows = run_bench(o, cfg, std::cerr);
  } catch (const std::exception& e) {
    if (!mpi || mpi->world().size == 1) throw;
    // One rank failed: the others may wait in a collective. Say it once and end them all.
    const bool user = dynamic_cast<const UserError*>(&e) != nullptr;
    std::ostringstream msg;
    msg << "dilu: rank " << mpi->world().rank << ": " << (user ? "error: " : "") << e.what() << "\ndilu: stopping all "
        << mpi->world().size << " ranks\n";
    std::cerr << msg.str() << std::flush;
    MpiSession::abort(user ? 2 : 3);
  }
  if (!prints) return 0;
  double base = 0;
  for (const BenchRow& r : rows)
    if (r.batch == 1) base = r.decode_tok_s();
  std::cout << std::fixed << std::setprecision(1) << std::setw(7) << "batch" << std::setw(16) << "prefill tok/s"
            << std::setw(16) << "decode tok/s" << std::setw(16) << "ms/decode step" << std::setw(20)
            << "decode vs batch 1" << "\n";
  for (const BenchRow& r : rows) {
    std::cout << std::setw(7) << r.batch << std::setw(16) << r.prefill_tok_s() << std::setw(16) << r.decode_tok_s()
              << std::setw(16) << std::setprecision(2) << r.ms_per_decode_step() << std::setw(19);
    if (base > 0) std::cout << std::setprecision(2) << r.decode_tok_s() / base << "x";
    else std::cout << "-";
    std::cout << std::setprecision(1) << "\n";
  }
  if (base == 0) std::cout << "(include batch size 1 for the ratio column)\n";
  if (!rows.empty()) {
    const BenchRow& r0 = rows.front();
    std::cout << "\nroofline: decode steps must read every weight once (routed experts: those the step selected, "
                 "counted), the KV cache of each context; measured copy bandwidth "
              << std::setprecision(0) << r0.bandwidth_bytes_s / 1e9 << " GB/s";
    if (r0.gemm_peak_flops > 0)
      std::cout << "; prefill against the best linear() on the model's GEMM shapes, " << std::setprecision(1)
                << r0.gemm_peak_flops / 1e12 << " TFLOP/s";
    std::cout << "\n"
              << std::setw(7) << "batch" << std::setw(18) << "ms/step measured" << std::setw(18) << "ms/step roofline"
              << std::setw(10) << "ratio" << std::setw(16) << "experts/step" << std::setw(18) << "prefill TFLOP/s"
              << std::setw(14) << "of peak" << "\n";
    for (const BenchRow& r : rows) {
      std::cout << std::setw(7) << r.batch << std::setprecision(2) << std::setw(18) << r.ms_per_decode_step()
                << std::setw(18) << 1e3 * r.decode_roofline_seconds / std::max<int64_t>(r.decode_steps, 1)
                << std::setw(9) << r.decode_roofline_ratio() << "x" << std::setprecision(1) << std::setw(16)
                << r.routed_experts_per_step << std::setprecision(2) << std::setw(18) << r.prefill_flops_s() / 1e12;
      if (r.gemm_peak_flops > 0) std::cout << std::setw(13) << 100.0 * r.prefill_flops_s() / r.gemm_peak_flops << "%";
      else std::cout << std::setw(14) << "-";
      std::cout << "\n";
    }
    if (r0.gpus > 1)
      std::cout << "(" << r0.gpus << " GPUs: the roofline is the step's bytes read by all of them at once, each its "
                   "share; experts/step scaled from those rank 0 counted on its shard)\n";
    if (r0.all_reduce_seconds > 0) {
      std::cout << std::setw(7) << "batch" << std::setw(22) << "all-reduce us (1)" << std::setw(26)
                << "all-reduce ms per layer" << std::setw(20) << "share of step" << "\n";
      for (const BenchRow& r : rows) {
        const double per_layer_ms = 2e3 * r.all_reduce_seconds;
        std::cout << std::setw(7) << r.batch << std::setprecision(1) << std::setw(22) << 1e6 * r.all_reduce_seconds
                  << std::setprecision(3) << std::setw(26) << per_layer_ms << std::setprecision(1) << std::setw(19)
                  << 100.0 * per_layer_ms * static_cast<double>(r.layers) / std::max(r.ms_per_decode_step(), 1e-9)
                  << "%\n";
      }
    }
  }
  return 0;
}

}  // namespace

void add_bench_command(CLI::App& root, Action& action) {
  auto flags = std::make_shared<BenchFlags>();
  CLI::App* cmd = root.add_subcommand(
      "bench", "Measure prefill and decode throughput over batch sizes with random prompts (greedy, ignore_eos).");
  cmd->add_option("--model", flags->model,
                  "Checkpoint directory (e.g. one written by dilu make-model), or with --random-weights a preset "
                  "(tiny, r1-geometry)")
      ->required();
  cmd->add_flag("--random-weights", flags->random_weights,
                "No checkpoint file: random weights made on the device in the model's layout (FP8 where R1 has it)");
  cmd->add_option("--layers", flags->layers,
                  "With --random-weights: this many hidden layers (the first dense, the rest MoE for r1-geometry)");
  cmd->add_option("--batch-sizes", flags->batch_sizes, "Comma list of batch sizes (requests run together)")
      ->capture_default_str();
  cmd->add_option("--input-len", flags->input_len, "Prompt tokens per request")->capture_default_str();
  cmd->add_option("--output-len", flags->output_len, "Generated tokens per request")->capture_default_str();
  cmd->add_option("--seed", flags->seed, "Seed of the random prompts")->capture_default_str();
  cmd->add_flag("--no-warmup", flags->no_warmup,
                "Time each batch size's first run too (by default an untimed run with 3 output tokens goes first, "
                "so that algorithm searches and CUDA graph captures stay out of the figures)");
  cmd->add_option("--trace-dir", flags->trace_dir,
                  "Write the trace there: DIR/rank-NNNNN.h5 (steps, requests, the sweep's /bench table) and "
                  "DIR/timeline.json; 'dilu report DIR' plots throughput against batch size (docs/traces.md)");
  cmd->add_option("--config", flags->config, "YAML run configuration")->check(CLI::ExistingFile);
  cmd->add_option("--set", flags->sets, "Override one configuration key (repeatable)")->allow_extra_args(false);
  cmd->callback([flags, &action] { action = [flags] { return bench(*flags); }; });
}

}  // namespace dilu::app
