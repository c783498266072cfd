#!/usr/bin/env python3
"""Summarize results/cost: the merge cost of H2O and EVICT_FOLD before and after the prefetching
change (ab/), and the per-phase times of the probe build (phases/)."""
import collections
import csv
import glob
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def spread(v):
    """min/median/max of `v`, as the cost tables print them."""
    return "/".join(f"{x:.2f}" for x in (min(v), statistics.median(v), max(v)))


def load_costs(runs, cols, label=lambda path: ()):
    """The columns `cols` ((name, scale) pairs) of every compressing row of the ppl.csv files
    matching `runs`, as {(method, text, budget) + label(path): [values of one row, ...]}; and
    True when each (method, text, budget) has the same perplexity in every file."""
    rows = collections.defaultdict(list)
    ppl = collections.defaultdict(set)
    for f in sorted(glob.glob(runs)):
        for r in csv.DictReader(open(f)):
            if r["method"] in ("full", "shift"):
                continue
            k = (r["method"], r["text"], r["budget"])
            rows[k + label(f)].append(tuple(scale * float(r[c]) for c, scale in cols))
            ppl[k].add(r["ppl"])
    return rows, all(len(v) == 1 for v in ppl.values())


def ab(runs=os.path.join(HERE, "ab", "*", "ppl.csv"), n_runs=3):
    """The old/new cost table of the run directories `runs` (named <lib>_<text>_<run>); True
    when every perplexity is the same across libraries and runs."""
    rows, same = load_costs(runs, [("merge_ms_per_event", 1), ("merge_over_prefill_of_freed", 100)],
                            lambda f: (os.path.basename(os.path.dirname(f)).split("_")[0],))
    print(f"merge cost per event, {n_runs} runs each: ms/event and % of the prefill of the freed tokens")
    print(f"{'method':<11} {'text':<6} {'budget':<6} {'old ms (min/med/max)':<22} {'new ms':<22} "
          f"{'old %':<20} {'new %':<20}")
    for k in sorted({k[:3] for k in rows}):
        o, n = rows[k + ("old",)], rows[k + ("new",)]
        print(f"{k[0]:<11} {k[1]:<6} {k[2]:<6} {spread([x[0] for x in o]):<22} {spread([x[0] for x in n]):<22} "
              f"{spread([x[1] for x in o]):<20} {spread([x[1] for x in n]):<20}")
    print(f"perplexity identical across libraries and runs: {same}")
    return same


PHASES = ["views", "attn", "plan", "apply", "meta"]


def add_probe(path, into):
    """Appends each phase's ms of every probe line of `path` to into[phase]."""
    for line in open(path):
        p = line.split()
        if len(p) == 11 and p[0] == "probe":
            for i in range(1, 11, 2):
                into[p[i]].append(float(p[i + 1]))


def print_phases(title, acc):
    """One row of phase means per key of `acc` (a tuple of labels, e.g. library and method)."""
    print(f"\nper event, inside llama_memory_seq_merge{title} (mean ms over every event of the runs)")
    width = len(next(iter(acc)))
    heads = ["library", "method"][:width]
    print(" ".join(f"{h:<{w}}" for h, w in zip(heads, (8, 11))) + f" {'events':>6} "
          + " ".join(f"{n:>6}" for n in PHASES) + f" {'sum':>6}")
    for key, d in sorted(acc.items()):
        means = [statistics.mean(d[n]) for n in PHASES]
        print(" ".join(f"{k:<{w}}" for k, w in zip(key, (8, 11))) + f" {len(d['attn']):>6} "
              + " ".join(f"{m:6.3f}" for m in means) + f" {sum(means):6.3f}")


def phases():
    acc = collections.defaultdict(lambda: collections.defaultdict(list))
    for f in sorted(glob.glob(os.path.join(HERE, "phases", "*.txt"))):
        lib, method = os.path.basename(f)[:-4].split("-")[:2]
        add_probe(f, acc[(lib, method)])
    if acc:
        print_phases("", acc)


if __name__ == "__main__":
    ok = ab()
    phases()
    sys.exit(0 if ok else 1)
