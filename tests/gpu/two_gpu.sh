#!/usr/bin/env bash
# shellcheck disable=SC2317  # the stage_* functions are called by name
# The two-GPU runs (docs/perf/two-gpu-h200.md): on a host with two GPUs, with a built dilu,
#   tests/gpu/two_gpu.sh DILU OUT_DIR [STAGES]
# STAGES (default "golden sampling kill bench"), each logged to OUT_DIR/<stage>.log:
#  golden  every golden checkpoint with logprobs 5 on one GPU, then tp=2, pp=2 and dp=2 under
#          mpirun: each compared with the one-GPU run (tests/gpu/compare_layouts.py: tokens equal
#          but for near ties, top-5 logprobs within the CUDA path's bound) and with the
#          transformers reference (tests/golden/check_golden.py --near-tie 0.25); soft FP8 GEMMs,
#          the path held to transformers' arithmetic. One job at a time, one rank per GPU.
#  sampling v2lite_fp8 and v2lite_bf16 with seeded sampling (n=2, temperature 0.8, top_p 0.95,
#          seed 7, prompts chunked by batch.max_tokens=8, as tests/e2e/mpi.sh does on the CPU) on
#          one GPU, then tp=2, pp=2 and dp=2 (tests/gpu/compare_sampling.py): pp=2 and dp=2 must
#          sample exactly the one-GPU tokens; tp=2 sums in another order, so a sample drawn near a
#          boundary of the distribution may flip: its differences are counted and printed, not judged.
#          With cuda.kernels=fast, pp=2 and dp=2 logprobs can differ slightly too (the kernels depend
#          on the step's size); a failure prints the logprob drift before the flip.
#  kill    a tp=2 run on two GPUs, rank 1 SIGKILLed mid-run: every rank gone within 60 s, one
#          clear message; the same command again resumes and answers every id once.
#  bench   r1-geometry, random FP8 weights: one GPU holding 2 layers against tp=2 over 4 layers
#          (batch 1, 32, 256; all-reduce per layer measured), and pp=2 over 4 layers against one
#          GPU holding all 4 (batch 256), with traces and `dilu report` (bubble fraction).
# Exit status: 0 when every stage passed; a failed stage does not stop the later ones.
set -uo pipefail
dilu=$(realpath "$1")
out=$(realpath -m "$2")
stages=${3:-golden sampling kill bench}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpirun=(mpirun -np 2 --oversubscribe --bind-to none)
status=0
say() { echo "[two_gpu $(date +%T)] $*"; }
lines_of() { if [ -f "$1" ]; then wc -l <"$1"; else echo 0; fi; }

