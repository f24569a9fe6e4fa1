#!/usr/bin/env bash
# The open BF16 error of docs/perf/two-gpu-h200.md: dp=2 with both mpirun ranks on GPU 0, for two BF16
# golden models and an FP8 (soft) one, then BF16 again with cuda.kernels=reference and with
# CUDA_LAUNCH_BLOCKING=1. Each output is checked against the transformers reference
# (check_golden.py --near-tie 0.25, as the golden stage of two_gpu.sh does); each run is limited to 60 s.
# Usage: tests/gpu/shared_gpu_bf16.sh DILU OUT_DIR REPO_ROOT
set -u
D=$(realpath "$1"); out=$2; R=$(realpath "$3"); mkdir -p "$out"; cd "$out" || exit 1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
C=(--set cuda.fp8_gemm=soft --set kv.num_blocks=256 --set batch.max_seqs=8 --overwrite --set parallel.dp=2)
status=0
check() {  # check NAME OUTPUT MODEL_CASE
  if python3 "$R/tests/golden/check_golden.py" "$2" "$R/tests/golden/data/$3/expected.jsonl" --near-tie 0.25 >"$2.check" 2>&1; then
    echo "PASS $1: $(tail -1 "$2.check")"
  else
    echo "FAIL $1:"; sed 's/^/  /' "$2.check"; status=1
  fi
}
for m in v2lite_bf16 bf16_grouped_yarn v2lite_fp8; do
  M=$R/tests/golden/data/$m
  CUDA_VISIBLE_DEVICES=0 timeout 60 mpirun -np 2 --bind-to none "$D" run --model "$M/model" --input "$M/input.jsonl" \
    --output "$m.g0.jsonl" "${C[@]}" </dev/null >"$m.g0.log" 2>&1 || echo "$m dp2 on GPU 0: run failed: $(tail -3 "$m.g0.log")"
  check "$m dp2, both ranks on GPU 0" "$m.g0.jsonl" "$m"
done
M=$R/tests/golden/data/v2lite_bf16
# The kernels of the first failure (cuda.kernels=reference was the default then; fast is now).
CUDA_VISIBLE_DEVICES=0 timeout 60 mpirun -np 2 --bind-to none "$D" run --model "$M/model" --input "$M/input.jsonl" \
  --output ref.jsonl "${C[@]}" --set cuda.kernels=reference </dev/null >ref.log 2>&1 || echo "reference-kernels run failed: $(tail -3 ref.log)"
check "v2lite_bf16 dp2, both ranks on GPU 0, cuda.kernels=reference" ref.jsonl v2lite_bf16
CUDA_VISIBLE_DEVICES=0 timeout 60 mpirun -np 2 --bind-to none -x CUDA_LAUNCH_BLOCKING=1 "$D" run --model "$M/model" \
  --input "$M/input.jsonl" --output lb.jsonl "${C[@]}" </dev/null >lb.log 2>&1 || echo "launch-blocking run failed: $(tail -3 lb.log)"
check "v2lite_bf16 dp2, both ranks on GPU 0, CUDA_LAUNCH_BLOCKING=1" lb.jsonl v2lite_bf16
exit $status
