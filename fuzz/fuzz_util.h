// Shared by the libFuzzer targets (docs/reliability.md): the rule every target enforces is that
// hostile input may only ever produce a UserError (a message for the user). Any other exception
// (a DILU_CHECK's std::logic_error, nlohmann's type_error, std::out_of_range, ...) is a bug: it
// is printed and the process aborts, which libFuzzer reports as a crash with the input saved.
#pragma once

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <string>
#include <string_view>

#include "kernels/error.h"

namespace dilu::fuzz {

namespace fs = std::filesystem;

[[noreturn]] inline void bug(const std::string& what) {
  std::fprintf(stderr, "\n==dilu-fuzz== BUG: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// Runs fn; a UserError is the expected answer to a bad input and returns false, success returns
// true, anything else aborts.
template <class Fn>
bool user_errors_only(Fn&& fn) {
  try {
    fn();
    return true;
  } catch (const UserError&) {
    return false;
  } catch (const std::exception& e) {
    bug(std::string("an exception other than UserError escaped: ") + e.what());
  } catch (...) {
    bug("a non-standard exception escaped");
  }
}

#define DILU_FUZZ_ASSERT(cond, what)                                             \
  do {                                                                           \
    if (!(cond)) ::dilu::fuzz::bug(std::string("assertion `" #cond "` failed: ") + (what)); \
  } while (0)

// A scratch directory of this process (under $TMPDIR, else /dev/shm: targets that write a file per
// input run several times faster in memory, else /tmp), removed at exit.
inline const fs::path& scratch() {
  static const fs::path dir = [] {
    fs::path base = fs::temp_directory_path();
    if (!std::getenv("TMPDIR") && ::access("/dev/shm", W_OK) == 0) base = "/dev/shm";
    std::string tmpl = (base / "dilu-fuzz-XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) bug("cannot create a scratch directory under " + base.string());
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(scratch(), ec);
    });
    return fs::path(tmpl);
  }();
  return dir;
}

inline void write_file(const fs::path& path, std::string_view bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) bug("cannot write " + path.string());
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n <= 0) bug("cannot write " + path.string());
    done += static_cast<size_t>(n);
  }
  ::close(fd);
}

// The source tree (for data files the targets read at start-up), compiled in.
inline fs::path source_dir() { return fs::path(DILU_SOURCE_DIR); }

}  // namespace dilu::fuzz
