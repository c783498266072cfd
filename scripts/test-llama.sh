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
#       --kv-merge-* flag at a valid value, with q8_0, q4_0 and bf16 caches, and query-free): merges happen,
#       each on a full cache and keeping the --kv-merge-keep share of it, with the attention of the kept queries
#       (none with query-free), the text stays text, the merge logs the parameters and profile the flags set
#       (the default method, EVICT_FOLD, without flags)
#   (c) llama-server -np 2 --kv-merge: two long concurrent /completion requests each equal the request run alone
#   (d) bad --kv-merge-* values exit non-zero with a message naming the flag (not the unknown-flag message),
#       no signal
# Each check prints PASS/FAIL with a reason; the last line is "N passed, M failed"; exit 1 on any failure.
#
# Env: KVM_TEST_SKIP_BUILD=1  do not run build-llama.sh (use the tools already built)
#      KVM_TEST_THREADS       threads for the model runs (default 1)
#      KVM_TEST_PORT          server port (default 18080 + $$ % 1000)
#      KVM_TEST_KEEP=1        keep the work dir (logs) at the end
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
THREADS="${KVM_TEST_THREADS:-1}"
PORT="${KVM_TEST_PORT:-$((18080 + $$ % 1000))}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kvm-test-llama.XXXXXX")"
BLD="$REPO/build/llama.cpp-build"
BIN="$BLD/bin"
SRC="$REPO/build/llama.cpp"

SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
    fi
    if [ "${KVM_TEST_KEEP:-0}" = "1" ]; then
        echo "test-llama: logs kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

N_PASS=0
N_FAIL=0
pass() { echo "PASS: $1${2:+ - $2}"; N_PASS=$((N_PASS + 1)); }
fail() { echo "FAIL: $1${2:+ - $2}"; N_FAIL=$((N_FAIL + 1)); }
finish() {
    echo "$N_PASS passed, $N_FAIL failed"
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
    "$REPO/scripts/build-llama.sh" >&2 || die "scripts/build-llama.sh failed"
fi
for t in llama-completion llama-server; do
    [ -x "$BIN/$t" ] || die "$BIN/$t missing"
done
MODEL="$("$REPO/scripts/fetch-model.sh")" || die "scripts/fetch-model.sh failed"
[ -f "$MODEL" ] || die "no model at $MODEL"

# tests/llama/state_roundtrip.cpp against the static libs (+ OpenMP when ggml-cpu was built with it)
RT="$WORK/state_roundtrip"
LIBS=("$BLD/src/libllama.a" "$BLD/ggml/src/libggml.a" "$BLD/ggml/src/libggml-cpu.a" "$BLD/ggml/src/libggml-base.a")
for l in "${LIBS[@]}" "$REPO/target/release/libkvmerger.a"; do
    [ -f "$l" ] || die "$l missing (build with scripts/build-llama.sh)"
done
OMP=()
if grep -q '^GGML_OPENMP:BOOL=ON' "$BLD/CMakeCache.txt" 2>/dev/null; then OMP=(-fopenmp); fi
g++ -std=c++17 -O1 "${OMP[@]}" -I"$SRC/include" -I"$SRC/ggml/include" -I"$REPO/include" \
    "$REPO/tests/llama/state_roundtrip.cpp" -o "$RT" \
    "${LIBS[@]}" "$REPO/target/release/libkvmerger.a" "${OMP[@]}" -lpthread -ldl -lm \
    2> "$WORK/rt-build.log" || { cat "$WORK/rt-build.log" >&2; die "building tests/llama/state_roundtrip.cpp failed"; }
echo "test-llama: setup took $(( $(date +%s) - t_setup )) s" >&2
t_checks=$(date +%s)

PROMPT="Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker who"

# ------------------------------------------------------------------------------------------------ (b)
for fa in 1 0; do
    t0=$(date +%s)
    # the flash-attention run leaves its calibration profile for (a)
    profile=""; [ "$fa" = 1 ] && profile="$WORK/rt.profile"
    KVM_RT_PROFILE="$profile" timeout 180 "$RT" "$MODEL" "$fa" > "$WORK/rt-$fa.txt" 2> "$WORK/rt-$fa.log"
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    while IFS= read -r line; do
        case "$line" in
            PASS:*) pass "(b) ${line#PASS: }" ;;
            FAIL:*) fail "(b) ${line#FAIL: }" ;;
        esac
    done < "$WORK/rt-$fa.txt"
    if [ $rc -ne 0 ] && ! grep -q '^FAIL' "$WORK/rt-$fa.txt"; then
        fail "(b) state_roundtrip fa=$fa" "exit code $rc without a FAIL line (log: $(tail -n 3 "$WORK/rt-$fa.log" | tr '\n' ' '))"
    elif [ $rc -eq 0 ]; then
        echo "      (state_roundtrip fa=$fa: ${dt}s)"
    fi
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
for run in on off calib best flags q8_0 q4_0 bf16 query-free; do
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
    timeout 240 "$BIN/llama-completion" -m "$MODEL" -c 256 --context-shift --kv-merge "${extra[@]}" "${lv[@]}" -n 700 --ignore-eos -no-cnv \
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
    elif [ "$run" = query-free ] && [ "$n_attn" -ne 0 ]; then
        fail "$name" "$n_attn merges read attention with --kv-merge-pivot query-free"
    elif [ "$run" != query-free ] && [ "$run" != best ] && [ "$n_attn" -lt "$n_merge" ]; then
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
python3 - "$PORT" "$WORK" "$PROMPT" > "$WORK/server-check.txt" 2>&1 <<'PY'
import json, sys, threading, time, urllib.request
port, work, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
base = f"http://127.0.0.1:{port}"
deadline = time.time() + 60
while True:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as r:
            if r.status == 200:
                break
    except Exception:
        pass
    if time.time() > deadline:
        print("server did not become healthy in 60 s"); sys.exit(1)
    time.sleep(0.5)

prompts = [prompt, "The history of the printing press begins in the fifteenth century, when"]

def req(p):
    body = json.dumps({"prompt": p, "n_predict": 400, "temperature": 0, "top_k": 1, "cache_prompt": False,
                       "ignore_eos": True, "seed": 1}).encode()
    r = urllib.request.Request(base + "/completion", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(r, timeout=240) as f:
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
            "--kv-merge-pivot nosuch" "--kv-merge-age-bias nan" "--kv-merge-max-set 1"; do
    flag="${args%% *}"
    for tool in llama-completion llama-server; do
        name="(d) $tool $args"
        extra=(-n 1 -p hi)
        [ "$tool" = llama-server ] && extra=(--port "$PORT")
        # shellcheck disable=SC2086
        timeout 60 "$BIN/$tool" -m "$MODEL" $args --kv-merge -t "$THREADS" "${extra[@]}" > "$WORK/d.out" 2> "$WORK/d.err" < /dev/null
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
timeout 60 "$BIN/llama-completion" -m "$MODEL" --kv-merge-nosuch 1 --kv-merge -n 1 -p hi > "$WORK/d.out" 2> "$WORK/d.err" < /dev/null
if grep -q -- "invalid argument: --kv-merge-nosuch" "$WORK/d.err" "$WORK/d.out"; then
    pass "(d) an unknown flag prints what the checks above tell apart" "$(grep -h -m 1 'invalid argument' "$WORK/d.err" "$WORK/d.out")"
else
    fail "(d) an unknown flag prints what the checks above tell apart" "$(tail -n 2 "$WORK/d.err" | tr '\n' ' ')"
fi

echo "test-llama: checks took $(( $(date +%s) - t_checks )) s" >&2
finish
