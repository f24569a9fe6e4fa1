// Line-atomic JSONL output (see jsonl_writer.h).
#include "engine/jsonl_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <nlohmann/json.hpp>

#include "kernels/error.h"

namespace dilu {

JsonlWriter::JsonlWriter(const std::filesystem::path& path, Mode mode)
    : path_(path), last_sync_(std::chrono::steady_clock::now()) {
  std::error_code ec;
  // Only a regular file can hold earlier results; pipes and devices (/dev/stdout) are fine.
  if (mode == Mode::Create && std::filesystem::is_regular_file(path, ec) && std::filesystem::file_size(path, ec) > 0)
    throw UserError("output file '" + path.string() +
                    "' already exists and is not empty; dilu never overwrites results: remove it or choose another "
                    "--output");
  if (path.has_parent_path() && !std::filesystem::exists(path.parent_path()))
    throw UserError("cannot write '" + path.string() + "': directory '" + path.parent_path().string() +
                    "' does not exist");
  const bool truncate = mode == Mode::Overwrite && std::filesystem::is_regular_file(path, ec);
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | (truncate ? O_TRUNC : 0), 0644);
  DILU_USER_CHECK(fd_ >= 0, "cannot open output file '", path.string(), "': ", std::strerror(errno));
}

JsonlWriter::~JsonlWriter() {
  if (fd_ >= 0) {
    ::fdatasync(fd_);
    ::close(fd_);
  }
}

void JsonlWriter::write(const nlohmann::json& record) {
  // Invalid UTF-8 in a string is replaced rather than thrown: an output line is always written.
  const std::string line = record.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  size_t done = 0;
  while (done < line.size()) {
    const ssize_t n = ::write(fd_, line.data() + done, line.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : ENOSPC;  // a write of 0 bytes: no room
      // Cut back a partial line so the file stays valid JSONL for a later resume.
      if (done > 0) {
        const off_t end = ::lseek(fd_, 0, SEEK_END);
        if (end >= 0 && ::ftruncate(fd_, end - static_cast<off_t>(done)) != 0) { /* best effort */ }
      }
      throw OutputError("cannot write to output file '" + path_.string() + "': " + std::strerror(err) + " (after " +
                        std::to_string(lines_) + " complete lines this run; every complete line is kept). Make room " +
                        "(or raise the file size limit) and run the same command again: it resumes");
    }
    done += static_cast<size_t>(n);
  }
  ++lines_;
  if (std::chrono::steady_clock::now() - last_sync_ > std::chrono::seconds(2)) sync();
}

void JsonlWriter::sync() {
  // A pipe or a terminal (--output /dev/stdout) cannot be synced (EINVAL): nothing to lose there.
  if (::fdatasync(fd_) != 0 && errno != EINVAL)
    throw OutputError("cannot sync output file '" + path_.string() + "': " + std::strerror(errno) +
                      "; make room and run the same command again: it resumes");
  last_sync_ = std::chrono::steady_clock::now();
}

}  // namespace dilu
