//! Everything the window shows, and how engine events change it. No egui layout here, so the
//! behaviour can be tested on its own.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use eframe::egui;
use engine::backend::{BackendKind, ExecutionOptions, Precision, SelectedBackend};
use engine::loading::{ModelAvailability, model_availability};
use engine::models::{AttnProcessor, MemoryFormat};
use engine::pipelines::{GenerationRequest, PipelineKind, StepProgress};
use engine::schedulers::SchedulerKind;
use engine::tensor_io::HostTensor;
use engine::worker::{EngineEvent, EngineHandle, EngineSettings, JobId};
use serde::{Deserialize, Serialize};

use super::bench::BenchState;
use super::cascade::{CascadeState, STAGES, StageSettings};
use super::control_input::{ControlEvent, ControlInputs, ControlSettings, MapSource, Origin};
pub use super::download::DownloadState;
pub use super::gallery::{Gallery, GalleryImage};
use super::image_input::{ImageInputs, ImageSettings};
use super::work::{Picture, SavedPicture, read_picture, remove_picture, write_picture};
use crate::image_files::to_u8;
use crate::png_meta::{
    ControlNetParameters, GenerationParameters, ParsedParameters, read_parameters_text,
};

/// How many recently used models the picker remembers.
const RECENT_MODELS: usize = 8;

/// The prompt panel's fields, saved with the session as they are: a field added here is saved
/// and restored with no other edit (`#[serde(default)]`: a session without it takes the
/// default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptForm {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f64,
    pub width: usize,
    pub height: usize,
    pub batch: usize,
    pub seed: u64,
    /// Keep the seed between generations (else a new random one each time).
    pub seed_locked: bool,
    /// Stored by its `--scheduler` name; a name this build does not know is the model's own.
    #[serde(with = "scheduler_name")]
    pub scheduler: Option<SchedulerKind>,
}

/// [`PromptForm::scheduler`] as its CLI name.
mod scheduler_name {
    use engine::schedulers::SchedulerKind;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(kind: &Option<SchedulerKind>, s: S) -> Result<S::Ok, S::Error> {
        kind.map(SchedulerKind::cli_name).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SchedulerKind>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.and_then(|name| name.parse().ok()))
    }
}

impl Default for PromptForm {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 25,
            guidance: 7.5,
            width: 512,
            height: 512,
            batch: 1,
            seed: engine::noise::random_seed(),
            seed_locked: false,
            scheduler: None,
        }
    }
}

impl PromptForm {
    /// What a stored form may not hold (a hand edit, an older build): fixed to the nearest
    /// value the panel allows.
    pub fn sanitize(&mut self) {
        self.steps = self.steps.max(1);
        self.batch = self.batch.max(1);
    }

    /// A new random seed.
    pub fn randomise_seed(&mut self) {
        self.seed = engine::noise::random_seed();
    }

    /// Fills the fields a `parameters` text gives; returns notes on what could not be used.
    pub fn apply_parameters(&mut self, p: &ParsedParameters) -> Vec<String> {
        let mut notes = Vec::new();
        self.prompt.clone_from(&p.prompt);
        self.negative_prompt.clone_from(&p.negative_prompt);
        if let Some(steps) = p.steps {
            self.steps = steps;
        }
        if let Some(cfg) = p.cfg_scale {
            self.guidance = cfg;
        }
        if let Some(seed) = p.seed {
            self.seed = seed;
            // The restored seed is the point: keep it for the next generation.
            self.seed_locked = true;
        }
        if let Some((w, h)) = p.size {
            self.width = w;
            self.height = h;
        }
        if let Some(sampler) = &p.sampler {
            match SchedulerKind::from_sampler_name(sampler) {
                Some(kind) => self.scheduler = Some(kind),
                None => notes.push(format!("sampler `{sampler}` is not available here")),
            }
        }
        notes
    }
}

/// Where a queued job is.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    Queued,
    /// Started; the last progress report once one arrived.
    Running(Option<StepProgress>),
}

/// A live preview of a running job (latent resolution, decoded cheaply by the engine).
pub struct Preview {
    pub step: usize,
    pub image: egui::ColorImage,
    texture: Option<egui::TextureHandle>,
    dirty: bool,
}

impl Preview {
    /// The preview as a texture (re-uploaded after each new preview).
    pub fn texture(&mut self, ctx: &egui::Context) -> egui::TextureHandle {
        let options = egui::TextureOptions::NEAREST;
        match &mut self.texture {
            Some(t) if !self.dirty => t.clone(),
            Some(t) => {
                t.set(self.image.clone(), options);
                self.dirty = false;
                t.clone()
            }
            None => {
                let t = ctx.load_texture("live-preview", self.image.clone(), options);
                self.texture = Some(t.clone());
                self.dirty = false;
                t
            }
        }
    }
}

/// A job in the queue.
pub struct Job {
    pub id: JobId,
    pub request: GenerationRequest,
    /// The ControlNet unit its images' parameters record (controlnet jobs).
    pub controlnet: Option<ControlNetParameters>,
    pub state: JobState,
    /// Exponentially smoothed UNet evaluations per second.
    pub smoothed_it_per_sec: f64,
    /// The latest live preview while running.
    pub preview: Option<Preview>,
    /// The model it runs on when not the main one (an IF stage, the x4 upscaler).
    pub model: Option<String>,
    /// The IF page's stage it runs, if any.
    pub cascade_stage: Option<usize>,
    /// When it last started or reported a step (for the "compiling kernels" note).
    pub last_event: Option<Instant>,
}

/// How long a running job may go without a step before the queue says why (GPU backends).
pub const QUIET_STEP_NOTE_SECS: f64 = 5.0;

impl Job {
    /// What to say while a job on a GPU backend has made no step for a while: CubeCL compiles
    /// (and autotunes) every kernel the first time a size and setting run, single-threaded, which
    /// can take minutes; they are kept on disk, so later runs start at once.
    pub fn quiet_note(&self, gpu: bool, now: Instant) -> Option<String> {
        let since = now.duration_since(self.last_event?).as_secs_f64();
        if !gpu || !matches!(self.state, JobState::Running(_)) || since < QUIET_STEP_NOTE_SECS {
            return None;
        }
        let kept = engine::backend::kernel_cache_dir()
            .map_or_else(String::new, |d| format!(" in {}", d.display()));
        Some(format!(
            "no step for {since:.0}s: compiling GPU kernels for this size and these settings \
             (first run only; they are kept{kept})"
        ))
    }

