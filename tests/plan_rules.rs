//! Each rule the header states for a plan (under `kvm_method`, `kvm_pivot` and the fields of
//! `kvm_params`), checked on a small hand-built window where that rule alone decides the
//! outcome; every test asserts the exact plan. Keys are one layer, one head, built from
//! orthogonal unit vectors, so the similarities are exact (0 or 1) or far apart.

mod common;

use common::*;
use kvmerger::ffi::*;
use kvmerger::layout::GgmlType;

const DK: usize = 16;

/// Unit vector `i`.
fn e(i: usize) -> Vec<f32> {
    let mut v = vec![0.0; DK];
    v[i] = 1.0;
    v
}

/// A unit key with cosine `x` to `e(0)` and `y` to `e(1)` (the rest along `e(2)`).
fn xy(x: f32, y: f32) -> Vec<f32> {
    let mut v = vec![0.0; DK];
    v[0] = x;
    v[1] = y;
    v[2] = (1.0 - x * x - y * y).sqrt();
    v
}

/// A unit key at `angle` radians in the plane of `e(0)` and `e(1)`.
fn angle(a: f32) -> Vec<f32> {
    let mut v = vec![0.0; DK];
    v[0] = a.cos();
    v[1] = a.sin();
    v
}

fn cache(keys: &[Vec<f32>]) -> Cache {
    let s = Shape {
        n_layers: 1,
        n_head: 1,
        dk: DK,
        dv: 8,
        n_cells: keys.len(),
        tk: GgmlType::F32,
        tv: GgmlType::F32,
        v_trans: false,
    };
    let mut c = Cache::new(&s, 1);
    for (i, k) in keys.iter().enumerate() {
        c.layers[0].set_k(i, 0, k);
    }
    c
}

fn params_with(method: kvm_method, n_sink: u32, n_recent: u32, heavy_frac: f32) -> kvm_params {
    let mut p = params(method);
    p.n_sink = n_sink;
    p.n_recent = n_recent;
    p.heavy_frac = heavy_frac;
    p
}

fn plan(
    p: &kvm_params,
    keys: &[Vec<f32>],
    attn: Option<&[f32]>,
    counts: Option<&[u32]>,
    n_free: u32,
) -> Result<PlanOut, kvm_status> {
    let mut c = cache(keys);
    let views = c.views();
    let cells: Vec<u32> = (0..keys.len() as u32).collect();
    run_plan(&Ctx::new(p), &views, &cells, attn, counts, n_free, false)
}

/// Per window cell, the survivor whose set it joined (itself for a survivor), or -1 when
/// evicted; and the plan's own consistency with that view.
fn owners(out: &PlanOut) -> Vec<i64> {
    let o: Vec<i64> = out
        .set_of
        .iter()
        .map(|&s| {
            if s == KVM_EVICTED {
                -1
            } else {
                out.survivor[s as usize] as i64
            }
        })
        .collect();
    let freed: Vec<u32> = (0..o.len())
        .filter(|&i| o[i] != i as i64)
        .map(|i| i as u32)
        .collect();
    assert_eq!(out.freed, freed, "freed cells, in position order");
    assert_eq!(out.n_evicted, o.iter().filter(|&&x| x == -1).count());
    o
}

/// Distinct unit keys, so every link has similarity 0.
fn unlike(n: usize) -> Vec<Vec<f32>> {
    (0..n).map(|i| e(i % DK)).collect()
}

