#!/usr/bin/env python3
"""A load test of llama-server with --kv-merge: 4 slots, concurrent clients, chats and prompts past the context,
cancellations and disconnects mid-stream, malformed bodies; a bounded number of requests on loopback.

  llama-server -c 2048 -np 4 --kv-merge --cache-ram 0      (512 cells a slot; batch-invariant kernels on)

A fixed schedule (random.Random(SEED)) of 36 requests from 8 client threads, run twice on one server
(a warm-up phase, then the same schedule again):

  chat        multi-turn chats past the 512 cells of a slot, the whole history sent every turn; each chat
              owns its slot (slots 0 and 1)
  long        single prompts of 1500-2000 tokens (past the slot: accepted with --kv-merge), slots 2 and 3
  cancel      streaming requests the OpenAI client closes after a few chunks
  disconnect  raw sockets that close mid-headers, mid-body, or mid-stream (some with a TCP reset)
  prefill     long prompts (slot 3) whose raw socket closes (or resets) while the slot still reads the prompt
  malformed   bodies the server must refuse with 4xx

Every request that can take a slot names it (id_slot): a chat's next turn then finds its own history, and
the single prompts run with cache_prompt false, so what a slot does depends only on its own requests, not
on timing. With -np 4 and --kv-merge the server computes each token as if it were alone in its batch, so:

  - every completed greedy request (each chat turn, each long prompt), in both phases, answers word for word
    what it answers alone: the solo reference runs the same requests one at a time, each chat whole and in
    order, on a fresh server with the same flags
  - the server is alive and /health ok after every phase; no request got a 5xx; the refused bodies got 4xx
  - a prefill whose client left is dropped there: the task leaves its slot before it has read its prompt
    (n_history in /slots) and with no token made, and the long prompt the same client thread sends next on
    that slot still equals its solo run
  - VmRSS (/proc/PID/status, sampled every 0.5 s) at the end of the second phase is within RSS_BOUND_MIB of
    its value at the end of the warm-up phase: with --cache-ram 0 nothing is kept between requests (the KV
    cache and compute buffers are allocated at start), so what remains is allocator noise
  - /slots at the end: no slot processing, cells within the slot's 512, n_history >= n_cells, and the chat
    slots stand for more tokens than they hold

The checks can fail: with --kv-merge-batch-invariant off the equality check fails (see the commit message).

Prints PASS/FAIL per check, the wall time, and "N passed, M failed" last; exits 1 on any failure.
  tests/server/load.py --bin build/llama.cpp-build/bin --model M.gguf [--threads 2] [--extra "--flag v"]
"""

import json
import os
import random
import shlex
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.request

import openai

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chat as C  # noqa: E402  the Server helper, check(), the prose and the system prompt

SEED = 24
N_CTX, N_SLOTS = 2048, 4
SLOT_CELLS = N_CTX // N_SLOTS
FLAGS = ["-c", str(N_CTX), "-np", str(N_SLOTS), "--kv-merge", "--cache-ram", "0"]
CHAT_TURNS, CHAT_MAX, LONG_MAX = 4, 16, 16
# Growth allowed between the end of the warm-up phase and the end of the second phase. With --cache-ram 0
# nothing per request survives it: the KV cache and compute buffers are allocated at start, and what the
# first requests touch (about 23 MiB over the start, measured) is touched again, not grown, by the second
# phase (+0.1 MiB measured); glibc's per-thread arenas may still keep a few freed pages. 16 MiB is less
# than one slot's prompt kept in RAM (512 cells of SmolLM2-135M: 11.25 MiB at f16, plus its tokens and
# the prompt cache's copy), so a cache that kept the phase's prompts, or a leak of half a MiB a request
# over the 36 requests, shows.
RSS_BOUND_MIB = 16


