//! Target `plan`: `kvm_plan_init`, `kvm_plan_get` and `kvm_plan_apply` over a drawn cache,
//! window and parameters, on a one-thread and a several-thread ctx.

use kvmerger::ffi::*;
use kvmerger::layout::GgmlType;

use crate::api::*;
use crate::cache::{allowed, assert_only, Cache};
use crate::input::In;

use kvm_status::*;

pub fn run(data: &[u8]) {
    let mut r = In::new(data);
    let (_, mut cache) = Cache::read(&mut r, 48);
    let p = read_params(&mut r);
    let n = 2 + r.below(3) as u32;
    let Ok(twins) = ctx_twins_cached(&p, n) else {
        return;
    };
    let w = Window::read(&mut r, cache.n_cells);
    let mismatch = r.below(3);
    round(&twins.0, &twins.1, &p, &mut cache, &w, mismatch, false);
}

/// Plans `w` on both ctxs and, when that succeeds, applies each plan to its own copy of the
/// cache. Checks: equal statuses and plans, a plan of the documented shape, nothing written
/// by planning or by a refused apply, equal bytes after applying, only merged survivors' rows
/// (and CaM's absorbing values) changed, and finite rows staying finite.
/// `mismatch` 1 or 2 first applies the plan to views that differ from the planned ones.
/// `calibrated` allows the profile's refusal (layer count).
pub fn round(
    c1: &Ctx,
    c2: &Ctx,
    p: &kvm_params,
    cache: &mut Cache,
    w: &Window,
    mismatch: usize,
    calibrated: bool,
) -> Option<PlanOut> {
    let views = cache.views();
    let before = cache.snapshot();
    let r1 = plan_init(c1, &views, w);
    let r2 = plan_init(c2, &views, w);
    assert!(cache.snapshot() == before, "kvm_plan_init wrote the cache");
    let mut ok: Vec<kvm_status> = vec![KVM_STATUS_OK, KVM_STATUS_BUDGET];
    if !w.valid {
        ok.push(KVM_STATUS_INVALID_ARG);
    }
    if calibrated {
        ok.push(KVM_STATUS_BAD_PROFILE);
    }
    let (p1, p2) = match (r1, r2) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "kvm_plan_init status depends on the thread count");
            expect(a, &ok, "kvm_plan_init");
            return None;
        }
        (a, b) => panic!(
            "kvm_plan_init depends on the thread count: {:?} vs {:?}",
            a.err(),
            b.err()
        ),
    };
    let o = plan_get(&p1);
    assert_eq!(o, plan_get(&p2), "plans differ between thread counts");
    check_plan(&o, w, p);

    if mismatch > 0 {
        let mut other = views.clone();
        let flip = other.iter_mut().find_map(|v| {
            [&mut v.k, &mut v.v]
                .into_iter()
                .find(|t| t.r#type == GgmlType::F16.id() || t.r#type == GgmlType::BF16.id())
        });
        match flip {
            // Same sizes, another type: valid views that are not the planned ones.
            Some(t) if mismatch == 1 => {
                t.r#type = if t.r#type == GgmlType::F16.id() {
                    GgmlType::BF16.id()
                } else {
                    GgmlType::F16.id()
                }
            }
            _ => {
                other.pop();
            }
        }
        let st = plan_apply(c1, &p1, &other);
        expect(
            st,
            &[KVM_STATUS_MISMATCH, KVM_STATUS_INVALID_ARG],
            "kvm_plan_apply to other views",
        );
        assert!(cache.snapshot() == before, "a refused kvm_plan_apply wrote");
    }

    // SAFETY: a live plan made by this library; read only for the CaM targets, which
    // `kvm_plan_info` does not carry.
    let inner = unsafe { &*(p1.0 as *const kvmerger::merge::plan::Plan) };
    let mut merged: Vec<usize> = Vec::new();
    let mut size = vec![0usize; o.survivor.len()];
    for &s in &o.set_of {
        if s != KVM_EVICTED {
            size[s as usize] += 1;
        }
    }
    for (s, &i) in o.survivor.iter().enumerate() {
        if size[s] > 1 {
            merged.push(w.cells[i as usize] as usize);
        }
    }
    let mut v_cells = merged.clone();
    v_cells.extend(inner.cam.iter().map(|f| w.cells[f.target] as usize));
    let finite = cache.cells_finite(&w.cells);

    let mut twin = cache.clone();
    let tviews = twin.views();
    expect(
        plan_apply(c1, &p1, &views),
        &[KVM_STATUS_OK],
        "kvm_plan_apply",
    );
    expect(
        plan_apply(c2, &p2, &tviews),
        &[KVM_STATUS_OK],
        "kvm_plan_apply (twin)",
    );
    let after = cache.snapshot();
    assert!(
        after == twin.snapshot(),
        "kvm_plan_apply's bytes depend on the thread count"
    );
    let masks = allowed(cache, &merged, &v_cells);
    for (il, ((b, a), (km, vm))) in before.iter().zip(&after).zip(&masks).enumerate() {
        assert_only(&b.0, &a.0, km, &format!("layer {il} K"));
        assert_only(&b.1, &a.1, vm, &format!("layer {il} V"));
    }
    if finite {
        let changed: Vec<u32> = v_cells.iter().map(|&c| c as u32).collect();
        assert!(
            cache.cells_finite(&changed),
            "merging finite rows wrote a non-finite one"
        );
    }
    Some(o)
}
