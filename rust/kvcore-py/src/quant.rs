//! Bindings for `kvcore_core::quant`: `QuantLayout`, `quantize` / `dequantize`, `KiviCache`,
//! `kivi_nbytes` and `MixedPrecisionStore`. See `_kvcore.pyi` for the user documentation.
//!
//! Float input is float32, float16 or uint16 holding bfloat16 bits; it is borrowed zero-copy
//! when contiguous. The codec runs with the GIL released.

use std::borrow::Cow;
use std::sync::Mutex;

use kvcore_core::quant::{
    self, GroupAxis, Input, KiviCache, MetaDtype, MixedPrecisionStore, QuantLayout, Tier,
};
use numpy::{
    PyArray1, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::convert;

use crate::guard::{self, Core};

/// Runs core work with the GIL released; a panic becomes a `KVCoreError`.
fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> Core<T> + Send) -> PyResult<T> {
    guard::detached(py, "quantization core", f)
}

/// Runs short core work holding the GIL; a panic becomes a `KVCoreError`.
fn core<T>(py: Python<'_>, f: impl FnOnce() -> Core<T>) -> PyResult<T> {
    guard::held(py, "quantization core", f)
}

fn dtype_str(arr: &Bound<'_, PyUntypedArray>) -> String {
    arr.dtype()
        .str()
        .map(|s| s.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn array<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    expected: &str,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    convert::ndarray(obj, name, &format!("a numpy array of {expected}"))
}

/// The elements of a numpy array in C order, borrowed when C-contiguous, else copied after a
/// size check.
fn elems<'a, T: numpy::Element + Copy>(
    ro: &'a numpy::PyReadonlyArrayDyn<'_, T>,
    name: &str,
) -> PyResult<Cow<'a, [T]>> {
    match ro.as_slice() {
        Ok(s) if ro.is_c_contiguous() => Ok(Cow::Borrowed(s)),
        _ => Ok(Cow::Owned(convert::copy_checked(&ro.as_array(), name)?)),
    }
}

fn readonly<'py, T: numpy::Element>(
    a: &Bound<'py, PyArrayDyn<T>>,
    name: &str,
) -> PyResult<numpy::PyReadonlyArrayDyn<'py, T>> {
    a.try_readonly().map_err(|e| {
        PyValueError::new_err(format!(
            "{name} cannot be read: it is borrowed mutably ({e})"
        ))
    })
}

/// A float input array, borrowed read-only: float32, float16 (as its bits) or bfloat16 bits.
enum FloatArr<'py> {
    F32(numpy::PyReadonlyArrayDyn<'py, f32>),
    F16(numpy::PyReadonlyArrayDyn<'py, u16>),
    Bf16(numpy::PyReadonlyArrayDyn<'py, u16>),
}

const FLOAT_EXPECTED: &str = "float32, float16 or uint16 (bfloat16 bits)";

fn float_array<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<(FloatArr<'py>, Vec<usize>)> {
    let arr = array(obj, name, FLOAT_EXPECTED)?;
    let shape = arr.shape().to_vec();
    if let Ok(a) = arr.cast::<PyArrayDyn<f32>>() {
        return Ok((FloatArr::F32(readonly(a, name)?), shape));
    }
    if let Ok(a) = arr.cast::<PyArrayDyn<u16>>() {
        return Ok((FloatArr::Bf16(readonly(a, name)?), shape));
    }
    let dt = arr.dtype();
    if dt.kind() == b'f' && dt.itemsize() == 2 {
        // float16: reinterpret the bits (numpy's view shares the memory, no copy).
        let v = obj.call_method1("view", ("uint16",))?;
        let a = v.cast::<PyArrayDyn<u16>>()?.clone();
        return Ok((FloatArr::F16(readonly(&a, name)?), shape));
    }
    Err(PyTypeError::new_err(format!(
        "{name} must be a numpy array of {FLOAT_EXPECTED}, got dtype {}",
        dtype_str(&arr)
    )))
}

fn f32_array<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<(numpy::PyReadonlyArrayDyn<'py, f32>, Vec<usize>)> {
    let arr = array(obj, name, "float32")?;
    let shape = arr.shape().to_vec();
    match arr.cast::<PyArrayDyn<f32>>() {
        Ok(a) => Ok((readonly(a, name)?, shape)),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{name} must be a numpy array of float32, got dtype {}",
            dtype_str(&arr)
        ))),
    }
}

