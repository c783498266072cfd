// kvm_eval: the evaluation harness of kvmerger.
//
// One program, one model, one run: every compression method of the patched llama.cpp
// (context shift, StreamingLLM, H2O, CaM, KVMerger as published, our reading, our best
// configuration, and the ablations) at the same cache capacity, on
//   1. streaming perplexity  (a long text fed through a cache of fixed capacity C = budget * W)
//   2. passkey retrieval     (a key sentence at several depths of a prose haystack)
//   3. key-value retrieval   ("The code for <word> is <4 digits>." lines spread over prose)
//   4. cost                  (merge time per event and in total, KV MiB, decode tok/s)
// plus the full cache (every token sees its whole window) as the upper bound.
//
// Writes <out>/ppl.csv, passkey.csv, kvqa.csv, methods.csv and results.json; prints a table
// while it runs. See eval/README.md.

#include "llama.h"
#include "kvmerger.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

// ---------------------------------------------------------------------------------------------
// small helpers

static double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

static std::string fmt(const char * f, ...) {
    char buf[4096];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof(buf), f, ap);
    va_end(ap);
    return buf;
}

static std::vector<std::string> split(const std::string & s, char sep) {
    std::vector<std::string> out;
    std::string cur;
    std::stringstream ss(s);
    while (std::getline(ss, cur, sep)) {
        if (!cur.empty()) {
            out.push_back(cur);
        }
    }
    return out;
}

static std::string read_file(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
        fprintf(stderr, "kvm_eval: cannot read %s\n", path.c_str());
        exit(1);
    }
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// A result row: ordered (key, value) pairs; values that parse as numbers go unquoted to JSON.
struct Row {
    std::vector<std::pair<std::string, std::string>> kv;
    std::vector<std::string> strings; // keys written with s(): always JSON strings
    Row & s(const std::string & k, const std::string & v) { kv.emplace_back(k, v); strings.push_back(k); return *this; }
    Row & i(const std::string & k, long long v) { kv.emplace_back(k, std::to_string(v)); return *this; }
    Row & f(const std::string & k, double v, int prec = 4) {
        kv.emplace_back(k, std::isfinite(v) ? fmt("%.*f", prec, v) : std::string(""));
        return *this;
    }
};

static std::string csv_escape(const std::string & v) {
    if (v.find_first_of(",\"\n") == std::string::npos) {
        return v;
    }
    std::string o = "\"";
    for (char c : v) {
        if (c == '"') {
            o += '"';
        }
        o += c;
    }
    return o + "\"";
}

static std::string json_escape(const std::string & v) {
    std::string o = "\"";
    for (unsigned char c : v) {
        switch (c) {
            case '"':  o += "\\\""; break;
            case '\\': o += "\\\\"; break;
            case '\n': o += "\\n";  break;
            case '\t': o += "\\t";  break;
            default:
                if (c < 0x20) {
                    o += fmt("\\u%04x", c);
                } else {
                    o += (char) c;
                }
        }
    }
    return o + "\"";
}

static bool is_number(const std::string & v) {
    if (v.empty()) {
        return false;
    }
    char * end = nullptr;
    strtod(v.c_str(), &end);
    return end && *end == '\0';
}

// One CSV per table, rewritten after every row (a killed run keeps what it measured).
struct Table {
    std::string path;
    std::vector<Row> rows;
    void add(const Row & r) {
        rows.push_back(r);
        std::vector<std::string> cols;
        for (const auto & row : rows) {
            for (const auto & [k, _] : row.kv) {
                if (std::find(cols.begin(), cols.end(), k) == cols.end()) {
                    cols.push_back(k);
                }
            }
        }
        FILE * f = fopen(path.c_str(), "w");
        if (!f) {
            return;
        }
        for (size_t c = 0; c < cols.size(); ++c) {
            fprintf(f, "%s%s", c ? "," : "", cols[c].c_str());
        }
        fprintf(f, "\n");
        for (const auto & row : rows) {
            for (size_t c = 0; c < cols.size(); ++c) {
                std::string v;
                for (const auto & [k, val] : row.kv) {
                    if (k == cols[c]) {
                        v = val;
                    }
                }
                fprintf(f, "%s%s", c ? "," : "", csv_escape(v).c_str());
            }
            fprintf(f, "\n");
        }
        fclose(f);
    }
    std::string json() const {
        std::string o = "[";
        for (size_t r = 0; r < rows.size(); ++r) {
            o += r ? ",\n  {" : "\n  {";
            for (size_t c = 0; c < rows[r].kv.size(); ++c) {
                const auto & [k, v] = rows[r].kv[c];
                const bool str = std::find(rows[r].strings.begin(), rows[r].strings.end(), k) != rows[r].strings.end();
                o += (c ? ", " : "") + json_escape(k) + ": " + (str ? json_escape(v) : is_number(v) ? v : "null");
            }
            o += "}";
        }
        return o + "\n]";
    }
};

// Per-token negative log-likelihoods of the streaming-PPL task, for paired confidence
// intervals (eval/ci.py): one PPL per window is too coarse to tell noise from a difference, but
// every method scores the same tokens, so block resampling of the tokens pairs the methods.
// nll.bin is little-endian float32, appended per row; nll_index.csv says where each row lies.
struct NllDump {
    std::string path;
    Table index;
    long long offset = 0;
    void add(const std::string & text, int w, double b, int first_pos, const std::string & method, const std::vector<float> & v) {
        FILE * f = fopen(path.c_str(), offset ? "ab" : "wb");
        if (!f) {
            fprintf(stderr, "kvm_eval: cannot write %s, per-token NLLs not kept\n", path.c_str());
            return;
        }
        fwrite(v.data(), sizeof(float), v.size(), f);
        fclose(f);
        index.add(Row().s("text", text).i("window_idx", w).f("budget", b, 3).i("first_pos", first_pos).s("method", method)
            .i("offset", offset).i("count", (long long) v.size()));
        offset += (long long) v.size();
    }
};

// ---------------------------------------------------------------------------------------------
// options

struct Opts {
    std::string model;
    std::vector<std::pair<std::string, std::string>> texts; // name, path
    std::string out = "out/run";
    bool full = false;
    int  threads = 2;
    int  W = 2048;            // window of the streaming-PPL task (tokens per window)
    int  B = 64;              // tokens per batch
    int  n_keep = 4;          // kept at the start (incl. BOS), like llama.cpp's context shift
    int  n_free = 0;          // cells freed per event by the compressing methods; 0 = half, as context shift
    // > 0: cells freed per event = round(n_free_frac * capacity) (overrides n_free). An eighth:
    // the cache stays 7/8 to full instead of 1/2 to full, which is most of what any method gains
    // over stock context shift (docs/findings.md: windows3); 0 frees half like context shift.
    double n_free_frac = 0.125;
    int  windows = 1;         // windows per text (streaming PPL)
    int  first_window = 0;    // windows before it are skipped: held-out windows for choices made on earlier ones
    int  n_gen_bench = 16;    // tokens generated after each PPL stream to time decoding
    std::vector<double> budgets      = {0.50, 0.35};
    std::vector<double> abl_budgets  = {0.50};
    std::vector<std::string> methods = {"main"}; // names or groups: main, ablation, all
    std::vector<std::string> tasks   = {"ppl", "passkey", "kvqa"};
    // passkey
    int  pk_W = 1024;
    std::vector<int> pk_depths = {10, 50, 90};
    int  pk_keys = 1;         // keys per depth (and per text)
    int  pk_texts = 1;        // how many of the texts serve as haystack
    std::vector<double> pk_budgets = {0.35};
    int  pk_gen = 8;
    // kept at the start of a retrieval prompt: < 0 = its header (the instruction), as llama-passkey
    // keeps its prefix (n_keep 32 there) and llama-cli keeps --keep; >= 0 = that many tokens
    int  retr_keep = -1;
    // kv retrieval
    int  qa_W = 1024;
    int  qa_pairs = 6;
    int  qa_trials = 1;
    std::vector<double> qa_budgets = {0.35};
    int  qa_gen = 6;
    int  qa_texts = 1;        // how many of the texts serve as haystack
    bool verbose = false;
    // calibration profile for the methods that use one: a file, or made at start from calib_text
    std::string calib;
    std::string calib_text;
    int  calib_W = 4096;      // tokens of calib_text in the cache when the profile is taken
    bool make_calib_only = false;
};

static std::vector<double> parse_doubles(const std::string & s) {
    std::vector<double> v;
    for (const auto & x : split(s, ',')) {
        v.push_back(atof(x.c_str()));
    }
    return v;
}

static void usage() {
    fprintf(stderr,
        "usage: kvm_eval -m MODEL --text NAME=PATH [--text ...] [options]\n"
        "  --out DIR              results directory (default out/run)\n"
        "  --full                 the full evaluation (3 windows/text, budget sweep, ablations, 3 keys/depth)\n"
        "  -t N                   threads (default 2)\n"
        "  --queries N            recent queries the patch keeps for the attention (default 4; the\n"
        "                         llama-tools' --kv-merge-queries; earlier runs set LLAMA_KV_MERGE_QWIN)\n"
        "  --window W             streaming-PPL window in tokens (default 2048)\n"
        "  --batch B              tokens per batch (default 64)\n"
        "  --n-keep N             kept tokens at the start, incl. BOS (default 4)\n"
        "  --n-free N             cells freed per event by every method but shift (0 = half); sets --n-free-frac 0\n"
        "  --n-free-frac f        cells freed per event = f * capacity, every method but shift (default 0.125;\n"
        "                         0 = --n-free; shift: always half, stock llama.cpp)\n"
        "  --windows N            windows per text (default 1; --full 3)\n"
        "  --first-window N       start at window N of each text (default 0), for held-out windows\n"
        "  --budgets a,b,..       budgets for the main methods (default 0.5,0.35)\n"
        "  --abl-budgets a,..     budgets for the ablations (default 0.5)\n"
        "  --methods x,y,..       method names or groups main, ablation, all (default main)\n"
        "  --tasks x,y,..         ppl, passkey, kvqa (default all three)\n"
        "  --pk-window W          passkey haystack length (default 1024; --full 2048)\n"
        "  --pk-keys N            keys per depth (default 1; --full 3)\n"
        "  --pk-budgets a,..      passkey budgets (default 0.35; --full 0.5,0.35)\n"
        "  --qa-budgets a,..      kv-retrieval budgets (default 0.35; --full 0.5,0.35)\n"
        "  --pk-depths a,b,..     depths in %% (default 10,50,90; --full 10,30,50,70,90)\n"
        "  --retr-keep header|N   kept at the start of a passkey/kv-retrieval prompt: its header (the\n"
        "                         instruction; default, as llama-passkey keeps its prefix) or N tokens\n"
        "  --qa-window W          kv-retrieval haystack length (default 1024; --full 2048)\n"
        "  --qa-pairs N           key-value lines per haystack (default 6)\n"
        "  --qa-trials N          haystacks per text (default 1; --full 3)\n"
        "  --pk-texts N, --qa-texts N   how many texts serve as haystacks (default 1; --full 2)\n"
        "  --gen-bench N          tokens generated to time decoding (default 16)\n"
        "  --calib FILE           calibration profile for the *_calib methods\n"
        "  --calib-text PATH      make that profile first, from the first --calib-window tokens of PATH (a text\n"
        "                         the PPL task does not score); written to OUT/calib.profile unless --calib is given\n"
        "  --calib-window N       tokens in the cache when the profile is taken (default 4096)\n"
        "  --make-calib           only write the profile of --calib-text (to --calib, or OUT/calib.profile) and exit\n"
        "  --list                 print the method table and exit\n"
        "  -v                     llama.cpp log\n");
}

