#!/usr/bin/env bash
# Builds dilu with the CUDA backend for Hopper (sm_90a) on the GPU machine and runs the whole
# suite there: the CPU suite (with no GPU visible to it), the GPU-labelled suite, and the CUDA op
# tests under compute-sanitizer memcheck. Logs go to $OUT (or /tmp) for the record.
# Usage (from the repo root on the GPU machine): tests/gpu/run_on_device.sh [ctest -R regex]
set -uo pipefail
out="${OUT:-/tmp}"
build="${BUILD_DIR:-/tmp/dilu-build}"
filter="${1:-}"
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvcc --version | tail -2
  cmake --version | head -1
} 2>&1 | tee "$out/device.txt"
cmake -S . -B "$build" -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90a -DDILU_WERROR=ON -DDILU_CUDA=ON 2>&1 | tee "$out/configure.log" | tail -3
cmake --build "$build" -j "$(nproc)" 2>&1 | tee "$out/build.log" | tail -3 || exit 1
status=0
if [ -n "$filter" ]; then
  ctest --test-dir "$build" --output-on-failure -j 4 --timeout 600 -R "$filter" 2>&1 | tee "$out/ctest.log" | tail -40 || status=1
else
  # GPU tests one at a time (they share the device), then the CPU suite in parallel.
  ctest --test-dir "$build" --output-on-failure --timeout 600 -L gpu 2>&1 | tee "$out/ctest-gpu.log" | tail -40 || status=1
  if [ -z "${SKIP_CPU:-}" ]; then
    ctest --test-dir "$build" --output-on-failure -j "$(nproc)" --timeout 600 -LE gpu 2>&1 | tee "$out/ctest-cpu.log" | tail -8 || status=1
  fi
fi
if command -v compute-sanitizer >/dev/null && [ -z "${SKIP_SANITIZER:-}" ]; then
  compute-sanitizer --tool memcheck --error-exitcode 3 "$build/tests/dilu_gpu_tests" --gtest_filter='*Cuda*:-*Golden*' \
    2>&1 | tee "$out/memcheck.log" | tail -12 || status=1
fi
exit $status
