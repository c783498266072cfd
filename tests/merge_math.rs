//! Merge arithmetic against a plain f64 reference, for every K/V type and both V layouts;
//! every byte that is not a merged survivor's row stays bit-identical.

mod common;

use common::*;
use kvmerger::ffi::*;
use kvmerger::layout::GgmlType;

/// Largest error the cache type allows for values of magnitude up to `amax`.
fn tol(t: GgmlType, amax: f64) -> f64 {
    match t {
        GgmlType::F32 => 1e-5 * amax + 1e-6,
        GgmlType::F16 => 1e-3 * amax + 1e-4,
        GgmlType::BF16 => 8e-3 * amax + 1e-3,
        GgmlType::Q8_0 => amax / 127.0 + 1e-4,
        GgmlType::Q4_0 => amax / 8.0 + 1e-3,
    }
}

struct Expect {
    /// (layer, cell, head) -> merged K and V, computed in f64 from the original cache.
    k: Vec<(usize, usize, usize, Vec<f64>)>,
    v: Vec<(usize, usize, usize, Vec<f64>)>,
}

fn gaussian_reference(
    cache: &Cache,
    cells: &[u32],
    out: &PlanOut,
    counts: Option<&[u32]>,
    p: &kvm_params,
) -> Expect {
    let mut e = Expect {
        k: vec![],
        v: vec![],
    };
    let members =
        |s: u32| -> Vec<usize> { (0..cells.len()).filter(|&i| out.set_of[i] == s).collect() };
    let dist = |il: usize, h: usize, a: usize, b: usize| -> f64 {
        let l = &cache.layers[il];
        let (ka, kb) = (l.get_k(cells[a] as usize, h), l.get_k(cells[b] as usize, h));
        ka.iter()
            .zip(&kb)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    // KVM_SIGMA_LAYER: σ per layer and head from every merged member's distance to its pivot,
    // computed once per (layer, head) before the sets are merged
    let head_sigma = |il: usize, h: usize| -> f64 {
        let (mut sum, mut n) = (0f64, 0usize);
        for s in 0..out.survivor.len() as u32 {
            let piv = out.survivor[s as usize] as usize;
            for i in members(s).into_iter().filter(|&i| i != piv) {
                sum += dist(il, h, piv, i).powi(2);
                n += 1;
            }
        }
        let rms = if n > 0 { (sum / n as f64).sqrt() } else { 0.0 };
        if rms > 0.0 {
            p.sigma as f64 * rms
        } else {
            f64::INFINITY
        }
    };
    let layer_sigma: Vec<Vec<f64>> = if p.sigma_mode == kvm_sigma::KVM_SIGMA_LAYER as i32 {
        cache
            .layers
            .iter()
            .enumerate()
            .map(|(il, l)| (0..l.n_head).map(|h| head_sigma(il, h)).collect())
            .collect()
    } else {
        vec![]
    };
    for s in 0..out.survivor.len() as u32 {
        let mem = members(s);
        if mem.len() < 2 {
            continue;
        }
        let piv = out.survivor[s as usize] as usize;
        let pc = cells[piv] as usize;
        for (il, l) in cache.layers.iter().enumerate() {
            for h in 0..l.n_head {
                let ks: Vec<Vec<f64>> = mem
                    .iter()
                    .map(|&i| {
                        l.get_k(cells[i] as usize, h)
                            .iter()
                            .map(|&x| x as f64)
                            .collect()
                    })
                    .collect();
                let vs: Vec<Vec<f64>> = mem
                    .iter()
                    .map(|&i| {
                        l.get_v(cells[i] as usize, h)
                            .iter()
                            .map(|&x| x as f64)
                            .collect()
                    })
                    .collect();
                let jp = mem.iter().position(|&i| i == piv).unwrap();
                let d: Vec<f64> = ks
                    .iter()
                    .map(|k| {
                        k.iter()
                            .zip(&ks[jp])
                            .map(|(a, b)| (a - b) * (a - b))
                            .sum::<f64>()
                            .sqrt()
                    })
                    .collect();
                let g: Vec<f64> = if p.sigma_mode == kvm_sigma::KVM_SIGMA_FIXED as i32 {
                    let s2 = 2.0 * (p.sigma as f64).powi(2);
                    d.iter().map(|d| (-d * d / s2).exp()).collect()
                } else if p.sigma_mode == kvm_sigma::KVM_SIGMA_LAYER as i32 {
                    let s2 = 2.0 * layer_sigma[il][h].powi(2);
                    d.iter().map(|d| (-d * d / s2).exp()).collect()
                } else {
                    // adaptive: 2σ² = d̄²; relative: σ = sigma · d̄
                    let c = if p.sigma_mode == kvm_sigma::KVM_SIGMA_RELATIVE as i32 {
                        2.0 * (p.sigma as f64).powi(2)
                    } else {
                        1.0
                    };
                    let dbar = d.iter().sum::<f64>() / d.len() as f64;
                    d.iter()
                        .map(|d| {
                            if dbar > 0.0 {
                                (-(d / dbar).powi(2) / c).exp()
                            } else {
                                1.0
                            }
                        })
                        .collect()
                };
                let c: Vec<f64> = mem
                    .iter()
                    .map(|&i| counts.map_or(1.0, |c| c[i] as f64))
                    .collect();
                let z: f64 = g.iter().zip(&c).map(|(g, c)| g * c).sum();
                let w: Vec<f64> = g.iter().zip(&c).map(|(g, c)| g * c / z).collect();
                let mut k = vec![0f64; l.dk];
                let mut v = vec![0f64; l.dv];
                for j in 0..mem.len() {
                    for (a, b) in k.iter_mut().zip(&ks[j]) {
                        *a += w[j] * b;
                    }
                    for (a, b) in v.iter_mut().zip(&vs[j]) {
                        *a += w[j] * b;
                    }
                }
                if p.value_mode == kvm_value_mode::KVM_VALUE_MODE_PAPER as i32 {
                    v.iter_mut().for_each(|x| *x *= mem.len() as f64);
                }
                if p.merge_keys {
                    e.k.push((il, pc, h, k));
                }
                if p.merge_values {
                    e.v.push((il, pc, h, v));
                }
            }
        }
    }
    e
}

/// Checks merged rows against `want` and that every other byte is as in `before`.
fn check(cache: &Cache, before: &[(Vec<u8>, Vec<u8>)], e: &Expect) {
    for (il, l) in cache.layers.iter().enumerate() {
        let mut k_touched = vec![false; l.k.bytes().len()];
        let mut v_touched = vec![false; l.v.bytes().len()];
        for (_, c, h, want) in e.k.iter().filter(|x| x.0 == il) {
            let got = l.get_k(*c, *h);
            let amax = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (*g as f64 - w).abs() <= tol(l.tk, amax),
                    "layer {il} K cell {c} head {h} ({:?}): {g} vs {w}",
                    l.tk
                );
            }
            k_touched[l.k_head_range(*c, *h)]
                .iter_mut()
                .for_each(|t| *t = true);
        }
        for (_, c, h, want) in e.v.iter().filter(|x| x.0 == il) {
            let got = l.get_v(*c, *h);
            let amax = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (*g as f64 - w).abs() <= tol(l.tv, amax),
                    "layer {il} V cell {c} head {h} ({:?}, trans {}): {g} vs {w}",
                    l.tv,
                    l.v_trans
                );
            }
            for b in l.v_head_bytes(*c, *h) {
                v_touched[b] = true;
            }
        }
        for (i, (a, b)) in l.k.bytes().iter().zip(&before[il].0).enumerate() {
            assert!(
                k_touched[i] || a == b,
                "layer {il} K byte {i} changed outside merged rows"
            );
        }
        for (i, (a, b)) in l.v.bytes().iter().zip(&before[il].1).enumerate() {
            assert!(
                v_touched[i] || a == b,
                "layer {il} V byte {i} changed outside merged rows"
            );
        }
    }
}

