#!/usr/bin/env bash
# The CUDA build check of scripts/test.sh, for machines without a GPU (CI): `--features cuda`
# compiles the kernels for sm_80 and sm_90 and links (nvcc and the static cudart from PyPI),
# passes clippy, runs the ABI tests (the device tests skip without a device), links and runs
# tests/c/smoke.c against it (the CUDA runtime from the program's link line), and both
# staticlibs define exactly the functions the committed header declares, which the feature
# does not change. Env: KVM_CUDA_ARCHS (default 80,90).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(scripts/cuda-toolkit.sh)"
export NVCC="$root/bin/nvcc" CUDA_PATH="$root"
export KVM_CUDA_ARCHS="${KVM_CUDA_ARCHS:-80,90}"
cargo clippy --features cuda --all-targets --quiet -- -D warnings
cargo test --features cuda --quiet --test ffi --test cuda
cargo build --features cuda --lib --quiet
cuda_lib="$(mktemp)"
cp target/debug/libkvmerger.a "$cuda_lib"
# a C program links the feature's staticlib the way llama.cpp will: the CUDA runtime and the
# C++ library come from the program's link line (here the static cudart of the toolkit)
smoke="$(mktemp)"
trap 'rm -f "$cuda_lib" "$smoke"' EXIT
cc -std=c11 -Wall -Werror -I include tests/c/smoke.c "$cuda_lib" -L "$root/lib" -lcudart_static -lstdc++ \
    -lpthread -ldl -lrt -lm -o "$smoke"
out="$(cd "$(dirname "$smoke")" && "$smoke")" && [[ "$out" == *"smoke: ok"* && "$out" == *"cuda 1"* ]] \
    || { echo "tests/c/smoke.c against the cuda staticlib failed: $out" >&2; exit 1; }
cargo build --lib --quiet
# exported kvm_* functions of a staticlib (the Rust ones; the kernels' kvm_cuda_<op> helpers
# are C++ objects of libkvmerger_cuda, listed apart)
exports() { nm -g --defined-only "$1" 2>/dev/null | awk '$2 == "T" && $3 ~ /^kvm_/ {print $3}' | sort -u; }
declared="$(grep -v '^ *//' include/kvmerger.h | grep -oE '\bkvm_[a-z0-9_]+\(' | tr -d '(' | sort -u)"
plain="$(exports target/debug/libkvmerger.a)"
cuda="$(exports "$cuda_lib" | grep -vxF -f <(nm -g --defined-only target/debug/build/kvmerger-*/out/libkvmerger_cuda.a 2>/dev/null | awk '$2 == "T" {print $3}' | sort -u) || true)"
for what in plain cuda; do
    if ! diff <(echo "$declared") <(echo "${!what}") >/dev/null; then
        echo "the $what staticlib's kvm_* functions differ from include/kvmerger.h:" >&2
        diff <(echo "$declared") <(echo "${!what}") >&2 || true
        exit 1
    fi
done
scripts/gen-header.sh 2>/dev/null
git diff --exit-code -- include/kvmerger.h \
    || { echo "include/kvmerger.h is stale: run scripts/gen-header.sh and commit" >&2; exit 1; }
echo "cuda build: ok (sm ${KVM_CUDA_ARCHS}, $("$NVCC" --version | tail -1))"
