// Integration test of the patched llama.cpp (kvmerger) on a real model, run by scripts/test-llama.sh.
//
//   state_roundtrip MODEL [fa]      fa: 0 = flash attention off (V transposed), 1 = on (default)
//   env KVM_RT_RPC=HOST:PORT        the model and its KV cache on an rpc-server (ggml-rpc, every layer): merges,
//                                   calibration and states then go through the patch's host copy of device buffers
//
// 1. decodes a long prompt into a small context, merges seq 0 a few times (each merge after a decode, logbias
//    value mode so that the per-cell merge counts enter the KQ mask), then
//    llama_state_seq_get_data -> a fresh context, llama_state_seq_set_data, and checks that
//    - get_data of the restored context is byte-identical to the original,
//    - the state carries the merge counts (the blob is larger than a stock one by 8 + 4 * n_cells bytes),
//    - decoding the same next token in both contexts gives identical logits (memcmp),
//    - a restore of the same state without the merge extension (stock format) gives different logits:
//      the counts do matter;
// 2. llama_kv_merge_params.kvm_params (a whole struct kvm_params) is honoured: a bad kvm_params (sigma_mode
//    fixed, sigma = -1) is refused with -2; a valid one merges;
// 3. refusals: merging cells shared by two sequences (after llama_memory_seq_cp) returns -3, merging while a
//    K-shift is pending returns -3, bad arguments return -2, and the cache is unchanged after each refusal;
// 4. calibration: llama_memory_seq_merge_calibrate writes a profile of every layer without touching the cache,
//    llama_kv_merge_params.calib_path changes which cells a merge frees, and a missing or ill-fitting profile
//    is refused (-2) with the cache unchanged.
// 5. K/V read back after a merge (from llama_state_seq_get_data, parsed): a cell the merge left alone has
//    the K and V bytes it had, every layer; a merged cell (count > 1) holds, element by element, a value
//    between the smallest and largest of its possible members (itself and the freed cells beside it), and
//    differs from what it had; the counts add up to the tokens the window held.
// 0. llama_kv_merge_default_params() and kvm_params_default() agree (the patch writes its defaults out
//    rather than reading ours, so a change of the library default must be made in both).
// Prints PASS/FAIL lines; exit code 0 only if all passed.

#include "llama.h"
#include "kvmerger.h"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <unistd.h>

static int n_pass = 0;
static int n_fail = 0;

static void check(bool ok, const char * name, const std::string & why) {
    printf("%s: %s%s%s\n", ok ? "PASS" : "FAIL", name, why.empty() ? "" : " - ", why.c_str());
    fflush(stdout);
    (ok ? n_pass : n_fail)++;
}

static std::string fmt(const char * f, ...) __attribute__((format(printf, 1, 2)));
static std::string fmt(const char * f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof(buf), f, ap);
    va_end(ap);
    return buf;
}

static void quiet_log(ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN || getenv("KVM_TEST_VERBOSE")) {
        fputs(text, stderr);
    }
}

static llama_context * make_ctx(llama_model * model, int fa, uint32_t n_seq = 1) {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx           = 256;
    cp.n_batch         = 256;
    cp.n_ubatch        = 256;
    cp.n_seq_max       = n_seq;
    cp.n_threads       = 1;
    cp.n_threads_batch = 1;
    cp.kv_unified      = true;
    cp.flash_attn_type = fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    return llama_init_from_model(model, cp);
}

// decodes tokens at positions pos.. for seq, logits for the last one
static bool decode(llama_context * ctx, const std::vector<llama_token> & toks, llama_pos pos, llama_seq_id seq = 0) {
    llama_batch b = llama_batch_init((int32_t) toks.size(), 0, 1);
    for (size_t i = 0; i < toks.size(); ++i) {
        b.token[i]     = toks[i];
        b.pos[i]       = pos + (llama_pos) i;
        b.n_seq_id[i]  = 1;
        b.seq_id[i][0] = seq;
        b.logits[i]    = i + 1 == toks.size();
    }
    b.n_tokens = (int32_t) toks.size();
    const int rc = llama_decode(ctx, b);
    llama_batch_free(b);
    return rc == 0;
}

// a fresh context holding `toks` at positions 0..: merges [4, toks.size()) with `mp` so that n_free cells go;
// returns the positions freed (-1 where none) and the return code in `ret`
static std::vector<llama_pos> freed_by_merge(llama_model * model, int fa, const std::vector<llama_token> & toks,
                                             const llama_kv_merge_params & mp, int32_t n_free, int32_t & ret) {
    llama_context * c = make_ctx(model, fa);
    decode(c, toks, 0);
    std::vector<llama_pos> freed(n_free, -1);
    ret = llama_memory_seq_merge(c, 0, 4, (llama_pos) toks.size(), n_free, &mp, freed.data());
    llama_free(c);
    return freed;
}

static llama_token argmax(const float * logits, int n_vocab) {
    int best = 0;
    for (int i = 1; i < n_vocab; ++i) {
        if (logits[i] > logits[best]) {
            best = i;
        }
    }
    return best;
}

static std::vector<uint8_t> get_state(llama_context * ctx, llama_seq_id seq) {
    std::vector<uint8_t> st(llama_state_seq_get_size(ctx, seq));
    const size_t n = llama_state_seq_get_data(ctx, st.data(), st.size(), seq);
    st.resize(n);
    return st;
}

