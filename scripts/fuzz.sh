#!/usr/bin/env bash
# Runs every fuzz target (fuzz/README.md) for a bounded time each. Installs what a fresh
# machine lacks (the nightly toolchain, cargo-fuzz); where nightly cannot be had, runs the same
# targets' bodies over the committed corpus as an ordinary `cargo test` instead.
#   scripts/fuzz.sh [SECONDS_PER_TARGET [TARGET...]]     default 25 s, every target
#   KVM_FUZZ_SANITIZER=none scripts/fuzz.sh 600         no ASan (about 20x the inputs per second)
# New inputs go to fuzz/corpus-run/<target> (ignored by git); fuzz/corpus/<target> is only read.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-25}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(plan views attention calib sequence)

have_nightly() { rustup run nightly rustc --version >/dev/null 2>&1; }
if command -v rustup >/dev/null && ! have_nightly; then
    rustup toolchain install nightly --profile minimal || echo "cannot install nightly" >&2
fi
if have_nightly && ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked || echo "cannot install cargo-fuzz" >&2
fi
if ! have_nightly || ! cargo fuzz --version >/dev/null 2>&1; then
    echo "no nightly toolchain or no cargo-fuzz: the targets' bodies over the corpus, as tests" >&2
    exec cargo test --release --manifest-path fuzz/Cargo.toml
fi

san=(-s "${KVM_FUZZ_SANITIZER:-address}")
# No LeakSanitizer: rayon's pool threads finish after kvm_ctx_free returns, and their buffers
# then read as lost.
opts=(-max_total_time="$secs" -print_final_stats=1 -detect_leaks=0 -timeout=10)
export ASAN_OPTIONS="detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
cargo +nightly fuzz build "${san[@]}"
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus-run/$t"
    echo "== fuzz target $t, ${secs} s"
    cargo +nightly fuzz run "${san[@]}" "$t" "fuzz/corpus-run/$t" "fuzz/corpus/$t" -- "${opts[@]}" 2>&1 |
        grep -A2 -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|#[0-9]+.*DONE)|ERROR|panicked|SUMMARY|Test unit written' ||
        { echo "fuzz target $t failed (fuzz/artifacts/$t)" >&2; exit 1; }
done
