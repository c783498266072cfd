#!/usr/bin/env python3
"""Summarize results/cost/first-event: the merge cost of H2O and EVICT_FOLD over all events of a
window and over every event but the first (which also starts the context's kvmerger handle),
from the harness's cost columns in runs/*/ppl.csv; min/median/max over the runs."""
import collections
import csv
import glob
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
COLS = [("all events %", "merge_over_prefill_of_freed", 100), ("later events %", "merge_over_prefill_after_first", 100),
        ("first ms", "merge_ms_first", 1), ("ms/event", "merge_ms_per_event", 1)]


def main():
    vals = collections.defaultdict(list)
    ppl = collections.defaultdict(set)
    runs = sorted(glob.glob(os.path.join(HERE, "runs", "*", "ppl.csv")))
    for f in runs:
        for r in csv.DictReader(open(f)):
            if r["method"] in ("full", "shift"):
                continue
            k = (r["method"], r["text"], r["budget"])
            vals[k].append([s * float(r[c]) for _, c, s in COLS])
            ppl[k].add(r["ppl"])
    print(f"merge cost, {len(runs)} runs: min/median/max")
    print(f"{'method':<11} {'text':<6} {'budget':<6} " + " ".join(f"{n:<18}" for n, _, _ in COLS))
    for k in sorted(vals):
        cells = zip(*vals[k])
        print(f"{k[0]:<11} {k[1]:<6} {k[2]:<6} " + " ".join(
            f"{'/'.join(f'{x:.2f}' for x in (min(c), statistics.median(c), max(c))):<18}" for c in cells))
    same = all(len(v) == 1 for v in ppl.values())
    print(f"perplexity identical across runs: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
