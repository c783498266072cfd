//! `#[repr(C)]` types of the API: parameters, tensor views, plan info, and the enums whose
//! values the parameter fields take.
#![allow(non_camel_case_types)]

use std::ffi::c_void;

use super::KVM_MAX_THREADS;
use crate::error::{Error, Result};
use crate::layout::{RawLayer, RawView};
use crate::merge::{Method, Params, Pivot, Sigma, ValueMode};

/// Which cells leave the cache, and how (the value of `kvm_params.method`).
///
/// The rules every plan follows, for a window of `n` cells (index 0 the oldest) that must
/// free `n_free` of them:
///
/// - **Sinks**: the first `min(n_sink, n)` cells. **Recent**: the last `min(n_recent, n)`.
/// - **Heavy hitters** (KVMERGER, H2O, CAM and EVICT_FOLD, and only when `attn` is given):
///   `k = round(heavy_frac · n)` cells (n the whole window, halves rounded away from zero),
///   chosen among the cells that are neither sinks nor recent (so those never count towards
///   `k`), most attention first, equal attention to the older cell; all of them if fewer
///   than `k` remain.
/// - **Protected** cells (sinks, recent and heavy hitters, or what a method lists instead)
///   never leave and are never merged with another cell; they may absorb leaving cells only
///   where a method says so. More than the unprotected cells asked for: KVM_STATUS_BUDGET.
/// - **Order of eviction** ("least attended first"): ascending attention, equal attention to
///   the older cell; without `attn`, oldest first.
/// - **Output**: sets are numbered in position order of their surviving cell, whose count is
///   the sum of its members' counts (saturating at UINT32_MAX); `freed` lists the freed cell
///   ids in position order; `n_evicted` counts freed cells merged into no survivor.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvm_method {
    /// KVMerger, our reading of the paper: merge runs of adjacent, key-similar cells.
    ///
    /// Protects sinks, recent and heavy hitters. Link `i` joins cells `i` and `i+1`; its
    /// similarity is the mean over layers and KV heads of their keys' cosine (−1 for a zero or
    /// non-finite key), its score that similarity plus `age_bias · age(i)`, `age(i) = 1 −
    /// i/(n−2)` (1 when n ≤ 2), so over all `n − 1` links of the window. With a calibration
    /// profile (`kvm_ctx_set_calib`) the similarity in the score becomes the mean over layers,
    /// each weighted by its KV heads, of `(c_l − μ_l)/σ_l`, `c_l` the layer's mean cosine over
    /// its heads and `μ_l`, `σ_l` the profile's (`1/σ_l` taken as 0 when `σ_l` ≤ 1e-6, and
    /// `μ_l=0`, `σ_l=1` for a layer the profile holds fewer than 2 links of); the floor still
    /// compares the plain similarity. Links with an unprotected cell at both ends and a
    /// similarity ≥ `sim_floor` are candidates, taken in descending score (equal scores: the
    /// older link) until `n_free` are taken; a link is skipped when the run it would make has
    /// more than `max_set` cells or stands for more than `max_count` tokens. Each taken link
    /// frees one cell; the runs of cells joined by taken links are the sets. **Shortfall**:
    /// when fewer than `n_free` links are taken, `n_free − taken` whole sets (merged runs and
    /// single cells, all unprotected) are evicted, every member of each: in ascending order of
    /// the largest attention of their members (equal: the older set), or the oldest sets first
    /// without `attn`. Each evicted set frees exactly one cell more than merging it would.
    /// **Pivot** of each merged set (the cell that survives): with KVM_PIVOT_ATTENTION and
    /// `attn`, the member with the most attention (equal: the older); otherwise (query-free)
    /// the member whose key is nearest the set's count-weighted mean key (squared distance
    /// summed over layers and KV heads; equal: the older).
    KVM_METHOD_KVMERGER = 0,
    /// llama.cpp's context shift: drop the oldest cells of the window.
    ///
    /// Protects nothing (not even the sinks): frees cells `0 .. n_free`. Reads no attention.
    KVM_METHOD_CONTEXT_SHIFT = 1,
    /// StreamingLLM: keep `n_sink` and the newest cells, drop the oldest of the rest.
    ///
    /// Protects only the sinks (`n_recent` and heavy hitters do not apply): frees cells
    /// `s .. s + n_free`, `s = min(n_sink, n)`. Reads no attention.
    KVM_METHOD_STREAMING_LLM = 2,
    /// H2O: keep sinks, recent window, heavy hitters; drop the least attended.
    ///
    /// Frees the first `n_free` unprotected cells in the order of eviction (least attended,
    /// or oldest without `attn`); nothing is merged (`n_evicted = n_free`).
    KVM_METHOD_H2O = 3,
    /// CaM: H2O's eviction with evicted values folded into following kept values.
    ///
    /// Frees what H2O frees, all evicted (`n_evicted = n_free`). At apply, each evicted cell `e`'s value rows are added, with
    /// weight `p/m`, to the values of its `m` targets: the kept cells after it that are not
    /// sinks, the nearest `cam_span` of them (fewer if fewer follow), or, when none follows,
    /// the last `cam_span` such cells before it (none at all: nothing is added). `p` is
    /// `a_e / mean a_targets` clamped to [0, 1] with `attn` (1 when that mean is not > 0), and
    /// 1 without. Keys are untouched.
    KVM_METHOD_CAM = 4,
    /// Hybrid: H2O decides who leaves, each leaving cell merges into a surviving neighbour.
    ///
    /// The leaving cells are the `n_free` that H2O would free. Each maximal run `a..=b` of
    /// leaving cells may join its left survivor `a − 1` and its right survivor `b + 1` (any
    /// kept cell, protected ones included), except that **a sink never absorbs** and there is
    /// none past the window's ends. With both, the run splits where the summed similarity is
    /// largest: cells `a .. a+s` join the left survivor and the rest the right one, for the
    /// `s` in `0..=m` (`m = b − a + 1`) that maximizes `v_s = Σ_{j<s} L_j + Σ_{j≥s} R_j`,
    /// `L_j`/`R_j` the similarity of cell `a+j` to the left/right survivor (the mean over
    /// layers and KV heads of the keys' cosine). In f32: `v_0 = R_0 + … + R_{m−1}` summed in
    /// order, `v_{s+1} = v_s + (L_s − R_s)`; the first `s` with the largest `v_s`, so a lone
    /// cell as similar to both goes right. Sets stay runs, and a cell may join its less
    /// similar neighbour. With one survivor the whole run joins it; with none it is evicted.
    /// **Floor**: with `sim_floor`, counting outward from each survivor, its part of the run
    /// stops before the first cell whose similarity to that survivor is below the floor: that
    /// cell and every cell between it and the split are evicted (whole stretches, even cells
    /// above the floor). The floor never changes which cells leave, only whether they are
    /// folded. **Caps** (`max_set`, `max_count`) cut a part the same way: counting outward
    /// from its survivor, a cell joins while the set stays within `max_set` cells and
    /// `max_count` tokens; from the first that would not, the rest of that part is evicted (a
    /// survivor between two runs takes from its left run first). The survivor is each set's
    /// pivot.
    KVM_METHOD_EVICT_FOLD = 5,
}

