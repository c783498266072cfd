//! Calls into the C ABI with the checks every target shares: a status from the expected set
//! (never `KVM_STATUS_PANIC`), a message after a failure, out-parameters untouched on failure,
//! and the plan's documented shape.

use std::ffi::CStr;
use std::ptr::{null, null_mut};

use kvmerger::ffi::*;

use crate::input::{In, Rng};

use kvm_status::*;

/// What an out-parameter holds before a call; a failing call must leave it.
pub const SENTINEL: usize = 0x8;

pub fn last_error() -> String {
    // SAFETY: kvm_last_error returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(kvm_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Panics unless `st` is one of `allowed`; a panic caught at the boundary is always a bug.
pub fn expect(st: kvm_status, allowed: &[kvm_status], what: &str) {
    if st == KVM_STATUS_PANIC {
        panic!("{what}: KVM_STATUS_PANIC: {}", last_error());
    }
    if !allowed.contains(&st) {
        panic!("{what}: {st:?} not in {allowed:?}: {}", last_error());
    }
    if st != KVM_STATUS_OK && last_error().is_empty() {
        panic!("{what}: {st:?} without a message");
    }
}

/// Parameters drawn from the input: mostly values the library distinguishes, sometimes ones
/// it must refuse.
pub fn read_params(r: &mut In) -> kvm_params {
    let mut p = kvm_params_default();
    if r.u8() < 16 {
        return p;
    }
    p.method = r.enum_i32(6);
    p.n_sink = r.small_u32(12);
    p.n_recent = r.small_u32(40);
    p.heavy_frac = r.pick_f32(&[0.05, 0.0, 0.2, 0.5, 1.0]);
    p.sim_floor = r.pick_f32(&[-2.0, -1.0, 0.0, 0.5, 0.9, 1.0]);
    p.pivot = r.enum_i32(2);
    p.sigma_mode = r.enum_i32(5);
    p.sigma = r.pick_f32(&[5.0, 1.0, 0.1, 1e-3, 100.0, 0.0]);
    p.value_mode = r.enum_i32(3);
    p.merge_keys = r.u8() >= 32;
    p.merge_values = r.u8() >= 32;
    p.age_bias = r.pick_f32(&[0.0, 1.0, 100.0, -1.0, 1e30]);
    p.max_set = r.small_u32(5);
    p.cam_span = r.small_u32(6);
    p.max_count = r.small_u32(8);
    p
}

/// A ctx, or the refusal (which must be INVALID_ARG with `*out` untouched).
pub fn ctx_init(p: &kvm_params) -> Result<Ctx, kvm_status> {
    let mut out = SENTINEL as *mut kvm_ctx;
    // SAFETY: valid pointers.
    let st = unsafe { kvm_ctx_init(p, &mut out) };
    expect(st, &[KVM_STATUS_OK, KVM_STATUS_INVALID_ARG], "kvm_ctx_init");
    if st != KVM_STATUS_OK {
        assert_eq!(out as usize, SENTINEL, "kvm_ctx_init wrote *out and failed");
        return Err(st);
    }
    assert!(!out.is_null());
    Ok(Ctx(out))
}

/// Two ctxs of the same parameters, one thread and `n` (≥ 2) threads: every target runs each
/// call on both and compares the bytes.
pub fn ctx_twins(p: &kvm_params, n: u32) -> Result<(Ctx, Ctx), kvm_status> {
    let (mut p1, mut p2) = (*p, *p);
    p1.n_threads = 1;
    p2.n_threads = n.max(2);
    match (ctx_init(&p1), ctx_init(&p2)) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (Err(a), Err(b)) if a == b => Err(a),
        (a, b) => panic!(
            "kvm_ctx_init depends on the thread count: {:?} vs {:?}",
            a.err(),
            b.err()
        ),
    }
}

