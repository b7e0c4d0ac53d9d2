//! The seed's benchmark (docs/architecture.md §1): UNet evaluations per second in the denoising loop of each
//! pipeline, per batch size, image size and settings column, warm run of several, with the peak
//! memory the device pool held. `brushfire bench` and the app's benchmark panel both run this.
//!
//! Random-weight mode: the models are built from the real configs shipped in `assets/models/`
//! with freshly initialised weights, so a benchmark needs no download (speed does not depend on
//! the weights' values). Text encoding and VAE decoding are outside the timed loop, as in the seed.

use std::fmt::{self, Write as _};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use serde::Serialize;

use crate::backend::{
    BackendKind, ExecutionOptions, Precision, SelectedBackend, device_memory, memory_budget,
    peak_process_memory, release_device_memory, reset_peak_process_memory,
};
use crate::error::{EngineError, Result};
use crate::memory::{ModelCalls, check_attention};
use crate::models::config::parse_config;
use crate::models::controlnets::ControlNetConfig;
use crate::models::unets::{ClassLabels, UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::{AttnProcessor, MemoryFormat};
use crate::noise::{NoiseSource, TorchGenerator};
use crate::pipelines::stable_diffusion::{
    ControlConditioning, DenoiseOptions, InpaintConditioning, PreviewKind, denoise,
};
use crate::pipelines::stable_diffusion::{SD15_SCHEDULER_CONFIG, SD15_UNET_CONFIG};
use crate::pipelines::{CancelToken, StepProgress, strength_schedule};
use crate::schedulers;
use crate::session::{Done, Work, run_on_backend};
use crate::tensor_io::HostTensor;

const SD15_UNET_CONFIG_PATH: &str = "assets/models/stable-diffusion-v1-5/unet/config.json";
const SD15_SCHEDULER_CONFIG_PATH: &str =
    "assets/models/stable-diffusion-v1-5/scheduler/scheduler_config.json";

/// The IF cascade the seed benchmarked: IF-I-M, IF-II-M, the x4 upscaler (configs in `assets/`).
const IF_I_M_UNET: &str = include_str!("../../assets/models/IF-I-M-v1.0/unet/config.json");
const IF_I_M_SCHEDULER: &str =
    include_str!("../../assets/models/IF-I-M-v1.0/scheduler/scheduler_config.json");
const IF_II_M_UNET: &str = include_str!("../../assets/models/IF-II-M-v1.0/unet/config.json");
const IF_II_M_SCHEDULER: &str =
    include_str!("../../assets/models/IF-II-M-v1.0/scheduler/scheduler_config.json");
const X4_UNET: &str =
    include_str!("../../assets/models/stable-diffusion-x4-upscaler/unet/config.json");
const X4_SCHEDULER: &str = include_str!(
    "../../assets/models/stable-diffusion-x4-upscaler/scheduler/scheduler_config.json"
);

/// The seed's prompt; the benchmark uses random embeddings in its place (same shape, same cost).
pub const SEED_PROMPT: &str = "ghibli style, a fantasy landscape with castles";
/// CLIP's sequence length.
const TOKENS: usize = 77;

/// A row of the seed's table (serialised by its CLI name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchPipeline {
    #[serde(rename = "sd-txt2img")]
    SdTxt2Img,
    #[serde(rename = "sd-img2img")]
    SdImg2Img,
    SdInpaint,
    SdControlnet,
    If,
}

impl BenchPipeline {
    pub const ALL: [Self; 5] = [
        Self::SdTxt2Img,
        Self::SdImg2Img,
        Self::SdInpaint,
        Self::SdControlnet,
        Self::If,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::SdTxt2Img => "sd-txt2img",
            Self::SdImg2Img => "sd-img2img",
            Self::SdInpaint => "sd-inpaint",
            Self::SdControlnet => "sd-controlnet",
            Self::If => "if",
        }
    }
}

impl fmt::Display for BenchPipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BenchPipeline {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                EngineError::invalid(
                    "pipeline",
                    format!(
                        "`{s}` is not one of {}",
                        Self::ALL.map(Self::name).join(", ")
                    ),
                )
            })
    }
}

/// A column of the seed's table: which speed switches are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchColumn {
    /// Vanilla attention, no fusion.
    Baseline,
    /// Fused attention, no fusion.
    Fused,
    /// Fused attention + Burn's fusion ("compile").
    Fusion,
    /// Fused attention + fusion + channels-last.
    ChannelsLast,
}

impl BenchColumn {
    pub const ALL: [Self; 4] = [
        Self::Baseline,
        Self::Fused,
        Self::Fusion,
        Self::ChannelsLast,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::Fused => "fused",
            Self::Fusion => "fusion",
            Self::ChannelsLast => "channels-last",
        }
    }

    /// The table header.
    pub fn label(self) -> &'static str {
        match self {
            Self::Baseline => "baseline (vanilla attention)",
            Self::Fused => "fused attention",
            Self::Fusion => "fused + fusion",
            Self::ChannelsLast => "fused + fusion + channels-last",
        }
    }

    /// The attention processor of this column.
    pub fn attention(self) -> AttnProcessor {
        match self {
            Self::Baseline => AttnProcessor::Vanilla,
            _ => AttnProcessor::Fused,
        }
    }

    /// Whether Burn's fusion is on.
    pub fn fusion(self) -> bool {
        matches!(self, Self::Fusion | Self::ChannelsLast)
    }

    /// Whether channels-last is on.
    pub fn channels_last(self) -> bool {
        self == Self::ChannelsLast
    }
}