#[test]
fn heavy_hitters_count_rounds_half_up_and_leaves_out_sinks_and_recent() {
    // n = 20, heavy_frac 0.125: round(2.5) = 3 heavy hitters, chosen besides the 2 sinks and
    // 3 recent cells although those have the most attention; 12 and 14 tie for the third
    // place and the older wins.
    let p = params_with(kvm_method::KVM_METHOD_H2O, 2, 3, 0.125);
    let mut attn: Vec<f32> = (0..20).map(|i| 1.0 + i as f32 * 0.01).collect();
    for i in [0, 1, 17, 18, 19] {
        attn[i] = 100.0;
    }
    for (i, a) in [(5, 9.0), (9, 9.0), (12, 8.0), (14, 8.0)] {
        attn[i] = a;
    }
    let keys = unlike(20);
    let out = plan(&p, &keys, Some(&attn), None, 12).unwrap();
    let kept = [0, 1, 5, 9, 12, 17, 18, 19];
    let want: Vec<u32> = (0..20).filter(|i| !kept.contains(i)).collect();
    assert_eq!(out.freed, want);
    assert_eq!(out.n_evicted, 12);
    // 8 protected: a 13th cell is over the budget.
    assert_eq!(
        plan(&p, &keys, Some(&attn), None, 13).unwrap_err(),
        kvm_status::KVM_STATUS_BUDGET
    );
    // Without attention there are no heavy hitters: 15 cells can go.
    assert!(plan(&p, &keys, None, None, 15).is_ok());
}

#[test]
fn eviction_order_is_least_attended_then_older_and_oldest_without_attention() {
    let p = params_with(kvm_method::KVM_METHOD_H2O, 1, 1, 0.0);
    let attn = [9.0, 3.0, 1.0, 2.0, 1.0, 5.0, 0.5, 2.0, 4.0, 9.0];
    let keys = unlike(10);
    // 6 (0.5), then 2 and 4 (1.0, older first), then 3 of 3 and 7 (2.0).
    let out = plan(&p, &keys, Some(&attn), None, 4).unwrap();
    assert_eq!(out.freed, [2, 3, 4, 6]);
    assert_eq!(owners(&out), [0, 1, -1, -1, -1, 5, -1, 7, 8, 9]);
    // Without attention: the oldest unprotected cells, and no heavy hitters whatever the share.
    let p = params_with(kvm_method::KVM_METHOD_H2O, 1, 1, 0.5);
    let out = plan(&p, &keys, None, None, 4).unwrap();
    assert_eq!(out.freed, [1, 2, 3, 4]);
}

#[test]
fn context_shift_and_streaming_llm_choose_by_position_alone() {
    let keys = unlike(10);
    let attn: Vec<f32> = (0..10).map(|i| (10 - i) as f32).collect();
    let cs = params_with(kvm_method::KVM_METHOD_CONTEXT_SHIFT, 2, 4, 0.5);
    let sl = params_with(kvm_method::KVM_METHOD_STREAMING_LLM, 2, 4, 0.5);
    for a in [None, Some(&attn[..])] {
        // Context shift protects nothing, not even the sinks.
        assert_eq!(plan(&cs, &keys, a, None, 3).unwrap().freed, [0, 1, 2]);
        // StreamingLLM protects the sinks only: the recent window and heavy hitters go too.
        let out = plan(&sl, &keys, a, None, 8).unwrap();
        assert_eq!(out.freed, (2..10).collect::<Vec<u32>>());
        assert_eq!(out.n_evicted, 8);
        assert_eq!(
            plan(&sl, &keys, a, None, 9).unwrap_err(),
            kvm_status::KVM_STATUS_BUDGET
        );
    }
}

#[test]
fn only_the_methods_that_read_attention_plan_otherwise_with_it() {
    // With attention that makes cell 3 the most attended of the oldest cells, a method that
    // reads it (`kvm_method_reads_attention`) plans otherwise than without it: H2O, CaM and
    // EVICT_FOLD keep cell 3, KVMerger makes it the pivot. One that does not, the same plan.
    let keys = unlike(12);
    let mut attn: Vec<f32> = (0..12).map(|i| i as f32).collect();
    attn[3] = 100.0;
    for &m in kvm_method::ALL {
        let p = params_with(m, 1, 1, 0.0);
        let with = plan(&p, &keys, Some(&attn), None, 4).unwrap();
        let without = plan(&p, &keys, None, None, 4).unwrap();
        let reads = kvm_method_reads_attention(m as i32, p.pivot);
        assert_eq!(with != without, reads, "{m:?}: {with:?} / {without:?}");
    }
}

