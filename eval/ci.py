#!/usr/bin/env python3
"""Confidence intervals for the streaming-PPL task of a kvm_eval run: eval/ci.py RESULTS_DIR

  eval/ci.py RESULTS_DIR [--ref best] [--block 64] [--reps 2000] [--seed 1] [--kinds KINDS]

Reads nll.bin and nll_index.csv (the per-token negative log-likelihoods kvm_eval writes) and
prints, and writes to ci.csv and cmp.csv:

  gap closed, (ppl_shift - ppl) / (ppl_shift - ppl_full), with a 95 % interval, per text and
  budget (mean over the text's windows), per kind of text (--kinds: the windows of its texts,
  shown as [kind]) and per budget over every text and window;
  the reference method's (--ref) perplexity relative to each other method's, in percent
  (geometric mean over windows), with a 95 % interval and the share of replicates in which the
  reference is lower; cmp.csv also has the difference in gap closed with its interval.

Why a paired block bootstrap: within one window every method scores the same tokens, so most of
the variance of a window's PPL (which tokens are hard) is shared and cancels in a difference.
Resampling the same blocks of tokens for the full cache, context shift and every method keeps
that pairing. Blocks of --block consecutive tokens keep the dependence between neighbouring
tokens inside a block; windows are resampled independently of each other. The interval covers
the noise of which tokens a window happens to hold, not other texts or models.

Only the Python standard library is needed.
"""
import argparse
import array
import csv
import math
import os
import random
import sys
from collections import defaultdict

FULL, SHIFT = "full", "shift"


def load(d):
    idx_path, bin_path = os.path.join(d, "nll_index.csv"), os.path.join(d, "nll.bin")
    if not (os.path.exists(idx_path) and os.path.exists(bin_path)):
        sys.exit(f"ci: {d} has no nll_index.csv and nll.bin (a kvm_eval run with --tasks ppl writes them)")
    data = array.array("f")
    with open(bin_path, "rb") as f:
        data.frombytes(f.read())
    if sys.byteorder != "little":
        data.byteswap()
    cells = defaultdict(dict)  # (text, window, budget) -> method -> list of nll
    with open(idx_path, newline="") as f:
        for r in csv.DictReader(f):
            off, cnt = int(r["offset"]), int(r["count"])
            if off + cnt > len(data):
                sys.exit(f"ci: nll_index.csv points past the end of nll.bin ({r})")
            cells[(r["text"], int(r["window_idx"]), r["budget"])][r["method"]] = data[off:off + cnt]
    return cells


def block_sums(v, block):
    return [(math.fsum(v[i:i + block]), len(v[i:i + block])) for i in range(0, len(v), block)]


def gap(s_full, s_shift, s_m):
    # NaN NLLs (a method whose logits went NaN) give NaN; a PPL past float range gives -inf
    if not all(math.isfinite(x) for x in (s_full, s_shift, s_m)):
        return float("nan")
    p_full, p_shift = math.exp(s_full), math.exp(s_shift)
    p_m = math.exp(s_m) if s_m < 700 else float("inf")
    return (p_shift - p_m) / (p_shift - p_full) if p_shift != p_full else float("nan")


def quantiles(xs, lo=0.025, hi=0.975):
    # NaN anywhere: the interval is NaN too, never a silent subset
    if any(math.isnan(x) for x in xs):
        return float("nan"), float("nan")
    ys = sorted(xs)
    pick = lambda q: ys[min(len(ys) - 1, max(0, int(round(q * (len(ys) - 1)))))]
    return pick(lo), pick(hi)


def mean(xs):
    # a window whose method went NaN makes its mean over windows NaN: it is not left out
    return sum(xs) / len(xs) if xs else float("nan")


def num(x):
    return f"{x:+.2f}" if math.isnan(x) or abs(x) < 100 else f"{x:+.0f}"


def cell(est, lo, hi):
    return "nan" if math.isnan(est) else f"{num(est)} [{num(lo)},{num(hi)}]"


