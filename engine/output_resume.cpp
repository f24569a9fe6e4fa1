// See output_resume.h.
#include "engine/output_resume.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <system_error>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/jsonl_writer.h"
#include "kernels/error.h"

namespace dilu {

ResumeState load_resume_state(const std::filesystem::path& output) {
  ResumeState st;
  std::error_code ec;
  if (!std::filesystem::is_regular_file(output, ec)) return st;
  std::ifstream in(output, std::ios::binary);
  DILU_USER_CHECK(in.good(), "cannot read output file '", output.string(), "' to resume from it");
  std::string line;
  int64_t number = 0;
  uint64_t good_bytes = 0;  // length of the prefix made of complete, valid lines
  while (std::getline(in, line)) {
    ++number;
    const bool terminated = !in.eof();
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    const bool valid = terminated && j.is_object();
    if (!valid) {
      // Only the last line may be torn (a crash in the middle of a write); anything else means
      // the file is not ours or was edited.
      std::string rest;
      DILU_USER_CHECK(!std::getline(in, rest), output.string(), ": line ", number,
                      " is not a complete JSON record; dilu cannot resume from this file. Fix or remove that line, "
                      "or pass --overwrite to start over");
      st.cut_torn_line = true;
      break;
    }
    good_bytes += line.size() + 1;
    ++st.records;
    // Records carry "id" (dilu lines) or "custom_id" (OpenAI Batch lines); error records of
    // lines without a readable id carry the line number.
    // An error record answers its input line, whatever id it carries: a line whose id repeats an
    // earlier line's gets a duplicate-id error, and counting that error as the id's answer would
    // skip the earlier line if the run died before answering it.
    const nlohmann::json* id = j.contains("custom_id") ? &j["custom_id"] : j.contains("id") ? &j["id"] : nullptr;
    if (j.contains("error") && j["error"].is_object() && j["error"].contains("line") &&
        j["error"]["line"].is_number_integer()) {
      st.done_lines.insert(j["error"]["line"].get<int64_t>());
    } else if (id && !id->is_null()) {
      ++st.done_ids[id->dump()];
    }
  }
  if (st.cut_torn_line) {
    DILU_USER_CHECK(::truncate(output.c_str(), static_cast<off_t>(good_bytes)) == 0, "cannot cut the torn last line of '",
                    output.string(), "'");
  }
  return st;
}

bool take_done(ResumeState& st, const std::string& id) {
  auto it = st.done_ids.find(id);
  if (it == st.done_ids.end()) return false;
  if (--it->second == 0) st.done_ids.erase(it);
  return true;
}

std::filesystem::path part_file(const std::filesystem::path& output, int replica, int replicas) {
  return output.string() + ".dp-" + std::to_string(replica) + "-of-" + std::to_string(replicas) + ".part";
}

namespace {

namespace fs = std::filesystem;

// The journal of a merge in progress: "<output size before it> <part file name>\n". Written
// (atomically, by rename) before a part is appended; the part file's removal commits the merge.
fs::path merge_journal(const fs::path& output) { return output.string() + ".merging"; }

void write_all(int fd, const char* p, size_t n) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) throw std::system_error(errno ? errno : EIO, std::generic_category());
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void write_journal(const fs::path& journal, uint64_t size, const fs::path& part) {
  const std::string tmp = journal.string() + ".tmp";
  const std::string text = std::to_string(size) + " " + part.filename().string() + "\n";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  bool ok = fd >= 0;
  if (ok) {
    try {
      write_all(fd, text.data(), text.size());
      ok = ::fdatasync(fd) == 0;
    } catch (const std::system_error&) {
      ok = false;
    }
    ::close(fd);
  }
  if (ok) ok = ::rename(tmp.c_str(), journal.c_str()) == 0;
  if (!ok) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw OutputError("cannot write '" + journal.string() + "' to merge '" + part.string() + "': " +
                      std::strerror(err) + "; make room and run the same command again: it resumes");
  }
}

// Undoes or completes a merge that a crash or a full disk interrupted: while its part file is
// still there, the output is cut back to its size before the merge (the part is merged again);
// once the part is gone, the merge had committed.
void recover_merge(const fs::path& output) {
  const fs::path journal = merge_journal(output);
  std::error_code ec;
  if (!fs::exists(journal, ec)) return;
  std::ifstream in(journal);
  uint64_t size = 0;
  std::string part;
  if (in >> size >> part) {
    const fs::path dir = output.has_parent_path() ? output.parent_path() : fs::path(".");
    if (fs::exists(dir / part, ec) && fs::is_regular_file(output, ec) && fs::file_size(output, ec) > size)
      DILU_USER_CHECK(::truncate(output.c_str(), static_cast<off_t>(size)) == 0, "cannot cut '", output.string(),
                      "' back to its size before an interrupted merge (", size, " bytes): ", std::strerror(errno));
  }
  fs::remove(journal, ec);  // torn (the rename never happened): nothing was appended
}

}  // namespace

int64_t merge_part_files(const std::filesystem::path& output) {
  recover_merge(output);
  const fs::path dir = output.has_parent_path() ? output.parent_path() : fs::path(".");
  const std::string prefix = output.filename().string() + ".dp-";
  std::vector<fs::path> parts;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(prefix, 0) == 0 && name.size() > 5 && name.substr(name.size() - 5) == ".part") parts.push_back(e.path());
  }
  std::sort(parts.begin(), parts.end());
  if (parts.empty()) return 0;
  load_resume_state(output);  // parts go after complete lines only: cut a torn last line first
  const fs::path journal = merge_journal(output);
  int64_t merged = 0;
  for (const fs::path& part : parts) {
    load_resume_state(part);  // cuts a torn last line; refuses a damaged one
    const uint64_t before = fs::is_regular_file(output, ec) ? fs::file_size(output, ec) : 0;
    write_journal(journal, before, part);
    std::ifstream in(part, std::ios::binary);
    const int fd = ::open(output.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    DILU_USER_CHECK(in.good() && fd >= 0, "cannot merge '", part.string(), "' into '", output.string(), "'");
    int64_t lines = 0;
    try {
      std::string chunk, line;
      while (std::getline(in, line)) {
        chunk += line;
        chunk += '\n';
        ++lines;
        if (chunk.size() >= (1u << 20)) {
          write_all(fd, chunk.data(), chunk.size());
          chunk.clear();
        }
      }
      write_all(fd, chunk.data(), chunk.size());
      if (::fdatasync(fd) != 0) throw std::system_error(errno, std::generic_category());
    } catch (const std::system_error& e) {
      // Nothing of this part stays in the output; the part is kept for the next run.
      const int cut = ::ftruncate(fd, static_cast<off_t>(before));
      ::close(fd);
      if (cut == 0) fs::remove(journal, ec);
      throw OutputError("cannot append to '" + output.string() + "' while merging '" + part.string() + "': " +
                        e.code().message() + "; the part file is kept. Make room and run the same command again: " +
                        "it resumes");
    }
    ::close(fd);
    fs::remove(part);  // commits the merge
    fs::remove(journal, ec);
    merged += lines;
  }
  return merged;
}

}  // namespace dilu
