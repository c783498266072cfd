//! ggml's block formats q8_0 and q4_0, following ggml's reference (`*_ref`) routines bit for
//! bit, so that a row we re-quantize is the row llama.cpp itself would have written.
//!
//! q8_0: 32 values as `f16 d` + 32 × i8, `x = d·q`, `d = max|x| / 127`, `q = round(x/d)`.
//! q4_0: 32 values as `f16 d` + 16 bytes of nibbles, `x = d·(q − 8)`, with `d = m / −8` where
//! `m` is the value of largest magnitude (sign kept), low nibbles hold the first 16 values.

use half::f16;

pub(crate) const QK: usize = 32;
pub(crate) const Q8_0_BYTES: usize = 2 + QK;
pub(crate) const Q4_0_BYTES: usize = 2 + QK / 2;

#[inline]
fn read_d(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

#[inline]
fn write_d(b: &mut [u8], d: f32) {
    b[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
}

/// `bytes` holds `out.len() / 32` q8_0 blocks.
pub fn dequant_q8_0(bytes: &[u8], out: &mut [f32]) {
    for (blk, o) in bytes.chunks_exact(Q8_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = read_d(blk);
        for (q, y) in blk[2..].iter().zip(o.iter_mut()) {
            *y = (*q as i8) as f32 * d;
        }
    }
}

/// ggml `quantize_row_q8_0_ref`.
pub fn quant_q8_0(src: &[f32], bytes: &mut [u8]) {
    for (x, blk) in src.chunks_exact(QK).zip(bytes.chunks_exact_mut(Q8_0_BYTES)) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_d(blk, d);
        for (v, q) in x.iter().zip(blk[2..].iter_mut()) {
            *q = ((v * id).round() as i8) as u8;
        }
    }
}

/// `bytes` holds `out.len() / 32` q4_0 blocks.
pub fn dequant_q4_0(bytes: &[u8], out: &mut [f32]) {
    for (blk, o) in bytes.chunks_exact(Q4_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = read_d(blk);
        let (lo, hi) = o.split_at_mut(QK / 2);
        for (j, q) in blk[2..].iter().enumerate() {
            lo[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
            hi[j] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// ggml `quantize_row_q4_0_ref`.
pub fn quant_q4_0(src: &[f32], bytes: &mut [u8]) {
    for (x, blk) in src.chunks_exact(QK).zip(bytes.chunks_exact_mut(Q4_0_BYTES)) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        write_d(blk, d);
        for j in 0..QK / 2 {
            // ggml truncates toward zero after adding 8.5, then clamps to 15.
            let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((x[QK / 2 + j] * id + 8.5) as i8).min(15) as u8;
            blk[2 + j] = q0 | (q1 << 4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_round_trip_is_close_and_stable() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 29) as f32 - 14.0) / 7.0)
            .collect();
        let mut b = vec![0u8; 2 * Q8_0_BYTES];
        quant_q8_0(&x, &mut b);
        let mut y = vec![0f32; 64];
        dequant_q8_0(&b, &mut y);
        for (a, c) in x.iter().zip(&y) {
            assert!((a - c).abs() <= 2.0 / 127.0 * 1.01, "{a} vs {c}");
        }
        // Re-quantizing dequantized data gives the same bytes: merging leaves unmerged
        // values where they were.
        let mut b2 = vec![0u8; b.len()];
        quant_q8_0(&y, &mut b2);
        assert_eq!(b, b2);
    }

    #[test]
    fn q4_0_round_trip_is_close() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) / 4.0).collect();
        let mut b = vec![0u8; Q4_0_BYTES];
        quant_q4_0(&x, &mut b);
        let mut y = vec![0f32; 32];
        dequant_q4_0(&b, &mut y);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Half a step of d = amax/8, except at the positive extreme, which ggml clamps to
        // q = 15 (the grid is [-8, 7]·d) and so loses one whole step.
        for (a, c) in x.iter().zip(&y) {
            let bound = if *a >= amax * 0.99 {
                amax / 8.0
            } else {
                amax / 16.0
            };
            assert!((a - c).abs() <= bound * 1.001 + 1e-6, "{a} vs {c}");
        }
        // The value of largest magnitude is exact (it maps to −8).
        assert_eq!(y[0], x[0]);
    }

    #[test]
    fn zero_blocks() {
        let x = [0f32; 32];
        let mut b = [1u8; Q8_0_BYTES];
        quant_q8_0(&x, &mut b);
        assert!(b.iter().all(|&v| v == 0));
        let mut b4 = [1u8; Q4_0_BYTES];
        quant_q4_0(&x, &mut b4);
        let mut y = [1f32; 32];
        dequant_q4_0(&b4, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }
}
