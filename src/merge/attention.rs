//! Accumulated attention, the pivot's criterion (docs/method.md, "Pivot and accumulated
//! attention"), from what a host can give.
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
//! Work is split over (layer, KV head) or over cells (softmax rows); partial sums are added in
//! a fixed order, so the result does not depend on the thread count.

use rayon::prelude::*;

use super::Exec;
use crate::error::{Error, Result};
use crate::layout::{GgmlType, LayerRows};
use crate::simd::QK_PANEL;

thread_local! {
    /// One KV head's packed keys and one block's logits of [`from_queries`], kept between
    /// calls on the same (pool) thread: fresh pages for them cost as much as the arithmetic.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// One layer's recent query rows, as [`from_queries`] reads them.
#[derive(Clone, Copy, Debug)]
pub struct Queries<'a> {
    /// `n_q` rows of `n_head · dk` floats, post-RoPE.
    pub q: &'a [f32],
    /// Query heads; query head `h` reads KV head `h / (n_head / n_head_kv)`.
    pub n_head: usize,
    /// The logit scale, usually `1/√dk`.
    pub kq_scale: f32,
}

/// Query rows per block of [`from_queries`]: their logits (8 rows of the window) stay in L2
/// between the product and the softmax.
const QB: usize = 8;

/// Adds to `attn[i]` the attention that the query rows of every layer give `cells[i]`:
/// per layer and query head, the softmax of `kq_scale·q·k + bias` over the given cells,
/// summed over rows, heads and layers. A non-finite query, key or bias (but −inf, a mask) is
/// an error, found before `attn` is written; a logit too large for f32 is taken in f64.
///
/// All layers in one parallel pass over (layer, KV head): a unit packs its head's keys once
/// (panels of [`QK_PANEL`], the layout `qk_t_f32` streams) and scores every query row of the
/// head's GQA group against them while they are in cache; one dispatch for the whole event
/// instead of one per layer, which at a few hundred microseconds of work per layer mattered.
/// Units are summed in their fixed order, so the result does not depend on the thread count.
#[allow(clippy::too_many_arguments)]
pub fn from_queries<L: LayerRows + Sync>(
    ex: &Exec,
    layers: &[L],
    queries: &[Queries],
    n_q: usize,
    cells: &[u32],
    bias: Option<&[f32]>,
    attn: &mut [f32],
) -> Result<()> {
    if layers.len() != queries.len() {
        return Err(Error::InvalidArg(format!(
            "{} layers but {} query sets",
            layers.len(),
            queries.len()
        )));
    }
    for (il, (layer, qs)) in layers.iter().zip(queries).enumerate() {
        let g = layer.geom();
        check_heads(il, g.n_head, qs.n_head, qs.kq_scale)?;
        let want = n_q.checked_mul(qs.n_head).and_then(|x| x.checked_mul(g.dk));
        if want != Some(qs.q.len()) {
            return Err(Error::InvalidArg(format!(
                "layer {il}: q holds {} floats, expected n_q·n_head·n_embd_head_k = \
                 {n_q}·{}·{}",
                qs.q.len(),
                qs.n_head,
                g.dk
            )));
        }
        // A non-finite query has no softmax; left to the kernels, its heads would read as
        // masked and add nothing, a silent zero.
        if let Some(i) = qs.q.iter().position(|x| !x.is_finite()) {
            return Err(Error::InvalidArg(format!(
                "layer {il}: q[{i}] = {} is not finite",
                qs.q[i]
            )));
        }
    }
    let n = cells.len();
    if attn.len() != n || bias.is_some_and(|b| b.len() != n) {
        return Err(Error::InvalidArg(
            "attn/bias must have one entry per cell".into(),
        ));
    }
    check_bias(bias)?;
    if n == 0 || n_q == 0 {
        return Ok(());
    }
    let units: Vec<(usize, usize)> = layers
        .iter()
        .enumerate()
        .flat_map(|(il, l)| (0..l.geom().n_head).map(move |hk| (il, hk)))
        .collect();
    let partial: Vec<Vec<f32>> = ex.pool.install(|| {
        units
            .par_iter()
            .map(|&(il, hk)| {
                let mut acc = vec![0f32; n];
                SCRATCH
                    .with(|s| {
                        let (kt, logits) = &mut *s.borrow_mut();
                        unit(
                            ex,
                            &layers[il],
                            &queries[il],
                            n_q,
                            hk,
                            cells,
                            bias,
                            kt,
                            logits,
                            &mut acc,
                        )
                    })
                    .map_err(|i| {
                        Error::InvalidArg(format!(
                            "layer {il}: the key of cell {} in KV head {hk} is not finite",
                            cells[i]
                        ))
                    })?;
                Ok(acc)
            })
            .collect::<Result<_>>()
    })?;
    for acc in &partial {
        for (a, x) in attn.iter_mut().zip(acc) {
            *a += x;
        }
    }
    Ok(())
}