// one stream of a llama_state_seq_get_data blob, as llama_context and llama_kv_cache::state_write lay it out: the cells in buffer
// order, then per layer every cell's K row, then V (rows, or with v_trans element-major), then the merge counts
struct kv_state {
    std::vector<llama_pos>                          pos;    // per cell
    std::vector<std::vector<std::vector<uint8_t>>> k, v;    // [layer][cell] row bytes (V gathered when transposed)
    std::vector<int32_t>                            k_type, v_type;
    std::vector<uint32_t>                           count;  // per cell; all 1 without the kvmerger extension
};

static bool parse_state(const std::vector<uint8_t> & st, kv_state & out) {
    size_t off = 0;
    auto rd = [&](void * dst, size_t n) {
        if (off + n > st.size()) {
            return false;
        }
        memcpy(dst, st.data() + off, n);
        off += n;
        return true;
    };
    uint32_t magic = 0, n_stream = 0, n_cell = 0, v_trans = 0, n_layer = 0;
    llama_seq_id seq = 0;
    // llama_context::state_seq_get_data puts its io magic and the sequence id first
    if (!rd(&magic, 4) || magic != 0xaf143cd8u || !rd(&seq, 4) || !rd(&n_stream, 4) || n_stream != 1 || !rd(&n_cell, 4)) {
        return false;
    }
    out = kv_state{};
    for (uint32_t i = 0; i < n_cell; ++i) {
        llama_pos p;
        uint32_t  n_seq;
        if (!rd(&p, 4) || !rd(&n_seq, 4)) {
            return false;
        }
        off += 4 * (size_t) n_seq;
        out.pos.push_back(p);
    }
    if (!rd(&v_trans, 4) || !rd(&n_layer, 4)) {
        return false;
    }
    const bool ext = (v_trans & 0xffff0000u) == 0x4b4d0000u;
    v_trans &= 1;
    out.k.resize(n_layer);
    out.v.resize(n_layer);
    for (uint32_t il = 0; il < n_layer; ++il) {
        int32_t type;
        uint64_t row;
        if (!rd(&type, 4) || !rd(&row, 8)) {
            return false;
        }
        out.k_type.push_back(type);
        for (uint32_t i = 0; i < n_cell; ++i) {
            out.k[il].emplace_back(row);
            if (!rd(out.k[il].back().data(), row)) {
                return false;
            }
        }
    }
    for (uint32_t il = 0; il < n_layer; ++il) {
        int32_t type;
        if (!rd(&type, 4)) {
            return false;
        }
        out.v_type.push_back(type);
        if (!v_trans) {
            uint64_t row;
            if (!rd(&row, 8)) {
                return false;
            }
            for (uint32_t i = 0; i < n_cell; ++i) {
                out.v[il].emplace_back(row);
                if (!rd(out.v[il].back().data(), row)) {
                    return false;
                }
            }
        } else {
            uint32_t el, n_embd;
            if (!rd(&el, 4) || !rd(&n_embd, 4)) {
                return false;
            }
            out.v[il].assign(n_cell, std::vector<uint8_t>((size_t) el * n_embd));
            for (uint32_t j = 0; j < n_embd; ++j) {
                for (uint32_t i = 0; i < n_cell; ++i) {
                    if (!rd(out.v[il][i].data() + (size_t) j * el, el)) {
                        return false;
                    }
                }
            }
        }
    }
    out.count.assign(n_cell, 1);
    if (ext) {
        uint32_t flags;
        if (!rd(&flags, 4) || !rd(out.count.data(), 4 * (size_t) n_cell)) {
            return false;
        }
    }
    return off == st.size();
}

