//! Step 2: write each merged set's state into its surviving cell, in place.
//!
//! Per layer and KV head, a set of members `i` with pivot `p` becomes
//! `g_i = exp(−d_i² / 2σ²)`, `d_i = ‖k_p − k_i‖`, `w_i ∝ count_i · g_i`,
//! `k* = Σ w_i k_i`, `v* = Σ w_i v_i` (method.md), with `2σ² = d̄²` (d̄ the mean of the d_i,
//! pivot included as 0) unless σ is fixed; with `Sigma::Attention`, `w_i ∝ a_i` (the members'
//! accumulated attention) instead. Arithmetic is f32; the result is encoded back into
//! the cache's type, only into the pivot's rows. CaM instead adds weighted evicted values into
//! kept values. Layers are independent rayon tasks, so the bytes written do not depend on the
//! thread count.

use rayon::prelude::*;

use super::plan::Plan;
use super::{Exec, Method, Sigma, ValueMode};
use crate::error::{Error, Result};
use crate::layout::{LayerMut, LayerRows};
use crate::simd::Kernels;

pub fn apply(ex: &Exec, plan: &Plan, layers: &mut [LayerMut<'_>]) -> Result<()> {
    if layers.len() != plan.geoms.len() {
        return Err(Error::Mismatch(format!(
            "planned on {} layers, applied to {}",
            plan.geoms.len(),
            layers.len()
        )));
    }
    for (il, (l, g)) in layers.iter().zip(&plan.geoms).enumerate() {
        if l.geom != *g {
            return Err(Error::Mismatch(format!(
                "layer {il} differs in type, shape or strides"
            )));
        }
    }
    let members = plan.members();
    let merged: Vec<(usize, &Vec<usize>)> = members
        .iter()
        .enumerate()
        .filter(|(_, m)| m.len() > 1)
        .collect();
    if merged.is_empty() && plan.cam.is_empty() {
        return Ok(());
    }
    ex.pool.install(|| {
        layers
            .par_iter_mut()
            .for_each(|l| apply_layer(ex.kern, plan, &merged, l))
    });
    Ok(())
}

/// Weights of the members of a set, normalized. `d2[i]` is the squared key distance of member
/// `i` to the pivot (`jp`), `attn` the members' accumulated attention when the plan had it.
/// Gaussian modes: `exp(−d²/2σ²)` times the members' counts. Attention mode: the members'
/// attention as it is (a merged cell's attention already counts the tokens it stands for).
pub fn weights(
    sigma: Sigma,
    d2: &[f32],
    counts: &[f32],
    attn: Option<&[f32]>,
    jp: usize,
    out: &mut [f32],
) {
    let by_attn = match (sigma, attn) {
        (Sigma::Attention, Some(a)) if a[jp] > 0.0 => {
            let ap = a[jp];
            for (o, &x) in out.iter_mut().zip(a) {
                *o = x.max(0.0) / ap;
            }
            true
        }
        _ => false,
    };
    if !by_attn {
        match sigma {
            Sigma::Adaptive | Sigma::Attention => {
                let dbar = d2.iter().map(|d| d.max(0.0).sqrt()).sum::<f32>() / d2.len() as f32;
                for (o, d) in out.iter_mut().zip(d2) {
                    *o = if dbar > 0.0 {
                        (-d.max(0.0) / (dbar * dbar)).exp()
                    } else {
                        1.0
                    };
                }
            }
            Sigma::Fixed(s) => {
                for (o, d) in out.iter_mut().zip(d2) {
                    *o = (-d.max(0.0) / (2.0 * s * s)).exp();
                }
            }
        }
    }
    // A non-finite key must not poison the merge: such a member gets no weight, the pivot 1.
    for (i, o) in out.iter_mut().enumerate() {
        if !o.is_finite() {
            *o = if i == jp { 1.0 } else { 0.0 };
        }
    }
    out[jp] = 1.0;
    let mut sum = 0f32;
    for (o, c) in out.iter_mut().zip(counts) {
        if !by_attn {
            *o *= c;
        }
        sum += *o;
    }
    out.iter_mut().for_each(|o| *o /= sum);
}

/// `out = Σ_j w[h·m + j] · row_j` per head `h`, for `m = w.len() / n_head` member rows of
/// `n_head · d` floats laid out one after another in `rows`; keys and values share it.
fn weighted_rows(
    kern: &Kernels,
    rows: &[f32],
    n_head: usize,
    d: usize,
    w: &[f32],
    out: &mut [f32],
) {
    let width = n_head * d;
    let m = w.len() / n_head;
    out.iter_mut().for_each(|x| *x = 0.0);
    for h in 0..n_head {
        let o = &mut out[h * d..(h + 1) * d];
        for j in 0..m {
            kern.axpy_f32(
                o,
                w[h * m + j],
                &rows[j * width + h * d..j * width + (h + 1) * d],
            );
        }
    }
}

fn apply_layer(
    kern: &'static Kernels,
    plan: &Plan,
    merged: &[(usize, &Vec<usize>)],
    l: &mut LayerMut<'_>,
) {
    let g = l.geom;
    let p = &plan.params;
    let (wk, wv) = (g.n_head * g.dk, g.n_head * g.dv);
    let max_m = merged.iter().map(|(_, m)| m.len()).max().unwrap_or(0);
    // Whole rows (all heads) are read and written at once: one decode per member row instead
    // of one per head keeps the per-call overhead small for narrow heads.
    let mut keys = vec![0f32; max_m * wk];
    let mut vals = vec![0f32; max_m.max(1) * wv];
    let mut out_k = vec![0f32; wk];
    let mut out_v = vec![0f32; wv];
    let mut d2 = vec![0f32; max_m];
    let mut w = vec![0f32; g.n_head * max_m];
    let mut cnt = vec![0f32; max_m];
    let mut att = vec![0f32; max_m];
    let has_attn = !plan.attn_in.is_empty();
    for &(sid, mem) in merged {
        let m = mem.len();
        let piv = plan.survivor[sid] as usize;
        let jp = mem
            .iter()
            .position(|&i| i == piv)
            .expect("survivor is a member");
        let pc = plan.cells[piv] as usize;
        for (c, &i) in cnt.iter_mut().zip(mem) {
            *c = plan.counts_in[i] as f32;
        }
        if has_attn {
            for (a, &i) in att.iter_mut().zip(mem) {
                *a = plan.attn_in[i];
            }
        }
        for (j, &i) in mem.iter().enumerate() {
            l.read_k_row(
                kern,
                plan.cells[i] as usize,
                &mut keys[j * wk..(j + 1) * wk],
            );
        }
        // Per KV head: distances to the pivot's key in that head, then the weights.
        for h in 0..g.n_head {
            let head = |j: usize| &keys[j * wk + h * g.dk..j * wk + (h + 1) * g.dk];
            for j in 0..m {
                d2[j] = kern.sqdist_f32(head(jp), head(j));
            }
            weights(
                p.sigma,
                &d2[..m],
                &cnt[..m],
                has_attn.then(|| &att[..m]),
                jp,
                &mut w[h * m..(h + 1) * m],
            );
        }
        if p.merge_keys {
            weighted_rows(kern, &keys, g.n_head, g.dk, &w[..g.n_head * m], &mut out_k);
            l.write_k_row(kern, pc, &out_k);
        }
        if p.merge_values {
            for (j, &i) in mem.iter().enumerate() {
                l.read_v_row(
                    kern,
                    plan.cells[i] as usize,
                    &mut vals[j * wv..(j + 1) * wv],
                );
            }
            weighted_rows(kern, &vals, g.n_head, g.dv, &w[..g.n_head * m], &mut out_v);
            if p.value_mode == ValueMode::Paper {
                out_v.iter_mut().for_each(|x| *x *= m as f32);
            }
            l.write_v_row(kern, pc, &out_v);
        }
    }
    if p.method == Method::Cam {
        for fold in &plan.cam {
            let tc = plan.cells[fold.target] as usize;
            l.read_v_row(kern, tc, &mut out_v);
            let src = &mut vals[..wv];
            for &(e, wt) in &fold.sources {
                l.read_v_row(kern, plan.cells[e] as usize, src);
                kern.axpy_f32(&mut out_v, wt, src);
            }
            l.write_v_row(kern, tc, &out_v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::weights;
    use crate::merge::Sigma;

    #[test]
    fn attention_weights_follow_attention_not_counts() {
        let d2 = [0.0, 4.0, 9.0];
        let counts = [1.0, 3.0, 1.0];
        let mut w = [0f32; 3];
        weights(
            Sigma::Attention,
            &d2,
            &counts,
            Some(&[2.0, 1.0, 0.0]),
            0,
            &mut w,
        );
        assert_eq!(w, [2.0 / 3.0, 1.0 / 3.0, 0.0]);
        // no attention, or none on the pivot: the adaptive kernel, counts included
        let mut a = [0f32; 3];
        weights(Sigma::Adaptive, &d2, &counts, None, 0, &mut a);
        for att in [None, Some(&[0.0f32, 1.0, 1.0][..])] {
            weights(Sigma::Attention, &d2, &counts, att, 0, &mut w);
            assert_eq!(w, a);
        }
        assert!(a[1] > a[2] && (a.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
