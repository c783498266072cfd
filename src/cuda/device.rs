//! The kernels of `cuda/*.cu` behind safe wrappers.
//!
//! Every call follows one pattern: the host packs the call's small tables (the layer table,
//! window cell ids, sets, weights) into one staging buffer, which goes to the device in one
//! copy into an arena the context owns (grown when an event needs more, never freed until the
//! context is); kernels run on the host's stream; the few floats per cell the host needs come
//! back, and the stream is synchronized before returning, so a kernel's failure is reported by
//! the call that launched it and the arena is free for the next call. The cache's bytes never
//! leave the device.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Mutex;

use super::{DevQueries, Stream};
use crate::error::{Error, Result};
use crate::layout::{LayerGeom, RawLayer};
use crate::merge::apply::{check_layers, merged_sets, pivot_index, set_weights, SigmaAcc};
use crate::merge::attention::{check_bias, check_heads};
use crate::merge::calib::Calib;
use crate::merge::plan::{plan_with, Event, Plan};
use crate::merge::scores::KeyStats;
use crate::merge::{Method, Params, Sigma, ValueMode};

/// `kvm_dev_layer` of `cuda/common.cuh`, field for field.
///
/// cbindgen:ignore
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct DevLayer {
    k: *mut u8,
    v: *mut u8,
    q: *const f32,
    k_nb1: u64,
    v_nb0: u64,
    v_nb1: u64,
    k_type: i32,
    v_type: i32,
    n_head: u32,
    dk: u32,
    dv: u32,
    v_trans: u32,
    n_head_q: u32,
    unit0: u32,
    kq_scale: f32,
    pad: u32,
}

// The C struct has no padding only if these agree; a silent mismatch would scramble every field.
const _: () = assert!(std::mem::size_of::<DevLayer>() == 88);

// Pointers: `[n]` is a length, (d) device memory, (h) host memory. Not part of the C API,
// which is the same in every build:
/// cbindgen:ignore
#[allow(unused_doc_comments)] // the line above is read by cbindgen, not rustdoc
extern "C" {
    fn kvm_cuda_malloc(p: *mut *mut c_void, n: usize) -> c_int;
    fn kvm_cuda_free(p: *mut c_void) -> c_int;
    fn kvm_cuda_h2d(dst: *mut c_void, src: *const c_void, n: usize, stream: *mut c_void) -> c_int;
    fn kvm_cuda_d2h(dst: *mut c_void, src: *const c_void, n: usize, stream: *mut c_void) -> c_int;
    fn kvm_cuda_d2d(dst: *mut c_void, src: *const c_void, n: usize, stream: *mut c_void) -> c_int;
    fn kvm_cuda_sync(stream: *mut c_void) -> c_int;
    fn kvm_cuda_get_device(dev: *mut c_int) -> c_int;
    fn kvm_cuda_set_device(dev: c_int) -> c_int;
    fn kvm_cuda_pointer_device(p: *const c_void, dev: *mut c_int) -> c_int;
    fn kvm_cuda_error_string(e: c_int) -> *const c_char;
    fn kvm_cuda_attn(
        layers: *const DevLayer, // (d) [n_layers]
        n_layers: u32,
        max_heads: u32,
        max_dk: u32,
        cells: *const u32, // (d) [n]
        n: u32,
        q_sel: *const u32, // (d) [n_q] or NULL
        n_q: u32,
        bias: *const f32, // (d) [n] or NULL
        n_units: u32,
        logits: *mut f64,  // (d) [n_units·n]
        partial: *mut f32, // (d) [n_units·n]
        out: *mut f32,     // (d) [n]
        err: *mut c_int,   // (d) [1], 0 on entry
        stream: *mut c_void,
    ) -> c_int;
    fn kvm_cuda_adjacent(
        layers: *const DevLayer,
        n_layers: u32,
        cells: *const u32, // (d) [n_cells]
        n_cells: u32,
        out: *mut f32, // (d) [n_layers·(n_cells−1)]
        stream: *mut c_void,
    ) -> c_int;
    fn kvm_cuda_pair_cos(
        layers: *const DevLayer,
        n_layers: u32,
        cells: *const u32,
        pairs: *const u32, // (d) [2·n_pairs] window indices
        n_pairs: u32,
        out: *mut f32, // (d) [n_layers·n_pairs]
        stream: *mut c_void,
    ) -> c_int;
    fn kvm_cuda_mean_dist(
        layers: *const DevLayer,
        n_layers: u32,
        max_dk: u32,
        cells: *const u32,
        counts: *const u32,  // (d) [n_cells] per window index
        set_off: *const u32, // (d) [n_sets+1]
        n_sets: u32,
        members: *const u32, // (d) [n_members] window indices
        n_members: u32,
        out: *mut f32, // (d) [n_layers·n_members]
        stream: *mut c_void,
    ) -> c_int;
    fn kvm_cuda_member_d2(
        layers: *const DevLayer,
        n_layers: u32,
        set_off: *const u32, // (d) [n_sets+1]
        n_sets: u32,
        mcells: *const u32, // (d) [n_members] cell ids
        pivot: *const u32,  // (d) [n_sets] index in the set
        n_members: u32,
        max_heads: u32,
        d2: *mut f32, // (d) [n_layers·n_members·max_heads]
        stream: *mut c_void,
    ) -> c_int;
    fn kvm_cuda_merge(
        layers: *const DevLayer,
        n_layers: u32,
        set_off: *const u32,
        n_sets: u32,
        mcells: *const u32,
        pivot: *const u32,
        n_members: u32,
        max_heads: u32,
        weights: *const f32, // (d) as d2
        merge_keys: c_int,
        merge_values: c_int,
        paper: c_int,
        stream: *mut c_void,
    ) -> c_int;
    fn kvm_cuda_cam(
        layers: *const DevLayer,
        n_layers: u32,
        target: *const u32, // (d) [n_folds] cell ids
        n_folds: u32,
        src_off: *const u32,   // (d) [n_folds+1]
        src_cells: *const u32, // (d) [src_off[n_folds]] cell ids
        src_w: *const f32,     // (d) [src_off[n_folds]]
        stream: *mut c_void,
    ) -> c_int;
}

