#!/usr/bin/env python3
"""Summarize results/cost/positions: the merge cost of H2O and EVICT_FOLD with the patch's
per-cell position updates (old) and with the ordered pass (new), from the harness's cost columns
(runs/*/ppl.csv) and the probe's per-event phases (runs/*.probe)."""
import collections
import csv
import glob
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ["views", "attn", "plan", "apply", "meta"]


def main():
    cost = collections.defaultdict(list)
    ppl = collections.defaultdict(set)
    phases = collections.defaultdict(lambda: collections.defaultdict(list))
    for f in sorted(glob.glob(os.path.join(HERE, "runs", "*", "ppl.csv"))):
        run = os.path.basename(os.path.dirname(f))
        lib = run.split("_")[0]
        rows = [r for r in csv.DictReader(open(f)) if r["method"] not in ("full", "shift")]
        for r in rows:
            k = (r["method"], r["text"], r["budget"])
            cost[k + (lib,)].append((float(r["merge_ms_per_event"]),
                                     100 * float(r["merge_over_prefill_of_freed"])))
            ppl[k].add(r["ppl"])
        # one line per event of either method (the decode-speed tail adds a few uncounted ones),
        # so the phases are pooled per library
        for line in open(os.path.join(HERE, "runs", run + ".probe")):
            p = line.split()
            if len(p) == 11 and p[0] == "probe":
                for i in range(1, 11, 2):
                    phases[lib][p[i]].append(float(p[i + 1]))

    print("merge cost per event (min/median/max over runs): ms/event and % of the full cache's prefill of the freed tokens")
    print(f"{'method':<11} {'text':<6} {'budget':<6} {'old ms':<17} {'new ms':<17} {'old %':<17} {'new %':<17}")
    fmt = lambda v: "/".join(f"{x:.2f}" for x in (min(v), statistics.median(v), max(v)))
    for k in sorted({k[:3] for k in cost}):
        o, n = cost[k + ("old",)], cost[k + ("new",)]
        print(f"{k[0]:<11} {k[1]:<6} {k[2]:<6} {fmt([x[0] for x in o]):<17} {fmt([x[0] for x in n]):<17} "
              f"{fmt([x[1] for x in o]):<17} {fmt([x[1] for x in n]):<17}")
    same = all(len(v) == 1 for v in ppl.values())
    print(f"perplexity identical across libraries and runs: {same}")

    print("\nper event, inside llama_memory_seq_merge, H2O and EVICT_FOLD pooled (mean ms over every event of the runs)")
    print(f"{'library':<8} {'events':>6} " + " ".join(f"{n:>6}" for n in PHASES) + f" {'sum':>6}")
    for lib, d in sorted(phases.items()):
        means = [statistics.mean(d[n]) for n in PHASES]
        print(f"{lib:<8} {len(d['meta']):>6} " + " ".join(f"{m:6.3f}" for m in means)
              + f" {sum(means):6.3f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
