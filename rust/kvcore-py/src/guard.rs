//! The one way bindings run core work (every call into `kvcore-core` goes through one of
//! these, so no `PanicException` can reach Python): panics and poisoned locks become `KVCoreError`, core
//! errors become their Python exceptions, and O(n) work can run with the GIL released.
//!
//! `core` names the part of kvcore in the panic message ("a bug in the {core} (panic)"),
//! `what` names the object a poisoned lock makes unusable.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use kvcore_core::KvError;
use pyo3::prelude::*;

use crate::errors;

pub type Core<T> = Result<T, KvError>;

/// What went wrong away from the GIL, turned into a Python error once it is held again.
enum Failure {
    Core(KvError),
    Poisoned,
    Panic,
}

fn to_py(py: Python<'_>, f: Failure, what: &str, core: &str) -> PyErr {
    match f {
        Failure::Core(e) => errors::to_py(py, e),
        Failure::Poisoned => errors::internal(
            py,
            &format!("the {what} is unusable after an earlier internal error"),
        ),
        Failure::Panic => errors::internal(py, &format!("a bug in the {core} (panic)")),
    }
}

fn call<T>(f: impl FnOnce() -> Core<T>) -> Result<T, Failure> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::Core(e)),
        Err(_) => Err(Failure::Panic),
    }
}

fn call_locked<S, T>(m: &Mutex<S>, f: impl FnOnce(&mut S) -> Core<T>) -> Result<T, Failure> {
    match catch_unwind(AssertUnwindSafe(|| m.lock().ok().map(|mut g| f(&mut g)))) {
        Ok(Some(Ok(v))) => Ok(v),
        Ok(Some(Err(e))) => Err(Failure::Core(e)),
        Ok(None) => Err(Failure::Poisoned),
        Err(_) => Err(Failure::Panic),
    }
}

/// Runs short core work (a constructor, a parse) holding the GIL.
pub fn held<T>(py: Python<'_>, core: &str, f: impl FnOnce() -> Core<T>) -> PyResult<T> {
    call(f).map_err(|e| to_py(py, e, "object", core))
}

/// Runs stateless core work with the GIL released.
pub fn detached<T: Send>(
    py: Python<'_>,
    core: &str,
    f: impl FnOnce() -> Core<T> + Send,
) -> PyResult<T> {
    py.detach(|| call(f))
        .map_err(|e| to_py(py, e, "object", core))
}

/// Locks `m` and runs `f` holding the GIL (for O(1) calls).
pub fn locked<S, T>(
    py: Python<'_>,
    m: &Mutex<S>,
    what: &str,
    core: &str,
    f: impl FnOnce(&mut S) -> Core<T>,
) -> PyResult<T> {
    call_locked(m, f).map_err(|e| to_py(py, e, what, core))
}

/// Locks `m` and runs `f` with the GIL released (for O(n) calls).
pub fn locked_detached<S: Send, T: Send>(
    py: Python<'_>,
    m: &Mutex<S>,
    what: &str,
    core: &str,
    f: impl FnOnce(&mut S) -> Core<T> + Send,
) -> PyResult<T> {
    py.detach(|| call_locked(m, f))
        .map_err(|e| to_py(py, e, what, core))
}
