# shellcheck shell=bash
# Shared by the sbatch scripts in jobs/ (sourced, never run by itself). It reads the allocation
# from standard Slurm variables only (SLURM_JOB_ID, SLURM_JOB_NUM_NODES, SLURM_NTASKS,
# SLURM_JOB_NODELIST); dilu itself reads its place from MPI, never from Slurm.
#
# Environment (all optional):
#   DILU          the dilu executable (default: dilu on PATH, else this checkout's build/apps/dilu)
#   LAUNCHER      srun (default: srun --mpi=pmix) or mpirun (Open MPI's mpirun inside the allocation)
#   SRUN_ARGS     extra srun arguments (word-split), e.g. "--cpu-bind=none"
#   MPIRUN_ARGS   extra mpirun arguments (word-split), e.g. "--mca btl_tcp_if_include ib0"
#   DILU_GPU      GPU type for the printed plan (dilu plan --help lists them); default: detected with
#                 nvidia-smi; the CPU backend plans each rank's share of the host's free memory
#   TRACE_DIR     per-rank traces of a run (dilu --trace-dir; default OUTPUT without .jsonl + .traces;
#                 the sweep and comparison keep theirs under OUTDIR); set empty, a run or comparison
#                 writes no traces and no report (the sweep always does)
#   REPORT_DIR    where `dilu report` writes a run's tables and plots (default OUTPUT without .jsonl + .report)
#
# A stop request (SIGTERM: Slurm's warning before the time limit, sent by `#SBATCH --signal=B:TERM@N`
# or `scancel --batch --signal=TERM`; SIGINT) is forwarded to the running dilu, which finishes its
# current step and exits 143 (130) with every finished record on disk; submitting the same command
# again resumes. The job then stops and exits with dilu's code.

set -euo pipefail

dilu_say() { echo "[dilu-job $(date +%H:%M:%S)] $*"; }
dilu_die() {
  echo "[dilu-job] error: $*" >&2
  exit 2
}

# --- The dilu executable and the allocation -------------------------------------------------

# dilu_setup JOBS_DIR: sets `dilu`, `nodes`, `tasks_per_node`, `launcher`.
dilu_setup() {
  local jobs_dir=$1
  [ -n "${SLURM_JOB_ID:-}" ] || dilu_die "not inside a Slurm job: submit this script with sbatch"
  if [ -n "${DILU:-}" ]; then
    dilu=$DILU
  elif command -v dilu >/dev/null; then
    dilu=$(command -v dilu)
  else
    dilu="$jobs_dir/../build/apps/dilu"
  fi
  [ -x "$dilu" ] || dilu_die "no dilu executable at '$dilu' (set DILU, or put dilu on PATH)"
  nodes=${SLURM_JOB_NUM_NODES:-1}
  local ntasks=${SLURM_NTASKS:-$nodes}
  [ $((ntasks % nodes)) -eq 0 ] ||
    dilu_die "$ntasks tasks over $nodes nodes: give every node the same number of tasks (--ntasks-per-node)"
  tasks_per_node=$((ntasks / nodes))
  launcher=${LAUNCHER:-srun}
  case "$launcher" in
    srun | mpirun) ;;
    *) dilu_die "LAUNCHER='$launcher': use srun or mpirun" ;;
  esac
  dilu_say "job $SLURM_JOB_ID: $nodes node(s) ($SLURM_JOB_NODELIST) x $tasks_per_node rank(s), one rank per GPU;" \
    "launcher $launcher; $("$dilu" --version)"
}

# --- Arguments ---------------------------------------------------------------------------------

# dilu_split_args ARGS...: the extra arguments given after the script's positional ones.
# `extra` keeps all of them (for dilu run/bench); `plan_args` keeps the --config/--set ones that
# shape the plan. Sets `cpu_backend` when --set backend=cpu is among them.
dilu_split_args() {
  extra=("$@")
  plan_args=()
  cpu_backend=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --config | --set)
        [ $# -ge 2 ] || dilu_die "$1 needs a value"
        plan_args+=("$1" "$2")
        [ "$2" = backend=cpu ] && cpu_backend=1
        shift 2
        ;;
      --config=* | --set=*)
        plan_args+=("$1")
        [ "$1" = --set=backend=cpu ] && cpu_backend=1
        shift
        ;;
      *) shift ;;
    esac
  done
}

# --- The plan ----------------------------------------------------------------------------------