/// How a merging set's surviving cell is chosen (`kvm_params.pivot`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvm_pivot {
    /// Most accumulated attention; query-free when `attn` is NULL.
    KVM_PIVOT_ATTENTION = 0,
    /// The member nearest the set's count-weighted mean key. A host that asks for this scores
    /// no queries (`kvm_method_reads_attention` says false) and passes `attn` = NULL; given
    /// `attn` anyway, heavy hitters and the order of eviction still use it.
    KVM_PIVOT_QUERY_FREE = 1,
}

/// Gaussian kernel width (`kvm_params.sigma_mode`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvm_sigma {
    /// 2σ² = d̄², d̄ the mean key distance to the pivot in the set (scale-free).
    KVM_SIGMA_ADAPTIVE = 0,
    /// σ = `kvm_params.sigma`.
    KVM_SIGMA_FIXED = 1,
    /// No Gaussian kernel: member weights ∝ their accumulated attention (adaptive when the
    /// plan had no attention, or none on the pivot).
    KVM_SIGMA_ATTENTION = 2,
    /// σ = `kvm_params.sigma` × d̄: the adaptive kernel widened (> 1/√2) or narrowed (< 1/√2).
    /// A pivot's one other member gets kernel weight exp(−2/sigma²), e.g. 0.14 at sigma = 1.
    KVM_SIGMA_RELATIVE = 3,
    /// σ = `kvm_params.sigma` × the root-mean-square member-to-pivot key distance over the
    /// whole event, per layer and KV head: members nearer their pivot than is usual keep more
    /// weight, farther ones less.
    KVM_SIGMA_LAYER = 4,
}

