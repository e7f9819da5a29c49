//! Bindings for `kvcore_core::merge`: `MergePlan`, `MergeBook`, the plan builders and the
//! MiniCache pair store. See `_kvcore.pyi` for the user documentation. Inputs are host numpy
//! arrays; builders run with the GIL released.

use std::sync::Mutex;

use kvcore_core::merge::{minicache, plans, MergeBook, MergePlan};
use numpy::{PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::convert;

use crate::guard::{self, Core};

fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> Core<T> + Send) -> PyResult<T> {
    guard::detached(py, "merge core", f)
}

/// A float32 array of `ndim` dims as (flat copy, shape).
fn f32_nd(
    obj: &Bound<'_, PyAny>,
    name: &str,
    ndim: usize,
    what: &str,
) -> PyResult<(Vec<f32>, Vec<usize>)> {
    let arr = convert::ndarray(obj, name, &format!("a numpy array of float32 {what}"))?;
    let shape = arr.shape().to_vec();
    let a = arr.cast::<PyArrayDyn<f32>>().map_err(|_| {
        let dt = arr.dtype().str().map(|s| s.to_string()).unwrap_or_default();
        PyTypeError::new_err(format!(
            "{name} must be a numpy array of float32 {what}, got dtype {dt}"
        ))
    })?;
    if shape.len() != ndim {
        return Err(PyValueError::new_err(format!(
            "{name} must be {what}, got shape {shape:?}"
        )));
    }
    let ro = a
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{name} cannot be read ({e})")))?;
    Ok((convert::copy_checked(&ro.as_array(), name)?, shape))
}

fn positions(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<usize>> {
    let a = convert::i64_array(obj, name)?;
    a.as_cow()
        .iter()
        .map(|&i| {
            usize::try_from(i)
                .map_err(|_| PyValueError::new_err(format!("{name} must be non-negative, got {i}")))
        })
        .collect()
}

fn i64_out<'py>(py: Python<'py>, v: &[usize]) -> Bound<'py, PyArray1<i64>> {
    PyArray1::from_vec(py, v.iter().map(|&i| i as i64).collect())
}

/// See `_kvcore.pyi`.
#[pyclass(frozen, name = "MergePlan", module = "kvcore._kvcore")]
pub struct PyMergePlan {
    inner: MergePlan,
}

#[pymethods]
impl PyMergePlan {
    #[new]
    #[pyo3(signature = (num_slots, src, dst, weight, evicted = None))]
    fn new(
        py: Python<'_>,
        num_slots: &Bound<'_, PyAny>,
        src: &Bound<'_, PyAny>,
        dst: &Bound<'_, PyAny>,
        weight: &Bound<'_, PyAny>,
        evicted: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let (w, _) = f32_nd(weight, "weight", 1, "(num_entries,)")?;
        let inner = MergePlan {
            // The plan's largest per-slot buffer: its kept positions (one usize a slot).
            num_slots: convert::size(num_slots, "num_slots", std::mem::size_of::<usize>())?,
            src: positions(src, "src")?,
            dst: positions(dst, "dst")?,
            weight: w,
            evicted: match evicted {
                Some(e) if !e.is_none() => positions(e, "evicted")?,
                _ => Vec::new(),
            },
        };
        guard::held(py, "merge core", || inner.validate())?;
        Ok(PyMergePlan { inner })
    }
    #[getter]
    fn num_slots(&self) -> usize {
        self.inner.num_slots
    }
    #[getter]
    fn src<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        i64_out(py, &self.inner.src)
    }
    #[getter]
    fn dst<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        i64_out(py, &self.inner.dst)
    }
    #[getter]
    fn weight<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        PyArray1::from_vec(py, self.inner.weight.clone())
    }
    #[getter]
    fn evicted<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        i64_out(py, &self.inner.evicted)
    }
    fn kept_positions<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        i64_out(py, &self.inner.kept_positions())
    }
    fn apply<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let (v, shape) = f32_nd(x, "x", 2, "(num_slots, dim)")?;
        let (n, d) = (shape[0], shape[1]);
        if n != self.inner.num_slots {
            return Err(PyValueError::new_err(format!(
                "x must have num_slots={} rows, got {n}",
                self.inner.num_slots
            )));
        }
        let plan = &self.inner;
        let out = detached(py, || plan.apply(&v, d))?;
        PyArray1::from_vec(py, out).reshape([n, d])
    }
    fn __len__(&self) -> usize {
        self.inner.src.len()
    }
}