def schedule():
    """The requests of one phase: a list per client thread, fixed by SEED."""
    rng = random.Random(SEED)
    sys_chat = C.SYSTEM + " You are assistant number {}."

    def prose(n_chars):
        i = rng.randrange(len(C.SENT))
        out = ""
        while len(out) < n_chars:
            out += C.SENT[i % len(C.SENT)] + " "
            i += 1
        return out[:n_chars]

    def chat_req(cid, slot):
        # about 180 tokens a user turn: past the 512 cells of the slot in the third turn
        users = [f"Turn {i}. Explain briefly: " + prose(800) for i in range(CHAT_TURNS)]
        return {"kind": "chat", "id": f"chat{cid}", "slot": slot, "system": sys_chat.format(cid), "users": users}

    def long_req(lid, slot, n_tok):
        # about 4.6 characters a token in this prose
        doc = prose(int(n_tok * 4.6))
        return {"kind": "long", "id": f"long{lid}", "slot": slot, "target": n_tok,
                "messages": [{"role": "system", "content": C.SYSTEM},
                             {"role": "user", "content": doc + "\n\nWhat is the text above about? One sentence."}]}

    def short_msgs():
        return [{"role": "user", "content": "Explain briefly: " + prose(rng.randrange(150, 300))}]

    threads = [[], [], [], [], [], [], [], []]
    # threads 0 and 1: a chat on its own slot (the time this machine gives the test allows no more)
    threads[0] = [chat_req(0, 0)]
    threads[1] = [chat_req(1, 1)]
    # threads 2 and 3: a long prompt of 1500-2000 tokens on each of slots 2 and 3
    threads[2] = [long_req(0, 2, rng.randrange(1500, 2001))]
    threads[3] = [long_req(1, 3, rng.randrange(1500, 2001))]
    # threads 4 and 5: streams the client cancels after 1-4 chunks, on the long prompts' slots
    for t in (4, 5):
        for j in range(4):
            threads[t].append({"kind": "cancel", "id": f"cancel{t}{j}", "slot": 2 + (t + j) % 2,
                               "after": rng.randint(1, 4),
                               "messages": short_msgs(), "delay": rng.uniform(0.5, 3.0)})
    # thread 6: raw sockets that disconnect mid-headers, mid-body, mid-stream (graceful close or reset)
    modes = ["headers", "body", "stream", "headers-rst", "stream-rst", "body-rst", "stream"]
    for j, mode in enumerate(modes):
        threads[6].append({"kind": "disconnect", "id": f"disc{j}", "mode": mode, "slot": 2 + j % 2,
                           "frac": rng.uniform(0.1, 0.9), "after": rng.randint(1, 3), "messages": short_msgs(),
                           "delay": rng.uniform(0.5, 3.0)})
    # thread 7: malformed bodies (4xx expected), and bodies that are not JSON at all
    # (what, body, is it JSON): the JSON ones name a slot of the single prompts, in case one is accepted
    bad = [("a JSON array", b"[1, 2]", True), ("messages not an array", b'{"messages": 5, "id_slot": 2}', True),
           ("no messages", b'{"id_slot": 3}', True),
           ("max_tokens a string",
            b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "x", "id_slot": 2}', True),
           ("a message without content", b'{"messages": [{"role": "user"}], "max_tokens": 4, "id_slot": 3}', True),
           ("content a number", b'{"messages": [{"role": "user", "content": 7}], "max_tokens": 4, "id_slot": 2}', True),
           ("not JSON", b"{bad json", False),
           ("truncated JSON", b'{"messages": [{"role": "user", "content": "hi', False),
           ("empty body", b"", False)]
    for j, (what, body, is_json) in enumerate(bad):
        threads[7].append({"kind": "malformed", "id": f"bad{j}", "what": what, "body": body, "json": is_json,
                           "delay": rng.uniform(0.2, 1.5)})
    # thread 3, before its long prompt: two long prompts whose clients go away during the prefill (graceful
    # close, then TCP reset); drawn last, so that the requests above stay what they were
    pre = [dict(long_req(10 + j, 3, rng.randrange(1500, 2001)), kind="prefill", id=f"prefill{j}", mode=mode,
                marker=900 + j) for j, mode in enumerate(("close", "rst"))]
    threads[3] = pre + threads[3]
    return threads


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.rows = []  # dicts: id, kind, status, text (completed greedy ones), error

    def add(self, **row):
        with self.lock:
            self.rows.append(row)


