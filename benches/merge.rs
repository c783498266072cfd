//! Merge-pass speed against memory's speed, measured in one run.
//!
//! Shapes: a 7B-like cache (32 layers, 32 KV heads × 128, f16, 4096 cells), Llama-3-8B's GQA one
//! (32 layers, 8 KV heads × 128) and a SmolLM2-like one (30 layers, 3 KV heads × 64, f16, 4096
//! cells); each event frees half the window.
//! For the default (EVICT_FOLD) and KVMerger it counts a pass's traffic the way memcpy's is
//! counted, every byte read plus every byte written (plan: the K rows it reads; apply: K and V
//! of every merged member read, each merged survivor's K and V written), and times plan, apply
//! and a memcpy of the same traffic on as many threads as the pass, in turn, several times;
//! it prints each one's speed over memcpy's in the same turn (median, least, greatest). Then
//! H2O's whole pass beside theirs, one event of the shape the evaluation makes (128 of 1020
//! cells) split into plan and apply, for H2O and EVICT_FOLD, and the attention scoring of an
//! event. criterion then times KVMerger's plan and apply on their own.
//!
//! Beside memcpy, each pass is compared with the floor of its own access pattern: the same rows
//! read in the same order on the same threads with no arithmetic, the survivors written back
//! (`stream`). A pass that mostly reads cannot beat that floor, and on a machine whose memcpy
//! reads and writes at once the floor itself is well under memcpy's counted speed (about half
//! on the 7B shape here; docs/findings.md, "bench-in-place").
//!
//! `KVM_BENCH_THREADS` (default 2) sets the ctx's pool and memcpy's threads;
//! `KVM_BENCH_QUICK=1` runs only the SmolLM2 shape, `KVM_BENCH_SHAPE=name` only the one named;
//! `KVM_BENCH_RATIO=1` only the speed lines;
//! `KVM_BENCH_CELLS=N` gives the shapes N cells instead of 4096 (a few hundred fit the CPU's
//! caches, which shows what the arithmetic alone costs).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use kvmerger::ffi::*;

struct Shape {
    name: &'static str,
    n_layers: usize,
    n_head: usize,
    d: usize,
    n_cells: usize,
}

const SHAPES: [Shape; 3] = [
    Shape {
        name: "smollm2-30x3x64",
        n_layers: 30,
        n_head: 3,
        d: 64,
        n_cells: 4096,
    },
    // Llama-3-8B's GQA cache, the shape the issue measured (2 KiB rows).
    Shape {
        name: "8b-32x8x128",
        n_layers: 32,
        n_head: 8,
        d: 128,
        n_cells: 4096,
    },
    Shape {
        name: "7b-32x32x128",
        n_layers: 32,
        n_head: 32,
        d: 128,
        n_cells: 4096,
    },
];

struct Cache {
    k: Vec<Vec<u16>>,
    v: Vec<Vec<u16>>,
    s: &'static Shape,
}

impl Cache {
    fn new(s: &'static Shape) -> Cache {
        let row = s.n_head * s.d;
        // Keys drift slowly with jumps (runs of similar neighbours), values are noise; f16 bits
        // made arithmetically so filling 2 GiB stays quick.
        let mut seed = 0x1234_5678u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..s.n_layers {
            let mut kl = vec![0u16; row * s.n_cells];
            let mut vl = vec![0u16; row * s.n_cells];
            let mut base: Vec<f32> = (0..row)
                .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
                .collect();
            for c in 0..s.n_cells {
                if next() % 8 == 0 {
                    base.iter_mut()
                        .for_each(|b| *b = (next() % 2000) as f32 / 1000.0 - 1.0);
                }
                for j in 0..row {
                    let noise = (next() % 200) as f32 / 1000.0 - 0.1;
                    kl[c * row + j] = half::f16::from_f32(base[j] + noise).to_bits();
                    vl[c * row + j] = half::f16::from_f32(noise * 5.0).to_bits();
                }
            }
            k.push(kl);
            v.push(vl);
        }
        Cache { k, v, s }
    }