    /// Seconds left at the smoothed rate.
    pub fn eta_secs(&self) -> Option<f64> {
        match &self.state {
            JobState::Running(Some(p)) if self.smoothed_it_per_sec > 0.0 => {
                Some(p.total.saturating_sub(p.step) as f64 / self.smoothed_it_per_sec)
            }
            _ => None,
        }
    }
}

/// The model's state as the UI shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelStatus {
    NotLoaded,
    /// A hub model not in the cache: the UI offers the download.
    NeedsDownload {
        repo_id: String,
    },
    /// Not cached and offline: said plainly, nothing to do but pick another model.
    Offline {
        repo_id: String,
    },
    Loading {
        download: Option<DownloadState>,
    },
    Loaded(String),
    Failed(String),
}

impl std::fmt::Display for ModelStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotLoaded => f.write_str("no model loaded"),
            Self::NeedsDownload { repo_id } => {
                write!(f, "{repo_id} is not downloaded yet")
            }
            Self::Offline { repo_id } => write!(
                f,
                "{repo_id} is not downloaded and the hub is off (HF_HUB_OFFLINE): \
                 pick a local folder or a cached model"
            ),
            Self::Loading { download: None } => f.write_str("loading…"),
            Self::Loading { download: Some(d) } => write!(
                f,
                "downloading {}: {:.1}/{:.1} MB, {:.1} MB/s, ETA {:.0}s",
                d.file,
                d.done_bytes as f64 / 1e6,
                d.total_bytes as f64 / 1e6,
                d.rate() / 1e6,
                d.eta_secs()
            ),
            Self::Loaded(name) => write!(f, "loaded: {name}"),
            Self::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// The app's state.
pub struct AppState {
    engine: Option<EngineHandle>,
    pub form: PromptForm,
    pub settings: EngineSettings,
    /// Every generation encodes and decodes with the VAE in tiles (the request's `vae_tiling`).
    pub vae_tiling: bool,
    pub model_spec: String,
    pub model_status: ModelStatus,
    pub backend: Option<SelectedBackend>,
    /// The settings the engine last confirmed (it may refuse a change and keep the old ones).
    pub engine_settings: Option<EngineSettings>,
    pub jobs: Vec<Job>,
    /// The finished images, the one selected, and their saving.
    pub gallery: Gallery,
    /// The last error, shown once until dismissed.
    pub error: Option<String>,
    pub status: String,
    /// Where images are saved (`None`: not saved).
    pub output_dir: Option<PathBuf>,
    /// Recently loaded models, newest first.
    pub recent_models: Vec<String>,
    /// Which page the centre shows.
    pub view: View,
    /// The benchmark panel.
    pub bench: BenchState,
    /// The img2img / inpainting source image, its mask and their settings.
    pub inputs: ImageInputs,
    /// The ControlNet page: the control image, its map and strokes, the ControlNet.
    pub control: ControlInputs,
    /// The IF page: its three stages, their settings and last results.
    pub cascade: CascadeState,
    /// Settings the engine could not apply in this process (a GPU's precision is fixed at its
    /// first tensor): what the next start runs with.
    pub restart_for: Option<EngineSettings>,
    /// Where the pictures being worked on (the inpainting and ControlNet sources with what was
    /// painted on them) are written with the settings; `None`: not written. The window sets it.
    pub work_dir: Option<PathBuf>,
    /// What was last written for each of [`WORK_NAMES`], with the picture's fingerprint.
    saved_work: [Option<(u64, SavedPicture)>; 2],
}

/// File names of the pictures being worked on: the img2img/inpainting source, the ControlNet
/// source.
const WORK_NAMES: [&str; 2] = ["inpaint", "controlnet"];

/// The centre's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum View {
    /// Text to image.
    #[default]
    Generate,
    /// Image to image.
    Img2Img,
    /// Inpainting, with the mask canvas.
    Inpaint,
    /// ControlNet, with the control-map canvas.
    ControlNet,
    /// DeepFloyd IF's cascade and the x4 upscaler.
    Cascade,
    Benchmark,
}

impl View {
    pub const ALL: [Self; 6] = [
        Self::Generate,
        Self::Img2Img,
        Self::Inpaint,
        Self::ControlNet,
        Self::Cascade,
        Self::Benchmark,
    ];

    /// The name storage uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Generate => "generate",
            Self::Img2Img => "img2img",
            Self::Inpaint => "inpaint",
            Self::ControlNet => "controlnet",
            Self::Cascade => "if",
            Self::Benchmark => "benchmark",
        }
    }

    /// The pipeline Generate runs on this page.
    pub fn pipeline(self) -> PipelineKind {
        match self {
            Self::Img2Img => PipelineKind::Img2Img,
            Self::Inpaint => PipelineKind::Inpaint,
            Self::ControlNet => PipelineKind::ControlNet,
            Self::Cascade => PipelineKind::If,
            Self::Generate | Self::Benchmark => PipelineKind::Txt2Img,
        }
    }
}

/// The session's format: 2, each page's settings under its own name. Files without a version
/// are the flat format of builds before it (`session::LegacyPersisted`), still read.
pub const SESSION_VERSION: u32 = 2;

/// What survives a restart (`session.ron`). Each page's settings are stored as the page keeps
/// them ([`PromptForm`], [`ImageSettings`], [`ControlSettings`], [`StageSettings`]): a setting
/// added to one of those is saved and restored with no other edit. Engine settings are stored
/// by name, so an older or newer Brushfire reads them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Persisted {
    pub version: u32,
    pub form: PromptForm,
    pub engine: EngineChoices,
    pub image: ImageSettings,
    pub control: ControlSettings,
    /// The ControlNet attached when the app closed (attached again after the model loads).
    pub controlnet_loaded: Option<String>,
    /// The IF page's stages (model, steps, guidance, noise level).
    pub if_stages: Vec<StageSettings>,
    pub model_spec: String,
    pub recent_models: Vec<String>,
    pub output_dir: Option<PathBuf>,
    pub vae_tiling: bool,
    /// The page shown when the app closed (`View::name`).
    pub view: String,
    /// The gallery's images on disk, oldest first (read back at the next start).
    pub gallery: Vec<PathBuf>,
    /// The img2img/inpainting source and its mask, as last written (`work.rs`).
    pub inpaint_picture: Option<SavedPicture>,
    /// The ControlNet source and its strokes, as last written.
    pub control_picture: Option<SavedPicture>,
}

