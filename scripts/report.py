#!/usr/bin/env python3
"""The plots of `dilu report` (which computes the tables and writes summary.json first).

Usage: report.py OUT/summary.json  ->  PNG and SVG files beside it:
  throughput_vs_batch   decode and prefill tokens/s against batch size (directories with a bench sweep)
  timeline-LABEL        per-rank timeline of steps, collectives and pipeline transfers (from the
                        rank files, read with h5py), and where each rank's time went
  scaling               output tokens/s and scaling efficiency across directories (two or more)
Needs matplotlib and h5py (Debian/Ubuntu: python3-matplotlib python3-h5py); exits 3 without them.
"""
import json
import os
import re
import sys

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.ticker
    import matplotlib.pyplot as plt
    import h5py
    import numpy as np
except ImportError as e:  # dilu report checks first; this is for direct use
    print(f"report.py: {e} (install python3-matplotlib and python3-h5py)", file=sys.stderr)
    sys.exit(3)

# Steps shown in a timeline at most (a window in the middle of a longer run).
MAX_TIMELINE_STEPS = 300
COLORS = {"step": "#9ecae1", "compute": "#3182bd", "comm": "#fd8d3c", "pipeline": "#d62728", "host": "#74c476",
          "idle": "#eeeeee", "load": "#bdbdbd"}