def pct(x):
    # a mean NLL difference as a perplexity ratio in percent
    return x if math.isnan(x) else 100 * math.expm1(x) if x < 700 else float("inf")


def share(xs, pred):
    return float("nan") if any(math.isnan(x) for x in xs) else sum(1 for x in xs if pred(x)) / len(xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--ref", default="best", help="method the others are compared with (default best)")
    ap.add_argument("--block", type=int, default=64, help="tokens per resampled block (default 64)")
    ap.add_argument("--reps", type=int, default=2000, help="bootstrap replicates (default 2000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kinds", help="the kind of each text, 'text=kind' words, comma- or space-separated, or a file of"
                    " them (scripts/eval-texts.sh writes OUTDIR/KINDS): adds a column per kind, over its texts' windows")
    a = ap.parse_args()
    if a.block < 1 or a.reps < 10:
        sys.exit("ci: --block must be >= 1 and --reps >= 10")
    cells = load(a.dir)
    rng = random.Random(a.seed)

    # point estimates and replicates of gap closed per cell and method; every replicate draws one
    # set of blocks per cell and applies it to all of the cell's methods
    point, reps = {}, {}
    npoint, nrep = {}, {}  # mean NLL per cell and method, and its replicates
    methods = []
    for key in sorted(cells):
        ms = cells[key]
        if FULL not in ms or SHIFT not in ms:
            print(f"# ci: {key} lacks the full cache or context shift, skipped", file=sys.stderr)
            continue
        n = {len(v) for v in ms.values()}
        if len(n) != 1:
            print(f"# ci: {key}: methods scored different token counts {sorted(n)}, skipped", file=sys.stderr)
            continue
        bs = {m: block_sums(v, a.block) for m, v in ms.items()}
        nb = len(bs[FULL])
        mean_nll = {m: sum(s for s, _ in b) / sum(c for _, c in b) for m, b in bs.items()}
        others = [m for m in ms if m not in (FULL, SHIFT)]
        if not all(math.isfinite(x) for x in mean_nll.values()):
            print(f"# ci: {key}: non-finite NLLs (NaN logits) in {[m for m, x in mean_nll.items() if not math.isfinite(x)]}",
                  file=sys.stderr)
        for m in others:
            if m not in methods:
                methods.append(m)
            point[key + (m,)] = gap(mean_nll[FULL], mean_nll[SHIFT], mean_nll[m])
            reps[key + (m,)] = []
            npoint[key + (m,)] = mean_nll[m]
            nrep[key + (m,)] = []
        for _ in range(a.reps):
            pick = [rng.randrange(nb) for _ in range(nb)]
            cnt = sum(bs[FULL][i][1] for i in pick)
            mn = {m: sum(bs[m][i][0] for i in pick) / cnt for m in ms}
            for m in others:
                reps[key + (m,)].append(gap(mn[FULL], mn[SHIFT], mn[m]))
                nrep[key + (m,)].append(mn[m])

    if not point:
        sys.exit("ci: no cell has the full cache, context shift and another method")
    keys = sorted({k[:3] for k in point})
    budgets = sorted({k[2] for k in keys}, key=float)
    texts = sorted({k[0] for k in keys})
    groups = [(t, b) for b in budgets for t in texts if any(k[0] == t and k[2] == b for k in keys)]
    kind_of = {}
    if a.kinds:
        spec = open(a.kinds).read() if os.path.isfile(a.kinds) else a.kinds
        for w in spec.replace(",", " ").split():
            if "=" not in w:
                sys.exit(f"ci: --kinds: '{w}' is not text=kind")
            kind_of[w.split("=", 1)[0]] = "[" + w.split("=", 1)[1] + "]"
    kinds = sorted({kind_of[t] for t in texts if t in kind_of})
    groups += [(g, b) for b in budgets for g in kinds]
    groups += [("all", b) for b in budgets]
    members = lambda t, b: [k for k in keys if k[2] == b and (t == "all" or k[0] == t or kind_of.get(k[0]) == t)]

    def over_windows(ks, pt, rp):
        # the mean over windows of a per-window value, and of its replicates (replicate r of
        # every window together: the windows were resampled independently)
        return mean([pt[k] for k in ks]), [mean([rp[k][r] for k in ks]) for r in range(a.reps)]

    def diff_pair(pt, rp, ref, m, ks):
        # per window: the reference's value minus the method's, and the same for each replicate
        return ({k: pt[k + (ref,)] - pt[k + (m,)] for k in ks},
                {k: [u - v for u, v in zip(rp[k + (ref,)], rp[k + (m,)])] for k in ks})

    def agg(m, ks):
        ks = [k for k in ks if k + (m,) in point]
        if not ks:
            return None
        est, rep = over_windows(ks, {k: point[k + (m,)] for k in ks}, {k: reps[k + (m,)] for k in ks})
        return est, rep, len(ks)

    ci_rows, cmp_rows = [], []
    hdr = lambda w: f"{'method':<22}" + "".join(f" {t + '@' + b:>{w}}" for t, b in groups)
    print(f"== gap closed, 95 % interval (paired block bootstrap: {a.block}-token blocks, {a.reps} replicates)")
    print(hdr(24))
    for m in methods:
        line = f"{m:<22}"
        for t, b in groups:
            g = agg(m, members(t, b))
            if g is None:
                line += f" {'-':>24}"
                continue
            lo, hi = quantiles(g[1])
            line += f" {cell(g[0], lo, hi):>24}"
            ci_rows.append(dict(text=t, budget=b, method=m, windows=g[2], gap=f"{g[0]:.4f}", lo=f"{lo:.4f}", hi=f"{hi:.4f}"))
        print(line)

    if a.ref in methods:
        # Perplexity ratio: a window's gap closed divides by shift - full, which can be a few
        # hundredths of a perplexity point (then one block more or less swings it by whole
        # units); the ratio of two methods' perplexities on the same tokens has no such
        # denominator. Mean over windows of the log ratio, shown as percent.
        print(f"\n== perplexity of {a.ref} relative to each method (geometric mean over windows), 95 % interval,"
              f" share of replicates where {a.ref} is lower (better)")
        print(hdr(28))
        for m in methods:
            if m == a.ref:
                continue
            line = f"{m:<22}"
            for t, b in groups:
                ks = [k for k in members(t, b) if k + (m,) in point and k + (a.ref,) in point]
                if not ks:
                    line += f" {'-':>28}"
                    continue
                gd, grep_ = over_windows(ks, *diff_pair(point, reps, a.ref, m, ks))
                glo, ghi = quantiles(grep_)
                ld, lrep = over_windows(ks, *diff_pair(npoint, nrep, a.ref, m, ks))
                llo, lhi = quantiles(lrep)
                better = share(lrep, lambda x: x < 0)
                txt = "nan" if math.isnan(ld) else f"{pct(ld):+.1f}% [{pct(llo):+.1f},{pct(lhi):+.1f}] {better:3.0%}"
                line += f" {txt:>28}"
                cmp_rows.append(dict(text=t, budget=b, ref=a.ref, method=m, windows=len(ks),
                                     ppl_ratio_pct=f"{pct(ld):.3f}", ppl_lo=f"{pct(llo):.3f}", ppl_hi=f"{pct(lhi):.3f}",
                                     ref_lower=f"{better:.4f}", gap_diff=f"{gd:.4f}", gap_lo=f"{glo:.4f}", gap_hi=f"{ghi:.4f}",
                                     ref_gap_ahead=f"{share(grep_, lambda x: x > 0):.4f}"))
            print(line)
    else:
        print(f"\n# ci: no {a.ref} rows, no comparison", file=sys.stderr)

    for name, rows in (("ci.csv", ci_rows), ("cmp.csv", cmp_rows)):
        if rows:
            with open(os.path.join(a.dir, name), "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    print(f"\n# ci: {len(keys)} window x budget cells; {os.path.join(a.dir, 'ci.csv')}, cmp.csv")


if __name__ == "__main__":
    main()