stage_golden() {
  local work=$out/golden
  mkdir -p "$work"
  local cases=()
  for d in "$root"/tests/golden/data/*/; do cases+=("$(basename "$d")"); done
  local common=(--set cuda.fp8_gemm=soft --set kv.num_blocks=256 --set batch.max_seqs=8 --set model.max_seq_len=4096)
  # Inputs asking for the top-5 logprobs of every generated token.
  for c in "${cases[@]}"; do
    python3 - "$root/tests/golden/data/$c/input.jsonl" "$work/$c.in.jsonl" <<'PY'
import json, sys
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as g:
    for line in f:
        if line.strip():
            r = json.loads(line)
            r["logprobs"] = 5
            g.write(json.dumps(r) + "\n")
PY
  done
  # One GPU: the reference of the layouts. One process per GPU at a time: two mpirun ranks
  # sharing a GPU with another process gave wrong BF16 results once (docs/perf/two-gpu-h200.md).
  for c in "${cases[@]}"; do
    say "golden: $c on one GPU"
    CUDA_VISIBLE_DEVICES=0 timeout 30 "$dilu" run --model "$root/tests/golden/data/$c/model" \
      --input "$work/$c.in.jsonl" --output "$work/$c.gpu1.jsonl" --overwrite "${common[@]}" \
      >"$work/$c.gpu1.log" 2>&1
  done
  local fail=0
  for layout in tp2 pp2 dp2; do
    local set
    case $layout in
      tp2) set=(--set parallel.tp=2) ;;
      pp2) set=(--set parallel.pp=2) ;;
      dp2) set=(--set parallel.dp=2) ;;
    esac
    for c in "${cases[@]}"; do
      say "golden: $c $layout"
      timeout 45 "${mpirun[@]}" "$dilu" run --model "$root/tests/golden/data/$c/model" --input "$work/$c.in.jsonl" \
        --output "$work/$c.$layout.jsonl" --overwrite "${common[@]}" "${set[@]}" </dev/null \
        >"$work/$c.$layout.log" 2>&1
    done
  done
  for c in "${cases[@]}"; do
    local bound=0.25
    [[ $c == *fp8* ]] && bound=0.5
    for layout in gpu1 tp2 pp2 dp2; do
      if [ ! -s "$work/$c.$layout.jsonl" ]; then
        echo "FAIL $c $layout: no output; log:"
        tail -5 "$work/$c.$layout.log"
        fail=1
        continue
      fi
      if [ "$layout" != gpu1 ]; then
        python3 "$here/compare_layouts.py" "$work/$c.gpu1.jsonl" "$work/$c.$layout.jsonl" --bound "$bound" \
          --near-tie 0.25 --label "$c $layout vs 1 GPU:" || fail=1
      fi
      if python3 "$root/tests/golden/check_golden.py" "$work/$c.$layout.jsonl" "$root/tests/golden/data/$c/expected.jsonl" \
        --near-tie 0.25 >"$work/$c.$layout.golden.txt" 2>&1; then
        echo "PASS $c $layout vs transformers: $(tail -1 "$work/$c.$layout.golden.txt")"
      else
        echo "FAIL $c $layout vs transformers:"
        cat "$work/$c.$layout.golden.txt"
        fail=1
      fi
    done
  done
  return "$fail"
}

stage_sampling() {
  local work=$out/sampling fail=0
  mkdir -p "$work"
  local common=(--set cuda.fp8_gemm=soft --set kv.num_blocks=256 --set batch.max_seqs=8 --set batch.max_tokens=8
    --set model.max_seq_len=4096)
  for c in v2lite_fp8 v2lite_bf16; do
    local model=$root/tests/golden/data/$c/model
    python3 - "$root/tests/golden/data/$c/input.jsonl" "$work/$c.in.jsonl" <<'PY'
import json, sys
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as g:
    for line in f:
        if line.strip():
            r = json.loads(line)
            r.update(temperature=0.8, top_p=0.95, seed=7, n=2, logprobs=True, top_logprobs=2)
            g.write(json.dumps(r) + "\n")
PY
    say "sampling: $c on one GPU"
    CUDA_VISIBLE_DEVICES=0 timeout 30 "$dilu" run --model "$model" --input "$work/$c.in.jsonl" \
      --output "$work/$c.gpu1.jsonl" --overwrite "${common[@]}" >"$work/$c.gpu1.log" 2>&1 ||
      { echo "FAIL sampling $c gpu1: $(tail -5 "$work/$c.gpu1.log")"; fail=1; continue; }
    for layout in tp2 pp2 dp2; do
      local set=(--set "parallel.${layout%2}=2") judge=()
      [ "$layout" = tp2 ] && judge=(--report-only)
      say "sampling: $c $layout"
      if ! timeout 45 "${mpirun[@]}" "$dilu" run --model "$model" --input "$work/$c.in.jsonl" \
        --output "$work/$c.$layout.jsonl" --overwrite "${common[@]}" "${set[@]}" </dev/null \
        >"$work/$c.$layout.log" 2>&1; then
        echo "FAIL sampling $c $layout: the run failed: $(tail -5 "$work/$c.$layout.log")"
        fail=1
        continue
      fi
      python3 "$here/compare_sampling.py" "$work/$c.gpu1.jsonl" "$work/$c.$layout.jsonl" "${judge[@]}" \
        --label "sampling $c $layout vs 1 GPU:" || fail=1
    done
  done
  return "$fail"
}

stage_kill() {
  local work=$out/kill model=$root/tests/golden/data/v2lite_bf16/model
  mkdir -p "$work"
  python3 - "$work/in.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(300):
        f.write(json.dumps({"id": f"k{i}", "prompt_token_ids": [1 + (i * 7 + k) % 200 for k in range(4 + i % 9)],
                            "max_tokens": 64, "ignore_eos": True}) + "\n")
PY
  local cmd=("${mpirun[@]}" "$dilu" run --model "$model" --input "$work/in.jsonl" --output "$work/out.jsonl"
    --set parallel.tp=2 --set batch.max_seqs=8 --set kv.num_blocks=256)
  rm -f "$work/out.jsonl"
  "${cmd[@]}" </dev/null >"$work/run1.log" 2>&1 &
  local mpid=$!
  # Kill rank 1 once it has produced results (some lines written), at most 60 s in.
  local waited=0
  while [ "$waited" -lt 600 ] && [ "$(lines_of "$work/out.jsonl")" -lt 5 ]; do
    sleep 0.1
    waited=$((waited + 1))
  done
  local victim=""
  for p in $(pgrep -f "dilu run --model $model"); do
    if tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=1"; then victim=$p; fi
  done
  if [ -z "$victim" ]; then
    echo "FAIL kill: rank 1 not found (did the run end already? $(tail -3 "$work/run1.log"))"
    wait "$mpid"
    return 1
  fi
  local lines_before t0 t1 rc=0
  lines_before=$(wc -l <"$work/out.jsonl")
  t0=$(date +%s.%N)
  kill -9 "$victim"
  local gone=0
  for _ in $(seq 1 600); do
    if ! kill -0 "$mpid" 2>/dev/null && [ -z "$(pgrep -f "dilu run --model $model")" ]; then gone=1; break; fi
    sleep 0.1
  done
  t1=$(date +%s.%N)
  wait "$mpid" || rc=$?
  local secs
  secs=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
  echo "kill: rank 1 (pid $victim) SIGKILLed with $lines_before lines written; every rank gone after $secs s" \
    "(mpirun exit $rc)"
  echo "kill: what the job printed after the kill:"
  grep -v "^dilu: [0-9]*/" "$work/run1.log" | tail -15
  local fail=0
  [ "$gone" = 1 ] || { echo "FAIL kill: ranks still alive 60 s after the kill"; pkill -9 -f "dilu run --model $model"; fail=1; }
  "${cmd[@]}" </dev/null >"$work/run2.log" 2>&1 || { echo "FAIL kill: the resumed run failed: $(tail -5 "$work/run2.log")"; fail=1; }
  grep "resuming" "$work/run2.log" | head -2
  python3 - "$work/in.jsonl" "$work/out.jsonl" <<'PY' || fail=1
import json, sys
want = [json.loads(l)["id"] for l in open(sys.argv[1])]
got = [json.loads(l)["id"] for l in open(sys.argv[2])]  # every line valid JSON
dup = len(got) - len(set(got))
missing = set(want) - set(got)
print(f"kill: resumed output: {len(got)} lines, {len(set(got))} ids, {dup} duplicates, {len(missing)} missing")
sys.exit(0 if not dup and not missing else 1)
PY
  return "$fail"
}

