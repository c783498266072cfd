//! Safe row access to validated views: raw pointers to slices ([`borrow`], [`borrow_mut`]),
//! the byte ranges of a cell's row or head, the [`LayerRows`] reads and [`LayerMut`] writes
//! (through [`crate::codec`]), and the prefetch hints of loops over scattered rows.
//!
//! K is one row per cell. V is the same, or, transposed, one row per channel, so a cell's
//! value is gathered with stride `nb[1]`, one element per channel row.

use super::{Geom, LayerGeom, RawLayer};
use half::f16;
use half::slice::HalfBitsSliceExt;

use crate::codec::{as_u16, decode, encode, GgmlType};
use crate::simd::Kernels;

/// One validated layer's rows, decoded and encoded with the kernel table it was borrowed
/// with: `B` is `&[u8]` ([`LayerRef`]) or `&mut [u8]` ([`LayerMut`]).
pub struct Layer<B> {
    pub geom: LayerGeom,
    kern: &'static Kernels,
    k: B,
    v: B,
}

/// Read-only access to one validated layer.
pub type LayerRef<'a> = Layer<&'a [u8]>;

/// Read-write access to one validated layer.
pub type LayerMut<'a> = Layer<&'a mut [u8]>;

/// Borrows the validated views read-only; their rows decode with `kern`.
///
/// # Safety
/// Each view's `data` must be valid for reads of its `span` bytes for `'a`, and nothing may
/// write those bytes during `'a`.
pub unsafe fn borrow<'a>(
    raw: &[RawLayer],
    geoms: &[LayerGeom],
    kern: &'static Kernels,
) -> Vec<LayerRef<'a>> {
    // SAFETY: forwarded from this function's contract.
    unsafe { borrow_with(raw, geoms, kern, bytes) }
}

/// Borrows the validated views read-write; their rows decode and encode with `kern`.
///
/// # Safety
/// As [`borrow`], plus valid for writes and not read or written by anyone else during `'a`.
/// [`super::validate`] has ensured that the views do not overlap one another, so no two
/// slices alias.
pub unsafe fn borrow_mut<'a>(
    raw: &[RawLayer],
    geoms: &[LayerGeom],
    kern: &'static Kernels,
) -> Vec<LayerMut<'a>> {
    // SAFETY: forwarded from this function's contract.
    unsafe { borrow_with(raw, geoms, kern, bytes_mut) }
}

/// Each view's `span` bytes as `B`, through `bytes`.
///
/// # Safety
/// `bytes(data, span)` is sound for every view (the callers' contracts).
unsafe fn borrow_with<B>(
    raw: &[RawLayer],
    geoms: &[LayerGeom],
    kern: &'static Kernels,
    bytes: unsafe fn(*mut u8, usize) -> B,
) -> Vec<Layer<B>> {
    raw.iter()
        .zip(geoms)
        .map(|(r, g)| Layer {
            geom: *g,
            kern,
            // SAFETY: the caller's contract; an empty span never dereferences the (possibly
            // NULL) pointer.
            k: unsafe { bytes(r.k.data, g.k.span) },
            // SAFETY: as above.
            v: unsafe { bytes(r.v.data, g.v.span) },
        })
        .collect()
}

unsafe fn bytes<'a>(p: *mut u8, n: usize) -> &'a [u8] {
    if n == 0 {
        &[]
    } else {
        // SAFETY: forwarded from the callers' contracts.
        unsafe { std::slice::from_raw_parts(p, n) }
    }
}

unsafe fn bytes_mut<'a>(p: *mut u8, n: usize) -> &'a mut [u8] {
    if n == 0 {
        &mut []
    } else {
        // SAFETY: forwarded from the callers' contracts.
        unsafe { std::slice::from_raw_parts_mut(p, n) }
    }
}

/// Byte range of head `h` (of width `d`) in row `r`.
#[inline]
fn head_range(g: &Geom, r: usize, h: usize, d: usize) -> std::ops::Range<usize> {
    let start = r * g.nb1 + g.ty.row_size(h * d);
    start..start + g.ty.row_size(d)
}

/// Byte range of the first `w` elements of row `r`: every head, the padding left out.
#[inline]
fn row_range(g: &Geom, r: usize, w: usize) -> std::ops::Range<usize> {
    head_range(g, r, 0, w)
}