impl FromStr for BenchColumn {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                EngineError::invalid(
                    "column",
                    format!(
                        "`{s}` is not one of {}",
                        Self::ALL.map(Self::name).join(", ")
                    ),
                )
            })
    }
}

/// What to measure: every combination of pipeline × size × batch × column.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchPlan {
    pub pipelines: Vec<BenchPipeline>,
    /// Images per prompt (the UNet sees twice as many with guidance).
    pub batches: Vec<usize>,
    /// `(width, height)` in pixels.
    pub sizes: Vec<(usize, usize)>,
    pub columns: Vec<BenchColumn>,
    pub precision: Precision,
    /// Scheduler steps (PNDM with `skip_prk_steps` makes 50 steps 51 UNet evaluations).
    pub steps: usize,
    /// Runs per cell; the last (warm) one is reported.
    pub runs: usize,
}

impl Default for BenchPlan {
    /// The seed's protocol: all pipelines, batch 1/4/16, 512², all columns, f16, 50 steps, 3 runs.
    fn default() -> Self {
        Self {
            pipelines: BenchPipeline::ALL.to_vec(),
            batches: vec![1, 4, 16],
            sizes: vec![(512, 512)],
            columns: BenchColumn::ALL.to_vec(),
            precision: Precision::F16,
            steps: 50,
            runs: 3,
        }
    }
}

impl BenchPlan {
    /// Checks the plan before anything runs.
    pub fn validate(&self) -> Result<()> {
        let empty = |field: &'static str| EngineError::invalid(field, "the list is empty");
        if self.pipelines.is_empty() {
            return Err(empty("pipelines"));
        }
        if self.columns.is_empty() {
            return Err(empty("columns"));
        }
        if self.sizes.is_empty() {
            return Err(empty("sizes"));
        }
        if self.batches.is_empty() {
            return Err(empty("batches"));
        }
        if let Some(b) = self.batches.iter().find(|&&b| b == 0) {
            return Err(EngineError::invalid(
                "batches",
                format!("batch size {b} must be at least 1"),
            ));
        }
        if let Some((w, h)) = self
            .sizes
            .iter()
            .find(|(w, h)| *w == 0 || *h == 0 || w % 8 != 0 || h % 8 != 0)
        {
            return Err(EngineError::invalid(
                "sizes",
                format!("{w}×{h}: width and height must be positive multiples of 8"),
            ));
        }
        if self.steps == 0 {
            return Err(EngineError::invalid("steps", "must be at least 1"));
        }
        if self.runs == 0 {
            return Err(EngineError::invalid("runs", "must be at least 1"));
        }
        Ok(())
    }

    /// The cells in the order they run (model-heavy changes outermost).
    pub fn cells(&self) -> Vec<CellSpec> {
        let mut cells = Vec::new();
        for &pipeline in &self.pipelines {
            for &(width, height) in &self.sizes {
                for &batch in &self.batches {
                    for &column in &self.columns {
                        cells.push(CellSpec {
                            pipeline,
                            width,
                            height,
                            batch,
                            column,
                        });
                    }
                }
            }
        }
        cells
    }
}

/// One measurement's coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CellSpec {
    pub pipeline: BenchPipeline,
    pub width: usize,
    pub height: usize,
    pub batch: usize,
    pub column: BenchColumn,
}

impl fmt::Display for CellSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}×{} batch {} [{}]",
            self.pipeline,
            self.width,
            self.height,
            self.batch,
            self.column.name()
        )
    }
}

/// A cell's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum CellOutcome {
    Measured {
        /// UNet evaluations per second in the reported (last) run.
        it_per_sec: f64,
        /// UNet evaluations per run (each one runs the CFG batch of 2 × batch).
        unet_evals: usize,
        /// Seconds of every run, in order (the first includes kernel compilation).
        run_secs: Vec<f64>,
        /// The most the device's memory pool held during the runs (GPU backends), or the
        /// process's peak resident memory during the cell (CPU backend, Linux).
        peak_reserved_bytes: Option<u64>,
        /// A cascade's stages (the IF row: stage I, stage II, x4), each with its own rate;
        /// the fields above are stage I's. Empty for single-UNet rows.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        stages: Vec<StageRate>,
    },
    /// Did not run; the reason is shown in the table's cell.
    Failed { reason: String },
}

/// One stage of a cascade row, measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageRate {
    /// `stage I`, `stage II`, `x4`.
    pub stage: &'static str,
    pub it_per_sec: f64,
    pub unet_evals: usize,
    /// The size the stage's UNet ran at, and its batch.
    pub width: usize,
    pub height: usize,
    pub batch: usize,
}

/// A measured cell.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchCell {
    #[serde(flatten)]
    pub spec: CellSpec,
    #[serde(flatten)]
    pub outcome: CellOutcome,
}

/// The whole run, printable as the seed's table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// Backend and adapter, e.g. "cuda (NVIDIA H100 80GB HBM3)".
    pub backend: String,
    /// Whose configs the random-weight models were built from.
    pub model: String,
    pub precision: Precision,
    pub steps: usize,
    pub runs: usize,
    pub cells: Vec<BenchCell>,
}

