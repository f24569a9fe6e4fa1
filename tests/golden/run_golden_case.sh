#!/usr/bin/env bash
# Golden parity of one case: run_golden_case.sh DILU_BINARY CASE_DIR SCRATCH_DIR [extra dilu run arguments...]
# Runs `dilu run` on CASE_DIR/model with CASE_DIR/input.jsonl and compares the greedy continuations
# with CASE_DIR/expected.jsonl (made by Hugging Face transformers, see README.md).
set -euo pipefail

if [ $# -lt 3 ]; then
  echo "usage: $0 DILU_BINARY CASE_DIR SCRATCH_DIR [extra dilu run arguments...]" >&2
  exit 2
fi
dilu=$1
case_dir=$2
scratch=$3
shift 3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

mkdir -p "$scratch"
rm -f "$scratch/out.jsonl"
"$dilu" run --model "$case_dir/model" --input "$case_dir/input.jsonl" --output "$scratch/out.jsonl" "$@"
python3 "$here/check_golden.py" "$scratch/out.jsonl" "$case_dir/expected.jsonl" ${NEAR_TIE:+--near-tie "$NEAR_TIE"}
