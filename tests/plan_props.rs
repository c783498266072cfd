//! Plan invariants on random and adversarial inputs, through the C ABI: exact budget, sets
//! are runs, protected cells are singletons that survive, survivors inside their sets, freed
//! list consistent, counts add up, and the same plan for every thread count.

mod common;

use common::Rng;
use common::*;
use kvmerger::ffi::*;
use kvmerger::layout::GgmlType;
use proptest::prelude::*;

/// Which window cells a method must keep, and whether they must stay alone in their set.
fn protected(p: &kvm_params, n: usize, attn: Option<&[f32]>) -> Vec<bool> {
    let m = p.method;
    let mut prot = vec![false; n];
    if m == kvm_method::KVM_METHOD_CONTEXT_SHIFT as i32 {
        return prot;
    }
    for x in prot.iter_mut().take(p.n_sink as usize) {
        *x = true;
    }
    if m == kvm_method::KVM_METHOD_STREAMING_LLM as i32 {
        return prot;
    }
    for x in prot.iter_mut().skip(n.saturating_sub(p.n_recent as usize)) {
        *x = true;
    }
    if let Some(a) = attn {
        let k = (p.heavy_frac as f64 * n as f64).round() as usize;
        let mut rest: Vec<usize> = (0..n).filter(|&i| !prot[i]).collect();
        rest.sort_by(|&x, &y| a[y].total_cmp(&a[x]).then(x.cmp(&y)));
        for &i in rest.iter().take(k) {
            prot[i] = true;
        }
    }
    prot
}

fn check_invariants(
    p: &kvm_params,
    cells: &[u32],
    attn: Option<&[f32]>,
    counts: Option<&[u32]>,
    n_free: usize,
    out: &PlanOut,
) {
    let n = cells.len();
    assert_eq!(out.set_of.len(), n);
    assert_eq!(out.freed.len(), n_free, "exact budget");
    assert_eq!(out.survivor.len() + n_free, n);
    // Survivors are members of their own set, in position order.
    for (s, &w) in out.survivor.iter().enumerate() {
        assert_eq!(out.set_of[w as usize], s as u32, "survivor inside its set");
        if s > 0 {
            assert!(out.survivor[s - 1] < w, "sets numbered in position order");
        }
    }
    // Freed = every window cell that is not a survivor, in position order.
    let surv: std::collections::HashSet<u32> = out.survivor.iter().copied().collect();
    let expect_freed: Vec<u32> = (0..n as u32)
        .filter(|i| !surv.contains(i))
        .map(|i| cells[i as usize])
        .collect();
    assert_eq!(out.freed, expect_freed, "freed list");
    // Counts add up over members.
    let cin = |i: usize| counts.map_or(1, |c| c[i]);
    let mut sum = vec![0u32; out.survivor.len()];
    let mut n_ev = 0;
    for i in 0..n {
        match out.set_of[i] {
            KVM_EVICTED => n_ev += 1,
            s => sum[s as usize] += cin(i),
        }
    }
    assert_eq!(sum, out.counts, "counts");
    assert_eq!(n_ev, out.n_evicted);
    // Sets are runs for the merging methods.
    let merging = [
        kvm_method::KVM_METHOD_KVMERGER as i32,
        kvm_method::KVM_METHOD_EVICT_FOLD as i32,
    ];
    if merging.contains(&p.method) {
        for s in 0..out.survivor.len() as u32 {
            let m: Vec<usize> = (0..n).filter(|&i| out.set_of[i] == s).collect();
            assert_eq!(
                m.last().unwrap() - m[0] + 1,
                m.len(),
                "set {s} is not a run: {m:?}"
            );
        }
        // Merged sets keep to the size and token caps (EVICT_FOLD has neither).
        if p.method == kvm_method::KVM_METHOD_KVMERGER as i32 {
            for s in 0..out.survivor.len() as u32 {
                let m: Vec<usize> = (0..n).filter(|&i| out.set_of[i] == s).collect();
                if m.len() < 2 {
                    continue;
                }
                assert!(
                    p.max_set == 0 || m.len() <= p.max_set as usize,
                    "set {s} has {} cells",
                    m.len()
                );
                assert!(
                    p.max_count == 0 || out.counts[s as usize] <= p.max_count,
                    "set {s} stands for {} tokens",
                    out.counts[s as usize]
                );
            }
        }
    } else {
        // Eviction methods merge nothing.
        assert_eq!(out.n_evicted, n_free);
        assert!(out
            .counts
            .iter()
            .zip(&out.survivor)
            .all(|(&c, &w)| c == cin(w as usize)));
    }
    // Protected cells survive; under KVMerger they are alone; sinks never absorb.
    let prot = protected(p, n, attn);
    for i in (0..n).filter(|&i| prot[i]) {
        let s = out.set_of[i];
        assert_ne!(s, KVM_EVICTED, "protected cell {i} evicted");
        assert_eq!(
            out.survivor[s as usize], i as u32,
            "protected cell {i} merged away"
        );
        let members = out.set_of.iter().filter(|&&x| x == s).count();
        let is_sink =
            i < p.n_sink as usize && p.method != kvm_method::KVM_METHOD_CONTEXT_SHIFT as i32;
        if p.method == kvm_method::KVM_METHOD_KVMERGER as i32 || is_sink {
            assert_eq!(members, 1, "protected cell {i} is not a singleton");
        }
    }
}

