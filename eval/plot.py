#!/usr/bin/env python3
"""Plots of a kvm_eval run: eval/plot.py RESULTS_DIR

  ppl_vs_budget.png        streaming perplexity vs budget, one panel per text, one line per method
                           (full cache as a dashed line)
  gap_closed.png           share of the shift -> full gap closed, per method and budget (mean over texts)
  passkey_by_depth.png     passkey accuracy by depth of the key, one panel per budget
  kvqa.png                 key-value retrieval accuracy per method and budget
"""
import csv
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rows(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fnum(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def main_methods(rs):
    order = []
    for r in rs:
        if r["method"] not in order:
            order.append(r["method"])
    return order


def style(m):
    if m == "full":
        return dict(color="black", linestyle="--", marker="")
    if m == "shift":
        return dict(color="gray", linestyle=":", marker="x")
    return dict(marker="o")


def plot_ppl(d, out):
    rs = [r for r in rows(os.path.join(d, "ppl.csv")) if r["group"] == "main"]
    if not rs:
        return
    texts = sorted({r["text"] for r in rs})
    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4.5), squeeze=False)
    for ax, t in zip(axes[0], texts):
        acc = defaultdict(list)
        for r in rs:
            if r["text"] == t:
                acc[(r["method"], fnum(r["budget"]))].append(fnum(r["ppl"]))
        for m in main_methods(rs):
            pts = sorted((b, sum(v) / len(v)) for (mm, b), v in acc.items() if mm == m)
            if not pts:
                continue
            if m == "full":
                # the full cache scores the same tokens as each budget; its PPL differs by budget
                # only because the scored span does
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label="full cache", **style(m))
            else:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=m, **style(m))
        ax.set_yscale("log")
        ax.set_title(f"streaming PPL, {t} (log scale)")
        ax.set_xlabel("budget (cache capacity / window)")
        ax.set_ylabel("perplexity (tokens after the cache fills)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ppl_vs_budget.png"), dpi=120)
    plt.close(fig)

    # gap closed, all methods (ablations included), mean over texts and windows
    allr = [r for r in rows(os.path.join(d, "ppl.csv")) if r["method"] not in ("full",) and r["gap_closed"] != ""]
    if not allr:
        return
    budgets = sorted({fnum(r["budget"]) for r in allr})
    ms = main_methods(allr)
    g = defaultdict(list)
    for r in allr:
        g[(r["method"], fnum(r["budget"]))].append(fnum(r["gap_closed"]))
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(ms) * len(budgets)), 4.5))
    w = 0.8 / len(budgets)
    for bi, b in enumerate(budgets):
        xs, ys = [], []
        for i, m in enumerate(ms):
            v = g.get((m, b))
            if v:
                xs.append(i + bi * w)
                ys.append(sum(v) / len(v))
        ax.bar(xs, ys, width=w, label=f"budget {b:g}")
    ax.axhline(0, color="gray", lw=0.8)
    ax.axhline(1, color="black", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(ms))])
    ax.set_xticklabels(ms, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("gap closed: (shift - method) / (shift - full)")
    lo = min(min(v) for v in g.values())
    ax.set_ylim(max(lo, -2.0) - 0.1, 1.1)
    ax.legend(fontsize=8)
    ax.set_title("share of the context-shift -> full-cache PPL gap closed (clipped at -2)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gap_closed.png"), dpi=120)
    plt.close(fig)


def plot_passkey(d, out):
    rs = rows(os.path.join(d, "passkey.csv"))
    if not rs:
        return
    full = [r for r in rs if r["method"] == "full"]
    rs = [r for r in rs if r["method"] != "full"]
    budgets = sorted({fnum(r["budget"]) for r in rs})
    depths = sorted({int(r["depth"]) for r in rs + full})
    fig, axes = plt.subplots(1, max(1, len(budgets)), figsize=(6 * max(1, len(budgets)), 4.5), squeeze=False)
    fa = defaultdict(list)
    for r in full:
        fa[int(r["depth"])].append(int(r["correct"]))
    for ax, b in zip(axes[0], budgets):
        acc = defaultdict(list)
        for r in rs:
            if fnum(r["budget"]) == b:
                acc[(r["method"], int(r["depth"]))].append(int(r["correct"]))
        ms = main_methods([r for r in rs if fnum(r["budget"]) == b])
        ax.plot(depths, [sum(fa[x]) / len(fa[x]) if fa[x] else float("nan") for x in depths],
                label="full cache", **style("full"))
        for i, m in enumerate(ms):
            ys = [sum(acc[(m, x)]) / len(acc[(m, x)]) if acc[(m, x)] else float("nan") for x in depths]
            # a small vertical offset so that equal lines stay visible
            ax.plot(depths, [y + 0.012 * (i - len(ms) / 2) for y in ys], label=m, **style(m))
        ax.set_title(f"passkey accuracy, budget {b:g}")
        ax.set_xlabel("depth of the key in the haystack (%)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.1, 1.1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "passkey_by_depth.png"), dpi=120)
    plt.close(fig)


def plot_kvqa(d, out):
    rs = rows(os.path.join(d, "kvqa.csv"))
    if not rs:
        return
    ms = main_methods(rs)
    budgets = sorted({fnum(r["budget"]) for r in rs})
    acc = defaultdict(list)
    for r in rs:
        acc[(r["method"], fnum(r["budget"]))].append(int(r["correct"]))
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(ms) * len(budgets)), 4.5))
    w = 0.8 / len(budgets)
    for bi, b in enumerate(budgets):
        xs, ys = [], []
        for i, m in enumerate(ms):
            v = acc.get((m, b))
            if v:
                xs.append(i + bi * w)
                ys.append(sum(v) / len(v))
        ax.bar(xs, ys, width=w, label="full cache" if b >= 1 else f"budget {b:g}")
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(ms))])
    ax.set_xticklabels(ms, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("key-value retrieval (\"The code for <word> is NNNN\")")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "kvqa.png"), dpi=120)
    plt.close(fig)


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(1)
    d = sys.argv[1]
    plot_ppl(d, d)
    plot_passkey(d, d)
    plot_kvqa(d, d)
    print("plot: " + " ".join(sorted(f for f in os.listdir(d) if f.endswith(".png"))), file=sys.stderr)


if __name__ == "__main__":
    main()
