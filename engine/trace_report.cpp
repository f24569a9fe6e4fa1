// See trace_report.h. Definitions of every figure are in docs/traces.md ("Report").
#include "engine/trace_report.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <set>
#include <sstream>

#include "kernels/error.h"

namespace dilu {

TraceDir read_trace_dir(const std::filesystem::path& dir, bool with_events) {
  std::error_code ec;
  DILU_USER_CHECK(std::filesystem::is_directory(dir, ec), "trace directory '", dir.string(), "' does not exist");
  std::map<int, std::filesystem::path> files;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const int rank = trace_file_rank(entry.path().filename().string());
    if (rank >= 0) files[rank] = entry.path();
  }
  DILU_USER_CHECK(!files.empty(), "'", dir.string(),
                  "' holds no rank-NNNNN.h5 trace file (write them with dilu run/bench --trace-dir)");
  TraceDir t;
  t.dir = dir;
  const std::filesystem::path canon = std::filesystem::weakly_canonical(dir, ec);
  t.label = (ec ? dir : canon).filename().string();
  for (const auto& [rank, path] : files) t.ranks.push_back(read_trace_file(path, with_events));
  return t;
}

Percentiles percentiles(std::vector<double> v) {
  Percentiles p;
  p.count = static_cast<int64_t>(v.size());
  if (v.empty()) return p;
  std::sort(v.begin(), v.end());
  auto at = [&](double q) {
    const double pos = q * static_cast<double>(v.size() - 1);
    const auto lo = static_cast<size_t>(pos);
    const size_t hi = std::min(lo + 1, v.size() - 1);
    return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
  };
  p.p50 = at(0.5);
  p.p90 = at(0.9);
  p.p99 = at(0.99);
  p.max = v.back();
  return p;
}