/// A random window: `n` distinct cell ids of a cache of `n_cells`, in random order (cell ids
/// need not follow positions).
fn window(rng: &mut Rng, n_cells: usize, n: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..n_cells as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    ids.truncate(n);
    ids
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_plans_hold_invariants(
        seed in any::<u64>(),
        method in 0usize..6,
        n in 0usize..64,
        free_frac in 0.0f64..1.0,
        with_attn in any::<bool>(),
        with_counts in any::<bool>(),
        n_sink in 0u32..6,
        n_recent in 0u32..12,
        floor in prop::option::of(-0.5f32..1.0),
        max_set in prop::option::of(2u32..6),
        max_count in prop::option::of(2u32..9),
        age_bias in 0.0f32..0.5,
        query_free in any::<bool>(),
    ) {
        let mut rng = Rng(seed);
        let mut cache = Cache::new(&Shape::small(GgmlType::F16, GgmlType::F16, false), seed);
        let views = cache.views();
        let cells = window(&mut rng, cache.n_cells, n);
        let attn: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
        let counts: Vec<u32> = (0..n).map(|_| 1 + rng.below(4) as u32).collect();
        let mut p = params(ALL_METHODS[method]);
        p.n_sink = n_sink;
        p.n_recent = n_recent;
        p.sim_floor = floor.unwrap_or(-2.0);
        p.max_set = max_set.unwrap_or(0);
        p.max_count = max_count.unwrap_or(0);
        p.age_bias = age_bias;
        p.pivot = query_free as i32;
        let attn = with_attn.then_some(&attn[..]);
        let counts = with_counts.then_some(&counts[..]);
        let prot = protected(&p, n, attn).iter().filter(|&&x| x).count();
        let can = if p.method == kvm_method::KVM_METHOD_STREAMING_LLM as i32 { n - (n_sink as usize).min(n) } else { n - prot };
        let n_free = (can as f64 * free_frac) as usize;
        let ctx = Ctx::new(&p);
        let out = run_plan(&ctx, &views, &cells, attn, counts, n_free as u32, false).expect("plan");
        check_invariants(&p, &cells, attn, counts, n_free, &out);
        // One more than possible is refused with BUDGET.
        prop_assert_eq!(run_plan(&ctx, &views, &cells, attn, counts, can as u32 + 1, false), Err(kvm_status::KVM_STATUS_BUDGET));
        // Same plan on 1 and 3 threads.
        for t in [1, 3] {
            let mut q = p;
            q.n_threads = t;
            let c2 = Ctx::new(&q);
            prop_assert_eq!(&run_plan(&c2, &views, &cells, attn, counts, n_free as u32, false).unwrap(), &out);
        }
    }
}

fn plan_all_methods(cache: &mut Cache, n_free: u32, attn: Option<&[f32]>) {
    let views = cache.views();
    let cells: Vec<u32> = (0..cache.n_cells as u32).collect();
    for m in ALL_METHODS {
        let p = params(m);
        let ctx = Ctx::new(&p);
        let out = run_plan(&ctx, &views, &cells, attn, None, n_free, true)
            .unwrap_or_else(|s| panic!("{m:?}: {s:?} {}", last_error()));
        check_invariants(&p, &cells, attn, None, n_free as usize, &out);
    }
}

#[test]
fn adversarial_identical_keys() {
    let mut cache = Cache::new(&Shape::small(GgmlType::F32, GgmlType::F32, false), 1);
    for l in &mut cache.layers {
        for c in 0..l.n_cells {
            for h in 0..l.n_head {
                l.set_k(c, h, &vec![0.5; l.dk]);
            }
        }
    }
    plan_all_methods(&mut cache, 20, None);
}