/// What happens to merged values (`kvm_params.value_mode`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvm_value_mode {
    /// Convex weights.
    KVM_VALUE_MODE_NONE = 0,
    /// The paper's v2: merged value times the number of members.
    KVM_VALUE_MODE_PAPER = 1,
    /// Convex weights; the host adds ln(count) to the survivor's KQ-mask entry.
    KVM_VALUE_MODE_LOGBIAS = 2,
}

c_enum!(kvm_method {
    KVM_METHOD_KVMERGER,
    KVM_METHOD_CONTEXT_SHIFT,
    KVM_METHOD_STREAMING_LLM,
    KVM_METHOD_H2O,
    KVM_METHOD_CAM,
    KVM_METHOD_EVICT_FOLD,
});
c_enum!(kvm_pivot {
    KVM_PIVOT_ATTENTION,
    KVM_PIVOT_QUERY_FREE,
});
c_enum!(kvm_sigma {
    KVM_SIGMA_ADAPTIVE,
    KVM_SIGMA_FIXED,
    KVM_SIGMA_ATTENTION,
    KVM_SIGMA_RELATIVE,
    KVM_SIGMA_LAYER,
});
c_enum!(kvm_value_mode {
    KVM_VALUE_MODE_NONE,
    KVM_VALUE_MODE_PAPER,
    KVM_VALUE_MODE_LOGBIAS,
});

/// The C enums and the core's are converted both ways by one pair of `From`s each (`Sigma`
/// carries its width, so `to_params` builds it).
macro_rules! same_enum {
    ($c:ident <=> $r:ident { $($cv:ident <=> $rv:ident),+ $(,)? }) => {
        impl From<$c> for $r {
            fn from(x: $c) -> $r {
                match x {
                    $($c::$cv => $r::$rv),+
                }
            }
        }

        impl From<$r> for $c {
            fn from(x: $r) -> $c {
                match x {
                    $($r::$rv => $c::$cv),+
                }
            }
        }
    };
}

same_enum!(kvm_method <=> Method {
    KVM_METHOD_KVMERGER <=> KvMerger,
    KVM_METHOD_CONTEXT_SHIFT <=> ContextShift,
    KVM_METHOD_STREAMING_LLM <=> StreamingLlm,
    KVM_METHOD_H2O <=> H2o,
    KVM_METHOD_CAM <=> Cam,
    KVM_METHOD_EVICT_FOLD <=> EvictFold,
});
same_enum!(kvm_pivot <=> Pivot {
    KVM_PIVOT_ATTENTION <=> Attention,
    KVM_PIVOT_QUERY_FREE <=> QueryFree,
});
same_enum!(kvm_value_mode <=> ValueMode {
    KVM_VALUE_MODE_NONE <=> None,
    KVM_VALUE_MODE_PAPER <=> Paper,
    KVM_VALUE_MODE_LOGBIAS <=> LogBias,
});