def run_chat(srv, req, rec, phase):
    messages = [{"role": "system", "content": req["system"]}]
    for i, u in enumerate(req["users"]):
        messages.append({"role": "user", "content": u})
        rid = f"{req['id']}.t{i}"
        try:
            d = srv.client.chat.completions.create(model="m", messages=messages, max_tokens=CHAT_MAX, temperature=0,
                                                   seed=1, extra_body={"id_slot": req["slot"]}).to_dict()
        except openai.APIStatusError as e:
            rec.add(id=rid, kind="chat", phase=phase, status=e.status_code, error=str(e)[:200])
            return
        except Exception as e:
            rec.add(id=rid, kind="chat", phase=phase, status=None, error=f"{type(e).__name__}: {e}"[:200])
            return
        text = d["choices"][0]["message"]["content"] or ""
        km = d.get("timings", {}).get("kv_merge", {})
        rec.add(id=rid, kind="chat", phase=phase, status=200, text=text, prompt_tokens=d["usage"]["prompt_tokens"],
                events=km.get("events", 0), n_cells=km.get("n_cells", 0), n_history=km.get("n_history", 0))
        messages.append({"role": "assistant", "content": text})


def run_long(srv, req, rec, phase):
    try:
        extra = {"id_slot": req["slot"], "cache_prompt": False}
        d = srv.client.chat.completions.create(model="m", messages=req["messages"], max_tokens=LONG_MAX, temperature=0,
                                               seed=1, extra_body=extra).to_dict()
    except openai.APIStatusError as e:
        rec.add(id=req["id"], kind="long", phase=phase, status=e.status_code, error=str(e)[:200])
        return
    except Exception as e:
        rec.add(id=req["id"], kind="long", phase=phase, status=None, error=f"{type(e).__name__}: {e}"[:200])
        return
    km = d.get("timings", {}).get("kv_merge", {})
    rec.add(id=req["id"], kind="long", phase=phase, status=200, text=d["choices"][0]["message"]["content"] or "",
            prompt_tokens=d["usage"]["prompt_tokens"], events=km.get("events", 0), n_cells=km.get("n_cells", 0),
            n_history=km.get("n_history", 0))


def run_cancel(srv, req, rec, phase):
    """A streaming request the client closes after a few chunks (the OpenAI client closes the connection)."""
    n = 0
    try:
        stream = srv.client.chat.completions.create(model="m", messages=req["messages"], max_tokens=200,
                                                    temperature=0, stream=True,
                                                    extra_body={"id_slot": req["slot"], "cache_prompt": False})
        for _ in stream:
            n += 1
            if n >= req["after"]:
                break
        stream.close()
        rec.add(id=req["id"], kind="cancel", phase=phase, status=200, chunks=n)
    except openai.APIStatusError as e:
        rec.add(id=req["id"], kind="cancel", phase=phase, status=e.status_code, error=str(e)[:200])
    except Exception as e:
        rec.add(id=req["id"], kind="cancel", phase=phase, status=None, error=f"{type(e).__name__}: {e}"[:200])


def raw_head(srv, body, close=False):
    """The header of a POST /v1/chat/completions carrying `body`, for the requests sent over a raw socket (which
    send part of it, or go away)."""
    extra = "Connection: close\r\n" if close else ""
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode()