/// KVMerger's window: sinks 0-1 and recent 10-11 alike, links 3-4 and 6-7 perfect, every
/// other link 0.
fn kvmerger_keys() -> Vec<Vec<f32>> {
    let (a, b, c, d) = (e(12), e(13), e(14), e(15));
    vec![
        a.clone(),
        a,
        e(2),
        b.clone(),
        b,
        e(5),
        c.clone(),
        c,
        e(8),
        e(9),
        d.clone(),
        d,
    ]
}

fn kvmerger_params() -> kvm_params {
    let mut p = params_with(kvm_method::KVM_METHOD_KVMERGER, 2, 2, 0.0);
    p.pivot = kvm_pivot::KVM_PIVOT_QUERY_FREE as i32;
    p
}

#[test]
fn kvmerger_takes_links_by_score_older_first_on_ties() {
    let p = kvmerger_params();
    let keys = kvmerger_keys();
    // Links 3 and 6 score 1; the older goes first. Protected cells' links (0-1, 10-11) never.
    let out = plan(&p, &keys, None, None, 1).unwrap();
    assert_eq!(owners(&out), [0, 1, 2, 3, 3, 5, 6, 7, 8, 9, 10, 11]);
    let out = plan(&p, &keys, None, None, 2).unwrap();
    assert_eq!(owners(&out), [0, 1, 2, 3, 3, 5, 6, 6, 8, 9, 10, 11]);
    // The third: every other candidate scores 0, so the oldest (2-3) joins 2 to {3, 4}.
    let out = plan(&p, &keys, None, None, 3).unwrap();
    assert_eq!(owners(&out), [0, 1, 3, 3, 3, 5, 6, 6, 8, 9, 10, 11]);
    assert_eq!(out.counts, [1, 1, 3, 1, 2, 1, 1, 1, 1]);
    // age_bias 100: age(i) = 1 − i/10 outweighs the similarity, so the oldest candidate (2-3)
    // goes first.
    let mut aged = p;
    aged.age_bias = 100.0;
    let out = plan(&aged, &keys, None, None, 1).unwrap();
    assert_eq!(owners(&out), [0, 1, 2, 2, 4, 5, 6, 7, 8, 9, 10, 11]);
}

#[test]
fn kvmerger_max_set_and_max_count_skip_links() {
    let keys = kvmerger_keys();
    // max_set 2: after 3-4 and 6-7, every link touching them would make a run of 3; 8-9 is
    // the first that does not.
    let mut p = kvmerger_params();
    p.max_set = 2;
    let out = plan(&p, &keys, None, None, 3).unwrap();
    assert_eq!(owners(&out), [0, 1, 2, 3, 3, 5, 6, 6, 8, 8, 10, 11]);
    // max_count 2 with cell 8 standing for 2 tokens: 8-9 would stand for 3, so only two links
    // are taken, and the shortfall evicts the oldest unprotected set, {2}, without attention.
    let mut p = kvmerger_params();
    p.max_count = 2;
    let mut counts = vec![1u32; 12];
    counts[8] = 2;
    let out = plan(&p, &keys, None, Some(&counts), 3).unwrap();
    assert_eq!(owners(&out), [0, 1, -1, 3, 3, 5, 6, 6, 8, 9, 10, 11]);
    assert_eq!(out.counts, [1, 1, 2, 1, 2, 2, 1, 1, 1]);
}

