#!/usr/bin/env bash
# Traces: one rank and 2-rank mpirun runs (pp=2, dp=2) write every rank's file with exactly the
# fields docs/traces.md documents and counts that agree with the output (each request row's tokens
# are its output record's usage); timeline.json merges the ranks with paired pipeline transfers;
# rank 0 prints the summary; dilu report prints its tables and writes the plots (timelines, the
# 1-vs-2-rank comparison, a bench sweep), and still prints its tables with no plotting library.
# Usage: traces.sh DILU_BINARY SCRATCH_DIR
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh" "$@"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
mpirun=(mpirun --oversubscribe --bind-to none)
model="$here/../golden/data/r1_fp8/model"
docs="$here/../../docs/traces.md"

# The files are read with h5py, independently of dilu's reader (scripts/setup.sh installs it).
py=""
for cand in ${DILU_PYTHON:-} python3 /usr/bin/python3; do
  if "$cand" -c 'import h5py' >/dev/null 2>&1; then
    py=$cand
    break
  fi
done
[ -n "$py" ] || fail "no python3 with h5py (scripts/setup.sh installs python3-h5py)"
plots=0
"$py" -c 'import matplotlib' >/dev/null 2>&1 && plots=1

# Requests of different lengths, two with n = 2, one bad line (an error record, not a request row).
python3 - "$scratch/in.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(10):
        r = {"id": f"r{i}", "prompt_token_ids": [1 + (7 * i + k) % 200 for k in range(3 + 2 * i)],
             "max_tokens": 4 + 3 * i, "ignore_eos": True}
        if i in (3, 6):
            r.update(n=2, temperature=0.8, seed=i)
        f.write(json.dumps(r) + "\n")
    f.write(json.dumps({"id": 77, "prompt_token_ids": [5, 6], "max_tokens": 5, "ignore_eos": True}) + "\n")
    f.write('{"id": "bad", "prompt_token_ids": [1, 2], "max_tokens": -3}\n')
PY

run() {  # run NAME NP [--set ...]: a traced run into $scratch/NAME
  local name=$1 np=$2
  shift 2
  local cmd=("$dilu" run --model "$model" --input "$scratch/in.jsonl" --output "$scratch/$name.jsonl"
    --set cpu.threads=1 --set batch.max_seqs=4 --trace-dir "$scratch/$name" "$@")
  [ "$np" = 1 ] || cmd=("${mpirun[@]}" -np "$np" "${cmd[@]}")
  local rc=0
  timeout 300 "${cmd[@]}" </dev/null >"$scratch/$name.log" 2>&1 || rc=$?
  [ "$rc" = 1 ] || fail "$name: exit $rc (1 expected: one bad line): $(tail -5 "$scratch/$name.log")"
  # Ranks share the log, so another rank's line may precede rank 0's on the same line: match
  # anywhere in a line, and count matches, not lines.
  grep -q "dilu: slowest rank " "$scratch/$name.log" || fail "$name: no slowest-rank summary: $(cat "$scratch/$name.log")"
  [ "$(grep -o "dilu: done: 11 requests, 1 failed" "$scratch/$name.log" | wc -l)" = 1 ] ||
    fail "$name: rank 0's summary is not printed once: $(cat "$scratch/$name.log")"
}
run np1 1
run pp2 2 --set parallel.pp=2
run dp2 2 --set parallel.dp=2

"$py" - "$docs" "$scratch" <<'PY' || fail "trace files do not match docs/traces.md or the output"
import json, re, sys
import h5py

docs, scratch = sys.argv[1], sys.argv[2]
# The documented schema: the first column of each table under "### `/name`" / "### Attributes".
fields, section = {}, None
for line in open(docs):
    m = re.match(r"### (?:`(/\w+)`|Attributes)", line)
    if m:
        section = m.group(1) or "attrs"
        fields[section] = set()
    elif line.startswith("## "):
        section = None
    elif section and line.startswith("| `"):
        fields[section] |= set(re.findall(r"`(\w+)`", line.split("|")[1]))
assert set(fields) == {"attrs", "/steps", "/requests", "/events", "/bench"}, fields.keys()

