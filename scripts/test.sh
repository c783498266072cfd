#!/usr/bin/env bash
# The project's test command (README, .ci/run). Installs what a fresh machine lacks.
#   scripts/test.sh          everything
#   KVM_TEST_QUICK=1 ...     skip the aarch64/qemu run and the llama.cpp integration tests
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n== %s\n' "$*"; }

say "toolchain"
command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup" >&2; exit 1; }
cargo --version

say "header: include/kvmerger.h matches the sources (cbindgen)"
scripts/gen-header.sh 2>/dev/null
git diff --exit-code -- include/kvmerger.h || { echo "include/kvmerger.h is stale: run scripts/gen-header.sh and commit" >&2; exit 1; }

say "lint"
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings

say "unit, property, merge-math, ABI and C (ASan) tests"
cargo test --quiet

say "the whole pipeline on the scalar kernels"
KVM_FORCE_SCALAR=1 cargo test --quiet --test plan_props --test merge_math --test plan_rules

say "eval/ci.py (the harness's intervals) on synthetic NLLs"
python3 tests/eval_ci.py

say "SIMD property tests built with AVX2/FMA/F16C enabled at compile time"
RUSTFLAGS="-C target-feature=+avx2,+fma,+f16c" CARGO_TARGET_DIR=target/avx2 cargo test --quiet --test simd_props

say "CUDA: --features cuda builds for sm_80 and sm_90 (nvcc from PyPI); same C API either way"
scripts/test-cuda-build.sh

say "fuzz targets, ${KVM_FUZZ_SECONDS:-25} s each with ASan (scripts/fuzz.sh, fuzz/README.md)"
scripts/fuzz.sh "${KVM_FUZZ_SECONDS:-25}"

if [ "${KVM_TEST_QUICK:-0}" != 1 ]; then
    say "aarch64 (NEON) under qemu"
    scripts/test-aarch64.sh --quiet
fi
if [ "${KVM_TEST_QUICK:-0}" != 1 ]; then
    say "llama.cpp integration on SmolLM2-135M (builds the patched tree; scripts/test-llama.sh)"
    scripts/test-llama.sh
fi
if [ "${KVM_TEST_QUICK:-0}" != 1 ]; then
    say "chats and prompts past the context in llama-server and llama-cli (tests/server/chat.py)"
    python3 -c "import openai" 2>/dev/null || python3 -m pip install --quiet "openai==3.63.0"
    python3 tests/server/chat.py --bin build/llama.cpp-build/bin --model "$(scripts/fetch-model.sh)" \
        --threads "${KVM_TEST_THREADS:-2}"
fi
if [ "${KVM_TEST_QUICK:-0}" != 1 ]; then
    say "load: 4 slots, concurrent chats and prompts past the context, cancels and disconnects (tests/server/load.py)"
    python3 tests/server/load.py --bin build/llama.cpp-build/bin --model "$(scripts/fetch-model.sh)" \
        --threads "${KVM_TEST_THREADS:-2}"
fi
say "all tests passed"
