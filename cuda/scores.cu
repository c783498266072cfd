// Key statistics the plan reads (src/merge/scores.rs on the device), per layer:
//   adjacent:  head-mean cosine of each pair of neighbouring window cells (link scores),
//   pair_cos:  head-sum cosine of given pairs (EVICT_FOLD's choice of neighbour),
//   mean_dist: per set member, squared distance to the set's count-weighted mean key, summed
//              over heads (the query-free pivot).
// One warp per link or pair (lanes stride the head's channels); one block per set. The
// plan combines layers on the host, in layer order, with the CPU's arithmetic.
#include "common.cuh"

#define KVM_WARPS (KVM_CUDA_BLOCK_SIZE / 32)

// Σ over heads of cos(k_a, k_b) in layer L, for one warp.
__device__ __forceinline__ float kvm_head_cos_sum(const kvm_dev_layer & L, uint32_t ca, uint32_t cb) {
    const uint32_t lane = threadIdx.x % 32;
    float sum = 0.0f;
    for (uint32_t h = 0; h < L.n_head; ++h) {
        float dot = 0.0f, na = 0.0f, nb = 0.0f;
        for (uint32_t d = lane; d < L.dk; d += 32) {
            const float a = kvm_load_k(L, ca, h, d);
            const float b = kvm_load_k(L, cb, h, d);
            dot = fmaf(a, b, dot);
            na = fmaf(a, a, na);
            nb = fmaf(b, b, nb);
        }
        dot = kvm_warp_sum(dot);
        na = kvm_warp_sum(na);
        nb = kvm_warp_sum(nb);
        sum += kvm_cosine(dot, na, nb);
    }
    return sum;
}

static __global__ void kvm_adjacent_kernel(const kvm_dev_layer * __restrict__ layers,
        const uint32_t * __restrict__ cells, uint32_t n_links, float * __restrict__ out) {
    const kvm_dev_layer L = layers[blockIdx.y];
    const uint32_t i = blockIdx.x * KVM_WARPS + threadIdx.x / 32;
    if (i >= n_links) {
        return;
    }
    const float s = kvm_head_cos_sum(L, cells[i], cells[i + 1]);
    if (threadIdx.x % 32 == 0) {
        // the CPU multiplies by 1/n_head rather than dividing
        out[(uint64_t) blockIdx.y * n_links + i] = s * (1.0f / (float) L.n_head);
    }
}

static __global__ void kvm_pair_cos_kernel(const kvm_dev_layer * __restrict__ layers,
        const uint32_t * __restrict__ cells, const uint32_t * __restrict__ pairs, uint32_t n_pairs,
        float * __restrict__ out) {
    const kvm_dev_layer L = layers[blockIdx.y];
    const uint32_t p = blockIdx.x * KVM_WARPS + threadIdx.x / 32;
    if (p >= n_pairs) {
        return;
    }
    const float s = kvm_head_cos_sum(L, cells[pairs[2 * p]], cells[pairs[2 * p + 1]]);
    if (threadIdx.x % 32 == 0) {
        out[(uint64_t) blockIdx.y * n_pairs + p] = s;
    }
}

// Sets are runs of `members` (window indices) from set_off[s] to set_off[s+1].
static __global__ void kvm_mean_dist_kernel(const kvm_dev_layer * __restrict__ layers,
        const uint32_t * __restrict__ cells, const uint32_t * __restrict__ counts,
        const uint32_t * __restrict__ set_off, const uint32_t * __restrict__ members, uint32_t n_members,
        float * __restrict__ out) {
    extern __shared__ float mean[];
    const kvm_dev_layer L = layers[blockIdx.y];
    const uint32_t s = blockIdx.x;
    const uint32_t a = set_off[s], b = set_off[s + 1];
    float total = 0.0f;
    for (uint32_t j = a; j < b; ++j) {
        total += (float) counts[members[j]];
    }
    float * o = out + (uint64_t) blockIdx.y * n_members;
    for (uint32_t h = 0; h < L.n_head; ++h) {
        __syncthreads();
        for (uint32_t d = threadIdx.x; d < L.dk; d += blockDim.x) {
            float m = 0.0f;
            for (uint32_t j = a; j < b; ++j) {
                const uint32_t w = members[j];
                m = fmaf((float) counts[w] / total, kvm_load_k(L, cells[w], h, d), m);
            }
            mean[d] = m;
        }
        __syncthreads();
        for (uint32_t j = a + threadIdx.x / 32; j < b; j += KVM_WARPS) {
            const uint32_t c = cells[members[j]];
            float d2 = 0.0f;
            for (uint32_t d = threadIdx.x % 32; d < L.dk; d += 32) {
                const float x = kvm_load_k(L, c, h, d) - mean[d];
                d2 = fmaf(x, x, d2);
            }
            d2 = kvm_warp_sum(d2);
            if (threadIdx.x % 32 == 0) {
                o[j] = h == 0 ? d2 : o[j] + d2;
            }
        }
    }
}

// out[l·n_links + i] for l < n_layers; layers, cells and out on the device.
extern "C" int kvm_cuda_adjacent(const kvm_dev_layer * layers, uint32_t n_layers, const uint32_t * cells,
        uint32_t n_cells, float * out, void * stream) {
    if (n_cells < 2) {
        return (int) cudaSuccess;
    }
    const uint32_t n_links = n_cells - 1;
    const dim3 grid((n_links + KVM_WARPS - 1) / KVM_WARPS, n_layers);
    kvm_adjacent_kernel<<<grid, KVM_CUDA_BLOCK_SIZE, 0, (cudaStream_t) stream>>>(layers, cells, n_links, out);
    return (int) cudaGetLastError();
}

// pairs[2·n_pairs] window indices; out[l·n_pairs + p].
extern "C" int kvm_cuda_pair_cos(const kvm_dev_layer * layers, uint32_t n_layers, const uint32_t * cells,
        const uint32_t * pairs, uint32_t n_pairs, float * out, void * stream) {
    if (n_pairs == 0) {
        return (int) cudaSuccess;
    }
    const dim3 grid((n_pairs + KVM_WARPS - 1) / KVM_WARPS, n_layers);
    kvm_pair_cos_kernel<<<grid, KVM_CUDA_BLOCK_SIZE, 0, (cudaStream_t) stream>>>(layers, cells, pairs, n_pairs, out);
    return (int) cudaGetLastError();
}

// counts[n_cells] per window index; set_off[n_sets+1]; members[n_members]; out[l·n_members + j].
extern "C" int kvm_cuda_mean_dist(const kvm_dev_layer * layers, uint32_t n_layers, uint32_t max_dk,
        const uint32_t * cells, const uint32_t * counts, const uint32_t * set_off, uint32_t n_sets,
        const uint32_t * members, uint32_t n_members, float * out, void * stream) {
    if (n_sets == 0) {
        return (int) cudaSuccess;
    }
    const dim3 grid(n_sets, n_layers);
    kvm_mean_dist_kernel<<<grid, KVM_CUDA_BLOCK_SIZE, max_dk * sizeof(float), (cudaStream_t) stream>>>(
            layers, cells, counts, set_off, members, n_members, out);
    return (int) cudaGetLastError();
}
