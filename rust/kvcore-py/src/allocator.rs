//! `kvcore._kvcore.BlockAllocator`: a translation layer over `kvcore_core::BlockAllocator`.
//!
//! Every method follows the same three steps: extract and validate the Python arguments,
//! run the core under the lock (with the GIL released for batch work), convert the result.
//! The lock is never held while Python code can run (no object is created under it), so a
//! finaliser that calls back into the allocator cannot deadlock.

use std::sync::Mutex;

use kvcore_core::{BatchAppend, BlockAllocator, BlockKeys, CompactionPlan, Keep};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::convert::{self, KeepArg};
use crate::guard::{self, Core};

/// See `_kvcore.pyi` for the user-facing documentation of every method.
#[pyclass(frozen, name = "BlockAllocator", module = "kvcore._kvcore")]
pub struct PyBlockAllocator {
    inner: Mutex<BlockAllocator>,
}

/// Bytes of output per appended token (an int64 slot id).
const SLOT_BYTES: usize = std::mem::size_of::<i64>();

/// `append` and `append_batch` release the GIL from this many tokens (plus rows) on.
const DETACH_MIN_TOKENS: usize = 1024;

/// `append_batch` keeps its output buffers between calls up to this many slots.
const APPEND_OUT_KEEP: usize = 1 << 16;

thread_local! {
    /// `append_batch`'s output buffers, reused by the calls made on this thread.
    static APPEND_OUT: std::cell::RefCell<BatchAppend> = std::cell::RefCell::new(BatchAppend::default());
}

type I64Array<'py> = Bound<'py, PyArray1<i64>>;
type I32Array<'py> = Bound<'py, PyArray1<i32>>;

impl PyBlockAllocator {
    /// Runs `f` on the core under the lock. A panic (a bug) becomes a `KVCoreError` and
    /// poisons the lock, so later calls fail loudly instead of using a half-updated state.
    fn with<T>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut BlockAllocator) -> Core<T>,
    ) -> PyResult<T> {
        guard::locked(py, &self.inner, "allocator", "allocator core", f)
    }

    /// Like `with`, with the GIL released while the core works.
    fn detached<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut BlockAllocator) -> Core<T> + Send,
    ) -> PyResult<T> {
        guard::locked_detached(py, &self.inner, "allocator", "allocator core", f)
    }

    fn stat<T>(&self, py: Python<'_>, f: impl FnOnce(&BlockAllocator) -> T) -> PyResult<T> {
        self.with(py, |a| Ok(f(a)))
    }

    /// Runs a call that writes slots into this thread's reused output buffers (taken out of
    /// the thread-local while in use, so a nested call from a finaliser finds it empty, not
    /// borrowed), with the GIL released when `detach`, then builds the results with `convert`:
    /// copies into fresh numpy arrays, cheaper than wrapping new vectors. A huge prefill's
    /// buffers are not kept for the rest of the thread.
    fn with_append_out<T: Send, R>(
        &self,
        py: Python<'_>,
        detach: bool,
        run: impl FnOnce(&mut BlockAllocator, &mut BatchAppend) -> Core<T> + Send,
        convert: impl FnOnce(T, &BatchAppend) -> R,
    ) -> PyResult<R> {
        let mut out = APPEND_OUT.take();
        out.clear();
        let buf = &mut out;
        let call = move |a: &mut BlockAllocator| run(a, buf);
        let got = if detach {
            self.detached(py, call)
        } else {
            self.with(py, call)
        };
        let res = got.map(|v| convert(v, &out));
        if out.slots.capacity() <= APPEND_OUT_KEEP {
            APPEND_OUT.set(out);
        }
        res
    }

    /// The shared body of `register_prefix` and `adopt_prefix`.
    fn prefix_one(
        &self,
        py: Python<'_>,
        table: &Bound<'_, PyAny>,
        token_ids: Option<&Bound<'_, PyAny>>,
        salt: Option<&Bound<'_, PyAny>>,
        block_hashes: Option<&Bound<'_, PyAny>>,
        call: PrefixOneFn,
    ) -> PyResult<usize> {
        let t = convert::table_id(table)?;
        let keys = KeysArg::extract(token_ids, block_hashes)?;
        let salt = convert::salt(salt)?;
        keys.with(|k| self.detached(py, |a| call(a, t, k, salt.as_deref())))
    }

    /// The shared body of `register_prefix_batch` and `adopt_prefix_batch`: both take CSR
    /// keys per table and return one int64 per table.
    #[allow(clippy::too_many_arguments)]
    fn prefix_batch<'py>(
        &self,
        py: Python<'py>,
        tables: &Bound<'py, PyAny>,
        indptr: &Bound<'py, PyAny>,
        token_ids: Option<&Bound<'py, PyAny>>,
        salt: Option<&Bound<'py, PyAny>>,
        block_hashes: Option<&Bound<'py, PyAny>>,
        call: PrefixBatchFn,
    ) -> PyResult<I64Array<'py>> {
        let ids = convert::i64_array(tables, "tables")?;
        let ids = ids.as_cow();
        let indptr = convert::i64_array(indptr, "indptr")?;
        let indptr = indptr.as_cow();
        let keys = KeysArg::extract(token_ids, block_hashes)?;
        let salt = convert::salt(salt)?;
        let out = keys.with(|k| {
            self.detached(py, |a| {
                let mut out = Vec::new();
                call(a, &ids, &indptr, k, salt.as_deref(), &mut out).map(|_| out)
            })
        })?;
        Ok(to_array(py, out))
    }
}

