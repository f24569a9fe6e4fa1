#!/usr/bin/env bash
# Kernel time per R1-geometry decode step under Nsight Compute (gpu__time_duration only): two
# profiled `dilu bench` runs that differ only in their output length (2 and 6 tokens), so the
# difference per kernel name over the 4 extra steps is one decode step's kernels, without the
# prefill, the bench's calibration or the weights' making. Both run with --no-warmup (the warm-ups'
# steps would differ). Beside it, the step's wall time from an unprofiled bench: what the GPU
# spends per step, and how much of the step the host adds.
# With PREFILL=1 the two runs differ in their batch instead (1 and 3 prompts of 1024 tokens, one
# output token): the difference over 2 is one 1024-token prompt's prefill kernels.
# Usage: tests/gpu/profile_step.sh DILU OUT BATCH [LAYERS]   (BATCH only names the files with PREFILL=1)
set -uo pipefail
dilu=$1; out=$2; batch=$3; layers=${4:-2}
mkdir -p "$out"
run() {  # $1 output length, $2 batch, $3 input length
  echo bench --model r1-geometry --random-weights --layers "$layers" --batch-sizes "${2:-$batch}" --input-len "${3:-64}" \
    --output-len "$1" --no-warmup --set backend=cuda
}
# shellcheck disable=SC2034  # a and b are read through the name reference below
if [[ ${PREFILL:-0} == 1 ]]; then
  what="one 1024-token prompt's prefill kernels"; steps=2; a=(1 1 1024); b=(1 3 1024)
else
  what="one decode step's kernels"; steps=4; a=(2); b=(6)
  # shellcheck disable=SC2046
  "$dilu" $(run 32) > "$out/bench-b$batch.log" 2>&1
fi
for n in a b; do
  declare -n args=$n
  # shellcheck disable=SC2046
  ncu --metrics gpu__time_duration.sum --csv --kernel-name 'regex:^(?!.*(random_fill|fill_u32)).*' \
    "$dilu" $(run "${args[@]}") > "$out/ncu-b$batch-$n.csv" 2> "$out/ncu-b$batch-$n.err"
done
STEPS=$steps WHAT=$what python3 - "$out/ncu-b$batch-a.csv" "$out/ncu-b$batch-b.csv" <<'PY'
import csv, sys, collections, os
def load(path):
    rows = list(csv.reader(l for l in open(path) if l.startswith('"')))
    head, rows = rows[0], rows[1:]
    ki, vi, ui = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}
    tot = collections.defaultdict(lambda: [0, 0.0])
    for r in rows:
        t = tot[r[ki].split("(")[0][:72]]
        t[0] += 1
        t[1] += float(r[vi].replace(",", "")) * scale.get(r[ui], 1.0)
    return tot
a, b = load(sys.argv[1]), load(sys.argv[2])
steps = int(os.environ["STEPS"])
diff = {n: (b[n][0] - a.get(n, [0, 0.0])[0], b[n][1] - a.get(n, [0, 0.0])[1]) for n in b}
print(f"{os.environ['WHAT']} (difference of the two runs over {steps})")
print(f"{'kernel':72s} {'launches':>8s} {'us':>9s}")
total = 0.0
for n, (c, us) in sorted(diff.items(), key=lambda kv: -kv[1][1]):
    if c <= 0 and us <= 0.5: continue
    total += us / steps
    print(f"{n:72s} {c / steps:8.1f} {us / steps:9.1f}")
print(f"kernel time: {total:.1f} us")
PY
[[ ${PREFILL:-0} == 1 ]] || grep -E "batch .* done" "$out/bench-b$batch.log"
