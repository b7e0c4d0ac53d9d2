//! Stable Diffusion pipelines (aka diffusers' `pipelines/stable_diffusion/`).

pub mod pipeline_stable_diffusion;

pub use pipeline_stable_diffusion::{GenerationOutput, LoadOptions, StableDiffusionPipeline};
