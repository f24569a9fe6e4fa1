// The safetensors writer, checked by parsing the file's bytes directly (not through dilu's
// reader), so that a bug shared by writer and reader cannot hide.
#include "engine/safetensors_writer.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>

#include <unistd.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "kernels/error.h"

namespace dilu {
namespace {

namespace fs = std::filesystem;

struct ParsedFile {
  uint64_t header_length = 0;
  nlohmann::json header;
  std::vector<std::byte> data;  // the data section
};

ParsedFile parse_file(const fs::path& path) {
  std::vector<char> bytes(fs::file_size(path));
  std::ifstream(path, std::ios::binary).read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ParsedFile p;
  EXPECT_GE(bytes.size(), 8u);
  for (int i = 0; i < 8; ++i) p.header_length |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  EXPECT_LE(8 + p.header_length, bytes.size());
  const std::string text(bytes.data() + 8, p.header_length);
  p.header = nlohmann::json::parse(text);
  for (size_t i = 8 + p.header_length; i < bytes.size(); ++i) p.data.push_back(static_cast<std::byte>(bytes[i]));
  return p;
}

// One scratch directory per process (ctest runs tests as parallel processes), removed at exit.
const fs::path& scratch_root() {
  static const fs::path root =
      fs::path(::testing::TempDir()) / ("dilu_safetensors_writer_test_" + std::to_string(getpid()));
  return root;
}
class RemoveScratch : public ::testing::Environment {
  void TearDown() override { fs::remove_all(scratch_root()); }
};
[[maybe_unused]] ::testing::Environment* const remove_scratch = ::testing::AddGlobalTestEnvironment(new RemoveScratch);

fs::path scratch(const std::string& name) {
  fs::create_directories(scratch_root());
  return scratch_root() / name;
}

TEST(SafetensorsWriter, RoundTripsHeaderAndData) {
  const fs::path path = scratch("round_trip.safetensors");
  std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -8.5f};  // [2, 3]
  std::vector<uint16_t> b(1000);                                   // [10, 100], written in odd chunks
  std::iota(b.begin(), b.end(), uint16_t{3});
  std::vector<uint8_t> c = {1, 2, 3, 4, 5};                        // [5]: odd length before the next one

  std::vector<std::pair<uint64_t, size_t>> calls;
  {
    SafetensorsWriter w(path);
    w.declare("a", DType::F32, {2, 3});
    w.declare("b.weight", DType::BF16, {10, 100});
    w.declare("c", DType::U8, {5});
    w.declare("empty", DType::F32, {0, 4});
    w.write_tensor(std::as_bytes(std::span<const float>(a)));
    w.write_tensor(
        [&](std::span<std::byte> chunk, uint64_t offset) {
          calls.emplace_back(offset, chunk.size());
          std::memcpy(chunk.data(), reinterpret_cast<const std::byte*>(b.data()) + offset, chunk.size());
        },
        /*chunk_bytes=*/334);
    w.write_tensor([&](std::span<std::byte> chunk, uint64_t offset) {
      std::memcpy(chunk.data(), c.data() + offset, chunk.size());
    });
    w.write_tensor(std::span<const std::byte>());
    w.finish();
    EXPECT_EQ(w.data_bytes(), 24u + 2000u + 5u);
    EXPECT_EQ(w.file_bytes(), fs::file_size(path));
  }
  // Chunks are consecutive, bounded, and cover the tensor.
  const std::vector<std::pair<uint64_t, size_t>> expected_calls = {{0, 334}, {334, 334}, {668, 334},
                                                                   {1002, 334}, {1336, 334}, {1670, 330}};
  EXPECT_EQ(calls, expected_calls);
  EXPECT_FALSE(fs::exists(path.string() + ".partial"));

  const ParsedFile p = parse_file(path);
  EXPECT_EQ(p.header_length % 8, 0u) << "the data section must start 8-byte aligned";
  EXPECT_EQ(p.header["__metadata__"], nlohmann::json({{"format", "pt"}}));
  ASSERT_EQ(p.header.size(), 5u);

  // Offsets are contiguous from 0 to the end of the file, in declaration order.
  uint64_t expected_begin = 0;
  for (const char* name : {"a", "b.weight", "c", "empty"}) {
    const auto& offsets = p.header.at(name).at("data_offsets");
    EXPECT_EQ(offsets[0].get<uint64_t>(), expected_begin) << name;
    expected_begin = offsets[1].get<uint64_t>();
  }
  EXPECT_EQ(expected_begin, p.data.size());

