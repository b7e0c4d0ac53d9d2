//! Stable Diffusion pipelines (aka diffusers' `pipelines/stable_diffusion/`): txt2img, img2img
//! and inpainting share one loaded [`StableDiffusionPipeline`]; the request picks the pipeline.
//! Each pipeline's file reads like its diffusers twin (check inputs, encode, prepare latents,
//! loop, decode); what they share is beside them: `loading`, `memory_checks`, `denoise`.

mod denoise;
mod loading;
mod memory_checks;
pub mod pipeline_stable_diffusion;
mod pipeline_stable_diffusion_controlnet;
mod pipeline_stable_diffusion_img2img;
mod pipeline_stable_diffusion_inpaint;
mod pipeline_stable_diffusion_upscale;

pub(crate) use denoise::Conditioning;
pub use denoise::{ControlConditioning, DenoiseOptions, InpaintConditioning, PreviewKind, denoise};
pub use loading::{
    DEFAULT_MAX_NOISE_LEVEL, SD15_CONFIG_FILES, sd15_config_dir, write_sd15_configs,
};
pub(crate) use loading::{
    SD15_SCHEDULER_CONFIG, SD15_UNET_CONFIG, diffusers_weights, read_json_file,
};
pub use pipeline_stable_diffusion::{GenerationOutput, LoadOptions, StableDiffusionPipeline};
