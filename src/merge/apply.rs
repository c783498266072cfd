//! Step 2: write each merged set's state into its surviving cell, in place.
//!
//! Per layer and KV head, a set of members `i` with pivot `p` becomes
//! `g_i = exp(−d_i² / 2σ²)`, `d_i = ‖k_p − k_i‖`, `w_i ∝ count_i · g_i`,
//! `k* = Σ w_i k_i`, `v* = Σ w_i v_i`, with `2σ² = d̄²` (docs/method.md, "Kernel width σ";
//! d̄ the mean of the d_i,
//! pivot included as 0) unless σ is fixed, relative (`σ = r·d̄`) or per layer (`σ = r·s`, s
//! the event's rms member distance in that layer and head); with `Sigma::Attention`,
//! `w_i ∝ a_i` (the members' accumulated attention) instead. Arithmetic is f32; the result
//! is encoded back into the cache's type, only into the pivot's rows. CaM instead adds
//! weighted evicted values into kept values. Layers are independent rayon tasks, so the bytes
//! written do not depend on the thread count.

use rayon::prelude::*;

use super::plan::Plan;
use super::{Exec, Method, Sigma, ValueMode};
use crate::error::{Error, Result};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::codec::GgmlType;
use crate::layout::{LayerGeom, LayerMut, LayerRows, PREFETCH_AHEAD};

pub fn apply(ex: &Exec, plan: &Plan, layers: &mut [LayerMut<'_>]) -> Result<()> {
    let geoms: Vec<LayerGeom> = layers.iter().map(|l| l.geom).collect();
    check_layers(plan, &geoms)?;
    let members = plan.members();
    let merged = merged_sets(&members);
    if merged.is_empty() && plan.cam.is_empty() {
        return Ok(());
    }
    ex.pool.install(|| {
        layers
            .par_iter_mut()
            .for_each(|l| apply_layer(plan, &merged, l))
    });
    Ok(())
}

/// The sets that merge (more than one member), with their set ids.
pub fn merged_sets(members: &[Vec<usize>]) -> Vec<(usize, &Vec<usize>)> {
    members
        .iter()
        .enumerate()
        .filter(|(_, m)| m.len() > 1)
        .collect()
}

/// Refuses layers that differ from those the plan was made on (host or device alike).
pub fn check_layers(plan: &Plan, geoms: &[LayerGeom]) -> Result<()> {
    if geoms.len() != plan.geoms.len() {
        return Err(Error::Mismatch(format!(
            "planned on {} layers, applied to {}",
            plan.geoms.len(),
            geoms.len()
        )));
    }
    for (il, (l, g)) in geoms.iter().zip(&plan.geoms).enumerate() {
        if l != g {
            return Err(Error::Mismatch(format!(
                "layer {il} differs in type, shape or strides"
            )));
        }
    }
    Ok(())
}

/// Weights of the members of a set, normalized. `d2[i]` is the squared key distance of member
/// `i` to the pivot (`jp`), `attn` the members' accumulated attention when the plan had it.
/// Gaussian modes: `exp(−d²/2σ²)` times the members' counts. Attention mode: the members'
/// attention as it is (a merged cell's attention already counts the tokens it stands for).
/// `Sigma::Layer`'s σ depends on the whole event, so `apply_layer` resolves it per head
/// (`head_sigmas`) and passes it as `Fixed`; a `Layer(s)` given here directly is read as fixed.
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
            Sigma::Adaptive | Sigma::Attention | Sigma::Relative(_) => {
                // 2σ² = c·d̄²: c = 1 for the adaptive kernel, 2r² for a relative one.
                let c = match sigma {
                    Sigma::Relative(r) => 2.0 * r * r,
                    _ => 1.0,
                };
                let dbar = d2.iter().map(|d| d.max(0.0).sqrt()).sum::<f32>() / d2.len() as f32;
                for (o, d) in out.iter_mut().zip(d2) {
                    *o = if dbar > 0.0 {
                        (-d.max(0.0) / (c * dbar * dbar)).exp()
                    } else {
                        1.0
                    };
                }
            }
            Sigma::Fixed(s) | Sigma::Layer(s) => {
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

/// Brings back into its channel's range over the member `rows` (each `out.len()` wide) every
/// element of `out` beyond `lim`, the largest magnitude the cache type holds. A merge is a
/// convex combination, but weights whose sum rounds to just over 1 carry it past members at
/// the type's maximum, where the encoder would write ±inf. On ordinary data nothing is beyond
/// `lim`, so no bit changes; a NaN (from a NaN member) is left as it is.
fn clamp_to_members(out: &mut [f32], rows: &[f32], lim: f32) {
    if beyond(out, lim) {
        clamp_beyond(out, rows, lim);
    }
}

/// Whether an element of `out` is beyond `lim`. Almost always none is: a branch-free test
/// over lanes of 8 (which the compiler vectorizes) replaces a compare and branch per element.
fn beyond(out: &[f32], lim: f32) -> bool {
    let any = |c: &[f32]| c.iter().fold(false, |b, x| b | (x.abs() > lim));
    let (body, rest) = out.split_at(out.len() - out.len() % 8);
    body.chunks_exact(8).any(any) || any(rest)
}

/// [`clamp_to_members`] once [`beyond`] said something is: the member `rows` (decoded) give
/// each such element's range.
fn clamp_beyond(out: &mut [f32], rows: &[f32], lim: f32) {
    let width = out.len();
    for (c, x) in out.iter_mut().enumerate() {
        if x.abs() > lim {
            let (lo, hi) = rows
                .chunks_exact(width)
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), r| {
                    (lo.min(r[c]), hi.max(r[c]))
                });
            *x = x.max(lo).min(hi);
        }
    }
}