DirStats summarize(const TraceDir& t) {
  DirStats d;
  d.label = t.label;
  d.dir = t.dir.string();
  const TraceFileData& r0 = t.ranks.front();
  d.command = r0.string("command", "run");
  d.device = r0.string("device");
  d.dilu_version = r0.string("dilu_version");
  d.world_size = static_cast<int>(r0.number("world_size", 1));
  d.ranks_found = static_cast<int>(t.ranks.size());
  d.num_nodes = static_cast<int>(r0.number("num_nodes", 1));
  d.tp = static_cast<int>(r0.number("tp", 1));
  d.pp = static_cast<int>(r0.number("pp", 1));
  d.dp = static_cast<int>(r0.number("dp", 1));
  if (d.ranks_found != d.world_size)
    d.notes.push_back("only " + std::to_string(d.ranks_found) + " of " + std::to_string(d.world_size) +
                      " rank files found: the figures cover those ranks");

  // The span: from the first step or request to the last, over every rank.
  double begin = 1e300, end = -1e300;
  std::vector<double> ttft, latency;
  std::map<int, int64_t> replica_tokens;
  std::map<int, double> replica_done;
  for (const TraceFileData& f : t.ranks) {
    d.files.push_back(f.path.string());
    if (!f.steps.empty()) {
      begin = std::min(begin, f.steps.front().start);
      end = std::max(end, f.steps.back().end);
    }
    for (const RequestRow& r : f.requests) {
      begin = std::min(begin, r.enqueue);
      end = std::max(end, r.finish);
      ++d.requests;
      d.input_tokens += r.prompt_tokens;
      d.output_tokens += r.output_tokens;
      ttft.push_back(r.first_token - r.enqueue);
      latency.push_back(r.finish - r.enqueue);
      replica_tokens[r.replica] += r.output_tokens;
      replica_done[r.replica] = std::max(replica_done[r.replica], r.finish);
    }
    d.requests_failed += static_cast<int64_t>(f.number("requests_failed"));
    d.load_s = std::max(d.load_s, f.number("load_s"));
    const auto cut = static_cast<int64_t>(f.number("timeline_truncated_at_step", -1));
    if (cut >= 0)
      d.notes.push_back("rank " + std::to_string(static_cast<int>(f.number("world_rank"))) +
                        ": spans (timeline, /events) kept until step " + std::to_string(cut));
  }
  d.span_s = end > begin ? end - begin : 0;
  const double span = std::max(d.span_s, 1e-12);
  d.input_tok_s = static_cast<double>(d.input_tokens) / span;
  d.output_tok_s = static_cast<double>(d.output_tokens) / span;
  d.requests_s = static_cast<double>(d.requests) / span;
  d.ttft_s = percentiles(ttft);
  d.latency_s = percentiles(latency);

  // Per rank: where its time went.
  double pipeline_total = 0, step_time_total = 0;
  double busiest = -1;
  for (const TraceFileData& f : t.ranks) {
    RankStats rs;
    rs.rank = static_cast<int>(f.number("world_rank"));
    rs.hostname = f.string("hostname");
    rs.tp_rank = static_cast<int>(f.number("tp_rank"));
    rs.pp_rank = static_cast<int>(f.number("pp_rank"));
    rs.dp_rank = static_cast<int>(f.number("dp_rank"));
    rs.steps = static_cast<int64_t>(f.steps.size());
    double compute = 0, comm = 0, pipeline = 0, host = 0, total = 0;
    for (const StepRow& s : f.steps) {
      compute += s.compute_s;
      comm += s.comm_s;
      pipeline += s.pipeline_s;
      host += s.host_s;
      total += s.end - s.start;
      rs.kv_blocks_peak = std::max(rs.kv_blocks_peak, s.kv_blocks_used);
      rs.kv_blocks_total = std::max(rs.kv_blocks_total, s.kv_blocks_total);
      rs.memory_peak_bytes = std::max(rs.memory_peak_bytes, s.device_memory_bytes);
    }
    rs.compute = compute / span;
    rs.comm = comm / span;
    rs.pipeline = pipeline / span;
    rs.host = host / span;
    rs.busy = (compute + host) / span;
    rs.mean_step_ms = rs.steps ? 1e3 * total / static_cast<double>(rs.steps) : 0;
    pipeline_total += pipeline;
    step_time_total += total;
    if (compute + host > busiest) {
      busiest = compute + host;
      d.slowest_rank = rs.rank;
    }
    d.ranks.push_back(rs);
  }
  if (d.pp > 1) d.pipeline_bubble = pipeline_total / std::max(step_time_total, 1e-12);
  if (d.dp > 1 && !replica_tokens.empty()) {
    double sum = 0, most = 0, first_done = 1e300, last_done = -1e300;
    for (const auto& [replica, tokens] : replica_tokens) {
      sum += static_cast<double>(tokens);
      most = std::max(most, static_cast<double>(tokens));
    }
    for (const auto& [replica, done] : replica_done) {
      first_done = std::min(first_done, done);
      last_done = std::max(last_done, done);
    }
    const double mean = sum / static_cast<double>(d.dp);  // a replica without requests counts as 0
    d.replica_token_imbalance = mean > 0 ? most / mean - 1 : 0;
    d.replica_finish_spread = static_cast<int>(replica_done.size()) < d.dp ? 1.0 : (last_done - first_done) / span;
  }

  // The replica roots' steps: batch and step time of the run as its scheduler saw it.
  int64_t batch_sum = 0;
  double step_sum = 0;
  for (const TraceFileData& f : t.ranks) {
    if (f.number("tp_rank") != 0 || f.number("pp_rank") != 0) continue;
    for (const StepRow& s : f.steps) {
      ++d.steps;
      batch_sum += s.batch_size;
      step_sum += s.end - s.start;
    }
  }
  if (d.steps > 0) {
    d.mean_batch = static_cast<double>(batch_sum) / static_cast<double>(d.steps);
    d.mean_step_ms = 1e3 * step_sum / static_cast<double>(d.steps);
  }
  for (const BenchTraceRow& b : r0.bench) {
    BenchPoint p;
    p.batch = b.batch;
    p.prefill_tok_s = static_cast<double>(b.prefill_tokens) / std::max(b.prefill_s, 1e-12);
    p.decode_tok_s = static_cast<double>(b.decode_tokens) / std::max(b.decode_s, 1e-12);
    p.ms_per_decode_step = 1e3 * b.decode_s / static_cast<double>(std::max<int64_t>(b.decode_steps, 1));
    d.bench.push_back(p);
  }
  return d;
}

std::vector<ScalingRow> scaling(const std::vector<DirStats>& dirs) {
  std::vector<ScalingRow> rows;
  if (dirs.empty()) return rows;
  const DirStats* base = &dirs.front();
  for (const DirStats& d : dirs)
    if (d.world_size < base->world_size) base = &d;
  const double base_per_rank = base->output_tok_s / std::max(base->world_size, 1);
  for (const DirStats& d : dirs) {
    ScalingRow r;
    r.label = d.label;
    r.ranks = d.world_size;
    r.nodes = d.num_nodes;
    r.output_tok_s = d.output_tok_s;
    r.per_rank_tok_s = d.output_tok_s / std::max(d.world_size, 1);
    r.speedup = base->output_tok_s > 0 ? d.output_tok_s / base->output_tok_s : kNotApplicable;
    r.efficiency = base_per_rank > 0 ? r.per_rank_tok_s / base_per_rank : kNotApplicable;
    rows.push_back(r);
  }
  return rows;
}

