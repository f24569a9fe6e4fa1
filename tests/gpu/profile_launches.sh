#!/usr/bin/env bash
# Every kernel launch of one R1-geometry decode step under Nsight Compute: its grid, time, DRAM
# bytes read and the rate they make. The bench runs BATCH prompts of 64 tokens and 3 output
# tokens without warm-up; the listed step is the last one (from its embedding to its sampling).
# Usage: tests/gpu/profile_launches.sh DILU OUT BATCH [LAYERS]
set -uo pipefail
dilu=$1; out=$2; batch=$3; layers=${4:-4}
mkdir -p "$out"
ncu --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__grid_size --csv \
  --kernel-name 'regex:^(?!.*(random_fill|fill_u32)).*' \
  "$dilu" bench --model r1-geometry --random-weights --layers "$layers" --batch-sizes "$batch" --input-len 64 \
  --output-len 3 --no-warmup --set backend=cuda > "$out/launches-b$batch.csv" 2> "$out/launches-b$batch.err"
python3 - "$out/launches-b$batch.csv" <<'PY'
import csv, sys, collections
rows = list(csv.reader(l for l in open(sys.argv[1]) if l.startswith('"')))
head, rows = rows[0], rows[1:]
ii, ki, mi, vi, ui = (head.index(k) for k in ("ID", "Kernel Name", "Metric Name", "Metric Value", "Metric Unit"))
launches = collections.OrderedDict()
for r in rows:
    d = launches.setdefault(int(r[ii]), {"name": r[ki].split("(")[0][:60]})
    v = float(r[vi].replace(",", ""))
    u = r[ui]
    if r[mi] == "gpu__time_duration.sum":
        v *= {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}.get(u, 1.0)
    elif r[mi] == "dram__bytes_read.sum":
        v *= {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(u, 1.0)
    d[r[mi]] = v
ids = list(launches)
starts = [i for i in ids if "embedding_kernel" in launches[i]["name"]]
step = [i for i in ids if i >= starts[-1]]
print(f"{'#':>4s} {'kernel':60s} {'grid':>7s} {'us':>8s} {'MB read':>9s} {'GB/s':>7s}")
tot_us = tot_b = 0.0
for n, i in enumerate(step):
    d = launches[i]
    us, b = d.get("gpu__time_duration.sum", 0.0), d.get("dram__bytes_read.sum", 0.0)
    tot_us += us; tot_b += b
    print(f"{n:4d} {d['name']:60s} {int(d.get('launch__grid_size', 0)):7d} {us:8.1f} {b / 1e6:9.2f} {b / us / 1e3 if us else 0:7.0f}")
print(f"step: {len(step)} launches, {tot_us:.1f} us, {tot_b / 1e6:.1f} MB read, {tot_b / tot_us / 1e3:.0f} GB/s")
PY
