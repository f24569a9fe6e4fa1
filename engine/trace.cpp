// See trace.h.
#include "engine/trace.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <optional>

#include "engine/byte_io.h"
#include "engine/trace_hdf5.h"
#include "engine/trace_timeline.h"
#include "engine/version.h"
#include "kernels/error.h"
#include "kernels/ops.h"

namespace dilu {

void TraceClock::restart() {
  epoch_ = Clock::now();
  epoch_unix_ = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string_view span_kind_name(SpanKind k) {
  static constexpr std::string_view names[kNumSpanKinds] = {
      "load", "all_reduce", "all_gather", "broadcast", "sum", "barrier", "send", "recv", "send_bytes", "recv_bytes"};
  const auto i = static_cast<size_t>(k);
  return i < kNumSpanKinds ? names[i] : "?";
}

std::string_view trace_group_name(TraceGroup g) {
  static constexpr std::string_view names[kNumTraceGroups] = {"none", "tp", "pp", "replica", "world"};
  const auto i = static_cast<size_t>(g);
  return i < kNumTraceGroups ? names[i] : "?";
}

int trace_file_rank(const std::string& filename) {
  // rank-NNNNN.h5: five or more digits.
  if (filename.size() < 13 || filename.rfind("rank-", 0) != 0 || !filename.ends_with(".h5")) return -1;
  const std::string digits = filename.substr(5, filename.size() - 8);
  if (digits.find_first_not_of("0123456789") != std::string::npos) return -1;
  return std::stoi(digits);
}

std::string this_hostname() {
  char name[256] = {};
  if (gethostname(name, sizeof name - 1) != 0) return "unknown";
  return name;
}

namespace {

// "0.1.0 (git 1a2b3c4d5e6f)" -> "1a2b3c4d5e6f".
std::string git_revision() {
  const std::string v(version_string());
  const auto at = v.find("(git ");
  if (at == std::string::npos) return "unknown";
  const auto end = v.find(')', at);
  return v.substr(at + 5, end == std::string::npos ? std::string::npos : end - at - 5);
}

bool is_pipeline(SpanKind kind, TraceGroup group) {
  return group == TraceGroup::PP && kind >= SpanKind::Send && kind <= SpanKind::RecvBytes;
}

constexpr size_t kStepRowsPerFlush = 1024, kEventRowsPerFlush = 4096, kRequestRowsPerFlush = 256;
constexpr double kFlushSeconds = 10;  // a killed run loses at most this much (or the rows above)

}  // namespace

TraceRecorder::TraceRecorder(TraceIdentity id) : id_(std::move(id)) {}

TraceRecorder::~TraceRecorder() = default;

void TraceRecorder::open(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  DILU_USER_CHECK(!ec && std::filesystem::is_directory(dir), "--trace-dir '", dir.string(),
                  "' cannot be created: ", ec ? ec.message() : "not a directory");
  if (id_.world_rank == 0) {
    // What an earlier run left here must not mix with this run: its timeline, and the files of
    // ranks this run does not have (every rank of this run replaces its own).
    std::filesystem::remove(dir / "timeline.json", ec);
    for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
      if (trace_file_rank(entry.path().filename().string()) >= id_.world_size)
        std::filesystem::remove(entry.path(), ec);
    }
  }
  char name[32];
  std::snprintf(name, sizeof name, "rank-%05d.h5", id_.world_rank);
  path_ = dir / name;
  file_ = std::make_unique<TraceFileWriter>(path_);
  // The buffers are reused between flushes: no allocation in the step loop after the first ones.
  step_rows_.reserve(kStepRowsPerFlush);
  event_rows_.reserve(kEventRowsPerFlush);
  request_rows_.reserve(kRequestRowsPerFlush);
  TraceFileWriter& f = *file_;
  f.attribute("command", id_.command);
  f.attribute("dilu_version", std::string(version_string()));
  f.attribute("git_revision", git_revision());
  f.attribute("hostname", id_.hostname);
  const std::pair<const char*, int> ints[] = {
      {"world_rank", id_.world_rank}, {"world_size", id_.world_size}, {"node", id_.node},
      {"num_nodes", id_.num_nodes},   {"local_rank", id_.local_rank}, {"tp", id_.tp},
      {"pp", id_.pp},                 {"dp", id_.dp},                 {"tp_rank", id_.tp_rank},
      {"pp_rank", id_.pp_rank},       {"dp_rank", id_.dp_rank}};
  for (const auto& [key, v] : ints) f.attribute(key, static_cast<int64_t>(v));
  f.attribute("clock", std::string("seconds since the run's epoch: the moment every rank left one world barrier "
                                   "(each rank's steady clock); epoch_unix_s is the system clock then"));
  f.attribute("epoch_unix_s", clock_.epoch_unix_seconds());
  if (!device_.empty()) f.attribute("device", device_);
  f.flush();
}

void TraceRecorder::set_attribute(const std::string& name, const std::string& value) {
  guarded([&] { file_->attribute(name, value); });
}
void TraceRecorder::set_attribute(const std::string& name, int64_t value) {
  guarded([&] { file_->attribute(name, value); });
}
void TraceRecorder::set_attribute(const std::string& name, double value) {
  guarded([&] { file_->attribute(name, value); });
}

template <class Fn>
void TraceRecorder::guarded(Fn&& fn) {
  if (!file_) return;
  try {
    fn();
  } catch (const std::exception& e) {
    // A trace that cannot be written (a full disk) must not end a long run: say so, stop recording.
    std::cerr << "dilu: rank " << id_.world_rank << ": " << e.what() << "; trace recording stops, the run goes on\n";
    file_.reset();
    step_rows_.clear();
    request_rows_.clear();
    event_rows_.clear();
  }
}
void TraceRecorder::set_device(const std::string& device) {
  device_ = device;
  set_attribute("device", device);
}

void TraceRecorder::begin_step() {
  t_begin_ = clock_.now();
  t_host_done_ = t_compute_done_ = t_begin_;
  step_comm_ = step_pipeline_ = 0;
  in_step_ = true;
}

void TraceRecorder::end_step(const StepCounts& c) {
  const double end = clock_.now();
  in_step_ = false;
  const double total = end - t_begin_;
  // Communication happens inside the compute phase (the model's collectives, the pipeline).
  const double compute = std::max(0.0, (t_compute_done_ - t_host_done_) - step_comm_);
  const double host = std::max(0.0, total - compute - step_comm_);
  const int64_t index = totals_.steps++;
  if (index == 0) {
    totals_.first_step_start = t_begin_;
    last_flush_ = end;  // the timed flushes count from the first step, not from start-up
  }
  totals_.last_step_end = end;
  totals_.compute_s += compute;
  totals_.comm_s += step_comm_;
  totals_.pipeline_s += step_pipeline_;
  totals_.host_s += host;
  if (!file_) return;

  const auto t_rec = TraceClock::Clock::now();
  if (memory_probe_ && end - memory_sampled_at_ >= 1.0) {
    memory_bytes_ = memory_probe_();
    memory_sampled_at_ = end;
  }
  step_rows_.push_back({index, t_begin_, end, c.prefill_tokens, c.decode_tokens, c.sequences, c.tokens_produced,
                        compute, step_comm_, step_pipeline_, host, c.kv_blocks_used, kv_blocks_total_, memory_bytes_});
  keep_span_room();
  if (truncated_at_step_ < 0) ++spans_kept_;
  if (step_rows_.size() >= kStepRowsPerFlush || event_rows_.size() >= kEventRowsPerFlush ||
      request_rows_.size() >= kRequestRowsPerFlush || end - last_flush_ >= kFlushSeconds)
    flush_rows();
  totals_.recording_s += std::chrono::duration<double>(TraceClock::Clock::now() - t_rec).count();
}

void TraceRecorder::keep_span_room() {
  if (truncated_at_step_ < 0 && spans_kept_ >= kMaxSpans) truncated_at_step_ = totals_.steps;
}

void TraceRecorder::comm_end(SpanKind kind, TraceGroup group, double start, int64_t bytes, int peer, int64_t seq) {
  const double end = clock_.now();
  if (in_step_) {
    step_comm_ += end - start;
    if (is_pipeline(kind, group)) step_pipeline_ += end - start;
  }
  if (!file_) return;
  keep_span_room();
  if (truncated_at_step_ >= 0) return;
  event_rows_.push_back({kind, group, peer, totals_.steps, start, end, bytes, seq});
  ++spans_kept_;
}

void TraceRecorder::span(SpanKind kind, double start, double end) {
  if (!file_) return;
  event_rows_.push_back({kind, TraceGroup::None, -1, totals_.steps, start, end, 0, 0});
  ++spans_kept_;
}

void TraceRecorder::record_request(RequestRow row) {
  if (!file_) return;
  const auto t_rec = TraceClock::Clock::now();
  request_rows_.push_back(std::move(row));
  totals_.recording_s += std::chrono::duration<double>(TraceClock::Clock::now() - t_rec).count();
}

void TraceRecorder::record_bench(const BenchTraceRow& row) {
  guarded([&] { file_->append(std::vector<BenchTraceRow>{row}); });
}

void TraceRecorder::flush_rows() {
  guarded([&] {
    file_->append(step_rows_);
    file_->append(request_rows_);
    file_->append(event_rows_);
    step_rows_.clear();
    request_rows_.clear();
    event_rows_.clear();
    file_->flush();
  });
  last_flush_ = clock_.now();
}

RankTimeline TraceRecorder::finish(const std::map<std::string, double>& summary) {
  RankTimeline t;
  t.id = id_;
  t.device = device_;
  if (!file_) return t;
  const auto t_close = TraceClock::Clock::now();
  flush_rows();
  guarded([&] {
    for (const auto& [key, value] : summary) {
      // Counts as integers, times (keys ending in _s) as floats.
      if (!key.ends_with("_s") && value == std::floor(value) && std::abs(value) < 9e15)
        file_->attribute(key, static_cast<int64_t>(value));
      else
        file_->attribute(key, value);
    }
    file_->attribute("steps", totals_.steps);
    file_->attribute("timeline_truncated_at_step", truncated_at_step_);
    file_->attribute("epoch_unix_s", clock_.epoch_unix_seconds());
    file_->attribute("recording_s", totals_.recording_s);
    file_->flush();
  });
  if (!file_) return t;  // given up: the file holds what was written before
  file_.reset();
  // The timeline's spans, from the file: the steps before the cap, every event kept.
  TraceFileData data;
  try {
    data = read_trace_file(path_);
  } catch (const std::exception& e) {
    std::cerr << "dilu: rank " << id_.world_rank << ": " << e.what() << "; this rank is left out of the timeline\n";
    return t;
  }
  for (const StepRow& s : data.steps) {
    if (truncated_at_step_ >= 0 && s.step >= truncated_at_step_) break;
    t.steps.push_back({s.step, s.start, s.end, s.prefill_tokens, s.decode_tokens, s.batch_size, s.comm_s,
                       s.pipeline_s});
  }
  t.events = std::move(data.events);
  t.truncated_at_step = truncated_at_step_;
  // Closing is paid once per run, not per step: kept apart from recording_s.
  file_closing_s_ = std::chrono::duration<double>(TraceClock::Clock::now() - t_close).count();
  return t;
}

std::function<int64_t()> device_memory_probe(const Ops& ops, int64_t arena_bytes) {
  if (ops.device().kind == DeviceKind::CPU) {
    return [] {
      // Resident pages of this process: the host is the CPU backend's device.
      long pages = 0, resident = 0;
      if (FILE* f = std::fopen("/proc/self/statm", "r")) {
        if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
        std::fclose(f);
      }
      return static_cast<int64_t>(resident) * static_cast<int64_t>(sysconf(_SC_PAGESIZE));
    };
  }
  const auto free_at_start = static_cast<int64_t>(ops.free_memory_bytes());
  const Ops* p = &ops;
  return [p, free_at_start, arena_bytes] {
    return free_at_start - static_cast<int64_t>(p->free_memory_bytes()) + arena_bytes;
  };
}

// ---- TracedCommunicator ----

void TracedCommunicator::all_reduce_sum(Tensor& t) {
  const double s = trace_.comm_start();
  inner_.all_reduce_sum(t);
  trace_.comm_end(SpanKind::AllReduce, group_, s, static_cast<int64_t>(t.nbytes()), -1, 0);
}

void TracedCommunicator::all_gather(const Tensor& send, Tensor& recv) {
  const double s = trace_.comm_start();
  inner_.all_gather(send, recv);
  trace_.comm_end(SpanKind::AllGather, group_, s, static_cast<int64_t>(recv.nbytes()), -1, 0);
}

void TracedCommunicator::broadcast(std::vector<uint8_t>& bytes, int root) {
  const double s = trace_.comm_start();
  inner_.broadcast(bytes, root);
  trace_.comm_end(SpanKind::Broadcast, group_, s, static_cast<int64_t>(bytes.size()), root, 0);
}

int64_t TracedCommunicator::sum(int64_t v) {
  const double s = trace_.comm_start();
  const int64_t r = inner_.sum(v);
  trace_.comm_end(SpanKind::Sum, group_, s, 8, -1, 0);
  return r;
}

void TracedCommunicator::send(const Tensor& t, int dst) {
  const int64_t seq = next_seq(SpanKind::Send, dst);
  const double s = trace_.comm_start();
  inner_.send(t, dst);
  trace_.comm_end(SpanKind::Send, group_, s, static_cast<int64_t>(t.nbytes()), dst, seq);
}

void TracedCommunicator::recv(Tensor& t, int src) {
  const int64_t seq = next_seq(SpanKind::Recv, src);
  const double s = trace_.comm_start();
  inner_.recv(t, src);
  trace_.comm_end(SpanKind::Recv, group_, s, static_cast<int64_t>(t.nbytes()), src, seq);
}

void TracedCommunicator::send_bytes(const std::vector<uint8_t>& bytes, int dst) {
  const int64_t seq = next_seq(SpanKind::SendBytes, dst);
  const double s = trace_.comm_start();
  inner_.send_bytes(bytes, dst);
  trace_.comm_end(SpanKind::SendBytes, group_, s, static_cast<int64_t>(bytes.size()), dst, seq);
}

void TracedCommunicator::recv_bytes(std::vector<uint8_t>& bytes, int src) {
  const int64_t seq = next_seq(SpanKind::RecvBytes, src);
  const double s = trace_.comm_start();
  inner_.recv_bytes(bytes, src);
  trace_.comm_end(SpanKind::RecvBytes, group_, s, static_cast<int64_t>(bytes.size()), src, seq);
}

void TracedCommunicator::barrier() {
  const double s = trace_.comm_start();
  inner_.barrier();
  trace_.comm_end(SpanKind::Barrier, group_, s, 0, -1, 0);
}

// ---- end of the run ----

namespace {

std::vector<uint8_t> encode_load(const RankLoad& l) {
  std::vector<uint8_t> b;
  put_value<int32_t>(b, l.rank);
  put_value(b, l.steps);
  for (double v : {l.busy_s, l.comm_s, l.pipeline_s, l.recording_s}) put_value(b, v);
  put_string(b, l.hostname);
  return b;
}

RankLoad decode_load(const std::vector<uint8_t>& b) {
  ByteReader r{b};
  RankLoad l;
  l.rank = r.value<int32_t>();
  l.steps = r.value<int64_t>();
  for (double* v : {&l.busy_s, &l.comm_s, &l.pipeline_s, &l.recording_s}) *v = r.value<double>();
  l.hostname = r.string();
  return l;
}

}  // namespace

std::vector<RankLoad> finish_trace(TraceRecorder& trace, Communicator& world, const std::filesystem::path& dir,
                                   const std::map<std::string, double>& summary) {
  const bool timeline = !dir.empty();
  RankTimeline mine = trace.finish(summary);
  const TraceTotals& t = trace.totals();
  const RankLoad load{world.rank(), trace.identity().hostname, t.steps, t.busy_s(), t.comm_s, t.pipeline_s,
                      t.recording_s};
  if (world.rank() != 0) {
    world.send_bytes(encode_load(load), 0);
    if (timeline) world.send_bytes(encode_timeline(mine), 0);
    return {load};
  }
  std::vector<RankLoad> loads{load};
  // The timeline is a by-product: failing to write it (a full disk) is said, not fatal, and every
  // rank's message is still received.
  std::optional<TimelineWriter> writer;
  auto write = [&](auto&& fn) {
    if (!writer) return;
    try {
      fn();
    } catch (const std::exception& e) {
      std::cerr << "dilu: " << e.what() << "; the timeline is left unwritten\n";
      writer.reset();
      std::error_code ec;
      std::filesystem::remove(dir / "timeline.json", ec);  // no half file that looks like one
    }
  };
  if (timeline) {
    try {
      writer.emplace(dir / "timeline.json");
    } catch (const std::exception& e) {
      std::cerr << "dilu: " << e.what() << "; the timeline is left unwritten\n";
    }
    write([&] { writer->add(mine); });
    mine = {};
  }
  for (int r = 1; r < world.size(); ++r) {
    std::vector<uint8_t> bytes;
    world.recv_bytes(bytes, r);
    loads.push_back(decode_load(bytes));
    if (timeline) {
      world.recv_bytes(bytes, r);
      write([&] { writer->add(decode_timeline(bytes)); });
    }
  }
  write([&] { writer->close(); });
  return loads;
}

}  // namespace dilu