/// `ctx_twins`, kept across inputs: starting thread pools dominated a run's time (55
/// inputs/s with ASan). Not for ctxs the caller frees; a caller that sets a profile clears
/// it again before it returns.
pub fn ctx_twins_cached(p: &kvm_params, n: u32) -> Result<std::rc::Rc<(Ctx, Ctx)>, kvm_status> {
    type Key = [u32; 17];
    thread_local! {
        static CACHE: std::cell::RefCell<std::collections::HashMap<Key, std::rc::Rc<(Ctx, Ctx)>>> =
            Default::default();
    }
    let key: Key = [
        n,
        p.method as u32,
        p.n_sink,
        p.n_recent,
        p.heavy_frac.to_bits(),
        p.sim_floor.to_bits(),
        p.pivot as u32,
        p.sigma_mode as u32,
        p.sigma.to_bits(),
        p.value_mode as u32,
        p.merge_keys as u32,
        p.merge_values as u32,
        p.age_bias.to_bits(),
        p.max_set,
        p.cam_span,
        p.max_count,
        p.n_threads,
    ];
    if let Some(t) = CACHE.with(|c| c.borrow().get(&key).cloned()) {
        return Ok(t);
    }
    let t = std::rc::Rc::new(ctx_twins(p, n)?);
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        // Each pair holds up to five threads; the fuzzer's mutations mostly keep an input's
        // parameters, so a small cache hits often.
        if c.len() >= 48 {
            c.clear();
        }
        c.insert(key, t.clone());
    });
    Ok(t)
}

pub struct Ctx(pub *mut kvm_ctx);

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: from kvm_ctx_init, freed once.
        unsafe { kvm_ctx_free(self.0) }
    }
}

pub struct Plan(pub *mut kvm_plan);

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: from kvm_plan_init, freed once.
        unsafe { kvm_plan_free(self.0) }
    }
}

pub use crate::common::PlanOut;

/// The window of one planning call.
pub struct Window {
    pub cells: Vec<u32>,
    pub attn: Option<Vec<f32>>,
    pub counts: Option<Vec<u32>>,
    pub n_free: u32,
    /// Distinct cells below the cache size, attention finite, counts ≥ 1: only the budget
    /// may refuse it (with valid params and views).
    pub valid: bool,
}

impl Window {
    pub fn read(r: &mut In, n_cells: usize) -> Window {
        let mut valid = true;
        let cells: Vec<u32> = match r.below(6) {
            0 | 1 => (0..n_cells as u32).collect(),
            2 => {
                let start = r.below(n_cells + 1);
                let len = r.below(n_cells - start + 1);
                (start as u32..(start + len) as u32).collect()
            }
            3 | 4 => {
                // A random subset in random order: position order need not be id order.
                let mut rng = Rng(r.u64());
                let mut ids: Vec<u32> = (0..n_cells as u32).collect();
                for i in (1..ids.len()).rev() {
                    ids.swap(i, rng.below(i + 1));
                }
                ids.truncate(r.below(n_cells + 1));
                ids
            }
            _ => {
                let n = r.below(n_cells + 3);
                let ids: Vec<u32> = (0..n)
                    .map(|_| {
                        let b = r.u8() as u32;
                        if b == 255 {
                            u32::MAX
                        } else {
                            b % (n_cells as u32 + 2)
                        }
                    })
                    .collect();
                let mut seen = vec![false; n_cells];
                for &c in &ids {
                    let c = c as usize;
                    if c >= n_cells || std::mem::replace(&mut seen[c], true) {
                        valid = false;
                    }
                }
                ids
            }
        };
        let n = cells.len();
        let attn = match r.below(4) {
            0 => None,
            1 | 2 => {
                let mut rng = Rng(r.u64());
                let scale = r.pick_f32(&[1.0, 0.0, 1e-30, 1e30, -1.0]);
                let mut a: Vec<f32> = (0..n).map(|_| rng.f32() * scale).collect();
                for _ in 0..r.below(3) {
                    if n > 0 {
                        let i = r.below(n);
                        a[i] = r.pick_f32(&[0.0, 1e38, -0.0, f32::NAN, f32::INFINITY]);
                    }
                }
                Some(a)
            }
            _ => {
                let raw: Vec<f32> = (0..r.below(8)).map(|_| r.f32()).collect();
                Some(
                    (0..n)
                        .map(|i| raw.get(i % raw.len().max(1)).copied().unwrap_or(0.0))
                        .collect(),
                )
            }
        };
        if attn
            .as_ref()
            .is_some_and(|a| a.iter().any(|x| !x.is_finite()))
        {
            valid = false;
        }
        let counts: Option<Vec<u32>> = match r.below(4) {
            0 | 1 => None,
            2 => {
                let mut rng = Rng(r.u64());
                let max = 1 + r.small_u32(8) as usize;
                Some((0..n).map(|_| 1 + rng.below(max) as u32).collect())
            }
            _ => {
                let raw: Vec<u32> = (0..r.below(6)).map(|_| r.small_u32(4)).collect();
                Some(
                    (0..n)
                        .map(|i| raw.get(i % raw.len().max(1)).copied().unwrap_or(1))
                        .collect(),
                )
            }
        };
        if counts.as_ref().is_some_and(|c| c.contains(&0)) {
            valid = false;
        }
        let n_free = if r.u8() < 248 {
            r.below(n + 2) as u32
        } else {
            r.u32()
        };
        Window {
            cells,
            attn,
            counts,
            n_free,
            valid,
        }
    }
}

