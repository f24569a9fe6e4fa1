// `dilu run` as a library call: load the model, stream the input JSONL through generation,
// write one output line per input line. The app only turns flags into these options.
#pragma once

#include <filesystem>
#include <iosfwd>
#include <optional>

#include "engine/run_config.h"

namespace dilu {

struct RunJobOptions {
  std::filesystem::path model_dir;
  std::filesystem::path input;
  std::filesystem::path output;
};

struct RunSummary {
  int64_t requests_done = 0;
  int64_t requests_failed = 0;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  double load_seconds = 0;
  double generate_seconds = 0;
};

// Throws UserError before any compute when the model or the files are unusable.
RunSummary run_job(const RunJobOptions& options, const RunConfig& config, std::ostream& log);

}  // namespace dilu