impl Serialize for Precision {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// The configs the benchmark builds its random-weight models from.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchModels {
    /// What the configs are of, for the report (`stable-diffusion-v1-5`, a folder's name).
    pub name: String,
    /// A UNet `config.json` and where it came from (for error messages).
    pub unet_config: (String, PathBuf),
    /// A `scheduler_config.json` and where it came from.
    pub scheduler_config: (String, PathBuf),
    /// The IF row's three models; `None` leaves that row unrun (with the reason).
    pub cascade: Option<CascadeModels>,
}

/// A UNet config and its scheduler's, each with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct StageModels {
    pub unet_config: (String, PathBuf),
    pub scheduler_config: (String, PathBuf),
}

impl StageModels {
    fn from_dir(dir: &Path) -> Result<Self> {
        Ok(Self {
            unet_config: read_text(&dir.join("unet/config.json"))?,
            scheduler_config: read_text(&dir.join("scheduler/scheduler_config.json"))?,
        })
    }

    fn shipped(unet: &str, scheduler: &str, dir: &str) -> Self {
        Self {
            unet_config: (
                unet.into(),
                format!("assets/models/{dir}/unet/config.json").into(),
            ),
            scheduler_config: (
                scheduler.into(),
                format!("assets/models/{dir}/scheduler/scheduler_config.json").into(),
            ),
        }
    }
}

/// The IF row's models: stage I, stage II and the x4 upscaler.
#[derive(Debug, Clone, PartialEq)]
pub struct CascadeModels {
    pub stage1: StageModels,
    pub stage2: StageModels,
    pub upscaler: StageModels,
}

impl CascadeModels {
    /// The seed's: IF-I-M, IF-II-M and `stabilityai/stable-diffusion-x4-upscaler`.
    pub fn seed() -> Self {
        Self {
            stage1: StageModels::shipped(IF_I_M_UNET, IF_I_M_SCHEDULER, "IF-I-M-v1.0"),
            stage2: StageModels::shipped(IF_II_M_UNET, IF_II_M_SCHEDULER, "IF-II-M-v1.0"),
            upscaler: StageModels::shipped(X4_UNET, X4_SCHEDULER, "stable-diffusion-x4-upscaler"),
        }
    }

    /// Three diffusers folders' configs (stage I, stage II, x4 upscaler).
    pub fn from_dirs(stage1: &Path, stage2: &Path, upscaler: &Path) -> Result<Self> {
        Ok(Self {
            stage1: StageModels::from_dir(stage1)?,
            stage2: StageModels::from_dir(stage2)?,
            upscaler: StageModels::from_dir(upscaler)?,
        })
    }
}

fn read_text(path: &Path) -> Result<(String, PathBuf)> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    Ok((text, path.to_path_buf()))
}

impl BenchModels {
    /// SD 1.5's published configs, shipped in `assets/models/stable-diffusion-v1-5`.
    pub fn sd15() -> Self {
        Self {
            name: "stable-diffusion-v1-5".into(),
            unet_config: (SD15_UNET_CONFIG.into(), SD15_UNET_CONFIG_PATH.into()),
            scheduler_config: (
                SD15_SCHEDULER_CONFIG.into(),
                SD15_SCHEDULER_CONFIG_PATH.into(),
            ),
            cascade: Some(CascadeModels::seed()),
        }
    }

    /// The configs of a diffusers folder (`unet/config.json`, `scheduler/scheduler_config.json`)
    /// for the SD rows; the IF row keeps the seed's cascade.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let sd = StageModels::from_dir(dir)?;
        Ok(Self {
            name: dir.file_name().map_or_else(
                || dir.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
            unet_config: sd.unet_config,
            scheduler_config: sd.scheduler_config,
            cascade: Some(CascadeModels::seed()),
        })
    }
}

/// Told what the benchmark is doing (for progress bars).
pub trait BenchObserver {
    /// Cell `index` of `total` starts.
    fn cell_started(&mut self, _index: usize, _total: usize, _spec: &CellSpec) {}
    /// A denoising step of run `run` (0-based) of the current cell finished.
    fn step(&mut self, _run: usize, _progress: &StepProgress) {}
    /// A cell finished (measured or failed).
    fn cell_finished(&mut self, _index: usize, _cell: &BenchCell) {}
}

/// An observer that ignores everything.
impl BenchObserver for () {}

/// Runs every cell of `plan` on `selected` ([`crate::session::Session::bench`]). A cell that
/// fails (unsupported, out of memory) is recorded as failed and the run goes on; only
/// cancellation stops it early.
pub(crate) fn run_bench(
    selected: &SelectedBackend,
    plan: &BenchPlan,
    models: &BenchModels,
    cancel: &CancelToken,
    observer: &mut dyn BenchObserver,
) -> Result<BenchReport> {
    plan.validate()?;
    let cells = plan.cells();
    let mut report = BenchReport {
        backend: selected.to_string(),
        model: models.name.clone(),
        precision: plan.precision,
        steps: plan.steps,
        runs: plan.runs,
        cells: Vec::with_capacity(cells.len()),
    };
    for (index, spec) in cells.iter().enumerate() {
        cancel.check()?;
        observer.cell_started(index, cells.len(), spec);
        let outcome = match run_cell(selected, plan, models, spec, cancel, observer) {
            Ok(outcome) => outcome,
            Err(EngineError::Cancelled) => return Err(EngineError::Cancelled),
            Err(e) => CellOutcome::Failed {
                reason: e.to_string(),
            },
        };
        release_device_memory(selected);
        let cell = BenchCell {
            spec: *spec,
            outcome,
        };
        observer.cell_finished(index, &cell);
        report.cells.push(cell);
    }
    Ok(report)
}

