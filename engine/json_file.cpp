// See json_file.h.
#include "engine/json_file.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "kernels/error.h"

namespace dilu {

nlohmann::json read_json_file(const std::filesystem::path& path) {
  std::error_code ec;
  DILU_USER_CHECK(std::filesystem::is_regular_file(path, ec), "cannot read '", path.string(),
                  "': it does not exist or is not a regular file");
  std::ifstream in(path, std::ios::binary);
  DILU_USER_CHECK(in.good(), "cannot open '", path.string(), "': ", std::strerror(errno));
  std::ostringstream text;
  text << in.rdbuf();
  DILU_USER_CHECK(!in.bad(), "error reading '", path.string(), "'");
  try {
    return nlohmann::json::parse(text.str());
  } catch (const nlohmann::json::exception& e) {  // parse_error, or out_of_range for 1e400
    throw UserError(path.string() + ": not valid JSON (" + e.what() + ")");
  }
}

}  // namespace dilu
