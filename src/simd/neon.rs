//! NEON (aarch64): the [`F32Vec`] of four lanes the kernels of `generic.rs` run on, and the
//! 4×4 transpose of `pack_keys_f16`. NEON (ASIMD) is part of the aarch64 baseline, so
//! [`table`] needs no run-time check and always returns the table (memchr's `arch/aarch64`
//! does the same).
//!
//! f16 <-> f32 uses inline asm `fcvtl` / `fcvtn` (base ARMv8 floating point) on u16 bit
//! patterns loaded with `vld1_u16`, not the NEON f16 intrinsics, which need the unstable
//! `stdarch_neon_f16` types (rust-lang/rust#136306; candle `cpu/neon.rs` does the same).
//! `fcvtn` rounds by FPCR.RMode, round-to-nearest-even unless someone changed it, which is
//! what `half::f16::from_f32` does. bf16 is pure integer work, bit-identical to `scalar.rs`
//! (NaN quieting included).

#![deny(unsafe_op_in_unsafe_fn)]

use std::arch::aarch64::*;
use std::arch::asm;

use super::generic::{F32Vec, PackBlock, ARR};
use super::{Kernels, QK_PANEL};

/// Elements per register (ggml `GGML_F32_EPR`): four f32 lanes of a `float32x4_t`.
const EPR: usize = 4;

isa_kernels! {
    name: "neon",
    features: "neon",
    vector: float32x4_t,
    qk_panel_regs: 4,
    pack: PackNeon,
    entries: {
        dot_f32: dot_f32_neon,
        head_dots_f32: head_dots_f32_neon,
        head_dots_f16: head_dots_f16_neon,
        head_dots2_f16: head_dots2_f16_neon,
        head_norms_f16: head_norms_f16_neon,
        qk_t_f32: qk_t_f32_neon,
        pack_keys_f16: pack_keys_f16_neon,
        softmax_acc: softmax_acc_neon,
        dot_f16: dot_f16_neon,
        sqdist_f32: sqdist_f32_neon,
        head_sqdists_f32: head_sqdists_f32_neon,
        head_sqdists_f16: head_sqdists_f16_neon,
        axpy_f32: axpy_f32_neon,
        weighted_heads_f32: weighted_heads_f32_neon,
        weighted_heads_f16: weighted_heads_f16_neon,
        f16_to_f32: f16_to_f32_neon,
        f32_to_f16: f32_to_f16_neon,
        bf16_to_f32: bf16_to_f32_neon,
        f32_to_bf16: f32_to_bf16_neon,
    },
}

/// The NEON table. Always `Some`: NEON is mandatory on aarch64 and enabled by the
/// `aarch64-*` targets, so there is nothing to detect.
pub(crate) fn table() -> Option<&'static Kernels> {
    Some(&TABLE)
}

// Register arithmetic only needs its `unsafe` block before Rust 1.87, where the intrinsics
// were `unsafe fn` even where NEON is enabled; the blocks stay for older toolchains.
#[allow(unused_unsafe)]
impl F32Vec for float32x4_t {
    const EPR: usize = EPR;

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        // SAFETY: NEON is enabled on every aarch64 target; no memory is touched.
        unsafe { vdupq_n_f32(x) }
    }

    #[inline(always)]
    unsafe fn loadu(p: *const f32) -> Self {
        // SAFETY: four readable floats by the caller; vld1 needs no alignment.
        unsafe { vld1q_f32(p) }
    }

    /// `fcvtl`: exact.
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> Self {
        // SAFETY: the caller guarantees four readable u16 (vld1 has no alignment need);
        // `fcvtl` is base ARMv8 FP/SIMD, touches only the named registers and no memory or
        // flags.
        unsafe {
            let h = vld1_u16(p);
            let r: float32x4_t;
            asm!("fcvtl {r:v}.4s, {h:v}.4h", r = lateout(vreg) r, h = in(vreg) h,
                 options(pure, nomem, nostack, preserves_flags));
            r
        }
    }

    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> Self {
        // SAFETY: four readable u16 by the caller; vld1 needs no alignment.
        unsafe {
            let w = vmovl_u16(vld1_u16(p));
            let nan = vcgtq_u32(vandq_u32(w, vdupq_n_u32(0x7fff)), vdupq_n_u32(0x7f80));
            let w = vorrq_u32(w, vandq_u32(nan, vdupq_n_u32(0x40)));
            vreinterpretq_f32_u32(vshlq_n_u32::<16>(w))
        }
    }

    #[inline(always)]
    unsafe fn storeu(self, p: *mut f32) {
        // SAFETY: four writable floats by the caller; vst1 needs no alignment.
        unsafe { vst1q_f32(p, self) }
    }

    /// `fcvtn` under the default FPCR: round to nearest even.
    #[inline(always)]
    unsafe fn store_f16(self, p: *mut u16) {
        let r: uint16x4_t;
        // SAFETY: `fcvtn` is base ARMv8 FP/SIMD and touches only the named registers; four
        // writable u16 by the caller, vst1 needs no alignment.
        unsafe {
            asm!("fcvtn {r:v}.4h, {x:v}.4s", r = lateout(vreg) r, x = in(vreg) self,
                 options(pure, nomem, nostack, preserves_flags));
            vst1_u16(p, r);
        }
    }

    #[inline(always)]
    unsafe fn store_bf16(self, p: *mut u16) {
        // SAFETY: four writable u16 by the caller; vst1 needs no alignment.
        unsafe { vst1_u16(p, f32_to_bf16x4(self)) }
    }

    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        // SAFETY: NEON is enabled on every aarch64 target; no memory is touched.
        unsafe { vfmaq_f32(c, self, b) }
    }

    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        // SAFETY: as in `mul_add`.
        unsafe { vsubq_f32(self, b) }
    }

    /// (acc[0]+acc[2]) + (acc[1]+acc[3]), then `faddp` across lanes ((l0+l1)+(l2+l3)).
    #[inline(always)]
    unsafe fn reduce_sum(acc: [Self; ARR]) -> f32 {
        // SAFETY: as in `mul_add`.
        unsafe {
            vaddvq_f32(vaddq_f32(
                vaddq_f32(acc[0], acc[2]),
                vaddq_f32(acc[1], acc[3]),
            ))
        }
    }
}
/// The low 64-bit halves of `a` and `b`, as one vector of four f32.
#[inline(always)]
#[allow(unused_unsafe)]
fn trn1_f64(a: float32x4_t, b: float32x4_t) -> float32x4_t {
    // SAFETY: register shuffles only; NEON is enabled on every aarch64 target.
    unsafe {
        vreinterpretq_f32_f64(vtrn1q_f64(
            vreinterpretq_f64_f32(a),
            vreinterpretq_f64_f32(b),
        ))
    }
}