    fn views(&mut self) -> Vec<kvm_layer_view> {
        let s = self.s;
        let row = s.n_head * s.d;
        let tv = |data: *mut u16| kvm_tensor_view {
            data: data as *mut _,
            r#type: 1,
            ne: [row as i64, s.n_cells as i64, 1, 1],
            nb: [2, 2 * row, 2 * row * s.n_cells, 2 * row * s.n_cells],
        };
        self.k
            .iter_mut()
            .zip(self.v.iter_mut())
            .map(|(k, v)| kvm_layer_view {
                k: tv(k.as_mut_ptr()),
                v: tv(v.as_mut_ptr()),
                n_head_kv: s.n_head as u32,
                n_embd_head_k: s.d as u32,
                n_embd_head_v: s.d as u32,
                v_trans: false,
            })
            .collect()
    }
}

fn ctx_of(method: kvm_method) -> *mut kvm_ctx {
    let mut p = kvm_params_default();
    p.method = method as i32;
    p.n_threads = threads() as u32;
    let mut c = std::ptr::null_mut();
    // SAFETY: valid pointers.
    let st = unsafe { kvm_ctx_init(&p, &mut c) };
    assert_eq!(st, kvm_status::KVM_STATUS_OK);
    c
}

fn plan(ctx: *mut kvm_ctx, views: &[kvm_layer_view], cells: &[u32], n_free: u32) -> *mut kvm_plan {
    let mut pl = std::ptr::null_mut();
    // Attention as a host would pass it (the pivot criterion); KVM_BENCH_NO_ATTN=1 times the
    // query-free fallback instead, which reads every merged member's keys once more.
    let attn: Vec<f32> = (0..cells.len())
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let attn_ptr = if std::env::var("KVM_BENCH_NO_ATTN").is_ok_and(|v| v == "1") {
        std::ptr::null()
    } else {
        attn.as_ptr()
    };
    // SAFETY: valid pointers, live buffers.
    let st = unsafe {
        kvm_plan_init(
            ctx,
            views.as_ptr(),
            views.len(),
            cells.as_ptr(),
            cells.len(),
            attn_ptr,
            std::ptr::null(),
            n_free,
            &mut pl,
        )
    };
    assert_eq!(st, kvm_status::KVM_STATUS_OK);
    pl
}

/// The fastest plan and the fastest apply of `ctx`'s method over `reps` runs; apply re-applies
/// one plan, which re-merges already merged rows at the same cost as the first time.
fn pass_times(
    ctx: *mut kvm_ctx,
    views: &[kvm_layer_view],
    cells: &[u32],
    n_free: u32,
    reps: usize,
) -> (Duration, Duration) {
    let pl = plan(ctx, views, cells, n_free);
    let t_plan = min_time(reps, || {
        let p = plan(ctx, views, cells, n_free);
        // SAFETY: from kvm_plan_init.
        unsafe { kvm_plan_free(black_box(p)) };
    });
    let t_apply = min_time(reps, || {
        // SAFETY: the views the plan was made on.
        let st = unsafe { kvm_plan_apply(ctx, pl, views.as_ptr(), views.len()) };
        assert_eq!(st, kvm_status::KVM_STATUS_OK);
    });
    // SAFETY: from kvm_plan_init.
    unsafe { kvm_plan_free(pl) };
    (t_plan, t_apply)
}

/// [`pass_times`] of a ctx of its own running `method` with the bench's other settings.
fn method_pass_times(
    method: kvm_method,
    views: &[kvm_layer_view],
    cells: &[u32],
    n_free: u32,
    reps: usize,
) -> (Duration, Duration) {
    let mc = ctx_of(method);
    let t = pass_times(mc, views, cells, n_free, reps);
    // SAFETY: from kvm_ctx_init.
    unsafe { kvm_ctx_free(mc) };
    t
}

fn min_time(reps: usize, mut f: impl FnMut()) -> Duration {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap()
}

/// Bytes one pass moves, counted as memcpy's are counted: every byte read plus every byte
/// written.
struct Traffic {
    /// K rows the plan reads: every window cell's for KVMerger; for EVICT_FOLD each leaving
    /// cell's and the surviving neighbours' of its run (the cells its similarities need).
    plan: usize,
    /// K and V rows of every member of a merged set read, and the survivor's written.
    apply: usize,
    merged_sets: usize,
    merged_members: usize,
    /// The cells whose K rows the plan reads, in order (window indices, which are the cells:
    /// the bench's window is cells 0..n).
    plan_rows: Vec<usize>,
    /// The merged sets in plan order: their members' cells and the survivor's (likewise).
    sets: Vec<(Vec<usize>, usize)>,
}

