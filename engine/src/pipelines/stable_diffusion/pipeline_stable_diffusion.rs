//! Text-to-image with Stable Diffusion 1.x/2.x (aka diffusers'
//! `pipelines/stable_diffusion/pipeline_stable_diffusion.py`, `StableDiffusionPipeline`), and
//! the loaded components img2img and inpainting share (their steps live beside this file).
//! Loading and the built-in SD 1.5 configs are in `loading.rs`, the memory checks in
//! `memory_checks.rs`, the denoising loop every pipeline shares in `denoise.rs`.
//!
//! `__call__` order is kept: check inputs, encode the prompt, prepare timesteps, prepare latents,
//! denoise (cancel checked and progress reported every step), decode.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{DType, Tensor, backend::Backend};

use crate::error::{EngineError, Result};
use crate::memory::MemoryBudget;
use crate::models::autoencoders::{AutoencoderKL, AutoencoderKLConfig, VaeTiling};
use crate::models::controlnets::ControlNetModel;
use crate::models::text_encoders::clip::CLIPTextModel;
use crate::models::text_encoders::clip_tokenizer::CLIPTokenizer;
use crate::models::unets::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::weights::CastParams;
use crate::models::{AttnProcessor, MemoryFormat};
use crate::noise::{NoiseSource, TorchGenerator};
use crate::pipelines::{
    CancelToken, GenerationRequest, ModelLimits, NoteCollector, PipelineKind, StepObserver, Task,
};
use crate::schedulers::Scheduler;
use crate::tensor_io::HostTensor;

use super::denoise::{Conditioning, ControlConditioning, DenoiseOptions, PreviewKind, denoise};

/// How to load a diffusers folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Prefer `*.{variant}.safetensors` files (e.g. `fp16`) where they exist.
    pub variant: Option<String>,
    /// What the device can give: the weights are checked against it before any is read, and
    /// the pipeline checks its requests against it (see [`MemoryBudget`]).
    pub memory_budget: MemoryBudget,
}

/// The finished images.
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    /// `[batch, height, width, 3]` in [0, 1] (diffusers' `output_type="np"`).
    pub images: HostTensor,
    /// The scheduler used, for metadata.
    pub scheduler: &'static str,
    /// What the user should know about the run (e.g. steps redone in f32).
    pub notes: Vec<String>,
    /// IF's images as the next stage takes them: `[batch, 3, h, w]` in [-1, 1], not clamped
    /// (diffusers' `output_type="pt"`); `None` for latent-space pipelines.
    pub raw: Option<HostTensor>,
    /// IF's T5 embeddings of the prompt (`[1, tokens, d]` each), so the next stage need not run
    /// T5 again (as diffusers' IF docs pass stage I's to stage II); `None` elsewhere.
    pub prompt_embeds: Option<crate::pipelines::PromptEmbeds>,
}

/// Diffusers' `StableDiffusionPipeline`: the loaded components and the scheduler config.
#[derive(Debug)]
pub struct StableDiffusionPipeline<B: Backend> {
    pub tokenizer: CLIPTokenizer,
    pub text_encoder: CLIPTextModel<B>,
    pub unet: UNet2DConditionModel<B>,
    pub unet_config: UNet2DConditionConfig,
    pub vae: AutoencoderKL<B>,
    pub vae_config: AutoencoderKLConfig,
    /// `scheduler/scheduler_config.json` as read.
    pub scheduler_config: serde_json::Value,
    /// The x4 upscaler's image-noising scheduler (`low_res_scheduler/`); `None` for SD.
    pub low_res_scheduler_config: Option<serde_json::Value>,
    /// The x4 upscaler's highest noise level (model_index.json's `max_noise_level`).
    pub max_noise_level: usize,
    pub device: B::Device,
    /// Where the model came from (folder), for messages and metadata.
    pub source: PathBuf,
    /// The ControlNet the controlnet pipeline uses, when one is loaded.
    pub controlnet: Option<ControlNetModel<B>>,
    /// The attention processor set last (a ControlNet loaded later gets it too).
    pub(super) attn_processor: AttnProcessor,
    /// How the model was loaded (a ControlNet loaded later prefers the same weights variant).
    pub(super) load_options: LoadOptions,
    /// What requests' attention is checked against.
    pub(super) memory_budget: MemoryBudget,
}

impl<B: Backend> StableDiffusionPipeline<B> {
    /// What this model imposes on requests.
    pub fn limits(&self) -> ModelLimits {
        ModelLimits {
            vae_scale_factor: self.vae_config.scale_factor(),
            unet_size_multiple: self.unet.size_multiple(),
            latent_channels: self.vae_config.latent_channels,
            unet_in_channels: self.unet_config.in_channels,
            cross_attention_dim: self.text_encoder.hidden_size(),
            max_noise_level: self.max_noise_level,
            family: self
                .low_res_scheduler_config
                .is_some()
                .then_some(PipelineKind::Upscale),
        }
    }

