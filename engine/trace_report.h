// `dilu report` as a library call: reads trace directories (DIR/rank-*.h5), computes the
// summary of each (throughput, time to first token and latency percentiles, per-rank busy
// fractions, pipeline bubbles, replica imbalance, the bench sweep) and the scaling across them,
// and formats the tables. The plots are drawn from summary.json by scripts/report.py.
#pragma once

#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/trace_hdf5.h"

namespace dilu {

// Every rank file of a directory, in world-rank order.
struct TraceDir {
  std::filesystem::path dir;
  std::string label;  // the directory's name (made unique among several)
  std::vector<TraceFileData> ranks;
};

// UserError when DIR holds no rank-*.h5 file or one is not a dilu trace.
TraceDir read_trace_dir(const std::filesystem::path& dir, bool with_events = false);

inline constexpr double kNotApplicable = std::numeric_limits<double>::quiet_NaN();

struct Percentiles {
  int64_t count = 0;
  double p50 = kNotApplicable, p90 = kNotApplicable, p99 = kNotApplicable, max = kNotApplicable;
};
// Linear interpolation between the closest ranks (numpy's default).
Percentiles percentiles(std::vector<double> values);

struct RankStats {
  int rank = 0;
  std::string hostname;
  int tp_rank = 0, pp_rank = 0, dp_rank = 0;
  int64_t steps = 0;
  // Fractions of the directory's wall time (span), each rank's sums over its steps.
  double busy = 0, compute = 0, comm = 0, pipeline = 0, host = 0;
  double mean_step_ms = 0;
  int64_t kv_blocks_peak = 0, kv_blocks_total = 0, memory_peak_bytes = 0;
};

struct BenchPoint {
  int64_t batch = 0;
  double prefill_tok_s = 0, decode_tok_s = 0, ms_per_decode_step = 0;
};

struct DirStats {
  std::string label, dir, command, device, dilu_version;
  int world_size = 1, ranks_found = 0, num_nodes = 1, tp = 1, pp = 1, dp = 1;
  double span_s = 0;  // first step (or request) to the last, over every rank
  double load_s = 0;  // the slowest rank's load
  int64_t requests = 0, requests_failed = 0, input_tokens = 0, output_tokens = 0, steps = 0;
  double input_tok_s = 0, output_tok_s = 0, requests_s = 0;
  Percentiles ttft_s, latency_s;  // seconds
  double mean_batch = 0, mean_step_ms = 0;
  std::vector<RankStats> ranks;
  int slowest_rank = 0;            // the most busy
  double pipeline_bubble = kNotApplicable;  // pp > 1: time stages wait for each other / their step time
  double replica_token_imbalance = kNotApplicable;  // dp > 1: max / mean output tokens of a replica - 1
  double replica_finish_spread = kNotApplicable;    // dp > 1: (last replica done - first done) / span
  std::vector<BenchPoint> bench;
  std::vector<std::string> notes;  // what is missing or cut (missing rank files, truncated spans)
  std::vector<std::string> files;  // the rank files read
};

DirStats summarize(const TraceDir& t);

// The scaling table across directories: each against the one with the fewest ranks.
struct ScalingRow {
  std::string label;
  int ranks = 1, nodes = 1;
  double output_tok_s = 0, per_rank_tok_s = 0, speedup = 1, efficiency = 1;
};
std::vector<ScalingRow> scaling(const std::vector<DirStats>& dirs);

// The tables `dilu report` prints; the same content as JSON (summary.json, read by the plots).
std::string format_report(const std::vector<DirStats>& dirs);
nlohmann::json report_json(const std::vector<DirStats>& dirs);

}  // namespace dilu
