//! Bindings for `kvcore_core::select`: score providers, budgets, selection and
//! `ScoreState`. See `_kvcore.pyi` for the user-facing documentation.
//!
//! Float arrays must be float32 (scores) or float32/float64 (weights) with the documented
//! number of dimensions; C-contiguous arrays are borrowed, others copied once. The core runs
//! with the GIL released and any panic becomes a `KVCoreError`.

use std::borrow::Cow;
use std::sync::Mutex;

use kvcore_core::select::{self, budget, pattern, score, Csr, ForceKeep, Reduce};
use kvcore_core::KvError;
use numpy::{
    IntoPyArray, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::{convert, guard};

type I64Array<'py> = Bound<'py, PyArray1<i64>>;
type CsrOut<'py> = (I64Array<'py>, I64Array<'py>);

/// A non-negative int argument. Negative values raise ValueError and bools or floats
/// TypeError (PyO3's plain `usize` would raise OverflowError); PyO3 adds a note naming the
/// argument.
#[derive(Clone, Copy)]
pub struct Count(pub usize);

impl<'a, 'py> FromPyObject<'a, 'py> for Count {
    type Error = PyErr;
    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        convert::count(&obj, "the argument").map(Count)
    }
}

/// Runs core work with the GIL released; errors and panics become Python exceptions.
fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, KvError> + Send) -> PyResult<T> {
    guard::detached(py, "selection core", f)
}

fn csr_out(py: Python<'_>, c: Csr) -> CsrOut<'_> {
    (c.indptr.into_pyarray(py), c.positions.into_pyarray(py))
}

/// A float32 array with `ndim` dimensions: borrowed when C-contiguous, else copied (after a
/// size check) at extraction.
struct F32Nd<'py> {
    arr: PyReadonlyArrayDyn<'py, f32>,
    copy: Option<Vec<f32>>,
    shape: Vec<usize>,
}

impl F32Nd<'_> {
    fn data(&self) -> Cow<'_, [f32]> {
        match &self.copy {
            Some(v) => Cow::Borrowed(v),
            None => Cow::Borrowed(self.arr.as_slice().unwrap_or_default()),
        }
    }
}

fn f32_nd<'py>(obj: &Bound<'py, PyAny>, name: &str, dims: &str) -> PyResult<F32Nd<'py>> {
    let ndim = dims.split(',').count();
    let arr = convert::ndarray(
        obj,
        name,
        &format!("a numpy float32 array of shape ({dims})"),
    )?;
    let a = arr.cast::<PyArrayDyn<f32>>().map_err(|_| {
        let got = arr
            .dtype()
            .str()
            .map(|s| s.to_string())
            .unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!(
            "{name} must be a numpy float32 array of shape ({dims}), got dtype {got}"
        ))
    })?;
    if arr.ndim() != ndim {
        return Err(PyValueError::new_err(format!(
            "{name} must have shape ({dims}), got shape {:?}",
            arr.shape()
        )));
    }
    let ro = a.try_readonly().map_err(|e| {
        PyValueError::new_err(format!(
            "{name} cannot be read: it is borrowed mutably ({e})"
        ))
    })?;
    // `as_slice` also accepts Fortran order, whose memory order is not the logical one.
    let copy = if ro.is_c_contiguous() && ro.as_slice().is_ok() {
        None
    } else {
        Some(convert::copy_checked(&ro.as_array(), name)?)
    };
    Ok(F32Nd {
        shape: arr.shape().to_vec(),
        arr: ro,
        copy,
    })
}