    /// Sets the attention processor of the UNet and the VAE (diffusers' `set_attn_processor`).
    pub fn set_attn_processor(&mut self, processor: AttnProcessor) {
        self.attn_processor = processor;
        self.unet.set_attn_processor(processor);
        self.vae.set_attn_processor(processor);
        if let Some(controlnet) = self.controlnet.as_mut() {
            controlnet.set_attn_processor(processor);
        }
    }

    /// Where the pipeline runs, for checking requests' attention memory before any tensor work
    /// (the worker, CLI and benchmark set it from the selected backend).
    pub fn set_memory_budget(&mut self, budget: MemoryBudget) {
        self.memory_budget = budget;
    }

    /// Loads a ControlNet for the controlnet pipeline (replacing any loaded one): a diffusers
    /// folder, or a single-file checkpoint (original `control_model.` layout) whose config is
    /// this UNet's, as diffusers' `ControlNetModel.from_unet`. It takes the UNet's attention
    /// processor, precision and memory format, and a folder's weights variant as the model's
    /// ([`LoadOptions::variant`]).
    pub fn load_controlnet(&mut self, dir: &Path) -> Result<()> {
        let (mut controlnet, _) = if dir.is_file() {
            ControlNetModel::<B>::load_single_file(
                dir,
                &self.unet_config,
                &self.memory_budget,
                &self.device,
            )?
        } else {
            ControlNetModel::<B>::load(
                dir,
                self.load_options.variant.as_deref(),
                &self.memory_budget,
                &self.device,
            )?
        };
        let boc = &self.unet_config.block_out_channels;
        if controlnet.controlnet_down_blocks.len() != self.unet_skip_count()
            || controlnet.conv_in.weight.dims()[0] != boc.first().copied().unwrap_or(0)
        {
            return Err(EngineError::Config {
                path: dir.to_path_buf(),
                message: "this ControlNet was not made for this UNet (its blocks differ)".into(),
            });
        }
        controlnet.set_attn_processor(self.attn_processor);
        let mut controlnet = controlnet.map(&mut CastParams(self.unet.conv_in.weight.dtype()));
        controlnet.set_memory_format(self.unet.memory_format());
        self.controlnet = Some(controlnet);
        Ok(())
    }

    /// How many skips the UNet's down path pushes (one ControlNet residual each).
    fn unet_skip_count(&self) -> usize {
        1 + self
            .unet
            .down_blocks
            .iter()
            .map(|b| b.resnets.len() + b.downsamplers.len())
            .sum::<usize>()
    }

    /// Sets the UNet's and the ControlNet's memory format (diffusers'
    /// `pipe.unet.to(memory_format=torch.channels_last)`; the VAE keeps NCHW, as in the seed's
    /// benchmark).
    pub fn set_memory_format(&mut self, format: MemoryFormat) {
        self.unet.set_memory_format(format);
        if let Some(controlnet) = self.controlnet.as_mut() {
            controlnet.set_memory_format(format);
        }
    }

    /// Builds the scheduler the request asks for (its config, else the model's; its class
    /// override, else the config's `_class_name`).
    pub fn scheduler_for(&self, request: &GenerationRequest) -> Result<Box<dyn Scheduler<B>>> {
        crate::pipelines::request_scheduler(request, &self.scheduler_config)
    }

    /// Encodes prompts to embeddings `[n, 77, dim]` (diffusers' `encode_prompt`, no clip-skip).
    pub fn encode_text(&self, prompts: &[&str]) -> Result<Tensor<B, 3>> {
        let tokens = self.tokenizer.encode(prompts)?;
        Ok(self
            .text_encoder
            .forward(tokens.to_tensor::<B>(&self.device))?
            .last_hidden_state)
    }