// ---------------------------------------------------------------------------------------------
// methods: a table of rows {name, group, description, parameters}
//
// A row's parameters are words applied in order to a whole kvm_params, which the patch takes as
// is (llama_kv_merge_params.kvm_params): "key=value" for a kvm_params field or a harness knob, or
// "@preset" for the words of a preset. Every row starts from KVMerger, our reading, with the
// library's defaults (KVMerger was the default before EVICT_FOLD), so that the ablations, which
// only change what they ablate, keep the bits of the committed results. Where each row comes
// from: docs/findings.md.
//
//   method       kvmerger | context-shift | streaming-llm | h2o | cam | evict-fold
//   pivot        attention | query-free (query-free: the patch scores no queries)
//   sigma_mode   adaptive | fixed | attention | relative | layer
//   value        none | paper | logbias
//   n_sink n_recent heavy_frac sim_floor merge_keys merge_values sigma age_bias max_set
//   max_count cam_span                       the kvm_params fields of those names
//   recent_frac  > 0: n_recent = round(recent_frac * capacity) (a window that scales with the budget)
//   calib        1: link scores through the calibration profile (--calib or --calib-text)
//   full, shift  1: the full cache (upper bound), llama.cpp's context shift (lower bound)
//   tool         1: what the tools' --kv-merge passes (common_kv_merge_params with no other flag):
//                llama_kv_merge_default_params() as is, n_threads from -t, no kvm_params (the
//                patch derives them from the llama fields); the row's other kvm_params words are
//                refused, and kp shows what the patch derives
//   keep         > 0: cells kept of the shifted window per event, as --kv-merge-keep
//                (common_kv_merge_n_free: a fraction if < 1, else a count); overrides --n-free*

struct Method {
    std::string name;
    std::string group;        // main | ablation
    std::string desc;
    bool is_full  = false;    // the full cache (upper bound)
    bool is_shift = false;    // host-side context shift (llama_memory_seq_rm + seq_add)
    kvm_params kp;            // what the method runs with, whole
    std::string missing;      // non-empty: needs what the patch lacks; not run
    float recent_frac = 0;    // > 0: n_recent = round(recent_frac * capacity)
    bool calib = false;       // link scores through the calibration profile (--calib or --calib-text)
    bool tool = false;        // llama_kv_merge_default_params() as the tools pass it (no kvm_params)
    float keep = 0;           // > 0: --kv-merge-keep (event size as the tools), overrides --n-free*
};

struct MethodRow {
    const char * name;
    const char * group;
    const char * desc;
    const char * params;
};

// presets: a change to one moves every row that starts from it
static const MethodRow k_presets[] = {
    // the age pairs: sets of at most 2 and an age bias from a PPL-only sweep of age_bias x max_set,
    // floors, heavy hitters, attention weights and EVICT_FOLD (findings: explore-c8); query-free,
    // because query scoring gave the same perplexity at 1.5x the cost (best-queryfree); age_bias
    // 100 over 1 and 10 (explore-age)
    { "best", "", "", "method=kvmerger pivot=query-free age_bias=100 max_set=2" },
    // the previous best (age_bias 1), base of the cap, recent-window and attention ablations
    { "age1", "", "", "method=kvmerger pivot=query-free age_bias=1 max_set=2" },
};