/// A float64 vector from a float32 or float64 1-D array.
fn f64_vec(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<f64>> {
    let arr = convert::ndarray(obj, name, "a 1-D numpy float64 (or float32) array")?;
    if arr.ndim() != 1 {
        return Err(PyValueError::new_err(format!(
            "{name} must be a 1-D numpy float64 (or float32) array, got shape {:?}",
            arr.shape()
        )));
    }
    if let Ok(a) = arr.cast::<PyArray1<f64>>() {
        return convert::copy_checked(&a.try_readonly()?.as_array(), name);
    }
    if let Ok(a) = arr.cast::<PyArray1<f32>>() {
        let ro = a.try_readonly()?;
        convert::check_len(name, ro.len(), std::mem::size_of::<f64>())?;
        return Ok(ro.as_array().iter().map(|&x| f64::from(x)).collect());
    }
    Err(PyTypeError::new_err(format!(
        "{name} must be a 1-D numpy float64 (or float32) array, got dtype {}",
        arr.dtype().str()?
    )))
}

fn bool_vec(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<bool>> {
    let arr = convert::ndarray(obj, name, "a 1-D numpy bool array")?;
    let arr = arr
        .cast::<PyArray1<bool>>()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a 1-D numpy bool array")))?;
    convert::copy_checked(&arr.try_readonly()?.as_array(), name)
}

/// Budgets: an int (the same for every row) or an int64/int32 array of `rows` entries.
fn budgets(obj: &Bound<'_, PyAny>, rows: usize) -> PyResult<Vec<usize>> {
    if convert::is_scalar_int(obj) {
        return Ok(vec![convert::count(obj, "budgets")?; rows]);
    }
    let a = convert::i64_array(obj, "budgets")?;
    let a = a.as_cow();
    if a.len() != rows {
        return Err(PyValueError::new_err(format!(
            "budgets must have one entry per row ({rows}), got {}",
            a.len()
        )));
    }
    a.iter()
        .map(|&b| {
            usize::try_from(b).map_err(|_| {
                PyValueError::new_err(format!("budgets must be non-negative, got {b}"))
            })
        })
        .collect()
}

/// Force-keep ranges from the optional keyword arguments (absent or None: 0 / no spans).
fn force_keep(
    sinks: Option<&Bound<'_, PyAny>>,
    window: Option<&Bound<'_, PyAny>>,
    protected: Option<&Bound<'_, PyAny>>,
) -> PyResult<ForceKeep> {
    let count =
        |v: Option<&Bound<'_, PyAny>>, name: &str| v.map_or(Ok(0), |v| convert::count(v, name));
    let mut f = ForceKeep::new(count(sinks, "sinks")?, count(window, "window")?);
    if let Some(p) = protected.filter(|p| !p.is_none()) {
        const PAIRS: &str = "a sequence of (start, end) int pairs";
        let spans = convert::sequence(p, "protected", PAIRS, 16, |x| {
            x.extract::<(i64, i64)>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "protected must be {PAIRS}, got an item of type {}",
                    convert::type_name(x)
                ))
            })
        })?;
        for (s, e) in spans {
            if s < 0 || e < s {
                return Err(PyValueError::new_err(format!(
                    "protected spans must satisfy 0 <= start <= end, got ({s}, {e})"
                )));
            }
            f.protected.push((s as usize, e as usize));
        }
    }
    Ok(f)
}

fn reduce(how: &str, allowed: &[(&str, Reduce)], name: &str) -> PyResult<Reduce> {
    allowed
        .iter()
        .find(|(k, _)| *k == how)
        .map(|(_, r)| *r)
        .ok_or_else(|| {
            let names: Vec<_> = allowed.iter().map(|(k, _)| format!("'{k}'")).collect();
            PyValueError::new_err(format!(
                "{name} must be one of {}, got '{how}'",
                names.join(", ")
            ))
        })
}

fn f32_out<'py>(
    py: Python<'py>,
    v: Vec<f32>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    v.into_pyarray(py).reshape(shape)
}

#[pyfunction]
#[pyo3(signature = (scores, budgets, *, sinks = None, window = None, protected = None, num_threads = None))]
#[pyo3(
    text_signature = "(scores, budgets, *, sinks=None, window=None, protected=None, num_threads=1)"
)]
pub fn select_topk<'py>(
    py: Python<'py>,
    scores: &Bound<'py, PyAny>,
    budgets: &Bound<'py, PyAny>,
    sinks: Option<&Bound<'py, PyAny>>,
    window: Option<&Bound<'py, PyAny>>,
    protected: Option<&Bound<'py, PyAny>>,
    num_threads: Option<&Bound<'py, PyAny>>,
) -> PyResult<CsrOut<'py>> {
    let num_threads = match num_threads {
        Some(t) => convert::positive(t, "num_threads")?,
        None => 1,
    };
    let s = f32_nd(scores, "scores", "num_rows, n")?;
    let (rows, n) = (s.shape[0], s.shape[1]);
    let b = self::budgets(budgets, rows)?;
    let f = force_keep(sinks, window, protected)?;
    let data = s.data();
    let c = run(py, || {
        select::select_topk_parallel(&data, rows, n, &b, &f, num_threads)
    })?;
    Ok(csr_out(py, c))
}