fn traffic(
    s: &Shape,
    method: kvm_method,
    set_of: &[u32],
    survivor: &[u32],
    n_sink: usize,
) -> Traffic {
    let row = s.n_head * s.d * 2;
    let n = set_of.len();
    let mut sets: Vec<(Vec<usize>, usize)> = survivor
        .iter()
        .map(|&sv| (Vec::new(), sv as usize))
        .collect();
    for (i, &x) in set_of.iter().enumerate() {
        if x != KVM_EVICTED {
            sets[x as usize].0.push(i);
        }
    }
    sets.retain(|(m, _)| m.len() > 1);
    let merged_sets = sets.len();
    let merged_members: usize = sets.iter().map(|(m, _)| m.len()).sum();
    let plan_rows: Vec<usize> = match method {
        kvm_method::KVM_METHOD_KVMERGER => (0..n).collect(),
        kvm_method::KVM_METHOD_EVICT_FOLD => {
            let leaving: Vec<bool> = (0..n)
                .map(|i| set_of[i] == KVM_EVICTED || survivor[set_of[i] as usize] as usize != i)
                .collect();
            // A leaving cell, and a survivor (not a sink) beside one.
            let read = |i: usize| {
                leaving[i]
                    || (i >= n_sink && ((i > 0 && leaving[i - 1]) || (i + 1 < n && leaving[i + 1])))
            };
            (0..n).filter(|&i| read(i)).collect()
        }
        _ => Vec::new(),
    };
    Traffic {
        plan: s.n_layers * plan_rows.len() * row,
        apply: s.n_layers * (merged_members + merged_sets) * 2 * row,
        merged_sets,
        merged_members,
        plan_rows,
        sets,
    }
}

/// Adds up a row as u64 words: reading its bytes at all, at the speed the CPU streams them.
fn read_row(row: &[u16]) -> u64 {
    // SAFETY: u64 has no invalid bit patterns; the unaligned ends are read as u16.
    let (pre, mid, post) = unsafe { row.align_to::<u64>() };
    let ends = pre.iter().chain(post).fold(0u64, |a, &x| a ^ u64::from(x));
    mid.iter().fold(ends, |a, &x| a ^ x)
}

/// The least work that moves a pass's traffic: per layer, on `threads()` threads (layer `l`
/// on thread `l % threads`), the K rows its plan reads, in its order, each read once as
/// words; then per merged set the members' K and V rows read and the survivor's K and V
/// written back unchanged. Returns the seconds of the plan's part and of the apply's part.
/// What the pass does beyond this is its arithmetic and its access's cost to memory; the
/// ratio of the two is how near the pass is to the memory's speed on its own access pattern.
fn stream(cache: &mut Cache, t: &Traffic) -> (f64, f64) {
    let row = cache.s.n_head * cache.s.d;
    let nt = threads();
    let run = |cache: &mut Cache, f: &(dyn Fn(&mut [u16], &mut [u16]) + Sync)| {
        let t0 = Instant::now();
        let mut ks: Vec<Vec<&mut Vec<u16>>> = (0..nt).map(|_| Vec::new()).collect();
        let mut vs: Vec<Vec<&mut Vec<u16>>> = (0..nt).map(|_| Vec::new()).collect();
        for (l, (k, v)) in cache.k.iter_mut().zip(cache.v.iter_mut()).enumerate() {
            ks[l % nt].push(k);
            vs[l % nt].push(v);
        }
        std::thread::scope(|sc| {
            for (k, v) in ks.into_iter().zip(vs) {
                sc.spawn(move || {
                    for (k, v) in k.into_iter().zip(v) {
                        f(k, v);
                    }
                });
            }
        });
        t0.elapsed().as_secs_f64()
    };
    let plan = run(cache, &|k, _| {
        let x = t
            .plan_rows
            .iter()
            .fold(0u64, |a, &c| a ^ read_row(&k[c * row..(c + 1) * row]));
        black_box(x);
    });
    let apply = run(cache, &|k, v| {
        let mut buf = vec![0u16; row];
        for (mem, sv) in &t.sets {
            let mut x = 0u64;
            for &c in mem {
                x ^= read_row(&k[c * row..(c + 1) * row]);
                x ^= read_row(&v[c * row..(c + 1) * row]);
            }
            black_box(x);
            for rows in [&mut *k, &mut *v] {
                let r = &mut rows[sv * row..(sv + 1) * row];
                buf.copy_from_slice(r);
                r.copy_from_slice(black_box(&buf));
            }
        }
    });
    (plan, apply)
}

