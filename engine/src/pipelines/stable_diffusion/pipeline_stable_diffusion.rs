//! Text-to-image with Stable Diffusion 1.x/2.x (aka diffusers'
//! `pipelines/stable_diffusion/pipeline_stable_diffusion.py`, `StableDiffusionPipeline`), and
//! the loaded components img2img and inpainting share (their steps live beside this file).
//!
//! `__call__` order is kept: check inputs, encode the prompt, prepare timesteps, prepare latents,
//! denoise (cancel checked and progress reported every step), decode.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{DType, Tensor, backend::Backend};

use crate::error::{EngineError, Result};
use crate::loading::single_file::{map_single_file_keys, single_file_layers_per_block};
use crate::memory::{AttentionNeed, FeatureMap, MemoryBudget, ModelCalls};
use crate::models::autoencoders::{AutoencoderKL, AutoencoderKLConfig, VaeTiling};
use crate::models::config::read_config;
use crate::models::controlnets::ControlNetModel;
use crate::models::text_encoders::clip::{CLIPTextConfig, CLIPTextModel};
use crate::models::text_encoders::clip_tokenizer::CLIPTokenizer;
use crate::models::unets::{
    ClassLabels, ControlResiduals, UNet2DConditionConfig, UNet2DConditionModel,
};
use crate::models::weights::{CastParams, WeightFiles, load_safetensors_renamed, same_keys};
use crate::models::{AttnProcessor, MemoryFormat};
use crate::noise::{NoiseSource, TorchGenerator};
use crate::pipelines::preview::latents_to_rgb_preview;
use crate::pipelines::{
    CancelToken, GenerationRequest, ModelLimits, NoteCollector, PipelineKind, StepClock,
    StepObserver,
};
use crate::schedulers::Scheduler;
use crate::tensor_io::HostTensor;
use crate::tensor_io::read_safetensors_keys;

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

/// The SD 1.5 configs, tokenizer and scheduler config single-file checkpoints are read with:
/// `$BRUSHFIRE_SD15_CONFIGS`; else `assets/models/stable-diffusion-v1-5` of the source tree this
/// binary was built from, while it is there; else the copy built into the binary, written once
/// to [`crate::backend::cache_dir`]`/sd15-configs` (an installed binary has no source tree).
pub fn sd15_config_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("BRUSHFIRE_SD15_CONFIGS") {
        let dir = PathBuf::from(dir);
        return if dir.join("unet").join("config.json").is_file() {
            Ok(dir)
        } else {
            Err(EngineError::Config {
                path: dir,
                message: "BRUSHFIRE_SD15_CONFIGS is not a diffusers SD 1.5 folder (no \
                          unet/config.json)"
                    .into(),
            })
        };
    }
    let source = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../assets/models/stable-diffusion-v1-5"
    ));
    if source.join("unet").join("config.json").is_file() {
        return Ok(source);
    }
    let cache = crate::backend::cache_dir().ok_or_else(|| EngineError::Config {
        path: source,
        message: "SD 1.5's configs (needed to read a single-file checkpoint) have no cache \
                  folder to go to (neither XDG_CACHE_HOME nor HOME is set); set \
                  BRUSHFIRE_SD15_CONFIGS to a diffusers SD 1.5 folder"
            .into(),
    })?;
    write_sd15_configs(&cache.join("sd15-configs"))
}

/// `stable-diffusion-v1-5/stable-diffusion-v1-5`'s UNet config, as published (also what the
/// benchmark builds its random-weight UNet from).
pub(crate) const SD15_UNET_CONFIG: &str =
    include_str!("../../../../assets/models/stable-diffusion-v1-5/unet/config.json");
/// Its scheduler config (PNDM, `skip_prk_steps`).
pub(crate) const SD15_SCHEDULER_CONFIG: &str =
    include_str!("../../../../assets/models/stable-diffusion-v1-5/scheduler/scheduler_config.json");