/// The high 64-bit halves of `a` and `b`, as one vector of four f32.
#[inline(always)]
#[allow(unused_unsafe)]
fn trn2_f64(a: float32x4_t, b: float32x4_t) -> float32x4_t {
    // SAFETY: as in `trn1_f64`.
    unsafe {
        vreinterpretq_f32_f64(vtrn2q_f64(
            vreinterpretq_f64_f32(a),
            vreinterpretq_f64_f32(b),
        ))
    }
}

/// ggml's f32 -> bf16 rounding on four lanes.
///
/// # Safety
/// None on aarch64 (NEON is baseline).
#[inline(always)]
#[allow(unused_unsafe)] // as in the `F32Vec` impl
unsafe fn f32_to_bf16x4(x: float32x4_t) -> uint16x4_t {
    // SAFETY: NEON is enabled on every aarch64 target; no memory is touched.
    unsafe {
        let u = vreinterpretq_u32_f32(x);
        let nan = vcgtq_u32(
            vandq_u32(u, vdupq_n_u32(0x7fff_ffff)),
            vdupq_n_u32(0x7f80_0000),
        );
        let hi = vshrq_n_u32::<16>(u);
        let quiet = vorrq_u32(hi, vdupq_n_u32(64));
        // u + 0x7fff + lsb cannot wrap for non-NaN u (max 0xff800000); NaN lanes are replaced.
        let bias = vaddq_u32(vandq_u32(hi, vdupq_n_u32(1)), vdupq_n_u32(0x7fff));
        let rounded = vshrq_n_u32::<16>(vaddq_u32(u, bias));
        // Every lane is <= 0xffff, so narrowing keeps the value.
        vmovn_u32(vbslq_u32(nan, quiet, rounded))
    }
}

/// Four rows × four channels: widened by `fcvtl` (exact) and transposed in registers, so each
/// store writes 4 keys of one channel.
struct PackNeon;

impl PackBlock for PackNeon {
    const W: usize = EPR;
    #[inline(always)]
    unsafe fn block(block: &[&[u16]], j: usize, panel: &mut [f32], g: usize) {
        let pp = panel.as_mut_ptr();
        // SAFETY: each load reads channels j..j+4 of a row that holds them, each store
        // panel[(j+c)·P + g ..+4] with g + 4 <= P, inside the panel.
        unsafe {
            let r0 = float32x4_t::load_f16(block[0].as_ptr().add(j));
            let r1 = float32x4_t::load_f16(block[1].as_ptr().add(j));
            let r2 = float32x4_t::load_f16(block[2].as_ptr().add(j));
            let r3 = float32x4_t::load_f16(block[3].as_ptr().add(j));
            // 2×2 blocks of pairs, then pairs of 64-bit halves: the 4×4 transpose
            let t0 = vtrn1q_f32(r0, r1);
            let t1 = vtrn2q_f32(r0, r1);
            let t2 = vtrn1q_f32(r2, r3);
            let t3 = vtrn2q_f32(r2, r3);
            let cols = [
                trn1_f64(t0, t2),
                trn1_f64(t1, t3),
                trn2_f64(t0, t2),
                trn2_f64(t1, t3),
            ];
            for (c, x) in cols.iter().enumerate() {
                vst1q_f32(pp.add((j + c) * QK_PANEL + g), *x);
            }
        }
    }
}
