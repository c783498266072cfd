#!/usr/bin/env bash
# The main job, from nothing: build the patched llama.cpp (with libkvmerger linked in), fetch
# SmolLM2-135M-Instruct, show llama-completion generating far past a 256-cell context with
# --kv-merge (one log line per merge), then run the short evaluation: every method at the same
# memory on two long texts (tables on stdout, CSV/JSON/PNG under out/short, which git ignores:
# the demo leaves the tree as it found it).
#   scripts/demo.sh            all of the above
#   scripts/demo.sh --no-eval  only the build and the llama-completion run
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cmake >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake; }

scripts/build-llama.sh
MODEL="$(scripts/fetch-model.sh)"
BIN=build/llama.cpp-build/bin

echo
echo "== llama-completion -c 256 --context-shift --kv-merge: 600 tokens in a 256-cell cache"
"$BIN/llama-completion" -m "$MODEL" -c 256 --context-shift --kv-merge -n 600 --ignore-eos -no-cnv \
    --temp 0 -t "${KVM_THREADS:-2}" -p "The history of the printing press begins" 2> >(grep -E 'kv-merge' >&2)
echo

if [ "${1:-}" != "--no-eval" ]; then
    echo "== the short evaluation (scripts/eval.sh)"
    scripts/eval.sh
fi