static const MethodRow k_methods[] = {
    { "full", "main", "the whole window in the cache (upper bound)",
      "full=1" },
    { "shift", "main", "llama.cpp context shift: keep n_keep, drop the oldest half",
      "shift=1" },
    { "streaming_llm", "main", "StreamingLLM: sinks + newest, drop the middle",
      "method=streaming-llm" },
    { "h2o", "main", "H2O: sinks + recent 32 + heavy hitters by attention",
      "method=h2o" },
    { "cam", "main", "CaM: H2O eviction, evicted values folded into following kept cells",
      "method=cam" },
    { "kvmerger_paper", "main", "KVMerger as published (our reading): sim floor 0.75, values x set size, attention pivots",
      "sim_floor=0.75 value=paper" },
    { "kvmerger", "main", "KVMerger, our reading: exact budget by link score, convex weights, no floor",
      "" },
    { "best", "main", "the age-pairs configuration (our best merging before EVICT_FOLD was measured in full): kvmerger, age-dominated link scores (age_bias 100: the oldest pairs merge, similarity picks among neighbours), sets of at most 2, query-free pivots, no heavy hitters",
      "@best" },
    // our best merging configuration on both models (findings: evict-fold): H2O's choice of who
    // leaves plus the folding; the same parameters as abl_evict_fold, so the two give the same bits
    // exactly what --kv-merge runs with no other flag (common_kv_merge_params,
    // common_kv_merge_n_free): the library defaults through the llama fields, and events that
    // keep half of the window after n_keep (--kv-merge-keep 0.5), whatever --n-free-frac says
    { "default", "main", "what the tools' --kv-merge runs with no other flag: llama_kv_merge_default_params() (EVICT_FOLD, sinks 4, recent 32, attention), n_threads from -t, --kv-merge-keep 0.5 (each event frees half of the cells after n_keep, as context shift)",
      "tool=1 keep=0.5" },
    // a candidate default (findings: heldout): the same, with events that keep seven eighths of the
    // window after n_keep (--kv-merge-keep 0.875), the event size of every baseline row
    { "default_k875", "candidate", "the tools' --kv-merge with --kv-merge-keep 0.875: llama_kv_merge_default_params(), each event frees an eighth of the cells after n_keep",
      "tool=1 keep=0.875" },
    { "evict_fold", "main", "our best merging configuration: EVICT_FOLD, H2O decides who leaves (sinks, recent 32, attention), each leaving cell folded into its more similar surviving neighbour (Gaussian-kernel weights)",
      "method=evict-fold" },
    { "abl_best_keepkey", "ablation", "best, keys not averaged (the pivot's key), values averaged",
      "@best merge_keys=0" },
    { "abl_best_thin", "ablation", "best's pairs, only the pivot kept (no averaging): eviction at the same positions",
      "@best merge_keys=0 merge_values=0" },
    { "abl_best_logbias", "ablation", "best, ln(count) in the KQ mask",
      "@best value=logbias" },
    // best's kernel gives a pair's other member exp(-4) = 0.018 of the pivot's weight whatever
    // their distance, so best is near thinning; these average for real (sigma far above any
    // key distance: w ~ count)
    { "abl_best_mean", "ablation", "best's pairs, count-weighted mean of keys, count-weighted mean of values (sigma 1e4)",
      "@best sigma_mode=fixed sigma=10000" },
    { "abl_best_mean_lb", "ablation", "best's pairs, count-weighted mean of keys, count-weighted mean of values (sigma 1e4), ln(count) in the KQ mask",
      "@best value=logbias sigma_mode=fixed sigma=10000" },
    { "abl_best_mean_kk", "ablation", "best's pairs, the pivot's key, count-weighted mean of values (sigma 1e4)",
      "@best merge_keys=0 sigma_mode=fixed sigma=10000" },
    { "abl_best_mean_kk_lb", "ablation", "best's pairs, the pivot's key, count-weighted mean of values (sigma 1e4), ln(count) in the KQ mask",
      "@best value=logbias merge_keys=0 sigma_mode=fixed sigma=10000" },
    { "abl_best_thin_lb", "ablation", "best's pairs, only the pivot kept, ln(count) in the KQ mask (the pivot speaks for the tokens dropped beside it)",
      "@best value=logbias merge_keys=0 merge_values=0" },
    { "abl_best_attn100", "ablation", "best with attention from the query ring: pivots by attention, 5% heavy hitters",
      "@best pivot=attention" },
    { "abl_best_age1", "ablation", "the previous best: best with age_bias 1 (similarity and age weigh alike)",
      "@age1" },
    { "abl_prev_best", "ablation", "the previous best: kvmerger, heavy 20%, floor 0.90, logbias, recent = capacity/8",
      "heavy_frac=0.2 sim_floor=0.9 value=logbias recent_frac=0.125" },
    { "abl_pivot_queryfree", "ablation", "kvmerger, pivots query-free (member nearest the mean key)",
      "pivot=query-free" },
    { "abl_sigma_fixed5", "ablation", "kvmerger, fixed sigma = 5 (kvmerger itself is sigma adaptive)",
      "sigma_mode=fixed sigma=5" },
    { "abl_value_paper", "ablation", "kvmerger, values x set size",
      "value=paper" },
    { "abl_value_logbias", "ablation", "kvmerger, ln(count) in the KQ mask",
      "value=logbias" },
    { "abl_floor_075", "ablation", "kvmerger, similarity floor 0.75 (shortfall evicted)",
      "sim_floor=0.75" },
    { "abl_floor_090", "ablation", "kvmerger, similarity floor 0.90",
      "sim_floor=0.9" },
    { "abl_keep_pivot_key", "ablation", "kvmerger, keys not averaged (pivot's key), values averaged",
      "merge_keys=0" },
    { "abl_pivot_only", "ablation", "kvmerger sets, keep only the pivot (no averaging)",
      "merge_keys=0 merge_values=0" },
    { "abl_calib", "ablation", "kvmerger, link scores through a calibration profile (per-layer standardized cosine)",
      "calib=1" },
    { "abl_best_calib", "ablation", "abl_best_attn, link scores through a calibration profile",
      "@age1 pivot=attention calib=1" },
    { "abl_best_attn", "ablation", "abl_best_age1 with attention from the query ring: pivots by attention, 5% heavy hitters",
      "@age1 pivot=attention" },
    { "abl_age_bias", "ablation", "kvmerger, age-aware link scores (age_bias 0.2)",
      "age_bias=0.2" },
    { "abl_max_set4", "ablation", "kvmerger, merging sets of at most 4 cells",
      "max_set=4" },
    { "abl_evict_fold", "ablation", "EVICT_FOLD: H2O decides who leaves, fold into the more similar neighbour (recent 32)",
      "method=evict-fold" },
    { "abl_evict_fold_floor", "ablation", "EVICT_FOLD, fold only above cosine 0.75",
      "method=evict-fold sim_floor=0.75" },
    { "abl_ef_floor_90", "ablation", "EVICT_FOLD, fold only above cosine 0.9 (evict the rest)",
      "method=evict-fold sim_floor=0.9" },
    { "abl_evict_fold_keepkey", "ablation", "EVICT_FOLD, recent 256, keys not averaged",
      "method=evict-fold n_recent=256 merge_keys=0" },
    { "abl_heavy_0", "ablation", "kvmerger, no heavy hitters protected",
      "heavy_frac=0" },
    { "abl_heavy_20", "ablation", "kvmerger, 20% heavy hitters protected",
      "heavy_frac=0.2" },
    { "abl_recent_128", "ablation", "kvmerger, recent window 128",
      "n_recent=128" },
    { "abl_recent_256", "ablation", "kvmerger, recent window 256",
      "n_recent=256" },
    { "abl_recent_512", "ablation", "kvmerger, recent window 512",
      "n_recent=512" },
    { "abl_h2o_recent_256", "ablation", "H2O, recent window 256",
      "method=h2o n_recent=256" },
    { "abl_cam_recent_256", "ablation", "CaM, recent window 256",
      "method=cam n_recent=256" },
    { "abl_combo_ef", "ablation", "EVICT_FOLD, recent 256, heavy 20%",
      "method=evict-fold n_recent=256 heavy_frac=0.2" },
    { "abl_combo_kvm", "ablation", "kvmerger, recent 256, heavy 20%, floor 0.90",
      "n_recent=256 heavy_frac=0.2 sim_floor=0.9" },
    { "abl_combo_kvm_lb", "ablation", "kvmerger, recent 256, heavy 20%, floor 0.90, logbias",
      "n_recent=256 heavy_frac=0.2 sim_floor=0.9 value=logbias" },
    { "abl_combo_ef_lb", "ablation", "EVICT_FOLD, recent 256, heavy 20%, logbias",
      "method=evict-fold n_recent=256 heavy_frac=0.2 value=logbias" },
    { "abl_sigma_attn", "ablation", "kvmerger, members weighted by accumulated attention (no Gaussian kernel)",
      "sigma_mode=attention" },
    { "abl_ef_attnw", "ablation", "EVICT_FOLD, members weighted by accumulated attention",
      "method=evict-fold sigma_mode=attention" },
    // what EVICT_FOLD's folding adds at H2O's positions (its pivot is the survivor, so pivot-only
    // is H2O bit for bit), and the fold's strength swept by relative and per-layer sigma
    { "abl_ef_pivot_only", "ablation", "EVICT_FOLD sets, keep only the pivot (no averaging): eviction at H2O's positions",
      "method=evict-fold merge_keys=0 merge_values=0" },
    { "abl_ef_keepkey", "ablation", "EVICT_FOLD, keys not averaged (the pivot's key), values averaged",
      "method=evict-fold merge_keys=0" },
    { "abl_ef_mean", "ablation", "EVICT_FOLD sets, count-weighted mean of keys and values (sigma 1e4)",
      "method=evict-fold sigma_mode=fixed sigma=10000" },
    { "abl_ef_rel055", "ablation", "EVICT_FOLD, sigma = 0.55 x mean key distance (pair weight 0.00134)",
      "method=evict-fold sigma_mode=relative sigma=0.55" },
    { "abl_ef_rel085", "ablation", "EVICT_FOLD, sigma = 0.85 x mean key distance (pair weight 0.0628)",
      "method=evict-fold sigma_mode=relative sigma=0.85" },
    { "abl_ef_rel100", "ablation", "EVICT_FOLD, sigma = 1.00 x mean key distance (pair weight 0.135)",
      "method=evict-fold sigma_mode=relative sigma=1" },
    { "abl_ef_rel130", "ablation", "EVICT_FOLD, sigma = 1.30 x mean key distance (pair weight 0.306)",
      "method=evict-fold sigma_mode=relative sigma=1.3" },
    { "abl_ef_layer025", "ablation", "EVICT_FOLD, sigma = 0.25 x the event's rms member-to-pivot distance per layer and head (average member 0.000335)",
      "method=evict-fold sigma_mode=layer sigma=0.25" },
    { "abl_ef_layer035", "ablation", "EVICT_FOLD, sigma = 0.35 x the event's rms member-to-pivot distance per layer and head (average member 0.0169)",
      "method=evict-fold sigma_mode=layer sigma=0.35" },
    { "abl_ef_layer050", "ablation", "EVICT_FOLD, sigma = 0.50 x the event's rms member-to-pivot distance per layer and head (average member 0.135)",
      "method=evict-fold sigma_mode=layer sigma=0.5" },
    { "abl_ef_logbias", "ablation", "EVICT_FOLD, ln(count) in the KQ mask",
      "method=evict-fold value=logbias" },
    { "abl_h2o_rc", "ablation", "H2O, recent = capacity/8",
      "method=h2o recent_frac=0.125" },
    { "abl_ef_attnw_rc", "ablation", "EVICT_FOLD, attention weights, recent = capacity/8",
      "method=evict-fold sigma_mode=attention recent_frac=0.125" },
    { "abl_prev_best_age1", "ablation", "the previous best + age_bias 1.0",
      "heavy_frac=0.2 sim_floor=0.9 value=logbias age_bias=1 recent_frac=0.125" },
    { "abl_prev_best_attnw_age1", "ablation", "the previous best, attention weights instead of the kernel and logbias, age_bias 1.0",
      "heavy_frac=0.2 sim_floor=0.9 sigma_mode=attention age_bias=1 recent_frac=0.125" },
    { "abl_age0.5", "ablation", "kvmerger, age_bias 0.5",
      "age_bias=0.5" },
    { "abl_age0.5_set2", "ablation", "kvmerger, age_bias 0.5, sets of at most 2",
      "age_bias=0.5 max_set=2" },
    { "abl_age1", "ablation", "kvmerger, age_bias 1",
      "age_bias=1" },
    { "abl_age1_set2", "ablation", "kvmerger, age_bias 1, sets of at most 2",
      "age_bias=1 max_set=2" },
    { "abl_age3", "ablation", "kvmerger, age_bias 3",
      "age_bias=3" },
    { "abl_age3_set2", "ablation", "kvmerger, age_bias 3, sets of at most 2",
      "age_bias=3 max_set=2" },
    { "abl_age1_logbias", "ablation", "kvmerger, age_bias 1, logbias",
      "value=logbias age_bias=1" },
    { "abl_cap2", "ablation", "abl_best_age1, cells stand for at most 2 tokens (then oldest evicted)",
      "@age1 max_count=2" },
    { "abl_cap3", "ablation", "abl_best_age1, cells stand for at most 3 tokens (then oldest evicted)",
      "@age1 max_count=3" },
    { "abl_cap4", "ablation", "abl_best_age1, cells stand for at most 4 tokens (then oldest evicted)",
      "@age1 max_count=4" },
    { "abl_cap2_logbias", "ablation", "abl_best_age1, at most 2 tokens per cell, logbias",
      "@age1 value=logbias max_count=2" },
    { "abl_cap2_attn", "ablation", "abl_best_attn (least attended evicted), at most 2 tokens per cell",
      "@age1 pivot=attention max_count=2" },
    { "abl_best_rc4", "ablation", "abl_best_age1, recent = capacity/4",
      "@age1 recent_frac=0.25" },
    { "abl_best_rc2", "ablation", "abl_best_age1, recent = capacity/2",
      "@age1 recent_frac=0.5" },
    { "abl_age10_set2", "ablation", "kvmerger query-free, age_bias 10, sets of at most 2",
      "pivot=query-free age_bias=10 max_set=2" },
    { "abl_age100", "ablation", "kvmerger query-free, age_bias 100",
      "pivot=query-free age_bias=100" },
    { "abl_cap2_age0", "ablation", "kvmerger query-free, no age bias, at most 2 tokens per cell",
      "@age1 age_bias=0 max_count=2" },

};

static bool set_method_word(Method & m, const std::string & word, int depth = 0) {
    if (word.size() > 1 && word[0] == '@' && depth == 0) {
        for (const auto & pr : k_presets) {
            if (word.compare(1, std::string::npos, pr.name) == 0) {
                for (const auto & w : split(pr.params, ' ')) {
                    if (!set_method_word(m, w, depth + 1)) {
                        return false;
                    }
                }
                return true;
            }
        }
        return false;
    }
    const size_t eq = word.find('=');
    if (eq == std::string::npos) {
        return false;
    }
    const std::string k = word.substr(0, eq);
    const std::string v = word.substr(eq + 1);
    const auto pick = [&](int32_t & field, const std::vector<std::pair<const char *, int32_t>> & names) {
        for (const auto & [name, value] : names) {
            if (v == name) {
                field = value;
                return true;
            }
        }
        return false;
    };
    char * end = nullptr;
    const float       f = strtof(v.c_str(), &end);
    const bool        is_num = !v.empty() && *end == '\0';
    const auto        u = (uint32_t) f;
    kvm_params      & kp = m.kp;
    /**/ if (k == "method")       { return pick(kp.method, { { "kvmerger", KVM_METHOD_KVMERGER }, { "context-shift", KVM_METHOD_CONTEXT_SHIFT },
                                                         { "streaming-llm", KVM_METHOD_STREAMING_LLM }, { "h2o", KVM_METHOD_H2O },
                                                         { "cam", KVM_METHOD_CAM }, { "evict-fold", KVM_METHOD_EVICT_FOLD } }); }
    else if (k == "pivot")        { return pick(kp.pivot, { { "attention", KVM_PIVOT_ATTENTION }, { "query-free", KVM_PIVOT_QUERY_FREE } }); }
    else if (k == "sigma_mode")   { return pick(kp.sigma_mode, { { "adaptive", KVM_SIGMA_ADAPTIVE }, { "fixed", KVM_SIGMA_FIXED },
                                                             { "attention", KVM_SIGMA_ATTENTION }, { "relative", KVM_SIGMA_RELATIVE },
                                                             { "layer", KVM_SIGMA_LAYER } }); }
    else if (k == "value")        { return pick(kp.value_mode, { { "none", KVM_VALUE_MODE_NONE }, { "paper", KVM_VALUE_MODE_PAPER },
                                                             { "logbias", KVM_VALUE_MODE_LOGBIAS } }); }
    else if (!is_num)             { return false; }
    else if (k == "n_sink")       { kp.n_sink       = u; }
    else if (k == "n_recent")     { kp.n_recent     = u; }
    else if (k == "heavy_frac")   { kp.heavy_frac   = f; }
    else if (k == "sim_floor")    { kp.sim_floor    = f; }
    else if (k == "merge_keys")   { kp.merge_keys   = f != 0; }
    else if (k == "merge_values") { kp.merge_values = f != 0; }
    else if (k == "sigma")        { kp.sigma        = f; }
    else if (k == "age_bias")     { kp.age_bias     = f; }
    else if (k == "max_set")      { kp.max_set      = u; }
    else if (k == "max_count")    { kp.max_count    = u; }
    else if (k == "cam_span")     { kp.cam_span     = u; }
    else if (k == "recent_frac")  { m.recent_frac   = f; }
    else if (k == "calib")        { m.calib         = f != 0; }
    else if (k == "full")         { m.is_full       = f != 0; }
    else if (k == "shift")        { m.is_shift      = f != 0; }
    else if (k == "tool")         { m.tool          = f != 0; }
    else if (k == "keep")         { m.keep          = f; }
    else                          { return false; }
    return true;
}

