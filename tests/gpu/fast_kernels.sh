#!/usr/bin/env bash
# The decode-speed issue's checks on one GPU with prebuilt binaries (dilu, dilu_gpu_tests,
# dilu_mla_bench built with -DCMAKE_CUDA_ARCHITECTURES=90a): the whole gpu suite (every op and
# golden test runs with cuda.kernels=reference and =fast), memcheck of the fast op tests, the
# golden continuations with fast, the MLA kernel bench, and `dilu bench` on R1 geometry.
# golden-split: the golden continuations again with the split MLA absorptions forced
# (DILU_MLA_ABSORB=bf16x3; the automatic choice takes them from 32 tokens).
# golden-expanded: the golden continuations again with MLA's expanded prefill forced
# (DILU_MLA_PREFILL=expanded; the automatic choice takes it from 256 tokens a step).
# Usage: tests/gpu/fast_kernels.sh BIN_DIR OUT [STAGES]
#   (STAGES: tests,memcheck,golden,golden-split,golden-expanded,mla,bench)
set -uo pipefail
bin=$(cd "$1" && pwd); out=$2; stages=${3:-tests,memcheck,golden,mla,bench}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p "$out"
has() { [[ ",$stages," == *",$1,"* ]]; }
{ date -u +"%Y-%m-%d %H:%M UTC"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } 2>&1 | tee "$out/device.txt"
status=0
if has tests; then
  timeout 330 "$bin/dilu_gpu_tests" --gtest_brief=1 > "$out/gpu-tests.log" 2>&1 || status=1
  grep -E "^\[  (PASSED|FAILED) |^\[  FAILED  \]" "$out/gpu-tests.log" | head -60; tail -3 "$out/gpu-tests.log"
fi
if has memcheck; then
  timeout 420 compute-sanitizer --tool memcheck --error-exitcode 3 "$bin/dilu_gpu_tests" \
    --gtest_brief=1 --gtest_filter='*CudaMla*:*CudaMoeExperts*:*CudaMoeRoute*:*CudaLinear*:*CudaFp8Block*' > "$out/memcheck-fast.log" 2>&1 || status=1
  tail -5 "$out/memcheck-fast.log"
fi
# golden_stage NAME LABEL [VAR=VALUE ...]: the golden continuations with the fast kernels, the
# variables set; its loop runs in a pipeline's subshell, so failures are read back from its log.
golden_stage() {
  local name=$1 label=$2
  shift 2
  for c in "$repo"/tests/golden/data/*/; do
    n=$(basename "$c")
    if env "$@" NEAR_TIE=0.25 bash "$repo/tests/golden/run_golden_case.sh" "$bin/dilu" "$c" "/tmp/$name-$n" \
         --set backend=cuda --set cuda.fp8_gemm=soft --set cuda.kernels=fast --overwrite > "$out/$name-$n.log" 2>&1
    then echo "$label $n: ok"; else echo "$label $n: FAILED"; tail -5 "$out/$name-$n.log"; fi
  done 2>&1 | tee "$out/$name.log"
  grep -q FAILED "$out/$name.log" && status=1
}
has golden && golden_stage golden-fast "golden fast"
has golden-split && golden_stage golden-split "golden fast, split absorptions" DILU_MLA_ABSORB=bf16x3
has golden-expanded && golden_stage golden-expanded "golden fast, expanded MLA prefill" DILU_MLA_PREFILL=expanded
if has mla; then
  timeout 120 "$bin/dilu_mla_bench" 2>&1 | tee "$out/mla-bench.log" || status=1
fi
if has bench; then
  for k in ${BENCH_KERNELS:-fast reference}; do
    timeout "${BENCH_TIMEOUT:-200}" "$bin/dilu" bench --model r1-geometry --random-weights --layers 4 \
      --batch-sizes "${BENCH_BATCHES:-1,2,4,8,16,32,64,128,256}" --input-len 1024 --output-len "${BENCH_OUTPUT:-128}" \
      --set backend=cuda --set cuda.kernels="$k" 2>&1 | tee "$out/bench-$k.log" || status=1
  done
fi
exit $status
