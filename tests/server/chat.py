#!/usr/bin/env python3
"""Long chats and long prompts through llama-server (and llama-cli) with --kv-merge, as a user runs them.

Every check talks to the real server through the official OpenAI Python client, on the real model:

  chat40     a 48-turn chat at -c 512 (the conversation is over 6x the context): no error; once the
             cache has been compressed, each turn processes only its new tokens; the cells in use never
             exceed the context; the system prompt's tokens and the role markers of older turns
             ("<|im_start|>assistant\n") are still cached at the end; a second run
             on a fresh server answers the same, word for word (temperature 0)
  parallel   -np 4, without and with --kv-unified: four conversations at once, each compressing its
             own slot (how many replies equal the solo run is printed: see test_parallel)
  longdoc    a 16k-token document and a question as one prompt at -c 2048: answered by the server
             (chat endpoint) and by llama-cli
  stock      without --kv-merge the stock errors stay: the long prompt and the long chat get HTTP 400
             "exceeds the available context size"
  configs    a chat past the context with -fa off, q8_0, q4_0 and bf16 caches, speculative decoding
  slots      --slot-save-path: a compressed slot saved, erased and restored stands for its whole history
             and the next turn processes only its new tokens; truncated and corrupted files are refused
             (HTTP error) and the server goes on

Prints PASS/FAIL per check and "N passed, M failed" last; exits 1 on any failure.
  tests/server/chat.py --bin build/llama.cpp-build/bin --model M.gguf [--only chat40,longdoc]
"""

import argparse
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import openai

N_PASS = 0
N_FAIL = 0


def check(name, ok, why=""):
    global N_PASS, N_FAIL
    if ok:
        N_PASS += 1
        print(f"PASS: {name}" + (f" - {why}" if why else ""), flush=True)
    else:
        N_FAIL += 1
        print(f"FAIL: {name}" + (f" - {why}" if why else ""), flush=True)
    return ok


