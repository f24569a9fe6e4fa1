#!/usr/bin/env bash
# Problems that make a whole run impossible (model, checkpoint, configuration, output file) stop it
# before any output: exit 2, one clear message on stderr naming the culprit, no output file made
# or touched. Usage: fatal_errors.sh DILU_BINARY SCRATCH_DIR
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" "$@"
"$dilu" make-model --preset tiny --out "$scratch/m" >/dev/null
printf '{"id": 1, "prompt_token_ids": [1, 2, 3], "max_tokens": 2}\n' >"$scratch/in.jsonl"

# A copy of the good model to damage.
copy_model() {
  rm -rf "$1"
  cp -r "$scratch/m" "$1"
}

# expect_fatal NAME WORD [dilu run arguments...]: exit 2, stderr holds exactly one "dilu: error:"
# message containing WORD and no internal error, and the output file $scratch/NAME.jsonl was not
# created.
expect_fatal() {
  local name=$1 word=$2
  shift 2
  local out="$scratch/$name.jsonl" rc=0
  "$dilu" run --input "$scratch/in.jsonl" --output "$out" "$@" >"$scratch/$name.stdout" 2>"$scratch/$name.stderr" ||
    rc=$?
  [ "$rc" = 2 ] || fail "$name: exit code $rc, expected 2; stderr: $(cat "$scratch/$name.stderr")"
  local n
  n=$(grep -c "^dilu: error: " "$scratch/$name.stderr" || true)
  [ "$n" = 1 ] || fail "$name: $n error messages on stderr, expected 1: $(cat "$scratch/$name.stderr")"
  grep -qF -- "$word" "$scratch/$name.stderr" || fail "$name: '$word' is not named in: $(cat "$scratch/$name.stderr")"
  if grep -qi "internal error" "$scratch/$name.stderr"; then fail "$name: reported as an internal error"; fi
  [ ! -e "$out" ] || fail "$name: the output file was created"
}

# The model directory does not exist.
expect_fatal missing_dir "$scratch/no-such-model" --model "$scratch/no-such-model"

# config.json missing, unreadable (a directory), not JSON, or with an invalid field.
copy_model "$scratch/no_cfg"
rm "$scratch/no_cfg/config.json"
expect_fatal no_config "$scratch/no_cfg/config.json" --model "$scratch/no_cfg"
copy_model "$scratch/dir_cfg"
rm "$scratch/dir_cfg/config.json"
mkdir "$scratch/dir_cfg/config.json"
expect_fatal unreadable_config "$scratch/dir_cfg/config.json" --model "$scratch/dir_cfg"
copy_model "$scratch/bad_cfg"
printf '{"hidden_size": 256,' >"$scratch/bad_cfg/config.json"
expect_fatal invalid_config "$scratch/bad_cfg/config.json" --model "$scratch/bad_cfg"
copy_model "$scratch/field_cfg"
python3 - "$scratch/field_cfg/config.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
c["kv_lora_rank"] = "64"
json.dump(c, open(sys.argv[1], "w"))
EOF
expect_fatal config_field "kv_lora_rank" --model "$scratch/field_cfg"

# A truncated shard (an interrupted download).
copy_model "$scratch/truncated"
shard=$(ls "$scratch/truncated"/*.safetensors | tail -1)
truncate -s -1000 "$shard"
expect_fatal truncated_shard "$shard" --model "$scratch/truncated"
# A shard cut inside its header.
copy_model "$scratch/cut_header"
shard=$(ls "$scratch/cut_header"/*.safetensors | head -1)
truncate -s 100 "$shard"
expect_fatal cut_header "$shard" --model "$scratch/cut_header"

# The index names a shard that is not there.
copy_model "$scratch/missing_shard"
shard=$(ls "$scratch/missing_shard"/*.safetensors | head -1)
rm "$shard"
expect_fatal missing_shard "$(basename "$shard")" --model "$scratch/missing_shard"
# ... or a file that never existed.
copy_model "$scratch/bad_index"
python3 - "$scratch/bad_index/model.safetensors.index.json" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
j["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
json.dump(j, open(sys.argv[1], "w"))
EOF
expect_fatal index_names_missing_file "model-00009-of-00009.safetensors" --model "$scratch/bad_index"
# An unreadable index (a directory).
copy_model "$scratch/dir_index"
rm "$scratch/dir_index/model.safetensors.index.json"
mkdir "$scratch/dir_index/model.safetensors.index.json"
expect_fatal unreadable_index "model.safetensors.index.json" --model "$scratch/dir_index"

# A tensor of the wrong shape for config.json.
copy_model "$scratch/wrong_shape"
python3 - "$scratch/wrong_shape/config.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
c["intermediate_size"] += 1
json.dump(c, open(sys.argv[1], "w"))
EOF
expect_fatal wrong_shape "model.layers.0.mlp.gate_proj.weight" --model "$scratch/wrong_shape"

# Configuration: an unknown --set key, a bad value.
expect_fatal unknown_key "no.such_key" --model "$scratch/m" --set no.such_key=3
expect_fatal bad_value "kv.block_size" --model "$scratch/m" --set kv.block_size=-4

# The input file does not exist.
rc=0
"$dilu" run --model "$scratch/m" --input "$scratch/no-input.jsonl" --output "$scratch/no_input.jsonl" \
  >/dev/null 2>"$scratch/no_input.stderr" || rc=$?
[ "$rc" = 2 ] || fail "missing input: exit code $rc, expected 2"
grep -qF "$scratch/no-input.jsonl" "$scratch/no_input.stderr" || fail "missing input not named: $(cat "$scratch/no_input.stderr")"
[ ! -e "$scratch/no_input.jsonl" ] || fail "missing input: the output file was created"

# With --no-resume, an output file that already holds results is refused and left as it was.
printf '{"id": "earlier", "token_ids": [1]}\n' >"$scratch/existing.jsonl"
cp "$scratch/existing.jsonl" "$scratch/existing.orig"
rc=0
"$dilu" run --model "$scratch/m" --input "$scratch/in.jsonl" --output "$scratch/existing.jsonl" --no-resume \
  >/dev/null 2>"$scratch/existing.stderr" || rc=$?
[ "$rc" = 2 ] || fail "existing output: exit code $rc, expected 2"
grep -qF "$scratch/existing.jsonl" "$scratch/existing.stderr" || fail "existing output not named: $(cat "$scratch/existing.stderr")"
cmp -s "$scratch/existing.jsonl" "$scratch/existing.orig" || fail "the existing output file was modified"

# Sanity: the undamaged model runs.
"$dilu" run --model "$scratch/m" --input "$scratch/in.jsonl" --output "$scratch/good.jsonl" >/dev/null 2>&1 ||
  fail "the good model failed to run"
[ "$(wc -l <"$scratch/good.jsonl")" = 1 ] || fail "the good run wrote $(wc -l <"$scratch/good.jsonl") lines"

echo "fatal_errors: ok"
