// The HDF5 form of a rank's trace (docs/traces.md): compound tables /steps, /requests, /events,
// /bench, appended in chunks as the run goes, and attributes on the root group. The only file
// that includes hdf5.h; readable with h5py and h5dump.
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "engine/trace.h"

namespace dilu {

inline constexpr int64_t kTraceSchemaVersion = 1;

class TraceFileWriter {
 public:
  // Creates (replaces) `path`; UserError naming it when it cannot.
  explicit TraceFileWriter(const std::filesystem::path& path);
  ~TraceFileWriter();
  TraceFileWriter(const TraceFileWriter&) = delete;
  TraceFileWriter& operator=(const TraceFileWriter&) = delete;

  // Root attributes; writing one again replaces it.
  void attribute(const std::string& name, const std::string& value);
  void attribute(const std::string& name, int64_t value);
  void attribute(const std::string& name, double value);
  void append(const std::vector<StepRow>& rows);
  void append(const std::vector<RequestRow>& rows);
  void append(const std::vector<EventRow>& rows);
  void append(const std::vector<BenchTraceRow>& rows);
  // Hands what was written to the operating system (a killed run keeps it).
  void flush();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A rank's trace as read back.
struct TraceFileData {
  std::filesystem::path path;
  std::map<std::string, std::string> text;    // string attributes
  std::map<std::string, double> numbers;      // numeric attributes
  std::vector<StepRow> steps;
  std::vector<RequestRow> requests;
  std::vector<EventRow> events;
  std::vector<BenchTraceRow> bench;
  double number(const std::string& key, double fallback = 0) const {
    auto it = numbers.find(key);
    return it == numbers.end() ? fallback : it->second;
  }
  std::string string(const std::string& key, const std::string& fallback = "") const {
    auto it = text.find(key);
    return it == text.end() ? fallback : it->second;
  }
};

// Reads a file written by TraceFileWriter; UserError naming the file when it is not one.
TraceFileData read_trace_file(const std::filesystem::path& path, bool with_events = true);

}  // namespace dilu
