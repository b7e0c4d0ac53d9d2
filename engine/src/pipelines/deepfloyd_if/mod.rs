//! DeepFloyd IF (aka diffusers' `pipelines/deepfloyd_if/`: `IFPipeline`,
//! `IFSuperResolutionPipeline`): a cascade in pixel space. Stage I denoises 64×64 pixels from
//! T5 embeddings; stage II takes an image, upscales it bilinearly (`align_corners`), noises it
//! to `noise_level` with its image-noising scheduler and denoises a larger image beside it (a
//! 6-channel UNet that also takes the noise level). Both UNets predict noise and a learned
//! variance (6 output channels): guidance acts on the noise half only and the conditional
//! half's variance goes to the DDPM scheduler (learned-range variance, dynamic thresholding).
//!
//! T5-XXL is about 9.5 GB in f16, more than the UNets: it is loaded when a prompt needs
//! encoding and, by default, dropped right after ([`T5Residency::FreeAfterUse`]), so the UNet
//! runs without it resident; the embeddings of the last prompt are kept, so re-running a stage
//! with the same prompt does not load T5 again.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{DType, Tensor, backend::Backend};

use crate::error::{EngineError, Result};
use crate::memory::{MemoryBudget, ModelCalls};
use crate::models::AttnProcessor;
use crate::models::MemoryFormat;
use crate::models::config::read_config;
use crate::models::text_encoders::t5::T5EncoderModel;
use crate::models::text_encoders::t5_tokenizer::{IF_MAX_LENGTH, T5Tokenizer};
use crate::models::unets::{ClassLabels, UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::weights::same_keys;
use crate::noise::{NoiseSource, TorchGenerator};
use crate::pipelines::image_processor::image_size;
use crate::pipelines::stable_diffusion::{
    DenoiseOptions, GenerationOutput, InpaintConditioning, LoadOptions, PreviewKind, denoise,
};
use crate::pipelines::stable_diffusion::{diffusers_weights, read_json_file};
use crate::pipelines::{
    CancelToken, GenerationRequest, ModelLimits, NoteCollector, PipelineKind, StepObserver,
    UpscaleSource, image_to_nchw, randn_tensor,
};
use crate::schedulers::{Scheduler, noising_scheduler};
use crate::tensor_io::HostTensor;

/// Whether T5 stays loaded between prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum T5Residency {
    /// Loaded when a new prompt needs encoding, dropped right after: the UNet never shares the
    /// device with T5-XXL (what lets the cascade fit a 16–24 GB card).
    #[default]
    FreeAfterUse,
    /// Kept after the first prompt (faster prompt changes, T5's memory stays in use).
    KeepLoaded,
}

/// The embeddings of the last texts encoded.
struct CachedEmbeds<B: Backend> {
    texts: Vec<String>,
    embeds: Tensor<B, 3>,
}

/// A loaded IF stage (I or II): its UNet, scheduler configs, and T5 when the folder has one.
pub struct IFPipeline<B: Backend> {
    pub tokenizer: Option<T5Tokenizer>,
    /// `text_encoder/`, loaded on demand.
    text_encoder_dir: Option<PathBuf>,
    text_encoder: Mutex<Option<T5EncoderModel<B>>>,
    /// The weights variant T5 is read in (the UNet's: [`LoadOptions::variant`]).
    variant: Option<String>,
    t5_residency: T5Residency,
    cache: Mutex<Option<CachedEmbeds<B>>>,
    pub unet: UNet2DConditionModel<B>,
    pub unet_config: UNet2DConditionConfig,
    /// `scheduler/scheduler_config.json` as read.
    pub scheduler_config: serde_json::Value,
    /// Stage II's `image_noising_scheduler/` (its presence makes the folder stage II).
    pub image_noising_scheduler_config: Option<serde_json::Value>,
    pub device: B::Device,
    pub source: PathBuf,
    /// The UNet's attention processor (set last).
    attn_processor: AttnProcessor,
    /// What requests' attention is checked against.
    memory_budget: MemoryBudget,
}