impl Default for Persisted {
    fn default() -> Self {
        AppState::new(String::new()).to_persisted()
    }
}

/// The engine settings by name (`--backend`, `--attention`, `--dtype` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineChoices {
    pub backend: String,
    pub attention: String,
    pub fusion: bool,
    pub channels_last: bool,
    pub precision: String,
    pub preview: bool,
}

impl Default for EngineChoices {
    fn default() -> Self {
        let settings = EngineSettings::default();
        Self::of(&settings, settings.execution)
    }
}

impl EngineChoices {
    /// `settings`, with the execution options the next start runs (a change that waits for a
    /// restart).
    pub fn of(settings: &EngineSettings, next_start: ExecutionOptions) -> Self {
        Self {
            backend: settings.backend.cli_name().into(),
            attention: attention_name(settings.attention).into(),
            fusion: next_start.fusion,
            channels_last: settings.memory_format.is_channels_last(),
            precision: next_start.precision.to_string(),
            preview: settings.preview,
        }
    }

    /// Applies the names this build knows to `settings`; an unknown name keeps the default.
    pub fn apply(&self, settings: &mut EngineSettings) {
        if let Ok(b) = self.backend.parse() {
            settings.backend = b;
        }
        if let Ok(a) = AttnProcessor::from_name(&self.attention) {
            settings.attention = a;
        }
        settings.execution.fusion = self.fusion;
        settings.memory_format = MemoryFormat::from_channels_last(self.channels_last);
        if let Ok(precision) = self.precision.parse() {
            settings.execution.precision = precision;
        }
        settings.preview = self.preview;
    }
}

/// The settings names the UI and storage use.
pub fn attention_name(a: AttnProcessor) -> &'static str {
    a.name()
}

impl AppState {
    /// State that will load `model` once the engine starts.
    pub fn new(model: String) -> Self {
        Self {
            engine: None,
            form: PromptForm::default(),
            settings: EngineSettings::default(),
            vae_tiling: false,
            model_spec: model,
            model_status: ModelStatus::NotLoaded,
            backend: None,
            engine_settings: None,
            jobs: Vec::new(),
            gallery: Gallery::default(),
            error: None,
            status: "starting…".into(),
            output_dir: dirs_output(),
            recent_models: Vec::new(),
            view: View::default(),
            bench: BenchState::default(),
            inputs: ImageInputs::default(),
            control: ControlInputs::default(),
            cascade: CascadeState::new(),
            restart_for: None,
            work_dir: None,
            saved_work: [None, None],
        }
    }

    /// The pictures being worked on, as [`WORK_NAMES`] orders them.
    fn work_pictures(&self) -> [Option<Picture<'_>>; 2] {
        [
            self.inputs.source.as_ref().map(|s| Picture {
                label: &s.label,
                width: s.width,
                height: s.height,
                rgb: &s.rgb,
                layer: s.canvas.layer(),
            }),
            self.control.source.as_ref().map(|s| Picture {
                label: &s.label,
                width: s.width,
                height: s.height,
                rgb: &s.rgb,
                layer: s.canvas.layer(),
            }),
        ]
    }

