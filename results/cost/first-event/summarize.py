#!/usr/bin/env python3
"""Summarize results/cost/first-event: the merge cost of H2O and EVICT_FOLD over all events of a
window and over every event but the first (which also starts the context's kvmerger handle),
from the harness's cost columns in runs/*/ppl.csv; min/median/max over the runs. The reader and
the spread are results/cost/summarize.py's."""
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import summarize as cost  # noqa: E402  (results/cost/summarize.py)

COLS = [("all events %", "merge_over_prefill_of_freed", 100), ("later events %", "merge_over_prefill_after_first", 100),
        ("first ms", "merge_ms_first", 1), ("ms/event", "merge_ms_per_event", 1)]


def main():
    runs = os.path.join(HERE, "runs", "*", "ppl.csv")
    vals, same = cost.load_costs(runs, [(c, s) for _, c, s in COLS])
    print(f"merge cost, {len(glob.glob(runs))} runs: min/median/max")
    print(f"{'method':<11} {'text':<6} {'budget':<6} " + " ".join(f"{n:<18}" for n, _, _ in COLS))
    for k in sorted(vals):
        print(f"{k[0]:<11} {k[1]:<6} {k[2]:<6} " + " ".join(f"{cost.spread(c):<18}" for c in zip(*vals[k])))
    print(f"perplexity identical across runs: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
