# shellcheck shell=bash
# A throwaway Slurm cluster on this host, from the Debian packages (slurmctld, slurmd, munge):
# one munged, one slurmctld and NODES slurmd daemons ("nodes" n1..nN, all on 127.0.0.1, each on
# its own port), every file under one directory, on free TCP ports, so that it disturbs no other
# Slurm or munge on the machine. Needs root (slurmd starts the job steps as the submitting user).
#
#   source tests/slurm/lib/cluster.sh
#   cluster_up DIR NODES      # exports SLURM_CONF; returns when every node is idle
#   ...sbatch / srun / squeue...
#   cluster_down              # cancels the jobs, stops the daemons this shell started (by pid)
#
# Only the processes started here are ever signalled, by their process ids.

cluster_dir=""
cluster_pids=()

cluster_log() { echo "slurm: $*"; }

# A TCP port nobody listens on now.
cluster_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# cluster_wait SECONDS CMD...: run CMD every second until it succeeds; 1 if it never did.
cluster_wait() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 1
  done
}

cluster_nodes_idle() {
  local states
  states=$(sinfo --noheader --format='%t' --partition=ci 2>/dev/null) || return 1
  [ -n "$states" ] && ! grep -qv '^idle$' <<<"$states"
}

cluster_up() {
  cluster_dir=$1
  local nodes=${2:-1}
  local host cpus mem ctl_port i port
  host=$(hostname -s)
  cpus=$(nproc --all)
  # Each node offers the host's CPUs; memory is left small so slurmd's own check always passes.
  mem=1024
  mkdir -p "$cluster_dir/state" "$cluster_dir/munge"
  chmod 711 "$cluster_dir/munge"

  # munge: a fresh key, a private socket.
  dd if=/dev/urandom of="$cluster_dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$cluster_dir/munge/munge.key"
  munged --foreground --force --key-file="$cluster_dir/munge/munge.key" \
    --socket="$cluster_dir/munge/munge.socket" --pid-file="$cluster_dir/munge/munged.pid" \
    --seed-file="$cluster_dir/munge/munged.seed" --log-file="$cluster_dir/munged.log" \
    >"$cluster_dir/munged.out" 2>&1 &
  cluster_pids+=($!)
  cluster_wait 20 test -S "$cluster_dir/munge/munge.socket" ||
    { cluster_log "munged did not start: $(tail -5 "$cluster_dir/munged.log" 2>/dev/null)"; return 1; }

  ctl_port=$(cluster_free_port)
  cat >"$cluster_dir/slurm.conf" <<EOF
ClusterName=dilu-ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctl_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$cluster_dir/munge/munge.socket
StateSaveLocation=$cluster_dir/state
SlurmdSpoolDir=$cluster_dir/spool-%n
SlurmctldPidFile=$cluster_dir/slurmctld.pid
SlurmdPidFile=$cluster_dir/slurmd-%n.pid
SlurmctldLogFile=$cluster_dir/slurmctld.log
SlurmdLogFile=$cluster_dir/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
KillWait=10
InactiveLimit=0
MinJobAge=600
MailProg=/bin/true
GresTypes=gpu
EOF
  # Each node announces 2 "GPUs" (a count, no device files), so that scripts asking for
  # --gpus-per-node are accepted as on a GPU cluster; dilu runs on the CPU backend here.
  printf "Name=gpu File=/dev/zero\nName=gpu File=/dev/full\n" >"$cluster_dir/gres.conf"
  for ((i = 1; i <= nodes; i++)); do
    port=$(cluster_free_port)
    echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$port CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN" \
      >>"$cluster_dir/slurm.conf"
  done
  echo "PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >>"$cluster_dir/slurm.conf"
  export SLURM_CONF="$cluster_dir/slurm.conf"
  # PMIx client directories under this cluster's folder, not /tmp/spmix_appdir_<uid>_<job>.<step>,
  # which a job id of an earlier throwaway cluster could already hold.
  mkdir -p "$cluster_dir/pmix"
  echo "PMIxCliTmpDirBase=$cluster_dir/pmix" >"$cluster_dir/mpi.conf"

  slurmctld -D -i -f "$SLURM_CONF" >"$cluster_dir/slurmctld.out" 2>&1 &
  cluster_pids+=($!)
  cluster_wait 30 scontrol ping ||
    { cluster_log "slurmctld did not answer: $(tail -5 "$cluster_dir/slurmctld.log" "$cluster_dir/slurmctld.out" 2>/dev/null)"; return 1; }
  for ((i = 1; i <= nodes; i++)); do
    mkdir -p "$cluster_dir/spool-n$i"
    slurmd -D -N "n$i" -f "$SLURM_CONF" >"$cluster_dir/slurmd-n$i.out" 2>&1 &
    cluster_pids+=($!)
  done
  cluster_wait 60 cluster_nodes_idle || {
    cluster_log "the nodes did not become idle: $(sinfo 2>&1; tail -5 "$cluster_dir"/slurmd-n*.log "$cluster_dir"/slurmd-n*.out 2>/dev/null)"
    return 1
  }
  cluster_log "up: $nodes node(s) of $cpus CPUs, $(sinfo --version), config $SLURM_CONF"
}

cluster_down() {
  [ -n "$cluster_dir" ] || return 0
  if [ -n "${SLURM_CONF:-}" ] && [ "${#cluster_pids[@]}" -gt 1 ]; then
    scancel --partition=ci >/dev/null 2>&1 || true
    cluster_wait 30 test -z "$(squeue --noheader --partition=ci 2>/dev/null)" || cluster_log "jobs still listed at shutdown"
  fi
  local i pid
  # Reverse order: the slurmd daemons, slurmctld, munged last.
  for ((i = ${#cluster_pids[@]} - 1; i >= 0; i--)); do
    pid=${cluster_pids[i]}
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  cluster_pids=()
  cluster_dir=""
}
