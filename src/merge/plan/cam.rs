//! CaM's value folding (its eviction is H2O's).

use super::{CamFold, Window};
use crate::merge::Params;

/// CaM, deterministic reading: an evicted cell's value is shared among the next `cam_span`
/// kept non-sink cells (the previous ones when none follow), each receiving `p / m` of it,
/// where `p = min(1, a_e / mean a_targets)` is CaM's merge probability taken in expectation.
pub(super) fn folds<S>(p: &Params, w: &Window<S>, owner: &[Option<usize>]) -> Vec<CamFold> {
    let (prot, attn) = (&w.prot, w.attn);
    let n = owner.len();
    let kept: Vec<usize> = (0..n)
        .filter(|&i| owner[i].is_some() && !prot.sink[i])
        .collect();
    let mut acc: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n];
    for e in (0..n).filter(|&i| owner[i].is_none()) {
        let at = kept.partition_point(|&k| k < e);
        let targets: &[usize] = if at < kept.len() {
            &kept[at..(at + p.cam_span).min(kept.len())]
        } else {
            &kept[at.saturating_sub(p.cam_span)..at]
        };
        if targets.is_empty() {
            continue;
        }
        let prob = match attn {
            Some(a) => {
                let mt = targets.iter().map(|&t| a[t]).sum::<f32>() / targets.len() as f32;
                if mt > 0.0 {
                    (a[e] / mt).clamp(0.0, 1.0)
                } else {
                    1.0
                }
            }
            None => 1.0,
        };
        let w = prob / targets.len() as f32;
        for &t in targets {
            acc[t].push((e, w));
        }
    }
    acc.into_iter()
        .enumerate()
        .filter(|(_, s)| !s.is_empty())
        .map(|(target, sources)| CamFold { target, sources })
        .collect()
}
