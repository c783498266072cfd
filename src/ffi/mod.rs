//! The C ABI. Every export lives here, runs behind the panic guard, checks its pointers
//! first, validates views through `crate::layout`, and calls the safe core. Outputs are
//! written only on success.
//!
//! Thread-safety, for all functions: a `kvm_ctx` may be used by several threads at once (its
//! state is read-only after init, except `kvm_ctx_set_calib`, which must not race with other
//! calls on the same ctx). The caller must not read or write the KV buffers passed in while a
//! call runs. `kvm_last_error` is per thread.
#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)] // each export's contract is in its doc comment

/// For a `#[repr(i32)]` C enum: `ALL`, its values in declaration order, and `TryFrom<i32>`,
/// the one way an `int32_t` from C becomes the enum (the failed value comes back as the
/// error). The list is written once here; the `match` below stops the build when a variant
/// is missing from it. (cbindgen reads the enum itself, so the enum cannot come from a macro.)
macro_rules! c_enum {
    ($t:ident { $($v:ident),+ $(,)? }) => {
        impl $t {
            /// Every value, in declaration order.
            pub const ALL: &'static [$t] = &[$($t::$v),+];
        }

        impl TryFrom<i32> for $t {
            type Error = i32;
            fn try_from(v: i32) -> std::result::Result<Self, i32> {
                $t::ALL.iter().copied().find(|&x| x as i32 == v).ok_or(v)
            }
        }

        const _: () = {
            fn every_variant_listed(x: $t) {
                match x {
                    $($t::$v)|+ => {}
                }
            }
            let _ = every_variant_listed;
        };
    };
}

mod boundary;
pub mod cuda;
pub mod status;
pub mod views;

use std::ffi::{c_char, CStr};

use boundary::{guard, guard_value, opt_slice, try_mut, try_ref, try_slice, try_slice_mut};
pub use cuda::*;
pub use status::kvm_status;
pub use views::*;

use crate::error::{Error, Result};
use crate::layout::{self, LayerGeom, RawLayer};
use crate::merge::calib::Calib;
use crate::merge::plan::Plan;
use crate::merge::{apply, attention, plan, Exec, Params};
use crate::simd;

/// Version of this ABI; bumped on any incompatible change of a type or signature.
pub const KVM_ABI_VERSION: u32 = 1;

/// `set_of` value of a cell that was dropped rather than merged.
pub const KVM_EVICTED: u32 = u32::MAX;

/// Largest `kvm_params.n_threads` a ctx accepts. `kvm_ctx_init` starts every thread of the
/// pool (4096 took 8 s and 480 MB; `UINT32_MAX` never returned), while an event's work splits
/// into a few hundred tasks at most (layers × KV heads).
pub const KVM_MAX_THREADS: u32 = 256;

/// Opaque handle: parameters, calibration profile and a thread pool of its own.
pub struct kvm_ctx {
    _private: [u8; 0],
}

/// Opaque plan of one compression event.
pub struct kvm_plan {
    _private: [u8; 0],
}

/// Opaque calibration profile.
pub struct kvm_calib {
    _private: [u8; 0],
}

struct Ctx {
    params: Params,
    pool: rayon::ThreadPool,
    calib: Option<Calib>,
    /// Device buffers of the `kvm_cuda_*` calls (nothing without the `cuda` feature).
    dev: crate::cuda::Device,
}

impl Ctx {
    fn exec(&self) -> Exec<'_> {
        Exec {
            kern: simd::kernels(),
            pool: &self.pool,
        }
    }
}

fn ctx_ref<'a>(p: *const kvm_ctx) -> Option<&'a Ctx> {
    // SAFETY: a non-NULL kvm_ctx pointer comes from kvm_ctx_init (caller's contract).
    unsafe { (p as *const Ctx).as_ref() }
}

macro_rules! ctx {
    ($p:expr) => {
        match ctx_ref($p) {
            Some(c) => c,
            None => return Err(Error::NullArg("ctx")),
        }
    };
}

fn layers_of(
    layers: *const kvm_layer_view,
    n_layers: usize,
) -> Result<(Vec<RawLayer>, Vec<LayerGeom>)> {
    let views = try_slice!(layers, n_layers, "layers");
    let raw: Vec<RawLayer> = views.iter().map(|v| v.raw()).collect();
    let geoms = layout::validate(&raw)?;
    Ok((raw, geoms))
}

/// The default parameters (see each field of `kvm_params`).
#[unsafe(no_mangle)]
pub extern "C" fn kvm_params_default() -> kvm_params {
    kvm_params::from_params(&Params::default(), 0)
}