/// [`clamp_to_members`] over members that were read in place (f16): they are decoded into
/// `buf` only in the rare event that something is beyond `lim`.
fn clamp_to_rows(out: &mut [f32], rows: &[&[f16]], buf: &mut [f32], lim: f32) {
    if beyond(out, lim) {
        let w = out.len();
        for (r, b) in rows.iter().zip(buf.chunks_exact_mut(w)) {
            r[..w].convert_to_f32_slice(b);
        }
        clamp_beyond(out, &buf[..rows.len() * w], lim);
    }
}

/// Saturates at ±`lim` the elements of a sum that is not convex (the paper's values times
/// the member count, CaM's folds), which may exceed the type's range: its largest finite
/// value is nearer to the sum than the ±inf the encoder would write.
fn saturate(out: &mut [f32], lim: f32) {
    for x in out.iter_mut().filter(|x| x.abs() > lim) {
        *x = lim.copysign(*x);
    }
}

/// Puts member `j`'s squared key distance to the pivot (member `jp`) in KV head `h` at
/// `d2[h·m + j]`. f16 keys are read where they lie and their rows returned, for the merge to
/// read them again (from cache) the same way; other types are decoded into `keys`, and `None`
/// says so.
fn read_distances<'l>(
    plan: &Plan,
    mem: &[usize],
    jp: usize,
    l: &'l LayerMut<'_>,
    keys: &mut [f32],
    d2: &mut [f32],
) -> Option<Vec<&'l [f16]>> {
    let g = l.geom;
    let (m, wk) = (mem.len(), g.n_head * g.dk);
    let rows: Option<Vec<&[f16]>> = mem
        .iter()
        .map(|&i| l.k_f16(plan.cells[i] as usize))
        .collect();
    if let Some(rows) = rows {
        l.kern()
            .head_sqdists_f16(&rows, g.dk, jp, &mut d2[..g.n_head * m]);
        return Some(rows);
    }
    for (j, &i) in mem.iter().enumerate() {
        l.read_k_row(plan.cells[i] as usize, &mut keys[j * wk..(j + 1) * wk]);
    }
    l.kern()
        .head_sqdists_f32(&keys[..m * wk], wk, g.dk, jp, &mut d2[..g.n_head * m]);
    None
}

/// For `Sigma::Layer(r)`, each KV head's σ for this layer: `r` times the root-mean-square
/// distance of every merged member to its pivot (non-finite distances left out). A head whose
/// members all sit on their pivots gets an infinite σ, so they keep their full weights. The
/// sum runs over the sets in plan order, so σ does not depend on the thread count. `None` for
/// every other mode.
fn head_sigmas(
    plan: &Plan,
    merged: &[(usize, &Vec<usize>)],
    l: &LayerMut<'_>,
    keys: &mut [f32],
    d2: &mut [f32],
) -> Option<Vec<f32>> {
    let Sigma::Layer(r) = plan.params.sigma else {
        return None;
    };
    let g = l.geom;
    let mut acc = SigmaAcc::new(g.n_head);
    for &(sid, mem) in merged {
        let jp = pivot_index(plan, sid, mem);
        read_distances(plan, mem, jp, l, keys, d2);
        acc.add(&d2[..g.n_head * mem.len()], mem.len(), jp);
    }
    Some(acc.sigmas(r))
}

/// The sums behind `Sigma::Layer`'s per-head σ, fed one set at a time in plan order.
pub struct SigmaAcc {
    sum: Vec<f64>,
    n: Vec<usize>,
}

impl SigmaAcc {
    pub fn new(n_head: usize) -> Self {
        SigmaAcc {
            sum: vec![0f64; n_head],
            n: vec![0usize; n_head],
        }
    }

