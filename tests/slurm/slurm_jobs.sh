#!/usr/bin/env bash
# The jobs/ sbatch scripts under a real Slurm: a throwaway slurmctld and two slurmd "nodes" on
# this host (Debian's slurm-wlm with munge, tests/slurm/lib/cluster.sh), the tiny model on the
# CPU backend. Submits the single-node script (2 ranks, srun --mpi=pmix), the multi-node script on
# two nodes (srun --mpi=pmix; where PMIx cannot work here it says why and the mpirun variant runs),
# the mpirun variant, a job stopped by SIGTERM and resubmitted (resume), the batch-size sweep and
# the node-count comparison; waits for each and checks its exit code, that the plan came first,
# that the outputs hold every request once with the tokens of a plain one-process run, and the
# traces and report where this dilu writes them. It never passes without having run the jobs.
#
# Usage: slurm_jobs.sh DILU_BINARY SCRATCH_DIR   (as root: slurmd starts the job steps)
# Exit 77 (skipped) when not root; fails when the Slurm packages are missing (scripts/setup.sh).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 DILU_BINARY SCRATCH_DIR" >&2
  exit 2
fi
dilu=$(realpath "$1")
scratch=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
jobs="$here/../../jobs"
deadline=$((SECONDS + ${SLURM_TEST_TIMEOUT:-600}))

say() { echo "slurm-test: $*"; }
fail() {
  echo "FAIL: $*" >&2
  exit 1
}

if [ "$(id -u)" != 0 ]; then
  say "SKIPPED: needs root (slurmd starts job steps as the submitting user; CI runs as root)"
  exit 77
fi
for c in munged slurmctld slurmd sbatch srun squeue scancel scontrol sinfo mpirun python3; do
  command -v "$c" >/dev/null || fail "'$c' is missing: scripts/setup.sh installs slurm-wlm, munge and Open MPI"
done

rm -rf "$scratch"
mkdir -p "$scratch"
scratch=$(cd "$scratch" && pwd)
# Daemon files under a short path: Unix socket paths (munge, slurmstepd, PMIx) are limited to 107
# bytes, and a build directory can be deep.
cluster=$(mktemp -d /tmp/dilu-slurm.XXXXXX)

# shellcheck source=tests/slurm/lib/cluster.sh
source "$here/lib/cluster.sh"
finish() {
  local rc=$?
  cluster_down >/dev/null 2>&1 || true
  # Keep the daemons' logs with the test's files, drop the rest.
  mkdir -p "$scratch/daemons"
  cp "$cluster"/*.log "$cluster"/*.conf "$scratch/daemons/" 2>/dev/null || true
  rm -rf "$cluster"
  [ "$rc" = 0 ] || say "daemon logs: $scratch/daemons"
  exit "$rc"
}
trap finish EXIT

# --- Inputs and the reference: one plain dilu process, no Slurm -------------------------------
"$dilu" make-model --preset tiny --out "$scratch/model" >/dev/null
python3 - "$scratch" <<'PY'
import json, sys
d = sys.argv[1]
with open(d + "/input.jsonl", "w") as f:
    for i in range(12):
        f.write(json.dumps({"id": f"q{i}", "prompt_token_ids": [1 + 7 * i, 2, 3, 4 + i], "max_tokens": 8, "ignore_eos": True}) + "\n")
with open(d + "/long.jsonl", "w") as f:
    for i in range(300):
        f.write(json.dumps({"id": f"l{i}", "prompt_token_ids": [1 + i % 200, 2, 3], "max_tokens": 48, "ignore_eos": True}) + "\n")
PY
for name in input long; do
  "$dilu" run --model "$scratch/model" --input "$scratch/$name.jsonl" --output "$scratch/$name.ref.jsonl" \
    --set backend=cpu >"$scratch/$name.ref.log" 2>&1 || fail "reference run failed: $(tail -3 "$scratch/$name.ref.log")"
done

# same_tokens OUT REF: every id of REF exactly once in OUT, with the same tokens.
same_tokens() {
  python3 - "$1" "$2" <<'PY'
import json, sys
def load(path):
    recs = [json.loads(l) for l in open(path) if l.strip()]
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), f"{path}: an id appears twice"
    return {r["id"]: r["token_ids"] for r in recs}
got, ref = load(sys.argv[1]), load(sys.argv[2])
assert got.keys() == ref.keys(), f"{sys.argv[1]}: ids differ from the reference: {sorted(set(got) ^ set(ref))[:5]}"
bad = [k for k in ref if got[k] != ref[k]]
assert not bad, f"{sys.argv[1]}: tokens differ from one plain process for {bad[:5]}"
PY
}

# --- The cluster -------------------------------------------------------------------------------
cluster_up "$cluster" 2 || fail "could not start Slurm (logs in $scratch/daemons)"
say "MPI plugins: $(srun --mpi=list 2>&1 | tr '\n\t' '  ' | tr -s ' ')"
export DILU="$dilu"
# CI runs as root, which Open MPI refuses unless told.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
traces=1
# The help text is read whole first: `| grep -q` would stop reading at the match, and under
# pipefail the SIGPIPE dilu then gets fails the check once the text is long enough.
run_help=$("$dilu" run --help)
if [[ $run_help != *--trace-dir* ]]; then
  traces=0
  export TRACE_DIR=""
  say "this dilu has no --trace-dir (issue 8): jobs run with TRACE_DIR= and traces are not checked"
fi
reports=0
report_help=$("$dilu" report --help 2>/dev/null || true)
if grep -q '^Usage: .* report' <<<"$report_help"; then
  reports=1
else
  say "this dilu has no 'report' subcommand (issue 8): reports are not checked"
fi

cd "$scratch"
# submit NAME SBATCH_ARGS... SCRIPT ARGS...: submits the job (log in NAME.log) and sets `job_id`.
submit() {
  local name=$1
  shift
  job_id=$(sbatch --parsable --job-name="$name" --output="$scratch/$name.log" "$@" 2>"$scratch/$name.sbatch") ||
    fail "sbatch refused '$name': $(cat "$scratch/$name.sbatch")"
  job_id=${job_id%%;*}
  echo "$job_id" >"$scratch/$name.id"
}

# wait_job NAME: waits for job `job_id` to end (bounded by the test's deadline); sets `job_rc`,
# the batch script's exit code as Slurm recorded it.
wait_job() {
  local name=$1 info state
  while :; do
    info=$(scontrol show job "$job_id" 2>/dev/null | tr '\n' ' ') || true
    state=$(sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' <<<"$info")
    case "$state" in
      PENDING | CONFIGURING | RUNNING | COMPLETING | "") ;;
      *) break ;;
    esac
    [ "$SECONDS" -lt "$deadline" ] || fail "job '$name' did not finish in time ($state): $(tail -20 "$scratch/$name.log" 2>&1)"
    sleep 0.5
  done
  job_rc=$(sed -n 's/.* ExitCode=\([0-9]*\):\([0-9]*\).*/\1/p' <<<"$info")
  [ "$state" = COMPLETED ] || [ "$state" = FAILED ] ||
    fail "job '$name' ended in state $state (exit $job_rc): $(tail -20 "$scratch/$name.log" 2>&1)"
}

