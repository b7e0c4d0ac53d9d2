//! The one request type every generation goes through (docs/architecture.md §2), validated by
//! [`GenerationRequest::check_inputs`] before any tensor work.

use crate::error::{EngineError, Result};
use crate::pipelines::image_processor::image_size;
use crate::schedulers::SchedulerKind;
use crate::tensor_io::HostTensor;

/// Which pipeline a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PipelineKind {
    /// `StableDiffusionPipeline`.
    #[default]
    Txt2Img,
    /// `StableDiffusionImg2ImgPipeline`.
    Img2Img,
    /// `StableDiffusionInpaintPipeline` (9-channel inpainting UNet, or a plain 4-channel one).
    Inpaint,
    /// `StableDiffusionControlNetPipeline` (txt2img guided by a ControlNet and a control image).
    ControlNet,
    /// DeepFloyd IF stage I (`IFPipeline`): pixels from T5 embeddings.
    If,
    /// DeepFloyd IF stage II (`IFSuperResolutionPipeline`): an image upscaled under the prompt.
    IfStage2,
    /// `StableDiffusionUpscalePipeline` (the x4 upscaler).
    Upscale,
}

impl PipelineKind {
    /// The CLI name (`--pipeline`).
    pub fn cli_name(self) -> &'static str {
        match self {
            Self::Txt2Img => "txt2img",
            Self::Img2Img => "img2img",
            Self::Inpaint => "inpaint",
            Self::ControlNet => "controlnet",
            Self::If => "if",
            Self::IfStage2 => "if-stage2",
            Self::Upscale => "upscale",
        }
    }

    /// Diffusers' default `noise_level` (IF stage II 250, the x4 upscaler 20).
    pub fn default_noise_level(self) -> Option<usize> {
        match self {
            Self::IfStage2 => Some(250),
            Self::Upscale => Some(20),
            _ => None,
        }
    }

    /// Diffusers' default `strength` of the pipeline (img2img 0.8, inpaint 1.0).
    pub fn default_strength(self) -> f64 {
        match self {
            Self::Img2Img => 0.8,
            _ => 1.0,
        }
    }
}

impl std::str::FromStr for PipelineKind {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "txt2img" => Ok(Self::Txt2Img),
            "img2img" => Ok(Self::Img2Img),
            "inpaint" => Ok(Self::Inpaint),
            "controlnet" => Ok(Self::ControlNet),
            "if" => Ok(Self::If),
            "if-stage2" => Ok(Self::IfStage2),
            "upscale" => Ok(Self::Upscale),
            other => Err(EngineError::invalid(
                "pipeline",
                format!(
                    "`{other}` is not one of txt2img, img2img, inpaint, controlnet, if, if-stage2, upscale"
                ),
            )),
        }
    }
}

/// Text conditioning given as tensors instead of text (`--prompt-embeds`).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptEmbeds {
    /// `[batch or 1, tokens, dim]`
    pub prompt_embeds: HostTensor,
    /// `[batch or 1, tokens, dim]`; when absent with guidance on, the empty prompt is encoded.
    pub negative_prompt_embeds: Option<HostTensor>,
}

/// What every pipeline takes: the prompt, the schedule, the size, the batch and the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct CommonRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub prompt_embeds: Option<PromptEmbeds>,
    pub steps: usize,
    pub guidance_scale: f64,
    /// Output width; 0 = the model's default (filled by `Session::generate`).
    pub width: usize,
    /// Output height; 0 = the model's default.
    pub height: usize,
    /// Images per prompt.
    pub batch: usize,
    pub seed: u64,
    /// Overrides the model's scheduler class (`--scheduler`).
    pub scheduler: Option<SchedulerKind>,
    /// A diffusers scheduler config to use instead of the model's (`--scheduler-config`).
    pub scheduler_config: Option<serde_json::Value>,
    /// Initial latents before `init_noise_sigma` scaling (`--latents`), `[batch, c, h/f, w/f]`.
    /// Inpainting takes them as its noise, as diffusers does; img2img has none (its latents
    /// are the noised image), and refuses them.
    pub latents: Option<HostTensor>,
    /// Encode and decode with the VAE in overlapping tiles of its `sample_size` (diffusers'
    /// `vae.enable_tiling()`): memory stays that of one tile however large the picture, at the
    /// cost of slightly different pixels. Only pictures larger than one tile are tiled; IF has
    /// no VAE and ignores it.
    pub vae_tiling: bool,
}