# The device the plan is made for: DILU_GPU, else the GPU nvidia-smi names, else (the CPU
# backend) each rank's share of this host's free memory. Sets `plan_device`.
dilu_plan_device() {
  local name mem_mib avail_kib
  if [ -n "${DILU_GPU:-}" ]; then
    plan_device=(--gpu "$DILU_GPU")
    return
  fi
  if [ "$cpu_backend" = 0 ] && command -v nvidia-smi >/dev/null &&
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sed -n 1p) && [ -n "$name" ]; then
    mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | sed -n 1p)
    case "$name" in
      *H200*) plan_device=(--gpu H200-141GB) ;;
      *H800*) plan_device=(--gpu H800-80GB) ;;
      *H100*) plan_device=(--gpu H100-80GB) ;;
      *H20*) plan_device=(--gpu H20-96GB) ;;
      *A800*) plan_device=(--gpu A800-40GB) ;;
      *A100*) if [ "${mem_mib%%.*}" -gt 50000 ] 2>/dev/null; then plan_device=(--gpu A100-80GB); else plan_device=(--gpu A100-40GB); fi ;;
      *) dilu_die "no planner type for GPU '$name': set DILU_GPU to one of the types in 'dilu plan --help'" ;;
    esac
    return
  fi
  avail_kib=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
  plan_device=(--gpu-memory "$((avail_kib / 1024 / tasks_per_node))MiB")
  dilu_say "no GPU (CPU backend): the plan below counts each rank's share of this host's free memory;" \
    "its GPU figures (bandwidths, tok/s) do not apply"
}

# dilu_plan MODEL NODES [GPUS_PER_NODE [--set ...]]: prints the plan for NODES nodes x
# GPUS_PER_NODE (default tasks_per_node) ranks and sets `layout` to the --set arguments that make
# dilu run exactly that layout. Returns 2 when the model does not fit (the planner's refusal is
# printed), 0 otherwise.
dilu_plan() {
  local model=$1 n=$2 gpn=${3:-$tasks_per_node} rc=0 json
  shift $(($# < 3 ? $# : 3))
  local args=(plan --model "$model" --nodes "$n" --gpus-per-node "$gpn" "${plan_device[@]}" "${plan_args[@]}" "$@")
  dilu_say "plan: dilu ${args[*]}"
  "$dilu" "${args[@]}" || rc=$?
  [ "$rc" = 0 ] || return "$rc"
  json=$("$dilu" "${args[@]}" --json)
  mapfile -t layout < <(python3 -c '
import json, sys
p = json.load(sys.stdin)["plan"]
for key in ("tp", "pp", "dp"):
    print("--set"); print("parallel.%s=%d" % (key, p[key]))
if p["pp"] > 1:
    print("--set"); print("parallel.layer_split=" + p["layer_split"])
' <<<"$json") || dilu_die "could not read the plan (dilu plan --json; python3 is needed)"
  dilu_say "resolved layout: ${layout[*]}"
}

# --- Launching, with stop requests forwarded ---------------------------------------------------

dilu_stop_signal=""
dilu_child=""
dilu_child_is_srun=0

# Where the signal goes: srun would take SIGTERM as "kill the step now" (SIGKILL to the ranks),
# so a job step hears it through `scancel --signal` (every step of this job, not the batch
# shell); mpirun passes SIGTERM/SIGINT on to its ranks (and SIGKILLs them a second later); a
# local dilu gets it directly.
dilu_on_signal() {
  dilu_stop_signal=$1
  dilu_say "received SIG$1: asking dilu to stop after its current step (finished records stay; resubmit to resume)"
  [ -n "$dilu_child" ] || return 0
  if [ "$dilu_child_is_srun" = 1 ]; then
    scancel --signal="$1" "$SLURM_JOB_ID" || kill -s "$1" "$dilu_child" 2>/dev/null || true
  else
    kill -s "$1" "$dilu_child" 2>/dev/null || true
  fi
}
trap 'dilu_on_signal TERM' TERM
trap 'dilu_on_signal INT' INT

dilu_signal_code() { if [ "${dilu_stop_signal:-TERM}" = INT ]; then echo 130; else echo 143; fi; }

# dilu_forward CMD...: runs CMD in the background and waits for it, forwarding SIGTERM/SIGINT;
# returns its exit code. (bash runs a trap only between commands, so a foreground child would
# not hear the signal before the time limit's SIGKILL.) After a stop request nothing new starts.
dilu_forward() {
  local rc=0
  [ -z "$dilu_stop_signal" ] || return "$(dilu_signal_code)"
  "$@" </dev/null &
  dilu_child=$!
  while :; do
    rc=0
    wait "$dilu_child" || rc=$?
    # wait returns early (128 + signal) when a trap ran; the child may still be finishing.
    kill -0 "$dilu_child" 2>/dev/null || break
  done
  dilu_child=""
  dilu_child_is_srun=0
  # mpirun exits 1 when it passed a signal on, whatever its ranks said: report the stop.
  if [ -n "$dilu_stop_signal" ] && [ "$rc" != 0 ]; then rc=$(dilu_signal_code); fi
  return "$rc"
}

# dilu_launch NODES CMD...: CMD on NODES nodes (the first NODES of the allocation), one rank per
# task, through srun --mpi=pmix or mpirun; stop requests forwarded. Returns CMD's exit code.
dilu_launch() {
  local n=$1
  shift
  local np=$((n * tasks_per_node)) extra_launcher=() cmd=()
  if [ "$launcher" = srun ]; then
    read -r -a extra_launcher <<<"${SRUN_ARGS:-}"
    # Each rank gets an equal share of the node's CPUs (srun does not inherit sbatch's
    # --cpus-per-task; one CPU per rank would starve dilu's host threads).
    local cpus=${SLURM_CPUS_PER_TASK:-$((${SLURM_CPUS_ON_NODE:-$tasks_per_node} / tasks_per_node))}
    cmd=(srun --mpi=pmix --nodes="$n" --ntasks="$np" --ntasks-per-node="$tasks_per_node"
      --cpus-per-task="$((cpus > 0 ? cpus : 1))" --kill-on-bad-exit=1 "${extra_launcher[@]}" "$@")
  else
    local hosts
    hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n "$n" | sed "s/\$/:$tasks_per_node/" | paste -sd, -)
    read -r -a extra_launcher <<<"${MPIRUN_ARGS:-}"
    cmd=(mpirun -np "$np" --host "$hosts" --map-by "ppr:$tasks_per_node:node" --bind-to none
      "${extra_launcher[@]}" "$@")
  fi
  dilu_say "launch: ${cmd[*]}"
  [ "$launcher" != srun ] || dilu_child_is_srun=1
  dilu_forward "${cmd[@]}"
}

# Whether this dilu has the `report` subcommand (an unknown one prints the top-level help).
dilu_has_report() {
  local help
  help=$("$dilu" report --help 2>/dev/null) || return 1
  grep -q '^Usage: .* report' <<<"$help"
}

# dilu_check_ran RC -e|-s FILE: srun can exit 0 when a step failed to launch (seen with a PMIx
# plugin that could not start): "success" without the file dilu always writes (-e: exists, -s:
# not empty) is a failed launch.
dilu_check_ran() {
  [ "$1" = 0 ] || return 0
  case "$2" in
    -e) [ ! -e "$3" ] || return 0 ;;
    *) [ ! -s "$3" ] || return 0 ;;
  esac
  dilu_say "the launcher exited 0 but '$3' was not written: the ranks did not run (see the launcher's messages above)"
  return 1
}

