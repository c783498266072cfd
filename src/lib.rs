//! kvmerger: KVMerger (Wang et al., "Model Tells You Where to Merge", arXiv 2407.08454) for
//! llama.cpp KV caches, in place, behind a C ABI (`include/kvmerger.h`).
//!
//! Layout: `ffi/` is the C boundary (the only place with exports), `layout` validates the
//! host's ggml views and hands out safe row access, `merge/` is the algorithm in safe Rust,
//! `codec` turns a run of ggml elements into f32 and back, `simd/` the kernels, `quant`
//! ggml's block formats, `cuda` the device path (kernels with the `cuda` feature, refusals
//! without).

pub mod codec;
pub mod cuda;
pub mod error;
pub mod ffi;
pub mod layout;
pub mod merge;
pub mod quant;
pub mod simd;