# run_job NAME SBATCH_ARGS... SCRIPT ARGS...: submit and wait.
run_job() {
  submit "$@"
  wait_job "$1"
}

show_log() { sed 's/^/    | /' "$scratch/$1.log" | tail -"${2:-25}"; }

# check_run NAME OUT REF RANKS: a run job that succeeded, printed its plan before launching, and
# wrote the reference's tokens (and, where dilu writes them, a trace per rank and a report).
check_run() {
  local name=$1 out=$2 ref=$3 ranks=$4 log="$scratch/$1.log"
  [ "$job_rc" = 0 ] || fail "job '$name' exited $job_rc:
$(show_log "$name" 40)"
  local plan_line launch_line
  plan_line=$(grep -n -m1 '^chosen: tp ' "$log" | cut -d: -f1)
  launch_line=$(grep -n -m1 'launch: ' "$log" | cut -d: -f1)
  if [ -z "$plan_line" ] || [ -z "$launch_line" ] || [ "$plan_line" -gt "$launch_line" ]; then
    fail "job '$name': the plan is not printed before the launch"
  fi
  grep -q "rank 0/$ranks " "$log" || fail "job '$name': dilu did not see $ranks ranks"
  same_tokens "$out" "$ref" || fail "job '$name': wrong output"
  if [ "$traces" = 1 ]; then
    local dir=${out%.jsonl}.traces r
    for ((r = 0; r < ranks; r++)); do
      [ -s "$dir/$(printf 'rank-%05d.h5' "$r")" ] || fail "job '$name': no trace of rank $r in $dir: $(ls "$dir" 2>&1)"
    done
    if [ "$reports" = 1 ]; then
      # The report read one trace per rank, and their request tables count the output's tokens.
      python3 - "${out%.jsonl}.report/summary.json" "$out" "$ranks" <<'PY' || fail "job '$name': the report disagrees with the output"
import json, sys
d = json.load(open(sys.argv[1]))["dirs"][0]
tokens = sum(len(r["token_ids"]) for r in map(json.loads, open(sys.argv[2])))
assert len(d["files"]) == int(sys.argv[3]), d["files"]
assert d["output_tokens"] == tokens, (d["output_tokens"], tokens)
PY
    fi
  fi
  say "$name: ok ($ranks ranks, $(wc -l <"$out") records equal to one process's, plan printed first)"
}

