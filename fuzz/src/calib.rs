//! Target `calib`: the profile exports. Half the inputs are profile files for
//! `kvm_calib_load` (raw text); the other half observe drawn windows into profiles on one and
//! several threads, save, load, set them on ctxs and plan with them.
//!
//! Checks: a refused load writes no handle, a loaded profile saves to a file that loads and
//! saves back byte for byte, a refused observation leaves the profile as it was, profiles and
//! the plans they steer do not depend on the thread count.

use std::ffi::CString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use kvmerger::ffi::*;
use kvmerger::merge::calib::Calib;

use crate::api::*;
use crate::cache::{Cache, Fill, Spec};
use crate::input::In;

use kvm_status::*;

/// A file name of this process's own, so parallel runs and tests do not collide.
fn temp_file() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!(
        "kvm-fuzz-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

fn cpath(p: &std::path::Path) -> CString {
    CString::new(p.to_str().expect("UTF-8 temp path")).expect("no NUL")
}

fn calib_of<'a>(c: *const kvm_calib) -> &'a Calib {
    // SAFETY: the handle is a boxed Calib made by this library (read only here).
    unsafe { &*(c as *const Calib) }
}

struct Profile(*mut kvm_calib);

impl Drop for Profile {
    fn drop(&mut self) {
        // SAFETY: from kvm_calib_init / kvm_calib_load, freed once.
        unsafe { kvm_calib_free(self.0) }
    }
}

fn load(path: &std::path::Path) -> Result<Profile, kvm_status> {
    let mut out = SENTINEL as *mut kvm_calib;
    // SAFETY: a valid path string and out pointer.
    let st = unsafe { kvm_calib_load(cpath(path).as_ptr(), &mut out) };
    expect(
        st,
        &[KVM_STATUS_OK, KVM_STATUS_BAD_PROFILE, KVM_STATUS_IO],
        "kvm_calib_load",
    );
    if st != KVM_STATUS_OK {
        assert_eq!(
            out as usize, SENTINEL,
            "kvm_calib_load wrote *out and failed"
        );
        return Err(st);
    }
    Ok(Profile(out))
}

fn save(c: &Profile, path: &std::path::Path) -> Vec<u8> {
    // SAFETY: a live profile and a valid path.
    let st = unsafe { kvm_calib_save(c.0, cpath(path).as_ptr()) };
    expect(st, &[KVM_STATUS_OK], "kvm_calib_save");
    std::fs::read(path).expect("saved profile")
}

/// Saves `c`, loads that file and saves again: the same bytes and the same profile.
fn round_trip(c: &Profile) {
    let path = temp_file();
    let first = save(c, &path);
    let again = load(&path).unwrap_or_else(|st| {
        panic!(
            "a saved profile does not load: {st:?} {}\n{}",
            last_error(),
            String::from_utf8_lossy(&first)
        )
    });
    assert!(
        calib_of(again.0) == calib_of(c.0),
        "a saved profile loads as another"
    );
    let second = save(&again, &path);
    let _ = std::fs::remove_file(&path);
    assert!(first == second, "save(load(save(p))) != save(p)");
}

/// `kvm_calib_observe` of window `w` into profile `a` with `c1` over `views_a` and into `b`
/// with `c2` over `views_b` (caches of the same bytes): equal statuses and profiles, and a
/// refused observation leaves the profile as it was.
pub fn observe_twins(
    (c1, a, views_a): (&Ctx, *mut kvm_calib, &[kvm_layer_view]),
    (c2, b, views_b): (&Ctx, *mut kvm_calib, &[kvm_layer_view]),
    w: &Window,
) -> kvm_status {
    let prior = calib_of(a).clone();
    let mut st = [KVM_STATUS_OK; 2];
    for (s, (c, cal, views)) in st.iter_mut().zip([(c1, a, views_a), (c2, b, views_b)]) {
        // SAFETY: live ctx, profile and views.
        *s = unsafe {
            kvm_calib_observe(
                c.0,
                cal,
                views.as_ptr(),
                views.len(),
                w.cells.as_ptr(),
                w.cells.len(),
            )
        };
    }
    assert_eq!(st[0], st[1]);
    let mut ok = vec![KVM_STATUS_OK, KVM_STATUS_BAD_PROFILE];
    if !w.valid {
        ok.push(KVM_STATUS_INVALID_ARG);
    }
    expect(st[0], &ok, "kvm_calib_observe");
    assert!(
        calib_of(a) == calib_of(b),
        "profiles depend on the thread count"
    );
    if st[0] != KVM_STATUS_OK {
        assert!(
            *calib_of(a) == prior,
            "a refused observation changed the profile"
        );
    }
    st[0]
}

/// `kvm_ctx_set_calib` of `a` on `c1` and `b` on `c2` (NULL clears): equal statuses, OK or
/// the refusal of a profile without observations.
pub fn set_twins(c1: &Ctx, c2: &Ctx, a: *const kvm_calib, b: *const kvm_calib) -> kvm_status {
    let mut st = [KVM_STATUS_OK; 2];
    for (s, (c, cal)) in st.iter_mut().zip([(c1, a), (c2, b)]) {
        // SAFETY: live ctx, used by this thread only; NULL or a live profile.
        *s = unsafe { kvm_ctx_set_calib(c.0, cal) };
    }
    assert_eq!(st[0], st[1]);
    let ok: &[kvm_status] = if a.is_null() {
        &[KVM_STATUS_OK]
    } else {
        &[KVM_STATUS_OK, KVM_STATUS_BAD_PROFILE]
    };
    expect(st[0], ok, "kvm_ctx_set_calib");
    st[0]
}

pub fn run(data: &[u8]) {
    let mut r = In::new(data);
    if r.bool() {
        parse(r.0.take_rest());
    } else {
        observe(&mut r);
    }
}

fn parse(text: &[u8]) {
    let path = temp_file();
    std::fs::write(&path, text).expect("temp file");
    let got = load(&path);
    let _ = std::fs::remove_file(&path);
    let Ok(cal) = got else {
        return;
    };
    round_trip(&cal);
    // A loaded profile steers planning on a cache of its layer count, and is refused on
    // another.
    let n_layers = calib_of(cal.0).layers.len();
    let mut p = kvm_params_default();
    p.method = kvm_method::KVM_METHOD_KVMERGER as i32;
    let twins = ctx_twins_cached(&p, 2).expect("defaults are valid");
    let (c1, c2) = (&twins.0, &twins.1);
    if set_twins(c1, c2, cal.0, cal.0) == KVM_STATUS_OK {
        plan_with(c1, c2, &p, n_layers);
    }
    set_twins(c1, c2, std::ptr::null(), std::ptr::null());
}

/// Plans on a cache of (up to 3) layers with ctxs that hold a profile of `n_layers`.
fn plan_with(c1: &Ctx, c2: &Ctx, p: &kvm_params, n_layers: usize) {
    let spec = Spec {
        n_layers: n_layers.clamp(1, 3),
        n_cells: 40,
        n_head: 2,
        tk: [kvmerger::layout::GgmlType::F16; 3],
        tv: [kvmerger::layout::GgmlType::F16; 3],
        dk: 8,
        dv: 8,
        pad_k: 0,
        pad_v: 0,
        v_trans: false,
    };
    let mut cache = Cache::new(&spec, Fill::Runs, n_layers as u64);
    let w = Window {
        cells: (0..40).collect(),
        attn: None,
        counts: None,
        n_free: 1,
        valid: true,
    };
    let o = crate::plan::round(c1, c2, p, &mut cache, &w, 0, true);
    assert_eq!(
        o.is_some(),
        n_layers == spec.n_layers,
        "a profile of {n_layers} layers on a cache of {}",
        spec.n_layers
    );
}

fn observe(r: &mut In) {
    let (spec, mut cache) = Cache::read(r, 32);
    let p = read_params(r);
    let n = 2 + r.below(3) as u32;
    let Ok(twins) = ctx_twins_cached(&p, n) else {
        return;
    };
    let (c1, c2) = (&twins.0, &twins.1);
    let mut cals = [std::ptr::null_mut(); 2];
    for c in cals.iter_mut() {
        // SAFETY: valid out pointer.
        expect(
            unsafe { kvm_calib_init(c) },
            &[KVM_STATUS_OK],
            "kvm_calib_init",
        );
    }
    let (a, b) = (Profile(cals[0]), Profile(cals[1]));
    let before = cache.snapshot();
    for _ in 0..1 + r.below(3) {
        // Now and then a cache of another layer count, which a profile with data refuses.
        let mut other;
        let target = if r.u8() < 24 {
            let mut s = spec;
            s.n_layers = 1 + (spec.n_layers + r.below(2)) % 3;
            other = Cache::new(&s, Fill::Runs, 7);
            &mut other
        } else {
            &mut cache
        };
        let w = Window::read(r, target.n_cells);
        let views = target.views();
        observe_twins((c1, a.0, &views), (c2, b.0, &views), &w);
    }
    assert!(
        cache.snapshot() == before,
        "kvm_calib_observe wrote the cache"
    );
    round_trip(&a);
    set_twins(c1, c2, a.0, b.0);
    let w = Window::read(r, cache.n_cells);
    crate::plan::round(c1, c2, &p, &mut cache, &w, 0, true);
    // Back to plain cosine, as the cached ctxs need.
    set_twins(c1, c2, std::ptr::null(), std::ptr::null());
}