fn error_string(e: c_int) -> String {
    // SAFETY: cudaGetErrorString returns a static NUL-terminated string for any code.
    let p = unsafe { kvm_cuda_error_string(e) };
    if p.is_null() {
        return format!("CUDA error {e}");
    }
    // SAFETY: non-NULL and static, as above.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn ck(e: c_int, what: &str) -> Result<()> {
    if e == 0 {
        Ok(())
    } else {
        Err(Error::Device(format!("{what}: {} ({e})", error_string(e))))
    }
}

fn u32_of(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::InvalidArg(format!("{what} = {n} does not fit 32 bits")))
}

/// Device memory a context keeps on one device.
struct Arena {
    dev: i32,
    ptr: usize,
    cap: usize,
}

impl Arena {
    /// At least `n` bytes; the old contents are not kept.
    fn reserve(&mut self, n: usize) -> Result<*mut u8> {
        if self.cap < n {
            if self.ptr != 0 {
                // SAFETY: ptr came from kvm_cuda_malloc on this device and no work uses it
                // (every call synchronizes its stream before returning).
                let _ = unsafe { kvm_cuda_free(self.ptr as *mut c_void) };
                self.ptr = 0;
                self.cap = 0;
            }
            let cap = n.checked_next_power_of_two().unwrap_or(n).max(1 << 20);
            let mut p: *mut c_void = std::ptr::null_mut();
            // SAFETY: p is a valid out-pointer.
            ck(unsafe { kvm_cuda_malloc(&mut p, cap) }, "cudaMalloc")?;
            self.ptr = p as usize;
            self.cap = cap;
        }
        Ok(self.ptr as *mut u8)
    }
}

/// Device buffers a context keeps between events, one arena per device; calls on one context
/// take turns on them.
#[derive(Default)]
pub struct Device {
    arenas: Mutex<Vec<Arena>>,
}

impl Drop for Device {
    fn drop(&mut self) {
        let arenas = self
            .arenas
            .get_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        for a in arenas.iter().filter(|a| a.ptr != 0) {
            if let Ok(_on) = OnDevice::enter(a.dev) {
                // SAFETY: from kvm_cuda_malloc on that device; nothing runs on it any more.
                // An error (e.g. at process exit, the runtime already gone) leaves nothing to do.
                let _ = unsafe { kvm_cuda_free(a.ptr as *mut c_void) };
            }
        }
    }
}

/// Makes `dev` the calling thread's device for the guard's life, then restores the host's.
struct OnDevice {
    prev: i32,
    changed: bool,
}

impl OnDevice {
    fn enter(dev: i32) -> Result<OnDevice> {
        let mut prev: c_int = 0;
        // SAFETY: valid out-pointer.
        ck(unsafe { kvm_cuda_get_device(&mut prev) }, "cudaGetDevice")?;
        if prev != dev {
            // SAFETY: plain runtime call.
            ck(unsafe { kvm_cuda_set_device(dev) }, "cudaSetDevice")?;
        }
        Ok(OnDevice {
            prev,
            changed: prev != dev,
        })
    }
}