/// SD 1.5's configs, tokenizer and scheduler config as shipped in `assets/`, built into the
/// binary: `(path inside the folder, contents)`.
pub const SD15_CONFIG_FILES: [(&str, &str); 9] = [
    (
        "model_index.json",
        include_str!("../../../../assets/models/stable-diffusion-v1-5/model_index.json"),
    ),
    ("scheduler/scheduler_config.json", SD15_SCHEDULER_CONFIG),
    (
        "text_encoder/config.json",
        include_str!("../../../../assets/models/stable-diffusion-v1-5/text_encoder/config.json"),
    ),
    (
        "tokenizer/merges.txt",
        include_str!("../../../../assets/models/stable-diffusion-v1-5/tokenizer/merges.txt"),
    ),
    (
        "tokenizer/special_tokens_map.json",
        include_str!(
            "../../../../assets/models/stable-diffusion-v1-5/tokenizer/special_tokens_map.json"
        ),
    ),
    (
        "tokenizer/tokenizer_config.json",
        include_str!(
            "../../../../assets/models/stable-diffusion-v1-5/tokenizer/tokenizer_config.json"
        ),
    ),
    (
        "tokenizer/vocab.json",
        include_str!("../../../../assets/models/stable-diffusion-v1-5/tokenizer/vocab.json"),
    ),
    ("unet/config.json", SD15_UNET_CONFIG),
    (
        "vae/config.json",
        include_str!("../../../../assets/models/stable-diffusion-v1-5/vae/config.json"),
    ),
];

/// Writes [`SD15_CONFIG_FILES`] into `dir` (each file atomically, so a run stopped half-way
/// leaves no torn file) unless they are there already with these contents; returns `dir`.
pub fn write_sd15_configs(dir: &Path) -> Result<PathBuf> {
    for (name, contents) in SD15_CONFIG_FILES {
        let path = dir.join(name);
        if std::fs::read(&path).is_ok_and(|have| have == contents.as_bytes()) {
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| EngineError::io(parent, e))?;
        }
        crate::tensor_io::write_atomic(&path, contents.as_bytes())?;
    }
    Ok(dir.to_path_buf())
}

/// The x4 upscaler's `max_noise_level` when its model_index.json does not say.
pub const DEFAULT_MAX_NOISE_LEVEL: usize = 350;

