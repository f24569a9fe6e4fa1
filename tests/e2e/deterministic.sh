#!/usr/bin/env bash
# Greedy runs are reproducible: the same input gives byte-identical output files, and the number
# of CPU threads does not change a token. Usage: deterministic.sh DILU_BINARY SCRATCH_DIR
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" "$@"
"$dilu" make-model --preset tiny --out "$scratch/m" >/dev/null
cat >"$scratch/in.jsonl" <<'EOF'
{"id": "a", "prompt_token_ids": [1, 2, 3, 4, 5, 6, 7, 8], "max_tokens": 12}
{"id": "b", "prompt_token_ids": [900], "max_tokens": 12, "ignore_eos": true}
{"id": "c", "prompt_token_ids": [17, 17, 17, 17, 300, 301, 302, 303, 500, 12, 99], "max_tokens": 8}
EOF

run() {
  local out=$1
  shift
  "$dilu" run --model "$scratch/m" --input "$scratch/in.jsonl" --output "$scratch/$out" "$@" >/dev/null 2>&1 ||
    fail "run $out ($*) failed"
}

run first.jsonl
run second.jsonl
cmp "$scratch/first.jsonl" "$scratch/second.jsonl" || fail "two identical runs wrote different outputs"
[ "$(wc -l <"$scratch/first.jsonl")" = 3 ] || fail "expected 3 output lines"
if grep -q '"error"' "$scratch/first.jsonl"; then fail "unexpected error record: $(cat "$scratch/first.jsonl")"; fi

# One thread, and small KV-cache blocks (a request spans several blocks): the same tokens.
run one_thread.jsonl --set cpu.threads=1
cmp "$scratch/first.jsonl" "$scratch/one_thread.jsonl" || fail "cpu.threads=1 changed the output"
run small_blocks.jsonl --set kv.block_size=4
cmp "$scratch/first.jsonl" "$scratch/small_blocks.jsonl" || fail "kv.block_size=4 changed the output"

# The same weights written again from the same seed give the same output too.
"$dilu" make-model --preset tiny --out "$scratch/m2" >/dev/null
for f in "$scratch/m"/*; do
  cmp -s "$f" "$scratch/m2/$(basename "$f")" || fail "make-model is not deterministic: $(basename "$f") differs"
done

echo "deterministic: ok"