    /// One set's `d2` (`h·m + j`), its `m` members and its pivot `jp`.
    pub fn add(&mut self, d2: &[f32], m: usize, jp: usize) {
        for h in 0..self.sum.len() {
            for j in (0..m).filter(|&j| j != jp) {
                let d2 = d2[h * m + j];
                if d2.is_finite() {
                    self.sum[h] += d2 as f64;
                    self.n[h] += 1;
                }
            }
        }
    }

    /// `r` times each head's rms member distance, or infinite where it is 0.
    pub fn sigmas(&self, r: f32) -> Vec<f32> {
        self.sum
            .iter()
            .zip(&self.n)
            .map(|(&s, &k)| {
                let rms = if k > 0 {
                    (s / k as f64).sqrt() as f32
                } else {
                    0.0
                };
                if rms > 0.0 {
                    r * rms
                } else {
                    f32::INFINITY
                }
            })
            .collect()
    }
}

/// Index, within the set's members, of its surviving cell.
pub fn pivot_index(plan: &Plan, sid: usize, mem: &[usize]) -> usize {
    let piv = plan.survivor[sid] as usize;
    mem.iter()
        .position(|&i| i == piv)
        .expect("survivor is a member")
}

/// Every head's weights of one set (`w[h·m + j]`) from its distances `d2` (same layout):
/// [`weights`] with the set's counts and attention, σ per head for `Sigma::Layer`.
#[allow(clippy::too_many_arguments)]
pub fn set_weights(
    plan: &Plan,
    sigma_h: Option<&[f32]>,
    mem: &[usize],
    jp: usize,
    n_head: usize,
    d2: &[f32],
    cnt: &mut [f32],
    att: &mut [f32],
    w: &mut [f32],
) {
    let m = mem.len();
    let has_attn = !plan.attn_in.is_empty();
    for (c, &i) in cnt.iter_mut().zip(mem) {
        *c = plan.counts_in[i] as f32;
    }
    if has_attn {
        for (a, &i) in att.iter_mut().zip(mem) {
            *a = plan.attn_in[i];
        }
    }
    for h in 0..n_head {
        weights(
            sigma_h.map_or(plan.params.sigma, |s| Sigma::Fixed(s[h])),
            &d2[h * m..(h + 1) * m],
            &cnt[..m],
            has_attn.then(|| &att[..m]),
            jp,
            &mut w[h * m..(h + 1) * m],
        );
    }
}

/// Bytes up to which a row read in place is asked for ahead (see `apply_layer`). Measured on
/// the bench: 2 KiB rows (8 KV heads × 128) 34.5 → 29.9 ms asked for whole; 8 KiB rows (32 ×
/// 128) 96 ms left alone, 111 ms asked for whole, 103 ms asking for their first lines.
const SHORT_ROW: usize = 4096;

