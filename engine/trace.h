// The trace recorder: what every rank did, step by step, on a clock all ranks share. Always on
// in a light form (totals for the end-of-run summary); with a trace directory it also writes
// DIR/rank-NNNNN.h5 (trace_hdf5.h) as the run goes, from which rank 0's DIR/timeline.json
// (trace_timeline.h) is made at the end. The schema is documented in docs/traces.md.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace dilu {

class Ops;
class TraceFileWriter;

// Seconds since the run's epoch: the moment every rank left one world barrier (each rank's
// steady clock, so the ranks agree to within that barrier's exit skew, microseconds on one node).
class TraceClock {
 public:
  using Clock = std::chrono::steady_clock;
  TraceClock() { restart(); }
  void restart();
  double now() const { return at(Clock::now()); }
  double at(Clock::time_point t) const { return std::chrono::duration<double>(t - epoch_).count(); }
  double epoch_unix_seconds() const { return epoch_unix_; }

 private:
  Clock::time_point epoch_;
  double epoch_unix_ = 0;  // the system clock at the epoch, for the record
};

// The HDF5 enum values of /events "kind" and "group" (docs/traces.md).
enum class SpanKind : uint8_t { Load = 0, AllReduce, AllGather, Broadcast, Sum, Barrier, Send, Recv, SendBytes, RecvBytes };
enum class TraceGroup : uint8_t { None = 0, TP, PP, Replica, World };
std::string_view span_kind_name(SpanKind k);    // "all_reduce"
std::string_view trace_group_name(TraceGroup g);  // "tp"
inline constexpr int kNumSpanKinds = 10;
inline constexpr int kNumTraceGroups = 5;

// One row of /steps. Times are on the TraceClock; compute + comm + host = end - start.
struct StepRow {
  int64_t step = 0;            // 0, 1, ... the same index on every rank of a replica
  double start = 0, end = 0;   // s
  int64_t prefill_tokens = 0;  // prompt tokens computed (chunks and recomputation)
  int64_t decode_tokens = 0;   // one per decoding sequence
  int64_t batch_size = 0;      // sequences in the step
  int64_t tokens_produced = 0; // tokens drawn (forks of a prompt draw from one logits row)
  double compute_s = 0;        // model and token drawing, communication excluded
  double comm_s = 0;           // inside Communicator calls (collectives and pipeline transfers)
  double pipeline_s = 0;       // of comm_s: pipeline sends and receives (waiting for a stage)
  double host_s = 0;           // scheduling, building the step, reading the results
  int64_t kv_blocks_used = 0;  // KV-cache blocks held by sequences during the step
  int64_t kv_blocks_total = 0;
  int64_t device_memory_bytes = 0;  // see docs/traces.md (sampled at most once a second)
};

// One row of /requests (replica roots only): a request that got a completion.
struct RequestRow {
  std::string id;              // the line's id / custom_id: a string as given, else its JSON text
  int64_t line = 0;            // 1-based input line (bench: the request's index)
  int64_t prompt_tokens = 0;
  int64_t output_tokens = 0;   // all samples: the output record's usage.completion_tokens
  int64_t samples = 1;         // n
  double enqueue = 0;          // entered the engine (after parsing and encoding)
  double first_token = 0;      // its first token was drawn
  double finish = 0;           // its record was complete
  int32_t replica = 0;         // dp rank
};

// One row of /events: a span of communication (or the load) on this rank.
struct EventRow {
  SpanKind kind = SpanKind::Load;
  TraceGroup group = TraceGroup::None;
  int32_t peer = -1;      // group rank of the other side (send, recv), the root (broadcast); else -1
  int64_t step = 0;       // the step it belongs to, or (outside steps) the next one
  double start = 0, end = 0;
  int64_t bytes = 0;
  int64_t seq = 0;        // send/recv: index among this rank's transfers of that kind with that peer
};