/// Reads a JSON file (a scheduler config, model_index.json).
pub(crate) fn read_json_file(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| EngineError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Everything of a diffusers folder but the weights: configs, tokenizer, scheduler config.
struct Components {
    tokenizer: CLIPTokenizer,
    text_encoder_dir: PathBuf,
    text_encoder_config: CLIPTextConfig,
    unet_dir: PathBuf,
    unet_config: UNet2DConditionConfig,
    vae_dir: PathBuf,
    vae_config: AutoencoderKLConfig,
    scheduler_config: serde_json::Value,
    /// The x4 upscaler's `low_res_scheduler/` (which makes the folder an upscaler).
    low_res_scheduler_config: Option<serde_json::Value>,
    /// The x4 upscaler's `max_noise_level` (model_index.json).
    max_noise_level: usize,
}

/// The diffusers pipeline classes whose folders this pipeline runs (`model_index.json`'s
/// `_class_name`): SD 1.x/2.x with one CLIP text encoder and a 4- or 9-channel UNet, each task's
/// class, and the x4 upscaler.
const SD_PIPELINE_CLASSES: &[&str] = &[
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionInpaintPipelineLegacy",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionUpscalePipeline",
];

/// Refuses a folder whose `model_index.json` names a pipeline class this pipeline cannot run
/// (SDXL, SD 3, Flux, a class that does not exist), naming the class, as diffusers refuses a
/// class it does not know. A folder without `_class_name` is read as SD.
fn check_pipeline_class(dir: &Path) -> Result<()> {
    let index = dir.join("model_index.json");
    if !index.is_file() {
        return Ok(());
    }
    let json = read_json_file(&index)?;
    let Some(class) = json.get("_class_name") else {
        return Ok(());
    };
    let Some(class) = class.as_str() else {
        return Err(EngineError::Config {
            path: index,
            message: format!("`_class_name` is {class}, not a class name"),
        });
    };
    if SD_PIPELINE_CLASSES.contains(&class) {
        return Ok(());
    }
    Err(EngineError::Unsupported(format!(
        "{}: `{class}` is not a pipeline Brushfire runs (it runs {}, and DeepFloyd IF)",
        index.display(),
        SD_PIPELINE_CLASSES.join(", ")
    )))
}

impl Components {
    fn read(dir: &Path) -> Result<Self> {
        check_pipeline_class(dir)?;
        const PARTS: [&str; 5] = ["tokenizer", "text_encoder", "unet", "vae", "scheduler"];
        if !dir.join("model_index.json").is_file() && !PARTS.iter().any(|p| dir.join(p).is_dir()) {
            let empty = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none());
            return Err(EngineError::Unsupported(format!(
                "{}: {}not a diffusers folder (no model_index.json and none of {}); give a \
                 pipeline folder as `save_pretrained` writes it, or a single-file .safetensors \
                 checkpoint",
                dir.display(),
                if empty { "the folder is empty: " } else { "" },
                PARTS.map(|p| format!("{p}/")).join(", ")
            )));
        }
        let component = |name: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            if path.is_dir() {
                Ok(path)
            } else {
                Err(EngineError::io(
                    &path,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("not a diffusers folder: the `{name}` component is missing"),
                    ),
                ))
            }
        };
        let tokenizer = CLIPTokenizer::load(&component("tokenizer")?)?;
        let text_encoder_dir = component("text_encoder")?;
        let text_encoder_config = CLIPTextConfig::from_file(&text_encoder_dir.join("config.json"))?;
        let unet_dir = component("unet")?;
        let unet_config = read_config(&unet_dir.join("config.json"))?;
        let vae_dir = component("vae")?;
        let vae_config = read_config(&vae_dir.join("config.json"))?;
        let scheduler_config =
            read_json_file(&component("scheduler")?.join("scheduler_config.json"))?;
        let low_res = dir.join("low_res_scheduler").join("scheduler_config.json");
        let low_res_scheduler_config = if low_res.is_file() {
            Some(read_json_file(&low_res)?)
        } else {
            None
        };
        let index = dir.join("model_index.json");
        let max_noise_level = match (&low_res_scheduler_config, index.is_file()) {
            (Some(_), true) => read_json_file(&index)?
                .get("max_noise_level")
                .and_then(serde_json::Value::as_u64)
                .map_or(DEFAULT_MAX_NOISE_LEVEL, |v| v as usize),
            (Some(_), false) => DEFAULT_MAX_NOISE_LEVEL,
            (None, _) => 0,
        };
        Ok(Self {
            tokenizer,
            text_encoder_dir,
            text_encoder_config,
            unet_dir,
            unet_config,
            vae_dir,
            vae_config,
            scheduler_config,
            low_res_scheduler_config,
            max_noise_level,
        })
    }

    fn into_pipeline<B: Backend>(
        self,
        text_encoder: CLIPTextModel<B>,
        unet: UNet2DConditionModel<B>,
        vae: AutoencoderKL<B>,
        source: &Path,
        device: &B::Device,
    ) -> StableDiffusionPipeline<B> {
        // DESIGN.md §1: in f16 the VAE still runs in f32 (its decoder overflows f16 on bright
        // images; diffusers upcasts it too). Decoding casts the latents to match.
        let vae = vae.map(&mut CastParams(DType::F32));
        StableDiffusionPipeline {
            tokenizer: self.tokenizer,
            text_encoder,
            unet,
            unet_config: self.unet_config,
            vae,
            vae_config: self.vae_config,
            scheduler_config: self.scheduler_config,
            low_res_scheduler_config: self.low_res_scheduler_config,
            max_noise_level: self.max_noise_level,
            device: device.clone(),
            source: source.to_path_buf(),
            controlnet: None,
            attn_processor: AttnProcessor::default(),
            load_options: LoadOptions::default(),
            memory_budget: MemoryBudget::default(),
        }
    }
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
    attn_processor: AttnProcessor,
    /// How the model was loaded (a ControlNet loaded later prefers the same weights variant).
    load_options: LoadOptions,
    /// What requests' attention is checked against.
    memory_budget: MemoryBudget,
}

/// The weights of a diffusers component folder (`diffusion_pytorch_model…`), preferring the
/// load options' variant where the folder has it.
pub(crate) fn diffusers_weights(dir: &Path, options: &LoadOptions) -> Result<WeightFiles> {
    WeightFiles::find(dir, "diffusion_pytorch_model", options.variant.as_deref())
}

impl<B: Backend> StableDiffusionPipeline<B> {
    /// Loads a local diffusers folder (`model_index.json` + `tokenizer/`, `text_encoder/`,
    /// `unet/`, `vae/`, `scheduler/`).
    pub fn load(dir: &Path, options: &LoadOptions, device: &B::Device) -> Result<Self> {
        let parts = Components::read(dir)?;
        let mut text_encoder = parts.text_encoder_config.init::<B>(device);
        let mut unet = parts.unet_config.init(device)?;
        let mut vae = parts.vae_config.init(device)?;
        check_weights(&options.memory_budget, &text_encoder, &unet, &vae)?;
        text_encoder.load_weights(&WeightFiles::find(
            &parts.text_encoder_dir,
            "model",
            options.variant.as_deref(),
        )?)?;
        diffusers_weights(&parts.unet_dir, options)?.load_into(&mut unet, same_keys)?;
        diffusers_weights(&parts.vae_dir, options)?.load_into(&mut vae, same_keys)?;
        let mut pipe = parts.into_pipeline(text_encoder, unet, vae, dir, device);
        pipe.memory_budget = options.memory_budget.clone();
        pipe.load_options = options.clone();
        Ok(pipe)
    }