#[pyfunction]
#[pyo3(signature = (scores, num_heads, budgets, *, sinks = None, window = None, protected = None))]
pub fn select_per_layer<'py>(
    py: Python<'py>,
    scores: &Bound<'py, PyAny>,
    num_heads: &Bound<'py, PyAny>,
    budgets: &Bound<'py, PyAny>,
    sinks: Option<&Bound<'py, PyAny>>,
    window: Option<&Bound<'py, PyAny>>,
    protected: Option<&Bound<'py, PyAny>>,
) -> PyResult<CsrOut<'py>> {
    let s = f32_nd(scores, "scores", "num_layers, n")?;
    let (layers, n) = (s.shape[0], s.shape[1]);
    let heads = convert::count(num_heads, "num_heads")?;
    let b = self::budgets(budgets, layers)?;
    let f = force_keep(sinks, window, protected)?;
    let data = s.data();
    let c = run(py, || {
        select::select_per_layer(&data, layers, heads, n, &b, &f)
    })?;
    Ok(csr_out(py, c))
}

fn usize_out(py: Python<'_>, v: Vec<usize>) -> I64Array<'_> {
    v.into_iter()
        .map(|x| x as i64)
        .collect::<Vec<_>>()
        .into_pyarray(py)
}

#[pyfunction]
pub fn budget_uniform<'py>(
    py: Python<'py>,
    total: Count,
    num_rows: &Bound<'py, PyAny>,
    n: Count,
) -> PyResult<I64Array<'py>> {
    // Three int64 values a row: weight, cap and budget.
    let num_rows = convert::size(num_rows, "num_rows", 24)?;
    let (total, n) = (total.0, n.0);
    let v = run(py, || budget::uniform(total, num_rows, n))?;
    Ok(usize_out(py, v))
}

#[pyfunction]
pub fn budget_split<'py>(
    py: Python<'py>,
    total: Count,
    weights: &Bound<'py, PyAny>,
    caps: &Bound<'py, PyAny>,
) -> PyResult<I64Array<'py>> {
    let total = total.0;
    let w = f64_vec(weights, "weights")?;
    let c = self::budgets(caps, w.len())?;
    let v = run(py, || budget::split_exact(total, &w, &c))?;
    Ok(usize_out(py, v))
}

#[pyfunction]
#[pyo3(signature = (num_layers, n, capacity, window, beta = Count(20)))]
#[pyo3(text_signature = "(num_layers, n, capacity, window, beta=20)")]
pub fn budget_pyramid<'py>(
    py: Python<'py>,
    num_layers: &Bound<'py, PyAny>,
    n: Count,
    capacity: Count,
    window: Count,
    beta: Count,
) -> PyResult<I64Array<'py>> {
    let num_layers = convert::size(num_layers, "num_layers", std::mem::size_of::<i64>())?;
    let (n, capacity, window, beta) = (n.0, capacity.0, window.0, beta.0);
    let v = run(py, || {
        budget::pyramid(num_layers, n, capacity, window, beta)
    })?;
    Ok(usize_out(py, v))
}

#[pyfunction]
#[pyo3(signature = (capacity, weights, n, head_beta = 1.01))]
pub fn budget_head_weighted<'py>(
    py: Python<'py>,
    capacity: Count,
    weights: &Bound<'py, PyAny>,
    n: Count,
    head_beta: f64,
) -> PyResult<I64Array<'py>> {
    let (capacity, n) = (capacity.0, n.0);
    let w = f64_vec(weights, "weights")?;
    let v = run(py, || budget::head_weighted(capacity, &w, n, head_beta))?;
    Ok(usize_out(py, v))
}

