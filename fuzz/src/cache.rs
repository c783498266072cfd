//! A small synthetic KV cache drawn from fuzz input: any supported type per tensor, row
//! padding, transposed V, contents from a seed (runs of similar keys, so merges happen, or
//! noise, or special values) plus raw byte pokes (NaN block scales, odd bit patterns).
//!
//! Each buffer has `SLACK` marker bytes past its end, so a hostile view may point a little
//! past the data without leaving the allocation, and a write there shows.

use kvmerger::ffi::{kvm_layer_view, kvm_tensor_view};
use kvmerger::codec::{decode, encode, GgmlType};
use kvmerger::simd::Kernels;

use crate::input::{In, Rng, SPECIALS};

pub const SLACK: usize = 64;
const MARK: u8 = 0x5a;

pub const TYPES: [GgmlType; 5] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
];

/// Bytes with 8-byte alignment (what ggml buffers give at least).
#[derive(Clone)]
pub struct Buf {
    words: Vec<u64>,
    /// Bytes the tensor uses; `SLACK` more follow.
    pub len: usize,
}

impl Buf {
    fn new(len: usize) -> Buf {
        let mut b = Buf {
            words: vec![0; (len + SLACK).div_ceil(8)],
            len,
        };
        b.all_mut().fill(MARK);
        b
    }

    /// The tensor's bytes and the slack.
    pub fn all(&self) -> &[u8] {
        // SAFETY: the u64 storage seen as bytes, within its allocation.
        unsafe {
            std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.words.len() * 8)
        }
    }

    pub fn all_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `all`, exclusive.
        unsafe {
            std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.words.len() * 8)
        }
    }

    pub fn ptr(&mut self) -> *mut u8 {
        self.words.as_mut_ptr() as *mut u8
    }
}

/// One tensor: its type and row geometry (`rows` rows of `cols` elements, `nb1` apart).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tensor {
    pub ty: GgmlType,
    pub cols: usize,
    pub rows: usize,
    pub nb1: usize,
}

#[derive(Clone)]
pub struct Layer {
    pub k: Buf,
    pub v: Buf,
    pub kt: Tensor,
    pub vt: Tensor,
    pub v_trans: bool,
    pub n_head: usize,
    pub dk: usize,
    pub dv: usize,
}

#[derive(Clone)]
pub struct Cache {
    pub layers: Vec<Layer>,
    pub n_cells: usize,
}

/// What a cache is drawn from; kept so a second cache of the same geometry can be made.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spec {
    pub n_layers: usize,
    pub n_cells: usize,
    pub n_head: usize,
    pub tk: [GgmlType; 3],
    pub tv: [GgmlType; 3],
    pub dk: usize,
    pub dv: usize,
    pub pad_k: usize,
    pub pad_v: usize,
    pub v_trans: bool,
}

impl Spec {
    /// Whether caches of the two specs have the same views but for their data pointers
    /// (types of layers past `n_layers` do not count).
    pub fn same_geometry(&self, o: &Spec) -> bool {
        let n = self.n_layers;
        (
            n,
            self.n_cells,
            self.n_head,
            self.dk,
            self.dv,
            self.pad_k,
            self.pad_v,
            self.v_trans,
        ) == (
            o.n_layers, o.n_cells, o.n_head, o.dk, o.dv, o.pad_k, o.pad_v, o.v_trans,
        ) && self.tk[..n] == o.tk[..n]
            && self.tv[..n] == o.tv[..n]
    }

    pub fn read(r: &mut In, max_cells: usize) -> Spec {
        let n_layers = 1 + r.below(3);
        let n_cells = r.below(max_cells + 1);
        let n_head = 1 + r.below(3);
        let v_trans = r.bool();
        let mixed = r.u8() < 32;
        let (k0, v0) = (r.below(5), r.below(5));
        let mut tk = [TYPES[k0]; 3];
        let mut tv = [TYPES[v0]; 3];
        if mixed {
            for l in 1..3 {
                tk[l] = TYPES[(k0 + l) % 5];
                tv[l] = TYPES[(v0 + 2 * l) % 5];
            }
        }
        if v_trans {
            // A transposed V is never block-quantized (refusing it is the views target's job).
            for t in tv.iter_mut() {
                if t.is_quantized() {
                    *t = GgmlType::F16;
                }
            }
        }
        let width = |r: &mut In, q: bool| {
            if q {
                32 * (1 + r.below(2))
            } else {
                1 + r.below(40)
            }
        };
        let dk = width(r, tk.iter().any(|t| t.is_quantized()));
        let dv = width(r, tv.iter().any(|t| t.is_quantized()));
        let pad = |r: &mut In, q: bool| {
            let p = r.below(4);
            if q {
                32 * (p % 2)
            } else {
                p
            }
        };
        let pad_k = pad(r, tk.iter().any(|t| t.is_quantized()));
        let pad_v = pad(r, tv.iter().any(|t| t.is_quantized()));
        Spec {
            n_layers,
            n_cells,
            n_head,
            tk,
            tv,
            dk,
            dv,
            pad_k,
            pad_v,
            v_trans,
        }
    }
}

