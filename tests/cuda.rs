//! The device path (`kvm_cuda_*`) against the host path, on random ggml-layout caches of every
//! type and V layout, with GQA: attention sums, plans, and every byte the apply leaves.
//! Runs only with `--features cuda`; without a usable device each test says so and passes,
//! unless KVM_REQUIRE_GPU is set (scripts/gpu-check.sh sets it). The `#[ignore]`d
//! `bench_device_event` is the benchmark of scripts/gpu-check.sh.
#![cfg(feature = "cuda")]

mod common;

use std::ptr::{null, null_mut};
use std::time::Instant;

use common::*;
use kvmerger::cuda::{self, DevBuf, Stream};
use kvmerger::ffi::*;
use kvmerger::layout::GgmlType;

fn gpu() -> bool {
    if cuda::available() {
        return true;
    }
    assert!(
        std::env::var_os("KVM_REQUIRE_GPU").is_none(),
        "KVM_REQUIRE_GPU is set but no CUDA device is usable"
    );
    eprintln!("no usable CUDA device: skipped");
    false
}

/// A copy of a host cache on the device, with views of the same shapes and strides.
struct DevCache {
    k: Vec<DevBuf>,
    v: Vec<DevBuf>,
    views: Vec<kvm_layer_view>,
}

impl DevCache {
    fn of(c: &mut Cache) -> DevCache {
        let mut views = c.views();
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for (l, view) in c.layers.iter().zip(views.iter_mut()) {
            let mut kb = DevBuf::new(l.k.bytes().len()).expect("cudaMalloc");
            let mut vb = DevBuf::new(l.v.bytes().len()).expect("cudaMalloc");
            kb.upload(l.k.bytes()).expect("upload");
            vb.upload(l.v.bytes()).expect("upload");
            view.k.data = kb.ptr().cast();
            view.v.data = vb.ptr().cast();
            k.push(kb);
            v.push(vb);
        }
        DevCache { k, v, views }
    }

    fn download_into(&self, c: &mut Cache) {
        for (l, (k, v)) in c.layers.iter_mut().zip(self.k.iter().zip(&self.v)) {
            l.k.bytes_mut()
                .copy_from_slice(&k.download().expect("download"));
            l.v.bytes_mut()
                .copy_from_slice(&v.download().expect("download"));
        }
    }
}

/// Relative error allowed against the host result: the rounding of the cache type (the
/// device sums in another order, with FMA), two quanta for the block types.
fn tol(t: GgmlType) -> f32 {
    match t {
        GgmlType::F32 => 1e-5,
        GgmlType::F16 => 2.0 / 1024.0,
        GgmlType::BF16 => 2.0 / 128.0,
        GgmlType::Q8_0 => 2.0 / 127.0 + 1e-3,
        GgmlType::Q4_0 => 2.0 / 8.0 + 1e-3,
    }
}

fn close(g: &[f32], c: &[f32], t: GgmlType) -> bool {
    let amax = c.iter().fold(0f32, |m, x| m.max(x.abs()));
    let q = matches!(t, GgmlType::Q8_0 | GgmlType::Q4_0);
    g.iter().zip(c).all(|(g, c)| {
        let bound = if q {
            tol(t) * amax
        } else {
            tol(t) * (c.abs() + 0.01 * amax)
        };
        (g - c).abs() <= bound
    })
}

/// The device result `g` against the host result `c`, both from the original `o`: cells the
/// host wrote agree within [`tol`], and every other byte (other cells, row padding) is `o`'s.
fn compare(o: &Cache, c: &Cache, g: &Cache) -> Result<(), String> {
    for (il, ((lo, lc), lg)) in o.layers.iter().zip(&c.layers).zip(&g.layers).enumerate() {
        let mut k_mask = vec![false; lo.k.bytes().len()];
        let mut v_mask = vec![false; lo.v.bytes().len()];
        for cell in 0..o.n_cells {
            let written = (0..lo.n_head).any(|h| {
                let kr = lo.k_head_range(cell, h);
                lc.k.bytes()[kr.clone()] != lo.k.bytes()[kr]
                    || lo
                        .v_head_bytes(cell, h)
                        .iter()
                        .any(|&b| lc.v.bytes()[b] != lo.v.bytes()[b])
            });
            if !written {
                continue;
            }
            for h in 0..lo.n_head {
                k_mask[lo.k_head_range(cell, h)]
                    .iter_mut()
                    .for_each(|m| *m = true);
                lo.v_head_bytes(cell, h)
                    .iter()
                    .for_each(|&b| v_mask[b] = true);
                if !close(&lg.get_k(cell, h), &lc.get_k(cell, h), lo.tk) {
                    return Err(format!(
                        "layer {il} cell {cell} head {h} K: device {:?} host {:?}",
                        lg.get_k(cell, h),
                        lc.get_k(cell, h)
                    ));
                }
                if !close(&lg.get_v(cell, h), &lc.get_v(cell, h), lo.tv) {
                    return Err(format!(
                        "layer {il} cell {cell} head {h} V: device {:?} host {:?}",
                        lg.get_v(cell, h),
                        lc.get_v(cell, h)
                    ));
                }
            }
        }
        for (name, mask, a, b) in [
            ("K", &k_mask, lo.k.bytes(), lg.k.bytes()),
            ("V", &v_mask, lo.v.bytes(), lg.v.bytes()),
        ] {
            if let Some(i) = (0..a.len()).find(|&i| !mask[i] && a[i] != b[i]) {
                return Err(format!(
                    "layer {il} {name}: byte {i} changed on the device but not on the host"
                ));
            }
        }
    }
    Ok(())
}