impl<B: Backend> std::fmt::Debug for IFPipeline<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IFPipeline")
            .field("source", &self.source)
            .field("stage", &self.stage())
            .field("text_encoder_dir", &self.text_encoder_dir)
            .finish_non_exhaustive()
    }
}

/// Whether `dir` is a DeepFloyd IF folder (its model_index.json names an IF pipeline class).
pub fn is_if_folder(dir: &Path) -> bool {
    let index = dir.join("model_index.json");
    read_json_file(&index).is_ok_and(|json| {
        json.get("_class_name")
            .and_then(serde_json::Value::as_str)
            .is_some_and(|c| c.starts_with("IF"))
    })
}

impl<B: Backend> IFPipeline<B> {
    /// Loads an IF folder (`unet/`, `scheduler/`; stage II also `image_noising_scheduler/`;
    /// `tokenizer/` and `text_encoder/` when present). T5 itself is read when first needed.
    pub fn load(dir: &Path, options: &LoadOptions, device: &B::Device) -> Result<Self> {
        let unet_dir = dir.join("unet");
        let unet_config: UNet2DConditionConfig = read_config(&unet_dir.join("config.json"))?;
        let mut unet = unet_config.init(device)?;
        options
            .memory_budget
            .check_weights("the UNet", unet.num_params())?;
        diffusers_weights(&unet_dir, options)?.load_into(&mut unet, same_keys)?;
        let scheduler_config =
            read_json_file(&dir.join("scheduler").join("scheduler_config.json"))?;
        let noising = dir
            .join("image_noising_scheduler")
            .join("scheduler_config.json");
        let image_noising_scheduler_config = if noising.is_file() {
            Some(read_json_file(&noising)?)
        } else {
            None
        };
        let out = unet_config.out_channels;
        let image_channels = match &image_noising_scheduler_config {
            Some(_) => unet_config.in_channels / 2,
            None => unet_config.in_channels,
        };
        if image_channels == 0
            || (image_noising_scheduler_config.is_some()
                && !unet_config.in_channels.is_multiple_of(2))
            || (out != image_channels && out != 2 * image_channels)
        {
            return Err(EngineError::Config {
                path: unet_dir.join("config.json"),
                message: format!(
                    "an IF UNet with {} input and {out} output channels does not fit stage {}",
                    unet_config.in_channels,
                    if image_noising_scheduler_config.is_some() {
                        "II"
                    } else {
                        "I"
                    }
                ),
            });
        }
        let tokenizer_dir = dir.join("tokenizer");
        let tokenizer = if tokenizer_dir.is_dir() {
            Some(T5Tokenizer::load(&tokenizer_dir)?)
        } else {
            None
        };
        let te = dir.join("text_encoder");
        let text_encoder_dir = te.join("config.json").is_file().then_some(te);
        Ok(Self {
            tokenizer,
            text_encoder_dir,
            text_encoder: Mutex::new(None),
            variant: options.variant.clone(),
            t5_residency: T5Residency::default(),
            cache: Mutex::new(None),
            unet,
            unet_config,
            scheduler_config,
            image_noising_scheduler_config,
            device: device.clone(),
            source: dir.to_path_buf(),
            attn_processor: AttnProcessor::default(),
            memory_budget: options.memory_budget.clone(),
        })
    }

    /// `If` (stage I) or `IfStage2`.
    pub fn stage(&self) -> PipelineKind {
        if self.image_noising_scheduler_config.is_some() {
            PipelineKind::IfStage2
        } else {
            PipelineKind::If
        }
    }

    /// Channels of the images the stage denoises (3).
    pub fn image_channels(&self) -> usize {
        match self.stage() {
            PipelineKind::IfStage2 => self.unet_config.in_channels / 2,
            _ => self.unet_config.in_channels,
        }
    }

