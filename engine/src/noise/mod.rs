//! Where Gaussian noise comes from: a torch-compatible CPU generator (so a seed gives the same
//! noise as diffusers with `torch.Generator("cpu").manual_seed(seed)`), or a recorded noise tape
//! replayed draw by draw (DESIGN.md §5, `--noise-tape`).
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
