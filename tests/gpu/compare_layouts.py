#!/usr/bin/env python3
"""Compares a multi-GPU run with a one-GPU run of the same greedy requests:
compare_layouts.py REF.jsonl OUT.jsonl --bound B [--near-tie M] [--label NAME]

Both outputs must come from requests with "logprobs": 5 (top-5 per generated position).
For every id: the generated tokens are compared position by position. While they agree, the
top-5 logprobs of the two runs are compared token by token (|dlp| of every token id present in
both top-5 lists). Where they first differ, the reference's top-1/top-2 margin there must be
below M and the other run's token must be the reference's #2 (a near tie that the two layouts'
different summation orders may resolve either way); the rest of that sequence is not compared.
Passes when every id is present once in both, every divergence is such a near tie, and the 99th
percentile of |dlp| is at most B. Prints one summary line (and each problem).
Python standard library only.
"""
import argparse
import json
import sys


def load(path):
    rows = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise SystemExit(f"{path}:{n}: not JSON: {e}")
            key = str(r.get("id"))
            if key in rows:
                raise SystemExit(f"{path}: id {key} appears more than once")
            rows[key] = r
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ref")
    ap.add_argument("out")
    ap.add_argument("--bound", type=float, required=True)
    ap.add_argument("--near-tie", type=float, default=0.25)
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    ref, out = load(a.ref), load(a.out)
    problems = []
    dlps = []
    positions = identical = ties = 0
    for key, r in ref.items():
        o = out.get(key)
        if o is None:
            problems.append(f"{key}: missing from {a.out}")
            continue
        if "token_ids" not in r or "token_ids" not in o:
            problems.append(f"{key}: no token_ids (error record?): {json.dumps(o)[:200]}")
            continue
        rt, ot = r["token_ids"], o["token_ids"]
        rl, ol = r.get("logprobs") or [], o.get("logprobs") or []
        if len(rl) != len(rt) or len(ol) != len(ot):
            problems.append(f"{key}: logprobs missing (the requests must ask for 'logprobs': 5)")
            continue
        n = min(len(rt), len(ot))
        i = 0
        while i < n and rt[i] == ot[i]:
            ref_top = {t["token_id"]: t["logprob"] for t in rl[i]["top_logprobs"]}
            for t in ol[i]["top_logprobs"]:
                if t["token_id"] in ref_top:
                    dlps.append(abs(t["logprob"] - ref_top[t["token_id"]]))
            positions += 1
            i += 1
        if rt == ot:
            identical += 1
            continue
        if i == n:
            problems.append(f"{key}: {len(rt)} tokens in the reference, {len(ot)} here")
            continue
        top = rl[i]["top_logprobs"]
        margin = top[0]["logprob"] - top[1]["logprob"] if len(top) > 1 else float("inf")
        if margin < a.near_tie and len(top) > 1 and ot[i] == top[1]["token_id"]:
            ties += 1
            print(f"{a.label} {key}: near tie at position {i}: reference {rt[i]}, here {ot[i]}, margin {margin:.4f}")
        else:
            problems.append(f"{key}: differs at position {i}: reference {rt[i]}, here {ot[i]}; reference top-5 "
                            + ", ".join(f"{t['token_id']}:{t['logprob']:.4f}" for t in top))
    for key in out:
        if key not in ref:
            problems.append(f"{key}: not in the reference")
    dlps.sort()
    p99 = dlps[min(len(dlps) - 1, int(0.99 * len(dlps)))] if dlps else 0.0
    mx = dlps[-1] if dlps else 0.0
    if p99 > a.bound:
        problems.append(f"p99 |dlp| {p99:.4f} exceeds the bound {a.bound}")
    verdict = "PASS" if not problems else "FAIL"
    print(f"{verdict} {a.label}: {len(ref)} requests, {identical} identical, {ties} near ties, "
          f"{positions} positions compared, |dlp| p99 {p99:.4f} max {mx:.4f} (bound {a.bound})")
    for p in problems:
        print(f"  {a.label} {p}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
