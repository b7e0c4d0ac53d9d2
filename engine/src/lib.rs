//! Brushfire's diffusion engine: diffusers' models, schedulers and pipelines on Burn.
//!
//! Flow is one way: the app calls the engine, the engine calls `shaders` and Burn. The engine
//! never panics on bad input: requests are validated by `check_inputs` before any tensor work.

pub mod atomic_file;
pub mod backend;
pub mod bench;
pub mod error;
pub mod loading;
pub mod memory;
pub mod models;
pub mod noise;
pub mod pipelines;
pub mod schedulers;
pub mod session;
pub mod tensor_io;
pub mod worker;

pub use error::{EngineError, Result};