#[pyfunction]
#[pyo3(signature = (scores, budget, alpha = 0.2, *, sinks = None, window = None, protected = None))]
#[allow(clippy::too_many_arguments)]
pub fn budget_adakv<'py>(
    py: Python<'py>,
    scores: &Bound<'py, PyAny>,
    budget: Count,
    alpha: f64,
    sinks: Option<&Bound<'py, PyAny>>,
    window: Option<&Bound<'py, PyAny>>,
    protected: Option<&Bound<'py, PyAny>>,
) -> PyResult<I64Array<'py>> {
    let budget = budget.0;
    let s = f32_nd(scores, "scores", "num_layers, num_heads, n")?;
    let (l, h, n) = (s.shape[0], s.shape[1], s.shape[2]);
    let f = force_keep(sinks, window, protected)?;
    let data = s.data();
    let v = run(py, || budget::adakv(&data, l, h, n, budget, alpha, &f))?;
    Ok(usize_out(py, v))
}

#[pyfunction]
#[pyo3(signature = (scores, budget, alpha = 0.2, *, sinks = None, window = None, protected = None))]
#[allow(clippy::too_many_arguments)]
pub fn select_adakv<'py>(
    py: Python<'py>,
    scores: &Bound<'py, PyAny>,
    budget: Count,
    alpha: f64,
    sinks: Option<&Bound<'py, PyAny>>,
    window: Option<&Bound<'py, PyAny>>,
    protected: Option<&Bound<'py, PyAny>>,
) -> PyResult<CsrOut<'py>> {
    let budget = budget.0;
    let s = f32_nd(scores, "scores", "num_layers, num_heads, n")?;
    let (l, h, n) = (s.shape[0], s.shape[1], s.shape[2]);
    let f = force_keep(sinks, window, protected)?;
    let data = s.data();
    let (_, c) = run(py, || {
        budget::adakv_select(&data, l, h, n, budget, alpha, &f)
    })?;
    Ok(csr_out(py, c))
}

#[pyfunction]
#[pyo3(signature = (probs, how = "sum"))]
pub fn window_reduce<'py>(
    py: Python<'py>,
    probs: &Bound<'py, PyAny>,
    how: &str,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let r = reduce(
        how,
        &[
            ("sum", Reduce::Sum),
            ("mean", Reduce::Mean),
            ("max", Reduce::Max),
        ],
        "how",
    )?;
    let s = f32_nd(probs, "probs", "num_rows, w, n")?;
    let (rows, w, n) = (s.shape[0], s.shape[1], s.shape[2]);
    let data = s.data();
    let v = run(py, || score::window_reduce(&data, rows, w, n, r))?;
    f32_out(py, v, &[rows, n])
}

#[pyfunction]
#[pyo3(signature = (scores, num_kv_heads, how = "mean"))]
pub fn group_reduce<'py>(
    py: Python<'py>,
    scores: &Bound<'py, PyAny>,
    num_kv_heads: Count,
    how: &str,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let num_kv_heads = num_kv_heads.0;
    let r = reduce(
        how,
        &[
            ("mean", Reduce::Mean),
            ("max", Reduce::Max),
            ("sum", Reduce::Sum),
        ],
        "how",
    )?;
    let s = f32_nd(scores, "scores", "num_q_heads, n")?;
    let (hq, n) = (s.shape[0], s.shape[1]);
    let data = s.data();
    let v = run(py, || score::group_reduce(&data, hq, num_kv_heads, n, r))?;
    f32_out(py, v, &[num_kv_heads, n])
}

#[pyfunction]
#[pyo3(signature = (scores, kernel, how = "avg"))]
pub fn pool1d<'py>(
    py: Python<'py>,
    scores: &Bound<'py, PyAny>,
    kernel: Count,
    how: &str,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let kernel = kernel.0;
    let r = reduce(how, &[("avg", Reduce::Mean), ("max", Reduce::Max)], "how")?;
    let s = f32_nd(scores, "scores", "num_rows, n")?;
    let (rows, n) = (s.shape[0], s.shape[1]);
    let data = s.data();
    let v = run(py, || score::pool1d(&data, rows, n, kernel, r))?;
    f32_out(py, v, &[rows, n])
}

