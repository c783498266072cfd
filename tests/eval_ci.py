#!/usr/bin/env python3
"""eval/ci.py on synthetic per-token NLLs whose answers are known (scripts/test.sh runs it).

A method whose NLL is the full cache's plus a constant c has, in every bootstrap replicate, the
gap closed (e^0.2 - e^c) / (e^0.2 - 1) when shift is full + 0.2: the token mix cancels. So with
the same blocks drawn for every method of a window, its interval must collapse to that point;
with blocks drawn per method it would not. A method with independent noise must get a proper
interval around its point.
"""
import array
import csv
import math
import os
import random
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI = os.path.join(ROOT, "eval", "ci.py")
COMBINE = os.path.join(ROOT, "eval", "combine.py")


def write(d, rows):
    data = array.array("f")
    with open(os.path.join(d, "nll_index.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "window_idx", "budget", "first_pos", "method", "offset", "count"])
        for (text, win, budget, method, v) in rows:
            w.writerow([text, win, budget, 100, method, len(data), len(v)])
            data.extend(v)
    if sys.byteorder != "little":
        data.byteswap()
    with open(os.path.join(d, "nll.bin"), "wb") as f:
        f.write(data.tobytes())


def run(d, *args):
    return subprocess.run([sys.executable, CI, d, "--reps", "300", *args], capture_output=True, text=True)


def table(d, name):
    with open(os.path.join(d, name), newline="") as f:
        return {(r["text"], r["budget"], r["method"]): r for r in csv.DictReader(f)}


def close(a, b, tol=2e-4):
    return abs(float(a) - b) <= tol


def main():
    rng = random.Random(7)
    fails = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            fails.append(what)

    with tempfile.TemporaryDirectory() as d:
        rows = []
        g_mid = (math.exp(0.2) - math.exp(0.1)) / (math.exp(0.2) - 1)
        for text in ("a", "b"):
            for win in (0, 1):
                full = [rng.uniform(0.5, 6.0) for _ in range(1000)]  # 15 full blocks and a tail of 40
                noisy = [x + 0.1 + rng.gauss(0, 1.0) for x in full]
                rows += [
                    (text, win, "0.500", "full", full),
                    (text, win, "0.500", "shift", [x + 0.2 for x in full]),
                    (text, win, "0.500", "best", list(full)),
                    (text, win, "0.500", "mid", [x + 0.1 for x in full]),
                    (text, win, "0.500", "noisy", noisy),
                    # NaN logits in one window of text b (kvmerger_paper does this at 35 %)
                    (text, win, "0.500", "broken", [float("nan")] + full[1:] if (text, win) == ("b", 1) else list(full)),
                ]
        write(d, rows)
        r = run(d)
        check(r.returncode == 0, f"ci.py exits 0 (stderr: {r.stderr.strip()[:200]})")
        if r.returncode == 0:
            ci, cmp = table(d, "ci.csv"), table(d, "cmp.csv")
            for t in ("a", "b", "all"):
                b = ci[(t, "0.500", "best")]
                check(all(close(b[k], 1.0) for k in ("gap", "lo", "hi")), f"{t}: the full cache's own NLLs close the whole gap, interval [1, 1]")
                m = ci[(t, "0.500", "mid")]
                check(all(close(m[k], g_mid) for k in ("gap", "lo", "hi")),
                      f"{t}: full + 0.1 closes {g_mid:.4f} in every replicate (paired blocks): {m['gap']} [{m['lo']}, {m['hi']}]")
                n = ci[(t, "0.500", "noisy")]
                check(float(n["lo"]) < float(n["gap"]) < float(n["hi"]) and float(n["hi"]) - float(n["lo"]) > 0.05,
                      f"{t}: independent noise gets an interval around its point: {n['gap']} [{n['lo']}, {n['hi']}]")
                c = cmp[(t, "0.500", "mid")]
                check(close(c["gap_diff"], 1 - g_mid) and close(c["gap_lo"], 1 - g_mid) and close(c["ref_gap_ahead"], 1.0),
                      f"{t}: best minus mid in gap closed = {1 - g_mid:.4f}, best ahead in every replicate")
                r_pct = 100 * math.expm1(-0.1)
                check(all(close(c[k], r_pct, 1e-3) for k in ("ppl_ratio_pct", "ppl_lo", "ppl_hi")) and close(c["ref_lower"], 1.0),
                      f"{t}: best's perplexity is {r_pct:.3f} % of mid's in every replicate: {c['ppl_ratio_pct']} [{c['ppl_lo']}, {c['ppl_hi']}]")
                c = cmp[(t, "0.500", "noisy")]
                check(float(c["ppl_lo"]) < float(c["ppl_ratio_pct"]) < float(c["ppl_hi"]) and 0 < float(c["ref_lower"]) <= 1,
                      f"{t}: against independent noise the ratio gets an interval: {c['ppl_ratio_pct']} [{c['ppl_lo']}, {c['ppl_hi']}]")
            check(close(ci[("a", "0.500", "broken")]["gap"], 1.0) and ci[("b", "0.500", "broken")]["gap"] == "nan"
                  and ci[("all", "0.500", "broken")]["gap"] == "nan" and ci[("all", "0.500", "broken")]["lo"] == "nan",
                  "a window with NaN NLLs makes its text's and the all-texts gap NaN, not a mean of the rest")
            check(cmp[("all", "0.500", "broken")]["ppl_ratio_pct"] == "nan" and cmp[("all", "0.500", "broken")]["ref_lower"] == "nan",
                  "so is its perplexity ratio and the share of replicates")
            check(ci[("all", "0.500", "noisy")]["windows"] == "4" and ci[("a", "0.500", "noisy")]["windows"] == "2",
                  "windows are counted per text and over all texts")
            mean_ab = (float(ci[("a", "0.500", "noisy")]["gap"]) + float(ci[("b", "0.500", "noisy")]["gap"])) / 2
            check(close(ci[("all", "0.500", "noisy")]["gap"], mean_ab), "the all-texts gap is the mean over windows")
            with open(os.path.join(d, "ci.csv")) as f:
                first = f.read()
            r2 = run(d)
            with open(os.path.join(d, "ci.csv")) as f:
                second = f.read()
            check(r2.returncode == 0 and second == first and r2.stdout == r.stdout, "a fixed seed gives the same intervals twice")
            r3 = run(d, "--seed", "2")
            check(r3.returncode == 0 and r3.stdout != r.stdout, "another seed gives other intervals for the noisy method")

    with tempfile.TemporaryDirectory() as d:
        write(d, [("a", 0, "0.500", "full", [1.0] * 10)])
        with open(os.path.join(d, "nll_index.csv"), "a") as f:
            f.write("a,0,0.500,100,shift,5,10\n")  # past the end of nll.bin
        r = run(d)
        check(r.returncode != 0 and "past the end" in r.stderr, "an index past the end of nll.bin is an error")
    with tempfile.TemporaryDirectory() as d:
        r = run(d)
        check(r.returncode != 0 and "no nll_index.csv" in r.stderr, "a directory without NLLs is an error")

    # eval/combine.py: two runs that differ in a process-wide setting, side by side for ci.py.
    with tempfile.TemporaryDirectory() as d:
        a, b, c, out = (os.path.join(d, x) for x in ("a", "b", "c", "out"))
        full = [rng.uniform(0.5, 6.0) for _ in range(500)]
        for path, h2o, shift in ((a, 0.0, 0.2), (b, 0.1, 0.2), (c, 0.0, 0.3)):
            os.makedirs(path)
            write(path, [("t", 0, "0.500", "full", full),
                         ("t", 0, "0.500", "shift", [x + shift for x in full]),
                         ("t", 0, "0.500", "h2o", [x + h2o for x in full])])
        r = subprocess.run([sys.executable, COMBINE, out, a + ":q4", b + ":q16"], capture_output=True, text=True)
        check(r.returncode == 0, f"combine.py exits 0 (stderr: {r.stderr.strip()[:200]})")
        if r.returncode == 0:
            with open(os.path.join(out, "nll_index.csv"), newline="") as f:
                names = [row["method"] for row in csv.DictReader(f)]
            check(names == ["full", "shift", "h2o_q4", "h2o_q16"],
                  f"full and shift once, every other method renamed per run: {names}")
            r = run(out, "--ref", "h2o_q4")
            if r.returncode == 0:
                cmp = table(out, "cmp.csv")[("t", "0.500", "h2o_q16")]
                r_pct = 100 * math.expm1(-0.1)
                check(close(cmp["ppl_ratio_pct"], r_pct, 1e-3),
                      f"ci.py compares the combined rows token by token: {cmp['ppl_ratio_pct']} = {r_pct:.3f} %")
            else:
                check(False, f"ci.py reads the combined run (stderr: {r.stderr.strip()[:200]})")
        r = subprocess.run([sys.executable, COMBINE, os.path.join(d, "out2"), a + ":q4", c + ":q16"],
                           capture_output=True, text=True)
        check(r.returncode != 0 and "differs" in r.stderr and not os.path.exists(os.path.join(d, "out2")),
              "runs whose shift rows differ are refused and nothing is written")

    if fails:
        print(f"{len(fails)} check(s) failed", file=sys.stderr)
        sys.exit(1)
    print("eval/ci.py: all checks passed")


if __name__ == "__main__":
    main()
