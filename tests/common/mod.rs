//! Shared test fixtures: a synthetic KV cache in owned, aligned buffers of any supported
//! type and V layout, exposed as `kvm_layer_view`s, and a small deterministic RNG.
#![allow(dead_code)]

use kvmerger::codec::{decode, encode, GgmlType};
use kvmerger::ffi::{kvm_layer_view, kvm_tensor_view};
use kvmerger::simd::Kernels;

/// splitmix64: deterministic, dependency-free.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Roughly normal (sum of uniforms).
    pub fn normal(&mut self) -> f32 {
        (0..4).map(|_| self.f32()).sum::<f32>() - 2.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Bytes with 8-byte alignment.
pub struct Buf(Vec<u64>, usize);

impl Buf {
    pub fn new(bytes: usize) -> Buf {
        Buf(vec![0u64; bytes.div_ceil(8).max(1)], bytes)
    }
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: u64 storage viewed as its bytes; length within the allocation.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const u8, self.1) }
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut u8, self.1) }
    }
    pub fn ptr(&mut self) -> *mut std::ffi::c_void {
        self.0.as_mut_ptr() as *mut std::ffi::c_void
    }
}

pub struct Layer {
    pub k: Buf,
    pub v: Buf,
    pub tk: GgmlType,
    pub tv: GgmlType,
    pub v_trans: bool,
    pub n_head: usize,
    pub dk: usize,
    pub dv: usize,
    pub n_cells: usize,
    /// Extra elements at the end of each row (padding, as ggml allows through nb[1]).
    pub pad: usize,
}

pub struct Cache {
    pub layers: Vec<Layer>,
    pub n_cells: usize,
}

pub struct Shape {
    pub n_layers: usize,
    pub n_head: usize,
    pub dk: usize,
    pub dv: usize,
    pub n_cells: usize,
    pub tk: GgmlType,
    pub tv: GgmlType,
    pub v_trans: bool,
}

impl Shape {
    pub fn small(tk: GgmlType, tv: GgmlType, v_trans: bool) -> Shape {
        Shape {
            n_layers: 3,
            n_head: 2,
            dk: 32,
            dv: 32,
            n_cells: 64,
            tk,
            tv,
            v_trans,
        }
    }
}

impl Layer {
    fn k_row_bytes(&self) -> usize {
        self.tk.row_size(self.n_head * self.dk + self.pad)
    }
    fn v_row_bytes(&self) -> usize {
        self.tv.row_size(self.n_head * self.dv + self.pad)
    }
    pub fn view(&mut self) -> kvm_layer_view {
        let (nk, nv) = (
            self.n_head * self.dk + self.pad,
            self.n_head * self.dv + self.pad,
        );
        let k = kvm_tensor_view {
            data: self.k.ptr(),
            r#type: self.tk.id(),
            ne: [nk as i64, self.n_cells as i64, 1, 1],
            nb: [
                self.tk.type_size(),
                self.k_row_bytes(),
                self.k_row_bytes() * self.n_cells,
                self.k_row_bytes() * self.n_cells,
            ],
        };
        let v = if self.v_trans {
            let ts = self.tv.type_size();
            kvm_tensor_view {
                data: self.v.ptr(),
                r#type: self.tv.id(),
                ne: [self.n_cells as i64, nv as i64, 1, 1],
                nb: [
                    ts,
                    ts * self.n_cells,
                    ts * self.n_cells * nv,
                    ts * self.n_cells * nv,
                ],
            }
        } else {
            kvm_tensor_view {
                data: self.v.ptr(),
                r#type: self.tv.id(),
                ne: [nv as i64, self.n_cells as i64, 1, 1],
                nb: [
                    self.tv.type_size(),
                    self.v_row_bytes(),
                    self.v_row_bytes() * self.n_cells,
                    self.v_row_bytes() * self.n_cells,
                ],
            }
        };
        kvm_layer_view {
            k,
            v,
            n_head_kv: self.n_head as u32,
            n_embd_head_k: self.dk as u32,
            n_embd_head_v: self.dv as u32,
            v_trans: self.v_trans,
        }
    }