def run_disconnect(srv, req, rec, phase):
    """A raw socket that goes away: mid-headers, mid-body, or after a few events of a stream; -rst: TCP reset."""
    body = json.dumps({"messages": req["messages"], "max_tokens": 200, "temperature": 0, "stream": True,
                       "id_slot": req["slot"], "cache_prompt": False}).encode()
    head = raw_head(srv, body)
    mode = req["mode"]
    status = None
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=600)
    try:
        if mode.startswith("headers"):
            s.sendall(head[: int(len(head) * req["frac"])])
            time.sleep(0.2)
        elif mode.startswith("body"):
            s.sendall(head + body[: int(len(body) * req["frac"])])
            time.sleep(0.2)
        else:
            s.sendall(head + body)
            buf = b""
            while buf.count(b"data: ") < req["after"]:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            if buf.startswith(b"HTTP/1.1 "):
                status = int(buf[9:12])
        if mode.endswith("-rst"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError as e:
        rec.add(id=req["id"], kind="disconnect", phase=phase, status=None, error=f"{type(e).__name__}: {e}")
        return
    finally:
        s.close()
    rec.add(id=req["id"], kind="disconnect", phase=phase, status=status, mode=mode)


def run_prefill(srv, req, rec, phase):
    """A long prompt whose client goes away while the slot is still reading it (merges happen in that prefill):
    the server must drop the task there, not read the prompt to its end for nobody, and the slot must serve the
    next request as if nothing had happened (the long prompt after it in this thread is checked against its
    solo run). The request is found in /slots by its max_tokens (the marker); the slot's n_history says how
    much of the prompt it had read when the task left.

    Stock llama-server read such a prompt to its end: the HTTP thread asks whether its client is still there
    only when its wait for a result times out, and every other task's result restarted that timeout, so that
    under load (here: the /slots polls themselves) it never expired (the patch gives the wait one deadline)."""
    _, tpl = C.post(srv, "/apply-template", {"messages": req["messages"]})
    _, tok = C.post(srv, "/tokenize", {"content": tpl.get("prompt", ""), "add_special": True})
    n_prompt = len(tok.get("tokens", []))
    body = json.dumps({"messages": req["messages"], "max_tokens": req["marker"], "ignore_eos": True,
                       "temperature": 0, "stream": True, "id_slot": req["slot"], "cache_prompt": False}).encode()
    head = raw_head(srv, body)

    def mine():
        try:
            for sl in json.loads(srv.get("/slots")):
                if sl.get("id") == req["slot"] and sl.get("is_processing") \
                        and sl.get("params", {}).get("n_predict") == req["marker"]:
                    return sl
        except (OSError, ValueError):
            pass
        return None

    row = {"id": req["id"], "kind": "prefill", "phase": phase, "status": None, "mode": req["mode"],
           "marker": req["marker"], "n_prompt": n_prompt}
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=600)
    try:
        s.sendall(head + body)
        t0, seen = time.time(), None
        while seen is None and time.time() - t0 < 300:
            seen = mine()
            if seen is None:
                time.sleep(0.05)
        s.setblocking(False)
        try:
            got = s.recv(4096)
        except BlockingIOError:
            got = b""
        row.update(seen=seen is not None, events_before=got.count(b"data: "),
                   decoded_before=(seen or {}).get("next_token", [{}])[0].get("n_decoded"))
        if req["mode"] == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError as e:
        row["error"] = f"{type(e).__name__}: {e}"
    finally:
        s.close()
    # how long the task stays on the slot after the client left, and how many tokens it made
    t0, last = time.time(), None
    while time.time() - t0 < 300:
        sl = mine()
        if sl is None:
            break
        last = sl
        time.sleep(0.05)
    row.update(gone_after=round(time.time() - t0, 2),
               decoded_after=(last or {}).get("next_token", [{}])[0].get("n_decoded", 0),
               read_last=(last or seen or {}).get("n_history", 0))
    rec.add(**row)


