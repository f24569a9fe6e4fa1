// The safetensors reader on files written byte by byte here: good files read back exactly, and
// every kind of damage is a UserError that names the file (never an out-of-bounds read).
#include "engine/safetensors.h"

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/test_util.h"

namespace dilu {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using test::expect_user_error;
using test::safetensors_bytes;
using test::scratch_dir;
using test::write_bytes;

// A tensor header entry.
json entry(const std::string& dtype, const std::vector<int64_t>& shape, uint64_t begin, uint64_t end) {
  return json{{"dtype", dtype}, {"shape", shape}, {"data_offsets", {begin, end}}};
}

fs::path write_file(const fs::path& dir, const std::string& name, const std::string& header, const std::string& data) {
  const fs::path p = dir / name;
  write_bytes(p, safetensors_bytes(header, data));
  return p;
}

TEST(SafetensorsFile, ReadsBackExactValues) {
  const fs::path dir = scratch_dir();
  const std::vector<float> a = {1.5f, -2.25f, 3e-30f, 7.0f, -0.0f, 1e30f};  // [2, 3]
  const std::vector<uint16_t> b = {0x3f80, 0xc000, 0x7f80, 0x0001};         // BF16 [4]
  const std::vector<uint8_t> c = {0x00, 0x7e, 0xfe, 0x08, 0x01};            // F8_E4M3 [5]
  const std::vector<int64_t> d = {-5, 1ll << 40};                            // I64 [2]
  const std::string data = test::as_byte_string(a) + test::as_byte_string(b) + test::as_byte_string(d) +
                           test::as_byte_string(c);
  json h;
  h["__metadata__"] = {{"format", "pt"}};
  h["a"] = entry("F32", {2, 3}, 0, 24);
  h["b"] = entry("BF16", {4}, 24, 32);
  h["d"] = entry("I64", {2}, 32, 48);
  h["c"] = entry("F8_E4M3", {5}, 48, 53);
  h["empty"] = entry("F32", {0, 7}, 53, 53);
  h["scalar"] = entry("U8", {}, 53, 54);
  const fs::path p = write_file(dir, "good.safetensors", h.dump(), data + std::string(1, '\x2a'));
  auto f = SafetensorsFile::open(p);
  EXPECT_EQ(f->tensors().size(), 6u);  // __metadata__ is not a tensor
  EXPECT_EQ(f->tensors().count("__metadata__"), 0u);

  Tensor ta = f->tensor("a");
  EXPECT_EQ(ta.dtype(), DType::F32);
  EXPECT_EQ(ta.shape(), (Shape{2, 3}));
  EXPECT_EQ(std::memcmp(ta.raw(), a.data(), 24), 0);
  Tensor tb = f->tensor("b");
  EXPECT_EQ(tb.dtype(), DType::BF16);
  EXPECT_EQ(std::vector<uint16_t>(tb.data<uint16_t>(), tb.data<uint16_t>() + 4), b);
  Tensor td = f->tensor("d");
  EXPECT_EQ(std::vector<int64_t>(td.data<int64_t>(), td.data<int64_t>() + 2), d);
  Tensor tc = f->tensor("c");
  EXPECT_EQ(tc.dtype(), DType::F8E4M3);
  EXPECT_EQ(std::vector<uint8_t>(tc.data<uint8_t>(), tc.data<uint8_t>() + 5), c);
  EXPECT_EQ(f->tensor("empty").numel(), 0);
  Tensor ts = f->tensor("scalar");
  EXPECT_EQ(ts.rank(), 0);
  EXPECT_EQ(ts.data<uint8_t>()[0], 0x2a);

  // A tensor keeps its file mapped after the file object is gone.
  f.reset();
  EXPECT_EQ(std::memcmp(ta.raw(), a.data(), 24), 0);
}

TEST(SafetensorsFile, MisalignedDataStillReadsCorrectValues) {
  // Header padding and a one-byte tensor in front put the F32 and I32 data 2 bytes off their
  // alignment in the mapping: the reader must copy rather than hand out a misaligned view.
  const fs::path dir = scratch_dir();
  const std::vector<float> a = {3.25f, -1.0f, 6.5f};
  const std::vector<int32_t> i = {-7, 123456789};
  json h;
  h["pad"] = entry("U8", {1}, 0, 1);
  h["a"] = entry("F32", {3}, 1, 13);
  h["i"] = entry("I32", {2}, 13, 21);
  std::string header = h.dump();
  while ((8 + header.size() + 1) % 4 != 2) header += ' ';  // both F32 and I32 data 2 bytes off alignment
  const fs::path p = write_file(dir, "odd.safetensors", header, std::string(1, '\x01') + test::as_byte_string(a) + test::as_byte_string(i));
  auto f = SafetensorsFile::open(p);
  Tensor ta = f->tensor("a");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(ta.raw()) % alignof(float), 0u);
  EXPECT_EQ(std::vector<float>(ta.data<float>(), ta.data<float>() + 3), a);
  Tensor ti = f->tensor("i");
  EXPECT_EQ(std::vector<int32_t>(ti.data<int32_t>(), ti.data<int32_t>() + 2), i);
}

