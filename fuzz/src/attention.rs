//! Target `attention`: `kvm_attn_from_queries`, `kvm_attn_from_queries_layers` and
//! `kvm_attn_add_probs` with drawn queries, scales, biases (−inf masks, NaN), head counts and
//! windows. Checks: equal bytes on one and several threads, `attn` untouched by a refusal,
//! valid input never refused, and each unmasked query head adding a softmax that sums to 1.

use std::ptr::null;

use kvmerger::ffi::*;

use crate::api::*;
use crate::cache::Cache;
use crate::input::{In, Rng, SPECIALS};

use kvm_status::*;

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.iter()
        .map(|x| x.to_bits())
        .eq(b.iter().map(|x| x.to_bits()))
}

/// The twins every call here runs on; attention ignores the parameters, so one pair serves
/// the whole run.
fn twins() -> &'static (Ctx, Ctx) {
    struct Shared((Ctx, Ctx));
    // SAFETY: a kvm_ctx may be used by several threads at once (header); the pair is never
    // freed or given a profile.
    unsafe impl Sync for Shared {}
    // SAFETY: as above.
    unsafe impl Send for Shared {}
    static T: std::sync::OnceLock<Shared> = std::sync::OnceLock::new();
    &T.get_or_init(|| Shared(ctx_twins(&kvm_params_default(), 2).expect("defaults")))
        .0
}

