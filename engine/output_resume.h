// Resuming a run: reads the output file an earlier run left, cuts a torn last line, and tells
// which input lines are answered already (by id, or by line number for lines without an id).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
#include <string>

namespace dilu {

struct ResumeState {
  // Answers (records without an error) per id (JSON text: "\"a\"", "17").
  std::map<std::string, int64_t> done_ids;
  std::set<int64_t> done_lines;     // input lines answered by an error record (with an id or not)
  int64_t records = 0;              // complete lines found
  bool cut_torn_line = false;       // the last line was incomplete and has been removed
};

// Missing or empty file: nothing done. A torn (unterminated or unparsable) last line is cut off
// the file; a damaged line elsewhere is a UserError naming the file and line.
ResumeState load_resume_state(const std::filesystem::path& output);

// Data-parallel replicas write their records to part files beside the output
// ("OUT.dp-<r>-of-<n>.part"); this appends the complete lines of every part file to the output
// and removes the parts. Run before resuming and at the end of a run, on one rank. Crash-safe:
// a journal ("OUT.merging") written before each part is appended lets the next call undo a merge
// that a crash or a full disk interrupted (no line is lost or merged twice); a failed append is
// cut back at once and throws OutputError, keeping the part.
std::filesystem::path part_file(const std::filesystem::path& output, int replica, int replicas);
int64_t merge_part_files(const std::filesystem::path& output);

// True when an input line with this id was answered by an earlier run; consumes one record.
bool take_done(ResumeState& st, const std::string& id);

}  // namespace dilu
