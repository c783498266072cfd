//! Step 1 of a compression event: who leaves, who merges with whom, who survives.
//!
//! The window is the host's list of cells in position order. Every method ends in the same
//! description: each window cell belongs to the set of one surviving cell (itself, when it is
//! not merged) or is evicted. Sets are runs of consecutive window cells for the merging
//! methods. Exactly `n_free` cells are freed.
//!
//! KVMerger (docs/method.md, "Our reading": sets, budget, pivot, counts).
//! Protect the sinks (the first `n_sink` window cells), the
//! recent window (the last `n_recent`) and the heavy hitters (the `heavy_frac` share of the
//! window with the most attention). A link joins window cells `i` and `i+1` when both are
//! unprotected; links are taken in descending score (the mean adjacent-key cosine, or its
//! calibrated form, plus an optional age bias) until `n_free` links are taken, since every
//! taken link frees exactly one cell. Links under the similarity floor, or that would make a
//! set longer than `max_set` cells or stand for more than `max_count` tokens, are skipped; when
//! that leaves the budget unmet, whole unprotected sets are evicted, least attended (without
//! attention: oldest) first, and reported as `n_evicted` (each evicted set frees one more cell
//! than merging it did). In each merged set the pivot, the cell that survives, is the member
//! with the most attention, or without attention the member nearest the set's mean key. Ties
//! always go to the older cell so the plan is a pure function of its inputs.

use super::calib::Calib;
use super::scores;
use super::{Exec, Method, Params, Pivot};
use crate::error::{Error, Result};
use crate::layout::{LayerGeom, LayerRows};

/// `set_of` entry of an evicted cell.
pub(crate) const EVICTED: u32 = u32::MAX;

/// CaM: an evicted value folded into a kept cell's value with a weight.
#[derive(Clone, Debug, PartialEq)]
pub struct CamFold {
    /// Window index of the kept cell that absorbs.
    pub target: usize,
    /// (window index of the evicted cell, weight).
    pub sources: Vec<(usize, f32)>,
}

#[derive(Clone, Debug)]
pub struct Plan {
    /// The window's cell ids, position order.
    pub cells: Vec<u32>,
    /// Per window cell: its set (sets numbered in position order of their survivor), or EVICTED.
    pub set_of: Vec<u32>,
    /// Per set: window index of the surviving cell.
    pub survivor: Vec<u32>,
    /// Cell ids freed, in position order.
    pub freed: Vec<u32>,
    /// Per set: tokens the survivor stands for after the merge.
    pub counts: Vec<u32>,
    /// Per window cell: tokens it stood for before.
    pub counts_in: Vec<u32>,
    /// Per window cell: accumulated attention given to plan_init (empty without).
    pub attn_in: Vec<f32>,
    /// Freed cells that were dropped rather than merged.
    pub n_evicted: usize,
    /// CaM value folding (empty for other methods).
    pub cam: Vec<CamFold>,
    /// The layers this plan was made on; apply checks them.
    pub geoms: Vec<LayerGeom>,
    pub params: Params,
}

impl Plan {
    /// Members (window indices, ascending) of every set.
    pub fn members(&self) -> Vec<Vec<usize>> {
        let mut m = vec![Vec::new(); self.survivor.len()];
        for (i, &s) in self.set_of.iter().enumerate() {
            if s != EVICTED {
                m[s as usize].push(i);
            }
        }
        m
    }
}

/// Which window cells are never freed.
struct Protected {
    any: Vec<bool>,
    sink: Vec<bool>,
}

fn protect(p: &Params, n: usize, attn: Option<&[f32]>) -> Protected {
    let mut any = vec![false; n];
    let mut sink = vec![false; n];
    match p.method {
        Method::ContextShift => {}
        Method::StreamingLlm => {
            for i in 0..p.n_sink.min(n) {
                any[i] = true;
                sink[i] = true;
            }
        }
        _ => {
            for i in 0..p.n_sink.min(n) {
                any[i] = true;
                sink[i] = true;
            }
            for flag in any.iter_mut().skip(n.saturating_sub(p.n_recent)) {
                *flag = true;
            }
            if let Some(a) = attn {
                let k = (p.heavy_frac as f64 * n as f64).round() as usize;
                let mut rest: Vec<usize> = (0..n).filter(|&i| !any[i]).collect();
                // Most attended first; ties to the older cell.
                rest.sort_by(|&x, &y| a[y].total_cmp(&a[x]).then(x.cmp(&y)));
                for &i in rest.iter().take(k) {
                    any[i] = true;
                }
            }
        }
    }
    Protected { any, sink }
}

