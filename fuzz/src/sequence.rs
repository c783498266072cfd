//! Target `sequence`: every export in drawn call orders over shared handles: ctxs made and
//! freed, plans made on one cache and applied to another (of the same geometry, or not),
//! profiles observed, set, cleared and freed while plans live, NULL probes, the value-returning
//! exports. Everything runs on twins: each ctx is a one-thread and a several-thread ctx, each
//! cache two copies, and after every step the twins must hold the same bytes.

use std::ffi::CStr;

use kvmerger::ffi::*;

use crate::api::*;
use crate::cache::{allowed, assert_only, Cache, Fill, Spec};
use crate::input::In;

use kvm_status::*;

struct CtxTwin {
    a: Ctx,
    b: Ctx,
    p: kvm_params,
    n: u32,
}

struct PlanTwin {
    a: Plan,
    b: Plan,
    out: PlanOut,
    /// Spec of the cache it was made on: apply succeeds exactly on caches of that geometry.
    spec: Spec,
    cells: Vec<u32>,
}

struct CacheTwin {
    spec: Spec,
    a: Cache,
    b: Cache,
}

struct CalTwin(*mut kvm_calib, *mut kvm_calib);

impl Drop for CalTwin {
    fn drop(&mut self) {
        // SAFETY: from kvm_calib_init, freed once.
        unsafe {
            kvm_calib_free(self.0);
            kvm_calib_free(self.1);
        }
    }
}

fn pick<T>(r: &mut In, v: &[T]) -> Option<usize> {
    (!v.is_empty()).then(|| r.below(v.len()))
}

fn twins_equal(c: &CacheTwin) {
    assert!(
        c.a.snapshot() == c.b.snapshot(),
        "twin caches differ: bytes depend on the thread count"
    );
}

/// `kvm_ctx_params` gives back what `kvm_ctx_init` took, as the library normalizes it.
fn check_params(got: &kvm_params, p: &kvm_params, n: u32) {
    let fixed = [1, 3, 4].contains(&p.sigma_mode);
    assert_eq!(got.n_threads, n);
    assert_eq!(
        (
            got.method,
            got.n_sink,
            got.n_recent,
            got.pivot,
            got.sigma_mode,
            got.value_mode
        ),
        (
            p.method,
            p.n_sink,
            p.n_recent,
            p.pivot,
            p.sigma_mode,
            p.value_mode
        )
    );
    assert_eq!(
        (
            got.merge_keys,
            got.merge_values,
            got.max_set,
            got.cam_span,
            got.max_count
        ),
        (
            p.merge_keys,
            p.merge_values,
            p.max_set,
            p.cam_span,
            p.max_count
        )
    );
    assert_eq!(got.heavy_frac.to_bits(), p.heavy_frac.to_bits());
    assert_eq!(got.age_bias.to_bits(), p.age_bias.to_bits());
    let floor = if p.sim_floor < -1.0 {
        -2.0
    } else {
        p.sim_floor
    };
    assert_eq!(got.sim_floor.to_bits(), floor.to_bits());
    let sigma = if fixed { p.sigma } else { 5.0 };
    assert_eq!(got.sigma.to_bits(), sigma.to_bits());
}

