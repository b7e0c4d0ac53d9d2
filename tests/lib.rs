//! Parity tests live in tests/*.rs