pub fn run(data: &[u8]) {
    let mut r = In::new(data);
    let (_, mut cache) = Cache::read(&mut r, 48);
    let (c1, c2) = twins();
    let views = cache.views();
    let before = cache.snapshot();
    let w = Window::read(&mut r, cache.n_cells);
    let n = w.cells.len();
    let mut valid = w.valid;

    let one_layer = r.bool();
    let used = if one_layer { 1 } else { views.len() };
    let n_q = r.below(4);
    let mut qs: Vec<Vec<f32>> = Vec::new();
    let mut heads: Vec<u32> = Vec::new();
    let mut scales: Vec<f32> = Vec::new();
    for v in &views[..used] {
        let hk = v.n_head_kv;
        let h = match r.below(8) {
            0 => 0,
            1 => hk * 2 + 1,
            k => hk * (1 + k as u32 % 3),
        };
        if h == 0 || h % hk != 0 {
            valid = false;
        }
        let mut rng = Rng(r.u64());
        let qscale = r.pick_f32(&[1.0, 1.0, 0.0, 1e20, 1e-20]);
        let mut q: Vec<f32> = (0..n_q * h as usize * v.n_embd_head_k as usize)
            .map(|_| rng.normal() * qscale)
            .collect();
        if !q.is_empty() && r.u8() < 16 {
            let i = r.below(q.len());
            q[i] = SPECIALS[r.below(SPECIALS.len())];
        }
        let kq = r.pick_f32(&[0.125, 1.0, 0.0, -0.5, 1e38]);
        if q.iter().any(|x| !x.is_finite()) || !kq.is_finite() {
            valid = false;
        }
        qs.push(q);
        heads.push(h);
        scales.push(kq);
    }
    let bias: Option<Vec<f32>> = match r.below(3) {
        0 => None,
        _ => {
            let mut b: Vec<f32> = (0..n).map(|i| (i % 5) as f32 * 0.5).collect();
            for _ in 0..r.below(n + 1) {
                if n > 0 {
                    let i = r.below(n);
                    b[i] =
                        r.pick_f32(&[f32::NEG_INFINITY, f32::NEG_INFINITY, 1e30, -1e30, f32::NAN]);
                }
            }
            Some(b)
        }
    };
    let masked_all = bias
        .as_ref()
        .is_some_and(|b| b.iter().all(|&x| x == f32::NEG_INFINITY));
    if bias
        .as_ref()
        .is_some_and(|b| b.iter().any(|&x| x.is_nan() || x == f32::INFINITY))
    {
        valid = false;
    }
    // Keys of the window enter every logit: a non-finite key is refused.
    if valid
        && !cache.layers[..used].iter().all(|l| {
            w.cells
                .iter()
                .all(|&c| l.k_row(c as usize).iter().all(|x| x.is_finite()))
        })
    {
        valid = false;
    }
    let mut rng = Rng(r.u64());
    let attn0: Vec<f32> = (0..n).map(|_| rng.f32()).collect();

    let rows: Vec<kvm_query_rows> = qs
        .iter()
        .zip(&heads)
        .zip(&scales)
        .map(|((q, &h), &s)| kvm_query_rows {
            q: q.as_ptr(),
            n_head: h,
            kq_scale: s,
        })
        .collect();
    let call = |c: &Ctx| {
        let mut a = attn0.clone();
        let bp = bias.as_ref().map_or(null(), |b| b.as_ptr());
        // SAFETY: every buffer is live and as long as the counts say.
        let st = unsafe {
            if one_layer {
                kvm_attn_from_queries(
                    c.0,
                    views.as_ptr(),
                    rows[0].q,
                    n_q as u32,
                    rows[0].n_head,
                    rows[0].kq_scale,
                    w.cells.as_ptr(),
                    n,
                    bp,
                    a.as_mut_ptr(),
                )
            } else {
                kvm_attn_from_queries_layers(
                    c.0,
                    views.as_ptr(),
                    rows.as_ptr(),
                    used,
                    n_q as u32,
                    w.cells.as_ptr(),
                    n,
                    bp,
                    a.as_mut_ptr(),
                )
            }
        };
        (st, a)
    };
    let (s1, a1) = call(c1);
    let (s2, a2) = call(c2);
    assert!(cache.snapshot() == before, "attention wrote the cache");
    assert_eq!(s1, s2, "status depends on the thread count");
    assert!(same_bits(&a1, &a2), "attention depends on the thread count");
    let allowed: &[kvm_status] = if valid {
        &[KVM_STATUS_OK]
    } else {
        &[KVM_STATUS_OK, KVM_STATUS_INVALID_ARG]
    };
    expect(s1, allowed, "kvm_attn_from_queries");
    if s1 != KVM_STATUS_OK {
        assert!(
            same_bits(&a1, &attn0),
            "a refused attention call wrote attn"
        );
    } else if n > 0 && n_q > 0 {
        let added: f64 = a1
            .iter()
            .zip(&attn0)
            .map(|(a, b)| *a as f64 - *b as f64)
            .sum();
        let want = if masked_all {
            0.0
        } else {
            (n_q as u64 * heads.iter().map(|&h| h as u64).sum::<u64>()) as f64
        };
        assert!(
            (added - want).abs() <= 1e-3 * want + 1e-3,
            "softmaxes add {added}, expected {want}"
        );
        assert!(a1.iter().all(|x| x.is_finite()));
    }

    // Softmaxed rows: n_rows rows of n_kv, row_stride apart.
    let n_kv = r.below(64);
    let n_rows = r.below(4);
    let row_stride = if r.u8() < 16 {
        n_kv.saturating_sub(1 + r.below(3))
    } else {
        n_kv + r.below(3)
    };
    let len = if n_rows == 0 {
        0
    } else {
        (n_rows - 1) * row_stride + n_kv
    };
    let mut probs: Vec<f32> = (0..len).map(|_| rng.f32()).collect();
    if !probs.is_empty() && r.u8() < 16 {
        let i = r.below(probs.len());
        probs[i] = SPECIALS[r.below(SPECIALS.len())];
    }
    let cells: Vec<u32> = (0..r.below(16)).map(|_| r.below(n_kv + 2) as u32).collect();
    let ok = (n_rows == 0 || row_stride >= n_kv) && cells.iter().all(|&c| (c as usize) < n_kv);
    let add = |c: &Ctx| {
        let mut a = vec![0.5f32; cells.len()];
        // SAFETY: probs holds the rows the counts describe; attn one float per cell.
        let st = unsafe {
            kvm_attn_add_probs(
                c.0,
                probs.as_ptr(),
                n_kv,
                n_rows,
                row_stride,
                cells.as_ptr(),
                cells.len(),
                a.as_mut_ptr(),
            )
        };
        (st, a)
    };
    let (s1, a1) = add(c1);
    let (s2, a2) = add(c2);
    assert_eq!(s1, s2);
    assert!(
        same_bits(&a1, &a2),
        "kvm_attn_add_probs depends on the thread count"
    );
    expect(
        s1,
        if ok {
            &[KVM_STATUS_OK]
        } else {
            &[KVM_STATUS_INVALID_ARG]
        },
        "kvm_attn_add_probs",
    );
    if s1 != KVM_STATUS_OK {
        assert!(
            a1.iter().all(|&x| x == 0.5),
            "a refused kvm_attn_add_probs wrote attn"
        );
    }
}