fn run_case(
    tk: GgmlType,
    tv: GgmlType,
    v_trans: bool,
    p: &kvm_params,
    pad: usize,
    with_counts: bool,
) {
    let mut cache = Cache::with_pad(
        &Shape::small(tk, tv, v_trans),
        42 + tk.id() as u64 * 7 + tv.id() as u64,
        pad,
    );
    let before = cache.snapshot();
    let views = cache.views();
    // Window in a scrambled cell order, as a cache that wrapped around would have.
    let cells: Vec<u32> = (0..64u32).map(|i| (i * 29 + 5) % 64).collect();
    let attn: Vec<f32> = (0..64).map(|i| ((i * 13) % 17) as f32 / 17.0).collect();
    let counts: Vec<u32> = (0..64).map(|i| 1 + (i % 3) as u32).collect();
    let counts = with_counts.then_some(&counts[..]);
    let ctx = Ctx::new(p);
    let plan = run_plan(&ctx, &views, &cells, Some(&attn), counts, 20, false).expect("plan");
    let e = gaussian_reference(&cache, &cells, &plan, counts, p);
    assert!(
        !e.k.is_empty() || !p.merge_keys,
        "the case merges something"
    );
    let again = run_plan(&ctx, &views, &cells, Some(&attn), counts, 20, true).expect("apply");
    assert_eq!(plan, again);
    check(&cache, &before, &e);
}

#[test]
fn every_type_and_v_layout() {
    let p = params(kvm_method::KVM_METHOD_KVMERGER);
    for tk in ALL_TYPES {
        for tv in ALL_TYPES {
            run_case(tk, tv, false, &p, 0, false);
            if !tv.is_quantized() {
                run_case(tk, tv, true, &p, 0, true);
            }
        }
    }
}

