#!/usr/bin/env bash
# Regenerates include/kvmerger.h from the Rust sources with the pinned cbindgen.
set -euo pipefail
cd "$(dirname "$0")/.."
want=0.29.2
if ! command -v cbindgen >/dev/null || [ "$(cbindgen --version | awk '{print $2}')" != "$want" ]; then
    cargo install cbindgen --version "$want" --locked
fi
cbindgen --config cbindgen.toml --crate kvmerger --output include/kvmerger.h