/// A layer's query heads must fill its KV heads' GQA groups, and its logit scale be finite.
pub fn check_heads(il: usize, n_head_kv: usize, n_head: usize, kq_scale: f32) -> Result<()> {
    if n_head == 0 || n_head % n_head_kv != 0 {
        return Err(Error::InvalidArg(format!(
            "layer {il}: n_head = {n_head} is not a positive multiple of n_head_kv = {n_head_kv}"
        )));
    }
    if !kq_scale.is_finite() {
        return Err(Error::InvalidArg(format!(
            "layer {il}: kq_scale is not finite"
        )));
    }
    Ok(())
}

/// Each bias is finite, or −inf to mask its cell.
pub fn check_bias(bias: Option<&[f32]>) -> Result<()> {
    if let Some((i, b)) = bias
        .into_iter()
        .flatten()
        .enumerate()
        .find(|(_, b)| b.is_nan() || **b == f32::INFINITY)
    {
        return Err(Error::InvalidArg(format!(
            "bias[{i}] = {b}: a bias is finite, or −inf to mask a cell"
        )));
    }
    Ok(())
}

/// One (layer, KV head) of [`from_queries`], its probabilities added to `acc`; `Err(i)` when
/// `cells[i]`'s key is not finite in this head.
#[allow(clippy::too_many_arguments)]
fn unit<L: LayerRows>(
    ex: &Exec,
    layer: &L,
    qs: &Queries,
    n_q: usize,
    hk: usize,
    cells: &[u32],
    bias: Option<&[f32]>,
    kt: &mut Vec<f32>,
    logits: &mut Vec<f32>,
    acc: &mut [f32],
) -> std::result::Result<(), usize> {
    let g = *layer.geom();
    let (n, dk, group) = (cells.len(), g.dk, qs.n_head / g.n_head);
    let panel_len = QK_PANEL * dk;
    let panels = n.div_ceil(QK_PANEL);
    // Every element but the last panel's padding (never read) is written below, so what an
    // earlier call left in the buffer does not leak.
    if kt.len() < panels * panel_len {
        kt.resize(panels * panel_len, 0.0);
    }
    let kt = &mut kt[..panels * panel_len];
    let hr = hk * dk..(hk + 1) * dk;
    let mut row = vec![0f32; dk];
    for (ip, (panel, pc)) in kt
        .chunks_exact_mut(panel_len)
        .zip(cells.chunks(QK_PANEL))
        .enumerate()
    {
        // The window's keys are cold after the model's pass; ask for a later panel's rows
        // while this one is packed.
        if let Some(next) = cells.chunks(QK_PANEL).nth(ip + 2) {
            for &c in next {
                layer.prefetch_k_head(c as usize, hk);
            }
        }
        if g.k.ty == GgmlType::F16 {
            // f16 keys, the usual cache type: widened and transposed in one kernel
            let mut rows: [&[u16]; QK_PANEL] = [&[]; QK_PANEL];
            for (r, &c) in rows.iter_mut().zip(pc) {
                if let Some(k) = layer.k_row_f16(c as usize) {
                    *r = &k[hr.clone()];
                }
            }
            ex.kern.pack_keys_f16(&rows[..pc.len()], panel);
        } else {
            for (t, &c) in pc.iter().enumerate() {
                layer.read_k(c as usize, hk, &mut row);
                for (j, &x) in row.iter().enumerate() {
                    panel[j * QK_PANEL + t] = x;
                }
            }
        }
    }
    // Row t of the head's group is query row t / group, query head hk·group + t % group.
    let rows = n_q * group;
    let mut qb = Vec::with_capacity(QB * dk);
    if logits.len() < QB * n {
        logits.resize(QB * n, 0.0);
    }
    // The f32 kernels hold `kq_scale·q·k + bias` only while it is far inside f32's range (an
    // overflowed logit made them skip the row); a row with a larger, or overflowed, q·k goes
    // to `softmax_acc_f64`. Ordinary logits are many orders of magnitude below the bound, so
    // they keep the kernels' bits.
    let b_max = bias.map_or(0.0, |b| {
        b.iter()
            .filter(|x| x.is_finite())
            .fold(0f32, |m, x| m.max(x.abs()))
    });
    let qk_max = if b_max <= f32::MAX / 4.0 {
        // at most f32::MAX, so that an overflowed q·k (inf) never passes
        (f32::MAX / 4.0 / qs.kq_scale.abs()).min(f32::MAX)
    } else {
        -1.0
    };
    for b in (0..rows).step_by(QB) {
        let block = b..(b + QB).min(rows);
        qb.clear();
        for t in block.clone() {
            let o = ((t / group) * qs.n_head + hk * group + t % group) * dk;
            qb.extend_from_slice(&qs.q[o..o + dk]);
        }
        let lg = &mut logits[..block.len() * n];
        ex.kern.qk_t_f32(&qb, dk, kt, lg);
        for (l, q) in lg.chunks_exact_mut(n).zip(qb.chunks_exact(dk)) {
            // NaN fails the comparison too.
            if l.iter().fold(true, |ok, x| ok & (x.abs() <= qk_max)) {
                ex.kern.softmax_acc(l, qs.kq_scale, bias, acc);
            } else {
                softmax_acc_f64(q, kt, n, qs.kq_scale, bias, acc)?;
            }
        }
    }
    Ok(())
}

