#!/usr/bin/env bash
# Continuous batching never changes a greedy answer: every golden case gives the reference
# tokens with one sequence per step, three, sixty-four, with prompts chunked over many steps,
# with a cache so small that sequences are preempted and recomputed many times, and with n = 3
# samples sharing one prefill; also with overlapped steps (DILU_STEP_OVERLAP=host: the engine's
# bookkeeping for a step queued before the last one's tokens are read). Usage: batching.sh DILU_BINARY SCRATCH_DIR
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" "$@"
golden="$here/../golden"

total_preemptions=0
for case_dir in "$golden"/data/*/; do
  case=$(basename "$case_dir")
  while read -r name overlap settings; do
    out="$scratch/$case-$name.jsonl"
    # shellcheck disable=SC2086  # settings is a list of --set arguments
    DILU_STEP_OVERLAP=$overlap "$dilu" run --model "$case_dir/model" --input "$case_dir/input.jsonl" --output "$out" \
      $settings \
      >"$scratch/$case-$name.stdout" 2>"$scratch/$case-$name.stderr" ||
      fail "$case/$name: dilu run failed: $(tail -3 "$scratch/$case-$name.stderr")"
    python3 "$golden/check_golden.py" "$out" "$case_dir/expected.jsonl" >/dev/null ||
      fail "$case/$name: tokens differ from the reference: $(python3 "$golden/check_golden.py" "$out" "$case_dir/expected.jsonl")"
  done <<'VARIANTS'
seqs1 0 --set batch.max_seqs=1
seqs3 0 --set batch.max_seqs=3
seqs64 0 --set batch.max_seqs=64
chunked 0 --set batch.max_tokens=7
overlap1 host --set batch.max_seqs=1
overlap3 host --set batch.max_seqs=3 --set kv.block_size=4
overlap-chunked host --set batch.max_tokens=7
VARIANTS

  # Four copies of every prompt in a cache that holds just the longest sequence (blocks of 4
  # tokens): sequences are preempted and recomputed many times.
  python3 - "$case_dir/input.jsonl" "$case_dir/expected.jsonl" "$scratch/$case-x4" <<'PY'
import json, sys
inp = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
exp = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
# max_tokens cut to what the reference generated (an EOS stop still ends in "stop"), so that the
# cache can be sized to the longest sequence.
length = {r["id"]: len(r["token_ids"]) for r in exp}
for r in inp:
    r["max_tokens"] = length[r["id"]]
with open(sys.argv[3] + "-in.jsonl", "w") as fi, open(sys.argv[3] + "-expected.jsonl", "w") as fe:
    for k in range(4):
        for r in inp:
            fi.write(json.dumps(dict(r, id=f"{r['id']}#{k}")) + "\n")
        for r in exp:
            fe.write(json.dumps(dict(r, id=f"{r['id']}#{k}")) + "\n")
print(max((len(r["prompt_token_ids"]) + r["max_tokens"] + 3) // 4 for r in inp), file=open(sys.argv[3] + "-blocks", "w"))
PY
  # Preemption, also with overlapped steps in their host form (a preempted sequence may hold a
  # placeholder for a draw not read yet).
  for overlap in 0 host; do
    pre="$scratch/$case-preempt-$overlap"
    DILU_STEP_OVERLAP=$overlap "$dilu" run --model "$case_dir/model" --input "$scratch/$case-x4-in.jsonl" \
      --output "$pre.jsonl" --set kv.block_size=4 --set kv.num_blocks="$(cat "$scratch/$case-x4-blocks")" \
      >"$pre.stdout" 2>&1 || fail "$case/preempt ($overlap): dilu run failed"
    python3 "$golden/check_golden.py" "$pre.jsonl" "$scratch/$case-x4-expected.jsonl" >/dev/null ||
      fail "$case/preempt ($overlap): tokens differ from the reference"
    preemptions=$(grep -o '[0-9]* preemptions' "$pre.stdout" | cut -d' ' -f1)
    [ "${preemptions:-0}" -ge 1 ] || fail "$case/preempt ($overlap): no preemption ($(tail -1 "$pre.stdout"))"
    total_preemptions=$((total_preemptions + preemptions))
  done

  # n = 3 greedy samples of each prompt: all three equal the reference.
  python3 - "$case_dir/input.jsonl" "$scratch/$case-n3-in.jsonl" <<'PY'
import json, sys
with open(sys.argv[2], "w") as f:
    for line in open(sys.argv[1]):
        if line.strip():
            r = json.loads(line)
            r["n"] = 3
            f.write(json.dumps(r) + "\n")
PY
  for overlap in 0 host; do
    DILU_STEP_OVERLAP=$overlap "$dilu" run --model "$case_dir/model" --input "$scratch/$case-n3-in.jsonl" \
      --output "$scratch/$case-n3.jsonl" --set kv.block_size=4 >/dev/null 2>&1 ||
      fail "$case/n3 ($overlap): dilu run failed"
    python3 - "$scratch/$case-n3.jsonl" "$case_dir/expected.jsonl" <<'PY' || fail "$case/n3 ($overlap): samples differ"
import json, sys
want = {r["id"]: r for r in map(json.loads, open(sys.argv[2]))}
got = [json.loads(l) for l in open(sys.argv[1])]
assert len(got) == len(want), (len(got), len(want))
for r in got:
    w = want[r["id"]]
    assert len(r["choices"]) == 3, r
    for c in r["choices"]:
        assert c["token_ids"] == w["token_ids"], (r["id"], c["index"], c["token_ids"], w["token_ids"])
        assert c["finish_reason"] == w["finish_reason"], (r["id"], c)
    assert r["usage"]["completion_tokens"] == 3 * len(w["token_ids"]), r["usage"]
PY
  done
  echo "batching: $case ok (preemptions in the small-cache run: $preemptions)"
done
[ "$total_preemptions" -ge 10 ] || fail "only $total_preemptions preemptions over all cases; the small-cache runs should preempt many times"
echo "batching: ok, $total_preemptions preemptions in all"
