// Fuzz target: the run configuration as `dilu run` reads it: a YAML file (--config) and --set
// overrides, parallel.* = auto taken out for the planner first (split_parallel_overrides).
//
// Input: the YAML text, then (after the first NUL byte, if any) one override per line.
// What must hold: loading either fails with a UserError or gives a valid config whose printed
// YAML (what `dilu run` prints at start-up) loads back to the very same config.
#include <cstdint>
#include <string>
#include <vector>

#include "engine/planner.h"
#include "engine/run_config.h"
#include "fuzz/fuzz_util.h"

using namespace dilu;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string yaml = input.substr(0, nul);
  std::vector<std::string> overrides;
  if (nul != std::string::npos) {
    std::string rest = input.substr(nul + 1);
    for (size_t start = 0; start <= rest.size();) {
      const size_t end = std::min(rest.find('\n', start), rest.size());
      overrides.push_back(rest.substr(start, end - start));
      start = end + 1;
    }
  }
  const fuzz::fs::path file = fuzz::scratch() / "run.yaml";
  fuzz::write_file(file, yaml);

  PlanOptions plan;
  if (!fuzz::user_errors_only([&] { split_parallel_overrides(overrides, plan); })) return 0;
  RunConfig cfg;
  if (!fuzz::user_errors_only([&] { cfg = load_run_config(file, overrides); })) return 0;

  const std::string printed = run_config_to_yaml(cfg);
  const fuzz::fs::path again = fuzz::scratch() / "printed.yaml";
  fuzz::write_file(again, printed);
  RunConfig back;
  const bool ok = fuzz::user_errors_only([&] { back = load_run_config(again, {}); });
  DILU_FUZZ_ASSERT(ok, "the printed config does not load:\n" + printed);
  DILU_FUZZ_ASSERT(back == cfg, "the printed config loads to another config:\n" + printed);
  return 0;
}
