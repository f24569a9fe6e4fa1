// `dilu report DIR... [--out OUT]`: the tables of engine/trace_report.h printed and saved, then
// the plots drawn by scripts/report.py (matplotlib, h5py) when a Python with both is found; the
// tables never depend on it.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <set>

#include "apps/commands.h"
#include "engine/trace_report.h"
#include "kernels/error.h"

namespace dilu::app {

namespace {

struct ReportFlags {
  std::vector<std::string> dirs;
  std::string out;
  bool no_plots = false;
};

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// The plotting script: $DILU_REPORT_SCRIPT, else next to the executable (an installed
// share/dilu/report.py), else the source tree this binary was built from.
std::filesystem::path plot_script() {
  if (const char* env = std::getenv("DILU_REPORT_SCRIPT")) return env;
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const auto installed = exe.parent_path().parent_path() / "share" / "dilu" / "report.py";
    if (std::filesystem::is_regular_file(installed, ec)) return installed;
  }
  return std::filesystem::path(DILU_SCRIPTS_DIR) / "report.py";
}

// A Python that imports matplotlib and h5py: $DILU_PYTHON, else python3 on PATH, else the
// system's /usr/bin/python3 (where Debian's python3-matplotlib and python3-h5py live when PATH
// holds another Python). Empty when none does.
std::string plotting_python() {
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("DILU_PYTHON")) candidates.push_back(env);
  else candidates = {"python3", "/usr/bin/python3"};
  for (const std::string& py : candidates) {
    const std::string probe = shell_quote(py) + " -c 'import matplotlib, h5py' >/dev/null 2>&1";
    if (std::system(probe.c_str()) == 0) return py;
  }
  return "";
}

int report(const ReportFlags& f) {
  std::vector<DirStats> dirs;
  for (const std::string& dir : f.dirs) dirs.push_back(summarize(read_trace_dir(dir)));
  // Labels name the plots' series: the directory names, made unique where two are the same.
  std::set<std::string> seen;
  for (DirStats& d : dirs)
    if (!seen.insert(d.label).second) d.label = d.dir;
  const std::filesystem::path out = f.out.empty() ? std::filesystem::path(f.dirs.front()) / "report" : std::filesystem::path(f.out);
  std::error_code ec;
  std::filesystem::create_directories(out, ec);
  DILU_USER_CHECK(!ec, "--out '", out.string(), "' cannot be created: ", ec.message());

  const std::string tables = format_report(dirs);
  std::cout << tables << std::flush;
  {
    std::ofstream txt(out / "summary.txt");
    txt << tables;
    std::ofstream json(out / "summary.json");
    json << report_json(dirs).dump(2) << "\n";
    DILU_USER_CHECK(txt.good() && json.good(), "cannot write the summary in '", out.string(), "'");
  }
  std::cout << "dilu report: tables in " << (out / "summary.txt").string() << " and " << (out / "summary.json").string()
            << "\n";
  if (f.no_plots) return 0;
  const std::string py = plotting_python();
  if (py.empty()) {
    std::cout << "dilu report: plots skipped: no Python with matplotlib and h5py (Debian/Ubuntu: apt-get install "
                 "python3-matplotlib python3-h5py; or set DILU_PYTHON)\n";
    return 0;
  }
  const std::filesystem::path script = plot_script();
  DILU_USER_CHECK(std::filesystem::is_regular_file(script, ec), "the plotting script '", script.string(),
                  "' is missing (set DILU_REPORT_SCRIPT to scripts/report.py of the dilu sources)");
  std::cout << std::flush;
  const std::string cmd =
      shell_quote(py) + " " + shell_quote(script.string()) + " " + shell_quote((out / "summary.json").string());
  const int rc = std::system(cmd.c_str());
  DILU_USER_CHECK(rc == 0, "drawing the plots failed (", cmd, " exited with ", WEXITSTATUS(rc),
                  "); the tables are in ", (out / "summary.txt").string());
  return 0;
}

}  // namespace

void add_report_command(CLI::App& root, Action& action) {
  auto flags = std::make_shared<ReportFlags>();
  CLI::App* cmd = root.add_subcommand(
      "report",
      "Turn trace directories (dilu run/bench --trace-dir) into tables and plots: throughput, time to first token "
      "and latency percentiles, per-rank busy fractions, pipeline bubbles, replica imbalance; several directories "
      "are compared (scaling efficiency).");
  cmd->add_option("dirs", flags->dirs, "Trace directories (each holds rank-NNNNN.h5 files)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--out", flags->out,
                  "Where summary.txt, summary.json and the plots (PNG and SVG) go (default: FIRST_DIR/report)");
  cmd->add_flag("--no-plots", flags->no_plots, "Tables only");
  cmd->callback([flags, &action] { action = [flags] { return report(*flags); }; });
}

}  // namespace dilu::app