for name, ranks, tp, pp, dp in (("np1", 1, 1, 1, 1), ("pp2", 2, 1, 2, 1), ("dp2", 2, 1, 1, 2)):
    files = [h5py.File(f"{scratch}/{name}/rank-{r:05d}.h5", "r") for r in range(ranks)]
    out = [json.loads(l) for l in open(f"{scratch}/{name}.jsonl")]
    usage = {str(r["id"]): r["usage"] for r in out if "usage" in r}
    errors = [r for r in out if "error" in r]
    assert len(usage) == 11 and len(errors) == 1, (name, len(usage), len(errors))
    rows = {}
    for r, f in enumerate(files):
        for table in ("/steps", "/requests", "/events", "/bench"):
            got = set(f[table].dtype.names)
            assert got == fields[table], (name, r, table, got ^ fields[table])
        missing = fields["attrs"] - set(f.attrs)
        assert not missing, (name, r, missing)
        a = f.attrs
        assert (a["world_rank"], a["world_size"], a["tp"], a["pp"], a["dp"]) == (r, ranks, tp, pp, dp), dict(a)
        assert a["command"] == "run" and a["schema_version"] == 1 and a["device"] and a["hostname"]
        assert "kv:" in a["config_yaml"] and json.loads(a["plan"])["pp"] == pp
        assert a["timeline_truncated_at_step"] == -1
        steps = f["steps"][:]
        assert len(steps) == a["steps"] > 0 and list(steps["step"]) == list(range(len(steps)))
        total = steps["end"] - steps["start"]
        assert (abs(steps["compute_s"] + steps["comm_s"] + steps["host_s"] - total) < 1e-6).all(), name
        assert (steps["start"][1:] >= steps["end"][:-1] - 1e-9).all(), "steps overlap"
        assert (steps["pipeline_s"] <= steps["comm_s"] + 1e-12).all()
        assert (steps["kv_blocks_used"] <= steps["kv_blocks_total"]).all() and steps["kv_blocks_used"].max() > 0
        assert steps["device_memory_bytes"].max() > 0
        if pp > 1:
            assert steps["pipeline_s"].sum() > 0, (name, r)
            kinds = {v: k for k, v in h5py.check_enum_dtype(f["events"].dtype["kind"]).items()}
            names = {kinds[k] for k in f["events"]["kind"]}
            assert {"send", "recv"} & names and "load" in names, names
        req = f["requests"][:]
        if a["pp_rank"] != 0:
            assert len(req) == 0
            continue
        assert a["requests_done"] == len(req), (a["requests_done"], len(req))
        # Every token drawn on this replica is an output token (no preemption here).
        assert steps["tokens_produced"].sum() == req["output_tokens"].sum(), name
        for row in req:
            rid = row["id"].decode()
            assert rid not in rows, rid
            rows[rid] = row
            assert row["replica"] == a["dp_rank"]
            # Written right after the step that finished it.
            assert row["enqueue"] <= row["first_token"] <= row["finish"] <= steps["end"][-1] + 0.5
    assert sum(f.attrs["requests_failed"] for f in files) == 1
    assert set(rows) == set(usage), (name, set(rows) ^ set(usage))
    for rid, row in rows.items():
        u = usage[rid]
        assert (row["prompt_tokens"], row["output_tokens"]) == (u["prompt_tokens"], u["completion_tokens"]), (rid, u)
    if pp > 1:  # the same steps on both stages
        assert len(files[0]["steps"]) == len(files[1]["steps"])
    if dp > 1:
        assert {int(r["replica"]) for r in rows.values()} == {0, 1}

    tl = json.load(open(f"{scratch}/{name}/timeline.json"))["traceEvents"]
    pids = {e["pid"] for e in tl}
    assert pids == set(range(ranks)), pids
    for r, f in enumerate(files):
        n = sum(1 for e in tl if e["pid"] == r and e["ph"] == "X" and e.get("cat") == "step")
        assert n == len(f["steps"]), (name, r, n)
    flows = {}
    for e in tl:
        if e["ph"] in "sf":
            flows.setdefault(e["id"], []).append(e["ph"])
    assert all(sorted(v) == ["f", "s"] for v in flows.values()), flows
    assert (len(flows) > 0) == (pp > 1), len(flows)
print("trace files: ok")
PY

if command -v h5dump >/dev/null; then
  h5dump -H "$scratch/pp2/rank-00001.h5" >"$scratch/h5dump.txt" || fail "h5dump cannot read a trace"
  grep -q 'DATASET "steps"' "$scratch/h5dump.txt" || fail "h5dump shows no /steps: $(head -20 "$scratch/h5dump.txt")"
fi

# More steps than a timeline plot shows: the report plots a window of them.
printf '{"id": "long", "prompt_token_ids": [1, 2, 3], "max_tokens": 400, "ignore_eos": true}\n' >"$scratch/long.jsonl"
timeout 300 "$dilu" run --model "$model" --input "$scratch/long.jsonl" --output "$scratch/long.out.jsonl" \
  --set cpu.threads=1 --trace-dir "$scratch/long" </dev/null >"$scratch/long.log" 2>&1 ||
  fail "long run: $(tail -5 "$scratch/long.log")"

