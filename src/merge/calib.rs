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

/// Largest profile file read: 100,000 layers (the most a profile may have) of about 100 bytes.
pub(crate) const MAX_PROFILE_BYTES: u64 = 16 << 20;

/// Most links a layer may count: a share above ε times this still rounds back to the exact
/// count (f64 has 53 bits), which keeps a saved profile's shares as they were written.
const MAX_LINKS: u64 = 1 << 48;

/// One layer's statistics, held as the profile file states them, so that a profile saved,
/// loaded and saved again is the same file (sums rebuilt from a mean and a standard deviation
/// do not give them back bit for bit). A new window's statistics join by Chan et al.'s
/// pairwise update.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerStat {
    /// Links observed.
    pub n: u64,
    /// Their mean cosine (0 without links).
    pub mean: f64,
    /// Their sample standard deviation (0 below two links).
    pub std: f64,
    /// Links above [`PAPER_EPS`].
    pub above: u64,
}

impl LayerStat {
    /// The statistics of one window's cosines.
    fn of(cos: &[f32]) -> LayerStat {
        let (mut sum, mut sumsq) = (0f64, 0f64);
        for &c in cos {
            sum += c as f64;
            sumsq += (c as f64) * (c as f64);
        }
        let n = cos.len() as u64;
        let mean = if n == 0 { 0.0 } else { sum / n as f64 };
        let std = if n < 2 {
            0.0
        } else {
            ((sumsq / n as f64 - mean * mean).max(0.0) * n as f64 / (n - 1) as f64).sqrt()
        };
        let above = cos.iter().filter(|&&c| c > PAPER_EPS).count() as u64;
        LayerStat {
            n,
            mean,
            std,
            above,
        }
    }

    /// Adds `b`'s links to these.
    fn merge(&mut self, b: &LayerStat) {
        if b.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = b.clone();
            return;
        }
        let (na, nb) = (self.n as f64, b.n as f64);
        let n = na + nb;
        let d = b.mean - self.mean;
        let m2 = |s: &LayerStat| s.std * s.std * (s.n as f64 - 1.0);
        let m2 = m2(self) + m2(b) + d * d * na * nb / n;
        // Rounding must not carry a mean of cosines out of [-1, 1]: a profile is refused there.
        self.mean = (self.mean + d * nb / n).clamp(-1.0, 1.0);
        self.std = (m2 / (n - 1.0)).sqrt();
        self.n += b.n;
        self.above += b.above;
    }

    pub fn frac_above(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.above as f64 / self.n as f64
        }
    }

    /// The statistics a line of a profile file states, checked against what cosines can give.
    fn from_line(n: u64, mean: f64, std: f64, frac: f64) -> std::result::Result<Self, String> {
        if n > MAX_LINKS {
            return Err(format!("{n} links is more than {MAX_LINKS}"));
        }
        if !(-1.0..=1.0).contains(&mean) {
            return Err(format!("mean cosine {mean} is not in [-1, 1]"));
        }
        if !(0.0..=1.0).contains(&frac) {
            return Err(format!("share above {PAPER_EPS} {frac} is not in [0, 1]"));
        }
        if (n == 0 && (mean, std, frac) != (0.0, 0.0, 0.0)) || (n == 1 && std != 0.0) {
            return Err(format!(
                "{n} links cannot have mean {mean}, standard deviation {std}, share {frac}"
            ));
        }
        // Values in [-1, 1] with mean μ have a population variance of at most (1 − μ)(1 + μ)
        // (Bhatia–Davis); the margin covers rounding in the sums.
        let nf = n as f64;
        if n >= 2 && !(std >= 0.0 && std * std * (nf - 1.0) / nf <= 1.0 - mean * mean + 1e-9) {
            return Err(format!(
                "standard deviation {std} is not one of {n} cosines with mean {mean}"
            ));
        }
        Ok(LayerStat {
            n,
            mean,
            std,
            // exact for a share that `frac_above` wrote, since n ≤ MAX_LINKS
            above: (frac * nf).round() as u64,
        })
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
                .map(|l| layer_adjacent(l, cells))
                .collect()
        });
        for (st, cos) in self.layers.iter_mut().zip(&per_layer) {
            st.merge(&LayerStat::of(cos));
        }
        Ok(())
    }

    /// `(μ_l, 1/σ_l)` of layer `il`; a layer without spread gets weight 0 (it cannot tell links
    /// apart), one without data the identity.
    pub fn standardizer(&self, il: usize) -> (f32, f32) {
        match self.layers.get(il) {
            Some(st) if st.n >= 2 => {
                let sd = st.std;
                (
                    st.mean as f32,
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
                st.mean,
                st.std,
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
        // 0 is what an empty profile (kvm_calib_init, nothing observed) saves; it loads as
        // empty, which kvm_ctx_set_calib then refuses as having no observations.
        if n_layers > 100_000 {
            return Err(bad(format!("implausible layer count {n_layers}")));
        }
        let mut layers = vec![None; n_layers];
        for (ln, l) in lines {
            let f: Vec<&str> = l.split_whitespace().collect();
            let parsed = (|| -> std::result::Result<(usize, LayerStat), String> {
                let cannot = || format!("cannot read `{l}`");
                if f.len() != 6 || f[0] != "layer" {
                    return Err(cannot());
                }
                let il: usize = f[1].parse().map_err(|_| cannot())?;
                let n: u64 = f[2].parse().map_err(|_| cannot())?;
                let num = |s: &str| s.parse::<f64>().map_err(|_| cannot());
                let st = LayerStat::from_line(n, num(f[3])?, num(f[4])?, num(f[5])?)
                    .map_err(|m| format!("layer {il}: {m}"))?;
                Ok((il, st))
            })()
            .map_err(|m| bad(format!("line {}: {m}", ln + 1)))?;
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

    /// Reads a profile file, refusing one larger than [`MAX_PROFILE_BYTES`] before reading
    /// past that (`/dev/zero` was read until memory ran out).
    pub fn load(path: &std::path::Path) -> Result<Calib> {
        use std::io::Read;
        let io = |e: std::io::Error| Error::Io(format!("{}: {e}", path.display()));
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .map_err(io)?
            .take(MAX_PROFILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > MAX_PROFILE_BYTES {
            return Err(Error::BadProfile(format!(
                "{}: larger than {} MiB, no profile",
                path.display(),
                MAX_PROFILE_BYTES >> 20
            )));
        }
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::BadProfile(format!("{}: not UTF-8 text", path.display())))?;
        Calib::from_text(&text)
    }
}
