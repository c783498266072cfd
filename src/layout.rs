//! Host views of the KV cache, validated once, turned into safe row access.
//!
//! A host describes each layer's K and V the way ggml describes a tensor (`type`, `ne[4]`,
//! `nb[4]`, data pointer). [`validate`] checks every view before anything is read: a known
//! type, `nb[0]` equal to the type (block) size, rows wide enough for the heads, strides that
//! neither overflow nor make rows overlap, alignment for the element type, equal cell counts
//! across layers, and no two tensors sharing a byte. Only then does [`borrow`] /
//! [`borrow_mut`] turn the raw pointers into slices, and the algorithm works on those slices
//! through [`LayerRows`] without any `unsafe`.
//!
//! K is one row per cell (`ne = [≥ n_head·d_k, n_cells]`). V is the same, or, transposed (what
//! llama.cpp stores when flash attention is off), one row per channel
//! (`ne = [n_cells, ≥ n_head·d_v]`), so a head of one cell is gathered with stride `nb[1]`.

use crate::error::{Error, Result};
use crate::quant;
use crate::simd::Kernels;

/// The ggml types we read and write, with ggml's ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q8_0,
    BF16,
}

impl GgmlType {
    pub fn from_id(id: i32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    pub fn id(self) -> i32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
        }
    }

    /// Elements per block (ggml `blck_size`).
    pub fn block(self) -> usize {
        match self {
            GgmlType::Q4_0 | GgmlType::Q8_0 => quant::QK,
            _ => 1,
        }
    }

    /// Bytes per block (ggml `type_size`).
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => quant::Q4_0_BYTES,
            GgmlType::Q8_0 => quant::Q8_0_BYTES,
        }
    }

    /// Largest magnitude an element of this type holds; the encoder writes ±inf (or, for the
    /// block types, an infinite block scale) beyond it. The block types' limit is their
    /// largest quantum times the largest f16 scale.
    pub fn max_finite(self) -> f32 {
        const F16_MAX: f32 = 65504.0;
        match self {
            GgmlType::F32 => f32::MAX,
            GgmlType::F16 => F16_MAX,
            GgmlType::BF16 => f32::from_bits(0x7f7f_0000),
            GgmlType::Q8_0 => 127.0 * F16_MAX,
            GgmlType::Q4_0 => 8.0 * F16_MAX,
        }
    }

    /// Alignment the element reads need (the f16 scale of a block needs only 2, and we read it
    /// byte-wise anyway, but ggml buffers always give 2).
    fn align(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            _ => 2,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block() > 1
    }

    /// Bytes of `n` consecutive elements (`n` a multiple of the block), for sizes inside a
    /// validated view (which [`GgmlType::checked_row_size`] has bounded).
    pub fn row_size(self, n: usize) -> usize {
        n / self.block() * self.type_size()
    }

    /// [`GgmlType::row_size`], or `None` when the byte count does not fit a `usize`: a host's
    /// `ne[0]` must not wrap to a small row that then passes every other check.
    pub fn checked_row_size(self, n: usize) -> Option<usize> {
        (n / self.block()).checked_mul(self.type_size())
    }
}

/// A tensor view as the host gave it, before validation.
#[derive(Clone, Copy, Debug)]
pub struct RawView {
    pub data: *mut u8,
    pub type_id: i32,
    pub ne: [i64; 4],
    pub nb: [usize; 4],
}

/// One layer as the host gave it, before validation.
#[derive(Clone, Copy, Debug)]
pub struct RawLayer {
    pub k: RawView,
    pub v: RawView,
    pub n_head_kv: u32,
    pub n_embd_head_k: u32,
    pub n_embd_head_v: u32,
    pub v_trans: bool,
}

/// A validated 2-D tensor: `rows` rows of `cols` elements, row `r` at byte `r·nb1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geom {
    pub ty: GgmlType,
    pub cols: usize,
    pub rows: usize,
    pub nb0: usize,
    pub nb1: usize,
    /// Bytes from the first to one past the last byte any row uses.
    pub span: usize,
}