/// Reading a layer, [`LayerRef`] or [`LayerMut`] (generic, so that the algorithm's readers take
/// either).
pub trait LayerRows {
    fn geom(&self) -> &LayerGeom;
    /// The kernel table the rows decode with (chosen when the views were borrowed).
    fn kern(&self) -> &'static Kernels;
    fn k_bytes(&self) -> &[u8];
    fn v_bytes(&self) -> &[u8];

    /// Key of cell `cell`, KV head `h`, as f32 into `out` (`out.len() == dk`).
    fn read_k(&self, cell: usize, h: usize, out: &mut [f32]) {
        let g = self.geom();
        decode(
            self.kern(),
            g.k.ty,
            &self.k_bytes()[head_range(&g.k, cell, h, g.dk)],
            out,
        );
    }

    /// All heads of cell `cell`'s key as f32 into `out` (`out.len() == n_head·dk`; row padding
    /// is not read).
    fn read_k_row(&self, cell: usize, out: &mut [f32]) {
        let g = self.geom();
        let r = row_range(&g.k, cell, g.n_head * g.dk);
        decode(self.kern(), g.k.ty, &self.k_bytes()[r], out);
    }

    /// All heads of cell `cell`'s value as f32 into `out` (`out.len() == n_head·dv`).
    fn read_v_row(&self, cell: usize, out: &mut [f32]) {
        let g = self.geom();
        if g.v_trans {
            let ty = g.v.ty;
            let ts = ty.type_size();
            for (j, o) in out.iter_mut().enumerate() {
                let off = j * g.v.nb1 + cell * g.v.nb0;
                decode(
                    self.kern(),
                    ty,
                    &self.v_bytes()[off..off + ts],
                    std::slice::from_mut(o),
                );
            }
        } else {
            let r = row_range(&g.v, cell, g.n_head * g.dv);
            decode(self.kern(), g.v.ty, &self.v_bytes()[r], out);
        }
    }

    /// Asks the CPU to start loading cell `cell`'s key row (all heads) into cache, so that a
    /// loop over scattered rows overlaps their memory latency. A hint only: it reads nothing
    /// and changes nothing, and a cell outside the view is ignored.
    fn prefetch_k_row(&self, cell: usize) {
        let g = self.geom();
        if let Some(row) = self.k_bytes().get(row_range(&g.k, cell, g.n_head * g.dk)) {
            prefetch(row);
        }
    }

    /// As [`LayerRows::prefetch_k_row`] for KV head `h` of the key row only.
    fn prefetch_k_head(&self, cell: usize, h: usize) {
        let g = self.geom();
        if let Some(part) = self.k_bytes().get(head_range(&g.k, cell, h, g.dk)) {
            prefetch(part);
        }
    }

    /// As [`LayerRows::prefetch_k_row`] for cell `cell`'s value row; nothing for a transposed V,
    /// whose cell is spread over one element per channel row.
    fn prefetch_v_row(&self, cell: usize) {
        let g = self.geom();
        if g.v_trans {
            return;
        }
        if let Some(row) = self.v_bytes().get(row_range(&g.v, cell, g.n_head * g.dv)) {
            prefetch(row);
        }
    }

    /// Raw f16 key bits of all heads of `cell` (padding excluded), when K is f16.
    fn k_row_f16(&self, cell: usize) -> Option<&[u16]> {
        let g = self.geom();
        (g.k.ty == GgmlType::F16)
            .then(|| as_u16(&self.k_bytes()[row_range(&g.k, cell, g.n_head * g.dk)]))
    }

    /// All heads of `cell`'s key as f16 where it lies, when K is f16: what the kernels that
    /// read f16 in place take instead of a decoded row.
    fn k_f16(&self, cell: usize) -> Option<&[f16]> {
        self.k_row_f16(cell).map(|b| b.reinterpret_cast())
    }

    /// As [`LayerRows::k_f16`] for `cell`'s value, when V is f16 and not transposed.
    fn v_f16(&self, cell: usize) -> Option<&[f16]> {
        let g = self.geom();
        (g.v.ty == GgmlType::F16 && !g.v_trans).then(|| {
            as_u16(&self.v_bytes()[row_range(&g.v, cell, g.n_head * g.dv)]).reinterpret_cast()
        })
    }

    /// Asks for all of `cell`'s key row, into L2: for loops that stream whole rows, where the
    /// hardware prefetcher stops at each page and starts late on the next row.
    fn prefetch_k_row_all(&self, cell: usize) {
        let g = self.geom();
        if let Some(row) = self.k_bytes().get(row_range(&g.k, cell, g.n_head * g.dk)) {
            prefetch_all(row);
        }
    }

