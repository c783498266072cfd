//! Checks the host's views before anything is read: a known type, `nb[0]` equal to the type
//! (block) size, rows wide enough for the heads, strides that neither overflow nor make rows
//! overlap, alignment for the element type, equal cell counts across layers, and no two
//! tensors sharing a byte. Reads no tensor data.

use super::{Geom, LayerGeom, RawLayer, RawView};
use crate::codec::GgmlType;
use crate::error::{Error, Result};

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
