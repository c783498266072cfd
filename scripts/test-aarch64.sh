#!/usr/bin/env bash
# Cross-test on aarch64 (NEON kernels) from an x86_64 Linux host, through qemu user mode.
# Installs what is missing: the rust target, the aarch64 linker and qemu-user (Debian/Ubuntu,
# needs root or sudo for apt-get). The linker and runner are set in .cargo/config.toml.
# Extra arguments go to `cargo test`, e.g. `scripts/test-aarch64.sh -- --nocapture`.
set -euo pipefail

cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu

if ! rustup target list --installed | grep -qx "$TARGET"; then
    rustup target add "$TARGET"
fi

missing=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || missing+=(qemu-user)
if ((${#missing[@]})); then
    SUDO=
    if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${missing[@]}"
fi

cargo test --target "$TARGET" --lib --test simd_props "$@"
