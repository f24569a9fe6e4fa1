#include "kernels/error.h"
#include <cstdio>
#include <cstdlib>
namespace dilu { void check_failed(const char* e, const char* f, int l, const std::string& m) { std::fprintf(stderr, "%s:%d %s %s\n", f, l, e, m.c_str()); std::abort(); } }