    /// Width of the prompt embeddings the UNet takes (T5's: 4096 for T5-XXL).
    pub fn text_width(&self) -> usize {
        match (
            self.unet_config.encoder_hid_dim,
            &self.unet_config.cross_attention_dim,
        ) {
            (Some(d), _) => d,
            (None, crate::models::config::PerBlock::All(d)) => *d,
            (None, crate::models::config::PerBlock::Each(v)) => v.first().copied().unwrap_or(0),
        }
    }

    /// The UNet's native side (`sample_size`: 64 for stage I, 256 for stage II).
    pub fn native_size(&self) -> usize {
        self.unet_config.sample_size.unwrap_or(64)
    }

    /// What this model imposes on requests.
    pub fn limits(&self) -> ModelLimits {
        let max_noise_level = self.image_noising_scheduler_config.as_ref().map_or(0, |c| {
            c.get("num_train_timesteps")
                .and_then(serde_json::Value::as_u64)
                .map_or(999, |n| (n as usize).saturating_sub(1))
        });
        ModelLimits {
            vae_scale_factor: 1,
            unet_size_multiple: self.unet.size_multiple(),
            latent_channels: self.image_channels(),
            unet_in_channels: self.unet_config.in_channels,
            cross_attention_dim: self.text_width(),
            max_noise_level,
            family: Some(self.stage()),
        }
    }

    /// Whether T5 is kept loaded between prompts.
    pub fn set_t5_residency(&mut self, residency: T5Residency) {
        self.t5_residency = residency;
        if residency == T5Residency::FreeAfterUse {
            *lock(&self.text_encoder) = None;
        }
    }

    /// Whether T5 is loaded right now (for tests and memory reports).
    pub fn t5_loaded(&self) -> bool {
        lock(&self.text_encoder).is_some()
    }

    /// Sets the UNet's attention processor.
    pub fn set_attn_processor(&mut self, processor: AttnProcessor) {
        self.attn_processor = processor;
        self.unet.set_attn_processor(processor);
    }

    /// Where the pipeline runs, for checking requests' attention memory before any tensor work.
    pub fn set_memory_budget(&mut self, budget: MemoryBudget) {
        self.memory_budget = budget;
    }

    /// The attention calls of one run of `request`: the UNet's at every step, over the image
    /// (T5's 77 × 77 scores aside). Call after [`GenerationRequest::check_inputs`].
    pub fn attention_calls(&self, request: &GenerationRequest) -> Vec<ModelCalls> {
        let batch = request.unet_batch();
        let tokens = request.prompt_embeds.as_ref().map_or(IF_MAX_LENGTH, |e| {
            e.prompt_embeds.shape.get(1).copied().unwrap_or(0)
        });
        vec![ModelCalls {
            model: "UNet",
            float_bytes: self.unet.conv_in.weight.dtype().size() as u64,
            calls: self
                .unet
                .attention_calls(batch, [request.height, request.width], tokens),
        }]
    }

    /// Sets the UNet's memory format.
    pub fn set_memory_format(&mut self, format: MemoryFormat) {
        self.unet.set_memory_format(format);
    }

    /// The scheduler the request asks for (its config, else the model's; its class override,
    /// else the config's `_class_name`).
    pub fn scheduler_for(&self, request: &GenerationRequest) -> Result<Box<dyn Scheduler<B>>> {
        crate::pipelines::request_scheduler(request, &self.scheduler_config)
    }