/// A `(n, head_dim)` float32 array, as a flat vector.
fn tokens(obj: &Bound<'_, PyAny>, name: &str, head_dim: usize) -> PyResult<Vec<f32>> {
    let (ro, shape) = f32_array(obj, name)?;
    if shape.len() != 2 || shape[1] != head_dim {
        return Err(PyValueError::new_err(format!(
            "{name} must have shape (num_tokens, head_dim={head_dim}), got {shape:?}"
        )));
    }
    Ok(elems(&ro, name)?.into_owned())
}

/// See `_kvcore.pyi`.
#[pyclass(frozen, eq, hash, name = "QuantLayout", module = "kvcore._kvcore")]
#[derive(PartialEq, Eq, Hash, Clone)]
pub struct PyQuantLayout {
    pub inner: QuantLayout,
}

#[pymethods]
impl PyQuantLayout {
    #[new]
    #[pyo3(signature = (bits, group_size, num_tokens, head_dim, axis = "channel", meta_dtype = "float16"))]
    fn new(
        py: Python<'_>,
        bits: &Bound<'_, PyAny>,
        group_size: &Bound<'_, PyAny>,
        num_tokens: &Bound<'_, PyAny>,
        head_dim: &Bound<'_, PyAny>,
        axis: &str,
        meta_dtype: &str,
    ) -> PyResult<Self> {
        let bits = u32::try_from(convert::count(bits, "bits")?).unwrap_or(u32::MAX);
        let group_size = convert::count(group_size, "group_size")?;
        let num_tokens = convert::count(num_tokens, "num_tokens")?;
        let head_dim = convert::count(head_dim, "head_dim")?;
        let axis = core(py, || GroupAxis::parse(axis))?;
        let meta = meta_arg(py, meta_dtype)?;
        let inner = core(py, || {
            QuantLayout::new(bits, group_size, axis, meta, num_tokens, head_dim)
        })?;
        Ok(PyQuantLayout { inner })
    }

    #[getter]
    fn bits(&self) -> u32 {
        self.inner.bits()
    }
    #[getter]
    fn group_size(&self) -> usize {
        self.inner.group_size()
    }
    #[getter]
    fn num_tokens(&self) -> usize {
        self.inner.num_tokens()
    }
    #[getter]
    fn head_dim(&self) -> usize {
        self.inner.head_dim()
    }
    #[getter]
    fn axis(&self) -> &'static str {
        self.inner.axis().name()
    }
    #[getter]
    fn meta_dtype(&self) -> &'static str {
        self.inner.meta().name()
    }
    #[getter]
    fn num_groups(&self) -> usize {
        self.inner.num_groups()
    }
    #[getter]
    fn codes_bytes(&self) -> usize {
        self.inner.codes_bytes()
    }
    #[getter]
    fn scales_offset(&self) -> usize {
        self.inner.scales_offset()
    }
    #[getter]
    fn zeros_offset(&self) -> usize {
        self.inner.zeros_offset()
    }
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }

    fn __repr__(&self) -> String {
        let l = &self.inner;
        format!(
            "QuantLayout(bits={}, group_size={}, num_tokens={}, head_dim={}, axis='{}', meta_dtype='{}')",
            l.bits(),
            l.group_size(),
            l.num_tokens(),
            l.head_dim(),
            l.axis().name(),
            l.meta().name()
        )
    }
}

