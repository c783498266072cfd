//! KVMerger, our reading: links taken in descending score, shortfall evicted, pivots.

use super::Window;
use crate::error::Result;
use crate::merge::calib::Calib;
use crate::merge::scores::{self, KeyStats};
use crate::merge::{Params, Pivot};

/// Sets `owner` for KVMerger: the runs of the links taken, each owned by its pivot, and the
/// sets evicted to meet the budget (the module's docs, and `kvm_method::KVM_METHOD_KVMERGER`).
pub(super) fn plan(
    p: &Params,
    calib: Option<&Calib>,
    w: &Window<impl KeyStats>,
    n_free: usize,
    owner: &mut [Option<usize>],
) -> Result<()> {
    let Window {
        keys,
        ref heads,
        cells,
        attn,
        counts,
        ref prot,
    } = *w;
    let n = cells.len();
    if n_free == 0 {
        return Ok(());
    }
    let links = scores::links_from(&keys.adjacent(cells)?, heads, calib);
    let n_links = n - 1;
    let age = |i: usize| {
        if n_links > 1 {
            1.0 - i as f32 / (n_links - 1) as f32
        } else {
            1.0
        }
    };
    let score = |i: usize| links.rank[i] + p.age_bias * age(i);
    let mut cand: Vec<usize> = (0..n_links)
        .filter(|&i| !prot.any[i] && !prot.any[i + 1])
        .filter(|&i| p.sim_floor.is_none_or(|f| links.mean_cos[i] >= f))
        .collect();
    cand.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));

    // Sets are runs, so a run is known by its two ends: `lo[hi_end]` and `hi[lo_end]`.
    let mut lo: Vec<usize> = (0..n).collect();
    let mut hi: Vec<usize> = (0..n).collect();
    // Tokens a run stands for, kept at its first cell.
    let mut tokens: Vec<u64> = counts.iter().map(|&c| u64::from(c)).collect();
    let mut linked = vec![false; n_links];
    let mut taken = 0;
    for &i in &cand {
        if taken == n_free {
            break;
        }
        // Link i joins the run ending at i with the run starting at i + 1.
        let (a, b) = (lo[i], hi[i + 1]);
        if p.max_set.is_some_and(|m| b - a + 1 > m) {
            continue;
        }
        let joined = tokens[a] + tokens[i + 1];
        if p.max_count.is_some_and(|m| joined > u64::from(m)) {
            continue;
        }
        tokens[a] = joined;
        linked[i] = true;
        hi[a] = b;
        lo[b] = a;
        taken += 1;
    }

    // Runs from the links taken.
    let mut sets: Vec<Vec<usize>> = Vec::new();
    for i in 0..n {
        if i == 0 || !linked[i - 1] {
            sets.push(Vec::new());
        }
        sets.last_mut().expect("a set was started").push(i);
    }

    // Budget not met (floor, max_set or max_count): evict whole unprotected sets, least
    // attended first.
    let mut evicted = vec![false; sets.len()];
    let short = n_free - taken;
    if short > 0 {
        let set_attn =
            |s: &Vec<usize>| attn.map_or(0.0, |a| s.iter().map(|&i| a[i]).fold(f32::MIN, f32::max));
        let mut order: Vec<usize> = (0..sets.len()).filter(|&s| !prot.any[sets[s][0]]).collect();
        order.sort_by(|&x, &y| {
            set_attn(&sets[x])
                .total_cmp(&set_attn(&sets[y]))
                .then(x.cmp(&y))
        });
        for &s in order.iter().take(short) {
            evicted[s] = true;
        }
    }

    // Pivots.
    let merged: Vec<usize> = (0..sets.len())
        .filter(|&s| !evicted[s] && sets[s].len() > 1)
        .collect();
    let pivots: Vec<usize> = match (p.pivot, attn) {
        (Pivot::Attention, Some(a)) => merged
            .iter()
            .map(|&s| {
                let m = &sets[s];
                // Most attention; ties to the older member.
                *m.iter()
                    .reduce(|b, x| if a[*x] > a[*b] { x } else { b })
                    .expect("non-empty")
            })
            .collect(),
        _ => {
            let ms: Vec<Vec<usize>> = merged.iter().map(|&s| sets[s].clone()).collect();
            let d = scores::mean_key_distances_from(&keys.mean_dist(cells, &ms, counts)?, &ms);
            ms.iter()
                .zip(&d)
                .map(|(m, d)| {
                    let j = (0..m.len())
                        .reduce(|b, x| if d[x] < d[b] { x } else { b })
                        .expect("non-empty");
                    m[j]
                })
                .collect()
        }
    };
    for (s, set) in sets.iter().enumerate() {
        if evicted[s] {
            set.iter().for_each(|&i| owner[i] = None);
        }
    }
    for (&s, &pv) in merged.iter().zip(&pivots) {
        sets[s].iter().for_each(|&i| owner[i] = Some(pv));
    }
    Ok(())
}