#[test]
fn adversarial_zero_and_nan_keys() {
    let mut cache = Cache::new(&Shape::small(GgmlType::F16, GgmlType::F16, false), 2);
    for l in &mut cache.layers {
        for c in 0..l.n_cells {
            for h in 0..l.n_head {
                let v = match c % 3 {
                    0 => vec![0.0; l.dk],
                    1 => vec![f32::NAN; l.dk],
                    _ => vec![f32::INFINITY; l.dk],
                };
                l.set_k(c, h, &v);
            }
        }
    }
    let attn: Vec<f32> = (0..64).map(|i| (i % 7) as f32).collect();
    plan_all_methods(&mut cache, 25, Some(&attn));
    plan_all_methods(&mut cache, 25, None);
}

#[test]
fn floor_blocks_merges_and_reports_evictions() {
    let mut cache = Cache::new(&Shape::small(GgmlType::F32, GgmlType::F32, false), 3);
    let views = cache.views();
    let cells: Vec<u32> = (0..64).collect();
    let mut p = params(kvm_method::KVM_METHOD_KVMERGER);
    p.sim_floor = 1.0; // nothing is that similar
    let ctx = Ctx::new(&p);
    let out = run_plan(&ctx, &views, &cells, None, None, 10, false).unwrap();
    assert_eq!(out.n_evicted, 10, "every freed cell evicted");
    check_invariants(&p, &cells, None, None, 10, &out);
    // With no floor, the same budget is met by merging alone.
    let ctx = Ctx::new(&params(kvm_method::KVM_METHOD_KVMERGER));
    let out = run_plan(&ctx, &views, &cells, None, None, 10, false).unwrap();
    assert_eq!(out.n_evicted, 0);
}

#[test]
fn token_cap_turns_merges_into_oldest_first_eviction() {
    let mut cache = Cache::new(&Shape::small(GgmlType::F32, GgmlType::F32, false), 5);
    let views = cache.views();
    let cells: Vec<u32> = (0..64).collect();
    let mut p = params(kvm_method::KVM_METHOD_KVMERGER);
    p.pivot = kvm_pivot::KVM_PIVOT_QUERY_FREE as i32;
    p.max_count = 3;
    let ctx = Ctx::new(&p);
    // Cells that already stand for 2 tokens cannot join anything under a cap of 3: the
    // budget is met by evicting the oldest unprotected cells (no attention given).
    let counts = vec![2u32; 64];
    let out = run_plan(&ctx, &views, &cells, None, Some(&counts), 10, false).unwrap();
    assert_eq!(out.n_evicted, 10);
    let first = p.n_sink;
    assert_eq!(out.freed, (first..first + 10).collect::<Vec<u32>>());
    check_invariants(&p, &cells, None, Some(&counts), 10, &out);
    // Fresh cells: 28 unprotected, so any maximal choice of links under the cap frees at
    // least 14 (runs of 3 and singles alternating); 10 are freed by merging alone.
    let out = run_plan(&ctx, &views, &cells, None, None, 10, false).unwrap();
    assert_eq!(out.n_evicted, 0);
    assert!(out.counts.iter().all(|&c| c <= 3));
    check_invariants(&p, &cells, None, None, 10, &out);
    // 27 links but at most 18 cells can go by merging in runs of 3: the rest is evicted.
    let out = run_plan(&ctx, &views, &cells, None, None, 27, false).unwrap();
    assert!(out.n_evicted >= 27 - 18, "{}", out.n_evicted);
    check_invariants(&p, &cells, None, None, 27, &out);
}

#[test]
fn kvmerger_merges_the_most_similar_links_first() {
    // One layer, one head; keys chosen so link 10-11 is perfect and 20-21 nearly so.
    let mut s = Shape::small(GgmlType::F32, GgmlType::F32, false);
    s.n_layers = 1;
    s.n_head = 1;
    let mut cache = Cache::new(&s, 4);
    let mut rng = Rng(9);
    for c in 0..64 {
        let k: Vec<f32> = (0..32).map(|_| rng.normal()).collect();
        cache.layers[0].set_k(c, 0, &k);
    }
    let k10 = cache.layers[0].get_k(10, 0);
    cache.layers[0].set_k(11, 0, &k10);
    let mut k20 = cache.layers[0].get_k(20, 0);
    k20[0] += 0.05;
    cache.layers[0].set_k(21, 0, &k20);
    let views = cache.views();
    let cells: Vec<u32> = (0..64).collect();
    let ctx = Ctx::new(&params(kvm_method::KVM_METHOD_KVMERGER));
    let out = run_plan(&ctx, &views, &cells, None, None, 2, false).unwrap();
    assert_eq!(out.set_of[10], out.set_of[11]);
    assert_eq!(out.set_of[20], out.set_of[21]);
    assert_eq!(out.survivor.len(), 62);
}

