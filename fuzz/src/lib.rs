//! Fuzz targets over kvmerger's C ABI. Each target's body is a function here, so the same
//! code runs under libFuzzer (`cargo fuzz run <target>`, `fuzz_targets/`) and, on a stable
//! toolchain, over the committed corpus as an ordinary test (`tests/corpus.rs`).
//!
//! Every call goes through the exported `extern "C"` functions, the way a host calls them,
//! with buffers the harness owns. The invariants (see README.md) are asserted here; a failed
//! assertion is a finding, and so is any `KVM_STATUS_PANIC`: under libFuzzer a panic caught at
//! the library's boundary aborts too, since libfuzzer-sys's panic hook runs before the unwind.

pub mod api;
pub mod attention;
pub mod cache;
pub mod calib;
/// The main crate's test fixtures, for their RNG and plan copy.
#[path = "../../tests/common/mod.rs"]
pub mod common;
pub mod input;
pub mod plan;
pub mod sequence;
pub mod views;

/// A target's body: one input, a panic for a finding.
pub type Body = fn(&[u8]);

/// The targets by name.
pub const TARGETS: [(&str, Body); 5] = [
    ("plan", plan::run),
    ("views", views::run),
    ("attention", attention::run),
    ("calib", calib::run),
    ("sequence", sequence::run),
];