fn apply_layer(plan: &Plan, merged: &[(usize, &Vec<usize>)], l: &mut LayerMut<'_>) {
    let g = l.geom;
    let kern = l.kern();
    let p = &plan.params;
    let (wk, wv) = (g.n_head * g.dk, g.n_head * g.dv);
    let max_m = merged.iter().map(|(_, m)| m.len()).max().unwrap_or(0);
    // Whole rows (all heads) are read and written at once: one decode per member row instead
    // of one per head keeps the per-call overhead small for narrow heads.
    let mut keys = vec![0f32; max_m * wk];
    let mut vals = vec![0f32; max_m.max(1) * wv];
    let mut out_k = vec![0f32; wk];
    let mut out_v = vec![0f32; wv];
    let mut d2 = vec![0f32; g.n_head * max_m];
    let mut w = vec![0f32; g.n_head * max_m];
    let mut cnt = vec![0f32; max_m];
    let mut att = vec![0f32; max_m];
    let sigma_h = head_sigmas(plan, merged, l, &mut keys, &mut d2);
    // f16 rows are read where they lie (exact widening, so the same bits as decoded rows);
    // other types are decoded into `keys` and `vals` first.
    let k_in_place = g.k.ty == GgmlType::F16;
    let v_in_place = g.v.ty == GgmlType::F16 && !g.v_trans;
    let short = |ty: GgmlType, w: usize| ty.row_size(w) <= SHORT_ROW;
    let (ask_k, ask_v) = (short(g.k.ty, wk), short(g.v.ty, wv));
    for (k, &(sid, mem)) in merged.iter().enumerate() {
        // The members' rows are scattered over a cache the model's last pass has just pushed
        // out of the CPU caches; asking for a later set's rows now overlaps those misses with
        // this set's arithmetic. Rows read in place (f16) are asked for whole, into L2, up to
        // `SHORT_ROW` bytes; longer ones are left to the hardware prefetcher, which follows a
        // set's neighbouring members, the sets coming in position order (measured in
        // docs/findings.md, "bench-in-place").
        if let Some(&(_, ahead)) = merged.get(k + PREFETCH_AHEAD) {
            for &i in ahead {
                let c = plan.cells[i] as usize;
                // Keys are read for the distances even when they are not merged.
                match (k_in_place, ask_k) {
                    (true, true) => l.prefetch_k_row_all(c),
                    (false, _) => l.prefetch_k_row(c),
                    (true, false) => {}
                }
                if p.merge_values {
                    match (v_in_place, ask_v) {
                        (true, true) => l.prefetch_v_row_all(c),
                        (false, _) => l.prefetch_v_row(c),
                        (true, false) => {}
                    }
                }
            }
        }
        let m = mem.len();
        let jp = pivot_index(plan, sid, mem);
        let pc = plan.cells[mem[jp]] as usize;
        let krows = read_distances(plan, mem, jp, l, &mut keys, &mut d2);
        set_weights(
            plan,
            sigma_h.as_deref(),
            mem,
            jp,
            g.n_head,
            &d2,
            &mut cnt,
            &mut att,
            &mut w,
        );
        let wm = &w[..g.n_head * m];
        if p.merge_keys {
            let lim = g.k.ty.max_finite();
            match krows {
                Some(rows) => {
                    kern.weighted_heads_f16(&rows, g.dk, wm, &mut out_k);
                    clamp_to_rows(&mut out_k, &rows, &mut keys, lim);
                }
                None => {
                    kern.weighted_heads_f32(&keys, g.dk, wm, &mut out_k);
                    clamp_to_members(&mut out_k, &keys[..m * wk], lim);
                }
            }
            l.write_k_row(pc, &out_k);
        }
        if p.merge_values {
            let lim = g.v.ty.max_finite();
            let vrows: Option<Vec<&[f16]>> = mem
                .iter()
                .map(|&i| l.v_f16(plan.cells[i] as usize))
                .collect();
            match vrows {
                Some(rows) => {
                    kern.weighted_heads_f16(&rows, g.dv, wm, &mut out_v);
                    clamp_to_rows(&mut out_v, &rows, &mut vals, lim);
                }
                None => {
                    for (j, &i) in mem.iter().enumerate() {
                        l.read_v_row(plan.cells[i] as usize, &mut vals[j * wv..(j + 1) * wv]);
                    }
                    kern.weighted_heads_f32(&vals, g.dv, wm, &mut out_v);
                    clamp_to_members(&mut out_v, &vals[..m * wv], lim);
                }
            }
            if p.value_mode == ValueMode::Paper {
                out_v.iter_mut().for_each(|x| *x *= m as f32);
                saturate(&mut out_v, lim);
            }
            l.write_v_row(pc, &out_v);
        }
    }
    if p.method == Method::Cam {
        for fold in &plan.cam {
            let tc = plan.cells[fold.target] as usize;
            l.read_v_row(tc, &mut out_v);
            let src = &mut vals[..wv];
            for &(e, wt) in &fold.sources {
                l.read_v_row(plan.cells[e] as usize, src);
                kern.axpy_f32(&mut out_v, wt, src);
            }
            saturate(&mut out_v, g.v.ty.max_finite());
            l.write_v_row(tc, &out_v);
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

    #[test]
    fn relative_sigma_scales_the_adaptive_kernel() {
        let d2 = [0.0, 4.0, 9.0, 0.25];
        let counts = [1.0, 2.0, 1.0, 1.0];
        let (mut a, mut r) = ([0f32; 4], [0f32; 4]);
        weights(Sigma::Adaptive, &d2, &counts, None, 0, &mut a);
        weights(
            Sigma::Relative(0.5f32.sqrt()),
            &d2,
            &counts,
            None,
            0,
            &mut r,
        );
        for (x, y) in a.iter().zip(&r) {
            assert!((x - y).abs() < 1e-6, "{a:?} {r:?}");
        }
        // a wider kernel moves weight from the pivot to the far members
        weights(Sigma::Relative(1.3), &d2, &counts, None, 0, &mut r);
        assert!(r[0] < a[0] && r[2] > a[2], "{a:?} {r:?}");
        // a pivot and one member: the member's kernel weight is exp(−2/r²) at any distance
        for d in [1e-3f32, 1.0, 1e3] {
            let mut w = [0f32; 2];
            weights(
                Sigma::Relative(0.85),
                &[0.0, d * d],
                &[1.0, 1.0],
                None,
                0,
                &mut w,
            );
            let g = (-2.0f32 / (0.85 * 0.85)).exp();
            assert!((w[1] - g / (1.0 + g)).abs() < 1e-6, "{w:?} at {d}");
        }
    }
}
