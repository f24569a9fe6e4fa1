#!/usr/bin/env bash
# Damaged checkpoints stop `dilu run` before any compute (docs/reliability.md): a shard whose
# header places two tensors on the same bytes, one whose offsets point past the end of the file,
# and a config.json that promises more layers than the shards hold. Each gives exit 2, one
# "dilu: error:" naming the file (and the tensor), and no output file. The truncated shard, the
# shard cut inside its header, the index naming a missing file and a tensor of the wrong shape
# for config.json are in fatal_errors.sh; the parsers themselves are fuzzed (fuzz/).
# Usage: fault_checkpoint.sh DILU_BINARY SCRATCH_DIR
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" "$@"
"$dilu" make-model --preset tiny --out "$scratch/m" >/dev/null
printf '{"id": 1, "prompt_token_ids": [1, 2, 3], "max_tokens": 2}\n' >"$scratch/in.jsonl"

# damage MODEL_DIR HOW: rewrites the header of the model's first shard (same data bytes).
damage() {
  python3 - "$1" "$2" <<'PY'
import glob, json, struct, sys
shard = sorted(glob.glob(sys.argv[1] + "/*.safetensors"))[0]
raw = open(shard, "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
tensors = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__" and
                 v["data_offsets"][1] > v["data_offsets"][0])
if sys.argv[2] == "overlap":  # the second tensor starts inside the first
    first, second = header[tensors[0][1]], header[tensors[1][1]]
    size = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]
    print(tensors[1][1])
else:  # the last tensor ends past the end of the file
    last = header[tensors[-1][1]]
    size = last["data_offsets"][1] - last["data_offsets"][0]
    last["data_offsets"] = [len(data) + 64, len(data) + 64 + size]
    print(tensors[-1][1])
text = json.dumps(header).encode()
text += b" " * (-len(text) % 8)
open(shard, "wb").write(struct.pack("<Q", len(text)) + text + data)
print(shard)
PY
}

# expect_fatal NAME WORD...: exit 2, exactly one error message naming every WORD, no output file.
expect_fatal() {
  local name=$1 rc=0
  shift
  "$dilu" run --model "$scratch/$name" --input "$scratch/in.jsonl" --output "$scratch/$name.jsonl" \
    >"$scratch/$name.stdout" 2>"$scratch/$name.stderr" || rc=$?
  [ "$rc" = 2 ] || fail "$name: exit code $rc, expected 2: $(cat "$scratch/$name.stderr")"
  [ "$(grep -c "^dilu: error: " "$scratch/$name.stderr")" = 1 ] || fail "$name: not one error message: $(cat "$scratch/$name.stderr")"
  local word
  for word in "$@"; do
    grep -qF -- "$word" "$scratch/$name.stderr" || fail "$name: '$word' not named: $(cat "$scratch/$name.stderr")"
  done
  if grep -qiE "internal error|AddressSanitizer|runtime error" "$scratch/$name.stderr"; then
    fail "$name: $(cat "$scratch/$name.stderr")"
  fi
  [ ! -e "$scratch/$name.jsonl" ] || fail "$name: an output file was made"
  grep -q "model loaded" "$scratch/$name.stderr" "$scratch/$name.stdout" && fail "$name: the model was reported loaded"
  echo "fault_checkpoint: $name: $(grep "^dilu: error: " "$scratch/$name.stderr" | cut -c1-160)"
}

for how in overlap past_end; do
  cp -r "$scratch/m" "$scratch/$how"
  mapfile -t named < <(damage "$scratch/$how" "$how")
  words=("${named[1]}")  # the shard
  [ "$how" = overlap ] && words+=(overlap) || words+=(outside)
  expect_fatal "$how" "${words[@]}"
done

# config.json promises a layer that no shard holds.
cp -r "$scratch/m" "$scratch/more_layers"
python3 - "$scratch/more_layers/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["num_hidden_layers"] += 1
json.dump(c, open(sys.argv[1], "w"))
PY
layers=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["num_hidden_layers"] - 1)' "$scratch/more_layers/config.json")
expect_fatal more_layers "model.layers.$layers."
echo "fault_checkpoint: ok"