    /// Loads `path`: a diffusers folder, or a single-file checkpoint read with SD 1.5's configs
    /// (see [`sd15_config_dir`]).
    pub fn load_path(path: &Path, options: &LoadOptions, device: &B::Device) -> Result<Self> {
        if path.is_file() {
            let mut pipe = Self::load_single_file_with(path, &sd15_config_dir()?, options, device)?;
            pipe.load_options = options.clone();
            Ok(pipe)
        } else {
            Self::load(path, options, device)
        }
    }

    /// Loads a single-file checkpoint (the LDM / A1111 `.safetensors` layout: UNet, VAE and text
    /// encoder in one file) with the configs, tokenizer and scheduler of `config_dir`, a
    /// diffusers folder without weights (for SD 1.x, `assets/models/stable-diffusion-v1-5`).
    pub fn load_single_file(file: &Path, config_dir: &Path, device: &B::Device) -> Result<Self> {
        Self::load_single_file_with(file, config_dir, &LoadOptions::default(), device)
    }

    /// [`Self::load_single_file`] with `options`' memory budget.
    fn load_single_file_with(
        file: &Path,
        config_dir: &Path,
        options: &LoadOptions,
        device: &B::Device,
    ) -> Result<Self> {
        let parts = Components::read(config_dir)?;
        let keys = read_safetensors_keys(file)?;
        let per_block = single_file_layers_per_block(&parts.unet_config)?;
        let renames = map_single_file_keys(&keys, per_block, file)?;
        let mut text_encoder = parts.text_encoder_config.init::<B>(device);
        let mut unet = parts.unet_config.init(device)?;
        let mut vae = parts.vae_config.init(device)?;
        check_weights(&options.memory_budget, &text_encoder, &unet, &vae)?;
        load_safetensors_renamed(&mut text_encoder, file, &renames.text_encoder)?;
        load_safetensors_renamed(&mut unet, file, &renames.unet)?;
        load_safetensors_renamed(&mut vae, file, &renames.vae)?;
        let mut pipe = parts.into_pipeline(text_encoder, unet, vae, file, device);
        pipe.memory_budget = options.memory_budget.clone();
        Ok(pipe)
    }

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

    /// The attention calls one run of `request` makes, per model in the order they run (the
    /// text encoder's 77 × 77 scores aside). Call after [`GenerationRequest::check_inputs`].
    pub fn attention_calls(&self, request: &GenerationRequest) -> Vec<ModelCalls> {
        // A tiling the VAE's config cannot have is refused by `generate`.
        let tiling = self.vae_tiling(request).ok().flatten();
        self.attention_calls_with(request, tiling.as_ref())
    }

    /// [`Self::attention_calls`] with the VAE tiled by `tiling` (or not), whatever the request
    /// says.
    fn attention_calls_with(
        &self,
        request: &GenerationRequest,
        tiling: Option<&VaeTiling>,
    ) -> Vec<ModelCalls> {
        let f = self.vae_config.scale_factor().max(1);
        let latent = [request.height / f, request.width / f];
        let cfg = request.do_classifier_free_guidance();
        let unet_batch = request.unet_batch();
        let tokens = request
            .prompt_embeds
            .as_ref()
            .map_or(self.tokenizer.model_max_length(), |e| {
                e.prompt_embeds.shape.get(1).copied().unwrap_or(0)
            });
        let unet_bytes = self.unet.conv_in.weight.dtype().size() as u64;
        // The VAE runs in f32 (see `into_pipeline`).
        let vae = |model, calls| ModelCalls {
            model,
            float_bytes: 4,
            calls,
        };
        let mut models = Vec::new();
        if matches!(
            request.pipeline,
            PipelineKind::Img2Img | PipelineKind::Inpaint
        ) {
            // The source image is encoded once, then repeated per image.
            let calls = self
                .vae
                .encode_attention_calls(1, [request.height, request.width], tiling);
            models.push(vae("VAE encoder", calls));
        }
        if let (PipelineKind::ControlNet, Some(controlnet)) =
            (request.pipeline, self.controlnet.as_ref())
        {
            let guess = request.guess_mode || controlnet.global_pool_conditions;
            let batch = if cfg && guess {
                request.batch
            } else {
                unet_batch
            };
            models.push(ModelCalls {
                model: "ControlNet",
                float_bytes: unet_bytes,
                calls: controlnet.attention_calls(batch, latent, tokens),
            });
        }
        models.push(ModelCalls {
            model: "UNet",
            float_bytes: unet_bytes,
            calls: self.unet.attention_calls(unet_batch, latent, tokens),
        });
        // `decode_latents` decodes one image at a time.
        let calls = self.vae.decode_attention_calls(1, latent, tiling);
        models.push(vae("VAE decoder", calls));
        models
    }

