// The weighted merge of K and V rows into the survivors (src/merge/apply.rs on the device).
//
// Two kernels around a host step: member_d2 gives, per layer, set and KV head, each member's
// squared key distance to its pivot; the host turns those into the Gaussian-kernel weights
// with the CPU's own function (so every sigma mode, counts and attention weights behave as
// on the CPU) and sends them back; merge then writes Σ w·row into the pivot's K and V rows.
// One block per (set, layer); sets are disjoint and only pivot rows are written, so blocks
// never touch one another's bytes. CaM's folds add weighted evicted values into kept ones.
//
// d2 and weights: per layer a slab of n_members·max_heads floats; set s (members from
// set_off[s], m of them) at set_off[s]·max_heads, head h's members at h·m + j, the layout of
// apply.rs's per-set `d2`/`w` arrays.
#include "common.cuh"

#define KVM_WARPS (KVM_CUDA_BLOCK_SIZE / 32)

__device__ __forceinline__ float kvm_max_finite(int32_t t) {
    switch (t) {
        case KVM_F32: return 3.40282347e+38f;
        case KVM_F16: return 65504.0f;
        case KVM_BF16: return __uint_as_float(0x7f7f0000u);
        case KVM_Q8_0: return 127.0f * 65504.0f;
        case KVM_Q4_0: return 8.0f * 65504.0f;
    }
    return 3.40282347e+38f;
}

static __global__ void kvm_member_d2_kernel(const kvm_dev_layer * __restrict__ layers,
        const uint32_t * __restrict__ set_off, const uint32_t * __restrict__ mcells,
        const uint32_t * __restrict__ pivot, uint32_t n_members, uint32_t max_heads, float * __restrict__ d2) {
    const kvm_dev_layer L = layers[blockIdx.y];
    const uint32_t s = blockIdx.x;
    const uint32_t a = set_off[s], m = set_off[s + 1] - a;
    const uint32_t pc = mcells[a + pivot[s]];
    float * o = d2 + (uint64_t) blockIdx.y * n_members * max_heads + (uint64_t) a * max_heads;
    for (uint32_t t = threadIdx.x / 32; t < L.n_head * m; t += KVM_WARPS) {
        const uint32_t h = t / m, j = t % m;
        const uint32_t c = mcells[a + j];
        float acc = 0.0f;
        for (uint32_t d = threadIdx.x % 32; d < L.dk; d += 32) {
            const float x = kvm_load_k(L, pc, h, d) - kvm_load_k(L, c, h, d);
            acc = fmaf(x, x, acc);
        }
        acc = kvm_warp_sum(acc);
        if (threadIdx.x % 32 == 0) {
            o[h * m + j] = acc;
        }
    }
}

// Σ_j w[h·m + j] · x_j over the members of one element, then apply.rs's clamp_to_members
// (a convex sum rounding past the type's range comes back into the members' range), the
// paper's ×m and its saturation.
template <bool IS_V>
__device__ __forceinline__ float kvm_merged_elem(const kvm_dev_layer & L, const uint32_t * mc, uint32_t m,
        const float * w, uint32_t e, uint32_t d, bool paper, float lim) {
    const uint32_t h = e / d;
    float o = 0.0f, lo = INFINITY, hi = -INFINITY;
    for (uint32_t j = 0; j < m; ++j) {
        const float x = IS_V ? kvm_load_v(L, mc[j], e) : kvm_load(L.k_type, L.k + (uint64_t) mc[j] * L.k_nb1, e);
        o = fmaf(w[h * m + j], x, o);
        lo = fminf(lo, x);
        hi = fmaxf(hi, x);
    }
    if (fabsf(o) > lim) {
        o = fminf(fmaxf(o, lo), hi);
    }
    if (paper) {
        o *= (float) m;
        if (fabsf(o) > lim) {
            o = copysignf(lim, o);
        }
    }
    return o;
}

template <bool IS_V>
__device__ void kvm_merge_row(const kvm_dev_layer & L, const uint32_t * mc, uint32_t m, uint32_t pc,
        const float * w, bool paper) {
    const int32_t t = IS_V ? L.v_type : L.k_type;
    const uint32_t d = IS_V ? L.dv : L.dk;
    const uint32_t width = L.n_head * d;
    const float lim = kvm_max_finite(t);
    if (kvm_is_quant(t)) {
        uint8_t * row = (IS_V ? L.v + (uint64_t) pc * L.v_nb1 : L.k + (uint64_t) pc * L.k_nb1);
        for (uint32_t c = threadIdx.x; c < width / KVM_QK; c += blockDim.x) {
            float x[KVM_QK];
            for (uint32_t i = 0; i < KVM_QK; ++i) {
                x[i] = kvm_merged_elem<IS_V>(L, mc, m, w, c * KVM_QK + i, d, paper, lim);
            }
            kvm_store_block(t, row + (uint64_t) c * kvm_type_size(t), x);
        }
        return;
    }
    for (uint32_t e = threadIdx.x; e < width; e += blockDim.x) {
        const float o = kvm_merged_elem<IS_V>(L, mc, m, w, e, d, paper, lim);
        if (IS_V && L.v_trans) {
            kvm_store(t, L.v + (uint64_t) e * L.v_nb1 + (uint64_t) pc * L.v_nb0, 0, o);
        } else if (IS_V) {
            kvm_store(t, L.v + (uint64_t) pc * L.v_nb1, e, o);
        } else {
            kvm_store(t, L.k + (uint64_t) pc * L.k_nb1, e, o);
        }
    }
}

