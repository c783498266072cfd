//! The device path: the same event as `merge::plan` and `merge::apply`, with the cache's bytes
//! left on a CUDA device. Kernels (`cuda/*.cu`) score the query ring against the keys, give the
//! per-layer key statistics the plan reads ([`crate::merge::scores::KeyStats`]), the members'
//! distances to their pivots, and write the merged rows; the plan and the weights stay on the
//! host, built by the CPU's own code from what the kernels return (a few floats per cell).
//!
//! Without the `cuda` feature, `stub` has the same functions, each refusing with
//! `Error::Unsupported`, so the C API is the same in every build.

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
pub use device::*;

#[cfg(not(feature = "cuda"))]
mod stub;
#[cfg(not(feature = "cuda"))]
pub use stub::*;

use std::ffi::c_void;

/// One layer's query ring on the device, for [`attn_from_queries`].
#[derive(Clone, Copy, Debug)]
pub struct DevQueries {
    /// Row `r` of the ring at `q + r·n_head·dk` floats (device memory).
    pub q: *const f32,
    pub n_head: usize,
    pub kq_scale: f32,
}

/// A `cudaStream_t` as the host passed it (NULL: the legacy default stream).
#[derive(Clone, Copy, Debug)]
pub struct Stream(pub *mut c_void);