# pmix_reason NAME: when a step of job NAME could not start because its PMIx server did not,
# the slurmd log lines that say why.
pmix_reason() {
  local id
  id=$(cat "$scratch/$1.id")
  grep -qh "\[$id\.[0-9]*\] error: Failed mpi_g_slurmstepd_prefork" "$cluster"/slurmd-n*.log || return 0
  grep -h "\[$id\.[0-9]*\] error: *mpi/pmix" "$cluster"/slurmd-n*.log | head -3
}

model="$scratch/model"
cpu=(--set backend=cpu)

# 1. One node, two ranks (tp 2) through srun --mpi=pmix.
single_launcher=srun
# Submitted by a relative path, as users type `sbatch jobs/single-node.sbatch`: the job, run from
# a copy in slurmd's spool directory, finds jobs/lib.sh beside the script that was submitted.
run_job single --nodes=1 --ntasks-per-node=2 --gpus-per-node=2 "$(realpath --relative-to=. "$jobs")/single-node.sbatch" \
  "$model" input.jsonl single.jsonl "${cpu[@]}" --set parallel.tp=2
if [ -n "$(pmix_reason single)" ]; then
  [ "$job_rc" != 0 ] || fail "single: the PMIx step failed to start but the job exited 0"
  say "PMIx under srun cannot start a step on this host: $(pmix_reason single | head -1)"
  say "the single-node job runs again with LAUNCHER=mpirun"
  single_launcher=mpirun
  LAUNCHER=mpirun run_job single-mpirun --nodes=1 --ntasks-per-node=2 --gpus-per-node=2 \
    "$jobs/single-node.sbatch" "$model" input.jsonl single-mpirun.jsonl "${cpu[@]}" --set parallel.tp=2
  check_run single-mpirun single-mpirun.jsonl input.ref.jsonl 2
else
  check_run single single.jsonl input.ref.jsonl 2
  grep -q 'launch: srun --mpi=pmix' single.log || fail "single: not launched with srun --mpi=pmix"
  say "srun --mpi=pmix works on one node"
fi

# 2. Two nodes, one rank each (pp 2): srun --mpi=pmix, then the mpirun variant.
multi_launcher=srun
run_job multi --nodes=2 --ntasks-per-node=1 --gpus-per-node=2 "$jobs/multi-node.sbatch" \
  "$model" input.jsonl multi.jsonl "${cpu[@]}" --set parallel.pp=2
if [ -n "$(pmix_reason multi)" ]; then
  [ "$job_rc" != 0 ] || fail "multi: the PMIx step failed to start but the job exited 0"
  multi_launcher=mpirun
  say "PMIx under srun cannot work across the two slurmd of this host (both run their step's PMIx" \
    "server on one machine and collide): $(pmix_reason multi | head -1)"
  say "the multi-node runs below use the mpirun variant (jobs/multi-node-mpirun.sbatch)"
else
  check_run multi multi.jsonl input.ref.jsonl 2
  grep -q "rank 0/2 (node 0/2" multi.log || fail "multi: dilu did not see two nodes"
fi
run_job multi-mpirun --nodes=2 --ntasks-per-node=1 --gpus-per-node=2 "$jobs/multi-node-mpirun.sbatch" \
  "$model" input.jsonl multi-mpirun.jsonl "${cpu[@]}" --set parallel.pp=2
check_run multi-mpirun multi-mpirun.jsonl input.ref.jsonl 2
grep -q 'launch: mpirun ' multi-mpirun.log || fail "multi-mpirun: not launched with mpirun"
grep -q "rank 0/2 (node 0/2" multi-mpirun.log || fail "multi-mpirun: dilu did not see two nodes: $(grep 'rank 0/' multi-mpirun.log)"