    /// The VAE's tile geometry when `request` asks for VAE tiling (an error when the VAE's
    /// `sample_size` cannot be tiled).
    pub fn vae_tiling(&self, request: &GenerationRequest) -> Result<Option<VaeTiling>> {
        if request.vae_tiling {
            VaeTiling::of(&self.vae_config).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Refuses `request` when its attention, the UNet's largest feature map or the VAE's would
    /// not fit the memory budget, offering the other processors and, when the VAE is what does
    /// not fit, VAE tiling.
    fn check_memory(&self, request: &GenerationRequest) -> Result<()> {
        if self.memory_budget == MemoryBudget::Unchecked {
            return Ok(());
        }
        // `generate` has refused a tiling the VAE's config cannot have.
        let geometry = VaeTiling::of(&self.vae_config).ok();
        // The tiling the request runs with, or the one to offer when it asks for none.
        let (tiling, untiled) = if request.vae_tiling {
            (geometry, None)
        } else {
            (None, geometry)
        };
        let models = self.attention_calls_with(request, tiling.as_ref());
        let need = AttentionNeed::of(self.attn_processor, &models);
        let tiled: Vec<_> = untiled
            .map(|t| {
                let models = self.attention_calls_with(request, Some(&t));
                (
                    "VAE tiling",
                    AttentionNeed::of(self.attn_processor, &models),
                )
            })
            .into_iter()
            .collect();
        self.memory_budget
            .check_with(&need, |p| AttentionNeed::of(p, &models), &tiled)?;

        // The UNet's largest feature map, over the whole (CFG) batch in the UNet's floats.
        let f = self.vae_config.scale_factor().max(1);
        let latent = [request.height / f, request.width / f];
        let unet_batch = request.unet_batch();
        let mut unet_map = self.unet.feature_map(unet_batch, latent);
        if let (PipelineKind::ControlNet, Some(controlnet)) =
            (request.pipeline, self.controlnet.as_ref())
        {
            // Its residuals, computed before each UNet pass, are held through it.
            unet_map = unet_map.holding_control_residuals(controlnet.residual_elements(latent));
        }
        self.memory_budget.check_feature_map(&unet_map, None)?;

        // The VAE's largest feature maps, one image at a time, in f32.
        let map = |model, [c, h, w]: [usize; 3]| FeatureMap {
            model,
            shape: [1, c, h, w],
            float_bytes: 4,
            held: None,
        };
        if matches!(
            request.pipeline,
            PipelineKind::Img2Img | PipelineKind::Inpaint
        ) {
            let size = [request.height, request.width];
            let encode = |t: Option<&VaeTiling>| {
                map("VAE encoder", self.vae.encode_largest_activation(size, t))
            };
            let instead = untiled.map(|t| ("VAE tiling", encode(Some(&t))));
            self.memory_budget
                .check_feature_map(&encode(tiling.as_ref()), instead)?;
        }
        let decode = |t: Option<&VaeTiling>| {
            map("VAE decoder", self.vae.decode_largest_activation(latent, t))
        };
        let instead = untiled.map(|t| ("VAE tiling", decode(Some(&t))));
        self.memory_budget
            .check_feature_map(&decode(tiling.as_ref()), instead)
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
        let mut out = match request.pipeline {
            PipelineKind::Txt2Img => self.txt2img(request, noise, cancel, observer, None),
            PipelineKind::Img2Img => self.img2img(request, noise, cancel, observer),
            PipelineKind::Inpaint => self.inpaint(request, noise, cancel, observer),
            PipelineKind::ControlNet => {
                let control = self.control_conditioning(request)?;
                self.txt2img(request, noise, cancel, observer, Some(&control))
            }
            PipelineKind::Upscale => self.upscale(request, noise, cancel, observer),
            // `check_inputs` sends these to the IF pipeline's models.
            PipelineKind::If | PipelineKind::IfStage2 => Err(EngineError::invalid(
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

/// Refuses to load a Stable Diffusion model whose weights cannot fit `budget` (see
/// [`MemoryBudget::check_weights`]); the models are built lazily, so nothing is allocated yet.
fn check_weights<B: Backend>(
    budget: &MemoryBudget,
    text_encoder: &CLIPTextModel<B>,
    unet: &UNet2DConditionModel<B>,
    vae: &AutoencoderKL<B>,
) -> Result<()> {
    let params = text_encoder.num_params() + unet.num_params() + vae.num_params();
    budget.check_weights("the model", params)
}

/// The f16 → f32 fallback of [`denoise`].
#[derive(Default)]
struct UpcastUnet<B: Backend> {
    /// The f32 copy, made at the first non-finite output.
    unet: Option<UNet2DConditionModel<B>>,
}

impl<B: Backend> UpcastUnet<B> {
    /// One UNet evaluation, in f32 once a reduced-precision one has failed.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        unet: &UNet2DConditionModel<B>,
        input: Tensor<B, 4>,
        t: f64,
        context: &Tensor<B, 3>,
        class_labels: &ClassLabels<B>,
        residuals: Option<&ControlResiduals<B>>,
        step: usize,
        observer: &mut dyn StepObserver,
    ) -> Result<Tensor<B, 4>> {
        let dtype = input.dtype();
        if self.unet.is_none() {
            let out =
                unet.forward_with_residuals(input.clone(), &[t], context, class_labels, residuals)?;
            if dtype == DType::F32 || all_finite(&out) {
                return Ok(out);
            }
            observer.on_note(&format!(
                "the UNet's {dtype:?} output had NaN/inf values at step {step}: the step was \
                 redone in f32, and so were the remaining steps"
            ));
            tracing::warn!(
                step,
                ?dtype,
                "non-finite UNet output; redoing the step in f32"
            );
        }
        let upcast = self
            .unet
            .get_or_insert_with(|| unet.clone().map(&mut CastParams(DType::F32)));
        let residuals = residuals.map(|r| ControlResiduals {
            down: r.down.iter().map(|d| d.clone().cast(DType::F32)).collect(),
            mid: r.mid.clone().cast(DType::F32),
        });
        let class_labels = match class_labels {
            ClassLabels::Vectors(v) => ClassLabels::Vectors(v.clone().cast(DType::F32)),
            other => other.clone(),
        };
        let out = upcast.forward_with_residuals(
            input.cast(DType::F32),
            &[t],
            &context.clone().cast(DType::F32),
            &class_labels,
            residuals.as_ref(),
        )?;
        if !all_finite(&out) {
            return Err(EngineError::NonFinite(format!(
                "the UNet produced NaN/inf values at step {step} even in f32: the weights or \
                 inputs are broken"
            )));
        }
        Ok(out.cast(dtype))
    }
}

/// Classifier-free guidance on the UNet's CFG batch `[uncond; text]`. With more output channels
/// than the sample has (IF: noise and a learned variance), only the first `channels` are
/// guided and the text half's variance is kept, as IF's pipelines do.
fn guide<B: Backend>(
    noise_pred: Tensor<B, 4>,
    channels: usize,
    scale: Option<f64>,
) -> Tensor<B, 4> {
    let Some(scale) = scale else {
        return noise_pred;
    };
    let [double, out_channels, _, _] = noise_pred.dims();
    let batch = double / 2;
    let uncond = noise_pred.clone().narrow(0, 0, batch);
    let text = noise_pred.narrow(0, batch, batch);
    if out_channels <= channels {
        return uncond.clone().add(text.sub(uncond).mul_scalar(scale));
    }
    let uncond = uncond.narrow(1, 0, channels);
    let variance = text.clone().narrow(1, channels, out_channels - channels);
    let text = text.narrow(1, 0, channels);
    let guided = uncond.clone().add(text.sub(uncond).mul_scalar(scale));
    Tensor::cat(vec![guided, variance], 1)
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

/// Whether a tensor holds only finite values (reads one flag back from the device).
fn all_finite<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    t.clone()
        .is_finite()
        .all()
        .into_data()
        .iter::<bool>()
        .all(|finite| finite)
}

/// How an inpainting run conditions the denoising loop on the known image.
#[derive(Debug, Clone)]
pub enum InpaintConditioning<B: Backend> {
    /// A 9-channel inpainting UNet: `[mask, masked_image_latents]`, `[CFG batch, 1 + c, h, w]`,
    /// concatenated to the scaled model input on the channel axis every step.
    ExtraChannels(Tensor<B, 4>),
    /// Image channels concatenated to the CFG-doubled input *before* `scale_model_input`
    /// (IF stage II's upscaled image), `[CFG batch, c, h, w]`.
    ImageChannels(Tensor<B, 4>),
    /// A plain UNet: after every step the known region is re-noised to the next step's level
    /// and blended back through the mask (diffusers' 4-channel path).
    Blend {
        /// The init image's latents, `[batch, c, h, w]`.
        image_latents: Tensor<B, 4>,
        /// The noise the initial latents were made with, `[batch, c, h, w]`.
        noise: Tensor<B, 4>,
        /// 1 = repaint, `[batch, 1, h, w]`.
        mask: Tensor<B, 4>,
    },
}

/// What the denoising loop needs besides the models.
#[derive(Debug, Clone)]
pub struct DenoiseOptions<'a, B: Backend> {
    /// Classifier-free guidance scale; `None` runs the UNet on the conditional batch only.
    pub guidance_scale: Option<f64>,
    /// The timesteps to run, `timesteps[i]` being scheduler step `first_step + i`.
    pub timesteps: &'a [f64],
    /// Index of the first timestep in the scheduler's list (img2img starts part-way).
    pub first_step: usize,
    /// Inpainting's conditioning on the known image, if any.
    pub conditioning: Option<&'a InpaintConditioning<B>>,
    /// The ControlNet and its control image, if any.
    pub control: Option<&'a ControlConditioning<'a, B>>,
    /// The UNet's class labels for the whole UNet batch (CFG-doubled where guidance is on):
    /// the upscalers' noise levels.
    pub class_labels: Option<&'a ClassLabels<B>>,
    /// What the live preview shows.
    pub preview: PreviewKind,
}

/// What the denoising loop's live preview is made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreviewKind {
    /// SD 1.x latents through the fixed latent → RGB map.
    #[default]
    Sd15Latents,
    /// Pixels in [-1, 1] (IF's stages denoise images).
    Pixels,
    /// No preview (latents of another VAE).
    None,
}

/// What conditions a pipeline's denoising loop besides the prompt.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conditioning<'a, B: Backend> {
    pub inpaint: Option<&'a InpaintConditioning<B>>,
    pub control: Option<&'a ControlConditioning<'a, B>>,
}

impl<B: Backend> Conditioning<'_, B> {
    /// No conditioning.
    pub fn none() -> Self {
        Self {
            inpaint: None,
            control: None,
        }
    }
}

/// A ControlNet and its control image, as the denoising loop uses them (diffusers'
/// `StableDiffusionControlNetPipeline` loop).
#[derive(Debug, Clone)]
pub struct ControlConditioning<'a, B: Backend> {
    pub model: &'a ControlNetModel<B>,
    /// `[batch, 3, H, W]` in [0, 1], or `[2·batch, …]` (paired for the CFG batch) when the
    /// ControlNet sees the whole CFG batch (guidance on, not guess mode).
    pub image: Tensor<B, 4>,
    /// `controlnet_conditioning_scale`.
    pub scale: f64,
    /// `control_guidance_start` / `_end` as fractions of the loop.
    pub start: f64,
    pub end: f64,
    pub guess_mode: bool,
}

impl<B: Backend> ControlConditioning<'_, B> {
    /// Diffusers' `controlnet_keep[i]`: whether step `i` of `n` lies in the guidance window.
    fn keep(&self, i: usize, n: usize) -> bool {
        let (i, n) = (i as f64, n as f64);
        !(i / n < self.start || (i + 1.0) / n > self.end)
    }