#[pyfunction]
pub fn tova_scores<'py>(
    py: Python<'py>,
    last_attn: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let s = f32_nd(last_attn, "last_attn", "num_layers, num_q_heads, n")?;
    let (l, h, n) = (s.shape[0], s.shape[1], s.shape[2]);
    let data = s.data();
    let v = run(py, || score::tova(&data, l, h, n))?;
    f32_out(py, v, &[l, n])
}

#[pyfunction]
pub fn key_norm_scores<'py>(
    py: Python<'py>,
    keys: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let s = f32_nd(keys, "keys", "num_rows, n, head_dim")?;
    let (rows, n, d) = (s.shape[0], s.shape[1], s.shape[2]);
    let data = s.data();
    let v = run(py, || score::key_norm(&data, rows, n, d))?;
    f32_out(py, v, &[rows, n])
}

#[pyfunction]
#[pyo3(signature = (attn_map, period, prefix = Count(1)))]
#[pyo3(text_signature = "(attn_map, period, prefix=1)")]
pub fn razor_head_scores(
    py: Python<'_>,
    attn_map: &Bound<'_, PyAny>,
    period: Count,
    prefix: Count,
) -> PyResult<(f32, f32)> {
    let (period, prefix) = (period.0, prefix.0);
    let s = f32_nd(attn_map, "attn_map", "s, s")?;
    if s.shape[0] != s.shape[1] {
        return Err(PyValueError::new_err(format!(
            "attn_map must be square (s, s), got shape {:?}",
            s.shape
        )));
    }
    let n = s.shape[0];
    let data = s.data();
    run(py, || score::razor_head_scores(&data, n, period, prefix))
}

#[pyfunction]
#[pyo3(signature = (echo, induction, echo_ratio = 0.01, induction_ratio = 0.14))]
pub fn razor_retrieval_heads<'py>(
    py: Python<'py>,
    echo: &Bound<'py, PyAny>,
    induction: &Bound<'py, PyAny>,
    echo_ratio: f64,
    induction_ratio: f64,
) -> PyResult<Bound<'py, PyArray1<bool>>> {
    let e = f32_nd(echo, "echo", "num_rows")?;
    let i = f32_nd(induction, "induction", "num_rows")?;
    let (e, i) = (e.data(), i.data());
    let v = run(py, || {
        score::razor_retrieval_heads(&e, &i, echo_ratio, induction_ratio)
    })?;
    Ok(v.into_pyarray(py))
}

#[pyfunction]
pub fn plan_streaming<'py>(
    py: Python<'py>,
    num_rows: &Bound<'py, PyAny>,
    n: Count,
    sinks: Count,
    window: Count,
) -> PyResult<CsrOut<'py>> {
    let num_rows = convert::size(num_rows, "num_rows", std::mem::size_of::<i64>())?;
    let (n, sinks, window) = (n.0, sinks.0, window.0);
    let c = run(py, || pattern::streaming(num_rows, n, sinks, window))?;
    Ok(csr_out(py, c))
}

#[pyfunction]
#[pyo3(signature = (layer_kinds, num_heads, n, *, sinks, window, block = Count(64), stride = Count(4), local_blocks = Count(1)))]
#[pyo3(
    text_signature = "(layer_kinds, num_heads, n, *, sinks, window, block=64, stride=4, local_blocks=1)"
)]
#[allow(clippy::too_many_arguments)]
pub fn plan_longgen<'py>(
    py: Python<'py>,
    layer_kinds: &Bound<'py, PyAny>,
    num_heads: Count,
    n: Count,
    sinks: Count,
    window: Count,
    block: Count,
    stride: Count,
    local_blocks: Count,
) -> PyResult<CsrOut<'py>> {
    let (num_heads, n, sinks, window, block, stride, local_blocks) = (
        num_heads.0,
        n.0,
        sinks.0,
        window.0,
        block.0,
        stride.0,
        local_blocks.0,
    );
    const KINDS: &str = "a sequence of 'full', 'sink' or 'block_sparse'";
    let kinds = convert::sequence(layer_kinds, "layer_kinds", KINDS, 1, |k| {
        let k = k.extract::<String>().map_err(|_| {
            PyTypeError::new_err(format!(
                "layer_kinds must be {KINDS}, got an item of type {}",
                convert::type_name(k)
            ))
        })?;
        match k.as_str() {
            "full" => Ok(pattern::LayerKind::Full),
            "sink" => Ok(pattern::LayerKind::Sink),
            "block_sparse" => Ok(pattern::LayerKind::BlockSparse),
            other => Err(PyValueError::new_err(format!(
                "layer kinds must be 'full', 'sink' or 'block_sparse', got '{other}'"
            ))),
        }
    })?;
    let p = pattern::LongGenParams {
        sinks,
        window,
        block,
        stride,
        local_blocks,
    };
    let c = run(py, || pattern::longgen(&kinds, num_heads, n, &p))?;
    Ok(csr_out(py, c))
}

