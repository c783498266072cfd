#!/usr/bin/env bash
# The main job. Until the llama.cpp patch lands (issue 3), this runs the core library on a
# SmolLM2-shaped cache (30 layers, 3 KV heads x 64, f16, 4096 cells, free half) and prints
# what a merge pass costs against memcpy.
set -euo pipefail
cd "$(dirname "$0")/.."
KVM_BENCH_QUICK=1 cargo bench --bench merge -- --warm-up-time 0.2 --measurement-time 1 2>&1 | grep -E "^smollm2|time:"
