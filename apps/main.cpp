// The dilu executable: parses the command line with CLI11 and hands each subcommand to the
// engine. Exit codes: 0 success, 1 some input lines failed, 2 user error, 3 internal error,
// 4 the output could not be written (docs/reliability.md).
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>

#include <CLI/CLI.hpp>

#include "apps/commands.h"
#include "engine/jsonl_writer.h"
#include "engine/version.h"
#include "kernels/error.h"

int main(int argc, char** argv) {
  // The CPU backend runs many short OpenMP regions per token; spinning idle threads steal the
  // core from the thread with work whenever the machine is shared, so idle threads sleep unless
  // the user chose otherwise. libgomp reads this only at start-up, hence the re-exec.
  if (std::getenv("OMP_WAIT_POLICY") == nullptr) {
    setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    execv("/proc/self/exe", argv);  // returns only on failure: then run as we are
  }
  // Past a file size limit (ulimit -f) a write fails with EFBIG and is reported like a full disk,
  // instead of SIGXFSZ killing the process with nothing said.
  std::signal(SIGXFSZ, SIG_IGN);
  CLI::App root{"dilu: offline batch inference for DeepSeek-V3/R1-architecture models.\n"
                "Launch with mpirun or srun to shard one model over many ranks."};
  root.set_version_flag("--version", std::string(dilu::version_string()));
  root.require_subcommand(1);
  root.footer("Exit codes: 0 success; 1 some input lines failed (see the error records in the output);\n"
              "2 bad usage, configuration or checkpoint; 3 internal error (a bug: please report it);\n"
              "4 the output could not be written (disk full): make room and rerun to resume.\n"
              "Run 'dilu <subcommand> --help' for each subcommand's options.");

  dilu::app::Action action;
  dilu::app::add_run_command(root, action);
  dilu::app::add_make_model_command(root, action);
  dilu::app::add_bench_command(root, action);
  dilu::app::add_tokenize_command(root, action);
  dilu::app::add_plan_command(root, action);
  dilu::app::add_report_command(root, action);

  try {
    root.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = root.exit(e);
    return code == 0 ? 0 : 2;
  }
  try {
    return action ? action() : 2;
  } catch (const dilu::OutputError& e) {
    std::fflush(stdout);
    std::cerr << "dilu: error: " << e.what() << "\n";
    return 4;
  } catch (const dilu::UserError& e) {
    std::fflush(stdout);
    std::cerr << "dilu: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::cerr << e.what() << "\n";
    return 3;
  }
}