// Each damaged file is rejected with a message naming the file and the problem.
struct BadFile {
  const char* name;
  std::string bytes;
  std::string words;  // a phrase the message must contain besides the file name
};

std::string header_with(const json& tensors, size_t data_bytes) {
  return safetensors_bytes(tensors.dump(), std::string(data_bytes, '\0'));
}

TEST(SafetensorsFile, RejectsDamagedFilesNamingThem) {
  const fs::path dir = scratch_dir();
  std::string len_past_eof(8, '\0');
  len_past_eof[0] = 100;  // 100-byte header in a 10-byte file
  len_past_eof += "{}";
  std::string huge_len(8, '\xff');  // 2^64 - 1: must not overflow the bounds check
  huge_len += "{}";
  const std::vector<BadFile> cases = {
      {"empty.safetensors", "", "too short"},
      {"seven.safetensors", std::string(7, '\0'), "too short"},
      {"len_past_eof.safetensors", len_past_eof, "header length"},
      {"huge_len.safetensors", huge_len, "header length"},
      {"not_json.safetensors", safetensors_bytes("{\"a\": [1, 2", ""), "not valid JSON"},
      {"not_object.safetensors", safetensors_bytes("[1, 2]", ""), "not a JSON object"},
      {"unknown_dtype.safetensors", header_with({{"w", entry("F8_E5M2", {2}, 0, 2)}}, 2), "F8_E5M2"},
      {"missing_field.safetensors", header_with({{"w", {{"dtype", "F32"}, {"shape", {1}}}}}, 4), "data_offsets"},
      {"offsets_past_end.safetensors", header_with({{"w", entry("F32", {4}, 0, 16)}}, 12), "outside"},
      {"offsets_reversed.safetensors", header_with({{"w", entry("U8", {0}, 8, 4)}}, 12), "outside"},
      {"offsets_vs_shape.safetensors", header_with({{"w", entry("F32", {2, 3}, 0, 20)}}, 24), "needs 24"},
      {"offsets_vs_dtype.safetensors", header_with({{"w", entry("BF16", {4}, 0, 16)}}, 16), "needs 8"},
      {"overlap.safetensors", header_with({{"a", entry("F32", {2}, 0, 8)}, {"b", entry("F32", {2}, 4, 12)}}, 12),
       "overlap"},
      {"negative_shape.safetensors", header_with({{"w", entry("F32", {-2}, 0, 0)}}, 8), "non-negative integer"},
      {"fraction_shape.safetensors",
       header_with({{"w", {{"dtype", "F32"}, {"shape", {1.5}}, {"data_offsets", {0, 4}}}}}, 4), "non-negative integer"},
      {"string_shape.safetensors",
       header_with({{"w", {{"dtype", "F32"}, {"shape", {"2"}}, {"data_offsets", {0, 8}}}}}, 8), "non-negative integer"},
      {"negative_offset.safetensors",
       header_with({{"w", {{"dtype", "U8"}, {"shape", {1}}, {"data_offsets", {-1, 0}}}}}, 8), "data_offsets"},
      {"overflow_shape.safetensors",
       header_with({{"w", {{"dtype", "F32"}, {"shape", {1ull << 62, 1ull << 62}}, {"data_offsets", {0, 8}}}}}, 8),
       "overflows"},
  };
  for (const BadFile& c : cases) {
    SCOPED_TRACE(c.name);
    const fs::path p = dir / c.name;
    write_bytes(p, c.bytes);
    expect_user_error([&] { SafetensorsFile::open(p); }, {p.string(), c.words});
  }
  expect_user_error([&] { SafetensorsFile::open(dir / "absent.safetensors"); }, {(dir / "absent.safetensors").string()});
}

TEST(SafetensorsHeader, ZeroSizedTensorsMayShareOffsets) {
  auto t = parse_safetensors_header(json{{"a", entry("F32", {0}, 4, 4)}, {"b", entry("F32", {1}, 0, 4)},
                                         {"c", entry("F32", {0, 3}, 0, 0)}}
                                        .dump(),
                                    4, "origin.safetensors");
  EXPECT_EQ(t.size(), 3u);
  EXPECT_EQ(t.at("b").begin, 0u);
  EXPECT_EQ(t.at("b").end, 4u);
}

// ---- Checkpoint -------------------------------------------------------------------------------

// A two-shard checkpoint: shard 1 holds x and y, shard 2 holds z.
struct TwoShards {
  fs::path dir;
  std::vector<float> x = {1, 2, 3}, y = {4}, z = {-1, -2};
  explicit TwoShards(fs::path d, bool with_index = true) : dir(std::move(d)) {
    json h1 = {{"x", entry("F32", {3}, 0, 12)}, {"y", entry("F32", {1}, 12, 16)}};
    json h2 = {{"z", entry("F32", {2}, 0, 8)}};
    write_file(dir, "model-00001-of-00002.safetensors", h1.dump(), test::as_byte_string(x) + test::as_byte_string(y));
    write_file(dir, "model-00002-of-00002.safetensors", h2.dump(), test::as_byte_string(z));
    if (with_index)
      write_index({{"x", "model-00001-of-00002.safetensors"},
                   {"y", "model-00001-of-00002.safetensors"},
                   {"z", "model-00002-of-00002.safetensors"}});
  }
  void write_index(const json& weight_map) const {
    write_bytes(dir / "model.safetensors.index.json",
                json{{"metadata", {{"total_size", 28}}}, {"weight_map", weight_map}}.dump());
  }
  fs::path index() const { return dir / "model.safetensors.index.json"; }
};

