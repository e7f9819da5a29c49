//! The one place where core errors become Python exceptions.
//!
//! The classes are built at import time by calling `type(name, bases, namespace)`, so that
//! the value errors can also be caught as `ValueError` and the table errors as `LookupError`
//! (multiple bases, which `create_exception!` cannot express).

use kvcore_core::KvError;
use pyo3::exceptions::{PyException, PyLookupError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

/// The exception classes of `kvcore._kvcore`, created once per interpreter.
pub struct ErrorTypes {
    pub base: Py<PyType>,
    pub out_of_blocks: Py<PyType>,
    pub unknown_table: Py<PyType>,
    pub table_freed: Py<PyType>,
    pub invalid_positions: Py<PyType>,
    pub invariant: Py<PyType>,
}

static TYPES: PyOnceLock<ErrorTypes> = PyOnceLock::new();

fn new_type<'py>(
    py: Python<'py>,
    name: &str,
    doc: &str,
    bases: &[&Bound<'py, PyType>],
) -> PyResult<Py<PyType>> {
    let ns = PyDict::new(py);
    ns.set_item("__module__", "kvcore")?;
    ns.set_item("__doc__", doc)?;
    let bases = PyTuple::new(py, bases)?;
    let ty = py.get_type::<PyType>().call1((name, bases, ns))?;
    Ok(ty.cast_into::<PyType>()?.unbind())
}

/// The exception classes, created on first use.
pub fn types(py: Python<'_>) -> PyResult<&ErrorTypes> {
    TYPES.get_or_try_init(py, || {
        let exc = py.get_type::<PyException>();
        let value = py.get_type::<PyValueError>();
        let lookup = py.get_type::<PyLookupError>();
        let base = new_type(
            py,
            "KVCoreError",
            "Base class of every error raised by kvcore's core.",
            &[&exc],
        )?;
        let b = base.bind(py).clone();
        Ok(ErrorTypes {
            out_of_blocks: new_type(
                py,
                "OutOfBlocksError",
                "The pool cannot supply the blocks a request needs. An expected outcome, not a \
                 bug: the allocator is left exactly as it was before the call.",
                &[&b],
            )?,
            unknown_table: new_type(
                py,
                "UnknownTableError",
                "A table id that this allocator never handed out.",
                &[&b, &lookup],
            )?,
            table_freed: new_type(
                py,
                "TableFreedError",
                "A table id that was already freed (double free or use after free).",
                &[&b, &lookup],
            )?,
            invalid_positions: new_type(
                py,
                "InvalidPositionsError",
                "Keep positions out of range, unsorted or duplicated, or a mask of the wrong \
                 length.",
                &[&b, &value],
            )?,
            invariant: new_type(
                py,
                "InvariantError",
                "check_invariants found an inconsistency: a bug in kvcore, never a user error.",
                &[&b],
            )?,
            base,
        })
    })
}

fn raise(py: Python<'_>, ty: &Py<PyType>, msg: String) -> PyErr {
    PyErr::from_type(ty.bind(py).clone(), msg)
}

/// Maps a core error to its Python exception.
pub fn to_py(py: Python<'_>, e: KvError) -> PyErr {
    let t = match types(py) {
        Ok(t) => t,
        Err(err) => return err,
    };
    let msg = e.to_string();
    match e {
        KvError::OutOfBlocks { .. } => raise(py, &t.out_of_blocks, msg),
        KvError::UnknownTable(_) => raise(py, &t.unknown_table, msg),
        KvError::TableFreed(_) => raise(py, &t.table_freed, msg),
        KvError::InvalidPositions(_) => raise(py, &t.invalid_positions, msg),
        KvError::InvalidArgument(_) => PyValueError::new_err(msg),
        KvError::InvariantViolation(_) => raise(py, &t.invariant, msg),
    }
}

/// An `UnknownTableError` for an id that does not even fit int64.
pub fn unknown_table(py: Python<'_>, msg: String) -> PyErr {
    match types(py) {
        Ok(t) => raise(py, &t.unknown_table, msg),
        Err(err) => err,
    }
}

/// An internal failure (a panic caught at the boundary, or a lock poisoned by one).
pub fn internal(py: Python<'_>, what: &str) -> PyErr {
    match types(py) {
        Ok(t) => raise(py, &t.base, format!("internal error in kvcore: {what}")),
        Err(err) => err,
    }
}

/// Registers the classes in the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let t = types(m.py())?;
    m.add("KVCoreError", &t.base)?;
    m.add("OutOfBlocksError", &t.out_of_blocks)?;
    m.add("UnknownTableError", &t.unknown_table)?;
    m.add("TableFreedError", &t.table_freed)?;
    m.add("InvalidPositionsError", &t.invalid_positions)?;
    m.add("InvariantError", &t.invariant)?;
    Ok(())
}