// One row of /bench (dilu bench only): one batch size of the sweep.
struct BenchTraceRow {
  int64_t batch = 0;
  int64_t first_step = 0, end_step = 0;  // its steps: [first_step, end_step)
  double prefill_s = 0, decode_s = 0;
  int64_t prefill_tokens = 0, decode_tokens = 0, decode_steps = 0;
};

// Where the recording rank sits (the file's identity attributes).
struct TraceIdentity {
  std::string command = "run";  // "run" or "bench"
  int world_rank = 0, world_size = 1, node = 0, num_nodes = 1, local_rank = 0;
  int tp = 1, pp = 1, dp = 1, tp_rank = 0, pp_rank = 0, dp_rank = 0;
  std::string hostname;
};
// This host's name (gethostname), for single-process commands.
std::string this_hostname();
// The world rank of a trace file's name ("rank-00012.h5" -> 12), or -1 for any other name.
int trace_file_rank(const std::string& filename);

// What a step's root tells the other ranks of its replica about the step (sent with it).
struct StepCounts {
  int64_t prefill_tokens = 0, decode_tokens = 0, sequences = 0, tokens_produced = 0, kv_blocks_used = 0;
};

// The compact form of a step span kept for the timeline.
struct StepSpan {
  int64_t step = 0;
  double start = 0, end = 0;
  int64_t prefill_tokens = 0, decode_tokens = 0, batch_size = 0;
  double comm_s = 0, pipeline_s = 0;
};

// Each rank's part of timeline.json.
struct RankTimeline {
  TraceIdentity id;
  std::string device;
  std::vector<StepSpan> steps;
  std::vector<EventRow> events;
  int64_t truncated_at_step = -1;  // spans stopped being kept at this step (the cap); -1: all kept
};

// Totals over the run, kept whether or not files are written.
struct TraceTotals {
  int64_t steps = 0;
  double compute_s = 0, comm_s = 0, pipeline_s = 0, host_s = 0;
  double first_step_start = 0, last_step_end = 0;
  double recording_s = 0;  // in end_step() and record_request(): keeping rows, writing them every 1024 steps
  double busy_s() const { return compute_s + host_s; }
};

class TraceRecorder {
 public:
  // Spans kept per rank for the timeline and /events (steps count too); /steps has every step.
  static constexpr int64_t kMaxSpans = 250000;

  explicit TraceRecorder(TraceIdentity id);
  ~TraceRecorder();
  TraceRecorder(const TraceRecorder&) = delete;
  TraceRecorder& operator=(const TraceRecorder&) = delete;

  // Starts writing DIR/rank-NNNNN.h5 (DIR is created; an existing file is replaced). Throws
  // UserError naming the path when it cannot.
  void open(const std::filesystem::path& dir);
  bool recording() const { return file_ != nullptr; }
  const TraceIdentity& identity() const { return id_; }
  const TraceClock& clock() const { return clock_; }
  // Call right after a barrier of every rank: times are measured from here.
  void restart_clock() { clock_.restart(); }

  // Root attributes of the file (written at once; no-ops when not recording).
  void set_attribute(const std::string& name, const std::string& value);
  void set_attribute(const std::string& name, int64_t value);
  void set_attribute(const std::string& name, double value);
  void set_device(const std::string& device);
  void set_kv_blocks_total(int64_t n) { kv_blocks_total_ = n; }
  // Bytes of device memory in use, asked at most once a second (device_memory_probe()).
  void set_memory_probe(std::function<int64_t()> probe) { memory_probe_ = std::move(probe); }

  // A step, in three marks: begin, host work done (scheduled and built), compute done (model
  // run and tokens drawn); what follows until end_step() is host work again.
  void begin_step();
  void host_done() { t_host_done_ = clock_.now(); }
  void compute_done() { t_compute_done_ = clock_.now(); }
  void end_step(const StepCounts& counts);
  int64_t steps() const { return totals_.steps; }

  // Communication (TracedCommunicator): the time between comm_start() and comm_end().
  double comm_start() const { return clock_.now(); }
  void comm_end(SpanKind kind, TraceGroup group, double start, int64_t bytes, int peer, int64_t seq);
  // Any other span (the load), on the TraceClock.
  void span(SpanKind kind, double start, double end);

