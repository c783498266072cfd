//! NEON kernels (aarch64). NEON (ASIMD) is part of the aarch64 baseline, so [`table`] needs
//! no run-time check and always returns the table (memchr's `arch/aarch64` does the same).
//!
//! Same shape and fixed order as `avx2.rs` (ggml `vec.h`), with four f32 lanes per register:
//!
//! ```text
//! if n < EPR            -> scalar reference
//! np = n & !(STEP - 1)
//! for i in (0..np).step_by(STEP):  acc[j] = op(acc[j], x[i + j*EPR ..], ..)   j in 0..ARR
//! reduce: (acc[0]+acc[2]) + (acc[1]+acc[3]), then `faddp` across lanes ((l0+l1)+(l2+l3))
//! // leftovers: i in np..n, one element at a time, added onto the reduced sum
//! ```
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

use half::{bf16, f16};

use super::{scalar, Kernels, QkAt, QK_PANEL};

/// Elements per loop step (ggml `GGML_F32_STEP`).
const STEP: usize = 16;
/// Elements per register (ggml `GGML_F32_EPR`): four f32 lanes of a `float32x4_t`.
const EPR: usize = 4;
/// Independent registers per step (ggml `GGML_F32_ARR`).
const ARR: usize = STEP / EPR;

/// The NEON table. Always `Some`: NEON is mandatory on aarch64 and enabled by the
/// `aarch64-*` targets, so there is nothing to detect.
pub(crate) fn table() -> Option<&'static Kernels> {
    static T: Kernels = Kernels {
        name: "neon",
        dot_f32: dot_f32_neon,
        head_dots_f32: head_dots_f32_neon,
        qk_t_f32: qk_t_f32_neon,
        pack_keys_f16: pack_keys_f16_neon,
        softmax_acc: softmax_acc_neon,
        dot_f16: dot_f16_neon,
        sqdist_f32: sqdist_f32_neon,
        head_sqdists_f32: head_sqdists_f32_neon,
        axpy_f32: axpy_f32_neon,
        weighted_heads_f32: weighted_heads_f32_neon,
        f16_to_f32: f16_to_f32_neon,
        f32_to_f16: f32_to_f16_neon,
        bf16_to_f32: bf16_to_f32_neon,
        f32_to_bf16: f32_to_bf16_neon,
    };
    Some(&T)
}

////////////////////////////////// helpers //////////////////////////////////

/// Four f16 bit patterns at `p`, widened exactly to f32 with `fcvtl`.
///
/// # Safety
/// `p..p+4` is readable.
#[inline(always)]
unsafe fn load_f16x4(p: *const u16) -> float32x4_t {
    // SAFETY: the caller guarantees four readable u16 (vld1 has no alignment need); `fcvtl`
    // is base ARMv8 FP/SIMD, touches only the named registers and no memory or flags.
    unsafe {
        let h = vld1_u16(p);
        let r: float32x4_t;
        asm!("fcvtl {r:v}.4s, {h:v}.4h", r = lateout(vreg) r, h = in(vreg) h,
             options(pure, nomem, nostack, preserves_flags));
        r
    }
}