def run_malformed(srv, req, rec, phase):
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    try:
        body = req["body"]
        s.sendall(raw_head(srv, body, close=True) + body)
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except OSError as e:
        rec.add(id=req["id"], kind="malformed", phase=phase, status=None, what=req["what"], json=req["json"],
                error=f"{type(e).__name__}: {e}")
        return
    finally:
        s.close()
    status = int(buf[9:12]) if buf.startswith(b"HTTP/1.1 ") else None
    rec.add(id=req["id"], kind="malformed", phase=phase, status=status, what=req["what"], json=req["json"],
            answer=buf.split(b"\r\n\r\n", 1)[-1][:120].decode(errors="replace"))


RUN = {"chat": run_chat, "long": run_long, "cancel": run_cancel, "disconnect": run_disconnect,
       "malformed": run_malformed, "prefill": run_prefill}


def run_phase(srv, threads, rec, phase):
    def client(reqs):
        for req in reqs:
            time.sleep(req.get("delay", 0))
            RUN[req["kind"]](srv, req, rec, phase)

    ts = [threading.Thread(target=client, args=(reqs,)) for reqs in threads]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


class RssSampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop_ev = pid, [], threading.Event()

    def read(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])  # kB
        return None

    def run(self):
        while not self.stop_ev.is_set():
            try:
                self.samples.append((time.time(), self.read()))
            except OSError:
                return
            self.stop_ev.wait(0.5)


def start_server(args, extra, name):
    """The binaries may be rebuilt under us: retry once if the start fails."""
    try:
        return C.Server(args, extra, name)
    except (OSError, RuntimeError) as e:
        print(f"# {name}: start failed ({e}), retrying once", flush=True)
        time.sleep(10)
        return C.Server(args, extra, name)


def healthy(srv):
    try:
        return srv.proc.poll() is None and json.loads(srv.get("/health")).get("status") == "ok"
    except Exception:
        return False


def solo_reference(args, flags, threads):
    """Each completed greedy request alone, one at a time, on a fresh server: each chat whole, in its slot's order."""
    rec = Recorder()
    with start_server(args, flags, "load-solo") as srv:
        for reqs in threads:
            for req in reqs:
                if req["kind"] in ("chat", "long"):
                    RUN[req["kind"]](srv, req, rec, "solo")
    return {r["id"]: r for r in rec.rows}