#[test]
fn kvmerger_shortfall_evicts_whole_sets_least_attended_first() {
    let keys = kvmerger_keys();
    let mut p = kvmerger_params();
    p.pivot = kvm_pivot::KVM_PIVOT_ATTENTION as i32;
    p.sim_floor = 0.5; // only the two perfect links pass
    let mut attn = [9.0, 9.0, 0.6, 0.5, 0.9, 0.7, 0.1, 0.2, 0.3, 0.8, 9.0, 9.0];
    // Sets by their members' largest attention: {2} 0.6, {3,4} 0.9, {5} 0.7, {6,7} 0.2,
    // {8} 0.3, {9} 0.8. One cell short: {6, 7} goes whole, which frees one more than merging.
    // {3, 4} keeps its most attended member, 4.
    let out = plan(&p, &keys, Some(&attn), None, 3).unwrap();
    assert_eq!(owners(&out), [0, 1, 2, 4, 4, 5, -1, -1, 8, 9, 10, 11]);
    // Equal attention: the older set goes ({6, 7} is merged into its more attended 7).
    attn[2] = 0.05;
    attn[8] = 0.05;
    let out = plan(&p, &keys, Some(&attn), None, 3).unwrap();
    assert_eq!(owners(&out), [0, 1, -1, 4, 4, 5, 7, 7, 8, 9, 10, 11]);
    // A similarity equal to the floor passes.
    p.sim_floor = 1.0;
    let out = plan(&p, &keys, Some(&attn), None, 2).unwrap();
    assert_eq!(out.n_evicted, 0);
}

#[test]
fn kvmerger_pivot_is_most_attended_or_nearest_the_count_weighted_mean_key() {
    // Cells 3, 4, 5 at 0, 0.2 and 0.4 rad (links of cosine 0.98), the rest unlike; two links
    // make the set {3, 4, 5}.
    let keys: Vec<Vec<f32>> = (0..10)
        .map(|i| match i {
            3..=5 => angle(0.2 * (i - 3) as f32),
            _ => e(i + 4),
        })
        .collect();
    let mut p = params_with(kvm_method::KVM_METHOD_KVMERGER, 2, 2, 0.0);
    let at = |a3: f32, a4: f32, a5: f32| {
        let mut a = [1.0f32; 10];
        a[3] = a3;
        a[4] = a4;
        a[5] = a5;
        a
    };
    let survivor = |p: &kvm_params, attn: Option<&[f32]>, counts: Option<&[u32]>| {
        let out = plan(p, &keys, attn, counts, 2).unwrap();
        let o = owners(&out);
        assert!(o[3] == o[4] && o[4] == o[5], "{o:?}");
        o[3]
    };
    // Attention: the most attended member; equal, the older.
    assert_eq!(survivor(&p, Some(&at(0.1, 0.2, 0.3)), None), 5);
    assert_eq!(survivor(&p, Some(&at(0.3, 0.1, 0.3)), None), 3);
    // Without attention (or query-free even with it): nearest the mean key, the middle one...
    assert_eq!(survivor(&p, None, None), 4);
    p.pivot = kvm_pivot::KVM_PIVOT_QUERY_FREE as i32;
    assert_eq!(survivor(&p, Some(&at(0.1, 0.2, 0.3)), None), 4);
    // ... weighted by counts: cell 3 standing for 10 tokens pulls the mean to itself.
    let mut counts = [1u32; 10];
    counts[3] = 10;
    assert_eq!(survivor(&p, None, Some(&counts)), 3);
}

/// EVICT_FOLD's window: sink 0, left survivor 1 (e0), leaving 2..=4, right survivor 5 (e1),
/// kept 6, recent 7.
fn fold_window(leaving: [Vec<f32>; 3]) -> (Vec<Vec<f32>>, [f32; 8]) {
    let [l2, l3, l4] = leaving;
    let keys = vec![e(3), e(0), l2, l3, l4, e(1), e(4), e(5)];
    (keys, [9.0, 5.0, 0.0, 0.0, 0.0, 5.0, 5.0, 9.0])
}