namespace {

// printf into a std::string.
template <class... A>
std::string fmt(const char* f, A... a) {
  char buf[512];
  std::snprintf(buf, sizeof buf, f, a...);
  return buf;
}

std::string ms(double seconds) { return std::isnan(seconds) ? "-" : fmt("%.1f", 1e3 * seconds); }
std::string pct(double fraction) { return std::isnan(fraction) ? "-" : fmt("%.1f%%", 100 * fraction); }

// Columns padded to their widest cell.
std::string table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width;
  for (const auto& r : rows)
    for (size_t i = 0; i < r.size(); ++i) {
      if (width.size() <= i) width.push_back(0);
      width[i] = std::max(width[i], r[i].size());
    }
  std::string out;
  for (const auto& r : rows) {
    std::string line;
    for (size_t i = 0; i < r.size(); ++i) {
      line += r[i];
      if (i + 1 < r.size()) line += std::string(width[i] - r[i].size() + 2, ' ');
    }
    out += line + "\n";
  }
  return out;
}

std::string mib(int64_t bytes) { return bytes > 0 ? fmt("%.0f MiB", static_cast<double>(bytes) / 1048576.0) : "-"; }

nlohmann::json number_or_null(double v) { return std::isnan(v) ? nlohmann::json() : nlohmann::json(v); }

nlohmann::json percentiles_json(const Percentiles& p) {
  return {{"count", p.count}, {"p50", number_or_null(p.p50)}, {"p90", number_or_null(p.p90)},
          {"p99", number_or_null(p.p99)}, {"max", number_or_null(p.max)}};
}

}  // namespace

std::string format_report(const std::vector<DirStats>& dirs) {
  std::ostringstream o;
  for (const DirStats& d : dirs) {
    o << "== " << d.label << " (" << d.dir << "): dilu " << d.command << ", " << d.world_size << " rank"
      << (d.world_size == 1 ? "" : "s") << " on " << d.num_nodes << " node" << (d.num_nodes == 1 ? "" : "s")
      << " (tp " << d.tp << " x pp " << d.pp << " x dp " << d.dp << "), " << d.device << "\n";
    for (const std::string& n : d.notes) o << "note: " << n << "\n";
    o << table({{"requests", "failed", "wall s", "output tok/s", "input tok/s", "requests/s", "steps", "mean batch",
                 "ms/step", "load s"},
                {std::to_string(d.requests), std::to_string(d.requests_failed), fmt("%.3f", d.span_s),
                 fmt("%.1f", d.output_tok_s), fmt("%.1f", d.input_tok_s), fmt("%.2f", d.requests_s),
                 std::to_string(d.steps), fmt("%.1f", d.mean_batch), fmt("%.2f", d.mean_step_ms),
                 fmt("%.2f", d.load_s)}});
    o << "\n"
      << table({{"ms", "p50", "p90", "p99", "max"},
                {"time to first token", ms(d.ttft_s.p50), ms(d.ttft_s.p90), ms(d.ttft_s.p99), ms(d.ttft_s.max)},
                {"latency", ms(d.latency_s.p50), ms(d.latency_s.p90), ms(d.latency_s.p99), ms(d.latency_s.max)}});
    o << "\npipeline bubble: " << (d.pp > 1 ? pct(d.pipeline_bubble) : "- (pp 1)")
      << "; replica imbalance: "
      << (d.dp > 1 ? "output tokens max/mean " + fmt("%+.1f%%", 100 * d.replica_token_imbalance) +
                         ", finish spread " + pct(d.replica_finish_spread) + " of wall"
                   : std::string("- (dp 1)"))
      << "; slowest rank: " << d.slowest_rank << "\n\n";
    std::vector<std::vector<std::string>> rows = {{"rank", "host", "tp", "pp", "dp", "steps", "busy", "compute",
                                                   "comm", "(pipeline)", "host work", "ms/step", "kv blocks peak",
                                                   "memory peak"}};
    for (const RankStats& r : d.ranks)
      rows.push_back({std::to_string(r.rank), r.hostname, std::to_string(r.tp_rank), std::to_string(r.pp_rank),
                      std::to_string(r.dp_rank), std::to_string(r.steps), pct(r.busy), pct(r.compute), pct(r.comm),
                      pct(r.pipeline), pct(r.host), fmt("%.2f", r.mean_step_ms),
                      fmt("%lld / %lld", static_cast<long long>(r.kv_blocks_peak),
                          static_cast<long long>(r.kv_blocks_total)),
                      mib(r.memory_peak_bytes)});
    o << table(rows);
    if (!d.bench.empty()) {
      std::vector<std::vector<std::string>> b = {{"batch", "prefill tok/s", "decode tok/s", "ms/decode step"}};
      for (const BenchPoint& p : d.bench)
        b.push_back({std::to_string(p.batch), fmt("%.1f", p.prefill_tok_s), fmt("%.1f", p.decode_tok_s),
                     fmt("%.2f", p.ms_per_decode_step)});
      o << "\nbench sweep\n" << table(b);
    }
    o << "\n";
  }
  if (dirs.size() > 1) {
    const std::vector<ScalingRow> s = scaling(dirs);
    std::vector<std::vector<std::string>> rows = {
        {"comparison", "ranks", "nodes", "output tok/s", "per rank", "speed-up", "scaling efficiency"}};
    for (const ScalingRow& r : s)
      rows.push_back({r.label, std::to_string(r.ranks), std::to_string(r.nodes), fmt("%.1f", r.output_tok_s),
                      fmt("%.1f", r.per_rank_tok_s), std::isnan(r.speedup) ? "-" : fmt("%.2fx", r.speedup),
                      pct(r.efficiency)});
    o << table(rows);
  }
  return o.str();
}