static std::vector<Method> make_methods(int threads) {
    std::vector<Method> ms;
    for (const auto & row : k_methods) {
        Method m;
        m.name  = row.name;
        m.group = row.group;
        m.desc  = row.desc;
        m.kp    = kvm_params_default();
        m.kp.method    = KVM_METHOD_KVMERGER;
        m.kp.n_threads = (uint32_t) std::max(0, threads);
        for (const auto & w : split(row.params, ' ')) {
            const bool knob = w.rfind("tool=", 0) == 0 || w.rfind("keep=", 0) == 0;
            if (!set_method_word(m, w) || (m.tool && !knob && !w.empty())) {
                fprintf(stderr, "kvm_eval: method %s: bad parameter '%s'\n", row.name, w.c_str());
                exit(1);
            }
        }
        if (m.tool) {
            // what the patch runs for llama_kv_merge_default_params(), as the patch maps it; shown in
            // methods.csv, not passed
            llama_kv_merge_params d = llama_kv_merge_default_params();
            d.n_threads = (int32_t) m.kp.n_threads;
            if (!llama_kv_merge_kvm_params(&d, &m.kp, sizeof(m.kp))) {
                fprintf(stderr, "kvm_eval: llama_kv_merge_kvm_params failed (a build without LLAMA_KVMERGER?)\n");
                exit(1);
            }
        }
        ms.push_back(m);
    }
    return ms;
}

static bool selected(const Method & m, const std::vector<std::string> & sel) {
    if (m.is_full || m.is_shift) {
        return true; // bounds of every table
    }
    for (const auto & s : sel) {
        if (s == "all" || s == m.group || s == m.name) {
            return true;
        }
    }
    return false;
}

// ---------------------------------------------------------------------------------------------
// model / contexts

struct Model {
    llama_model * model = nullptr;
    const llama_vocab * vocab = nullptr;
    int n_vocab = 0;
    bool add_bos = false;
    llama_token bos = -1;
    double bytes_per_cell = 0; // K + V of every layer, f16
};

static std::vector<llama_token> tokenize(const Model & M, const std::string & text, bool bos) {
    int n = -llama_tokenize(M.vocab, text.c_str(), (int32_t) text.size(), nullptr, 0, bos, false);
    std::vector<llama_token> t(std::max(n, 0));
    if (n > 0) {
        llama_tokenize(M.vocab, text.c_str(), (int32_t) text.size(), t.data(), n, bos, false);
    }
    return t;
}

static std::string piece(const Model & M, llama_token t) {
    char buf[256];
    int n = llama_token_to_piece(M.vocab, t, buf, sizeof(buf), 0, false);
    return n > 0 ? std::string(buf, n) : std::string();
}

struct Ctx {
    llama_context * ctx = nullptr;
    llama_memory_t mem = nullptr;
    int n_ctx = 0;
};

static int g_threads = 2;
static int g_queries = 4; // --queries: llama_context_params.n_kv_merge_queries, the patch's query ring
// A fresh context for every method run: state the patch keeps per cache (e.g. the log-bias flag
// of value_mode logbias, merge counts) must not leak from one method into the next.
struct CtxGuard {
    Ctx c;
    ~CtxGuard() { if (c.ctx) llama_free(c.ctx); }
};

static std::unique_ptr<CtxGuard> new_ctx(Model & M, int n_ctx, int n_batch) {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = std::max(n_batch, 512);
    cp.n_ubatch = std::max(n_batch, 512);
    cp.n_seq_max = 1;
    cp.n_threads = g_threads;
    cp.n_threads_batch = g_threads;
    cp.n_kv_merge_queries = (uint32_t) g_queries;
    auto g = std::make_unique<CtxGuard>();
    g->c.ctx = llama_init_from_model(M.model, cp);
    if (!g->c.ctx) {
        fprintf(stderr, "kvm_eval: llama_init_from_model failed (n_ctx %d)\n", n_ctx);
        exit(1);
    }
    g->c.mem = llama_get_memory(g->c.ctx);
    g->c.n_ctx = (int) llama_n_ctx(g->c.ctx);
    return g;
}

// ---------------------------------------------------------------------------------------------
// the feeder: feeds tokens through a cache of capacity C, compressing with a method when full

struct Stats {
    int    events = 0;
    long   freed = 0;
    int    fallbacks = 0;     // events where the merge was refused (< 0) and context shift ran instead
    int    partial = 0;       // events where the merge freed fewer cells than asked (rest discarded)
    int    last_refusal = 0;
    double merge_ms = 0;      // time in compression calls
    double first_ms = 0;      // the first of them, which also starts the context's kvmerger handle
    long   first_freed = 0;   // cells the first one freed
    double decode_ms = 0;     // time in llama_decode (prompt batches)
    long   decoded = 0;       // tokens decoded
    double gen_ms = 0;        // time in single-token decodes (generation)
    long   gen_tokens = 0;
    int    pos_mismatch = 0;  // pos_max + 1 != n_past after a compression (should stay 0)
};

struct Feeder {
    Model & M;
    Ctx & X;
    const Method & m;
    const Opts & o;
    int C;                    // capacity (cells)
    const int n_keep;         // kept at the start, never compressed (o.n_keep; a retrieval prompt's header)
    int n_past = 0;
    Stats st;
    llama_batch batch;

    kvm_params kp;            // m.kp, with n_recent scaled to the capacity if the method asks
    llama_kv_merge_params p;  // what the patch is given: kp whole, and the calibration profile

    Feeder(Model & M_, Ctx & X_, const Method & m_, const Opts & o_, int C_, int n_keep_) : M(M_), X(X_), m(m_), o(o_), C(C_), n_keep(n_keep_) {
        batch = llama_batch_init(std::max(o.B, 512), 0, 1);
        kp = m.kp;
        if (m.recent_frac > 0) {
            kp.n_recent = (uint32_t) std::max(1, (int) std::lround(m.recent_frac * C));
        }
        p = llama_kv_merge_default_params();
        p.n_threads  = (int32_t) kp.n_threads;
        if (m.tool) {
            // common_kv_merge_params() for --kv-merge with no other flag: the defaults, n_threads from -t
            p.n_threads = std::min(g_threads, 256);
            return;
        }
        p.kvm_params = &kp;
        if (m.calib) {
            p.calib_path = o.calib.c_str();
        }
    }
    ~Feeder() { llama_batch_free(batch); }
    Feeder(const Feeder &) = delete; // p points into this Feeder
    Feeder & operator=(const Feeder &) = delete;

    void reset() {
        llama_memory_clear(X.mem, true);
        n_past = 0;
    }

    void shift(int n_discard) {
        llama_memory_seq_rm (X.mem, 0, n_keep, n_keep + n_discard);
        llama_memory_seq_add(X.mem, 0, n_keep + n_discard, n_past, -n_discard);
    }

    // free cells so that `need` more tokens fit
    void compress(int need) {
        const int must = n_past + need - C;
        if (must <= 0) {
            return;
        }
        // context shift is the stock baseline: it always discards half
        int n_free = (n_past - n_keep) / 2;
        if (!m.is_shift && m.keep > 0) {
            // common_kv_merge_n_free(): --kv-merge-keep of the window after n_keep
            const int n_left = n_past - n_keep;
            int kept = m.keep < 1 ? (int) std::lround(m.keep * n_left) : (int) m.keep;
            kept = std::max(1, std::min(kept, n_left));
            n_free = n_left - kept;
        } else if (!m.is_shift && o.n_free_frac > 0) {
            n_free = (int) std::lround(o.n_free_frac * C);
        } else if (!m.is_shift && o.n_free > 0) {
            n_free = o.n_free;
        }
        n_free = std::max(n_free, must);
        n_free = std::min(n_free, n_past - n_keep - 1);
        if (n_free < must) {
            fprintf(stderr, "kvm_eval: capacity %d too small for a batch of %d\n", C, need);
            exit(1);
        }
        const double t0 = now_ms();
        if (m.is_shift) {
            shift(n_free);
        } else {
            const int32_t r = llama_memory_seq_merge(X.ctx, 0, n_keep, n_past, n_free, &p, nullptr);
            if (r < 0) {
                st.fallbacks++;
                st.last_refusal = r;
                shift(n_free);
            } else if (r < n_free) {
                st.partial++;
                // the merge closed up its gaps; discard the rest right after the kept start
                const int rest = n_free - r;
                n_past -= r;
                shift(rest);
                n_past += r;
            }
        }
        const double dt = now_ms() - t0;
        if (st.events == 0) {
            st.first_ms    = dt;
            st.first_freed = n_free;
        }
        st.merge_ms += dt;
        st.events++;
        st.freed += n_free;
        n_past -= n_free;
        if (llama_memory_seq_pos_max(X.mem, 0) + 1 != n_past) {
            st.pos_mismatch++;
        }
    }

