//! The C ABI's answers to bad input: a status, a message, no output written, and every buffer
//! left as it was.

mod common;

use std::ptr::{null, null_mut};

use common::*;
use kvmerger::ffi::*;
use kvmerger::layout::GgmlType;

type Snapshot = Vec<(Vec<u8>, Vec<u8>)>;

fn fixture() -> (Cache, Snapshot) {
    let cache = Cache::new(&Shape::small(GgmlType::F16, GgmlType::F16, false), 77);
    let snap = cache.snapshot();
    (cache, snap)
}

/// Plans and applies with `views` modified by `f`; expects `want` and an untouched cache.
fn expect_refused(want: kvm_status, f: impl Fn(&mut Vec<kvm_layer_view>)) {
    let (mut cache, snap) = fixture();
    let mut views = cache.views();
    f(&mut views);
    let cells: Vec<u32> = (0..64).collect();
    let ctx = Ctx::new(&params(kvm_method::KVM_METHOD_KVMERGER));
    let got = run_plan(&ctx, &views, &cells, None, None, 8, true);
    assert_eq!(got, Err(want), "{}", last_error());
    assert!(!last_error().is_empty());
    assert_eq!(cache.snapshot(), snap, "buffers touched");
}

#[test]
fn null_arguments() {
    let (mut cache, snap) = fixture();
    let views = cache.views();
    let cells: Vec<u32> = (0..64).collect();
    let ctx = Ctx::new(&params(kvm_method::KVM_METHOD_KVMERGER));
    let mut plan = null_mut();
    // SAFETY: every pointer below is NULL or valid.
    unsafe {
        assert_eq!(
            kvm_plan_init(
                null(),
                views.as_ptr(),
                3,
                cells.as_ptr(),
                64,
                null(),
                null(),
                4,
                &mut plan
            ),
            kvm_status::KVM_STATUS_NULL_ARG
        );
        assert!(last_error().contains("ctx"));
        assert_eq!(
            kvm_plan_init(
                ctx.0,
                null(),
                3,
                cells.as_ptr(),
                64,
                null(),
                null(),
                4,
                &mut plan
            ),
            kvm_status::KVM_STATUS_NULL_ARG
        );
        assert_eq!(
            kvm_plan_init(
                ctx.0,
                views.as_ptr(),
                3,
                null(),
                64,
                null(),
                null(),
                4,
                &mut plan
            ),
            kvm_status::KVM_STATUS_NULL_ARG
        );
        assert_eq!(
            kvm_plan_init(
                ctx.0,
                views.as_ptr(),
                3,
                cells.as_ptr(),
                64,
                null(),
                null(),
                4,
                null_mut()
            ),
            kvm_status::KVM_STATUS_NULL_ARG
        );
        assert!(plan.is_null());
        assert_eq!(
            kvm_plan_apply(ctx.0, null(), views.as_ptr(), 3),
            kvm_status::KVM_STATUS_NULL_ARG
        );
        assert_eq!(
            kvm_plan_get(null(), null_mut()),
            kvm_status::KVM_STATUS_NULL_ARG
        );
        assert_eq!(
            kvm_ctx_init(null(), null_mut()),
            kvm_status::KVM_STATUS_NULL_ARG
        );
        assert_eq!(kvm_calib_init(null_mut()), kvm_status::KVM_STATUS_NULL_ARG);
        assert_eq!(
            kvm_calib_save(null(), c"/tmp/x".as_ptr()),
            kvm_status::KVM_STATUS_NULL_ARG
        );
        let mut cal = null_mut();
        assert_eq!(
            kvm_calib_load(null(), &mut cal),
            kvm_status::KVM_STATUS_NULL_ARG
        );
        assert!(cal.is_null());
        let mut attn = [0f32; 64];
        assert_eq!(
            kvm_attn_from_queries(
                ctx.0,
                views.as_ptr(),
                null(),
                1,
                2,
                0.1,
                cells.as_ptr(),
                64,
                null(),
                attn.as_mut_ptr()
            ),
            kvm_status::KVM_STATUS_NULL_ARG
        );
        assert_eq!(
            kvm_attn_add_probs(
                ctx.0,
                null(),
                64,
                1,
                64,
                cells.as_ptr(),
                64,
                attn.as_mut_ptr()
            ),
            kvm_status::KVM_STATUS_NULL_ARG
        );
        // Free of NULL is fine; an empty window with NULL pointers is a valid request.
        kvm_ctx_free(null_mut());
        kvm_plan_free(null_mut());
        kvm_calib_free(null_mut());
        assert_eq!(
            kvm_plan_init(
                ctx.0,
                views.as_ptr(),
                3,
                null(),
                0,
                null(),
                null(),
                0,
                &mut plan
            ),
            kvm_status::KVM_STATUS_OK
        );
        kvm_plan_free(plan);
    }
    assert_eq!(cache.snapshot(), snap);
}