/// A validated layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerGeom {
    pub k: Geom,
    pub v: Geom,
    pub n_head: usize,
    pub dk: usize,
    pub dv: usize,
    pub v_trans: bool,
    pub n_cells: usize,
}

fn geom(what: &str, raw: &RawView) -> Result<Geom> {
    let ty = GgmlType::from_id(raw.type_id).ok_or_else(|| Error::BadType {
        what: what.to_string(),
        type_id: raw.type_id,
    })?;
    let bad = |m: String| Error::BadLayout(format!("{what}: {m}"));
    if raw.ne.iter().any(|&n| n < 0) {
        return Err(bad(format!("negative ne {:?}", raw.ne)));
    }
    if raw.ne[2] != 1 || raw.ne[3] != 1 {
        return Err(bad(format!(
            "ne[2] and ne[3] must be 1 (pass one stream's 2-D view), got {:?}",
            raw.ne
        )));
    }
    let cols = usize::try_from(raw.ne[0]).map_err(|_| bad("ne[0] too large".into()))?;
    let rows = usize::try_from(raw.ne[1]).map_err(|_| bad("ne[1] too large".into()))?;
    if cols % ty.block() != 0 {
        return Err(bad(format!(
            "ne[0] = {cols} is not a multiple of the block size {}",
            ty.block()
        )));
    }
    if raw.nb[0] != ty.type_size() {
        return Err(bad(format!(
            "nb[0] = {} but the type size is {}",
            raw.nb[0],
            ty.type_size()
        )));
    }
    let row_bytes = ty
        .checked_row_size(cols)
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| {
            bad(format!(
                "a row of ne[0] = {cols} elements overflows the address space"
            ))
        })?;
    if rows > 1 && raw.nb[1] < row_bytes {
        return Err(bad(format!(
            "nb[1] = {} is smaller than a row ({row_bytes} bytes): rows would overlap",
            raw.nb[1]
        )));
    }
    if raw.nb[1] % ty.align() != 0 {
        return Err(bad(format!(
            "nb[1] = {} is misaligned for the type",
            raw.nb[1]
        )));
    }
    let span = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1)
            .checked_mul(raw.nb[1])
            .and_then(|b| b.checked_add(row_bytes))
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| bad("size overflows".into()))?
    };
    if span > 0 {
        if raw.data.is_null() {
            return Err(Error::NullArg("tensor data"));
        }
        if (raw.data as usize) % ty.align() != 0 {
            return Err(bad("data pointer misaligned for the type".into()));
        }
        if (raw.data as usize).checked_add(span).is_none() {
            return Err(bad("data + size overflows the address space".into()));
        }
    }
    Ok(Geom {
        ty,
        cols,
        rows,
        nb0: raw.nb[0],
        nb1: raw.nb[1],
        span,
    })
}

