//! Where Gaussian noise comes from: a torch-compatible CPU generator (so a seed gives the same
//! noise as diffusers with `torch.Generator("cpu").manual_seed(seed)`), or a recorded noise tape
//! replayed draw by draw (`--noise-tape`, docs/cli.md).
//!
//! Noise is drawn on the host in f32, in the order diffusers draws it, then uploaded.

mod tape;
mod torch_generator;

pub use tape::NoiseTape;
pub use torch_generator::TorchGenerator;

use crate::error::Result;

/// A source of standard-normal draws, consumed in the order the pipeline makes them.
pub trait NoiseSource: Send {
    /// One draw of `shape` standard-normal values in row-major order, as `torch.randn(shape)`.
    fn randn(&mut self, shape: &[usize]) -> Result<Vec<f32>>;
}

/// A fresh seed for a run that names none: 32 bits, like A1111's seeds, so users can type them
/// back.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now()) & 0xffff_ffff
}