/// Unprotected cells, least attended (or, without attention, oldest) first.
fn eviction_order(prot: &Protected, attn: Option<&[f32]>) -> Vec<usize> {
    let mut c: Vec<usize> = (0..prot.any.len()).filter(|&i| !prot.any[i]).collect();
    if let Some(a) = attn {
        c.sort_by(|&x, &y| a[x].total_cmp(&a[y]).then(x.cmp(&y)));
    }
    c
}

/// Builds a plan from `owner[i]`: the window index of the survivor whose set cell `i` joins
/// (`owner[s] == Some(s)` for survivors), or `None` when `i` is evicted.
fn finish(
    cells: &[u32],
    counts_in: Vec<u32>,
    attn_in: Vec<f32>,
    owner: &[Option<usize>],
    cam: Vec<CamFold>,
    geoms: Vec<LayerGeom>,
    params: Params,
) -> Plan {
    let n = cells.len();
    let mut sid = vec![EVICTED; n];
    let mut survivor = Vec::new();
    for i in 0..n {
        if owner[i] == Some(i) {
            sid[i] = survivor.len() as u32;
            survivor.push(i as u32);
        }
    }
    let mut counts = vec![0u32; survivor.len()];
    let mut set_of = vec![EVICTED; n];
    let mut freed = Vec::new();
    let mut n_evicted = 0;
    for i in 0..n {
        match owner[i] {
            Some(o) => {
                set_of[i] = sid[o];
                counts[sid[o] as usize] = counts[sid[o] as usize].saturating_add(counts_in[i]);
                if o != i {
                    freed.push(cells[i]);
                }
            }
            None => {
                n_evicted += 1;
                freed.push(cells[i]);
            }
        }
    }
    Plan {
        cells: cells.to_vec(),
        set_of,
        survivor,
        freed,
        counts,
        counts_in,
        attn_in,
        n_evicted,
        cam,
        geoms,
        params,
    }
}

/// Plans one compression event. `attn` and `counts` are per window cell.
#[allow(clippy::too_many_arguments)]
pub fn plan<L: LayerRows + Sync>(
    ex: &Exec,
    params: &Params,
    calib: Option<&Calib>,
    layers: &[L],
    cells: &[u32],
    attn: Option<&[f32]>,
    counts: Option<&[u32]>,
    n_free: usize,
) -> Result<Plan> {
    params.check()?;
    let n = cells.len();
    if let Some(a) = attn {
        if a.len() != n {
            return Err(Error::InvalidArg(format!(
                "attn has {} entries for {n} cells",
                a.len()
            )));
        }
        if let Some(i) = a.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidArg(format!(
                "attn[{i}] = {} is not finite",
                a[i]
            )));
        }
    }
    let counts_in = match counts {
        Some(c) if c.len() != n => {
            return Err(Error::InvalidArg(format!(
                "counts has {} entries for {n} cells",
                c.len()
            )))
        }
        Some(c) => {
            if let Some(i) = c.iter().position(|&v| v == 0) {
                return Err(Error::InvalidArg(format!(
                    "counts[{i}] is 0 (a cell stands for ≥ 1 token)"
                )));
            }
            c.to_vec()
        }
        None => vec![1; n],
    };
    if let Some(c) = calib {
        c.check_fits(layers.len())?;
    }
    let geoms: Vec<LayerGeom> = layers.iter().map(|l| *l.geom()).collect();
    let prot = protect(params, n, attn);
    let n_free_max = match params.method {
        Method::ContextShift => n,
        Method::StreamingLlm => n - prot.sink.iter().filter(|&&s| s).count(),
        _ => prot.any.iter().filter(|&&p| !p).count(),
    };
    if n_free > n_free_max {
        return Err(Error::Budget {
            want: n_free,
            can: n_free_max,
        });
    }
    let mut owner: Vec<Option<usize>> = (0..n).map(Some).collect();
    let mut cam = Vec::new();
    match params.method {
        Method::ContextShift | Method::StreamingLlm => {
            let first = n - n_free_max;
            for o in &mut owner[first..first + n_free] {
                *o = None;
            }
        }
        Method::H2o => {
            for &i in eviction_order(&prot, attn).iter().take(n_free) {
                owner[i] = None;
            }
        }
        Method::Cam => {
            for &i in eviction_order(&prot, attn).iter().take(n_free) {
                owner[i] = None;
            }
            cam = cam_folds(params, &prot, &owner, attn);
        }
        Method::KvMerger => kvmerger(
            ex, params, calib, layers, cells, attn, &counts_in, &prot, n_free, &mut owner,
        ),
        Method::EvictFold => evict_fold(
            ex, params, layers, cells, attn, &counts_in, &prot, n_free, &mut owner,
        ),
    }
    let attn_in = attn.map_or_else(Vec::new, <[f32]>::to_vec);
    let plan = finish(cells, counts_in, attn_in, &owner, cam, geoms, *params);
    debug_assert_eq!(plan.freed.len(), n_free);
    Ok(plan)
}

