// The trace recorder, its HDF5 file and timeline, and the report's figures, on hand-made steps:
// phases add up, communication is timed and classed, rows read back by name, the span cap
// holds, flows pair, and percentiles, bubbles, imbalance and scaling come out as defined.
#include "engine/trace.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>

#include "engine/trace_hdf5.h"
#include "engine/trace_report.h"
#include "engine/trace_timeline.h"
#include "tests/test_util.h"

namespace dilu {
namespace {

using namespace std::chrono_literals;

// A group whose collectives and transfers take a known time and move nothing.
class SlowCommunicator final : public Communicator {
 public:
  explicit SlowCommunicator(std::chrono::microseconds delay, int rank = 0, int size = 2)
      : delay_(delay), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void all_reduce_sum(Tensor&) override { std::this_thread::sleep_for(delay_); }
  void all_gather(const Tensor&, Tensor&) override { std::this_thread::sleep_for(delay_); }
  void broadcast(std::vector<uint8_t>&, int) override { std::this_thread::sleep_for(delay_); }
  int64_t sum(int64_t v) override { return v; }
  void send(const Tensor&, int) override { std::this_thread::sleep_for(delay_); }
  void recv(Tensor&, int) override { std::this_thread::sleep_for(delay_); }
  void send_bytes(const std::vector<uint8_t>&, int) override {}
  void recv_bytes(std::vector<uint8_t>&, int) override {}
  void barrier() override {}