/// `append_batch`'s counts: one int for every table, or an array of one per table.
enum Counts {
    Same(usize),
    Each(Vec<usize>),
}

type PrefixOneFn =
    fn(&mut BlockAllocator, i64, BlockKeys<'_>, Option<&[u8]>) -> kvcore_core::Result<usize>;

type PrefixBatchFn = fn(
    &mut BlockAllocator,
    &[i64],
    &[i64],
    BlockKeys<'_>,
    Option<&[u8]>,
    &mut Vec<i64>,
) -> kvcore_core::Result<()>;

/// A numpy array holding `v`: small results are copied into a plain array, which costs less
/// than wrapping the vector in an owning base object; large ones are wrapped without a copy.
fn to_array<T: numpy::Element + Copy>(py: Python<'_>, v: Vec<T>) -> Bound<'_, PyArray1<T>> {
    if v.len() <= 4096 {
        PyArray1::from_slice(py, &v)
    } else {
        v.into_pyarray(py)
    }
}

fn to_i32(v: &[u32]) -> Vec<i32> {
    v.iter().map(|&x| x as i32).collect()
}

/// What names a table's blocks in a prefix call, extracted before the lock: token ids, or
/// the engine's own block hashes as rows of bytes.
enum KeysArg<'py> {
    Tokens(convert::Arr1<'py, i64>),
    Hashes { bytes: Vec<u8>, width: usize },
}

impl KeysArg<'_> {
    fn extract<'py>(
        token_ids: Option<&Bound<'py, PyAny>>,
        block_hashes: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<KeysArg<'py>> {
        fn given<'a, 'py>(o: Option<&'a Bound<'py, PyAny>>) -> Option<&'a Bound<'py, PyAny>> {
            o.filter(|o| !o.is_none())
        }
        match (given(token_ids), given(block_hashes)) {
            (Some(t), None) => Ok(KeysArg::Tokens(convert::i64_array(t, "token_ids")?)),
            (None, Some(h)) => {
                let (bytes, width) = hash_rows(h)?;
                Ok(KeysArg::Hashes { bytes, width })
            }
            _ => Err(PyTypeError::new_err(
                "pass exactly one of token_ids and block_hashes",
            )),
        }
    }

    fn with<T>(&self, f: impl FnOnce(BlockKeys<'_>) -> T) -> T {
        match self {
            KeysArg::Tokens(t) => f(BlockKeys::Tokens(&t.as_cow())),
            KeysArg::Hashes { bytes, width } => f(BlockKeys::Hashes {
                bytes,
                width: *width,
            }),
        }
    }
}

/// Engine block hashes as (rows of bytes, row width): a list of equally long `bytes`, or a
/// 2-D numpy array of uint8, uint64 or int64 whose rows are the keys (e.g. `(n, 2)` uint64
/// for 128-bit hashes, `(n, 32)` uint8 for SHA-256 digests).
fn hash_rows(obj: &Bound<'_, PyAny>) -> PyResult<(Vec<u8>, usize)> {
    const EXPECTED: &str = "block_hashes must be a list of equally long bytes or a 2-D numpy array of uint8, uint64 or int64";
    if let Ok(list) = obj.cast::<PyList>() {
        let mut bytes = Vec::new();
        let mut width = None;
        for (i, item) in list.iter().enumerate() {
            let b = item.cast::<PyBytes>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "{EXPECTED}, got a list holding {}",
                    item.get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default()
                ))
            })?;
            let b = b.as_bytes();
            if *width.get_or_insert(b.len()) != b.len() || b.is_empty() {
                return Err(PyValueError::new_err(format!(
                    "block_hashes must be non-empty and equally long, but block_hashes[{i}] has {} bytes",
                    b.len()
                )));
            }
            bytes.extend_from_slice(b);
        }
        return Ok((bytes, width.unwrap_or(1)));
    }
    let arr = obj
        .cast::<numpy::PyUntypedArray>()
        .map_err(|_| PyTypeError::new_err(EXPECTED))?;
    if arr.ndim() != 2 || arr.shape()[1] == 0 {
        return Err(PyValueError::new_err(format!(
            "{EXPECTED}, got an array with shape {:?}",
            arr.shape()
        )));
    }
    fn rows<T: numpy::Element + Copy, const N: usize>(
        a: &Bound<'_, numpy::PyArray2<T>>,
        le: impl Fn(T) -> [u8; N],
    ) -> PyResult<(Vec<u8>, usize)> {
        let ro = a.try_readonly().map_err(|e| {
            PyValueError::new_err(format!(
                "block_hashes cannot be read: it is borrowed mutably ({e})"
            ))
        })?;
        let view = ro.as_array();
        let width = view.ncols() * N;
        let mut bytes = Vec::with_capacity(view.len() * N);
        for row in view.rows() {
            for &x in row {
                bytes.extend_from_slice(&le(x));
            }
        }
        Ok((bytes, width))
    }
    if let Ok(a) = arr.cast::<numpy::PyArray2<u8>>() {
        return rows(a, |x| [x]);
    }
    if let Ok(a) = arr.cast::<numpy::PyArray2<u64>>() {
        return rows(a, u64::to_le_bytes);
    }
    if let Ok(a) = arr.cast::<numpy::PyArray2<i64>>() {
        return rows(a, i64::to_le_bytes);
    }
    let got = arr.dtype().str().map(|s| s.to_string()).unwrap_or_default();
    Err(PyTypeError::new_err(format!("{EXPECTED}, got dtype {got}")))
}