    pub fn get_k(&self, cell: usize, h: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.dk];
        let off = cell * self.k_row_bytes() + self.tk.row_size(h * self.dk);
        decode(
            Kernels::scalar(),
            self.tk,
            &self.k.bytes()[off..off + self.tk.row_size(self.dk)],
            &mut out,
        );
        out
    }

    pub fn set_k(&mut self, cell: usize, h: usize, x: &[f32]) {
        let off = cell * self.k_row_bytes() + self.tk.row_size(h * self.dk);
        let n = self.tk.row_size(self.dk);
        encode(
            Kernels::scalar(),
            self.tk,
            x,
            &mut self.k.bytes_mut()[off..off + n],
        );
    }

    pub fn get_v(&self, cell: usize, h: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.dv];
        if self.v_trans {
            let ts = self.tv.type_size();
            for (j, o) in out.iter_mut().enumerate() {
                let off = ((h * self.dv + j) * self.n_cells + cell) * ts;
                decode(
                    Kernels::scalar(),
                    self.tv,
                    &self.v.bytes()[off..off + ts],
                    std::slice::from_mut(o),
                );
            }
        } else {
            let off = cell * self.v_row_bytes() + self.tv.row_size(h * self.dv);
            decode(
                Kernels::scalar(),
                self.tv,
                &self.v.bytes()[off..off + self.tv.row_size(self.dv)],
                &mut out,
            );
        }
        out
    }

    pub fn set_v(&mut self, cell: usize, h: usize, x: &[f32]) {
        if self.v_trans {
            let ts = self.tv.type_size();
            for (j, s) in x.iter().enumerate() {
                let off = ((h * self.dv + j) * self.n_cells + cell) * ts;
                encode(
                    Kernels::scalar(),
                    self.tv,
                    std::slice::from_ref(s),
                    &mut self.v.bytes_mut()[off..off + ts],
                );
            }
        } else {
            let off = cell * self.v_row_bytes() + self.tv.row_size(h * self.dv);
            let n = self.tv.row_size(self.dv);
            encode(
                Kernels::scalar(),
                self.tv,
                x,
                &mut self.v.bytes_mut()[off..off + n],
            );
        }
    }

    /// Byte ranges of K and V that belong to (cell, head), for bit-identity checks.
    pub fn k_head_range(&self, cell: usize, h: usize) -> std::ops::Range<usize> {
        let off = cell * self.k_row_bytes() + self.tk.row_size(h * self.dk);
        off..off + self.tk.row_size(self.dk)
    }

    pub fn v_head_bytes(&self, cell: usize, h: usize) -> Vec<usize> {
        if self.v_trans {
            let ts = self.tv.type_size();
            (0..self.dv)
                .flat_map(|j| {
                    let off = ((h * self.dv + j) * self.n_cells + cell) * ts;
                    off..off + ts
                })
                .collect()
        } else {
            let off = cell * self.v_row_bytes() + self.tv.row_size(h * self.dv);
            (off..off + self.tv.row_size(self.dv)).collect()
        }
    }
}

impl Cache {
    /// Keys that drift slowly along the sequence with topic jumps, so adjacent keys are
    /// similar in runs; values independent noise.
    pub fn new(s: &Shape, seed: u64) -> Cache {
        Cache::with_pad(s, seed, 0)
    }

    pub fn with_pad(s: &Shape, seed: u64, pad: usize) -> Cache {
        let mut rng = Rng(seed);
        let mut layers = Vec::new();
        for _ in 0..s.n_layers {
            let pad = if s.tk.is_quantized() || s.tv.is_quantized() {
                pad.div_ceil(32) * 32
            } else {
                pad
            };
            let nk = s.n_head * s.dk + pad;
            let nv = s.n_head * s.dv + pad;
            let mut l = Layer {
                k: Buf::new(s.tk.row_size(nk) * s.n_cells),
                v: Buf::new(s.tv.row_size(nv) * s.n_cells),
                tk: s.tk,
                tv: s.tv,
                v_trans: s.v_trans,
                n_head: s.n_head,
                dk: s.dk,
                dv: s.dv,
                n_cells: s.n_cells,
                pad,
            };
            // Fill padding with a marker so untouched-byte checks see it.
            l.k.bytes_mut().iter_mut().for_each(|b| *b = 0x5a);
            l.v.bytes_mut().iter_mut().for_each(|b| *b = 0x5a);
            for h in 0..s.n_head {
                let mut base: Vec<f32> = (0..s.dk).map(|_| rng.normal()).collect();
                for c in 0..s.n_cells {
                    if rng.f32() < 0.15 {
                        base = (0..s.dk).map(|_| rng.normal()).collect();
                    }
                    let k: Vec<f32> = base.iter().map(|b| b + 0.3 * rng.normal()).collect();
                    l.set_k(c, h, &k);
                    let v: Vec<f32> = (0..s.dv).map(|_| rng.normal()).collect();
                    l.set_v(c, h, &v);
                }
            }
            layers.push(l);
        }
        Cache {
            layers,
            n_cells: s.n_cells,
        }
    }

    pub fn views(&mut self) -> Vec<kvm_layer_view> {
        self.layers.iter_mut().map(|l| l.view()).collect()
    }

    pub fn snapshot(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.layers
            .iter()
            .map(|l| (l.k.bytes().to_vec(), l.v.bytes().to_vec()))
            .collect()
    }
}

pub const ALL_TYPES: [GgmlType; 5] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
];

use kvmerger::ffi::*;

/// A ctx for tests; freed on drop.
pub struct Ctx(pub *mut kvm_ctx);

impl Ctx {
    pub fn new(p: &kvm_params) -> Ctx {
        let mut c = std::ptr::null_mut();
        // SAFETY: valid params and out pointer.
        let st = unsafe { kvm_ctx_init(p, &mut c) };
        assert_eq!(st, kvm_status::KVM_STATUS_OK, "{}", last_error());
        Ctx(c)
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: from kvm_ctx_init, freed once.
        unsafe { kvm_ctx_free(self.0) }
    }
}

