//! Key similarities, read straight from the cache.
//!
//! A cell is one token in every layer and head, so whatever decides that two cells become one
//! must look at all layers at once. The link score of window cells `i` and `i+1` is the mean,
//! over layers and KV heads, of the cosine of their keys (docs/method.md, "One set for all
//! layers, weights per head"). Each layer is one
//! rayon task producing its own per-link vector; the vectors are then added in layer order, so
//! the result does not depend on how many threads ran.

use rayon::prelude::*;

use super::calib::Calib;
use super::Exec;
use crate::codec::GgmlType;
use crate::error::Result;
use crate::layout::{LayerRows, PREFETCH_AHEAD};
use crate::simd::Kernels;

/// Cosine that treats zero vectors and non-finite data as "not similar" (−1), so a broken or
/// empty row never attracts a merge.
#[inline]
fn cosine(dot: f32, n2a: f32, n2b: f32) -> f32 {
    let den = (n2a * n2b).sqrt();
    let c = dot / den;
    if den > 0.0 && c.is_finite() {
        c.clamp(-1.0, 1.0)
    } else {
        -1.0
    }
}

/// Per layer, the head-mean cosine of each adjacent pair of window cells (`cells.len() − 1`
/// values).
pub fn layer_adjacent<L: LayerRows>(layer: &L, cells: &[u32]) -> Vec<f32> {
    let g = layer.geom();
    let kern = layer.kern();
    let n = cells.len();
    if n < 2 {
        return Vec::new();
    }
    let mut out = vec![0f32; n - 1];
    let mut dots = vec![0f32; g.n_head];
    let mut norms = vec![0f32; g.n_head];
    let mut prev_norms = vec![0f32; g.n_head];
    let mut add = |i: usize, dots: &[f32], norms: &[f32], prev_norms: &[f32]| {
        if i > 0 {
            for h in 0..g.n_head {
                out[i - 1] += cosine(dots[h], norms[h], prev_norms[h]);
            }
        }
    };
    if g.k.ty == GgmlType::F16 {
        // f16 keys are read where they lie: each dot widens its lanes as it loads them, which
        // is exact, so the bits are those of the decoded rows below; the decode's write and
        // re-read of every row in f32 was most of this loop's time. The previous row is still
        // in L1 when it is read again.
        let row = |c: u32| layer.k_f16(c as usize).expect("f16 keys");
        let mut prev = row(cells[0]);
        for (i, &c) in cells.iter().enumerate() {
            if let Some(&ahead) = cells.get(i + ROWS_AHEAD) {
                layer.prefetch_k_row_all(ahead as usize);
            }
            let cur = row(c);
            kern.head_dots_f16(cur, prev, g.dk, &mut dots, &mut norms);
            add(i, &dots, &norms, &prev_norms);
            prev = cur;
            std::mem::swap(&mut norms, &mut prev_norms);
        }
    } else {
        // Each row decoded once, all heads in one call, and the previous one kept: the dots
        // then run on f32 without converting any row twice, and one kernel call per row gives
        // every head's dot with the previous row and its own norm (a call per dot cost as much
        // as the 64-channel dots themselves).
        let mut cur = vec![0f32; g.n_head * g.dk];
        let mut prev = vec![0f32; g.n_head * g.dk];
        for (i, &c) in cells.iter().enumerate() {
            layer.read_k_row(c as usize, &mut cur);
            kern.head_dots_f32(&cur, &prev, g.dk, &mut dots, &mut norms);
            add(i, &dots, &norms, &prev_norms);
            std::mem::swap(&mut cur, &mut prev);
            std::mem::swap(&mut norms, &mut prev_norms);
        }
    }
    let inv = 1.0 / g.n_head as f32;
    out.iter_mut().for_each(|v| *v *= inv);
    out
}

/// How many rows ahead [`layer_adjacent`] asks for a whole f16 row: enough to cover a miss
/// while the row between is read (whole rows, so fewer are needed than `PREFETCH_AHEAD`).
const ROWS_AHEAD: usize = 2;

/// Link scores of a window.
pub struct Links {
    /// Mean over layers and KV heads of the adjacent-key cosine (what a floor is compared to).
    pub mean_cos: Vec<f32>,
    /// What links are ranked by: `mean_cos`, or with a calibration profile the mean over layers
    /// of each layer's standardized cosine `(cos − μ_l) / σ_l`.
    pub rank: Vec<f32>,
}