fn threads() -> usize {
    std::env::var("KVM_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2)
}

/// memcpy on `threads()` threads, each copying its share of `src` into `dst`: the memory
/// speed the pass, which runs on as many threads, is compared with.
fn copy_threads(dst: &mut [u8], src: &[u8]) {
    let per = src.len().div_ceil(threads());
    std::thread::scope(|sc| {
        for (d, s) in dst.chunks_mut(per).zip(src.chunks(per)) {
            sc.spawn(move || d.copy_from_slice(black_box(s)));
        }
    });
    black_box(dst);
}

/// Median, least and greatest.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// The pass of `method` on the bench's cache against memcpy of the same traffic on as many
/// threads: plan, apply and memcpy timed in turn `reps` times (after one run left out), and
/// each of plan, apply and the whole pass given as its speed over memcpy's in the same turn;
/// and, timed in the same turns, the [`stream`] of the same rows, which the pass's speed is
/// also given over (the ceiling of its own access pattern), and that stream's over memcpy's.
/// Returns the median plan and apply times in ms, and the traffic.
#[allow(clippy::too_many_arguments)]
fn throughput(
    cache: &mut Cache,
    s: &'static Shape,
    method: kvm_method,
    views: &[kvm_layer_view],
    cells: &[u32],
    n_free: u32,
    reps: usize,
    src: &[u8],
    dst: &mut [u8],
) -> (f64, f64, Traffic) {
    let ctx = ctx_of(method);
    let pl = plan(ctx, views, cells, n_free);
    let mut info = std::mem::MaybeUninit::<kvm_plan_info>::uninit();
    // SAFETY: plan from kvm_plan_init.
    unsafe { kvm_plan_get(pl, info.as_mut_ptr()) };
    // SAFETY: written on OK.
    let info = unsafe { info.assume_init() };
    // SAFETY: arrays owned by the plan with the lengths the info gives.
    let (set_of, survivor) = unsafe {
        (
            std::slice::from_raw_parts(info.set_of, info.n_cells),
            std::slice::from_raw_parts(info.survivor, info.n_sets),
        )
    };
    let t = traffic(
        s,
        method,
        set_of,
        survivor,
        kvm_params_default().n_sink as usize,
    );
    let total = t.plan + t.apply;
    // memcpy reads and writes each byte: half the pass's traffic copied is the same traffic.
    let copy = (total / 2).min(src.len());
    let secs = |f: &mut dyn FnMut()| {
        let t0 = Instant::now();
        f();
        t0.elapsed().as_secs_f64()
    };
    let (mut rp, mut ra, mut rs, mut tp, mut ta, mut bw) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut sp, mut sa, mut ss, mut sm) = (vec![], vec![], vec![], vec![]);
    for rep in 0..=reps {
        let t_plan = secs(&mut || {
            let p = plan(ctx, views, cells, n_free);
            // SAFETY: from kvm_plan_init.
            unsafe { kvm_plan_free(black_box(p)) };
        });
        let t_apply = secs(&mut || {
            // SAFETY: the views the plan was made on; re-merging merged rows costs the same.
            let st = unsafe { kvm_plan_apply(ctx, pl, views.as_ptr(), views.len()) };
            assert_eq!(st, kvm_status::KVM_STATUS_OK);
        });
        let t_copy = secs(&mut || copy_threads(&mut dst[..copy], &src[..copy]));
        let (s_plan, s_apply) = stream(cache, &t);
        if rep == 0 {
            continue;
        }
        let mem = 2.0 * copy as f64 / t_copy;
        rp.push(t.plan as f64 / t_plan / mem);
        ra.push(t.apply as f64 / t_apply / mem);
        rs.push(total as f64 / (t_plan + t_apply) / mem);
        sp.push(s_plan / t_plan);
        sa.push(s_apply / t_apply);
        ss.push((s_plan + s_apply) / (t_plan + t_apply));
        sm.push(total as f64 / (s_plan + s_apply) / mem);
        tp.push(t_plan * 1e3);
        ta.push(t_apply * 1e3);
        bw.push(mem / 1e9);
    }
    // SAFETY: handles from their inits.
    unsafe {
        kvm_plan_free(pl);
        kvm_ctx_free(ctx);
    }
    let name = match method {
        kvm_method::KVM_METHOD_EVICT_FOLD => "evict_fold (default)",
        _ => "kvmerger",
    };
    let f = |v: Vec<f64>, p: usize| {
        let (m, lo, hi) = spread(v);
        format!("{m:.p$} [{lo:.p$}, {hi:.p$}]")
    };
    let (mp, ma) = (spread(tp.clone()).0, spread(ta.clone()).0);
    println!(
        "{}: {name}, threads {} | traffic (read + write) plan {:.1} MiB, apply {:.1} MiB ({} sets merge {} cells) | plan {} ms, apply {} ms | memcpy, same traffic and threads, {} GB/s | speed / memcpy's: plan {}, apply {}, pass {} | speed / the stream of the same rows': plan {}, apply {}, pass {} | the stream's speed / memcpy's {} (median [min, max] of {reps}) | kernels {}",
        s.name,
        threads(),
        t.plan as f64 / 1048576.0,
        t.apply as f64 / 1048576.0,
        t.merged_sets,
        t.merged_members,
        f(tp, 1),
        f(ta, 1),
        f(bw, 1),
        f(rp, 2),
        f(ra, 2),
        f(rs, 2),
        f(sp, 2),
        f(sa, 2),
        f(ss, 2),
        f(sm, 2),
        kvmerger::simd::kernels().name,
    );
    (mp, ma, t)
}

