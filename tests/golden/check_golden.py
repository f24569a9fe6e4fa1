#!/usr/bin/env python3
"""Compares dilu's output with golden continuations: check_golden.py OUT.jsonl EXPECTED.jsonl

For every line of EXPECTED.jsonl ({"id", "token_ids", "finish_reason", "top_logprobs"}) the output
must hold a line with the same id, identical token_ids and the same finish_reason.  A mismatch
prints the id, the first differing position, both tokens and the reference's top-5 (token, logprob)
there, so that a near tie can be told from a real bug.  Exits 1 on any mismatch or missing id.
Python standard library only.
"""
import json
import sys


def load_jsonl(path, what):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise SystemExit(f"{what} {path}:{n}: not JSON: {e}")
    return rows


def fmt_top(top):
    return "[" + ", ".join(f"{t}:{lp:.4f}" for t, lp in top) + "]"


def check(out_rows, exp_rows):
    got = {}
    problems = []
    for r in out_rows:
        if "id" not in r:
            continue
        key = str(r["id"])
        if key in got:
            problems.append(f"{key}: appears more than once in the output")
        got.setdefault(key, r)
    passed = failed = 0
    for e in exp_rows:
        key = str(e["id"])
        r = got.get(key)
        msgs = []
        if r is None:
            msgs.append("missing from the output")
        elif "token_ids" not in r:
            msgs.append(f"output has no token_ids: {json.dumps(r)[:300]}")
        else:
            want, have = e["token_ids"], r["token_ids"]
            if want != have:
                i = next((k for k in range(min(len(want), len(have))) if want[k] != have[k]), min(len(want), len(have)))
                w = want[i] if i < len(want) else "<end>"
                h = have[i] if i < len(have) else "<end>"
                msg = (f"token_ids differ at position {i} of {len(want)} expected / {len(have)} produced: "
                       f"expected {w}, got {h}")
                tops = e.get("top_logprobs") or []
                if i < len(tops):
                    msg += f"; reference top-5 there {fmt_top(tops[i])}"
                    ranks = [t for t, _ in tops[i]]
                    if isinstance(h, int) and h in ranks:
                        msg += f" (produced token is the reference's #{ranks.index(h) + 1})"
                msgs.append(msg)
            if r.get("finish_reason") != e["finish_reason"]:
                msgs.append(f"finish_reason expected {e['finish_reason']!r}, got {r.get('finish_reason')!r}")
        if msgs:
            failed += 1
            for m in msgs:
                problems.append(f"{key}: {m}")
        else:
            passed += 1
    return passed, failed, problems


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out_rows = load_jsonl(argv[1], "output")
    exp_rows = load_jsonl(argv[2], "expected")
    if not exp_rows:
        print(f"{argv[2]}: no expected lines", file=sys.stderr)
        return 1
    passed, failed, problems = check(out_rows, exp_rows)
    for p in problems:
        print("MISMATCH " + p)
    print(f"golden: {passed} passed, {failed} failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
