#!/usr/bin/env python3
"""Put the streaming-PPL NLLs of several kvm_eval runs into one directory, for eval/ci.py.

    eval/combine.py OUT DIR[:SUFFIX] DIR[:SUFFIX] ...

Some settings hold for a whole process, not for a row of the method table. One example is
--queries, the size of the patch's query ring (LLAMA_KV_MERGE_QWIN in earlier runs). Runs that differ in such a setting
can only be compared token by token once their NLLs sit side by side. Every method of a DIR
given with a SUFFIX, except full and shift, is renamed METHOD_SUFFIX. A method that keeps its
name in several runs, full and shift above all (ci.py measures every gap between them), must
have the same NLLs bit for bit in each, or combine.py stops: otherwise the runs did not score
the same tokens under the same model. OUT gets nll.bin and nll_index.csv in the format of
kvm_eval.
"""
import csv
import os
import sys

SHARED = ("full", "shift")  # the references ci.py measures every gap against


def load(d):
    with open(os.path.join(d, "nll.bin"), "rb") as f:
        data = f.read()
    with open(os.path.join(d, "nll_index.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if (int(r["offset"]) + int(r["count"])) * 4 > len(data):
            sys.exit(f"combine: {d}/nll_index.csv points past the end of nll.bin ({r})")
    return rows, data


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    out, specs = argv[1], argv[2:]
    fields = ["text", "window_idx", "budget", "first_pos", "method", "offset", "count"]
    seen = {}  # (text, window, budget, method) -> (first_pos, bytes, source)
    order = []
    for spec in specs:
        d, _, suffix = spec.partition(":")
        rows, data = load(d)
        for r in rows:
            name = f"{r['method']}_{suffix}" if suffix and r["method"] not in SHARED else r["method"]
            off, cnt = int(r["offset"]), int(r["count"])
            key = (r["text"], r["window_idx"], r["budget"], name)
            blob = data[4 * off:4 * (off + cnt)]
            if key in seen:
                if seen[key][:2] != (r["first_pos"], blob):
                    sys.exit(f"combine: {name} on {key[:3]} differs between {seen[key][2]} and {d}; "
                             "these runs did not score the same tokens the same way")
                continue
            seen[key] = (r["first_pos"], blob, d)
            order.append(key)
    os.makedirs(out, exist_ok=True)
    offset = 0
    with open(os.path.join(out, "nll.bin"), "wb") as fb, \
            open(os.path.join(out, "nll_index.csv"), "w", newline="") as fi:
        w = csv.DictWriter(fi, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for key in order:
            first_pos, blob, _ = seen[key]
            cnt = len(blob) // 4
            fb.write(blob)
            w.writerow(dict(zip(fields, [key[0], key[1], key[2], first_pos, key[3], offset, cnt])))
            offset += cnt
    print(f"combine: {len(order)} rows from {len(specs)} runs into {out}")


if __name__ == "__main__":
    main(sys.argv)