/// How rows are filled.
#[derive(Clone, Copy, Debug)]
pub enum Fill {
    /// Keys drifting along the sequence with topic jumps; values noise.
    Runs,
    Noise,
    /// Every element the same.
    Constant(f32),
    /// Runs, with special values mixed in.
    Specials,
    /// Runs times a large factor (near the types' range).
    Huge,
}

impl Fill {
    pub fn read(r: &mut In) -> Fill {
        match r.below(8) {
            0..=3 => Fill::Runs,
            4 => Fill::Noise,
            5 => Fill::Constant(r.pick_f32(&[0.0, 1.0, -2.5])),
            6 => Fill::Specials,
            _ => Fill::Huge,
        }
    }

    pub fn finite(self) -> bool {
        !matches!(self, Fill::Specials) && !matches!(self, Fill::Constant(c) if !c.is_finite())
    }
}

impl Cache {
    pub fn new(s: &Spec, fill: Fill, seed: u64) -> Cache {
        let mut rng = Rng(seed);
        let mut layers = Vec::with_capacity(s.n_layers);
        for l in 0..s.n_layers {
            let (tk, tv) = (s.tk[l], s.tv[l]);
            let kcols = s.n_head * s.dk + s.pad_k;
            let vcols = s.n_head * s.dv + s.pad_v;
            let kt = Tensor {
                ty: tk,
                cols: kcols,
                rows: s.n_cells,
                nb1: tk.row_size(kcols),
            };
            let vt = if s.v_trans {
                Tensor {
                    ty: tv,
                    cols: s.n_cells,
                    rows: vcols,
                    nb1: tv.row_size(s.n_cells),
                }
            } else {
                Tensor {
                    ty: tv,
                    cols: vcols,
                    rows: s.n_cells,
                    nb1: tv.row_size(vcols),
                }
            };
            let mut layer = Layer {
                k: Buf::new(kt.rows * kt.nb1),
                v: Buf::new(vt.rows * vt.nb1),
                kt,
                vt,
                v_trans: s.v_trans,
                n_head: s.n_head,
                dk: s.dk,
                dv: s.dv,
            };
            let scale = match fill {
                Fill::Huge => 3e3 * (1 + rng.below(1000)) as f32,
                _ => 1.0,
            };
            let mut base: Vec<f32> = (0..kcols).map(|_| rng.normal()).collect();
            for c in 0..s.n_cells {
                if rng.f32() < 0.15 {
                    base = (0..kcols).map(|_| rng.normal()).collect();
                }
                let mut k: Vec<f32> = match fill {
                    Fill::Noise => (0..kcols).map(|_| rng.normal()).collect(),
                    Fill::Constant(x) => vec![x; kcols],
                    _ => base
                        .iter()
                        .map(|b| (b + 0.3 * rng.normal()) * scale)
                        .collect(),
                };
                let mut v: Vec<f32> = match fill {
                    Fill::Constant(x) => vec![x; vcols],
                    _ => (0..vcols).map(|_| rng.normal() * scale).collect(),
                };
                if let Fill::Specials = fill {
                    for x in k.iter_mut().chain(v.iter_mut()) {
                        if rng.below(16) == 0 {
                            *x = SPECIALS[rng.below(SPECIALS.len())];
                        }
                    }
                }
                layer.set_k_row(c, &k);
                layer.set_v_row(c, &v);
            }
            layers.push(layer);
        }
        Cache {
            layers,
            n_cells: s.n_cells,
        }
    }

    /// Spec, fill, seed and up to 8 raw byte pokes, all from the input.
    pub fn read(r: &mut In, max_cells: usize) -> (Spec, Cache) {
        let spec = Spec::read(r, max_cells);
        let fill = Fill::read(r);
        let seed = r.u64();
        let mut cache = Cache::new(&spec, fill, seed);
        for _ in 0..r.below(9) {
            let l = r.below(cache.layers.len());
            let is_v = r.bool();
            let (off, val) = (r.u16() as usize, r.u8());
            let b = if is_v {
                &mut cache.layers[l].v
            } else {
                &mut cache.layers[l].k
            };
            if b.len > 0 {
                let i = off % b.len;
                b.all_mut()[i] = val;
            }
        }
        (spec, cache)
    }

    pub fn views(&mut self) -> Vec<kvm_layer_view> {
        self.layers.iter_mut().map(|l| l.view()).collect()
    }

    pub fn snapshot(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.layers
            .iter()
            .map(|l| (l.k.all().to_vec(), l.v.all().to_vec()))
            .collect()
    }