fn report(s: &'static Shape, c: &mut Criterion) {
    let mut cache = Cache::new(s);
    let views = cache.views();
    let cells: Vec<u32> = (0..s.n_cells as u32).collect();
    let n_free = (s.n_cells / 2) as u32;

    let reps = if s.n_head > 8 { 5 } else { 11 };
    // Large enough for either method's traffic: every K and V row read and half written.
    let cap = s.n_layers * s.n_cells * s.n_head * s.d * 2 * 3 / 2;
    let src = vec![1u8; cap];
    let mut dst = vec![0u8; cap];
    let mut per_method = Vec::new();
    let mut kvm_traffic = None;
    for m in [
        kvm_method::KVM_METHOD_EVICT_FOLD,
        kvm_method::KVM_METHOD_KVMERGER,
    ] {
        let (tp, ta, t) = throughput(
            &mut cache, s, m, &views, &cells, n_free, reps, &src, &mut dst,
        );
        per_method.push(tp + ta);
        kvm_traffic = Some(t);
    }
    let kvm_traffic = kvm_traffic.expect("KVMerger ran");
    drop((src, dst));
    if std::env::var("KVM_BENCH_RATIO").is_ok_and(|v| v == "1") {
        return;
    }

    // What each method's pass costs on the same cache and budget, and the default (EVICT_FOLD)
    // relative to H2O, whose choice of who leaves it shares: the ratio is what folding adds.
    let (tp, ta) = method_pass_times(kvm_method::KVM_METHOD_H2O, &views, &cells, n_free, reps);
    let h2o = (tp + ta).as_secs_f64() * 1e3;
    println!(
        "{}: plan + apply (medians above), {} of {} cells freed: h2o {:.2} ms, evict_fold (default) {:.2} ms, kvmerger {:.2} ms | ratio evict_fold/h2o {:.2}, evict_fold/kvmerger {:.2}",
        s.name,
        n_free,
        cells.len(),
        h2o,
        per_method[0],
        per_method[1],
        per_method[0] / h2o,
        per_method[0] / per_method[1],
    );

    // One event as the evaluation makes it: a 1020-cell window of a 1024-cell cache (the 50 %
    // budget of a 2048-token window) freeing an eighth of the cache, 128 cells, split into plan
    // and apply, for H2O and the default EVICT_FOLD; the difference is what folding costs.
    let win = &cells[..1020];
    let mut line = Vec::new();
    for m in [
        kvm_method::KVM_METHOD_H2O,
        kvm_method::KVM_METHOD_EVICT_FOLD,
    ] {
        let (tp, ta) = method_pass_times(m, &views, win, 128, 3 * reps);
        line.push((tp.as_secs_f64() * 1e3, ta.as_secs_f64() * 1e3));
    }
    println!(
        "{}: event of 128 of 1020 cells: h2o plan {:.3} ms + apply {:.3} ms, evict_fold plan {:.3} ms + apply {:.3} ms | ratio evict_fold/h2o {:.2}",
        s.name,
        line[0].0,
        line[0].1,
        line[1].0,
        line[1].1,
        (line[1].0 + line[1].1) / (line[0].0 + line[0].1),
    );

    // KVMerger from here on: its plan reads every K row of the window, the widest pass the
    // library makes, and the earlier criterion numbers were taken with it.
    let ctx = ctx_of(kvm_method::KVM_METHOD_KVMERGER);
    let pl = plan(ctx, &views, &cells, n_free);

    // Attention for pivots as the llama.cpp patch computes it: the recent queries of its ring
    // (4 by default, --kv-merge-queries) per layer, GQA 3:1, scored against the window at
    // every merge event; over this shape's cells and over the 1020-cell window of a 50 %
    // event in the short evaluation (2048-token window, 1024 cells).
    let (n_q, group) = (4usize, 3usize);
    let n_head_q = s.n_head * group;
    let q: Vec<f32> = (0..n_q * n_head_q * s.d)
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let rows: Vec<kvm_query_rows> = views
        .iter()
        .map(|_| kvm_query_rows {
            q: q.as_ptr(),
            n_head: n_head_q as u32,
            kq_scale: 0.125,
        })
        .collect();
    for n_win in [cells.len(), 1020] {
        let win = &cells[cells.len() - n_win..];
        let mut attn = vec![0f32; win.len()];
        let t_layers = min_time(reps, || {
            for v in &views {
                // SAFETY: valid pointers and lengths, live buffers.
                let st = unsafe {
                    kvm_attn_from_queries(
                        ctx,
                        v,
                        q.as_ptr(),
                        n_q as u32,
                        n_head_q as u32,
                        0.125,
                        win.as_ptr(),
                        win.len(),
                        std::ptr::null(),
                        attn.as_mut_ptr(),
                    )
                };
                assert_eq!(st, kvm_status::KVM_STATUS_OK);
            }
        });
        let t_one = min_time(reps, || {
            // SAFETY: valid pointers and lengths, live buffers.
            let st = unsafe {
                kvm_attn_from_queries_layers(
                    ctx,
                    views.as_ptr(),
                    rows.as_ptr(),
                    views.len(),
                    n_q as u32,
                    win.as_ptr(),
                    win.len(),
                    std::ptr::null(),
                    attn.as_mut_ptr(),
                )
            };
            assert_eq!(st, kvm_status::KVM_STATUS_OK);
        });
        let macs = n_q * n_head_q * n_win * s.d * views.len();
        let gf = |t: Duration| 2.0 * macs as f64 / t.as_secs_f64() / 1e9;
        println!(
            "{}: attention from {n_q} queries x {n_head_q} heads over {n_win} cells, all layers: one call {:.2} ms ({:.1} GFLOP/s of q.k), a call per layer {:.2} ms ({:.1} GFLOP/s); ratio {:.2}",
            s.name,
            t_one.as_secs_f64() * 1e3,
            gf(t_one),
            t_layers.as_secs_f64() * 1e3,
            gf(t_layers),
            t_layers.as_secs_f64() / t_one.as_secs_f64(),
        );
    }

    let mut g = c.benchmark_group(s.name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(if s.n_head > 8 { 10 } else { 3 }));
    g.throughput(Throughput::Bytes(kvm_traffic.plan as u64));
    g.bench_function("plan", |b| {
        b.iter(|| {
            let p = plan(ctx, &views, &cells, n_free);
            // SAFETY: from kvm_plan_init.
            unsafe { kvm_plan_free(p) };
        })
    });
    g.throughput(Throughput::Bytes(kvm_traffic.apply as u64));
    g.bench_function("apply", |b| {
        // SAFETY: as above.
        b.iter(|| unsafe { kvm_plan_apply(ctx, pl, views.as_ptr(), views.len()) })
    });
    g.finish();
    // SAFETY: handles from their inits.
    unsafe {
        kvm_plan_free(pl);
        kvm_ctx_free(ctx);
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let quick = std::env::var("KVM_BENCH_QUICK").is_ok_and(|v| v == "1");
    let cells: Option<usize> = std::env::var("KVM_BENCH_CELLS")
        .ok()
        .and_then(|v| v.parse().ok());
    let only = std::env::var("KVM_BENCH_SHAPE").ok();
    for s in SHAPES
        .iter()
        .filter(|s| !quick || s.n_head < 8)
        .filter(|s| only.as_deref().is_none_or(|o| o == s.name))
    {
        // A shape that lives for the whole run, with the cell count asked for.
        let s: &'static Shape = match cells {
            Some(n_cells) => Box::leak(Box::new(Shape { n_cells, ..*s })),
            None => s,
        };
        report(s, &mut c);
    }
    c.final_summary();
}
