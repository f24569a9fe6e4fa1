#!/usr/bin/env bash
# The jobs/ scripts on a GPU machine without Slurm: fake allocation variables (one node, one task
# per GPU) and an scontrol stand-in; mpirun launches. Checks that the plan is made for the GPU
# nvidia-smi names, that run and bench put rank r on GPU r (their traces' device attribute), and
# that reports come out. Usage (repo root, GPU machine): tests/slurm/gpu_smoke.sh BUILD_DIR OUT_DIR
set -uo pipefail
build=$1
out=$2
repo=$(pwd)
mkdir -p "$out" /tmp/gpu-smoke/shim
# shellcheck disable=SC2016  # the stand-in's own $2
printf '#!/bin/sh\n[ "$2" = hostnames ] && hostname\nexit 0\n' >/tmp/gpu-smoke/shim/scontrol
chmod +x /tmp/gpu-smoke/shim/scontrol
gpus=$(nvidia-smi -L | wc -l)
export PATH="/tmp/gpu-smoke/shim:$PATH" DILU="$build/apps/dilu" DILU_JOBS="$repo/jobs" LAUNCHER=mpirun
SLURM_JOB_NODELIST=$(hostname)
SLURM_CPUS_ON_NODE=$(nproc)
export SLURM_JOB_ID=1 SLURM_JOB_NUM_NODES=1 SLURM_NTASKS=$gpus SLURM_JOB_NODELIST SLURM_CPUS_ON_NODE
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cd /tmp/gpu-smoke || exit 1
"$DILU" make-model --preset tiny --out tiny >/dev/null
python3 -c '
import json
for i in range(16): print(json.dumps({"id": i, "prompt_token_ids": [1 + i, 2, 3], "max_tokens": 16, "ignore_eos": True}))' >in.jsonl
rc=0
[ -n "${SKIP_RUN:-}" ] || bash "$repo/jobs/single-node.sbatch" tiny in.jsonl run/out.jsonl --set parallel.dp="$gpus" >"$out/run.log" 2>&1 || rc=$?
echo "single-node.sbatch (dp $gpus): exit $rc, $(wc -l <run/out.jsonl) records"
# A slice of R1's geometry (bench measures the device's copy bandwidth in its activation arena,
# which the tiny model's is too small for).
BATCH_SIZES=1,8 INPUT_LEN=64 OUTPUT_LEN=32 bash "$repo/jobs/sweep-batch.sbatch" r1-geometry sweep --random-weights \
  --layers 2 >"$out/sweep.log" 2>&1 || rc=$?
echo "sweep-batch.sbatch: exit $rc"
grep -h "plan: dilu plan\|launch:" "$out/run.log" "$out/sweep.log"
for f in run/out.traces/rank-*.h5 sweep/traces/rank-*.h5; do
  echo "$f: $(strings "$f" | grep -m1 -o 'cuda[^"]*\[[^]]*\]' || strings "$f" | grep -m1 -i 'nvidia')"
done
cp -r run/out.report "$out/run-report" 2>/dev/null
cp -r sweep/report "$out/sweep-report" 2>/dev/null
exit $rc
