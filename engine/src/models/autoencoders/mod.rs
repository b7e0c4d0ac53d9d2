//! Autoencoders (aka diffusers' `models/autoencoders/`).

pub mod autoencoder_kl;
pub mod tiling;
pub mod vae;

pub use autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
pub use tiling::VaeTiling;
pub use vae::DiagonalGaussianDistribution;
