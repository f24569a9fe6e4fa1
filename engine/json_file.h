// Reading a whole JSON file (config.json, an index) with errors that name the file.
#pragma once

#include <filesystem>

#include <nlohmann/json.hpp>

namespace dilu {
// Throws UserError naming `path` when it cannot be read or is not valid JSON.
nlohmann::json read_json_file(const std::filesystem::path& path);
}  // namespace dilu