nlohmann::json report_json(const std::vector<DirStats>& dirs) {
  nlohmann::json out;
  out["dirs"] = nlohmann::json::array();
  for (const DirStats& d : dirs) {
    nlohmann::json j = {{"label", d.label},
                        {"dir", d.dir},
                        {"command", d.command},
                        {"device", d.device},
                        {"dilu_version", d.dilu_version},
                        {"world_size", d.world_size},
                        {"ranks_found", d.ranks_found},
                        {"num_nodes", d.num_nodes},
                        {"tp", d.tp},
                        {"pp", d.pp},
                        {"dp", d.dp},
                        {"span_s", d.span_s},
                        {"load_s", d.load_s},
                        {"requests", d.requests},
                        {"requests_failed", d.requests_failed},
                        {"input_tokens", d.input_tokens},
                        {"output_tokens", d.output_tokens},
                        {"steps", d.steps},
                        {"input_tok_s", d.input_tok_s},
                        {"output_tok_s", d.output_tok_s},
                        {"requests_s", d.requests_s},
                        {"ttft_s", percentiles_json(d.ttft_s)},
                        {"latency_s", percentiles_json(d.latency_s)},
                        {"mean_batch", d.mean_batch},
                        {"mean_step_ms", d.mean_step_ms},
                        {"slowest_rank", d.slowest_rank},
                        {"pipeline_bubble", number_or_null(d.pipeline_bubble)},
                        {"replica_token_imbalance", number_or_null(d.replica_token_imbalance)},
                        {"replica_finish_spread", number_or_null(d.replica_finish_spread)},
                        {"notes", d.notes},
                        {"files", d.files}};
    j["ranks"] = nlohmann::json::array();
    for (const RankStats& r : d.ranks)
      j["ranks"].push_back({{"rank", r.rank},
                            {"hostname", r.hostname},
                            {"tp_rank", r.tp_rank},
                            {"pp_rank", r.pp_rank},
                            {"dp_rank", r.dp_rank},
                            {"steps", r.steps},
                            {"busy", r.busy},
                            {"compute", r.compute},
                            {"comm", r.comm},
                            {"pipeline", r.pipeline},
                            {"host", r.host},
                            {"mean_step_ms", r.mean_step_ms},
                            {"kv_blocks_peak", r.kv_blocks_peak},
                            {"kv_blocks_total", r.kv_blocks_total},
                            {"memory_peak_bytes", r.memory_peak_bytes}});
    j["bench"] = nlohmann::json::array();
    for (const BenchPoint& p : d.bench)
      j["bench"].push_back({{"batch", p.batch},
                            {"prefill_tok_s", p.prefill_tok_s},
                            {"decode_tok_s", p.decode_tok_s},
                            {"ms_per_decode_step", p.ms_per_decode_step}});
    out["dirs"].push_back(j);
  }
  out["scaling"] = nlohmann::json::array();
  if (dirs.size() > 1)
    for (const ScalingRow& r : scaling(dirs))
      out["scaling"].push_back({{"label", r.label},
                                {"ranks", r.ranks},
                                {"nodes", r.nodes},
                                {"output_tok_s", r.output_tok_s},
                                {"per_rank_tok_s", r.per_rank_tok_s},
                                {"speedup", number_or_null(r.speedup)},
                                {"efficiency", number_or_null(r.efficiency)}});
  return out;
}

}  // namespace dilu