impl Drop for OnDevice {
    fn drop(&mut self) {
        if self.changed {
            // SAFETY: plain runtime call; the host's device was valid when we entered.
            let _ = unsafe { kvm_cuda_set_device(self.prev) };
        }
    }
}

fn pointer_device(p: *const c_void) -> Result<i32> {
    let mut d: c_int = -1;
    ck(
        // SAFETY: the query only inspects the address.
        unsafe { kvm_cuda_pointer_device(p, &mut d) },
        "cudaPointerGetAttributes",
    )?;
    Ok(d)
}

/// The one device every layer's K and V (and the queries, when given) live on. A host pointer
/// here would make a kernel fault, so it is refused before anything runs.
fn device_of(raw: &[RawLayer], geoms: &[LayerGeom], queries: &[DevQueries]) -> Result<i32> {
    // Without a driver or device every pointer would read as host memory; say what is wrong.
    let mut cur: c_int = 0;
    ck(
        // SAFETY: valid out-pointer.
        unsafe { kvm_cuda_get_device(&mut cur) },
        "no usable CUDA device",
    )?;
    let mut found: Option<(i32, String)> = None;
    let mut see = |p: *const c_void, what: String| -> Result<()> {
        let d = pointer_device(p)?;
        if d < 0 {
            return Err(Error::InvalidArg(format!(
                "{what} is not CUDA device memory (host buffers go to kvm_plan_init/apply)"
            )));
        }
        match &found {
            Some((d0, w0)) if *d0 != d => Err(Error::InvalidArg(format!(
                "{w0} is on device {d0} but {what} on device {d}: the device path needs one device"
            ))),
            Some(_) => Ok(()),
            None => {
                found = Some((d, what));
                Ok(())
            }
        }
    };
    for (il, (r, g)) in raw.iter().zip(geoms).enumerate() {
        if g.k.span > 0 {
            see(r.k.data as *const c_void, format!("layer {il} K"))?;
        }
        if g.v.span > 0 {
            see(r.v.data as *const c_void, format!("layer {il} V"))?;
        }
    }
    for (il, q) in queries.iter().enumerate() {
        see(q.q as *const c_void, format!("layer {il} q"))?;
    }
    Ok(found.map_or(cur, |(d, _)| d))
}

fn dev_layers(raw: &[RawLayer], geoms: &[LayerGeom], queries: &[DevQueries]) -> Vec<DevLayer> {
    let mut unit0 = 0u32;
    raw.iter()
        .zip(geoms)
        .enumerate()
        .map(|(il, (r, g))| {
            let q = queries.get(il);
            let l = DevLayer {
                k: r.k.data,
                v: r.v.data,
                q: q.map_or(std::ptr::null(), |q| q.q),
                k_nb1: g.k.nb1 as u64,
                v_nb0: g.v.nb0 as u64,
                v_nb1: g.v.nb1 as u64,
                k_type: g.k.ty.id(),
                v_type: g.v.ty.id(),
                n_head: g.n_head as u32,
                dk: g.dk as u32,
                dv: g.dv as u32,
                v_trans: g.v_trans as u32,
                n_head_q: q.map_or(0, |q| q.n_head as u32),
                unit0,
                kq_scale: q.map_or(0.0, |q| q.kq_scale),
                pad: 0,
            };
            unit0 += g.n_head as u32;
            l
        })
        .collect()
}

/// Types whose every byte is initialized data (no padding), so they can be copied as bytes.
///
/// # Safety
/// Implement only for such types.
unsafe trait Plain: Copy + Default {}
// SAFETY: primitive numbers.
unsafe impl Plain for u32 {}
// SAFETY: primitive numbers.
unsafe impl Plain for i32 {}
// SAFETY: primitive numbers.
unsafe impl Plain for f32 {}
// SAFETY: primitive numbers.
unsafe impl Plain for f64 {}
// SAFETY: repr(C), every field 4 or 8 bytes in an order that leaves no gap (size asserted).
unsafe impl Plain for DevLayer {}

impl Default for DevLayer {
    fn default() -> Self {
        DevLayer {
            k: std::ptr::null_mut(),
            v: std::ptr::null_mut(),
            q: std::ptr::null(),
            k_nb1: 0,
            v_nb0: 0,
            v_nb1: 0,
            k_type: 0,
            v_type: 0,
            n_head: 0,
            dk: 0,
            dv: 0,
            v_trans: 0,
            n_head_q: 0,
            unit0: 0,
            kq_scale: 0.0,
            pad: 0,
        }
    }
}

