#!/usr/bin/env python3
"""Summarize results/cost/positions: the merge cost of H2O and EVICT_FOLD with the patch's
per-cell position updates (old) and with the ordered pass (new), from the harness's cost columns
(runs/*/ppl.csv) and the probe's per-event phases (runs/*.probe). The tables are
results/cost/summarize.py's."""
import collections
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import summarize as cost  # noqa: E402  (results/cost/summarize.py)


def main():
    same = cost.ab(os.path.join(HERE, "runs", "*", "ppl.csv"))
    # one line per event of either method (the decode-speed tail adds a few uncounted ones),
    # so the phases are pooled per library
    acc = collections.defaultdict(lambda: collections.defaultdict(list))
    for f in sorted(glob.glob(os.path.join(HERE, "runs", "*.probe"))):
        cost.add_probe(f, acc[(os.path.basename(f).split("_")[0],)])
    cost.print_phases(", H2O and EVICT_FOLD pooled", acc)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
