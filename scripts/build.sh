#!/usr/bin/env bash
# Configures and builds dilu into $BUILD_DIR (default: build/). Extra arguments go to cmake,
# e.g. scripts/build.sh -DDILU_CUDA=OFF. TARGET=dilu builds only the executable.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"
cmake -S "$root" -B "$build" -G Ninja "$@"
cmake --build "$build" ${TARGET:+--target "$TARGET"} -j "$(nproc)"