const STAGE_ALIGN: usize = 256;

/// One call's device layout: inputs packed on the host, outputs only reserved.
#[derive(Default)]
struct Stage {
    host: Vec<u8>,
    end: usize,
}

/// An offset into the arena holding `T`s.
#[derive(Clone, Copy)]
struct Slot<T> {
    off: usize,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl Stage {
    fn next(&self) -> usize {
        self.end.div_ceil(STAGE_ALIGN) * STAGE_ALIGN
    }

    /// Inputs first: they are uploaded in one copy.
    fn put<T: Plain>(&mut self, v: &[T]) -> Slot<T> {
        debug_assert_eq!(self.end, self.host.len(), "inputs go before outputs");
        let off = self.next();
        // SAFETY: Plain types are initialized bytes without padding.
        let bytes = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), size_of_val(v)) };
        self.host.resize(off, 0);
        self.host.extend_from_slice(bytes);
        self.end = self.host.len();
        Slot {
            off,
            len: v.len(),
            _t: std::marker::PhantomData,
        }
    }

    fn out<T: Plain>(&mut self, len: usize) -> Result<Slot<T>> {
        let off = self.next();
        self.end = len
            .checked_mul(std::mem::size_of::<T>())
            .and_then(|b| b.checked_add(off))
            .ok_or_else(|| Error::InvalidArg("device scratch size overflows".into()))?;
        Ok(Slot {
            off,
            len,
            _t: std::marker::PhantomData,
        })
    }
}

/// A staged call on one arena and stream.
struct Run {
    base: *mut u8,
    stream: *mut c_void,
}

impl Run {
    fn start(arena: &mut Arena, stage: &Stage, stream: Stream) -> Result<Run> {
        let base = arena.reserve(stage.end.max(1))?;
        if !stage.host.is_empty() {
            ck(
                // SAFETY: the arena holds at least stage.end ≥ host.len() bytes; the host buffer
                // is read before cudaMemcpyAsync returns (pageable source).
                unsafe {
                    kvm_cuda_h2d(
                        base.cast(),
                        stage.host.as_ptr().cast(),
                        stage.host.len(),
                        stream.0,
                    )
                },
                "upload",
            )?;
        }
        Ok(Run {
            base,
            stream: stream.0,
        })
    }

    fn ptr<T>(&self, s: Slot<T>) -> *mut T {
        // in bounds: the arena holds the whole stage
        self.base.wrapping_add(s.off).cast()
    }

    fn opt<T>(&self, s: Option<Slot<T>>) -> *mut T {
        s.map_or(std::ptr::null_mut(), |s| self.ptr(s))
    }

    fn put_at<T: Plain>(&self, s: Slot<T>, v: &[T]) -> Result<()> {
        debug_assert!(v.len() <= s.len);
        ck(
            // SAFETY: the slot lies inside the arena and holds s.len ≥ v.len() elements.
            unsafe {
                kvm_cuda_h2d(
                    self.ptr(s).cast(),
                    v.as_ptr().cast(),
                    size_of_val(v),
                    self.stream,
                )
            },
            "upload",
        )
    }

    /// The slot's contents, after everything queued before has run.
    fn get<T: Plain>(&self, s: Slot<T>) -> Result<Vec<T>> {
        let mut v = vec![T::default(); s.len];
        if s.len > 0 {
            ck(
                // SAFETY: the slot lies inside the arena; v holds s.len elements.
                unsafe {
                    kvm_cuda_d2h(
                        v.as_mut_ptr().cast(),
                        self.ptr(s).cast(),
                        size_of_val(&v[..]),
                        self.stream,
                    )
                },
                "download",
            )?;
        }
        self.sync()?;
        Ok(v)
    }

    fn sync(&self) -> Result<()> {
        // SAFETY: the host's stream (or NULL, the default stream).
        ck(unsafe { kvm_cuda_sync(self.stream) }, "a kernel failed")
    }
}

fn lock(dev: &Device, d: i32) -> Result<std::sync::MutexGuard<'_, Vec<Arena>>> {
    let mut g = dev
        .arenas
        .lock()
        .map_err(|_| Error::Device("the device arena was poisoned by an earlier panic".into()))?;
    if !g.iter().any(|a| a.dev == d) {
        g.push(Arena {
            dev: d,
            ptr: 0,
            cap: 0,
        });
    }
    Ok(g)
}

