//! Accumulated attention, the pivot's criterion (method.md row 4), from what a host can give.
//!
//! * Query rows: the host keeps a few recent post-RoPE query rows per layer (this works with
//!   flash attention and on any backend). Each query head's softmax over the given cells is
//!   computed here; query heads map to KV heads by GQA groups (`h / (n_head / n_head_kv)`),
//!   and the probabilities are summed over heads and rows into one number per cell.
//! * Softmax rows: llama.cpp's non-flash path materializes `kq_soft_max`; its rows are summed
//!   per cell.
//! * Nothing: planning then falls back to the query-free pivot (nearest the mean key) and to
//!   oldest-first eviction where a method needs an order.
//!
//! Work is split over KV heads (queries) or over cells (softmax rows); partial sums are added
//! in a fixed order, so the result does not depend on the thread count.

use rayon::prelude::*;

use super::Exec;
use crate::error::{Error, Result};
use crate::layout::LayerRows;

#[allow(clippy::too_many_arguments)]
pub fn from_queries<L: LayerRows + Sync>(
    ex: &Exec,
    layer: &L,
    q: &[f32],
    n_q: usize,
    n_head: usize,
    kq_scale: f32,
    cells: &[u32],
    bias: Option<&[f32]>,
    attn: &mut [f32],
) -> Result<()> {
    let g = *layer.geom();
    if n_head == 0 || n_head % g.n_head != 0 {
        return Err(Error::InvalidArg(format!(
            "n_head = {n_head} is not a positive multiple of n_head_kv = {}",
            g.n_head
        )));
    }
    if q.len() != n_q * n_head * g.dk {
        return Err(Error::InvalidArg(format!(
            "q holds {} floats, expected n_q·n_head·n_embd_head_k = {}",
            q.len(),
            n_q * n_head * g.dk
        )));
    }
    if !kq_scale.is_finite() {
        return Err(Error::InvalidArg("kq_scale is not finite".into()));
    }
    let n = cells.len();
    if attn.len() != n || bias.is_some_and(|b| b.len() != n) {
        return Err(Error::InvalidArg(
            "attn/bias must have one entry per cell".into(),
        ));
    }
    if n == 0 || n_q == 0 {
        return Ok(());
    }
    let group = n_head / g.n_head;
    let per_head: Vec<Vec<f32>> = ex.pool.install(|| {
        (0..g.n_head)
            .into_par_iter()
            .map(|hk| {
                let mut keys = vec![0f32; n * g.dk];
                for (i, &c) in cells.iter().enumerate() {
                    layer.read_k(ex.kern, c as usize, hk, &mut keys[i * g.dk..(i + 1) * g.dk]);
                }
                let mut acc = vec![0f32; n];
                let mut logit = vec![0f32; n];
                for r in 0..n_q {
                    for hq in hk * group..(hk + 1) * group {
                        let qv = &q[(r * n_head + hq) * g.dk..(r * n_head + hq + 1) * g.dk];
                        ex.kern.dots_f32(qv, &keys, &mut logit);
                        for (i, l) in logit.iter_mut().enumerate() {
                            *l = kq_scale * *l + bias.map_or(0.0, |b| b[i]);
                        }
                        let mx = logit
                            .iter()
                            .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
                        if !mx.is_finite() {
                            continue; // every cell masked, or broken data: no evidence
                        }
                        let mut sum = 0f32;
                        for x in logit.iter_mut() {
                            *x = exp_approx(*x - mx);
                            sum += *x;
                        }
                        let inv = 1.0 / sum;
                        for (a, x) in acc.iter_mut().zip(&logit) {
                            if x.is_finite() {
                                *a += x * inv;
                            }
                        }
                    }
                }
                acc
            })
            .collect()
    });
    for acc in &per_head {
        for (a, x) in attn.iter_mut().zip(acc) {
            *a += x;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn add_probs(
    ex: &Exec,
    probs: &[f32],
    n_kv: usize,
    n_rows: usize,
    row_stride: usize,
    cells: &[u32],
    attn: &mut [f32],
) -> Result<()> {
    if n_rows > 0 && row_stride < n_kv {
        return Err(Error::InvalidArg(format!(
            "row_stride {row_stride} < n_kv {n_kv}"
        )));
    }
    let need = if n_rows == 0 {
        0
    } else {
        (n_rows - 1) * row_stride + n_kv
    };
    if probs.len() < need {
        return Err(Error::InvalidArg("probs shorter than its rows".into()));
    }
    if attn.len() != cells.len() {
        return Err(Error::InvalidArg(
            "attn must have one entry per cell".into(),
        ));
    }
    if let Some(i) = cells.iter().position(|&c| c as usize >= n_kv) {
        return Err(Error::InvalidArg(format!(
            "cells[{i}] = {} is not below n_kv = {n_kv}",
            cells[i]
        )));
    }
    ex.pool.install(|| {
        attn.par_chunks_mut(256)
            .zip(cells.par_chunks(256))
            .for_each(|(a, c)| {
                for r in 0..n_rows {
                    let row = &probs[r * row_stride..r * row_stride + n_kv];
                    for (ai, &ci) in a.iter_mut().zip(c) {
                        let p = row[ci as usize];
                        if p.is_finite() {
                            *ai += p;
                        }
                    }
                }
            })
    });
    Ok(())
}

/// `e^x` for `x <= 0` (softmax after subtracting the maximum), relative error below 2e-7,
/// 0 for `x < -87` and for −∞, NaN for NaN. Plain arithmetic so the compiler vectorizes the
/// loops that call it; libm's `expf` was most of the scoring time.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    if x.is_nan() {
        return f32::NAN;
    }
    let x = x.max(-87.0);
    // x = n·ln2 + r, |r| <= ln2/2, with ln2 split in two for the reduction.
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    // e^r by its Taylor/minimax polynomial (Cephes expf coefficients).
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    // Scale by 2^n through the exponent bits (n in [-126, 0] here).
    let scale = f32::from_bits(((n as i32 + 127).max(0) as u32) << 23);
    if x <= -87.0 {
        0.0
    } else {
        e * scale
    }
}

#[cfg(test)]
mod tests {
    use super::exp_approx;

    #[test]
    fn exp_approx_matches_libm() {
        let mut worst = 0f64;
        let mut x = -86.9f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp_approx(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp_approx(0.0), 1.0);
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-1000.0), 0.0);
        assert!(exp_approx(f32::NAN).is_nan());
    }
}
