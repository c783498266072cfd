//! Calibration (the paper's Observation 2): how similar adjacent keys are is a property of
//! each layer of the model, not of the text. A profile holds, per layer, the mean and spread
//! of the head-mean adjacent-key cosine over one or more caches, and the share of links above
//! the paper's ε = 0.75.
//!
//! How it steers link scoring: without a profile every layer's cosine counts as is, so a
//! layer whose keys are always nearly parallel (typically the first ones) adds the same large
//! number to every link and the ranking follows the few layers with a wide spread. With a
//! profile each layer contributes its *standardized* cosine `(cos − μ_l) / σ_l`: "how much
//! more similar than usual for this layer", so all layers get an equal say.
//!
//! File format (text, one record per line, `#` comments allowed):
//! ```text
//! kvmerger-profile 1
//! layers <n>
//! layer <il> <links> <mean> <std> <frac_above_0.75>
//! ```

use rayon::prelude::*;

use super::scores::layer_adjacent;
use super::Exec;
use crate::error::{Error, Result};
use crate::layout::LayerRows;

/// The paper's threshold; recorded per layer as the merge ratio Observation 2 is about.
pub(crate) const PAPER_EPS: f32 = 0.75;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerStat {
    pub n: u64,
    pub sum: f64,
    pub sumsq: f64,
    pub above: u64,
}

impl LayerStat {
    pub fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum / self.n as f64
        }
    }
    pub fn std(&self) -> f64 {
        if self.n < 2 {
            return 0.0;
        }
        let m = self.mean();
        ((self.sumsq / self.n as f64 - m * m).max(0.0) * self.n as f64 / (self.n - 1) as f64).sqrt()
    }
    pub fn frac_above(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.above as f64 / self.n as f64
        }
    }
}

/// A calibration profile.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Calib {
    pub layers: Vec<LayerStat>,
}

impl Calib {
    /// Adds the adjacent-key statistics of one window of one cache.
    pub fn observe<L: LayerRows + Sync>(
        &mut self,
        ex: &Exec,
        layers: &[L],
        cells: &[u32],
    ) -> Result<()> {
        if self.layers.is_empty() {
            self.layers = vec![LayerStat::default(); layers.len()];
        } else if self.layers.len() != layers.len() {
            return Err(Error::BadProfile(format!(
                "profile has {} layers, this cache {}",
                self.layers.len(),
                layers.len()
            )));
        }
        let per_layer: Vec<Vec<f32>> = ex.pool.install(|| {
            layers
                .par_iter()
                .map(|l| layer_adjacent(ex.kern, l, cells))
                .collect()
        });
        for (st, cos) in self.layers.iter_mut().zip(&per_layer) {
            for &c in cos {
                st.n += 1;
                st.sum += c as f64;
                st.sumsq += (c as f64) * (c as f64);
                st.above += (c > PAPER_EPS) as u64;
            }
        }
        Ok(())
    }

    /// `(μ_l, 1/σ_l)` of layer `il`; a layer without spread gets weight 0 (it cannot tell links
    /// apart), one without data the identity.
    pub fn standardizer(&self, il: usize) -> (f32, f32) {
        match self.layers.get(il) {
            Some(st) if st.n >= 2 => {
                let sd = st.std();
                (
                    st.mean() as f32,
                    if sd > 1e-6 { (1.0 / sd) as f32 } else { 0.0 },
                )
            }
            _ => (0.0, 1.0),
        }
    }

    /// Checks the profile fits a cache of `n_layers` layers.
    pub fn check_fits(&self, n_layers: usize) -> Result<()> {
        if self.layers.len() != n_layers {
            return Err(Error::BadProfile(format!(
                "profile has {} layers, this cache {n_layers}",
                self.layers.len()
            )));
        }
        if self.layers.iter().all(|s| s.n < 2) {
            return Err(Error::BadProfile("profile holds no observations".into()));
        }
        Ok(())
    }

    pub fn to_text(&self) -> String {
        let mut s = format!("kvmerger-profile 1\nlayers {}\n", self.layers.len());
        s.push_str("# layer <il> <links> <mean cos> <std> <share above 0.75>\n");
        for (il, st) in self.layers.iter().enumerate() {
            s.push_str(&format!(
                "layer {il} {} {} {} {}\n",
                st.n,
                st.mean(),
                st.std(),
                st.frac_above()
            ));
        }
        s
    }

    pub fn from_text(text: &str) -> Result<Calib> {
        let bad = |m: String| Error::BadProfile(m);
        let mut lines = text
            .lines()
            .map(str::trim)
            .enumerate()
            .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
        match lines.next() {
            Some((_, "kvmerger-profile 1")) => {}
            _ => return Err(bad("missing header line `kvmerger-profile 1`".into())),
        }
        let n_layers: usize = match lines.next() {
            Some((_, l)) if l.starts_with("layers ") => l[7..]
                .trim()
                .parse()
                .map_err(|_| bad(format!("bad layer count `{l}`")))?,
            _ => return Err(bad("missing `layers <n>` line".into())),
        };
        if n_layers == 0 || n_layers > 100_000 {
            return Err(bad(format!("implausible layer count {n_layers}")));
        }
        let mut layers = vec![None; n_layers];
        for (ln, l) in lines {
            let f: Vec<&str> = l.split_whitespace().collect();
            let parsed = (|| -> Option<(usize, LayerStat)> {
                if f.len() != 6 || f[0] != "layer" {
                    return None;
                }
                let il: usize = f[1].parse().ok()?;
                let n: u64 = f[2].parse().ok()?;
                let mean: f64 = f[3].parse().ok()?;
                let sd: f64 = f[4].parse().ok()?;
                let frac: f64 = f[5].parse().ok()?;
                if !(mean.is_finite() && sd.is_finite() && sd >= 0.0 && (0.0..=1.0).contains(&frac))
                {
                    return None;
                }
                // Rebuild the sums so profiles can be merged by further observation.
                let var = if n >= 2 {
                    sd * sd * (n - 1) as f64 / n as f64
                } else {
                    0.0
                };
                Some((
                    il,
                    LayerStat {
                        n,
                        sum: mean * n as f64,
                        sumsq: (var + mean * mean) * n as f64,
                        above: (frac * n as f64).round() as u64,
                    },
                ))
            })()
            .ok_or_else(|| bad(format!("line {}: cannot read `{l}`", ln + 1)))?;
            let (il, st) = parsed;
            let slot = layers
                .get_mut(il)
                .ok_or_else(|| bad(format!("line {}: layer {il} out of range", ln + 1)))?;
            if slot.replace(st).is_some() {
                return Err(bad(format!("line {}: layer {il} given twice", ln + 1)));
            }
        }
        let layers = layers
            .into_iter()
            .enumerate()
            .map(|(il, s)| s.ok_or_else(|| bad(format!("layer {il} missing"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Calib { layers })
    }

    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        std::fs::write(path, self.to_text())
            .map_err(|e| Error::Io(format!("{}: {e}", path.display())))
    }

    pub fn load(path: &std::path::Path) -> Result<Calib> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
        Calib::from_text(&text)
    }
}