#[test]
fn evict_fold_splits_a_run_where_the_summed_similarity_is_largest() {
    let p = params_with(kvm_method::KVM_METHOD_EVICT_FOLD, 1, 1, 0.0);
    // Similarities to (left, right): (0.2, 0.3), (0.9, 0.1), (0.1, 0.9). Cell by cell the run
    // would go right, left, right; the best split (sums 1.3, 1.2, 2.0, 1.2) sends 2 and 3
    // left, although 2 is more like the right survivor.
    let (keys, attn) = fold_window([xy(0.2, 0.3), xy(0.9, 0.1), xy(0.1, 0.9)]);
    let out = plan(&p, &keys, Some(&attn), None, 3).unwrap();
    assert_eq!(owners(&out), [0, 1, 1, 1, 5, 5, 6, 7]);
    assert_eq!(out.counts, [1, 3, 2, 1, 1]);
    assert_eq!(out.n_evicted, 0);
    // A lone leaving cell goes to the more similar survivor; as similar to both, right.
    let keys = |k: Vec<f32>| vec![e(3), e(0), k, e(1), e(4)];
    let attn = [9.0, 5.0, 0.0, 5.0, 9.0];
    let out = plan(&p, &keys(xy(0.6, 0.5)), Some(&attn), None, 1).unwrap();
    assert_eq!(owners(&out), [0, 1, 1, 3, 4]);
    let out = plan(&p, &keys(xy(0.5, 0.5)), Some(&attn), None, 1).unwrap();
    assert_eq!(owners(&out), [0, 1, 3, 3, 4]);
}

#[test]
fn evict_fold_sinks_never_absorb() {
    let p = params_with(kvm_method::KVM_METHOD_EVICT_FOLD, 1, 1, 0.0);
    // Cell 1 has the sink's key and nothing in common with cell 2: it joins 2 all the same.
    let keys = vec![e(0), e(0), e(1), e(2), e(3)];
    let out = plan(&p, &keys, Some(&[9.0, 0.0, 5.0, 5.0, 9.0]), None, 1).unwrap();
    assert_eq!(owners(&out), [0, 2, 2, 3, 4]);
    // Protected cells other than sinks do absorb: the recent cell takes the run after a sink.
    let keys = vec![e(0), e(0), e(0), e(3)];
    let out = plan(&p, &keys, Some(&[9.0, 0.0, 0.0, 9.0]), None, 2).unwrap();
    assert_eq!(owners(&out), [0, 3, 3, 3]);
    // A run between a sink and the window's end has no survivor: evicted.
    let p = params_with(kvm_method::KVM_METHOD_EVICT_FOLD, 1, 0, 0.0);
    let out = plan(&p, &keys[..3], Some(&[9.0, 0.0, 0.0]), None, 2).unwrap();
    assert_eq!(owners(&out), [0, -1, -1]);
}

#[test]
fn evict_fold_floor_evicts_whole_stretches() {
    let mut p = params_with(kvm_method::KVM_METHOD_EVICT_FOLD, 1, 1, 0.0);
    // Similarities to the left survivor 0.9, 0.5, 0.9 (to the right about 0): the whole run
    // goes left without a floor.
    let (keys, attn) = fold_window([xy(0.9, 0.0), xy(0.5, 0.0), xy(0.9, 0.1)]);
    let out = plan(&p, &keys, Some(&attn), None, 3).unwrap();
    assert_eq!(owners(&out), [0, 1, 1, 1, 1, 5, 6, 7]);
    // Floor 0.7: the left part stops before cell 3, so 3 and the cell past it are evicted,
    // though cell 4 (0.9) is above the floor; who leaves does not change.
    p.sim_floor = 0.7;
    let out = plan(&p, &keys, Some(&attn), None, 3).unwrap();
    assert_eq!(owners(&out), [0, 1, 1, -1, -1, 5, 6, 7]);
    assert_eq!(out.n_evicted, 2);
}
