// Two kinds of failure: a user's mistake (UserError: names the file, key or line and what to do)
// and a broken invariant (DILU_CHECK: aborts loudly with file:line). Both are used by every layer.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace dilu {

// A mistake in what the user gave us (flags, config, checkpoint, input). Reported without a
// stack of internals; the message must say what is wrong, where, and what to do.
class UserError : public std::runtime_error {
 public:
  explicit UserError(const std::string& message) : std::runtime_error(message) {}
};

[[noreturn]] void check_failed(const char* expr, const char* file, int line, const std::string& message);

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace dilu

// Invariant check: never compiled out. Extra arguments are streamed into the message.
#define DILU_CHECK(cond, ...)                                                                    \
  do {                                                                                           \
    if (!(cond)) ::dilu::check_failed(#cond, __FILE__, __LINE__, ::dilu::detail::concat(__VA_ARGS__)); \
  } while (0)

// Throws UserError with the streamed message.
#define DILU_USER_CHECK(cond, ...)                                                  \
  do {                                                                              \
    if (!(cond)) throw ::dilu::UserError(::dilu::detail::concat(__VA_ARGS__));      \
  } while (0)
