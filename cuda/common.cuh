// Shared by every kernel file: the layer table the Rust side builds (src/cuda/device.rs,
// `DevLayer`, same field order), element access in ggml's layouts, and the block reductions.
//
// Launchers are `extern "C" int kvm_cuda_<op>(..., cudaStream_t)` and return a cudaError_t;
// nothing here aborts (ggml's CUDA_CHECK does, which a library must not).
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define KVM_CUDA_BLOCK_SIZE 256
#define KVM_QK 32

// ggml type ids the kernels read and write (layout.rs validated the views already).
enum { KVM_F32 = 0, KVM_F16 = 1, KVM_Q4_0 = 2, KVM_Q8_0 = 8, KVM_BF16 = 30 };

// One layer of one stream; byte strides. With v_trans, V element (channel j, cell c) sits at
// j*v_nb1 + c*v_nb0, else at c*v_nb1 + (its offset in the row).
struct kvm_dev_layer {
    uint8_t * k;
    uint8_t * v;
    const float * q;      // query ring of this layer (attention only), device
    uint64_t k_nb1;
    uint64_t v_nb0;
    uint64_t v_nb1;
    int32_t k_type;
    int32_t v_type;
    uint32_t n_head;      // KV heads
    uint32_t dk;
    uint32_t dv;
    uint32_t v_trans;
    uint32_t n_head_q;    // query heads (attention only)
    uint32_t unit0;       // first (layer, KV head) unit of this layer (attention only)
    float kq_scale;
    uint32_t pad_;
};

__device__ __forceinline__ bool kvm_is_quant(int32_t t) { return t == KVM_Q4_0 || t == KVM_Q8_0; }

__device__ __forceinline__ uint32_t kvm_type_size(int32_t t) {
    switch (t) {
        case KVM_F32: return 4;
        case KVM_Q4_0: return 18;
        case KVM_Q8_0: return 34;
        default: return 2;
    }
}

// Bytes of `n` consecutive elements from the start of a row (n a multiple of the block).
__device__ __forceinline__ uint64_t kvm_row_bytes(int32_t t, uint64_t n) {
    return kvm_is_quant(t) ? n / KVM_QK * kvm_type_size(t) : n * kvm_type_size(t);
}

__device__ __forceinline__ float kvm_bf16_to_f32(uint16_t b) {
    return __uint_as_float(((uint32_t) b) << 16);
}