fn arena(g: &mut [Arena], d: i32) -> &mut Arena {
    g.iter_mut().find(|a| a.dev == d).expect("lock() added it")
}

/// Adds to `attn[i]` what `kvm_attn_from_queries_layers` adds, with keys and queries on the
/// device. `q_sel`: the ring rows to use (`n_q` of them), or rows `0..n_q`.
#[allow(clippy::too_many_arguments)]
pub fn attn_from_queries(
    dev: &Device,
    raw: &[RawLayer],
    geoms: &[LayerGeom],
    queries: &[DevQueries],
    q_sel: Option<&[u32]>,
    n_q: usize,
    cells: &[u32],
    bias: Option<&[f32]>,
    attn: &mut [f32],
    stream: Stream,
) -> Result<()> {
    if queries.len() != geoms.len() {
        return Err(Error::InvalidArg(format!(
            "{} layers but {} query sets",
            geoms.len(),
            queries.len()
        )));
    }
    for (il, (g, q)) in geoms.iter().zip(queries).enumerate() {
        check_heads(il, g.n_head, q.n_head, q.kq_scale)?;
    }
    let n = cells.len();
    if attn.len() != n || bias.is_some_and(|b| b.len() != n) {
        return Err(Error::InvalidArg(
            "attn/bias must have one entry per cell".into(),
        ));
    }
    check_bias(bias)?;
    if q_sel.is_some_and(|s| s.len() != n_q) {
        return Err(Error::InvalidArg("q_sel must have n_q entries".into()));
    }
    if n == 0 || n_q == 0 {
        return Ok(());
    }
    let (n32, nq32) = (u32_of(n, "n_cells")?, u32_of(n_q, "n_q")?);
    let d = device_of(raw, geoms, queries)?;
    let _on = OnDevice::enter(d)?;
    let layers = dev_layers(raw, geoms, queries);
    let units: usize = geoms.iter().map(|g| g.n_head).sum();
    let max_heads = geoms.iter().map(|g| g.n_head).max().unwrap_or(0);
    let max_dk = geoms.iter().map(|g| g.dk).max().unwrap_or(0);
    let mut st = Stage::default();
    let s_layers = st.put(&layers);
    let s_cells = st.put(cells);
    let s_sel = q_sel.map(|s| st.put(s));
    let s_bias = bias.map(|b| st.put(b));
    let s_err = st.put(&[0i32]);
    let scratch = units
        .checked_mul(n)
        .ok_or_else(|| Error::InvalidArg("units × cells overflows".into()))?;
    let s_logits = st.out::<f64>(scratch)?;
    let s_partial = st.out::<f32>(scratch)?;
    let s_out = st.out::<f32>(n)?;
    let mut g = lock(dev, d)?;
    let run = Run::start(arena(&mut g, d), &st, stream)?;
    ck(
        // SAFETY: every pointer is a slot of this run's arena sized as the kernel reads it, or a
        // validated device view of the cache; the stream is the host's.
        unsafe {
            kvm_cuda_attn(
                run.ptr(s_layers),
                layers.len() as u32,
                max_heads as u32,
                max_dk as u32,
                run.ptr(s_cells),
                n32,
                run.opt(s_sel),
                nq32,
                run.opt(s_bias),
                units as u32,
                run.ptr(s_logits),
                run.ptr(s_partial),
                run.ptr(s_out),
                run.ptr(s_err),
                run.stream,
            )
        },
        "attention kernel launch",
    )?;
    let out = run.get(s_out)?;
    let err = run.get(s_err)?[0];
    if err & 2 != 0 {
        return Err(Error::InvalidArg("a query row is not finite".into()));
    }
    if err & 1 != 0 {
        return Err(Error::InvalidArg(
            "a key of the window is not finite".into(),
        ));
    }
    for (a, x) in attn.iter_mut().zip(&out) {
        *a += x;
    }
    Ok(())
}

/// Key statistics from a device cache.
struct DevKeys<'a> {
    arena: RefCell<&'a mut Arena>,
    layers: Vec<DevLayer>,
    max_dk: u32,
    stream: Stream,
}

impl DevKeys<'_> {
    fn split(&self, flat: Vec<f32>, per: usize) -> Vec<Vec<f32>> {
        if per == 0 {
            return vec![Vec::new(); self.layers.len()];
        }
        flat.chunks_exact(per).map(<[f32]>::to_vec).collect()
    }
}

