// See trace_hdf5.h. Compound types are built from the row structs (member names are the schema:
// reading converts by name, so a reader built for fewer fields still reads a newer file).
#include "engine/trace_hdf5.h"

#include <hdf5.h>

#include <cstddef>
#include <cstring>

#include "kernels/error.h"

namespace dilu {

namespace {

// A handle closed by its HDF5 close function.
class Handle {
 public:
  Handle() = default;
  Handle(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  Handle(Handle&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = -1; }
  Handle& operator=(Handle&& o) noexcept {
    reset();
    id_ = o.id_;
    close_ = o.close_;
    o.id_ = -1;
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() { reset(); }
  void reset() {
    if (id_ >= 0 && close_) close_(id_);
    id_ = -1;
  }
  hid_t get() const { return id_; }
  bool ok() const { return id_ >= 0; }

 private:
  hid_t id_ = -1;
  herr_t (*close_)(hid_t) = nullptr;
};

void quiet_hdf5() {
  static const bool once = [] {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);  // errors become exceptions naming the file
    return true;
  }();
  (void)once;
}

hid_t checked(hid_t id, const std::filesystem::path& path, const char* what) {
  DILU_USER_CHECK(id >= 0, "trace file '", path.string(), "': HDF5 failed to ", what);
  return id;
}
void checked(herr_t rc, const std::filesystem::path& path, const char* what, int) {
  DILU_USER_CHECK(rc >= 0, "trace file '", path.string(), "': HDF5 failed to ", what);
}

Handle string_type() {
  Handle t(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(t.get(), H5T_VARIABLE);
  H5Tset_cset(t.get(), H5T_CSET_UTF8);
  return t;
}

Handle kind_type() {
  Handle t(H5Tenum_create(H5T_NATIVE_UINT8), H5Tclose);
  for (int k = 0; k < kNumSpanKinds; ++k) {
    const uint8_t v = static_cast<uint8_t>(k);
    H5Tenum_insert(t.get(), std::string(span_kind_name(static_cast<SpanKind>(k))).c_str(), &v);
  }
  return t;
}

Handle group_type() {
  Handle t(H5Tenum_create(H5T_NATIVE_UINT8), H5Tclose);
  for (int g = 0; g < kNumTraceGroups; ++g) {
    const uint8_t v = static_cast<uint8_t>(g);
    H5Tenum_insert(t.get(), std::string(trace_group_name(static_cast<TraceGroup>(g))).c_str(), &v);
  }
  return t;
}

#define DILU_H5_FIELD(type, T, field, h5) H5Tinsert(type, #field, offsetof(T, field), h5)

Handle step_type() {
  Handle t(H5Tcreate(H5T_COMPOUND, sizeof(StepRow)), H5Tclose);
  const hid_t i = H5T_NATIVE_INT64, d = H5T_NATIVE_DOUBLE, c = t.get();
  DILU_H5_FIELD(c, StepRow, step, i);
  DILU_H5_FIELD(c, StepRow, start, d);
  DILU_H5_FIELD(c, StepRow, end, d);
  DILU_H5_FIELD(c, StepRow, prefill_tokens, i);
  DILU_H5_FIELD(c, StepRow, decode_tokens, i);
  DILU_H5_FIELD(c, StepRow, batch_size, i);
  DILU_H5_FIELD(c, StepRow, tokens_produced, i);
  DILU_H5_FIELD(c, StepRow, compute_s, d);
  DILU_H5_FIELD(c, StepRow, comm_s, d);
  DILU_H5_FIELD(c, StepRow, pipeline_s, d);
  DILU_H5_FIELD(c, StepRow, host_s, d);
  DILU_H5_FIELD(c, StepRow, kv_blocks_used, i);
  DILU_H5_FIELD(c, StepRow, kv_blocks_total, i);
  DILU_H5_FIELD(c, StepRow, device_memory_bytes, i);
  return t;
}

// RequestRow in the form HDF5 reads and writes (the id as a C string).
struct RequestRecord {
  const char* id;
  int64_t line, prompt_tokens, output_tokens, samples;
  double enqueue, first_token, finish;
  int32_t replica;
};

Handle request_type() {
  Handle t(H5Tcreate(H5T_COMPOUND, sizeof(RequestRecord)), H5Tclose);
  Handle s = string_type();
  const hid_t i = H5T_NATIVE_INT64, d = H5T_NATIVE_DOUBLE, c = t.get();
  DILU_H5_FIELD(c, RequestRecord, id, s.get());
  DILU_H5_FIELD(c, RequestRecord, line, i);
  DILU_H5_FIELD(c, RequestRecord, prompt_tokens, i);
  DILU_H5_FIELD(c, RequestRecord, output_tokens, i);
  DILU_H5_FIELD(c, RequestRecord, samples, i);
  DILU_H5_FIELD(c, RequestRecord, enqueue, d);
  DILU_H5_FIELD(c, RequestRecord, first_token, d);
  DILU_H5_FIELD(c, RequestRecord, finish, d);
  DILU_H5_FIELD(c, RequestRecord, replica, H5T_NATIVE_INT32);
  return t;
}

Handle event_type() {
  Handle t(H5Tcreate(H5T_COMPOUND, sizeof(EventRow)), H5Tclose);
  Handle k = kind_type(), g = group_type();
  const hid_t i = H5T_NATIVE_INT64, d = H5T_NATIVE_DOUBLE, c = t.get();
  DILU_H5_FIELD(c, EventRow, kind, k.get());
  DILU_H5_FIELD(c, EventRow, group, g.get());
  DILU_H5_FIELD(c, EventRow, peer, H5T_NATIVE_INT32);
  DILU_H5_FIELD(c, EventRow, step, i);
  DILU_H5_FIELD(c, EventRow, start, d);
  DILU_H5_FIELD(c, EventRow, end, d);
  DILU_H5_FIELD(c, EventRow, bytes, i);
  DILU_H5_FIELD(c, EventRow, seq, i);
  return t;
}

Handle bench_type() {
  Handle t(H5Tcreate(H5T_COMPOUND, sizeof(BenchTraceRow)), H5Tclose);
  const hid_t i = H5T_NATIVE_INT64, d = H5T_NATIVE_DOUBLE, c = t.get();
  DILU_H5_FIELD(c, BenchTraceRow, batch, i);
  DILU_H5_FIELD(c, BenchTraceRow, first_step, i);
  DILU_H5_FIELD(c, BenchTraceRow, end_step, i);
  DILU_H5_FIELD(c, BenchTraceRow, prefill_s, d);
  DILU_H5_FIELD(c, BenchTraceRow, decode_s, d);
  DILU_H5_FIELD(c, BenchTraceRow, prefill_tokens, i);
  DILU_H5_FIELD(c, BenchTraceRow, decode_tokens, i);
  DILU_H5_FIELD(c, BenchTraceRow, decode_steps, i);
  return t;
}

#undef DILU_H5_FIELD

// An extendible table: a 1-D chunked dataset of a compound type.
struct Table {
  Handle dataset, memtype;
  hsize_t rows = 0;
};

Table create_table(hid_t file, const std::filesystem::path& path, const char* name, Handle memtype, hsize_t chunk) {
  Table t;
  Handle filetype(H5Tcopy(memtype.get()), H5Tclose);
  H5Tpack(filetype.get());  // no padding in the file
  hsize_t dims = 0, maxdims = H5S_UNLIMITED;
  Handle space(H5Screate_simple(1, &dims, &maxdims), H5Sclose);
  Handle dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  H5Pset_chunk(dcpl.get(), 1, &chunk);
  t.dataset = Handle(checked(H5Dcreate2(file, name, filetype.get(), space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT),
                             path, "create a table"),
                     H5Dclose);
  t.memtype = std::move(memtype);
  return t;
}

void append_rows(Table& t, const void* data, hsize_t n, const std::filesystem::path& path) {
  if (n == 0) return;
  hsize_t size = t.rows + n;
  checked(H5Dset_extent(t.dataset.get(), &size), path, "extend a table", 0);
  Handle fspace(H5Dget_space(t.dataset.get()), H5Sclose);
  checked(H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, &t.rows, nullptr, &n, nullptr), path, "select rows", 0);
  Handle mspace(H5Screate_simple(1, &n, nullptr), H5Sclose);
  checked(H5Dwrite(t.dataset.get(), t.memtype.get(), mspace.get(), fspace.get(), H5P_DEFAULT, data), path,
          "write rows (is the disk full?)", 0);
  t.rows = size;
}

}  // namespace

struct TraceFileWriter::Impl {
  std::filesystem::path path;
  Handle file;
  Table steps, requests, events, bench;
};

TraceFileWriter::TraceFileWriter(const std::filesystem::path& path) : impl_(std::make_unique<Impl>()) {
  quiet_hdf5();
  impl_->path = path;
  const hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  DILU_USER_CHECK(f >= 0, "cannot create trace file '", path.string(), "' (is the directory writable?)");
  impl_->file = Handle(f, H5Fclose);
  impl_->steps = create_table(f, path, "steps", step_type(), 1024);
  impl_->requests = create_table(f, path, "requests", request_type(), 256);
  impl_->events = create_table(f, path, "events", event_type(), 4096);
  impl_->bench = create_table(f, path, "bench", bench_type(), 16);
  attribute("schema_version", kTraceSchemaVersion);
}

TraceFileWriter::~TraceFileWriter() = default;

namespace {

Handle fresh_attribute(hid_t file, const std::filesystem::path& path, const std::string& name, hid_t type) {
  if (H5Aexists(file, name.c_str()) > 0) H5Adelete(file, name.c_str());
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  return Handle(checked(H5Acreate2(file, name.c_str(), type, space.get(), H5P_DEFAULT, H5P_DEFAULT), path,
                        "create an attribute"),
                H5Aclose);
}

}  // namespace

void TraceFileWriter::attribute(const std::string& name, const std::string& value) {
  Handle type = string_type();
  Handle a = fresh_attribute(impl_->file.get(), impl_->path, name, type.get());
  const char* p = value.c_str();
  checked(H5Awrite(a.get(), type.get(), &p), impl_->path, "write an attribute", 0);
}

void TraceFileWriter::attribute(const std::string& name, int64_t value) {
  Handle a = fresh_attribute(impl_->file.get(), impl_->path, name, H5T_STD_I64LE);
  checked(H5Awrite(a.get(), H5T_NATIVE_INT64, &value), impl_->path, "write an attribute", 0);
}

void TraceFileWriter::attribute(const std::string& name, double value) {
  Handle a = fresh_attribute(impl_->file.get(), impl_->path, name, H5T_IEEE_F64LE);
  checked(H5Awrite(a.get(), H5T_NATIVE_DOUBLE, &value), impl_->path, "write an attribute", 0);
}

void TraceFileWriter::append(const std::vector<StepRow>& rows) {
  append_rows(impl_->steps, rows.data(), rows.size(), impl_->path);
}

void TraceFileWriter::append(const std::vector<RequestRow>& rows) {
  std::vector<RequestRecord> recs(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    const RequestRow& r = rows[i];
    recs[i] = {r.id.c_str(), r.line, r.prompt_tokens, r.output_tokens, r.samples, r.enqueue, r.first_token, r.finish,
               r.replica};
  }
  append_rows(impl_->requests, recs.data(), recs.size(), impl_->path);
}

void TraceFileWriter::append(const std::vector<EventRow>& rows) {
  append_rows(impl_->events, rows.data(), rows.size(), impl_->path);
}

void TraceFileWriter::append(const std::vector<BenchTraceRow>& rows) {
  append_rows(impl_->bench, rows.data(), rows.size(), impl_->path);
}

void TraceFileWriter::flush() {
  checked(H5Fflush(impl_->file.get(), H5F_SCOPE_LOCAL), impl_->path, "flush", 0);
}

// ---- reading ----

namespace {

herr_t read_attribute(hid_t loc, const char* name, const H5A_info_t*, void* op) {
  auto& data = *static_cast<TraceFileData*>(op);
  Handle a(H5Aopen(loc, name, H5P_DEFAULT), H5Aclose);
  if (!a.ok()) return 0;
  Handle type(H5Aget_type(a.get()), H5Tclose);
  switch (H5Tget_class(type.get())) {
    case H5T_STRING: {
      if (H5Tis_variable_str(type.get()) > 0) {
        Handle mem = string_type();
        char* s = nullptr;
        if (H5Aread(a.get(), mem.get(), &s) >= 0 && s) {
          data.text[name] = s;
          H5free_memory(s);
        }
      } else {
        std::string s(H5Tget_size(type.get()), '\0');
        if (H5Aread(a.get(), type.get(), s.data()) >= 0) data.text[name] = s.c_str();
      }
      break;
    }
    case H5T_INTEGER: {
      int64_t v = 0;
      if (H5Aread(a.get(), H5T_NATIVE_INT64, &v) >= 0) data.numbers[name] = static_cast<double>(v);
      break;
    }
    case H5T_FLOAT: {
      double v = 0;
      if (H5Aread(a.get(), H5T_NATIVE_DOUBLE, &v) >= 0) data.numbers[name] = v;
      break;
    }
    default:
      break;
  }
  return 0;
}

// Reads a whole table into `rows` (resized); false when the file has no such table.
template <class Row>
bool read_table(hid_t file, const std::filesystem::path& path, const char* name, hid_t memtype,
                std::vector<Row>& rows) {
  if (H5Lexists(file, name, H5P_DEFAULT) <= 0) return false;
  Handle d(checked(H5Dopen2(file, name, H5P_DEFAULT), path, "open a table"), H5Dclose);
  Handle space(H5Dget_space(d.get()), H5Sclose);
  hsize_t n = 0;
  H5Sget_simple_extent_dims(space.get(), &n, nullptr);
  rows.resize(n);
  if (n > 0) checked(H5Dread(d.get(), memtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, rows.data()), path, "read a table", 0);
  return true;
}

}  // namespace

TraceFileData read_trace_file(const std::filesystem::path& path, bool with_events) {
  quiet_hdf5();
  DILU_USER_CHECK(H5Fis_hdf5(path.c_str()) > 0, "'", path.string(), "' is not an HDF5 file");
  Handle file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  DILU_USER_CHECK(file.ok(), "cannot open trace file '", path.string(), "'");
  TraceFileData data;
  data.path = path;
  hsize_t idx = 0;
  H5Aiterate2(file.get(), H5_INDEX_NAME, H5_ITER_INC, &idx, read_attribute, &data);
  DILU_USER_CHECK(data.numbers.count("schema_version"), "'", path.string(),
                  "' is not a dilu trace (no schema_version attribute)");
  const hid_t f = file.get();
  Handle st = step_type(), et = event_type(), bt = bench_type(), rt = request_type();
  DILU_USER_CHECK(read_table(f, path, "steps", st.get(), data.steps), "trace file '", path.string(),
                  "' has no /steps table");
  if (with_events) read_table(f, path, "events", et.get(), data.events);
  read_table(f, path, "bench", bt.get(), data.bench);
  std::vector<RequestRecord> recs;
  if (read_table(f, path, "requests", rt.get(), recs)) {
    data.requests.resize(recs.size());
    for (size_t i = 0; i < recs.size(); ++i) {
      const RequestRecord& r = recs[i];
      data.requests[i] = {r.id ? r.id : "", r.line, r.prompt_tokens, r.output_tokens, r.samples, r.enqueue,
                          r.first_token, r.finish, r.replica};
    }
    if (!recs.empty()) {
      hsize_t n = recs.size();
      Handle space(H5Screate_simple(1, &n, nullptr), H5Sclose);
      H5Dvlen_reclaim(rt.get(), space.get(), H5P_DEFAULT, recs.data());
    }
  }
  return data;
}

}  // namespace dilu