    /// The CFG conditioning: `[negative; positive]` each repeated per image, or the positive
    /// alone without guidance. `[2·batch or batch, tokens, dim]`.
    pub(crate) fn encode_prompt(&self, request: &GenerationRequest) -> Result<Tensor<B, 3>> {
        let batch = request.batch;
        let cfg = request.do_classifier_free_guidance();
        let repeat = |t: Tensor<B, 3>| -> Tensor<B, 3> {
            if t.dims()[0] == batch {
                t
            } else {
                t.repeat_dim(0, batch)
            }
        };
        let (positive, negative) = match &request.prompt_embeds {
            Some(embeds) => {
                let pos = repeat(
                    embeds
                        .prompt_embeds
                        .to_tensor::<B, 3>("prompt_embeds", &self.device)?,
                );
                let neg = match (&embeds.negative_prompt_embeds, cfg) {
                    (Some(n), true) => Some(repeat(
                        n.to_tensor::<B, 3>("negative_prompt_embeds", &self.device)?,
                    )),
                    (None, true) => Some(repeat(self.encode_text(&[""])?)),
                    (_, false) => None,
                };
                (pos, neg)
            }
            None => {
                let texts: Vec<&str> = if cfg {
                    vec![request.negative_prompt.as_str(), request.prompt.as_str()]
                } else {
                    vec![request.prompt.as_str()]
                };
                let embeds = self.encode_text(&texts)?;
                if cfg {
                    let neg = embeds.clone().narrow(0, 0, 1);
                    let pos = embeds.narrow(0, 1, 1);
                    (repeat(pos), Some(repeat(neg)))
                } else {
                    (repeat(embeds), None)
                }
            }
        };
        Ok(match negative {
            Some(neg) => Tensor::cat(vec![neg, positive], 0),
            None => positive,
        })
    }

    /// Runs the request's pipeline (txt2img, img2img or inpaint). The seed feeds a
    /// torch-compatible generator for every draw not given (initial latents, VAE posterior
    /// samples, stochastic scheduler noise); `noise` replaces that generator when given.
    pub fn generate(
        &self,
        request: &GenerationRequest,
        noise: Option<&mut dyn NoiseSource>,
        cancel: &CancelToken,
        observer: &mut dyn StepObserver,
    ) -> Result<GenerationOutput> {
        // Check inputs, and that their attention fits, before any tensor work.
        request.check_inputs(&self.limits())?;
        self.vae_tiling(request)?;
        self.check_memory(request)?;
        let mut generator = TorchGenerator::new(request.seed);
        let noise: &mut dyn NoiseSource = match noise {
            Some(n) => n,
            None => &mut generator,
        };
        cancel.check()?;
        let prompt_notes = self.prompt_notes(request)?;
        let mut out = match &request.task {
            Task::Txt2Img => self.txt2img(request, noise, cancel, observer, None),
            Task::Img2Img(input) => self.img2img(request, input, noise, cancel, observer),
            Task::Inpaint(input) => self.inpaint(request, input, noise, cancel, observer),
            Task::ControlNet(input) => {
                let control = self.control_conditioning(request, input)?;
                self.txt2img(request, noise, cancel, observer, Some(&control))
            }
            Task::Upscale(_) => self.upscale(request, noise, cancel, observer),
            // `check_inputs` sends these to the IF pipeline's models.
            Task::If | Task::IfStage2(_) => Err(EngineError::invalid(
                "pipeline",
                "IF runs on DeepFloyd IF models",
            )),
        }?;
        out.notes.splice(0..0, prompt_notes);
        Ok(out)
    }

    /// What the user should know about the prompts before the images: a prompt longer than the
    /// text encoder reads loses its end (diffusers truncates with a warning), and says how much.
    fn prompt_notes(&self, request: &GenerationRequest) -> Result<Vec<String>> {
        if request.prompt_embeds.is_some() {
            return Ok(Vec::new());
        }
        let tokens = self
            .tokenizer
            .encode(&[&request.prompt, &request.negative_prompt])?;
        Ok(crate::pipelines::truncation_notes(
            &tokens.dropped,
            tokens.max_length,
        ))
    }

    /// Diffusers' `StableDiffusionPipeline.__call__` after `check_inputs`; with `control`, its
    /// `StableDiffusionControlNetPipeline.__call__`.
    fn txt2img(
        &self,
        request: &GenerationRequest,
        noise: &mut dyn NoiseSource,
        cancel: &CancelToken,
        observer: &mut dyn StepObserver,
        control: Option<&ControlConditioning<'_, B>>,
    ) -> Result<GenerationOutput> {
        let limits = self.limits();
        let mut scheduler = self.scheduler_for(request)?;

        // 2. Encode the prompt.
        let context = self.encode_prompt(request)?;

        // 3. Timesteps.
        scheduler.set_timesteps(request.steps)?;

        // 4. Latents.
        let shape = self.latent_shape(request);
        let latents = match &request.latents {
            Some(l) => l.to_tensor::<B, 4>("latents", &self.device)?,
            None => self.randn(noise, &shape)?,
        };
        let latents = latents.mul_scalar(scheduler.init_noise_sigma());
        debug_assert_eq!(shape[1], limits.latent_channels);

        // 5.–6. Denoise and decode.
        let (latents, notes) = self.denoise_from(
            scheduler.as_mut(),
            latents,
            &context,
            request,
            0,
            Conditioning {
                inpaint: None,
                control,
            },
            noise,
            cancel,
            observer,
        )?;
        Ok(GenerationOutput {
            images: self.decode_latents(latents, self.vae_tiling(request)?.as_ref())?,
            scheduler: scheduler.name(),
            notes,
            raw: None,
            prompt_embeds: None,
        })
    }