/// `kvm_plan_init`; on failure checks that `*out` was not written.
pub fn plan_init(ctx: &Ctx, views: &[kvm_layer_view], w: &Window) -> Result<Plan, kvm_status> {
    let mut out = SENTINEL as *mut kvm_plan;
    // SAFETY: slices valid for the call; views point into live buffers.
    let st = unsafe {
        kvm_plan_init(
            ctx.0,
            views.as_ptr(),
            views.len(),
            w.cells.as_ptr(),
            w.cells.len(),
            w.attn.as_ref().map_or(null(), |a| a.as_ptr()),
            w.counts.as_ref().map_or(null(), |c| c.as_ptr()),
            w.n_free,
            &mut out,
        )
    };
    if st != KVM_STATUS_OK {
        assert_eq!(
            out as usize, SENTINEL,
            "kvm_plan_init wrote *out and failed"
        );
        return Err(st);
    }
    Ok(Plan(out))
}

pub fn plan_get(plan: &Plan) -> PlanOut {
    let mut info = std::mem::MaybeUninit::<kvm_plan_info>::uninit();
    // SAFETY: a live plan.
    let st = unsafe { kvm_plan_get(plan.0, info.as_mut_ptr()) };
    expect(st, &[KVM_STATUS_OK], "kvm_plan_get");
    // SAFETY: written on OK.
    let info = unsafe { info.assume_init() };
    let arr = |p: *const u32, n: usize| {
        if n == 0 {
            Vec::new()
        } else {
            // SAFETY: arrays owned by the plan with the lengths the info gives.
            unsafe { std::slice::from_raw_parts(p, n) }.to_vec()
        }
    };
    assert_eq!(info.n_sets + info.n_freed, info.n_cells, "n_sets + n_freed");
    PlanOut {
        n_evicted: info.n_evicted,
        set_of: arr(info.set_of, info.n_cells),
        survivor: arr(info.survivor, info.n_sets),
        freed: arr(info.freed, info.n_freed),
        counts: arr(info.counts, info.n_sets),
    }
}

pub fn plan_apply(ctx: &Ctx, plan: &Plan, views: &[kvm_layer_view]) -> kvm_status {
    // SAFETY: a live plan; views point into live buffers (or are refused before use).
    unsafe { kvm_plan_apply(ctx.0, plan.0, views.as_ptr(), views.len()) }
}