/// Parameters of a `kvm_ctx`. Get the defaults from `kvm_params_default()` and change fields.
/// `kvm_ctx_init` refuses, with KVM_STATUS_INVALID_ARG, an enum field that holds none of its
/// enum's values and each value a field's comment says is refused.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kvm_params {
    /// Threads of the ctx's own pool; 0 = one per CPU. Default 0. Above `KVM_MAX_THREADS`
    /// `kvm_ctx_init` refuses it with KVM_STATUS_INVALID_ARG (every thread is started there).
    pub n_threads: u32,
    /// A `kvm_method`. Default KVM_METHOD_EVICT_FOLD (the method that kept the most in our
    /// measurements; KVM_METHOD_KVMERGER is the paper's).
    pub method: i32,
    /// First cells of the window never freed (attention sinks). Default 4.
    pub n_sink: u32,
    /// Last cells of the window never freed. Default 32.
    pub n_recent: u32,
    /// Share of the window with the most attention never freed, in [0, 1] (refused outside,
    /// and NaN): `round(heavy_frac · n_cells)` cells besides the sinks and the recent window
    /// (see `kvm_method`). Without `attn`, none. Default 0.05.
    pub heavy_frac: f32,
    /// Links with a mean key cosine below this are not merged (under EVICT_FOLD: a leaving
    /// cell this unlike its survivor is evicted, not folded, and so is every cell past it;
    /// see `kvm_method`); a cosine equal to the floor passes; below -1 means no floor. NaN is
    /// refused: it compares neither above nor below a cosine. Default -2 (off).
    pub sim_floor: f32,
    /// A `kvm_pivot`. Default KVM_PIVOT_ATTENTION.
    pub pivot: i32,
    /// A `kvm_sigma`. Default KVM_SIGMA_ADAPTIVE.
    pub sigma_mode: i32,
    /// σ for KVM_SIGMA_FIXED, the multiplier for KVM_SIGMA_RELATIVE and KVM_SIGMA_LAYER; under
    /// those three modes anything but a finite value > 0 is refused (a zero or infinite kernel
    /// width has no weights). Default 5, which is meant for FIXED: a host choosing another sets
    /// its own.
    pub sigma: f32,
    /// A `kvm_value_mode`. Default KVM_VALUE_MODE_NONE.
    pub value_mode: i32,
    /// Average keys (true) or keep the pivot's key (false). Default true.
    pub merge_keys: bool,
    /// Average values (true) or keep the pivot's value (false). Default true.
    pub merge_values: bool,
    /// Added to a link's score in proportion to its age (oldest 1, newest 0). Default 0.
    /// Refused when not finite: it would give every link the same infinite (or NaN) score.
    pub age_bias: f32,
    /// Largest merging set; 0 = no limit. Default 0. 1 is refused: a set of one is no merge,
    /// so it would forbid every merge (use 0 for no limit). Under EVICT_FOLD a leaving cell
    /// that would make its survivor's set larger is evicted.
    pub max_set: u32,
    /// CaM: how many following kept cells share an evicted value; 0 is refused (the value
    /// would go nowhere). Default 4.
    pub cam_span: u32,
    /// Most tokens one cell may stand for after a merge; links over it are not taken and the
    /// budget they leave is met by eviction (under EVICT_FOLD a leaving cell that would take
    /// its survivor over it is evicted). 0 = no limit. Default 0. 1 is refused: every cell
    /// already stands for a token, so a merge would always go over it (use 0 for no limit).
    pub max_count: u32,
}

impl kvm_params {
    pub(crate) fn from_params(p: &Params, n_threads: u32) -> kvm_params {
        kvm_params {
            n_threads,
            method: kvm_method::from(p.method) as i32,
            n_sink: p.n_sink as u32,
            n_recent: p.n_recent as u32,
            heavy_frac: p.heavy_frac,
            sim_floor: p.sim_floor.unwrap_or(-2.0),
            pivot: kvm_pivot::from(p.pivot) as i32,
            sigma_mode: match p.sigma {
                Sigma::Adaptive => kvm_sigma::KVM_SIGMA_ADAPTIVE,
                Sigma::Fixed(_) => kvm_sigma::KVM_SIGMA_FIXED,
                Sigma::Attention => kvm_sigma::KVM_SIGMA_ATTENTION,
                Sigma::Relative(_) => kvm_sigma::KVM_SIGMA_RELATIVE,
                Sigma::Layer(_) => kvm_sigma::KVM_SIGMA_LAYER,
            } as i32,
            sigma: match p.sigma {
                Sigma::Fixed(s) | Sigma::Relative(s) | Sigma::Layer(s) => s,
                Sigma::Adaptive | Sigma::Attention => 5.0,
            },
            value_mode: kvm_value_mode::from(p.value_mode) as i32,
            merge_keys: p.merge_keys,
            merge_values: p.merge_values,
            age_bias: p.age_bias,
            max_set: p.max_set.unwrap_or(0) as u32,
            cam_span: p.cam_span as u32,
            max_count: p.max_count.unwrap_or(0),
        }
    }

