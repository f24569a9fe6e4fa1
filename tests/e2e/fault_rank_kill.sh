#!/usr/bin/env bash
# SIGKILL of one rank of a 4-rank mpirun job (tp=2 x dp=2), at a random moment while it generates:
# every rank is gone within 60 s, the log tells once which rank died, and the output stays valid:
# the next run resumes it to exactly the records of one uninterrupted rank (greedy tokens are the
# same on every layout). Done twice: once killing rank 0 (a replica root, which writes records),
# once another rank (chosen at random). FAULT_SEED=N replays the choices.
# Usage: fault_rank_kill.sh DILU_BINARY SCRATCH_DIR
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" "$@"
seed=${FAULT_SEED:-$RANDOM}
RANDOM=$seed
echo "fault_rank_kill: FAULT_SEED=$seed"
command -v mpirun >/dev/null || fail "mpirun is not installed"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
model="$here/../golden/data/r1_fp8/model"
python3 - "$scratch/in.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(120):
        f.write(json.dumps({"id": i, "prompt_token_ids": [1 + i % 200, 2, 3, 4 + i % 7], "max_tokens": 64 + i % 17,
                            "ignore_eos": True, "temperature": 0}) + "\n")
PY
"$dilu" run --model "$model" --input "$scratch/in.jsonl" --output "$scratch/ref.jsonl" --set cpu.threads=1 \
  >"$scratch/ref.log" 2>&1 || fail "the one-rank reference failed: $(tail -3 "$scratch/ref.log")"

# Every process of this test carries a marker in its environment: ranks are found (and counted
# after the kill) by it, never by name.
export DILU_FAULT_TEST_MARK="$scratch"
marked_pids() {  # marked_pids [RANK]: pids of dilu processes of this test (of one MPI rank)
  local e pid
  for e in /proc/[0-9]*/environ; do
    pid=${e#/proc/}
    pid=${pid%/environ}
    grep -qzxF "DILU_FAULT_TEST_MARK=$scratch" "$e" 2>/dev/null || continue
    [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$dilu")" ] || continue
    if [ $# -gt 0 ]; then grep -qzxF "OMPI_COMM_WORLD_RANK=$1" "$e" 2>/dev/null || continue; fi
    echo "$pid"
  done
}

kill_one_rank() {  # kill_one_rank RANK NAME
  local rank=$1 name=$2 log="$scratch/$2.log"
  local launcher victim="" try
  for try in 1 2 3; do
    mpirun --oversubscribe --bind-to none -np 4 "$dilu" run --model "$model" --input "$scratch/in.jsonl" \
      --output "$scratch/out.jsonl" --set parallel.tp=2 --set parallel.dp=2 --set cpu.threads=1 --set batch.max_seqs=4 \
      </dev/null >"$log" 2>&1 &
    launcher=$!
    for _ in $(seq 1 3000); do  # until it generates
      grep -q "model loaded" "$log" && break
      kill -0 "$launcher" 2>/dev/null || fail "$name: mpirun ended before loading: $(tail -5 "$log")"
      sleep 0.1
    done
    grep -q "model loaded" "$log" || fail "$name: the model did not load in 300 s"
    for _ in $(seq 1 3000); do  # until a record is on disk, so that the last run has one to resume
      [ -n "$(cat "$scratch"/out.jsonl* 2>/dev/null | head -c 1)" ] && break
      kill -0 "$launcher" 2>/dev/null || break
      sleep 0.1
    done
    sleep "$(python3 -c "import random; random.seed($seed + $rank); print(round(random.uniform(0.1, 1.0) / $try, 2))")"
    victim=$(marked_pids "$rank" | head -1)
    # The rank can end between being found and being killed: then, as when it was not found,
    # the job finished before the kill (a quick machine): start over with an earlier kill.
    if [ -n "$victim" ] && kill -KILL "$victim" 2>/dev/null; then break; fi
    victim=""
    wait "$launcher" || fail "$name: mpirun failed before the kill: $(tail -5 "$log")"
    echo "fault_rank_kill: $name: the job finished before the kill; again, earlier"
    rm -f "$scratch/out.jsonl"
  done
  [ -n "$victim" ] || fail "$name: the job finished before every kill, $try times"
  local killed_at=$SECONDS rc=0
  # All ranks must be gone within 60 s: mpirun ends them, and itself.
  for _ in $(seq 1 600); do
    kill -0 "$launcher" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$launcher" 2>/dev/null; then
    local left
    left=$(marked_pids | tr '\n' ' ')
    kill -KILL "$launcher" $left 2>/dev/null || true
    fail "$name: mpirun still running 60 s after rank $rank was killed (ranks left: $left)"
  fi
  wait "$launcher" || rc=$?
  local took=$((SECONDS - killed_at))
  [ "$rc" != 0 ] || fail "$name: mpirun exited 0 after a rank was killed"
  local left
  left=$(marked_pids)
  [ -z "$left" ] || fail "$name: dilu processes left after mpirun ended: $left"
  # One clear message: mpirun names the rank that died of SIGKILL, once; no rank reports a
  # sanitizer error or an internal error on the way down.
  [ "$(grep -c "rank $rank with PID [0-9]* on node .* exited on signal 9" "$log")" = 1 ] ||
    fail "$name: the log does not say once that rank $rank was killed: $(cat "$log")"
  if grep -qiE "internal error|AddressSanitizer|runtime error|LeakSanitizer" "$log"; then fail "$name: $(cat "$log")"; fi
  python3 - "$scratch/out.jsonl" <<'PY' || fail "$name: the output was damaged"
import json, sys, os
p = sys.argv[1]
if os.path.exists(p):
    for l in open(p):
        json.loads(l)
PY
  echo "fault_rank_kill: $name: rank $rank killed, every rank gone in ${took} s (mpirun exit $rc)"
}

kill_one_rank 0 kill-rank0
kill_one_rank $((1 + RANDOM % 3)) kill-other

# Resume (with the same layout): every id once, the greedy tokens of one rank.
timeout 600 mpirun --oversubscribe --bind-to none -np 4 "$dilu" run --model "$model" --input "$scratch/in.jsonl" \
  --output "$scratch/out.jsonl" --set parallel.tp=2 --set parallel.dp=2 --set cpu.threads=1 </dev/null \
  >"$scratch/resume.log" 2>&1 || fail "the resumed run failed: $(tail -5 "$scratch/resume.log")"
grep -q "resuming" "$scratch/resume.log" || fail "the last run did not resume anything: $(tail -5 "$scratch/resume.log")"
ls "$scratch"/out.jsonl.* >/dev/null 2>&1 && fail "files left beside the output: $(ls "$scratch"/out.jsonl.*)"
python3 "$here/../golden/check_golden.py" "$scratch/out.jsonl" "$scratch/ref.jsonl" >/dev/null ||
  fail "resumed output differs from one rank: $(python3 "$here/../golden/check_golden.py" "$scratch/out.jsonl" "$scratch/ref.jsonl")"
python3 - "$scratch/out.jsonl" <<'PY' || fail "an id is missing or answered twice"
import json, sys
ids = [json.loads(l)["id"] for l in open(sys.argv[1])]
assert sorted(ids) == list(range(120)), (len(ids), len(set(ids)))
PY
echo "fault_rank_kill: ok"