/// Static description of a status code; never NULL, never to be freed.
#[unsafe(no_mangle)]
pub extern "C" fn kvm_status_str(status: i32) -> *const c_char {
    status::status_str(status).as_ptr()
}

/// Detailed message of the last failed call on this thread ("" if none). Valid until the next
/// failing call on this thread; do not free.
#[unsafe(no_mangle)]
pub extern "C" fn kvm_last_error() -> *const c_char {
    boundary::last_error_ptr()
}

/// Name of the kernel table this CPU uses: "avx2", "neon" or "scalar". Static string.
#[unsafe(no_mangle)]
pub extern "C" fn kvm_kernels_name() -> *const c_char {
    guard_value(c"scalar".as_ptr(), || match simd::kernels().name {
        "avx2" => c"avx2".as_ptr(),
        "neon" => c"neon".as_ptr(),
        _ => c"scalar".as_ptr(),
    })
}

/// Whether this build has CUDA kernels (the `cuda` feature): whether the `kvm_cuda_*` entry
/// points can run rather than return KVM_STATUS_UNSUPPORTED. The header is the same either way.
#[unsafe(no_mangle)]
pub extern "C" fn kvm_has_cuda() -> bool {
    cfg!(feature = "cuda")
}

/// The ABI version this library was built with (`KVM_ABI_VERSION`).
#[unsafe(no_mangle)]
pub extern "C" fn kvm_abi_version() -> u32 {
    KVM_ABI_VERSION
}

/// Whether a host should score attention (`kvm_attn_from_queries_layers`, `kvm_attn_add_probs`)
/// before planning with this `kvm_method` and `kvm_pivot` (the values of `kvm_params.method`
/// and `kvm_params.pivot`), or pass `attn` = NULL to `kvm_plan_init` and skip that cost.
///
/// True when `pivot` is KVM_PIVOT_ATTENTION and `method` is KVM_METHOD_KVMERGER,
/// KVM_METHOD_H2O, KVM_METHOD_CAM or KVM_METHOD_EVICT_FOLD, the methods whose plans depend on
/// `attn`. False for KVM_METHOD_CONTEXT_SHIFT and KVM_METHOD_STREAMING_LLM, which choose by
/// position alone (`kvm_plan_init` ignores an `attn` given with them, beyond checking it), for
/// KVM_PIVOT_QUERY_FREE, which asks for a plan without queries (with `attn` = NULL: no heavy
/// hitters, oldest-first eviction, pivots nearest the count-weighted mean key), and for a value
/// that is not one of its enum's (which `kvm_ctx_init` refuses).
#[unsafe(no_mangle)]
pub extern "C" fn kvm_method_reads_attention(method: i32, pivot: i32) -> bool {
    let method = kvm_method::try_from(method).map(crate::merge::Method::from);
    let pivot = kvm_pivot::try_from(pivot);
    matches!(
        (method, pivot),
        (Ok(m), Ok(kvm_pivot::KVM_PIVOT_ATTENTION)) if m.reads_attention()
    )
}

/// Creates a context. `params` may be NULL for the defaults. On success writes a new handle
/// to `*out` (free it with `kvm_ctx_free`); on failure `*out` is untouched.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_ctx_init(
    params: *const kvm_params,
    out: *mut *mut kvm_ctx,
) -> kvm_status {
    guard(|| {
        let out = try_mut!(out, "out");
        // SAFETY: a non-NULL params points to a kvm_params (caller's contract).
        let kp = unsafe { params.as_ref() }
            .copied()
            .unwrap_or_else(|| kvm_params_default());
        let p = kp.to_params()?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(kp.n_threads as usize)
            .thread_name(|i| format!("kvmerger-{i}"))
            .build()
            .map_err(|e| Error::InvalidArg(format!("cannot start the thread pool: {e}")))?;
        let ctx = Box::new(Ctx {
            params: p,
            pool,
            calib: None,
            dev: crate::cuda::Device::default(),
        });
        *out = Box::into_raw(ctx) as *mut kvm_ctx;
        Ok(())
    })
}

/// Frees a context (NULL is fine). Never free the same handle twice.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_ctx_free(ctx: *mut kvm_ctx) {
    guard_value((), || {
        if !ctx.is_null() {
            // SAFETY: the pointer came from kvm_ctx_init and is freed once (caller's contract).
            drop(unsafe { Box::from_raw(ctx as *mut Ctx) });
        }
    })
}

