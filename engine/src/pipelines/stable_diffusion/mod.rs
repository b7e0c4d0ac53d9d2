//! Stable Diffusion pipelines (aka diffusers' `pipelines/stable_diffusion/`).

pub mod pipeline_stable_diffusion;

pub use pipeline_stable_diffusion::{
    DenoiseOptions, GenerationOutput, LoadOptions, StableDiffusionPipeline, denoise,
    sd15_config_dir,
};