#[test]
fn bad_views() {
    expect_refused(
        kvm_status::KVM_STATUS_BAD_TYPE,
        |v| v[1].k.r#type = 3, /* q4_1 */
    );
    expect_refused(kvm_status::KVM_STATUS_BAD_TYPE, |v| v[2].v.r#type = -1);
    expect_refused(kvm_status::KVM_STATUS_BAD_LAYOUT, |v| v[0].k.nb[0] = 4);
    expect_refused(kvm_status::KVM_STATUS_BAD_LAYOUT, |v| v[0].k.nb[1] = 2);
    expect_refused(kvm_status::KVM_STATUS_BAD_LAYOUT, |v| v[0].k.ne[2] = 2);
    expect_refused(kvm_status::KVM_STATUS_BAD_LAYOUT, |v| v[0].k.ne[1] = -1);
    expect_refused(kvm_status::KVM_STATUS_BAD_LAYOUT, |v| v[1].v.ne[1] = 63);
    expect_refused(kvm_status::KVM_STATUS_BAD_LAYOUT, |v| {
        v[1].k.nb[1] = usize::MAX / 2
    });
    expect_refused(kvm_status::KVM_STATUS_BAD_LAYOUT, |v| {
        v[1].k.data = (v[1].k.data as usize + 1) as *mut _
    });
    expect_refused(kvm_status::KVM_STATUS_BAD_LAYOUT, |v| v[1].n_head_kv = 3);
    expect_refused(kvm_status::KVM_STATUS_INVALID_ARG, |v| {
        v[1].n_embd_head_k = 0
    });
    // Two layers that share a buffer, and K overlapping V.
    expect_refused(kvm_status::KVM_STATUS_BAD_LAYOUT, |v| v[2].k = v[0].k);
    expect_refused(kvm_status::KVM_STATUS_BAD_LAYOUT, |v| {
        v[0].v.data = v[0].k.data
    });
    expect_refused(kvm_status::KVM_STATUS_NULL_ARG, |v| {
        v[0].v.data = null_mut()
    });
    // Transposed V must have one column per cell and cannot be quantized.
    expect_refused(kvm_status::KVM_STATUS_BAD_LAYOUT, |v| {
        v[0].v_trans = true;
        v[0].v.ne[1] = 32;
    });
    expect_refused(kvm_status::KVM_STATUS_BAD_LAYOUT, |v| {
        v[0].v_trans = true;
        v[0].v.r#type = 8;
        v[0].v.nb[0] = 34;
    });
    expect_refused(kvm_status::KVM_STATUS_BAD_LAYOUT, |v| {
        v[0].k.r#type = 8;
        v[0].k.nb[0] = 34;
        v[0].k.ne[0] = 48;
    });
}

#[test]
fn bad_windows_and_params() {
    let (mut cache, snap) = fixture();
    let views = cache.views();
    let ctx = Ctx::new(&params(kvm_method::KVM_METHOD_KVMERGER));
    let dup: Vec<u32> = vec![1, 2, 3, 2];
    assert_eq!(
        run_plan(&ctx, &views, &dup, None, None, 0, true),
        Err(kvm_status::KVM_STATUS_INVALID_ARG)
    );
    let oob: Vec<u32> = vec![1, 64];
    assert_eq!(
        run_plan(&ctx, &views, &oob, None, None, 0, true),
        Err(kvm_status::KVM_STATUS_INVALID_ARG)
    );
    let cells: Vec<u32> = (0..64).collect();
    let nan = vec![f32::NAN; 64];
    assert_eq!(
        run_plan(&ctx, &views, &cells, Some(&nan), None, 4, true),
        Err(kvm_status::KVM_STATUS_INVALID_ARG)
    );
    let zero = vec![0u32; 64];
    assert_eq!(
        run_plan(&ctx, &views, &cells, None, Some(&zero), 4, true),
        Err(kvm_status::KVM_STATUS_INVALID_ARG)
    );
    assert_eq!(
        run_plan(&ctx, &views, &cells, None, None, 64, true),
        Err(kvm_status::KVM_STATUS_BUDGET)
    );
    assert!(last_error().contains("cannot free 64"), "{}", last_error());
    for bad in [
        |p: &mut kvm_params| p.method = 99,
        |p: &mut kvm_params| p.pivot = -1,
        |p: &mut kvm_params| p.sigma_mode = 7,
        |p: &mut kvm_params| p.value_mode = 3,
        |p: &mut kvm_params| p.heavy_frac = 1.5,
        |p: &mut kvm_params| p.sim_floor = f32::NAN,
        |p: &mut kvm_params| {
            p.sigma_mode = 1;
            p.sigma = 0.0
        },
        |p: &mut kvm_params| {
            p.sigma_mode = 3;
            p.sigma = -0.5
        },
        |p: &mut kvm_params| {
            p.sigma_mode = 3;
            p.sigma = f32::INFINITY
        },
        |p: &mut kvm_params| {
            p.sigma_mode = 4;
            p.sigma = 0.0
        },
        |p: &mut kvm_params| p.max_set = 1,
        |p: &mut kvm_params| p.max_count = 1,
        |p: &mut kvm_params| p.cam_span = 0,
    ] {
        let mut p = kvm_params_default();
        bad(&mut p);
        let mut c = null_mut();
        // SAFETY: valid pointers.
        let st = unsafe { kvm_ctx_init(&p, &mut c) };
        assert_eq!(st, kvm_status::KVM_STATUS_INVALID_ARG);
        assert!(c.is_null());
    }
    assert_eq!(cache.snapshot(), snap);
}

#[test]
fn apply_refuses_other_views() {
    let (mut cache, snap) = fixture();
    let views = cache.views();
    let cells: Vec<u32> = (0..64).collect();
    let ctx = Ctx::new(&params(kvm_method::KVM_METHOD_KVMERGER));
    let mut plan = null_mut();
    // SAFETY: valid pointers and live buffers.
    unsafe {
        assert_eq!(
            kvm_plan_init(
                ctx.0,
                views.as_ptr(),
                3,
                cells.as_ptr(),
                64,
                null(),
                null(),
                8,
                &mut plan
            ),
            kvm_status::KVM_STATUS_OK
        );
        assert_eq!(
            kvm_plan_apply(ctx.0, plan, views.as_ptr(), 2),
            kvm_status::KVM_STATUS_MISMATCH
        );
        let mut other = Cache::new(&Shape::small(GgmlType::F32, GgmlType::F16, false), 1);
        let ov = other.views();
        assert_eq!(
            kvm_plan_apply(ctx.0, plan, ov.as_ptr(), 3),
            kvm_status::KVM_STATUS_MISMATCH
        );
        kvm_plan_free(plan);
    }
    assert_eq!(cache.snapshot(), snap);
}

/// Each C enum's `ALL` lists its values 0, 1, … in order, `TryFrom<i32>` takes exactly those,
/// and every status has its own description.
#[test]
fn c_enums_convert_from_their_values_only() {
    fn check<T: Copy + PartialEq + std::fmt::Debug + TryFrom<i32, Error = i32>>(
        all: &[T],
        value: impl Fn(T) -> i32,
    ) {
        for (i, &x) in all.iter().enumerate() {
            assert_eq!(value(x), i as i32);
            assert_eq!(T::try_from(i as i32), Ok(x));
        }
        for v in [-1, all.len() as i32, i32::MAX, i32::MIN] {
            assert_eq!(T::try_from(v), Err(v));
        }
    }
    check(kvm_status::ALL, |x| x as i32);
    check(kvm_method::ALL, |x| x as i32);
    check(kvm_pivot::ALL, |x| x as i32);
    check(kvm_sigma::ALL, |x| x as i32);
    check(kvm_value_mode::ALL, |x| x as i32);
    let text = |s: i32| {
        // SAFETY: static strings.
        unsafe { std::ffi::CStr::from_ptr(kvm_status_str(s)) }
            .to_str()
            .unwrap()
    };
    let mut seen: Vec<&str> = kvm_status::ALL.iter().map(|&s| text(s as i32)).collect();
    seen.push(text(kvm_status::ALL.len() as i32));
    assert_eq!(seen.last(), Some(&"unknown status code"));
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), kvm_status::ALL.len() + 1, "{seen:?}");
}