#[test]
fn padded_rows_counts_and_modes() {
    let mut p = params(kvm_method::KVM_METHOD_KVMERGER);
    run_case(GgmlType::F16, GgmlType::F16, false, &p, 7, true);
    run_case(GgmlType::Q8_0, GgmlType::Q8_0, false, &p, 32, true);
    p.value_mode = kvm_value_mode::KVM_VALUE_MODE_PAPER as i32;
    run_case(GgmlType::F32, GgmlType::F16, true, &p, 3, false);
    p.value_mode = kvm_value_mode::KVM_VALUE_MODE_LOGBIAS as i32;
    p.sigma_mode = kvm_sigma::KVM_SIGMA_FIXED as i32;
    p.sigma = 2.0;
    run_case(GgmlType::F16, GgmlType::BF16, false, &p, 0, true);
    p.sigma_mode = kvm_sigma::KVM_SIGMA_RELATIVE as i32;
    for r in [0.55, 1.3] {
        p.sigma = r;
        run_case(GgmlType::F16, GgmlType::F16, true, &p, 5, true);
    }
    p.sigma_mode = kvm_sigma::KVM_SIGMA_LAYER as i32;
    for r in [0.3, 1.0] {
        p.sigma = r;
        run_case(GgmlType::F32, GgmlType::F16, false, &p, 0, true);
        run_case(GgmlType::Q8_0, GgmlType::Q4_0, false, &p, 0, false);
    }
    p.merge_keys = false;
    run_case(GgmlType::F16, GgmlType::F16, false, &p, 0, false);
    p.merge_keys = true;
    p.merge_values = false;
    run_case(GgmlType::BF16, GgmlType::F16, true, &p, 0, false);
    p.pivot = kvm_pivot::KVM_PIVOT_QUERY_FREE as i32;
    p.merge_values = true;
    run_case(GgmlType::F32, GgmlType::F32, false, &p, 0, false);
}

#[test]
fn evict_fold_uses_the_same_merge() {
    let mut p = params(kvm_method::KVM_METHOD_EVICT_FOLD);
    p.n_recent = 8;
    for (tk, tv, tr) in [
        (GgmlType::F16, GgmlType::F16, false),
        (GgmlType::Q4_0, GgmlType::F32, true),
    ] {
        run_case(tk, tv, tr, &p, 0, true);
    }
}

#[test]
fn eviction_methods_write_nothing() {
    for m in [
        kvm_method::KVM_METHOD_CONTEXT_SHIFT,
        kvm_method::KVM_METHOD_STREAMING_LLM,
        kvm_method::KVM_METHOD_H2O,
    ] {
        let mut cache = Cache::new(&Shape::small(GgmlType::F16, GgmlType::F16, false), 3);
        let before = cache.snapshot();
        let views = cache.views();
        let cells: Vec<u32> = (0..64).collect();
        let attn: Vec<f32> = (0..64).map(|i| (i % 5) as f32).collect();
        run_plan(
            &Ctx::new(&params(m)),
            &views,
            &cells,
            Some(&attn),
            None,
            20,
            true,
        )
        .unwrap();
        assert_eq!(cache.snapshot(), before, "{m:?}");
    }
}

#[test]
fn cam_folds_evicted_values_into_following_kept_ones() {
    let mut cache = Cache::new(&Shape::small(GgmlType::F32, GgmlType::F32, false), 11);
    let before = cache.snapshot();
    let orig_v: Vec<Vec<Vec<Vec<f32>>>> = cache
        .layers
        .iter()
        .map(|l| {
            (0..64)
                .map(|c| (0..l.n_head).map(|h| l.get_v(c, h)).collect())
                .collect()
        })
        .collect();
    let views = cache.views();
    let cells: Vec<u32> = (0..64).collect();
    let p = params(kvm_method::KVM_METHOD_CAM);
    let out = run_plan(&Ctx::new(&p), &views, &cells, None, None, 10, true).unwrap();
    // Without attention CaM evicts the oldest unprotected cells (4..14) and gives each evicted
    // value in equal shares of 1/span to the next `cam_span` kept cells.
    assert_eq!(out.freed, (4..14).collect::<Vec<u32>>());
    let span = p.cam_span as usize;
    let kept: Vec<usize> = (4..64).filter(|c| !(4..14).contains(c)).collect();
    for (il, l) in cache.layers.iter().enumerate() {
        for h in 0..l.n_head {
            let mut want: Vec<Vec<f64>> = (0..64)
                .map(|c| orig_v[il][c][h].iter().map(|&x| x as f64).collect())
                .collect();
            for e in 4..14usize {
                let at = kept.partition_point(|&k| k < e);
                for &t in &kept[at..(at + span).min(kept.len())] {
                    for (a, b) in want[t].iter_mut().zip(&orig_v[il][e][h]) {
                        *a += *b as f64 / span as f64;
                    }
                }
            }
            for c in 0..64 {
                let got = l.get_v(c, h);
                for (g, w) in got.iter().zip(&want[c]) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-4,
                        "layer {il} cell {c}: {g} vs {w}"
                    );
                }
            }
        }
        assert_eq!(l.k.bytes(), &before[il].0[..], "CaM leaves keys alone");
    }
}
