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

/// The most bytes one buffer may take: the machine's physical memory where it can be read
/// (`MemTotal` in Linux's `/proc/meminfo`), else `isize::MAX` (the most Rust can allocate).
///
/// Why a limit below what `try_reserve` refuses: with the kernel's default overcommit, a
/// reservation larger than the free memory but smaller than about RAM + swap *succeeds*, and
/// the process then stalls or is killed while it touches the pages. A size argument or an
/// array copy above this limit can never succeed, so it is refused before anything is allocated.
pub fn max_alloc_bytes() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| physical_memory().unwrap_or(isize::MAX as usize))
}

fn physical_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024).map(|b| b.min(isize::MAX as usize))
}

/// Checks that `count` entries of `bytes_each` bytes fit in one buffer ([`max_alloc_bytes`]).
/// `what` names the argument the count comes from; the error names it and the limit.
pub fn check_alloc(what: &str, count: usize, bytes_each: usize) -> Result<()> {
    let limit = max_alloc_bytes();
    match count.checked_mul(bytes_each.max(1)) {
        Some(b) if b <= limit => Ok(()),
        _ => Err(KvError::InvalidArgument(format!(
            "{what} is too large: {count} entries of {} bytes exceed the {limit} bytes of memory \
             this machine has",
            bytes_each.max(1)
        ))),
    }
}

/// Reserves room for `additional` more elements, turning an allocation failure (which Rust
/// would otherwise turn into a process abort) into `InvalidArgument`. Used wherever a size
/// comes from the caller. Sizes above [`max_alloc_bytes`] are refused before trying.
pub fn try_reserve<T>(v: &mut Vec<T>, additional: usize, what: &str) -> Result<()> {
    check_alloc(what, additional, std::mem::size_of::<T>())?;
    v.try_reserve_exact(additional).map_err(|_| {
        KvError::InvalidArgument(format!(
            "{what} is too large: cannot allocate {additional} entries"
        ))
    })
}

/// A vector of `n` copies of `value`, or `InvalidArgument` naming `what` when it cannot be
/// allocated (see [`try_reserve`]).
pub fn try_filled<T: Clone>(n: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    try_reserve(&mut v, n, what)?;
    v.resize(n, value);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::minicache::layer_pairs;
    use crate::select::{budget, pattern, score::ScoreState};

    fn too_large<T: std::fmt::Debug>(r: Result<T>, what: &str) {
        match r {
            Err(KvError::InvalidArgument(m)) => {
                assert!(m.starts_with(&format!("{what} is too large")), "{m}")
            }
            other => panic!("{what}: expected a size error, got {other:?}"),
        }
    }

    #[test]
    fn sizes_beyond_memory_are_refused_before_allocating() {
        let limit = max_alloc_bytes();
        assert!(limit > 0);
        assert!(check_alloc("n", limit, 1).is_ok());
        too_large(check_alloc("n", limit + 1, 1), "n");
        too_large(check_alloc("n", usize::MAX, 2), "n");
        let mut v: Vec<u64> = Vec::new();
        too_large(try_reserve(&mut v, usize::MAX / 4, "v"), "v");
        too_large(ScoreState::try_new(1 << 62), "num_rows");
        too_large(layer_pairs(1 << 62, None), "num_layers");
        too_large(budget::uniform(10, 1 << 40, 5), "num_rows");
        too_large(budget::pyramid(1 << 40, 100, 10, 2, 20), "num_layers");
    }

    #[test]
    fn loops_sized_by_arguments_are_bounded() {
        let p = pattern::LongGenParams {
            sinks: 1,
            window: 1,
            block: 64,
            stride: 4,
            local_blocks: 1,
        };
        let kinds = [pattern::LayerKind::Full];
        too_large(pattern::longgen(&kinds, 1 << 40, 10, &p), "num_heads");
        too_large(pattern::longgen(&kinds, 1, 1 << 62, &p), "n");
        // The pyramid's excess is taken in whole sweeps: many layers finish at once.
        let b = budget::pyramid(1 << 16, 1 << 40, 1 << 30, 0, 3).unwrap();
        assert_eq!(b.iter().sum::<usize>(), (1 << 16) * (1 << 30));
    }
}