#[pyfunction]
#[pyo3(signature = (retrieval, n, sinks, local_capacity, compensation = true))]
pub fn plan_razor<'py>(
    py: Python<'py>,
    retrieval: &Bound<'py, PyAny>,
    n: Count,
    sinks: Count,
    local_capacity: Count,
    compensation: bool,
) -> PyResult<(I64Array<'py>, I64Array<'py>, I64Array<'py>)> {
    let (n, sinks, local_capacity) = (n.0, sinks.0, local_capacity.0);
    let r = bool_vec(retrieval, "retrieval")?;
    let (c, d) = run(py, || {
        pattern::razor(&r, n, sinks, local_capacity, compensation)
    })?;
    Ok((
        c.indptr.into_pyarray(py),
        c.positions.into_pyarray(py),
        d.into_pyarray(py),
    ))
}

#[pyfunction]
#[pyo3(signature = (cap_scores, nuc_scores, compressed, nuc_ratio = 0.5, *, sinks = None, window = None, protected = None))]
#[allow(clippy::too_many_arguments)]
pub fn plan_infinipot<'py>(
    py: Python<'py>,
    cap_scores: &Bound<'py, PyAny>,
    nuc_scores: &Bound<'py, PyAny>,
    compressed: Count,
    nuc_ratio: f64,
    sinks: Option<&Bound<'py, PyAny>>,
    window: Option<&Bound<'py, PyAny>>,
    protected: Option<&Bound<'py, PyAny>>,
) -> PyResult<CsrOut<'py>> {
    let compressed = compressed.0;
    let cap = f32_nd(cap_scores, "cap_scores", "num_rows, n")?;
    let nuc = f32_nd(nuc_scores, "nuc_scores", "n")?;
    let (rows, n) = (cap.shape[0], cap.shape[1]);
    if nuc.shape[0] != n {
        return Err(PyValueError::new_err(format!(
            "nuc_scores must have shape ({n},) to match cap_scores, got {:?}",
            nuc.shape
        )));
    }
    let f = force_keep(sinks, window, protected)?;
    let (cd, nd) = (cap.data(), nuc.data());
    let c = run(py, || {
        pattern::infinipot(&cd, rows, n, &nd, compressed, nuc_ratio, &f)
    })?;
    Ok(csr_out(py, c))
}

/// See `_kvcore.pyi`.
#[pyclass(frozen, name = "ScoreState", module = "kvcore._kvcore")]
pub struct PyScoreState {
    inner: Mutex<score::ScoreState>,
}

impl PyScoreState {
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut score::ScoreState) -> Result<T, KvError> + Send,
    ) -> PyResult<T> {
        guard::locked_detached(py, &self.inner, "score state", "score state", f)
    }
}

#[pymethods]
impl PyScoreState {
    #[new]
    fn new(py: Python<'_>, num_rows: &Bound<'_, PyAny>) -> PyResult<Self> {
        // Each row is an empty vector (24 bytes) until scores arrive.
        let n = convert::size(num_rows, "num_rows", std::mem::size_of::<Vec<f32>>())?;
        let state = guard::held(py, "score state", || score::ScoreState::try_new(n))?;
        Ok(PyScoreState {
            inner: Mutex::new(state),
        })
    }

