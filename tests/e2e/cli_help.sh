#!/usr/bin/env bash
# The command line: every --help exits 0 and lists its flags; unknown subcommands and flags are
# usage errors (exit 2). Usage: cli_help.sh DILU_BINARY SCRATCH_DIR
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" "$@"
# expect_exit CODE COMMAND...: runs COMMAND with stdout/stderr in $scratch/out and $scratch/err.
expect_exit() {
  local want=$1
  shift
  local got=0
  "$@" >"$scratch/out" 2>"$scratch/err" || got=$?
  [ "$got" = "$want" ] || fail "'$*' exited $got, expected $want; stderr: $(cat "$scratch/err")"
}

# mentions WORD...: each word appears in the last command's stdout.
mentions() {
  local w
  for w in "$@"; do
    grep -qF -- "$w" "$scratch/out" || fail "'$w' is not in the help text: $(cat "$scratch/out")"
  done
}

expect_exit 0 "$dilu" --help
mentions run make-model --help --version "Exit codes"

expect_exit 0 "$dilu" --version
[ -s "$scratch/out" ] || fail "--version printed nothing"

expect_exit 0 "$dilu" run --help
mentions --model --input --output --config --set
# Every run-configuration key is listed with its default.
mentions backend parallel.tp parallel.pp parallel.dp parallel.ep batch.max_seqs batch.max_tokens kv.block_size \
  kv.memory_fraction kv.num_blocks model.max_seq_len sampling.temperature sampling.max_tokens output.token_ids \
  cpu.threads

expect_exit 0 "$dilu" make-model --help
mentions --preset --out --dtype --seed --layers --force tiny tiny-nolora r1-geometry

# Usage errors: exit 2 with a message on stderr.
expect_exit 2 "$dilu"
expect_exit 2 "$dilu" no-such-subcommand
[ -s "$scratch/err" ] || fail "no message for an unknown subcommand"
expect_exit 2 "$dilu" --no-such-flag
expect_exit 2 "$dilu" run --no-such-flag
[ -s "$scratch/err" ] || fail "no message for an unknown flag"
expect_exit 2 "$dilu" run --model "$scratch/m" --input "$scratch/in" --output "$scratch/out.jsonl" --no-such-flag
expect_exit 2 "$dilu" run --model "$scratch/m" --input "$scratch/in"  # --output missing
grep -qF -- "--output" "$scratch/err" || fail "the missing flag is not named: $(cat "$scratch/err")"
# --set is repeatable: two overrides are not a usage error (the run then fails on the missing
# model directory, a user error of exit 2 that names it).
expect_exit 2 "$dilu" run --model "$scratch/no-model" --input "$scratch/in" --output "$scratch/out.jsonl" \
  --set kv.block_size=32 --set cpu.threads=1
grep -qF "$scratch/no-model" "$scratch/err" || fail "two --set flags were refused: $(cat "$scratch/err")"
expect_exit 2 "$dilu" make-model --preset tiny --out "$scratch/m" --no-such-flag
expect_exit 2 "$dilu" make-model --preset tiny --out "$scratch/m" --dtype fp16
expect_exit 2 "$dilu" make-model --preset no-such-preset --out "$scratch/m"
grep -qF "no-such-preset" "$scratch/err" || fail "the unknown preset is not named: $(cat "$scratch/err")"
[ ! -e "$scratch/m/config.json" ] || fail "a failed make-model left a config.json"

echo "cli_help: ok"
