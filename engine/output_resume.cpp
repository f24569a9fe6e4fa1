// See output_resume.h.
#include "engine/output_resume.h"

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <vector>

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

std::filesystem::path part_file(const std::filesystem::path& output, int replica, int replicas) {
  return output.string() + ".dp-" + std::to_string(replica) + "-of-" + std::to_string(replicas) + ".part";
}

int64_t merge_part_files(const std::filesystem::path& output) {
  namespace fs = std::filesystem;
  const fs::path dir = output.has_parent_path() ? output.parent_path() : fs::path(".");
  const std::string prefix = output.filename().string() + ".dp-";
  std::vector<fs::path> parts;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(prefix, 0) == 0 && name.size() > 5 && name.substr(name.size() - 5) == ".part") parts.push_back(e.path());
  }
  std::sort(parts.begin(), parts.end());
  int64_t merged = 0;
  for (const fs::path& part : parts) {
    load_resume_state(part);  // cuts a torn last line; refuses a damaged one
    std::ifstream in(part, std::ios::binary);
    std::ofstream out(output, std::ios::binary | std::ios::app);
    DILU_USER_CHECK(in.good() && out.good(), "cannot merge '", part.string(), "' into '", output.string(), "'");
    std::string line;
    while (std::getline(in, line)) {
      out << line << '\n';
      ++merged;
    }
    out.flush();
    DILU_USER_CHECK(out.good(), "cannot append to '", output.string(), "' while merging '", part.string(),
                    "' (disk full?); the part file is kept for the next run");
    out.close();
    fs::remove(part);
  }
  return merged;
}

}  // namespace dilu
