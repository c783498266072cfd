#!/usr/bin/env bash
# CI integration tests of the patched llama.cpp (kvmerger) on the real model (SmolLM2-135M-Instruct Q4_1).
#
# Sets up what it needs on a fresh Debian machine (cmake via apt-get if missing, scripts/build-llama.sh,
# scripts/fetch-model.sh, g++ build of tests/llama/state_roundtrip.cpp), then runs:
#   (b) tests/llama/state_roundtrip: K/V read back after a merge (untouched cells keep their bytes, merged
#       ones lie between their members), merge counts survive llama_state_seq_get/set_data, byte-identical state,
#       identical logits; kvm_params override; refusals (-3 on shared cells / pending K-shift, -2 bad args);
#       calibration profiles (llama_memory_seq_merge_calibrate, calib_path)
#   (a) llama-completion -c 256 --context-shift --kv-merge -n 700 (-fa on and off, on with the profile of (b)
#       through --kv-merge-calib, with the flags of the age-pairs configuration `best`, with every other
#       --kv-merge-* flag at a valid value, with q8_0, q4_0 and bf16 caches, query-free, and query rings of 8
#       and 0 (--kv-merge-queries)): merges happen, each on a full cache and keeping the --kv-merge-keep share of
#       it, with the attention of exactly the kept queries (4 by default, 8, none with query-free or a ring of
#       0), the text stays text, the merge logs the parameters and profile the flags set
#       (the default method, EVICT_FOLD, without flags)
#   (c) llama-server -np 2 --kv-merge: two long concurrent /completion requests each equal the request run alone
#   (d) bad --kv-merge-* values exit non-zero with a message naming the flag (not the unknown-flag message),
#       no signal
#   (e) when the build has the RPC server (GGML_RPC=ON, bin/rpc-server or bin/ggml-rpc-server): rpc-server on
#       127.0.0.1 (a free port), llama-completion --rpc 127.0.0.1:PORT -ngl 99 with the flags of (a) -fa on/off:
#       the KV cache lives in the RPC buffer, merges happen there (the patch's host copy of device buffers) and
#       the text equals (a)'s local run byte for byte; state_roundtrip of (b) with the model on the RPC device
# A sanitized build (LLAMA_/GGML_SANITIZE_ADDRESS or _UNDEFINED in its CMakeCache) runs the same checks with
# ASAN_OPTIONS/UBSAN_OPTIONS that make any report fatal, longer timeouts, and any sanitizer report found in a log
# is a FAIL of its own; what it cannot do in reasonable time prints a SKIP line (scripts/test-sanitize.sh).
# Each check prints PASS/FAIL/SKIP with a reason; the last line is "N passed, M failed, K skipped"; exit 1 on any
# failure.
#
# Env: KVM_TEST_BUILD_DIR     the llama.cpp build to test (default build/llama.cpp-build; relative to the repo)
#      KVM_TEST_SKIP_BUILD=1  do not run build-llama.sh (use the tools already built)
#      KVM_TEST_THREADS       threads for the model runs (default 1)
#      KVM_TEST_PORT          server port (default 18080 + $$ % 1000)
#      KVM_TEST_KEEP=1        keep the work dir (logs) at the end
#      KVM_TEST_TIMEOUT_SCALE timeouts of the model runs multiplied by this (default 1, 4 for a sanitized build)
#      ASAN_OPTIONS, UBSAN_OPTIONS  a sanitized build's defaults (below) unless set
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
THREADS="${KVM_TEST_THREADS:-1}"
PORT="${KVM_TEST_PORT:-$((18080 + $$ % 1000))}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kvm-test-llama.XXXXXX")"
BLD="${KVM_TEST_BUILD_DIR:-build/llama.cpp-build}"
case "$BLD" in /*) ;; *) BLD="$REPO/$BLD" ;; esac
BIN="$BLD/bin"
SRC="$REPO/build/llama.cpp"

SERVER_PID=""
RPC_PID=""
stop_pid() {
    if [ -n "$1" ] && kill -0 "$1" 2>/dev/null; then
        kill "$1" 2>/dev/null
        wait "$1" 2>/dev/null
    fi
}
cleanup() {
    stop_pid "$SERVER_PID"
    stop_pid "$RPC_PID"
    if [ "${KVM_TEST_KEEP:-0}" = "1" ]; then
        echo "test-llama: logs kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

N_PASS=0
N_FAIL=0
N_SKIP=0
pass() { echo "PASS: $1${2:+ - $2}"; N_PASS=$((N_PASS + 1)); }
fail() { echo "FAIL: $1${2:+ - $2}"; N_FAIL=$((N_FAIL + 1)); }
skip() { echo "SKIP: $1${2:+ - $2}"; N_SKIP=$((N_SKIP + 1)); }
finish() {
    echo "$N_PASS passed, $N_FAIL failed, $N_SKIP skipped"
    [ "$N_FAIL" -eq 0 ]
    exit $?
}
die() { echo "test-llama: $*" >&2; fail "setup" "$*"; finish; }

# ------------------------------------------------------------------------------------------------ setup
t_setup=$(date +%s)
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
need_pkgs=()
command -v cmake   >/dev/null 2>&1 || need_pkgs+=(cmake)
command -v g++     >/dev/null 2>&1 || need_pkgs+=(g++)
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)
command -v git     >/dev/null 2>&1 || need_pkgs+=(git)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    echo "test-llama: apt-get install ${need_pkgs[*]}" >&2
    $SUDO apt-get update >&2 && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${need_pkgs[@]}" >&2 \
        || die "apt-get install ${need_pkgs[*]} failed"
fi

if [ "${KVM_TEST_SKIP_BUILD:-0}" != "1" ]; then
    KVM_BUILD_DIR="$BLD" "$REPO/scripts/build-llama.sh" >&2 || die "scripts/build-llama.sh failed"
fi

# a sanitized build: every report is fatal (abort, so that no exit path can swallow it), and the logs are
# scanned for reports at the end. LeakSanitizer checks every process at its exit; tests/llama/lsan.supp
# suppresses the registries stock ggml-rpc never frees (565 bytes in every --rpc process), nothing else.
SAN=0
if grep -q '^\(LLAMA\|GGML\)_SANITIZE_\(ADDRESS\|UNDEFINED\):BOOL=ON' "$BLD/CMakeCache.txt" 2>/dev/null; then
    SAN=1
    export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:halt_on_error=1:detect_leaks=1:print_summary=1}"
    export LSAN_OPTIONS="${LSAN_OPTIONS:-suppressions=$REPO/tests/llama/lsan.supp:print_suppressions=0}"
    export UBSAN_OPTIONS="${UBSAN_OPTIONS:-abort_on_error=1:halt_on_error=1:print_stacktrace=1}"
    echo "test-llama: sanitized build $BLD (ASAN_OPTIONS=$ASAN_OPTIONS LSAN_OPTIONS=$LSAN_OPTIONS UBSAN_OPTIONS=$UBSAN_OPTIONS)" >&2
fi
SCALE="${KVM_TEST_TIMEOUT_SCALE:-$([ "$SAN" = 1 ] && echo 4 || echo 1)}"
tmo() { echo $(( $1 * SCALE )); }
for t in llama-completion llama-server; do
    [ -x "$BIN/$t" ] || die "$BIN/$t missing"
done
MODEL="$("$REPO/scripts/fetch-model.sh")" || die "scripts/fetch-model.sh failed"
[ -f "$MODEL" ] || die "no model at $MODEL"

# tests/llama/state_roundtrip.cpp against the static libs (+ OpenMP when ggml-cpu was built with it)
RT="$WORK/state_roundtrip"
LIBS=("$BLD/src/libllama.a" "$BLD/ggml/src/libggml.a")
# a GGML_RPC build's libggml registers the RPC backend
[ -f "$BLD/ggml/src/ggml-rpc/libggml-rpc.a" ] && LIBS+=("$BLD/ggml/src/ggml-rpc/libggml-rpc.a")
LIBS+=("$BLD/ggml/src/libggml-cpu.a" "$BLD/ggml/src/libggml-base.a")
for l in "${LIBS[@]}" "$REPO/target/release/libkvmerger.a"; do
    [ -f "$l" ] || die "$l missing (build with scripts/build-llama.sh)"
done
OMP=()
if grep -q '^GGML_OPENMP:BOOL=ON' "$BLD/CMakeCache.txt" 2>/dev/null; then OMP=(-fopenmp); fi
[ "$SAN" = 1 ] && OMP+=(-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g)
g++ -std=c++17 -O1 "${OMP[@]}" -I"$SRC/include" -I"$SRC/ggml/include" -I"$REPO/include" \
    "$REPO/tests/llama/state_roundtrip.cpp" -o "$RT" \
    "${LIBS[@]}" "$REPO/target/release/libkvmerger.a" "${OMP[@]}" -lpthread -ldl -lm \
    2> "$WORK/rt-build.log" || { cat "$WORK/rt-build.log" >&2; die "building tests/llama/state_roundtrip.cpp failed"; }
echo "test-llama: setup took $(( $(date +%s) - t_setup )) s" >&2
t_checks=$(date +%s)

PROMPT="Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker who"

# ------------------------------------------------------------------------------------------------ (b)
# run_rt SECTION NAME FA TIMEOUT: state_roundtrip (env as the caller sets it), its PASS/FAIL lines as checks
run_rt() {
    local sec="$1" name="$2" fa="$3" base="$WORK/${2// /-}" t0 rc line
    t0=$(date +%s)
    timeout "$4" "$RT" "$MODEL" "$fa" > "$base.txt" 2> "$base.log"
    rc=$?
    while IFS= read -r line; do
        case "$line" in
            PASS:*) pass "$sec ${line#PASS: }" ;;
            FAIL:*) fail "$sec ${line#FAIL: }" ;;
        esac
    done < "$base.txt"
    if [ $rc -ne 0 ] && ! grep -q '^FAIL' "$base.txt"; then
        fail "$sec $name" "exit code $rc without a FAIL line (log: $(tail -n 3 "$base.log" | tr '\n' ' '))"
    elif [ $rc -eq 0 ]; then
        echo "      ($name: $(( $(date +%s) - t0 ))s)"
    fi
}
for fa in 1 0; do
    # the flash-attention run leaves its calibration profile for (a)
    profile=""; [ "$fa" = 1 ] && profile="$WORK/rt.profile"
    KVM_RT_PROFILE="$profile" run_rt "(b)" "state_roundtrip fa=$fa" "$fa" "$(tmo 180)"
done

# ------------------------------------------------------------------------------------------------ (a)
# text check: >= 90% printable, letters present, not one character repeated
text_ok() {
    python3 - "$1" <<'PY'
import sys
t = open(sys.argv[1], encoding="utf-8", errors="replace").read()
n = len(t)
if n < 200:
    print(f"only {n} characters"); sys.exit(1)
pr = sum(1 for c in t if c.isprintable() or c in "\n\t") / n
letters = sum(1 for c in t if c.isalpha())
top = max(t.count(c) for c in set(t)) / n
words = len(set(t.split()))
if pr < 0.9:
    print(f"{pr:.0%} printable"); sys.exit(1)
if letters < n * 0.3:
    print(f"{letters} letters of {n}"); sys.exit(1)
if top > 0.5:
    print(f"one character is {top:.0%} of the text"); sys.exit(1)
if words < 10:
    print(f"{words} distinct words"); sys.exit(1)
print(f"{n} chars, {pr:.0%} printable, {words} distinct words")
PY
}

# the flags of the evaluation's `best` (the age-pairs KVMerger configuration); the profile and these flags
# steer KVMerger's link scores, which the default method (EVICT_FOLD) does not read
BEST=(--kv-merge-method kvmerger --kv-merge-pivot query-free --kv-merge-age-bias 100 --kv-merge-max-set 2)
# every --kv-merge-* flag with a valid value other than its default
FLAGS=(--kv-merge-keep 0.6 --kv-merge-floor 0.1 --kv-merge-recent 16 --kv-merge-sinks 8 --kv-merge-value paper)
for run in on off calib best flags q8_0 q4_0 bf16 query-free queries8 queries0; do
    fa="$run"; extra=(); keep=0.5
    if [ "$run" = calib ]; then
        fa=on; extra=(--kv-merge-method kvmerger --kv-merge-calib "$WORK/rt.profile")
        [ -f "$WORK/rt.profile" ] || { fail "(a) --kv-merge-calib" "no profile from (b)"; continue; }
    elif [ "$run" = best ]; then
        fa=on; extra=("${BEST[@]}")
    elif [ "$run" = flags ]; then
        fa=on; extra=("${FLAGS[@]}"); keep=0.6
    elif [ "$run" = query-free ]; then
        fa=on; extra=(--kv-merge-pivot query-free)
    elif [ "$run" = queries8 ] || [ "$run" = queries0 ]; then
        # the size of the query ring: 8 queries read at every event, or none (the plan then runs query-free)
        fa=on; extra=(--kv-merge-queries "${run#queries}")
    elif [ "$run" = q8_0 ] || [ "$run" = q4_0 ] || [ "$run" = bf16 ]; then
        # quantized caches through the codec; bf16 through the K-shift's f32 round trip
        fa=on; extra=(-ctk "$run" -ctv "$run")
    fi
    # -lv 4 shows libllama's info lines, among them the parameters of the merge context
    lv=(-lv 4)
    name="(a) completion -c 256 --context-shift --kv-merge -n 700 -fa $fa${extra:+ ${extra[*]}}"
    [ "$run" = calib ] && name="$name (profile of (b))"
    out="$WORK/compl-$run.txt"; log="$WORK/compl-$run.log"
    t0=$(date +%s)
    timeout "$(tmo 240)" "$BIN/llama-completion" -m "$MODEL" -c 256 --context-shift --kv-merge "${extra[@]}" "${lv[@]}" -n 700 --ignore-eos -no-cnv \
        --temp 0 -t "$THREADS" -fa "$fa" --no-warmup -p "$PROMPT" > "$out" 2> "$log" < /dev/null
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    if [ $rc -ne 0 ]; then
        fail "$name" "exit code $rc (log: $(tail -n 3 "$log" | tr '\n' ' '))"
        continue
    fi
    # lines "...: kv-merge: BEFORE -> AFTER cells in T ms"
    merges="$(grep -o 'kv-merge: [0-9]* -> [0-9]* cells' "$log" | awk '{print $2, $4}')"
    n_merge="$(printf '%s\n' "$merges" | grep -c '[0-9]')"
    n_ctx="$(grep -o 'n_ctx *= *[0-9]*' "$log" | head -n 1 | grep -o '[0-9]*$')"
    n_ctx="${n_ctx:-256}"
    bad="$(printf '%s\n' "$merges" | awk -v c="$n_ctx" 'NF == 2 && !($1 <= c && $2 < $1) {print "bad merge " $1 " -> " $2}' | head -n 1)"
    refused="$(grep -c 'kv-merge refused' "$log")"
    # each event keeps the --kv-merge-keep share of the window after n_keep (0 here, or 1 with a BOS)
    # and starts from a full cache: a merge that frees too little or too much, or runs early, fails this
    badkeep="$(printf '%s\n' "$merges" | awk -v c="$n_ctx" -v k="$keep" 'function r(x) { return int(x + 0.5) }
        NF == 2 { ok = 0; for (nk = 0; nk <= 1; nk++) if ($2 == nk + r(k * ($1 - nk))) ok = 1;
                  if (!ok || $1 < c - 64) { print $1 " -> " $2 " (keep " k ", n_ctx " c ")"; exit } }')"
    # the attention of the kept queries reaches the plan (libllama's debug line), except where it must not
    n_attn="$(grep -c 'attention from [1-9][0-9]* recent queries' "$log")"
    if [ "$n_merge" -lt 2 ]; then
        fail "$name" "$n_merge kv-merge log lines (want >= 2), $refused refused"
    elif [ -n "$bad" ]; then
        fail "$name" "$bad (n_ctx $n_ctx)"
    elif [ -n "$badkeep" ]; then
        fail "$name" "an event did not keep its share of a full window: $badkeep"
    elif { [ "$run" = query-free ] || [ "$run" = queries0 ]; } && [ "$n_attn" -ne 0 ]; then
        fail "$name" "$n_attn merges read attention with ${extra[*]}"
    elif [ "$run" = queries8 ] && [ "$(grep -c 'attention from 8 recent queries' "$log")" -ne "$n_merge" ]; then
        fail "$name" "not every merge read 8 queries: $(grep -o 'attention from [0-9]* recent queries' "$log" | sort | uniq -c | tr '\n' ' ')"
    elif [ "$run" = on ] && [ "$(grep -c 'attention from 4 recent queries' "$log")" -ne "$n_merge" ]; then
        fail "$name" "not every merge read the default 4 queries: $(grep -o 'attention from [0-9]* recent queries' "$log" | sort | uniq -c | tr '\n' ' ')"
    elif [ "$run" != query-free ] && [ "$run" != queries0 ] && [ "$run" != best ] && [ "$n_attn" -lt "$n_merge" ]; then
        fail "$name" "only $n_attn of $n_merge merges had the attention of recent queries (the query ring is off or empty)"
    elif [ "$run" = flags ] && ! grep -q 'kvmerger: method 5, sinks 8, recent 16, heavy 0.05, floor 0.10, pivot attention, value 1,' "$log"; then
        fail "$name" "the flags did not reach the merge: $(grep -m 1 'kvmerger: method' "$log")"
    elif [ "$refused" -ne 0 ]; then
        fail "$name" "$refused merges refused"
    elif ! why="$(text_ok "$out")"; then
        fail "$name" "output is not text: $why"
    elif [ "$run" = best ] && ! grep -q 'kvmerger: method 0, .*pivot query-free, .*age_bias 100, max_set 2,' "$log"; then
        fail "$name" "the flags did not reach the merge: $(grep -m 1 'kvmerger: method' "$log")"
    elif [ "$run" = on ] && ! grep -q 'kvmerger: method 5, ' "$log"; then
        fail "$name" "the merge did not run the default method EVICT_FOLD (5): $(grep -m 1 'kvmerger: method' "$log")"
    elif [ "$run" = calib ] && ! grep -q "kvmerger: method 0, .*, profile $WORK/rt.profile" "$log"; then
        fail "$name" "the profile did not reach the merge: $(grep -m 1 'kvmerger: method' "$log")"
    else
        pass "$name" "$n_merge merges ($(printf '%s\n' "$merges" | head -n 1 | awk '{print $1 " -> " $2}'), each of a full cache keeping $keep of it), $n_attn with attention, $why, ${dt}s"
    fi
done

# ------------------------------------------------------------------------------------------------ (c)
name="(c) llama-server -np 2 --kv-merge: concurrent slots equal the same requests alone"
slog="$WORK/server.log"
"$BIN/llama-server" -m "$MODEL" -c 512 -np 2 --context-shift --kv-merge -t "$THREADS" -tb "$THREADS" \
    --host 127.0.0.1 --port "$PORT" --no-warmup > "$slog" 2>&1 < /dev/null &
SERVER_PID=$!
t0=$(date +%s)
python3 - "$PORT" "$WORK" "$PROMPT" "$SCALE" > "$WORK/server-check.txt" 2>&1 <<'PY'
import json, sys, threading, time, urllib.request
port, work, prompt, scale = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
base = f"http://127.0.0.1:{port}"
deadline = time.time() + 60 * scale
while True:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as r:
            if r.status == 200:
                break
    except Exception:
        pass
    if time.time() > deadline:
        print(f"server did not become healthy in {60 * scale} s"); sys.exit(1)
    time.sleep(0.5)

prompts = [prompt, "The history of the printing press begins in the fifteenth century, when"]

def req(p):
    body = json.dumps({"prompt": p, "n_predict": 400, "temperature": 0, "top_k": 1, "cache_prompt": False,
                       "ignore_eos": True, "seed": 1}).encode()
    r = urllib.request.Request(base + "/completion", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(r, timeout=240 * scale) as f:
        return json.loads(f.read())

res = [None, None]
def run(i):
    try:
        res[i] = req(prompts[i])
    except Exception as e:
        res[i] = {"error": str(e)}
th = [threading.Thread(target=run, args=(i,)) for i in range(2)]
for t in th: t.start()
for t in th: t.join()
alone = [req(p) for p in prompts]
ok = True
for i in range(2):
    a, b = res[i], alone[i]
    if "content" not in a or "content" not in b:
        print(f"request {i}: error {a.get('error') or b.get('error')}"); ok = False; continue
    ta, tb = a["content"], b["content"]
    if ta != tb:
        n = next((k for k in range(min(len(ta), len(tb))) if ta[k] != tb[k]), min(len(ta), len(tb)))
        print(f"request {i}: concurrent and alone differ at char {n} of {len(ta)}/{len(tb)}: {ta[max(0,n-20):n+20]!r} vs {tb[max(0,n-20):n+20]!r}")
        ok = False
    else:
        print(f"request {i}: {len(ta)} chars identical, {a.get('tokens_predicted')} tokens, truncated={a.get('truncated')}")
json.dump({"concurrent": res, "alone": alone}, open(work + "/server-out.json", "w"))
sys.exit(0 if ok else 1)
PY
rc=$?
dt=$(( $(date +%s) - t0 ))
n_merge="$(grep -c 'kv-merge: [0-9]* -> [0-9]* cells' "$slog")"
n_slots="$(grep 'kv-merge: [0-9]* -> [0-9]* cells' "$slog" | grep -o 'id  *[0-9]*' | sort -u | wc -l)"
n_refused="$(grep -c 'kv-merge refused' "$slog")"
summary="$(tr '\n' ';' < "$WORK/server-check.txt")"
if [ $rc -ne 0 ]; then
    fail "$name" "$summary (merges in log: $n_merge)"
elif [ "$n_merge" -lt 4 ] || [ "$n_slots" -lt 2 ]; then
    fail "$name" "outputs equal, but only $n_merge kv-merge lines in the server log from $n_slots slots (want >= 4 from 2)"
elif [ "$n_refused" -ne 0 ]; then
    fail "$name" "$n_refused merges refused"
else
    pass "$name" "$summary $n_merge merges from $n_slots slots, ${dt}s"
fi
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    fail "(c) llama-server still running after the requests" "$(tail -n 3 "$slog" | tr '\n' ' ')"
fi
kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; SERVER_PID=""

# ------------------------------------------------------------------------------------------------ (d)
for args in "--kv-merge-keep -1" "--kv-merge-keep 0" "--kv-merge-method nosuch" "--kv-merge-value nosuch" \
            "--kv-merge-floor abc" "--kv-merge-recent x" "--kv-merge-sinks y" "--kv-merge-calib /nonexistent/x.profile" \
            "--kv-merge-pivot nosuch" "--kv-merge-age-bias nan" "--kv-merge-max-set 1" "--kv-merge-queries -1"; do
    flag="${args%% *}"
    for tool in llama-completion llama-server; do
        name="(d) $tool $args"
        extra=(-n 1 -p hi)
        [ "$tool" = llama-server ] && extra=(--port "$PORT")
        # shellcheck disable=SC2086
        timeout "$(tmo 60)" "$BIN/$tool" -m "$MODEL" $args --kv-merge -t "$THREADS" "${extra[@]}" > "$WORK/d.out" 2> "$WORK/d.err" < /dev/null
        rc=$?
        msg="$(grep -h -m 1 -- "error.*$flag" "$WORK/d.err" "$WORK/d.out")"
        if [ $rc -eq 0 ]; then
            fail "$name" "exit code 0"
        elif [ $rc -ge 124 ]; then
            fail "$name" "exit code $rc (signal or timeout)"
        elif [ -z "$msg" ]; then
            fail "$name" "exit code $rc, but no error message naming $flag"
        elif grep -q -- "invalid argument: $flag" <<< "$msg"; then
            # what any unknown flag prints: the flag itself is missing (or misspelled)
            fail "$name" "$flag is not a known flag: $msg"
        else
            pass "$name" "exit code $rc: $msg"
        fi
    done
done
# the check above tells a refused value from an unknown flag: an unknown one prints "invalid argument: FLAG"
timeout "$(tmo 60)" "$BIN/llama-completion" -m "$MODEL" --kv-merge-nosuch 1 --kv-merge -n 1 -p hi > "$WORK/d.out" 2> "$WORK/d.err" < /dev/null
if grep -q -- "invalid argument: --kv-merge-nosuch" "$WORK/d.err" "$WORK/d.out"; then
    pass "(d) an unknown flag prints what the checks above tell apart" "$(grep -h -m 1 'invalid argument' "$WORK/d.err" "$WORK/d.out")"
else
    fail "(d) an unknown flag prints what the checks above tell apart" "$(tail -n 2 "$WORK/d.err" | tr '\n' ' ')"
fi

# ------------------------------------------------------------------------------------------------ (e)
RPC_BIN=""
for t in rpc-server ggml-rpc-server; do
    [ -x "$BIN/$t" ] && RPC_BIN="$BIN/$t" && break
done
if [ -z "$RPC_BIN" ]; then
    skip "(e) RPC" "no rpc-server in $BIN (build with -DGGML_RPC=ON)"
else
    RPC_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    rlog="$WORK/rpc-server.log"
    "$RPC_BIN" -H 127.0.0.1 -p "$RPC_PORT" -t "$THREADS" > "$rlog" 2>&1 < /dev/null &
    RPC_PID=$!
    up=0
    for _ in $(seq 1 $((60 * SCALE))); do
        if ! kill -0 "$RPC_PID" 2>/dev/null; then break; fi
        if python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' "$RPC_PORT" 2>/dev/null; then
            up=1; break
        fi
        sleep 1
    done
    if [ "$up" != 1 ]; then
        fail "(e) rpc-server on 127.0.0.1:$RPC_PORT" "not listening ($(tail -n 3 "$rlog" | tr '\n' ' '))"
    else
        # the flags of (a) -fa on / off, with the model and the cache on the RPC device
        for fa in on off; do
            name="(e) completion --rpc 127.0.0.1:PORT -ngl 99 -c 256 --context-shift --kv-merge -n 700 -fa $fa = local"
            out="$WORK/rpc-$fa.txt"; log="$WORK/rpc-$fa.log"; ref="$WORK/compl-$fa.txt"
            t0=$(date +%s)
            timeout "$(tmo 300)" "$BIN/llama-completion" -m "$MODEL" --rpc "127.0.0.1:$RPC_PORT" -ngl 99 -c 256 --context-shift \
                --kv-merge -lv 4 -n 700 --ignore-eos -no-cnv --temp 0 -t "$THREADS" -fa "$fa" --no-warmup -p "$PROMPT" \
                > "$out" 2> "$log" < /dev/null
            rc=$?
            dt=$(( $(date +%s) - t0 ))
            n_merge="$(grep -c 'kv-merge: [0-9]* -> [0-9]* cells' "$log")"
            refused="$(grep -c 'kv-merge refused' "$log")"
            # libllama's line for the cache's buffer: "llama_kv_cache: RPC0[127.0.0.1:PORT] KV buffer size = ..."
            kvbuf="$(grep -m 1 'llama_kv_cache: .*KV buffer size' "$log" | sed 's/.*llama_kv_cache: *//')"
            if [ $rc -ne 0 ]; then
                fail "$name" "exit code $rc (log: $(tail -n 3 "$log" | tr '\n' ' '))"
            elif ! grep -q "llama_kv_cache: *RPC[0-9]*\[127.0.0.1:$RPC_PORT\] KV buffer size" "$log" \
                    || grep -q 'llama_kv_cache: *CPU KV buffer size' "$log"; then
                fail "$name" "the KV cache is not (only) in the RPC buffer: $(grep 'KV buffer size' "$log" | tr '\n' ' ')"
            elif [ "$n_merge" -lt 2 ] || [ "$refused" -ne 0 ]; then
                fail "$name" "$n_merge kv-merge log lines (want >= 2), $refused refused"
            elif [ ! -s "$ref" ]; then
                fail "$name" "no local output of (a) -fa $fa to compare with"
            elif ! cmp -s "$out" "$ref"; then
                fail "$name" "$n_merge merges, but the text differs from the local run: $(cmp "$out" "$ref" | head -n 1)"
            else
                pass "$name" "$n_merge merges in $kvbuf, $(wc -c < "$out") bytes identical to the local run, ${dt}s"
            fi
        done
        for fa in 1 0; do
            KVM_RT_RPC="127.0.0.1:$RPC_PORT" run_rt "(e)" "state_roundtrip fa=$fa rpc" "$fa" "$(tmo 300)"
        done
    fi
    if ! kill -0 "$RPC_PID" 2>/dev/null; then
        fail "(e) rpc-server still running after the runs" "$(tail -n 3 "$rlog" | tr '\n' ' ')"
    fi
    stop_pid "$RPC_PID"; RPC_PID=""
fi

# ------------------------------------------------------------------------------------------------ sanitizers
# a report that some exit path swallowed (or a tool that kept going) still fails the run
if [ "$SAN" = 1 ]; then
    # stderr of every run (stdout holds generated text, which may say anything)
    logs=("$WORK"/*.log "$WORK"/*.err)
    reports="$(grep -l -E 'ERROR: (Address|Leak)Sanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer' "${logs[@]}" 2>/dev/null)"
    if [ -n "$reports" ]; then
        for f in $reports; do
            fail "sanitizer report in $(basename "$f")" "$(grep -m 1 -E 'ERROR: |runtime error:' "$f")"
        done
    else
        pass "sanitizers: no report in the ${#logs[@]} logs"
    fi
fi

echo "test-llama: checks took $(( $(date +%s) - t_checks )) s" >&2
finish