/// The parameters a context was made with (into `*out`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_ctx_params(ctx: *const kvm_ctx, out: *mut kvm_params) -> kvm_status {
    guard(|| {
        let c = ctx!(ctx);
        let out = try_mut!(out, "out");
        *out = kvm_params::from_params(&c.params, c.pool.current_num_threads() as u32);
        Ok(())
    })
}

/// Plans one compression event of a window of cells.
///
/// `layers[n_layers]`: the cache's layers (read only). `cells[n_cells]`: the window's cell ids
/// in position order (distinct, below the layers' cell count). `attn[n_cells]`: accumulated
/// attention per window cell, or NULL (query-free pivots, oldest-first eviction).
/// `counts[n_cells]`: tokens each cell already stands for (≥ 1), or NULL for all 1.
/// Frees exactly `n_free` cells or fails with KVM_STATUS_BUDGET. On success `*out` is a new
/// plan (free with `kvm_plan_free`); nothing is written to any buffer. Which cells leave and
/// which survivor each joins follow the rules under `kvm_method`; `attn` is ignored (after
/// its check) by the methods `kvm_method_reads_attention` says read none. A plan depends only
/// on its inputs (not on the thread count): every tie is broken by position as stated there.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_plan_init(
    ctx: *const kvm_ctx,
    layers: *const kvm_layer_view,
    n_layers: usize,
    cells: *const u32,
    n_cells: usize,
    attn: *const f32,
    counts: *const u32,
    n_free: u32,
    out: *mut *mut kvm_plan,
) -> kvm_status {
    guard(|| {
        let c = ctx!(ctx);
        let out = try_mut!(out, "out");
        let cells = try_slice!(cells, n_cells, "cells");
        let attn = opt_slice!(attn, n_cells);
        let counts = opt_slice!(counts, n_cells);
        let (raw, geoms) = layers_of(layers, n_layers)?;
        layout::validate_cells(cells, geoms[0].n_cells)?;
        // SAFETY: validated views; the caller keeps the buffers valid and unwritten during the call.
        let views = unsafe { layout::borrow(&raw, &geoms, simd::kernels()) };
        let event = plan::Event {
            cells,
            attn,
            counts,
            n_free: n_free as usize,
        };
        let p = plan::plan(&c.exec(), &c.params, c.calib.as_ref(), &views, event)?;
        *out = Box::into_raw(Box::new(p)) as *mut kvm_plan;
        Ok(())
    })
}

/// Reads a plan into `*out`; the arrays stay owned by the plan.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_plan_get(
    plan: *const kvm_plan,
    out: *mut kvm_plan_info,
) -> kvm_status {
    guard(|| {
        let p = try_ref!(plan as *const Plan, "plan");
        let out = try_mut!(out, "out");
        *out = kvm_plan_info {
            n_cells: p.cells.len(),
            n_sets: p.survivor.len(),
            n_freed: p.freed.len(),
            n_evicted: p.n_evicted,
            set_of: p.set_of.as_ptr(),
            survivor: p.survivor.as_ptr(),
            freed: p.freed.as_ptr(),
            counts: p.counts.as_ptr(),
        };
        Ok(())
    })
}

/// Frees a plan (NULL is fine).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_plan_free(plan: *mut kvm_plan) {
    guard_value((), || {
        if !plan.is_null() {
            // SAFETY: from kvm_plan_init, freed once (caller's contract).
            drop(unsafe { Box::from_raw(plan as *mut Plan) });
        }
    })
}

/// Applies a plan in place: writes each merged set's K and V into its surviving cell's rows
/// (and, for CaM, the values of the cells that absorb evicted ones). No other byte of the
/// buffers changes; freed cells' rows are left as they were (the host frees the cells). The
/// layers must have the same types, shapes and strides as when planned (data pointers may
/// differ, e.g. a host copy of device buffers), else KVM_STATUS_MISMATCH and nothing written.
/// Every layer is validated and compared with the plan before the first byte is written, so
/// a refused call leaves all layers as they were. Merging finite rows writes finite rows: a
/// merged element stays within its members' range, and the paper's values (times the member
/// count) and CaM's folds saturate at the largest value the cache type holds.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_plan_apply(
    ctx: *const kvm_ctx,
    plan: *const kvm_plan,
    layers: *const kvm_layer_view,
    n_layers: usize,
) -> kvm_status {
    guard(|| {
        let c = ctx!(ctx);
        let p = try_ref!(plan as *const Plan, "plan");
        let (raw, geoms) = layers_of(layers, n_layers)?;
        // SAFETY: validated, pairwise disjoint views; the caller gives us exclusive access.
        let mut views = unsafe { layout::borrow_mut(&raw, &geoms, simd::kernels()) };
        apply::apply(&c.exec(), p, &mut views)
    })
}

