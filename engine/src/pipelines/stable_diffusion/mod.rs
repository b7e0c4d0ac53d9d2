//! Stable Diffusion pipelines (aka diffusers' `pipelines/stable_diffusion/`): txt2img, img2img
//! and inpainting share one loaded [`StableDiffusionPipeline`]; the request picks the pipeline.

pub mod pipeline_stable_diffusion;
mod pipeline_stable_diffusion_controlnet;
mod pipeline_stable_diffusion_img2img;
mod pipeline_stable_diffusion_inpaint;
mod pipeline_stable_diffusion_upscale;

pub use pipeline_stable_diffusion::{
    ControlConditioning, DenoiseOptions, GenerationOutput, InpaintConditioning, LoadOptions,
    PreviewKind, SD15_CONFIG_FILES, StableDiffusionPipeline, denoise, sd15_config_dir,
    write_sd15_configs,
};