    /// T5 embeddings `[texts, 77, d]` of `texts` (IF's preprocessing, attention mask), from the
    /// cache when the same texts were encoded last.
    pub fn encode_texts(&self, texts: &[&str]) -> Result<Tensor<B, 3>> {
        if let Some(cached) = lock(&self.cache).as_ref()
            && cached
                .texts
                .iter()
                .map(String::as_str)
                .eq(texts.iter().copied())
        {
            return Ok(cached.embeds.clone());
        }
        let (Some(tokenizer), Some(dir)) = (&self.tokenizer, &self.text_encoder_dir) else {
            return Err(EngineError::invalid(
                "prompt",
                "this IF folder has no T5 text encoder: give the prompt as embeddings \
                 (--prompt-embeds)",
            ));
        };
        let tokens = tokenizer.encode(texts)?;
        let (ids, mask) = tokens.to_tensors::<B>(&self.device);
        let mut slot = lock(&self.text_encoder);
        let model = match slot.take() {
            Some(model) => model,
            None => {
                let start = Instant::now();
                let (model, _) = T5EncoderModel::<B>::load_checked(
                    dir,
                    self.variant.as_deref(),
                    &self.memory_budget,
                    &self.device,
                )?;
                tracing::info!(
                    dir = %dir.display(),
                    secs = start.elapsed().as_secs_f64(),
                    "T5 loaded"
                );
                model
            }
        };
        let embeds = model.forward(ids, mask);
        if self.t5_residency == T5Residency::KeepLoaded {
            *slot = Some(model);
        }
        drop(slot);
        let embeds = embeds?;
        *lock(&self.cache) = Some(CachedEmbeds {
            texts: texts.iter().map(|t| (*t).to_string()).collect(),
            embeds: embeds.clone(),
        });
        Ok(embeds)
    }

    /// The CFG conditioning `[negative; positive]`, each repeated per image (or the positive
    /// alone without guidance): `[2·batch or batch, tokens, d]` (diffusers' `encode_prompt`).
    pub fn encode_prompt(&self, request: &GenerationRequest) -> Result<Tensor<B, 3>> {
        let (positive, negative) = self.prompt_pair(request)?;
        Ok(self.cfg_context(request, positive, negative))
    }

    /// `[negative; positive]` repeated per image, in the UNet's precision.
    fn cfg_context(
        &self,
        request: &GenerationRequest,
        positive: Tensor<B, 3>,
        negative: Option<Tensor<B, 3>>,
    ) -> Tensor<B, 3> {
        let batch = request.batch;
        let repeat = |t: Tensor<B, 3>| {
            if t.dims()[0] == batch {
                t
            } else {
                t.repeat_dim(0, batch)
            }
        };
        let dtype = self.unet.conv_in.weight.dtype();
        let positive = repeat(positive.cast(dtype));
        match negative {
            Some(neg) => Tensor::cat(vec![repeat(neg.cast(dtype)), positive], 0),
            None => positive,
        }
    }

    /// The prompt's and (with guidance) the negative prompt's embeddings, `[1 or batch, tokens,
    /// d]` each: given as tensors, else T5's.
    fn prompt_pair(
        &self,
        request: &GenerationRequest,
    ) -> Result<(Tensor<B, 3>, Option<Tensor<B, 3>>)> {
        let cfg = request.do_classifier_free_guidance();
        Ok(match &request.prompt_embeds {
            Some(embeds) => {
                let pos = embeds
                    .prompt_embeds
                    .to_tensor::<B, 3>("prompt_embeds", &self.device)?;
                let neg = match (&embeds.negative_prompt_embeds, cfg) {
                    (Some(n), true) => {
                        Some(n.to_tensor::<B, 3>("negative_prompt_embeds", &self.device)?)
                    }
                    (None, true) => Some(self.encode_texts(&[&request.negative_prompt])?),
                    (_, false) => None,
                };
                (pos, neg)
            }
            None if cfg => {
                let both = self.encode_texts(&[&request.negative_prompt, &request.prompt])?;
                (both.clone().narrow(0, 1, 1), Some(both.narrow(0, 0, 1)))
            }
            None => (self.encode_texts(&[&request.prompt])?, None),
        })
    }

