//! The panic and NULL boundary every export goes through.
//!
//! `guard` runs an export's body under `catch_unwind` (rayon re-raises worker panics in the
//! caller, so those land here too), turns any `Error` into its status code and remembers the
//! message for `kvm_last_error` on the calling thread, the way `dlerror` does.

use std::cell::RefCell;
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::status::kvm_status;
use crate::error::{Error, Result};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Pointer to this thread's last message; valid until the next failing call on this thread.
pub(crate) fn last_error_ptr() -> *const std::ffi::c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs `f`, mapping errors and panics to a status.
pub(crate) fn guard(f: impl FnOnce() -> Result<()>) -> kvm_status {
    let r =
        catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(Error::Panic(panic_message(p))));
    match r {
        Ok(()) => kvm_status::KVM_STATUS_OK,
        Err(e) => {
            set_last_error(&e.to_string());
            kvm_status::from(&e)
        }
    }
}

/// Runs `f` for exports that return a value rather than a status; a panic gives `default`.
pub(crate) fn guard_value<T>(default: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        set_last_error(&Error::Panic(panic_message(p)).to_string());
        default
    })
}

/// `&T` from a pointer, or `NULL_ARG` naming the parameter.
macro_rules! try_ref {
    ($p:expr, $name:literal) => {
        // SAFETY: the caller promises a non-NULL pointer is valid (each export's contract).
        match unsafe { $p.as_ref() } {
            Some(r) => r,
            None => return Err($crate::error::Error::NullArg($name)),
        }
    };
}

/// `&mut T` from a pointer, or `NULL_ARG`.
macro_rules! try_mut {
    ($p:expr, $name:literal) => {
        // SAFETY: as in `try_ref`, plus exclusive for the call.
        match unsafe { $p.as_mut() } {
            Some(r) => r,
            None => return Err($crate::error::Error::NullArg($name)),
        }
    };
}

/// A slice from pointer and length; NULL is fine when the length is 0.
macro_rules! try_slice {
    ($p:expr, $len:expr, $name:literal) => {{
        let (p, len) = ($p, $len as usize);
        if len == 0 {
            &[][..]
        } else if p.is_null() {
            return Err($crate::error::Error::NullArg($name));
        } else {
            // SAFETY: the caller promises `len` valid elements at a non-NULL `p`.
            unsafe { std::slice::from_raw_parts(p, len) }
        }
    }};
}

/// A writable slice from pointer and length; NULL is fine when the length is 0.
macro_rules! try_slice_mut {
    ($p:expr, $len:expr, $name:literal) => {{
        let (p, len) = ($p, $len as usize);
        if len == 0 {
            &mut [][..]
        } else if p.is_null() {
            return Err($crate::error::Error::NullArg($name));
        } else {
            // SAFETY: the caller promises `len` writable elements at a non-NULL `p`, not
            // aliased during the call.
            unsafe { std::slice::from_raw_parts_mut(p, len) }
        }
    }};
}

/// Optional slice: NULL means absent.
macro_rules! opt_slice {
    ($p:expr, $len:expr) => {{
        let (p, len) = ($p, $len as usize);
        if p.is_null() {
            None
        } else if len == 0 {
            Some(&[][..])
        } else {
            // SAFETY: the caller promises `len` valid elements at a non-NULL `p`.
            Some(unsafe { std::slice::from_raw_parts(p, len) })
        }
    }};
}

pub(crate) use {opt_slice, try_mut, try_ref, try_slice, try_slice_mut};

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    fn last_error() -> String {
        // SAFETY: a NUL-terminated thread-local string, valid until the next failing call here.
        unsafe { std::ffi::CStr::from_ptr(last_error_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    // No export can be made to panic on purpose (that would be the bug), so the guard itself is
    // tested: a panic on the calling thread or on a rayon worker becomes KVM_STATUS_PANIC with
    // its message, and the thread goes on.
    #[test]
    fn a_panic_becomes_the_panic_status() {
        let st = guard(|| panic!("planned failure {}", 7));
        assert_eq!(st, kvm_status::KVM_STATUS_PANIC);
        assert!(
            last_error().contains("planned failure 7"),
            "{}",
            last_error()
        );

        let st = guard(|| {
            (0..64u32).into_par_iter().for_each(|i| {
                if i == 41 {
                    panic!("worker {i} failed");
                }
            });
            Ok(())
        });
        assert_eq!(st, kvm_status::KVM_STATUS_PANIC);
        assert!(
            last_error().contains("worker 41 failed"),
            "{}",
            last_error()
        );

        assert_eq!(guard_value(-1, || -> i32 { panic!("value") }), -1);
        assert!(last_error().contains("value"));
        assert_eq!(guard(|| Ok(())), kvm_status::KVM_STATUS_OK);
    }
}
