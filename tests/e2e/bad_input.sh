#!/usr/bin/env bash
# Bad input lines do not stop a run: each gets an error record naming its line, good lines are
# answered, and the exit code is 1. Usage: bad_input.sh DILU_BINARY SCRATCH_DIR
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" "$@"
"$dilu" make-model --preset tiny --out "$scratch/m" >/dev/null
vocab=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["vocab_size"])' "$scratch/m/config.json")

# Line numbers matter: blank lines are skipped but still counted.
cat >"$scratch/in.jsonl" <<EOF
{"id": "good-1", "prompt_token_ids": [1, 2, 3], "max_tokens": 3, "ignore_eos": true}
{"id": "malformed", "prompt_token_ids": [1, 2
{"id": "no-prompt"}

{"id": "empty", "prompt_token_ids": []}
{"id": "oov", "prompt_token_ids": [5, $vocab]}
{"id": "too-long", "prompt_token_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]}
   
{"id": 8, "prompt_token_ids": [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], "max_tokens": 2, "ignore_eos": true}
[1, 2, 3]
{"id": "good-3", "prompt_token_ids": [$((vocab - 1))], "max_tokens": 5, "ignore_eos": true}
EOF

rc=0
"$dilu" run --model "$scratch/m" --input "$scratch/in.jsonl" --output "$scratch/out.jsonl" \
  --set model.max_seq_len=16 >"$scratch/stdout" 2>"$scratch/stderr" || rc=$?
[ "$rc" = 1 ] || fail "exit code $rc, expected 1; stderr: $(cat "$scratch/stderr")"

python3 - "$scratch/in.jsonl" "$scratch/out.jsonl" "$vocab" <<'EOF'
import json, sys

inp = open(sys.argv[1]).read().split("\n")
if inp and inp[-1] == "":
    inp.pop()
out = open(sys.argv[2]).read()
assert out.endswith("\n"), "output does not end with a newline"
out_lines = out[:-1].split("\n")
numbered = [(i + 1, line) for i, line in enumerate(inp) if line.strip()]
assert len(out_lines) == len(numbered), f"{len(out_lines)} output lines for {len(numbered)} non-blank input lines"

# line number -> (id or None, expected max_tokens for good lines, or None for errors)
expect = {1: ("good-1", 3), 2: (None, None), 3: ("no-prompt", None), 5: ("empty", None), 6: ("oov", None),
          7: ("too-long", None), 9: (8, 2), 10: (None, None), 11: ("good-3", 5)}
assert [n for n, _ in numbered] == sorted(expect), [n for n, _ in numbered]
words = {2: "JSON", 3: "prompt_token_ids", 5: "empty", 6: "vocabulary", 7: "max_seq_len", 10: "object"}
# Records come in completion order (error records at once, completions when done): match them to
# input lines by error.line or by id.
by_id = {v[0]: n for n, v in expect.items() if v[1] is not None}
records = {}
for text in out_lines:
    rec = json.loads(text)
    assert isinstance(rec, dict), text
    n = rec["error"]["line"] if "error" in rec else by_id[rec["id"]]
    assert n not in records, f"line {n} answered twice"
    records[n] = (rec, text)
assert sorted(records) == sorted(expect), sorted(records)
for n in sorted(records):
    rec, text = records[n]
    want_id, max_tokens = expect[n]
    assert rec.get("id") == want_id, f"line {n}: id {rec.get('id')!r}, expected {want_id!r}"
    if max_tokens is None:
        err = rec.get("error")
        assert isinstance(err, dict), f"line {n} should be an error record: {text}"
        assert err["line"] == n, f"line {n}: error.line = {err['line']}"
        assert err["message"].startswith(f"line {n}: "), f"line {n}: message {err['message']!r}"
        assert words[n] in err["message"], f"line {n}: {words[n]!r} not in {err['message']!r}"
        assert "token_ids" not in rec, text
    else:
        assert "error" not in rec, f"line {n}: {text}"
        ids = rec["token_ids"]
        assert len(ids) == max_tokens, f"line {n}: {len(ids)} tokens, expected {max_tokens}"
        assert all(isinstance(t, int) and 0 <= t < int(sys.argv[3]) for t in ids), ids
        assert rec["finish_reason"] == "length", text
        assert rec["usage"]["completion_tokens"] == max_tokens, text
print("bad_input: output checked:", len(out_lines), "lines")
EOF

grep -qF "line 6" "$scratch/stderr" || fail "the failed lines are not reported on stderr: $(cat "$scratch/stderr")"
grep -q "6 failed" "$scratch/stdout" || fail "the summary does not count 6 failed lines: $(cat "$scratch/stdout")"
echo "bad_input: ok"