#[allow(clippy::too_many_arguments)]
fn kvmerger<L: LayerRows + Sync>(
    ex: &Exec,
    p: &Params,
    calib: Option<&Calib>,
    layers: &[L],
    cells: &[u32],
    attn: Option<&[f32]>,
    counts: &[u32],
    prot: &Protected,
    n_free: usize,
    owner: &mut [Option<usize>],
) {
    let n = cells.len();
    if n_free == 0 {
        return;
    }
    let links = scores::links(ex, layers, cells, calib);
    let n_links = n - 1;
    let age = |i: usize| {
        if n_links > 1 {
            1.0 - i as f32 / (n_links - 1) as f32
        } else {
            1.0
        }
    };
    let score = |i: usize| links.rank[i] + p.age_bias * age(i);
    let mut cand: Vec<usize> = (0..n_links)
        .filter(|&i| !prot.any[i] && !prot.any[i + 1])
        .filter(|&i| p.sim_floor.is_none_or(|f| links.mean_cos[i] >= f))
        .collect();
    cand.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));

    // Sets are runs, so a run is known by its two ends: `lo[hi_end]` and `hi[lo_end]`.
    let mut lo: Vec<usize> = (0..n).collect();
    let mut hi: Vec<usize> = (0..n).collect();
    // Tokens a run stands for, kept at its first cell.
    let mut tokens: Vec<u64> = counts.iter().map(|&c| u64::from(c)).collect();
    let mut linked = vec![false; n_links];
    let mut taken = 0;
    for &i in &cand {
        if taken == n_free {
            break;
        }
        // Link i joins the run ending at i with the run starting at i + 1.
        let (a, b) = (lo[i], hi[i + 1]);
        if p.max_set.is_some_and(|m| b - a + 1 > m) {
            continue;
        }
        let joined = tokens[a] + tokens[i + 1];
        if p.max_count.is_some_and(|m| joined > u64::from(m)) {
            continue;
        }
        tokens[a] = joined;
        linked[i] = true;
        hi[a] = b;
        lo[b] = a;
        taken += 1;
    }

    // Runs from the links taken.
    let mut sets: Vec<Vec<usize>> = Vec::new();
    for i in 0..n {
        if i == 0 || !linked[i - 1] {
            sets.push(Vec::new());
        }
        sets.last_mut().expect("a set was started").push(i);
    }

    // Budget not met (floor, max_set or max_count): evict whole unprotected sets, least
    // attended first.
    let mut evicted = vec![false; sets.len()];
    let short = n_free - taken;
    if short > 0 {
        let set_attn =
            |s: &Vec<usize>| attn.map_or(0.0, |a| s.iter().map(|&i| a[i]).fold(f32::MIN, f32::max));
        let mut order: Vec<usize> = (0..sets.len()).filter(|&s| !prot.any[sets[s][0]]).collect();
        order.sort_by(|&x, &y| {
            set_attn(&sets[x])
                .total_cmp(&set_attn(&sets[y]))
                .then(x.cmp(&y))
        });
        for &s in order.iter().take(short) {
            evicted[s] = true;
        }
    }

    // Pivots.
    let merged: Vec<usize> = (0..sets.len())
        .filter(|&s| !evicted[s] && sets[s].len() > 1)
        .collect();
    let pivots: Vec<usize> = match (p.pivot, attn) {
        (Pivot::Attention, Some(a)) => merged
            .iter()
            .map(|&s| {
                let m = &sets[s];
                // Most attention; ties to the older member.
                *m.iter()
                    .reduce(|b, x| if a[*x] > a[*b] { x } else { b })
                    .expect("non-empty")
            })
            .collect(),
        _ => {
            let ms: Vec<Vec<usize>> = merged.iter().map(|&s| sets[s].clone()).collect();
            let d = scores::mean_key_distances(ex, layers, cells, &ms, counts);
            ms.iter()
                .zip(&d)
                .map(|(m, d)| {
                    let j = (0..m.len())
                        .reduce(|b, x| if d[x] < d[b] { x } else { b })
                        .expect("non-empty");
                    m[j]
                })
                .collect()
        }
    };
    for (s, set) in sets.iter().enumerate() {
        if evicted[s] {
            set.iter().for_each(|&i| owner[i] = None);
        }
    }
    for (&s, &pv) in merged.iter().zip(&pivots) {
        sets[s].iter().for_each(|&i| owner[i] = Some(pv));
    }
}

