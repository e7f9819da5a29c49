//! `kvcore._kvcore`: thin PyO3 bindings over `kvcore-core`.
//!
//! Each binding extracts its arguments (numpy arrays zero-copy where the dtype already
//! matches), calls the core with the GIL released for O(n) work, and converts the result.
//! Core errors become Python exceptions in exactly one place, `errors.rs`.

mod allocator;
mod convert;
mod errors;
mod guard;
mod merge;
mod quant;
mod select;

use pyo3::prelude::*;

#[pymodule]
fn _kvcore(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "build_profile",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    )?;
    // The most bytes one buffer may take (the machine's memory): sizes above it are refused.
    m.add("max_alloc_bytes", kvcore_core::error::max_alloc_bytes())?;
    errors::register(m)?;
    m.add_class::<allocator::PyBlockAllocator>()?;
    select::register(m)?;
    quant::register(m)?;
    merge::register(m)?;
    Ok(())
}