// element j of an f16 or f32 row
static float row_el(const std::vector<uint8_t> & row, int32_t type, size_t j) {
    if (type == GGML_TYPE_F16) {
        ggml_fp16_t h;
        memcpy(&h, row.data() + 2 * j, 2);
        return ggml_fp16_to_fp32(h);
    }
    float f;
    memcpy(&f, row.data() + 4 * j, 4);
    return f;
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL [fa 0|1]\n", argv[0]);
        return 2;
    }
    const int fa = argc > 2 ? atoi(argv[2]) : 1;
    const char * rpc = getenv("KVM_RT_RPC");
    if (rpc && !*rpc) {
        rpc = nullptr;
    }
    const char * tag = fa ? (rpc ? "fa=on rpc" : "fa=on") : (rpc ? "fa=off rpc" : "fa=off");

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();

    // the RPC device through the backend registry, as common's --rpc (no ggml-rpc.h needed)
    std::vector<ggml_backend_dev_t> devices;
    if (rpc) {
        ggml_backend_reg_t rpc_reg = ggml_backend_reg_by_name("RPC");
        using add_server_t = ggml_backend_reg_t (*)(const char * endpoint);
        auto add_server = rpc_reg ? (add_server_t) ggml_backend_reg_get_proc_address(rpc_reg, "ggml_backend_rpc_add_server") : nullptr;
        ggml_backend_reg_t reg = add_server ? add_server(rpc) : nullptr;
        if (!reg || ggml_backend_reg_dev_count(reg) == 0) {
            fprintf(stderr, "no RPC device at %s (built without GGML_RPC, or no rpc-server there)\n", rpc);
            return 2;
        }
        for (size_t i = 0; i < ggml_backend_reg_dev_count(reg); ++i) {
            devices.push_back(ggml_backend_reg_dev_get(reg, i));
        }
        devices.push_back(nullptr);
    }

    // ---------------------------------------------------------------- 0. the two defaults agree
    {
        const llama_kv_merge_params l = llama_kv_merge_default_params();
        const kvm_params k = kvm_params_default();
        const bool same = l.method == (int32_t) k.method && l.n_sink == (int32_t) k.n_sink &&
                l.n_recent == (int32_t) k.n_recent && l.heavy_frac == k.heavy_frac && l.sim_floor == k.sim_floor &&
                l.value_mode == (int32_t) k.value_mode && l.merge_keys == k.merge_keys &&
                l.merge_values == k.merge_values && l.use_attn == (k.pivot == KVM_PIVOT_ATTENTION) &&
                l.age_bias == k.age_bias && l.max_set == (int32_t) k.max_set;
        check(same && l.method == LLAMA_KV_MERGE_METHOD_EVICT_FOLD,
                fmt("[%s] llama_kv_merge_default_params() = kvm_params_default(), method EVICT_FOLD", tag).c_str(),
                fmt("method %d/%d, sinks %d/%u, recent %d/%u, heavy %g/%g, floor %g/%g, value %d/%d, age %g/%g, max_set %d/%u",
                    l.method, (int) k.method, l.n_sink, k.n_sink, l.n_recent, k.n_recent, l.heavy_frac, k.heavy_frac,
                    l.sim_floor, k.sim_floor, l.value_mode, (int) k.value_mode, l.age_bias, k.age_bias, l.max_set,
                    k.max_set));
    }

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    if (rpc) {
        mp.devices      = devices.data();
        mp.n_gpu_layers = 999;
    }
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 2;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    std::string text;
    for (int i = 0; i < 12; ++i) {
        text += "The river flows past the old mill, where the miller counts his sacks of grain and tells stories "
                "about the winter the water froze. ";
    }
    std::vector<llama_token> prompt(1024);
    const int n_prompt = llama_tokenize(vocab, text.c_str(), (int32_t) text.size(), prompt.data(), (int32_t) prompt.size(), true, false);
    prompt.resize(std::max(0, n_prompt));

    // ---------------------------------------------------------------- 1. merge, save, restore
    {
        llama_context * ctx = make_ctx(model, fa);
        const int n_ctx = (int) llama_n_ctx(ctx);
        const int n_first = std::min((int) prompt.size(), n_ctx - 16);

        llama_kv_merge_params mpar = llama_kv_merge_default_params();
        mpar.n_threads  = 1;
        mpar.value_mode = LLAMA_KV_MERGE_VALUE_LOGBIAS;
        mpar.n_recent   = 8;

        std::vector<llama_token> first(prompt.begin(), prompt.begin() + n_first);
        bool ok = decode(ctx, first, 0);
        llama_pos n_past = n_first;
        int n_merges = 0;
        int n_freed_total = 0;
        size_t next = n_first;
        std::string why;
        for (int m = 0; m < 4 && ok; ++m) {
            // merge after a decode (the K-shift of the previous merge has run)
            const int n_free = 24;
            const int32_t r = llama_memory_seq_merge(ctx, 0, 4, n_past, n_free, &mpar, nullptr);
            if (r != n_free) {
                ok = false;
                why = fmt("merge %d returned %d", m, r);
                break;
            }
            n_merges++;
            n_freed_total += r;
            n_past -= r;
            const llama_pos pmax = llama_memory_seq_pos_max(llama_get_memory(ctx), 0);
            if (pmax != n_past - 1) {
                ok = false;
                why = fmt("pos_max %d after merge, want %d", pmax, n_past - 1);
                break;
            }
            // feed 8 more tokens of the prompt (or the greedy continuation)
            std::vector<llama_token> more;
            for (int j = 0; j < 8; ++j) {
                more.push_back(next < prompt.size() ? prompt[next++] : argmax(llama_get_logits_ith(ctx, -1), n_vocab));
            }
            if (!decode(ctx, more, n_past)) {
                ok = false;
                why = fmt("decode after merge %d failed", m);
                break;
            }
            n_past += (llama_pos) more.size();
        }
        check(ok && n_merges == 4, fmt("[%s] 4 merges of a %d-token prompt in a %d-cell context", tag, n_first, n_ctx).c_str(),
                ok ? fmt("freed %d cells, n_past %d", n_freed_total, n_past) : why);

        // save
        const std::vector<uint8_t> st = get_state(ctx, 0);

        // restore into a fresh context
        llama_context * ctx2 = make_ctx(model, fa);
        const size_t n_read = llama_state_seq_set_data(ctx2, st.data(), st.size(), 0);
        check(n_read == st.size(), fmt("[%s] llama_state_seq_set_data reads the whole state", tag).c_str(),
                fmt("%zu of %zu bytes", n_read, st.size()));

        const std::vector<uint8_t> st2 = get_state(ctx2, 0);
        size_t first_diff = 0;
        while (first_diff < std::min(st.size(), st2.size()) && st[first_diff] == st2[first_diff]) {
            first_diff++;
        }
        check(st == st2, fmt("[%s] get_data of the restored context is byte-identical", tag).c_str(),
                st == st2 ? fmt("%zu bytes", st.size()) : fmt("sizes %zu/%zu, first difference at byte %zu", st.size(), st2.size(), first_diff));

        // the counts went along: the state of a context where nothing was merged has the same cell count but no extension
        {
            const int n_cells = (int) n_past;
            llama_context * ctx3 = make_ctx(model, fa);
            std::vector<llama_token> plain(prompt.begin(), prompt.begin() + n_cells);
            decode(ctx3, plain, 0);
            const std::vector<uint8_t> st3 = get_state(ctx3, 0);
            // the extension: one u32 of flags + one u32 per cell
            const size_t want1 = st3.size() + 4 + 4*(size_t) n_cells;
            check(st.size() == want1, fmt("[%s] the state carries the per-cell merge counts", tag).c_str(),
                    fmt("merged state %zu bytes, unmerged %zu bytes, %d cells (+4+4*n = %zu)", st.size(), st3.size(), n_cells, want1));
            llama_free(ctx3);
        }

        // same next token in both contexts -> identical logits
        const llama_token tok = argmax(llama_get_logits_ith(ctx, -1), n_vocab);

        // with flash attention the CPU kernel's reduction depends on where the cells lie (merges leave holes, a
        // restore packs the cells), so there the original context first restores its own state as well: then both
        // hold the same cells in the same places (the byte-identical state above already covers the contents)
        if (fa) {
            llama_memory_seq_rm(llama_get_memory(ctx), 0, -1, -1);
            const size_t n_self = llama_state_seq_set_data(ctx, st.data(), st.size(), 0);
            check(n_self == st.size(), fmt("[%s] the original context restores its own state (same cell layout)", tag).c_str(), "");
        }
        const bool d1 = decode(ctx, {tok}, n_past);
        const bool d2 = decode(ctx2, {tok}, n_past);
        const float * l1 = llama_get_logits_ith(ctx, -1);
        const float * l2 = llama_get_logits_ith(ctx2, -1);
        const bool same = d1 && d2 && l1 && l2 && memcmp(l1, l2, sizeof(float)*n_vocab) == 0;
        float maxd = 0.0f;
        if (d1 && d2 && l1 && l2) {
            for (int i = 0; i < n_vocab; ++i) {
                maxd = std::max(maxd, fabsf(l1[i] - l2[i]));
            }
        }
        check(same, fmt("[%s] logits of the next token are identical after the round-trip", tag).c_str(),
                fmt("max |diff| %g", maxd));

        // negative control: the same state with the counts stripped (stock format) gives other logits,
        // so the restored counts are what makes them equal
        {
            // find the extension: v_trans word with the 'KM' flag; strip flags+counts at the end of the data
            std::vector<uint8_t> stock = st;
            const size_t n_cells = (size_t) (n_past);
            const size_t ext = 4 + 4*n_cells;
            bool found = false;
            // layout: n_stream u32, cell_count u32, meta (pos i32, n_seq u32, seq i32 [+ext]) per cell, v_trans u32
            const size_t meta = 8 + n_cells*12;
            // (the memory module may write a few header words of its own first: look a little further)
            for (size_t off = meta; off + 4 + ext < stock.size() && off <= meta + 64 && !found; off += 4) {
                uint32_t vt;
                memcpy(&vt, stock.data() + off, 4);
                if ((vt & 0xffff0000u) == 0x4b4d0000u) {
                    vt &= 0xffffu;
                    memcpy(stock.data() + off, &vt, 4);
                    stock.resize(stock.size() - ext);
                    found = true;
                }
            }
            if (!found) {
                check(false, fmt("[%s] counts matter (restore without them differs)", tag).c_str(), "extension not found where expected (has_cell_ext?)");
            } else {
                llama_context * ctx4 = make_ctx(model, fa);
                const size_t n4 = llama_state_seq_set_data(ctx4, stock.data(), stock.size(), 0);
                const bool d4 = n4 == stock.size() && decode(ctx4, {tok}, n_past);
                const float * l4 = d4 ? llama_get_logits_ith(ctx4, -1) : nullptr;
                const bool differ = l4 && memcmp(l1, l4, sizeof(float)*n_vocab) != 0;
                check(differ, fmt("[%s] counts matter: the same state restored without them gives other logits", tag).c_str(),
                        d4 ? "" : "stock-format restore failed");
                llama_free(ctx4);
            }
        }

        llama_free(ctx2);
        llama_free(ctx);
    }

    // ---------------------------------------------------------------- 2. kvm_params override
    {
        llama_context * ctx = make_ctx(model, fa);
        std::vector<llama_token> first(prompt.begin(), prompt.begin() + 200);
        decode(ctx, first, 0);

        kvm_params kp = kvm_params_default();
        kp.n_threads  = 0; // taken from llama_kv_merge_params.n_threads
        kp.sigma_mode = KVM_SIGMA_FIXED;
        kp.sigma      = -1.0f; // invalid
        llama_kv_merge_params mpar = llama_kv_merge_default_params();
        mpar.n_threads  = 1;
        mpar.kvm_params = &kp;
        const int32_t r_bad = llama_memory_seq_merge(ctx, 0, 4, 200, 20, &mpar, nullptr);
        const llama_pos pmax_bad = llama_memory_seq_pos_max(llama_get_memory(ctx), 0);

        kp.sigma    = 3.0f;
        kp.max_set  = 2;
        kp.age_bias = 0.5f;
        kp.pivot    = KVM_PIVOT_QUERY_FREE;
        const int32_t r_ok = llama_memory_seq_merge(ctx, 0, 4, 200, 20, &mpar, nullptr);
        const llama_pos pmax_ok = llama_memory_seq_pos_max(llama_get_memory(ctx), 0);
        check(r_bad == -2 && pmax_bad == 199 && r_ok == 20 && pmax_ok == 179,
                fmt("[%s] kvm_params override: invalid sigma refused (-2), a valid one merges", tag).c_str(),
                fmt("bad -> %d (pos_max %d), ok -> %d (pos_max %d)", r_bad, pmax_bad, r_ok, pmax_ok));
        llama_free(ctx);

        // the llama fields age_bias, max_set and use_attn (what --kv-merge-age-bias, --kv-merge-max-set and
        // --kv-merge-pivot set) free the same cells as the same values through kvm_params, and other cells
        // than KVMerger's defaults (the method whose link scores read age_bias and max_set)
        auto freed_by = [&](const llama_kv_merge_params & mp, int32_t & ret) {
            return freed_by_merge(model, fa, first, mp, 40, ret);
        };
        llama_kv_merge_params lf = llama_kv_merge_default_params();
        lf.method   = LLAMA_KV_MERGE_METHOD_KVMERGER;
        lf.use_attn = false;
        lf.age_bias = 100.0f;
        lf.max_set  = 2;
        kvm_params kf = kvm_params_default();
        kf.method   = KVM_METHOD_KVMERGER;
        kf.pivot    = KVM_PIVOT_QUERY_FREE;
        kf.age_bias = 100.0f;
        kf.max_set  = 2;
        llama_kv_merge_params lk = llama_kv_merge_default_params();
        lk.kvm_params = &kf;
        llama_kv_merge_params ld = llama_kv_merge_default_params();
        ld.method   = LLAMA_KV_MERGE_METHOD_KVMERGER;
        ld.use_attn = false;
        llama_kv_merge_params l1 = lf;
        l1.max_set = 1; // no merge is possible: refused
        int32_t rf = 0, rk = 0, rd = 0, r1 = 0;
        const auto ff = freed_by(lf, rf);
        const auto fk = freed_by(lk, rk);
        const auto fd = freed_by(ld, rd);
        freed_by(l1, r1);
        // the default method reads the attention of the queries the ring kept while `first` was decoded: it
        // frees other cells than the same method without them (query-free), and not simply the oldest ones
        // (which is what it falls back to when the ring is empty, e.g. broken)
        {
            llama_kv_merge_params da = llama_kv_merge_default_params();
            llama_kv_merge_params dq = llama_kv_merge_default_params();
            dq.use_attn = false;
            int32_t ra = 0, rq = 0;
            const auto fa_ = freed_by(da, ra);
            const auto fq_ = freed_by(dq, rq);
            std::vector<llama_pos> oldest;
            for (llama_pos p = 8; p < 48; ++p) {
                oldest.push_back(p); // after the window's 4 sinks (the window starts at 4)
            }
            check(ra == 40 && rq == 40 && fa_ != fq_ && fa_ != oldest,
                    fmt("[%s] the default method frees by the attention of the kept queries", tag).c_str(),
                    fmt("returned %d/%d; with attention vs query-free %s, vs the oldest cells %s", ra, rq,
                        fa_ != fq_ ? "differ" : "SAME", fa_ != oldest ? "differ" : "SAME"));
        }

        check(rf == 40 && rk == 40 && rd == 40 && ff == fk && ff != fd && r1 == -2,
                fmt("[%s] llama fields age_bias/max_set/use_attn = the same kvm_params; max_set 1 refused (-2)", tag).c_str(),
                fmt("returned %d/%d/%d/%d, fields vs kvm_params %s, vs defaults %s", rf, rk, rd, r1,
                    ff == fk ? "same" : "differ", ff == fd ? "same" : "differ"));
    }

    // ---------------------------------------------------------------- 3. refusals
    {
        llama_context * ctx = make_ctx(model, fa, 2);
        llama_memory_t mem = llama_get_memory(ctx);
        std::vector<llama_token> first(prompt.begin(), prompt.begin() + 120);
        decode(ctx, first, 0);
        llama_memory_seq_cp(mem, 0, 1, -1, -1); // cells now shared by seq 0 and seq 1

        const std::vector<uint8_t> before = get_state(ctx, 0);
        const int32_t r_shared = llama_memory_seq_merge(ctx, 0, 4, 120, 20, nullptr, nullptr);
        const std::vector<uint8_t> after = get_state(ctx, 0);
        check(r_shared == -3 && before == after && llama_memory_seq_pos_max(mem, 1) == 119,
                fmt("[%s] merging cells shared by two sequences (seq_cp) is refused with -3, cache unchanged", tag).c_str(),
                fmt("returned %d", r_shared));

        // after the copy is dropped, the merge goes through; a second one before a decode (K-shift pending) is refused
        llama_memory_seq_rm(mem, 1, -1, -1);
        const int32_t r1 = llama_memory_seq_merge(ctx, 0, 4, 120, 20, nullptr, nullptr);
        const int32_t r2 = llama_memory_seq_merge(ctx, 0, 4, 100, 20, nullptr, nullptr);
        check(r1 == 20 && r2 == -3 && llama_memory_seq_pos_max(mem, 0) == 99,
                fmt("[%s] a merge while the K-shift of the last one is pending is refused with -3", tag).c_str(),
                fmt("first %d, second %d", r1, r2));

        // positions close up in one ordered pass, or cell by cell where a cell past the window also
        // carries another sequence: both leave seq 0 with the same bytes after the next decode (K-shift
        // included), and the shared cells move for both sequences, as seq_add moves them
        std::vector<uint8_t> by_pass, by_cell;
        int32_t rp = 0, rc = 0;
        llama_pos pmax1 = -1;
        for (const bool share : { false, true }) {
            llama_context * c = make_ctx(model, fa, 2);
            llama_memory_t  m = llama_get_memory(c);
            decode(c, first, 0);
            if (share) {
                llama_memory_seq_cp(m, 0, 1, 110, 120);
            }
            (share ? rc : rp) = llama_memory_seq_merge(c, 0, 4, 100, 20, nullptr, nullptr);
            if (share) {
                pmax1 = llama_memory_seq_pos_max(m, 1);
                llama_memory_seq_rm(m, 1, -1, -1);
            }
            decode(c, {prompt[120]}, 100); // applies the K-shift, so the shifts are compared too
            (share ? by_cell : by_pass) = get_state(c, 0);
            llama_free(c);
        }
        check(rp == 20 && rc == 20 && !by_pass.empty() && by_pass == by_cell && pmax1 == 99,
                fmt("[%s] closing up positions in one pass = cell by cell (cells past the window shared)", tag).c_str(),
                fmt("returned %d/%d, states %s, seq 1 pos_max %d", rp, rc, by_pass == by_cell ? "same" : "differ", pmax1));

        // one unified cache, two sequences: a K-shift pending on seq 0's cells does not stop a merge of
        // seq 1 (llama-server --kv-unified: two slots compressing in the same iteration), and seq 1 ends
        // up as it would alone
        {
            std::vector<uint8_t> together, alone;
            int32_t r0 = 0, r1b = 0, r1a = 0;
            for (const bool both : { true, false }) {
                llama_context * c = make_ctx(model, fa, 2);
                std::vector<llama_token> half(prompt.begin(), prompt.begin() + 100);
                decode(c, half, 0, 1);
                if (both) {
                    std::vector<llama_token> other(prompt.begin() + 100, prompt.begin() + 200);
                    decode(c, other, 0, 0);
                    r0 = llama_memory_seq_merge(c, 0, 4, 100, 20, nullptr, nullptr);
                }
                (both ? r1b : r1a) = llama_memory_seq_merge(c, 1, 4, 100, 20, nullptr, nullptr);
                decode(c, {prompt[150]}, 80, 1); // applies the K-shifts
                (both ? together : alone) = get_state(c, 1);
                llama_free(c);
            }
            check(r0 == 20 && r1b == 20 && r1a == 20 && !alone.empty() && together == alone,
                    fmt("[%s] unified cache: seq 1 merges while seq 0's K-shift is pending, as it would alone", tag).c_str(),
                    fmt("seq 0 %d, seq 1 %d (alone %d), states %s", r0, r1b, r1a, together == alone ? "same" : "differ"));
        }

        // pinned positions: never freed, the rest of the window frees n_free; unsorted pins are refused
        {
            llama_context * c = make_ctx(model, fa);
            decode(c, first, 0);
            std::vector<llama_pos> pins;
            for (llama_pos p = 10; p < 120; p += 9) {
                pins.push_back(p);
            }
            llama_kv_merge_params mp = llama_kv_merge_default_params();
            mp.pinned   = pins.data();
            mp.n_pinned = (int32_t) pins.size();
            std::vector<llama_pos> freed(60, -1);
            const int32_t rpin = llama_memory_seq_merge(c, 0, 4, 120, 60, &mp, freed.data());
            bool none_pinned = true;
            for (llama_pos p : freed) {
                none_pinned = none_pinned && !std::binary_search(pins.begin(), pins.end(), p);
            }
            std::vector<llama_pos> unsorted = { 30, 20 };
            mp.pinned   = unsorted.data();
            mp.n_pinned = 2;
            decode(c, {prompt[120]}, 60);
            const int32_t rbad = llama_memory_seq_merge(c, 0, 4, 60, 5, &mp, nullptr);
            check(rpin == 60 && none_pinned && rbad == -2,
                    fmt("[%s] pinned positions are never freed; unsorted pins are refused", tag).c_str(),
                    fmt("returned %d (%s), unsorted %d", rpin, none_pinned ? "no pinned position freed" : "a pinned position freed", rbad));
            llama_free(c);
        }

        // bad arguments (after a decode, so that no K-shift is pending)
        decode(ctx, {prompt[120]}, 100);
        const int32_t a1 = llama_memory_seq_merge(ctx, 0, 4, 100, 500, nullptr, nullptr); // more than the window
        const int32_t a2 = llama_memory_seq_merge(ctx, 7, 4, 100, 5, nullptr, nullptr);   // no such sequence
        const int32_t a3 = llama_memory_seq_merge(ctx, 0, 4, 100, -1, nullptr, nullptr);
        const int32_t a4 = llama_memory_seq_merge(nullptr, 0, 4, 100, 5, nullptr, nullptr);
        check(a1 < 0 && a2 == -2 && a3 == -2 && a4 == -2 && llama_memory_seq_pos_max(mem, 0) == 100,
                fmt("[%s] bad arguments are refused", tag).c_str(),
                fmt("n_free too large %d, bad seq %d, n_free<0 %d, ctx NULL %d", a1, a2, a3, a4));
        llama_free(ctx);
    }

    // ---------------------------------------------------------------- 4. calibration profile
    {
        const char * tmp = getenv("TMPDIR");
        // KVM_RT_PROFILE: where to leave the profile (scripts/test-llama.sh hands it to llama-completion)
        const char * keep = getenv("KVM_RT_PROFILE");
        const std::string path = keep && *keep ? std::string(keep)
            : std::string(tmp && *tmp ? tmp : "/tmp") + fmt("/kvm_rt_%d_%s.profile", (int) getpid(), tag);
        const std::string bad_path = path + ".bad";

        llama_context * ctx = make_ctx(model, fa);
        llama_memory_t mem = llama_get_memory(ctx);
        std::vector<llama_token> first(prompt.begin(), prompt.begin() + 200);
        decode(ctx, first, 0);

        const std::vector<uint8_t> before = get_state(ctx, 0);
        const int32_t n_obs = llama_memory_seq_merge_calibrate(ctx, 0, path.c_str());
        const std::vector<uint8_t> after = get_state(ctx, 0);
        std::string text;
        if (FILE * f = fopen(path.c_str(), "rb")) {
            char buf[4096];
            size_t n;
            while ((n = fread(buf, 1, sizeof(buf), f)) > 0) text.append(buf, n);
            fclose(f);
        }
        const int n_layer = llama_model_n_layer(model);
        int n_layer_lines = 0;
        for (size_t at = 0; (at = text.find("\nlayer ", at)) != std::string::npos; ++at) n_layer_lines++;
        check(n_obs == 199 && before == after && text.rfind("kvmerger-profile 1", 0) == 0 &&
                text.find(fmt("layers %d\n", n_layer)) != std::string::npos && n_layer_lines == n_layer,
                fmt("[%s] llama_memory_seq_merge_calibrate writes a profile of every layer, cache unchanged", tag).c_str(),
                fmt("returned %d, %d layer lines of %d, state %s", n_obs, n_layer_lines, n_layer, before == after ? "same" : "changed"));

        // the same KVMerger merge with and without the profile (only its link scores read one): both free 20
        // cells, the profile changes which
        llama_kv_merge_params mpar = llama_kv_merge_default_params();
        mpar.method    = LLAMA_KV_MERGE_METHOD_KVMERGER;
        mpar.n_threads = 1;
        int32_t r_plain = 0;
        const std::vector<llama_pos> freed_plain = freed_by_merge(model, fa, first, mpar, 20, r_plain);
        std::vector<llama_pos> freed_calib(20, -1);
        mpar.calib_path = path.c_str();
        const int32_t r_calib = llama_memory_seq_merge(ctx, 0, 4, 200, 20, &mpar, freed_calib.data());
        check(r_plain == 20 && r_calib == 20 && freed_plain != freed_calib &&
                llama_memory_seq_pos_max(mem, 0) == 179,
                fmt("[%s] --kv-merge-calib: a merge through the profile frees 20 cells, other ones than without it", tag).c_str(),
                fmt("plain %d, calibrated %d", r_plain, r_calib));

        // refusals leave the cache alone
        decode(ctx, {prompt[200]}, 180);
        if (FILE * f = fopen(bad_path.c_str(), "wb")) {
            fputs("kvmerger-profile 1\nlayers 3\nlayer 0 10 0.5 0.1 0.2\nlayer 1 10 0.5 0.1 0.2\nlayer 2 10 0.5 0.1 0.2\n", f);
            fclose(f);
        }
        const std::vector<uint8_t> b2 = get_state(ctx, 0);
        mpar.calib_path = "/nonexistent/kvm.profile";
        const int32_t r_missing = llama_memory_seq_merge(ctx, 0, 4, 180, 20, &mpar, nullptr);
        mpar.calib_path = bad_path.c_str();
        const int32_t r_wrong = llama_memory_seq_merge(ctx, 0, 4, 180, 20, &mpar, nullptr);
        const int32_t c_null  = llama_memory_seq_merge_calibrate(ctx, 0, nullptr);
        const int32_t c_seq   = llama_memory_seq_merge_calibrate(ctx, 5, path.c_str());
        const int32_t c_ctx   = llama_memory_seq_merge_calibrate(nullptr, 0, path.c_str());
        const int32_t c_dir   = llama_memory_seq_merge_calibrate(ctx, 0, "/nonexistent/kvm.profile");
        const std::vector<uint8_t> a2 = get_state(ctx, 0);
        check(r_missing == -2 && r_wrong == -2 && c_null == -2 && c_seq == -2 && c_ctx == -2 && c_dir == -4 && b2 == a2,
                fmt("[%s] a missing or ill-fitting profile, bad calibrate arguments: refused, cache unchanged", tag).c_str(),
                fmt("missing %d, 3-layer profile %d, path NULL %d, bad seq %d, ctx NULL %d, unwritable %d, state %s",
                    r_missing, r_wrong, c_null, c_seq, c_ctx, c_dir, b2 == a2 ? "same" : "changed"));
        llama_free(ctx);
        if (!(keep && *keep)) {
            remove(path.c_str());
        }
        remove(bad_path.c_str());
    }

    // ---------------------------------------------------------------- 5. K/V read back after a merge
    {
        llama_context * ctx = make_ctx(model, fa);
        const int n_tok = std::min((int) prompt.size(), 200);
        std::vector<llama_token> toks(prompt.begin(), prompt.begin() + n_tok);
        const bool ok_dec = decode(ctx, toks, 0);
        kv_state before, after;
        const bool ok_b = parse_state(get_state(ctx, 0), before);

        llama_kv_merge_params mpar = llama_kv_merge_default_params();   // EVICT_FOLD: every freed cell is folded
        mpar.n_threads = 1;
        const int32_t n_free = 48;
        std::vector<llama_pos> freed(n_free, -1);
        const int32_t r = llama_memory_seq_merge(ctx, 0, 4, n_tok, n_free, &mpar, freed.data());
        const bool ok_a = parse_state(get_state(ctx, 0), after);

        std::string why;
        size_t n_same = 0, n_merged = 0, n_changed = 0;
        uint64_t n_tokens = 0;
        bool ok = ok_dec && ok_b && ok_a && r == n_free && (int) before.pos.size() == n_tok &&
                  after.pos.size() == before.pos.size() - n_free;
        if (!ok) {
            why = fmt("decode %d, parsed %d/%d, merge returned %d, cells %zu -> %zu", ok_dec, ok_b, ok_a, r,
                      before.pos.size(), after.pos.size());
        }
        std::vector<bool> is_freed(n_tok, false);
        for (llama_pos p : freed) {
            ok = ok && p >= 4 && p < n_tok && !is_freed[p];
            if (p >= 0 && p < n_tok) {
                is_freed[p] = true;
            }
        }
        // original position of each cell after the merge: positions were closed up, so the k-th smallest new
        // position is the k-th kept original one
        std::vector<llama_pos> kept;
        for (llama_pos p = 0; p < n_tok; ++p) {
            if (!is_freed[p]) {
                kept.push_back(p);
            }
        }
        std::vector<int> cell_of_pos(n_tok, -1);   // before: cell index of each position
        for (size_t i = 0; i < before.pos.size(); ++i) {
            cell_of_pos[before.pos[i]] = (int) i;
        }
        for (size_t i = 0; ok && i < after.pos.size(); ++i) {
            const llama_pos orig = kept[after.pos[i]];
            const int c0 = cell_of_pos[orig];
            n_tokens += after.count[i];
            if (after.count[i] == 1) {
                // left alone: the bytes it had (K unshifted: the state is read before the K-shift runs)
                for (size_t il = 0; il < after.k.size() && ok; ++il) {
                    ok = after.k[il][i] == before.k[il][c0] && after.v[il][i] == before.v[il][c0];
                }
                n_same += ok;
                if (!ok) {
                    why = fmt("cell of position %d was not merged but its K/V changed", orig);
                }
                continue;
            }
            // merged: its members are itself and freed cells of the runs right before and after it
            n_merged++;
            std::vector<int> members = { c0 };
            for (llama_pos q = orig - 1; q >= 0 && is_freed[q]; --q) members.push_back(cell_of_pos[q]);
            for (llama_pos q = orig + 1; q < n_tok && is_freed[q]; ++q) members.push_back(cell_of_pos[q]);
            bool changed = false;
            for (size_t il = 0; il < after.v.size() && ok; ++il) {
                for (int kv = 0; kv < 2 && ok; ++kv) {
                    const auto &  rows_b = kv ? before.v[il] : before.k[il];
                    const auto &  row_a  = kv ? after.v[il][i] : after.k[il][i];
                    const int32_t type   = kv ? after.v_type[il] : after.k_type[il];
                    const size_t  n_el   = row_a.size() / (type == GGML_TYPE_F16 ? 2 : 4);
                    changed = changed || row_a != rows_b[c0];
                    for (size_t j = 0; j < n_el && ok; ++j) {
                        float lo = INFINITY, hi = -INFINITY;
                        for (int m : members) {
                            lo = std::min(lo, row_el(rows_b[m], type, j));
                            hi = std::max(hi, row_el(rows_b[m], type, j));
                        }
                        const float x = row_el(row_a, type, j);
                        ok = x >= lo && x <= hi;
                        if (!ok) {
                            why = fmt("merged cell of position %d, layer %zu %s[%zu] = %g outside its members' [%g, %g]",
                                      orig, il, kv ? "V" : "K", j, x, lo, hi);
                        }
                    }
                }
            }
            n_changed += changed;
        }
        if (ok && (n_merged == 0 || n_changed != n_merged || n_tokens != (uint64_t) n_tok)) {
            ok = false;
            why = fmt("%zu merged cells, %zu of them changed, counts add up to %llu of %d tokens", n_merged, n_changed,
                      (unsigned long long) n_tokens, n_tok);
        }
        check(ok, fmt("[%s] K/V read back after a merge: untouched cells keep their bytes, merged ones lie between their members", tag).c_str(),
              ok ? fmt("%zu cells kept their bytes, %zu merged cells within their members' range in all %zu layers, "
                       "counts add up to %llu tokens", n_same, n_merged, before.k.size(), (unsigned long long) n_tokens)
                 : why);
        llama_free(ctx);
    }

    llama_model_free(model);
    llama_backend_free();

    printf("state_roundtrip %s: %d passed, %d failed\n", tag, n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}
