#!/usr/bin/env bash
# The evaluation: every compression method at the same memory, on the real model, in one run.
#
#   scripts/eval.sh                 short run (<= 10 min on 2 cores): 1 window of 2048 tokens per
#                                   text, budgets 50 % and 35 %, main methods, an eighth of the
#                                   cache freed per event (shift: half), passkey (1k haystack,
#                                   3 depths, 35 %) and key-value retrieval (35 %)
#   scripts/eval.sh --full          the full run: 3 windows per text, budget sweep 25-75 %, all
#                                   ablations, 2k haystacks, 3 keys per depth (hours on 2 cores)
#   scripts/eval.sh [--full] -- ARGS   extra arguments for the harness (build/eval/kvm_eval -h)
#   scripts/eval.sh --update-reference  the short run, written over the committed reference
#                                   results/short (then review and commit it)
#   scripts/eval.sh --texts SET     the texts of scripts/eval-texts.sh instead of gpl3 + pydoc:
#                                   SET = tuning, heldout or all (eval/README.md, "Texts"); no
#                                   choice is made on the held-out ones
#
# Steps: build the patched llama.cpp only if its tools are missing (scripts/build-llama.sh),
# build the harness (scripts/build-eval.sh), fetch the model (scripts/fetch-model.sh), prepare two
# long texts any Debian machine with Python has (the GPL-3 text and the prose of Python's
# pydoc topics), run, plot (installs matplotlib with pip if missing), intervals (eval/ci.py).
#
# Results: out/<run>/, ignored by git, so no run dirties the tree (ppl.csv, passkey.csv, kvqa.csv,
# methods.csv, results.json, *.png, log.txt, nll.bin + nll_index.csv, and from eval/ci.py ci.txt,
# ci.csv, cmp.csv; the texts and any calibration profile in out/<run>/texts/, also ignored).
# Env: KVM_RUN (run name, default short|full), KVM_OUT (output directory, default out/<run>),
#      KVM_THREADS (default 2), KVM_MODEL.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

MODE=short
EXTRA=()
UPDATE_REF=0
TEXTS=
while [ $# -gt 0 ]; do
    case "$1" in
        --full) MODE=full; shift ;;
        --update-reference) UPDATE_REF=1; shift ;;
        --texts) [ $# -ge 2 ] || { echo "eval: --texts takes tuning, heldout or all" >&2; exit 1; }; TEXTS="$2"; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "eval: unknown argument $1 (extra harness arguments go after --)" >&2; exit 1 ;;
    esac
done
RUN="${KVM_RUN:-$MODE}"
OUT="${KVM_OUT:-$REPO/out/$RUN}"
if [ "$UPDATE_REF" = 1 ]; then
    # the committed reference is the plain short run, nothing else
    if [ "$MODE" != short ] || [ ${#EXTRA[@]} -gt 0 ] || [ -n "${KVM_OUT:-}" ] || [ -n "$TEXTS" ]; then
        echo "eval: --update-reference is the plain short run (no --full, no KVM_OUT, no extra arguments)" >&2
        exit 1
    fi
    OUT="$REPO/results/short"
fi
THREADS="${KVM_THREADS:-2}"
BLD="${KVM_BUILD_DIR:-$REPO/build/llama.cpp-build}"

# 1. the patched llama.cpp (only when missing: a build may be running elsewhere; build-eval.sh waits for it)
if [ ! -f "$BLD/src/libllama.a" ] && [ ! -x "$BLD/bin/llama-completion" ]; then
    echo "eval: no patched llama.cpp build in $BLD, building it" >&2
    KVM_TARGETS="${KVM_TARGETS:-llama-completion}" scripts/build-llama.sh
fi
[ -f target/release/libkvmerger.a ] || cargo build --release

# 2. the harness
scripts/build-eval.sh

# 3. the model
MODEL="${KVM_MODEL:-$(scripts/fetch-model.sh)}"

# 4. texts
TXT="$OUT/texts"
mkdir -p "$TXT"
# Prose of the Python language reference, as shipped with every CPython (pydoc_data/topics.py),
# in three sets of topics: pydoc, the second text; pydoc2, the second text where Debian's
# GPL-3 text is missing and the third text of the three-window runs (docs/findings.md); calib,
# the text the calibration profile of the *_calib ablations comes from, which the PPL task never
# scores.
python3 - "$TXT" <<'PY'
import os
import sys
import pydoc_data.topics as t
texts = {
    "pydoc": ("specialnames", "types", "compound", "execmodel", "datamodel"),
    "pydoc2": ("string-methods", "typesseq", "formatstrings", "attribute-access", "customization"),
    "calib": ("assignment", "import", "typesmapping", "comparisons", "strings", "operator-summary"),
}
for name, topics in texts.items():
    with open(os.path.join(sys.argv[1], name + ".txt"), "w") as f:
        f.write("\n\n".join(t.topics[k] for k in topics if k in t.topics))
PY
if [ -f /usr/share/common-licenses/GPL-3 ]; then
    T1=gpl3
    cp /usr/share/common-licenses/GPL-3 "$TXT/gpl3.txt"
else
    T1=pydoc2
fi

# the texts of scripts/eval-texts.sh (its header has the sources and the split)
TEXT_ARGS=(--text "$T1=$TXT/$T1.txt" --text "pydoc=$TXT/pydoc.txt")
if [ -n "$TEXTS" ]; then
    scripts/eval-texts.sh "$TXT"
    case "$TEXTS" in
        tuning)  NAMES="$(sed -n 's/^tuning: //p' "$TXT/SPLIT")" ;;
        heldout) NAMES="$(sed -n 's/^held-out: //p' "$TXT/SPLIT")" ;;
        all)     NAMES="$(sed -n 's/^[a-z-]*: //p' "$TXT/SPLIT" | tr '\n' ' ')" ;;
        *) echo "eval: --texts takes tuning, heldout or all" >&2; exit 1 ;;
    esac
    TEXT_ARGS=()
    for n in $NAMES; do TEXT_ARGS+=(--text "$n=$TXT/$n.txt"); done
fi

# 5. run
# the profile goes beside the texts, which git ignores, also under results/short
ARGS=(-m "$MODEL" "${TEXT_ARGS[@]}" --out "$OUT" -t "$THREADS"
      --calib-text "$TXT/calib.txt" --calib "$TXT/calib.profile")
[ "$MODE" = full ] && ARGS+=(--full)
echo "eval: build/eval/kvm_eval ${ARGS[*]} ${EXTRA[*]:-}" >&2
start=$(date +%s)
build/eval/kvm_eval "${ARGS[@]}" "${EXTRA[@]}" 2> >(grep -v '^seq_merge: kvm_plan_init: the window cannot free' >&2) | tee "$OUT/log.txt"
echo "eval: $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt" >&2

# 6. plots
python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install --quiet matplotlib
python3 eval/plot.py "$OUT"
if [ -f "$OUT/nll_index.csv" ]; then
    python3 eval/ci.py "$OUT" ${TEXTS:+--kinds "$TXT/KINDS"} | tee "$OUT/ci.txt"
fi
echo "eval: results in $OUT" >&2
