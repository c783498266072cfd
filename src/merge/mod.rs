//! The algorithm: which cells leave the cache, and what the survivors hold afterwards.
//!
//! Everything here is safe Rust over validated row views ([`crate::layout::LayerRows`]).
//! A compression event has two steps, kept apart so a host can inspect or veto the first:
//!
//! 1. [`plan::plan`] reads the keys (and the attention the host observed) and decides, for
//!    every cell of the window, which *set* it joins and which cell of each set survives, or
//!    that it is evicted outright. It frees exactly the number of cells asked for.
//! 2. [`apply::apply`] writes each merged set's state into its surviving cell, per layer and
//!    KV head, in place; every other row stays bit-identical.
//!
//! The methods (KVMerger and the baselines) differ only in step 1, plus CaM's value folding
//! in step 2, so a host compares them by changing one parameter.
#![forbid(unsafe_code)]

pub mod apply;
pub mod attention;
pub mod calib;
pub mod plan;
pub mod scores;

use crate::simd::Kernels;

/// Which cells leave, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// KVMerger as we read the paper (docs/method.md): merge runs of adjacent, key-similar cells.
    KvMerger,
    /// llama.cpp's context shift: drop the oldest cells of the window, no protection.
    ContextShift,
    /// StreamingLLM: keep the sinks and the newest cells, drop the oldest of the rest.
    StreamingLlm,
    /// H2O: keep sinks, recent window and heavy hitters; drop the least-attended cells.
    H2o,
    /// CaM: H2O's eviction, each evicted value first folded into the following kept values.
    Cam,
    /// Hybrid: attention decides who leaves (as H2O), each run of leaving cells is merged into
    /// its surviving neighbours with the Gaussian weights, split where the summed key
    /// similarity is largest (`plan/evict_fold.rs`).
    EvictFold,
}

impl Method {
    /// Whether a plan of this method depends on the attention it is given (heavy hitters, who
    /// leaves, pivots). Context shift and StreamingLLM choose by position alone, so a host need
    /// not score queries for them; `plan` ignores the attention they are given.
    pub fn reads_attention(self) -> bool {
        !matches!(self, Method::ContextShift | Method::StreamingLlm)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pivot {
    /// The member with the most accumulated attention (query-free when none is given).
    Attention,
    /// The member nearest the set's count-weighted mean key, over all layers and heads.
    QueryFree,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sigma {
    /// `2σ² = d̄²`, d̄ the mean distance of the set's keys to the pivot (docs/method.md,
    /// "Kernel width σ").
    Adaptive,
    /// A fixed σ, for ablations.
    Fixed(f32),
    /// `σ = r·d̄`: the adaptive kernel with its width scaled, so the strength of a fold can be
    /// swept without knowing the keys' scale. `Adaptive` is `r = 1/√2`; for a pivot and one
    /// other member the other's kernel weight is `exp(−2/r²)` whatever their distance.
    Relative(f32),
    /// `σ = r·s`, `s` the root-mean-square distance from a merged member to its pivot over
    /// every set of the event, per layer and KV head: one kernel width for the whole event, so
    /// a member much nearer its pivot than is usual in that head keeps most of its weight and
    /// a far one almost none (the adaptive kernel compares a member only with its own set).
    Layer(f32),
    /// No kernel: members weighted by their accumulated attention (not times their counts: a
    /// merged cell's attention already counts the tokens it stands for), so a member the
    /// queries ignore barely changes the survivor (it is all but evicted) and one they attend
    /// to keeps its share. Without attention, or none on the pivot, as `Adaptive`.
    Attention,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueMode {
    /// Convex weights.
    None,
    /// The paper's v2: the merged value multiplied by the number of members.
    Paper,
    /// Convex weights; the host adds `ln(count)` to the survivor's mask entry.
    LogBias,
}

/// Everything that steers planning and applying.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    pub method: Method,
    pub n_sink: usize,
    pub n_recent: usize,
    pub heavy_frac: f32,
    /// Links whose mean cosine is below this are never merged (EVICT_FOLD evicts a leaving
    /// cell this unlike the neighbour it would fold into).
    pub sim_floor: Option<f32>,
    pub pivot: Pivot,
    pub sigma: Sigma,
    pub value_mode: ValueMode,
    pub merge_keys: bool,
    pub merge_values: bool,
    /// Added to a link's score in proportion to its age (1 for the oldest link, 0 for the
    /// newest), so old text merges before recent text.
    pub age_bias: f32,
    pub max_set: Option<usize>,
    /// Most tokens one cell may stand for after a merge. A cap keeps old text from being
    /// folded again and again into blurred cells; links it forbids leave the budget to
    /// eviction (oldest first without attention).
    pub max_count: Option<u32>,
    /// For CaM: how many following kept cells share an evicted value.
    pub cam_span: usize,
}

// EVICT_FOLD is the default because it kept the most of the merging methods on both models
// measured (docs/findings.md, evict-fold): against KVMerger as we read it, 5.2 % / 3.0 % lower
// perplexity on SmolLM2 and 4.9 % / 2.7 % on held-out Qwen2.5-Coder windows at 35 % / 50 % of
// the cache.
// The other fields are KVMerger's, so a host that sets `method` to KvMerger gets the reading
// of docs/method.md unchanged.
impl Default for Params {
    fn default() -> Self {
        Params {
            method: Method::EvictFold,
            n_sink: 4,
            n_recent: 32,
            heavy_frac: 0.05,
            sim_floor: None,
            pivot: Pivot::Attention,
            sigma: Sigma::Adaptive,
            value_mode: ValueMode::None,
            merge_keys: true,
            merge_values: true,
            age_bias: 0.0,
            max_set: None,
            max_count: None,
            cam_span: 4,
        }
    }
}

impl Params {
    /// Rejects values that have no meaning.
    pub fn check(&self) -> crate::error::Result<()> {
        use crate::error::Error::InvalidArg;
        if !(0.0..=1.0).contains(&self.heavy_frac) {
            return Err(InvalidArg(format!(
                "heavy_frac = {} is not in [0, 1]",
                self.heavy_frac
            )));
        }
        if let Some(f) = self.sim_floor {
            if !f.is_finite() {
                return Err(InvalidArg("sim_floor is not finite".into()));
            }
        }
        match self.sigma {
            Sigma::Fixed(s) if !(s.is_finite() && s > 0.0) => {
                return Err(InvalidArg(format!("fixed sigma = {s} must be > 0")));
            }
            Sigma::Relative(r) | Sigma::Layer(r) if !(r.is_finite() && r > 0.0) => {
                return Err(InvalidArg(format!(
                    "sigma {:?}: the multiplier must be > 0",
                    self.sigma
                )));
            }
            _ => {}
        }
        if !self.age_bias.is_finite() {
            return Err(InvalidArg("age_bias is not finite".into()));
        }
        if self.max_set == Some(1) {
            return Err(InvalidArg(
                "max_set = 1 would forbid every merge; use 0 for no limit".into(),
            ));
        }
        if self.max_count == Some(1) {
            return Err(InvalidArg(
                "max_count = 1 would forbid every merge; use 0 for no limit".into(),
            ));
        }
        if self.cam_span == 0 {
            return Err(InvalidArg("cam_span must be > 0".into()));
        }
        Ok(())
    }
}

/// What the algorithm runs on: the kernel table and the handle's own thread pool.
pub struct Exec<'a> {
    pub kern: &'static Kernels,
    pub pool: &'a rayon::ThreadPool,
}
