#!/usr/bin/env bash
# CI's fuzz stage (docs/reliability.md): runs each libFuzzer target of fuzz/ for FUZZ_SECONDS
# (default 25) from its seed corpus (fuzz/corpus/<target>) and dictionary (fuzz/dict/<target>.dict),
# under ASan + UBSan. Fails on any crash, uncaught exception, assertion, leak, timeout (an input
# taking over 10 s), out-of-memory (over 2 GiB) or sanitizer report; the input that did it is kept
# in $FUZZ_WORK/<target>/ with the command that replays it.
# Builds build-sanitize/ if needed (the build of scripts/test-sanitize.sh, which CI runs first).
# Usage: scripts/fuzz.sh [TARGET ...]   (default: every target; names without "_fuzz")
# Environment: FUZZ_SECONDS per target; FUZZ_WORK (default build-sanitize/fuzz-work) keeps the
# corpus each run grows; SANITIZE_BUILD_DIR the build directory.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
build="${SANITIZE_BUILD_DIR:-$root/build-sanitize}"
seconds="${FUZZ_SECONDS:-25}"
work="${FUZZ_WORK:-$build/fuzz-work}"
if [ ! -d "$build/fuzz" ]; then
  scripts/setup.sh
  scripts/setup-js.sh  # the tokenizer target reads DeepSeek-V3's tokenizer from tests/tokenizer
  BUILD_DIR="$build" scripts/build.sh -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DDILU_CUDA=OFF \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDILU_SANITIZE=address,undefined -DDILU_FUZZ=ON -DDILU_BUILD_TESTS=ON
else
  cmake --build "$build" -j "$(nproc)"  # up to date with the sources
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for d in fuzz/corpus/*/; do targets+=("$(basename "$d")"); done
fi
export ASAN_OPTIONS="detect_leaks=1:intercept_tls_get_addr=0:strict_string_checks=1:detect_stack_use_after_return=1"  # see test-sanitize.sh
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
failed=()
summary=""
for t in "${targets[@]}"; do
  exe="$build/fuzz/${t}_fuzz"
  [ -x "$exe" ] || { echo "fuzz: no target $exe" >&2; exit 2; }
  mkdir -p "$work/$t/corpus"
  log="$work/$t/fuzz.log"
  args=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 -print_final_stats=1
        -dict="$root/fuzz/dict/$t.dict" -artifact_prefix="$work/$t/")
  echo "fuzz: $t for $seconds s"
  rc=0
  "$exe" "${args[@]}" "$work/$t/corpus" "$root/fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -o "cov: [0-9]*" "$log" | tail -1 || true)
  summary+=$(printf '%-18s %10s execs  %-10s  exit %s' "$t" "${execs:-?}" "$cov" "$rc")$'\n'
  if [ "$rc" != 0 ]; then
    failed+=("$t")
    echo "fuzz: $t FAILED (exit $rc); the last lines of $log:" >&2
    tail -60 "$log" >&2
    for a in "$work/$t"/crash-* "$work/$t"/leak-* "$work/$t"/timeout-* "$work/$t"/oom-*; do
      [ -e "$a" ] && echo "fuzz: replay with: $exe $a" >&2
    done
  fi
done
printf '\nfuzz: %s' "$summary"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: every target ran ${seconds} s without a finding"
