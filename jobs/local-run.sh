#!/usr/bin/env bash
# One dilu process on this machine: MODEL_DIR, INPUT and OUTPUT as arguments or environment.
# Usage: jobs/local-run.sh MODEL_DIR INPUT.jsonl OUTPUT.jsonl [--set key=value ...]
set -euo pipefail
model="${1:-${MODEL_DIR:?give the model directory}}"
input="${2:-${INPUT:?give the input JSONL}}"
output="${3:-${OUTPUT:?give the output JSONL}}"
shift $(( $# < 3 ? $# : 3 ))
dilu="${DILU:-$(dirname "$0")/../build/apps/dilu}"
exec "$dilu" run --model "$model" --input "$input" --output "$output" "$@"
