// Helpers shared by the test suites: a per-process scratch directory, hand-written safetensors
// files (independent of dilu's writer), and a check that a call throws UserError with given words.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/error.h"

namespace dilu::test {

namespace fs = std::filesystem;

// tests/golden/data/<name>/model in the source tree.
inline fs::path golden_model(const std::string& name) {
  return fs::path(DILU_SOURCE_DIR) / "tests" / "golden" / "data" / name / "model";
}

// One scratch root per process (ctest runs test cases as parallel processes), removed at exit.
inline const fs::path& scratch_root() {
  static const fs::path root = fs::path(::testing::TempDir()) / ("dilu_tests_" + std::to_string(::getpid()));
  return root;
}

namespace detail {
class RemoveScratchRoot : public ::testing::Environment {
 public:
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(scratch_root(), ec);
  }
};
inline ::testing::Environment* const remove_scratch_root =
    ::testing::AddGlobalTestEnvironment(new RemoveScratchRoot);
}  // namespace detail

// A fresh, empty directory named after the running test plus `suffix`.
inline fs::path scratch_dir(const std::string& suffix = "") {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = info ? std::string(info->test_suite_name()) + "." + info->name() : "global";
  for (char& ch : name)
    if (ch == '/') ch = '_';
  const fs::path dir = scratch_root() / (name + suffix);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

inline void write_bytes(const fs::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

inline std::string read_bytes(const fs::path& path) {
  std::string bytes(fs::file_size(path), '\0');
  std::ifstream(path, std::ios::binary).read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return bytes;
}

// The bytes of a safetensors file: 8-byte little-endian header length, the header text, the data.
inline std::string safetensors_bytes(std::string_view header_json, std::string_view data) {
  std::string out(8, '\0');
  uint64_t n = header_json.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  out.append(header_json);
  out.append(data);
  return out;
}

template <class T>
std::string as_byte_string(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// Runs `fn`, expecting a UserError whose message contains every one of `words`.
inline void expect_user_error(const std::function<void()>& fn, std::initializer_list<std::string> words) {
  try {
    fn();
    ADD_FAILURE() << "expected a UserError mentioning '" << (words.size() ? *words.begin() : "") << "'";
  } catch (const UserError& e) {
    const std::string message = e.what();
    for (const std::string& w : words) EXPECT_NE(message.find(w), std::string::npos) << "'" << w << "' not in: " << message;
  }
}

}  // namespace dilu::test
