//! AVX2 + FMA + F16C (x86_64), selected at run time by [`table`]: the [`F32Vec`] of eight
//! lanes the kernels of `generic.rs` run on, and the 8×8 transpose of `pack_keys_f16`.
//!
//! Nothing here carries `#[target_feature]` but the entries [`isa_kernels!`] makes; the
//! vector methods are `#[inline(always)]` so they are inlined into an entry and compiled with
//! its features (memchr's `Vector`).

#![deny(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use super::generic::{F32Vec, PackBlock, ARR};
use super::{Kernels, QK_PANEL};

/// Elements per register (ggml `GGML_F32_EPR`): eight f32 lanes of a `__m256`.
const EPR: usize = 8;

isa_kernels! {
    name: "avx2",
    features: "avx2,fma,f16c",
    vector: __m256,
    qk_panel_regs: 2,
    pack: PackAvx2,
    entries: {
        dot_f32: dot_f32_avx2,
        head_dots_f32: head_dots_f32_avx2,
        head_dots_f16: head_dots_f16_avx2,
        head_dots2_f16: head_dots2_f16_avx2,
        head_norms_f16: head_norms_f16_avx2,
        qk_t_f32: qk_t_f32_avx2,
        pack_keys_f16: pack_keys_f16_avx2,
        softmax_acc: softmax_acc_avx2,
        dot_f16: dot_f16_avx2,
        sqdist_f32: sqdist_f32_avx2,
        head_sqdists_f32: head_sqdists_f32_avx2,
        head_sqdists_f16: head_sqdists_f16_avx2,
        axpy_f32: axpy_f32_avx2,
        weighted_heads_f32: weighted_heads_f32_avx2,
        weighted_heads_f16: weighted_heads_f16_avx2,
        f16_to_f32: f16_to_f32_avx2,
        f32_to_f16: f32_to_f16_avx2,
        bf16_to_f32: bf16_to_f32_avx2,
        f32_to_bf16: f32_to_bf16_avx2,
    },
}

/// The AVX2 table, or `None` when the CPU lacks AVX2, FMA or F16C (each checked separately,
/// like ggml's `cpu-feats.cpp`). CPUID is cached by std, and [`super::kernels`] calls this once.
pub(crate) fn table() -> Option<&'static Kernels> {
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        Some(&TABLE)
    } else {
        None
    }
}

// Register arithmetic needs its `unsafe` block only when AVX is not enabled for the whole
// crate (it is under `-C target-feature=+avx2`, where the block would otherwise warn).
#[allow(unused_unsafe)]
impl F32Vec for __m256 {
    const EPR: usize = EPR;

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        // SAFETY: AVX by the caller; no memory is touched.
        unsafe { _mm256_set1_ps(x) }
    }

    #[inline(always)]
    unsafe fn loadu(p: *const f32) -> Self {
        // SAFETY: AVX and eight readable floats by the caller; no alignment needed.
        unsafe { _mm256_loadu_ps(p) }
    }

    /// `vcvtph2ps`: exact; a signalling NaN comes out quiet, as in `half`.
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> Self {
        // SAFETY: F16C and eight readable u16 by the caller; loadu has no alignment need.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }

    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> Self {
        // SAFETY: AVX2 and eight readable u16 by the caller; loadu has no alignment need.
        unsafe {
            let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            let abs = _mm256_and_si256(w, _mm256_set1_epi32(0x7fff));
            let nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f80));
            let w = _mm256_or_si256(w, _mm256_and_si256(nan, _mm256_set1_epi32(0x40)));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
        }
    }

    #[inline(always)]
    unsafe fn storeu(self, p: *mut f32) {
        // SAFETY: AVX and eight writable floats by the caller; no alignment needed.
        unsafe { _mm256_storeu_ps(p, self) }
    }

    /// `vcvtps2ph` imm 0, as ggml's `GGML_CPU_FP32_TO_FP16`.
    #[inline(always)]
    unsafe fn store_f16(self, p: *mut u16) {
        // SAFETY: F16C and eight writable u16 by the caller; no alignment needed.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(self);
            _mm_storeu_si128(p.cast(), h);
        }
    }

    #[inline(always)]
    unsafe fn store_bf16(self, p: *mut u16) {
        // SAFETY: AVX2 and eight writable u16 by the caller; no alignment needed.
        unsafe { _mm_storeu_si128(p.cast(), f32_to_bf16x8(self)) }
    }

    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        // SAFETY: FMA by the caller; no memory is touched.
        unsafe { _mm256_fmadd_ps(self, b, c) }
    }

    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        // SAFETY: AVX by the caller; no memory is touched.
        unsafe { _mm256_sub_ps(self, b) }
    }

    /// acc[0]+acc[2], acc[1]+acc[3], then the two sums, then the 8 lanes: hi128+lo128, then
    /// lanes 0+2 / 1+3, then the last pair.
    #[inline(always)]
    unsafe fn reduce_sum(acc: [Self; ARR]) -> f32 {
        // SAFETY: AVX by the caller; no memory is touched.
        unsafe {
            let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
            let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
            _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)))
        }
    }
}

/// ggml's f32 -> bf16 rounding on eight lanes, packed to eight u16 in order.
///
/// # Safety
/// The CPU supports AVX2.
#[inline(always)]
#[allow(unused_unsafe)] // as in the `F32Vec` impl
unsafe fn f32_to_bf16x8(x: __m256) -> __m128i {
    // SAFETY: the caller guarantees AVX2; no memory is touched.
    unsafe {
        let u = _mm256_castps_si256(x);
        // NaN: |u| > 0x7f800000. Both sides are non-negative as i32, so the signed compare is
        // the unsigned one the scalar code does.
        let abs = _mm256_and_si256(u, _mm256_set1_epi32(0x7fff_ffff));
        let nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f80_0000));
        let hi = _mm256_srli_epi32::<16>(u);
        let quiet = _mm256_or_si256(hi, _mm256_set1_epi32(64));
        // Round to nearest even: u + 0x7fff + lsb, then >> 16. Cannot wrap for non-NaN u
        // (max 0xff800000), and NaN lanes are replaced below.
        let lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff));
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(u, bias));
        let r = _mm256_blendv_epi8(rounded, quiet, nan);
        // Every lane is <= 0xffff, so unsigned saturation is a plain narrowing; packing the two
        // 128-bit halves against each other keeps the element order.
        _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r))
    }
}

/// Eight rows × eight channels: widened by F16C (exact, like `half`) and transposed in
/// registers, so each store writes 8 keys of one channel.
struct PackAvx2;

impl PackBlock for PackAvx2 {
    const W: usize = EPR;
    #[inline(always)]
    unsafe fn block(block: &[&[u16]], j: usize, panel: &mut [f32], g: usize) {
        let pp = panel.as_mut_ptr();
        // SAFETY: features by the caller; each load reads channels j..j+8 of a row that holds
        // them, each store panel[(j+c)·P + g ..+8] with g + 8 <= P, inside the panel.
        unsafe {
            let mut v = [_mm256_setzero_ps(); EPR];
            for (x, r) in v.iter_mut().zip(block) {
                *x = __m256::load_f16(r.as_ptr().add(j));
            }
            for (c, x) in transpose8(v).iter().enumerate() {
                x.storeu(pp.add((j + c) * QK_PANEL + g));
            }
        }
    }
}
/// The 8×8 transpose of eight rows of eight floats: `out[c]` holds lane `c` of every row.
#[inline(always)]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // SAFETY: register shuffles only; AVX is enabled in the entry this is inlined into.
    #[allow(unused_unsafe)]
    unsafe {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }
}