    /// Notes for prompts T5 reads only the start of (as the SD pipeline's): none for prompts
    /// given as embeddings, nor for the negative prompt when guidance is off.
    fn prompt_notes(&self, request: &GenerationRequest) -> Result<Vec<String>> {
        let Some(tokenizer) = &self.tokenizer else {
            return Ok(Vec::new());
        };
        let cfg = request.do_classifier_free_guidance();
        let embeds = request.prompt_embeds.as_ref();
        let prompt = if embeds.is_some() {
            ""
        } else {
            &request.prompt
        };
        let negative = match embeds {
            _ if !cfg => "",
            Some(e) if e.negative_prompt_embeds.is_some() => "",
            _ => &request.negative_prompt,
        };
        let tokens = tokenizer.encode(&[prompt, negative])?;
        Ok(crate::pipelines::truncation_notes(
            &tokens.dropped,
            tokens.max_length,
        ))
    }

    /// Runs the request (stage I or II, whichever this folder is). The seed feeds a
    /// torch-compatible generator for every draw not given; `noise` replaces it when given.
    pub fn generate(
        &self,
        request: &GenerationRequest,
        noise: Option<&mut dyn NoiseSource>,
        cancel: &CancelToken,
        observer: &mut dyn StepObserver,
    ) -> Result<GenerationOutput> {
        request.check_inputs(&self.limits())?;
        crate::memory::check_attention(
            &self.memory_budget,
            self.attn_processor,
            &self.attention_calls(request),
        )?;
        let unet_batch = request.unet_batch();
        self.memory_budget.check_feature_map(
            &self
                .unet
                .feature_map(unet_batch, [request.height, request.width]),
            None,
        )?;
        let mut generator = TorchGenerator::new(request.seed);
        let noise: &mut dyn NoiseSource = match noise {
            Some(n) => n,
            None => &mut generator,
        };
        cancel.check()?;
        let mut scheduler = self.scheduler_for(request)?;
        let cfg = request.do_classifier_free_guidance();
        let batch = request.batch;
        let prompt_notes = self.prompt_notes(request)?;

        // 3. Encode the prompt.
        let (positive, negative) = self.prompt_pair(request)?;
        let prompt_embeds = crate::pipelines::PromptEmbeds {
            prompt_embeds: HostTensor::from_tensor(positive.clone().cast(DType::F32))?,
            negative_prompt_embeds: negative
                .as_ref()
                .map(|n| HostTensor::from_tensor(n.clone().cast(DType::F32)))
                .transpose()?,
        };
        let context = self.cfg_context(request, positive, negative);
        cancel.check()?;

        // 4. Timesteps.
        scheduler.set_timesteps(request.steps)?;

        // 5. The initial images, `[batch, 3, h, w]` (diffusers' `prepare_intermediate_images`).
        let shape = [batch, self.image_channels(), request.height, request.width];
        let images = match &request.latents {
            Some(l) => l.to_tensor::<B, 4>("latents", &self.device)?,
            None => randn_tensor::<B>(noise, &shape, &self.device)?,
        };
        let dtype = context.dtype();
        let images = images.cast(dtype).mul_scalar(scheduler.init_noise_sigma());

        // Stage II: the input upscaled to the output size and noised to `noise_level`.
        let (conditioning, class_labels) = match self.stage() {
            PipelineKind::IfStage2 => {
                let (cond, labels) = self.stage2_image(request, noise, cfg)?;
                (Some(cond), Some(labels))
            }
            _ => (None, None),
        };
        cancel.check()?;

        // 6. Denoise.
        let timesteps = scheduler.timesteps().to_vec();
        let mut collector = NoteCollector {
            inner: observer,
            notes: Vec::new(),
        };
        let images = denoise(
            &self.unet,
            scheduler.as_mut(),
            images,
            &context,
            &DenoiseOptions {
                guidance_scale: cfg.then_some(request.guidance_scale),
                timesteps: &timesteps,
                first_step: 0,
                conditioning: conditioning.as_ref(),
                control: None,
                class_labels: class_labels.as_ref(),
                preview: PreviewKind::Pixels,
            },
            noise,
            cancel,
            &mut collector,
        )?;
        cancel.check()?;

        // 7. Post-process: `[b, h, w, 3]` in [0, 1], and the raw images for the next stage.
        let images = images.cast(DType::F32);
        let raw = HostTensor::from_tensor(images.clone())?;
        let shown = images
            .div_scalar(2.0)
            .add_scalar(0.5)
            .clamp(0.0, 1.0)
            .permute([0, 2, 3, 1]);
        Ok(GenerationOutput {
            images: HostTensor::from_tensor(shown)?,
            scheduler: scheduler.name(),
            notes: prompt_notes.into_iter().chain(collector.notes).collect(),
            raw: Some(raw),
            prompt_embeds: Some(prompt_embeds),
        })
    }