impl Default for CommonRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            prompt_embeds: None,
            steps: 50,
            guidance_scale: 7.5,
            width: 512,
            height: 512,
            batch: 1,
            seed: 0,
            scheduler: None,
            scheduler_config: None,
            latents: None,
            vae_tiling: false,
        }
    }
}

/// img2img's input (`StableDiffusionImg2ImgPipeline`).
#[derive(Debug, Clone, PartialEq)]
pub struct Img2ImgInput {
    /// The init image, `[h, w, 3]` in [0, 1]; resized to `width × height` when its size
    /// differs (diffusers' preprocessing).
    pub image: HostTensor,
    /// How much of the schedule runs on the noised image (0–1); `None` = diffusers' 0.8.
    pub strength: Option<f64>,
}

/// Inpainting's input (`StableDiffusionInpaintPipeline`).
#[derive(Debug, Clone, PartialEq)]
pub struct InpaintInput {
    /// The init image, `[h, w, 3]` in [0, 1]; resized to `width × height` when its size
    /// differs; with `padding_mask_crop` the crop around the mask is.
    pub image: HostTensor,
    /// `[h, w]` in [0, 1], the size of `image`: white (≥ 0.5 after the blur) is repainted,
    /// black kept.
    pub mask: HostTensor,
    /// How much of the schedule runs on the noised image (0–1); `None` = diffusers' 1.0.
    pub strength: Option<f64>,
    /// Gaussian blur radius (pixels) applied to the mask first (diffusers'
    /// `mask_processor.blur`); 0 = none.
    pub mask_blur: f64,
    /// "Inpaint only masked": work on the mask's bounding box grown by this many pixels, at
    /// `width × height`, and paste the result back through the mask (diffusers'
    /// `padding_mask_crop`). The output then has the size of `image`.
    pub padding_mask_crop: Option<usize>,
}

impl InpaintInput {
    /// An inpainting of `image` under `mask` with diffusers' defaults.
    pub fn new(image: HostTensor, mask: HostTensor) -> Self {
        Self {
            image,
            mask,
            strength: None,
            mask_blur: 0.0,
            padding_mask_crop: None,
        }
    }
}

/// The ControlNet's input (`StableDiffusionControlNetPipeline`).
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetInput {
    /// The control image, `[h, w, 3]` in [0, 1] (used as given, resized to `width × height`
    /// if its size differs).
    pub image: HostTensor,
    /// `controlnet_conditioning_scale`.
    pub scale: f64,
    /// `control_guidance_start` / `_end`: the fraction of the steps the ControlNet acts on.
    pub guidance: (f64, f64),
    /// Guess mode: the ControlNet sees only the conditional batch, its residuals scaled from
    /// 0.1 (shallow) to 1 (deep).
    pub guess_mode: bool,
}

impl ControlNetInput {
    /// A ControlNet run on `image` with diffusers' defaults.
    pub fn new(image: HostTensor) -> Self {
        Self {
            image,
            scale: 1.0,
            guidance: (0.0, 1.0),
            guess_mode: false,
        }
    }
}

/// What an upscaler starts from.
#[derive(Debug, Clone, PartialEq)]
pub enum UpscaleSource {
    /// An image, `[h, w, 3]` in [0, 1].
    Image(HostTensor),
    /// A tensor, `[1 or batch, 3, h, w]` in [-1, 1] (`--image-array`, like diffusers'
    /// `output_type="pt"` of the previous stage).
    Array(HostTensor),
}

/// The upscalers' input (IF stage II, the x4 upscaler).
#[derive(Debug, Clone, PartialEq)]
pub struct UpscaleInput {
    pub source: UpscaleSource,
    /// The noise added to the input; `None` = the pipeline's default.
    pub noise_level: Option<usize>,
}

impl UpscaleInput {
    /// An upscale of `source` at the pipeline's default noise level.
    pub fn new(source: UpscaleSource) -> Self {
        Self {
            source,
            noise_level: None,
        }
    }
}

