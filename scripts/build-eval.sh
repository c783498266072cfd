#!/usr/bin/env bash
# Build the evaluation harness (eval/kvm_eval.cpp -> build/eval/kvm_eval) against the patched
# llama.cpp static libraries and target/release/libkvmerger.a.
#
# Waits (polls) until the patched build has produced its tools and libllama.a, since they may be
# (re)built while this runs; never builds llama.cpp itself (scripts/eval.sh does when missing).
#
# Env: KVM_BUILD_DIR     llama.cpp build dir (default <repo>/build/llama.cpp-build)
#      KVM_LLAMA_DIR     llama.cpp source tree (default <repo>/build/llama.cpp)
#      KVM_WAIT_S        how long to wait for the libraries (default 1800 s)
#      CXX               compiler (default g++)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="${KVM_LLAMA_DIR:-$REPO/build/llama.cpp}"
BLD="${KVM_BUILD_DIR:-$REPO/build/llama.cpp-build}"
OUT="$REPO/build/eval"
WAIT_S="${KVM_WAIT_S:-1800}"
CXX="${CXX:-g++}"

LIBS=(
    "$BLD/src/libllama.a"
    "$BLD/ggml/src/libggml.a"
    "$BLD/ggml/src/libggml-cpu.a"
    "$BLD/ggml/src/libggml-base.a"
    "$REPO/target/release/libkvmerger.a"
)
# the RPC backend of a build with GGML_RPC=ON (build-llama.sh's): libggml registers it
if grep -qs '^GGML_RPC:BOOL=ON' "$BLD/CMakeCache.txt"; then
    LIBS+=("$BLD/ggml/src/ggml-rpc/libggml-rpc.a")
fi

# wait for the patched build: the tools exist and no library is being written (stable for 5 s)
ready() {
    [ -x "$BLD/bin/llama-completion" ] || return 1
    local l
    for l in "${LIBS[@]}"; do [ -f "$l" ] || return 1; done
    return 0
}
waited=0
until ready; do
    if [ "$waited" -ge "$WAIT_S" ]; then
        echo "build-eval: the patched llama.cpp build ($BLD) is not there after ${WAIT_S}s; run scripts/build-llama.sh" >&2
        exit 1
    fi
    [ "$waited" -eq 0 ] && echo "build-eval: waiting for $BLD/bin/llama-completion and the static libraries ..." >&2
    sleep 10
    waited=$((waited + 10))
done
stable_sig() { stat -c '%s %Y' "${LIBS[@]}" 2>/dev/null | md5sum; }
s1="$(stable_sig)"; sleep 3; s2="$(stable_sig)"
while [ "$s1" != "$s2" ]; do
    echo "build-eval: libraries still changing, waiting ..." >&2
    s1="$s2"; sleep 5; s2="$(stable_sig)"
done

# the header must have the merge API (the patch)
grep -q "llama_memory_seq_merge" "$SRC/include/llama.h" \
    || { echo "build-eval: $SRC/include/llama.h has no llama_memory_seq_merge (unpatched tree?)" >&2; exit 1; }

# ggml-cpu built with OpenMP?
OMP=()
if grep -q '^GGML_OPENMP:BOOL=ON' "$BLD/CMakeCache.txt" 2>/dev/null; then
    OMP=(-fopenmp)
fi

mkdir -p "$OUT"
BIN="$OUT/kvm_eval"
# rebuild only when a source or a library is newer than the binary
if [ -x "$BIN" ]; then
    newer=0
    for f in "$REPO"/eval/*.cpp "$SRC/include/llama.h" "${LIBS[@]}"; do
        [ "$f" -nt "$BIN" ] && newer=1
    done
    if [ "$newer" = 0 ]; then
        echo "build-eval: $BIN is up to date" >&2
        exit 0
    fi
fi

echo "build-eval: compiling $BIN" >&2
# the libraries twice: static archives with cross references (llama -> ggml -> kvmerger)
"$CXX" -O2 -std=c++17 "${OMP[@]}" \
    -I "$SRC/include" -I "$SRC/ggml/include" -I "$REPO/include" \
    "$REPO"/eval/*.cpp \
    -Wl,--start-group "${LIBS[@]}" -Wl,--end-group \
    "${OMP[@]}" -lpthread -ldl -lm \
    -o "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
echo "build-eval: built $BIN" >&2