#[test]
fn reads_attention_for_four_methods_with_attention_pivots() {
    use kvm_method::*;
    use kvm_pivot::*;
    for &m in kvm_method::ALL {
        let reads = !matches!(m, KVM_METHOD_CONTEXT_SHIFT | KVM_METHOD_STREAMING_LLM);
        let attention = KVM_PIVOT_ATTENTION as i32;
        assert_eq!(
            kvm_method_reads_attention(m as i32, attention),
            reads,
            "{m:?}"
        );
        assert!(!kvm_method_reads_attention(
            m as i32,
            KVM_PIVOT_QUERY_FREE as i32
        ));
        assert!(!kvm_method_reads_attention(m as i32, 2));
    }
    assert!(!kvm_method_reads_attention(6, KVM_PIVOT_ATTENTION as i32));
    assert!(!kvm_method_reads_attention(-1, KVM_PIVOT_ATTENTION as i32));
}

#[test]
fn status_strings_and_info() {
    for s in -1..=11 {
        // SAFETY: static strings.
        let m = unsafe { std::ffi::CStr::from_ptr(kvm_status_str(s)) }
            .to_str()
            .unwrap();
        assert!(!m.is_empty());
    }
    // SAFETY: static string.
    let k = unsafe { std::ffi::CStr::from_ptr(kvm_kernels_name()) }
        .to_str()
        .unwrap();
    assert!(["avx2", "neon", "scalar"].contains(&k));
    assert_eq!(kvm_abi_version(), KVM_ABI_VERSION);
    assert_eq!(kvm_has_cuda(), cfg!(feature = "cuda"));
    let d = kvm_params_default();
    assert_eq!(
        (d.method, d.n_sink, d.n_recent),
        (kvm_method::KVM_METHOD_EVICT_FOLD as i32, 4, 32)
    );
    let ctx = Ctx::new(&d);
    let mut back = kvm_params_default();
    back.n_sink = 99;
    // SAFETY: valid pointers.
    let st = unsafe { kvm_ctx_params(ctx.0, &mut back) };
    assert_eq!(st, kvm_status::KVM_STATUS_OK);
    assert_eq!(back.n_sink, 4);
    assert!(back.n_threads >= 1);
}