pub fn run(data: &[u8]) {
    let mut r = In::new(data);
    let spec = Spec::read(&mut r, 40);
    let mut caches: Vec<CacheTwin> = Vec::new();
    // The first cache, one of the same geometry and other contents, one of another geometry.
    for (s, seed) in [(spec, 1u64), (spec, 2), (Spec::read(&mut r, 40), 3)] {
        let a = Cache::new(&s, Fill::Runs, seed);
        caches.push(CacheTwin {
            spec: s,
            b: a.clone(),
            a,
        });
    }
    let mut ctxs: Vec<CtxTwin> = Vec::new();
    let mut plans: Vec<PlanTwin> = Vec::new();
    let mut cals: Vec<CalTwin> = Vec::new();
    let p = kvm_params_default();
    if let Ok((a, b)) = ctx_twins(&p, 2) {
        ctxs.push(CtxTwin { a, b, p, n: 2 });
    }

    for _ in 0..48 {
        if r.is_empty() {
            break;
        }
        match r.below(15) {
            0 if ctxs.len() < 3 => {
                let p = read_params(&mut r);
                let n = 2 + r.below(3) as u32;
                if let Ok((a, b)) = ctx_twins(&p, n) {
                    ctxs.push(CtxTwin { a, b, p, n });
                }
            }
            1 => {
                if let Some(i) = pick(&mut r, &ctxs) {
                    ctxs.remove(i);
                }
            }
            2 => {
                let Some(i) = pick(&mut r, &ctxs) else {
                    continue;
                };
                let c = &ctxs[i];
                for (ctx, n) in [(&c.a, 1), (&c.b, c.n)] {
                    let mut got = kvm_params_default();
                    // SAFETY: live ctx, valid out.
                    let st = unsafe { kvm_ctx_params(ctx.0, &mut got) };
                    expect(st, &[KVM_STATUS_OK], "kvm_ctx_params");
                    check_params(&got, &c.p, n);
                    drop(ctx_init(&got).expect("a ctx's own parameters are valid"));
                }
            }
            3 if plans.len() < 4 => {
                let (Some(i), Some(k)) = (pick(&mut r, &ctxs), pick(&mut r, &caches)) else {
                    continue;
                };
                let (c, ct) = (&ctxs[i], &mut caches[k]);
                let w = Window::read(&mut r, ct.a.n_cells);
                let (va, vb) = (ct.a.views(), ct.b.views());
                let (ra, rb) = (plan_init(&c.a, &va, &w), plan_init(&c.b, &vb, &w));
                match (ra, rb) {
                    (Ok(a), Ok(b)) => {
                        let out = plan_get(&a);
                        assert_eq!(out, plan_get(&b), "plans depend on the thread count");
                        check_plan(&out, &w, &c.p);
                        plans.push(PlanTwin {
                            a,
                            b,
                            out,
                            spec: ct.spec,
                            cells: w.cells,
                        });
                    }
                    (Err(a), Err(b)) => {
                        assert_eq!(a, b);
                        let mut ok = vec![KVM_STATUS_BUDGET, KVM_STATUS_BAD_PROFILE];
                        if !w.valid {
                            ok.push(KVM_STATUS_INVALID_ARG);
                        }
                        expect(a, &ok, "kvm_plan_init");
                    }
                    _ => panic!("kvm_plan_init depends on the thread count"),
                }
            }
            4 => {
                let Some(i) = pick(&mut r, &plans) else {
                    continue;
                };
                assert_eq!(plan_get(&plans[i].a), plans[i].out, "a plan changed");
                assert_eq!(plan_get(&plans[i].b), plans[i].out, "a plan changed");
            }
            5 => {
                let (Some(i), Some(j), Some(k)) = (
                    pick(&mut r, &ctxs),
                    pick(&mut r, &plans),
                    pick(&mut r, &caches),
                ) else {
                    continue;
                };
                let (c, pl, ct) = (&ctxs[i], &plans[j], &mut caches[k]);
                let before = ct.a.snapshot();
                let (va, vb) = (ct.a.views(), ct.b.views());
                let sa = plan_apply(&c.a, &pl.a, &va);
                let sb = plan_apply(&c.b, &pl.b, &vb);
                assert_eq!(sa, sb);
                // A plan's geometry is the whole spec, types and padding included.
                let want = if ct.spec.same_geometry(&pl.spec) {
                    KVM_STATUS_OK
                } else {
                    KVM_STATUS_MISMATCH
                };
                expect(sa, &[want], "kvm_plan_apply");
                twins_equal(ct);
                let after = ct.a.snapshot();
                if sa != KVM_STATUS_OK {
                    assert!(after == before, "a refused kvm_plan_apply wrote");
                    continue;
                }
                // SAFETY: a live plan of this library, read for its CaM targets.
                let inner = unsafe { &*(pl.a.0 as *const kvmerger::merge::plan::Plan) };
                let mut size = vec![0usize; pl.out.survivor.len()];
                for &s in &pl.out.set_of {
                    if s != KVM_EVICTED {
                        size[s as usize] += 1;
                    }
                }
                let merged: Vec<usize> = pl
                    .out
                    .survivor
                    .iter()
                    .enumerate()
                    .filter(|(s, _)| size[*s] > 1)
                    .map(|(_, &i)| pl.cells[i as usize] as usize)
                    .collect();
                let mut v_cells = merged.clone();
                v_cells.extend(inner.cam.iter().map(|f| pl.cells[f.target] as usize));
                let masks = allowed(&ct.a, &merged, &v_cells);
                for (il, ((b, a), (km, vm))) in before.iter().zip(&after).zip(&masks).enumerate() {
                    assert_only(&b.0, &a.0, km, &format!("layer {il} K"));
                    assert_only(&b.1, &a.1, vm, &format!("layer {il} V"));
                }
            }
            6 => {
                if let Some(i) = pick(&mut r, &plans) {
                    plans.remove(i);
                }
            }
            7 => {
                let (Some(i), Some(k)) = (pick(&mut r, &ctxs), pick(&mut r, &caches)) else {
                    continue;
                };
                let (c, ct) = (&ctxs[i], &mut caches[k]);
                let w = Window::read(&mut r, ct.a.n_cells);
                let n_q = r.below(3);
                let mut res = Vec::new();
                for (ctx, cache) in [(&c.a, &mut ct.a), (&c.b, &mut ct.b)] {
                    let views = cache.views();
                    let v = views[0];
                    let q: Vec<f32> = (0..n_q * (v.n_head_kv * v.n_embd_head_k) as usize)
                        .map(|i| (i % 5) as f32 * 0.3 - 0.6)
                        .collect();
                    let mut attn = vec![0.125f32; w.cells.len()];
                    // SAFETY: live buffers of the lengths given.
                    let st = unsafe {
                        kvm_attn_from_queries(
                            ctx.0,
                            views.as_ptr(),
                            q.as_ptr(),
                            n_q as u32,
                            v.n_head_kv,
                            0.3,
                            w.cells.as_ptr(),
                            w.cells.len(),
                            std::ptr::null(),
                            attn.as_mut_ptr(),
                        )
                    };
                    let ok: &[kvm_status] = if w.valid {
                        &[KVM_STATUS_OK]
                    } else {
                        &[KVM_STATUS_OK, KVM_STATUS_INVALID_ARG]
                    };
                    expect(st, ok, "kvm_attn_from_queries");
                    if st != KVM_STATUS_OK {
                        assert!(attn.iter().all(|&x| x == 0.125));
                    }
                    res.push((st, attn.iter().map(|x| x.to_bits()).collect::<Vec<_>>()));
                }
                assert_eq!(res[0], res[1], "attention depends on the thread count");
            }
            8 => {
                let Some(i) = pick(&mut r, &ctxs) else {
                    continue;
                };
                let c = &ctxs[i];
                let n_kv = 1 + r.below(32);
                let probs: Vec<f32> = (0..2 * n_kv).map(|i| (i % 3) as f32 * 0.25).collect();
                let cells: Vec<u32> = (0..r.below(8)).map(|_| r.below(n_kv + 1) as u32).collect();
                let mut res = Vec::new();
                for ctx in [&c.a, &c.b] {
                    let mut attn = vec![1f32; cells.len()];
                    // SAFETY: two rows of n_kv floats; one attn float per cell.
                    let st = unsafe {
                        kvm_attn_add_probs(
                            ctx.0,
                            probs.as_ptr(),
                            n_kv,
                            2,
                            n_kv,
                            cells.as_ptr(),
                            cells.len(),
                            attn.as_mut_ptr(),
                        )
                    };
                    expect(
                        st,
                        &[KVM_STATUS_OK, KVM_STATUS_INVALID_ARG],
                        "kvm_attn_add_probs",
                    );
                    if st != KVM_STATUS_OK {
                        assert!(attn.iter().all(|&x| x == 1.0));
                    }
                    res.push((st, attn.iter().map(|x| x.to_bits()).collect::<Vec<_>>()));
                }
                assert_eq!(res[0], res[1]);
            }
            9 if cals.len() < 3 => {
                let (mut a, mut b) = (std::ptr::null_mut(), std::ptr::null_mut());
                // SAFETY: valid out pointers.
                unsafe {
                    expect(kvm_calib_init(&mut a), &[KVM_STATUS_OK], "kvm_calib_init");
                    expect(kvm_calib_init(&mut b), &[KVM_STATUS_OK], "kvm_calib_init");
                }
                cals.push(CalTwin(a, b));
            }
            10 => {
                let (Some(i), Some(j), Some(k)) = (
                    pick(&mut r, &ctxs),
                    pick(&mut r, &cals),
                    pick(&mut r, &caches),
                ) else {
                    continue;
                };
                let (c, cal, ct) = (&ctxs[i], &cals[j], &mut caches[k]);
                let w = Window::read(&mut r, ct.a.n_cells);
                let (va, vb) = (ct.a.views(), ct.b.views());
                crate::calib::observe_twins((&c.a, cal.0, &va), (&c.b, cal.1, &vb), &w);
            }
            11 => {
                let Some(i) = pick(&mut r, &ctxs) else {
                    continue;
                };
                let j = pick(&mut r, &cals).filter(|_| r.u8() >= 48);
                let c = &ctxs[i];
                let (a, b) = j.map_or((std::ptr::null_mut(), std::ptr::null_mut()), |j| {
                    (cals[j].0, cals[j].1)
                });
                crate::calib::set_twins(&c.a, &c.b, a, b);
            }
            12 => {
                if let Some(i) = pick(&mut r, &cals) {
                    cals.remove(i);
                }
            }
            13 => {
                let code = r.u32() as i32;
                for s in [code, 0, 9, 10, 11] {
                    // SAFETY: static strings.
                    let m = unsafe { CStr::from_ptr(kvm_status_str(s)) };
                    assert!(!m.to_bytes().is_empty());
                }
                // SAFETY: static string.
                let k = unsafe { CStr::from_ptr(kvm_kernels_name()) };
                assert!([&b"avx2"[..], b"neon", b"scalar"].contains(&k.to_bytes()));
                assert_eq!(kvm_abi_version(), KVM_ABI_VERSION);
                // The fuzz crate builds the library without the `cuda` feature.
                assert!(!kvm_has_cuda());
                let d = kvm_params_default();
                assert_eq!(d.method, kvm_method::KVM_METHOD_EVICT_FOLD as i32);
                let _ = last_error();
            }
            _ => {
                let (Some(i), Some(k)) = (pick(&mut r, &ctxs), pick(&mut r, &caches)) else {
                    continue;
                };
                let views = caches[k].a.views();
                null_probe(r.u8() as usize, &ctxs[i].a, &views);
            }
        }
    }
    for c in &caches {
        twins_equal(c);
    }
}