    // decode tokens [t, t+n) at positions n_past.., compressing first if they do not fit;
    // on_logits(j, logits) for every j with want(j)
    void feed(const llama_token * t, int n, const std::function<bool(int)> & want,
              const std::function<void(int, const float *)> & on_logits, bool gen = false) {
        for (int i = 0; i < n; i += o.B) {
            const int len = std::min(o.B, n - i);
            if (!m.is_full) {
                compress(len);
            }
            batch.n_tokens = 0;
            for (int j = 0; j < len; ++j) {
                batch.token[j] = t[i + j];
                batch.pos[j] = n_past + j;
                batch.n_seq_id[j] = 1;
                batch.seq_id[j][0] = 0;
                batch.logits[j] = want && want(i + j);
            }
            batch.n_tokens = len;
            const double t0 = now_ms();
            if (llama_decode(X.ctx, batch) != 0) {
                fprintf(stderr, "kvm_eval: llama_decode failed (n_past %d, len %d, method %s)\n", n_past, len, m.name.c_str());
                exit(1);
            }
            const double dt = now_ms() - t0;
            if (gen) {
                st.gen_ms += dt;
                st.gen_tokens += len;
            } else {
                st.decode_ms += dt;
                st.decoded += len;
            }
            n_past += len;
            if (on_logits) {
                for (int j = 0; j < len; ++j) {
                    if (batch.logits[j]) {
                        on_logits(i + j, llama_get_logits_ith(X.ctx, j));
                    }
                }
            }
        }
    }

    llama_token argmax(const float * l) const {
        return (llama_token) (std::max_element(l, l + M.n_vocab) - l);
    }

    // greedy: feed prompt (logits on the last), then generate n tokens
    std::string greedy(const std::vector<llama_token> & prompt, int n) {
        llama_token next = -1;
        feed(prompt.data(), (int) prompt.size(), [&](int j) { return j == (int) prompt.size() - 1; },
             [&](int, const float * l) { next = argmax(l); });
        std::string out;
        for (int k = 0; k < n; ++k) {
            if (llama_vocab_is_eog(M.vocab, next)) {
                break;
            }
            out += piece(M, next);
            if (k + 1 == n) {
                break;
            }
            llama_token cur = next;
            feed(&cur, 1, [](int) { return true; }, [&](int, const float * l) { next = argmax(l); }, true);
        }
        return out;
    }
};

static std::string status_of(const Stats & st) {
    if (st.events == 0) return "ok";
    if (st.fallbacks == st.events) return fmt("refused (%d) at every event: ran context shift instead", st.last_refusal);
    if (st.fallbacks || st.partial) return fmt("%d of %d events refused (%d), %d partial: shift for the rest", st.fallbacks, st.events, st.last_refusal, st.partial);
    return "ok";
}

static double nll_of(const float * logits, int n_vocab, llama_token tok) {
    float mx = logits[0];
    for (int i = 1; i < n_vocab; ++i) {
        mx = std::max(mx, logits[i]);
    }
    double s = 0;
    for (int i = 0; i < n_vocab; ++i) {
        s += std::exp((double) logits[i] - mx);
    }
    return std::log(s) + mx - logits[tok];
}

// A saved prefix: the cache after the tokens every method decodes identically (before the
// first compression), so that each method only runs from there. The last batches before the
// first compression are re-decoded by every method, so that the query ring the merge reads
// its attention from holds the same queries as in an uninterrupted run.
struct Prefix {
    int n_tokens = 0;                 // tokens in the saved state
    std::vector<uint8_t> state;
};

static int prefix_point(int n_total, int C, const Opts & o) {
    // first batch start i0 at which i0 + len > C when nothing was compressed before
    int i0 = 0;
    while (i0 < n_total) {
        const int len = std::min(o.B, n_total - i0);
        if (i0 + len > C) {
            break;
        }
        i0 += len;
    }
    if (i0 >= n_total) {
        return 0; // never compresses
    }
    const int k = std::max(1, (g_queries + o.B - 1) / o.B);
    return std::max(0, i0 - k * o.B);
}

// feed toks[0, n) through f; uses/makes the shared prefix state. Calls on_logits as feed().
static void feed_with_prefix(Feeder & f, Prefix & pre, const std::vector<llama_token> & toks, int n,
                             const std::function<bool(int)> & want,
                             const std::function<void(int, const float *)> & on_logits) {
    f.reset();
    int start = 0;
    if (!f.m.is_full && pre.n_tokens > 0 && !pre.state.empty()) {
        const size_t r = llama_state_seq_set_data(f.X.ctx, pre.state.data(), pre.state.size(), 0);
        if (r == 0) {
            fprintf(stderr, "kvm_eval: state restore failed, decoding from scratch\n");
            f.reset();
        } else {
            start = pre.n_tokens;
            f.n_past = pre.n_tokens;
        }
    } else if (!f.m.is_full && pre.n_tokens > 0 && pre.state.empty()) {
        // first method on this prefix: decode it and save
        f.feed(toks.data(), pre.n_tokens, want, on_logits);
        const size_t sz = llama_state_seq_get_size(f.X.ctx, 0);
        pre.state.resize(sz);
        if (llama_state_seq_get_data(f.X.ctx, pre.state.data(), sz, 0) != sz) {
            pre.state.clear();
            pre.n_tokens = 0;
        }
        start = f.n_past;
    }
    auto want2 = [&](int j) { return want && want(j + start); };
    auto on2   = [&](int j, const float * l) { if (on_logits) on_logits(j + start, l); };
    f.feed(toks.data() + start, n - start, want2, on2);
}

// ---------------------------------------------------------------------------------------------

struct Report {
    Table ppl, passkey, kvqa, methods;
};

static std::string methods_json(const std::vector<Method> & ms) {
    std::string o = "[";
    for (size_t i = 0; i < ms.size(); ++i) {
        const auto & m = ms[i];
        o += fmt("%s\n  {\"name\": %s, \"group\": %s, \"desc\": %s, \"method\": %d, \"n_sink\": %d, \"n_recent\": %d, "
                 "\"heavy_frac\": %g, \"sim_floor\": %g, \"value_mode\": %d, \"merge_keys\": %s, \"merge_values\": %s, "
                 "\"use_attn\": %s, \"missing\": %s}",
                 i ? "," : "", json_escape(m.name).c_str(), json_escape(m.group).c_str(), json_escape(m.desc).c_str(),
                 m.is_full ? -1 : m.is_shift ? -2 : m.kp.method, (int) m.kp.n_sink, (int) m.kp.n_recent, m.kp.heavy_frac,
                 m.kp.sim_floor, m.kp.value_mode, m.kp.merge_keys ? "true" : "false", m.kp.merge_values ? "true" : "false",
                 m.kp.pivot == KVM_PIVOT_ATTENTION ? "true" : "false", m.missing.empty() ? "null" : json_escape(m.missing).c_str());
    }
    return o + "\n]";
}

static void write_json(const Opts & o, const Report & R, const std::vector<Method> & ms, double wall_s) {
    FILE * f = fopen((o.out + "/results.json").c_str(), "w");
    if (!f) {
        return;
    }
    fprintf(f, "{\n\"model\": %s,\n\"mode\": %s,\n\"window\": %d,\n\"batch\": %d,\n\"n_keep\": %d,\n\"n_free\": %d,\n\"n_free_frac\": %.4f,\n\"threads\": %d,\n\"wall_s\": %.1f,\n",
            json_escape(o.model).c_str(), json_escape(o.full ? "full" : "short").c_str(), o.W, o.B, o.n_keep, o.n_free, o.n_free_frac, o.threads, wall_s);
    fprintf(f, "\"retr_keep\": %s,\n", o.retr_keep < 0 ? "\"header\"" : std::to_string(o.retr_keep).c_str());
    fprintf(f, "\"methods\": %s,\n", methods_json(ms).c_str());
    fprintf(f, "\"ppl\": %s,\n", R.ppl.json().c_str());
    fprintf(f, "\"passkey\": %s,\n", R.passkey.json().c_str());
    fprintf(f, "\"kvqa\": %s\n}\n", R.kvqa.json().c_str());
    fclose(f);
}

// text prep: collapse runs of blank lines and spaces (the texts are formatted for terminals)
static std::string normalize(const std::string & s) {
    std::string o;
    int nl = 0;
    bool sp = false;
    for (char c : s) {
        if (c == '\r') {
            continue;
        }
        if (c == '\n') {
            nl++;
            sp = false;
            continue;
        }
        if (c == ' ' || c == '\t') {
            if (nl == 0) {
                sp = true;
            }
            continue;
        }
        if (nl) {
            o += nl > 1 ? "\n\n" : "\n";
            nl = 0;
        } else if (sp && !o.empty()) {
            o += ' ';
        }
        sp = false;
        o += c;
    }
    return o;
}

// The calibration profile of the *_calib methods: the first calib_W tokens of a text the PPL task
// does not score, in a full cache, observed by llama_memory_seq_merge_calibrate. Observation 2 of
// the paper says the statistics belong to the model, so any long text should give about the same.
static bool make_calib(Model & M, const Opts & o, const std::vector<Method> & methods) {
    auto toks = tokenize(M, normalize(read_file(o.calib_text)), M.add_bos);
    if (toks.size() > (size_t) o.calib_W) {
        toks.resize(o.calib_W);
    }
    if (toks.size() < 2) {
        fprintf(stderr, "kvm_eval: calibration text %s is too short\n", o.calib_text.c_str());
        return false;
    }
    const Method * full = nullptr;
    for (const auto & m : methods) if (m.is_full) full = &m;
    auto g = new_ctx(M, (int) toks.size(), o.B);
    Feeder f(M, g->c, *full, o, (int) toks.size(), o.n_keep);
    f.feed(toks.data(), (int) toks.size(), nullptr, nullptr);
    const int32_t n = llama_memory_seq_merge_calibrate(g->c.ctx, 0, o.calib.c_str());
    if (n < 0) {
        fprintf(stderr, "kvm_eval: llama_memory_seq_merge_calibrate failed (%d)\n", n);
        return false;
    }
    printf("# calibration profile %s: %d adjacent pairs of %s\n", o.calib.c_str(), n, o.calib_text.c_str());
    return true;
}

