#!/usr/bin/env bash
# Regenerate patches/llama.cpp/0001-llama-kv-merge.patch from the working tree of build/llama.cpp
# (everything that differs from the base commit tagged kvm-base, untracked files included).
# HEAD and the index of build/llama.cpp are left alone (a temporary index is used).
#
# Env: KVM_LLAMA_DIR  tree to diff (default <repo>/build/llama.cpp)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="${KVM_LLAMA_DIR:-$REPO/build/llama.cpp}"
OUT="$REPO/patches/llama.cpp/0001-llama-kv-merge.patch"

git -C "$SRC" rev-parse -q --verify kvm-base >/dev/null \
    || { echo "regen-patch: $SRC has no kvm-base tag (run scripts/fetch-llama.sh)" >&2; exit 1; }

tmp_index="$(mktemp)"
trap 'rm -f "$tmp_index"' EXIT

export GIT_INDEX_FILE="$tmp_index"
git -C "$SRC" read-tree kvm-base
git -C "$SRC" add -A .
tree="$(git -C "$SRC" write-tree)"

if [ "$tree" = "$(git -C "$SRC" rev-parse 'kvm-base^{tree}')" ]; then
    echo "regen-patch: no changes against kvm-base" >&2
    exit 1
fi

# fixed identity and date, so that an unchanged tree gives a byte-identical patch
export GIT_AUTHOR_NAME="kvmerger" GIT_AUTHOR_EMAIL="kvmerger@localhost"
export GIT_COMMITTER_NAME="kvmerger" GIT_COMMITTER_EMAIL="kvmerger@localhost"
export GIT_AUTHOR_DATE="2026-01-01T00:00:00Z" GIT_COMMITTER_DATE="2026-01-01T00:00:00Z"

msg="llama : add KV cache merging via kvmerger

At a context shift, merge the cells to be freed into their neighbours
(KVMerger, Rust staticlib libkvmerger.a with a C ABI) instead of
discarding them.

- cmake: LLAMA_KVMERGER (default OFF), LLAMA_KVMERGER_DIR; libkvmerger.a
  is an imported static library linked privately into libllama
- llama.h: llama_memory_seq_merge(), llama_kv_merge_params,
  llama_kv_merge_default_params(); returns -1 when built without kvmerger
- llama_kv_cache::seq_merge(): views of the K/V rows of every layer
  (host buffers in place, device buffers through a host copy), plan and
  apply with kvmerger, free the cells, close up the positions (K-shift at
  the next decode); per-cell merge counts
- kvmerger query ring: the graph keeps the last n_qwin post-RoPE queries
  of every layer (set_rows, works with and without flash attention);
  merge pivots use their attention; its size is a context parameter,
  llama_context_params.n_kv_merge_queries (--kv-merge-queries, 0 = off),
  and the ring exists only with LLAMA_KVMERGER
- llama_kv_merge_kvm_params(): the kvm_params a merge runs with (one
  mapping, used by seq_merge and by the evaluation harness)
- common: --kv-merge, --kv-merge-method, --kv-merge-keep, --kv-merge-floor,
  --kv-merge-recent, --kv-merge-sinks
- llama-completion, llama-server (and llama-cli), llama-passkey: merge at
  the context-shift sites, fall back to discarding when refused;
  llama-passkey honours -c"

commit="$(git -C "$SRC" commit-tree "$tree" -p kvm-base -m "$msg")"

mkdir -p "$(dirname "$OUT")"
git -C "$SRC" format-patch -1 "$commit" --stdout --zero-commit --no-signature --full-index > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "regen-patch: wrote $OUT ($(grep -c '^diff --git' "$OUT") files)" >&2