/// Four f32 narrowed to f16 bit patterns with `fcvtn` (rounding by FPCR, nearest even).
///
/// # Safety
/// None beyond running on aarch64; `unsafe` because it is inline asm.
#[inline(always)]
unsafe fn f32_to_f16x4(x: float32x4_t) -> uint16x4_t {
    let r: uint16x4_t;
    // SAFETY: `fcvtn` is base ARMv8 FP/SIMD and touches only the named registers.
    unsafe {
        asm!("fcvtn {r:v}.4h, {x:v}.4s", r = lateout(vreg) r, x = in(vreg) x,
             options(pure, nomem, nostack, preserves_flags));
    }
    r
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

/// The fixed-order reduction of the accumulators, see the module comment.
///
/// # Safety
/// None on aarch64 (NEON is baseline).
#[inline(always)]
// Register arithmetic only: the intrinsics are safe to call where NEON is enabled since
// Rust 1.87, but were `unsafe fn` before, so the block stays for older toolchains.
#[allow(unused_unsafe)]
unsafe fn reduce(acc: [float32x4_t; ARR]) -> f32 {
    // SAFETY: NEON is enabled on every aarch64 target; no memory is touched.
    unsafe {
        vaddvq_f32(vaddq_f32(
            vaddq_f32(acc[0], acc[2]),
            vaddq_f32(acc[1], acc[3]),
        ))
    }
}

/// ggml's f32 -> bf16 rounding on four lanes.
///
/// # Safety
/// None on aarch64 (NEON is baseline).
#[inline(always)]
#[allow(unused_unsafe)] // as in `reduce`
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

////////////////////////////////// kernels //////////////////////////////////

/// Σ a·b over `min(a.len(), b.len())` elements (the table's wrapper asserts equal lengths).
///
/// # Safety
/// None on aarch64: NEON is baseline. `unsafe` to fit the table slot.
#[target_feature(enable = "neon")]
#[inline]
pub(crate) unsafe fn dot_f32_neon(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    if n < EPR {
        // SAFETY: the scalar kernel has no precondition.
        return unsafe { scalar::dot_f32_scalar(&a[..n], &b[..n]) };
    }
    let np = n & !(STEP - 1);
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // SAFETY: every load reads i + j*EPR .. +EPR <= np <= n elements of both slices;
    // vld1 needs no alignment.
    let mut sumf = unsafe {
        let mut acc = [vdupq_n_f32(0.0); ARR];
        let mut i = 0;
        while i < np {
            for (j, s) in acc.iter_mut().enumerate() {
                let o = i + j * EPR;
                *s = vfmaq_f32(*s, vld1q_f32(pa.add(o)), vld1q_f32(pb.add(o)));
            }
            i += STEP;
        }
        reduce(acc)
    };
    // leftovers
    for i in np..n {
        sumf = a[i].mul_add(b[i], sumf);
    }
    sumf
}

/// [`scalar::head_dots_body`] on [`dot_f32_neon`], inlined under this entry's features.
///
/// # Safety
/// None on aarch64: NEON is baseline. `unsafe` to fit the table slot.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn head_dots_f32_neon(
    x: &[f32],
    y: &[f32],
    dk: usize,
    dot: &mut [f32],
    nx: &mut [f32],
) {
    // SAFETY: `dot_f32_neon` has no precondition on aarch64.
    scalar::head_dots_body(x, y, dk, dot, nx, |a, b| unsafe { dot_f32_neon(a, b) });
}

/// One block of `MQ` queries × `NV`·4 keys of [`qk_t_f32_neon`]: query rows `r0..`, panel
/// columns `ko..` (output columns `i0 + ko..`). The `MQ·NV` accumulators stay in registers
/// for the whole channel loop, so each key vector loaded serves `MQ` queries and nothing is
/// reduced horizontally.
///
/// # Safety
/// Rows `r0..r0+MQ` of `q` (`d` wide) exist, `panel` is one whole panel
/// (`QK_PANEL·d` floats), `ko + NV·4 <= QK_PANEL` and `out` has the cells
/// `(r0+a)·n + i0 + ko ..+NV·4`.
#[inline(always)]
unsafe fn qk_block<const MQ: usize, const NV: usize>(at: QkAt, out: &mut [f32]) {
    let (d, n, r0, i0, ko) = (at.d, at.n, at.r0, at.i0, at.ko);
    let (pq, pk, po) = (at.q.as_ptr(), at.panel.as_ptr(), out.as_mut_ptr());
    // SAFETY: every load reads panel[j·P + ko + v·4 ..+4] with
    // ko + NV·4 <= P, every q read one float of rows r0..r0+MQ, every store 4 floats of
    // out inside the caller's bounds; unaligned loads and stores are fine.
    unsafe {
        let mut acc = [[vdupq_n_f32(0.0); NV]; MQ];
        for j in 0..d {
            let mut k = [vdupq_n_f32(0.0); NV];
            for (v, kv) in k.iter_mut().enumerate() {
                *kv = vld1q_f32(pk.add(j * QK_PANEL + ko + v * EPR));
            }
            for (a, row) in acc.iter_mut().enumerate() {
                let qb = vdupq_n_f32(*pq.add((r0 + a) * d + j));
                for (s, kv) in row.iter_mut().zip(&k) {
                    *s = vfmaq_f32(*s, qb, *kv);
                }
            }
        }
        for (a, row) in acc.iter().enumerate() {
            for (v, s) in row.iter().enumerate() {
                vst1q_f32(po.add((r0 + a) * n + i0 + ko + v * EPR), *s);
            }
        }
    }
}