 private:
  std::chrono::microseconds delay_;
  int rank_, size_;
};

TraceIdentity identity(int rank, int tp, int pp, int dp) {
  TraceIdentity id;
  id.world_rank = rank;
  id.world_size = tp * pp * dp;
  id.tp = tp;
  id.pp = pp;
  id.dp = dp;
  id.tp_rank = rank % tp;
  id.pp_rank = rank / tp % pp;
  id.dp_rank = rank / (tp * pp);
  id.hostname = "host" + std::to_string(rank);
  return id;
}

TEST(TraceRecorder, PhasesAddUpAndCommunicationIsClassed) {
  TraceRecorder trace(identity(0, 1, 2, 1));
  SlowCommunicator slow(2ms);
  TracedCommunicator tp(slow, trace, TraceGroup::TP), pp(slow, trace, TraceGroup::PP);
  Tensor t = Tensor::host(DType::F32, {4, 8});
  trace.begin_step();
  std::this_thread::sleep_for(1ms);  // host work: scheduling
  trace.host_done();
  tp.all_reduce_sum(t);  // a collective
  pp.send(t, 1);         // a pipeline transfer
  pp.recv(t, 1);
  std::this_thread::sleep_for(1ms);  // compute
  trace.compute_done();
  trace.end_step({3, 2, 2, 2, 5});
  const TraceTotals& s = trace.totals();
  EXPECT_EQ(s.steps, 1);
  EXPECT_GE(s.comm_s, 0.006);
  EXPECT_GE(s.pipeline_s, 0.004);
  EXPECT_LT(s.pipeline_s, s.comm_s);
  EXPECT_GE(s.host_s, 0.001);
  EXPECT_GE(s.compute_s, 0.001);
  EXPECT_NEAR(s.compute_s + s.comm_s + s.host_s, s.last_step_end - s.first_step_start, 1e-9);
  // Communication outside a step (a follower waiting for the next one) is not part of any step.
  tp.all_reduce_sum(t);
  EXPECT_DOUBLE_EQ(trace.totals().comm_s, s.comm_s);
}

TEST(TraceFile, RowsAndAttributesReadBackByName) {
  const auto dir = test::scratch_dir("trace_file");
  TraceRecorder trace(identity(1, 2, 1, 1));
  trace.open(dir);
  trace.set_device("test device");
  trace.set_attribute("config_yaml", std::string("batch:\n  max_seqs: 4\n"));
  trace.set_kv_blocks_total(64);
  trace.set_memory_probe([] { return int64_t{12345}; });
  SlowCommunicator slow(0us);
  TracedCommunicator tp(slow, trace, TraceGroup::TP);
  Tensor t = Tensor::host(DType::F32, {2, 3});
  for (int i = 0; i < 3; ++i) {
    trace.begin_step();
    trace.host_done();
    tp.all_reduce_sum(t);
    trace.compute_done();
    trace.end_step({i == 0 ? 10 : 0, i == 0 ? 0 : 2, 2, 2, 3});
  }
  trace.record_request({"req-\xc3\xa9", 7, 10, 4, 2, 0.5, 0.75, 1.25, 0});
  trace.record_bench({8, 0, 3, 0.1, 0.2, 80, 16, 2});
  const RankTimeline tl = trace.finish({{"requests_done", 1}, {"wall_s", 2.5}});
  EXPECT_EQ(tl.steps.size(), 3u);
  EXPECT_EQ(tl.events.size(), 3u);
  EXPECT_EQ(tl.device, "test device");

  const TraceFileData f = read_trace_file(dir / "rank-00001.h5");
  EXPECT_EQ(f.number("schema_version"), 1);
  EXPECT_EQ(f.number("world_rank"), 1);
  EXPECT_EQ(f.number("tp"), 2);
  EXPECT_EQ(f.number("tp_rank"), 1);
  EXPECT_EQ(f.number("requests_done"), 1);
  EXPECT_EQ(f.number("wall_s"), 2.5);
  EXPECT_EQ(f.number("steps"), 3);
  EXPECT_EQ(f.string("hostname"), "host1");
  EXPECT_EQ(f.string("device"), "test device");
  EXPECT_EQ(f.string("command"), "run");
  EXPECT_EQ(f.string("config_yaml"), "batch:\n  max_seqs: 4\n");
  EXPECT_FALSE(f.string("dilu_version").empty());
  EXPECT_FALSE(f.string("git_revision").empty());
  ASSERT_EQ(f.steps.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    const StepRow& s = f.steps[i];
    EXPECT_EQ(s.step, static_cast<int64_t>(i));
    EXPECT_NEAR(s.compute_s + s.comm_s + s.host_s, s.end - s.start, 1e-9);
    EXPECT_EQ(s.kv_blocks_used, 3);
    EXPECT_EQ(s.kv_blocks_total, 64);
    EXPECT_EQ(s.device_memory_bytes, 12345);
    EXPECT_EQ(s.batch_size, 2);
    if (i > 0) {
      EXPECT_GE(s.start, f.steps[i - 1].end);
    }
  }
  EXPECT_EQ(f.steps[0].prefill_tokens, 10);
  EXPECT_EQ(f.steps[1].decode_tokens, 2);
  ASSERT_EQ(f.requests.size(), 1u);
  EXPECT_EQ(f.requests[0].id, "req-\xc3\xa9");
  EXPECT_EQ(f.requests[0].line, 7);
  EXPECT_EQ(f.requests[0].output_tokens, 4);
  EXPECT_EQ(f.requests[0].samples, 2);
  EXPECT_DOUBLE_EQ(f.requests[0].first_token, 0.75);
  ASSERT_EQ(f.events.size(), 3u);
  EXPECT_EQ(f.events[0].kind, SpanKind::AllReduce);
  EXPECT_EQ(f.events[0].group, TraceGroup::TP);
  EXPECT_EQ(f.events[0].bytes, 24);
  EXPECT_EQ(f.events[2].step, 2);
  ASSERT_EQ(f.bench.size(), 1u);
  EXPECT_EQ(f.bench[0].batch, 8);
  EXPECT_EQ(f.bench[0].decode_tokens, 16);
}

TEST(TraceFile, NotATraceIsAUserError) {
  const auto dir = test::scratch_dir("not_a_trace");
  test::write_bytes(dir / "rank-00000.h5", "not hdf5");
  test::expect_user_error([&] { read_trace_file(dir / "rank-00000.h5"); }, {"rank-00000.h5", "not an HDF5 file"});
  test::expect_user_error([&] { read_trace_dir(test::scratch_dir("empty_trace_dir")); }, {"no rank-NNNNN.h5"});
  test::expect_user_error([&] { TraceRecorder(identity(0, 1, 1, 1)).open(dir / "rank-00000.h5" / "sub"); },
                          {"--trace-dir", "cannot be created"});
}

TEST(TraceFile, ARunReplacesWhatAnEarlierRunLeft) {
  EXPECT_EQ(trace_file_rank("rank-00012.h5"), 12);
  EXPECT_EQ(trace_file_rank("rank-123456.h5"), 123456);
  EXPECT_EQ(trace_file_rank("rank-0001.h5"), -1);
  EXPECT_EQ(trace_file_rank("rank-0000x.h5"), -1);
  EXPECT_EQ(trace_file_rank("timeline.json"), -1);
  const auto dir = test::scratch_dir("trace_rerun");
  for (const char* f : {"rank-00001.h5", "rank-00002.h5", "rank-00003.h5", "timeline.json", "notes.txt"})
    test::write_bytes(dir / f, "from an earlier run of 4 ranks");
  TraceRecorder trace(identity(0, 2, 1, 1));  // this run: 2 ranks
  trace.open(dir);
  EXPECT_TRUE(std::filesystem::exists(dir / "rank-00000.h5"));
  EXPECT_TRUE(std::filesystem::exists(dir / "rank-00001.h5"));  // rank 1 of this run replaces it
  EXPECT_FALSE(std::filesystem::exists(dir / "rank-00002.h5"));
  EXPECT_FALSE(std::filesystem::exists(dir / "rank-00003.h5"));
  EXPECT_FALSE(std::filesystem::exists(dir / "timeline.json"));
  EXPECT_TRUE(std::filesystem::exists(dir / "notes.txt"));
  trace.finish({});
}

TEST(TraceRecorder, SpansStopAtTheCapStepsGoOn) {
  const auto dir = test::scratch_dir("trace_cap");
  TraceRecorder trace(identity(0, 2, 1, 1));
  trace.open(dir);
  SlowCommunicator slow(0us);
  TracedCommunicator tp(slow, trace, TraceGroup::TP);
  Tensor t = Tensor::host(DType::F32, {1});
  const int64_t per_step = 1000, steps = TraceRecorder::kMaxSpans / per_step + 10;
  for (int64_t s = 0; s < steps; ++s) {
    trace.begin_step();
    for (int64_t i = 0; i < per_step; ++i) tp.all_reduce_sum(t);
    trace.end_step({});
  }
  const RankTimeline tl = trace.finish({});
  EXPECT_GE(tl.truncated_at_step, 0);
  EXPECT_LE(static_cast<int64_t>(tl.steps.size() + tl.events.size()), TraceRecorder::kMaxSpans + 1);
  const TraceFileData f = read_trace_file(dir / "rank-00000.h5");
  EXPECT_EQ(static_cast<int64_t>(f.steps.size()), steps);  // every step, whatever the cap
  EXPECT_EQ(f.events.size(), tl.events.size());
  EXPECT_EQ(f.number("timeline_truncated_at_step"), static_cast<double>(tl.truncated_at_step));
}

// Two pipeline stages: stage 0 sends micro-batches to stage 1 and receives the tokens back.
std::vector<RankTimeline> pipeline_timelines() {
  std::vector<RankTimeline> ranks(2);
  for (int r = 0; r < 2; ++r) {
    ranks[static_cast<size_t>(r)].id = identity(r, 1, 2, 1);
    ranks[static_cast<size_t>(r)].steps = {{0, 0.0, 1.0, 5, 0, 2, 0.4, 0.4}, {1, 1.0, 2.0, 0, 2, 2, 0.5, 0.5}};
  }
  for (int64_t k = 0; k < 3; ++k) {
    const double t = 0.1 + 0.5 * static_cast<double>(k);
    ranks[0].events.push_back({SpanKind::Send, TraceGroup::PP, 1, k / 2, t, t + 0.05, 100, k});
    ranks[1].events.push_back({SpanKind::Recv, TraceGroup::PP, 0, k / 2, t - 0.02, t + 0.06, 100, k});
    ranks[1].events.push_back({SpanKind::SendBytes, TraceGroup::PP, 0, k / 2, t + 0.2, t + 0.21, 8, k});
    ranks[0].events.push_back({SpanKind::RecvBytes, TraceGroup::PP, 1, k / 2, t + 0.1, t + 0.22, 8, k});
  }
  return ranks;
}

TEST(Timeline, EncodesMergesAndPairsTransfers) {
  const std::vector<RankTimeline> ranks = pipeline_timelines();
  const RankTimeline back = decode_timeline(encode_timeline(ranks[1]));
  EXPECT_EQ(back.id.pp_rank, 1);
  EXPECT_EQ(back.id.hostname, "host1");
  EXPECT_EQ(back.steps.size(), 2u);
  EXPECT_EQ(back.events.size(), 6u);
  EXPECT_EQ(back.events[1].kind, SpanKind::SendBytes);

  const auto path = test::scratch_dir("timeline") / "timeline.json";
  TimelineWriter w(path);
  for (const RankTimeline& r : ranks) w.add(r);
  w.close();
  std::ifstream in(path);
  const nlohmann::json j = nlohmann::json::parse(in);
  std::map<std::string, int> per_phase;
  std::map<int64_t, std::set<std::string>> flows;  // id -> phases seen
  std::set<int> pids;
  for (const auto& e : j["traceEvents"]) {
    per_phase[e["ph"].get<std::string>()]++;
    pids.insert(e["pid"].get<int>());
    if (e["ph"] == "s" || e["ph"] == "f") flows[e["id"].get<int64_t>()].insert(e["ph"].get<std::string>());
    if (e["ph"] == "X") {
      EXPECT_GE(e["dur"].get<double>(), 0);
    }
  }
  EXPECT_EQ(pids, (std::set<int>{0, 1}));
  EXPECT_EQ(per_phase["X"], 4 + 12);  // steps and transfers
  ASSERT_EQ(flows.size(), 6u);        // 3 hidden-state sends, 3 token replies
  for (const auto& [id, phases] : flows) EXPECT_EQ(phases, (std::set<std::string>{"s", "f"})) << id;
}

TEST(Report, Percentiles) {
  const Percentiles p = percentiles({4, 1, 3, 2, 5});
  EXPECT_EQ(p.count, 5);
  EXPECT_DOUBLE_EQ(p.p50, 3);
  EXPECT_DOUBLE_EQ(p.p90, 4.6);
  EXPECT_DOUBLE_EQ(p.max, 5);
  EXPECT_TRUE(std::isnan(percentiles({}).p50));
}

// A directory of hand-made rank files, as read back.
TraceDir synthetic_dir(int tp, int pp, int dp, const std::vector<std::vector<StepRow>>& steps,
                       const std::vector<std::vector<RequestRow>>& requests) {
  TraceDir t;
  t.label = "synthetic";
  for (int r = 0; r < tp * pp * dp; ++r) {
    TraceFileData f;
    const TraceIdentity id = identity(r, tp, pp, dp);
    f.numbers = {{"world_rank", r}, {"world_size", tp * pp * dp}, {"tp", tp},          {"pp", pp},
                 {"dp", dp},        {"tp_rank", id.tp_rank},     {"pp_rank", id.pp_rank}, {"dp_rank", id.dp_rank}};
    f.steps = steps[static_cast<size_t>(r)];
    f.requests = requests[static_cast<size_t>(r)];
    t.ranks.push_back(f);
  }
  return t;
}

TEST(Report, BubbleBusyAndThroughput) {
  // Two stages over 2 s: stage 0 waits 0.5 s per 1 s step, stage 1 waits 0.25 s.
  auto step = [](int64_t i, double pipeline, double compute) {
    return StepRow{i, static_cast<double>(i), static_cast<double>(i) + 1, 0, 4, 4, 4, compute, pipeline, pipeline,
                   1 - compute - pipeline, 4, 16, 0};
  };
  const std::vector<RequestRow> reqs = {{"a", 1, 10, 6, 1, 0.0, 0.5, 2.0, 0}, {"b", 2, 20, 2, 1, 0.0, 1.0, 1.0, 0}};
  const DirStats d = summarize(synthetic_dir(1, 2, 1, {{step(0, 0.5, 0.5), step(1, 0.5, 0.5)},
                                                      {step(0, 0.25, 0.75), step(1, 0.25, 0.75)}},
                                             {reqs, {}}));
  EXPECT_DOUBLE_EQ(d.span_s, 2.0);
  EXPECT_EQ(d.requests, 2);
  EXPECT_EQ(d.output_tokens, 8);
  EXPECT_DOUBLE_EQ(d.output_tok_s, 4.0);
  EXPECT_DOUBLE_EQ(d.input_tok_s, 15.0);
  EXPECT_DOUBLE_EQ(d.pipeline_bubble, 1.5 / 4.0);
  EXPECT_DOUBLE_EQ(d.ranks[0].busy, 0.5);
  EXPECT_DOUBLE_EQ(d.ranks[1].busy, 0.75);
  EXPECT_EQ(d.slowest_rank, 1);
  EXPECT_DOUBLE_EQ(d.ttft_s.max, 1.0);
  EXPECT_DOUBLE_EQ(d.latency_s.p50, 1.5);
  EXPECT_EQ(d.steps, 2);  // the replica root's
  EXPECT_TRUE(std::isnan(d.replica_token_imbalance));
  const std::string text = format_report({d});
  EXPECT_NE(text.find("pipeline bubble: 37.5%"), std::string::npos) << text;
}

TEST(Report, ReplicaImbalanceAndScaling) {
  const std::vector<StepRow> steps = {{0, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0}};
  const DirStats two = summarize(synthetic_dir(1, 1, 2, {steps, steps},
                                               {{{"a", 1, 1, 30, 1, 0, 0.1, 1.0, 0}},
                                                {{"b", 2, 1, 10, 1, 0, 0.1, 0.5, 1}}}));
  EXPECT_DOUBLE_EQ(two.replica_token_imbalance, 30.0 / 20.0 - 1);
  EXPECT_DOUBLE_EQ(two.replica_finish_spread, 0.5);
  EXPECT_DOUBLE_EQ(two.output_tok_s, 40.0);
  DirStats one = summarize(synthetic_dir(1, 1, 1, {steps}, {{{"a", 1, 1, 25, 1, 0, 0.1, 1.0, 0}}}));
  one.label = "one";
  const std::vector<ScalingRow> rows = scaling({one, two});
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_DOUBLE_EQ(rows[0].efficiency, 1.0);
  EXPECT_DOUBLE_EQ(rows[1].speedup, 40.0 / 25.0);
  EXPECT_DOUBLE_EQ(rows[1].efficiency, 0.8);
  const nlohmann::json j = report_json({one, two});
  EXPECT_EQ(j["scaling"].size(), 2u);
  EXPECT_DOUBLE_EQ(j["scaling"][1]["efficiency"].get<double>(), 0.8);
  EXPECT_TRUE(j["dirs"][0]["pipeline_bubble"].is_null());
}

}  // namespace
}  // namespace dilu