# A bench sweep with traces: its /bench table, the recording cost line.
timeout 300 "$dilu" bench --model "$model" --batch-sizes 1,2,4 --input-len 8 --output-len 8 --set cpu.threads=1 \
  --trace-dir "$scratch/sweep" </dev/null >"$scratch/sweep.log" 2>&1 || fail "bench --trace-dir: $(tail -5 "$scratch/sweep.log")"
grep -q "trace recording took .* us per step, .*% of the step time" "$scratch/sweep.log" ||
  fail "bench does not print the recording cost: $(cat "$scratch/sweep.log")"

# The report: tables, summary files, and the plots when matplotlib is there.
"$dilu" report "$scratch/np1" "$scratch/pp2" "$scratch/dp2" "$scratch/sweep" "$scratch/long" --out "$scratch/report" \
  >"$scratch/report.log" 2>&1 || fail "dilu report: $(cat "$scratch/report.log")"
for words in "time to first token" "latency" "pipeline bubble:" "replica imbalance: output tokens" "comparison" \
  "scaling efficiency" "bench sweep" "busy"; do
  grep -qF "$words" "$scratch/report.log" || fail "the report has no '$words': $(cat "$scratch/report.log")"
done
python3 - "$scratch/report/summary.json" <<'PY' || fail "summary.json is wrong: $(head -c 2000 "$scratch/report/summary.json")"
import json, sys
s = json.load(open(sys.argv[1]))
by = {d["label"]: d for d in s["dirs"]}
assert set(by) == {"np1", "pp2", "dp2", "sweep", "long"}, by.keys()
assert by["long"]["steps"] == 400 and by["long"]["output_tokens"] == 400, by["long"]
for name in ("np1", "pp2", "dp2"):
    d = by[name]
    assert d["requests"] == 11 and d["requests_failed"] == 1 and d["output_tokens"] > 0, d
    assert d["ttft_s"]["count"] == 11 and 0 <= d["ttft_s"]["p50"] <= d["latency_s"]["p50"], d
    assert all(0 <= r["busy"] <= 1.0001 for r in d["ranks"]), d["ranks"]
assert by["pp2"]["pipeline_bubble"] > 0 and by["np1"]["pipeline_bubble"] is None
assert by["dp2"]["replica_token_imbalance"] is not None
assert [p["batch"] for p in by["sweep"]["bench"]] == [1, 2, 4]
eff = {r["label"]: r["efficiency"] for r in s["scaling"]}
assert eff["np1"] == 1.0 and eff["pp2"] > 0, eff
PY
if [ "$plots" = 1 ]; then
  for plot in throughput_vs_batch scaling timeline-np1 timeline-pp2 timeline-dp2 timeline-sweep timeline-long; do
    for ext in png svg; do
      [ -s "$scratch/report/$plot.$ext" ] || fail "no $plot.$ext: $(cat "$scratch/report.log")"
    done
  done
else
  echo "traces: matplotlib is missing, plots not checked (scripts/setup.sh installs python3-matplotlib)"
  grep -q "plots skipped" "$scratch/report.log" || fail "no note that the plots were skipped"
fi

# No plotting library: the tables all the same, and a note.
DILU_PYTHON=/nonexistent/python3 "$dilu" report "$scratch/pp2" --out "$scratch/no-plots" >"$scratch/no-plots.log" 2>&1 ||
  fail "dilu report without matplotlib: $(cat "$scratch/no-plots.log")"
grep -q "pipeline bubble" "$scratch/no-plots.log" && grep -q "plots skipped" "$scratch/no-plots.log" ||
  fail "without matplotlib the report should print its tables and say the plots were skipped: $(cat "$scratch/no-plots.log")"
[ -s "$scratch/no-plots/summary.txt" ] && ! ls "$scratch/no-plots"/*.png >/dev/null 2>&1 ||
  fail "without matplotlib: summary.txt and no plots expected: $(ls "$scratch/no-plots")"

# A directory without traces is a usage error naming it.
mkdir -p "$scratch/empty"
rc=0
"$dilu" report "$scratch/empty" >"$scratch/empty.log" 2>&1 || rc=$?
[ "$rc" = 2 ] && grep -q "holds no rank-NNNNN.h5" "$scratch/empty.log" || fail "empty dir: exit $rc: $(cat "$scratch/empty.log")"

echo "traces: ok"