#[test]
fn pivot_is_most_attended_member() {
    let mut s = Shape::small(GgmlType::F32, GgmlType::F32, false);
    s.n_layers = 1;
    let mut cache = Cache::new(&s, 5);
    // Cells 20..24 share one key: one run (outside the 32-cell recent window).
    let k = cache.layers[0].get_k(20, 0);
    let k1 = cache.layers[0].get_k(20, 1);
    for c in 21..24 {
        cache.layers[0].set_k(c, 0, &k);
        cache.layers[0].set_k(c, 1, &k1);
    }
    let views = cache.views();
    let cells: Vec<u32> = (0..64).collect();
    let mut attn = vec![0.0f32; 64];
    attn[22] = 0.5;
    let mut p = params(kvm_method::KVM_METHOD_KVMERGER);
    p.heavy_frac = 0.0;
    let ctx = Ctx::new(&p);
    let out = run_plan(&ctx, &views, &cells, Some(&attn), None, 3, false).unwrap();
    let s = out.set_of[20];
    assert!((21..24).all(|c| out.set_of[c] == s));
    assert_eq!(out.survivor[s as usize], 22);
}

#[test]
fn context_shift_and_streaming_drop_the_oldest() {
    let mut cache = Cache::new(&Shape::small(GgmlType::F16, GgmlType::F16, false), 6);
    let views = cache.views();
    let cells: Vec<u32> = (100..164).map(|c| c % 64).collect();
    let ctx = Ctx::new(&params(kvm_method::KVM_METHOD_CONTEXT_SHIFT));
    let out = run_plan(&ctx, &views, &cells, None, None, 32, false).unwrap();
    assert_eq!(out.freed, cells[..32].to_vec());
    let ctx = Ctx::new(&params(kvm_method::KVM_METHOD_STREAMING_LLM));
    let out = run_plan(&ctx, &views, &cells, None, None, 32, false).unwrap();
    assert_eq!(out.freed, cells[4..36].to_vec());
}

#[test]
fn h2o_drops_the_least_attended() {
    let mut cache = Cache::new(&Shape::small(GgmlType::F16, GgmlType::F16, false), 7);
    let views = cache.views();
    let cells: Vec<u32> = (0..64).collect();
    let attn: Vec<f32> = (0..64).map(|i| ((i * 37) % 64) as f32).collect();
    let mut p = params(kvm_method::KVM_METHOD_H2O);
    p.heavy_frac = 0.0;
    let ctx = Ctx::new(&p);
    let out = run_plan(&ctx, &views, &cells, Some(&attn), None, 10, false).unwrap();
    let mut cand: Vec<u32> = (4..32).collect();
    cand.sort_by(|&a, &b| attn[a as usize].total_cmp(&attn[b as usize]));
    let mut want: Vec<u32> = cand[..10].to_vec();
    want.sort();
    assert_eq!(out.freed, want);
}

/// The mean over layers and KV heads of the f64 cosine of cells `a` and `b`'s keys, as
/// stored (quantized keys decoded).
fn mean_cos(cache: &Cache, a: usize, b: usize) -> f64 {
    let mut sum = 0f64;
    let mut n = 0;
    for l in &cache.layers {
        for h in 0..l.n_head {
            let (x, y) = (l.get_k(a, h), l.get_k(b, h));
            let dot: f64 = x.iter().zip(&y).map(|(&u, &v)| u as f64 * v as f64).sum();
            let nx: f64 = x.iter().map(|&u| u as f64 * u as f64).sum::<f64>().sqrt();
            let ny: f64 = y.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            sum += dot / (nx * ny);
            n += 1;
        }
    }
    sum / n as f64
}