#[pymethods]
impl PyBlockAllocator {
    #[new]
    fn new(num_blocks: &Bound<'_, PyAny>, block_size: &Bound<'_, PyAny>) -> PyResult<Self> {
        let py = num_blocks.py();
        let nb = convert::count(num_blocks, "num_blocks")?;
        let bs = convert::count(block_size, "block_size")?;
        let inner = guard::held(py, "allocator core", || BlockAllocator::new(nb, bs))?;
        Ok(PyBlockAllocator {
            inner: Mutex::new(inner),
        })
    }

    #[getter]
    fn num_blocks(&self, py: Python<'_>) -> PyResult<usize> {
        self.stat(py, |a| a.num_blocks())
    }
    #[getter]
    fn block_size(&self, py: Python<'_>) -> PyResult<usize> {
        self.stat(py, |a| a.block_size())
    }
    #[getter]
    fn capacity(&self, py: Python<'_>) -> PyResult<usize> {
        self.stat(py, |a| a.stats().capacity)
    }
    #[getter]
    fn num_free_blocks(&self, py: Python<'_>) -> PyResult<usize> {
        self.stat(py, |a| a.stats().num_free_blocks)
    }
    #[getter]
    fn num_cached_blocks(&self, py: Python<'_>) -> PyResult<usize> {
        self.stat(py, |a| a.stats().num_cached_blocks)
    }
    #[getter]
    fn num_used_blocks(&self, py: Python<'_>) -> PyResult<usize> {
        self.stat(py, |a| a.stats().num_used_blocks)
    }
    #[getter]
    fn num_shared_blocks(&self, py: Python<'_>) -> PyResult<usize> {
        self.stat(py, |a| a.stats().num_shared_blocks)
    }
    #[getter]
    fn num_available_blocks(&self, py: Python<'_>) -> PyResult<usize> {
        self.stat(py, |a| a.num_available_blocks())
    }
    #[getter]
    fn num_tables(&self, py: Python<'_>) -> PyResult<usize> {
        self.stat(py, |a| a.stats().num_tables)
    }
    #[getter]
    fn usage(&self, py: Python<'_>) -> PyResult<f64> {
        self.stat(py, |a| a.stats().usage)
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.stat(py, |a| a.stats())?;
        let d = PyDict::new(py);
        d.set_item("num_blocks", s.num_blocks)?;
        d.set_item("block_size", s.block_size)?;
        d.set_item("capacity", s.capacity)?;
        d.set_item("num_free_blocks", s.num_free_blocks)?;
        d.set_item("num_cached_blocks", s.num_cached_blocks)?;
        d.set_item("num_used_blocks", s.num_used_blocks)?;
        d.set_item("num_shared_blocks", s.num_shared_blocks)?;
        d.set_item(
            "num_available_blocks",
            s.num_free_blocks + s.num_cached_blocks,
        )?;
        d.set_item("num_tables", s.num_tables)?;
        d.set_item("usage", s.usage)?;
        Ok(d)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let s = self.stat(py, |a| a.stats())?;
        Ok(format!(
            "BlockAllocator(num_blocks={}, block_size={}, used={}, cached={}, free={}, tables={})",
            s.num_blocks,
            s.block_size,
            s.num_used_blocks,
            s.num_cached_blocks,
            s.num_free_blocks,
            s.num_tables
        ))
    }