impl DevKeys<'_> {
    /// Stages the layer table, `cells` and what `put` adds, runs `kernel` on them with an
    /// output of `out_len` floats, and returns that output.
    fn stats<X>(
        &self,
        cells: &[u32],
        out_len: usize,
        what: &str,
        put: impl FnOnce(&mut Stage) -> X,
        kernel: impl FnOnce(&Run, *const DevLayer, *const u32, X, *mut f32) -> c_int,
    ) -> Result<Vec<f32>> {
        let mut st = Stage::default();
        let s_layers = st.put(&self.layers);
        let s_cells = st.put(cells);
        let x = put(&mut st);
        let s_out = st.out::<f32>(out_len)?;
        let mut a = self.arena.borrow_mut();
        let run = Run::start(&mut a, &st, self.stream)?;
        let rc = kernel(&run, run.ptr(s_layers), run.ptr(s_cells), x, run.ptr(s_out));
        ck(rc, what)?;
        run.get(s_out)
    }
}

impl KeyStats for DevKeys<'_> {
    fn adjacent(&self, cells: &[u32]) -> Result<Vec<Vec<f32>>> {
        let n = cells.len();
        if n < 2 {
            return Ok(vec![Vec::new(); self.layers.len()]);
        }
        let n32 = u32_of(n, "n_cells")?;
        let n_layers = self.layers.len() as u32;
        let flat = self.stats(
            cells,
            self.layers.len() * (n - 1),
            "link score kernel launch",
            |_| (),
            |run, l, c, (), out| {
                // SAFETY: slots of this run sized for the kernel; validated device views.
                unsafe { kvm_cuda_adjacent(l, n_layers, c, n32, out, run.stream) }
            },
        )?;
        Ok(self.split(flat, n - 1))
    }

    fn pair_cos(&self, cells: &[u32], pairs: &[(usize, usize)]) -> Result<Vec<Vec<f32>>> {
        if pairs.is_empty() {
            return Ok(vec![Vec::new(); self.layers.len()]);
        }
        let np = u32_of(pairs.len(), "pairs")?;
        let n_layers = self.layers.len() as u32;
        let flat: Vec<u32> = pairs
            .iter()
            .flat_map(|&(a, b)| [a as u32, b as u32])
            .collect();
        let out = self.stats(
            cells,
            self.layers.len() * pairs.len(),
            "pair similarity kernel launch",
            |st| st.put(&flat),
            |run, l, c, s_pairs, out| {
                // SAFETY: as in `adjacent`; pair indices are window indices below cells.len().
                unsafe { kvm_cuda_pair_cos(l, n_layers, c, run.ptr(s_pairs), np, out, run.stream) }
            },
        )?;
        Ok(self.split(out, pairs.len()))
    }

    fn mean_dist(
        &self,
        cells: &[u32],
        sets: &[Vec<usize>],
        counts: &[u32],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let n_members: usize = sets.iter().map(Vec::len).sum();
        if n_members == 0 {
            return Ok(vec![
                sets.iter().map(|_| Vec::new()).collect();
                self.layers.len()
            ]);
        }
        let mut set_off = Vec::with_capacity(sets.len() + 1);
        let mut members = Vec::with_capacity(n_members);
        set_off.push(0u32);
        for s in sets {
            members.extend(s.iter().map(|&i| i as u32));
            set_off.push(members.len() as u32);
        }
        let (n_layers, n_sets, max_dk) = (
            self.layers.len() as u32,
            u32_of(sets.len(), "sets")?,
            self.max_dk,
        );
        let flat = self.stats(
            cells,
            self.layers.len() * n_members,
            "mean key distance kernel launch",
            |st| (st.put(counts), st.put(&set_off), st.put(&members)),
            |run, l, c, (s_counts, s_off, s_mem), out| {
                // SAFETY: as in `adjacent`; members are window indices, counts one per window
                // cell.
                unsafe {
                    kvm_cuda_mean_dist(
                        l,
                        n_layers,
                        max_dk,
                        c,
                        run.ptr(s_counts),
                        run.ptr(s_off),
                        n_sets,
                        run.ptr(s_mem),
                        n_members as u32,
                        out,
                        run.stream,
                    )
                }
            },
        )?;
        Ok(flat
            .chunks_exact(n_members)
            .map(|layer| {
                set_off
                    .windows(2)
                    .map(|w| layer[w[0] as usize..w[1] as usize].to_vec())
                    .collect()
            })
            .collect())
    }
}

