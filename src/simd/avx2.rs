//! AVX2 + FMA + F16C kernels (x86_64), selected at run time by [`table`].
//!
//! Every kernel has ggml's shape (`ggml-cpu/vec.h`, `simd-mappings.h`):
//!
//! ```text
//! if n < EPR            -> scalar reference (shorter than one vector)
//! np = n & !(STEP - 1)
//! for i in (0..np).step_by(STEP):      ARR independent registers of EPR lanes
//!     acc[j] = op(acc[j], x[i + j*EPR ..], y[i + j*EPR ..])   j in 0..ARR
//! reduce: acc[0]+acc[2], acc[1]+acc[3], then the two sums, then the 8 lanes
//!         (hi128+lo128, then lanes 0+2 / 1+3, then the last pair)
//! // leftovers: i in np..n, one element at a time, added onto the reduced sum
//! ```
//!
//! The order is fixed, so a reduction's result depends only on its inputs. Element-wise
//! kernels (axpy, conversions) are bit-identical to `scalar.rs` (both use fused multiply-add;
//! F16C rounds to nearest even like `half`; bf16 uses ggml's integer rounding and, like
//! `half`, quiets NaNs when widening).
//!
//! Only the entry functions carry `#[target_feature]`; helpers are `#[inline(always)]` so they
//! are inlined into an entry function and compiled with its features (memchr's `Vector`).

#![deny(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::{scalar, Kernels, QkAt, QK_PANEL};

/// Elements per loop step (ggml `GGML_F32_STEP`).
const STEP: usize = 32;
/// Elements per register (ggml `GGML_F32_EPR`): eight f32 lanes of a `__m256`.
const EPR: usize = 8;
/// Independent registers per step (ggml `GGML_F32_ARR`).
const ARR: usize = STEP / EPR;

/// The AVX2 table, or `None` when the CPU lacks AVX2, FMA or F16C (each checked separately,
/// like ggml's `cpu-feats.cpp`). CPUID is cached by std, and [`super::kernels`] calls this once.
pub(crate) fn table() -> Option<&'static Kernels> {
    static T: Kernels = Kernels {
        name: "avx2",
        dot_f32: dot_f32_avx2,
        head_dots_f32: head_dots_f32_avx2,
        qk_t_f32: qk_t_f32_avx2,
        pack_keys_f16: pack_keys_f16_avx2,
        softmax_acc: softmax_acc_avx2,
        dot_f16: dot_f16_avx2,
        sqdist_f32: sqdist_f32_avx2,
        head_sqdists_f32: head_sqdists_f32_avx2,
        axpy_f32: axpy_f32_avx2,
        weighted_heads_f32: weighted_heads_f32_avx2,
        f16_to_f32: f16_to_f32_avx2,
        f32_to_f16: f32_to_f16_avx2,
        bf16_to_f32: bf16_to_f32_avx2,
        f32_to_bf16: f32_to_bf16_avx2,
    };
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        Some(&T)
    } else {
        None
    }
}

////////////////////////////////// helpers //////////////////////////////////

/// Eight f16 bit patterns at `p`, widened exactly to f32.
///
/// # Safety
/// The CPU supports AVX and F16C, and `p..p+8` is readable.
#[inline(always)]
unsafe fn load_f16x8(p: *const u16) -> __m256 {
    // SAFETY: the caller guarantees F16C and eight readable u16; loadu has no alignment need.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
}

/// The fixed-order reduction of the accumulators, see the module comment.
///
/// # Safety
/// The CPU supports AVX.
#[inline(always)]
// Pure register arithmetic: the block is needed only when AVX is not enabled for the whole
// crate (it is under `-C target-feature=+avx2`, where it would otherwise warn).
#[allow(unused_unsafe)]
unsafe fn reduce(acc: [__m256; ARR]) -> f32 {
    // SAFETY: the caller guarantees AVX; no memory is touched.
    unsafe {
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
        let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)))
    }
}