    /// The residuals for the UNet's CFG batch at one step (none outside the window, where
    /// diffusers' are zeros).
    #[allow(clippy::too_many_arguments)]
    fn residuals(
        &self,
        i: usize,
        n: usize,
        scheduler: &dyn Scheduler<B>,
        step: usize,
        latents: &Tensor<B, 4>,
        model_input: &Tensor<B, 4>,
        t: f64,
        context: &Tensor<B, 3>,
        cfg: bool,
    ) -> Result<Option<ControlResiduals<B>>> {
        if !self.keep(i, n) {
            return Ok(None);
        }
        let batch = latents.dims()[0];
        let guess_cfg = self.guess_mode && cfg;
        let (input, ctx) = if guess_cfg {
            // Only the conditional half goes through the ControlNet.
            (
                scheduler.scale_model_input(latents.clone(), step),
                context.clone().narrow(0, batch, batch),
            )
        } else {
            (model_input.clone(), context.clone())
        };
        let mut r = self.model.forward(
            input,
            &[t],
            &ctx,
            self.image.clone(),
            self.scale,
            self.guess_mode,
        )?;
        if guess_cfg {
            let zeros_first = |t: Tensor<B, 4>| Tensor::cat(vec![t.zeros_like(), t], 0);
            r.down = r.down.into_iter().map(zeros_first).collect();
            r.mid = zeros_first(r.mid);
        }
        Ok(Some(r))
    }
}

