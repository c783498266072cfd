/* C smoke test of the kvmerger ABI: includes the committed header, links the staticlib, runs a
 * merge on a small f32 cache with transposed V, checks the result, and feeds bad input. Built
 * with AddressSanitizer + UBSan by tests/c_smoke.rs. */
#include "kvmerger.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_LAYERS 2
#define N_HEAD 2
#define D 32
#define N_CELLS 96

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "smoke: %s:%d: %s (%s)\n", __FILE__, __LINE__, #cond,    \
                    kvm_last_error());                                               \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

static float K[N_LAYERS][N_CELLS][N_HEAD * D];
static float V[N_LAYERS][N_HEAD * D][N_CELLS]; /* transposed: one row per channel */

static void fill(void) {
    unsigned s = 12345;
    for (int l = 0; l < N_LAYERS; l++) {
        for (int c = 0; c < N_CELLS; c++) {
            for (int j = 0; j < N_HEAD * D; j++) {
                s = s * 1103515245u + 12345u;
                float noise = (float)((s >> 16) & 0x7fff) / 32768.0f - 0.5f;
                /* slowly varying keys: runs of similar neighbours */
                K[l][c][j] = sinf(0.05f * (float)c + (float)j) + 0.1f * noise;
                V[l][j][c] = noise;
            }
        }
    }
}

static void views(kvm_layer_view *out) {
    for (int l = 0; l < N_LAYERS; l++) {
        kvm_layer_view *v = &out[l];
        memset(v, 0, sizeof *v);
        v->k.data = K[l];
        v->k.type = 0; /* GGML_TYPE_F32 */
        v->k.ne[0] = N_HEAD * D; v->k.ne[1] = N_CELLS; v->k.ne[2] = 1; v->k.ne[3] = 1;
        v->k.nb[0] = 4; v->k.nb[1] = 4 * N_HEAD * D; v->k.nb[2] = v->k.nb[3] = sizeof K[l];
        v->v.data = V[l];
        v->v.type = 0;
        v->v.ne[0] = N_CELLS; v->v.ne[1] = N_HEAD * D; v->v.ne[2] = 1; v->v.ne[3] = 1;
        v->v.nb[0] = 4; v->v.nb[1] = 4 * N_CELLS; v->v.nb[2] = v->v.nb[3] = sizeof V[l];
        v->n_head_kv = N_HEAD;
        v->n_embd_head_k = D;
        v->n_embd_head_v = D;
        v->v_trans = true;
    }
}