/// Attention decides who leaves; each leaving cell joins the set of the surviving neighbour
/// its key is more similar to. Between two survivors a run of leaving cells is split where the
/// summed similarity is largest, so sets stay runs. Sinks never absorb anything; a leaving
/// cell with no survivor it may join, or one past the floor, `max_set` or `max_count` counting
/// outward from its survivor, is evicted.
#[allow(clippy::too_many_arguments)]
fn evict_fold<L: LayerRows + Sync>(
    ex: &Exec,
    p: &Params,
    layers: &[L],
    cells: &[u32],
    attn: Option<&[f32]>,
    counts: &[u32],
    prot: &Protected,
    n_free: usize,
    owner: &mut [Option<usize>],
) {
    let n = cells.len();
    // Cells and tokens each survivor holds so far, for `max_set` and `max_count`; a survivor
    // between two runs takes from the run on its left before the one on its right.
    let mut set_len = vec![1usize; n];
    let mut tokens: Vec<u64> = counts.iter().map(|&c| u64::from(c)).collect();
    let mut leaving = vec![false; n];
    for &i in eviction_order(prot, attn).iter().take(n_free) {
        leaving[i] = true;
    }
    // Maximal runs of leaving cells and the survivors that may absorb them.
    let mut runs: Vec<(usize, usize, Option<usize>, Option<usize>)> = Vec::new();
    let mut i = 0;
    while i < n {
        if !leaving[i] {
            i += 1;
            continue;
        }
        let a = i;
        while i < n && leaving[i] {
            i += 1;
        }
        let b = i - 1;
        let left = (a > 0 && !prot.sink[a - 1]).then(|| a - 1);
        let right = (b + 1 < n && !prot.sink[b + 1]).then_some(b + 1);
        runs.push((a, b, left, right));
    }
    let mut pairs = Vec::new();
    for &(a, b, l, r) in &runs {
        for e in a..=b {
            if let Some(l) = l {
                pairs.push((e, l));
            }
            if let Some(r) = r {
                pairs.push((e, r));
            }
        }
    }
    let sims = scores::pair_sims(ex, layers, cells, &pairs);
    let mut k = 0;
    for &(a, b, l, r) in &runs {
        let m = b - a + 1;
        let mut sl = vec![0f32; m];
        let mut sr = vec![0f32; m];
        for j in 0..m {
            if l.is_some() {
                sl[j] = sims[k];
                k += 1;
            }
            if r.is_some() {
                sr[j] = sims[k];
                k += 1;
            }
        }
        // Cells a..a+split go left, the rest right; choose the split with the most similarity.
        let split = match (l, r) {
            (None, None) => None,
            (Some(_), None) => Some(m),
            (None, Some(_)) => Some(0),
            (Some(_), Some(_)) => {
                let total_r: f32 = sr.iter().sum();
                let (mut best, mut best_v, mut acc) = (0, total_r, total_r);
                for j in 0..m {
                    acc += sl[j] - sr[j];
                    if acc > best_v {
                        best_v = acc;
                        best = j + 1;
                    }
                }
                Some(best)
            }
        };
        // Under a similarity floor a cell too unlike its neighbour is evicted instead of folded.
        // Sets must stay runs, so the left set ends at the first cell (counting outward from the
        // left survivor) below the floor and the right set likewise; the cells between are
        // evicted. Without a floor every cell is folded, as the split says.
        // The caps (`max_set`, `max_count`) cut a set the same way: a survivor folds in cells
        // outward from itself while it stays within them, and the rest are evicted.
        let above = |v: f32| p.sim_floor.is_none_or(|f| v >= f);
        let mut reach = |s: Option<usize>, order: &mut dyn Iterator<Item = usize>, sims: &[f32]| {
            let Some(s) = s else { return 0 };
            let mut k = 0;
            for j in order {
                let joined = tokens[s] + u64::from(counts[a + j]);
                if !above(sims[j])
                    || p.max_set.is_some_and(|c| set_len[s] + 1 > c)
                    || p.max_count.is_some_and(|c| joined > u64::from(c))
                {
                    break;
                }
                set_len[s] += 1;
                tokens[s] = joined;
                k += 1;
            }
            k
        };
        let (to_l, to_r) = match split {
            None => (0, 0),
            Some(s) => (s, m - s),
        };
        let reach_l = reach(l, &mut (0..to_l), &sl);
        let reach_r = reach(r, &mut (m - to_r..m).rev(), &sr);
        for j in 0..m {
            owner[a + j] = match split {
                None => None,
                Some(s) if j < s => l.filter(|_| j < reach_l),
                Some(_) => r.filter(|_| j >= m - reach_r),
            };
        }
    }
}

