//! The one error type of the core. The bindings map each variant to one Python exception
//! class in `kvcore-py/src/errors.rs`.

/// Everything that can go wrong in `kvcore-core`.
///
/// Running out of blocks is an *expected* outcome that a scheduler handles (wait, preempt,
/// compress); every other variant means the caller passed something wrong or, for
/// [`KvError::InvariantViolation`], that the allocator itself is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// The pool has fewer allocatable blocks than the request needs; nothing was changed.
    #[error("out of blocks: the request needs {needed} block(s) but only {available} of {capacity} are free or reclaimable from the prefix cache")]
    OutOfBlocks {
        needed: usize,
        available: usize,
        capacity: usize,
    },
    /// The table id was never handed out by this allocator.
    #[error("unknown table id {0}: it was never created by this allocator")]
    UnknownTable(i64),
    /// The table id was handed out but has since been freed (double free or use after free).
    #[error("table {0} was already freed")]
    TableFreed(i64),
    /// Keep positions are out of range, unsorted, duplicated, or a mask has the wrong length.
    #[error("{0}")]
    InvalidPositions(String),
    /// Any other argument outside its documented domain (zero sizes, mismatched lengths, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// `check_invariants` found an inconsistency: a bug in the allocator, never a user error.
    #[error("allocator invariant violated: {0}")]
    InvariantViolation(String),
}

/// Result alias used across the core.
pub type Result<T> = std::result::Result<T, KvError>;

/// Reserves room for `additional` more elements, turning an allocation failure (which Rust
/// would otherwise turn into a process abort) into `InvalidArgument`. Used wherever a size
/// comes from the caller.
pub(crate) fn try_reserve<T>(v: &mut Vec<T>, additional: usize, what: &str) -> Result<()> {
    v.try_reserve_exact(additional).map_err(|_| {
        KvError::InvalidArgument(format!(
            "{what} is too large: cannot allocate {additional} entries"
        ))
    })
}