/// A ring of `n_ring` query rows per layer on the device, and the host rows `sel` picks.
struct Queries {
    dev: Vec<DevBuf>,
    host_sel: Vec<Vec<f32>>,
    n_head: usize,
}

impl Queries {
    fn new(s: &Shape, n_head: usize, n_ring: usize, sel: &[u32], seed: u64) -> Queries {
        let mut rng = Rng(seed);
        let w = n_head * s.dk;
        let (mut dev, mut host_sel) = (Vec::new(), Vec::new());
        for _ in 0..s.n_layers {
            let ring: Vec<f32> = (0..n_ring * w).map(|_| rng.normal()).collect();
            let mut b = DevBuf::new(ring.len() * 4).expect("cudaMalloc");
            let bytes: Vec<u8> = ring.iter().flat_map(|x| x.to_le_bytes()).collect();
            b.upload(&bytes).expect("upload");
            dev.push(b);
            host_sel.push(
                sel.iter()
                    .flat_map(|&r| ring[r as usize * w..(r as usize + 1) * w].to_vec())
                    .collect(),
            );
        }
        Queries {
            dev,
            host_sel,
            n_head,
        }
    }

    fn rows(&self, dk: usize, device: bool) -> Vec<kvm_query_rows> {
        (0..self.dev.len())
            .map(|l| kvm_query_rows {
                q: if device {
                    self.dev[l].ptr() as *const f32
                } else {
                    self.host_sel[l].as_ptr()
                },
                n_head: self.n_head as u32,
                kq_scale: 1.0 / (dk as f32).sqrt(),
            })
            .collect()
    }
}