/// ggml's f32 -> bf16 rounding on eight lanes, packed to eight u16 in order.
///
/// # Safety
/// The CPU supports AVX2.
#[inline(always)]
#[allow(unused_unsafe)] // as in `reduce`
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

////////////////////////////////// kernels //////////////////////////////////

/// Σ a·b over `min(a.len(), b.len())` elements (the table's wrapper asserts equal lengths).
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    if n < EPR {
        // SAFETY: the scalar kernel has no precondition.
        return unsafe { scalar::dot_f32_scalar(&a[..n], &b[..n]) };
    }
    let np = n & !(STEP - 1);
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // SAFETY: the caller guarantees the features; every load reads i + j*EPR .. +EPR <= np <= n
    // elements of both slices, and loadu needs no alignment.
    let mut sumf = unsafe {
        let mut acc = [_mm256_setzero_ps(); ARR];
        let mut i = 0;
        while i < np {
            for (j, s) in acc.iter_mut().enumerate() {
                let o = i + j * EPR;
                *s = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *s);
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

/// [`scalar::head_dots_body`]'s results with both dots of a head in one loop: each keeps
/// `dot_f32_avx2`'s accumulators, reduction and leftovers, so the bits are the same, but the
/// two chains of fused multiply-adds overlap instead of waiting on each other.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn head_dots_f32_avx2(
    x: &[f32],
    y: &[f32],
    dk: usize,
    dot: &mut [f32],
    nx: &mut [f32],
) {
    if dk < EPR {
        // SAFETY: the caller guarantees the features `dot_f32_avx2` needs.
        scalar::head_dots_body(x, y, dk, dot, nx, |a, b| unsafe { dot_f32_avx2(a, b) });
        return;
    }
    let np = dk & !(STEP - 1);
    for (h, (d, n)) in dot.iter_mut().zip(nx.iter_mut()).enumerate() {
        let (xh, yh) = (&x[h * dk..(h + 1) * dk], &y[h * dk..(h + 1) * dk]);
        let (px, py) = (xh.as_ptr(), yh.as_ptr());
        // SAFETY: features by the caller; every load reads i + j*EPR .. +EPR <= np <= dk
        // elements of the head, unaligned.
        let (mut sd, mut sn) = unsafe {
            let mut ad = [_mm256_setzero_ps(); ARR];
            let mut an = [_mm256_setzero_ps(); ARR];
            let mut i = 0;
            while i < np {
                for j in 0..ARR {
                    let o = i + j * EPR;
                    let vx = _mm256_loadu_ps(px.add(o));
                    ad[j] = _mm256_fmadd_ps(vx, _mm256_loadu_ps(py.add(o)), ad[j]);
                    an[j] = _mm256_fmadd_ps(vx, vx, an[j]);
                }
                i += STEP;
            }
            (reduce(ad), reduce(an))
        };
        // leftovers
        for i in np..dk {
            sd = xh[i].mul_add(yh[i], sd);
            sn = xh[i].mul_add(xh[i], sn);
        }
        *d = sd;
        *n = sn;
    }
}

/// One block of `MQ` queries × `NV`·8 keys of [`qk_t_f32_avx2`]: query rows `r0..`, panel
/// columns `ko..` (output columns `i0 + ko..`). The `MQ·NV` accumulators stay in registers
/// for the whole channel loop, so each key vector loaded serves `MQ` queries and nothing is
/// reduced horizontally.
///
/// # Safety
/// The CPU supports AVX2 and FMA; rows `r0..r0+MQ` of `q` (`d` wide) exist, `panel` is one
/// whole panel (`QK_PANEL·d` floats), `ko + NV·8 <= QK_PANEL` and `out` has the cells
/// `(r0+a)·n + i0 + ko ..+NV·8`.
#[inline(always)]
unsafe fn qk_block<const MQ: usize, const NV: usize>(at: QkAt, out: &mut [f32]) {
    let (d, n, r0, i0, ko) = (at.d, at.n, at.r0, at.i0, at.ko);
    let (pq, pk, po) = (at.q.as_ptr(), at.panel.as_ptr(), out.as_mut_ptr());
    // SAFETY: features by the caller; every load reads panel[j·P + ko + v·8 ..+8] with
    // ko + NV·8 <= P, every q read one float of rows r0..r0+MQ, every store 8 floats of
    // out inside the caller's bounds; unaligned loads and stores are fine.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); NV]; MQ];
        for j in 0..d {
            let mut k = [_mm256_setzero_ps(); NV];
            for (v, kv) in k.iter_mut().enumerate() {
                *kv = _mm256_loadu_ps(pk.add(j * QK_PANEL + ko + v * EPR));
            }
            for (a, row) in acc.iter_mut().enumerate() {
                let qb = _mm256_broadcast_ss(&*pq.add((r0 + a) * d + j));
                for (s, kv) in row.iter_mut().zip(&k) {
                    *s = _mm256_fmadd_ps(qb, *kv, *s);
                }
            }
        }
        for (a, row) in acc.iter().enumerate() {
            for (v, s) in row.iter().enumerate() {
                _mm256_storeu_ps(po.add((r0 + a) * n + i0 + ko + v * EPR), *s);
            }
        }
    }
}

