#!/usr/bin/env bash
# Builds dilu with the CUDA backend for Hopper (sm_90a) on the GPU machine and runs the whole
# suite there, GPU-labelled tests included. Logs go to $OUT (or /tmp) for the record.
# Usage (from the repo root on the GPU machine): tests/gpu/run_on_device.sh
set -euo pipefail
out="${OUT:-/tmp}"
build="${BUILD_DIR:-/tmp/dilu-build}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvcc --version | tail -2
  cmake --version | head -1
} 2>&1 | tee "$out/device.txt"
cmake -S . -B "$build" -G Ninja -DCMAKE_CUDA_ARCHITECTURES=90a -DDILU_WERROR=ON -DDILU_CUDA=ON 2>&1 | tee "$out/configure.log" | tail -3
cmake --build "$build" -j "$(nproc)" 2>&1 | tee "$out/build.log" | tail -3
ctest --test-dir "$build" --output-on-failure -j "$(nproc)" --timeout 600 2>&1 | tee "$out/ctest.log" | tail -25