    fn create_table(&self, py: Python<'_>) -> PyResult<i64> {
        self.with(py, |a| a.create_table())
    }

    fn create_tables<'py>(
        &self,
        py: Python<'py>,
        n: &Bound<'py, PyAny>,
    ) -> PyResult<I64Array<'py>> {
        let n = convert::count(n, "n")?;
        let run = |a: &mut BlockAllocator| {
            let mut ids = Vec::new();
            a.create_tables(n, &mut ids)?;
            Ok(ids)
        };
        // An admission wave's few tables cost less than releasing the GIL.
        let ids = if n >= DETACH_MIN_TOKENS {
            self.detached(py, run)?
        } else {
            self.with(py, run)?
        };
        Ok(to_array(py, ids))
    }

    fn num_tokens(&self, py: Python<'_>, table: &Bound<'_, PyAny>) -> PyResult<usize> {
        let t = convert::table_id(table)?;
        self.with(py, |a| a.num_tokens(t))
    }

    fn block_table<'py>(
        &self,
        py: Python<'py>,
        table: &Bound<'py, PyAny>,
    ) -> PyResult<I32Array<'py>> {
        let t = convert::table_id(table)?;
        let v = self.with(py, |a| a.block_table(t).map(to_i32))?;
        Ok(v.into_pyarray(py))
    }

    fn slot_mapping<'py>(
        &self,
        py: Python<'py>,
        table: &Bound<'py, PyAny>,
    ) -> PyResult<I64Array<'py>> {
        let t = convert::table_id(table)?;
        let v = self.detached(py, |a| {
            let mut out = Vec::new();
            a.slots(t, &mut out).map(|_| out)
        })?;
        Ok(v.into_pyarray(py))
    }

    fn blocks_needed(
        &self,
        py: Python<'_>,
        table: &Bound<'_, PyAny>,
        num_tokens: &Bound<'_, PyAny>,
    ) -> PyResult<usize> {
        let t = convert::table_id(table)?;
        let n = convert::count(num_tokens, "num_tokens")?;
        self.with(py, |a| a.blocks_needed(t, n))
    }

    fn append<'py>(
        &self,
        py: Python<'py>,
        table: &Bound<'py, PyAny>,
        num_tokens: &Bound<'py, PyAny>,
    ) -> PyResult<(I64Array<'py>, Option<(u32, u32)>)> {
        let t = convert::table_id(table)?;
        let n = convert::size(num_tokens, "num_tokens", SLOT_BYTES)?;
        let run = |a: &mut BlockAllocator| {
            let mut out = Vec::new();
            a.append(t, n, &mut out).map(|o| (out, o))
        };
        // A decode step (a few tokens) is cheaper than releasing the GIL; a prefill is not.
        let (slots, outcome) = if n >= DETACH_MIN_TOKENS {
            self.detached(py, run)?
        } else {
            self.with(py, run)?
        };
        Ok((slots.into_pyarray(py), outcome.cow))
    }

    #[pyo3(signature = (tables, num_tokens, token_ids = None))]
    fn append_batch<'py>(
        &self,
        py: Python<'py>,
        tables: &Bound<'py, PyAny>,
        num_tokens: &Bound<'py, PyAny>,
        token_ids: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<(I64Array<'py>, I64Array<'py>, I32Array<'py>, I32Array<'py>)> {
        let ids = convert::i64_array(tables, "tables")?;
        let ids = ids.as_cow();
        // An exact int (the decode step's 1) skips the array probe of `is_scalar_int`.
        let scalar = num_tokens.is_exact_instance_of::<pyo3::types::PyInt>()
            || convert::is_scalar_int(num_tokens);
        let counts = if scalar {
            Counts::Same(convert::size(num_tokens, "num_tokens", SLOT_BYTES)?)
        } else {
            let c = convert::i64_array(num_tokens, "num_tokens")?;
            let c = c.as_cow();
            if let Some(i) = c.iter().position(|&x| x < 0) {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "num_tokens must be non-negative, got num_tokens[{i}] = {}",
                    c[i]
                )));
            }
            Counts::Each(c.iter().map(|&x| x as usize).collect())
        };
        // The output holds one slot id per token of the whole batch.
        let total = match &counts {
            Counts::Same(n) => n.checked_mul(ids.len()),
            Counts::Each(c) => c.iter().try_fold(0usize, |t, &c| t.checked_add(c)),
        };
        convert::check_len("sum(num_tokens)", total.unwrap_or(usize::MAX), SLOT_BYTES)?;
        let tokens = match token_ids {
            Some(t) if !t.is_none() => Some(convert::i64_array(t, "token_ids")?),
            _ => None,
        };
        let tokens = tokens.as_ref().map(|t| t.as_cow());
        // A decode step (a few hundred rows) is cheaper than releasing the GIL; a prefill is not.
        let detach = ids.len().saturating_add(total.unwrap_or(usize::MAX)) >= DETACH_MIN_TOKENS;
        self.with_append_out(
            py,
            detach,
            |a, out| match &counts {
                Counts::Same(n) => a.append_batch_same(&ids, *n, tokens.as_deref(), out),
                Counts::Each(c) => a.append_batch_with(&ids, c, tokens.as_deref(), out),
            },
            |(), out| {
                (
                    PyArray1::from_slice(py, &out.slots),
                    PyArray1::from_slice(py, &out.indptr),
                    PyArray1::from_slice(py, &to_i32(&out.cow_src)),
                    PyArray1::from_slice(py, &to_i32(&out.cow_dst)),
                )
            },
        )
    }

    #[pyo3(signature = (indptr, token_ids, salt = None))]
    fn admit_batch<'py>(
        &self,
        py: Python<'py>,
        indptr: &Bound<'py, PyAny>,
        token_ids: &Bound<'py, PyAny>,
        salt: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<(I64Array<'py>, I64Array<'py>, I64Array<'py>, I64Array<'py>)> {
        let indptr = convert::i64_array(indptr, "indptr")?;
        let indptr = indptr.as_cow();
        let tokens = convert::i64_array(token_ids, "token_ids")?;
        let tokens = tokens.as_cow();
        let salt = convert::salt(salt)?;
        // A wave's lookups and hashing are O(tokens): a long prompt releases the GIL.
        let detach = tokens.len().saturating_add(indptr.len()) >= DETACH_MIN_TOKENS;
        self.with_append_out(
            py,
            detach,
            |a, out| {
                let (mut tables, mut hits) = (Vec::new(), Vec::new());
                let salt = salt.as_deref();
                a.admit_batch(&indptr, &tokens, salt, &mut tables, &mut hits, out)
                    .map(|()| (tables, hits))
            },
            |(tables, hits), out| {
                (
                    PyArray1::from_slice(py, &tables),
                    PyArray1::from_slice(py, &hits),
                    PyArray1::from_slice(py, &out.slots),
                    PyArray1::from_slice(py, &out.indptr),
                )
            },
        )
    }

    fn fork(&self, py: Python<'_>, table: &Bound<'_, PyAny>) -> PyResult<i64> {
        let t = convert::table_id(table)?;
        self.with(py, |a| a.fork(t))
    }

    fn free(&self, py: Python<'_>, table: &Bound<'_, PyAny>) -> PyResult<()> {
        let t = convert::table_id(table)?;
        self.with(py, |a| a.free(t))
    }

    fn free_batch(&self, py: Python<'_>, tables: &Bound<'_, PyAny>) -> PyResult<()> {
        let ids = convert::i64_array(tables, "tables")?;
        let ids = ids.as_cow();
        self.detached(py, |a| a.free_batch(&ids))
    }

    #[pyo3(signature = (table, token_ids = None, salt = None, *, block_hashes = None))]
    fn register_prefix(
        &self,
        py: Python<'_>,
        table: &Bound<'_, PyAny>,
        token_ids: Option<&Bound<'_, PyAny>>,
        salt: Option<&Bound<'_, PyAny>>,
        block_hashes: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        let call = BlockAllocator::register_prefix_keys;
        self.prefix_one(py, table, token_ids, salt, block_hashes, call)
    }

    #[pyo3(signature = (table, token_ids = None, salt = None, *, block_hashes = None))]
    fn adopt_prefix(
        &self,
        py: Python<'_>,
        table: &Bound<'_, PyAny>,
        token_ids: Option<&Bound<'_, PyAny>>,
        salt: Option<&Bound<'_, PyAny>>,
        block_hashes: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        let call = BlockAllocator::adopt_prefix_keys;
        self.prefix_one(py, table, token_ids, salt, block_hashes, call)
    }

    #[pyo3(signature = (tables, indptr, token_ids = None, salt = None, *, block_hashes = None))]
    fn register_prefix_batch<'py>(
        &self,
        py: Python<'py>,
        tables: &Bound<'py, PyAny>,
        indptr: &Bound<'py, PyAny>,
        token_ids: Option<&Bound<'py, PyAny>>,
        salt: Option<&Bound<'py, PyAny>>,
        block_hashes: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<I64Array<'py>> {
        self.prefix_batch(
            py,
            tables,
            indptr,
            token_ids,
            salt,
            block_hashes,
            BlockAllocator::register_prefix_batch,
        )
    }

    #[pyo3(signature = (tables, indptr, token_ids = None, salt = None, *, block_hashes = None))]
    fn adopt_prefix_batch<'py>(
        &self,
        py: Python<'py>,
        tables: &Bound<'py, PyAny>,
        indptr: &Bound<'py, PyAny>,
        token_ids: Option<&Bound<'py, PyAny>>,
        salt: Option<&Bound<'py, PyAny>>,
        block_hashes: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<I64Array<'py>> {
        self.prefix_batch(
            py,
            tables,
            indptr,
            token_ids,
            salt,
            block_hashes,
            BlockAllocator::adopt_prefix_batch,
        )
    }

    fn reset_prefix_cache(&self, py: Python<'_>) -> PyResult<usize> {
        self.detached(py, |a| Ok(a.reset_prefix_cache()))
    }

    fn compact<'py>(
        &self,
        py: Python<'py>,
        table: &Bound<'py, PyAny>,
        keep: &Bound<'py, PyAny>,
    ) -> PyResult<(I64Array<'py>, I64Array<'py>)> {
        let t = convert::table_id(table)?;
        let keep = convert::keep_array(keep)?;
        let plan = match &keep {
            KeepArg::Positions(p) => {
                let p = p.as_cow();
                self.detached(py, |a| {
                    let mut plan = CompactionPlan::default();
                    a.compact(t, Keep::Positions(&p), &mut plan).map(|_| plan)
                })?
            }
            KeepArg::Mask(m) => {
                let mask = m.as_cow();
                let mask: &[bool] = &mask;
                self.detached(py, |a| {
                    let mut plan = CompactionPlan::default();
                    a.compact(t, Keep::Mask(mask), &mut plan).map(|_| plan)
                })?
            }
        };
        Ok((plan.src.into_pyarray(py), plan.dst.into_pyarray(py)))
    }

    fn compact_batch<'py>(
        &self,
        py: Python<'py>,
        tables: &Bound<'py, PyAny>,
        keep_indptr: &Bound<'py, PyAny>,
        keep_positions: &Bound<'py, PyAny>,
    ) -> PyResult<(I64Array<'py>, I64Array<'py>, I64Array<'py>)> {
        let ids = convert::i64_array(tables, "tables")?;
        let ids = ids.as_cow();
        let indptr = convert::i64_array(keep_indptr, "keep_indptr")?;
        let indptr = indptr.as_cow();
        let pos = convert::i64_array(keep_positions, "keep_positions")?;
        let pos = pos.as_cow();
        let (plan, pip) = self.detached(py, |a| {
            let mut plan = CompactionPlan::default();
            let mut pip = Vec::new();
            a.compact_batch(&ids, &indptr, &pos, &mut plan, &mut pip)
                .map(|_| (plan, pip))
        })?;
        Ok((
            plan.src.into_pyarray(py),
            plan.dst.into_pyarray(py),
            pip.into_pyarray(py),
        ))
    }

    fn flashinfer_layout<'py>(
        &self,
        py: Python<'py>,
        tables: &Bound<'py, PyAny>,
    ) -> PyResult<(I32Array<'py>, I32Array<'py>, I32Array<'py>)> {
        let ids = convert::i64_array(tables, "tables")?;
        let ids = ids.as_cow();
        let l = self.detached(py, |a| a.flashinfer_layout(&ids))?;
        Ok((
            l.indptr.into_pyarray(py),
            l.indices.into_pyarray(py),
            l.last_page_len.into_pyarray(py),
        ))
    }

    #[pyo3(signature = (tables, num_new_tokens = None, width = None))]
    fn vllm_layout<'py>(
        &self,
        py: Python<'py>,
        tables: &Bound<'py, PyAny>,
        num_new_tokens: Option<&Bound<'py, PyAny>>,
        width: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<(Bound<'py, PyArray2<i32>>, I64Array<'py>, I32Array<'py>)> {
        let ids = convert::i64_array(tables, "tables")?;
        let ids = ids.as_cow();
        let nn = match num_new_tokens {
            Some(o) if !o.is_none() => Some(convert::i64_array(o, "num_new_tokens")?),
            _ => None,
        };
        let nn = nn.as_ref().map(|a| a.as_cow());
        let width = match width {
            Some(w) if !w.is_none() => Some(convert::count(w, "width")?),
            _ => None,
        };
        let l = self.detached(py, |a| a.vllm_layout(&ids, nn.as_deref(), width))?;
        let rows = ids.len();
        let table = l.block_table.into_pyarray(py).reshape([rows, l.width])?;
        Ok((
            table,
            l.slot_mapping.into_pyarray(py),
            l.seq_lens.into_pyarray(py),
        ))
    }

    fn ref_counts<'py>(&self, py: Python<'py>) -> PyResult<I32Array<'py>> {
        let v = self.with(py, |a| Ok(to_i32(a.ref_counts())))?;
        Ok(v.into_pyarray(py))
    }

    fn free_queue<'py>(&self, py: Python<'py>) -> PyResult<I32Array<'py>> {
        let v = self.with(py, |a| Ok(to_i32(&a.free_queue())))?;
        Ok(v.into_pyarray(py))
    }

    fn check_invariants(&self, py: Python<'_>) -> PyResult<()> {
        self.detached(py, |a| a.check_invariants())
    }
}