fn run_cell(
    selected: &SelectedBackend,
    plan: &BenchPlan,
    models: &BenchModels,
    spec: &CellSpec,
    cancel: &CancelToken,
    observer: &mut dyn BenchObserver,
) -> Result<CellOutcome> {
    let options = ExecutionOptions {
        fusion: spec.column.fusion(),
        precision: plan.precision,
    };
    options.check(selected)?;
    if spec.column.fusion() && !ExecutionOptions::fusion_applies(selected.kind) {
        tracing::info!("the CPU backend has no fusion: the fusion column equals the fused one");
    }
    let outcome = if spec.pipeline == BenchPipeline::If {
        let cascade = models.cascade.as_ref().ok_or_else(|| {
            EngineError::Unsupported("no IF configs were given for the if row".into())
        })?;
        let task = CascadeTask {
            spec,
            cascade,
            steps: plan.steps,
            runs: plan.runs,
            selected,
            cancel,
            observer,
        };
        catch_unwind(AssertUnwindSafe(|| {
            run_on_backend(selected, options, Work::Cascade(task))
        }))
    } else {
        let task = UnetLoopTask {
            spec,
            models,
            steps: plan.steps,
            runs: plan.runs,
            selected,
            cancel,
            observer,
        };
        catch_unwind(AssertUnwindSafe(|| {
            run_on_backend(selected, options, Work::UnetLoop(task))
        }))
    };
    match outcome {
        Ok(Ok(Done::Cell(outcome))) => Ok(outcome),
        Ok(Ok(Done::Pipeline(_))) => Err(EngineError::Backend(
            "internal error: a benchmark cell returned a pipeline".into(),
        )),
        Ok(Err(e)) => Err(e),
        Err(panic) => Err(EngineError::Backend(panic_text(&panic))),
    }
}

/// Burn reports out-of-memory and kernel failures by panicking; the cell shows the message.
fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = crate::error::panic_message(panic.as_ref())
        .unwrap_or_else(|| "the backend panicked".into());
    let lower = text.to_lowercase();
    if lower.contains("out of memory") || lower.contains("outofmemory") || lower.contains("oom") {
        format!("out of memory ({})", first_line(&text))
    } else {
        first_line(&text).to_string()
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

/// The SD txt2img denoising loop on random weights: PNDM from SD 1.5's scheduler config, CFG
/// batch, random text embeddings in place of CLIP's.
pub(crate) struct UnetLoopTask<'a> {
    spec: &'a CellSpec,
    models: &'a BenchModels,
    steps: usize,
    runs: usize,
    selected: &'a SelectedBackend,
    cancel: &'a CancelToken,
    observer: &'a mut dyn BenchObserver,
}

