#!/usr/bin/env bash
# The GPU check of the CUDA kernels (cuda/README.md), in two halves, because the lent machine
# (H100/H200, nvcc 13 and cmake, no network, probably no Rust; 64 MiB of files travel) cannot
# build the Rust side:
#
#   scripts/gpu-check.sh prepare         here: builds out/gpu-check/ (about 58 MiB):
#       cuda-tests              tests/cuda.rs, release, --features cuda
#       libkvmerger.a           the staticlib with the feature (debug info stripped)
#       llama.cpp.tar.xz        the patched llama.cpp sources, CPU and CUDA backends only
#       model.gguf              SmolLM2-135M-Instruct cut to 2 of its 30 blocks (35 MiB; the
#                               embeddings alone are 32: scripts/gguf-truncate.py)
#   scripts/gpu-check.sh run [STEP...]   on the GPU machine, from the repository root; STEPs:
#       tests     (1) every kernel against the host path: every type (f32 f16 bf16 q8_0 q4_0),
#                 V normal and transposed, GQA, every method and option; untouched bytes bit
#                 for bit, written rows within the type's rounding (tests/cuda.rs). ~1 min
#       bench     (3) each kernel's bytes / time as a share of the device-to-device copy
#                 bandwidth measured in the same run, SmolLM2-135M and a 7B-like shape. ~1 min
#       llama     (2) builds the patched llama.cpp with -DGGML_CUDA=ON -DLLAMA_KVMERGER=ON
#                 against libkvmerger.a (build/gpu-check, kept between calls: a call that runs
#                 out of time can be repeated and resumes) and runs llama-completion
#                 --kv-merge past the context with -ngl 99 and -ngl 0, flash attention on and
#                 off: the same events must free the same cells; prints where the text first
#                 differs, and each event's cost against the prefill of the tokens it frees.
#                 The CUDA build takes most of the time (one arch: CMAKE_CUDA_ARCHITECTURES,
#                 default native).
#     default: tests bench llama. Results go to $OUT/gpu-check (the device tool brings $OUT
#     back) or out/gpu-check/results; the last line says PASS or FAIL.
#
# With the device tool: run(command="scripts/gpu-check.sh run tests bench", carry=["out/gpu-check"])
# then run(command="scripts/gpu-check.sh run llama", carry=["out/gpu-check"], timeout_s=600).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
B="$REPO/out/gpu-check"
say() { printf '\n== %s\n' "$*"; }