/// Adds to `attn[i]` the attention that query rows give cell `cells[i]` of one layer.
///
/// `q`: `n_q` rows of `n_head · n_embd_head_k` f32, post-RoPE (and rotated like the cached keys
/// if the host rotates quantized K). Softmax per query head over the given cells (pass all the
/// sequence's cells), `logit = kq_scale · q·k + bias[i]` (`bias` nullable, e.g. ln(count)).
/// Query head h reads KV head `h / (n_head / n_head_kv)`. `attn` is read and written.
/// `kq_scale`, the queries and the cells' keys must be finite, and each bias finite or −inf
/// (which masks the cell); anything else gives KVM_STATUS_INVALID_ARG, `attn` untouched.
/// Logits beyond f32's range are taken in f64, so each query head adds a softmax that sums
/// to 1 (or nothing, when the bias masks every cell).
/// For several layers, `kvm_attn_from_queries_layers` does the same in one parallel pass.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_attn_from_queries(
    ctx: *const kvm_ctx,
    layer: *const kvm_layer_view,
    q: *const f32,
    n_q: u32,
    n_head: u32,
    kq_scale: f32,
    cells: *const u32,
    n_cells: usize,
    bias: *const f32,
    attn: *mut f32,
) -> kvm_status {
    let rows = kvm_query_rows {
        q,
        n_head,
        kq_scale,
    };
    // SAFETY: the caller's promises for `layer` and the buffers are the one-layer case of
    // `kvm_attn_from_queries_layers`' (which guards the call); `rows` lives across it.
    unsafe { kvm_attn_from_queries_layers(ctx, layer, &rows, 1, n_q, cells, n_cells, bias, attn) }
}

/// `kvm_attn_from_queries` for `n_layers` layers at once: `queries[l]` holds layer
/// `layers[l]`'s `n_q` query rows, its head count and its scale. The probabilities of every
/// layer are added into the one `attn`. Faster than a call per layer (one parallel pass over
/// layers and KV heads); the result does not depend on the number of threads.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_attn_from_queries_layers(
    ctx: *const kvm_ctx,
    layers: *const kvm_layer_view,
    queries: *const kvm_query_rows,
    n_layers: usize,
    n_q: u32,
    cells: *const u32,
    n_cells: usize,
    bias: *const f32,
    attn: *mut f32,
) -> kvm_status {
    guard(|| {
        let c = ctx!(ctx);
        let (raw, geoms) = layers_of(layers, n_layers)?;
        let rows = try_slice!(queries, n_layers, "queries");
        let cells = try_slice!(cells, n_cells, "cells");
        layout::validate_cells(cells, geoms[0].n_cells)?;
        let mut qs = Vec::with_capacity(n_layers);
        for (g, r) in geoms.iter().zip(rows) {
            let nq = (n_q as usize)
                .checked_mul(r.n_head as usize)
                .and_then(|x| x.checked_mul(g.dk))
                .ok_or_else(|| {
                    Error::InvalidArg("n_q · n_head · n_embd_head_k overflows".into())
                })?;
            qs.push(attention::Queries {
                q: try_slice!(r.q, nq, "q"),
                n_head: r.n_head as usize,
                kq_scale: r.kq_scale,
            });
        }
        let bias = opt_slice!(bias, n_cells);
        let attn: &mut [f32] = try_slice_mut!(attn, n_cells, "attn");
        // SAFETY: validated views, caller keeps them valid during the call.
        let views = unsafe { layout::borrow(&raw, &geoms, simd::kernels()) };
        attention::from_queries(&c.exec(), &views, &qs, n_q as usize, cells, bias, attn)
    })
}

/// Adds already-softmaxed rows (llama.cpp's `kq_soft_max`) per cell:
/// `attn[i] += Σ_r probs[r·row_stride + cells[i]]` over `n_rows` rows of `n_kv` floats.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_attn_add_probs(
    ctx: *const kvm_ctx,
    probs: *const f32,
    n_kv: usize,
    n_rows: usize,
    row_stride: usize,
    cells: *const u32,
    n_cells: usize,
    attn: *mut f32,
) -> kvm_status {
    guard(|| {
        let c = ctx!(ctx);
        if n_rows > 0 && row_stride < n_kv {
            return Err(Error::InvalidArg(format!(
                "row_stride {row_stride} < n_kv {n_kv}"
            )));
        }
        let len = if n_rows == 0 {
            0
        } else {
            (n_rows - 1)
                .checked_mul(row_stride)
                .and_then(|x| x.checked_add(n_kv))
                .ok_or_else(|| Error::InvalidArg("probs size overflows".into()))?
        };
        let probs = try_slice!(probs, len, "probs");
        let cells = try_slice!(cells, n_cells, "cells");
        let attn: &mut [f32] = try_slice_mut!(attn, n_cells, "attn");
        attention::add_probs(&c.exec(), probs, n_kv, n_rows, row_stride, cells, attn)
    })
}

