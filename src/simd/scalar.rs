//! Scalar reference kernels: written for clarity, always compiled, the yardstick of the
//! property tests. Accumulation order: one f32 accumulator, front to back.
//!
//! They are `unsafe fn` only so that they fit the same table slots as the ISA kernels; none
//! of them has a safety precondition.

use half::{bf16, f16};

use super::QK_PANEL;

/// Σ a·b, front to back.
pub(crate) unsafe fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0f32, |s, (x, y)| x.mul_add(*y, s))
}

/// Queries against keys packed in panels (see [`Kernels::qk_t_f32`](super::Kernels::qk_t_f32)):
/// each output is one fused multiply-add chain over the channels, front to back; the ISA
/// kernels run the same chain in each lane, so every table gives the same bits.
pub(crate) unsafe fn qk_t_f32_scalar(q: &[f32], d: usize, kt: &[f32], out: &mut [f32]) {
    // `d`, `m` and `n` are non-zero and `kt` holds every panel: the table's wrapper checked.
    let n = out.len() / (q.len() / d);
    for (qr, o) in q.chunks_exact(d).zip(out.chunks_exact_mut(n)) {
        for (oc, panel) in o.chunks_mut(QK_PANEL).zip(kt.chunks_exact(QK_PANEL * d)) {
            oc.fill(0.0);
            for (&qj, kr) in qr.iter().zip(panel.chunks_exact(QK_PANEL)) {
                for (oi, &k) in oc.iter_mut().zip(kr) {
                    *oi = qj.mul_add(k, *oi);
                }
            }
        }
    }
}

/// Σ a·b over f16 bit patterns, each widened exactly to f32.
pub(crate) unsafe fn dot_f16_scalar(a: &[u16], b: &[u16]) -> f32 {
    a.iter().zip(b).fold(0.0f32, |s, (x, y)| {
        f16::from_bits(*x)
            .to_f32()
            .mul_add(f16::from_bits(*y).to_f32(), s)
    })
}

/// Σ (a−b)², front to back.
pub(crate) unsafe fn sqdist_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0f32, |s, (x, y)| {
        let d = x - y;
        d.mul_add(d, s)
    })
}

/// y += a·x.
pub(crate) unsafe fn axpy_f32_scalar(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = a.mul_add(*xi, *yi);
    }
}

pub(crate) unsafe fn f16_to_f32_scalar(src: &[u16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f16::from_bits(*s).to_f32();
    }
}

/// Round to nearest even, like F16C's `vcvtps2ph` with imm 0 and ggml's software path.
pub(crate) unsafe fn f32_to_f16_scalar(src: &[f32], dst: &mut [u16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f16::from_f32(*s).to_bits();
    }
}

pub(crate) unsafe fn bf16_to_f32_scalar(src: &[u16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16::from_bits(*s).to_f32();
    }
}

/// ggml's `ggml_compute_fp32_to_bf16`: NaN keeps its sign and high payload and is made quiet;
/// everything else rounds to nearest even (subnormals included, no flush).
pub(crate) unsafe fn f32_to_bf16_scalar(src: &[f32], dst: &mut [u16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32_to_bf16_one(*s);
    }
}

#[inline]
pub(crate) fn f32_to_bf16_one(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}