fn block_shape(shape: &[usize], layout: &QuantLayout, name: &str) -> PyResult<Vec<usize>> {
    let n = shape.len();
    if n < 2 || shape[n - 2] != layout.num_tokens() || shape[n - 1] != layout.head_dim() {
        return Err(PyValueError::new_err(format!(
            "{name} must have shape (..., num_tokens={}, head_dim={}), got {shape:?}",
            layout.num_tokens(),
            layout.head_dim()
        )));
    }
    Ok(shape[..n - 2].to_vec())
}

/// See `_kvcore.pyi`.
#[pyfunction]
pub fn quantize<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    layout: &PyQuantLayout,
) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    let l = layout.inner;
    let (arr, shape) = float_array(x, "x")?;
    let mut out_shape = block_shape(&shape, &l, "x")?;
    let buf = match &arr {
        FloatArr::F32(ro) => {
            let s = elems(ro, "x")?;
            detached(py, || quant::quantize(Input::F32(&s), &l))?
        }
        FloatArr::F16(ro) => {
            let s = elems(ro, "x")?;
            detached(py, || quant::quantize(Input::F16(&s), &l))?
        }
        FloatArr::Bf16(ro) => {
            let s = elems(ro, "x")?;
            detached(py, || quant::quantize(Input::Bf16(&s), &l))?
        }
    };
    out_shape.push(l.nbytes());
    PyArray1::from_vec(py, buf).reshape(out_shape)
}

/// See `_kvcore.pyi`.
#[pyfunction]
pub fn dequantize<'py>(
    py: Python<'py>,
    blocks: &Bound<'py, PyAny>,
    layout: &PyQuantLayout,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let l = layout.inner;
    let arr = array(blocks, "blocks", "uint8")?;
    let shape = arr.shape().to_vec();
    let a = arr.cast::<PyArrayDyn<u8>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "blocks must be a numpy array of uint8, got dtype {}",
            dtype_str(&arr)
        ))
    })?;
    if shape.is_empty() || shape[shape.len() - 1] != l.nbytes() {
        return Err(PyValueError::new_err(format!(
            "blocks must have shape (..., nbytes={}), got {shape:?}",
            l.nbytes()
        )));
    }
    let ro = readonly(a, "blocks")?;
    // The output holds num_tokens * head_dim float32 values per block.
    let per_block = l.num_tokens().saturating_mul(l.head_dim());
    let num_blocks = shape[..shape.len() - 1].iter().product::<usize>();
    convert::check_len("blocks", num_blocks.saturating_mul(per_block), 4)?;
    let s = elems(&ro, "blocks")?;
    let out = detached(py, || quant::dequantize(&s, &l))?;
    let mut out_shape = shape[..shape.len() - 1].to_vec();
    out_shape.push(l.num_tokens());
    out_shape.push(l.head_dim());
    PyArray1::from_vec(py, out).reshape(out_shape)
}

fn meta_arg(py: Python<'_>, s: &str) -> PyResult<MetaDtype> {
    core(py, || MetaDtype::parse(s))
}

fn bits_arg(obj: Option<&Bound<'_, PyAny>>) -> PyResult<u32> {
    Ok(u32::try_from(count_or(obj, "bits", 2)?).unwrap_or(u32::MAX))
}

fn count_or(obj: Option<&Bound<'_, PyAny>>, name: &str, default: usize) -> PyResult<usize> {
    match obj {
        Some(o) if !o.is_none() => convert::count(o, name),
        _ => Ok(default),
    }
}

/// See `_kvcore.pyi`.
#[pyfunction]
#[pyo3(signature = (num_tokens, head_dim, bits = None, group_size = None, residual = None, meta_dtype = "float16"),
       text_signature = "(num_tokens, head_dim, bits=2, group_size=32, residual=32, meta_dtype='float16')")]
