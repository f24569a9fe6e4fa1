#!/usr/bin/env bash
# A run killed with SIGKILL at random moments and restarted each time ends with every input id
# answered exactly once and every output line intact; SIGTERM stops a run cleanly (exit 143)
# and the rerun resumes it; a duplicate id gets an error record.
# Usage: kill_resume.sh DILU_BINARY SCRATCH_DIR
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" "$@"
"$dilu" make-model --preset tiny --out "$scratch/m" >/dev/null
python3 - "$scratch/in.jsonl" <<'PY'
import json, random, sys
random.seed(5)
with open(sys.argv[1], "w") as f:
    for i in range(400):
        f.write(json.dumps({"id": f"r{i}", "prompt_token_ids": [random.randrange(1, 1000) for _ in range(random.randrange(1, 30))],
                            "max_tokens": random.randrange(4, 40), "ignore_eos": True,
                            "temperature": 0.7, "seed": i}) + "\n")
    f.write(json.dumps({"id": "r3", "prompt_token_ids": [1, 2], "max_tokens": 2}) + "\n")  # duplicate id
PY

# Reference: one uninterrupted run.
"$dilu" run --model "$scratch/m" --input "$scratch/in.jsonl" --output "$scratch/ref.jsonl" --set batch.max_seqs=8 \
  >/dev/null 2>&1 || [ $? = 1 ] || fail "reference run failed"

# Killed at random moments while generating (eight times), then restarted once more to finish. A run that ends
# before its kill just counts as finished early.
kills=0
for attempt in $(seq 1 8); do
  : >"$scratch/run.log"  # no "model loaded" left from the previous attempt
  "$dilu" run --model "$scratch/m" --input "$scratch/in.jsonl" --output "$scratch/out.jsonl" --set batch.max_seqs=8 \
    >"$scratch/run.log" 2>&1 &
  pid=$!
  # A random moment after the model is loaded (start-up time varies with the machine's load).
  for _ in $(seq 1 600); do
    grep -q "model loaded" "$scratch/run.log" 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  sleep "$(python3 -c "import random; print(random.uniform(0.05, 0.6))")"
  if kill -KILL "$pid" 2>/dev/null; then
    kills=$((kills + 1))
  fi
  wait "$pid" 2>/dev/null || true
done
rc=0
"$dilu" run --model "$scratch/m" --input "$scratch/in.jsonl" --output "$scratch/out.jsonl" --set batch.max_seqs=8 \
  >"$scratch/run.log" 2>&1 || rc=$?
# 1 when this run wrote the duplicate-id error record, 0 when an earlier one did.
[ "$rc" = 0 ] || [ "$rc" = 1 ] || fail "the last run exited with $rc: $(tail -3 "$scratch/run.log")"
[ "$kills" -ge 3 ] || fail "only $kills kills happened; the run was too fast to test resuming"

python3 - "$scratch/out.jsonl" "$scratch/ref.jsonl" <<'PY'
import json, sys
def load(p):
    recs = {}
    text = open(p).read()
    assert text.endswith("\n"), f"{p} does not end with a newline"
    for n, line in enumerate(text[:-1].split("\n"), 1):
        r = json.loads(line)  # every line intact
        key = (r["id"], "error" in r)
        assert key not in recs, f"{p}: {key} answered twice (line {n})"
        recs[key] = r
    return recs
out, ref = load(sys.argv[1]), load(sys.argv[2])
assert out.keys() == ref.keys(), sorted(set(out) ^ set(ref))
for k in ref:
    if not k[1]:
        assert out[k]["token_ids"] == ref[k]["token_ids"], f"{k}: resumed output differs from the uninterrupted run"
assert ("r3", True) in out, "the duplicate id got no error record"
print(f"kill_resume: {len(out)} records, all intact, each id once, identical to the uninterrupted run")
PY

# SIGTERM: clean stop with exit code 143, then the rerun completes the file.
"$dilu" run --model "$scratch/m" --input "$scratch/in.jsonl" --output "$scratch/term.jsonl" --set batch.max_seqs=2 \
  >"$scratch/term.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do  # until it is generating
  grep -q "model loaded" "$scratch/term.log" && break
  sleep 0.1
done
sleep 0.3
kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
[ "$rc" = 143 ] || fail "SIGTERM: exit code $rc, expected 143: $(tail -3 "$scratch/term.log")"
grep -q "resume" "$scratch/term.log" || fail "SIGTERM: no hint to resume: $(tail -3 "$scratch/term.log")"
"$dilu" run --model "$scratch/m" --input "$scratch/in.jsonl" --output "$scratch/term.jsonl" >/dev/null 2>&1 || [ $? = 1 ] ||
  fail "the run after SIGTERM failed"
[ "$(wc -l <"$scratch/term.jsonl")" = "$(wc -l <"$scratch/ref.jsonl")" ] || fail "after SIGTERM and resume: $(wc -l <"$scratch/term.jsonl") lines"
echo "kill_resume: ok ($kills kills)"