/// See `_kvcore.pyi`.
#[pyclass(frozen, name = "MergeBook", module = "kvcore._kvcore")]
pub struct PyMergeBook {
    inner: Mutex<MergeBook>,
}

impl PyMergeBook {
    fn with<T>(&self, py: Python<'_>, f: impl FnOnce(&mut MergeBook) -> Core<T>) -> PyResult<T> {
        guard::locked(py, &self.inner, "book", "merge core", f)
    }
}

#[pymethods]
impl PyMergeBook {
    #[new]
    fn new(py: Python<'_>, num_slots: &Bound<'_, PyAny>) -> PyResult<Self> {
        let n = convert::count(num_slots, "num_slots")?;
        let book = guard::held(py, "merge core", || MergeBook::try_new(n))?;
        Ok(PyMergeBook {
            inner: Mutex::new(book),
        })
    }
    fn apply<'py>(
        &self,
        py: Python<'py>,
        plan: &PyMergePlan,
    ) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let kept = self.with(py, |b| b.apply(&plan.inner))?;
        Ok(i64_out(py, &kept))
    }
    fn compact(&self, py: Python<'_>, positions: &Bound<'_, PyAny>) -> PyResult<()> {
        let p = self::positions(positions, "positions")?;
        self.with(py, |b| b.compact(&p))
    }
    fn extend(&self, py: Python<'_>, n: &Bound<'_, PyAny>) -> PyResult<()> {
        let n = convert::count(n, "n")?;
        self.with(py, |b| b.extend(n))
    }
    #[getter]
    fn mass<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let m = self.with(py, |b| Ok(b.mass().to_vec()))?;
        Ok(PyArray1::from_vec(py, m))
    }
    #[getter]
    fn evicted_mass(&self, py: Python<'_>) -> PyResult<f64> {
        self.with(py, |b| Ok(b.evicted_mass()))
    }
    #[getter]
    fn total_mass(&self, py: Python<'_>) -> PyResult<f64> {
        self.with(py, |b| Ok(b.total_mass()))
    }
    #[getter]
    fn num_slots(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |b| Ok(b.mass().len()))
    }
    fn log_count_bias<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let m = self.with(py, |b| Ok(b.log_count_bias()))?;
        Ok(PyArray1::from_vec(py, m))
    }
}

fn keys_attn(
    keys: &Bound<'_, PyAny>,
    attn: &Bound<'_, PyAny>,
) -> PyResult<(Vec<f32>, usize, Vec<f32>)> {
    let (k, ks) = f32_nd(keys, "keys", 2, "(num_tokens, head_dim)")?;
    let (a, _) = f32_nd(attn, "attn", 1, "(num_tokens,)")?;
    Ok((k, ks[1], a))
}

/// See `_kvcore.pyi`.
#[pyfunction]
#[pyo3(signature = (keys, attn, eps, sigma = None, mergeable = None))]
pub fn kvmerger_plan(
    py: Python<'_>,
    keys: &Bound<'_, PyAny>,
    attn: &Bound<'_, PyAny>,
    eps: f64,
    sigma: Option<f64>,
    mergeable: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyMergePlan> {
    let (k, d, a) = keys_attn(keys, attn)?;
    let m = match mergeable {
        Some(m) if !m.is_none() => convert::count(m, "mergeable")?,
        _ => usize::MAX,
    };
    let inner = detached(py, || plans::kvmerger(&k, &a, d, eps, sigma, m))?;
    Ok(PyMergePlan { inner })
}

/// See `_kvcore.pyi`.
#[pyfunction]
pub fn ems_plan(
    py: Python<'_>,
    keys: &Bound<'_, PyAny>,
    attn: &Bound<'_, PyAny>,
    retained: &Bound<'_, PyAny>,
    threshold: f64,
) -> PyResult<PyMergePlan> {
    let (k, d, a) = keys_attn(keys, attn)?;
    let r = positions(retained, "retained")?;
    let inner = detached(py, || plans::ems(&k, &a, d, &r, threshold))?;
    Ok(PyMergePlan { inner })
}

/// See `_kvcore.pyi`.
#[pyfunction]
#[pyo3(signature = (num_tokens, sink = None, local_capacity = None),
       text_signature = "(num_tokens, sink=4, local_capacity=256)")]