pub fn kivi_nbytes(
    py: Python<'_>,
    num_tokens: &Bound<'_, PyAny>,
    head_dim: &Bound<'_, PyAny>,
    bits: Option<&Bound<'_, PyAny>>,
    group_size: Option<&Bound<'_, PyAny>>,
    residual: Option<&Bound<'_, PyAny>>,
    meta_dtype: &str,
) -> PyResult<usize> {
    let (n, d) = (
        convert::count(num_tokens, "num_tokens")?,
        convert::count(head_dim, "head_dim")?,
    );
    let (b, g) = (bits_arg(bits)?, count_or(group_size, "group_size", 32)?);
    let (r, m) = (
        count_or(residual, "residual", 32)?,
        meta_arg(py, meta_dtype)?,
    );
    core(py, || quant::kivi_nbytes(n, d, b, g, r, m))
}

fn locked<T, R>(py: Python<'_>, m: &Mutex<T>, f: impl FnOnce(&mut T) -> Core<R>) -> PyResult<R> {
    guard::locked(py, m, "object", "quantization core", f)
}

/// Like `locked`, with the GIL released while the core works.
fn locked_detached<T: Send, R: Send>(
    py: Python<'_>,
    m: &Mutex<T>,
    f: impl FnOnce(&mut T) -> Core<R> + Send,
) -> PyResult<R> {
    guard::locked_detached(py, m, "object", "quantization core", f)
}

fn rows<'py>(py: Python<'py>, v: Vec<f32>, d: usize) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
    let n = v.len() / d.max(1);
    PyArray1::from_vec(py, v).reshape([n, d])
}

/// See `_kvcore.pyi`.
#[pyclass(frozen, name = "KiviCache", module = "kvcore._kvcore")]
pub struct PyKiviCache {
    inner: Mutex<KiviCache>,
    head_dim: usize,
}

#[pymethods]
impl PyKiviCache {
    #[new]
    #[pyo3(signature = (head_dim, bits = None, group_size = None, residual = None, meta_dtype = "float16"),
           text_signature = "(head_dim, bits=2, group_size=32, residual=32, meta_dtype='float16')")]
    fn new(
        py: Python<'_>,
        head_dim: &Bound<'_, PyAny>,
        bits: Option<&Bound<'_, PyAny>>,
        group_size: Option<&Bound<'_, PyAny>>,
        residual: Option<&Bound<'_, PyAny>>,
        meta_dtype: &str,
    ) -> PyResult<Self> {
        let head_dim = convert::count(head_dim, "head_dim")?;
        let (b, g) = (bits_arg(bits)?, count_or(group_size, "group_size", 32)?);
        let (r, m) = (
            count_or(residual, "residual", 32)?,
            meta_arg(py, meta_dtype)?,
        );
        let c = core(py, || KiviCache::new(head_dim, b, g, r, m))?;
        Ok(PyKiviCache {
            inner: Mutex::new(c),
            head_dim,
        })
    }

    fn append(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let k = tokens(keys, "keys", self.head_dim)?;
        let v = tokens(values, "values", self.head_dim)?;
        if k.len() != v.len() {
            return Err(PyValueError::new_err(format!(
                "keys and values must have the same number of tokens, got {} and {}",
                k.len() / self.head_dim.max(1),
                v.len() / self.head_dim.max(1)
            )));
        }
        locked_detached(py, &self.inner, |c| c.append(&k, &v))
    }

    fn keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
        let v = locked(py, &self.inner, |c| c.keys())?;
        rows(py, v, self.head_dim)
    }

    fn values<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
        let v = locked(py, &self.inner, |c| c.values())?;
        rows(py, v, self.head_dim)
    }

    #[getter]
    fn nbytes(&self, py: Python<'_>) -> PyResult<usize> {
        locked(py, &self.inner, |c| Ok(c.nbytes()))
    }
    #[getter]
    fn num_tokens(&self, py: Python<'_>) -> PyResult<usize> {
        locked(py, &self.inner, |c| Ok(c.num_tokens()))
    }
    #[getter]
    fn num_quantized_keys(&self, py: Python<'_>) -> PyResult<usize> {
        locked(py, &self.inner, |c| Ok(c.num_quantized_keys()))
    }
    #[getter]
    fn num_quantized_values(&self, py: Python<'_>) -> PyResult<usize> {
        locked(py, &self.inner, |c| Ok(c.num_quantized_values()))
    }
    #[getter]
    fn key_layout(&self, py: Python<'_>) -> PyResult<PyQuantLayout> {
        locked(py, &self.inner, |c| {
            Ok(PyQuantLayout {
                inner: *c.key_layout(),
            })
        })
    }
    #[getter]
    fn value_layout(&self, py: Python<'_>) -> PyResult<PyQuantLayout> {
        locked(py, &self.inner, |c| {
            Ok(PyQuantLayout {
                inner: *c.value_layout(),
            })
        })
    }
}