    /// `[batch, latent channels, h / f, w / f]` of a request.
    pub(crate) fn latent_shape(&self, request: &GenerationRequest) -> [usize; 4] {
        let limits = self.limits();
        [
            request.batch,
            limits.latent_channels,
            request.height / limits.vae_scale_factor,
            request.width / limits.vae_scale_factor,
        ]
    }

    /// One Gaussian draw of `shape` from `noise`, on the device.
    pub(crate) fn randn(
        &self,
        noise: &mut dyn NoiseSource,
        shape: &[usize],
    ) -> Result<Tensor<B, 4>> {
        crate::pipelines::randn_tensor(noise, shape, &self.device)
    }

    /// The denoising loop from scheduler step `first_step` to the end, with the request's
    /// guidance; returns the final latents and the run's notes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn denoise_from(
        &self,
        scheduler: &mut dyn Scheduler<B>,
        latents: Tensor<B, 4>,
        context: &Tensor<B, 3>,
        request: &GenerationRequest,
        first_step: usize,
        conditioning: Conditioning<'_, B>,
        noise: &mut dyn NoiseSource,
        cancel: &CancelToken,
        observer: &mut dyn StepObserver,
    ) -> Result<(Tensor<B, 4>, Vec<String>)> {
        let timesteps = scheduler
            .timesteps()
            .get(first_step..)
            .unwrap_or_default()
            .to_vec();
        let mut observer = NoteCollector {
            inner: observer,
            notes: Vec::new(),
        };
        let latents = denoise(
            &self.unet,
            scheduler,
            latents,
            context,
            &DenoiseOptions {
                guidance_scale: request
                    .do_classifier_free_guidance()
                    .then_some(request.guidance_scale),
                timesteps: &timesteps,
                first_step,
                conditioning: conditioning.inpaint,
                control: conditioning.control,
                class_labels: None,
                preview: PreviewKind::Sd15Latents,
            },
            noise,
            cancel,
            &mut observer,
        )?;
        cancel.check()?;
        Ok((latents, observer.notes))
    }

    /// Latents → images `[b, h, w, 3]` in [0, 1] (VAE decode + diffusers' postprocess).
    ///
    /// One image at a time (diffusers' `enable_vae_slicing`), each brought to the host before
    /// the next: the decoder's full-resolution activations are a run's largest tensors (at
    /// 512², `[1, 256, 512, 512]` f32 is 256 MiB, several alive at once), and this way they do
    /// not grow with the batch. Every layer of the VAE works per image, so the images are the
    /// same. With `tiling`, each image is decoded in tiles (see [`VaeTiling`]).
    pub fn decode_latents(
        &self,
        latents: Tensor<B, 4>,
        tiling: Option<&VaeTiling>,
    ) -> Result<HostTensor> {
        let batch = latents.dims()[0];
        let mut images: Option<HostTensor> = None;
        for i in 0..batch {
            let mut z = latents
                .clone()
                .narrow(0, i, 1)
                .cast(DType::F32)
                .div_scalar(self.vae_config.scaling_factor);
            if let Some(shift) = self.vae_config.shift_factor {
                z = z.add_scalar(shift);
            }
            let image = self.vae.decode_tiled(z, tiling);
            let image = image.div_scalar(2.0).add_scalar(0.5).clamp(0.0, 1.0);
            let image = HostTensor::from_tensor(image.permute([0, 2, 3, 1]))?;
            match images.as_mut() {
                None => images = Some(image),
                Some(all) => {
                    all.values.extend(image.values);
                    all.shape[0] += 1;
                }
            }
        }
        images.ok_or_else(|| EngineError::invalid("batch", "no latents to decode"))
    }
}

/// The first image of `[b, 3, h, w]` pixels in [-1, 1] as `[h, w, 3]` in [0, 1].
pub(crate) fn pixels_to_host<B: Backend>(images: Tensor<B, 4>) -> Result<HostTensor> {
    let [_, c, h, w] = images.dims();
    let first = images.narrow(0, 0, 1).reshape([c, h, w]).cast(DType::F32);
    HostTensor::from_tensor(
        first
            .div_scalar(2.0)
            .add_scalar(0.5)
            .clamp(0.0, 1.0)
            .permute([1, 2, 0]),
    )
}