prepare() {
    set -e
    root="$(scripts/cuda-toolkit.sh)"
    export NVCC="$root/bin/nvcc" CUDA_PATH="$root" KVM_CUDA_ARCHS="${KVM_CUDA_ARCHS:-80,90}"
    mkdir -p "$B"
    say "kvmerger --features cuda (release, sm $KVM_CUDA_ARCHS)"
    cargo build --release --features cuda --lib --quiet
    strip --strip-debug -o "$B/libkvmerger.a" target/release/libkvmerger.a
    for t in cuda; do
        exe="$(cargo test --release --features cuda --test "$t" --no-run --message-format=json 2>/dev/null \
            | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | tail -1)"
        [ -x "$exe" ] || { echo "no test binary for $t" >&2; exit 1; }
        strip -o "$B/$t-tests" "$exe"
    done
    say "patched llama.cpp sources"
    scripts/fetch-llama.sh >/dev/null
    (cd build/llama.cpp && tar -cf - --exclude=tools/ui --exclude='tools/server/public*' \
        CMakeLists.txt cmake common include src vendor licenses tools \
        ggml/CMakeLists.txt ggml/cmake ggml/include ggml/src/CMakeLists.txt ggml/src/*.c ggml/src/*.cpp \
        ggml/src/*.h ggml/src/*.in ggml/src/ggml-cpu ggml/src/ggml-cuda | xz -6 -T2 > "$B/llama.cpp.tar.xz")
    say "model: SmolLM2-135M-Instruct, first 2 blocks"
    python3 scripts/gguf-truncate.py "$(scripts/fetch-model.sh)" "$B/model.gguf" 2
    du -sh "$B"
    total=$(du -sb "$B" | cut -f1)
    [ "$total" -lt $((64 << 20)) ] || { echo "out/gpu-check is over 64 MiB" >&2; exit 1; }
}

FAIL=0
fail() { echo "FAIL: $*"; FAIL=1; }

step_tests() {
    say "(1) kernels against the host path, and the refusals (tests/cuda.rs)"
    KVM_REQUIRE_GPU=1 "$B/cuda-tests" --test-threads=1 2>&1 | tee "$R/tests.txt" || fail "tests/cuda.rs"
}

step_bench() {
    say "(3) kernels against the copy bandwidth"
    KVM_REQUIRE_GPU=1 "$B/cuda-tests" --ignored bench_device_event --nocapture 2>&1 | tee "$R/bench.txt" \
        || fail "benchmark"
}

step_llama() {
    say "(2) patched llama.cpp with CUDA: -ngl 99 against -ngl 0"
    W="$REPO/build/gpu-check"
    mkdir -p "$W"
    if [ ! -f "$W/llama.cpp/CMakeLists.txt" ]; then
        mkdir -p "$W/llama.cpp" && tar -xJf "$B/llama.cpp.tar.xz" -C "$W/llama.cpp"
    fi
    # static libraries: the link line then puts the CUDA runtime after libkvmerger.a, which calls
    # it (the patch does not link cudart to libllama yet: cuda/llama-integration.md, part 1)
    cmake -S "$W/llama.cpp" -B "$W/build" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DLLAMA_KVMERGER=ON \
        -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_KVMERGER_DIR="$REPO" -DLLAMA_KVMERGER_LIBRARY="$B/libkvmerger.a" \
        -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-native}" -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > "$R/cmake.txt" 2>&1 \
        || { tail -20 "$R/cmake.txt"; fail "cmake"; return; }
    cmake --build "$W/build" --target llama-completion -j "$(nproc)" > "$R/build.txt" 2>&1 \
        || { tail -30 "$R/build.txt"; fail "llama.cpp build"; return; }
    bin="$W/build/bin/llama-completion"
    prompt="The history of the printing press begins with movable type in China and Korea, long before Gutenberg. \
In Europe the press spread from Mainz to Venice, Paris and London within fifty years, and with it pamphlets, \
newspapers and the first scientific journals. Write a long essay about what changed, city by city."
    for fa in on off; do
        for ngl in 99 0; do
            out="$R/completion-ngl$ngl-fa$fa"
            timeout 300 "$bin" -m "$B/model.gguf" -c 256 --context-shift --kv-merge -n 500 --ignore-eos -no-cnv \
                --temp 0 --seed 1 -ngl "$ngl" -fa "$fa" --no-warmup -p "$prompt" > "$out.txt" 2> "$out.log" < /dev/null \
                || { tail -5 "$out.log"; fail "llama-completion -ngl $ngl -fa $fa"; continue; }
            grep -o 'kv-merge: [0-9]* -> [0-9]* cells' "$out.log" > "$out.events" || true
            echo "-ngl $ngl -fa $fa: $(wc -l < "$out.events") events; $(grep -m1 'prompt eval time' "$out.log" | sed 's/.*= *//')"
        done
        a="$R/completion-ngl99-fa$fa" b="$R/completion-ngl0-fa$fa"
        [ -s "$a.events" ] || fail "-ngl 99 -fa $fa: no kv-merge event (the run never passed the context?)"
        cmp -s "$a.events" "$b.events" || fail "-fa $fa: the events differ between GPU and CPU ($(diff "$a.events" "$b.events" | head -4 | tr '\n' ' '))"
        python3 - "$a" "$b" <<'PY'
import re, sys
a, b = (open(p + ".txt", errors="replace").read() for p in sys.argv[1:3])
n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
print(f"text: the same for {n} of {len(a)} / {len(b)} characters (GPU and CPU round differently)")
# an event's cost against the prefill of the tokens it frees (the GPU run's own prefill speed)
log = open(sys.argv[1] + ".log", errors="replace").read()
ev = [(int(x), int(y), float(t)) for x, y, t in re.findall(r"kv-merge: (\d+) -> (\d+) cells in ([\d.]+) ms", log)]
pe = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", log)
if ev and pe:
    per_tok = float(pe.group(1)) / int(pe.group(2))
    ratios = sorted(t / ((x - y) * per_tok) for x, y, t in ev)
    print(f"GPU event: median {sorted(t for *_, t in ev)[len(ev) // 2]:.2f} ms; as a share of the prefill of "
          f"the freed tokens ({per_tok:.3f} ms/token): median {100 * ratios[len(ratios) // 2]:.1f} %, "
          f"max {100 * ratios[-1]:.1f} %")
PY
    done
}

case "${1:-}" in
prepare)
    prepare
    ;;
run)
    shift
    if [ -n "${OUT:-}" ]; then R="$OUT/gpu-check"; else R="$B/results"; fi
    mkdir -p "$R"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$R/device.txt"
    for s in "${@:-tests bench llama}"; do
        for one in $s; do
            case "$one" in
            tests | bench | llama) "step_$one" ;;
            *) echo "unknown step $one" >&2; exit 2 ;;
            esac
        done
    done
    [ "$FAIL" = 0 ] && echo "gpu-check: PASS" || { echo "gpu-check: FAIL"; exit 1; }
    ;;
*)
    sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
