#!/usr/bin/env bash
# The evaluation texts: scripts/eval-texts.sh OUTDIR
#
# Writes OUTDIR/<name>.txt for ten long texts of five kinds, each at least 3 windows of 2048
# SmolLM2 tokens (kvm_eval prints the counts: "# text NAME N tokens"), OUTDIR/SPLIT, the split, and
# OUTDIR/KINDS, the kind of each text (for eval/ci.py --kinds).
# Every source is a pinned package from Debian (apt-get download, dpkg-deb -x) or PyPI (pip
# download), checked by sha256; the CPython texts come from the running python3 as in
# scripts/eval.sh. Same bytes every run: markup stripped, whitespace normalised, nothing that
# depends on the machine but the CPython texts (Debian bookworm's python3 3.11 and GPL-3).
# Downloads are kept in .cache/texts (KVM_CACHE) and .cache/data (the chat corpus, shared with
# eval/chat_bench.py).
#
# The split was fixed before any text was evaluated; no choice (method, parameter, text, window)
# is made on a held-out text. Tuning texts are where choices may be made; the held-out ones only
# report what the choices made elsewhere give.
#
#   name        kind        split     source
#   gpl3        prose       tuning    /usr/share/common-licenses/GPL-3 (Debian base-files)
#   pydoc       reference   tuning    python3 pydoc_data/topics.py: specialnames, types, compound, execmodel, datamodel
#   pydoc2      reference   tuning    python3 pydoc_data/topics.py: string-methods, typesseq, formatstrings, attribute-access, customization
#   code_c      code        tuning    llama_cpp_python-0.3.36.tar.gz (PyPI sdist, the pinned llama.cpp of scripts/fetch-llama.sh),
#                                     vendor/llama.cpp/ggml/src/ggml.c, first 60000 bytes
#               sha256 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e (as scripts/fetch-llama.sh)
#   chat_tune   dialogue    tuning    chitchat-dataset==0.9.0 (PyPI wheel, MIT), the conversations of >= 20 turns in id order after
#                                     those eval/chat_bench.py uses, until 30000 characters
#               sha256 7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e (chitchat_dataset-0.9.0-py3-none-any.whl)
#   prose       prose       held-out  debian-history 2.28 (Debian bookworm), docs/project-history.en.txt.gz, "A Brief History of
#                                     Debian", from chapter 1 on (the title page and copyright left out)
#               sha256 ae364cdfd075bf6a08ca8f5105b44db7093e3b201c95d3b70a863b8849c6a082 (debian-history_2.28_all.deb)
#   debref      reference   held-out  debian-reference-en 2.100 (Debian bookworm), ch01.en.html ("GNU/Linux tutorials"), text of the HTML
#               sha256 9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f (debian-reference-en_2.100_all.deb)
#   code_py     code        held-out  six==1.16.0 (PyPI wheel, MIT), six.py whole
#               sha256 8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254 (six-1.16.0-py2.py3-none-any.whl)
#   chat        dialogue    held-out  chitchat-dataset==0.9.0 as chat_tune: the conversations after chat_tune's, until 30000 characters
#   debref_fr   French      held-out  debian-reference-fr 2.100 (Debian bookworm), ch02.fr.html ("Gestion des paquets Debian"), the
#                                     text of the HTML (some paragraphs are left in English by the translation)
#               sha256 01424cba9bfa2e13166da22d3d692d33a22ec7d8ef935ec81fd8802746087f65 (debian-reference-fr_2.100_all.deb)
#
# Tuning: gpl3 pydoc pydoc2 code_c chat_tune. Held-out: prose debref code_py chat debref_fr (every kind).
# calib.txt (other pydoc topics, the calibration profile's text) is written as scripts/eval.sh does.
#
# kvm_eval normalises whitespace itself (runs of spaces to one, indentation dropped), so code loses
# its indentation in the evaluation as every text does; the files here keep it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ $# -eq 1 ] || { sed -n '2,47p' "$0"; exit 1; }
OUT="$1"
CACHE="${KVM_CACHE:-$REPO/.cache}"
DL="$CACHE/texts"
mkdir -p "$OUT" "$DL"