#[test]
fn attention_from_queries_and_probs() {
    let mut s = Shape::small(GgmlType::F32, GgmlType::F32, false);
    s.n_layers = 1;
    let mut cache = Cache::new(&s, 5);
    let views = cache.views();
    let cells: Vec<u32> = (0..64).collect();
    let ctx = Ctx::new(&params(kvm_method::KVM_METHOD_KVMERGER));
    // Four query heads over two KV heads; the query equals cell 9's key in KV head 0, scaled up,
    // so query heads 0 and 1 attend almost only to cell 9.
    let n_head = 4;
    let mut q = vec![0f32; n_head * 32];
    let k9 = cache.layers[0].get_k(9, 0);
    for hq in 0..2 {
        q[hq * 32..(hq + 1) * 32]
            .iter_mut()
            .zip(&k9)
            .for_each(|(a, b)| *a = 8.0 * b);
    }
    let mut attn = vec![0f32; 64];
    // SAFETY: valid pointers and lengths.
    let st = unsafe {
        kvm_attn_from_queries(
            ctx.0,
            views.as_ptr(),
            q.as_ptr(),
            1,
            n_head as u32,
            1.0,
            cells.as_ptr(),
            64,
            null(),
            attn.as_mut_ptr(),
        )
    };
    assert_eq!(st, kvm_status::KVM_STATUS_OK, "{}", last_error());
    let total: f32 = attn.iter().sum();
    assert!(
        (total - n_head as f32).abs() < 1e-3,
        "each query head's softmax sums to 1: {total}"
    );
    let best = (0..64)
        .max_by(|&a, &b| attn[a].total_cmp(&attn[b]))
        .unwrap();
    assert_eq!(best, 9);
    assert!(attn[9] > 1.5);
    // A bias of -inf masks a cell.
    let mut bias = vec![0f32; 64];
    bias[9] = f32::NEG_INFINITY;
    let mut attn2 = vec![0f32; 64];
    // SAFETY: as above.
    unsafe {
        kvm_attn_from_queries(
            ctx.0,
            views.as_ptr(),
            q.as_ptr(),
            1,
            n_head as u32,
            1.0,
            cells.as_ptr(),
            64,
            bias.as_ptr(),
            attn2.as_mut_ptr(),
        )
    };
    assert_eq!(attn2[9], 0.0);
    // Bad head count.
    // SAFETY: as above.
    let st = unsafe {
        kvm_attn_from_queries(
            ctx.0,
            views.as_ptr(),
            q.as_ptr(),
            1,
            3,
            1.0,
            cells.as_ptr(),
            64,
            null(),
            attn.as_mut_ptr(),
        )
    };
    assert_eq!(st, kvm_status::KVM_STATUS_INVALID_ARG);

    // Softmax rows: 3 rows of 70 with stride 72, cells map into columns.
    let probs: Vec<f32> = (0..3 * 72).map(|i| (i % 72) as f32).collect();
    let sub: Vec<u32> = vec![5, 69, 0];
    let mut a = vec![1f32; 3];
    // SAFETY: as above.
    let st = unsafe {
        kvm_attn_add_probs(
            ctx.0,
            probs.as_ptr(),
            70,
            3,
            72,
            sub.as_ptr(),
            3,
            a.as_mut_ptr(),
        )
    };
    assert_eq!(st, kvm_status::KVM_STATUS_OK);
    assert_eq!(a, vec![1.0 + 15.0, 1.0 + 3.0 * 69.0, 1.0]);
    let bad: Vec<u32> = vec![70];
    // SAFETY: as above.
    let st = unsafe {
        kvm_attn_add_probs(
            ctx.0,
            probs.as_ptr(),
            70,
            3,
            72,
            bad.as_ptr(),
            1,
            a.as_mut_ptr(),
        )
    };
    assert_eq!(st, kvm_status::KVM_STATUS_INVALID_ARG);
}