pub fn links<L: LayerRows + Sync>(
    ex: &Exec,
    layers: &[L],
    cells: &[u32],
    calib: Option<&Calib>,
) -> Links {
    let heads: Vec<usize> = layers.iter().map(|l| l.geom().n_head).collect();
    links_from(&adjacent_per_layer(ex, layers, cells), &heads, calib)
}

/// Every layer's [`layer_adjacent`], one rayon task per layer.
pub fn adjacent_per_layer<L: LayerRows + Sync>(
    ex: &Exec,
    layers: &[L],
    cells: &[u32],
) -> Vec<Vec<f32>> {
    ex.pool.install(|| {
        layers
            .par_iter()
            .map(|l| layer_adjacent(l, cells))
            .collect()
    })
}

/// [`Links`] from each layer's head-mean adjacent cosines (`per_layer[l]`, one per link) and
/// the layers' KV head counts. Layers are added in order, wherever the cosines were computed,
/// so host and device statistics rank links by the same arithmetic.
pub fn links_from(per_layer: &[Vec<f32>], heads: &[usize], calib: Option<&Calib>) -> Links {
    let n = per_layer.first().map_or(0, Vec::len);
    let mut mean_cos = vec![0f32; n];
    let mut rank = vec![0f32; n];
    let mut wsum = 0f32;
    for (il, (cos, &h)) in per_layer.iter().zip(heads).enumerate() {
        // Every (layer, head) pair counts once, as in "mean over layers and KV heads".
        let w = h as f32;
        wsum += w;
        let (mu, inv_sd) = calib.map_or((0.0, 1.0), |c| c.standardizer(il));
        for i in 0..n {
            mean_cos[i] += w * cos[i];
            rank[i] += w * (cos[i] - mu) * inv_sd;
        }
    }
    mean_cos.iter_mut().for_each(|v| *v /= wsum);
    rank.iter_mut().for_each(|v| *v /= wsum);
    Links { mean_cos, rank }
}

/// Mean over layers and heads of cos(k_a, k_b) for each pair (window indices).
pub fn pair_sims<L: LayerRows + Sync>(
    ex: &Exec,
    layers: &[L],
    cells: &[u32],
    pairs: &[(usize, usize)],
) -> Vec<f32> {
    let heads: Vec<usize> = layers.iter().map(|l| l.geom().n_head).collect();
    pair_sims_from(&pair_cos_per_layer(ex, layers, cells, pairs), &heads)
}

/// Per layer, the sum over KV heads of cos(k_a, k_b) for each pair.
pub fn pair_cos_per_layer<L: LayerRows + Sync>(
    ex: &Exec,
    layers: &[L],
    cells: &[u32],
    pairs: &[(usize, usize)],
) -> Vec<Vec<f32>> {
    // The pairs come in runs that reuse a few rows (a leaving cell with both neighbours, a
    // survivor with every cell of the run beside it), so each layer streams through them with
    // a handful of decoded rows, the least recently used one replaced: every row is decoded
    // about once, and nothing the size of the window is allocated or written (a table of
    // every row in f32 cost more than the dots). A row's norms are computed the first time it
    // is a pair's second member; the first member's come with the pair's own call. Widening
    // is exact and `head_dots_f32` gives `dot_f32`'s bits, which are `dot_f16`'s on the same
    // halves, so the similarities are those of per-head dots straight from f16. The rows are
    // cold after the model's pass, so the rows of a later pair are asked for ahead.
    ex.pool.install(|| {
        layers
            .par_iter()
            .map(|l| {
                if l.geom().k.ty == GgmlType::F16 {
                    pair_cos_f16(l, ex.kern, cells, pairs)
                } else {
                    pair_cos_decoded(l, ex.kern, cells, pairs)
                }
            })
            .collect()
    })
}

/// The sum over heads of the cosines from each head's dot and two squared norms.
fn cos_sum(dots: &[f32], na: &[f32], nb: &[f32]) -> f32 {
    (0..dots.len()).map(|h| cosine(dots[h], na[h], nb[h])).sum()
}