    /// Stage II's conditioning: the input upscaled bilinearly (`align_corners=True`) to the
    /// output size, noised by the image-noising scheduler at `noise_level` (one Gaussian draw
    /// of the upscaled shape, after the initial images'), repeated for the CFG batch; and the
    /// noise level as the UNet's class label.
    fn stage2_image(
        &self,
        request: &GenerationRequest,
        noise: &mut dyn NoiseSource,
        cfg: bool,
    ) -> Result<(InpaintConditioning<B>, ClassLabels<B>)> {
        let config = self
            .image_noising_scheduler_config
            .as_ref()
            .ok_or_else(|| EngineError::invalid("pipeline", "this IF folder is not stage II"))?;
        let noising = noising_scheduler(config)?;
        let image = cascade_input::<B>(request, None, &self.device)?;
        let image = if image.dims()[0] == request.batch {
            image
        } else {
            image.repeat_dim(0, request.batch)
        };
        let upscaled = interpolate(
            image,
            [request.height, request.width],
            InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(true),
        );
        let level = request.noise_level();
        let image_noise = randn_tensor::<B>(noise, &upscaled.dims(), &self.device)?;
        let upscaled = noising.add_noise_at_timestep(upscaled, image_noise, level)?;
        let dtype = self.unet.conv_in.weight.dtype();
        let upscaled = upscaled.cast(dtype);
        let upscaled = if cfg {
            Tensor::cat(vec![upscaled.clone(), upscaled], 0)
        } else {
            upscaled
        };
        let n = upscaled.dims()[0];
        Ok((
            InpaintConditioning::ImageChannels(upscaled),
            ClassLabels::Levels(vec![level as f64; n]),
        ))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The upscalers' input as `[n, 3, h, w]` f32 in [-1, 1]: an array as given, or an `image` (`[h, w, 3]` in [0, 1], as diffusers' PIL path: `x / 127.5 - 1`). With
/// `size`, a PNG is resized to it and an array must have it.
pub(crate) fn cascade_input<B: Backend>(
    request: &GenerationRequest,
    size: Option<(usize, usize)>,
    device: &B::Device,
) -> Result<Tensor<B, 4>> {
    let input = request
        .task
        .upscale_input()
        .ok_or_else(|| EngineError::invalid("image", "this pipeline needs an input image"))?;
    match &input.source {
        UpscaleSource::Array(array) => {
            let [_, _, h, w] = <[usize; 4]>::try_from(array.shape.as_slice()).map_err(|_| {
                EngineError::invalid("image_array", "must be [n, 3, height, width]")
            })?;
            if let Some((sw, sh)) = size
                && (sw, sh) != (w, h)
            {
                return Err(EngineError::invalid(
                    "image_array",
                    format!("is {w}×{h}; this request needs {sw}×{sh}"),
                ));
            }
            Ok(array
                .to_tensor::<B, 4>("image_array", device)?
                .cast(DType::F32))
        }
        UpscaleSource::Image(image) => {
            let (w, h) = size.map_or_else(|| image_size(image, "image", 3), Ok)?;
            image_to_nchw(image, w, h, device)
        }
    }
}
