//! Scalar reference kernels: written for clarity, always compiled, the yardstick of the
//! property tests. Accumulation order: one f32 accumulator, front to back.
//!
//! They are `unsafe fn` only so that they fit the same table slots as the ISA kernels; none
//! of them has a safety precondition.

use half::{bf16, f16};

/// Σ a·b, front to back.
pub(crate) unsafe fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0f32, |s, (x, y)| x.mul_add(*y, s))
}

/// `out[i] = q · rows[i·d .. (i+1)·d]`, `d = q.len()`: `dot_f32_scalar` row by row.
pub(crate) unsafe fn dots_f32_scalar(q: &[f32], rows: &[f32], out: &mut [f32]) {
    // `q` is non-empty: the table's wrapper answers empty rows itself.
    for (o, r) in out.iter_mut().zip(rows.chunks_exact(q.len())) {
        // SAFETY: no precondition.
        *o = unsafe { dot_f32_scalar(q, r) };
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