pub fn last_error() -> String {
    // SAFETY: kvm_last_error returns a valid NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(kvm_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A plan copied out of the library.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOut {
    pub n_evicted: usize,
    pub set_of: Vec<u32>,
    pub survivor: Vec<u32>,
    pub freed: Vec<u32>,
    pub counts: Vec<u32>,
}

/// A plan owned by a test; freed on drop.
pub struct Plan(pub *mut kvm_plan);

impl Plan {
    /// `kvm_plan_init`; on failure checks that no plan was written.
    pub fn init(
        ctx: &Ctx,
        views: &[kvm_layer_view],
        cells: &[u32],
        attn: Option<&[f32]>,
        counts: Option<&[u32]>,
        n_free: u32,
    ) -> Result<Plan, kvm_status> {
        let mut plan = std::ptr::null_mut();
        // SAFETY: slices valid for the call; views point into live buffers.
        let st = unsafe {
            kvm_plan_init(
                ctx.0,
                views.as_ptr(),
                views.len(),
                cells.as_ptr(),
                cells.len(),
                attn.map_or(std::ptr::null(), |a| a.as_ptr()),
                counts.map_or(std::ptr::null(), |c| c.as_ptr()),
                n_free,
                &mut plan,
            )
        };
        if st != kvm_status::KVM_STATUS_OK {
            assert!(plan.is_null(), "out written on failure");
            return Err(st);
        }
        Ok(Plan(plan))
    }

    /// `kvm_cuda_plan_init` on the default stream; on failure checks that no plan was written.
    pub fn init_cuda(
        ctx: *const kvm_ctx,
        views: &[kvm_layer_view],
        cells: &[u32],
        attn: Option<&[f32]>,
        n_free: u32,
    ) -> Result<Plan, kvm_status> {
        let mut plan = std::ptr::null_mut();
        // SAFETY: slices valid for the call; the views point into live buffers (host ones are
        // refused before use).
        let st = unsafe {
            kvm_cuda_plan_init(
                ctx,
                views.as_ptr(),
                views.len(),
                cells.as_ptr(),
                cells.len(),
                attn.map_or(std::ptr::null(), |a| a.as_ptr()),
                std::ptr::null(),
                n_free,
                std::ptr::null_mut(),
                &mut plan,
            )
        };
        if st != kvm_status::KVM_STATUS_OK {
            assert!(plan.is_null(), "out written on failure");
            return Err(st);
        }
        Ok(Plan(plan))
    }

    /// The plan's arrays, copied out through `kvm_plan_get`.
    pub fn info(&self) -> PlanOut {
        let mut info = std::mem::MaybeUninit::<kvm_plan_info>::uninit();
        // SAFETY: a live plan.
        let st = unsafe { kvm_plan_get(self.0, info.as_mut_ptr()) };
        assert_eq!(st, kvm_status::KVM_STATUS_OK);
        // SAFETY: written on OK.
        let info = unsafe { info.assume_init() };
        // SAFETY: arrays owned by the plan with the lengths the info gives.
        unsafe {
            PlanOut {
                n_evicted: info.n_evicted,
                set_of: std::slice::from_raw_parts(info.set_of, info.n_cells).to_vec(),
                survivor: std::slice::from_raw_parts(info.survivor, info.n_sets).to_vec(),
                freed: std::slice::from_raw_parts(info.freed, info.n_freed).to_vec(),
                counts: std::slice::from_raw_parts(info.counts, info.n_sets).to_vec(),
            }
        }
    }

    /// `kvm_plan_apply` over `views`.
    pub fn apply(&self, ctx: &Ctx, views: &[kvm_layer_view]) -> kvm_status {
        // SAFETY: a live plan; the views point into live buffers (or are refused before use).
        unsafe { kvm_plan_apply(ctx.0, self.0, views.as_ptr(), views.len()) }
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: from kvm_plan_init, freed once.
        unsafe { kvm_plan_free(self.0) }
    }
}

/// Plans (and optionally applies) through the C ABI.
pub fn run_plan(
    ctx: &Ctx,
    views: &[kvm_layer_view],
    cells: &[u32],
    attn: Option<&[f32]>,
    counts: Option<&[u32]>,
    n_free: u32,
    apply: bool,
) -> Result<PlanOut, kvm_status> {
    let plan = Plan::init(ctx, views, cells, attn, counts, n_free)?;
    let out = plan.info();
    if !apply {
        return Ok(out);
    }
    match plan.apply(ctx, views) {
        kvm_status::KVM_STATUS_OK => Ok(out),
        st => Err(st),
    }
}

pub fn params(method: kvm_method) -> kvm_params {
    let mut p = kvm_params_default();
    p.method = method as i32;
    p.n_threads = 2;
    p
}

pub const ALL_METHODS: [kvm_method; 6] = [
    kvm_method::KVM_METHOD_KVMERGER,
    kvm_method::KVM_METHOD_CONTEXT_SHIFT,
    kvm_method::KVM_METHOD_STREAMING_LLM,
    kvm_method::KVM_METHOD_H2O,
    kvm_method::KVM_METHOD_CAM,
    kvm_method::KVM_METHOD_EVICT_FOLD,
];
