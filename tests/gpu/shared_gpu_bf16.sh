#!/usr/bin/env bash
# The open BF16 error of docs/perf/two-gpu-h200.md: dp=2 with both mpirun ranks on GPU 0, for a BF16
# and an FP8 (soft) golden model, then BF16 again with CUDA_LAUNCH_BLOCKING=1.
# Usage: tests/gpu/shared_gpu_bf16.sh DILU OUT_DIR REPO_ROOT
set -u
D=$1; out=$2; R=$3; mkdir -p $out; cd $out
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
C="--set cuda.fp8_gemm=soft --set kv.num_blocks=256 --set batch.max_seqs=8 --overwrite --set parallel.dp=2"
for m in v2lite_bf16 v2lite_fp8; do
  M=$R/tests/golden/data/$m
  CUDA_VISIBLE_DEVICES=0 mpirun -np 2 --bind-to none $D run --model $M/model --input $M/input.jsonl --output $m.g0.jsonl $C > $m.g0.log 2>&1
  python3 $R/tests/golden/check_golden.py $m.g0.jsonl $M/expected.jsonl | tail -1 | sed "s/^/$m dp2 on GPU 0: /"
done
M=$R/tests/golden/data/v2lite_bf16
CUDA_VISIBLE_DEVICES=0 mpirun -np 2 --bind-to none -x CUDA_LAUNCH_BLOCKING=1 $D run --model $M/model --input $M/input.jsonl --output lb.jsonl $C > lb.log 2>&1
python3 $R/tests/golden/check_golden.py lb.jsonl $M/expected.jsonl | tail -1 | sed "s/^/v2lite_bf16 dp2 on GPU 0, CUDA_LAUNCH_BLOCKING=1: /"
