//! EVICT_FOLD: H2O's choice of who leaves, each run of leaving cells folded into the
//! surviving neighbours on its two sides.

use super::Window;
use crate::error::Result;
use crate::merge::scores::{self, KeyStats};
use crate::merge::Params;

/// Attention decides who leaves; each maximal run of leaving cells joins the surviving
/// neighbours on its two sides. Between two survivors the run is split where the summed
/// similarity is largest, so sets stay runs (and a cell may join its less similar neighbour;
/// on a tie the split is the first, so a lone cell as similar to both goes right). Sinks never
/// absorb anything; a leaving cell with no survivor it may join, or one past the floor,
/// `max_set` or `max_count` counting outward from its survivor, is evicted. The rules as the
/// header states them: `kvm_method::KVM_METHOD_EVICT_FOLD`.
pub(super) fn plan(
    p: &Params,
    w: &Window<impl KeyStats>,
    n_free: usize,
    owner: &mut [Option<usize>],
) -> Result<()> {
    let (n, prot, counts) = (w.cells.len(), &w.prot, w.counts);
    // Cells and tokens each survivor holds so far, for `max_set` and `max_count`; a survivor
    // between two runs takes from the run on its left before the one on its right.
    let mut set_len = vec![1usize; n];
    let mut tokens: Vec<u64> = counts.iter().map(|&c| u64::from(c)).collect();
    let mut leaving = vec![false; n];
    for &i in w.eviction_order().iter().take(n_free) {
        leaving[i] = true;
    }
    // Maximal runs of leaving cells and the survivors that may absorb them.
    let mut runs: Vec<(usize, usize, Option<usize>, Option<usize>)> = Vec::new();
    let mut i = 0;
    while i < n {
        if !leaving[i] {
            i += 1;
            continue;
        }
        let a = i;
        while i < n && leaving[i] {
            i += 1;
        }
        let b = i - 1;
        let left = (a > 0 && !prot.sink[a - 1]).then(|| a - 1);
        let right = (b + 1 < n && !prot.sink[b + 1]).then_some(b + 1);
        runs.push((a, b, left, right));
    }
    let mut pairs = Vec::new();
    for &(a, b, l, r) in &runs {
        for e in a..=b {
            if let Some(l) = l {
                pairs.push((e, l));
            }
            if let Some(r) = r {
                pairs.push((e, r));
            }
        }
    }
    let sims = scores::pair_sims_from(&w.keys.pair_cos(w.cells, &pairs)?, &w.heads);
    let mut k = 0;
    for &(a, b, l, r) in &runs {
        let m = b - a + 1;
        let mut sl = vec![0f32; m];
        let mut sr = vec![0f32; m];
        for j in 0..m {
            if l.is_some() {
                sl[j] = sims[k];
                k += 1;
            }
            if r.is_some() {
                sr[j] = sims[k];
                k += 1;
            }
        }
        // Cells a..a+split go left, the rest right; choose the split with the most similarity.
        let split = match (l, r) {
            (None, None) => None,
            (Some(_), None) => Some(m),
            (None, Some(_)) => Some(0),
            (Some(_), Some(_)) => {
                let total_r: f32 = sr.iter().sum();
                let (mut best, mut best_v, mut acc) = (0, total_r, total_r);
                for j in 0..m {
                    acc += sl[j] - sr[j];
                    if acc > best_v {
                        best_v = acc;
                        best = j + 1;
                    }
                }
                Some(best)
            }
        };
        // Under a similarity floor a cell too unlike its neighbour is evicted instead of folded.
        // Sets must stay runs, so the left set ends at the first cell (counting outward from the
        // left survivor) below the floor and the right set likewise; the cells between are
        // evicted. Without a floor every cell is folded, as the split says.
        // The caps (`max_set`, `max_count`) cut a set the same way: a survivor folds in cells
        // outward from itself while it stays within them, and the rest are evicted.
        let above = |v: f32| p.sim_floor.is_none_or(|f| v >= f);
        let mut reach = |s: Option<usize>, order: &mut dyn Iterator<Item = usize>, sims: &[f32]| {
            let Some(s) = s else { return 0 };
            let mut k = 0;
            for j in order {
                let joined = tokens[s] + u64::from(counts[a + j]);
                if !above(sims[j])
                    || p.max_set.is_some_and(|c| set_len[s] + 1 > c)
                    || p.max_count.is_some_and(|c| joined > u64::from(c))
                {
                    break;
                }
                set_len[s] += 1;
                tokens[s] = joined;
                k += 1;
            }
            k
        };
        let (to_l, to_r) = match split {
            None => (0, 0),
            Some(s) => (s, m - s),
        };
        let reach_l = reach(l, &mut (0..to_l), &sl);
        let reach_r = reach(r, &mut (m - to_r..m).rev(), &sr);
        for j in 0..m {
            owner[a + j] = match split {
                None => None,
                Some(s) if j < s => l.filter(|_| j < reach_l),
                Some(_) => r.filter(|_| j >= m - reach_r),
            };
        }
    }
    Ok(())
}
