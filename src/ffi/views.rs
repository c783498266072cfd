//! `#[repr(C)]` types of the API: parameters, tensor views, plan info, and the enums whose
//! values the parameter fields take.
#![allow(non_camel_case_types)]

use std::ffi::c_void;

use super::KVM_MAX_THREADS;
use crate::error::{Error, Result};
use crate::layout::{RawLayer, RawView};
use crate::merge::{Method, Params, Pivot, Sigma, ValueMode};

/// Which cells leave the cache, and how (the value of `kvm_params.method`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvm_method {
    /// KVMerger, our reading of the paper: merge runs of adjacent, key-similar cells.
    KVM_METHOD_KVMERGER = 0,
    /// llama.cpp's context shift: drop the oldest cells of the window.
    KVM_METHOD_CONTEXT_SHIFT = 1,
    /// StreamingLLM: keep `n_sink` and the newest cells, drop the oldest of the rest.
    KVM_METHOD_STREAMING_LLM = 2,
    /// H2O: keep sinks, recent window, heavy hitters; drop the least attended.
    KVM_METHOD_H2O = 3,
    /// CaM: H2O's eviction with evicted values folded into following kept values.
    KVM_METHOD_CAM = 4,
    /// Hybrid: H2O decides who leaves, each leaving cell merges into its more similar neighbour.
    KVM_METHOD_EVICT_FOLD = 5,
}

/// How a merging set's surviving cell is chosen (`kvm_params.pivot`).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum kvm_pivot {
    /// Most accumulated attention; query-free when `attn` is NULL.
    KVM_PIVOT_ATTENTION = 0,
    /// The member nearest the set's mean key.
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
    /// and NaN). Default 0.05.
    pub heavy_frac: f32,
    /// Links with a mean key cosine below this are not merged (under EVICT_FOLD: a leaving
    /// cell this unlike its neighbour is evicted, not folded); below -1 means no floor. NaN is
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
            method: match p.method {
                Method::KvMerger => kvm_method::KVM_METHOD_KVMERGER,
                Method::ContextShift => kvm_method::KVM_METHOD_CONTEXT_SHIFT,
                Method::StreamingLlm => kvm_method::KVM_METHOD_STREAMING_LLM,
                Method::H2o => kvm_method::KVM_METHOD_H2O,
                Method::Cam => kvm_method::KVM_METHOD_CAM,
                Method::EvictFold => kvm_method::KVM_METHOD_EVICT_FOLD,
            } as i32,
            n_sink: p.n_sink as u32,
            n_recent: p.n_recent as u32,
            heavy_frac: p.heavy_frac,
            sim_floor: p.sim_floor.unwrap_or(-2.0),
            pivot: match p.pivot {
                Pivot::Attention => kvm_pivot::KVM_PIVOT_ATTENTION,
                Pivot::QueryFree => kvm_pivot::KVM_PIVOT_QUERY_FREE,
            } as i32,
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
            value_mode: match p.value_mode {
                ValueMode::None => kvm_value_mode::KVM_VALUE_MODE_NONE,
                ValueMode::Paper => kvm_value_mode::KVM_VALUE_MODE_PAPER,
                ValueMode::LogBias => kvm_value_mode::KVM_VALUE_MODE_LOGBIAS,
            } as i32,
            merge_keys: p.merge_keys,
            merge_values: p.merge_values,
            age_bias: p.age_bias,
            max_set: p.max_set.unwrap_or(0) as u32,
            cam_span: p.cam_span as u32,
            max_count: p.max_count.unwrap_or(0),
        }
    }

    pub(crate) fn to_params(self) -> Result<Params> {
        let bad = |f: &str, v: i32| {
            Error::InvalidArg(format!("kvm_params.{f} = {v} is not a known value"))
        };
        if self.n_threads > KVM_MAX_THREADS {
            return Err(Error::InvalidArg(format!(
                "kvm_params.n_threads = {} is above KVM_MAX_THREADS = {KVM_MAX_THREADS} \
                 (0 = one per CPU)",
                self.n_threads
            )));
        }
        let p = Params {
            method: match self.method {
                0 => Method::KvMerger,
                1 => Method::ContextShift,
                2 => Method::StreamingLlm,
                3 => Method::H2o,
                4 => Method::Cam,
                5 => Method::EvictFold,
                v => return Err(bad("method", v)),
            },
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
            pivot: match self.pivot {
                0 => Pivot::Attention,
                1 => Pivot::QueryFree,
                v => return Err(bad("pivot", v)),
            },
            sigma: match self.sigma_mode {
                0 => Sigma::Adaptive,
                1 => Sigma::Fixed(self.sigma),
                2 => Sigma::Attention,
                3 => Sigma::Relative(self.sigma),
                4 => Sigma::Layer(self.sigma),
                v => return Err(bad("sigma_mode", v)),
            },
            value_mode: match self.value_mode {
                0 => ValueMode::None,
                1 => ValueMode::Paper,
                2 => ValueMode::LogBias,
                v => return Err(bad("value_mode", v)),
            },
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
