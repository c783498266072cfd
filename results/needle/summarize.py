#!/usr/bin/env python3
"""Passkeys found per method and depth in each run of results/needle (see README.md).

Prints one line per (run, method) that compresses: correct of asked at each depth, then the
full cache and context shift of the first run as the reference lines.
Usage: python3 results/needle/summarize.py [RUN_DIR ...] (default: every run here, in README order)
"""
import collections
import csv
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = ["h2o-q4-g0", "h2o-q64-g0", "h2o-q4-g1", "h2o-q64-g1", "h2o-max-q4", "h2o-max-q64",
        "ef-q4-g0", "ef-q64-g0", "ef-q64-g1", "pin"]


def tally(path):
    """{(method, depth): [correct, asked]} of one passkey.csv, and the depths seen."""
    t = collections.defaultdict(lambda: [0, 0])
    depths = set()
    with open(path) as f:
        for r in csv.DictReader(f):
            d = int(r["depth"])
            depths.add(d)
            t[(r["method"], d)][0] += int(r["correct"])
            t[(r["method"], d)][1] += 1
    return t, sorted(depths)


def main():
    runs = sys.argv[1:] or [os.path.join(HERE, r) for r in RUNS]
    first = None
    rows = []
    for run in runs:
        t, depths = tally(os.path.join(run, "passkey.csv"))
        first = first or (t, depths)
        for m in sorted({m for m, _ in t} - {"full", "shift"}):
            rows.append((os.path.basename(run.rstrip("/")), m, [t[(m, d)] for d in depths]))
    t, depths = first
    print(f"{'run':<12} {'method':<16} " + " ".join(f"{d:>5}%" for d in depths))
    for name, m in (("(first run)", "full"), ("(first run)", "shift")):
        print(f"{name:<12} {m:<16} " + " ".join(f"{t[(m, d)][0]:>3}/{t[(m, d)][1]}" for d in depths))
    for name, m, cells in rows:
        print(f"{name:<12} {m:<16} " + " ".join(f"{c:>3}/{n}" for c, n in cells))


if __name__ == "__main__":
    main()
