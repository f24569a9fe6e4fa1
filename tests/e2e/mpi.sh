#!/usr/bin/env bash
# Several ranks under mpirun give exactly the greedy tokens of one rank: tensor parallel (tp=2),
# pipeline parallel (pp=2), data parallel (dp=2) and combinations, on every golden checkpoint;
# seeded sampling with n=2 gives the same tokens on any layout; a rank that fails stops every
# rank with one message; a killed rank leaves a resumable output. Usage: mpi.sh DILU_BINARY SCRATCH_DIR
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" "$@"
golden="$here/../golden"
# CI runs as root; the machine has fewer cores than ranks.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
mpirun=(mpirun --oversubscribe --bind-to none)

for case_dir in "$golden"/data/*/; do
  case=$(basename "$case_dir")
  while read -r name np settings; do
    out="$scratch/$case-$name.jsonl"
    # shellcheck disable=SC2086  # settings is a list of --set arguments
    timeout 300 "${mpirun[@]}" -np "$np" "$dilu" run --model "$case_dir/model" --input "$case_dir/input.jsonl" \
      --output "$out" --set cpu.threads=1 $settings </dev/null >"$scratch/$case-$name.log" 2>&1 ||
      fail "$case/$name: mpirun failed: $(tail -5 "$scratch/$case-$name.log")"
    python3 "$golden/check_golden.py" "$out" "$case_dir/expected.jsonl" >/dev/null ||
      fail "$case/$name: tokens differ from one rank: $(python3 "$golden/check_golden.py" "$out" "$case_dir/expected.jsonl")"
    ls "$scratch/$case-$name.jsonl".dp-* >/dev/null 2>&1 && fail "$case/$name: part files left behind"
  done <<'LAYOUTS'
tp2 2 --set parallel.tp=2
pp2 2 --set parallel.pp=2
tp2pp2 4 --set parallel.tp=2 --set parallel.pp=2
dp2 2 --set parallel.dp=2
tp2dp2 4 --set parallel.tp=2 --set parallel.dp=2
auto 2 --set parallel.tp=auto --set parallel.pp=auto --set parallel.dp=auto
LAYOUTS
  echo "mpi: $case ok"
done

# Seeded sampling, n = 2 sharing the prefill, a prompt chunked over steps: the same tokens with
# one rank and with every layout.
case_dir="$golden/data/r1_fp8"
python3 - "$case_dir/input.jsonl" "$scratch/sampled.jsonl" <<'PY'
import json, sys
with open(sys.argv[2], "w") as f:
    for line in open(sys.argv[1]):
        r = json.loads(line)
        r.update(temperature=0.9, top_p=0.95, seed=7, n=2, logprobs=True, top_logprobs=2)
        f.write(json.dumps(r) + "\n")
PY
for layout in "1" "2 --set parallel.pp=2" "2 --set parallel.tp=2" "4 --set parallel.tp=2 --set parallel.pp=2"; do
  read -r np settings <<<"$layout"
  # shellcheck disable=SC2086
  timeout 300 "${mpirun[@]}" -np "$np" "$dilu" run --model "$case_dir/model" --input "$scratch/sampled.jsonl" \
    --output "$scratch/sampled-$np-${settings// /}.jsonl" --set cpu.threads=1 --set batch.max_tokens=8 $settings \
    </dev/null >"$scratch/sampled.log" 2>&1 || fail "sampled run ($layout) failed: $(tail -5 "$scratch/sampled.log")"
done
python3 - "$scratch" <<'PY' || fail "sampled tokens depend on the layout"
import glob, json, sys
runs = {}
for path in sorted(glob.glob(sys.argv[1] + "/sampled-*.jsonl")):
    runs[path] = {r["id"]: [c["token_ids"] for c in r["choices"]] for r in map(json.loads, open(path))}
ref = runs[sys.argv[1] + "/sampled-1-.jsonl"]
for path, got in runs.items():
    assert got == ref, f"{path} differs from one rank"
assert len(runs) == 4, sorted(runs)
PY

# A rank that fails (here: a tensor-parallel size the model cannot be split by) stops them all,
# with the failing rank's message, within the time limit.
case_dir="$golden/data/r1_fp8"
rc=0
timeout 60 "${mpirun[@]}" -np 3 "$dilu" run --model "$case_dir/model" --input "$case_dir/input.jsonl" \
  --output "$scratch/fail.jsonl" --set parallel.tp=3 </dev/null >"$scratch/fail.log" 2>&1 || rc=$?
[ "$rc" != 0 ] && [ "$rc" != 124 ] || fail "a failing rank: exit code $rc (124 = hung): $(tail -5 "$scratch/fail.log")"
[ "$(grep -c "parallel.tp = 3 must divide" "$scratch/fail.log")" = 1 ] ||
  fail "the failing rank's message is not printed exactly once: $(cat "$scratch/fail.log")"

# A rank killed mid-run: mpirun ends the others, and the output stays valid for a resume.
python3 - "$scratch/long.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(200):
        f.write(json.dumps({"id": i, "prompt_token_ids": [1 + i % 200, 2, 3], "max_tokens": 64, "ignore_eos": True}) + "\n")
PY
timeout 120 "${mpirun[@]}" -np 2 "$dilu" run --model "$case_dir/model" --input "$scratch/long.jsonl" \
  --output "$scratch/killed.jsonl" --set parallel.dp=2 --set batch.max_seqs=2 </dev/null >"$scratch/killed.log" 2>&1 &
launcher=$!
sleep 3
pkill -KILL -f "dilu run --model $case_dir/model --input $scratch/long.jsonl" -n || true
rc=0
wait "$launcher" || rc=$?
[ "$rc" != 0 ] && [ "$rc" != 124 ] || fail "killing one rank: mpirun exit code $rc (124 = hung)"
timeout 300 "${mpirun[@]}" -np 2 "$dilu" run --model "$case_dir/model" --input "$scratch/long.jsonl" \
  --output "$scratch/killed.jsonl" --set parallel.dp=2 </dev/null >"$scratch/resumed.log" 2>&1 ||
  fail "resume after a killed rank failed: $(tail -5 "$scratch/resumed.log")"
python3 - "$scratch/killed.jsonl" <<'PY' || fail "the resumed output is not complete and unique"
import json, sys
ids = [json.loads(l)["id"] for l in open(sys.argv[1])]
assert sorted(ids) == list(range(200)), (len(ids), len(set(ids)))
PY
echo "mpi: ok"