check() { # file sha256
    echo "$2  $1" | sha256sum -c --quiet - || { echo "eval-texts: sha256 mismatch for $1" >&2; exit 1; }
}
deb() { # package version sha256 -> extracted dir
    local f="$DL/${1}_${2}_all.deb" d="$DL/$1-$2"
    if [ ! -f "$f" ]; then
        (cd "$DL" && apt-get download "$1=$2" >&2) || { echo "eval-texts: apt-get download $1=$2 failed (apt-get update?)" >&2; exit 1; }
    fi
    check "$f" "$3"
    if [ ! -d "$d" ]; then rm -rf "$d.tmp"; dpkg-deb -x "$f" "$d.tmp"; mv "$d.tmp" "$d"; fi
    echo "$d"
}
pypi() { # name version file sha256
    local f="$DL/$3"
    [ -f "$f" ] || python3 -m pip download --quiet --no-deps "$1==$2" -d "$DL" >&2
    check "$f" "$4"
    echo "$f"
}

HIST="$(deb debian-history 2.28 ae364cdfd075bf6a08ca8f5105b44db7093e3b201c95d3b70a863b8849c6a082)"
REF_EN="$(deb debian-reference-en 2.100 9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f)"
REF_FR="$(deb debian-reference-fr 2.100 01424cba9bfa2e13166da22d3d692d33a22ec7d8ef935ec81fd8802746087f65)"
SIX="$(pypi six 1.16.0 six-1.16.0-py2.py3-none-any.whl 8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254)"
# the llama.cpp sdist of scripts/fetch-llama.sh (same cache, same sha256)
SDIST="$CACHE/llama_cpp_python-0.3.36.tar.gz"
if [ ! -f "$SDIST" ]; then
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d "$CACHE" >&2
fi
check "$SDIST" 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

python3 - "$OUT" "$HIST" "$REF_EN" "$REF_FR" "$SIX" "$SDIST" "$CACHE" "$REPO" <<'PY'
import gzip, html.parser, importlib.util, os, re, sys, tarfile, types, unicodedata, zipfile
out, hist, ref_en, ref_fr, six_whl, sdist, cache, repo = sys.argv[1:]

def norm(s):
    # NFC, LF line ends, no trailing spaces, at most one blank line, no leading/trailing blank lines
    s = unicodedata.normalize("NFC", s).replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ")
    s = "\n".join(l.rstrip() for l in s.split("\n"))
    s = re.sub(r"\n{3,}", "\n\n", s)
    return s.strip("\n") + "\n"

class Text(html.parser.HTMLParser):
    # the text of an HTML page: block elements end a line, script/style/head dropped, runs of
    # spaces in running text collapsed (inside <pre> kept)
    BLOCK = {"p", "div", "br", "li", "dt", "dd", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table",
             "ul", "ol", "dl", "blockquote", "title", "section"}
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip, self.pre = [], 0, 0
    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "head"): self.skip += 1
        if tag == "pre": self.pre += 1
        if tag in self.BLOCK: self.parts.append("\n\n" if tag in ("p", "pre", "h1", "h2", "h3", "h4", "table") else "\n")
    def handle_endtag(self, tag):
        if tag in ("script", "style", "head"): self.skip = max(0, self.skip - 1)
        if tag == "pre": self.pre = max(0, self.pre - 1)
        if tag in self.BLOCK: self.parts.append("\n")
    def handle_data(self, d):
        if self.skip: return
        self.parts.append(d if self.pre else re.sub(r"\s+", " ", d))

def html_text(path):
    p = Text()
    with open(path, encoding="utf-8") as f:
        p.feed(f.read())
    p.close()
    return norm("\n".join(l.strip() for l in "".join(p.parts).split("\n")))