# 3. SIGTERM to the batch shell (what `#SBATCH --signal=B:TERM@300` sends before the time limit):
#    forwarded to dilu, which stops after its step with exit 143 and keeps what it wrote; the
#    resubmitted job resumes, and the output then holds every request once, with the tokens of
#    one process. The stopped job serves one request at a time (batch.max_seqs=1: ~a minute of
#    work), the resumed one batches (greedy tokens do not depend on the batch).
for launcher in "$single_launcher" mpirun; do
  name=term-$launcher
  out=$name.jsonl
  args=(--nodes=1 --ntasks-per-node=2 --gpus-per-node=2 "$jobs/single-node.sbatch" "$model" long.jsonl "$out"
    "${cpu[@]}" --set parallel.tp=2)
  LAUNCHER=$launcher submit "$name" "${args[@]}" --set batch.max_seqs=1
  until [ -s "$out" ]; do
    state=$(scontrol show job "$job_id" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
    case "$state" in PENDING | CONFIGURING | RUNNING) ;; *) fail "$name ended ($state) before it could be stopped: $(show_log "$name")" ;; esac
    [ "$SECONDS" -lt "$deadline" ] || fail "$name: no output in time"
    sleep 0.2
  done
  scancel --batch --signal=TERM "$job_id"
  wait_job "$name"
  lines=$(wc -l <"$out")
  [ "$job_rc" = 143 ] || fail "$name: exit code $job_rc after SIGTERM, expected 143: $(show_log "$name")"
  if ! grep -q "received SIGTERM" "$name.log" || ! grep -q "stopped by signal 15" "$name.log"; then
    fail "$name: the stop was not forwarded to dilu: $(show_log "$name")"
  fi
  [ "$lines" -lt 300 ] || fail "$name: the job finished before the stop arrived; nothing was tested"
  python3 -c 'import json, sys; [json.loads(l) for l in open(sys.argv[1])]' "$out" ||
    fail "$name: the stopped job left a torn output"
  say "$name: SIGTERM to the batch shell -> dilu stopped, job exit 143, $lines of 300 records kept"
  LAUNCHER=$launcher run_job "$name-resume" "${args[@]}"
  [ "$job_rc" = 0 ] || fail "$name-resume exited $job_rc: $(show_log "$name-resume")"
  grep -q "[1-9][0-9]* skipped (answered earlier)" "$name-resume.log" || fail "$name-resume did not resume"
  same_tokens "$out" long.ref.jsonl || fail "$name: the resumed output is wrong"
  say "$name-resume: ok (resumed, 300 records equal to one process's)"
done

# 4. Batch-size sweep: dilu bench on each of two ranks (one node, srun or mpirun as above).
if [ "$traces" = 0 ]; then
  say "sweep: skipped (it always writes traces, which this dilu cannot)"
else
  LAUNCHER=$single_launcher BATCH_SIZES=1,4 INPUT_LEN=16 OUTPUT_LEN=8 run_job sweep --nodes=1 --ntasks-per-node=2 \
    --gpus-per-node=2 "$jobs/sweep-batch.sbatch" "$model" sweep "${cpu[@]}"
  [ "$job_rc" = 0 ] || fail "sweep exited $job_rc: $(show_log sweep)"
  for b in 1 4; do
    rows=$(grep -Ec "^ +$b +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+x\$" sweep/bench.txt) || true
    [ "$rows" = 2 ] || fail "sweep: $rows rows for batch $b, expected one per rank: $(cat sweep/bench.txt)"
  done
  for r in 0 1; do [ -s "sweep/traces/rank-0000$r.h5" ] || fail "sweep: no trace of rank $r: $(ls sweep/traces 2>&1)"; done
  if [ "$reports" = 1 ]; then
    grep -q "^bench sweep" sweep/report/summary.txt || fail "sweep: the report has no bench table: $(cat sweep/report/summary.txt)"
  fi
  say "sweep: ok (batch sizes 1 and 4 measured on 2 ranks)"
fi

# 5. Node-count comparison on 1 and 2 nodes of a two-node allocation.
LAUNCHER=$multi_launcher NODE_COUNTS="1 2" run_job compare --nodes=2 --ntasks-per-node=1 --gpus-per-node=2 \
  "$jobs/compare-nodes.sbatch" "$model" input.jsonl compare "${cpu[@]}"
[ "$job_rc" = 0 ] || fail "compare exited $job_rc: $(show_log compare 40)"
for n in 1 2; do
  same_tokens "compare/nodes-$n/output.jsonl" input.ref.jsonl || fail "compare: wrong output on $n node(s)"
  [ -f "compare/nodes-$n/done" ] || fail "compare: $n node(s) not marked done"
  grep -q "rank 0/$n (node 0/$n" "compare/nodes-$n/run.log" || fail "compare: $n node(s) did not run on $n node(s)"
  if [ "$traces" = 1 ]; then [ -s "compare/traces/nodes-$n/rank-00000.h5" ] || fail "compare: no trace for $n node(s)"; fi
done
if [ "$reports" = 1 ]; then
  grep -q "^nodes-2 .* 2 .* 2 " compare/report/summary.txt || fail "compare: no 2-node row in the report's comparison"
fi
say "compare: ok (1 and 2 nodes, same tokens as one process)"

say "PASS: jobs run under Slurm $(sinfo --version | cut -d' ' -f2) in ${SECONDS}s" \
  "(one node: $single_launcher; two nodes: $([ "$multi_launcher" = srun ] && echo 'srun and ')mpirun;" \
  "traces $([ "$traces" = 1 ] && echo checked || echo 'not written by this dilu');" \
  "reports $([ "$reports" = 1 ] && echo checked || echo 'not available'))"
