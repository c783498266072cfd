//! Calibration (Observation 2): a profile measured on one cache steers link scoring on another
//! cache of the same "model", and round-trips through its file.

mod common;

use std::ptr::null_mut;

use common::Rng;
use common::*;
use kvmerger::ffi::*;
use kvmerger::layout::GgmlType;

/// Two layers: layer 0's adjacent cosines spread widely (random keys with occasional repeats);
/// layer 1's keys are all nearly parallel, with the informative differences tiny.
fn two_layer_cache(seed: u64) -> Cache {
    let mut s = Shape::small(GgmlType::F32, GgmlType::F32, false);
    s.n_layers = 2;
    s.n_head = 1;
    s.n_cells = 128;
    let mut cache = Cache::new(&s, seed);
    let mut rng = Rng(seed ^ 0xabc);
    let base: Vec<f32> = (0..32).map(|_| rng.normal()).collect();
    for c in 0..128 {
        let a: Vec<f32> = (0..32).map(|_| rng.normal()).collect();
        cache.layers[0].set_k(c, 0, &a);
        let amp = 0.02 + 0.3 * rng.f32();
        let b: Vec<f32> = base.iter().map(|x| x + amp * rng.normal()).collect();
        cache.layers[1].set_k(c, 0, &b);
    }
    cache
}

fn layer1_top_links(cache: &Cache, n: usize) -> Vec<usize> {
    let l = &cache.layers[1];
    let cos = |a: &[f32], b: &[f32]| {
        let d: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        d / (a.iter().map(|x| x * x).sum::<f32>().sqrt()
            * b.iter().map(|x| x * x).sum::<f32>().sqrt())
    };
    let mut links: Vec<(usize, f32)> = (4..95)
        .map(|i| (i, cos(&l.get_k(i, 0), &l.get_k(i + 1, 0))))
        .collect();
    links.sort_by(|a, b| b.1.total_cmp(&a.1));
    links.iter().take(n).map(|x| x.0).collect()
}

fn merged_links(out: &PlanOut) -> Vec<usize> {
    (0..out.set_of.len() - 1)
        .filter(|&i| out.set_of[i] == out.set_of[i + 1])
        .collect()
}

#[test]
fn profile_changes_which_links_merge() {
    let mut p = params(kvm_method::KVM_METHOD_KVMERGER);
    p.heavy_frac = 0.0;
    p.max_set = 2;
    let ctx = Ctx::new(&p);
    // Calibrate on two other caches of the same kind.
    let mut cal = null_mut();
    // SAFETY: valid out pointer.
    let st = unsafe { kvm_calib_init(&mut cal) };
    assert_eq!(st, kvm_status::KVM_STATUS_OK);
    let cells: Vec<u32> = (0..128).collect();
    for seed in [1, 2] {
        let mut c = two_layer_cache(seed);
        let v = c.views();
        // SAFETY: valid pointers, live buffers.
        let st = unsafe {
            kvm_calib_observe(ctx.0, cal, v.as_ptr(), v.len(), cells.as_ptr(), cells.len())
        };
        assert_eq!(st, kvm_status::KVM_STATUS_OK);
    }
    let path = std::env::temp_dir().join(format!("kvm-calib-{}.txt", std::process::id()));
    let cpath = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let mut loaded = null_mut();
    // SAFETY: valid pointers.
    unsafe {
        assert_eq!(
            kvm_calib_save(cal, cpath.as_ptr()),
            kvm_status::KVM_STATUS_OK
        );
        assert_eq!(
            kvm_calib_load(cpath.as_ptr(), &mut loaded),
            kvm_status::KVM_STATUS_OK
        );
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("kvmerger-profile 1\nlayers 2\n"), "{text}");
    let _ = std::fs::remove_file(&path);

    let mut cache = two_layer_cache(3);
    let views = cache.views();
    let n_free = 20;
    let plain = run_plan(&ctx, &views, &cells, None, None, n_free, false).unwrap();
    // SAFETY: valid handles.
    let st = unsafe { kvm_ctx_set_calib(ctx.0, loaded) };
    assert_eq!(st, kvm_status::KVM_STATUS_OK);
    let steered = run_plan(&ctx, &views, &cells, None, None, n_free, false).unwrap();
    assert_ne!(plain, steered, "the profile changes the plan");
    // Layer 1's best links, which plain mean cosine drowns in layer 0's spread, get merged.
    let top = layer1_top_links(&cache, n_free as usize);
    let hits = |o: &PlanOut| merged_links(o).iter().filter(|l| top.contains(l)).count();
    eprintln!(
        "layer-1 top links merged: plain {} / steered {} of {n_free}",
        hits(&plain),
        hits(&steered)
    );
    assert!(hits(&steered) > hits(&plain));
    // A profile for another layer count is refused at plan time.
    let mut s = Shape::small(GgmlType::F32, GgmlType::F32, false);
    s.n_layers = 3;
    let mut other = Cache::new(&s, 4);
    let ov = other.views();
    let oc: Vec<u32> = (0..64).collect();
    assert_eq!(
        run_plan(&ctx, &ov, &oc, None, None, 4, false),
        Err(kvm_status::KVM_STATUS_BAD_PROFILE)
    );
    // SAFETY: valid handles; NULL clears.
    unsafe {
        assert_eq!(
            kvm_ctx_set_calib(ctx.0, std::ptr::null()),
            kvm_status::KVM_STATUS_OK
        );
        kvm_calib_free(cal);
        kvm_calib_free(loaded);
    }
    assert_eq!(
        run_plan(&ctx, &views, &cells, None, None, n_free, false).unwrap(),
        plain
    );
}

#[test]
fn malformed_profiles_are_refused() {
    let dir = std::env::temp_dir();
    for (i, text) in [
        "",
        "kvmerger-profile 2\nlayers 1\nlayer 0 10 0.5 0.1 0.2\n",
        "kvmerger-profile 1\nlayers 2\nlayer 0 10 0.5 0.1 0.2\n",
        "kvmerger-profile 1\nlayers 1\nlayer 0 10 0.5 -0.1 0.2\n",
        "kvmerger-profile 1\nlayers 1\nlayer 3 10 0.5 0.1 0.2\n",
        "kvmerger-profile 1\nlayers 1\nlayer 0 10 nan 0.1 0.2\n",
    ]
    .iter()
    .enumerate()
    {
        let path = dir.join(format!("kvm-bad-{}-{i}.txt", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let cpath = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        let mut cal = null_mut();
        // SAFETY: valid pointers.
        let st = unsafe { kvm_calib_load(cpath.as_ptr(), &mut cal) };
        let _ = std::fs::remove_file(&path);
        assert_eq!(st, kvm_status::KVM_STATUS_BAD_PROFILE, "case {i}");
        assert!(cal.is_null());
    }
}