pub fn razor_plan(
    py: Python<'_>,
    num_tokens: &Bound<'_, PyAny>,
    sink: Option<&Bound<'_, PyAny>>,
    local_capacity: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyMergePlan> {
    let n = convert::count(num_tokens, "num_tokens")?;
    let s = match sink {
        Some(s) if !s.is_none() => convert::count(s, "sink")?,
        _ => 4,
    };
    let c = match local_capacity {
        Some(c) if !c.is_none() => convert::count(c, "local_capacity")?,
        _ => 256,
    };
    let inner = guard::held(py, "merge core", || plans::razor(n, s, c))?;
    Ok(PyMergePlan { inner })
}

/// See `_kvcore.pyi`.
#[pyfunction]
pub fn cam_plan(
    py: Python<'_>,
    attn: &Bound<'_, PyAny>,
    evicted: &Bound<'_, PyAny>,
    draws: &Bound<'_, PyAny>,
    window: &Bound<'_, PyAny>,
) -> PyResult<PyMergePlan> {
    let (a, _) = f32_nd(attn, "attn", 1, "(num_tokens,)")?;
    let e = positions(evicted, "evicted")?;
    let (u, _) = f32_nd(draws, "draws", 1, "(num_evicted,)")?;
    let w = convert::count(window, "window")?;
    let inner = detached(py, || plans::cam(&a, &e, &u, w))?;
    Ok(PyMergePlan { inner })
}

/// See `_kvcore.pyi`.
#[pyclass(frozen, name = "MiniCachePair", module = "kvcore._kvcore")]
pub struct PyMiniCachePair {
    inner: minicache::MiniCachePair,
}

fn mat<'py>(py: Python<'py>, v: &[f32], d: usize) -> PyResult<Bound<'py, PyArray2<f32>>> {
    PyArray1::from_vec(py, v.to_vec()).reshape([v.len() / d.max(1), d])
}

#[pymethods]
impl PyMiniCachePair {
    #[getter]
    fn direction<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        mat(py, &self.inner.direction, self.inner.head_dim)
    }
    #[getter]
    fn mag_a<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        PyArray1::from_vec(py, self.inner.mag_a.clone())
    }
    #[getter]
    fn mag_b<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        PyArray1::from_vec(py, self.inner.mag_b.clone())
    }
    #[getter]
    fn angle<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        PyArray1::from_vec(py, self.inner.angle.clone())
    }
    #[getter]
    fn retained<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        i64_out(py, &self.inner.retained)
    }
    #[getter]
    fn num_stored_elements(&self) -> usize {
        self.inner.num_stored_elements()
    }
    fn restore<'py>(
        &self,
        py: Python<'py>,
        which: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let w = convert::count(which, "which")?;
        let pair = &self.inner;
        let v = detached(py, || pair.restore(w))?;
        mat(py, &v, self.inner.head_dim)
    }
}

/// See `_kvcore.pyi`.
#[pyfunction]
#[pyo3(signature = (a, b, t = 0.6, retention_ratio = 0.05))]
pub fn minicache_merge(
    py: Python<'_>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    t: f64,
    retention_ratio: f64,
) -> PyResult<PyMiniCachePair> {
    let (av, sa) = f32_nd(a, "a", 2, "(num_tokens, head_dim)")?;
    let (bv, sb) = f32_nd(b, "b", 2, "(num_tokens, head_dim)")?;
    if sa != sb {
        return Err(PyValueError::new_err(format!(
            "a and b must have the same shape, got {sa:?} and {sb:?}"
        )));
    }
    let inner = detached(py, || minicache::merge(&av, &bv, sa[1], t, retention_ratio))?;
    Ok(PyMiniCachePair { inner })
}

/// See `_kvcore.pyi`.
#[pyfunction]
#[pyo3(signature = (num_layers, start = None))]
pub fn minicache_layer_pairs(
    py: Python<'_>,
    num_layers: &Bound<'_, PyAny>,
    start: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<(usize, usize)>> {
    let n = convert::count(num_layers, "num_layers")?;
    let s = match start {
        Some(s) if !s.is_none() => Some(convert::count(s, "start")?),
        _ => None,
    };
    guard::held(py, "merge core", || minicache::layer_pairs(n, s))
}

/// Registers the classes and functions in the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyMergePlan>()?;
    m.add_class::<PyMergeBook>()?;
    m.add_class::<PyMiniCachePair>()?;
    m.add_function(wrap_pyfunction!(kvmerger_plan, m)?)?;
    m.add_function(wrap_pyfunction!(ems_plan, m)?)?;
    m.add_function(wrap_pyfunction!(razor_plan, m)?)?;
    m.add_function(wrap_pyfunction!(cam_plan, m)?)?;
    m.add_function(wrap_pyfunction!(minicache_merge, m)?)?;
    m.add_function(wrap_pyfunction!(minicache_layer_pairs, m)?)?;
    Ok(())
}
