// Attention of the query ring against every layer's keys (src/merge/attention.rs on the
// device): per layer and query head, softmax(kq_scale·q·k + bias) over the window's cells,
// summed over query rows, heads and layers into one number per cell.
//
// One block per (layer, KV head) unit, as the CPU splits the work: it walks its GQA group's
// query rows in order and adds each row's probabilities into the unit's own partial row, so
// no two blocks write one float. A second kernel adds the units in their fixed order, so the
// result does not depend on scheduling. Logits are kept in f64: a q·k beyond f32's range
// (the CPU's f64 fallback) then needs no second path.
#include "common.cuh"

// err bit 1: a non-finite key; bit 2: a non-finite query.
static __global__ void kvm_attn_unit_kernel(
        const kvm_dev_layer * __restrict__ layers, const uint32_t * __restrict__ cells, uint32_t n,
        const uint32_t * __restrict__ q_sel, uint32_t n_q, const float * __restrict__ bias,
        double * __restrict__ logits, float * __restrict__ partial, int * __restrict__ err) {
    extern __shared__ float q_sh[];
    __shared__ float red[32];
    __shared__ double redd[32];
    const kvm_dev_layer L = layers[blockIdx.y];
    const uint32_t hk = blockIdx.x;
    if (hk >= L.n_head) {
        return;
    }
    const uint32_t group = L.n_head_q / L.n_head;
    const uint32_t unit = L.unit0 + hk;
    double * lg = logits + (uint64_t) unit * n;
    float * acc = partial + (uint64_t) unit * n;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
        acc[i] = 0.0f;
    }
    const uint32_t rows = n_q * group;
    for (uint32_t t = 0; t < rows; ++t) {
        const uint32_t r = q_sel ? q_sel[t / group] : t / group;
        const float * q = L.q + ((uint64_t) r * L.n_head_q + hk * group + t % group) * L.dk;
        __syncthreads();
        for (uint32_t d = threadIdx.x; d < L.dk; d += blockDim.x) {
            const float x = q[d];
            if (!isfinite(x)) atomicOr(err, 2);
            q_sh[d] = x;
        }
        __syncthreads();
        double mx = -INFINITY;
        for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
            const uint32_t c = cells[i];
            float dot = 0.0f;
            bool finite = true;
            for (uint32_t d = 0; d < L.dk; ++d) {
                const float k = kvm_load_k(L, c, hk, d);
                finite &= isfinite(k);
                dot = fmaf(q_sh[d], k, dot);
            }
            if (!finite) {
                atomicOr(err, 1);
            }
            double dd = (double) dot;
            if (!isfinite(dot)) {
                // beyond f32: the same sum in f64, as the CPU's softmax_acc_f64
                dd = 0.0;
                for (uint32_t d = 0; d < L.dk; ++d) {
                    dd += (double) q_sh[d] * (double) kvm_load_k(L, c, hk, d);
                }
            }
            const double l = (double) L.kq_scale * dd + (bias ? (double) bias[i] : 0.0);
            lg[i] = l;
            mx = fmax(mx, l);
        }
        mx = kvm_block_max_d(mx, redd);
        if (mx == -INFINITY || isnan(mx)) {
            continue; // every cell masked: no evidence, as on the CPU
        }
        float s = 0.0f;
        for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
            s += (float) exp(lg[i] - mx);
        }
        s = kvm_block_sum(s, red);
        const float inv = 1.0f / s;
        for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
            acc[i] += (float) exp(lg[i] - mx) * inv;
        }
    }
}

static __global__ void kvm_attn_reduce_kernel(const float * __restrict__ partial, uint32_t n_units, uint32_t n,
        float * __restrict__ out) {
    const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    float s = 0.0f;
    for (uint32_t u = 0; u < n_units; ++u) {
        s += partial[(uint64_t) u * n + i];
    }
    out[i] = s;
}

// layers[n_layers] (device), cells[n] (device), q_sel[n_q] (device, or NULL for rows
// 0..n_q), bias[n] (device or NULL); logits[n_units·n] f64 and partial[n_units·n] scratch;
// out[n]; *err (device) must be 0 on entry. max_heads: the most KV heads of any layer;
// max_dk: the largest n_embd_head_k.
extern "C" int kvm_cuda_attn(const kvm_dev_layer * layers, uint32_t n_layers, uint32_t max_heads, uint32_t max_dk,
        const uint32_t * cells, uint32_t n, const uint32_t * q_sel, uint32_t n_q, const float * bias,
        uint32_t n_units, double * logits, float * partial, float * out, int * err, void * stream) {
    cudaStream_t s = (cudaStream_t) stream;
    if (n == 0) {
        return (int) cudaSuccess;
    }
    const dim3 grid(max_heads, n_layers);
    kvm_attn_unit_kernel<<<grid, KVM_CUDA_BLOCK_SIZE, max_dk * sizeof(float), s>>>(
            layers, cells, n, q_sel, n_q, bias, logits, partial, err);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        return (int) e;
    }
    kvm_attn_reduce_kernel<<<(n + KVM_CUDA_BLOCK_SIZE - 1) / KVM_CUDA_BLOCK_SIZE, KVM_CUDA_BLOCK_SIZE, 0, s>>>(
            partial, n_units, n, out);
    return (int) cudaGetLastError();
}