def main():
    ap = C.arg_parser(__doc__)
    ap.add_argument("--extra", default="", help="more server flags, for both servers (e.g. to see a check fail)")
    args = ap.parse_args()
    # a SIGTERM (timeout, CI) unwinds through the with blocks, which stop the server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.work = args.work or tempfile.mkdtemp(prefix="kvm-load.")
    os.makedirs(args.work, exist_ok=True)
    flags = FLAGS + shlex.split(args.extra)
    t_start = time.time()
    threads = schedule()
    kinds = {}
    for reqs in threads:
        for r in reqs:
            n = CHAT_TURNS if r["kind"] == "chat" else 1
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + n
    print(f"# schedule (seed {SEED}): {sum(kinds.values())} requests a phase from {len(threads)} client threads: "
          f"{kinds}; flags {' '.join(flags)}", flush=True)

    t0 = time.time()
    solo = solo_reference(args, flags, threads)
    bad_solo = [r for r in solo.values() if r["status"] != 200]
    check_solo = C.check("load: the solo reference answers every chat turn and long prompt", not bad_solo and solo,
                         f"{len(solo)} requests in {time.time() - t0:.0f} s"
                         + (f"; failed: {[(r['id'], r['status'], r.get('error')) for r in bad_solo][:3]}"
                            if bad_solo else ""))

    rec = Recorder()
    rss = {}
    with start_server(args, flags, "load") as srv:
        sampler = RssSampler(srv.proc.pid)
        sampler.start()
        rss["start"] = sampler.read()
        for phase in ("warm-up", "second"):
            t0 = time.time()
            run_phase(srv, threads, rec, phase)
            alive = healthy(srv)
            time.sleep(1.0)  # let the last replies' buffers go back, then take the idle value
            rss[phase] = sampler.read() if alive else None
            C.check(f"load: {phase} phase: the server is alive and /health ok", alive,
                    f"{sum(1 for r in rec.rows if r['phase'] == phase)} requests in {time.time() - t0:.0f} s, "
                    f"VmRSS {rss[phase]} kB")
            if not alive:
                break
        slots = json.loads(srv.get("/slots")) if healthy(srv) else []
        metrics = srv.get("/metrics") if healthy(srv) else ""
        sampler.stop_ev.set()
        sampler.join()
        pid = srv.proc.pid
    rc = srv.proc.returncode
    print(f"# server pid {pid} stopped with {rc}; logs in {args.work}", flush=True)

    rows = rec.rows
    by_kind = {}
    for r in rows:
        k = by_kind.setdefault(r["kind"], {"n": 0, "status": {}})
        k["n"] += 1
        k["status"][str(r["status"])] = k["status"].get(str(r["status"]), 0) + 1
    print(f"# outcomes (both phases): {json.dumps(by_kind)}", flush=True)

    fivexx = [r for r in rows if r["status"] is not None and r["status"] >= 500]
    C.check("load: no request got a 5xx", not fivexx,
            f"{len(rows)} requests"
            + (f"; 5xx: {[(r['id'], r['status'], r.get('answer', r.get('error'))) for r in fivexx][:4]}"
               if fivexx else ""))
    mal = [r for r in rows if r["kind"] == "malformed" and r["json"]]
    C.check("load: malformed JSON bodies are refused with 4xx",
            mal and all(r["status"] and 400 <= r["status"] < 500 for r in mal),
            "; ".join(sorted({f"{r['what']}: {r['status']}" for r in mal})))
    notjson_all = [r for r in rows if r["kind"] == "malformed" and not r["json"]]
    # stock llama-server answered these 500 (its exception handler took a JSON parse error for its own)
    C.check("load: bodies that are not JSON are refused with 4xx, not a 5xx or a dropped connection",
            notjson_all and all(r["status"] and 400 <= r["status"] < 500 for r in notjson_all),
            "; ".join(sorted({f"{r['what']}: {r['status']}" for r in notjson_all})))
    lost = [r for r in rows if r["kind"] in ("chat", "long", "cancel") and r["status"] != 200]
    C.check("load: every chat turn, long prompt and stream up to its cancel is answered", not lost,
            f"{sum(1 for r in rows if r['kind'] in ('chat', 'long', 'cancel'))} requests"
            + (f"; failed: {[(r['id'], r['phase'], r['status'], r.get('error')) for r in lost][:4]}" if lost else ""))
    canc = [r for r in rows if r["kind"] == "cancel" and r["status"] == 200]
    mid = [r for r in rows if r["kind"] == "disconnect" and r.get("mode", "").startswith("stream")]
    C.check("load: cancelled streams and raw-socket streams got their first chunks before going away",
            canc and all(r["chunks"] >= 1 for r in canc) and mid and all(r["status"] == 200 for r in mid),
            f"chunks before the cancel: {[r['chunks'] for r in canc]}; raw streams: {[r['status'] for r in mid]}")

    pre = [r for r in rows if r["kind"] == "prefill"]
    C.check("load: clients gone during a long prompt's prefill: the server dropped the task mid-prompt",
            pre and all(r.get("seen") and r.get("events_before") == 0 and r.get("decoded_before") == 0
                        and r.get("decoded_after", 1) == 0 and r.get("read_last", 1 << 30) < r["n_prompt"] - 16
                        and not r.get("error") for r in pre),
            "; ".join(f"{r['id']} {r['phase']}: on the slot {r.get('seen')}, {r.get('events_before')} events at the "
                      f"close, gone {r.get('gone_after')} s later having read {r.get('read_last')} of "
                      f"{r['n_prompt']} prompt tokens, {r.get('decoded_after')} made"
                      f"{', ' + r['error'] if r.get('error') else ''}" for r in pre))

    # equality with the solo run, per phase
    greedy = [r for r in rows if r["kind"] in ("chat", "long") and r["status"] == 200]
    equal = [r for r in greedy if r["id"] in solo and solo[r["id"]].get("text") == r["text"]]
    diff = [r for r in greedy if r not in equal]
    per_phase = {p: f"{sum(1 for r in equal if r['phase'] == p)}/{sum(1 for r in greedy if r['phase'] == p)}"
                 for p in ("warm-up", "second")}
    ev = sum(r.get("events", 0) for r in greedy)
    past = sum(1 for r in greedy if r.get("n_history", 0) > r.get("n_cells", 0))
    C.check("load: the chats and long prompts went past their slot's context and were compressed",
            ev > 0 and all(r["prompt_tokens"] > SLOT_CELLS for r in greedy if r["kind"] == "long")
            and any(r["kind"] == "chat" and r["n_history"] > r["n_cells"] for r in greedy),
            f"{ev} events, {past} of {len(greedy)} replies from a compressed cache, long prompts of "
            f"{sorted(r['prompt_tokens'] for r in greedy if r['kind'] == 'long' and r['phase'] == 'warm-up')} tokens")
    C.check("load: every completed greedy request equals its solo run", check_solo and greedy and not diff,
            f"{len(equal)} of {len(greedy)} equal (warm-up {per_phase['warm-up']}, second {per_phase['second']})"
            + (f"; first differing: {[(r['id'], r['phase']) for r in diff][:6]}" if diff else ""))
    for r in diff[:2]:
        print(f"#   {r['id']} ({r['phase']}): {r['text'][:70]!r}\n#   {'solo':>{len(r['id'])}}: "
              f"{solo.get(r['id'], {}).get('text', '')[:70]!r}", flush=True)

    # RSS: the end of the second phase against the end of the warm-up
    samples = [kb for _, kb in sampler.samples if kb]
    if rss.get("warm-up") and rss.get("second"):
        growth = (rss["second"] - rss["warm-up"]) / 1024
        C.check(f"load: VmRSS is flat with --cache-ram 0 (within {RSS_BOUND_MIB} MiB from the warm-up's end "
                "to the second phase's)",
                growth <= RSS_BOUND_MIB,
                f"start {rss['start'] / 1024:.1f} MiB, after the warm-up {rss['warm-up'] / 1024:.1f} MiB, "
                f"after the second phase {rss['second'] / 1024:.1f} MiB ({growth:+.1f} MiB), "
                f"most {max(samples) / 1024:.1f} MiB, {len(samples)} samples")
    else:
        C.check("load: VmRSS is flat with --cache-ram 0", False, "the server did not live through both phases")

    # /slots: every slot idle, cells within the slot, the history it stands for no shorter than its cells
    desc = [(s.get("id"), s.get("is_processing"), s.get("n_history"), s.get("n_cells")) for s in slots]
    C.check("load: /slots at the end: every slot idle, cells within the slot, n_history >= n_cells",
            len(slots) == N_SLOTS and all(not s["is_processing"] and 0 <= s["n_cells"] <= SLOT_CELLS
                                          and s["n_history"] >= s["n_cells"] for s in slots),
            f"(id, processing, n_history, n_cells): {desc}")
    C.check("load: /slots at the end: the chat slots stand for more tokens than their cells",
            len(slots) == N_SLOTS and all(slots[i]["n_history"] > slots[i]["n_cells"] for i in (0, 1)),
            f"slot 0 {desc[0][2:] if slots else None}, slot 1 {desc[1][2:] if slots else None}")
    m = [ln for ln in metrics.splitlines() if ln.startswith("llamacpp:kv_merge") or ln.startswith("kv_merge")]
    print(f"# /metrics: {'; '.join(m)}", flush=True)

    wall = time.time() - t_start
    print(f"# wall time {wall:.0f} s (logs in {args.work})", flush=True)
    print(f"{C.N_PASS} passed, {C.N_FAIL} failed")
    sys.exit(1 if C.N_FAIL else 0)


if __name__ == "__main__":
    main()
