//! Autoencoders (aka diffusers' `models/autoencoders/`).

pub mod autoencoder_kl;
pub mod vae;

pub use autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
pub use vae::DiagonalGaussianDistribution;