qk_blocks!(Neon, 4);

/// Queries against keys packed in panels (see [`Kernels::qk_t_f32`](super::Kernels::qk_t_f32)),
/// bit-identical to `qk_t_f32_scalar`: each lane runs the scalar's fused chain over the
/// channels. The loop is the shared [`super::qk_t_driver`] around this ISA's blocks.
///
/// # Safety
/// None on aarch64: NEON is baseline. `unsafe` to fit the table slot.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn qk_t_f32_neon(q: &[f32], d: usize, kt: &[f32], out: &mut [f32]) {
    // SAFETY: features enabled here; the table's wrapper checked the shapes.
    unsafe { super::qk_t_driver::<Neon>(q, d, kt, out) }
}

/// Four rows × four channels: widened by `fcvtl` (exact) and transposed in registers, so each
/// store writes 4 keys of one channel.
struct PackNeon;

impl super::PackBlock for PackNeon {
    const W: usize = EPR;
    #[inline(always)]
    unsafe fn block(block: &[&[u16]], j: usize, panel: &mut [f32], g: usize) {
        let pp = panel.as_mut_ptr();
        // SAFETY: each load reads channels j..j+4 of a row that holds them, each store
        // panel[(j+c)·P + g ..+4] with g + 4 <= P, inside the panel.
        unsafe {
            let r0 = load_f16x4(block[0].as_ptr().add(j));
            let r1 = load_f16x4(block[1].as_ptr().add(j));
            let r2 = load_f16x4(block[2].as_ptr().add(j));
            let r3 = load_f16x4(block[3].as_ptr().add(j));
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

/// f16 keys into one panel (see `pack_keys_f16_scalar`), bit-identical to it: the shared
/// [`super::pack_keys_f16_driver`] around 4×4 register blocks.
///
/// # Safety
/// None on aarch64: NEON is baseline. `unsafe` to fit the table slot.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn pack_keys_f16_neon(rows: &[&[u16]], panel: &mut [f32]) {
    // SAFETY: NEON enabled here; the table's wrapper checked the shapes.
    unsafe { super::pack_keys_f16_driver::<PackNeon>(rows, panel) }
}

/// `acc += softmax(kq_scale·logit + bias)`: the scalar table's code, here compiled for NEON,
/// four lanes per instruction; the same bits (no contraction to FMA).
///
/// # Safety
/// None on aarch64: NEON is baseline. `unsafe` to fit the table slot.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn softmax_acc_neon(
    logit: &mut [f32],
    kq_scale: f32,
    bias: Option<&[f32]>,
    acc: &mut [f32],
) {
    scalar::softmax_acc_body(logit, kq_scale, bias, acc);
}

/// Σ a·b over f16 bit patterns, each widened exactly, accumulated in f32.
///
/// # Safety
/// None on aarch64: NEON is baseline. `unsafe` to fit the table slot.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn dot_f16_neon(a: &[u16], b: &[u16]) -> f32 {
    let n = a.len().min(b.len());
    if n < EPR {
        // SAFETY: the scalar kernel has no precondition.
        return unsafe { scalar::dot_f16_scalar(&a[..n], &b[..n]) };
    }
    let np = n & !(STEP - 1);
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // SAFETY: as in `dot_f32_neon`, loads stay below np <= n.
    let mut sumf = unsafe {
        let mut acc = [vdupq_n_f32(0.0); ARR];
        let mut i = 0;
        while i < np {
            for (j, s) in acc.iter_mut().enumerate() {
                let o = i + j * EPR;
                *s = vfmaq_f32(*s, load_f16x4(pa.add(o)), load_f16x4(pb.add(o)));
            }
            i += STEP;
        }
        reduce(acc)
    };
    // leftovers
    for i in np..n {
        sumf = f16::from_bits(a[i])
            .to_f32()
            .mul_add(f16::from_bits(b[i]).to_f32(), sumf);
    }
    sumf
}

