//! Argument extraction with messages that name what was expected: the one place where the
//! bindings' rules for Python arguments live.
//!
//! * **Ids and counts** are Python `int`s, numpy integer scalars or 0-d integer arrays. Bools
//!   (Python, numpy or torch), floats, masked arrays and anything else raise `TypeError`.
//! * **Sizes** (a count that decides how much is allocated) are also checked against the
//!   machine's memory ([`size`]) before anything is allocated: `ValueError` naming the
//!   argument and the limit.
//! * **Arrays** are numpy arrays; masked arrays are refused (their mask would be ignored).
//!   They are borrowed zero-copy when they already have the wanted dtype and are contiguous;
//!   int32 ids and non-contiguous views (broadcasts included) are copied once, after their
//!   logical size was checked ([`copy_checked`]).
//! * **Sequences** of Python objects are read item by item, never trusting `__len__` for an
//!   allocation ([`sequence`]).

use std::borrow::Cow;

use kvcore_core::error::check_alloc;
use numpy::ndarray::{ArrayBase, Data, Dimension};
use numpy::{PyArray1, PyArrayDescrMethods, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyInt, PyString, PyType};
use pyo3::PyTypeInfo;

/// A borrowed (contiguous) or copied 1-D array.
pub enum Arr1<'py, T: numpy::Element> {
    Borrowed(numpy::PyReadonlyArray1<'py, T>),
    Owned(Vec<T>),
}

impl<'py, T: numpy::Element + Copy> Arr1<'py, T> {
    /// From a read-only view: borrowed when contiguous, else copied after a size check.
    fn new(ro: numpy::PyReadonlyArray1<'py, T>, name: &str) -> PyResult<Self> {
        if ro.as_slice().is_ok() {
            return Ok(Arr1::Borrowed(ro));
        }
        Ok(Arr1::Owned(copy_checked(&ro.as_array(), name)?))
    }

    pub fn as_cow(&self) -> Cow<'_, [T]> {
        match self {
            Arr1::Borrowed(a) => Cow::Borrowed(a.as_slice().unwrap_or_default()),
            Arr1::Owned(v) => Cow::Borrowed(v),
        }
    }
}

/// A `ValueError` from a core size error (it already names the argument and the limit).
pub fn size_error(e: kvcore_core::KvError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Checks that `count` entries of `bytes_each` bytes can be allocated at all.
pub fn check_len(name: &str, count: usize, bytes_each: usize) -> PyResult<()> {
    check_alloc(name, count, bytes_each).map_err(size_error)
}

/// The elements of an array view in logical (C) order, copied into a new vector once its
/// logical size is known to fit: a zero-stride broadcast of huge logical length holds little
/// memory but would take all of it once copied.
pub fn copy_checked<S, D>(a: &ArrayBase<S, D>, name: &str) -> PyResult<Vec<S::Elem>>
where
    S: Data,
    S::Elem: Copy,
    D: Dimension,
{
    check_len(name, a.len(), std::mem::size_of::<S::Elem>())?;
    let mut v = Vec::new();
    v.try_reserve_exact(a.len()).map_err(|_| {
        PyValueError::new_err(format!(
            "{name} is too large: cannot allocate {} entries",
            a.len()
        ))
    })?;
    v.extend(a.iter().copied());
    Ok(v)
}

pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn numpy_type<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyType>>,
    module: &str,
    name: &str,
) -> PyResult<Bound<'py, PyType>> {
    cell.import(py, module, name).cloned()
}

fn is_masked(obj: &Bound<'_, PyAny>) -> bool {
    // A plain ndarray (the usual argument) is not masked: skip the costlier isinstance call.
    if obj.get_type().is(PyUntypedArray::type_object(obj.py())) {
        return false;
    }
    static MASKED: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    numpy_type(obj.py(), &MASKED, "numpy.ma", "MaskedArray")
        .and_then(|t| obj.is_instance(&t))
        .unwrap_or(false)
}

fn is_numpy_integer(obj: &Bound<'_, PyAny>) -> bool {
    static INTEGER: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    numpy_type(obj.py(), &INTEGER, "numpy", "integer")
        .and_then(|t| obj.is_instance(&t))
        .unwrap_or(false)
}

fn dtype_name(arr: &Bound<'_, PyUntypedArray>) -> String {
    arr.dtype()
        .str()
        .map(|s| s.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The object as a numpy array (any shape), or a `TypeError` saying "`name` must be `what`".
/// Masked arrays are refused: the core would read the masked-out entries as valid.
pub fn ndarray<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    what: &(impl std::fmt::Display + ?Sized),
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!("{name} must be {what}, got {}", type_name(obj)))
    })?;
    if is_masked(obj) {
        return Err(PyTypeError::new_err(format!(
            "{name} must be {what}, got a masked array (pass arr.compressed() or \
             arr.filled(...) to say what the mask means)"
        )));
    }
    Ok(arr.clone())
}

/// The object as a 1-D numpy array, or a TypeError/ValueError naming `expected`.
fn untyped<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    expected: &str,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    // The description is formatted only when an error needs it.
    let arr = ndarray(obj, name, &format_args!("a 1-D numpy array of {expected}"))?;
    if arr.ndim() != 1 {
        return Err(PyValueError::new_err(format!(
            "{name} must be a 1-D numpy array of {expected}, got an array with shape {:?}",
            arr.shape()
        )));
    }
    Ok(arr)
}