    /// Writes the pictures being worked on into [`Self::work_dir`], those that changed since
    /// the last write, and removes the files of a page that has none any more. Called before
    /// [`Self::to_persisted`], which names what is on disk. A failure leaves the last written
    /// version named; the first error is returned after trying both.
    pub fn save_work(&mut self) -> anyhow::Result<()> {
        let Some(dir) = self.work_dir.clone() else {
            return Ok(());
        };
        let pictures = self.work_pictures();
        let mut first_error = None;
        let mut written = [None, None];
        for (i, (picture, name)) in pictures.iter().zip(WORK_NAMES).enumerate() {
            let Some(picture) = picture else { continue };
            let fingerprint = picture.fingerprint();
            if matches!(&self.saved_work[i], Some((f, _)) if *f == fingerprint) {
                continue;
            }
            match write_picture(&dir, name, picture) {
                Ok(saved) => written[i] = Some((fingerprint, saved)),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let present = pictures.map(|p| p.is_some());
        for ((slot, new), present) in self.saved_work.iter_mut().zip(written).zip(present) {
            if let Some(new) = new {
                *slot = Some(new);
            } else if !present && let Some((_, old)) = slot.take() {
                remove_picture(&old);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Puts the pictures named in `p` back on their pages; one that cannot be read is left out
    /// and said as an error, which stays until dismissed (the status line is soon taken by the
    /// model loading).
    fn restore_work(&mut self, p: &Persisted) {
        let mut lost = Vec::new();
        let mut first_reason = None;
        for (i, saved) in [&p.inpaint_picture, &p.control_picture]
            .into_iter()
            .enumerate()
        {
            let Some(saved) = saved else { continue };
            if !saved.is_ours(&WORK_NAMES) {
                lost.push(saved.label.clone());
                first_reason.get_or_insert_with(|| {
                    format!(
                        "the settings name {} and {}, which are not Brushfire's work pictures: \
                         neither read nor removed",
                        saved.image.display(),
                        saved.layer.display()
                    )
                });
                continue;
            }
            let (label, w, h, rgb, layer) = match read_picture(saved) {
                Ok(restored) => restored,
                Err(e) => {
                    tracing::info!("picture not restored: {e:#}");
                    lost.push(saved.label.clone());
                    first_reason.get_or_insert_with(|| format!("{e:#}"));
                    continue;
                }
            };
            let canvas = if i == 0 {
                self.inputs.set_source(label, w, h, rgb);
                self.inputs.source.as_mut().map(|s| &mut s.canvas)
            } else {
                self.control.set_source(label, w, h, rgb);
                self.control.source.as_mut().map(|s| &mut s.canvas)
            };
            if let Some(canvas) = canvas
                && canvas.replace_layer(layer).is_ok()
            {
                canvas.forget_history();
            }
            self.saved_work[i] = self.work_pictures()[i].map(|p| (p.fingerprint(), saved.clone()));
        }
        if let Some(reason) = first_reason {
            self.error = Some(format!(
                "could not restore {} from the last session: {reason}",
                lost.join(", ")
            ));
        }
    }

    /// Fusion and precision as the next start will have them.
    pub fn next_start_execution(&self) -> engine::backend::ExecutionOptions {
        self.restart_for
            .map_or(self.settings.execution, |s| s.execution)
    }

    /// Why the app cannot restart right now, if it cannot: a restart would lose queued and
    /// running work.
    pub fn restart_blocker(&self) -> Option<&'static str> {
        if !self.jobs.is_empty() {
            Some("Wait for the queued jobs to finish (or cancel them) first.")
        } else if self.bench.running.is_some() {
            Some("Wait for the benchmark to finish (or cancel it) first.")
        } else {
            None
        }
    }

    /// Before a restart: writes the gallery's unsaved images (no save folder, or a failed save)
    /// where the next start reads them back, so nothing made in this session is lost.
    pub fn keep_unsaved_images(&mut self) -> anyhow::Result<()> {
        self.finish_saves();
        if self.gallery.iter().all(|g| g.path.is_some()) {
            return Ok(());
        }
        let Some(dir) = engine::backend::cache_dir().map(|c| c.join("unsaved")) else {
            anyhow::bail!("no cache folder ($XDG_CACHE_HOME or $HOME) to keep unsaved images in");
        };
        self.gallery.keep_unsaved_in(&dir)
    }

    /// What to store for the next start.
    pub fn to_persisted(&self) -> Persisted {
        Persisted {
            version: SESSION_VERSION,
            form: self.form.clone(),
            engine: EngineChoices::of(&self.settings, self.next_start_execution()),
            image: self.inputs.settings.clone(),
            control: self.control.settings.clone(),
            controlnet_loaded: self.control.loaded.clone(),
            if_stages: self.cascade.stages.to_vec(),
            model_spec: self.model_spec.clone(),
            recent_models: self.recent_models.clone(),
            output_dir: self.output_dir.clone(),
            vae_tiling: self.vae_tiling,
            view: self.view.name().into(),
            gallery: self.gallery.kept_paths(),
            inpaint_picture: self.saved_work[0].as_ref().map(|(_, s)| s.clone()),
            control_picture: self.saved_work[1].as_ref().map(|(_, s)| s.clone()),
        }
    }

    /// State restored from storage; anything unreadable keeps its default. `model` (from the
    /// command line) wins over the stored model when given.
    pub fn restore(p: &Persisted, model: Option<String>) -> Self {
        let mut s = Self::new(model.unwrap_or_else(|| p.model_spec.clone()));
        s.form = p.form.clone();
        s.form.sanitize();
        p.engine.apply(&mut s.settings);
        s.vae_tiling = p.vae_tiling;
        s.recent_models.clone_from(&p.recent_models);
        s.output_dir.clone_from(&p.output_dir);
        s.inputs.settings = p.image.clone();
        s.inputs.settings.sanitize();
        s.control.settings = p.control.clone();
        s.control.settings.sanitize();
        s.control.pending_load.clone_from(&p.controlnet_loaded);
        s.view = View::ALL
            .into_iter()
            .find(|v| v.name() == p.view)
            .unwrap_or_default();
        s.cascade.stages = [0, 1, 2].map(|i| StageSettings::restored(i, p.if_stages.get(i)));
        s.restore_work(p);
        s.gallery = Gallery::restore(p.gallery.clone());
        s
    }

    fn engine(&mut self, ctx: &egui::Context) -> Option<&mut EngineHandle> {
        if self.engine.is_none() {
            let ctx = ctx.clone();
            match EngineHandle::spawn(self.settings, move || ctx.request_repaint()) {
                Ok(engine) => self.use_engine(engine),
                Err(e) => self.error = Some(e.to_string()),
            }
        }
        self.engine.as_mut()
    }

    /// Drives `engine` (spawned with this state's settings) from now on, loading the model; the
    /// app otherwise starts its own on the first frame, waking the UI after every event.
    pub fn use_engine(&mut self, engine: EngineHandle) {
        self.engine = Some(engine);
        if !self.model_spec.is_empty() {
            self.load_model();
        }
    }

    /// Whether the engine runs on a GPU backend (CUDA or wgpu).
    pub fn on_gpu(&self) -> bool {
        self.backend
            .as_ref()
            .is_some_and(|b| b.kind != BackendKind::Cpu)
    }

    /// Applies waiting engine events within `budget` (and restored gallery images).
    pub fn poll_engine(&mut self, ctx: &egui::Context, budget: Duration) {
        if self.gallery.receive(false) {
            ctx.request_repaint_after(Duration::from_millis(100));
        }
        if let Some(message) = self.gallery.poll_saves(ctx).pop() {
            self.error = Some(message);
        }
        let events = match self.engine(ctx) {
            Some(engine) => engine.drain(budget),
            None => return,
        };
        for event in events {
            self.apply_event(event);
        }
    }

    fn apply_event(&mut self, event: EngineEvent) {
        let Some(event) = self.bench.apply_event(event) else {
            return;
        };
        let event = match self.control.apply_event(event) {
            ControlEvent::NotMine(event) => *event,
            ControlEvent::Quiet => return,
            ControlEvent::Status(status) => {
                self.status = status;
                return;
            }
            ControlEvent::Error(error) => {
                self.error = Some(error);
                return;
            }
        };
        match event {
            EngineEvent::Backend(b) => {
                self.status = format!("ready: {b}");
                self.backend = Some(b);
            }
            EngineEvent::Download {
                file,
                done_bytes,
                total_bytes,
            } if self.side_model_pending() => {
                let percent = 100.0 * done_bytes as f64 / total_bytes.max(1) as f64;
                self.status = format!("downloading {file}: {percent:.0}%");
            }
            EngineEvent::Download {
                file,
                done_bytes,
                total_bytes,
            } => {
                let started = match &self.model_status {
                    ModelStatus::Loading { download: Some(d) } if d.file == file => d.started,
                    _ => Instant::now(),
                };
                self.model_status = ModelStatus::Loading {
                    download: Some(DownloadState {
                        file,
                        done_bytes,
                        total_bytes,
                        started,
                    }),
                };
            }
            EngineEvent::ModelLoaded {
                spec, elapsed_secs, ..
            } if self
                .jobs
                .iter()
                .any(|j| j.model.as_deref() == Some(spec.as_str())) =>
            {
                // A job's own model (an IF stage, the x4 upscaler), beside the main one.
                self.status = format!("loaded {spec} in {elapsed_secs:.1}s");
            }
            EngineEvent::ModelLoaded {
                spec, elapsed_secs, ..
            } => {
                self.status = format!("loaded {spec} in {elapsed_secs:.1}s");
                self.recent_models.retain(|m| m != &spec);
                self.recent_models.insert(0, spec.clone());
                self.recent_models.truncate(RECENT_MODELS);
                self.model_status = ModelStatus::Loaded(spec);
                if let Some(controlnet) = self.control.pending_load.take() {
                    self.control.controlnet_spec = controlnet;
                    self.load_controlnet();
                }
            }
            EngineEvent::SettingsApplied(s) => {
                // The engine may have reverted a change it could not make.
                self.settings = s;
                self.engine_settings = Some(s);
                self.status = format!(
                    "settings in effect from the next job: {} attention, fusion {}, \
                     channels-last {}, {}",
                    attention_name(s.attention),
                    if s.execution.fusion { "on" } else { "off" },
                    if s.memory_format.is_channels_last() {
                        "on"
                    } else {
                        "off"
                    },
                    s.execution.precision
                );
            }
            EngineEvent::Preview { job, step, image } => {
                if let Some(j) = self.job_mut(job) {
                    let (h, w) = (image.shape[0], image.shape[1]);
                    let rgb = to_u8(&image.values);
                    let image = egui::ColorImage::from_rgb([w, h], &rgb);
                    match &mut j.preview {
                        Some(p) => {
                            p.step = step;
                            p.image = image;
                            p.dirty = true;
                        }
                        None => {
                            j.preview = Some(Preview {
                                step,
                                image,
                                texture: None,
                                dirty: true,
                            })
                        }
                    }
                }
            }
            EngineEvent::JobStarted { job } => {
                if let Some(j) = self.job_mut(job) {
                    j.state = JobState::Running(None);
                    j.last_event = Some(Instant::now());
                }
            }
            EngineEvent::Progress { job, progress } => {
                if let Some(j) = self.job_mut(job) {
                    // Smooth the per-step rate so the readout does not jitter.
                    let rate = progress.it_per_sec;
                    j.smoothed_it_per_sec = if j.smoothed_it_per_sec == 0.0 {
                        rate
                    } else {
                        0.7 * j.smoothed_it_per_sec + 0.3 * rate
                    };
                    j.state = JobState::Running(Some(progress));
                    j.last_event = Some(Instant::now());
                }
            }
            EngineEvent::Finished {
                job,
                images,
                raw,
                prompt_embeds,
                scheduler,
                elapsed_secs,
                notes,
            } => {
                if let Some(index) = self.jobs.iter().position(|j| j.id == job) {
                    let job = self.jobs.remove(index);
                    self.add_images(&job, &images, scheduler);
                    if let Some(stage) = job.cascade_stage {
                        // The denoising loop's own rate (model loading and T5 excluded).
                        let rate = match &job.state {
                            JobState::Running(Some(p)) => p.it_per_sec,
                            _ => job.request.steps as f64 / elapsed_secs.max(1e-9),
                        };
                        self.cascade.finished(
                            stage,
                            images,
                            (raw, prompt_embeds),
                            rate,
                            elapsed_secs,
                        );
                        if self.cascade.chain && stage + 1 < STAGES {
                            self.queue_stage(stage + 1);
                        } else {
                            self.cascade.chain = false;
                        }
                    }
                    self.status = format!("#{} done in {elapsed_secs:.1}s", job.id);
                    for note in notes {
                        self.status.push_str(" — ");
                        self.status.push_str(&note);
                    }
                }
            }
            EngineEvent::Cancelled { job } => {
                self.jobs.retain(|j| j.id != job);
                self.cascade.stopped(job);
                self.status = format!("#{job} cancelled");
            }
            // Taken by the ControlNet page's reducer above.
            EngineEvent::ControlNetLoaded { .. } | EngineEvent::ControlNetFailed { .. } => {}
            EngineEvent::BenchCellStarted { .. }
            | EngineEvent::BenchStep { .. }
            | EngineEvent::BenchCellFinished { .. }
            | EngineEvent::BenchFinished { .. } => {
                // A benchmark this window no longer tracks.
            }
            EngineEvent::RestartNeeded { wanted, reason } => {
                tracing::info!("{reason}");
                self.restart_for = Some(wanted);
                self.status = format!(
                    "{} (fusion {}) takes effect when Brushfire restarts: a GPU's float type \
                     is fixed for the life of the process",
                    wanted.execution.precision,
                    if wanted.execution.fusion { "on" } else { "off" }
                );
            }
            EngineEvent::Failed { job, error } => {
                match job {
                    Some(job) => {
                        self.jobs.retain(|j| j.id != job);
                        self.cascade.stopped(job);
                    }
                    None => {
                        if matches!(self.model_status, ModelStatus::Loading { .. }) {
                            self.model_status = ModelStatus::Failed(error.clone());
                        }
                    }
                }
                self.error = Some(error);
            }
        }
    }

    /// Whether the next job waits for its own model (downloads are that model's).
    fn side_model_pending(&self) -> bool {
        self.model_ready()
            && self
                .jobs
                .first()
                .is_some_and(|j| j.model.is_some() && j.state == JobState::Queued)
    }

    fn job_mut(&mut self, id: JobId) -> Option<&mut Job> {
        self.jobs.iter_mut().find(|j| j.id == id)
    }

    fn add_images(&mut self, job: &Job, images: &HostTensor, scheduler: &'static str) {
        let request = &job.request;
        let [batch, height, width] = [images.shape[0], images.shape[1], images.shape[2]];
        let per = height * width * 3;
        let params = GenerationParameters {
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            steps: request.steps,
            sampler: scheduler.to_string(),
            cfg_scale: request.guidance_scale,
            seed: request.seed,
            width,
            height,
            model: model_label(job.model.as_deref().unwrap_or(&self.model_spec)),
            denoising_strength: request.denoising_strength(),
            controlnet: job.controlnet.clone(),
        };
        for (i, chunk) in images.values.chunks(per).take(batch).enumerate() {
            self.gallery
                .add(to_u8(chunk), params.clone(), i, self.output_dir.as_deref());
        }
    }

    /// Waits for the images being written (before a restart, and before the session names
    /// the gallery's files); a failure is shown.
    pub fn finish_saves(&mut self) {
        if let Some(message) = self.gallery.finish_saves().pop() {
            self.error = Some(message);
        }
    }

    /// Whether a model is loaded (Generate is enabled).
    pub fn model_ready(&self) -> bool {
        matches!(self.model_status, ModelStatus::Loaded(_))
    }

    /// Loads `model_spec` if it is on disk or cached; a hub model that is not yet downloaded
    /// waits for the user to accept the download ([`Self::download_model`]).
    pub fn load_model(&mut self) {
        let spec = self.model_spec.trim().to_string();
        let variant = self.settings.execution.precision.weights_variant();
        match model_availability(&spec, variant) {
            Ok(ModelAvailability::NeedsDownload { repo_id }) => {
                self.model_status = ModelStatus::NeedsDownload { repo_id };
            }
            Ok(ModelAvailability::Offline { repo_id }) => {
                self.model_status = ModelStatus::Offline { repo_id };
            }
            Ok(ModelAvailability::Local(_) | ModelAvailability::Cached(_)) => self.send_load(spec),
            Err(e) => {
                self.model_status = ModelStatus::Failed(e.to_string());
                self.error = Some(e.to_string());
            }
        }
    }

    /// Downloads (through the hub cache) and loads `model_spec`.
    pub fn download_model(&mut self) {
        let spec = self.model_spec.trim().to_string();
        self.send_load(spec);
    }

    fn send_load(&mut self, spec: String) {
        if let Some(engine) = &self.engine {
            engine.load_model(spec);
            self.model_status = ModelStatus::Loading { download: None };
        }
    }

    /// Makes gallery image `index` the source of `view` (img2img/inpainting, or the
    /// ControlNet's control image) and shows it.
    pub fn send_to(&mut self, index: usize, view: View) {
        if let Some(img) = self.gallery.get(index) {
            let label = img.path.as_ref().and_then(|p| p.file_name()).map_or_else(
                || format!("gallery image {}", index + 1),
                |n| n.to_string_lossy().into_owned(),
            );
            let (w, h, rgb) = (img.width, img.height, img.rgb.clone());
            if view == View::ControlNet {
                self.control.set_source(label, w, h, rgb);
                self.control.map_source = MapSource::Canny;
            } else {
                self.inputs.set_source(label, w, h, rgb);
            }
            self.view = view;
        }
    }

    /// Attaches the ControlNet of the page's field to the loaded model.
    pub fn load_controlnet(&mut self) {
        let spec = self.control.controlnet_spec.trim().to_string();
        if spec.is_empty() {
            self.error = Some("type a ControlNet folder, hub id or .safetensors file".into());
            return;
        }
        if let Some(engine) = &self.engine {
            engine.load_controlnet(spec);
            self.control.loading = true;
            self.control.download = None;
        }
    }

    /// Opens an image file as the ControlNet's control image.
    pub fn open_control(&mut self, path: &Path) {
        match self.control.open(path) {
            Ok(()) => self.status = format!("opened {}", path.display()),
            Err(e) => self.error = Some(format!("{e:#}")),
        }
    }

    /// Opens an image file as the img2img/inpainting source.
    pub fn open_source(&mut self, path: &Path) {
        match self.inputs.open(path) {
            Ok(()) => self.status = format!("opened {}", path.display()),
            Err(e) => self.error = Some(format!("{e:#}")),
        }
    }

    /// Files given on the command line ("Open with Brushfire"): the last image becomes the
    /// source of the page the app opened on if that page takes one (Inpaint, ControlNet), else
    /// the Image to image page's; a PNG with generation parameters also puts them in the form.
    pub fn open_files(&mut self, files: &[PathBuf]) {
        let Some(path) = files.last() else {
            return;
        };
        if matches!(read_parameters_text(path), Ok(Some(_))) {
            self.open_dropped(path);
        }
        let opened = match self.view {
            View::ControlNet => self.control.open(path),
            View::Inpaint => self.inputs.open(path),
            _ => self.inputs.open(path).map(|()| self.view = View::Img2Img),
        };
        if let Err(e) = opened {
            self.error = Some(format!("{e:#}"));
        }
    }

    /// A file dropped on the window: on the img2img and inpaint pages an image becomes the
    /// source; elsewhere a PNG's `parameters` go into the form.
    pub fn drop_file(&mut self, path: &Path) {
        if self.view == View::ControlNet {
            self.open_control(path);
        } else if matches!(self.view, View::Img2Img | View::Inpaint) {
            self.open_source(path);
        } else {
            self.open_dropped(path);
        }
    }

    /// Reads the `parameters` of a dropped PNG (Brushfire's or A1111's) into the form.
    pub fn open_dropped(&mut self, path: &Path) {
        let is_png = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png"));
        if !is_png {
            self.error = Some(format!(
                "{}: drop a PNG made by Brushfire or A1111 to restore its parameters",
                path.display()
            ));
            return;
        }
        match read_parameters_text(path) {
            Ok(Some(text)) => {
                let parsed = ParsedParameters::parse(&text);
                let notes = self.restore_parameters(&parsed, Origin::File);
                let mut status = format!("restored the parameters of {}", path.display());
                if let Some(model) = &parsed.model
                    && model != &model_label(&self.model_spec)
                {
                    status.push_str(&format!(" (made with {model})"));
                }
                for note in notes {
                    status.push_str("; ");
                    status.push_str(&note);
                }
                self.status = status;
            }
            Ok(None) => {
                self.error = Some(format!(
                    "{} carries no generation parameters",
                    path.display()
                ))
            }
            Err(e) => self.error = Some(format!("{e:#}")),
        }
    }

    /// Puts a gallery image's seed back in the form (locked).
    pub fn reuse_seed(&mut self, index: usize) {
        if let Some(img) = self.gallery.get(index) {
            self.form.seed = img.params.seed;
            self.form.seed_locked = true;
        }
    }

    /// Puts all of a gallery image's parameters back in the form (and the pages' settings).
    pub fn reuse_parameters(&mut self, index: usize) {
        if let Some(img) = self.gallery.get(index) {
            let parsed = ParsedParameters::parse(&img.params.to_a1111());
            let notes = self.restore_parameters(&parsed, Origin::Gallery);
            self.status = std::iter::once("restored the image's parameters".to_string())
                .chain(notes)
                .collect::<Vec<_>>()
                .join("; ");
        }
    }

    /// Fills the form from a `parameters` text, and what the pages take from it: the strength
    /// (of the inpainting page when it is shown, else of img2img) and the ControlNet unit.
    /// Returns notes on what could not be used. `origin` says whether a ControlNet path in them
    /// may be followed.
    pub fn restore_parameters(&mut self, parsed: &ParsedParameters, origin: Origin) -> Vec<String> {
        let mut notes = self.form.apply_parameters(parsed);
        if let Some(strength) = parsed.denoising_strength() {
            if (0.0..=1.0).contains(&strength) {
                match self.view {
                    View::Inpaint => self.inputs.inpaint_strength = strength,
                    _ => self.inputs.strength = strength,
                }
            } else {
                notes.push(format!("denoising strength {strength} is outside 0…1"));
            }
        }
        match parsed.controlnet() {
            Some(Ok(unit)) => notes.extend(self.control.apply_unit(&unit, origin)),
            Some(Err(why)) => notes.push(why),
            None => {}
        }
        notes
    }

    /// Why a setting cannot be chosen on the backend in use, if it cannot.
    pub fn unavailable_reason(&self, setting: Setting) -> Option<&'static str> {
        let kind = self.backend.as_ref().map(|b| b.kind);
        match setting {
            Setting::Fusion if kind == Some(BackendKind::Cpu) => {
                Some("The CPU backend (flex) has no kernel fusion: nothing to switch.")
            }
            Setting::Precision(Precision::F16) if kind == Some(BackendKind::Cpu) => {
                Some("f16 runs on GPU backends only (CUDA, wgpu); the CPU backend computes in f32.")
            }
            _ => None,
        }
    }

    /// Queues a generation from the form, with the page's pipeline (the source image and its
    /// mask for img2img/inpainting). A request that cannot be made says why in the status bar.
    pub fn queue_generation(&mut self) {
        if self.view == View::Cascade {
            self.run_all_stages();
            return;
        }
        let pipeline = self.view.pipeline();
        let control = match pipeline {
            PipelineKind::ControlNet => match self.control.request() {
                Ok(control) => Some(control),
                Err(e) => {
                    self.error = Some(format!("{e:#}"));
                    return;
                }
            },
            _ => None,
        };
        let images = match pipeline {
            PipelineKind::Txt2Img | PipelineKind::ControlNet => None,
            _ => match self
                .inputs
                .request_images(pipeline, (self.form.width, self.form.height))
            {
                Ok(images) => Some(images),
                Err(e) => {
                    self.error = Some(format!("{e:#}"));
                    return;
                }
            },
        };
        if !self.form.seed_locked && !self.gallery.is_empty() {
            self.form.randomise_seed();
        }
        let f = &self.form;
        let mut request = GenerationRequest {
            pipeline,
            prompt: f.prompt.clone(),
            negative_prompt: f.negative_prompt.clone(),
            steps: f.steps,
            guidance_scale: f.guidance,
            width: f.width,
            height: f.height,
            batch: f.batch,
            seed: f.seed,
            scheduler: f.scheduler,
            ..Default::default()
        };
        if let Some(images) = images {
            request.width = images.width;
            request.height = images.height;
            request.image = Some(images.image);
            request.mask = images.mask;
            request.strength = Some(images.strength);
            request.mask_blur = images.mask_blur;
            request.padding_mask_crop = images.padding_mask_crop;
        }
        let controlnet = control.as_ref().map(|c| ControlNetParameters {
            model: self.control.loaded.clone().unwrap_or_default(),
            canny: (self.control.map_source == MapSource::Canny)
                .then_some((self.control.canny.low, self.control.canny.high)),
            weight: c.scale,
            guidance_start: c.guidance.0,
            guidance_end: c.guidance.1,
            guess_mode: c.guess_mode,
        });
        if let Some(control) = control {
            request.width = control.width;
            request.height = control.height;
            request.control_image = Some(control.control_image);
            request.controlnet_scale = control.scale;
            request.control_guidance = control.guidance;
            request.guess_mode = control.guess_mode;
        }
        self.submit(request, controlnet, None, None);
    }

    /// Sends a request to the engine (on `model` when not the main one) and tracks it.
    fn submit(
        &mut self,
        request: GenerationRequest,
        controlnet: Option<ControlNetParameters>,
        model: Option<String>,
        cascade_stage: Option<usize>,
    ) -> Option<JobId> {
        let engine = self.engine.as_mut()?;
        let request = GenerationRequest {
            vae_tiling: self.vae_tiling,
            ..request
        };
        let id = engine.generate_on(request.clone(), model.clone());
        self.jobs.push(Job {
            id,
            request,
            controlnet,
            state: JobState::Queued,
            smoothed_it_per_sec: 0.0,
            preview: None,
            model,
            cascade_stage,
            last_event: None,
        });
        Some(id)
    }

    /// Queues the IF page's stage `i` (its input is the previous stage's last result).
    pub fn queue_stage(&mut self, i: usize) {
        let f = &self.form;
        let made = self
            .cascade
            .request(i, &f.prompt, &f.negative_prompt, f.seed, f.batch);
        match made {
            Ok((request, model)) => {
                let id = self.submit(request, None, Some(model), Some(i));
                self.cascade.running = id.map(|id| (i, id));
                if id.is_none() {
                    self.cascade.chain = false;
                }
            }
            Err(e) => {
                self.cascade.chain = false;
                self.error = Some(format!("{e:#}"));
            }
        }
    }

    /// Runs the IF cascade from stage I, each stage starting when the one before finishes.
    pub fn run_all_stages(&mut self) {
        if !self.cascade.can_run(0) {
            return;
        }
        if !self.form.seed_locked && !self.gallery.is_empty() {
            self.form.randomise_seed();
        }
        self.cascade.chain = true;
        self.queue_stage(0);
    }

    /// "Upscale ×4" on a gallery image: the x4 upscaler (the IF page's model and settings),
    /// the image's own prompt and seed; the input is cut to a multiple of 4 on each side.
    pub fn upscale_image(&mut self, index: usize) {
        let Some(image) = self.gallery.get(index) else {
            return;
        };
        let (w, h) = (image.width / 4 * 4, image.height / 4 * 4);
        if w == 0 || h == 0 {
            self.error = Some("the image is too small to upscale".into());
            return;
        }
        let s = &self.cascade.stages[2];
        let request = GenerationRequest {
            pipeline: PipelineKind::Upscale,
            prompt: image.params.prompt.clone(),
            negative_prompt: image.params.negative_prompt.clone(),
            steps: s.steps,
            guidance_scale: s.guidance,
            width: 4 * w,
            height: 4 * h,
            batch: 1,
            seed: image.params.seed,
            noise_level: Some(s.noise_level),
            image: Some(HostTensor {
                shape: vec![image.height, image.width, 3],
                values: image.rgb.iter().map(|&v| f32::from(v) / 255.0).collect(),
            }),
            ..Default::default()
        };
        let model = s.model.trim().to_string();
        self.submit(request, None, Some(model), None);
        self.status = format!("upscaling image {} ×4 to {}×{}", index + 1, 4 * w, 4 * h);
    }

    /// Queues the benchmark panel's plan on the engine (behind any generation).
    pub fn start_bench(&mut self) {
        let current = self.engine_settings.map(|s| s.execution.precision);
        let plan = self
            .bench
            .form
            .plan(self.backend.as_ref().map(|b| b.kind), current);
        if let Err(e) = plan.validate() {
            self.error = Some(format!("benchmark: {e}"));
            return;
        }
        if let Some(engine) = self.engine.as_mut() {
            let job = engine.bench(plan.clone(), self.bench.models());
            self.bench.started(job, plan);
        }
    }

    /// Cancels the running benchmark.
    pub fn cancel_bench(&mut self) {
        if let Some(run) = &self.bench.running {
            let job = run.job;
            self.cancel(job);
        }
    }

    /// Cancels a queued or running job.
    pub fn cancel(&mut self, id: JobId) {
        if let Some(engine) = &self.engine {
            engine.cancel(id);
        }
    }

    /// Sends new settings to the engine.
    pub fn apply_settings(&mut self, settings: EngineSettings) {
        // Back to what runs now: nothing waits for a restart any more.
        if self
            .engine_settings
            .is_some_and(|e| e.execution == settings.execution && e.backend == settings.backend)
        {
            self.restart_for = None;
        }
        self.settings = settings;
        if let Some(engine) = &self.engine {
            engine.apply_settings(settings);
        }
    }

    /// The image shown in the centre.
    pub fn selected_image(&self) -> Option<&GalleryImage> {
        self.gallery.selected_image()
    }

    /// The running job's live preview, if any.
    pub fn running_preview(&mut self) -> Option<&mut Preview> {
        self.jobs
            .iter_mut()
            .find(|j| matches!(j.state, JobState::Running(_)))
            .and_then(|j| j.preview.as_mut())
    }
}

/// A setting the panel may grey out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    Fusion,
    ChannelsLast,
    Precision(Precision),
}

/// The short model name PNGs record (`stable-diffusion-v1-5` for the hub id, a folder's name).
pub fn model_label(spec: &str) -> String {
    Path::new(spec.trim_end_matches(['/', '\\']))
        .file_name()
        .map_or_else(|| spec.to_string(), |n| n.to_string_lossy().into_owned())
}

/// `~/Pictures/Brushfire` (or `./brushfire-output` without a home folder).
fn dirs_output() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    Some(match home {
        Some(h) => h.join("Pictures").join("Brushfire"),
        None => PathBuf::from("brushfire-output"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: JobState, quiet_secs: u64) -> (Job, Instant) {
        let started = Instant::now();
        let job = Job {
            id: 1,
            request: GenerationRequest::default(),
            controlnet: None,
            state,
            smoothed_it_per_sec: 0.0,
            preview: None,
            model: None,
            cascade_stage: None,
            last_event: Some(started),
        };
        (job, started + Duration::from_secs(quiet_secs))
    }

    #[test]
    fn a_precision_the_gpu_cannot_switch_to_waits_for_the_next_start() {
        let mut state = AppState::new("tiny-sd".into());
        let running = EngineSettings::default();
        state.engine_settings = Some(running);
        let mut wanted = running;
        wanted.execution.precision = match running.execution.precision {
            Precision::F32 => Precision::F16,
            Precision::F16 => Precision::F32,
        };
        state.apply_settings(wanted);
        // The engine answers: the old settings stay, the new ones wait for a restart.
        state.apply_event(EngineEvent::SettingsApplied(running));
        state.apply_event(EngineEvent::RestartNeeded {
            wanted,
            reason: "fixed at its first tensor".into(),
        });
        assert_eq!(state.settings, running);
        assert_eq!(state.restart_for, Some(wanted));
        assert!(
            state.status.contains("when Brushfire restarts"),
            "{}",
            state.status
        );
        let persisted = state.to_persisted();
        assert_eq!(
            persisted.engine.precision,
            wanted.execution.precision.to_string()
        );
        assert_eq!(
            AppState::restore(&persisted, None).settings.execution,
            wanted.execution,
            "the next start runs with it"
        );
        assert_eq!(state.restart_blocker(), None);
        state.jobs.push(job(JobState::Queued, 0).0);
        assert!(
            state.restart_blocker().is_some(),
            "a queued job blocks a restart"
        );
        state.jobs.clear();
        // Choosing what runs now again drops the pending change.
        state.apply_settings(running);
        assert_eq!(state.restart_for, None);
        assert_eq!(
            state.to_persisted().engine.precision,
            running.execution.precision.to_string()
        );
    }

    #[test]
    fn a_quiet_gpu_job_says_it_is_compiling_kernels() {
        let (running, later) = job(JobState::Running(None), 12);
        let note = running.quiet_note(true, later).expect("a note after 12 s");
        assert!(
            note.starts_with("no step for 12s: compiling GPU kernels"),
            "{note}"
        );
        // Not on the CPU backend (nothing is compiled there), not before the threshold, not
        // for a queued job.
        assert_eq!(running.quiet_note(false, later), None);
        let (soon, at) = job(JobState::Running(None), 2);
        assert_eq!(soon.quiet_note(true, at), None);
        let (queued, later) = job(JobState::Queued, 60);
        assert_eq!(queued.quiet_note(true, later), None);
    }
}
