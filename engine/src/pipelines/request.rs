//! The one request type every generation goes through (STYLE.md #7), validated by
//! [`GenerationRequest::check_inputs`] before any tensor work.

use crate::error::{EngineError, Result};
use crate::schedulers::SchedulerKind;
use crate::tensor_io::HostTensor;

/// Which pipeline a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PipelineKind {
    /// `StableDiffusionPipeline`.
    #[default]
    Txt2Img,
}

impl std::str::FromStr for PipelineKind {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "txt2img" => Ok(Self::Txt2Img),
            "img2img" | "inpaint" | "controlnet" | "if" | "if-stage2" | "upscale" => Err(
                EngineError::Unsupported(format!("the `{s}` pipeline is not implemented yet")),
            ),
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

/// One generation job.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub pipeline: PipelineKind,
    pub prompt: String,
    pub negative_prompt: String,
    pub prompt_embeds: Option<PromptEmbeds>,
    pub steps: usize,
    pub guidance_scale: f64,
    pub width: usize,
    pub height: usize,
    /// Images per prompt.
    pub batch: usize,
    pub seed: u64,
    /// Overrides the model's scheduler class (`--scheduler`).
    pub scheduler: Option<SchedulerKind>,
    /// A diffusers scheduler config to use instead of the model's (`--scheduler-config`).
    pub scheduler_config: Option<serde_json::Value>,
    /// Initial latents before `init_noise_sigma` scaling (`--latents`), `[batch, c, h/f, w/f]`.
    pub latents: Option<HostTensor>,
}

impl Default for GenerationRequest {
    fn default() -> Self {
        Self {
            pipeline: PipelineKind::Txt2Img,
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
        }
    }
}

/// What a model imposes on requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelLimits {
    /// Image pixels per latent pixel (8 for SD).
    pub vae_scale_factor: usize,
    /// Latent channels the UNet denoises.
    pub latent_channels: usize,
    /// Width of the text embeddings the UNet attends to.
    pub cross_attention_dim: usize,
}

/// The largest side we accept: beyond this a request is almost surely a typo, and Burn would
/// fail deep inside a kernel instead of here.
pub const MAX_SIDE: usize = 8192;
/// The most images one request may ask for.
pub const MAX_BATCH: usize = 64;
/// The most denoising steps one request may ask for.
pub const MAX_STEPS: usize = 1000;

impl GenerationRequest {
    /// Validates the request against the model before any tensor work (diffusers' `check_inputs`).
    pub fn check_inputs(&self, limits: &ModelLimits) -> Result<()> {
        let f = limits.vae_scale_factor.max(8);
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

    /// Classifier-free guidance is on for guidance > 1, as in diffusers.
    pub fn do_classifier_free_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }
}