fn window(n_cells: usize, seed: u64) -> Vec<u32> {
    // scattered cell ids, as a llama.cpp ring buffer leaves them
    let mut rng = Rng(seed);
    let mut ids: Vec<u32> = (0..n_cells as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    ids.truncate(n_cells - n_cells / 8);
    ids
}

fn cuda_plan(
    ctx: &Ctx,
    views: &[kvm_layer_view],
    cells: &[u32],
    attn: Option<&[f32]>,
    n_free: u32,
) -> Plan {
    Plan::init_cuda(ctx.0, views, cells, attn, n_free)
        .unwrap_or_else(|st| panic!("kvm_cuda_plan_init: {st:?}: {}", last_error()))
}

fn attn_of(
    ctx: &Ctx,
    views: &[kvm_layer_view],
    q: &[kvm_query_rows],
    sel: Option<&[u32]>,
    n_q: u32,
    cells: &[u32],
    device: bool,
) -> (kvm_status, Vec<f32>) {
    let mut attn = vec![0f32; cells.len()];
    // SAFETY: live views and query rows; host arrays valid for the call.
    let st = unsafe {
        if device {
            kvm_cuda_attn_from_queries_layers(
                ctx.0,
                views.as_ptr(),
                q.as_ptr(),
                views.len(),
                sel.map_or(null(), |s| s.as_ptr()),
                n_q,
                cells.as_ptr(),
                cells.len(),
                null(),
                attn.as_mut_ptr(),
                null_mut(),
            )
        } else {
            kvm_attn_from_queries_layers(
                ctx.0,
                views.as_ptr(),
                q.as_ptr(),
                views.len(),
                n_q,
                cells.as_ptr(),
                cells.len(),
                null(),
                attn.as_mut_ptr(),
            )
        }
    };
    (st, attn)
}

/// One event through both paths; returns what differs.
fn one_case(s: &Shape, p: &kvm_params, use_attn: bool, seed: u64) -> Result<(), String> {
    let ctx = Ctx::new(p);
    let mut host = Cache::with_pad(s, seed, 3);
    let orig = Cache::with_pad(s, seed, 3);
    let mut devc = Cache::with_pad(s, seed, 3);
    let dev = DevCache::of(&mut devc);
    let hviews = host.views();
    let cells = window(s.n_cells, seed ^ 7);
    let sel = [3u32, 0, 2];
    let q = Queries::new(s, s.n_head * 3, 4, &sel, seed ^ 11);
    let (st, a_cpu) = attn_of(&ctx, &hviews, &q.rows(s.dk, false), None, 3, &cells, false);
    assert_eq!(st, kvm_status::KVM_STATUS_OK, "{}", last_error());
    let (st, a_gpu) = attn_of(
        &ctx,
        &dev.views,
        &q.rows(s.dk, true),
        Some(&sel),
        3,
        &cells,
        true,
    );
    if st != kvm_status::KVM_STATUS_OK {
        return Err(format!(
            "kvm_cuda_attn_from_queries_layers: {st:?}: {}",
            last_error()
        ));
    }
    let total: f32 = a_cpu.iter().sum();
    for (i, (g, c)) in a_gpu.iter().zip(&a_cpu).enumerate() {
        if (g - c).abs() > 1e-5 * total.max(1.0) {
            return Err(format!("attention of window cell {i}: device {g} host {c}"));
        }
    }
    let attn = use_attn.then_some(&a_cpu[..]);
    let n_free = (cells.len() / 4) as u32;
    let hp = Plan::init(&ctx, &hviews, &cells, attn, None, n_free)
        .map_err(|st| format!("kvm_plan_init: {st:?}"))?;
    let gp = cuda_plan(&ctx, &dev.views, &cells, attn, n_free);
    if hp.info() != gp.info() {
        return Err(format!(
            "plans differ:\nhost   {:?}\ndevice {:?}",
            hp.info(),
            gp.info()
        ));
    }
    assert_eq!(
        hp.apply(&ctx, &hviews),
        kvm_status::KVM_STATUS_OK,
        "{}",
        last_error()
    );
    // SAFETY: a live plan; views on live device buffers.
    let st = unsafe {
        kvm_cuda_plan_apply(ctx.0, hp.0, dev.views.as_ptr(), dev.views.len(), null_mut())
    };
    if st != kvm_status::KVM_STATUS_OK {
        return Err(format!("kvm_cuda_plan_apply: {st:?}: {}", last_error()));
    }
    dev.download_into(&mut devc);
    compare(&orig, &host, &devc)
}

fn shape(tk: GgmlType, tv: GgmlType, v_trans: bool) -> Shape {
    Shape {
        n_layers: 3,
        n_head: 2,
        dk: 32,
        dv: 64,
        n_cells: 96,
        tk,
        tv,
        v_trans,
    }
}

fn run_matrix(cases: &[(Shape, kvm_params, bool, &str)]) {
    let mut bad = Vec::new();
    for (i, (s, p, a, name)) in cases.iter().enumerate() {
        if let Err(e) = one_case(s, p, *a, 1000 + i as u64) {
            bad.push(format!(
                "{name} K {:?} V {:?} trans {}: {e}",
                s.tk, s.tv, s.v_trans
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} cases failed:\n{}",
        bad.len(),
        cases.len(),
        bad.join("\n")
    );
}

#[test]
fn every_type_and_layout_matches_the_host() {
    if !gpu() {
        return;
    }
    let mut cases = Vec::new();
    for tk in ALL_TYPES {
        for tv in ALL_TYPES {
            for v_trans in [false, true] {
                if v_trans && tv.is_quantized() {
                    continue;
                }
                for (m, a, name) in [
                    (kvm_method::KVM_METHOD_EVICT_FOLD, true, "evict-fold"),
                    (kvm_method::KVM_METHOD_KVMERGER, true, "kvmerger"),
                    (
                        kvm_method::KVM_METHOD_KVMERGER,
                        false,
                        "kvmerger query-free",
                    ),
                    (kvm_method::KVM_METHOD_CAM, true, "cam"),
                ] {
                    cases.push((shape(tk, tv, v_trans), params(m), a, name));
                }
            }
        }
    }
    run_matrix(&cases);
}

#[test]
fn every_option_matches_the_host() {
    if !gpu() {
        return;
    }
    let f16 = GgmlType::F16;
    let mut cases = Vec::new();
    let base = params(kvm_method::KVM_METHOD_KVMERGER);
    for v_trans in [false, true] {
        let mut p = base;
        p.sigma_mode = kvm_sigma::KVM_SIGMA_LAYER as i32;
        p.sigma = 1.0;
        cases.push((shape(f16, f16, v_trans), p, true, "sigma layer"));
        let mut p = base;
        p.sigma_mode = kvm_sigma::KVM_SIGMA_ATTENTION as i32;
        cases.push((shape(f16, f16, v_trans), p, true, "sigma attention"));
        let mut p = base;
        p.sigma_mode = kvm_sigma::KVM_SIGMA_RELATIVE as i32;
        p.sigma = 0.85;
        cases.push((shape(f16, f16, v_trans), p, true, "sigma relative"));
        let mut p = base;
        p.value_mode = kvm_value_mode::KVM_VALUE_MODE_PAPER as i32;
        cases.push((shape(f16, f16, v_trans), p, true, "paper values"));
        let mut p = base;
        p.merge_keys = false;
        cases.push((shape(f16, f16, v_trans), p, true, "values only"));
        let mut p = base;
        p.pivot = kvm_pivot::KVM_PIVOT_QUERY_FREE as i32;
        p.max_set = 3;
        p.age_bias = 100.0;
        cases.push((shape(f16, f16, v_trans), p, true, "age pairs"));
        for m in [
            kvm_method::KVM_METHOD_H2O,
            kvm_method::KVM_METHOD_STREAMING_LLM,
            kvm_method::KVM_METHOD_CONTEXT_SHIFT,
        ] {
            cases.push((shape(f16, f16, v_trans), params(m), true, "eviction only"));
        }
    }
    // wide heads and a larger GQA group than the matrix's
    let mut s = shape(f16, f16, false);
    s.n_head = 4;
    s.dk = 128;
    s.dv = 128;
    cases.push((s, params(kvm_method::KVM_METHOD_EVICT_FOLD), true, "dk 128"));
    run_matrix(&cases);
}

#[test]
fn refusals_leave_everything_untouched() {
    if !gpu() {
        return;
    }
    let s = shape(GgmlType::F16, GgmlType::F16, false);
    let ctx = Ctx::new(&params(kvm_method::KVM_METHOD_EVICT_FOLD));
    let mut host = Cache::new(&s, 5);
    let hviews = host.views();
    let cells: Vec<u32> = (0..s.n_cells as u32).collect();
    // host buffers given to the device path: refused before any kernel
    let st = Plan::init_cuda(ctx.0, &hviews, &cells, None, 8).err();
    assert_eq!(
        st,
        Some(kvm_status::KVM_STATUS_INVALID_ARG),
        "{}",
        last_error()
    );
    // a plan applied to other shapes: MISMATCH, device bytes unchanged
    let mut devc = Cache::new(&s, 5);
    let dev = DevCache::of(&mut devc);
    let before: Vec<Vec<u8>> = dev.k.iter().map(|b| b.download().unwrap()).collect();
    let p = Plan::init(&ctx, &hviews, &cells, None, None, 8).unwrap();
    // SAFETY: live plan and device views.
    let st = unsafe { kvm_cuda_plan_apply(ctx.0, p.0, dev.views.as_ptr(), 2, null_mut()) };
    assert_eq!(st, kvm_status::KVM_STATUS_MISMATCH);
    let after: Vec<Vec<u8>> = dev.k.iter().map(|b| b.download().unwrap()).collect();
    assert_eq!(before, after);
    // a non-finite key: INVALID_ARG, attn untouched
    let mut bad = Cache::new(&s, 6);
    bad.layers[1].set_k(9, 1, &vec![f32::NAN; s.dk]);
    let badd = DevCache::of(&mut bad);
    let q = Queries::new(&s, s.n_head * 3, 2, &[0, 1], 3);
    let mut attn = vec![7f32; cells.len()];
    // SAFETY: live device views and query rings; host arrays valid.
    let st = unsafe {
        kvm_cuda_attn_from_queries_layers(
            ctx.0,
            badd.views.as_ptr(),
            q.rows(s.dk, true).as_ptr(),
            3,
            null(),
            2,
            cells.as_ptr(),
            cells.len(),
            null(),
            attn.as_mut_ptr(),
            null_mut(),
        )
    };
    assert_eq!(st, kvm_status::KVM_STATUS_INVALID_ARG, "{}", last_error());
    assert!(attn.iter().all(|&a| a == 7.0));
}

/// Kernel throughput against this device's copy bandwidth, and the cost of a whole event.
/// `cargo test --features cuda --release --test cuda -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_device_event() {
    if !gpu() {
        return;
    }
    let stream = Stream(null_mut());
    // copy bandwidth: read + write of a 512 MiB buffer
    let n = 512usize << 20;
    let a = DevBuf::new(n).unwrap();
    let mut b = DevBuf::new(n).unwrap();
    b.copy_from(&a, stream).unwrap();
    cuda::sync(stream).unwrap();
    let t = Instant::now();
    for _ in 0..5 {
        b.copy_from(&a, stream).unwrap();
    }
    cuda::sync(stream).unwrap();
    let bw = 5.0 * 2.0 * n as f64 / t.elapsed().as_secs_f64();
    println!("device-to-device copy: {:.0} GB/s (read + write)", bw / 1e9);
    drop((a, b));
    // (name, layers, KV heads, query heads, head dim, cells): SmolLM2-135M, and half the layers
    // of a 7B-like model (filling a whole one on the host would take most of the check's time)
    for (name, n_layers, n_head, n_head_q, d, n_cells) in [
        ("smollm2-135m", 30, 3, 9, 64, 4096),
        ("7b-like, 16 of its 32 layers", 16, 8, 32, 128, 4096),
    ] {
        let s = Shape {
            n_layers,
            n_head,
            dk: d,
            dv: d,
            n_cells,
            tk: GgmlType::F16,
            tv: GgmlType::F16,
            v_trans: false,
        };
        let mut c = Cache::new(&s, 1);
        let dev = DevCache::of(&mut c);
        drop(c);
        let ctx = Ctx::new(&params(kvm_method::KVM_METHOD_EVICT_FOLD));
        let cells: Vec<u32> = (4..n_cells as u32).collect();
        let q = Queries::new(&s, n_head_q, 4, &[0, 1, 2, 3], 2);
        let rows = q.rows(d, true);
        let kv_bytes = (n_layers * n_cells * n_head * d * 2) as f64; // K of every cell, f16
        let time = |f: &mut dyn FnMut()| {
            f();
            let t = Instant::now();
            for _ in 0..5 {
                f();
            }
            t.elapsed().as_secs_f64() / 5.0
        };
        let (mut attn, mut st) = (Vec::new(), kvm_status::KVM_STATUS_OK);
        let ta = time(&mut || {
            let r = attn_of(&ctx, &dev.views, &rows, None, 4, &cells, true);
            st = r.0;
            attn = r.1;
        });
        assert_eq!(st, kvm_status::KVM_STATUS_OK, "{}", last_error());
        let n_free = (cells.len() / 8) as u32;
        for (m, label) in [
            (kvm_method::KVM_METHOD_EVICT_FOLD, "evict-fold"),
            (kvm_method::KVM_METHOD_KVMERGER, "kvmerger"),
        ] {
            let ctx = Ctx::new(&params(m));
            let tp = time(&mut || drop(cuda_plan(&ctx, &dev.views, &cells, Some(&attn), n_free)));
            let plan = cuda_plan(&ctx, &dev.views, &cells, Some(&attn), n_free);
            let info = plan.info();
            let tapp = time(&mut || {
                assert_eq!(
                    // SAFETY: live plan and device views (applying again merges merged rows
                    // again, which costs the same).
                    unsafe {
                        kvm_cuda_plan_apply(
                            ctx.0,
                            plan.0,
                            dev.views.as_ptr(),
                            dev.views.len(),
                            null_mut(),
                        )
                    },
                    kvm_status::KVM_STATUS_OK
                )
            });
            let merged_rows =
                info.counts.len() as f64 + info.freed.len() as f64 - info.n_evicted as f64;
            let apply_bytes = merged_rows * (n_layers * n_head * d * 2 * 2) as f64 * 1.5;
            println!(
                "{name} {label}: attention {:.2} ms ({:.0}% of copy bandwidth), plan {:.2} ms ({:.0}% for {} of K), apply {:.2} ms ({:.0}%), event {:.2} ms",
                ta * 1e3,
                100.0 * kv_bytes / ta / bw,
                tp * 1e3,
                100.0 * kv_bytes / tp / bw,
                if m == kvm_method::KVM_METHOD_KVMERGER { "one pass" } else { "the pairs" },
                tapp * 1e3,
                100.0 * apply_bytes / tapp / bw,
                (ta + tp + tapp) * 1e3
            );
            println!(
                "BENCH {name} {label} freed={} event_ms={:.3}",
                info.freed.len(),
                (ta + tp + tapp) * 1e3
            );
        }
    }
}