fn layer_geom(il: usize, raw: &RawLayer) -> Result<LayerGeom> {
    let k = geom(&format!("layer {il} K"), &raw.k)?;
    let v = geom(&format!("layer {il} V"), &raw.v)?;
    let (n_head, dk, dv) = (
        raw.n_head_kv as usize,
        raw.n_embd_head_k as usize,
        raw.n_embd_head_v as usize,
    );
    let bad = |m: String| Error::BadLayout(format!("layer {il}: {m}"));
    if n_head == 0 || dk == 0 || dv == 0 {
        return Err(Error::InvalidArg(format!(
            "layer {il}: n_head_kv, n_embd_head_k and n_embd_head_v must be > 0"
        )));
    }
    // u32 · u32 fits a 64-bit usize, not a 32-bit one.
    let width = |d: usize, what: &str| {
        n_head
            .checked_mul(d)
            .ok_or_else(|| Error::InvalidArg(format!("layer {il}: n_head_kv·{what} overflows")))
    };
    let (wk, wv) = (width(dk, "n_embd_head_k")?, width(dv, "n_embd_head_v")?);
    let n_cells = k.rows;
    if k.cols < wk {
        return Err(bad(format!(
            "K rows hold {} elements, fewer than n_head_kv·n_embd_head_k = {wk}",
            k.cols
        )));
    }
    if k.ty.is_quantized() && dk % k.ty.block() != 0 {
        return Err(bad(format!(
            "quantized K needs n_embd_head_k ({dk}) to be a multiple of {}",
            k.ty.block()
        )));
    }
    if raw.v_trans {
        if v.ty.is_quantized() {
            return Err(bad("a transposed V cannot be block-quantized".into()));
        }
        if v.cols != n_cells {
            return Err(bad(format!(
                "transposed V has ne[0] = {} but K has {n_cells} cells",
                v.cols
            )));
        }
        if v.rows < wv {
            return Err(bad(format!(
                "transposed V has {} channel rows, fewer than n_head_kv·n_embd_head_v = {wv}",
                v.rows
            )));
        }
    } else {
        if v.rows != n_cells {
            return Err(bad(format!("V has {} cells but K has {n_cells}", v.rows)));
        }
        if v.cols < wv {
            return Err(bad(format!(
                "V rows hold {} elements, fewer than n_head_kv·n_embd_head_v = {wv}",
                v.cols
            )));
        }
        if v.ty.is_quantized() && dv % v.ty.block() != 0 {
            return Err(bad(format!(
                "quantized V needs n_embd_head_v ({dv}) to be a multiple of {}",
                v.ty.block()
            )));
        }
    }
    Ok(LayerGeom {
        k,
        v,
        n_head,
        dk,
        dv,
        v_trans: raw.v_trans,
        n_cells,
    })
}

/// Checks every view and the relations between them; reads no tensor data.
pub fn validate(raw: &[RawLayer]) -> Result<Vec<LayerGeom>> {
    if raw.is_empty() {
        return Err(Error::InvalidArg("no layers given".into()));
    }
    let geoms = raw
        .iter()
        .enumerate()
        .map(|(il, r)| layer_geom(il, r))
        .collect::<Result<Vec<_>>>()?;
    let n_cells = geoms[0].n_cells;
    if let Some((il, g)) = geoms.iter().enumerate().find(|(_, g)| g.n_cells != n_cells) {
        return Err(Error::BadLayout(format!(
            "layer {il} has {} cells but layer 0 has {n_cells}",
            g.n_cells
        )));
    }
    // Writing through one view must never change bytes another view reads.
    let mut spans: Vec<(usize, usize, String)> = Vec::with_capacity(raw.len() * 2);
    for (il, (r, g)) in raw.iter().zip(&geoms).enumerate() {
        for (name, p, s) in [("K", r.k.data, g.k.span), ("V", r.v.data, g.v.span)] {
            if s > 0 {
                spans.push((p as usize, s, format!("layer {il} {name}")));
            }
        }
    }
    spans.sort_by_key(|s| s.0);
    for w in spans.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            return Err(Error::BadLayout(format!(
                "{} and {} overlap in memory (pass each tensor once)",
                w[0].2, w[1].2
            )));
        }
    }
    Ok(geoms)
}

/// Checks window cell ids: each below `n_cells`, none twice.
pub fn validate_cells(cells: &[u32], n_cells: usize) -> Result<()> {
    let mut seen = vec![false; n_cells];
    for (i, &c) in cells.iter().enumerate() {
        let c = c as usize;
        if c >= n_cells {
            return Err(Error::InvalidArg(format!(
                "cells[{i}] = {c} is not below the cache size {n_cells}"
            )));
        }
        if std::mem::replace(&mut seen[c], true) {
            return Err(Error::InvalidArg(format!(
                "cell {c} appears twice in the window"
            )));
        }
    }
    Ok(())
}

