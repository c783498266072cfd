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

mod rows;
mod validate;

pub use crate::codec::GgmlType;
pub(crate) use rows::PREFETCH_AHEAD;
pub use rows::{borrow, borrow_mut, Layer, LayerMut, LayerRef, LayerRows};
pub use validate::{validate, validate_cells};

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