/// Creates an empty calibration profile (free with `kvm_calib_free`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_calib_init(out: *mut *mut kvm_calib) -> kvm_status {
    guard(|| {
        let out = try_mut!(out, "out");
        *out = Box::into_raw(Box::new(Calib::default())) as *mut kvm_calib;
        Ok(())
    })
}

/// Frees a profile (NULL is fine).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_calib_free(calib: *mut kvm_calib) {
    guard_value((), || {
        if !calib.is_null() {
            // SAFETY: from kvm_calib_init/kvm_calib_load, freed once (caller's contract).
            drop(unsafe { Box::from_raw(calib as *mut Calib) });
        }
    })
}

/// Adds the adjacent-key statistics of a window (`cells` in position order) to a profile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_calib_observe(
    ctx: *const kvm_ctx,
    calib: *mut kvm_calib,
    layers: *const kvm_layer_view,
    n_layers: usize,
    cells: *const u32,
    n_cells: usize,
) -> kvm_status {
    guard(|| {
        let c = ctx!(ctx);
        let cal = try_mut!(calib as *mut Calib, "calib");
        let cells = try_slice!(cells, n_cells, "cells");
        let (raw, geoms) = layers_of(layers, n_layers)?;
        layout::validate_cells(cells, geoms[0].n_cells)?;
        // SAFETY: validated views, valid and unwritten during the call (caller's contract).
        let views = unsafe { layout::borrow(&raw, &geoms, simd::kernels()) };
        // Observe into a copy so a failure leaves the profile as it was.
        let mut next = cal.clone();
        next.observe(&c.exec(), &views, cells)?;
        *cal = next;
        Ok(())
    })
}

fn path_of<'a>(path: *const c_char) -> Result<&'a std::path::Path> {
    // SAFETY: a non-NULL path is a NUL-terminated string (caller's contract).
    let s = unsafe { path.as_ref().map(|p| CStr::from_ptr(p)) }.ok_or(Error::NullArg("path"))?;
    let s = s
        .to_str()
        .map_err(|_| Error::InvalidArg("path is not UTF-8".into()))?;
    Ok(std::path::Path::new(s))
}

/// Writes a profile to a text file at `path` (NUL-terminated, UTF-8).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_calib_save(
    calib: *const kvm_calib,
    path: *const c_char,
) -> kvm_status {
    guard(|| {
        let cal = try_ref!(calib as *const Calib, "calib");
        cal.save(path_of(path)?)
    })
}

/// Reads a profile written by `kvm_calib_save`; `*out` is a new profile on success. A file
/// over 16 MiB (no profile is that large) is refused without reading past that, and so is
/// any value adjacent-key cosines cannot give (a mean outside [-1, 1], a spread too wide for
/// its mean, a share outside [0, 1]), with KVM_STATUS_BAD_PROFILE. Saving a loaded profile
/// writes its file back byte for byte.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_calib_load(
    path: *const c_char,
    out: *mut *mut kvm_calib,
) -> kvm_status {
    guard(|| {
        let out = try_mut!(out, "out");
        let cal = Calib::load(path_of(path)?)?;
        *out = Box::into_raw(Box::new(cal)) as *mut kvm_calib;
        Ok(())
    })
}

/// Makes link scoring use a copy of `calib` (NULL: back to plain mean cosine). Must not run
/// concurrently with other calls on the same ctx.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_ctx_set_calib(
    ctx: *mut kvm_ctx,
    calib: *const kvm_calib,
) -> kvm_status {
    guard(|| {
        let c = try_mut!(ctx as *mut Ctx, "ctx");
        // SAFETY: a non-NULL calib came from kvm_calib_init/load (caller's contract).
        let cal = unsafe { (calib as *const Calib).as_ref() };
        if let Some(cal) = cal {
            if cal.layers.iter().all(|s| s.n < 2) {
                return Err(Error::BadProfile("profile holds no observations".into()));
            }
        }
        c.calib = cal.cloned();
        Ok(())
    })
}