/// Σ (a−b)².
///
/// # Safety
/// None on aarch64: NEON is baseline. `unsafe` to fit the table slot.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn sqdist_f32_neon(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    if n < EPR {
        // SAFETY: the scalar kernel has no precondition.
        return unsafe { scalar::sqdist_f32_scalar(&a[..n], &b[..n]) };
    }
    let np = n & !(STEP - 1);
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // SAFETY: as in `dot_f32_neon`, loads stay below np <= n.
    let mut sumf = unsafe {
        let mut acc = [vdupq_n_f32(0.0); ARR];
        let mut i = 0;
        while i < np {
            for (j, s) in acc.iter_mut().enumerate() {
                let o = i + j * EPR;
                let d = vsubq_f32(vld1q_f32(pa.add(o)), vld1q_f32(pb.add(o)));
                *s = vfmaq_f32(*s, d, d);
            }
            i += STEP;
        }
        reduce(acc)
    };
    // leftovers
    for i in np..n {
        let d = a[i] - b[i];
        sumf = d.mul_add(d, sumf);
    }
    sumf
}

/// y += a·x, one fused multiply-add per element (bit-identical to the scalar kernel).
///
/// # Safety
/// None on aarch64: NEON is baseline. `unsafe` to fit the table slot.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn axpy_f32_neon(y: &mut [f32], a: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    if n < EPR {
        // SAFETY: the scalar kernel has no precondition.
        return unsafe { scalar::axpy_f32_scalar(&mut y[..n], a, &x[..n]) };
    }
    let np = n & !(STEP - 1);
    let (py, px) = (y.as_mut_ptr(), x.as_ptr());
    // SAFETY: every access is i + j*EPR .. +EPR <= np <= n elements into `y` (exclusively
    // borrowed) or `x`; vld1/vst1 need no alignment.
    unsafe {
        let va = vdupq_n_f32(a);
        let mut i = 0;
        while i < np {
            for j in 0..ARR {
                let o = i + j * EPR;
                let r = vfmaq_f32(vld1q_f32(py.add(o)), va, vld1q_f32(px.add(o)));
                vst1q_f32(py.add(o), r);
            }
            i += STEP;
        }
    }
    // leftovers
    for i in np..n {
        y[i] = a.mul_add(x[i], y[i]);
    }
}

/// f16 bit patterns to f32, exact (`fcvtl`).
///
/// # Safety
/// None on aarch64: NEON is baseline. `unsafe` to fit the table slot.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn f16_to_f32_neon(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    if n < EPR {
        // SAFETY: the scalar kernel has no precondition.
        return unsafe { scalar::f16_to_f32_scalar(&src[..n], &mut dst[..n]) };
    }
    let np = n & !(STEP - 1);
    let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
    // SAFETY: reads of `src` and writes of `dst` (exclusively borrowed) stay below np <= n.
    unsafe {
        let mut i = 0;
        while i < np {
            for j in 0..ARR {
                let o = i + j * EPR;
                vst1q_f32(pd.add(o), load_f16x4(ps.add(o)));
            }
            i += STEP;
        }
    }
    // leftovers
    for i in np..n {
        dst[i] = f16::from_bits(src[i]).to_f32();
    }
}

/// f32 to f16 bit patterns, round to nearest even (`fcvtn` under the default FPCR); equal to
/// `half::f16::from_f32` for every non-NaN input.
///
/// # Safety
/// None on aarch64: NEON is baseline. `unsafe` to fit the table slot.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn f32_to_f16_neon(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    if n < EPR {
        // SAFETY: the scalar kernel has no precondition.
        return unsafe { scalar::f32_to_f16_scalar(&src[..n], &mut dst[..n]) };
    }
    let np = n & !(STEP - 1);
    let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
    // SAFETY: reads of `src` and writes of `dst` (exclusively borrowed) stay below np <= n.
    unsafe {
        let mut i = 0;
        while i < np {
            for j in 0..ARR {
                let o = i + j * EPR;
                vst1_u16(pd.add(o), f32_to_f16x4(vld1q_f32(ps.add(o))));
            }
            i += STEP;
        }
    }
    // leftovers
    for i in np..n {
        dst[i] = f16::from_f32(src[i]).to_bits();
    }
}