/// The denoising loop every SD pipeline shares: per timestep, the CFG batch through the UNet,
/// guidance, the scheduler step; the cancel token is checked and the observer told each step.
/// This is the loop the benchmark times (its it/s is the UNet evaluation rate).
///
/// In f16 (or any float type but f32) every UNet output is checked for NaN/∞: f16 overflows
/// where f32 does not (activations past 65504). A step that produced one is redone with an f32
/// copy of the UNet, which then runs the remaining steps of this call too, and the observer gets
/// a note. NaN in f32 is an error naming the step.
///
/// # Shapes
/// - latents: `[batch, channels, h, w]` (already scaled by `init_noise_sigma`)
/// - context: `[2·batch, tokens, dim]` with guidance (negative first), else `[batch, tokens, dim]`
#[allow(clippy::too_many_arguments)]
pub fn denoise<B: Backend>(
    unet: &UNet2DConditionModel<B>,
    scheduler: &mut dyn Scheduler<B>,
    mut latents: Tensor<B, 4>,
    context: &Tensor<B, 3>,
    options: &DenoiseOptions<'_, B>,
    noise: &mut dyn NoiseSource,
    cancel: &CancelToken,
    observer: &mut dyn StepObserver,
) -> Result<Tensor<B, 4>> {
    let channels = latents.dims()[1];
    let clock = StepClock::start(options.timesteps.len());
    let mut upcast = UpcastUnet::default();
    for (i, &t) in options.timesteps.iter().enumerate() {
        cancel.check()?;
        let step = options.first_step + i;
        let model_input = match options.guidance_scale {
            Some(_) => Tensor::cat(vec![latents.clone(), latents.clone()], 0),
            None => latents.clone(),
        };
        let model_input = match options.conditioning {
            Some(InpaintConditioning::ImageChannels(image)) => {
                Tensor::cat(vec![model_input, image.clone()], 1)
            }
            _ => model_input,
        };
        let model_input = scheduler.scale_model_input(model_input, step);
        let model_input = match options.conditioning {
            Some(InpaintConditioning::ExtraChannels(extra)) => {
                Tensor::cat(vec![model_input, extra.clone()], 1)
            }
            _ => model_input,
        };
        let residuals = match options.control {
            Some(control) => control.residuals(
                i,
                options.timesteps.len(),
                scheduler,
                step,
                &latents,
                &model_input,
                t,
                context,
                options.guidance_scale.is_some(),
            )?,
            None => None,
        };
        let noise_pred = upcast.forward(
            unet,
            model_input,
            t,
            context,
            options.class_labels.unwrap_or(&ClassLabels::None),
            residuals.as_ref(),
            i + 1,
            observer,
        )?;
        let noise_pred = guide(noise_pred, channels, options.guidance_scale);
        // A learned variance goes to the schedulers that use it; the others get the noise.
        let noise_pred = if noise_pred.dims()[1] > channels && !scheduler.learned_variance() {
            noise_pred.narrow(1, 0, channels)
        } else {
            noise_pred
        };
        latents = scheduler.step(noise_pred, step, latents, noise)?;
        if let Some(InpaintConditioning::Blend {
            image_latents,
            noise,
            mask,
        }) = options.conditioning
        {
            let known = if i + 1 < options.timesteps.len() {
                scheduler.add_noise(image_latents.clone(), noise.clone(), step + 1)
            } else {
                image_latents.clone()
            };
            let keep = mask.clone().neg().add_scalar(1.0);
            latents = keep.mul(known).add(mask.clone().mul(latents));
        }
        observer.on_step(&clock.progress(i + 1, t));
        if i + 1 < options.timesteps.len() && observer.wants_preview(i + 1) {
            // Unit-variance latents for the preview (what the UNet sees at this step).
            let first = latents.clone().narrow(0, 0, 1);
            let preview = match options.preview {
                PreviewKind::Sd15Latents => {
                    latents_to_rgb_preview(scheduler.scale_model_input(first, step + 1))?
                }
                PreviewKind::Pixels => Some(pixels_to_host(first)?),
                PreviewKind::None => None,
            };
            if let Some(preview) = preview {
                observer.on_preview(i + 1, preview);
            }
        }
    }
    Ok(latents)
}