impl UnetLoopTask<'_> {
    pub(crate) fn run<B: Backend>(self, device: B::Device) -> Result<CellOutcome> {
        let spec = self.spec;
        // On the CPU the device memory is the process's: its peak from here on is this cell's
        // (the model, the activations, and whatever else the process holds).
        let cpu_peak = self.selected.kind == BackendKind::Cpu && reset_peak_process_memory();
        let (unet_json, unet_path) = &self.models.unet_config;
        let mut config: UNet2DConditionConfig = parse_config(unet_json, unet_path)?;
        let latent_channels = config.out_channels;
        let inpainting_channels = 2 * latent_channels + 1;
        if spec.pipeline == BenchPipeline::SdInpaint {
            // `stable-diffusion-inpainting`'s UNet is SD 1.5's config with 9 input channels
            // (latents + mask + masked-image latents).
            config.in_channels = inpainting_channels;
        } else if config.in_channels != latent_channels {
            return Err(EngineError::Unsupported(format!(
                "the {} row needs a UNet with {latent_channels} input channels; {} has {}",
                spec.pipeline,
                unet_path.display(),
                config.in_channels
            )));
        }
        let mut unet = config.init::<B>(&device)?;
        unet.set_attn_processor(spec.column.attention());
        unet.set_memory_format(MemoryFormat::from_channels_last(
            spec.column.channels_last(),
        ));
        // The ControlNet's calls are the UNet's down path's: the UNet's check covers them. Its
        // residuals (the down path's skips' shapes) are held through each UNet pass.
        check_unet_memory(
            self.selected,
            spec.column.attention(),
            &unet,
            2 * spec.batch,
            [spec.height / 8, spec.width / 8],
            TOKENS,
            spec.pipeline == BenchPipeline::SdControlnet,
        )?;
        let (scheduler_text, scheduler_path) = &self.models.scheduler_config;
        let scheduler_json: serde_json::Value =
            serde_json::from_str(scheduler_text).map_err(|e| EngineError::Config {
                path: scheduler_path.clone(),
                message: e.to_string(),
            })?;
        let dim = config
            .cross_attention_dim
            .expand(config.block_out_channels.len(), "cross_attention_dim")?[0];
        let mut generator = TorchGenerator::new(0);
        // SD's VAE downsamples by 8 (2^(4 blocks - 1)).
        let latent_shape = [spec.batch, latent_channels, spec.height / 8, spec.width / 8];
        let context_shape = [2 * spec.batch, TOKENS, dim];
        let context = HostTensor {
            shape: context_shape.to_vec(),
            values: generator.randn(&context_shape),
        }
        .to_tensor::<B, 3>("prompt_embeds", &device)?;
        // Inpainting's extra UNet input (mask + masked-image latents) for the CFG batch.
        let conditioning = if spec.pipeline == BenchPipeline::SdInpaint {
            let shape = [
                2 * spec.batch,
                inpainting_channels - latent_channels,
                spec.height / 8,
                spec.width / 8,
            ];
            Some(InpaintConditioning::ExtraChannels(
                HostTensor {
                    shape: shape.to_vec(),
                    values: generator.randn(&shape),
                }
                .to_tensor::<B, 4>("conditioning", &device)?,
            ))
        } else {
            None
        };
        // The ControlNet row: `sd-controlnet-canny`'s architecture (the UNet's down half from
        // the same config, SD's conditioning embedding), random weights, and a random control
        // image for the whole CFG batch; it runs with the UNet at every step.
        let controlnet = if spec.pipeline == BenchPipeline::SdControlnet {
            let mut model = ControlNetConfig {
                unet: config.clone(),
                ..ControlNetConfig::default()
            }
            .init::<B>(&device)?;
            model.set_attn_processor(spec.column.attention());
            model.set_memory_format(unet.memory_format());
            let shape = [2 * spec.batch, 3, spec.height, spec.width];
            let image = HostTensor {
                shape: shape.to_vec(),
                values: generator
                    .randn(&shape)
                    .iter()
                    .map(|v| v.abs().min(1.0))
                    .collect(),
            }
            .to_tensor::<B, 4>("control_image", &device)?;
            Some((model, image))
        } else {
            None
        };
        let control = controlnet
            .as_ref()
            .map(|(model, image)| ControlConditioning {
                model,
                image: image.clone(),
                scale: 1.0,
                start: 0.0,
                end: 1.0,
                guess_mode: false,
            });

        let measured = measure_loop(
            &LoopSpec {
                unet: &unet,
                scheduler_json: &scheduler_json,
                steps: self.steps,
                strength: spec.pipeline.strength(),
                latent_shape,
                context: &context,
                guidance: 7.5,
                conditioning: conditioning.as_ref(),
                control: control.as_ref(),
                class_labels: None,
            },
            self.runs,
            &mut generator,
            self.selected,
            self.cancel,
            self.observer,
            &device,
        )?;
        let peak = if cpu_peak {
            peak_process_memory()
        } else {
            measured.peak
        };
        Ok(CellOutcome::Measured {
            it_per_sec: measured.it_per_sec(),
            unet_evals: measured.unet_evals,
            run_secs: measured.run_secs,
            peak_reserved_bytes: peak,
            stages: Vec::new(),
        })
    }
}

/// One timed denoising loop: a UNet, its scheduler, what conditions it.
struct LoopSpec<'a, B: Backend> {
    unet: &'a UNet2DConditionModel<B>,
    scheduler_json: &'a serde_json::Value,
    steps: usize,
    /// img2img's strength (the loop runs the schedule's tail); 1 elsewhere.
    strength: f64,
    latent_shape: [usize; 4],
    /// The CFG batch's text, `[2·batch, tokens, dim]`.
    context: &'a Tensor<B, 3>,
    guidance: f64,
    conditioning: Option<&'a InpaintConditioning<B>>,
    control: Option<&'a ControlConditioning<'a, B>>,
    class_labels: Option<&'a ClassLabels<B>>,
}

/// What [`measure_loop`] measured.
struct LoopResult {
    run_secs: Vec<f64>,
    unet_evals: usize,
    /// The device pool's high-water mark (GPU backends).
    peak: Option<u64>,
}

impl LoopResult {
    /// UNet evaluations per second in the last (warm) run.
    fn it_per_sec(&self) -> f64 {
        let last = self.run_secs.last().copied().unwrap_or(f64::NAN);
        self.unet_evals as f64 / last
    }
}