def sentences():
    """Deterministic sentences of real prose, from the Python language reference every CPython ships."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for s in re.split(r"(?<=[.!?])\s+", " ".join(topics[key].split())):
            if 40 <= len(s) <= 200 and s[0].isupper():
                out.append(s)
    return out


SENT = sentences()
SYSTEM = "You are a concise assistant. Answer in one or two sentences. The project's code word is AZURE-17."


class Server:
    def __init__(self, args, extra, name, env=None):
        self.port = args.port
        self.log = open(os.path.join(args.work, f"server-{name}.log"), "w")
        cmd = [os.path.join(args.bin, "llama-server"), "-m", args.model, "-t", str(args.threads),
               "--port", str(self.port), "--host", "127.0.0.1", "--temp", "0", "--seed", "1", "--slots", "--metrics"] + extra
        e = dict(os.environ, LLAMA_SERVER_SLOTS_DEBUG="1")
        e.update(env or {})
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=e)
        t0 = time.time()
        while time.time() - t0 < 120:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}: {' '.join(cmd)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                time.sleep(0.3)
        else:
            raise RuntimeError("llama-server did not become healthy")
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0,
                                    timeout=600)

    def get(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
            return r.read().decode()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def user_turn(conv, i):
    s = SENT[(conv * 997 + i * 7) % len(SENT)]
    t = SENT[(conv * 991 + i * 13 + 1) % len(SENT)]
    return f"Turn {i}. Explain briefly: {s} {t}"


def chat(server, conv, n_turns, max_tokens=40, id_slot=None):
    """One conversation as a chat UI runs it: the whole history is sent every turn."""
    messages = [{"role": "system", "content": SYSTEM + f" You are assistant number {conv}."}]
    turns = []
    for i in range(n_turns):
        messages.append({"role": "user", "content": user_turn(conv, i)})
        extra = {"id_slot": id_slot} if id_slot is not None else {}
        r = server.client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens,
                                                  temperature=0, seed=1, extra_body=extra)
        d = r.to_dict()
        text = d["choices"][0]["message"]["content"] or ""
        turns.append({"text": text, "usage": d.get("usage", {}), "timings": d.get("timings", {})})
        messages.append({"role": "assistant", "content": text})
    return turns


def test_chat40(args):
    # 48 turns: the 40 the check asks for, and enough that the conversation stays over 6x the context
    # when the model answers tersely (about 78 tokens a turn)
    n_ctx, n_turns = 512, 48
    runs = []
    for run in range(2):
        with Server(args, ["-c", str(n_ctx), "-np", "1", "--kv-merge"], f"chat40-{run}") as srv:
            try:
                turns = chat(srv, 0, n_turns)
            except Exception as e:  # any HTTP error fails the check
                check(f"chat40: {n_turns} turns answered", False, f"run {run}: {type(e).__name__}: {e}")
                return
            slots = json.loads(srv.get("/slots"))
            metrics = srv.get("/metrics")
        runs.append((turns, slots, metrics))

    turns, slots, metrics = runs[0]
    check(f"chat40: {n_turns} turns answered", len(turns) == n_turns and all(t["text"] for t in turns),
          f"{sum(1 for t in turns if t['text'])} non-empty replies")
    total = turns[-1]["usage"]["prompt_tokens"] + turns[-1]["usage"]["completion_tokens"]
    check("chat40: the conversation is at least 6x the context", total >= 6 * n_ctx, f"{total} tokens, context {n_ctx}")

    events = [t["timings"].get("kv_merge", {}).get("events", 0) for t in turns]
    first = next((i for i, e in enumerate(events) if e > 0), None)
    check("chat40: the cache was compressed", first is not None, f"first event in turn {first}, {sum(events)} events")
    # A turn's new tokens are its prompt minus the history the cache stood for after the previous
    # reply. llama-server matches tokens, and the client sends the previous reply back as text, which
    # can tokenize differently from the tokens that were generated: like stock llama-server, the
    # server then processes that reply again (at most its completion tokens). Nothing older may be.
    worst = []
    prev_hist = prev_reply = None
    for i, t in enumerate(turns):
        km = t["timings"].get("kv_merge", {})
        if first is not None and i > first and prev_hist is not None:
            new = t["usage"]["prompt_tokens"] - prev_hist
            extra = t["timings"]["prompt_n"] - new
            worst.append((extra - prev_reply, extra, i, t["timings"]["prompt_n"], new, prev_reply))
        prev_hist = km.get("n_history")
        prev_reply = t["usage"]["completion_tokens"]
    over = max(worst) if worst else None
    n_exact = sum(1 for w in worst if w[1] <= 8)
    check("chat40: after the first compression a turn processes only its new tokens and at most its previous reply",
          bool(worst) and over[0] <= 8,
          f"{n_exact} of {len(worst)} turns within 8 of their new tokens; worst turn {over[2]}: prompt_n {over[3]} "
          f"for {over[4]} new tokens after a {over[5]}-token reply" if over else "no turn after it")
    cells = [t["timings"].get("kv_merge", {}).get("n_cells", 0) for t in turns]
    check("chat40: cells in use never exceed the context", max(cells) <= n_ctx and slots[0]["n_cells"] <= n_ctx,
          f"max {max(cells)} cells, /slots n_cells {slots[0]['n_cells']}, n_history {slots[0]['n_history']}")
    check("chat40: /slots stands for more tokens than it has cells", slots[0]["n_history"] > slots[0]["n_cells"],
          f"n_history {slots[0]['n_history']}, n_cells {slots[0]['n_cells']}")
    cells_text = slots[0].get("cells", "")
    check("chat40: the system prompt's tokens are still cached at the end", SYSTEM in cells_text[:len(SYSTEM) + 64],
          repr(cells_text[:80]))
    m = re.search(r"kv_merge_events_total (\d+)", metrics)
    check("chat40: /metrics counts the events", m is not None and int(m.group(1)) == sum(events),
          f"{m.group(0) if m else 'no counter'}, responses say {sum(events)}")
    # the chat template's control sequences of older turns stay as they were: the server pins those of
    # the newest turns, up to a quarter of the cells (about 12 markers at -c 512); older ones may go
    starts = [m.start() for m in re.finditer(re.escape("<|im_start|>"), cells_text)]
    whole = [i for i in starts if re.match(r"<\|im_start\|>(user|assistant|system)\n", cells_text[i:])]
    check("chat40: the role markers of older turns are still cached, whole",
          len(whole) >= 12,
          f"{len(starts)} '<|im_start|>' in the cells, {len(whole)} followed by their role and line break")
    same = [a["text"] == b["text"] for a, b in zip(runs[0][0], runs[1][0])]
    check("chat40: temperature 0 answers the same in a second run", all(same) and len(same) == n_turns,
          f"{sum(same)} of {len(same)} turns equal")


def test_parallel(args):
    """-np 4, without and with --kv-unified: four chats at once, each compressing its own slot.

    With more than one slot, --kv-merge turns on batch-invariant kernels (llama_set_batch_invariant): a
    token's logits and K/V rows then do not depend on what else its batch held, so each slot's greedy
    replies must equal its solo run. Checked without --kv-unified. With --kv-unified the slots share one
    buffer and a slot's cells interleave with the others' in an order that depends on them; attention
    sums its cells in buffer order, so the last bits still follow the other slots and compression can turn
    them into another choice of cells: the count of equal replies is printed, not checked.
    With --kv-merge-batch-invariant off the count drops (28 of 64 equal when it was measured).
    """
    n_turns = 16
    for unified in (False, True):
        name = "parallel" + (" --kv-unified" if unified else "")
        # unified: one 2048-cell buffer shared by the four slots, each capped at 512 cells
        extra = ["-c", "2048", "-np", "4", "--kv-merge"]
        extra += ["--kv-unified", "--kv-unified-per-slot", "512"] if unified else []
        solo = {}
        with Server(args, extra, f"{name.replace(' ', '')}-solo") as srv:
            for c in range(4):
                solo[c] = chat(srv, c, n_turns, id_slot=c)
        with Server(args, extra, name.replace(" ", "")) as srv:
            with concurrent.futures.ThreadPoolExecutor(4) as ex:
                futs = {c: ex.submit(chat, srv, c, n_turns, 40, c) for c in range(4)}
                together = {c: f.result() for c, f in futs.items()}
        ev = [sum(t["timings"].get("kv_merge", {}).get("events", 0) for t in together[c]) for c in range(4)]
        cells = [max(t["timings"].get("kv_merge", {}).get("n_cells", 0) for t in together[c]) for c in range(4)]
        # each slot's state at its last reply: /slots afterwards may show an idle slot emptied, since with
        # --kv-unified the server moves idle slots to its RAM prompt cache (--cache-idle-slots)
        last = [together[c][-1]["timings"].get("kv_merge", {}) for c in range(4)]
        hist = [(k.get("n_history", 0), k.get("n_cells", 0)) for k in last]
        check(f"{name}: four concurrent chats each compress their own slot, within its 512 cells",
              all(e > 0 for e in ev) and max(cells) <= 512 and all(h > n for h, n in hist),
              f"events per slot {ev}, most cells {cells}, (n_history, n_cells) at the last reply {hist}")
        same = sum(solo[c][i]["text"] == together[c][i]["text"] for c in range(4) for i in range(n_turns))
        first = [next((i for i in range(n_turns) if solo[c][i]["text"] != together[c][i]["text"]), None) for c in range(4)]
        msg = f"{same} of {4 * n_turns} replies equal the solo run; first differing turn per slot {first}"
        if unified:
            print(f"# {name}: {msg}", flush=True)
        else:
            check(f"{name}: each slot's greedy replies equal its solo run, merges included", same == 4 * n_turns, msg)


def long_document(n_tokens_target):
    """About n_tokens_target tokens of prose (SmolLM2's tokenizer: about 4.6 characters a token here)."""
    return " ".join(SENT)[: n_tokens_target * 5]


def test_longdoc(args):
    doc = long_document(16000)
    question = "What is the main subject of the document above? Answer in one sentence."
    with Server(args, ["-c", "2048", "-np", "1", "--kv-merge"], "longdoc") as srv:
        try:
            r = srv.client.chat.completions.create(
                model="m", max_tokens=40, temperature=0,
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": doc + "\n\n" + question}])
            d = r.to_dict()
            text = d["choices"][0]["message"]["content"] or ""
            km = d.get("timings", {}).get("kv_merge", {})
            check("longdoc: a 16k-token prompt at -c 2048 is answered by llama-server",
                  d["usage"]["prompt_tokens"] >= 16000 and text.strip() != "" and km.get("events", 0) > 0,
                  f"{d['usage']['prompt_tokens']} prompt tokens, {km.get('events')} events, "
                  f"{km.get('n_cells')} cells, {km.get('ms', 0):.0f} ms merging: {text[:60]!r}")
        except Exception as e:
            check("longdoc: a 16k-token prompt at -c 2048 is answered by llama-server", False, f"{type(e).__name__}: {e}")

    # llama-cli: the same document as one prompt, one turn
    path = os.path.join(args.work, "doc.txt")
    with open(path, "w") as f:
        f.write(doc + "\n\n" + question)
    cmd = [os.path.join(args.bin, "llama-cli"), "-m", args.model, "-t", str(args.threads), "-c", "2048",
           "--kv-merge", "-f", path, "-st", "-n", "40", "--temp", "0", "--simple-io"]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    with open(os.path.join(args.work, "cli-longdoc.log"), "w") as f:
        f.write(out)
    m = re.search(r"\[kv-merge: (\d+) compression events freed (\d+) cells.*?the chat is (\d+) tokens in (\d+) cells\]", out)
    check("longdoc: llama-cli answers the same prompt and prints what it compressed",
          p.returncode == 0 and m is not None and "exceeds the available context" not in out,
          f"rc {p.returncode}, " + (m.group(0) if m else f"no kv-merge line; tail {out[-300:]!r}"))


def test_stock(args):
    doc = long_document(16000)
    with Server(args, ["-c", "2048", "-np", "1", "--context-shift"], "stock") as srv:
        try:
            srv.client.chat.completions.create(model="m", max_tokens=8,
                                               messages=[{"role": "user", "content": doc}])
            check("stock: without --kv-merge a prompt over the context is refused", False, "it was answered")
        except openai.BadRequestError as e:
            check("stock: without --kv-merge a prompt over the context is refused",
                  "exceeds the available context size" in str(e), str(e)[:120])
    with Server(args, ["-c", "512", "-np", "1", "--context-shift"], "stock-chat") as srv:
        try:
            turns = chat(srv, 0, 40)
            check("stock: without --kv-merge the long chat fails", False, f"{len(turns)} turns answered")
        except openai.BadRequestError as e:
            check("stock: without --kv-merge the long chat fails", "exceeds the available context size" in str(e),
                  str(e)[:120])


def post(server, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode() or "{}")


def compressed_chat(name, server, n_ctx, n_turns=14, conv=0):
    """A chat past the context: every reply non-empty, the cache compressed, the cells within the context."""
    turns = chat(server, conv, n_turns)
    km = [t["timings"].get("kv_merge", {}) for t in turns]
    events = sum(k.get("events", 0) for k in km)
    most = max(k.get("n_cells", 0) for k in km)
    total = turns[-1]["usage"]["prompt_tokens"] + turns[-1]["usage"]["completion_tokens"]
    check(f"{name}: a {n_turns}-turn chat past the context is answered and compressed",
          all(t["text"] for t in turns) and events > 0 and most <= n_ctx and total > n_ctx,
          f"{total} tokens at -c {n_ctx}, {events} events, most cells {most}")
    return turns


def test_busy(args):
    """A request for a busy slot (id_slot) must not touch the reply that slot is generating.

    Stock llama-server's get_available_slot saves and reloads the RAM prompt cache (--cache-ram, on by
    default) for the slot a request names before it sees that the slot is busy and defers the request:
    the running sequence's cache is replaced mid-reply (found by tests/server/load.py). The patch skips
    the cache update for a busy slot."""
    # the story's prompt is long and the other one short, so that the RAM cache's entry for the other one
    # matches the queued request better than the busy slot's prompt does: stock then loads it into the slot
    story = long_document(300) + "\n\nTell me a long story about a lighthouse keeper and a storm."
    other = "List ten facts about the moon, one per line."
    body = {"id_slot": 0, "ignore_eos": True}
    with Server(args, ["-c", "2048", "-np", "2", "--kv-merge"], "busy") as srv:
        def ask(content, stream_then=None):
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]
            if stream_then is None:
                r = srv.client.chat.completions.create(model="m", messages=msgs, max_tokens=48, temperature=0,
                                                       extra_body=body)
                return r.choices[0].message.content or ""
            text, started = "", False
            for ch in srv.client.chat.completions.create(model="m", messages=msgs, max_tokens=48, temperature=0,
                                                         stream=True, extra_body=body):
                if ch.choices and ch.choices[0].delta.content:
                    text += ch.choices[0].delta.content
                    if not started:
                        started = True
                        stream_then()
            return text

        alone = ask(story)
        ask(other)   # the RAM cache now holds the story's prompt, slot 0 the other one
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            fut = []
            during = ask(story, stream_then=lambda: fut.append(ex.submit(ask, other)))
            queued = fut[0].result() if fut else ""
        check("busy: a request for a busy slot leaves the slot's running reply as it is (RAM prompt cache on)",
              during == alone and queued.strip() != "",
              f"reply {'equal to' if during == alone else 'differs from'} its run alone: {during[:60]!r} vs {alone[:60]!r}")


def test_configs(args):
    """Every configuration users run: flash attention off, quantized and bf16 caches, speculative decoding."""
    n_ctx = 512
    configs = [
        ("-fa off (V transposed)", ["-fa", "off"]),
        ("q8_0 cache", ["-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"]),
        ("q4_0 cache", ["-fa", "on", "-ctk", "q4_0", "-ctv", "q4_0"]),
        ("bf16 cache (K-shift through f32)", ["-fa", "on", "-ctk", "bf16", "-ctv", "bf16"]),
        # the draft context drops the same positions at each event (the model drafts for itself here)
        ("speculative decoding", ["--spec-type", "draft-simple", "-md", args.model, "--spec-draft-n-max", "4",
                                  "--spec-draft-n-min", "1"]),
    ]
    for name, extra in configs:
        try:
            with Server(args, ["-c", str(n_ctx), "-np", "1", "--kv-merge"] + extra, "cfg-" + re.sub(r"\W+", "_", name)) as srv:
                turns = compressed_chat(f"configs: {name}", srv, n_ctx, n_turns=10)
            if "-md" in extra:
                # the model drafts for itself: a draft context that went out of step with the target's
                # compressed cache would have its drafts rejected
                ev = [t["timings"].get("kv_merge", {}).get("events", 0) for t in turns]
                after = turns[next(i for i, e in enumerate(ev) if e > 0) + 1:] if any(ev) else []
                n = sum(t["timings"].get("draft_n", 0) for t in after)
                acc = sum(t["timings"].get("draft_n_accepted", 0) for t in after)
                check("configs: speculative decoding: drafts are accepted after compression", n > 0 and acc >= 0.8 * n,
                      f"{acc} of {n} drafted tokens accepted in the {len(after)} turns after the first event")
        except Exception as e:
            check(f"configs: {name}: a 10-turn chat past the context is answered and compressed", False,
                  f"{type(e).__name__}: {e}")


def test_slots(args):
    """--slot-save-path: a compressed slot saved and restored keeps its history; bad files are refused."""
    n_ctx = 512
    save = os.path.join(args.work, "slots")
    os.makedirs(save, exist_ok=True)
    with Server(args, ["-c", str(n_ctx), "-np", "1", "--kv-merge", "--slot-save-path", save], "slots") as srv:
        turns = compressed_chat("slots", srv, n_ctx, n_turns=12)
        hist = turns[-1]["timings"]["kv_merge"]["n_history"]
        st, saved = post(srv, "/slots/0?action=save", {"filename": "chat.bin"})
        check("slots: a compressed slot is saved", st == 200, f"{st} {saved}")
        st, _ = post(srv, "/slots/0?action=erase", {})
        st, restored = post(srv, "/slots/0?action=restore", {"filename": "chat.bin"})
        slot = json.loads(srv.get("/slots"))[0]
        check("slots: restored, it stands for the whole history again", st == 200 and slot["n_history"] == hist,
              f"{st}, n_history {slot.get('n_history')} (saved {hist}), n_cells {slot.get('n_cells')}")
        # the next turn matches the restored history: only its new tokens are processed
        messages = [{"role": "system", "content": SYSTEM + " You are assistant number 0."}]
        for i, t in enumerate(turns):
            messages += [{"role": "user", "content": user_turn(0, i)}, {"role": "assistant", "content": t["text"]}]
        messages.append({"role": "user", "content": user_turn(0, len(turns))})
        d = srv.client.chat.completions.create(model="m", messages=messages, max_tokens=20, temperature=0,
                                               extra_body={"id_slot": 0}).to_dict()
        new = d["usage"]["prompt_tokens"] - hist
        check("slots: the turn after a restore processes its new tokens, not the conversation",
              d["timings"]["prompt_n"] <= new + turns[-1]["usage"]["completion_tokens"] + 8,
              f"prompt_n {d['timings']['prompt_n']} for {new} new tokens")

        # a damaged slot file is refused with an error, and the server goes on
        with open(os.path.join(save, "chat.bin"), "rb") as f:
            good = f.read()
        bad = {"truncated by 1 byte": good[:-1], "truncated by 3 bytes": good[:-3],
               "truncated to half": good[: len(good) // 2], "one byte flipped": bytearray(good)}
        bad["one byte flipped"][len(good) // 2] ^= 0x10
        for what, data in bad.items():
            with open(os.path.join(save, "bad.bin"), "wb") as f:
                f.write(bytes(data))
            st, body = post(srv, "/slots/0?action=restore", {"filename": "bad.bin"})
            alive = srv.proc.poll() is None and json.loads(srv.get("/health")).get("status") == "ok"
            check(f"slots: a slot file {what} is refused, the server goes on", st >= 400 and alive,
                  f"HTTP {st}: {str(body.get('error', body))[:90]}")


def arg_parser(doc):
    """The command line every server test shares: where the tools and the model are, threads, port, logs."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=18500 + os.getpid() % 1000)
    ap.add_argument("--work", default=None)
    return ap


def main():
    ap = arg_parser(__doc__)
    ap.add_argument("--only", default="chat40,parallel,longdoc,stock,busy,configs,slots")
    args = ap.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="kvm-chat.")
    os.makedirs(args.work, exist_ok=True)
    tests = {"chat40": test_chat40, "parallel": test_parallel, "longdoc": test_longdoc, "stock": test_stock,
             "busy": test_busy,
             "configs": test_configs, "slots": test_slots}
    for name in args.only.split(","):
        t0 = time.time()
        try:
            tests[name](args)
        except Exception as e:
            check(f"{name}: ran", False, f"{type(e).__name__}: {e}")
        print(f"# {name}: {time.time() - t0:.0f} s (logs in {args.work})", flush=True)
    print(f"{N_PASS} passed, {N_FAIL} failed")
    sys.exit(1 if N_FAIL else 0)


if __name__ == "__main__":
    main()