/// Attention from query rows against an f64 softmax computed here from the cache's keys:
/// f16 keys, GQA 3:1, cells in scrambled order and counts that leave every kind of panel tail,
/// a bias; and the same bits with 1 and 3 threads.
/// The one-call form over several layers (each its own GQA group and scale; f16 keys through
/// the packing kernel, q8_0 and f32 through row reads) adds exactly what a call per layer
/// adds, bit for bit, on 1 and 3 threads; a bad layer fails the whole call before `attn` is
/// touched.
#[test]
fn attention_over_layers_in_one_call_equals_a_call_per_layer() {
    for tk in [GgmlType::F16, GgmlType::Q8_0, GgmlType::F32] {
        let mut s = Shape::small(tk, GgmlType::F16, false);
        s.n_cells = 70;
        let mut cache = Cache::new(&s, 5);
        let views = cache.views();
        let n_q = 4usize;
        let heads: Vec<usize> = (0..s.n_layers).map(|l| s.n_head * (l + 1)).collect();
        let qs: Vec<Vec<f32>> = heads
            .iter()
            .enumerate()
            .map(|(l, &h)| {
                (0..n_q * h * s.dk)
                    .map(|i| ((i * 7919 + 31 * l) % 991) as f32 / 991.0 - 0.5)
                    .collect()
            })
            .collect();
        let scale = |l: usize| 0.2 + 0.1 * l as f32;
        let rows: Vec<kvm_query_rows> = (0..s.n_layers)
            .map(|l| kvm_query_rows {
                q: qs[l].as_ptr(),
                n_head: heads[l] as u32,
                kq_scale: scale(l),
            })
            .collect();
        let cells: Vec<u32> = (0..61u32).map(|i| (i * 13 + 2) % 70).collect();
        let bias: Vec<f32> = (0..cells.len()).map(|i| (i % 4) as f32 * 0.3).collect();
        let start: Vec<f32> = (0..cells.len()).map(|i| i as f32 * 0.01).collect();
        let mut p = params(kvm_method::KVM_METHOD_KVMERGER);
        for threads in [1, 3] {
            p.n_threads = threads;
            let c = Ctx::new(&p);
            let mut sep = start.clone();
            for l in 0..s.n_layers {
                // SAFETY: valid pointers and lengths, live buffers.
                let st = unsafe {
                    kvm_attn_from_queries(
                        c.0,
                        &views[l],
                        qs[l].as_ptr(),
                        n_q as u32,
                        heads[l] as u32,
                        scale(l),
                        cells.as_ptr(),
                        cells.len(),
                        bias.as_ptr(),
                        sep.as_mut_ptr(),
                    )
                };
                assert_eq!(st, kvm_status::KVM_STATUS_OK, "{}", last_error());
            }
            let mut one = start.clone();
            // SAFETY: as above.
            let st = unsafe {
                kvm_attn_from_queries_layers(
                    c.0,
                    views.as_ptr(),
                    rows.as_ptr(),
                    views.len(),
                    n_q as u32,
                    cells.as_ptr(),
                    cells.len(),
                    bias.as_ptr(),
                    one.as_mut_ptr(),
                )
            };
            assert_eq!(st, kvm_status::KVM_STATUS_OK, "{}", last_error());
            assert!(
                sep.iter()
                    .zip(&one)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{tk:?}, {threads} threads: one call differs from a call per layer"
            );
            assert!(
                one.iter().zip(&start).all(|(a, b)| a > b),
                "every cell gets attention"
            );

            // layer 1 with a head count that is no multiple of n_head_kv, or no query rows
            let mut bad = rows.clone();
            bad[1].n_head = s.n_head as u32 + 1;
            let mut nulls = rows.clone();
            nulls[2].q = null();
            for (b, want) in [
                (&bad, kvm_status::KVM_STATUS_INVALID_ARG),
                (&nulls, kvm_status::KVM_STATUS_NULL_ARG),
            ] {
                let mut attn = start.clone();
                // SAFETY: as above (the broken entry is what is tested).
                let st = unsafe {
                    kvm_attn_from_queries_layers(
                        c.0,
                        views.as_ptr(),
                        b.as_ptr(),
                        views.len(),
                        n_q as u32,
                        cells.as_ptr(),
                        cells.len(),
                        bias.as_ptr(),
                        attn.as_mut_ptr(),
                    )
                };
                assert_eq!(st, want);
                assert_eq!(attn, start, "attn touched by a failed call");
            }
            // SAFETY: NULL queries with layers is an error, not a read.
            let st = unsafe {
                kvm_attn_from_queries_layers(
                    c.0,
                    views.as_ptr(),
                    null(),
                    views.len(),
                    n_q as u32,
                    cells.as_ptr(),
                    cells.len(),
                    null(),
                    one.as_mut_ptr(),
                )
            };
            assert_eq!(st, kvm_status::KVM_STATUS_NULL_ARG);
        }
    }
}

