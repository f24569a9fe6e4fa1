#!/usr/bin/env bash
# A full disk while `dilu run` writes its output: a clear error (exit 4, one "dilu: error:" line
# naming the output file), no corrupt or partial line left behind, and the next run resumes to
# exactly the records of an uninterrupted run. The disk fills through a file size limit (ulimit -f,
# raised step by step so that the run stops several times at different records), through
# /dev/full (ENOSPC), through a small tmpfs when this machine lets the test mount one, and, with
# two data-parallel replicas under mpirun, while part files are merged into the output.
# Usage: fault_disk_full.sh DILU_BINARY SCRATCH_DIR
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" "$@"
# The file size limit applies to Open MPI's runtime too (even one `dilu run` starts it): keep it
# from writing files of its own, PMIx's shared-memory store and shared-memory transport.
export PMIX_MCA_gds=hash OMPI_MCA_btl=self,tcp
"$dilu" make-model --preset tiny --out "$scratch/m" >/dev/null
python3 - "$scratch/in.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(48):
        f.write(json.dumps({"id": f"r{i}", "prompt_token_ids": [1 + i, 2, 3], "max_tokens": 6 + i % 5,
                            "ignore_eos": True, "temperature": 0.5, "seed": i, "logprobs": True, "top_logprobs": 2}) + "\n")
    f.write("{broken\n")
PY
run() {  # run OUTPUT [args...]
  local out=$1
  shift
  "$dilu" run --model "$scratch/m" --input "$scratch/in.jsonl" --output "$out" --set batch.max_seqs=4 "$@"
}
run "$scratch/ref.jsonl" >"$scratch/ref.log" 2>&1 || [ $? = 1 ] || fail "the reference run failed: $(tail -3 "$scratch/ref.log")"
ref_size=$(stat -c %s "$scratch/ref.jsonl")

# check_intact FILE: every line a complete JSON object, the file ends with a newline (or is empty).
check_intact() {
  python3 - "$1" <<'PY' || fail "$1 holds a damaged line"
import json, sys
text = open(sys.argv[1], "rb").read().decode("utf-8")
assert text == "" or text.endswith("\n"), "the file ends inside a line"
for n, line in enumerate(text.splitlines(), 1):
    assert isinstance(json.loads(line), dict), f"line {n}"
PY
}
# check_same OUT: the same records as the reference, each exactly once.
check_same() {
  python3 - "$1" "$scratch/ref.jsonl" <<'PY' || fail "$1 differs from the uninterrupted run"
import json, sys
def load(p):
    recs = [json.loads(l) for l in open(p)]
    keyed = {}
    for r in recs:
        k = (json.dumps(r["id"]), r["error"]["line"] if "error" in r else None)
        assert k not in keyed, f"{p}: {k} twice"
        keyed[k] = r.get("token_ids")
    return keyed
out, ref = load(sys.argv[1]), load(sys.argv[2])
assert out == ref, sorted(set(out) ^ set(ref))[:5]
PY
}
# expect_full LOG RC WORD: exit 4, exactly one error line, naming the output and WORD, no internal error.
expect_full() {
  local log=$1 rc=$2 word=$3
  [ "$rc" = 4 ] || fail "exit code $rc, expected 4: $(tail -5 "$log")"
  [ "$(grep -c "^dilu: error: " "$log")" = 1 ] || fail "not exactly one error message: $(cat "$log")"
  grep "^dilu: error: " "$log" | grep -qF "$word" || fail "'$word' not named: $(grep "error" "$log")"
  grep -q "run the same command again" "$log" || fail "no hint to resume: $(grep "error" "$log")"
  if grep -qiE "internal error|AddressSanitizer|runtime error" "$log"; then fail "$(cat "$log")"; fi
}

# 1. A file size limit, raised by 8 KiB after each failure: several stops, then done.
stops=0
limit_kib=4
for attempt in $(seq 1 40); do
  rc=0
  (ulimit -f "$limit_kib" && run "$scratch/out.jsonl") >"$scratch/limit-$attempt.log" 2>&1 || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 1 ] && break
  expect_full "$scratch/limit-$attempt.log" "$rc" "File too large"
  grep -qF "$scratch/out.jsonl" "$scratch/limit-$attempt.log" || fail "the output file is not named"
  check_intact "$scratch/out.jsonl"
  size=$(stat -c %s "$scratch/out.jsonl")
  [ "$size" -le $((limit_kib * 1024)) ] || fail "the output ($size bytes) is past the limit"
  stops=$((stops + 1))
  limit_kib=$((limit_kib + 8))