/// Runs the loop `runs` times from fresh noise and times each run, synchronising the device
/// at both ends of the timed region (the benchmark syncs the device inside the timed region).
#[allow(clippy::too_many_arguments)]
fn measure_loop<B: Backend>(
    spec: &LoopSpec<'_, B>,
    runs: usize,
    generator: &mut TorchGenerator,
    selected: &SelectedBackend,
    cancel: &CancelToken,
    observer: &mut dyn BenchObserver,
    device: &B::Device,
) -> Result<LoopResult> {
    let mut run_secs = Vec::with_capacity(runs);
    let mut peak: Option<u64> = None;
    let mut unet_evals = 0;
    let latent_shape = spec.latent_shape;
    for run in 0..runs {
        let mut scheduler = schedulers::from_config_json::<B>(spec.scheduler_json, None)?;
        scheduler.set_timesteps(spec.steps)?;
        // img2img's strength keeps the tail of the schedule (40 of 50 steps at 0.8).
        let first_step = strength_schedule(spec.steps, spec.strength).0 * scheduler.order();
        let timesteps =
            scheduler.timesteps()[first_step.min(scheduler.timesteps().len())..].to_vec();
        unet_evals = timesteps.len();
        let noise = HostTensor {
            shape: latent_shape.to_vec(),
            values: generator.randn(&latent_shape),
        }
        .to_tensor::<B, 4>("latents", device)?;
        let latents = if first_step > 0 {
            // Random "image latents" noised to the first timestep, as img2img's are.
            let image_latents = HostTensor {
                shape: latent_shape.to_vec(),
                values: generator.randn(&latent_shape),
            }
            .to_tensor::<B, 4>("image_latents", device)?;
            scheduler.add_noise(image_latents, noise, first_step)
        } else {
            noise.mul_scalar(scheduler.init_noise_sigma())
        };
        sync::<B>(device)?;
        let start = Instant::now();
        let mut on_step = |progress: &StepProgress| observer.step(run, progress);
        let latents = denoise(
            spec.unet,
            scheduler.as_mut(),
            latents,
            spec.context,
            &DenoiseOptions {
                guidance_scale: Some(spec.guidance),
                timesteps: &timesteps,
                first_step,
                conditioning: spec.conditioning,
                control: spec.control,
                class_labels: spec.class_labels,
                preview: PreviewKind::None,
            },
            generator as &mut dyn NoiseSource,
            cancel,
            &mut on_step,
        )?;
        sync::<B>(device)?;
        run_secs.push(start.elapsed().as_secs_f64());
        drop::<Tensor<B, 4>>(latents);
        // Outside the timed region: the pool keeps what it reserved until a cleanup, so its
        // reserved bytes after the run are the run's high-water mark (a query per step would
        // be a blocking round trip to the device thread inside the loop).
        if let Some(m) = device_memory(selected) {
            peak = Some(peak.unwrap_or(0).max(m.bytes_reserved));
        }
    }
    Ok(LoopResult {
        run_secs,
        unet_evals,
        peak,
    })
}

/// The IF row (docs/architecture.md §1): stage I at its native 64² with the plan's batch, then stage II
/// (256², noise level 250) and the x4 upscaler (a 256² input, noise level 100) at batch 1, as
/// the seed ran them; steps ×2 / ×1 / ×1.5 of the plan's (100 / 50 / 75 for its 50); CFG
/// 7 / 4 / 9; random (·, 2, 4096) prompt embeddings in place of T5 (77 CLIP-wide tokens for the
/// upscaler). The models are built one after another, each dropped before the next.
pub(crate) struct CascadeTask<'a> {
    spec: &'a CellSpec,
    cascade: &'a CascadeModels,
    steps: usize,
    runs: usize,
    selected: &'a SelectedBackend,
    cancel: &'a CancelToken,
    observer: &'a mut dyn BenchObserver,
}

/// One stage of the IF row.
struct StagePlan {
    stage: &'static str,
    /// Steps as a multiple of the plan's.
    steps_factor: f64,
    guidance: f64,
    noise_level: Option<usize>,
    text_tokens: usize,
}

const CASCADE: [StagePlan; 3] = [
    StagePlan {
        stage: "stage I",
        steps_factor: 2.0,
        guidance: 7.0,
        noise_level: None,
        text_tokens: 2,
    },
    StagePlan {
        stage: "stage II",
        steps_factor: 1.0,
        guidance: 4.0,
        noise_level: Some(250),
        text_tokens: 2,
    },
    StagePlan {
        stage: "x4",
        steps_factor: 1.5,
        guidance: 9.0,
        noise_level: Some(100),
        text_tokens: TOKENS,
    },
];