/// The softmax of one query row `q` over the `n` keys packed in `kt` (as `qk_t_f32` reads
/// them), in f64 and added to `acc`: for logits beyond what f32 holds. Finite f32 queries and
/// keys give a q·k far inside f64's range, and subtracting the maximum keeps every `exp` at
/// most 1. `Err(i)` when key `i` is not finite (the one way a logit can still be NaN).
fn softmax_acc_f64(
    q: &[f32],
    kt: &[f32],
    n: usize,
    kq_scale: f32,
    bias: Option<&[f32]>,
    acc: &mut [f32],
) -> std::result::Result<(), usize> {
    let dk = q.len();
    let mut logit = vec![0f64; n];
    for (i, l) in logit.iter_mut().enumerate() {
        let panel = &kt[i / QK_PANEL * QK_PANEL * dk..];
        let k = (0..dk).map(|j| panel[j * QK_PANEL + i % QK_PANEL]);
        let mut dot = 0f64;
        for (qj, kj) in q.iter().zip(k) {
            if !kj.is_finite() {
                return Err(i);
            }
            dot += *qj as f64 * kj as f64;
        }
        *l = kq_scale as f64 * dot + bias.map_or(0.0, |b| b[i] as f64);
    }
    let mx = logit.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
    if mx == f64::NEG_INFINITY {
        return Ok(()); // every cell masked: no evidence, as in the kernels
    }
    logit.iter_mut().for_each(|x| *x = (*x - mx).exp());
    let sum: f64 = logit.iter().sum();
    for (a, x) in acc.iter_mut().zip(&logit) {
        *a += (x / sum) as f32;
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
