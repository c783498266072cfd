//! The one internal error type. Every failure inside the crate is an `Error`; the C boundary
//! maps it to a stable `kvm_status` code (src/ffi/status.rs) and keeps its message for
//! `kvm_last_error`.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// A required pointer argument was NULL; the payload names it.
    NullArg(&'static str),
    /// A scalar argument or parameter is out of range.
    InvalidArg(String),
    /// A view uses a ggml type we do not handle (or not in that role).
    BadType { what: String, type_id: i32 },
    /// A view's shape or strides are inconsistent, overflow, overlap another view, or are
    /// misaligned for the type.
    BadLayout(String),
    /// The window cannot give up that many cells under the protections asked for.
    Budget { want: usize, can: usize },
    /// The request is valid but this build cannot do it (e.g. CUDA without the feature).
    Unsupported(String),
    /// Reading or writing a profile file failed.
    Io(String),
    /// A profile file is malformed or does not fit the cache it is used with.
    BadProfile(String),
    /// A plan was applied to views whose shapes differ from those it was planned on.
    Mismatch(String),
    /// A CUDA call or kernel failed (launch, copy, allocation, or an error a kernel left).
    Device(String),
    /// An internal bug was caught at the boundary.
    Panic(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NullArg(name) => write!(f, "argument `{name}` is NULL"),
            Error::InvalidArg(m) => write!(f, "invalid argument: {m}"),
            Error::BadType { what, type_id } => {
                write!(f, "{what}: unsupported ggml type id {type_id}")
            }
            Error::BadLayout(m) => write!(f, "bad tensor view: {m}"),
            Error::Budget { want, can } => write!(
                f,
                "cannot free {want} cells: at most {can} cells of the window may be freed"
            ),
            Error::Unsupported(m) => write!(f, "unsupported: {m}"),
            Error::Io(m) => write!(f, "i/o error: {m}"),
            Error::BadProfile(m) => write!(f, "bad calibration profile: {m}"),
            Error::Mismatch(m) => write!(f, "plan does not match these views: {m}"),
            Error::Device(m) => write!(f, "CUDA error: {m}"),
            Error::Panic(m) => write!(f, "internal error (panic caught): {m}"),
        }
    }
}

impl std::error::Error for Error {}