/// Which pipeline runs, with what only that pipeline takes: an input a pipeline does not use
/// cannot be given to it.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Task {
    /// `StableDiffusionPipeline`.
    #[default]
    Txt2Img,
    /// `StableDiffusionImg2ImgPipeline`.
    Img2Img(Img2ImgInput),
    /// `StableDiffusionInpaintPipeline` (9-channel inpainting UNet, or a plain 4-channel one).
    Inpaint(InpaintInput),
    /// `StableDiffusionControlNetPipeline`.
    ControlNet(ControlNetInput),
    /// DeepFloyd IF stage I (`IFPipeline`).
    If,
    /// DeepFloyd IF stage II (`IFSuperResolutionPipeline`).
    IfStage2(UpscaleInput),
    /// `StableDiffusionUpscalePipeline` (the x4 upscaler).
    Upscale(UpscaleInput),
}

impl Task {
    /// The pipeline this task runs.
    pub fn kind(&self) -> PipelineKind {
        match self {
            Self::Txt2Img => PipelineKind::Txt2Img,
            Self::Img2Img(_) => PipelineKind::Img2Img,
            Self::Inpaint(_) => PipelineKind::Inpaint,
            Self::ControlNet(_) => PipelineKind::ControlNet,
            Self::If => PipelineKind::If,
            Self::IfStage2(_) => PipelineKind::IfStage2,
            Self::Upscale(_) => PipelineKind::Upscale,
        }
    }

    /// The init image of img2img and inpainting.
    pub fn init_image(&self) -> Option<&HostTensor> {
        match self {
            Self::Img2Img(input) => Some(&input.image),
            Self::Inpaint(input) => Some(&input.image),
            _ => None,
        }
    }

    /// The strength the task asked for, if it takes one.
    fn own_strength(&self) -> Option<f64> {
        match self {
            Self::Img2Img(input) => input.strength,
            Self::Inpaint(input) => input.strength,
            _ => None,
        }
    }

    /// The upscalers' input.
    pub fn upscale_input(&self) -> Option<&UpscaleInput> {
        match self {
            Self::IfStage2(input) | Self::Upscale(input) => Some(input),
            _ => None,
        }
    }
}

/// One generation job: what every pipeline takes, and the task with what only its pipeline
/// takes. It derefs to [`CommonRequest`], so `request.steps` reads the common fields.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerationRequest {
    pub common: CommonRequest,
    pub task: Task,
}

impl std::ops::Deref for GenerationRequest {
    type Target = CommonRequest;
    fn deref(&self) -> &CommonRequest {
        &self.common
    }
}

impl std::ops::DerefMut for GenerationRequest {
    fn deref_mut(&mut self) -> &mut CommonRequest {
        &mut self.common
    }
}

/// Diffusers' `get_timesteps`: `strength` keeps the last `min(int(steps · strength), steps)` of
/// `steps`; returns `(t_start, steps that run)`.
pub fn strength_schedule(steps: usize, strength: f64) -> (usize, usize) {
    let init_timestep = ((steps as f64 * strength) as usize).min(steps);
    (steps - init_timestep, init_timestep)
}

/// What a model imposes on requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelLimits {
    /// Image pixels per latent pixel (8 for SD).
    pub vae_scale_factor: usize,
    /// What the UNet's input sides must be a multiple of (1 for SD; IF's UNets only double
    /// when upsampling, so theirs is `2^upsamplers`).
    pub unet_size_multiple: usize,
    /// Latent channels the UNet denoises (the VAE's).
    pub latent_channels: usize,
    /// Input channels of the UNet: the latent channels, or 2·latent + 1 for an inpainting UNet.
    pub unet_in_channels: usize,
    /// Width of the text embeddings the UNet attends to.
    pub cross_attention_dim: usize,
    /// The largest `noise_level` an upscaler takes (`max_noise_level`, or the image-noising
    /// scheduler's last timestep); 0 for models that are not upscalers.
    pub max_noise_level: usize,
    /// What the model's folder is for: the pipeline a request must ask for when it is not an
    /// SD model (IF stage I/II, the x4 upscaler), else `None`.
    pub family: Option<PipelineKind>,
}