#[test]
fn evict_fold_joins_the_more_similar_neighbour() {
    // Every fourth cell from 8 to 52 has the least attention, so each leaves with both of its
    // neighbours surviving, and it must join the one whose keys are more similar (the mean
    // cosine over layers and heads, here in f64). Every key type, with and without padded
    // rows: the plan reads each key row whole, once per layer.
    for tk in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
    ] {
        for pad in [0, 32] {
            let mut cache = Cache::with_pad(&Shape::small(tk, GgmlType::F16, false), 5, pad);
            let views = cache.views();
            let cells: Vec<u32> = (0..64).collect();
            let leaving: Vec<usize> = (8..56).step_by(4).collect();
            let attn: Vec<f32> = (0..64)
                .map(|i| {
                    if leaving.contains(&i) {
                        0.0
                    } else {
                        1.0 + i as f32
                    }
                })
                .collect();
            let mut p = params(kvm_method::KVM_METHOD_EVICT_FOLD);
            p.n_recent = 4;
            let n_free = leaving.len() as u32;
            let out = run_plan(
                &Ctx::new(&p),
                &views,
                &cells,
                Some(&attn),
                None,
                n_free,
                false,
            )
            .unwrap();
            check_invariants(&p, &cells, Some(&attn), None, n_free as usize, &out);
            let mut decided = 0;
            for &i in &leaving {
                let joined = out.survivor[out.set_of[i] as usize] as usize;
                assert!(
                    joined == i - 1 || joined == i + 1,
                    "{tk:?}: cell {i} joined {joined}"
                );
                let (cl, cr) = (mean_cos(&cache, i, i - 1), mean_cos(&cache, i, i + 1));
                // Closer than f32 rounding over the sums can tell apart: either side is right.
                if (cl - cr).abs() > 1e-4 {
                    decided += 1;
                    let want = if cl > cr { i - 1 } else { i + 1 };
                    assert_eq!(joined, want, "{tk:?} pad {pad}: cell {i}, cos {cl} / {cr}");
                }
            }
            assert!(
                decided >= leaving.len() - 2,
                "{tk:?}: only {decided} cells decided"
            );
        }
    }
}

#[test]
fn evict_fold_floor_evicts_what_it_would_not_fold() {
    // EVICT_FOLD frees H2O's cells whatever the floor; the floor only decides whether a freed
    // cell is folded into a neighbour or evicted. At 1.0 (nothing that similar) every freed
    // cell is evicted and the plan is H2O's; with no floor every freed cell has a neighbour here.
    let mut cache = Cache::new(&Shape::small(GgmlType::F32, GgmlType::F32, false), 8);
    let views = cache.views();
    let cells: Vec<u32> = (0..64).collect();
    let attn: Vec<f32> = (0..64).map(|i| ((i * 37) % 64) as f32).collect();
    let plan = |method: kvm_method, floor: f32| {
        let mut p = params(method);
        p.sim_floor = floor;
        let out = run_plan(&Ctx::new(&p), &views, &cells, Some(&attn), None, 12, false).unwrap();
        check_invariants(&p, &cells, Some(&attn), None, 12, &out);
        out
    };
    let h2o = plan(kvm_method::KVM_METHOD_H2O, -2.0);
    let none = plan(kvm_method::KVM_METHOD_EVICT_FOLD, -2.0);
    let all = plan(kvm_method::KVM_METHOD_EVICT_FOLD, 1.0);
    assert_eq!(none.freed, h2o.freed);
    assert_eq!(all.freed, h2o.freed);
    assert_eq!(none.n_evicted, 0, "no floor: every freed cell folded");
    assert_eq!(all.n_evicted, 12, "floor 1.0: every freed cell evicted");
    assert_eq!(all.set_of, h2o.set_of, "floor 1.0: H2O's plan");
    // A floor between the two, the median of the cosines the folds had without one: every cell
    // folded is at least that similar to its survivor (the mean over layers and heads of the
    // cosine, as the plan scores it), and the floor bites on some cells but not all.
    let cos = |a: usize, b: usize| mean_cos(&cache, a, b);
    let folds = |out: &PlanOut| -> Vec<f64> {
        (0..64)
            .filter(|&i| {
                let s = out.set_of[i];
                s != KVM_EVICTED && out.survivor[s as usize] != i as u32
            })
            .map(|i| cos(i, out.survivor[out.set_of[i] as usize] as usize))
            .collect()
    };
    let mut c0 = folds(&none);
    c0.sort_by(f64::total_cmp);
    let floor = c0[c0.len() / 2] as f32;
    let mid = plan(kvm_method::KVM_METHOD_EVICT_FOLD, floor);
    assert_eq!(mid.freed, h2o.freed);
    assert!(
        0 < mid.n_evicted && mid.n_evicted < 12,
        "{} evicted at floor {floor} (folds {c0:?})",
        mid.n_evicted
    );
    for c in folds(&mid) {
        assert!(c >= floor as f64 - 1e-4, "folded at cosine {c} < {floor}");
    }
}
