//! Quantized storage layouts: the block format ([`QuantLayout`]), the asymmetric per-group
//! codec, KIVI's key/value cache with its residual window, and MiKV-style mixed precision.
//! The bit-exact format is specified in `docs/layouts.md`.

pub mod codec;
pub mod kivi;
pub mod layout;
pub mod mikv;

pub use codec::{dequantize, dequantize_into, group_scale_zero, quantize, quantize_into, Input};
pub use kivi::{kivi_nbytes, KiviCache};
pub use layout::{GroupAxis, MetaDtype, QuantLayout};
pub use mikv::{MixedPrecisionStore, Tier};
