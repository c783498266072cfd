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
//! Work is split over (KV head, block of query rows) or over cells (softmax rows); partial
//! sums are added in a fixed order, so the result does not depend on the thread count.

use rayon::prelude::*;

use super::Exec;
use crate::error::{Error, Result};
use crate::layout::LayerRows;
use crate::simd::QK_PANEL;

thread_local! {
    /// The packed keys of [`from_queries`], kept between calls on the same thread.
    static KEYS_T: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

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
    let (group, dk) = (n_head / g.n_head, g.dk);
    // Every KV head's keys packed in panels of QK_PANEL transposed keys, the layout
    // `qk_t_f32` streams: converted once, then read by every query of the head's GQA group.
    // Built panel by panel in parallel (3 heads alone would leave one of 2 threads idle half
    // the time); the buffer is reused from call to call on the calling thread, because fresh
    // pages for it (hundreds of KiB per layer) cost as much as the arithmetic. Every element
    // but the last panels' padding (never read) is written below, so old contents do not leak.
    let panels = n.div_ceil(QK_PANEL);
    let head_len = panels * QK_PANEL * dk;
    let mut kt_buf = KEYS_T.with(|b| b.take());
    if kt_buf.len() < g.n_head * head_len {
        kt_buf.resize(g.n_head * head_len, 0.0);
    }
    let kt_all = &mut kt_buf[..g.n_head * head_len];
    ex.pool.install(|| {
        kt_all
            .par_chunks_mut(QK_PANEL * dk)
            .enumerate()
            .for_each(|(u, panel)| {
                let (hk, p) = (u / panels, u % panels);
                let mut row = vec![0f32; dk];
                for (t, &c) in cells[p * QK_PANEL..].iter().take(QK_PANEL).enumerate() {
                    layer.read_k(ex.kern, c as usize, hk, &mut row);
                    for (j, &x) in row.iter().enumerate() {
                        panel[j * QK_PANEL + t] = x;
                    }
                }
            })
    });
    // Work units: (KV head, block of QB query rows of its group), a split fixed by the shapes
    // alone; each unit sums its rows' probabilities and the units are added in order, so the
    // result does not depend on the thread count.
    const QB: usize = 8;
    let rows_per_head = n_q * group;
    let blocks = rows_per_head.div_ceil(QB);
    let partial: Vec<Vec<f32>> = ex.pool.install(|| {
        (0..g.n_head * blocks)
            .into_par_iter()
            .map(|u| {
                let (hk, b) = (u / blocks, u % blocks);
                let rows = b * QB..((b + 1) * QB).min(rows_per_head);
                // the unit's query rows, contiguous: row t of head hk's group is query row
                // t / group, query head hk·group + t % group
                let mut qb = Vec::with_capacity(rows.len() * dk);
                for t in rows.clone() {
                    let hq = hk * group + t % group;
                    let o = ((t / group) * n_head + hq) * dk;
                    qb.extend_from_slice(&q[o..o + dk]);
                }
                let mut logits = vec![0f32; rows.len() * n];
                ex.kern.qk_t_f32(
                    &qb,
                    dk,
                    &kt_all[hk * head_len..(hk + 1) * head_len],
                    &mut logits,
                );
                let mut acc = vec![0f32; n];
                for l in logits.chunks_exact_mut(n) {
                    softmax_add(l, kq_scale, bias, &mut acc);
                }
                acc
            })
            .collect()
    });
    for acc in &partial {
        for (a, x) in attn.iter_mut().zip(acc) {
            *a += x;
        }
    }
    KEYS_T.with(|b| b.replace(kt_buf));
    Ok(())
}

/// Lanes of the partial maxima and sums in [`softmax_add`]: a fixed split the compiler turns
/// into vector registers, and the same on every machine.
const LANES: usize = 8;

/// `acc += softmax(kq_scale·logit + bias)`, `logit` overwritten. A row whose logits are all
/// masked (−∞) or broken (NaN) adds nothing: it is no evidence.
///
/// Written as separate passes, each without a serial dependency (maxima and sums in LANES
/// partial lanes combined in a fixed order), so each pass vectorizes.
fn softmax_add(logit: &mut [f32], kq_scale: f32, bias: Option<&[f32]>, acc: &mut [f32]) {
    match bias {
        Some(b) => logit
            .iter_mut()
            .zip(b)
            .for_each(|(l, b)| *l = kq_scale * *l + b),
        None => logit.iter_mut().for_each(|l| *l *= kq_scale),
    }
    let mx = lane_fold(logit, f32::NEG_INFINITY, |m, x| if x > m { x } else { m });
    if !mx.is_finite() {
        return;
    }
    logit.iter_mut().for_each(|x| *x = exp_approx(*x - mx));
    let sum = lane_fold(logit, 0.0, |s, x| s + x);
    let inv = 1.0 / sum;
    for (a, x) in acc.iter_mut().zip(logit.iter()) {
        *a += if x.is_finite() { x * inv } else { 0.0 };
    }
}

/// `f` folded over `x` in LANES interleaved partial results, then over the lanes in order and
/// the tail: a fixed order that needs no reassociation to vectorize.
#[inline(always)]
fn lane_fold(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = f(*l, v);
        }
    }
    let r = lanes.into_iter().fold(init, &f);
    tail.iter().fold(r, |r, &v| f(r, v))
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
    // Round to nearest by adding and removing 1.5·2²³ (exact for |t| < 2²²): `f32::round` is a
    // libm call on baseline x86_64 and kept the loop scalar.
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
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
