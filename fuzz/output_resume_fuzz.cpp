// Fuzz target: the output file a crashed (or edited) run left behind, as `dilu run` reads it to
// resume: load_resume_state cuts a torn last line and counts what is answered.
//
// What must hold for any bytes: either a UserError (a damaged line before the last: dilu refuses to
// guess), or the file is cut to a prefix of what it held that consists of complete lines, each a
// JSON object, as many as the records counted; nothing else is changed.
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "engine/output_resume.h"
#include "fuzz/fuzz_util.h"

using namespace dilu;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string before(reinterpret_cast<const char*>(data), size);
  const fuzz::fs::path out = fuzz::scratch() / "out.jsonl";
  fuzz::write_file(out, before);
  ResumeState st;
  const bool ok = fuzz::user_errors_only([&] { st = load_resume_state(out); });
  std::ifstream in(out, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  const std::string after = text.str();
  if (!ok) {
    DILU_FUZZ_ASSERT(after == before, "a refused file was changed");
    return 0;
  }
  DILU_FUZZ_ASSERT(before.compare(0, after.size(), after) == 0, "the kept text is not a prefix of the file");
  DILU_FUZZ_ASSERT(st.cut_torn_line == (after.size() != before.size()), "cut_torn_line does not match the cut");
  DILU_FUZZ_ASSERT(after.empty() || after.back() == '\n', "the kept text ends inside a line");
  int64_t lines = 0;
  for (size_t start = 0; start < after.size();) {
    const size_t end = after.find('\n', start);
    const auto j = nlohmann::json::parse(after.substr(start, end - start), nullptr, /*allow_exceptions=*/false);
    DILU_FUZZ_ASSERT(j.is_object(), "a kept line is not a JSON object");
    ++lines;
    start = end + 1;
  }
  DILU_FUZZ_ASSERT(lines == st.records, "records counted differ from the lines kept");
  int64_t by_id = 0;
  for (const auto& [id, n] : st.done_ids) by_id += n;
  DILU_FUZZ_ASSERT(by_id + static_cast<int64_t>(st.done_lines.size()) <= st.records, "more answers than records");
  return 0;
}
