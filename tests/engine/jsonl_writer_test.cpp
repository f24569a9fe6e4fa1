// JSONL output: never overwrites results, one complete JSON object per line, and a refused write
// (file-size limit, full disk) is a UserError that leaves only complete lines behind.
#include "engine/jsonl_writer.h"

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/test_util.h"

namespace dilu {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::vector<std::string> lines_of(const fs::path& p) {
  std::ifstream in(p);
  std::vector<std::string> out;
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

TEST(JsonlWriter, RefusesAnExistingNonEmptyFile) {
  const fs::path dir = test::scratch_dir();
  const fs::path p = dir / "out.jsonl";
  test::write_bytes(p, "{\"id\": 1}\n");
  test::expect_user_error([&] { JsonlWriter w(p, JsonlWriter::Mode::Create); }, {p.string(), "not empty"});
  EXPECT_EQ(test::read_bytes(p), "{\"id\": 1}\n") << "the file must be left untouched";
}

TEST(JsonlWriter, AcceptsAnEmptyFileAndRejectsAMissingDirectory) {
  const fs::path dir = test::scratch_dir();
  test::write_bytes(dir / "empty.jsonl", "");
  {
    JsonlWriter w(dir / "empty.jsonl", JsonlWriter::Mode::Create);
    w.write(json{{"id", 1}});
  }
  EXPECT_EQ(lines_of(dir / "empty.jsonl").size(), 1u);
  const fs::path missing = dir / "no_such_dir" / "out.jsonl";
  test::expect_user_error([&] { JsonlWriter w(missing, JsonlWriter::Mode::Create); }, {missing.string()});
}

TEST(JsonlWriter, AppendsOneValidJsonObjectPerLine) {
  const fs::path p = test::scratch_dir() / "out.jsonl";
  const std::vector<json> records = {
      json{{"id", "a"}, {"token_ids", {1, 2, 3}}, {"finish_reason", "length"}},
      json{{"id", 2}, {"error", {{"message", "line 2: has \"quotes\",\nnewlines\tand tabs"}, {"line", 2}}}},
      json{{"id", "\xff\xfe bad utf-8"}},  // replaced, never thrown
      json{{"id", nullptr}},
  };
  {
    JsonlWriter w(p, JsonlWriter::Mode::Create);
    for (const json& r : records) w.write(r);
    EXPECT_EQ(w.lines_written(), 4);
    w.sync();
  }
  const auto lines = lines_of(p);
  ASSERT_EQ(lines.size(), records.size());
  for (size_t i = 0; i < lines.size(); ++i) {
    json back;
    ASSERT_NO_THROW(back = json::parse(lines[i])) << lines[i];
    EXPECT_TRUE(back.is_object());
    if (i != 2) {
      EXPECT_EQ(back, records[i]);
    }
  }
  EXPECT_EQ(test::read_bytes(p).back(), '\n');
}

TEST(JsonlWriter, FileSizeLimitIsAUserErrorLeavingOnlyCompleteLines) {
  // A child process writes under RLIMIT_FSIZE (SIGXFSZ ignored, so write() fails with EFBIG
  // after a short write) until the writer throws; exit status 0 says the error was a UserError
  // naming the file.
  const fs::path p = test::scratch_dir() / "limited.jsonl";
  constexpr rlim_t kLimit = 1000;
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim{kLimit, kLimit};
    if (::setrlimit(RLIMIT_FSIZE, &lim) != 0) ::_exit(10);
    try {
      JsonlWriter w(p, JsonlWriter::Mode::Create);
      for (int i = 0; i < 1000; ++i)
        w.write(json{{"id", i}, {"token_ids", {i, i + 1, i + 2, i + 3}}, {"finish_reason", "length"}});
      ::_exit(11);  // never refused
    } catch (const UserError& e) {
      ::_exit(std::string(e.what()).find(p.string()) != std::string::npos ? 0 : 12);
    } catch (...) {
      ::_exit(13);
    }
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "child died of signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  ASSERT_EQ(WEXITSTATUS(status), 0) << "10: setrlimit failed, 11: no error, 12: message lacks the file, 13: not a "
                                       "UserError";
  const std::string bytes = test::read_bytes(p);
  EXPECT_LE(bytes.size(), kLimit);
  ASSERT_FALSE(bytes.empty());
  EXPECT_EQ(bytes.back(), '\n') << "a partial line was left behind";
  const auto lines = lines_of(p);
  for (size_t i = 0; i < lines.size(); ++i) {
    json back;
    ASSERT_NO_THROW(back = json::parse(lines[i])) << lines[i];
    EXPECT_EQ(back["id"], static_cast<int>(i));
  }
  EXPECT_GT(lines.size(), 5u);
}

}  // namespace
}  // namespace dilu