/// The window cells of pair `k + PREFETCH_AHEAD` that the pair before it does not have: the
/// rows a loop at pair `k` asks for.
fn new_ahead(pairs: &[(usize, usize)], k: usize) -> impl Iterator<Item = usize> + '_ {
    pairs
        .get(k + PREFETCH_AHEAD)
        .into_iter()
        .flat_map(move |&(fa, fb)| {
            let (pa, pb) = pairs[k + PREFETCH_AHEAD - 1];
            [fa, fb].into_iter().filter(move |&f| f != pa && f != pb)
        })
}

/// One layer of [`pair_cos_per_layer`] on decoded rows.
fn pair_cos_decoded<L: LayerRows>(
    l: &L,
    kern: &Kernels,
    cells: &[u32],
    pairs: &[(usize, usize)],
) -> Vec<f32> {
    let g = l.geom();
    let mut rows = RowCache::new(g.n_head * g.dk, g.n_head);
    let mut dots = vec![0f32; g.n_head];
    let mut na = vec![0f32; g.n_head];
    pairs
        .iter()
        .enumerate()
        .map(|(k, &(a, b))| {
            for f in new_ahead(pairs, k) {
                l.prefetch_k_row(cells[f] as usize);
            }
            let sa = rows.get(l, cells, a, false);
            let sb = rows.get(l, cells, b, true);
            kern.head_dots_f32(rows.row(sa), rows.row(sb), g.dk, &mut dots, &mut na);
            cos_sum(&dots, &na, rows.norms(sb))
        })
        .collect()
}

/// One layer of [`pair_cos_per_layer`] on f16 keys read where they lie: nothing is decoded,
/// only the norms of the last few second members are kept. A row new to the loop is asked
/// for whole, a few pairs ahead, into L2.
fn pair_cos_f16<L: LayerRows>(
    l: &L,
    kern: &Kernels,
    cells: &[u32],
    pairs: &[(usize, usize)],
) -> Vec<f32> {
    let g = l.geom();
    let row = |i: usize| l.k_f16(cells[i] as usize).expect("f16 keys");
    let mut norms = NormCache::new(g.n_head);
    let mut dots = vec![0f32; g.n_head];
    let mut na = vec![0f32; g.n_head];
    let mut dz = vec![0f32; g.n_head];
    let mut nb = vec![0f32; g.n_head];
    let mut out = vec![0f32; pairs.len()];
    let mut k = 0;
    while k < pairs.len() {
        let (a, b) = pairs[k];
        // A leaving cell comes with both its survivors, (a, b) then (a, c): one pass over a.
        let both = pairs
            .get(k + 1)
            .filter(|&&(a2, _)| a2 == a)
            .map(|&(_, c)| c);
        for j in k..k + 1 + usize::from(both.is_some()) {
            for f in new_ahead(pairs, j) {
                l.prefetch_k_row_all(cells[f] as usize);
            }
        }
        let (ra, rb) = (row(a), row(b));
        nb.copy_from_slice(norms.get(b, |o| kern.head_norms_f16(rb, g.dk, o)));
        match both {
            Some(c) => {
                let rc = row(c);
                let nc = norms.get(c, |o| kern.head_norms_f16(rc, g.dk, o));
                kern.head_dots2_f16(ra, rb, rc, g.dk, &mut dots, &mut dz, &mut na);
                out[k] = cos_sum(&dots, &na, &nb);
                out[k + 1] = cos_sum(&dz, &na, nc);
                k += 2;
            }
            None => {
                kern.head_dots_f16(ra, rb, g.dk, &mut dots, &mut na);
                out[k] = cos_sum(&dots, &na, &nb);
                k += 1;
            }
        }
    }
    out
}

/// The per-head squared norms of the last few rows asked for, by window index; the least
/// recently used is replaced.
struct NormCache {
    n_head: usize,
    norms: Vec<f32>,
    tag: [usize; ROW_SLOTS],
    used: [u64; ROW_SLOTS],
    clock: u64,
}

impl NormCache {
    fn new(n_head: usize) -> NormCache {
        NormCache {
            n_head,
            norms: vec![0f32; ROW_SLOTS * n_head],
            tag: [usize::MAX; ROW_SLOTS],
            used: [0; ROW_SLOTS],
            clock: 0,
        }
    }