/// `merge::plan::plan` with the key statistics computed on the device.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    dev: &Device,
    params: &Params,
    calib: Option<&Calib>,
    raw: &[RawLayer],
    geoms: &[LayerGeom],
    cells: &[u32],
    attn: Option<&[f32]>,
    counts: Option<&[u32]>,
    n_free: usize,
    stream: Stream,
) -> Result<Plan> {
    let d = device_of(raw, geoms, &[])?;
    let _on = OnDevice::enter(d)?;
    let mut g = lock(dev, d)?;
    let stats = DevKeys {
        arena: RefCell::new(arena(&mut g, d)),
        layers: dev_layers(raw, geoms, &[]),
        max_dk: geoms.iter().map(|g| g.dk).max().unwrap_or(0) as u32,
        stream,
    };
    let event = Event {
        cells,
        attn,
        counts,
        n_free,
    };
    plan_with(params, calib, geoms, &stats, event)
}

/// `merge::apply::apply` on a device cache: the same bytes change, computed by the kernels.
pub fn apply(
    dev: &Device,
    plan: &Plan,
    raw: &[RawLayer],
    geoms: &[LayerGeom],
    stream: Stream,
) -> Result<()> {
    check_layers(plan, geoms)?;
    let members = plan.members();
    let merged = merged_sets(&members);
    let p = &plan.params;
    let cam = p.method == Method::Cam && !plan.cam.is_empty();
    if merged.is_empty() && !cam {
        return Ok(());
    }
    let d = device_of(raw, geoms, &[])?;
    let _on = OnDevice::enter(d)?;
    let layers = dev_layers(raw, geoms, &[]);
    let max_heads = geoms.iter().map(|g| g.n_head).max().unwrap_or(0);
    let mut set_off = vec![0u32];
    let (mut mcells, mut pivot) = (Vec::new(), Vec::new());
    for &(sid, mem) in &merged {
        pivot.push(pivot_index(plan, sid, mem) as u32);
        mcells.extend(mem.iter().map(|&i| plan.cells[i]));
        set_off.push(mcells.len() as u32);
    }
    let n_members = mcells.len();
    let (mut target, mut src_off, mut src_cells, mut src_w) = (vec![], vec![0u32], vec![], vec![]);
    if cam {
        for f in &plan.cam {
            target.push(plan.cells[f.target]);
            for &(e, w) in &f.sources {
                src_cells.push(plan.cells[e]);
                src_w.push(w);
            }
            src_off.push(src_cells.len() as u32);
        }
    }
    let mut st = Stage::default();
    let s_layers = st.put(&layers);
    let s_off = st.put(&set_off);
    let s_cells = st.put(&mcells);
    let s_piv = st.put(&pivot);
    let s_target = st.put(&target);
    let s_src_off = st.put(&src_off);
    let s_src_cells = st.put(&src_cells);
    let s_src_w = st.put(&src_w);
    let slab = n_members * max_heads;
    let s_d2 = st.out::<f32>(layers.len() * slab)?;
    let s_w = st.out::<f32>(layers.len() * slab)?;
    let mut g = lock(dev, d)?;
    let run = Run::start(arena(&mut g, d), &st, stream)?;
    let n_layers = layers.len() as u32;
    if !merged.is_empty() {
        let n_sets = merged.len() as u32;
        ck(
            // SAFETY: slots of this run sized for the kernel; validated device views.
            unsafe {
                kvm_cuda_member_d2(
                    run.ptr(s_layers),
                    n_layers,
                    run.ptr(s_off),
                    n_sets,
                    run.ptr(s_cells),
                    run.ptr(s_piv),
                    n_members as u32,
                    max_heads as u32,
                    run.ptr(s_d2),
                    run.stream,
                )
            },
            "member distance kernel launch",
        )?;
        let d2 = run.get(s_d2)?;
        let w = weights_from(plan, &merged, geoms, &set_off, max_heads, &d2);
        run.put_at(s_w, &w)?;
        ck(
            // SAFETY: as above; the weights slot now holds the host's weights.
            unsafe {
                kvm_cuda_merge(
                    run.ptr(s_layers),
                    n_layers,
                    run.ptr(s_off),
                    n_sets,
                    run.ptr(s_cells),
                    run.ptr(s_piv),
                    n_members as u32,
                    max_heads as u32,
                    run.ptr(s_w),
                    p.merge_keys as c_int,
                    p.merge_values as c_int,
                    (p.value_mode == ValueMode::Paper) as c_int,
                    run.stream,
                )
            },
            "merge kernel launch",
        )?;
    }
    if cam {
        ck(
            // SAFETY: slots of this run; sources are evicted cells, targets kept ones, so no fold
            // reads a row another writes.
            unsafe {
                kvm_cuda_cam(
                    run.ptr(s_layers),
                    n_layers,
                    run.ptr(s_target),
                    target.len() as u32,
                    run.ptr(s_src_off),
                    run.ptr(s_src_cells),
                    run.ptr(s_src_w),
                    run.stream,
                )
            },
            "CaM kernel launch",
        )?;
    }
    run.sync()
}