qk_blocks!(Avx2, 2);

/// Queries against keys packed in panels (see [`Kernels::qk_t_f32`](super::Kernels::qk_t_f32)),
/// bit-identical to `qk_t_f32_scalar`: each lane runs the scalar's fused chain over the
/// channels. The loop is the shared [`super::qk_t_driver`] around this ISA's blocks.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn qk_t_f32_avx2(q: &[f32], d: usize, kt: &[f32], out: &mut [f32]) {
    // SAFETY: features enabled here; the table's wrapper checked the shapes.
    unsafe { super::qk_t_driver::<Avx2>(q, d, kt, out) }
}

/// Eight rows × eight channels: widened by F16C (exact, like `half`) and transposed in
/// registers, so each store writes 8 keys of one channel.
struct PackAvx2;

impl super::PackBlock for PackAvx2 {
    const W: usize = EPR;
    #[inline(always)]
    unsafe fn block(block: &[&[u16]], j: usize, panel: &mut [f32], g: usize) {
        let pp = panel.as_mut_ptr();
        // SAFETY: features by the caller; each load reads channels j..j+8 of a row that holds
        // them, each store panel[(j+c)·P + g ..+8] with g + 8 <= P, inside the panel.
        unsafe {
            let mut v = [_mm256_setzero_ps(); EPR];
            for (x, r) in v.iter_mut().zip(block) {
                *x = load_f16x8(r.as_ptr().add(j));
            }
            for (c, x) in transpose8(v).iter().enumerate() {
                _mm256_storeu_ps(pp.add((j + c) * QK_PANEL + g), *x);
            }
        }
    }
}

/// f16 keys into one panel (see `pack_keys_f16_scalar`), bit-identical to it: the shared
/// [`super::pack_keys_f16_driver`] around 8×8 register blocks.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn pack_keys_f16_avx2(rows: &[&[u16]], panel: &mut [f32]) {
    // SAFETY: features enabled here; the table's wrapper checked the shapes.
    unsafe { super::pack_keys_f16_driver::<PackAvx2>(rows, panel) }
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