/// Read-only access to one validated layer.
pub struct LayerRef<'a> {
    pub geom: LayerGeom,
    k: &'a [u8],
    v: &'a [u8],
}

/// Read-write access to one validated layer.
pub struct LayerMut<'a> {
    pub geom: LayerGeom,
    k: &'a mut [u8],
    v: &'a mut [u8],
}

/// Borrows the validated views read-only.
///
/// # Safety
/// Each view's `data` must be valid for reads of its `span` bytes for `'a`, and nothing may
/// write those bytes during `'a`.
pub unsafe fn borrow<'a>(raw: &[RawLayer], geoms: &[LayerGeom]) -> Vec<LayerRef<'a>> {
    raw.iter()
        .zip(geoms)
        .map(|(r, g)| LayerRef {
            geom: *g,
            // SAFETY: the caller guarantees validity for `span` bytes; an empty span never
            // dereferences the (possibly NULL) pointer.
            k: unsafe { bytes(r.k.data, g.k.span) },
            // SAFETY: as above.
            v: unsafe { bytes(r.v.data, g.v.span) },
        })
        .collect()
}

/// Borrows the validated views read-write.
///
/// # Safety
/// As [`borrow`], plus valid for writes and not read or written by anyone else during `'a`.
/// [`validate`] has ensured that the views do not overlap one another.
pub unsafe fn borrow_mut<'a>(raw: &[RawLayer], geoms: &[LayerGeom]) -> Vec<LayerMut<'a>> {
    raw.iter()
        .zip(geoms)
        .map(|(r, g)| LayerMut {
            geom: *g,
            // SAFETY: the caller guarantees exclusive validity for `span` bytes, and the
            // validated views are pairwise disjoint, so no two slices alias.
            k: unsafe { bytes_mut(r.k.data, g.k.span) },
            // SAFETY: as above.
            v: unsafe { bytes_mut(r.v.data, g.v.span) },
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

fn as_u16(b: &[u8]) -> &[u16] {
    // SAFETY: u16 has no invalid bit patterns; validation made the data pointer and every
    // stride 2-aligned for 16-bit types, which `align_to` re-checks (prefix must be empty).
    let (pre, mid, post) = unsafe { b.align_to::<u16>() };
    assert!(pre.is_empty() && post.is_empty(), "misaligned 16-bit row");
    mid
}

fn as_u16_mut(b: &mut [u8]) -> &mut [u16] {
    // SAFETY: as in `as_u16`.
    let (pre, mid, post) = unsafe { b.align_to_mut::<u16>() };
    assert!(pre.is_empty() && post.is_empty(), "misaligned 16-bit row");
    mid
}

/// Decodes `out.len()` contiguous elements of type `ty` from `b`.
pub fn decode(kern: &Kernels, ty: GgmlType, b: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => kern.f16_to_f32(as_u16(b), out),
        GgmlType::BF16 => kern.bf16_to_f32(as_u16(b), out),
        GgmlType::Q8_0 => quant::dequant_q8_0(b, out),
        GgmlType::Q4_0 => quant::dequant_q4_0(b, out),
    }
}

/// Encodes `src` into contiguous elements of type `ty` in `b`.
pub fn encode(kern: &Kernels, ty: GgmlType, src: &[f32], b: &mut [u8]) {
    match ty {
        GgmlType::F32 => {
            for (c, s) in b.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&s.to_le_bytes());
            }
        }
        GgmlType::F16 => kern.f32_to_f16(src, as_u16_mut(b)),
        GgmlType::BF16 => kern.f32_to_bf16(src, as_u16_mut(b)),
        GgmlType::Q8_0 => quant::quant_q8_0(src, b),
        GgmlType::Q4_0 => quant::quant_q4_0(src, b),
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

/// Reading a layer, shared by [`LayerRef`] and [`LayerMut`].
pub trait LayerRows {
    fn geom(&self) -> &LayerGeom;
    fn k_bytes(&self) -> &[u8];
    fn v_bytes(&self) -> &[u8];

    /// Key of cell `cell`, KV head `h`, as f32 into `out` (`out.len() == dk`).
    fn read_k(&self, kern: &Kernels, cell: usize, h: usize, out: &mut [f32]) {
        let g = self.geom();
        decode(
            kern,
            g.k.ty,
            &self.k_bytes()[head_range(&g.k, cell, h, g.dk)],
            out,
        );
    }

    /// All heads of cell `cell`'s key as f32 into `out` (`out.len() == n_head·dk`; row padding
    /// is not read).
    fn read_k_row(&self, kern: &Kernels, cell: usize, out: &mut [f32]) {
        let g = self.geom();
        let r = row_range(&g.k, cell, g.n_head * g.dk);
        decode(kern, g.k.ty, &self.k_bytes()[r], out);
    }

    /// All heads of cell `cell`'s value as f32 into `out` (`out.len() == n_head·dv`).
    fn read_v_row(&self, kern: &Kernels, cell: usize, out: &mut [f32]) {
        let g = self.geom();
        if g.v_trans {
            let ty = g.v.ty;
            let ts = ty.type_size();
            for (j, o) in out.iter_mut().enumerate() {
                let off = j * g.v.nb1 + cell * g.v.nb0;
                decode(
                    kern,
                    ty,
                    &self.v_bytes()[off..off + ts],
                    std::slice::from_mut(o),
                );
            }
        } else {
            let r = row_range(&g.v, cell, g.n_head * g.dv);
            decode(kern, g.v.ty, &self.v_bytes()[r], out);
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
}

impl LayerRows for LayerRef<'_> {
    fn geom(&self) -> &LayerGeom {
        &self.geom
    }
    fn k_bytes(&self) -> &[u8] {
        self.k
    }
    fn v_bytes(&self) -> &[u8] {
        self.v
    }
}

impl LayerRows for LayerMut<'_> {
    fn geom(&self) -> &LayerGeom {
        &self.geom
    }
    fn k_bytes(&self) -> &[u8] {
        self.k
    }
    fn v_bytes(&self) -> &[u8] {
        self.v
    }
}

impl LayerMut<'_> {
    /// Writes all heads of cell `cell`'s key (`src.len() == n_head·dk`; padding untouched).
    pub fn write_k_row(&mut self, kern: &Kernels, cell: usize, src: &[f32]) {
        let g = self.geom;
        let r = row_range(&g.k, cell, g.n_head * g.dk);
        encode(kern, g.k.ty, src, &mut self.k[r]);
    }

    /// Writes all heads of cell `cell`'s value (`src.len() == n_head·dv`).
    pub fn write_v_row(&mut self, kern: &Kernels, cell: usize, src: &[f32]) {
        let g = self.geom;
        if g.v_trans {
            let ts = g.v.ty.type_size();
            for (j, s) in src.iter().enumerate() {
                let off = j * g.v.nb1 + cell * g.v.nb0;
                encode(
                    kern,
                    g.v.ty,
                    std::slice::from_ref(s),
                    &mut self.v[off..off + ts],
                );
            }
        } else {
            let r = row_range(&g.v, cell, g.n_head * g.dv);
            encode(kern, g.v.ty, src, &mut self.v[r]);
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
    let n = bytes.len().min(PREFETCH_BYTES);
    #[cfg(target_arch = "x86_64")]
    {
        let p = bytes.as_ptr();
        let mut off = 0;
        while off < n {
            // SAFETY: `off < bytes.len()`; a prefetch is a hint that never faults and has no
            // effect on memory.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                    p.add(off).cast(),
                )
            };
            off += 64;
        }
        if n > 0 && n == bytes.len() {
            // SAFETY: as above, the last byte of `bytes`.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                    p.add(n - 1).cast(),
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = n;
}

/// Most bytes of one row [`prefetch`] asks for.
const PREFETCH_BYTES: usize = 512;