/// CaM, deterministic reading: an evicted cell's value is shared among the next `cam_span`
/// kept non-sink cells (the previous ones when none follow), each receiving `p / m` of it,
/// where `p = min(1, a_e / mean a_targets)` is CaM's merge probability taken in expectation.
fn cam_folds(
    p: &Params,
    prot: &Protected,
    owner: &[Option<usize>],
    attn: Option<&[f32]>,
) -> Vec<CamFold> {
    let n = owner.len();
    let kept: Vec<usize> = (0..n)
        .filter(|&i| owner[i].is_some() && !prot.sink[i])
        .collect();
    let mut acc: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n];
    for e in (0..n).filter(|&i| owner[i].is_none()) {
        let at = kept.partition_point(|&k| k < e);
        let targets: &[usize] = if at < kept.len() {
            &kept[at..(at + p.cam_span).min(kept.len())]
        } else {
            &kept[at.saturating_sub(p.cam_span)..at]
        };
        if targets.is_empty() {
            continue;
        }
        let prob = match attn {
            Some(a) => {
                let mt = targets.iter().map(|&t| a[t]).sum::<f32>() / targets.len() as f32;
                if mt > 0.0 {
                    (a[e] / mt).clamp(0.0, 1.0)
                } else {
                    1.0
                }
            }
            None => 1.0,
        };
        let w = prob / targets.len() as f32;
        for &t in targets {
            acc[t].push((e, w));
        }
    }
    acc.into_iter()
        .enumerate()
        .filter(|(_, s)| !s.is_empty())
        .map(|(target, sources)| CamFold { target, sources })
        .collect()
}
