//! The row codec: ggml element formats to and from f32, one contiguous run at a time.
//!
//! [`GgmlType`] names the formats we read and write; [`decode`] and [`encode`] turn a run of
//! them into f32 and back, f16/bf16 through the chosen SIMD table ([`Kernels`]) and the block
//! formats through [`crate::quant`]. A row read is `layout::rows` (which bytes) → here (what
//! they mean) → the kernels; nothing here knows about views, cells or heads.

use crate::quant;
use crate::simd::Kernels;

/// The ggml types we read and write, with ggml's ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q8_0,
    BF16,
}

impl GgmlType {
    pub fn from_id(id: i32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    pub fn id(self) -> i32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
        }
    }

    /// Elements per block (ggml `blck_size`).
    pub fn block(self) -> usize {
        match self {
            GgmlType::Q4_0 | GgmlType::Q8_0 => quant::QK,
            _ => 1,
        }
    }

    /// Bytes per block (ggml `type_size`).
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => quant::Q4_0_BYTES,
            GgmlType::Q8_0 => quant::Q8_0_BYTES,
        }
    }

    /// Largest magnitude an element of this type holds; the encoder writes ±inf (or, for the
    /// block types, an infinite block scale) beyond it. The block types' limit is their
    /// largest quantum times the largest f16 scale.
    pub fn max_finite(self) -> f32 {
        const F16_MAX: f32 = 65504.0;
        match self {
            GgmlType::F32 => f32::MAX,
            GgmlType::F16 => F16_MAX,
            GgmlType::BF16 => f32::from_bits(0x7f7f_0000),
            GgmlType::Q8_0 => 127.0 * F16_MAX,
            GgmlType::Q4_0 => 8.0 * F16_MAX,
        }
    }

    /// Alignment the element reads need (the f16 scale of a block needs only 2, and we read it
    /// byte-wise anyway, but ggml buffers always give 2).
    pub(crate) fn align(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            _ => 2,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block() > 1
    }

    /// Bytes of `n` consecutive elements (`n` a multiple of the block), for sizes inside a
    /// validated view (which [`GgmlType::checked_row_size`] has bounded).
    pub fn row_size(self, n: usize) -> usize {
        n / self.block() * self.type_size()
    }

    /// [`GgmlType::row_size`], or `None` when the byte count does not fit a `usize`: a host's
    /// `ne[0]` must not wrap to a small row that then passes every other check.
    pub fn checked_row_size(self, n: usize) -> Option<usize> {
        (n / self.block()).checked_mul(self.type_size())
    }
}

pub(crate) fn as_u16(b: &[u8]) -> &[u16] {
    // SAFETY: u16 has no invalid bit patterns; validation made the data pointer and every
    // stride 2-aligned for 16-bit types, which `align_to` re-checks (prefix must be empty).
    let (pre, mid, post) = unsafe { b.align_to::<u16>() };
    assert!(pre.is_empty() && post.is_empty(), "misaligned 16-bit row");
    mid
}

fn as_u16_mut(b: &mut [u8]) -> &mut [u16] {
    // SAFETY: as in `as_u16`.
    let (pre, mid, post) = unsafe { b.align_to_mut::<u16>() };
    assert!(pre.is_empty() && post.is_empty(), "misaligned 16-bit row");
    mid
}

/// Decodes `out.len()` contiguous elements of type `ty` from `b`.
pub fn decode(kern: &Kernels, ty: GgmlType, b: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => kern.f16_to_f32(as_u16(b), out),
        GgmlType::BF16 => kern.bf16_to_f32(as_u16(b), out),
        GgmlType::Q8_0 => quant::dequant_q8_0(b, out),
        GgmlType::Q4_0 => quant::dequant_q4_0(b, out),
    }
}

/// Encodes `src` into contiguous elements of type `ty` in `b`.
pub fn encode(kern: &Kernels, ty: GgmlType, src: &[f32], b: &mut [u8]) {
    match ty {
        GgmlType::F32 => {
            for (c, s) in b.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&s.to_le_bytes());
            }
        }
        GgmlType::F16 => kern.f32_to_f16(src, as_u16_mut(b)),
        GgmlType::BF16 => kern.f32_to_bf16(src, as_u16_mut(b)),
        GgmlType::Q8_0 => quant::quant_q8_0(src, b),
        GgmlType::Q4_0 => quant::quant_q4_0(src, b),
    }
}