/// `acc += softmax(kq_scale·logit + bias)`: the scalar table's code, compiled here with AVX2,
/// where each pass runs eight lanes per instruction; the same bits (no contraction to FMA).
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn softmax_acc_avx2(
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
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f16_avx2(a: &[u16], b: &[u16]) -> f32 {
    let n = a.len().min(b.len());
    if n < EPR {
        // SAFETY: the scalar kernel has no precondition.
        return unsafe { scalar::dot_f16_scalar(&a[..n], &b[..n]) };
    }
    let np = n & !(STEP - 1);
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // SAFETY: as in `dot_f32_avx2`: features guaranteed, loads stay below np <= n.
    let mut sumf = unsafe {
        let mut acc = [_mm256_setzero_ps(); ARR];
        let mut i = 0;
        while i < np {
            for (j, s) in acc.iter_mut().enumerate() {
                let o = i + j * EPR;
                *s = _mm256_fmadd_ps(load_f16x8(pa.add(o)), load_f16x8(pb.add(o)), *s);
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
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn sqdist_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    if n < EPR {
        // SAFETY: the scalar kernel has no precondition.
        return unsafe { scalar::sqdist_f32_scalar(&a[..n], &b[..n]) };
    }
    let np = n & !(STEP - 1);
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // SAFETY: as in `dot_f32_avx2`: features guaranteed, loads stay below np <= n.
    let mut sumf = unsafe {
        let mut acc = [_mm256_setzero_ps(); ARR];
        let mut i = 0;
        while i < np {
            for (j, s) in acc.iter_mut().enumerate() {
                let o = i + j * EPR;
                let d = _mm256_sub_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)));
                *s = _mm256_fmadd_ps(d, d, *s);
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
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn axpy_f32_avx2(y: &mut [f32], a: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    if n < EPR {
        // SAFETY: the scalar kernel has no precondition.
        return unsafe { scalar::axpy_f32_scalar(&mut y[..n], a, &x[..n]) };
    }
    let np = n & !(STEP - 1);
    let (py, px) = (y.as_mut_ptr(), x.as_ptr());
    // SAFETY: features guaranteed; every access is i + j*EPR .. +EPR <= np <= n elements into
    // `y` (exclusively borrowed) or `x`, unaligned loads/stores.
    unsafe {
        let va = _mm256_set1_ps(a);
        let mut i = 0;
        while i < np {
            for j in 0..ARR {
                let o = i + j * EPR;
                let r = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(o)), _mm256_loadu_ps(py.add(o)));
                _mm256_storeu_ps(py.add(o), r);
            }
            i += STEP;
        }
    }
    // leftovers
    for i in np..n {
        y[i] = a.mul_add(x[i], y[i]);
    }
}

/// [`scalar::weighted_heads_body`]'s results with each block of 32 outputs kept in registers
/// over all members: the same fused multiply-add per element and member, in member order from
/// zero, as `axpy_f32_avx2` on a zeroed `out` (bit-identical), without loading and storing
/// `out` once per member.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn weighted_heads_f32_avx2(rows: &[f32], d: usize, w: &[f32], out: &mut [f32]) {
    let width = out.len();
    let n_head = width / d;
    let m = w.len() / n_head;
    if d < EPR {
        // SAFETY: the caller guarantees the features `axpy_f32_avx2` needs.
        scalar::weighted_heads_body(rows, d, w, out, |y, a, x| unsafe { axpy_f32_avx2(y, a, x) });
        return;
    }
    let np = d & !(STEP - 1);
    let (pr, po) = (rows.as_ptr(), out.as_mut_ptr());
    for h in 0..n_head {
        let wh = &w[h * m..(h + 1) * m];
        // SAFETY: features by the caller; loads read row j's head h at i + k*EPR .. +EPR <=
        // np <= d (rows holds m rows of `width`, the wrapper checked), stores write `out`'s
        // head h likewise; unaligned.
        unsafe {
            let mut i = 0;
            while i < np {
                let mut acc = [_mm256_setzero_ps(); ARR];
                for (j, &wj) in wh.iter().enumerate() {
                    let vw = _mm256_set1_ps(wj);
                    let src = pr.add(j * width + h * d + i);
                    for (k, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(vw, _mm256_loadu_ps(src.add(k * EPR)), *a);
                    }
                }
                for (k, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(po.add(h * d + i + k * EPR), *a);
                }
                i += STEP;
            }
        }
        // leftovers
        for i in np..d {
            let mut s = 0f32;
            for (j, &wj) in wh.iter().enumerate() {
                s = wj.mul_add(rows[j * width + h * d + i], s);
            }
            out[h * d + i] = s;
        }
    }
}

/// [`scalar::head_sqdists_body`] on [`sqdist_f32_avx2`], inlined under this entry's features.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn head_sqdists_f32_avx2(
    rows: &[f32],
    width: usize,
    d: usize,
    jp: usize,
    d2: &mut [f32],
) {
    // SAFETY: the caller guarantees the features `sqdist_f32_avx2` needs.
    scalar::head_sqdists_body(rows, width, d, jp, d2, |a, b| unsafe {
        sqdist_f32_avx2(a, b)
    });
}

/// f16 bit patterns to f32, exact (`vcvtph2ps`; a signalling NaN comes out quiet, as in `half`).
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f16_to_f32_avx2(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    if n < EPR {
        // SAFETY: the scalar kernel has no precondition.
        return unsafe { scalar::f16_to_f32_scalar(&src[..n], &mut dst[..n]) };
    }
    let np = n & !(STEP - 1);
    let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
    // SAFETY: features guaranteed; reads of `src` and writes of `dst` (exclusively borrowed)
    // stay below np <= n, unaligned.
    unsafe {
        let mut i = 0;
        while i < np {
            for j in 0..ARR {
                let o = i + j * EPR;
                _mm256_storeu_ps(pd.add(o), load_f16x8(ps.add(o)));
            }
            i += STEP;
        }
    }
    // leftovers
    for i in np..n {
        dst[i] = f16::from_bits(src[i]).to_f32();
    }
}

/// f32 to f16 bit patterns, round to nearest even (`vcvtps2ph` imm 0, as ggml's
/// `GGML_CPU_FP32_TO_FP16`); equal to `half::f16::from_f32` for every non-NaN input.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f32_to_f16_avx2(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    if n < EPR {
        // SAFETY: the scalar kernel has no precondition.
        return unsafe { scalar::f32_to_f16_scalar(&src[..n], &mut dst[..n]) };
    }
    let np = n & !(STEP - 1);
    let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
    // SAFETY: features guaranteed; reads of `src` and writes of `dst` (exclusively borrowed)
    // stay below np <= n, unaligned.
    unsafe {
        let mut i = 0;
        while i < np {
            for j in 0..ARR {
                let o = i + j * EPR;
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(ps.add(o)));
                _mm_storeu_si128(pd.add(o).cast(), h);
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
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn bf16_to_f32_avx2(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    if n < EPR {
        // SAFETY: the scalar kernel has no precondition.
        return unsafe { scalar::bf16_to_f32_scalar(&src[..n], &mut dst[..n]) };
    }
    let np = n & !(STEP - 1);
    let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
    // SAFETY: features guaranteed; reads of `src` and writes of `dst` (exclusively borrowed)
    // stay below np <= n, unaligned.
    unsafe {
        let mut i = 0;
        while i < np {
            for j in 0..ARR {
                let o = i + j * EPR;
                let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(ps.add(o).cast()));
                let abs = _mm256_and_si256(w, _mm256_set1_epi32(0x7fff));
                let nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f80));
                let w = _mm256_or_si256(w, _mm256_and_si256(nan, _mm256_set1_epi32(0x40)));
                _mm256_storeu_ps(pd.add(o), _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w)));
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
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f32_to_bf16_avx2(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    if n < EPR {
        // SAFETY: the scalar kernel has no precondition.
        return unsafe { scalar::f32_to_bf16_scalar(&src[..n], &mut dst[..n]) };
    }
    let np = n & !(STEP - 1);
    let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
    // SAFETY: features guaranteed; reads of `src` and writes of `dst` (exclusively borrowed)
    // stay below np <= n, unaligned.
    unsafe {
        let mut i = 0;
        while i < np {
            for j in 0..ARR {
                let o = i + j * EPR;
                let h = f32_to_bf16x8(_mm256_loadu_ps(ps.add(o)));
                _mm_storeu_si128(pd.add(o).cast(), h);
            }
            i += STEP;
        }
    }
    // leftovers
    for i in np..n {
        dst[i] = scalar::f32_to_bf16_one(src[i]);
    }
}