    /// Row `i`'s norms, computed by `fill` when they are not held.
    fn get(&mut self, i: usize, fill: impl FnOnce(&mut [f32])) -> &[f32] {
        self.clock += 1;
        let s = match self.tag.iter().position(|&t| t == i) {
            Some(s) => s,
            None => {
                let s = (0..ROW_SLOTS).min_by_key(|&s| self.used[s]).expect("slots");
                fill(&mut self.norms[s * self.n_head..(s + 1) * self.n_head]);
                self.tag[s] = i;
                s
            }
        };
        self.used[s] = self.clock;
        &self.norms[s * self.n_head..(s + 1) * self.n_head]
    }
}

/// [`pair_sims`] from [`pair_cos_per_layer`]'s sums, added in layer order.
pub fn pair_sims_from(per_layer: &[Vec<f32>], heads: &[usize]) -> Vec<f32> {
    let heads: f32 = heads.iter().map(|&h| h as f32).sum();
    let mut out = vec![0f32; per_layer.first().map_or(0, Vec::len)];
    for v in per_layer {
        for (o, x) in out.iter_mut().zip(v) {
            *o += x;
        }
    }
    out.iter_mut().for_each(|v| *v /= heads);
    out
}

/// A few decoded key rows of one layer, by window index, with each head's squared norm once
/// asked for; the least recently used row is replaced.
struct RowCache {
    w: usize,
    n_head: usize,
    rows: Vec<f32>,
    norms: Vec<f32>,
    /// Per slot: window index held (`usize::MAX`: none), norms computed, last use.
    tag: [usize; ROW_SLOTS],
    normed: [bool; ROW_SLOTS],
    used: [u64; ROW_SLOTS],
    clock: u64,
}

/// Rows a [`RowCache`] holds: a pair's two, the run's other neighbour, and one to spare.
const ROW_SLOTS: usize = 4;

impl RowCache {
    fn new(w: usize, n_head: usize) -> RowCache {
        RowCache {
            w,
            n_head,
            rows: vec![0f32; ROW_SLOTS * w],
            norms: vec![0f32; ROW_SLOTS * n_head],
            tag: [usize::MAX; ROW_SLOTS],
            normed: [false; ROW_SLOTS],
            used: [0; ROW_SLOTS],
            clock: 0,
        }
    }

    /// The slot holding window cell `i`'s key, decoded if it is not held, with its norms when
    /// `norms`.
    fn get<L: LayerRows>(&mut self, l: &L, cells: &[u32], i: usize, norms: bool) -> usize {
        self.clock += 1;
        let s = match self.tag.iter().position(|&t| t == i) {
            Some(s) => s,
            None => {
                let s = (0..ROW_SLOTS).min_by_key(|&s| self.used[s]).expect("slots");
                l.read_k_row(
                    cells[i] as usize,
                    &mut self.rows[s * self.w..(s + 1) * self.w],
                );
                self.tag[s] = i;
                self.normed[s] = false;
                s
            }
        };
        self.used[s] = self.clock;
        if norms && !self.normed[s] {
            let (row, nr) = (
                &self.rows[s * self.w..(s + 1) * self.w],
                &mut self.norms[s * self.n_head..(s + 1) * self.n_head],
            );
            // `dot_f32` per head: the bits `head_dots_f32` gives as a row's own norms.
            let dk = self.w / self.n_head;
            for (h, n) in nr.iter_mut().enumerate() {
                *n = l
                    .kern()
                    .dot_f32(&row[h * dk..(h + 1) * dk], &row[h * dk..(h + 1) * dk]);
            }
            self.normed[s] = true;
        }
        s
    }

    fn row(&self, s: usize) -> &[f32] {
        &self.rows[s * self.w..(s + 1) * self.w]
    }

    fn norms(&self, s: usize) -> &[f32] {
        &self.norms[s * self.n_head..(s + 1) * self.n_head]
    }
}

/// For each set (a list of window indices with their token counts), the squared distance of
/// every member's key to the set's count-weighted mean key, summed over layers and heads.
/// Returned per set, in member order. The query-free pivot is the member with the least.
pub fn mean_key_distances<L: LayerRows + Sync>(
    ex: &Exec,
    layers: &[L],
    cells: &[u32],
    sets: &[Vec<usize>],
    counts: &[u32],
) -> Vec<Vec<f32>> {
    mean_key_distances_from(&mean_dist_per_layer(ex, layers, cells, sets, counts), sets)
}