std::vector<float> values(const Tensor& t) { return std::vector<float>(t.data<float>(), t.data<float>() + t.numel()); }

TEST(Checkpoint, OpensShardsThroughTheIndex) {
  TwoShards s(scratch_dir());
  Checkpoint c = Checkpoint::open(s.dir);
  EXPECT_EQ(c.names(), (std::vector<std::string>{"x", "y", "z"}));
  EXPECT_EQ(values(c.tensor("x")), s.x);
  EXPECT_EQ(values(c.tensor("y")), s.y);
  EXPECT_EQ(values(c.tensor("z")), s.z);
  EXPECT_TRUE(c.contains("z"));
  EXPECT_FALSE(c.contains("w"));
  EXPECT_EQ(c.info("z").shape, (Shape{2}));
}

TEST(Checkpoint, OpensEverySafetensorsFileWithoutAnIndex) {
  TwoShards s(scratch_dir(), /*with_index=*/false);
  Checkpoint c = Checkpoint::open(s.dir);
  EXPECT_EQ(c.names(), (std::vector<std::string>{"x", "y", "z"}));
  EXPECT_EQ(values(c.tensor("z")), s.z);
}

TEST(Checkpoint, IndexNamingAMissingShardNamesTheFile) {
  TwoShards s(scratch_dir());
  s.write_index({{"x", "model-00001-of-00002.safetensors"},
                 {"y", "model-00001-of-00002.safetensors"},
                 {"z", "model-00002-of-00002.safetensors"},
                 {"w", "model-00003-of-00002.safetensors"}});
  expect_user_error([&] { Checkpoint::open(s.dir); }, {"model-00003-of-00002.safetensors", s.index().string()});
}

TEST(Checkpoint, TensorInTheIndexButAbsentFromItsShard) {
  TwoShards s(scratch_dir());
  s.write_index({{"x", "model-00001-of-00002.safetensors"},
                 {"y", "model-00001-of-00002.safetensors"},
                 {"z", "model-00002-of-00002.safetensors"},
                 {"ghost", "model-00002-of-00002.safetensors"}});
  expect_user_error([&] { Checkpoint::open(s.dir); }, {"'ghost'", "model-00002-of-00002.safetensors"});
}

TEST(Checkpoint, TensorStoredInTwoShards) {
  TwoShards s(scratch_dir());
  // Shard 2 also holds x.
  json h2 = {{"z", entry("F32", {2}, 0, 8)}, {"x", entry("F32", {3}, 8, 20)}};
  write_file(s.dir, "model-00002-of-00002.safetensors", h2.dump(), test::as_byte_string(s.z) + test::as_byte_string(s.x));
  expect_user_error([&] { Checkpoint::open(s.dir); },
                    {"'x'", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"});
  // The same without an index.
  fs::remove(s.index());
  expect_user_error([&] { Checkpoint::open(s.dir); }, {"'x'", "twice"});
}

TEST(Checkpoint, ShardHoldingATensorTheIndexPlacesElsewhere) {
  TwoShards s(scratch_dir());
  s.write_index({{"x", "model-00001-of-00002.safetensors"},
                 {"y", "model-00002-of-00002.safetensors"},
                 {"z", "model-00002-of-00002.safetensors"}});
  expect_user_error([&] { Checkpoint::open(s.dir); }, {"'y'", "model-00001-of-00002.safetensors"});
}

TEST(Checkpoint, DamagedShardAndBadIndexNameTheirFiles) {
  TwoShards s(scratch_dir());
  const fs::path shard = s.dir / "model-00002-of-00002.safetensors";
  const std::string bytes = test::read_bytes(shard);
  write_bytes(shard, bytes.substr(0, bytes.size() - 3));  // truncated: offsets now past the end
  expect_user_error([&] { Checkpoint::open(s.dir); }, {shard.string()});
  write_bytes(s.index(), "{\"weight_map\": ");
  expect_user_error([&] { Checkpoint::open(s.dir); }, {s.index().string()});
  write_bytes(s.index(), "{\"weight_map\": {\"x\": \"../elsewhere.safetensors\"}}");
  expect_user_error([&] { Checkpoint::open(s.dir); }, {s.index().string(), "../elsewhere.safetensors"});
}

TEST(Checkpoint, DirectoryWithoutShards) {
  const fs::path dir = scratch_dir();
  expect_user_error([&] { Checkpoint::open(dir); }, {dir.string()});
}

}  // namespace
}  // namespace dilu
