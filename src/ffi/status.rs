//! Status codes of the C API. The numbers are part of the ABI: never renumber or reuse one;
//! retire a code by leaving it here as a comment.

use crate::error::Error;

/// Result of every fallible call. `KVM_STATUS_OK` is 0; failures are positive and stable.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum kvm_status {
    KVM_STATUS_OK = 0,
    /// A required pointer argument was NULL.
    KVM_STATUS_NULL_ARG = 1,
    /// A scalar argument or parameter is out of range.
    KVM_STATUS_INVALID_ARG = 2,
    /// A view has a ggml type this library does not handle.
    KVM_STATUS_BAD_TYPE = 3,
    /// A view's shape, strides or alignment are inconsistent, or views overlap.
    KVM_STATUS_BAD_LAYOUT = 4,
    /// The window cannot free that many cells under the protections asked for.
    KVM_STATUS_BUDGET = 5,
    /// Valid, but not possible in this build (e.g. CUDA without the `cuda` feature).
    KVM_STATUS_UNSUPPORTED = 6,
    /// Reading or writing a file failed.
    KVM_STATUS_IO = 7,
    /// A calibration profile is malformed or does not fit the cache.
    KVM_STATUS_BAD_PROFILE = 8,
    /// An internal bug was caught at the boundary.
    KVM_STATUS_PANIC = 9,
    /// A plan was applied to views that differ from those it was made on.
    KVM_STATUS_MISMATCH = 10,
    /// A CUDA call or kernel failed; after an error the CUDA context may be unusable.
    KVM_STATUS_DEVICE = 11,
}

impl From<&Error> for kvm_status {
    fn from(e: &Error) -> Self {
        use kvm_status::*;
        match e {
            Error::NullArg(_) => KVM_STATUS_NULL_ARG,
            Error::InvalidArg(_) => KVM_STATUS_INVALID_ARG,
            Error::BadType { .. } => KVM_STATUS_BAD_TYPE,
            Error::BadLayout(_) => KVM_STATUS_BAD_LAYOUT,
            Error::Budget { .. } => KVM_STATUS_BUDGET,
            Error::Unsupported(_) => KVM_STATUS_UNSUPPORTED,
            Error::Io(_) => KVM_STATUS_IO,
            Error::BadProfile(_) => KVM_STATUS_BAD_PROFILE,
            Error::Panic(_) => KVM_STATUS_PANIC,
            Error::Mismatch(_) => KVM_STATUS_MISMATCH,
            Error::Device(_) => KVM_STATUS_DEVICE,
        }
    }
}

/// Static, NUL-terminated description of a status code (any integer is accepted).
pub(crate) fn status_str(code: i32) -> &'static std::ffi::CStr {
    match code {
        0 => c"ok",
        1 => c"a required pointer argument was NULL",
        2 => c"invalid argument",
        3 => c"unsupported ggml type",
        4 => c"inconsistent tensor view (shape, strides, alignment or overlap)",
        5 => c"the window cannot free that many cells",
        6 => c"unsupported in this build",
        7 => c"file i/o error",
        8 => c"bad calibration profile",
        9 => c"internal error (panic caught)",
        10 => c"plan does not match these views",
        11 => c"CUDA error",
        _ => c"unknown status code",
    }
}
