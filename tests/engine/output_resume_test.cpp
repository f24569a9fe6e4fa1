// Resume and part-file merging: what a crashed or starved run leaves behind is cut back to
// complete records and merged exactly once (docs/reliability.md).
#include "engine/output_resume.h"

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>

#include <gtest/gtest.h>

#include "engine/jsonl_writer.h"
#include "tests/test_util.h"

namespace dilu {
namespace {

namespace fs = std::filesystem;

std::string record(const std::string& id) { return "{\"id\": \"" + id + "\", \"token_ids\": [1, 2]}\n"; }

TEST(ResumeState, CutsATornLastLineAndCountsRecords) {
  const fs::path out = test::scratch_dir() / "out.jsonl";
  test::write_bytes(out, record("a") + record("b") + "{\"id\": null, \"error\": {\"line\": 7}}\n" + "{\"id\": \"c\", \"te");
  const ResumeState st = load_resume_state(out);
  EXPECT_TRUE(st.cut_torn_line);
  EXPECT_EQ(st.records, 3);
  EXPECT_EQ(st.done_ids.size(), 2u);
  EXPECT_EQ(st.done_lines.count(7), 1u);
  EXPECT_EQ(test::read_bytes(out), record("a") + record("b") + "{\"id\": null, \"error\": {\"line\": 7}}\n");
}

// A duplicate-id error (line 9) written before the run died, the earlier line with that id not yet
// answered: the error answers line 9 only, so the earlier line runs again.
TEST(ResumeState, AnErrorRecordAnswersItsLineNotItsId) {
  const fs::path out = test::scratch_dir() / "out.jsonl";
  test::write_bytes(out, record("b") + "{\"id\": \"a\", \"error\": {\"message\": \"duplicate id\", \"line\": 9}}\n");
  ResumeState st = load_resume_state(out);
  EXPECT_EQ(st.records, 2);
  EXPECT_EQ(st.done_lines.count(9), 1u);
  EXPECT_FALSE(take_done(st, "\"a\""));
  EXPECT_TRUE(take_done(st, "\"b\""));
}

TEST(ResumeState, RefusesADamagedLineBeforeTheLastAndLeavesTheFile) {
  const fs::path out = test::scratch_dir() / "out.jsonl";
  const std::string text = record("a") + "garbage\n" + record("b");
  test::write_bytes(out, text);
  test::expect_user_error([&] { load_resume_state(out); }, {out.string(), "line 2"});
  EXPECT_EQ(test::read_bytes(out), text);
}

TEST(MergePartFiles, AppendsEveryPartOnceAndRemovesIt) {
  const fs::path dir = test::scratch_dir();
  const fs::path out = dir / "out.jsonl";
  test::write_bytes(out, record("x"));
  test::write_bytes(part_file(out, 0, 2), record("a") + record("b"));
  test::write_bytes(part_file(out, 1, 2), record("c") + "{\"id\": \"torn");
  EXPECT_EQ(merge_part_files(out), 3);
  EXPECT_EQ(test::read_bytes(out), record("x") + record("a") + record("b") + record("c"));
  EXPECT_FALSE(fs::exists(part_file(out, 0, 2)));
  EXPECT_FALSE(fs::exists(part_file(out, 1, 2)));
  EXPECT_FALSE(fs::exists(out.string() + ".merging"));
  EXPECT_EQ(merge_part_files(out), 0);
}

TEST(MergePartFiles, CutsATornLastLineOfTheOutputBeforeAppending) {
  const fs::path out = test::scratch_dir() / "out.jsonl";
  test::write_bytes(out, record("x") + "{\"id\": \"half");
  test::write_bytes(part_file(out, 0, 2), record("a"));
  EXPECT_EQ(merge_part_files(out), 1);
  EXPECT_EQ(test::read_bytes(out), record("x") + record("a"));
}

// A crash in the middle of a merge (SIGKILL, power loss) left part of a part file appended and
// the part itself in place: the next merge cuts the output back and appends the part once.
TEST(MergePartFiles, AMergeInterruptedByACrashIsRedoneNotDoubled) {
  const fs::path out = test::scratch_dir() / "out.jsonl";
  const std::string before = record("x");
  const fs::path part = part_file(out, 1, 2);
  test::write_bytes(part, record("a") + record("b"));
  test::write_bytes(out, before + record("a") + "{\"id\": \"b\", \"tok");  // the crash's state
  test::write_bytes(out.string() + ".merging", std::to_string(before.size()) + " " + part.filename().string() + "\n");
  EXPECT_EQ(merge_part_files(out), 2);
  EXPECT_EQ(test::read_bytes(out), before + record("a") + record("b"));
  EXPECT_FALSE(fs::exists(out.string() + ".merging"));
}

// A crash after the part was removed (the merge committed) but before the journal was: the
// output is complete and stays as it is.
TEST(MergePartFiles, AJournalOfACommittedMergeIsDropped) {
  const fs::path out = test::scratch_dir() / "out.jsonl";
  test::write_bytes(out, record("x") + record("a"));
  test::write_bytes(out.string() + ".merging", std::to_string(record("x").size()) + " out.jsonl.dp-1-of-2.part\n");
  EXPECT_EQ(merge_part_files(out), 0);
  EXPECT_EQ(test::read_bytes(out), record("x") + record("a"));
  EXPECT_FALSE(fs::exists(out.string() + ".merging"));
}

// A full disk (here: a file size limit) while appending a part: the output is cut back to what
// it held, the part is kept for the next run, and the error is an OutputError naming the files.
TEST(MergePartFiles, AFullDiskLeavesTheOutputAsItWasAndKeepsThePart) {
  const fs::path out = test::scratch_dir() / "out.jsonl";
  const std::string before = record("x");
  std::string big;
  for (int i = 0; i < 200; ++i) big += record("p" + std::to_string(i));
  test::write_bytes(out, before);
  test::write_bytes(part_file(out, 0, 2), big);
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::signal(SIGXFSZ, SIG_IGN);
    const rlim_t limit = before.size() + big.size() / 2;
    struct rlimit lim{limit, limit};
    if (::setrlimit(RLIMIT_FSIZE, &lim) != 0) ::_exit(10);
    try {
      merge_part_files(out);
      ::_exit(11);
    } catch (const OutputError& e) {
      const std::string what = e.what();
      ::_exit(what.find(out.string()) != std::string::npos && what.find(".part") != std::string::npos ? 0 : 12);
    } catch (...) {
      ::_exit(13);
    }
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_EQ(WEXITSTATUS(status), 0) << "10: setrlimit failed, 11: no error, 12: message, 13: not an OutputError";
  EXPECT_EQ(test::read_bytes(out), before);
  EXPECT_EQ(test::read_bytes(part_file(out, 0, 2)), big);
  EXPECT_FALSE(fs::exists(out.string() + ".merging"));
  // With room again, the next merge appends it, once.
  EXPECT_EQ(merge_part_files(out), 200);
  EXPECT_EQ(test::read_bytes(out), before + big);
}

}  // namespace
}  // namespace dilu
