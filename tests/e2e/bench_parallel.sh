#!/usr/bin/env bash
# `dilu bench` under mpirun with tensor and pipeline parallel (the CPU backend over MPI here; NCCL
# on GPUs, tests/gpu/two_gpu.sh): a 2-rank tp=2 and a 2-rank pp=2 sweep of the tiny model finish,
# print one table (rank 0's) with every batch size, the tp run its all-reduce table, the pp run
# its stages, and both write a trace per rank.
# Usage: bench_parallel.sh DILU_BINARY SCRATCH_DIR
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" "$@"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
mpirun=(mpirun --oversubscribe --bind-to none -np 2)

for layout in tp pp; do
  log="$scratch/$layout.log"
  rm -rf "$scratch/$layout.traces"
  rc=0
  timeout 500 "${mpirun[@]}" "$dilu" bench --model tiny --random-weights --batch-sizes 1,2 --input-len 4 \
    --output-len 3 --set "parallel.$layout=2" --set cpu.threads=1 --trace-dir "$scratch/$layout.traces" \
    </dev/null >"$log" 2>&1 || rc=$?
  [ "$rc" = 0 ] || fail "$layout=2: exit $rc: $(tail -20 "$log")"
  grep -q "tp $([ $layout = tp ] && echo 2 || echo 1) x pp $([ $layout = pp ] && echo 2 || echo 1) x dp 1" "$log" ||
    fail "$layout=2: the layout is not printed: $(head -5 "$log")"
  # One table, from rank 0: each batch size once in the throughput table.
  for b in 1 2; do
    n=$(grep -cE "^ +$b +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+x$" "$log" || true)
    [ "$n" = 1 ] || fail "$layout=2: batch $b has $n rows in the throughput table: $(cat "$log")"
  done
  for r in 00000 00001; do
    [ -s "$scratch/$layout.traces/rank-$r.h5" ] || fail "$layout=2: no trace of rank $r"
  done
done
grep -q "all-reduce ms per layer" "$scratch/tp.log" || fail "tp=2: no all-reduce table: $(cat "$scratch/tp.log")"
grep -q "pipeline stages: \[0, 2) \[2, 4)" "$scratch/pp.log" || fail "pp=2: no stages line: $(cat "$scratch/pp.log")"
echo "bench_parallel: tp=2 and pp=2 bench sweeps passed"