int main(int argc, char ** argv) {
    Opts o;
    bool list = false;
    if (const char * qw = getenv("LLAMA_KV_MERGE_QWIN")) {
        g_queries = std::max(0, atoi(qw)); // how the commands in docs/findings.md before --queries set it
    }
    std::map<std::string, bool> set_by_user;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) {
                usage();
                exit(1);
            }
            set_by_user[a] = true;
            return argv[++i];
        };
        if (a == "-m" || a == "--model") o.model = next();
        else if (a == "--text") {
            std::string v = next();
            auto eq = v.find('=');
            if (eq == std::string::npos) { usage(); return 1; }
            o.texts.emplace_back(v.substr(0, eq), v.substr(eq + 1));
        }
        else if (a == "--out") o.out = next();
        else if (a == "--full") o.full = true;
        else if (a == "-t") o.threads = atoi(next().c_str());
        else if (a == "--queries") g_queries = std::max(0, atoi(next().c_str()));
        else if (a == "--window") o.W = atoi(next().c_str());
        else if (a == "--batch") o.B = atoi(next().c_str());
        else if (a == "--n-keep") o.n_keep = atoi(next().c_str());
        else if (a == "--n-free") { o.n_free = atoi(next().c_str()); o.n_free_frac = 0; }
        else if (a == "--n-free-frac") o.n_free_frac = atof(next().c_str());
        else if (a == "--windows") o.windows = atoi(next().c_str());
        else if (a == "--first-window") o.first_window = atoi(next().c_str());
        else if (a == "--budgets") o.budgets = parse_doubles(next());
        else if (a == "--abl-budgets") o.abl_budgets = parse_doubles(next());
        else if (a == "--methods") o.methods = split(next(), ',');
        else if (a == "--tasks") o.tasks = split(next(), ',');
        else if (a == "--pk-window") o.pk_W = atoi(next().c_str());
        else if (a == "--retr-keep") {
            const std::string v = next();
            char * end = nullptr;
            const long n = v == "header" ? -1 : strtol(v.c_str(), &end, 10);
            if (v != "header" && (v.empty() || *end != '\0' || n < 1 || n > 1000000)) {
                fprintf(stderr, "kvm_eval: --retr-keep wants 'header' or a token count >= 1, not '%s'\n", v.c_str());
                exit(1);
            }
            o.retr_keep = (int) n;
        }
        else if (a == "--pk-keys") o.pk_keys = atoi(next().c_str());
        else if (a == "--pk-depths") { o.pk_depths.clear(); for (double d : parse_doubles(next())) o.pk_depths.push_back((int) d); }
        else if (a == "--pk-budgets") o.pk_budgets = parse_doubles(next());
        else if (a == "--qa-window") o.qa_W = atoi(next().c_str());
        else if (a == "--qa-pairs") o.qa_pairs = atoi(next().c_str());
        else if (a == "--qa-trials") o.qa_trials = atoi(next().c_str());
        else if (a == "--qa-texts") o.qa_texts = atoi(next().c_str());
        else if (a == "--pk-texts") o.pk_texts = atoi(next().c_str());
        else if (a == "--qa-budgets") o.qa_budgets = parse_doubles(next());
        else if (a == "--gen-bench") o.n_gen_bench = atoi(next().c_str());
        else if (a == "--calib") o.calib = next();
        else if (a == "--calib-text") o.calib_text = next();
        else if (a == "--calib-window") o.calib_W = atoi(next().c_str());
        else if (a == "--make-calib") o.make_calib_only = true;
        else if (a == "--list") list = true;
        else if (a == "-v") o.verbose = true;
        else if (a == "-h" || a == "--help") { usage(); return 0; }
        else { fprintf(stderr, "kvm_eval: unknown argument %s\n", a.c_str()); usage(); return 1; }
    }
    if (o.full) {
        if (!set_by_user["--windows"])     o.windows = 3;
        if (!set_by_user["--budgets"])     o.budgets = {0.25, 0.35, 0.50, 0.625, 0.75};
        if (!set_by_user["--abl-budgets"]) o.abl_budgets = {0.50, 0.35};
        if (!set_by_user["--methods"])     o.methods = {"all"};
        if (!set_by_user["--pk-window"])   o.pk_W = 2048;
        if (!set_by_user["--pk-keys"])     o.pk_keys = 3;
        if (!set_by_user["--qa-window"])   o.qa_W = 2048;
        if (!set_by_user["--qa-trials"])   o.qa_trials = 3;
        if (!set_by_user["--pk-depths"])   o.pk_depths = {10, 30, 50, 70, 90};
        if (!set_by_user["--pk-budgets"])  o.pk_budgets = {0.50, 0.35};
        if (!set_by_user["--qa-budgets"])  o.qa_budgets = {0.50, 0.35};
        o.pk_texts = 2;
        o.qa_texts = 2;
    }
    g_threads = o.threads;

    std::vector<Method> methods = make_methods(o.threads);
    if (o.calib.empty() && !o.calib_text.empty()) {
        o.calib = o.out + "/calib.profile";
    }
    for (auto & m : methods) {
        if (m.calib && o.calib.empty()) {
            m.missing = "needs a calibration profile: --calib FILE or --calib-text PATH";
        }
    }
    if (list) {
        for (const auto & m : methods) {
            printf("%-24s %-9s %s%s\n", m.name.c_str(), m.group.c_str(), m.desc.c_str(),
                   m.missing.empty() ? "" : (" [NOT RUN: " + m.missing + "]").c_str());
        }
        return 0;
    }
    if (o.first_window < 0 || o.windows < 1) {
        fprintf(stderr, "kvm_eval: --first-window must be >= 0 and --windows >= 1\n");
        return 1;
    }
    if (o.model.empty() || (o.texts.empty() && !o.make_calib_only) || (o.make_calib_only && o.calib_text.empty())) {
        usage();
        return 1;
    }
    std::vector<const Method *> sel;
    for (const auto & m : methods) {
        if (selected(m, o.methods)) {
            sel.push_back(&m);
        }
    }
    auto has_task = [&](const char * t) { return std::find(o.tasks.begin(), o.tasks.end(), t) != o.tasks.end(); };

    const bool needs_out = !o.make_calib_only || o.calib.rfind(o.out + "/", 0) == 0;
    if (needs_out && system(("mkdir -p '" + o.out + "'").c_str()) != 0) {
        fprintf(stderr, "kvm_eval: cannot create %s\n", o.out.c_str());
        return 1;
    }

    llama_log_set([](ggml_log_level level, const char * text, void * ud) {
        const bool verbose = *(bool *) ud;
        if (verbose || level >= GGML_LOG_LEVEL_ERROR) {
            fputs(text, stderr);
        }
    }, &o.verbose);
    llama_backend_init();

    Model M;
    {
        llama_model_params mp = llama_model_default_params();
        mp.n_gpu_layers = 0;
        M.model = llama_model_load_from_file(o.model.c_str(), mp);
        if (!M.model) {
            fprintf(stderr, "kvm_eval: cannot load %s\n", o.model.c_str());
            return 1;
        }
        M.vocab = llama_model_get_vocab(M.model);
        M.n_vocab = llama_vocab_n_tokens(M.vocab);
        M.add_bos = llama_vocab_get_add_bos(M.vocab);
        M.bos = llama_vocab_bos(M.vocab);
        const int n_layer = llama_model_n_layer(M.model);
        const int n_head = llama_model_n_head(M.model);
        const int n_head_kv = llama_model_n_head_kv(M.model);
        const int d_head = llama_model_n_embd(M.model) / n_head;
        M.bytes_per_cell = 2.0 * n_layer * n_head_kv * d_head * 2 /* f16 */;
    }

    bool need_calib = o.make_calib_only;
    for (auto * m : sel) need_calib |= m->calib && m->missing.empty();
    if (need_calib && !o.calib_text.empty() && !make_calib(M, o, methods)) {
        return 1;
    }
    if (o.make_calib_only) {
        return 0;
    }

    // texts
    std::vector<std::pair<std::string, std::vector<llama_token>>> T;
    for (const auto & [name, path] : o.texts) {
        auto toks = tokenize(M, normalize(read_file(path)), false);
        printf("# text %-10s %7zu tokens  (%s)\n", name.c_str(), toks.size(), path.c_str());
        T.emplace_back(name, std::move(toks));
    }
    const double mib_per_cell = M.bytes_per_cell / (1024.0 * 1024.0);
    printf("# model %s: add_bos %d, KV %.1f KiB/cell (f16), threads %d, mode %s\n", o.model.c_str(), (int) M.add_bos,
           M.bytes_per_cell / 1024.0, o.threads, o.full ? "full" : "short");
    printf("# methods:");
    for (auto * m : sel) printf(" %s", m->name.c_str());
    printf("\n");
    for (const auto & m : methods) {
        if (!m.missing.empty() && selected(m, o.methods)) {
            printf("# not run: %s (%s)\n", m.name.c_str(), m.missing.c_str());
        }
    }
    fflush(stdout);

    Report R;
    R.ppl.path = o.out + "/ppl.csv";
    R.passkey.path = o.out + "/passkey.csv";
    R.kvqa.path = o.out + "/kvqa.csv";
    R.methods.path = o.out + "/methods.csv";
    NllDump nll_dump;
    nll_dump.path = o.out + "/nll.bin";
    nll_dump.index.path = o.out + "/nll_index.csv";
    for (const auto & m : methods) {
        const kvm_params & kp = m.kp;
        R.methods.add(Row().s("name", m.name).s("group", m.group).s("desc", m.desc)
            .i("method", m.is_full ? -1 : m.is_shift ? -2 : kp.method).i("n_sink", kp.n_sink).i("n_recent", kp.n_recent).f("recent_frac", m.recent_frac, 3)
            .f("heavy_frac", kp.heavy_frac, 3).f("sim_floor", kp.sim_floor, 2).i("value_mode", kp.value_mode)
            .i("merge_keys", kp.merge_keys).i("merge_values", kp.merge_values).i("use_attn", kp.pivot == KVM_PIVOT_ATTENTION)
            .i("calib", m.calib).i("tool", m.tool).f("keep", m.keep, 3).f("age_bias", kp.age_bias, 2).i("max_set", kp.max_set)
            .i("max_count", kp.max_count).i("sigma_mode", kp.sigma_mode).s("missing", m.missing));
    }
    const double t_start = now_ms();

    // -----------------------------------------------------------------------------------------
    // 1 + 4: streaming perplexity, cost
    if (has_task("ppl")) {
        printf("\n== streaming perplexity: window %d, batch %d, n_keep %d, per-event free %s\n", o.W, o.B, o.n_keep,
               o.n_free_frac > 0 ? fmt("%.3f x capacity (shift: half)", o.n_free_frac).c_str()
               : o.n_free > 0 ? fmt("%d (shift: half)", o.n_free).c_str() : "half (as context shift)");
        printf("%-8s %3s %6s %-22s %9s %8s %7s %6s %9s %9s %7s %7s %8s %6s\n", "text", "win", "budget", "method", "ppl", "gap_cl",
               "events", "fallbk", "merge_ms", "ms/event", "m/pref", "later", "kv_MiB", "tok/s");
        fflush(stdout);
        for (const auto & [tname, toks] : T) {
            const int body = o.W - (M.add_bos ? 1 : 0);
            const int end_win = std::min<int>(o.first_window + o.windows, (int) toks.size() / body);
            if (end_win <= o.first_window) {
                printf("# %s: shorter than %d windows, skipped\n", tname.c_str(), o.first_window + 1);
                continue;
            }
            for (int w = o.first_window; w < end_win; ++w) {
                std::vector<llama_token> win;
                if (M.add_bos) win.push_back(M.bos);
                win.insert(win.end(), toks.begin() + (size_t) w * body, toks.begin() + (size_t) (w + 1) * body);
                const int N = (int) win.size();

                std::vector<double> all_budgets = o.budgets;
                for (double b : o.abl_budgets) {
                    if (std::find(all_budgets.begin(), all_budgets.end(), b) == all_budgets.end()) all_budgets.push_back(b);
                }
                int minC = N;
                for (double b : all_budgets) minC = std::min(minC, (int) std::lround(b * N));

                // the full cache: nll of every position once
                std::vector<double> nll_full(N, NAN);
                Stats full_st;
                double full_tps = 0;
                const Method * full_m = nullptr;
                for (auto * m : sel) if (m->is_full) full_m = m;
                {
                    auto XG = new_ctx(M, N + o.n_gen_bench + 64, o.B);
                    Ctx & X = XG->c;
                    Feeder f(M, X, *full_m, o, X.n_ctx, o.n_keep);
                    Prefix none;
                    feed_with_prefix(f, none, win, N, [&](int t) { return t + 1 >= minC && t + 1 < N; },
                                     [&](int t, const float * l) { nll_full[t + 1] = nll_of(l, M.n_vocab, win[t + 1]); });
                    // decode speed at this length: continue with the text's next tokens one by one
                    for (int g = 0; g < o.n_gen_bench; ++g) {
                        llama_token tk = win[(g + 1) % N];
                        f.feed(&tk, 1, nullptr, nullptr, true);
                    }
                    full_st = f.st;
                    full_tps = f.st.gen_tokens ? 1000.0 * f.st.gen_tokens / f.st.gen_ms : 0;
                }
                const double full_ms_per_tok = full_st.decode_ms / std::max<long>(1, full_st.decoded);

                for (double b : all_budgets) {
                    const int C = (int) std::lround(b * N);
                    const bool main_b = std::find(o.budgets.begin(), o.budgets.end(), b) != o.budgets.end();
                    const bool abl_b = std::find(o.abl_budgets.begin(), o.abl_budgets.end(), b) != o.abl_budgets.end();
                    double sum_full = 0;
                    long n_sc = 0;
                    for (int t = C; t < N; ++t) { sum_full += nll_full[t]; n_sc++; }
                    const double ppl_full = std::exp(sum_full / n_sc);
                    nll_dump.add(tname, w, b, C, full_m->name, std::vector<float>(nll_full.begin() + C, nll_full.end()));
                    double ppl_shift = NAN;

                    auto emit = [&](const Method & m, double ppl, const Stats & st, double tps, int Cm, int n_alloc) {
                        const double gap = std::isfinite(ppl_shift) && ppl_shift != ppl_full ? (ppl_shift - ppl) / (ppl_shift - ppl_full) : NAN;
                        const double mpe = st.events ? st.merge_ms / st.events : 0;
                        const double rel = st.freed ? st.merge_ms / (st.freed * full_ms_per_tok) : 0;
                        // what a long session pays per event: every event but the context's first
                        const double rel_later = st.events > 1 ? (st.merge_ms - st.first_ms) / ((st.freed - st.first_freed) * full_ms_per_tok) : NAN;
                        const double kv = Cm * mib_per_cell;
                        printf("%-8s %3d %6.3f %-22s %9.4f %8.3f %7d %6d %9.1f %9.2f %7.4f %7.4f %8.2f %6.1f%s\n", tname.c_str(), w, b,
                               m.name.c_str(), ppl, gap, st.events, st.fallbacks, st.merge_ms, mpe, rel, rel_later, kv, tps,
                               st.pos_mismatch ? "  POS-MISMATCH" : "");
                        fflush(stdout);
                        R.ppl.add(Row().s("text", tname).i("window_idx", w).i("W", N).f("budget", b, 3).i("capacity", Cm)
                            .s("method", m.name).s("group", m.group).f("ppl", ppl).f("ppl_full", ppl_full).f("ppl_shift", ppl_shift)
                            .f("gap_closed", gap).i("n_scored", n_sc).i("events", st.events).i("freed", st.freed)
                            .i("fallbacks", st.fallbacks).i("partial", st.partial).i("last_refusal", st.last_refusal)
                            .f("merge_ms_total", st.merge_ms, 2).f("merge_ms_per_event", mpe, 3)
                            .f("merge_over_prefill_of_freed", rel, 5).f("merge_ms_first", st.first_ms, 3)
                            .f("merge_over_prefill_after_first", rel_later, 5).f("prefill_ms_per_token_full", full_ms_per_tok, 3)
                            .f("decode_ms_total", st.decode_ms, 1).f("kv_mib", kv, 3).f("kv_mib_allocated", n_alloc * mib_per_cell, 3).f("decode_tok_s", tps, 2)
                            .f("decode_tok_s_full", full_tps, 2).i("pos_mismatch", st.pos_mismatch).s("status", status_of(st)));
                    };
                    {
                        Stats st = full_st;
                        st.events = 0;
                        emit(*full_m, ppl_full, st, full_tps, N, N);
                    }

                    Prefix pre;
                    pre.n_tokens = prefix_point(N, C, o);
                    for (auto * mp : sel) {
                        const Method & m = *mp;
                        if (m.is_full || !m.missing.empty()) continue;
                        const bool want_here = m.group == "main" ? main_b : abl_b;
                        if (!want_here && !m.is_shift) continue;
                        auto XG = new_ctx(M, C, o.B);
                        Ctx & X = XG->c;
                        Feeder f(M, X, m, o, C, o.n_keep);
                        double sum = 0;
                        long cnt = 0;
                        std::vector<float> nll;
                        feed_with_prefix(f, pre, win, N, [&](int t) { return t + 1 >= C && t + 1 < N; },
                                         [&](int t, const float * l) {
                                             const double x = nll_of(l, M.n_vocab, win[t + 1]);
                                             sum += x;
                                             cnt++;
                                             nll.push_back((float) x);
                                         });
                        nll_dump.add(tname, w, b, C, m.name, nll);
                        Stats st = f.st;
                        // decode speed at the document's end, same capacity
                        for (int g = 0; g < o.n_gen_bench; ++g) {
                            llama_token tk = win[(g + 1) % N];
                            f.feed(&tk, 1, nullptr, nullptr, true);
                        }
                        st.gen_ms = f.st.gen_ms;
                        st.gen_tokens = f.st.gen_tokens;
                        const double tps = st.gen_tokens ? 1000.0 * st.gen_tokens / st.gen_ms : 0;
                        if (cnt != n_sc) {
                            fprintf(stderr, "kvm_eval: scored %ld tokens, expected %ld\n", cnt, n_sc);
                        }
                        const double ppl = std::exp(sum / std::max<long>(1, cnt));
                        if (m.is_shift) ppl_shift = ppl;
                        emit(m, ppl, st, tps, C, X.n_ctx);
                    }
                }
            }
        }
    }

    printf("# ppl section: %.1f s\n", (now_ms() - t_start) / 1000.0);
    const double t_pk = now_ms();
    // -----------------------------------------------------------------------------------------
    // 2 + 3: retrieval trials (passkey, kv retrieval)
    struct Query { std::vector<llama_token> toks; std::string answer; int depth; std::string key; };

    // tokens kept at the start of a retrieval prompt: its header (the instruction), as llama-passkey
    // keeps its prefix (--retr-keep header, the default), or o.retr_keep tokens
    auto retr_keep = [&](const std::vector<llama_token> & header) { return o.retr_keep < 0 ? (int) header.size() : o.retr_keep; };

    // runs one haystack + queries for every method and budget; callback per (method, budget, query)
    auto run_trials = [&](const std::vector<llama_token> & hay, int n_keep, const std::vector<Query> & qs, const std::vector<double> & budgets,
                          int n_gen, const std::function<void(const Method &, double, int, const Query &, bool, const std::string &, const Stats &)> & cb) {
        // common prefix of the queries: decoded once after the haystack (this also applies the
        // pending K-shift of the last compression), then the state is saved and each query runs from it
        size_t cp = qs[0].toks.size();
        for (const auto & q : qs) {
            size_t k = 0;
            while (k < cp && k < q.toks.size() && q.toks[k] == qs[0].toks[k]) k++;
            cp = k;
        }
        size_t qmax = 0, qmin = SIZE_MAX;
        for (const auto & q : qs) { qmax = std::max(qmax, q.toks.size()); qmin = std::min(qmin, q.toks.size()); }
        cp = std::min(cp, qmin - 1); // every query keeps at least one token of its own
        const int N = (int) hay.size();
        std::vector<double> bs = budgets;
        bs.insert(bs.begin(), 1.0); // the full cache
        for (double b : bs) {
            const bool full = b >= 1.0;
            const int C = full ? N + (int) qmax + n_gen + 64 : (int) std::lround(b * N);
            Prefix pre;
            pre.n_tokens = full ? 0 : prefix_point(N, C, o);
            for (auto * mp : sel) {
                const Method & m = *mp;
                if (m.is_full != full || !m.missing.empty()) continue;
                if (m.group != "main" && !m.is_shift && !(o.full && std::find(o.abl_budgets.begin(), o.abl_budgets.end(), b) != o.abl_budgets.end())) continue;
                auto XG = new_ctx(M, C, o.B);
                Ctx & X = XG->c;
                Feeder f(M, X, m, o, C, n_keep);
                feed_with_prefix(f, pre, hay, N, nullptr, nullptr);
                if (!full) f.compress((int) qmax + n_gen);
                if (cp > 0) f.feed(qs[0].toks.data(), (int) cp, nullptr, nullptr);
                std::vector<uint8_t> st(llama_state_seq_get_size(X.ctx, 0));
                llama_state_seq_get_data(X.ctx, st.data(), st.size(), 0);
                const int n_past0 = f.n_past;
                for (size_t qi = 0; qi < qs.size(); ++qi) {
                    const auto & q = qs[qi];
                    if (qi > 0) {
                        llama_memory_clear(X.mem, true);
                        llama_state_seq_set_data(X.ctx, st.data(), st.size(), 0);
                        f.n_past = n_past0;
                    }
                    std::vector<llama_token> rest(q.toks.begin() + cp, q.toks.end());
                    const std::string ans = f.greedy(rest, n_gen);
                    const bool ok = ans.find(q.answer) != std::string::npos;
                    cb(m, full ? 1.0 : b, C, q, ok, ans, f.st);
                }
            }
        }
    };

    auto hay_of = [&](const std::vector<llama_token> & src, size_t offset, int n) {
        std::vector<llama_token> h;
        for (int i = 0; i < n; ++i) h.push_back(src[(offset + i) % src.size()]);
        return h;
    };

    std::mt19937 rng(1234);
    if (has_task("passkey")) {
        printf("\n== passkey: haystack %d tokens, depths", o.pk_W);
        for (int d : o.pk_depths) printf(" %d%%", d);
        const std::string head = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about it.\n\n";
        const auto th = tokenize(M, head, M.add_bos);
        const int n_keep = retr_keep(th);
        printf(", %d key(s) per depth; kept at the start: %d tokens\n", o.pk_keys, n_keep);
        printf("%-8s %5s %6s %-22s %3s %7s  %s\n", "text", "depth", "budget", "method", "ok", "key", "answer");
        fflush(stdout);
        const int n_texts = std::min<int>(o.pk_texts, (int) T.size());
        for (int ti = 0; ti < n_texts; ++ti) {
            const auto & [tname, src] = T[ti];
            for (int d : o.pk_depths) {
                for (int k = 0; k < o.pk_keys; ++k) {
                    const std::string key = std::to_string(10000 + rng() % 90000);
                    const std::string needle = "\nThe pass key is " + key + ". Remember it. " + key + " is the pass key.\n";
                    auto tn = tokenize(M, needle, false);
                    Query q;
                    q.toks = tokenize(M, "\n\nWhat is the pass key? The pass key is", false);
                    q.answer = key;
                    q.depth = d;
                    q.key = key;
                    const int n_fill = o.pk_W - (int) th.size() - (int) tn.size() - (int) q.toks.size();
                    auto filler = hay_of(src, (size_t) (d * 131 + k * 977) * 7 % src.size(), n_fill);
                    std::vector<llama_token> hay = th;
                    const int at = (int) std::lround(n_fill * d / 100.0);
                    hay.insert(hay.end(), filler.begin(), filler.begin() + at);
                    hay.insert(hay.end(), tn.begin(), tn.end());
                    hay.insert(hay.end(), filler.begin() + at, filler.end());
                    run_trials(hay, n_keep, {q}, o.pk_budgets, o.pk_gen,
                        [&](const Method & m, double b, int C, const Query & qq, bool ok, const std::string & ans, const Stats & st) {
                            std::string a1 = ans;
                            std::replace(a1.begin(), a1.end(), '\n', ' ');
                            printf("%-8s %4d%% %6.3f %-22s %3s %7s  %s\n", tname.c_str(), qq.depth, b, m.name.c_str(), ok ? "yes" : "no",
                                   qq.key.c_str(), a1.c_str());
                            fflush(stdout);
                            R.passkey.add(Row().s("text", tname).i("haystack", (int) hay.size()).i("depth", qq.depth).i("trial", k)
                                .f("budget", b, 3).i("capacity", C).s("method", m.name).s("group", m.group).i("correct", ok)
                                .s("key", qq.key).s("answer", a1).i("events", st.events).i("fallbacks", st.fallbacks)
                                .f("merge_ms_total", st.merge_ms, 2));
                        });
                }
            }
        }
    }

    printf("# passkey section: %.1f s\n", (now_ms() - t_pk) / 1000.0);
    const double t_qa = now_ms();
    if (has_task("kvqa")) {
        static const char * words[] = {"apple", "river", "candle", "mirror", "garden", "rocket", "violin", "tiger", "castle",
                                       "pencil", "island", "helmet", "lantern", "coffee", "dragon", "window", "basket", "planet"};
        const auto th = tokenize(M, "Below is a text with some codes in it. Remember every code.\n\n", M.add_bos);
        const int n_keep = retr_keep(th);
        printf("\n== kv retrieval: haystack %d tokens, %d pairs, %d trial(s) per text; kept at the start: %d tokens\n", o.qa_W,
               o.qa_pairs, o.qa_trials, n_keep);
        printf("%-8s %5s %6s %-22s %7s\n", "text", "trial", "budget", "method", "correct");
        fflush(stdout);
        for (int ti = 0; ti < std::min<int>(o.qa_texts, (int) T.size()); ++ti) {
            const auto & [tname, src] = T[ti];
            for (int k = 0; k < o.qa_trials; ++k) {
                std::vector<std::string> ws(words, words + sizeof(words) / sizeof(words[0]));
                std::shuffle(ws.begin(), ws.end(), rng);
                ws.resize(std::min<size_t>(o.qa_pairs, ws.size()));
                std::vector<std::string> codes;
                std::vector<std::vector<llama_token>> lines;
                int n_lines = 0;
                for (const auto & w : ws) {
                    codes.push_back(std::to_string(1000 + rng() % 9000));
                    lines.push_back(tokenize(M, "\nThe code for " + w + " is " + codes.back() + ".\n", false));
                    n_lines += (int) lines.back().size();
                }
                std::vector<Query> qs;
                size_t qmax = 0;
                for (size_t j = 0; j < ws.size(); ++j) {
                    Query q;
                    q.toks = tokenize(M, "\n\nQuestion: What is the code for " + ws[j] + "?\nAnswer: The code for " + ws[j] + " is", false);
                    q.answer = codes[j];
                    q.key = ws[j];
                    q.depth = (int) std::lround(100.0 * (j + 0.5) / ws.size());
                    qmax = std::max(qmax, q.toks.size());
                    qs.push_back(q);
                }
                const int n_fill = o.qa_W - (int) th.size() - n_lines - (int) qmax;
                auto filler = hay_of(src, (size_t) (k * 4099 + 17) % src.size(), n_fill);
                std::vector<llama_token> hay = th;
                int prev = 0;
                for (size_t j = 0; j < ws.size(); ++j) {
                    const int at = (int) std::lround(n_fill * (j + 0.5) / ws.size());
                    hay.insert(hay.end(), filler.begin() + prev, filler.begin() + at);
                    hay.insert(hay.end(), lines[j].begin(), lines[j].end());
                    prev = at;
                }
                hay.insert(hay.end(), filler.begin() + prev, filler.end());
                std::map<std::string, std::pair<int, int>> acc; // method@budget -> (ok, n)
                std::vector<std::string> order;
                run_trials(hay, n_keep, qs, o.qa_budgets, o.qa_gen,
                    [&](const Method & m, double b, int C, const Query & qq, bool ok, const std::string & ans, const Stats & st) {
                        std::string a1 = ans;
                        std::replace(a1.begin(), a1.end(), '\n', ' ');
                        R.kvqa.add(Row().s("text", tname).i("haystack", (int) hay.size()).i("trial", k).f("budget", b, 3)
                            .i("capacity", C).s("method", m.name).s("group", m.group).s("word", qq.key).i("depth", qq.depth)
                            .i("correct", ok).s("code", qq.answer).s("answer", a1).i("events", st.events));
                        const std::string key = fmt("%s@%.3f", m.name.c_str(), b);
                        if (!acc.count(key)) order.push_back(key);
                        acc[key].first += ok;
                        acc[key].second += 1;
                        if (acc[key].second == (int) qs.size()) {
                            printf("%-8s %5d %6.3f %-22s %4d/%d\n", tname.c_str(), k, b, m.name.c_str(), acc[key].first, acc[key].second);
                            fflush(stdout);
                        }
                    });
            }
        }
    }

    printf("# kvqa section: %.1f s\n", (now_ms() - t_qa) / 1000.0);
    const double wall_s = (now_ms() - t_start) / 1000.0;
    write_json(o, R, methods, wall_s);

    // -----------------------------------------------------------------------------------------
    // summary tables
    auto avg = [](const std::vector<double> & v) { double s = 0; for (double x : v) s += x; return v.empty() ? NAN : s / v.size(); };
    if (!R.ppl.rows.empty()) {
        printf("\n== summary: streaming PPL (mean over windows) [gap closed]\n");
        std::vector<std::string> texts, ms;
        std::vector<double> bs;
        std::map<std::string, std::vector<double>> P, G;
        for (const auto & r : R.ppl.rows) {
            std::map<std::string, std::string> k(r.kv.begin(), r.kv.end());
            if (std::find(texts.begin(), texts.end(), k["text"]) == texts.end()) texts.push_back(k["text"]);
            if (std::find(ms.begin(), ms.end(), k["method"]) == ms.end()) ms.push_back(k["method"]);
            const double b = atof(k["budget"].c_str());
            if (std::find(bs.begin(), bs.end(), b) == bs.end()) bs.push_back(b);
            const std::string key = k["text"] + "|" + k["method"] + "|" + fmt("%.3f", b);
            P[key].push_back(k["ppl"].empty() ? NAN : atof(k["ppl"].c_str())); // empty: NaN logits
            if (!k["gap_closed"].empty()) G[key].push_back(atof(k["gap_closed"].c_str()));
        }
        std::sort(bs.begin(), bs.end());
        for (const auto & t : texts) {
            printf("%-22s", t.c_str());
            for (double b : bs) printf(" %18s", fmt("b=%.3f", b).c_str());
            printf("\n");
            for (const auto & m : ms) {
                printf("%-22s", m.c_str());
                for (double b : bs) {
                    const std::string key = t + "|" + m + "|" + fmt("%.3f", b);
                    if (!P.count(key)) { printf(" %18s", "-"); continue; }
                    const double g = avg(G[key]);
                    printf(" %18s", (fmt("%.3f", avg(P[key])) + (std::isfinite(g) ? fmt(" [%+.2f]", g) : std::string(" [  - ]"))).c_str());
                }
                printf("\n");
            }
        }
    }
    auto acc_table = [&](const Table & tab, const char * title) {
        if (tab.rows.empty()) return;
        printf("\n== summary: %s accuracy (correct/total)\n", title);
        std::vector<std::string> ms;
        std::vector<double> bs;
        std::map<std::string, std::pair<int, int>> A;
        for (const auto & r : tab.rows) {
            std::map<std::string, std::string> k(r.kv.begin(), r.kv.end());
            if (std::find(ms.begin(), ms.end(), k["method"]) == ms.end()) ms.push_back(k["method"]);
            const double b = atof(k["budget"].c_str());
            if (std::find(bs.begin(), bs.end(), b) == bs.end()) bs.push_back(b);
            auto & a = A[k["method"] + "|" + fmt("%.3f", b)];
            a.first += atoi(k["correct"].c_str());
            a.second += 1;
        }
        std::sort(bs.begin(), bs.end());
        printf("%-22s", "method");
        for (double b : bs) printf(" %9s", fmt("b=%.2f", b).c_str());
        printf("\n");
        for (const auto & m : ms) {
            printf("%-22s", m.c_str());
            for (double b : bs) {
                auto it = A.find(m + "|" + fmt("%.3f", b));
                printf(" %9s", it == A.end() ? "-" : fmt("%d/%d", it->second.first, it->second.second).c_str());
            }
            printf("\n");
        }
    };
    acc_table(R.passkey, "passkey");
    acc_table(R.kvqa, "kv retrieval");
    printf("\n# wall %.1f s; results in %s/\n", wall_s, o.out.c_str());

    llama_model_free(M.model);
    llama_backend_free();
    return 0;
}