/// The CPU's weights (`set_weights`, σ per head for `Sigma::Layer`) from the kernel's
/// distances, in the kernels' layout.
fn weights_from(
    plan: &Plan,
    merged: &[(usize, &Vec<usize>)],
    geoms: &[LayerGeom],
    set_off: &[u32],
    max_heads: usize,
    d2: &[f32],
) -> Vec<f32> {
    let n_members = *set_off.last().unwrap_or(&0) as usize;
    let slab = n_members * max_heads;
    let max_m = merged.iter().map(|(_, m)| m.len()).max().unwrap_or(0);
    let mut w = vec![0f32; d2.len()];
    let (mut cnt, mut att) = (vec![0f32; max_m], vec![0f32; max_m]);
    for (il, g) in geoms.iter().enumerate() {
        let layer = &d2[il * slab..(il + 1) * slab];
        let at = |k: usize, m: usize| {
            let a = set_off[k] as usize * max_heads;
            a..a + g.n_head * m
        };
        let sigma_h = match plan.params.sigma {
            Sigma::Layer(r) => {
                let mut acc = SigmaAcc::new(g.n_head);
                for (k, &(sid, mem)) in merged.iter().enumerate() {
                    let jp = pivot_index(plan, sid, mem);
                    acc.add(&layer[at(k, mem.len())], mem.len(), jp);
                }
                Some(acc.sigmas(r))
            }
            _ => None,
        };
        let wl = &mut w[il * slab..(il + 1) * slab];
        for (k, &(sid, mem)) in merged.iter().enumerate() {
            let jp = pivot_index(plan, sid, mem);
            let r = at(k, mem.len());
            set_weights(
                plan,
                sigma_h.as_deref(),
                mem,
                jp,
                g.n_head,
                &layer[r.clone()],
                &mut cnt,
                &mut att,
                &mut wl[r],
            );
        }
    }
    w
}

/// Device memory for tests and benchmarks (a cache to merge, a copy to compare with).
pub struct DevBuf {
    ptr: usize,
    len: usize,
}

impl DevBuf {
    /// `len` bytes on the calling thread's current device.
    pub fn new(len: usize) -> Result<DevBuf> {
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        ck(unsafe { kvm_cuda_malloc(&mut p, len.max(1)) }, "cudaMalloc")?;
        Ok(DevBuf {
            ptr: p as usize,
            len,
        })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr as *mut u8
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn upload(&mut self, src: &[u8]) -> Result<()> {
        let n = src.len().min(self.len);
        ck(
            // SAFETY: n bytes fit both buffers.
            unsafe {
                kvm_cuda_h2d(
                    self.ptr().cast(),
                    src.as_ptr().cast(),
                    n,
                    std::ptr::null_mut(),
                )
            },
            "upload",
        )?;
        sync(Stream(std::ptr::null_mut()))
    }

    pub fn download(&self) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.len];
        ck(
            // SAFETY: len bytes fit both buffers.
            unsafe {
                kvm_cuda_d2h(
                    v.as_mut_ptr().cast(),
                    self.ptr().cast(),
                    self.len,
                    std::ptr::null_mut(),
                )
            },
            "download",
        )?;
        sync(Stream(std::ptr::null_mut()))?;
        Ok(v)
    }

    /// Queues a device-to-device copy of `src` (the bandwidth reference of the benchmark).
    pub fn copy_from(&mut self, src: &DevBuf, stream: Stream) -> Result<()> {
        let n = src.len.min(self.len);
        ck(
            // SAFETY: n bytes fit both device buffers.
            unsafe { kvm_cuda_d2d(self.ptr().cast(), src.ptr().cast(), n, stream.0) },
            "copy",
        )
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // SAFETY: from kvm_cuda_malloc; callers synchronize before dropping.
        let _ = unsafe { kvm_cuda_free(self.ptr as *mut c_void) };
    }
}

/// Waits for `stream`.
pub fn sync(stream: Stream) -> Result<()> {
    // SAFETY: the caller's stream or NULL.
    ck(unsafe { kvm_cuda_sync(stream.0) }, "synchronize")
}

/// Whether a CUDA device can be used from this process.
pub fn available() -> bool {
    let mut d: c_int = -1;
    // SAFETY: valid out-pointer.
    unsafe { kvm_cuda_get_device(&mut d) == 0 }
}
