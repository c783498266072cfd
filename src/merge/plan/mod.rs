//! Step 1 of a compression event: who leaves, who merges with whom, who survives.
//!
//! The window is the host's list of cells in position order. Every method ends in the same
//! description: each window cell belongs to the set of one surviving cell (itself, when it is
//! not merged) or is evicted. Sets are runs of consecutive window cells for the merging
//! methods. Exactly `n_free` cells are freed.
//!
//! KVMerger (docs/method.md, "Our reading": sets, budget, pivot, counts). Protect the sinks
//! (the first `n_sink` window cells), the recent window (the last `n_recent`) and the heavy
//! hitters (`round(heavy_frac · n)` cells besides those, the most attended). A link joins
//! window cells `i` and `i+1` when both are unprotected; links are taken in descending score
//! (the mean adjacent-key cosine, or its calibrated form, plus an optional age bias) until
//! `n_free` links are taken, since every taken link frees exactly one cell. Links under the
//! similarity floor, or that would make a set longer than `max_set` cells or stand for more
//! than `max_count` tokens, are skipped; when that leaves the budget unmet, whole unprotected
//! sets are evicted, least attended (by their most attended member; without attention: oldest)
//! first, and reported as `n_evicted` (each evicted set frees one more cell than merging it
//! did). In each merged set the pivot, the cell that survives, is the member with the most
//! attention, or without attention the member nearest the set's count-weighted mean key. Ties
//! always go to the older cell so the plan is a pure function of its inputs (EVICT_FOLD's split
//! is the one exception, see `evict_fold.rs`).
//!
//! Every rule is stated for hosts in the header (`kvm_method` in `ffi/views.rs`) and checked
//! by `tests/plan_rules.rs`; a change here changes both.
//!
//! Here: the protections, the dispatch, eviction by position or attention (context shift,
//! StreamingLLM, H2O) and the assembly of a plan. KVMerger (`kvmerger.rs`), EVICT_FOLD
//! (`evict_fold.rs`) and CaM's value folds (`cam.rs`) have a file each; every method reads the
//! event through one checked `Window`.

mod cam;
mod evict_fold;
mod kvmerger;

use super::calib::Calib;
use super::scores::{HostKeys, KeyStats};
use super::{Exec, Method, Params};
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

/// What the host asks of one event: the window's cells in position order, the attention each
/// received and the tokens each stands for (both per window cell), and how many cells to free.
#[derive(Clone, Copy, Debug)]
pub struct Event<'a> {
    pub cells: &'a [u32],
    pub attn: Option<&'a [f32]>,
    pub counts: Option<&'a [u32]>,
    pub n_free: usize,
}

/// The window as every method reads it, checked: the key statistics of its layers (host rows
/// or a device cache) and each layer's KV head count, the cells, the attention (only for a
/// method that reads it), the tokens each cell stands for, and which cells are protected.
struct Window<'a, S> {
    keys: &'a S,
    heads: Vec<usize>,
    cells: &'a [u32],
    attn: Option<&'a [f32]>,
    counts: &'a [u32],
    prot: Protected,
}

impl<S> Window<'_, S> {
    /// Unprotected cells, least attended (or, without attention, oldest) first.
    fn eviction_order(&self) -> Vec<usize> {
        let prot = &self.prot;
        let mut c: Vec<usize> = (0..prot.any.len()).filter(|&i| !prot.any[i]).collect();
        if let Some(a) = self.attn {
            c.sort_by(|&x, &y| a[x].total_cmp(&a[y]).then(x.cmp(&y)));
        }
        c
    }
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

/// Plans one compression event.
pub fn plan<L: LayerRows + Sync>(
    ex: &Exec,
    params: &Params,
    calib: Option<&Calib>,
    layers: &[L],
    event: Event,
) -> Result<Plan> {
    let geoms: Vec<LayerGeom> = layers.iter().map(|l| *l.geom()).collect();
    plan_with(params, calib, &geoms, &HostKeys { ex, layers }, event)
}

/// [`plan`] with the key statistics from `keys` (host rows or a device cache) for layers of
/// the shapes `geoms`.
pub fn plan_with(
    params: &Params,
    calib: Option<&Calib>,
    geoms: &[LayerGeom],
    keys: &impl KeyStats,
    event: Event,
) -> Result<Plan> {
    params.check()?;
    let Event {
        cells,
        attn,
        counts,
        n_free,
    } = event;
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
        c.check_fits(geoms.len())?;
    }
    // Checked above either way; the methods that choose by position never see it.
    let attn = attn.filter(|_| params.method.reads_attention());
    let win = Window {
        keys,
        heads: geoms.iter().map(|g| g.n_head).collect(),
        cells,
        attn,
        counts: &counts_in,
        prot: protect(params, n, attn),
    };
    let n_free_max = match params.method {
        Method::ContextShift => n,
        Method::StreamingLlm => n - win.prot.sink.iter().filter(|&&s| s).count(),
        _ => win.prot.any.iter().filter(|&&p| !p).count(),
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
            for &i in win.eviction_order().iter().take(n_free) {
                owner[i] = None;
            }
        }
        Method::Cam => {
            for &i in win.eviction_order().iter().take(n_free) {
                owner[i] = None;
            }
            cam = cam::folds(params, &win, &owner);
        }
        Method::KvMerger => kvmerger::plan(params, calib, &win, n_free, &mut owner)?,
        Method::EvictFold => evict_fold::plan(params, &win, n_free, &mut owner)?,
    }
    let attn_in = attn.map_or_else(Vec::new, <[f32]>::to_vec);
    let plan = finish(
        cells,
        counts_in,
        attn_in,
        &owner,
        cam,
        geoms.to_vec(),
        *params,
    );
    debug_assert_eq!(plan.freed.len(), n_free);
    Ok(plan)
}