impl CascadeTask<'_> {
    pub(crate) fn run<B: Backend>(self, device: B::Device) -> Result<CellOutcome> {
        let cpu_peak = self.selected.kind == BackendKind::Cpu && reset_peak_process_memory();
        let models = [
            &self.cascade.stage1,
            &self.cascade.stage2,
            &self.cascade.upscaler,
        ];
        let mut generator = TorchGenerator::new(0);
        let mut stages = Vec::with_capacity(3);
        let mut first: Option<LoopResult> = None;
        let mut peak: Option<u64> = None;
        // Each stage's input side: stage I its UNet's; then the previous stage's output.
        let mut side = 0;
        for (i, (plan, models)) in CASCADE.iter().zip(models).enumerate() {
            self.cancel.check()?;
            let (unet_json, unet_path) = &models.unet_config;
            let config: UNet2DConditionConfig = parse_config(unet_json, unet_path)?;
            let (scheduler_text, scheduler_path) = &models.scheduler_config;
            let scheduler_json: serde_json::Value =
                serde_json::from_str(scheduler_text).map_err(|e| EngineError::Config {
                    path: scheduler_path.clone(),
                    message: e.to_string(),
                })?;
            let mut unet = config.init::<B>(&device)?;
            unet.set_attn_processor(self.spec.column.attention());
            unet.set_memory_format(MemoryFormat::from_channels_last(
                self.spec.column.channels_last(),
            ));
            let batch = if i == 0 { self.spec.batch } else { 1 };
            // Stage I and II denoise images at their native size; the x4 upscaler's latents
            // are its input's size (stage II's output).
            let native = config.sample_size.unwrap_or(64);
            if i < 2 {
                side = native;
            }
            check_unet_memory(
                self.selected,
                self.spec.column.attention(),
                &unet,
                2 * batch,
                [side, side],
                plan.text_tokens,
                false,
            )?;
            let text_width = config.encoder_hid_dim.unwrap_or(
                config
                    .cross_attention_dim
                    .expand(config.block_out_channels.len(), "cross_attention_dim")?[0],
            );
            let context_shape = [2 * batch, plan.text_tokens, text_width];
            let context = HostTensor {
                shape: context_shape.to_vec(),
                values: generator.randn(&context_shape),
            }
            .to_tensor::<B, 3>("prompt_embeds", &device)?;
            // The upscalers' noised input image, beside the denoised channels.
            let image_channels = config.in_channels.saturating_sub(match i {
                0 => config.in_channels,
                1 => config.in_channels / 2,
                _ => config.out_channels,
            });
            let latent_channels = config.in_channels - image_channels;
            let conditioning = if image_channels > 0 {
                let shape = [2 * batch, image_channels, side, side];
                let image = HostTensor {
                    shape: shape.to_vec(),
                    values: generator.randn(&shape),
                }
                .to_tensor::<B, 4>("image", &device)?;
                Some(if i == 1 {
                    InpaintConditioning::ImageChannels(image)
                } else {
                    InpaintConditioning::ExtraChannels(image)
                })
            } else {
                None
            };
            let class_labels = plan.noise_level.map(|level| match config.num_class_embeds {
                Some(_) => ClassLabels::Ids(Tensor::<B, 1, Int>::from_data(
                    TensorData::new(vec![level as i64; 2 * batch], [2 * batch]),
                    &device,
                )),
                None => ClassLabels::Levels(vec![level as f64; 2 * batch]),
            });
            let steps = ((self.steps as f64 * plan.steps_factor).round() as usize).max(1);
            let measured = measure_loop(
                &LoopSpec {
                    unet: &unet,
                    scheduler_json: &scheduler_json,
                    steps,
                    strength: 1.0,
                    latent_shape: [batch, latent_channels, side, side],
                    context: &context,
                    guidance: plan.guidance,
                    conditioning: conditioning.as_ref(),
                    control: None,
                    class_labels: class_labels.as_ref(),
                },
                self.runs,
                &mut generator,
                self.selected,
                self.cancel,
                self.observer,
                &device,
            )?;
            let scale = if i == 2 { 4 } else { 1 };
            stages.push(StageRate {
                stage: plan.stage,
                it_per_sec: measured.it_per_sec(),
                unet_evals: measured.unet_evals,
                width: side * scale,
                height: side * scale,
                batch,
            });
            peak = match (peak, measured.peak) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            if first.is_none() {
                first = Some(measured);
            }
            drop(unet);
            release_device_memory(self.selected);
        }
        let first = first.ok_or_else(|| EngineError::Backend("the cascade ran no stage".into()))?;
        Ok(CellOutcome::Measured {
            it_per_sec: first.it_per_sec(),
            unet_evals: first.unet_evals,
            run_secs: first.run_secs,
            peak_reserved_bytes: if cpu_peak {
                peak_process_memory()
            } else {
                peak
            },
            stages,
        })
    }
}

/// Refuses a cell whose UNet attention or feature maps cannot fit the device (with a
/// ControlNet's residuals beside its pass when `controlnet`), before any activation exists (on
/// the CPU backend the process would be killed rather than fail).
fn check_unet_memory<B: Backend>(
    selected: &SelectedBackend,
    processor: AttnProcessor,
    unet: &UNet2DConditionModel<B>,
    batch: usize,
    size: [usize; 2],
    tokens: usize,
    controlnet: bool,
) -> Result<()> {
    let calls = ModelCalls {
        model: "UNet",
        float_bytes: unet.conv_in.weight.dtype().size() as u64,
        calls: unet.attention_calls(batch, size, tokens),
    };
    let budget = memory_budget(selected);
    check_attention(&budget, processor, &[calls])?;
    let map = unet.feature_map(batch, size);
    let map = if controlnet {
        map.holding_control_residuals(unet.skip_elements(size))
    } else {
        map
    };
    budget.check_feature_map(&map, None)
}

fn sync<B: Backend>(device: &B::Device) -> Result<()> {
    B::sync(device).map_err(|e| EngineError::Backend(format!("device sync failed: {e}")))
}

