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

c_enum!(kvm_status {
    KVM_STATUS_OK,
    KVM_STATUS_NULL_ARG,
    KVM_STATUS_INVALID_ARG,
    KVM_STATUS_BAD_TYPE,
    KVM_STATUS_BAD_LAYOUT,
    KVM_STATUS_BUDGET,
    KVM_STATUS_UNSUPPORTED,
    KVM_STATUS_IO,
    KVM_STATUS_BAD_PROFILE,
    KVM_STATUS_PANIC,
    KVM_STATUS_MISMATCH,
    KVM_STATUS_DEVICE,
});

impl kvm_status {
    /// Static, NUL-terminated description.
    pub(crate) fn describe(self) -> &'static std::ffi::CStr {
        use kvm_status::*;
        match self {
            KVM_STATUS_OK => c"ok",
            KVM_STATUS_NULL_ARG => c"a required pointer argument was NULL",
            KVM_STATUS_INVALID_ARG => c"invalid argument",
            KVM_STATUS_BAD_TYPE => c"unsupported ggml type",
            KVM_STATUS_BAD_LAYOUT => {
                c"inconsistent tensor view (shape, strides, alignment or overlap)"
            }
            KVM_STATUS_BUDGET => c"the window cannot free that many cells",
            KVM_STATUS_UNSUPPORTED => c"unsupported in this build",
            KVM_STATUS_IO => c"file i/o error",
            KVM_STATUS_BAD_PROFILE => c"bad calibration profile",
            KVM_STATUS_PANIC => c"internal error (panic caught)",
            KVM_STATUS_MISMATCH => c"plan does not match these views",
            KVM_STATUS_DEVICE => c"CUDA error",
        }
    }
}

/// Static, NUL-terminated description of a status code (any integer is accepted).
pub(crate) fn status_str(code: i32) -> &'static std::ffi::CStr {
    kvm_status::try_from(code).map_or(c"unknown status code", kvm_status::describe)
}