    #[getter]
    fn num_rows(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |s| Ok(s.num_rows()))
    }

    fn lengths<'py>(&self, py: Python<'py>) -> PyResult<I64Array<'py>> {
        let v = self.with(py, |s| Ok(s.lengths()))?;
        Ok(usize_out(py, v))
    }

    #[pyo3(signature = (scores, decay = 1.0))]
    fn accumulate(&self, py: Python<'_>, scores: &Bound<'_, PyAny>, decay: f32) -> PyResult<()> {
        let s = f32_nd(scores, "scores", "num_rows, m")?;
        let m = s.shape[1];
        let rows = s.shape[0];
        let data = s.data();
        self.with(py, |st| {
            if rows != st.num_rows() {
                return Err(KvError::InvalidArgument(format!(
                    "scores must have {} rows, got {rows}",
                    st.num_rows()
                )));
            }
            st.accumulate(&data, m, decay)
        })
    }

    fn append(&self, py: Python<'_>, scores: &Bound<'_, PyAny>) -> PyResult<()> {
        let s = f32_nd(scores, "scores", "num_rows, q")?;
        let (rows, q) = (s.shape[0], s.shape[1]);
        let data = s.data();
        self.with(py, |st| {
            if rows != st.num_rows() {
                return Err(KvError::InvalidArgument(format!(
                    "scores must have {} rows, got {rows}",
                    st.num_rows()
                )));
            }
            st.append(&data, q)
        })
    }

    fn compact(
        &self,
        py: Python<'_>,
        keep_indptr: &Bound<'_, PyAny>,
        keep_positions: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let ip = convert::i64_array(keep_indptr, "keep_indptr")?;
        let pos = convert::i64_array(keep_positions, "keep_positions")?;
        let csr = Csr {
            indptr: ip.as_cow().into_owned(),
            positions: pos.as_cow().into_owned(),
        };
        self.with(py, |st| st.compact(&csr))
    }

    fn to_csr<'py>(&self, py: Python<'py>) -> PyResult<(I64Array<'py>, Bound<'py, PyArray1<f32>>)> {
        let (ip, v) = self.with(py, |s| Ok(s.to_csr()))?;
        Ok((ip.into_pyarray(py), v.into_pyarray(py)))
    }

    fn row<'py>(&self, py: Python<'py>, row: Count) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let row = row.0;
        let v = self.with(py, |s| {
            if row >= s.num_rows() {
                return Err(KvError::InvalidArgument(format!(
                    "row {row} is out of range for {} rows",
                    s.num_rows()
                )));
            }
            Ok(s.row(row).to_vec())
        })?;
        Ok(v.into_pyarray(py))
    }
}

/// Registers the functions and classes of this file.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyScoreState>()?;
    m.add_function(wrap_pyfunction!(select_topk, m)?)?;
    m.add_function(wrap_pyfunction!(select_per_layer, m)?)?;
    m.add_function(wrap_pyfunction!(budget_uniform, m)?)?;
    m.add_function(wrap_pyfunction!(budget_split, m)?)?;
    m.add_function(wrap_pyfunction!(budget_pyramid, m)?)?;
    m.add_function(wrap_pyfunction!(budget_head_weighted, m)?)?;
    m.add_function(wrap_pyfunction!(budget_adakv, m)?)?;
    m.add_function(wrap_pyfunction!(select_adakv, m)?)?;
    m.add_function(wrap_pyfunction!(window_reduce, m)?)?;
    m.add_function(wrap_pyfunction!(group_reduce, m)?)?;
    m.add_function(wrap_pyfunction!(pool1d, m)?)?;
    m.add_function(wrap_pyfunction!(tova_scores, m)?)?;
    m.add_function(wrap_pyfunction!(key_norm_scores, m)?)?;
    m.add_function(wrap_pyfunction!(razor_head_scores, m)?)?;
    m.add_function(wrap_pyfunction!(razor_retrieval_heads, m)?)?;
    m.add_function(wrap_pyfunction!(plan_streaming, m)?)?;
    m.add_function(wrap_pyfunction!(plan_longgen, m)?)?;
    m.add_function(wrap_pyfunction!(plan_razor, m)?)?;
    m.add_function(wrap_pyfunction!(plan_infinipot, m)?)?;
    Ok(())
}
