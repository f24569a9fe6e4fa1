#!/usr/bin/env python3
"""Compares dilu's output with golden continuations: check_golden.py OUT.jsonl EXPECTED.jsonl [--near-tie M]

For every line of EXPECTED.jsonl ({"id", "token_ids", "finish_reason", "top_logprobs"}) the output
must hold a line with the same id, identical token_ids and the same finish_reason.  A mismatch
prints the id, the first differing position, both tokens and the reference's top-5 (token, logprob)
there, so that a near tie can be told from a real bug.  Exits 1 on any mismatch or missing id.
With --near-tie M (for backends with BF16/FP8 arithmetic, whose logprobs differ from the float32
reference by a stated bound), a continuation may leave the reference at a position where the
reference's top-1/top-2 margin is below M and the produced token is the reference's #2; the rest
of that sequence is then not compared (it continues another text). Such divergences are counted
and printed.
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


def check(out_rows, exp_rows, near_tie=None):
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
    check.near_ties = 0
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
            if want != have and near_tie is not None and len(want) == len(have):
                i = next(k for k in range(len(want)) if want[k] != have[k])
                tops = e.get("top_logprobs") or []
                if (i < len(tops) and len(tops[i]) >= 2 and tops[i][0][1] - tops[i][1][1] < near_tie
                        and have[i] == tops[i][1][0]):
                    print(f"NEAR-TIE {key}: leaves the reference at position {i} for its #2 "
                          f"(margin {tops[i][0][1] - tops[i][1][1]:.4f} < {near_tie})")
                    check.near_ties += 1
                    want = have
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
    near_tie = None
    if len(argv) == 5 and argv[3] == "--near-tie":
        near_tie = float(argv[4])
        argv = argv[:3]
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out_rows = load_jsonl(argv[1], "output")
    exp_rows = load_jsonl(argv[2], "expected")
    if not exp_rows:
        print(f"{argv[2]}: no expected lines", file=sys.stderr)
        return 1
    passed, failed, problems = check(out_rows, exp_rows, near_tie)
    for p in problems:
        print("MISMATCH " + p)
    print(f"golden: {passed} passed, {failed} failed" +
          (f" ({check.near_ties} left the reference at a near-tie)" if near_tie is not None else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
