// Each dilu subcommand registers its flags on the root CLI11 app and sets `action` to the code
// that runs when it is chosen. The action returns the process exit code.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

namespace dilu::app {

using Action = std::function<int()>;

void add_run_command(CLI::App& root, Action& action);
void add_make_model_command(CLI::App& root, Action& action);
void add_bench_command(CLI::App& root, Action& action);
void add_tokenize_command(CLI::App& root, Action& action);
void add_plan_command(CLI::App& root, Action& action);
void add_report_command(CLI::App& root, Action& action);

}  // namespace dilu::app