fn tier_arg(py: Python<'_>, s: &str) -> PyResult<Tier> {
    core(py, || Tier::parse(s))
}

/// See `_kvcore.pyi`.
#[pyclass(frozen, name = "MixedPrecisionStore", module = "kvcore._kvcore")]
pub struct PyMixedPrecisionStore {
    inner: Mutex<MixedPrecisionStore>,
    head_dim: usize,
}

#[pymethods]
impl PyMixedPrecisionStore {
    #[new]
    #[pyo3(signature = (head_dim, group_size = None, meta_dtype = "float16"),
           text_signature = "(head_dim, group_size=32, meta_dtype='float16')")]
    fn new(
        py: Python<'_>,
        head_dim: &Bound<'_, PyAny>,
        group_size: Option<&Bound<'_, PyAny>>,
        meta_dtype: &str,
    ) -> PyResult<Self> {
        let head_dim = convert::count(head_dim, "head_dim")?;
        let (g, m) = (
            count_or(group_size, "group_size", 32)?,
            meta_arg(py, meta_dtype)?,
        );
        let s = core(py, || MixedPrecisionStore::new(head_dim, g, m))?;
        Ok(PyMixedPrecisionStore {
            inner: Mutex::new(s),
            head_dim,
        })
    }

    fn append(&self, py: Python<'_>, x: &Bound<'_, PyAny>, tier: &str) -> PyResult<()> {
        let t = tier_arg(py, tier)?;
        let v = tokens(x, "x", self.head_dim)?;
        locked_detached(py, &self.inner, |s| s.append(&v, t))
    }

    fn demote(&self, py: Python<'_>, positions: &Bound<'_, PyAny>, tier: &str) -> PyResult<()> {
        let t = tier_arg(py, tier)?;
        let p = convert::i64_array(positions, "positions")?;
        let p: Vec<usize> = p
            .as_cow()
            .iter()
            .map(|&i| usize::try_from(i).unwrap_or(usize::MAX))
            .collect();
        locked_detached(py, &self.inner, |s| s.demote(&p, t))
    }

    fn read<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
        let v = locked_detached(py, &self.inner, |s| s.read())?;
        rows(py, v, self.head_dim)
    }

    fn tiers(&self, py: Python<'_>) -> PyResult<Vec<&'static str>> {
        locked(py, &self.inner, |s| {
            Ok(s.tiers().iter().map(|t| t.name()).collect())
        })
    }

    fn token_nbytes(&self, py: Python<'_>, tier: &str) -> PyResult<usize> {
        let t = tier_arg(py, tier)?;
        locked(py, &self.inner, |s| Ok(s.token_nbytes(t)))
    }

    #[getter]
    fn nbytes(&self, py: Python<'_>) -> PyResult<usize> {
        locked(py, &self.inner, |s| Ok(s.nbytes()))
    }
    #[getter]
    fn num_tokens(&self, py: Python<'_>) -> PyResult<usize> {
        locked(py, &self.inner, |s| Ok(s.num_tokens()))
    }
}

/// Registers the classes and functions in the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyQuantLayout>()?;
    m.add_class::<PyKiviCache>()?;
    m.add_class::<PyMixedPrecisionStore>()?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(kivi_nbytes, m)?)?;
    Ok(())
}