#[test]
fn attention_from_queries_matches_f64_softmax() {
    let mut s = Shape::small(GgmlType::F16, GgmlType::F16, false);
    s.n_layers = 1;
    s.n_cells = 80;
    let mut cache = Cache::new(&s, 11);
    let views = cache.views();
    let (n_kv, group, n_q) = (s.n_head, 3usize, 5usize);
    let n_head = n_kv * group;
    let q: Vec<f32> = (0..n_q * n_head * s.dk)
        .map(|i| ((i * 7919 + 13) % 997) as f32 / 997.0 - 0.5)
        .collect();
    let mut one = params(kvm_method::KVM_METHOD_KVMERGER);
    one.n_threads = 1;
    let mut three = one;
    three.n_threads = 3;
    let (c1, c3) = (Ctx::new(&one), Ctx::new(&three));
    for n in [1usize, 7, 8, 15, 16, 17, 29, 48, 79] {
        let cells: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 5) % 80).collect();
        let bias: Vec<f32> = (0..n).map(|i| (i % 3) as f32 * 0.25).collect();
        let run = |c: &Ctx| {
            let mut attn = vec![0f32; n];
            // SAFETY: valid pointers and lengths, live buffers.
            let st = unsafe {
                kvm_attn_from_queries(
                    c.0,
                    views.as_ptr(),
                    q.as_ptr(),
                    n_q as u32,
                    n_head as u32,
                    0.3,
                    cells.as_ptr(),
                    n,
                    bias.as_ptr(),
                    attn.as_mut_ptr(),
                )
            };
            assert_eq!(st, kvm_status::KVM_STATUS_OK, "{}", last_error());
            attn
        };
        let (a1, a3) = (run(&c1), run(&c3));
        assert!(
            a1.iter().zip(&a3).all(|(x, y)| x.to_bits() == y.to_bits()),
            "n={n}: 1 and 3 threads differ"
        );
        let mut want = vec![0f64; n];
        for r in 0..n_q {
            for hq in 0..n_head {
                let qv = &q[(r * n_head + hq) * s.dk..(r * n_head + hq + 1) * s.dk];
                let logit: Vec<f64> = cells
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| {
                        let k = cache.layers[0].get_k(c as usize, hq / group);
                        let dot: f64 = qv.iter().zip(&k).map(|(a, b)| *a as f64 * *b as f64).sum();
                        0.3 * dot + bias[i] as f64
                    })
                    .collect();
                let mx = logit.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = logit.iter().map(|l| (l - mx).exp()).sum();
                for (w, l) in want.iter_mut().zip(&logit) {
                    *w += (l - mx).exp() / sum;
                }
            }
        }
        for i in 0..n {
            assert!(
                (a1[i] as f64 - want[i]).abs() < 1e-5 * (n_q * n_head) as f64,
                "n={n} cell {i}: {} vs f64 {}",
                a1[i],
                want[i]
            );
        }
    }
}