def save(fig, out, name):
    paths = []
    for ext in ("png", "svg"):
        path = os.path.join(out, f"{name}.{ext}")
        fig.savefig(path, dpi=120 if ext == "png" else None, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    print("dilu report: plot " + " ".join(paths))


def safe_name(label):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "trace"


def throughput_vs_batch(summary, out):
    dirs = [d for d in summary["dirs"] if d["bench"]]
    if not dirs:
        return
    fig, (ax_dec, ax_pre) = plt.subplots(1, 2, figsize=(11, 4.2))
    for d in dirs:
        pts = sorted(d["bench"], key=lambda p: p["batch"])
        b = [p["batch"] for p in pts]
        ax_dec.plot(b, [p["decode_tok_s"] for p in pts], marker="o", label=d["label"])
        ax_pre.plot(b, [p["prefill_tok_s"] for p in pts], marker="o", label=d["label"])
    for ax, what in ((ax_dec, "decode"), (ax_pre, "prefill")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({p["batch"] for d in dirs for p in d["bench"]}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel(f"{what} tokens/s")
        ax.set_title(f"{what} throughput vs batch size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    save(fig, out, "throughput_vs_batch")


def read_rank(path):
    with h5py.File(path, "r") as f:
        steps = f["steps"][:]
        events = f["events"][:]
        kinds = {v: k for k, v in h5py.check_enum_dtype(f["events"].dtype["kind"]).items()}
        groups = {v: k for k, v in h5py.check_enum_dtype(f["events"].dtype["group"]).items()}
        attrs = {k: f.attrs[k] for k in ("world_rank", "tp_rank", "pp_rank", "dp_rank", "hostname") if k in f.attrs}
    return steps, events, kinds, groups, attrs


def timeline(d, out):
    ranks = [read_rank(p) for p in d["files"]]
    # The window: every step when few, else MAX_TIMELINE_STEPS around the middle of rank 0's steps.
    steps0 = ranks[0][0]
    window = None
    title = f"{d['label']}: per-rank timeline"
    if len(steps0) > MAX_TIMELINE_STEPS:
        mid = len(steps0) // 2
        lo, hi = mid - MAX_TIMELINE_STEPS // 2, mid + MAX_TIMELINE_STEPS // 2
        window = (steps0["start"][lo], steps0["end"][hi - 1])
        title += f" (steps {lo}..{hi - 1} of {len(steps0)})"

    def visible(start, end):
        if window is None:
            return np.ones(len(start), dtype=bool)
        return (end >= window[0]) & (start <= window[1])

    fig, (ax, ax_bar) = plt.subplots(2, 1, figsize=(12, 3.6 + 0.9 * len(ranks)),
                                     gridspec_kw={"height_ratios": [max(len(ranks), 2), 2]})
    labels = []
    for y, (steps, events, kinds, groups, attrs) in enumerate(ranks):
        labels.append(f"rank {attrs.get('world_rank', y)} (tp {attrs.get('tp_rank', 0)} pp {attrs.get('pp_rank', 0)}"
                      f" dp {attrs.get('dp_rank', 0)})")
        v = visible(steps["start"], steps["end"])
        ax.broken_barh(list(zip(steps["start"][v], (steps["end"] - steps["start"])[v])), (y - 0.4, 0.8),
                       facecolors=COLORS["step"], edgecolor="white", linewidth=0.3)
        ev = events[visible(events["start"], events["end"])] if len(events) else events
        if len(ev):
            names = np.array([kinds.get(k, "?") for k in ev["kind"]], dtype=object)
            grp = np.array([groups.get(g, "?") for g in ev["group"]], dtype=object)
            pipe = (grp == "pp") & np.isin(names, ["send", "recv", "send_bytes", "recv_bytes"])
            load = names == "load"
            comm = ~pipe & ~load
            for mask, color in ((load, COLORS["load"]), (comm, COLORS["comm"]), (pipe, COLORS["pipeline"])):
                if mask.any():
                    ax.broken_barh(list(zip(ev["start"][mask], (ev["end"] - ev["start"])[mask])), (y - 0.25, 0.5),
                                   facecolors=color, linewidth=0)
    ax.set_yticks(range(len(ranks)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the run's epoch")
    fig.suptitle(title)
    if window is not None:
        ax.set_xlim(*window)
    handles = [matplotlib.patches.Patch(color=COLORS[k], label=t) for k, t in
               (("step", "step"), ("comm", "collective"), ("pipeline", "pipeline send/recv"), ("load", "load"))]
    ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1, 1), fontsize="small", ncol=4, frameon=False)

    # Where each rank's time went over the whole run (fractions of the wall time).
    rs = d["ranks"]
    x = np.arange(len(rs))
    bottom = np.zeros(len(rs))
    parts = (("compute", "compute", lambda r: r["compute"]), ("host", "host work", lambda r: r["host"]),
             ("comm", "collectives", lambda r: r["comm"] - r["pipeline"]),
             ("pipeline", "waiting for pipeline stages", lambda r: r["pipeline"]))
    for key, label, value in parts:
        vals = np.array([value(r) for r in rs])
        ax_bar.bar(x, vals, bottom=bottom, color=COLORS[key], label=label)
        bottom += vals
    ax_bar.bar(x, np.clip(1 - bottom, 0, None), bottom=bottom, color=COLORS["idle"], label="idle")
    ax_bar.set_xticks(x, [f"rank {r['rank']}" for r in rs])
    ax_bar.set_ylabel("share of wall time")
    ax_bar.set_ylim(0, 1)
    ax_bar.legend(fontsize="small", ncol=5, loc="lower right", bbox_to_anchor=(1, 1), frameon=False)
    fig.tight_layout()
    save(fig, out, "timeline-" + safe_name(d["label"]))


def scaling(summary, out):
    rows = summary["scaling"]
    if len(rows) < 2:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows) + 3), 4.2))
    x = np.arange(len(rows))
    ax.bar(x, [r["output_tok_s"] for r in rows], color=COLORS["compute"], label="output tokens/s")
    ax.set_xticks(x, [f"{r['label']}\n{r['ranks']} rank{'s' if r['ranks'] != 1 else ''}, {r['nodes']} node"
                      f"{'s' if r['nodes'] != 1 else ''}" for r in rows])
    ax.set_ylabel("output tokens/s")
    ax2 = ax.twinx()
    eff = [100 * r["efficiency"] if r["efficiency"] is not None else np.nan for r in rows]
    ax2.plot(x, eff, color=COLORS["pipeline"], marker="o", label="scaling efficiency")
    ax2.set_ylabel("scaling efficiency (%) vs the fewest ranks")
    ax2.set_ylim(0, max(110, np.nanmax(eff) * 1.1 if np.isfinite(np.nanmax(eff)) else 110))
    for xi, e in zip(x, eff):
        if np.isfinite(e):
            ax2.annotate(f"{e:.0f}%", (xi, e), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_title("throughput and scaling efficiency")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize="small", loc="lower left")
    fig.tight_layout()
    save(fig, out, "scaling")


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    summary_path = sys.argv[1]
    with open(summary_path) as f:
        summary = json.load(f)
    out = os.path.dirname(os.path.abspath(summary_path))
    throughput_vs_batch(summary, out)
    for d in summary["dirs"]:
        timeline(d, out)
    scaling(summary, out)


if __name__ == "__main__":
    main()
