#!/usr/bin/env bash
# Requests at the edges of the limits: max_tokens 0 is answered without compute, generation
# stops at model.max_seq_len, and a request that can never fit in the KV cache gets an error
# record instead of waiting forever. Usage: limits.sh DILU_BINARY SCRATCH_DIR
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" "$@"

"$dilu" make-model --preset tiny --out "$scratch/m" >/dev/null
cat >"$scratch/in.jsonl" <<'JSONL'
{"id": "zero", "prompt_token_ids": [1, 2, 3], "max_tokens": 0}
{"id": "to-the-limit", "prompt_token_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], "max_tokens": 10, "ignore_eos": true}
{"id": "never-fits", "prompt_token_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13], "max_tokens": 4, "ignore_eos": true}
{"id": "fits", "prompt_token_ids": [5, 6, 7], "max_tokens": 4, "ignore_eos": true}
JSONL
rc=0
timeout 120 "$dilu" run --model "$scratch/m" --input "$scratch/in.jsonl" --output "$scratch/out.jsonl" \
  --set model.max_seq_len=16 >"$scratch/log" 2>&1 || rc=$?
[ "$rc" = 0 ] || fail "exit code $rc: $(tail -3 "$scratch/log")"
# A cache of 3 blocks of 4 tokens: 13 tokens can never fit, 7 can.
rc=0
timeout 120 "$dilu" run --model "$scratch/m" --input "$scratch/in.jsonl" --output "$scratch/small.jsonl" \
  --set kv.block_size=4 --set kv.num_blocks=3 --set model.max_seq_len=16 >"$scratch/small.log" 2>&1 || rc=$?
[ "$rc" = 1 ] || fail "small cache: exit code $rc, expected 1 (lines cannot fit): $(tail -3 "$scratch/small.log")"
python3 - "$scratch/out.jsonl" "$scratch/small.jsonl" <<'PY'
import json, sys
out = {r["id"]: r for r in map(json.loads, open(sys.argv[1]))}
assert out["zero"]["token_ids"] == [] and out["zero"]["finish_reason"] == "length", out["zero"]
assert len(out["to-the-limit"]["token_ids"]) == 2 and out["to-the-limit"]["finish_reason"] == "length", out["to-the-limit"]
assert len(out["never-fits"]["token_ids"]) == 4 and len(out["fits"]["token_ids"]) == 4, out
small = {r["id"]: r for r in map(json.loads, open(sys.argv[2]))}
assert "KV-cache blocks" in small["never-fits"]["error"]["message"], small["never-fits"]
assert small["fits"]["token_ids"] == out["fits"]["token_ids"], (small["fits"], out["fits"])
assert small["zero"]["token_ids"] == [], small["zero"]
PY
echo "limits: ok"