static __global__ void kvm_merge_kernel(const kvm_dev_layer * __restrict__ layers,
        const uint32_t * __restrict__ set_off, const uint32_t * __restrict__ mcells,
        const uint32_t * __restrict__ pivot, uint32_t n_members, uint32_t max_heads,
        const float * __restrict__ weights, int merge_keys, int merge_values, int paper) {
    const kvm_dev_layer L = layers[blockIdx.y];
    const uint32_t s = blockIdx.x;
    const uint32_t a = set_off[s], m = set_off[s + 1] - a;
    const uint32_t * mc = mcells + a;
    const uint32_t pc = mc[pivot[s]];
    const float * w = weights + (uint64_t) blockIdx.y * n_members * max_heads + (uint64_t) a * max_heads;
    // Every member is read before the pivot's row is written: a thread reads and writes only
    // its own elements (or blocks), and no other thread reads those.
    if (merge_keys) {
        kvm_merge_row<false>(L, mc, m, pc, w, false);
    }
    if (merge_values) {
        kvm_merge_row<true>(L, mc, m, pc, w, paper != 0);
    }
}

// CaM: fold f adds Σ wt·V[src] to V[target[f]]; sources src_off[f]..src_off[f+1] in
// src_cells/src_w. Then apply.rs's saturate.
__device__ __forceinline__ float kvm_cam_elem(const kvm_dev_layer & L, uint32_t tc, const uint32_t * sc,
        const float * sw, uint32_t ns, uint32_t e, float lim) {
    float o = kvm_load_v(L, tc, e);
    for (uint32_t j = 0; j < ns; ++j) {
        o = fmaf(sw[j], kvm_load_v(L, sc[j], e), o);
    }
    if (fabsf(o) > lim) {
        o = copysignf(lim, o);
    }
    return o;
}

static __global__ void kvm_cam_kernel(const kvm_dev_layer * __restrict__ layers, const uint32_t * __restrict__ target,
        const uint32_t * __restrict__ src_off, const uint32_t * __restrict__ src_cells, const float * __restrict__ src_w) {
    const kvm_dev_layer L = layers[blockIdx.y];
    const uint32_t f = blockIdx.x;
    const uint32_t tc = target[f];
    const uint32_t a = src_off[f], ns = src_off[f + 1] - a;
    const int32_t t = L.v_type;
    const uint32_t width = L.n_head * L.dv;
    const float lim = kvm_max_finite(t);
    if (kvm_is_quant(t)) {
        uint8_t * row = L.v + (uint64_t) tc * L.v_nb1;
        for (uint32_t c = threadIdx.x; c < width / KVM_QK; c += blockDim.x) {
            float x[KVM_QK];
            for (uint32_t i = 0; i < KVM_QK; ++i) {
                x[i] = kvm_cam_elem(L, tc, src_cells + a, src_w + a, ns, c * KVM_QK + i, lim);
            }
            kvm_store_block(t, row + (uint64_t) c * kvm_type_size(t), x);
        }
        return;
    }
    for (uint32_t e = threadIdx.x; e < width; e += blockDim.x) {
        const float o = kvm_cam_elem(L, tc, src_cells + a, src_w + a, ns, e, lim);
        if (L.v_trans) {
            kvm_store(t, L.v + (uint64_t) e * L.v_nb1 + (uint64_t) tc * L.v_nb0, 0, o);
        } else {
            kvm_store(t, L.v + (uint64_t) tc * L.v_nb1, e, o);
        }
    }
}

// set_off[n_sets+1], mcells[n_members] (cell ids), pivot[n_sets] (index within the set);
// d2[n_layers·n_members·max_heads] out. All device.
extern "C" int kvm_cuda_member_d2(const kvm_dev_layer * layers, uint32_t n_layers, const uint32_t * set_off,
        uint32_t n_sets, const uint32_t * mcells, const uint32_t * pivot, uint32_t n_members, uint32_t max_heads,
        float * d2, void * stream) {
    if (n_sets == 0) {
        return (int) cudaSuccess;
    }
    kvm_member_d2_kernel<<<dim3(n_sets, n_layers), KVM_CUDA_BLOCK_SIZE, 0, (cudaStream_t) stream>>>(
            layers, set_off, mcells, pivot, n_members, max_heads, d2);
    return (int) cudaGetLastError();
}

// As kvm_cuda_member_d2, with weights (same layout as d2) in.
extern "C" int kvm_cuda_merge(const kvm_dev_layer * layers, uint32_t n_layers, const uint32_t * set_off,
        uint32_t n_sets, const uint32_t * mcells, const uint32_t * pivot, uint32_t n_members, uint32_t max_heads,
        const float * weights, int merge_keys, int merge_values, int paper, void * stream) {
    if (n_sets == 0) {
        return (int) cudaSuccess;
    }
    kvm_merge_kernel<<<dim3(n_sets, n_layers), KVM_CUDA_BLOCK_SIZE, 0, (cudaStream_t) stream>>>(
            layers, set_off, mcells, pivot, n_members, max_heads, weights, merge_keys, merge_values, paper);
    return (int) cudaGetLastError();
}

// target[n_folds], src_off[n_folds+1], src_cells/src_w[src_off[n_folds]]. All device.
extern "C" int kvm_cuda_cam(const kvm_dev_layer * layers, uint32_t n_layers, const uint32_t * target,
        uint32_t n_folds, const uint32_t * src_off, const uint32_t * src_cells, const float * src_w, void * stream) {
    if (n_folds == 0) {
        return (int) cudaSuccess;
    }
    kvm_cam_kernel<<<dim3(n_folds, n_layers), KVM_CUDA_BLOCK_SIZE, 0, (cudaStream_t) stream>>>(
            layers, target, src_off, src_cells, src_w);
    return (int) cudaGetLastError();
}