int main(void) {
    fill();
    kvm_layer_view lv[N_LAYERS];
    views(lv);

    CHECK(kvm_abi_version() == KVM_ABI_VERSION);
    printf("smoke: kernels %s, cuda %d\n", kvm_kernels_name(), (int)kvm_has_cuda());

    kvm_params p = kvm_params_default();
    p.n_threads = 2;
    kvm_ctx *ctx = NULL;
    CHECK(kvm_ctx_init(&p, &ctx) == KVM_STATUS_OK && ctx != NULL);
    /* The defaults (EVICT_FOLD, attention pivots) read attention; context shift never does. */
    CHECK(kvm_method_reads_attention(p.method, p.pivot));
    CHECK(!kvm_method_reads_attention(KVM_METHOD_CONTEXT_SHIFT, KVM_PIVOT_ATTENTION));

    /* The window: all cells, position order = cell order reversed, to exercise the mapping. */
    uint32_t cells[N_CELLS];
    float attn[N_CELLS];
    for (int i = 0; i < N_CELLS; i++) {
        cells[i] = (uint32_t)(N_CELLS - 1 - i);
        attn[i] = 0.0f;
    }
    /* Attention from one query row per layer: the key of window cell 40. */
    for (int l = 0; l < N_LAYERS; l++) {
        float q[2 * N_HEAD * D]; /* 4 query heads (GQA 2:1) */
        for (int h = 0; h < 2 * N_HEAD; h++) {
            memcpy(&q[h * D], &K[l][cells[40]][(h / 2) * D], sizeof(float) * D);
        }
        CHECK(kvm_attn_from_queries(ctx, &lv[l], q, 1, 2 * N_HEAD, 1.0f / sqrtf((float)D), cells, N_CELLS,
                                    NULL, attn) == KVM_STATUS_OK);
    }

    static float K0[N_LAYERS][N_CELLS][N_HEAD * D];
    static float V0[N_LAYERS][N_HEAD * D][N_CELLS];
    memcpy(K0, K, sizeof K);
    memcpy(V0, V, sizeof V);

    kvm_plan *plan = NULL;
    CHECK(kvm_plan_init(ctx, lv, N_LAYERS, cells, N_CELLS, attn, NULL, 30, &plan) == KVM_STATUS_OK);
    kvm_plan_info info;
    CHECK(kvm_plan_get(plan, &info) == KVM_STATUS_OK);
    CHECK(info.n_cells == N_CELLS && info.n_freed == 30 && info.n_sets == N_CELLS - 30);
    CHECK(memcmp(K0, K, sizeof K) == 0); /* planning writes nothing */
    CHECK(kvm_plan_apply(ctx, plan, lv, N_LAYERS) == KVM_STATUS_OK);

    /* Only survivors of merged sets changed; their keys are convex combinations of members'. */
    int changed = 0;
    for (size_t i = 0; i < info.n_cells; i++) {
        uint32_t s = info.set_of[i];
        CHECK(s != KVM_EVICTED);
        uint32_t members = 0;
        for (size_t j = 0; j < info.n_cells; j++) members += info.set_of[j] == s;
        int is_merged_survivor = info.survivor[s] == i && members > 1;
        uint32_t c = cells[i];
        for (int l = 0; l < N_LAYERS; l++) {
            int same = memcmp(K[l][c], K0[l][c], sizeof K[l][c]) == 0;
            if (!is_merged_survivor) CHECK(same);
            changed += !same;
        }
    }
    CHECK(changed > 0);
    CHECK(info.counts[info.set_of[0]] >= 1);
    kvm_plan_free(plan);

    /* Bad input: a status, a message, and no byte changed. */
    memcpy(K0, K, sizeof K);
    memcpy(V0, V, sizeof V);
    plan = NULL;
    CHECK(kvm_plan_init(ctx, lv, N_LAYERS, cells, N_CELLS, NULL, NULL, N_CELLS, &plan) == KVM_STATUS_BUDGET);
    CHECK(plan == NULL && strlen(kvm_last_error()) > 0);
    kvm_layer_view bad[N_LAYERS];
    memcpy(bad, lv, sizeof bad);
    bad[1].k.type = 3; /* q4_1: not supported */
    CHECK(kvm_plan_init(ctx, bad, N_LAYERS, cells, N_CELLS, NULL, NULL, 4, &plan) == KVM_STATUS_BAD_TYPE);
    memcpy(bad, lv, sizeof bad);
    bad[0].k.nb[1] = 8;
    CHECK(kvm_plan_init(ctx, bad, N_LAYERS, cells, N_CELLS, NULL, NULL, 4, &plan) == KVM_STATUS_BAD_LAYOUT);
    CHECK(kvm_plan_init(NULL, lv, N_LAYERS, cells, N_CELLS, NULL, NULL, 4, &plan) == KVM_STATUS_NULL_ARG);
    CHECK(kvm_plan_apply(ctx, NULL, lv, N_LAYERS) == KVM_STATUS_NULL_ARG);
    p.method = 42;
    kvm_ctx *ctx2 = NULL;
    CHECK(kvm_ctx_init(&p, &ctx2) == KVM_STATUS_INVALID_ARG && ctx2 == NULL);
    CHECK(strcmp(kvm_status_str(KVM_STATUS_OK), "ok") == 0);
    CHECK(memcmp(K0, K, sizeof K) == 0 && memcmp(V0, V, sizeof V) == 0);

    /* Calibration round trip through a file. */
    kvm_calib *cal = NULL, *cal2 = NULL;
    CHECK(kvm_calib_init(&cal) == KVM_STATUS_OK);
    CHECK(kvm_calib_observe(ctx, cal, lv, N_LAYERS, cells, N_CELLS) == KVM_STATUS_OK);
    const char *path = "kvm-smoke-profile.txt";
    CHECK(kvm_calib_save(cal, path) == KVM_STATUS_OK);
    CHECK(kvm_calib_load(path, &cal2) == KVM_STATUS_OK);
    CHECK(kvm_ctx_set_calib(ctx, cal2) == KVM_STATUS_OK);
    CHECK(kvm_calib_load("/nonexistent/profile", &cal) == KVM_STATUS_IO);
    remove(path);
    kvm_calib_free(cal);
    kvm_calib_free(cal2);
    kvm_calib_free(NULL);
    kvm_plan_free(NULL);
    kvm_ctx_free(ctx);
    kvm_ctx_free(NULL);
    printf("smoke: ok\n");
    return 0;
}
