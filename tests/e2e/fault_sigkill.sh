#!/usr/bin/env bash
# SIGKILL at 20 random moments of `dilu run`'s life (start-up, loading, resuming, generating,
# writing, closing) with a restart after each, then restarts until a run finishes: every input
# line is answered exactly once (by id; lines without a usable id by their line number), every
# output line is intact JSON, and the answers are those of one uninterrupted run. Kill moments are
# drawn from the reference run's own timings, so the test adapts to slow machines and sanitizer
# builds. FAULT_SEED=N replays one sequence of moments. Usage: fault_sigkill.sh DILU_BINARY SCRATCH_DIR
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" "$@"
seed=${FAULT_SEED:-$RANDOM}
echo "fault_sigkill: FAULT_SEED=$seed"
"$dilu" make-model --preset tiny --out "$scratch/m" >/dev/null
python3 - "$scratch/in.jsonl" <<'PY'
import json, random, sys
random.seed(11)
with open(sys.argv[1], "w") as f:
    for i in range(160):
        ids = [random.randrange(1, 1000) for _ in range(random.randrange(1, 40))]
        common = {"max_tokens": random.randrange(4, 32), "ignore_eos": True, "temperature": 0.8, "seed": i}
        kind = i % 4
        if kind == 0:
            f.write(json.dumps({"id": f"r{i}", "prompt_token_ids": ids, **common}) + "\n")
        elif kind == 1:
            f.write(json.dumps({"id": i, "prompt_token_ids": ids, "n": 2, **common}) + "\n")
        elif kind == 2:  # an OpenAI Batch completion line
            f.write(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"prompt": ids, **common}}) + "\n")
        else:
            f.write(json.dumps({"id": f"g{i}", "prompt_token_ids": ids, "max_tokens": common["max_tokens"],
                                "temperature": 0}) + "\n")
        if i % 40 == 7:
            f.write("{not json\n")                                             # error record by line number
            f.write(json.dumps({"id": f"r{i - 7}", "prompt_token_ids": [1]}) + "\n")  # duplicate id
            f.write("\n")                                                      # blank: not a request
PY
args=(--model "$scratch/m" --input "$scratch/in.jsonl" --set batch.max_seqs=6)
run() {  # run OUTPUT [dilu run arguments...]
  local out=$1
  shift
  "$dilu" run "${args[@]}" --output "$out" "$@"
}

# verify OUTPUT: every input line answered exactly once, every line intact JSON, the tokens of the
# uninterrupted run.
verify() {
  python3 - "$1" "$scratch/ref.jsonl" "$scratch/in.jsonl" <<'PY' || fail "$1 after $kills kills is wrong (FAULT_SEED=$seed)"
import json, sys
def key(r):
    if r.get("custom_id") is not None: return ("custom_id", json.dumps(r["custom_id"]))
    if r.get("id") is not None and not str(r["id"]).startswith("batch_req_"): return ("id", json.dumps(r["id"]), "error" in r)
    return ("line", r["error"]["line"])
def load(p):
    text = open(p, "rb").read().decode("utf-8")
    assert text.endswith("\n"), f"{p} does not end with a newline"
    recs = {}
    for n, line in enumerate(text[:-1].split("\n"), 1):
        r = json.loads(line)  # every line intact
        assert isinstance(r, dict), f"{p}:{n} is not an object"
        k = key(r)
        assert k not in recs, f"{p}: {k} answered twice (line {n})"
        recs[k] = r
    return recs
out, ref = load(sys.argv[1]), load(sys.argv[2])
lines = sum(1 for l in open(sys.argv[3]) if l.strip())
assert len(ref) == lines, f"the reference answers {len(ref)} of {lines} lines"
assert out.keys() == ref.keys(), f"answered differently: {sorted(set(out) ^ set(ref))[:10]}"
def tokens(r):
    if "choices" in r: return [c.get("token_ids") for c in r["choices"]]
    if "response" in r: return r["response"]["body"] and [c.get("token_ids") for c in r["response"]["body"]["choices"]]
    return r.get("token_ids")
for k in ref:
    assert tokens(out[k]) == tokens(ref[k]), f"{k}: tokens differ from the uninterrupted run"
print(f"fault_sigkill: {len(out)} records, one per input line, all intact, identical to the uninterrupted run")
PY
}

# The reference, and its timings: start-up until "model loaded", then generation.
t0=$(date +%s.%N)
run "$scratch/ref.jsonl" >"$scratch/ref.log" 2>&1 || [ $? = 1 ] || fail "the reference run failed: $(tail -3 "$scratch/ref.log")"
t1=$(date +%s.%N)
read -r load gen < <(python3 - "$scratch/ref.log" "$t0" "$t1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
wall = float(sys.argv[3]) - float(sys.argv[2])
m = re.search(r"load ([0-9.]+) s, generation ([0-9.]+) s", text)
load, gen = (float(m.group(1)), float(m.group(2))) if m else (wall / 2, wall / 2)
print(max(load, 0.05), max(gen, 0.2))
PY
)
echo "fault_sigkill: reference run: load $load s, generation $gen s"

# Moments uniform over [0, start-up + generation/15): some during start-up and loading, most
# while generating; on average each run gets less than 1/30 of the work done, so 20 kills land
# before the work runs out.
python3 - "$seed" "$load" "$gen" >"$scratch/moments" <<'PY'
import random, sys
rng = random.Random(int(sys.argv[1]))
load, gen = float(sys.argv[2]), float(sys.argv[3])
for _ in range(400):
    print(f"{rng.uniform(0, 1.3 * load + gen / 15):.3f}")
PY
kills=0
runs=0
rounds=0  # runs that finished before their kill (a machine quicker than during the reference)
while [ "$kills" -lt 20 ]; do
  read -r moment <&3 || fail "20 kills did not land in $runs runs (FAULT_SEED=$seed)"
  runs=$((runs + 1))
  # dilu itself in the background (not a function: $! would be a subshell that SIGKILL leaves dilu of).
  "$dilu" run "${args[@]}" --output "$scratch/out.jsonl" >"$scratch/run-$runs.log" 2>&1 &
  pid=$!
  sleep "$moment"
  kill -KILL "$pid" 2>/dev/null || true
  rc=0
  wait "$pid" || rc=$?
  if [ "$rc" = 137 ]; then
    kills=$((kills + 1))
  elif [ "$rc" = 0 ] || [ "$rc" = 1 ]; then
    # The work ran out before this kill: check what this round of kills left, then start over.
    verify "$scratch/out.jsonl"
    rounds=$((rounds + 1))
    mv "$scratch/out.jsonl" "$scratch/round-$rounds.jsonl"
  else
    fail "run $runs exited with $rc before its kill: $(tail -3 "$scratch/run-$runs.log")"
  fi
  if grep -qiE "internal error|AddressSanitizer|runtime error" "$scratch/run-$runs.log"; then
    fail "run $runs: $(cat "$scratch/run-$runs.log")"
  fi
done 3<"$scratch/moments"
# Restarts until done (one is enough unless something is wrong).
rc=0
run "$scratch/out.jsonl" >"$scratch/final.log" 2>&1 || rc=$?
[ "$rc" = 0 ] || [ "$rc" = 1 ] || fail "the restart after $kills kills exited with $rc: $(tail -3 "$scratch/final.log")"
ls "$scratch"/out.jsonl.* >/dev/null 2>&1 && fail "files left beside the output: $(ls "$scratch"/out.jsonl.*)"
verify "$scratch/out.jsonl"
echo "fault_sigkill: ok ($kills kills in $runs runs, $rounds rounds finished early, FAULT_SEED=$seed)"