done
[ "$stops" -ge 3 ] || fail "only $stops stops at the file size limit (the reference output is $ref_size bytes)"
check_intact "$scratch/out.jsonl"
check_same "$scratch/out.jsonl"
echo "fault_disk_full: file size limit: $stops stops, then resumed to the full output"

# 2. ENOSPC: /dev/full refuses every write.
if [ -w /dev/full ]; then
  rc=0
  run /dev/full >"$scratch/devfull.log" 2>&1 || rc=$?
  expect_full "$scratch/devfull.log" "$rc" "No space left on device"
  echo "fault_disk_full: /dev/full: clear error"
fi

# 3. A small tmpfs, filled up by another file; the run stops, the other file is removed, and the
# next run resumes. Needs the right to mount (root in CI); skipped otherwise.
mnt="$scratch/tmpfs"
mkdir -p "$mnt"
if mount -t tmpfs -o size=256k tmpfs "$mnt" 2>/dev/null; then
  trap 'umount "$mnt" 2>/dev/null || true' EXIT
  head -c $((256 * 1024 - 12288)) /dev/zero >"$mnt/filler" 2>/dev/null || true
  rc=0
  run "$mnt/out.jsonl" >"$scratch/tmpfs.log" 2>&1 || rc=$?
  expect_full "$scratch/tmpfs.log" "$rc" "No space left on device"
  check_intact "$mnt/out.jsonl"
  [ -s "$mnt/out.jsonl" ] || fail "tmpfs: nothing was written before the disk filled up"
  rm "$mnt/filler"
  run "$mnt/out.jsonl" >"$scratch/tmpfs2.log" 2>&1 || [ $? = 1 ] || fail "tmpfs: the resumed run failed: $(tail -3 "$scratch/tmpfs2.log")"
  check_same "$mnt/out.jsonl"
  umount "$mnt"
  trap - EXIT
  echo "fault_disk_full: tmpfs: clear error, resumed"
else
  echo "fault_disk_full: tmpfs: not permitted to mount here; skipped (the file size limit covers the same path)"
fi

# 4. Two replicas under mpirun: each writes a part file, rank 0 merges them at the end; the limit
# lets the parts be written but not the merged output. Exit 4, then the next run (no limit)
# merges what is left without losing or doubling a record.
if command -v mpirun >/dev/null; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
  mpirun=(mpirun --oversubscribe --bind-to none -np 2)
  limit_kib=$(((ref_size * 3 / 4) / 1024))
  rc=0
  (ulimit -f "$limit_kib" && timeout 300 "${mpirun[@]}" "$dilu" run --model "$scratch/m" --input "$scratch/in.jsonl" \
    --output "$scratch/dp.jsonl" --set batch.max_seqs=4 --set parallel.dp=2 --set cpu.threads=1 </dev/null) \
    >"$scratch/dp.log" 2>&1 || rc=$?
  [ "$rc" = 4 ] || fail "dp=2: exit code $rc, expected 4: $(tail -20 "$scratch/dp.log")"
  [ "$(grep -c "error: cannot append" "$scratch/dp.log")" = 1 ] || fail "dp=2: not one clear message: $(cat "$scratch/dp.log")"
  check_intact "$scratch/dp.jsonl"
  ls "$scratch"/dp.jsonl.dp-*.part >/dev/null 2>&1 || fail "dp=2: no part file was kept"
  timeout 300 "${mpirun[@]}" "$dilu" run --model "$scratch/m" --input "$scratch/in.jsonl" --output "$scratch/dp.jsonl" \
    --set batch.max_seqs=4 --set parallel.dp=2 --set cpu.threads=1 </dev/null >"$scratch/dp2.log" 2>&1 || [ $? = 1 ] ||
    fail "dp=2: the resumed run failed: $(tail -20 "$scratch/dp2.log")"
  check_same "$scratch/dp.jsonl"
  ls "$scratch"/dp.jsonl.* >/dev/null 2>&1 && fail "dp=2: files left beside the output: $(ls "$scratch"/dp.jsonl.*)"
  echo "fault_disk_full: dp=2 merge: clear error, resumed without a lost or doubled record"
fi
echo "fault_disk_full: ok"
