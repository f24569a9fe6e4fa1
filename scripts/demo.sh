#!/usr/bin/env bash
# The demo job end to end: install what is missing, build dilu, generate a tiny random
# DeepSeek-V3-architecture checkpoint in R1's FP8 layout, run a small prompts file through it
# on the CPU, and show the outputs. Everything lands in demo/ (removed and remade each time).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
TARGET=dilu scripts/build.sh >/dev/null
dilu="${BUILD_DIR:-$root/build}/apps/dilu"

rm -rf demo
mkdir -p demo
"$dilu" make-model --preset tiny --dtype fp8 --seed 7 --out demo/model
cat > demo/prompts.jsonl <<'JSONL'
{"id": "short", "prompt_token_ids": [0, 17, 250], "max_tokens": 24, "temperature": 0, "ignore_eos": true}
{"id": "longer", "prompt_token_ids": [0, 5, 900, 33, 412, 8, 77, 1000, 64, 3, 512, 256], "max_tokens": 64, "ignore_eos": true}
{"id": "until-eos", "prompt_token_ids": [0, 42], "max_tokens": 200}
{"id": "bad-token", "prompt_token_ids": [0, 99999], "max_tokens": 8}
JSONL
echo
echo "== dilu run (the last prompt is deliberately bad: it gets an error record, and exit code 1) =="
set +e
"$dilu" run --model demo/model --input demo/prompts.jsonl --output demo/outputs.jsonl
rc=$?
set -e
echo
echo "== demo/outputs.jsonl =="
cat demo/outputs.jsonl
echo
echo "dilu run exited with $rc (1 = some lines failed, as planned)."
[ "$rc" -eq 1 ]