/// bf16 bit patterns to f32, exact: the 16 bits become the high half of the f32. A NaN also
/// gets its quiet bit set, as `half::bf16::to_f32` (the scalar reference) does; ggml's plain
/// shift would keep a signalling NaN signalling.
///
/// # Safety
/// None on aarch64: NEON is baseline. `unsafe` to fit the table slot.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn bf16_to_f32_neon(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    if n < EPR {
        // SAFETY: the scalar kernel has no precondition.
        return unsafe { scalar::bf16_to_f32_scalar(&src[..n], &mut dst[..n]) };
    }
    let np = n & !(STEP - 1);
    let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
    // SAFETY: reads of `src` and writes of `dst` (exclusively borrowed) stay below np <= n.
    unsafe {
        let mut i = 0;
        while i < np {
            for j in 0..ARR {
                let o = i + j * EPR;
                let w = vmovl_u16(vld1_u16(ps.add(o)));
                let nan = vcgtq_u32(vandq_u32(w, vdupq_n_u32(0x7fff)), vdupq_n_u32(0x7f80));
                let w = vorrq_u32(w, vandq_u32(nan, vdupq_n_u32(0x40)));
                vst1q_f32(pd.add(o), vreinterpretq_f32_u32(vshlq_n_u32::<16>(w)));
            }
            i += STEP;
        }
    }
    // leftovers
    for i in np..n {
        dst[i] = bf16::from_bits(src[i]).to_f32();
    }
}

/// f32 to bf16 with ggml's rounding (nearest even, NaN made quiet); bit-identical to
/// `scalar::f32_to_bf16_one` for every input.
///
/// # Safety
/// None on aarch64: NEON is baseline. `unsafe` to fit the table slot.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn f32_to_bf16_neon(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    if n < EPR {
        // SAFETY: the scalar kernel has no precondition.
        return unsafe { scalar::f32_to_bf16_scalar(&src[..n], &mut dst[..n]) };
    }
    let np = n & !(STEP - 1);
    let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
    // SAFETY: reads of `src` and writes of `dst` (exclusively borrowed) stay below np <= n.
    unsafe {
        let mut i = 0;
        while i < np {
            for j in 0..ARR {
                let o = i + j * EPR;
                vst1_u16(pd.add(o), f32_to_bf16x4(vld1q_f32(ps.add(o))));
            }
            i += STEP;
        }
    }
    // leftovers
    for i in np..n {
        dst[i] = scalar::f32_to_bf16_one(src[i]);
    }
}

/// [`scalar::weighted_heads_body`] on [`axpy_f32_neon`], inlined under this entry's features.
///
/// # Safety
/// The CPU supports NEON (the aarch64 baseline).
#[target_feature(enable = "neon")]
pub(crate) unsafe fn weighted_heads_f32_neon(rows: &[f32], d: usize, w: &[f32], out: &mut [f32]) {
    // SAFETY: the caller guarantees the features `axpy_f32_neon` needs.
    scalar::weighted_heads_body(rows, d, w, out, |y, a, x| unsafe { axpy_f32_neon(y, a, x) });
}

/// [`scalar::head_sqdists_body`] on [`sqdist_f32_neon`], inlined under this entry's features.
///
/// # Safety
/// The CPU supports NEON (the aarch64 baseline).
#[target_feature(enable = "neon")]
pub(crate) unsafe fn head_sqdists_f32_neon(
    rows: &[f32],
    width: usize,
    d: usize,
    jp: usize,
    d2: &mut [f32],
) {
    // SAFETY: the caller guarantees the features `sqdist_f32_neon` needs.
    scalar::head_sqdists_body(rows, width, d, jp, d2, |a, b| unsafe {
        sqdist_f32_neon(a, b)
    });
}
