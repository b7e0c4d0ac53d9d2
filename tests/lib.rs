//! The parity tests live in `parity/` (one test binary); fixtures in `fixtures/`.