  void record_request(RequestRow row);
  void record_bench(const BenchTraceRow& row);

  const TraceTotals& totals() const { return totals_; }
  // Seconds finish() took to write the last rows and close the file (once per run).
  double file_closing_seconds() const { return file_closing_s_; }
  // Writes the summary attributes, flushes and closes the file (when recording); returns the
  // spans kept for the timeline, read back from the file (spans are not held in memory during
  // the run). Call once, at the end.
  RankTimeline finish(const std::map<std::string, double>& summary);

 private:
  void flush_rows();
  void keep_span_room();
  // Runs a file operation; when it throws, warns once and stops recording (the run goes on).
  template <class Fn>
  void guarded(Fn&& fn);

  TraceIdentity id_;
  TraceClock clock_;
  std::filesystem::path path_;
  std::unique_ptr<TraceFileWriter> file_;
  std::string device_;
  int64_t kv_blocks_total_ = 0;
  std::function<int64_t()> memory_probe_;
  int64_t memory_bytes_ = 0;
  double memory_sampled_at_ = -1e9;

  bool in_step_ = false;
  double t_begin_ = 0, t_host_done_ = 0, t_compute_done_ = 0;
  double step_comm_ = 0, step_pipeline_ = 0;
  TraceTotals totals_;

  // Rows waiting to be appended to the file.
  std::vector<StepRow> step_rows_;
  std::vector<RequestRow> request_rows_;
  std::vector<EventRow> event_rows_;
  int64_t spans_kept_ = 0;  // steps and events in the file while under kMaxSpans
  int64_t truncated_at_step_ = -1;
  double last_flush_ = 0;
  double file_closing_s_ = 0;
};

// Bytes of memory this run uses on the device of `ops`: on a GPU what was allocated there since
// this call (plus `arena_bytes` already allocated at start-up: weights, KV cache, NCCL buffers
// follow); on the CPU this process's resident memory. Call it right after creating the backend.
std::function<int64_t()> device_memory_probe(const Ops& ops, int64_t arena_bytes);

// A Communicator that forwards every call to `inner` and reports its time to `trace`.
class TracedCommunicator final : public Communicator {
 public:
  TracedCommunicator(Communicator& inner, TraceRecorder& trace, TraceGroup group)
      : inner_(inner), trace_(trace), group_(group) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  void all_reduce_sum(Tensor& t) override;
  void all_gather(const Tensor& send, Tensor& recv) override;
  void broadcast(std::vector<uint8_t>& bytes, int root) override;
  int64_t sum(int64_t v) override;
  void send(const Tensor& t, int dst) override;
  void recv(Tensor& t, int src) override;
  void send_bytes(const std::vector<uint8_t>& bytes, int dst) override;
  void recv_bytes(std::vector<uint8_t>& bytes, int src) override;
  void barrier() override;

 private:
  int64_t next_seq(SpanKind kind, int peer) { return seq_[{static_cast<int>(kind), peer}]++; }
  Communicator& inner_;
  TraceRecorder& trace_;
  TraceGroup group_;
  std::map<std::pair<int, int>, int64_t> seq_;
};

// Per-rank load for the end-of-run summary.
struct RankLoad {
  int rank = 0;
  std::string hostname;
  int64_t steps = 0;
  double busy_s = 0, comm_s = 0, pipeline_s = 0, recording_s = 0;
};

// Collective over `world` (every rank calls it once, at the end): closes this rank's file with
// `summary` as attributes, gathers every rank's load (and, when recording, its spans) on rank 0,
// which writes DIR/timeline.json. Returns every rank's load on rank 0, this rank's elsewhere.
std::vector<RankLoad> finish_trace(TraceRecorder& trace, Communicator& world, const std::filesystem::path& dir,
                                   const std::map<std::string, double>& summary);

}  // namespace dilu
