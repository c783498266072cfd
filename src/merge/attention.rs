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
                        let mut mx = f32::NEG_INFINITY;
                        for i in 0..n {
                            let b = bias.map_or(0.0, |b| b[i]);
                            logit[i] =
                                kq_scale * ex.kern.dot_f32(qv, &keys[i * g.dk..(i + 1) * g.dk]) + b;
                            if logit[i] > mx {
                                mx = logit[i];
                            }
                        }
                        if !mx.is_finite() {
                            continue; // every cell masked, or broken data: no evidence
                        }
                        let mut sum = 0f64;
                        for x in logit.iter_mut() {
                            *x = (*x - mx).exp();
                            sum += *x as f64;
                        }
                        let inv = (1.0 / sum) as f32;
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
