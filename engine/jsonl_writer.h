// Appends JSON lines to the output file: each line goes out in one write() so a crash never
// leaves half a line behind a finished one; data is synced to disk periodically and at close.
#pragma once

#include <chrono>
#include <filesystem>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "kernels/error.h"

namespace dilu {

// The output could not be written (disk full, file size limit, quota, I/O error). What was
// written before stays valid: the file holds only complete lines, and running the same command
// again resumes. `dilu run` exits with 4 (docs/reliability.md).
class OutputError : public UserError {
 public:
  using UserError::UserError;
};

class JsonlWriter {
 public:
  enum class Mode {
    Create,     // refuse an existing non-empty file, so earlier results are never overwritten
    Append,     // resume: keep what is there (the caller has cut a torn last line)
    Overwrite,  // start over: truncate
  };
  JsonlWriter(const std::filesystem::path& path, Mode mode);
  ~JsonlWriter();
  JsonlWriter(const JsonlWriter&) = delete;
  JsonlWriter& operator=(const JsonlWriter&) = delete;

  // Appends one line; on failure cuts back what part of it was written and throws OutputError.
  void write(const nlohmann::json& record);
  void sync();  // fdatasync; throws OutputError naming the file on failure (disk full, I/O error)
  int64_t lines_written() const { return lines_; }

 private:
  std::filesystem::path path_;
  int fd_ = -1;
  int64_t lines_ = 0;
  std::chrono::steady_clock::time_point last_sync_;
};

}  // namespace dilu