    pub(crate) fn to_params(self) -> Result<Params> {
        fn known<T: TryFrom<i32, Error = i32>>(field: &str, v: i32) -> Result<T> {
            T::try_from(v).map_err(|v| {
                Error::InvalidArg(format!("kvm_params.{field} = {v} is not a known value"))
            })
        }
        if self.n_threads > KVM_MAX_THREADS {
            return Err(Error::InvalidArg(format!(
                "kvm_params.n_threads = {} is above KVM_MAX_THREADS = {KVM_MAX_THREADS} \
                 (0 = one per CPU)",
                self.n_threads
            )));
        }
        let p = Params {
            method: known::<kvm_method>("method", self.method)?.into(),
            n_sink: self.n_sink as usize,
            n_recent: self.n_recent as usize,
            heavy_frac: self.heavy_frac,
            sim_floor: if self.sim_floor.is_nan() {
                return Err(Error::InvalidArg("kvm_params.sim_floor is NaN".into()));
            } else if self.sim_floor < -1.0 {
                None
            } else {
                Some(self.sim_floor)
            },
            pivot: known::<kvm_pivot>("pivot", self.pivot)?.into(),
            sigma: match known::<kvm_sigma>("sigma_mode", self.sigma_mode)? {
                kvm_sigma::KVM_SIGMA_ADAPTIVE => Sigma::Adaptive,
                kvm_sigma::KVM_SIGMA_FIXED => Sigma::Fixed(self.sigma),
                kvm_sigma::KVM_SIGMA_ATTENTION => Sigma::Attention,
                kvm_sigma::KVM_SIGMA_RELATIVE => Sigma::Relative(self.sigma),
                kvm_sigma::KVM_SIGMA_LAYER => Sigma::Layer(self.sigma),
            },
            value_mode: known::<kvm_value_mode>("value_mode", self.value_mode)?.into(),
            merge_keys: self.merge_keys,
            merge_values: self.merge_values,
            age_bias: self.age_bias,
            max_set: (self.max_set != 0).then_some(self.max_set as usize),
            max_count: (self.max_count != 0).then_some(self.max_count),
            cam_span: self.cam_span as usize,
        };
        p.check()?;
        Ok(p)
    }
}

/// A tensor as ggml describes it. Fill it straight from a `ggml_tensor`: `data`, `type`
/// (the `ggml_type` id: F32 = 0, F16 = 1, Q4_0 = 2, Q8_0 = 8, BF16 = 30), `ne` (elements per
/// dimension) and `nb` (byte strides). Only 2-D views are accepted (`ne[2] == ne[3] == 1`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kvm_tensor_view {
    pub data: *mut c_void,
    pub r#type: i32,
    pub ne: [i64; 4],
    pub nb: [usize; 4],
}

/// One KV layer of one stream.
///
/// `k`: one row per cell, `ne = [≥ n_head_kv·n_embd_head_k, n_cells]`.
/// `v`: if `!v_trans`, one row per cell, `ne = [≥ n_head_kv·n_embd_head_v, n_cells]`; if
/// `v_trans` (llama.cpp without flash attention), one row per channel,
/// `ne = [n_cells, ≥ n_head_kv·n_embd_head_v]`, never block-quantized.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kvm_layer_view {
    pub k: kvm_tensor_view,
    pub v: kvm_tensor_view,
    pub n_head_kv: u32,
    pub n_embd_head_k: u32,
    pub n_embd_head_v: u32,
    pub v_trans: bool,
}

/// One layer's recent query rows, for `kvm_attn_from_queries_layers`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kvm_query_rows {
    /// `n_q` rows of `n_head · n_embd_head_k` f32, post-RoPE (rotated like the cached keys).
    pub q: *const f32,
    /// Query heads of the layer, a multiple of its `n_head_kv`.
    pub n_head: u32,
    /// The logit scale, usually `1/√n_embd_head_k`. Not finite: KVM_STATUS_INVALID_ARG.
    pub kq_scale: f32,
}

impl kvm_tensor_view {
    fn raw(&self) -> RawView {
        RawView {
            data: self.data as *mut u8,
            type_id: self.r#type,
            ne: self.ne,
            nb: self.nb,
        }
    }
}

impl kvm_layer_view {
    pub(crate) fn raw(&self) -> RawLayer {
        RawLayer {
            k: self.k.raw(),
            v: self.v.raw(),
            n_head_kv: self.n_head_kv,
            n_embd_head_k: self.n_embd_head_k,
            n_embd_head_v: self.n_embd_head_v,
            v_trans: self.v_trans,
        }
    }
}

/// A plan, as read by `kvm_plan_get`. Arrays belong to the plan and stay valid until
/// `kvm_plan_free`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct kvm_plan_info {
    /// Window size (cells given to `kvm_plan_init`).
    pub n_cells: usize,
    /// Number of sets, which is the number of surviving window cells.
    pub n_sets: usize,
    /// Cells freed (`n_cells - n_sets`).
    pub n_freed: usize,
    /// Of the freed, how many were dropped rather than merged into a survivor.
    pub n_evicted: usize,
    /// `[n_cells]`: set of each window cell (sets numbered in position order), or
    /// `KVM_EVICTED` for a dropped cell.
    pub set_of: *const u32,
    /// `[n_sets]`: window index of each set's surviving cell.
    pub survivor: *const u32,
    /// `[n_freed]`: cell ids freed, in position order.
    pub freed: *const u32,
    /// `[n_sets]`: tokens each surviving cell stands for after the merge.
    pub counts: *const u32,
}