impl BenchReport {
    /// The seed's table shape: one table per (size, batch), rows = pipelines, columns = settings;
    /// a cell shows it/s and peak memory, or why it did not run.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Brushfire benchmark: {}, {}, PNDM {} steps, CFG, it/s = UNet evaluations per second \
             (run {} of {}), random weights from {}'s configs.\n",
            self.backend, self.precision, self.steps, self.runs, self.runs, self.model
        );
        if let Some(stages) = self.cells.iter().find_map(|c| match &c.outcome {
            CellOutcome::Measured { stages, .. } if !stages.is_empty() => Some(stages),
            _ => None,
        }) {
            let parts: Vec<String> = stages
                .iter()
                .map(|s| {
                    format!(
                        "{} {}×{} ({} UNet evaluations)",
                        s.stage, s.width, s.height, s.unet_evals
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "The if row is the IF cascade at its own sizes, whatever the table's: {}; stages II \
                 and x4 at batch 1; random (·, 2, 4096) prompt embeddings in place of T5.\n",
                parts.join(", ")
            );
        }
        let mut columns: Vec<BenchColumn> = Vec::new();
        let mut pipelines: Vec<BenchPipeline> = Vec::new();
        let mut groups: Vec<(usize, usize, usize)> = Vec::new();
        for c in &self.cells {
            if !columns.contains(&c.spec.column) {
                columns.push(c.spec.column);
            }
            if !pipelines.contains(&c.spec.pipeline) {
                pipelines.push(c.spec.pipeline);
            }
            let g = (c.spec.width, c.spec.height, c.spec.batch);
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        for (w, h, b) in groups {
            let _ = writeln!(out, "### {w}×{h}, batch {b}\n");
            let header: Vec<&str> = columns.iter().map(|c| c.label()).collect();
            let _ = writeln!(out, "| pipeline | {} |", header.join(" | "));
            let _ = writeln!(out, "|---|{}", "---:|".repeat(columns.len()));
            for &p in &pipelines {
                let row: Vec<String> = columns
                    .iter()
                    .map(|&col| {
                        self.cells
                            .iter()
                            .find(|c| {
                                c.spec.pipeline == p
                                    && c.spec.column == col
                                    && (c.spec.width, c.spec.height, c.spec.batch) == (w, h, b)
                            })
                            .map_or_else(|| "—".to_string(), |c| c.outcome.cell_text())
                    })
                    .collect();
                let _ = writeln!(out, "| {p} | {} |", row.join(" | "));
            }
            out.push('\n');
        }
        out
    }

    /// One line per cell.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "pipeline,width,height,batch,column,attention,fusion,channels_last,dtype,backend,\
             status,it_per_sec,unet_evals,warm_run_secs,peak_reserved_mib,reason,stages\n",
        );
        for c in &self.cells {
            let s = &c.spec;
            let stage_text = match &c.outcome {
                CellOutcome::Measured { stages, .. } => stages
                    .iter()
                    .map(|s| format!("{} {:.4} it/s", s.stage, s.it_per_sec))
                    .collect::<Vec<_>>()
                    .join("; "),
                CellOutcome::Failed { .. } => String::new(),
            };
            let (status, its, evals, secs, mib, reason) = match &c.outcome {
                CellOutcome::Measured {
                    it_per_sec,
                    unet_evals,
                    run_secs,
                    peak_reserved_bytes,
                    ..
                } => (
                    "measured",
                    format!("{it_per_sec:.4}"),
                    unet_evals.to_string(),
                    run_secs
                        .last()
                        .map_or_else(String::new, |s| format!("{s:.4}")),
                    peak_reserved_bytes.map_or_else(String::new, |b| format!("{:.1}", mib(b))),
                    String::new(),
                ),
                CellOutcome::Failed { reason } => (
                    "failed",
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    reason.clone(),
                ),
            };
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                s.pipeline,
                s.width,
                s.height,
                s.batch,
                s.column.name(),
                s.column.attention().name(),
                s.column.fusion(),
                s.column.channels_last(),
                self.precision,
                csv_field(&self.backend),
                status,
                its,
                evals,
                secs,
                mib,
                csv_field(&reason),
                csv_field(&stage_text),
            );
        }
        out
    }

    /// Pretty JSON of the whole report.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| EngineError::Backend(format!("could not serialise the report: {e}")))
    }
}

impl CellOutcome {
    /// What the markdown cell shows.
    pub fn cell_text(&self) -> String {
        match self {
            Self::Measured {
                it_per_sec,
                peak_reserved_bytes,
                stages,
                ..
            } => {
                let rate = if stages.is_empty() {
                    rate_text(*it_per_sec)
                } else {
                    stages
                        .iter()
                        .map(|s| rate_text(s.it_per_sec))
                        .collect::<Vec<_>>()
                        .join(" / ")
                };
                match peak_reserved_bytes {
                    Some(b) => format!("{rate} it/s ({:.2} GiB)", mib(*b) / 1024.0),
                    None => format!("{rate} it/s"),
                }
            }
            Self::Failed { reason } => format!("not run: {}", reason.replace('|', "/")),
        }
    }
}

/// An it/s figure: two decimals, three significant digits below 1 (CPU rates).
fn rate_text(it_per_sec: f64) -> String {
    if it_per_sec.abs() >= 1.0 || it_per_sec == 0.0 {
        format!("{it_per_sec:.2}")
    } else {
        let decimals = (2.0 - it_per_sec.abs().log10().floor()).clamp(2.0, 6.0) as usize;
        format!("{it_per_sec:.decimals$}")
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Quotes a CSV field when it needs it.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

impl BenchPipeline {
    /// The seed's strength for the row: img2img 0.8, everything else the whole schedule.
    pub fn strength(self) -> f64 {
        match self {
            Self::SdImg2Img => 0.8,
            _ => 1.0,
        }
    }
}

/// The backend kind a plan's precision suits: f16 is the seed's, but only GPUs run it.
pub fn default_precision(kind: BackendKind) -> Precision {
    match kind {
        BackendKind::Cpu => Precision::F32,
        _ => Precision::F16,
    }
}

#[cfg(test)]
mod tests {
    use super::rate_text;

    #[test]
    fn rates_keep_three_significant_digits_below_one() {
        assert_eq!(rate_text(49.7412), "49.74");
        assert_eq!(rate_text(0.0886), "0.0886");
        assert_eq!(rate_text(0.0030012), "0.00300");
        assert_eq!(rate_text(0.5), "0.500");
        assert_eq!(rate_text(0.0), "0.00");
    }
}