def write(name, text):
    with open(os.path.join(out, name + ".txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write(text)

# CPython texts, as scripts/eval.sh writes them
import pydoc_data.topics as t
for name, topics in {
    "pydoc": ("specialnames", "types", "compound", "execmodel", "datamodel"),
    "pydoc2": ("string-methods", "typesseq", "formatstrings", "attribute-access", "customization"),
    "calib": ("assignment", "import", "typesmapping", "comparisons", "strings", "operator-summary"),
}.items():
    with open(os.path.join(out, name + ".txt"), "w") as f:
        f.write("\n\n".join(t.topics[k] for k in topics if k in t.topics))
gpl = "/usr/share/common-licenses/GPL-3"
if os.path.exists(gpl):
    with open(gpl) as f, open(os.path.join(out, "gpl3.txt"), "w") as g:
        g.write(f.read())

# prose: A Brief History of Debian, from its first chapter
with gzip.open(os.path.join(hist, "usr/share/doc/debian-history/docs/project-history.en.txt.gz"), "rt", encoding="utf-8") as f:
    s = norm(f.read())
i = s.find("Chapter 1.")  # the table of contents before it numbers its chapters "1." alone
assert i > 0, "eval-texts: no Chapter 1 in project-history.en.txt"
write("prose", s[i:])

# reference docs: Debian Reference, chapter 1 (English) and chapter 2 (French, its best-translated long chapter)
write("debref", html_text(os.path.join(ref_en, "usr/share/debian-reference/ch01.en.html")))
write("debref_fr", html_text(os.path.join(ref_fr, "usr/share/debian-reference/ch02.fr.html")))

# code: six.py (Python), the start of ggml.c (C)
with zipfile.ZipFile(six_whl) as z:
    write("code_py", norm(z.read("six.py").decode("utf-8")))
with tarfile.open(sdist) as tf:
    m = [x for x in tf.getmembers() if x.name.endswith("vendor/llama.cpp/ggml/src/ggml.c")]
    c = tf.extractfile(m[0]).read()[:60000].decode("utf-8", "replace")
write("code_c", norm(c[:c.rfind("\n\n")]))  # ends at a blank line

# dialogue: chitchat conversations through eval/chat_bench.py's loader, after the ones it uses
sys.modules.setdefault("openai", types.ModuleType("openai"))  # chat_bench's server side is not needed
sys.modules.setdefault("chat", types.ModuleType("chat"))
sys.modules["chat"].Server = getattr(sys.modules["chat"], "Server", object)
spec = importlib.util.spec_from_file_location("chat_bench", os.path.join(repo, "eval", "chat_bench.py"))
cb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cb)
corpus = cb.fetch_corpus(cache)
used = {c["id"] for c in cb.build_transcripts(corpus, 3, 6, 2.6 * 512, 3.4 * 512)}  # chat_bench's defaults
convs = []
for cid in sorted(corpus):
    if cid in used:
        continue
    turns = corpus[cid]["messages"]
    lines, prev = [], None
    for turn in turns:
        for msg in turn:
            who = "A" if msg["sender"] == turns[0][0]["sender"] else "B"
            txt = " ".join(msg["text"].split())
            if txt:
                lines.append(f"{who}: {txt}")
    if len(turns) >= 20 and lines:
        convs.append("\n".join(lines))
def take(start, chars):
    acc, n, i = [], 0, start
    while n < chars:
        acc.append(convs[i]); n += len(convs[i]) + 2; i += 1
    return "\n\n".join(acc) + "\n", i
tune, nxt = take(0, 30000)
held, _ = take(nxt, 30000)
write("chat_tune", norm(tune))
write("chat", norm(held))

with open(os.path.join(out, "SPLIT"), "w") as f:
    f.write("tuning: gpl3 pydoc pydoc2 code_c chat_tune\nheld-out: prose debref code_py chat debref_fr\n")
with open(os.path.join(out, "KINDS"), "w") as f:  # for eval/ci.py --kinds
    f.write("gpl3=prose pydoc=reference pydoc2=reference code_c=code chat_tune=dialogue\n"
            "prose=prose debref=reference code_py=code chat=dialogue debref_fr=french\n")
PY
ls -l "$OUT" >&2
sha256sum "$OUT"/*.txt >&2