/// Per layer, per set, per member: the squared distance to the set's count-weighted mean key,
/// summed over the layer's KV heads.
pub fn mean_dist_per_layer<L: LayerRows + Sync>(
    ex: &Exec,
    layers: &[L],
    cells: &[u32],
    sets: &[Vec<usize>],
    counts: &[u32],
) -> Vec<Vec<Vec<f32>>> {
    ex.pool.install(|| {
        layers
            .par_iter()
            .map(|l| {
                let g = l.geom();
                let w = g.n_head * g.dk;
                let mut keys = Vec::new();
                let mut mean = vec![0f32; w];
                sets.iter()
                    .map(|set| {
                        // Whole rows at once; the mean is taken per head, and so is the
                        // distance, because the heads are separate spaces.
                        keys.resize(set.len() * w, 0.0);
                        let total: f32 = set.iter().map(|&i| counts[i] as f32).sum();
                        mean.iter_mut().for_each(|m| *m = 0.0);
                        for (j, &i) in set.iter().enumerate() {
                            let k = &mut keys[j * w..(j + 1) * w];
                            l.read_k_row(cells[i] as usize, k);
                            ex.kern.axpy_f32(&mut mean, counts[i] as f32 / total, k);
                        }
                        (0..set.len())
                            .map(|j| {
                                (0..g.n_head)
                                    .map(|h| {
                                        let r = h * g.dk..(h + 1) * g.dk;
                                        ex.kern.sqdist_f32(
                                            &keys[j * w..(j + 1) * w][r.clone()],
                                            &mean[r],
                                        )
                                    })
                                    .sum::<f32>()
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    })
}

/// [`mean_key_distances`] from [`mean_dist_per_layer`]'s sums, added in layer order.
pub fn mean_key_distances_from(per_layer: &[Vec<Vec<f32>>], sets: &[Vec<usize>]) -> Vec<Vec<f32>> {
    let mut out: Vec<Vec<f32>> = sets.iter().map(|s| vec![0f32; s.len()]).collect();
    for layer in per_layer {
        for (o, v) in out.iter_mut().zip(layer) {
            for (a, b) in o.iter_mut().zip(v) {
                *a += b;
            }
        }
    }
    out
}

/// The key statistics a plan reads, wherever the keys live. [`HostKeys`] reads host rows; the
/// CUDA path runs kernels next to a device cache and hands back the same per-layer vectors, so
/// the plan (on the host) combines them with the same `*_from` arithmetic either way.
pub trait KeyStats {
    /// [`adjacent_per_layer`].
    fn adjacent(&self, cells: &[u32]) -> Result<Vec<Vec<f32>>>;
    /// [`pair_cos_per_layer`].
    fn pair_cos(&self, cells: &[u32], pairs: &[(usize, usize)]) -> Result<Vec<Vec<f32>>>;
    /// [`mean_dist_per_layer`].
    fn mean_dist(
        &self,
        cells: &[u32],
        sets: &[Vec<usize>],
        counts: &[u32],
    ) -> Result<Vec<Vec<Vec<f32>>>>;
}

/// Key statistics from host rows.
pub struct HostKeys<'a, 'p, L> {
    pub ex: &'a Exec<'p>,
    pub layers: &'a [L],
}

impl<L: LayerRows + Sync> KeyStats for HostKeys<'_, '_, L> {
    fn adjacent(&self, cells: &[u32]) -> Result<Vec<Vec<f32>>> {
        Ok(adjacent_per_layer(self.ex, self.layers, cells))
    }
    fn pair_cos(&self, cells: &[u32], pairs: &[(usize, usize)]) -> Result<Vec<Vec<f32>>> {
        Ok(pair_cos_per_layer(self.ex, self.layers, cells, pairs))
    }
    fn mean_dist(
        &self,
        cells: &[u32],
        sets: &[Vec<usize>],
        counts: &[u32],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        Ok(mean_dist_per_layer(
            self.ex,
            self.layers,
            cells,
            sets,
            counts,
        ))
    }
}
