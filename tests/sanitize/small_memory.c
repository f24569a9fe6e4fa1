/* Linked into the executables of sanitizer builds only (DILU_SANITIZE with address; see
 * docs/reliability.md). dilu sizes its CPU KV cache from the free memory (kv.memory_fraction of
 * sysconf(_SC_AVPHYS_PAGES)): 18 GiB on a 24 GiB machine, which a normal build never touches but
 * AddressSanitizer poisons and unpoisons in its shadow (an eighth of it, at malloc and at free):
 * 20 s of every `dilu run` in the suite went there (scripts/test-sanitize.sh also lets that
 * shadow use huge pages). Here the free memory reads as at most 8 GiB, like a small machine
 * (enough for the planner's per-rank workspace with two ranks), so that the cache stays smaller
 * and every byte of it is still checked. Nothing else of sysconf changes. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <unistd.h>

long sysconf(int name);
long sysconf(int name) {
  static long (*real)(int) = 0;
  if (!real) real = (long (*)(int))dlsym(RTLD_NEXT, "sysconf");
  long value = real(name);
  if (name == _SC_AVPHYS_PAGES && value > 0) {
    const long page = real(_SC_PAGESIZE);
    const long cap = page > 0 ? (8L << 30) / page : value;
    if (value > cap) value = cap;
  }
  return value;
}