/// The documented shape of a plan: `n_free` freed, sets numbered in position order, survivors
/// set members, freed cells in position order, counts summed over members, limits kept,
/// protected cells kept.
pub fn check_plan(o: &PlanOut, w: &Window, p: &kvm_params) {
    let n = w.cells.len();
    let nf = w.n_free as usize;
    assert_eq!(o.set_of.len(), n);
    assert_eq!(o.freed.len(), nf, "freed exactly n_free");
    assert_eq!(o.survivor.len() + nf, n);
    assert_eq!(o.counts.len(), o.survivor.len());
    assert!(
        o.survivor.windows(2).all(|s| s[0] < s[1]),
        "sets numbered in position order: {:?}",
        o.survivor
    );
    let mut is_survivor = vec![false; n];
    for (s, &i) in o.survivor.iter().enumerate() {
        assert!((i as usize) < n);
        assert_eq!(
            o.set_of[i as usize], s as u32,
            "a survivor belongs to its set"
        );
        is_survivor[i as usize] = true;
    }
    let freed: Vec<u32> = (0..n)
        .filter(|&i| !is_survivor[i])
        .map(|i| w.cells[i])
        .collect();
    assert_eq!(
        o.freed, freed,
        "freed = the non-survivors, in position order"
    );
    let evicted = o.set_of.iter().filter(|&&s| s == KVM_EVICTED).count();
    assert_eq!(o.n_evicted, evicted);
    let counts_in = |i: usize| w.counts.as_ref().map_or(1, |c| c[i]) as u64;
    let mut sum = vec![0u64; o.survivor.len()];
    let mut size = vec![0usize; o.survivor.len()];
    for (i, &s) in o.set_of.iter().enumerate() {
        if s != KVM_EVICTED {
            assert!((s as usize) < o.survivor.len(), "set_of[{i}] = {s}");
            sum[s as usize] += counts_in(i);
            size[s as usize] += 1;
        }
    }
    for s in 0..o.survivor.len() {
        assert_eq!(
            o.counts[s] as u64,
            sum[s].min(u32::MAX as u64),
            "set {s}: count is its members' counts"
        );
        if p.max_set > 1 {
            assert!(
                size[s] <= p.max_set as usize,
                "set {s} of {} cells, max_set {}: {p:?} {o:?}",
                size[s],
                p.max_set
            );
        }
        if p.max_count > 1 && size[s] > 1 {
            assert!(
                o.counts[s] <= p.max_count,
                "set {s} of {} cells stands for {}, max_count {}: {p:?} {o:?} counts in {:?}",
                size[s],
                o.counts[s],
                p.max_count,
                w.counts
            );
        }
    }
    let (shift, streaming) = (
        p.method == kvm_method::KVM_METHOD_CONTEXT_SHIFT as i32,
        p.method == kvm_method::KVM_METHOD_STREAMING_LLM as i32,
    );
    if !shift {
        for i in 0..n.min(p.n_sink as usize) {
            assert!(is_survivor[i], "sink {i} freed");
        }
    }
    if !shift && !streaming {
        for i in n.saturating_sub(p.n_recent as usize)..n {
            assert!(is_survivor[i], "recent cell {i} freed");
        }
    }
}

/// NULL where a required pointer goes, for the probes of `sequence`.
pub fn null_probe(which: usize, ctx: &Ctx, views: &[kvm_layer_view]) {
    let cells = [0u32];
    let mut attn = [0.5f32];
    let mut out_plan = SENTINEL as *mut kvm_plan;
    let mut out_cal = SENTINEL as *mut kvm_calib;
    // SAFETY: every pointer is NULL or valid; a NULL one must be refused before use.
    let st = unsafe {
        match which % 9 {
            0 => kvm_plan_init(
                null(),
                views.as_ptr(),
                views.len(),
                cells.as_ptr(),
                1,
                null(),
                null(),
                0,
                &mut out_plan,
            ),
            1 => kvm_plan_init(
                ctx.0,
                views.as_ptr(),
                views.len(),
                null(),
                1,
                null(),
                null(),
                0,
                &mut out_plan,
            ),
            2 => kvm_plan_init(
                ctx.0,
                null(),
                1,
                cells.as_ptr(),
                1,
                null(),
                null(),
                0,
                &mut out_plan,
            ),
            3 => kvm_plan_apply(ctx.0, null(), views.as_ptr(), views.len()),
            4 => kvm_ctx_params(null(), null_mut()),
            5 => kvm_attn_add_probs(ctx.0, null(), 4, 1, 4, cells.as_ptr(), 1, attn.as_mut_ptr()),
            6 => kvm_calib_load(null(), &mut out_cal),
            7 => kvm_calib_observe(ctx.0, null_mut(), views.as_ptr(), views.len(), null(), 0),
            _ => kvm_ctx_init(null(), null_mut()),
        }
    };
    expect(st, &[KVM_STATUS_NULL_ARG], "NULL probe");
    assert_eq!(attn, [0.5]);
    assert_eq!(out_plan as usize, SENTINEL);
    assert_eq!(out_cal as usize, SENTINEL);
}