/// The largest side we accept: beyond this a request is almost surely a typo, and Burn would
/// fail deep inside a kernel instead of here.
pub const MAX_SIDE: usize = 8192;
/// The most images one request may ask for.
pub const MAX_BATCH: usize = 64;
/// The most denoising steps one request may ask for.
pub const MAX_STEPS: usize = 1000;
/// The largest mask blur radius we accept (pixels).
pub const MAX_MASK_BLUR: f64 = 256.0;

impl GenerationRequest {
    /// Validates the request against the model before any tensor work (diffusers' `check_inputs`).
    pub fn check_inputs(&self, limits: &ModelLimits) -> Result<()> {
        let f = (limits.vae_scale_factor * limits.unet_size_multiple.max(1)).max(8);
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || v % f != 0 {
                return Err(EngineError::invalid(
                    field,
                    format!("{v} must be a positive multiple of {f}"),
                ));
            }
            if v > MAX_SIDE {
                return Err(EngineError::invalid(
                    field,
                    format!("{v} is larger than {MAX_SIDE}"),
                ));
            }
        }
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(EngineError::invalid(
                "steps",
                format!("{} must be between 1 and {MAX_STEPS}", self.steps),
            ));
        }
        if self.batch == 0 || self.batch > MAX_BATCH {
            return Err(EngineError::invalid(
                "batch",
                format!("{} must be between 1 and {MAX_BATCH}", self.batch),
            ));
        }
        if !self.guidance_scale.is_finite() || self.guidance_scale < 0.0 {
            return Err(EngineError::invalid(
                "guidance",
                format!("{} must be a finite number ≥ 0", self.guidance_scale),
            ));
        }
        if let Some(latents) = &self.latents {
            let expected = [
                self.batch,
                limits.latent_channels,
                self.height / limits.vae_scale_factor,
                self.width / limits.vae_scale_factor,
            ];
            if latents.shape != expected {
                return Err(EngineError::invalid(
                    "latents",
                    format!(
                        "shape {:?} does not match the request, expected {expected:?}",
                        latents.shape
                    ),
                ));
            }
        }
        self.check_image_inputs(limits)?;
        if let Some(embeds) = &self.prompt_embeds {
            let check = |name: &'static str, t: &HostTensor| -> Result<()> {
                let ok = t.shape.len() == 3
                    && (t.shape[0] == 1 || t.shape[0] == self.batch)
                    && t.shape[1] > 0
                    && t.shape[2] == limits.cross_attention_dim;
                if ok {
                    Ok(())
                } else {
                    Err(EngineError::invalid(
                        name,
                        format!(
                            "shape {:?}, expected [1 or {}, tokens, {}]",
                            t.shape, self.batch, limits.cross_attention_dim
                        ),
                    ))
                }
            };
            check("prompt_embeds", &embeds.prompt_embeds)?;
            if let Some(neg) = &embeds.negative_prompt_embeds {
                check("negative_prompt_embeds", neg)?;
                if neg.shape[1] != embeds.prompt_embeds.shape[1] {
                    return Err(EngineError::invalid(
                        "negative_prompt_embeds",
                        "must have as many tokens as prompt_embeds",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The pipeline this request runs.
    pub fn pipeline(&self) -> PipelineKind {
        self.task.kind()
    }

    /// The strength this request runs with (its own, else the pipeline's default).
    pub fn strength(&self) -> f64 {
        self.task
            .own_strength()
            .unwrap_or_else(|| self.pipeline().default_strength())
    }

    /// The strength when the pipeline starts from an image (A1111's "Denoising strength").
    pub fn denoising_strength(&self) -> Option<f64> {
        self.task.init_image().map(|_| self.strength())
    }

    /// `(t_start, steps that run)` of diffusers' `get_timesteps`: strength keeps the last
    /// `min(int(steps · strength), steps)` of the schedule.
    pub fn strength_schedule(&self) -> (usize, usize) {
        strength_schedule(self.steps, self.strength())
    }

    /// The noise level this request runs with (its own, else the pipeline's default).
    pub fn noise_level(&self) -> usize {
        self.task
            .upscale_input()
            .and_then(|input| input.noise_level)
            .or(self.pipeline().default_noise_level())
            .unwrap_or(0)
    }

    /// The image-conditioning part of [`Self::check_inputs`].
    fn check_image_inputs(&self, limits: &ModelLimits) -> Result<()> {
        let pipeline = self.pipeline();
        let name = pipeline.cli_name();
        let cascade = matches!(
            pipeline,
            PipelineKind::If | PipelineKind::IfStage2 | PipelineKind::Upscale
        );
        match limits.family {
            Some(family) if family != pipeline => {
                return Err(EngineError::invalid(
                    "pipeline",
                    format!(
                        "this model runs the {} pipeline, not {name}",
                        family.cli_name()
                    ),
                ));
            }
            None if cascade => {
                return Err(EngineError::invalid(
                    "pipeline",
                    format!("this is a Stable Diffusion model: it cannot run {name}"),
                ));
            }
            _ => {}
        }
        if cascade {
            return self.check_cascade_inputs(limits);
        }
        let inpainting_unet = limits.unet_in_channels == 2 * limits.latent_channels + 1;
        if inpainting_unet && pipeline != PipelineKind::Inpaint {
            return Err(EngineError::invalid(
                "pipeline",
                format!(
                    "this model's UNet takes {} input channels (an inpainting model): use the \
                     inpaint pipeline, not {name}",
                    limits.unet_in_channels
                ),
            ));
        }
        if !inpainting_unet && limits.unet_in_channels != limits.latent_channels {
            return Err(EngineError::Unsupported(format!(
                "a UNet with {} input channels for {} latent channels",
                limits.unet_in_channels, limits.latent_channels
            )));
        }
        match &self.task {
            Task::ControlNet(control) => check_control_inputs(control),
            Task::Img2Img(input) => {
                if self.latents.is_some() {
                    return Err(EngineError::invalid(
                        "latents",
                        "are not used by the img2img pipeline (its latents are the noised image)",
                    ));
                }
                self.check_init_image(&input.image).map(|_| ())
            }
            Task::Inpaint(input) => {
                let (w, h) = self.check_init_image(&input.image)?;
                let (mw, mh) = image_size(&input.mask, "mask", 1)?;
                if (mw, mh) != (w, h) {
                    return Err(EngineError::invalid(
                        "mask",
                        format!("is {mw}×{mh} but the image is {w}×{h}"),
                    ));
                }
                if !input.mask_blur.is_finite() || !(0.0..=MAX_MASK_BLUR).contains(&input.mask_blur)
                {
                    return Err(EngineError::invalid(
                        "mask_blur",
                        format!("{} must be between 0 and {MAX_MASK_BLUR}", input.mask_blur),
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The init image and strength of img2img and inpainting; returns the image's size.
    fn check_init_image(&self, image: &HostTensor) -> Result<(usize, usize)> {
        let (w, h) = image_size(image, "image", 3)?;
        if w > MAX_SIDE || h > MAX_SIDE {
            return Err(EngineError::invalid(
                "image",
                format!("{w}×{h} is larger than {MAX_SIDE} on a side"),
            ));
        }
        let strength = self.strength();
        if !(0.0..=1.0).contains(&strength) {
            return Err(EngineError::invalid(
                "strength",
                format!("{strength} must be between 0 and 1"),
            ));
        }
        let (_, runs) = self.strength_schedule();
        if runs < 1 {
            return Err(EngineError::invalid(
                "strength",
                format!(
                    "{strength} × {} steps leaves no step to run: raise the strength or the steps",
                    self.steps
                ),
            ));
        }
        Ok((w, h))
    }

    /// The IF / x4-upscaler part of [`Self::check_inputs`].
    fn check_cascade_inputs(&self, limits: &ModelLimits) -> Result<()> {
        let Some(input) = self.task.upscale_input() else {
            // IF stage I takes nothing but the common fields.
            return Ok(());
        };
        let (w, h) = match &input.source {
            UpscaleSource::Image(image) => image_size(image, "image", 3)?,
            UpscaleSource::Array(array) => {
                let ok = array.shape.len() == 4
                    && (array.shape[0] == 1 || array.shape[0] == self.batch)
                    && array.shape[1] == 3
                    && array.shape[2] > 0
                    && array.shape[3] > 0;
                if !ok {
                    return Err(EngineError::invalid(
                        "image_array",
                        format!(
                            "shape {:?}, expected [1 or {}, 3, height, width]",
                            array.shape, self.batch
                        ),
                    ));
                }
                if array.values.iter().any(|v| !v.is_finite()) {
                    return Err(EngineError::invalid(
                        "image_array",
                        "holds NaN or infinite values",
                    ));
                }
                (array.shape[3], array.shape[2])
            }
        };
        if w > MAX_SIDE || h > MAX_SIDE {
            return Err(EngineError::invalid(
                "image",
                format!("{w}×{h} is larger than {MAX_SIDE} on a side"),
            ));
        }
        let level = self.noise_level();
        if level > limits.max_noise_level {
            return Err(EngineError::invalid(
                "noise_level",
                format!(
                    "{level} is above this model's maximum, {}",
                    limits.max_noise_level
                ),
            ));
        }
        if self.pipeline() == PipelineKind::Upscale {
            // The x4 upscaler's output is 4× its input, whose sides its VAE needs in multiples
            // of 4: the request names the output size.
            let f = 4 * limits.vae_scale_factor;
            for (field, v) in [("width", self.width), ("height", self.height)] {
                if v % f != 0 {
                    return Err(EngineError::invalid(
                        field,
                        format!(
                            "{v} must be a multiple of {f} (4 × the input's multiple of {})",
                            limits.vae_scale_factor
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Classifier-free guidance is on for guidance > 1, as in diffusers.
    pub fn do_classifier_free_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }

    /// The batch the UNet sees: each image's unconditional and conditional pair with
    /// classifier-free guidance, else the images.
    pub fn unet_batch(&self) -> usize {
        self.batch
            * if self.do_classifier_free_guidance() {
                2
            } else {
                1
            }
    }
}

/// The ControlNet part of [`GenerationRequest::check_inputs`].
fn check_control_inputs(control: &ControlNetInput) -> Result<()> {
    let (w, h) = image_size(&control.image, "control_image", 3)?;
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(EngineError::invalid(
            "control_image",
            format!("{w}×{h} is larger than {MAX_SIDE} on a side"),
        ));
    }
    if !control.scale.is_finite() || control.scale < 0.0 {
        return Err(EngineError::invalid(
            "controlnet_scale",
            format!("{} must be a finite number ≥ 0", control.scale),
        ));
    }
    let (start, end) = control.guidance;
    if !(0.0..=1.0).contains(&start) || !(0.0..=1.0).contains(&end) || start >= end {
        return Err(EngineError::invalid(
            "control_guidance",
            format!("start {start} and end {end} must satisfy 0 ≤ start < end ≤ 1"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_must_divide_by_the_unets_multiple() {
        // IF-II-M: four resnet upsamplers that only double.
        let limits = ModelLimits {
            vae_scale_factor: 1,
            unet_size_multiple: 16,
            latent_channels: 3,
            unet_in_channels: 6,
            cross_attention_dim: 4096,
            max_noise_level: 999,
            family: Some(PipelineKind::IfStage2),
        };
        let request = |width| GenerationRequest {
            common: CommonRequest {
                width,
                height: 256,
                ..Default::default()
            },
            task: Task::IfStage2(UpscaleInput::new(UpscaleSource::Array(HostTensor {
                shape: vec![1, 3, 64, 64],
                values: vec![0.0; 3 * 64 * 64],
            }))),
        };
        let err = request(264).check_inputs(&limits).unwrap_err().to_string();
        assert_eq!(err, "invalid width: 264 must be a positive multiple of 16");
        request(272)
            .check_inputs(&limits)
            .expect("272 is a multiple of 16");
        // SD's UNet takes any latent size: the VAE's 8 is the multiple.
        let sd = ModelLimits {
            vae_scale_factor: 8,
            unet_size_multiple: 1,
            latent_channels: 4,
            unet_in_channels: 4,
            cross_attention_dim: 768,
            max_noise_level: 0,
            family: None,
        };
        let mut txt2img = request(264);
        txt2img.task = Task::Txt2Img;
        txt2img.check_inputs(&sd).expect("264 is a multiple of 8");
    }
}
