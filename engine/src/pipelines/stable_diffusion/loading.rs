//! Loading a Stable Diffusion model: a diffusers folder (`model_index.json` and its component
//! folders, configs from each `config.json`) or a single-file LDM checkpoint read with SD 1.5's
//! built-in configs, which also live here.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{DType, backend::Backend};

use super::pipeline_stable_diffusion::{LoadOptions, StableDiffusionPipeline};
use crate::error::{EngineError, Result};
use crate::loading::single_file::{map_single_file_keys, single_file_layers_per_block};
use crate::memory::MemoryBudget;
use crate::models::AttnProcessor;
use crate::models::autoencoders::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::config::read_config;
use crate::models::text_encoders::clip::{CLIPTextConfig, CLIPTextModel};
use crate::models::text_encoders::clip_tokenizer::CLIPTokenizer;
use crate::models::unets::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::weights::{CastParams, WeightFiles, load_safetensors_renamed, same_keys};
use crate::tensor_io::read_safetensors_keys;

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
        // docs/architecture.md §1: in f16 the VAE still runs in f32 (its decoder overflows f16 on bright
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

/// The weights of a diffusers component folder (`diffusion_pytorch_model…`), preferring the
/// load options' variant where the folder has it.
pub(crate) fn diffusers_weights(dir: &Path, options: &LoadOptions) -> Result<WeightFiles> {
    WeightFiles::find(dir, "diffusion_pytorch_model", options.variant.as_deref())
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
}
