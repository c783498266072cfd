#!/usr/bin/env bash
# Prints the root of a CUDA toolkit that can build `--features cuda` (nvcc, the static cudart,
# the headers): $CUDA_PATH if it has nvcc, else nvcc 13.5 from PyPI (nvidia-cuda-nvcc, -crt,
# -runtime, -cccl; about 150 MB) installed once into $KVM_CACHE/cuda-pip. The kernels are
# compiled to SASS, which CUDA 13.x drivers run (minor version compatibility). Use it as
#   root=$(scripts/cuda-toolkit.sh); export NVCC="$root/bin/nvcc" CUDA_PATH="$root"
# Env: KVM_CACHE  download cache (default <repo>/.cache)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KVM_CACHE:-$REPO/.cache}"
if [ -n "${CUDA_PATH:-}" ] && [ -x "$CUDA_PATH/bin/nvcc" ]; then
    echo "$CUDA_PATH"
    exit 0
fi
DEST="$CACHE/cuda-pip"
root="$DEST/nvidia/cu13"
if [ ! -x "$root/bin/nvcc" ] || [ ! -f "$root/lib/libcudart_static.a" ]; then
    echo "cuda-toolkit: installing nvcc and the static CUDA runtime from PyPI into $DEST" >&2
    python3 -m pip install --quiet --disable-pip-version-check --target "$DEST" \
        nvidia-cuda-nvcc==13.5.37 nvidia-cuda-crt==13.5.37 nvidia-cuda-runtime==13.5.37 \
        nvidia-cuda-cccl==13.3.5.0.6 >&2
fi
[ -x "$root/bin/nvcc" ] || { echo "cuda-toolkit: no nvcc under $root" >&2; exit 1; }
echo "$root"
