#!/usr/bin/env bash
# Fetch the pinned llama.cpp tree (vendored in the PyPI sdist llama-cpp-python==0.3.36),
# unpack it into build/llama.cpp, make it a git repo with one base commit, and apply
# patches/llama.cpp/*.patch (idempotent).
#
# Env: KVM_CACHE  download cache (default <repo>/.cache)
#      KVM_LLAMA_DIR  target tree (default <repo>/build/llama.cpp)
#      KVM_NO_PATCH=1 leave the tree unpatched (stock build)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KVM_CACHE:-$REPO/.cache}"
DEST="${KVM_LLAMA_DIR:-$REPO/build/llama.cpp}"
PKG_VER="0.3.36"
SDIST="llama_cpp_python-${PKG_VER}.tar.gz"
SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PREFIX="llama_cpp_python-${PKG_VER}/vendor/llama.cpp"

mkdir -p "$CACHE"
if [ ! -f "$CACHE/$SDIST" ]; then
    echo "fetch-llama: downloading llama-cpp-python==$PKG_VER (sdist)" >&2
    # --no-binary for this package only: pip prepares the sdist's metadata, and with :all: it
    # would also build the build requirements (cmake, ninja) from source, minutes on 2 cores.
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$PKG_VER" -d "$CACHE" >&2
fi
echo "$SDIST_SHA256  $CACHE/$SDIST" | sha256sum -c --quiet - \
    || { echo "fetch-llama: sha256 mismatch for $CACHE/$SDIST" >&2; exit 1; }

# Unpack (once). The marker records which sdist the tree came from.
MARKER="$DEST/.kvm-source"
if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$SDIST_SHA256" ] && [ -d "$DEST/.git" ]; then
    echo "fetch-llama: $DEST already unpacked" >&2
else
    echo "fetch-llama: unpacking $PREFIX -> $DEST" >&2
    rm -rf "$DEST"
    mkdir -p "$DEST"
    tar -xzf "$CACHE/$SDIST" -C "$DEST" --strip-components=3 --exclude="$PREFIX/.git" "$PREFIX"
    (
        cd "$DEST"
        git init -q
        git config user.name  "kvmerger"
        git config user.email "kvmerger@localhost"
        git config core.autocrlf false
        git add -A -f .
        git commit -q -m "llama.cpp as vendored in llama-cpp-python $PKG_VER"
        git tag kvm-base
    )
    echo "$SDIST_SHA256" > "$MARKER"
    # the marker must not show up as a change in the tree
    echo ".kvm-source" >> "$DEST/.git/info/exclude"
fi

# Apply patches (idempotent).
if [ "${KVM_NO_PATCH:-0}" = "1" ]; then
    echo "fetch-llama: KVM_NO_PATCH=1, tree left as is" >&2
    exit 0
fi
shopt -s nullglob
for p in "$REPO"/patches/llama.cpp/*.patch; do
    name="$(basename "$p")"
    if git -C "$DEST" apply --reverse --check "$p" 2>/dev/null; then
        echo "fetch-llama: $name already applied" >&2
    elif git -C "$DEST" apply --check "$p" 2>/dev/null; then
        git -C "$DEST" apply "$p"
        echo "fetch-llama: applied $name" >&2
    else
        echo "fetch-llama: $name neither applies nor is applied; inspect $DEST (git -C $DEST status)" >&2
        exit 1
    fi
done
