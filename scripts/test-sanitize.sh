#!/usr/bin/env bash
# The llama.cpp integration tests (scripts/test-llama.sh) on the patched llama.cpp built with AddressSanitizer
# and UndefinedBehaviorSanitizer: the same scenarios (state round trip, merges past the context with every
# cache type and flag, two server slots, bad flags, the RPC backend), with every sanitizer report fatal.
#
#   scripts/test-sanitize.sh             build build/llama.cpp-asan (once; then only what changed), run the tests
#   KVM_TEST_SKIP_BUILD=1 scripts/...    run against the build as it is
#
# The build: LLAMA_SANITIZE_* for libllama, common and the tools, GGML_SANITIZE_* for ggml (the pinned
# CMake has both sets; LLAMA_SANITIZE_* alone leaves ggml uninstrumented), -fno-sanitize-recover=undefined
# (a UBSan finding aborts instead of printing and going on), RelWithDebInfo (-O2 -g: stack traces with
# lines), GGML_RPC=ON. libkvmerger.a itself is not instrumented (Rust; its own tests run under ASan in
# scripts/test.sh); its reads and writes of llama.cpp's buffers happen in that uninstrumented code, but every
# buffer it gets comes from instrumented code that checks the views' extents first.
# Runtime: ASAN_OPTIONS=abort_on_error=1:halt_on_error=1:detect_leaks=1, LSAN_OPTIONS with the suppressions
# of tests/llama/lsan.supp (stock ggml-rpc's registries only), UBSAN_OPTIONS=abort_on_error=1:halt_on_error=1:
# print_stacktrace=1 (test-llama.sh's defaults for a sanitized build; set them to override), timeouts x4, and
# every log is scanned for reports at the end.
#
# Not in CI: on 2 cores the build takes 22 minutes from scratch when the machine is otherwise idle (90 under
# load), and the scenarios another 22 (2-4x the normal build's time), which with the rest of scripts/test.sh
# would take CI's run near its 90-minute limit. CI runs the same scenarios on the normal build.
#
# Env: KVM_JOBS (default 2), KVM_TEST_THREADS, KVM_TEST_KEEP: as in build-llama.sh / test-llama.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BLD="$REPO/build/llama.cpp-asan"

if [ "${KVM_TEST_SKIP_BUILD:-0}" != "1" ]; then
    KVM_BUILD_DIR="$BLD" KVM_JOBS="${KVM_JOBS:-2}" \
    KVM_TARGETS="llama-completion llama-server llama-cli ggml-rpc-server" \
    KVM_CMAKE_EXTRA="-DLLAMA_SANITIZE_ADDRESS=ON -DLLAMA_SANITIZE_UNDEFINED=ON -DGGML_SANITIZE_ADDRESS=ON -DGGML_SANITIZE_UNDEFINED=ON -DCMAKE_C_FLAGS=-fno-sanitize-recover=undefined -DCMAKE_CXX_FLAGS=-fno-sanitize-recover=undefined -DGGML_RPC=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo" \
        "$REPO/scripts/build-llama.sh" >&2
fi

KVM_TEST_BUILD_DIR="$BLD" KVM_TEST_SKIP_BUILD=1 exec "$REPO/scripts/test-llama.sh"