/// The device entry points check their arguments in every build; then a build without the
/// `cuda` feature refuses with UNSUPPORTED, and one with it refuses host buffers (or says
/// there is no device). Nothing is written either way.
#[test]
fn device_entry_points_refuse_what_they_cannot_do() {
    let s = Shape::small(GgmlType::F16, GgmlType::F16, false);
    let mut c = Cache::new(&s, 3);
    let views = c.views();
    let snap = c.snapshot();
    let ctx = Ctx::new(&params(kvm_method::KVM_METHOD_EVICT_FOLD));
    let cells: Vec<u32> = (0..s.n_cells as u32).collect();
    let want = if !cfg!(feature = "cuda") {
        kvm_status::KVM_STATUS_UNSUPPORTED
    } else if kvmerger::cuda::available() {
        kvm_status::KVM_STATUS_INVALID_ARG // host memory given to the device path
    } else {
        kvm_status::KVM_STATUS_DEVICE
    };
    let init = |ctx, views: &[kvm_layer_view]| Plan::init_cuda(ctx, views, &cells, None, 8).err();
    assert_eq!(init(null(), &views), Some(kvm_status::KVM_STATUS_NULL_ARG));
    assert_eq!(init(ctx.0, &views), Some(want), "{}", last_error());
    let mut bad = views.clone();
    bad[0].k.r#type = 99;
    assert_eq!(init(ctx.0, &bad), Some(kvm_status::KVM_STATUS_BAD_TYPE));
    let q: Vec<f32> = vec![0.5; 2 * s.n_head * s.dk];
    let rows: Vec<kvm_query_rows> = (0..s.n_layers)
        .map(|_| kvm_query_rows {
            q: q.as_ptr(),
            n_head: s.n_head as u32,
            kq_scale: 0.125,
        })
        .collect();
    let mut attn = vec![3f32; cells.len()];
    // SAFETY: host arrays valid for the call.
    let st = unsafe {
        kvm_cuda_attn_from_queries_layers(
            ctx.0,
            views.as_ptr(),
            rows.as_ptr(),
            views.len(),
            null(),
            2,
            cells.as_ptr(),
            cells.len(),
            null(),
            attn.as_mut_ptr(),
            null_mut(),
        )
    };
    assert_eq!(st, want, "{}", last_error());
    assert!(attn.iter().all(|&a| a == 3.0));
    let p = Plan::init(&ctx, &views, &cells, None, None, 8).unwrap();
    // SAFETY: a live plan; views of live host buffers.
    let st = unsafe { kvm_cuda_plan_apply(ctx.0, p.0, views.as_ptr(), views.len(), null_mut()) };
    assert_eq!(st, want, "{}", last_error());
    // SAFETY: NULL plan must be refused.
    let st = unsafe { kvm_cuda_plan_apply(ctx.0, null(), views.as_ptr(), views.len(), null_mut()) };
    assert_eq!(st, kvm_status::KVM_STATUS_NULL_ARG);
    assert_eq!(c.snapshot(), snap);
}