stage_bench() {
  local work=$out/bench fail=0
  mkdir -p "$work"
  local common=(bench --model r1-geometry --random-weights --input-len 128 --output-len 16 --set backend=cuda)
  say "bench: one GPU, 2 layers"
  CUDA_VISIBLE_DEVICES=0 timeout 150 "$dilu" "${common[@]}" --layers 2 --batch-sizes 1,32,256 \
    >"$work/gpu1-2layers.txt" 2>"$work/gpu1-2layers.log" || fail=1
  cat "$work/gpu1-2layers.txt"
  say "bench: tp=2, 4 layers"
  timeout 200 "${mpirun[@]}" "$dilu" "${common[@]}" --layers 4 --batch-sizes 1,32,256 --set parallel.tp=2 \
    --trace-dir "$work/tp2.traces" </dev/null >"$work/tp2-4layers.txt" 2>"$work/tp2-4layers.log" || fail=1
  cat "$work/tp2-4layers.txt"
  grep "all-reduce of" "$work/tp2-4layers.log"
  say "bench: one GPU, 4 layers, batch 256"
  CUDA_VISIBLE_DEVICES=0 timeout 150 "$dilu" "${common[@]}" --layers 4 --batch-sizes 256 \
    >"$work/gpu1-4layers.txt" 2>"$work/gpu1-4layers.log" || fail=1
  cat "$work/gpu1-4layers.txt"
  say "bench: pp=2, 4 layers, batch 256"
  timeout 200 "${mpirun[@]}" "$dilu" "${common[@]}" --layers 4 --batch-sizes 256 --set parallel.pp=2 \
    --trace-dir "$work/pp2.traces" </dev/null >"$work/pp2-4layers.txt" 2>"$work/pp2-4layers.log" || fail=1
  cat "$work/pp2-4layers.txt"
  "$dilu" report "$work/pp2.traces" --out "$work/pp2.report" >"$work/pp2.report.txt" 2>&1 || fail=1
  cat "$work/pp2.report.txt"
  "$dilu" report "$work/tp2.traces" --out "$work/tp2.report" >"$work/tp2.report.txt" 2>&1 || fail=1
  return "$fail"
}

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv >"$out/devices.txt" 2>&1
nvidia-smi topo -m >>"$out/devices.txt" 2>&1
cat "$out/devices.txt"
for s in $stages; do
  say "stage $s"
  if "stage_$s" >"$out/$s.log" 2>&1; then say "stage $s: PASS"; else say "stage $s: FAIL"; status=1; fi
  grep -v "^\[two_gpu" "$out/$s.log" | tail -60  # the results, without the progress lines
done
exit $status
