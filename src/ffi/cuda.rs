//! The device entry points (`kvm_cuda_*`): one event on a cache that lives on a CUDA device,
//! with the same views, plans and statuses as the host functions. Data pointers in the views
//! (and query rows) are device pointers; `stream` is a `cudaStream_t` (NULL: the legacy
//! default stream). Each call returns after its work on `stream` has finished, so its status
//! covers the kernels too. Without the `cuda` feature every call checks its arguments as the
//! feature build does, then returns KVM_STATUS_UNSUPPORTED (`kvm_has_cuda()` says which).

use std::ffi::c_void;

use super::boundary::{guard, opt_slice, try_mut, try_ref, try_slice, try_slice_mut};
use super::{ctx_ref, kvm_ctx, kvm_layer_view, kvm_plan, kvm_query_rows, kvm_status, layers_of};
use crate::cuda::{self, DevQueries, Stream};
use crate::error::Error;
use crate::layout;
use crate::merge::plan::Plan;

/// `kvm_attn_from_queries_layers` with the keys and the query rows on the device.
///
/// `queries[l].q` points to layer `l`'s query ring in device memory (f32, `n_head ·
/// n_embd_head_k` per row); the rows used are `q_sel[0..n_q]` (host array of ring row
/// indices) or, with `q_sel` NULL, rows `0..n_q`. `cells`, `bias` and `attn` are host arrays
/// as in the host function; `attn` gets the same sums (within f32 rounding: the order of the
/// additions differs) and is written only on success. A non-finite query or key gives
/// KVM_STATUS_INVALID_ARG, found on the device before `attn` is written. Every K view and
/// query ring must be memory of one CUDA device, else KVM_STATUS_INVALID_ARG before any
/// kernel runs. Kernel or runtime failures give KVM_STATUS_DEVICE.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_cuda_attn_from_queries_layers(
    ctx: *const kvm_ctx,
    layers: *const kvm_layer_view,
    queries: *const kvm_query_rows,
    n_layers: usize,
    q_sel: *const u32,
    n_q: u32,
    cells: *const u32,
    n_cells: usize,
    bias: *const f32,
    attn: *mut f32,
    stream: *mut c_void,
) -> kvm_status {
    guard(|| {
        let c = ctx_ref(ctx).ok_or(Error::NullArg("ctx"))?;
        let (raw, geoms) = layers_of(layers, n_layers)?;
        let rows = try_slice!(queries, n_layers, "queries");
        let cells = try_slice!(cells, n_cells, "cells");
        layout::validate_cells(cells, geoms[0].n_cells)?;
        let q_sel = opt_slice!(q_sel, n_q);
        if n_q > 0 && rows.iter().any(|r| r.q.is_null()) {
            return Err(Error::NullArg("q"));
        }
        let qs: Vec<DevQueries> = rows
            .iter()
            .map(|r| DevQueries {
                q: r.q,
                n_head: r.n_head as usize,
                kq_scale: r.kq_scale,
            })
            .collect();
        let bias = opt_slice!(bias, n_cells);
        let attn: &mut [f32] = try_slice_mut!(attn, n_cells, "attn");
        cuda::attn_from_queries(
            &c.dev,
            &raw,
            &geoms,
            &qs,
            q_sel,
            n_q as usize,
            cells,
            bias,
            attn,
            Stream(stream),
        )
    })
}

/// `kvm_plan_init` on a device cache: the link scores, neighbour similarities and query-free
/// pivots come from kernels; the plan is made on the host by the same code and is an ordinary
/// `kvm_plan` (`kvm_plan_get`, `kvm_plan_free`). `cells`, `attn` and `counts` are host arrays.
/// The layers' K and V must be memory of one CUDA device (KVM_STATUS_INVALID_ARG otherwise);
/// kernel or runtime failures give KVM_STATUS_DEVICE, `*out` untouched. The ctx keeps the
/// device scratch of all three `kvm_cuda_*` calls (grown to the largest event, freed by
/// `kvm_ctx_free`); calls on one ctx from several threads take turns on it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_cuda_plan_init(
    ctx: *const kvm_ctx,
    layers: *const kvm_layer_view,
    n_layers: usize,
    cells: *const u32,
    n_cells: usize,
    attn: *const f32,
    counts: *const u32,
    n_free: u32,
    stream: *mut c_void,
    out: *mut *mut kvm_plan,
) -> kvm_status {
    guard(|| {
        let c = ctx_ref(ctx).ok_or(Error::NullArg("ctx"))?;
        let out = try_mut!(out, "out");
        let cells = try_slice!(cells, n_cells, "cells");
        let attn = opt_slice!(attn, n_cells);
        let counts = opt_slice!(counts, n_cells);
        let (raw, geoms) = layers_of(layers, n_layers)?;
        layout::validate_cells(cells, geoms[0].n_cells)?;
        let p = cuda::plan(
            &c.dev,
            &c.params,
            c.calib.as_ref(),
            &raw,
            &geoms,
            cells,
            attn,
            counts,
            n_free as usize,
            Stream(stream),
        )?;
        *out = Box::into_raw(Box::new(p)) as *mut kvm_plan;
        Ok(())
    })
}

/// `kvm_plan_apply` on a device cache: the kernels write exactly the rows the host function
/// writes (merged survivors' K and V, CaM's folded values), in place; the bytes of every other
/// row stay as they were. Values agree with the host function's within the cache type's
/// rounding (q8_0/q4_0: within a quantum). A plan from either `kvm_plan_init` or
/// `kvm_cuda_plan_init` applies, on layers of the same types, shapes and strides
/// (KVM_STATUS_MISMATCH otherwise, nothing written). Every check runs before the first kernel;
/// kernel or runtime failures give KVM_STATUS_DEVICE (the rows may then be partly written).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvm_cuda_plan_apply(
    ctx: *const kvm_ctx,
    plan: *const kvm_plan,
    layers: *const kvm_layer_view,
    n_layers: usize,
    stream: *mut c_void,
) -> kvm_status {
    guard(|| {
        let c = ctx_ref(ctx).ok_or(Error::NullArg("ctx"))?;
        let p = try_ref!(plan as *const Plan, "plan");
        let (raw, geoms) = layers_of(layers, n_layers)?;
        cuda::apply(&c.dev, p, &raw, &geoms, Stream(stream))
    })
}
