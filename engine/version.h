// dilu's version and the git revision it was built from, for logs, outputs and traces.
#pragma once

#include <string_view>

namespace dilu {
std::string_view version_string();  // e.g. "0.1.0 (git 1a2b3c4d5e6f)"
}  // namespace dilu
