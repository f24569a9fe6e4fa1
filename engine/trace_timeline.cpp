// See trace_timeline.h. The JSON is streamed by hand (a run can have millions of spans); names
// and host names go through nlohmann::json for their escaping.
#include "engine/trace_timeline.h"

#include <cstdio>

#include <nlohmann/json.hpp>

#include "engine/byte_io.h"
#include "engine/version.h"
#include "kernels/error.h"

namespace dilu {

namespace {

bool is_pipeline(const EventRow& e) {
  return e.group == TraceGroup::PP && e.kind >= SpanKind::Send && e.kind <= SpanKind::RecvBytes;
}

// The world rank of `peer` of the PP group of a rank at `id` (stages of one replica, same TP rank).
int pp_peer_world_rank(const TraceIdentity& id, int peer) { return (id.dp_rank * id.pp + peer) * id.tp + id.tp_rank; }

// Same id on both sides of a transfer: (sender, receiver, tensor or bytes, sequence number).
// Below 2^53 for up to 4096 ranks (seq of a kept span < kMaxSpans < 2^20).
int64_t flow_id(int src, int dst, int world_size, bool bytes, int64_t seq) {
  return ((static_cast<int64_t>(src) * world_size + dst) * 2 + (bytes ? 1 : 0)) * (int64_t{1} << 20) + seq;
}

std::string quoted(const std::string& s) { return nlohmann::json(s).dump(); }

}  // namespace

std::vector<uint8_t> encode_timeline(const RankTimeline& t) {
  std::vector<uint8_t> b;
  const TraceIdentity& id = t.id;
  for (int v : {id.world_rank, id.world_size, id.node, id.num_nodes, id.local_rank, id.tp, id.pp, id.dp, id.tp_rank,
                id.pp_rank, id.dp_rank})
    put_value<int32_t>(b, v);
  put_string(b, id.command);
  put_string(b, id.hostname);
  put_string(b, t.device);
  put_vec(b, t.steps);
  put_vec(b, t.events);
  put_value(b, t.truncated_at_step);
  return b;
}

RankTimeline decode_timeline(const std::vector<uint8_t>& bytes) {
  ByteReader r{bytes};
  RankTimeline t;
  TraceIdentity& id = t.id;
  for (int* v : {&id.world_rank, &id.world_size, &id.node, &id.num_nodes, &id.local_rank, &id.tp, &id.pp, &id.dp,
                 &id.tp_rank, &id.pp_rank, &id.dp_rank})
    *v = r.value<int32_t>();
  id.command = r.string();
  id.hostname = r.string();
  t.device = r.string();
  t.steps = r.vec<StepSpan>();
  t.events = r.vec<EventRow>();
  t.truncated_at_step = r.value<int64_t>();
  return t;
}

TimelineWriter::TimelineWriter(const std::filesystem::path& path) : path_(path), out_(path) {
  DILU_USER_CHECK(out_.good(), "cannot write timeline '", path.string(), "'");
  out_ << "{\"displayTimeUnit\": \"ms\",\n\"otherData\": {\"dilu_version\": " << quoted(std::string(version_string()))
       << ", \"clock\": \"microseconds since the run's epoch (every rank left one barrier)\"},\n\"traceEvents\": [\n";
}

void TimelineWriter::event_separator() {
  if (!first_) out_ << ",\n";
  first_ = false;
}

void TimelineWriter::add(const RankTimeline& t) {
  const TraceIdentity& id = t.id;
  const int pid = id.world_rank;
  char buf[512];
  std::string label = "rank " + std::to_string(id.world_rank) + " (tp " + std::to_string(id.tp_rank) + ", pp " +
                      std::to_string(id.pp_rank) + ", dp " + std::to_string(id.dp_rank) + ") " + id.hostname;
  if (t.truncated_at_step >= 0) label += " [spans kept until step " + std::to_string(t.truncated_at_step) + "]";
  event_separator();
  out_ << "{\"name\": \"process_name\", \"ph\": \"M\", \"pid\": " << pid << ", \"args\": {\"name\": " << quoted(label)
       << "}},\n{\"name\": \"process_sort_index\", \"ph\": \"M\", \"pid\": " << pid
       << ", \"args\": {\"sort_index\": " << pid << "}},\n"
       << "{\"name\": \"thread_name\", \"ph\": \"M\", \"pid\": " << pid << ", \"tid\": 1, \"args\": {\"name\": "
       << quoted("steps" + (t.device.empty() ? std::string() : " on " + t.device)) << "}},\n"
       << "{\"name\": \"thread_name\", \"ph\": \"M\", \"pid\": " << pid
       << ", \"tid\": 2, \"args\": {\"name\": \"communication\"}}";
  for (const StepSpan& s : t.steps) {
    std::snprintf(buf, sizeof buf,
                  ",\n{\"name\": \"step %lld\", \"cat\": \"step\", \"ph\": \"X\", \"pid\": %d, \"tid\": 1, \"ts\": %.3f, "
                  "\"dur\": %.3f, \"args\": {\"prefill_tokens\": %lld, \"decode_tokens\": %lld, \"batch_size\": %lld, "
                  "\"comm_ms\": %.3f, \"pipeline_ms\": %.3f}}",
                  static_cast<long long>(s.step), pid, s.start * 1e6, (s.end - s.start) * 1e6,
                  static_cast<long long>(s.prefill_tokens), static_cast<long long>(s.decode_tokens),
                  static_cast<long long>(s.batch_size), s.comm_s * 1e3, s.pipeline_s * 1e3);
    out_ << buf;
  }
  for (const EventRow& e : t.events) {
    const std::string kind(span_kind_name(e.kind));
    const std::string group(trace_group_name(e.group));
    if (e.kind == SpanKind::Load) {
      std::snprintf(buf, sizeof buf,
                    ",\n{\"name\": \"load\", \"cat\": \"load\", \"ph\": \"X\", \"pid\": %d, \"tid\": 1, \"ts\": %.3f, "
                    "\"dur\": %.3f}",
                    pid, e.start * 1e6, (e.end - e.start) * 1e6);
      out_ << buf;
      continue;
    }
    std::snprintf(buf, sizeof buf,
                  ",\n{\"name\": \"%s %s\", \"cat\": \"%s\", \"ph\": \"X\", \"pid\": %d, \"tid\": 2, \"ts\": %.3f, "
                  "\"dur\": %.3f, \"args\": {\"step\": %lld, \"bytes\": %lld, \"peer\": %d}}",
                  group.c_str(), kind.c_str(), group.c_str(), pid, e.start * 1e6, (e.end - e.start) * 1e6,
                  static_cast<long long>(e.step), static_cast<long long>(e.bytes), e.peer);
    out_ << buf;
    if (is_pipeline(e) && e.peer >= 0) {
      const bool sending = e.kind == SpanKind::Send || e.kind == SpanKind::SendBytes;
      const bool bytes = e.kind == SpanKind::SendBytes || e.kind == SpanKind::RecvBytes;
      const int other = pp_peer_world_rank(id, e.peer);
      const int64_t fid = sending ? flow_id(pid, other, id.world_size, bytes, e.seq)
                                  : flow_id(other, pid, id.world_size, bytes, e.seq);
      std::snprintf(buf, sizeof buf,
                    ",\n{\"name\": \"pipeline\", \"cat\": \"pipeline\", \"ph\": \"%s\",%s \"id\": %lld, \"pid\": %d, "
                    "\"tid\": 2, \"ts\": %.3f}",
                    sending ? "s" : "f", sending ? "" : " \"bp\": \"e\",", static_cast<long long>(fid), pid,
                    (e.start + e.end) / 2 * 1e6);
      out_ << buf;
    }
  }
  DILU_USER_CHECK(out_.good(), "cannot write timeline '", path_.string(), "' (is the disk full?)");
}

void TimelineWriter::close() {
  out_ << "\n]}\n";
  out_.close();
  DILU_USER_CHECK(!out_.fail(), "cannot write timeline '", path_.string(), "' (is the disk full?)");
}

}  // namespace dilu
