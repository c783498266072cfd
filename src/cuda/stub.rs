//! This build has no kernels: every device call is refused after the arguments were checked.

use super::{DevQueries, Stream};
use crate::error::{Error, Result};
use crate::layout::{LayerGeom, RawLayer};
use crate::merge::calib::Calib;
use crate::merge::plan::Plan;
use crate::merge::Params;

fn unsupported<T>() -> Result<T> {
    Err(Error::Unsupported(
        "this build has no CUDA kernels (build kvmerger with --features cuda)".into(),
    ))
}

/// Device buffers a context keeps between events (none here).
#[derive(Default)]
pub struct Device {
    _none: (),
}

#[allow(clippy::too_many_arguments)]
pub fn attn_from_queries(
    _dev: &Device,
    _raw: &[RawLayer],
    _geoms: &[LayerGeom],
    _queries: &[DevQueries],
    _q_sel: Option<&[u32]>,
    _n_q: usize,
    _cells: &[u32],
    _bias: Option<&[f32]>,
    _attn: &mut [f32],
    _stream: Stream,
) -> Result<()> {
    unsupported()
}

#[allow(clippy::too_many_arguments)]
pub fn plan(
    _dev: &Device,
    _params: &Params,
    _calib: Option<&Calib>,
    _raw: &[RawLayer],
    _geoms: &[LayerGeom],
    _cells: &[u32],
    _attn: Option<&[f32]>,
    _counts: Option<&[u32]>,
    _n_free: usize,
    _stream: Stream,
) -> Result<Plan> {
    unsupported()
}

pub fn apply(
    _dev: &Device,
    _plan: &Plan,
    _raw: &[RawLayer],
    _geoms: &[LayerGeom],
    _stream: Stream,
) -> Result<()> {
    unsupported()
}

/// Whether a CUDA device can be used: never, in this build.
pub fn available() -> bool {
    false
}
