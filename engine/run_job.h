// `dilu run` as a library call: load the model, stream the input JSONL through the engine,
// append one output line per input line (resuming what an earlier run left). The app only turns
// flags into these options.
#pragma once

#include <atomic>
#include <exception>
#include <filesystem>
#include <iosfwd>
#include <string>
#include <utility>
#include <vector>

#include "engine/model_config.h"
#include "engine/run_config.h"
#include "engine/trace.h"
#include "kernels/error.h"
#include "parallel/groups.h"

namespace dilu {
class Ops;
}

namespace dilu {

struct RunJobOptions {
  std::filesystem::path model_dir;
  std::filesystem::path input;
  std::filesystem::path output;
  bool resume = true;      // keep an existing output and skip the ids it answers
  bool overwrite = false;  // start over: truncate an existing output
  // Set (by a signal handler) to stop: no new work is admitted and the run ends after the
  // current step; requests in flight are left for a resumed run.
  const std::atomic<bool>* stop = nullptr;
  // The ranks of the run; null: a single process. Replica roots (TP rank 0 of stage 0) read
  // their share of the input lines (line k goes to replica (k - 1) mod dp) and write records;
  // the other ranks of a replica follow its steps.
  const ParallelGroups* groups = nullptr;
  // Every rank writes DIR/rank-NNNNN.h5 and rank 0 DIR/timeline.json (docs/traces.md); empty:
  // no files (the end-of-run summary is kept either way).
  std::filesystem::path trace_dir;
};

struct RunSummary {
  int64_t requests_done = 0;
  int64_t requests_failed = 0;
  int64_t requests_skipped = 0;  // answered by an earlier run (resume)
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t steps = 0;
  int64_t preemptions = 0;
  int64_t weight_bytes = 0;  // this rank's share of the weights
  double load_seconds = 0;
  double generate_seconds = 0;
  double wall_seconds = 0;  // the whole call: load and generation
  bool interrupted = false;
  // Rank 0: every rank's load (busy time in steps, communication), in rank order; other ranks:
  // their own.
  std::vector<RankLoad> ranks;
};

// Thrown on the ranks other than 0 when a start-up failure was reported by rank 0: they exit
// without printing it again.
struct SilentFailure : std::exception {
  const char* what() const noexcept override { return "another rank reported the failure"; }
};
// Thrown on rank 0 for a start-up failure every rank agreed on: printed once, no abort needed.
struct AgreedFailure : UserError {
  using UserError::UserError;
};

// The communicators a rank's model and engine use for its TP and PP groups: on the CUDA backend
// NCCL over those groups (device tensors; host bytes still go over MPI), else the MPI groups
// themselves. Collective over each group with more than one rank.
struct DeviceComms {
  std::unique_ptr<Communicator> tp_nccl, pp_nccl;  // owned when NCCL carries the group
  Communicator* tp = nullptr;
  Communicator* pp = nullptr;
};
DeviceComms make_device_comms(const ParallelGroups& groups, Ops& ops, const RunConfig& config);

// This rank's identity in a trace of `command` ("run", "bench").
TraceIdentity trace_identity(const ParallelGroups& groups, const std::string& command);
// [first, end) layers of each pipeline stage (parallel.layer_split, or balanced by weight).
std::vector<std::pair<int64_t, int64_t>> stage_ranges(const ModelConfig& model, const RunConfig& config, int tp,
                                                      int pp);

// Throws UserError before any compute when the model or the files are unusable. With several
// ranks, every rank calls it; the summary's counts are summed over the world.
RunSummary run_job(const RunJobOptions& options, const RunConfig& config, std::ostream& log);

}  // namespace dilu