// ggml_compute_fp32_to_bf16 (src/simd/scalar.rs f32_to_bf16_one): NaN made quiet, else RNE.
__device__ __forceinline__ uint16_t kvm_f32_to_bf16(float x) {
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (uint16_t) ((u >> 16) | 64);
    }
    return (uint16_t) ((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

__device__ __forceinline__ float kvm_f16_bits_to_f32(const uint8_t * p) {
    return __half2float(__ushort_as_half(*(const uint16_t *) p));
}

// Element `i` of a row starting at `row` (block types decoded as quant.rs does).
__device__ __forceinline__ float kvm_load(int32_t t, const uint8_t * row, uint32_t i) {
    switch (t) {
        case KVM_F32: return ((const float *) row)[i];
        case KVM_F16: return __half2float(__ushort_as_half(((const uint16_t *) row)[i]));
        case KVM_BF16: return kvm_bf16_to_f32(((const uint16_t *) row)[i]);
        case KVM_Q8_0: {
            const uint8_t * b = row + (i / KVM_QK) * 34;
            return (float) (int8_t) b[2 + i % KVM_QK] * kvm_f16_bits_to_f32(b);
        }
        case KVM_Q4_0: {
            const uint8_t * b = row + (i / KVM_QK) * 18;
            const uint32_t j = i % KVM_QK;
            const uint8_t q = b[2 + (j % 16)];
            const int v = j < 16 ? (q & 0x0f) : (q >> 4);
            return (float) (v - 8) * kvm_f16_bits_to_f32(b);
        }
    }
    return 0.0f;
}

// Writes one element of a float type (f32, f16, bf16); block types go through kvm_store_block.
__device__ __forceinline__ void kvm_store(int32_t t, uint8_t * row, uint32_t i, float x) {
    switch (t) {
        case KVM_F32: ((float *) row)[i] = x; break;
        case KVM_F16: ((uint16_t *) row)[i] = __half_as_ushort(__float2half_rn(x)); break;
        case KVM_BF16: ((uint16_t *) row)[i] = kvm_f32_to_bf16(x); break;
    }
}

__device__ __forceinline__ void kvm_write_d(uint8_t * b, float d) {
    const uint16_t h = __half_as_ushort(__float2half_rn(d));
    b[0] = (uint8_t) (h & 0xff);
    b[1] = (uint8_t) (h >> 8);
}

// A float-to-int8 conversion that saturates and sends NaN to 0, as Rust's `as i8` does
// (a C cast of an out-of-range float is undefined).
__device__ __forceinline__ int kvm_sat_i8(float x) {
    if (isnan(x)) return 0;
    return (int) fminf(fmaxf(x, -128.0f), 127.0f);
}

// One block of 32 values into `b`, as ggml's quantize_row_{q8_0,q4_0}_ref (src/quant.rs).
__device__ __forceinline__ void kvm_store_block(int32_t t, uint8_t * b, const float * x) {
    if (t == KVM_Q8_0) {
        float amax = 0.0f;
        for (int j = 0; j < KVM_QK; ++j) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        kvm_write_d(b, d);
        for (int j = 0; j < KVM_QK; ++j) {
            b[2 + j] = (uint8_t) (int8_t) kvm_sat_i8(roundf(__fmul_rn(x[j], id)));
        }
    } else {
        float amax = 0.0f, mx = 0.0f;
        for (int j = 0; j < KVM_QK; ++j) {
            if (amax < fabsf(x[j])) { amax = fabsf(x[j]); mx = x[j]; }
        }
        const float d = mx / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        kvm_write_d(b, d);
        for (int j = 0; j < KVM_QK / 2; ++j) {
            // truncation toward zero after adding 8.5, then at most 15 (ggml)
            const int q0 = min(kvm_sat_i8(truncf(__fadd_rn(__fmul_rn(x[j], id), 8.5f))), 15);
            const int q1 = min(kvm_sat_i8(truncf(__fadd_rn(__fmul_rn(x[KVM_QK / 2 + j], id), 8.5f))), 15);
            b[2 + j] = (uint8_t) (((uint8_t) (int8_t) q0) | (((uint8_t) (int8_t) q1) << 4));
        }
    }
}

// K row of `cell`, head `h`, element `d`.
__device__ __forceinline__ float kvm_load_k(const kvm_dev_layer & L, uint32_t cell, uint32_t h, uint32_t d) {
    return kvm_load(L.k_type, L.k + (uint64_t) cell * L.k_nb1, h * L.dk + d);
}

// V element `j` (channel, all heads) of `cell`, either layout.
__device__ __forceinline__ float kvm_load_v(const kvm_dev_layer & L, uint32_t cell, uint32_t j) {
    if (L.v_trans) {
        return kvm_load(L.v_type, L.v + (uint64_t) j * L.v_nb1 + (uint64_t) cell * L.v_nb0, 0);
    }
    return kvm_load(L.v_type, L.v + (uint64_t) cell * L.v_nb1, j);
}

__device__ __forceinline__ float kvm_warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Sum over the block; every thread gets it. `sh` holds 32 floats. Fixed order: the same
// inputs give the same bits whatever the scheduling.
__device__ __forceinline__ float kvm_block_sum(float x, float * sh) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = (blockDim.x + 31) / 32;
    x = kvm_warp_sum(x);
    __syncthreads();
    if (lane == 0) sh[warp] = x;
    __syncthreads();
    float t = lane < nw ? sh[lane] : 0.0f;
    t = kvm_warp_sum(t);
    return t;
}

__device__ __forceinline__ double kvm_block_max_d(double x, double * sh) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = (blockDim.x + 31) / 32;
    for (int o = 16; o > 0; o >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, o));
    __syncthreads();
    if (lane == 0) sh[warp] = x;
    __syncthreads();
    double t = lane < nw ? sh[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) t = fmax(t, __shfl_xor_sync(0xffffffffu, t, o));
    return t;
}

// The CPU's cosine (src/merge/scores.rs): zero vectors and non-finite data read as -1.
__device__ __forceinline__ float kvm_cosine(float dot, float n2a, float n2b) {
    const float den = sqrtf(n2a * n2b);
    const float c = dot / den;
    if (den > 0.0f && isfinite(c)) return fminf(fmaxf(c, -1.0f), 1.0f);
    return -1.0f;
}
