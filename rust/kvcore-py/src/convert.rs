//! Argument extraction with messages that name what was expected.
//!
//! Arrays are borrowed zero-copy when they already have the wanted dtype and are contiguous;
//! int32 ids and non-contiguous views are copied once into a Rust vector.

use std::borrow::Cow;

use numpy::{PyArray1, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyInt, PyString};

/// A borrowed or copied 1-D array.
pub enum Arr1<'py, T: numpy::Element> {
    Borrowed(numpy::PyReadonlyArray1<'py, T>),
    Owned(Vec<T>),
}

impl<'py, T: numpy::Element + Copy> Arr1<'py, T> {
    pub fn as_cow(&self) -> Cow<'_, [T]> {
        match self {
            Arr1::Borrowed(a) => match a.as_slice() {
                Ok(s) => Cow::Borrowed(s),
                Err(_) => Cow::Owned(a.as_array().iter().copied().collect()),
            },
            Arr1::Owned(v) => Cow::Borrowed(v),
        }
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The object as a 1-D numpy array, or a TypeError/ValueError naming `expected`.
fn untyped<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    expected: &str,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a 1-D numpy array of {expected}, got {}",
            type_name(obj)
        ))
    })?;
    if arr.ndim() != 1 {
        return Err(PyValueError::new_err(format!(
            "{name} must be a 1-D numpy array of {expected}, got an array with shape {:?}",
            arr.shape()
        )));
    }
    Ok(arr.clone())
}

fn wrong_dtype(arr: &Bound<'_, PyUntypedArray>, name: &str, expected: &str) -> PyErr {
    let got = arr
        .dtype()
        .str()
        .map(|s| s.to_string())
        .unwrap_or_else(|_| "?".into());
    PyTypeError::new_err(format!(
        "{name} must be a 1-D numpy array of {expected}, got dtype {got}"
    ))
}

/// An int64 array; int32 is accepted and widened (one copy).
pub fn i64_array<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Arr1<'py, i64>> {
    const EXPECTED: &str = "int64 (or int32)";
    let arr = untyped(obj, name, EXPECTED)?;
    if let Ok(a) = arr.cast::<PyArray1<i64>>() {
        return Ok(Arr1::Borrowed(readonly(a, name)?));
    }
    if let Ok(a) = arr.cast::<PyArray1<i32>>() {
        let ro = readonly(a, name)?;
        return Ok(Arr1::Owned(
            ro.as_array().iter().map(|&x| i64::from(x)).collect(),
        ));
    }
    Err(wrong_dtype(&arr, name, EXPECTED))
}

fn readonly<'py, T: numpy::Element>(
    a: &Bound<'py, PyArray1<T>>,
    name: &str,
) -> PyResult<numpy::PyReadonlyArray1<'py, T>> {
    a.try_readonly().map_err(|e| {
        PyValueError::new_err(format!(
            "{name} cannot be read: it is borrowed mutably ({e})"
        ))
    })
}

/// Keep positions: int64/int32 positions, or a bool mask.
pub enum KeepArg<'py> {
    Positions(Arr1<'py, i64>),
    Mask(numpy::PyReadonlyArray1<'py, bool>),
}

pub fn keep_array<'py>(obj: &Bound<'py, PyAny>) -> PyResult<KeepArg<'py>> {
    const EXPECTED: &str = "int64 positions (or int32) or a bool mask";
    let arr = untyped(obj, "keep", EXPECTED)?;
    if let Ok(a) = arr.cast::<PyArray1<bool>>() {
        return Ok(KeepArg::Mask(readonly(a, "keep")?));
    }
    if arr.cast::<PyArray1<i64>>().is_ok() || arr.cast::<PyArray1<i32>>().is_ok() {
        return Ok(KeepArg::Positions(i64_array(obj, "keep")?));
    }
    Err(wrong_dtype(&arr, "keep", EXPECTED))
}

/// The object as an i64 if it is an integer (Python int or anything with `__index__`, such
/// as numpy integer scalars). Bools are rejected: `True` as a count or id is a bug.
/// `Ok(None)` means "an integer, but outside int64".
fn index_i64(obj: &Bound<'_, PyAny>, name: &str, what: &str) -> PyResult<Option<i64>> {
    if obj.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(format!(
            "{name} must be {what}, got bool"
        )));
    }
    match obj.extract::<i64>() {
        Ok(v) => Ok(Some(v)),
        Err(_) if obj.hasattr("__index__").unwrap_or(false) => Ok(None),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{name} must be {what}, got {}",
            type_name(obj)
        ))),
    }
}

/// A non-negative count. Rejects bools, floats and ints that do not fit int64.
pub fn count(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<usize> {
    match index_i64(obj, name, "an int")? {
        Some(v) if v >= 0 => Ok(v as usize),
        Some(v) => Err(PyValueError::new_err(format!(
            "{name} must be non-negative, got {v}"
        ))),
        None => Err(PyValueError::new_err(format!(
            "{name} must be an int in [0, 2**63), got {obj}"
        ))),
    }
}

/// True for a 0-d integer that should be broadcast (a Python int or a numpy integer scalar).
pub fn is_scalar_int(obj: &Bound<'_, PyAny>) -> bool {
    obj.cast::<PyUntypedArray>().is_err() && obj.hasattr("__index__").unwrap_or(false)
}

/// A table id. Ints outside int64 cannot name a table: `UnknownTableError`.
pub fn table_id(obj: &Bound<'_, PyAny>) -> PyResult<i64> {
    index_i64(obj, "table", "an int table id")?.ok_or_else(|| {
        crate::errors::unknown_table(
            obj.py(),
            format!("unknown table id {obj}: it was never created by this allocator"),
        )
    })
}

/// The salt's bytes, tagged by type so that `1`, `"1"` and `b"1"` differ.
pub fn salt(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<u8>>> {
    let Some(obj) = obj else { return Ok(None) };
    if obj.is_none() {
        return Ok(None);
    }
    let mut out = Vec::new();
    if obj.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(
            "salt must be an int, str or bytes, got bool",
        ));
    } else if obj.is_instance_of::<PyInt>() {
        let v: i128 = obj.extract().map_err(|_| {
            PyValueError::new_err(format!("an int salt must fit in 64 bits, got {obj}"))
        })?;
        if v < i128::from(i64::MIN) || v > i128::from(u64::MAX) {
            return Err(PyValueError::new_err(format!(
                "an int salt must fit in 64 bits, got {v}"
            )));
        }
        out.push(b'i');
        out.extend_from_slice(&v.to_le_bytes());
    } else if let Ok(s) = obj.cast::<PyString>() {
        out.push(b's');
        out.extend_from_slice(s.to_str()?.as_bytes());
    } else if let Ok(b) = obj.cast::<PyBytes>() {
        out.push(b'b');
        out.extend_from_slice(b.as_bytes());
    } else {
        return Err(PyTypeError::new_err(format!(
            "salt must be an int, str, bytes or None, got {}",
            type_name(obj)
        )));
    }
    Ok(Some(out))
}