fn wrong_dtype(arr: &Bound<'_, PyUntypedArray>, name: &str, expected: &str) -> PyErr {
    PyTypeError::new_err(format!(
        "{name} must be a 1-D numpy array of {expected}, got dtype {}",
        dtype_name(arr)
    ))
}

/// An int64 array; int32 is accepted and widened (one copy).
pub fn i64_array<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Arr1<'py, i64>> {
    const EXPECTED: &str = "int64 (or int32)";
    let arr = untyped(obj, name, EXPECTED)?;
    if let Ok(a) = arr.cast::<PyArray1<i64>>() {
        return Arr1::new(readonly(a, name)?, name);
    }
    if let Ok(a) = arr.cast::<PyArray1<i32>>() {
        let ro = readonly(a, name)?;
        check_len(name, ro.len(), std::mem::size_of::<i64>())?;
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
    Mask(Arr1<'py, bool>),
}

pub fn keep_array<'py>(obj: &Bound<'py, PyAny>) -> PyResult<KeepArg<'py>> {
    const EXPECTED: &str = "int64 positions (or int32) or a bool mask";
    let arr = untyped(obj, "keep", EXPECTED)?;
    if let Ok(a) = arr.cast::<PyArray1<bool>>() {
        return Ok(KeepArg::Mask(Arr1::new(readonly(a, "keep")?, "keep")?));
    }
    if arr.cast::<PyArray1<i64>>().is_ok() || arr.cast::<PyArray1<i32>>().is_ok() {
        return Ok(KeepArg::Positions(i64_array(obj, "keep")?));
    }
    Err(wrong_dtype(&arr, "keep", EXPECTED))
}

/// The object as an i64 if it is an integer by the bindings' rule: a Python `int`, a numpy
/// integer scalar or a 0-d integer array. Bools are rejected (`True` as a count or id is a
/// bug), and so are floats, masked arrays, arrays with dimensions and anything else.
/// `Ok(None)` means "an integer, but outside int64".
fn index_i64(obj: &Bound<'_, PyAny>, name: &str, what: &str) -> PyResult<Option<i64>> {
    let wrong = |got: String| PyTypeError::new_err(format!("{name} must be {what}, got {got}"));
    if obj.is_instance_of::<PyBool>() {
        return Err(wrong("bool".into()));
    }
    if let Ok(arr) = obj.cast::<PyUntypedArray>() {
        if is_masked(obj) {
            return Err(wrong("a masked array".into()));
        }
        if arr.ndim() != 0 {
            return Err(wrong(format!("an array of shape {:?}", arr.shape())));
        }
        if !matches!(arr.dtype().kind(), b'i' | b'u') {
            return Err(wrong(format!("a 0-d array of dtype {}", dtype_name(arr))));
        }
    } else if !obj.is_instance_of::<PyInt>() && !is_numpy_integer(obj) {
        return Err(wrong(type_name(obj)));
    }
    Ok(obj.extract::<i64>().ok())
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

/// A count that decides how much is allocated (`bytes_each` bytes per unit): checked against
/// the machine's memory before anything is allocated.
pub fn size(obj: &Bound<'_, PyAny>, name: &str, bytes_each: usize) -> PyResult<usize> {
    let n = count(obj, name)?;
    check_len(name, n, bytes_each)?;
    Ok(n)
}

/// A positive count (a thread count, a divisor).
pub fn positive(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<usize> {
    match count(obj, name)? {
        0 => Err(PyValueError::new_err(format!(
            "{name} must be positive, got 0"
        ))),
        n => Ok(n),
    }
}

/// True for a 0-d integer argument that should be broadcast rather than read as an array:
/// anything but a numpy array with dimensions (so that a wrong scalar type is reported by
/// [`count`], naming the accepted types).
pub fn is_scalar_int(obj: &Bound<'_, PyAny>) -> bool {
    obj.cast::<PyUntypedArray>().map_or(true, |a| a.ndim() == 0)
}

/// The items of a Python sequence (list, tuple, ...), each read by `item`. `__len__` is
/// checked against the memory limit (`bytes_each` per item) but never trusted for an
/// allocation, and at most `__len__` items are read, so neither a lying `__len__` nor an
/// endless iterator can abort or hang the call. A `str` is refused: it is a sequence of
/// characters, never what a caller means.
pub fn sequence<'py, T>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    expected: &str,
    bytes_each: usize,
    mut item: impl FnMut(&Bound<'py, PyAny>) -> PyResult<T>,
) -> PyResult<Vec<T>> {
    let wrong =
        || PyTypeError::new_err(format!("{name} must be {expected}, got {}", type_name(obj)));
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() {
        return Err(wrong());
    }
    let len = obj.len().map_err(|_| wrong())?;
    check_len(name, len, bytes_each)?;
    let mut out = Vec::new();
    for x in obj.try_iter().map_err(|_| wrong())?.take(len) {
        out.push(item(&x?)?);
    }
    if out.len() != len {
        return Err(PyValueError::new_err(format!(
            "{name} has len() {len} but yields {} items",
            out.len()
        )));
    }
    Ok(out)
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