  EXPECT_EQ(p.header["a"]["dtype"], "F32");
  EXPECT_EQ(p.header["a"]["shape"], nlohmann::json({2, 3}));
  EXPECT_EQ(p.header["b.weight"]["dtype"], "BF16");
  EXPECT_EQ(p.header["b.weight"]["shape"], nlohmann::json({10, 100}));
  EXPECT_EQ(p.header["c"]["dtype"], "U8");
  EXPECT_EQ(p.header["empty"]["shape"], nlohmann::json({0, 4}));
  EXPECT_EQ(p.header["empty"]["data_offsets"], nlohmann::json({2029, 2029}));

  auto bytes_of = [&](const char* name) {
    const auto& o = p.header.at(name).at("data_offsets");
    return std::vector<std::byte>(p.data.begin() + o[0].get<int64_t>(), p.data.begin() + o[1].get<int64_t>());
  };
  const auto a_bytes = std::as_bytes(std::span<const float>(a));
  const auto b_bytes = std::as_bytes(std::span<const uint16_t>(b));
  const auto c_bytes = std::as_bytes(std::span<const uint8_t>(c));
  EXPECT_EQ(bytes_of("a"), std::vector<std::byte>(a_bytes.begin(), a_bytes.end()));
  EXPECT_EQ(bytes_of("b.weight"), std::vector<std::byte>(b_bytes.begin(), b_bytes.end()));
  EXPECT_EQ(bytes_of("c"), std::vector<std::byte>(c_bytes.begin(), c_bytes.end()));
}

TEST(SafetensorsWriter, HeaderIsSpacePaddedAndMetadataOptional) {
  const fs::path path = scratch("no_metadata.safetensors");
  {
    SafetensorsWriter w(path, /*metadata=*/{});
    w.declare("x", DType::BF16, {3});
    const uint16_t x[3] = {1, 2, 3};
    w.write_tensor(std::as_bytes(std::span<const uint16_t>(x)));
    w.finish();
  }
  const ParsedFile p = parse_file(path);
  EXPECT_FALSE(p.header.contains("__metadata__"));
  EXPECT_EQ(p.header_length % 8, 0u);
  std::ifstream in(path, std::ios::binary);
  std::string raw(8 + p.header_length, '\0');
  in.read(raw.data(), static_cast<std::streamsize>(raw.size()));
  EXPECT_EQ(raw[8], '{');
  const size_t close = raw.rfind('}');
  for (size_t i = close + 1; i < raw.size(); ++i) EXPECT_EQ(raw[i], ' ') << "padding byte " << i;
}

TEST(SafetensorsWriter, FileWithoutTensorsHasAHeader) {
  const fs::path path = scratch("empty.safetensors");
  {
    SafetensorsWriter w(path);
    w.finish();
  }
  const ParsedFile p = parse_file(path);
  EXPECT_EQ(p.header, nlohmann::json({{"__metadata__", {{"format", "pt"}}}}));
  EXPECT_TRUE(p.data.empty());
}

TEST(SafetensorsWriter, UnfinishedFileIsRemoved) {
  const fs::path path = scratch("unfinished.safetensors");
  {
    SafetensorsWriter w(path);
    w.declare("x", DType::F32, {1});
    EXPECT_TRUE(fs::exists(path.string() + ".partial"));
  }
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path.string() + ".partial"));
}

TEST(SafetensorsWriter, UnwritablePathIsAUserErrorNamingTheFile) {
  const fs::path path = scratch("no_such_dir") / "x.safetensors";
  try {
    SafetensorsWriter w(path);
    FAIL() << "expected UserError";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
  }
}

TEST(SafetensorsWriter, FullDiskIsAUserErrorNamingTheFile) {
  // /dev/full fails every write with ENOSPC; the writer's ".partial" name is what it opens, so
  // point that name at /dev/full through a symbolic link.
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  const fs::path path = scratch("full.safetensors");
  fs::remove(path.string() + ".partial");
  fs::create_symlink("/dev/full", path.string() + ".partial");
  try {
    SafetensorsWriter w(path);
    w.declare("x", DType::U8, {1 << 20});
    w.write_tensor([](std::span<std::byte> chunk, uint64_t) { std::memset(chunk.data(), 1, chunk.size()); });
    w.finish();
    FAIL() << "expected UserError";
  } catch (const UserError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(path.string()), std::string::npos) << message;
    EXPECT_NE(message.find("No space left"), std::string::npos) << message;
  }
  fs::remove(path.string() + ".partial");
}

}  // namespace
}  // namespace dilu
