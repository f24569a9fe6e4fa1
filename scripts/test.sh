#!/usr/bin/env bash
# Installs what is missing, builds everything with warnings as errors, and runs the whole test
# suite (unit tests, end-to-end CLI tests, golden parity against Hugging Face transformers).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
build="${BUILD_DIR:-$root/build}"
BUILD_DIR="$build" scripts/build.sh -DDILU_WERROR=ON -DDILU_BUILD_TESTS=ON
scripts/setup-js.sh
# GPU-labelled tests need an NVIDIA GPU; run them there with: ctest --test-dir build -L gpu
ctest --test-dir "$build" --output-on-failure -j "$(nproc)" --timeout 600 -LE gpu
# Reliability stages (docs/reliability.md): the same CPU suite again, built with clang under
# AddressSanitizer + UndefinedBehaviorSanitizer (build-sanitize/), then every libFuzzer target for
# FUZZ_SECONDS (25 s) each. CI runs both; DILU_TEST_SKIP_SANITIZE=1 leaves them out of a quick
# local run.
if [ "${DILU_TEST_SKIP_SANITIZE:-0}" != 1 ]; then
  scripts/test-sanitize.sh
  scripts/fuzz.sh
fi