    /// As [`LayerRows::prefetch_k_row_all`] for `cell`'s value row (not a transposed V).
    fn prefetch_v_row_all(&self, cell: usize) {
        let g = self.geom();
        if g.v_trans {
            return;
        }
        if let Some(row) = self.v_bytes().get(row_range(&g.v, cell, g.n_head * g.dv)) {
            prefetch_all(row);
        }
    }
}

impl<B: std::ops::Deref<Target = [u8]>> LayerRows for Layer<B> {
    fn geom(&self) -> &LayerGeom {
        &self.geom
    }
    fn kern(&self) -> &'static Kernels {
        self.kern
    }
    fn k_bytes(&self) -> &[u8] {
        &self.k
    }
    fn v_bytes(&self) -> &[u8] {
        &self.v
    }
}

impl LayerMut<'_> {
    /// Writes all heads of cell `cell`'s key (`src.len() == n_head·dk`; padding untouched).
    pub fn write_k_row(&mut self, cell: usize, src: &[f32]) {
        let g = self.geom;
        let r = row_range(&g.k, cell, g.n_head * g.dk);
        encode(self.kern, g.k.ty, src, &mut self.k[r]);
    }

    /// Writes all heads of cell `cell`'s value (`src.len() == n_head·dv`).
    pub fn write_v_row(&mut self, cell: usize, src: &[f32]) {
        let g = self.geom;
        if g.v_trans {
            let ts = g.v.ty.type_size();
            for (j, s) in src.iter().enumerate() {
                let off = j * g.v.nb1 + cell * g.v.nb0;
                encode(
                    self.kern,
                    g.v.ty,
                    std::slice::from_ref(s),
                    &mut self.v[off..off + ts],
                );
            }
        } else {
            let r = row_range(&g.v, cell, g.n_head * g.dv);
            encode(self.kern, g.v.ty, src, &mut self.v[r]);
        }
    }
}

/// How many rows ahead a loop over scattered cache rows asks for the next one: enough to
/// cover a memory access while the rows in between are decoded.
pub(crate) const PREFETCH_AHEAD: usize = 4;

/// Prefetches the first cache lines of `bytes`, at most [`PREFETCH_BYTES`] (a hint; never
/// faults, reads nothing). The last byte of a short row is asked for too, since a row need not
/// start on a line. A long row is left to the hardware prefetcher once its start is loading:
/// asking for all of it filled L1 with lines evicted before their turn, and the loop over its
/// lines cost more than the misses it saved.
#[inline]
fn prefetch(bytes: &[u8]) {
    prefetch_lines::<T0>(bytes, bytes.len().min(PREFETCH_BYTES));
}

/// Prefetches every cache line of `bytes` into L2 (a hint, as [`prefetch`]). L2 holds the
/// rows a few steps ahead without pushing the current ones out of L1.
#[inline]
fn prefetch_all(bytes: &[u8]) {
    prefetch_lines::<T1>(bytes, bytes.len());
}

/// `_mm_prefetch` hints: into L1 (and below), into L2 (and below).
#[cfg(target_arch = "x86_64")]
const T0: i32 = core::arch::x86_64::_MM_HINT_T0;
#[cfg(target_arch = "x86_64")]
const T1: i32 = core::arch::x86_64::_MM_HINT_T1;
#[cfg(not(target_arch = "x86_64"))]
const T0: i32 = 0;
#[cfg(not(target_arch = "x86_64"))]
const T1: i32 = 0;

/// Asks with hint `HINT` for the lines of the first `n` bytes of `bytes` (`n <= bytes.len()`),
/// and, when that is all of them, for the last byte's line too, since a row need not start on
/// a line. A hint only: it never faults and reads nothing.
#[inline]
fn prefetch_lines<const HINT: i32>(bytes: &[u8], n: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = bytes.as_ptr();
        let mut off = 0;
        while off < n {
            // SAFETY: `off < n <= bytes.len()`; a prefetch is a hint that never faults and has
            // no effect on memory.
            unsafe { core::arch::x86_64::_mm_prefetch::<HINT>(p.add(off).cast()) };
            off += 64;
        }
        if n > 0 && n == bytes.len() {
            // SAFETY: as above, the last byte of `bytes`.
            unsafe { core::arch::x86_64::_mm_prefetch::<HINT>(p.add(n - 1).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bytes, n);
}

/// Most bytes of one row [`prefetch`] asks for.
const PREFETCH_BYTES: usize = 512;
