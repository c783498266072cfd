#!/usr/bin/env bash
# Build the patched llama.cpp tools against libkvmerger.a.
#   1. scripts/fetch-llama.sh (unpack + apply patches/llama.cpp/*.patch)
#   2. cargo build --release  (-> target/release/libkvmerger.a)
#   3. configure build/llama.cpp-build once (re-configure only when the flags change), build the tools.
# A change in the Rust crate only relinks: libkvmerger.a is an IMPORTED library in the patched CMake.
#
# Env: KVM_JOBS       parallel jobs (default: nproc)
#      KVM_TARGETS    targets (default: llama-cli llama-server llama-completion llama-passkey ggml-rpc-server)
#      KVM_BUILD_DIR  build dir (default <repo>/build/llama.cpp-build)
#      KVM_NO_PATCH=1 no cargo build, LLAMA_KVMERGER=OFF, patches not applied (a tree that already has
#                     them stays patched: that build checks the OFF path); build dir <repo>/build/llama.cpp-stock
#      KVM_CMAKE_EXTRA extra cmake arguments (after ours, so they win), e.g.
#                     -DLLAMA_KVMERGER_INCLUDE_DIR=/tmp/hdr to build before include/kvmerger.h exists
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="${KVM_LLAMA_DIR:-$REPO/build/llama.cpp}"
JOBS="${KVM_JOBS:-$(nproc)}"
TARGETS="${KVM_TARGETS:-llama-cli llama-server llama-completion llama-passkey ggml-rpc-server}"
NO_PATCH="${KVM_NO_PATCH:-0}"
if [ "$NO_PATCH" = "1" ]; then
    BLD="${KVM_BUILD_DIR:-$REPO/build/llama.cpp-stock}"
else
    BLD="${KVM_BUILD_DIR:-$REPO/build/llama.cpp-build}"
fi

"$REPO/scripts/fetch-llama.sh"

if [ "$NO_PATCH" != "1" ]; then
    echo "build-llama: cargo build --release" >&2
    (cd "$REPO" && cargo build --release)
    test -f "$REPO/target/release/libkvmerger.a" || { echo "build-llama: no target/release/libkvmerger.a" >&2; exit 1; }
    test -f "$REPO/include/kvmerger.h" || { echo "build-llama: no include/kvmerger.h (cbindgen header)" >&2; exit 1; }
    KVM_FLAGS=(-DLLAMA_KVMERGER=ON "-DLLAMA_KVMERGER_DIR=$REPO"
               "-DLLAMA_KVMERGER_INCLUDE_DIR=$REPO/include"
               "-DLLAMA_KVMERGER_LIBRARY=$REPO/target/release/libkvmerger.a")
else
    KVM_FLAGS=(-DLLAMA_KVMERGER=OFF)
fi

CMAKE_ARGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON
    -DGGML_RPC=ON   # the RPC backend and bin/ggml-rpc-server: scripts/test-llama.sh (e) merges on remote buffers
    "${KVM_FLAGS[@]}"
)
# shellcheck disable=SC2206
[ -n "${KVM_CMAKE_EXTRA:-}" ] && CMAKE_ARGS+=(${KVM_CMAKE_EXTRA})

# Configure once; again only when the argument list changed or the cache is missing.
STAMP="$BLD/.kvm-cmake-args"
WANT="$(printf '%s\n' "${CMAKE_ARGS[@]}")"
if [ ! -f "$BLD/CMakeCache.txt" ] || [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "build-llama: configuring $BLD" >&2
    cmake -S "$SRC" -B "$BLD" "${CMAKE_ARGS[@]}"
    printf '%s\n' "$WANT" > "$STAMP"
fi

echo "build-llama: building $TARGETS (-j$JOBS)" >&2
# shellcheck disable=SC2086
cmake --build "$BLD" --config Release -j "$JOBS" --target $TARGETS
echo "build-llama: tools in $BLD/bin" >&2
ls -1 "$BLD/bin" >&2
