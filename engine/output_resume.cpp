// See output_resume.h.
#include "engine/output_resume.h"

#include <unistd.h>

#include <fstream>

#include <nlohmann/json.hpp>

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
    const nlohmann::json* id = j.contains("custom_id") ? &j["custom_id"] : j.contains("id") ? &j["id"] : nullptr;
    if (id && !id->is_null()) {
      ++st.done_ids[id->dump()];
    } else if (j.contains("error") && j["error"].is_object() && j["error"].contains("line") &&
               j["error"]["line"].is_number_integer()) {
      st.done_lines.insert(j["error"]["line"].get<int64_t>());
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

}  // namespace dilu
