//! Target `views`: hostile `kvm_layer_view`s (types, `ne`, `nb`, head sizes, data pointers,
//! layouts, aliasing) through every export that takes views: `kvm_plan_init`,
//! `kvm_plan_apply`, `kvm_attn_from_queries_layers` and `kvm_calib_observe`.
//!
//! The harness must not itself break the calls' contract (views inside live memory), so a
//! mutated tensor whose span, computed here independently of the library, does not fit the
//! memory behind its pointer gets a NULL pointer: the library must then refuse it, since it
//! cannot read anything. A view this computation finds malformed keeps its pointer, and the
//! library must refuse it; accepting it fails the target.

use kvmerger::ffi::*;
use kvmerger::layout::GgmlType;
use kvmerger::merge::calib::Calib;

use crate::api::*;
use crate::cache::Cache;
use crate::input::In;

use kvm_status::*;

/// The span of a tensor as the header describes a valid one, or `None` if it is malformed.
fn span(t: &kvm_tensor_view) -> Option<usize> {
    let ty = GgmlType::from_id(t.r#type)?;
    if t.ne.iter().any(|&n| n < 0) || t.ne[2] != 1 || t.ne[3] != 1 {
        return None;
    }
    let (cols, rows) = (
        usize::try_from(t.ne[0]).ok()?,
        usize::try_from(t.ne[1]).ok()?,
    );
    if cols % ty.block() != 0 || t.nb[0] != ty.type_size() {
        return None;
    }
    let row = (cols / ty.block()).checked_mul(ty.type_size())?;
    if row > isize::MAX as usize || (rows > 1 && t.nb[1] < row) {
        return None;
    }
    let align = if ty == GgmlType::F32 { 4 } else { 2 };
    if !t.nb[1].is_multiple_of(align) {
        return None;
    }
    let s = if rows == 0 || row == 0 {
        0
    } else {
        (rows - 1).checked_mul(t.nb[1])?.checked_add(row)?
    };
    (s <= isize::MAX as usize).then_some(s)
}

/// Bytes readable from `p` to the end of the allocation holding it (0 if none does).
fn room(cache: &Cache, p: *mut std::ffi::c_void) -> usize {
    let p = p as usize;
    for l in &cache.layers {
        for b in [&l.k, &l.v] {
            let base = b.all().as_ptr() as usize;
            if p >= base && p < base + b.all().len() {
                return base + b.all().len() - p;
            }
        }
    }
    0
}

fn mutate(r: &mut In, views: &mut [kvm_layer_view]) {
    let n = views.len();
    for _ in 0..1 + r.below(4) {
        let l = r.below(n);
        let other = views[r.below(n)];
        let v = &mut views[l];
        let t = if r.bool() { &mut v.v } else { &mut v.k };
        match r.below(8) {
            0 => {
                t.r#type = [0, 1, 2, 8, 30, 3, -1, 6][r.below(8)];
                if r.bool() {
                    t.r#type = r.u32() as i32;
                }
            }
            1 => {
                let i = r.below(4);
                t.ne[i] = match r.below(7) {
                    0 => t.ne[i].wrapping_add(1 + r.below(40) as i64),
                    1 => t.ne[i].wrapping_sub(1 + r.below(40) as i64),
                    2 => 0,
                    3 => i64::MAX,
                    4 => 1 << (48 + r.below(15)),
                    5 => -1,
                    _ => r.i64(),
                };
            }
            2 => {
                let i = r.below(4);
                t.nb[i] = match r.below(7) {
                    0 => t.nb[i].wrapping_add(1 + r.below(70)),
                    1 => t.nb[i].saturating_sub(1 + r.below(70)),
                    2 => 0,
                    3 => usize::MAX,
                    4 => 1 << (40 + r.below(24)),
                    5 => usize::MAX / 2 + r.below(3),
                    _ => r.u64() as usize,
                };
            }
            3 => {
                t.data = match r.below(4) {
                    0 => std::ptr::null_mut(),
                    1 => (t.data as usize).wrapping_add([1, 2, 4, 8, 32][r.below(5)]) as *mut _,
                    2 => other.k.data,
                    _ => other.v.data,
                };
            }
            4 => {
                let x = [0, 1, 2, 3, 31, 33, 64, 1 << 20, u32::MAX][r.below(9)];
                match r.below(3) {
                    0 => v.n_head_kv = x,
                    1 => v.n_embd_head_k = x,
                    _ => v.n_embd_head_v = x,
                }
            }
            5 => v.v_trans = !v.v_trans,
            6 => std::mem::swap(&mut v.k, &mut v.v),
            _ => *v = other,
        }
    }
}

pub fn run(data: &[u8]) {
    let mut r = In::new(data);
    let (_, mut cache) = Cache::read(&mut r, 24);
    let mut p = read_params(&mut r);
    if ctx_init(&p).is_err() {
        p = kvm_params_default();
    }
    let twins = ctx_twins_cached(&p, 2).expect("valid params");
    let (c1, c2) = (&twins.0, &twins.1);
    let good = cache.views();
    let w = Window::read(&mut r, cache.n_cells);
    let plan = plan_init(c1, &good, &w).ok();
    let mut bad = good.clone();
    mutate(&mut r, &mut bad);
    let mut well_formed = true;
    for v in bad.iter_mut() {
        for t in [&mut v.k, &mut v.v] {
            match span(t) {
                Some(s) if s > room(&cache, t.data) => t.data = std::ptr::null_mut(),
                Some(_) => {}
                None => well_formed = false,
            }
        }
    }
    let before = cache.snapshot();
    let unchanged = |cache: &Cache, what: &str| {
        assert!(cache.snapshot() == before, "{what} wrote the cache");
    };
    let refusals = [
        KVM_STATUS_NULL_ARG,
        KVM_STATUS_INVALID_ARG,
        KVM_STATUS_BAD_TYPE,
        KVM_STATUS_BAD_LAYOUT,
    ];
    let accepted = |st: kvm_status, what: &str| {
        if st == KVM_STATUS_OK && !well_formed {
            panic!("{what} accepted a malformed view: {bad:?}");
        }
    };

    // Planning: any refusal, or the budget's; the same on both ctxs.
    let r1 = plan_init(c1, &bad, &w);
    let r2 = plan_init(c2, &bad, &w);
    unchanged(&cache, "kvm_plan_init");
    match (&r1, &r2) {
        (Ok(a), Ok(b)) => {
            accepted(KVM_STATUS_OK, "kvm_plan_init");
            let o = plan_get(a);
            assert_eq!(o, plan_get(b));
            check_plan(&o, &w, &p);
        }
        (Err(a), Err(b)) => {
            assert_eq!(a, b);
            let mut ok = refusals.to_vec();
            ok.push(KVM_STATUS_BUDGET);
            expect(*a, &ok, "kvm_plan_init (hostile views)");
        }
        _ => panic!("kvm_plan_init depends on the thread count"),
    }

    // Applying a plan of the good views: refused, or the views describe the same geometry.
    if let Some(plan) = &plan {
        let st = plan_apply(c1, plan, &bad);
        let mut ok = refusals.to_vec();
        ok.extend([KVM_STATUS_MISMATCH, KVM_STATUS_OK]);
        expect(st, &ok, "kvm_plan_apply (hostile views)");
        if st == KVM_STATUS_OK {
            accepted(st, "kvm_plan_apply");
            // Writes stay inside the views' own spans.
            let after = cache.snapshot();
            let spans: Vec<(usize, usize)> = bad
                .iter()
                .flat_map(|v| [&v.k, &v.v])
                .filter_map(|t| span(t).map(|s| (t.data as usize, s)))
                .collect();
            for (il, (b, a)) in before.iter().zip(&after).enumerate() {
                for (bytes_b, bytes_a, buf) in [
                    (&b.0, &a.0, &cache.layers[il].k),
                    (&b.1, &a.1, &cache.layers[il].v),
                ] {
                    let base = buf.all().as_ptr() as usize;
                    for (i, (x, y)) in bytes_b.iter().zip(bytes_a).enumerate() {
                        let at = base + i;
                        if x != y && !spans.iter().any(|&(p, s)| at >= p && at < p + s) {
                            panic!("kvm_plan_apply wrote layer {il} byte {i}, outside every view");
                        }
                    }
                }
            }
            return;
        }
        unchanged(&cache, "a refused kvm_plan_apply");
    }

    // Attention: queries sized for the views as given.
    let n_q = 1 + r.below(2);
    let mut qbufs: Vec<Vec<f32>> = Vec::new();
    for v in &bad {
        let len = (v.n_head_kv.max(1) as usize)
            .checked_mul(v.n_embd_head_k as usize)
            .and_then(|x| x.checked_mul(n_q))
            .filter(|&x| x <= 1 << 16);
        let Some(len) = len else {
            return;
        };
        qbufs.push((0..len).map(|i| ((i % 7) as f32 - 3.0) * 0.25).collect());
    }
    let rows: Vec<kvm_query_rows> = bad
        .iter()
        .zip(&qbufs)
        .map(|(v, q)| kvm_query_rows {
            q: q.as_ptr(),
            n_head: v.n_head_kv.max(1),
            kq_scale: 0.125,
        })
        .collect();
    let mut a1 = vec![0.25f32; w.cells.len()];
    let mut a2 = a1.clone();
    let call = |c: &Ctx, attn: &mut [f32]| {
        // SAFETY: every buffer is live and as long as the views and counts say.
        unsafe {
            kvm_attn_from_queries_layers(
                c.0,
                bad.as_ptr(),
                rows.as_ptr(),
                bad.len(),
                n_q as u32,
                w.cells.as_ptr(),
                w.cells.len(),
                std::ptr::null(),
                attn.as_mut_ptr(),
            )
        }
    };
    let (s1, s2) = (call(c1, &mut a1), call(c2, &mut a2));
    assert_eq!(s1, s2);
    let mut ok = refusals.to_vec();
    ok.push(KVM_STATUS_OK);
    expect(s1, &ok, "kvm_attn_from_queries_layers (hostile views)");
    accepted(s1, "kvm_attn_from_queries_layers");
    assert!(a1
        .iter()
        .map(|x| x.to_bits())
        .eq(a2.iter().map(|x| x.to_bits())));
    if s1 != KVM_STATUS_OK {
        assert!(
            a1.iter().all(|&x| x == 0.25),
            "a refused attention call wrote attn"
        );
    }
    unchanged(&cache, "kvm_attn_from_queries_layers");

    // Calibration: a refused observation leaves the profile as it was.
    let mut cal = std::ptr::null_mut();
    // SAFETY: valid out pointer.
    expect(
        unsafe { kvm_calib_init(&mut cal) },
        &[KVM_STATUS_OK],
        "kvm_calib_init",
    );
    // SAFETY: live ctx, profile and views.
    let st = unsafe {
        kvm_calib_observe(
            c1.0,
            cal,
            bad.as_ptr(),
            bad.len(),
            w.cells.as_ptr(),
            w.cells.len(),
        )
    };
    expect(st, &ok, "kvm_calib_observe (hostile views)");
    accepted(st, "kvm_calib_observe");
    if st != KVM_STATUS_OK {
        // SAFETY: the handle is a boxed Calib (read only here).
        assert!(*unsafe { &*(cal as *const Calib) } == Calib::default());
    }
    unchanged(&cache, "kvm_calib_observe");
    // SAFETY: from kvm_calib_init, freed once.
    unsafe { kvm_calib_free(cal) };
}
