#!/usr/bin/env python3
"""Compares seeded sampled runs (n choices per request) of several layouts with a one-GPU run:
compare_sampling.py REF.jsonl OUT.jsonl [--label NAME] [--report-only]

Every id's choices must carry exactly the reference's token ids (same seed, same requests: a layout
that only splits the work must not change what is sampled). Prints one summary line: choices
compared, identical, and for each differing choice the first differing position, both tokens and,
over the positions before it, the largest |logprob difference| of the sampled tokens (how far the
layout's arithmetic had drifted when the sample flipped). Exits 1 when any choice differs or an id
is missing, unless --report-only (for layouts whose reduction order differs, where a sample drawn
close to a boundary of the distribution may flip: the count is reported, not judged).
Python standard library only.
"""
import argparse
import json
import sys


def load(path):
    rows = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows[str(r.get("id"))] = r
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ref")
    ap.add_argument("out")
    ap.add_argument("--label", default="")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    ref, out = load(a.ref), load(a.out)
    problems, diffs = [], []
    total = same = tokens = 0
    max_dlp = 0.0
    for key, r in sorted(ref.items()):
        o = out.get(key)
        if o is None or "choices" not in o or "choices" not in r:
            problems.append(f"{key}: no choices here or in the reference: {json.dumps(o)[:200]}")
            continue
        if len(o["choices"]) != len(r["choices"]):
            problems.append(f"{key}: {len(r['choices'])} choices in the reference, {len(o['choices'])} here")
            continue
        for rc, oc in zip(r["choices"], o["choices"]):
            total += 1
            rt, ot = rc["token_ids"], oc["token_ids"]
            rl, ol = rc.get("logprobs") or [], oc.get("logprobs") or []
            n = min(len(rt), len(ot))
            i = 0
            drift = 0.0
            while i < n and rt[i] == ot[i]:
                if i < len(rl) and i < len(ol):
                    drift = max(drift, abs(rl[i]["logprob"] - ol[i]["logprob"]))
                i += 1
            tokens += i
            max_dlp = max(max_dlp, drift)
            if rt == ot:
                same += 1
                continue
            where = (f"position {i}: reference {rt[i]}, here {ot[i]}" if i < n
                     else f"length {len(rt)} in the reference, {len(ot)} here")
            diffs.append(f"{key} choice {rc.get('index')}: differs at {where}; "
                         f"max |dlp| of the sampled tokens before it {drift:.4f}")
    for key in out:
        if key not in ref:
            problems.append(f"{key}: not in the reference")
    bad = problems or (diffs and not a.report_only)
    verdict = "FAIL" if bad else ("PASS" if not diffs else "REPORT")
    print(f"{verdict} {a.label}: {len(ref)} requests, {total} choices, {same} identical, {total - same} differ; "
          f"{tokens} equal sampled tokens compared, max |dlp| {max_dlp:.4f}"
          + (" (differences reported, not judged)" if a.report_only else ""))
    for d in diffs + problems:
        print(f"  {a.label} {d}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