# Traces are on unless TRACE_DIR is set and empty.
dilu_traces_on() { [ -n "${TRACE_DIR-on}" ]; }

# dilu_report OUT TRACE_DIR...: tables and plots from traces; a missing `dilu report` is noted,
# not fatal (the outputs are the job's results).
dilu_report() {
  local out=$1 rc=0
  shift
  if ! dilu_has_report; then
    dilu_say "this dilu has no 'report' subcommand: traces are in $*"
    return 0
  fi
  dilu_say "report: dilu report $* --out $out"
  dilu_forward "$dilu" report "$@" --out "$out" || rc=$?
  [ "$rc" = 0 ] || dilu_say "dilu report failed (exit $rc); the traces are in $*"
  return 0
}

# dilu_finish RC: the job's last words and exit code.
dilu_finish() {
  local rc=$1
  case "$rc" in
    0) dilu_say "done" ;;
    1) dilu_say "done; some input lines failed: their error records are in the output" ;;
    130 | 143)
      if [ -n "$dilu_stop_signal" ]; then
        dilu_say "stopped by SIG$dilu_stop_signal (exit $rc): submit the same command again to resume"
      else
        dilu_say "failed (exit $rc: a rank was ended by a signal it did not get from this job; see above);" \
          "finished records are kept: submit the same command again to resume"
      fi
      ;;
    *) dilu_say "failed (exit $rc)" ;;
  esac
  exit "$rc"
}

# --- The whole job of single-node.sbatch, multi-node.sbatch and multi-node-mpirun.sbatch ---------

dilu_run_usage="usage: sbatch [options] SCRIPT MODEL_DIR INPUT.jsonl OUTPUT.jsonl [dilu run arguments...]
       (or MODEL_DIR, INPUT, OUTPUT in the environment)"

# dilu_run_job JOBS_DIR ARGS...: plan, dilu run on every task of the allocation, report.
dilu_run_job() {
  local jobs_dir=$1
  shift
  local model=${1:-${MODEL_DIR:-}} input=${2:-${INPUT:-}} output=${3:-${OUTPUT:-}}
  if [ -z "$model" ] || [ -z "$input" ] || [ -z "$output" ]; then dilu_die "$dilu_run_usage"; fi
  shift $(($# < 3 ? $# : 3))
  dilu_setup "$jobs_dir"
  dilu_split_args "$@"
  dilu_plan_device
  local rc=0
  dilu_plan "$model" "$nodes" || dilu_finish $?
  local trace_dir=${TRACE_DIR-${output%.jsonl}.traces} trace=()
  [ -z "$trace_dir" ] || trace=(--trace-dir "$trace_dir")
  dilu_launch "$nodes" "$dilu" run --model "$model" --input "$input" --output "$output" "${trace[@]}" \
    "${layout[@]}" "${extra[@]}" || rc=$?
  dilu_check_ran "$rc" -e "$output" || rc=3
  if [ "$rc" -le 1 ] && [ -n "$trace_dir" ]; then dilu_report "${REPORT_DIR:-${output%.jsonl}.report}" "$trace_dir"; fi
  dilu_finish "$rc"
}