    /// Whether every element of the given cells' K and V rows decodes finite.
    pub fn cells_finite(&self, cells: &[u32]) -> bool {
        self.layers.iter().all(|l| {
            cells.iter().all(|&c| {
                let c = c as usize;
                c < self.n_cells
                    && l.k_row(c).iter().all(|x| x.is_finite())
                    && l.v_row(c).iter().all(|x| x.is_finite())
            })
        })
    }
}

fn tensor_view(buf: &mut Buf, t: &Tensor) -> kvm_tensor_view {
    let ts = t.ty.type_size();
    kvm_tensor_view {
        data: buf.ptr() as *mut std::ffi::c_void,
        r#type: t.ty.id(),
        ne: [t.cols as i64, t.rows as i64, 1, 1],
        nb: [ts, t.nb1, t.nb1 * t.rows, t.nb1 * t.rows],
    }
}

impl Layer {
    pub fn view(&mut self) -> kvm_layer_view {
        kvm_layer_view {
            k: tensor_view(&mut self.k, &self.kt),
            v: tensor_view(&mut self.v, &self.vt),
            n_head_kv: self.n_head as u32,
            n_embd_head_k: self.dk as u32,
            n_embd_head_v: self.dv as u32,
            v_trans: self.v_trans,
        }
    }

    /// Bytes of cell `c`'s K row that hold heads (not padding).
    pub fn k_bytes(&self, c: usize) -> std::ops::Range<usize> {
        let start = c * self.kt.nb1;
        start..start + self.kt.ty.row_size(self.n_head * self.dk)
    }

    /// Bytes of cell `c`'s V (one range per channel when transposed), heads only.
    pub fn v_bytes(&self, c: usize) -> Vec<std::ops::Range<usize>> {
        if self.v_trans {
            let ts = self.vt.ty.type_size();
            (0..self.n_head * self.dv)
                .map(|j| {
                    let o = j * self.vt.nb1 + c * ts;
                    o..o + ts
                })
                .collect()
        } else {
            let start = c * self.vt.nb1;
            let end = start + self.vt.ty.row_size(self.n_head * self.dv);
            std::iter::once(start..end).collect()
        }
    }

    fn set_k_row(&mut self, c: usize, x: &[f32]) {
        let (ty, start, n) = (self.kt.ty, c * self.kt.nb1, self.kt.nb1);
        encode(
            Kernels::scalar(),
            ty,
            x,
            &mut self.k.all_mut()[start..start + n],
        );
    }

    fn set_v_row(&mut self, c: usize, x: &[f32]) {
        let ty = self.vt.ty;
        if self.v_trans {
            let ts = ty.type_size();
            for (j, s) in x.iter().enumerate() {
                let o = j * self.vt.nb1 + c * ts;
                encode(
                    Kernels::scalar(),
                    ty,
                    std::slice::from_ref(s),
                    &mut self.v.all_mut()[o..o + ts],
                );
            }
        } else {
            let (start, n) = (c * self.vt.nb1, self.vt.nb1);
            encode(
                Kernels::scalar(),
                ty,
                x,
                &mut self.v.all_mut()[start..start + n],
            );
        }
    }

    pub fn k_row(&self, c: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.n_head * self.dk];
        decode(
            Kernels::scalar(),
            self.kt.ty,
            &self.k.all()[self.k_bytes(c)],
            &mut out,
        );
        out
    }

    pub fn v_row(&self, c: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.n_head * self.dv];
        let ranges = self.v_bytes(c);
        if self.v_trans {
            for (o, r) in out.iter_mut().zip(ranges) {
                decode(
                    Kernels::scalar(),
                    self.vt.ty,
                    &self.v.all()[r],
                    std::slice::from_mut(o),
                );
            }
        } else {
            decode(
                Kernels::scalar(),
                self.vt.ty,
                &self.v.all()[ranges[0].clone()],
                &mut out,
            );
        }
        out
    }
}

/// Asserts that `after` differs from `before` only where `mask` allows.
pub fn assert_only(before: &[u8], after: &[u8], mask: &[bool], what: &str) {
    assert_eq!(before.len(), after.len());
    for (i, (a, b)) in before.iter().zip(after).enumerate() {
        if a != b && !mask.get(i).copied().unwrap_or(false) {
            panic!("{what}: byte {i} changed ({a:#04x} -> {b:#04x}) outside the rows allowed");
        }
    }
}

/// Per layer, the bytes a successful apply may change: K of `k_cells`, V of `v_cells`.
pub fn allowed(cache: &Cache, k_cells: &[usize], v_cells: &[usize]) -> Vec<(Vec<bool>, Vec<bool>)> {
    cache
        .layers
        .iter()
        .map(|l| {
            let mut km = vec![false; l.k.all().len()];
            let mut vm = vec![false; l.v.all().len()];
            for &c in k_cells {
                km[l.k_bytes(c)].fill(true);
            }
            for &c in v_cells {
                for r in l.v_bytes(c) {
                    vm[r].fill(true);
                }
            }
            (km, vm)
        })
        .collect()
}
