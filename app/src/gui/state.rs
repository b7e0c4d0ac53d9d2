//! Everything the window shows, and how engine events change it. No egui layout here, so the
//! behaviour can be tested on its own.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use eframe::egui;
use engine::backend::SelectedBackend;
use engine::pipelines::{GenerationRequest, StepProgress};
use engine::schedulers::SchedulerKind;
use engine::tensor_io::HostTensor;
use engine::worker::{EngineEvent, EngineHandle, EngineSettings, JobId};

use crate::png_meta::{GenerationParameters, write_png};

/// The prompt panel's fields.
#[derive(Debug, Clone, PartialEq)]
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
    pub scheduler: Option<SchedulerKind>,
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
            seed: crate::cli::random_seed(),
            seed_locked: false,
            scheduler: None,
        }
    }
}

impl PromptForm {
    /// A new random seed.
    pub fn randomise_seed(&mut self) {
        self.seed = crate::cli::random_seed();
    }
}

/// Where a queued job is.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    Queued,
    /// Started; the last progress report once one arrived.
    Running(Option<StepProgress>),
}

/// A job in the queue.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: JobId,
    pub request: GenerationRequest,
    pub state: JobState,
    /// Exponentially smoothed UNet evaluations per second.
    pub smoothed_it_per_sec: f64,
}

impl Job {
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

/// One finished image.
pub struct GalleryImage {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
    pub prompt: String,
    pub seed: u64,
    pub path: Option<PathBuf>,
    texture: OnceLock<egui::TextureHandle>,
}

impl GalleryImage {
    /// The image as a texture (uploaded on first use).
    pub fn texture(&self, ctx: &egui::Context) -> egui::TextureHandle {
        self.texture
            .get_or_init(|| {
                ctx.load_texture(
                    format!("image-{}-{}", self.seed, self.rgb.len()),
                    egui::ColorImage::from_rgb([self.width, self.height], &self.rgb),
                    egui::TextureOptions::LINEAR,
                )
            })
            .clone()
    }
}

/// The model's state as the UI shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelStatus {
    NotLoaded,
    Loading {
        file: Option<(String, usize, usize)>,
    },
    Loaded(String),
    Failed(String),
}

impl std::fmt::Display for ModelStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotLoaded => f.write_str("no model loaded"),
            Self::Loading { file: None } => f.write_str("loading…"),
            Self::Loading {
                file: Some((name, done, total)),
            } => write!(
                f,
                "downloading {name}: {:.1}/{:.1} MB",
                *done as f64 / 1e6,
                *total as f64 / 1e6
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
    pub model_spec: String,
    pub model_status: ModelStatus,
    pub backend: Option<SelectedBackend>,
    pub jobs: Vec<Job>,
    pub gallery: Vec<GalleryImage>,
    pub selected: Option<usize>,
    /// The last error, shown once until dismissed.
    pub error: Option<String>,
    pub status: String,
    /// Where images are saved (`None`: not saved).
    pub output_dir: Option<PathBuf>,
}

impl AppState {
    /// State that will load `model` once the engine starts.
    pub fn new(model: String) -> Self {
        Self {
            engine: None,
            form: PromptForm::default(),
            settings: EngineSettings::default(),
            model_spec: model,
            model_status: ModelStatus::NotLoaded,
            backend: None,
            jobs: Vec::new(),
            gallery: Vec::new(),
            selected: None,
            error: None,
            status: "starting…".into(),
            output_dir: dirs_output(),
        }
    }

    fn engine(&mut self, ctx: &egui::Context) -> Option<&mut EngineHandle> {
        if self.engine.is_none() {
            let ctx = ctx.clone();
            match EngineHandle::spawn(self.settings, move || ctx.request_repaint()) {
                Ok(engine) => {
                    self.engine = Some(engine);
                    if !self.model_spec.is_empty() {
                        self.load_model();
                    }
                }
                Err(e) => self.error = Some(e.to_string()),
            }
        }
        self.engine.as_mut()
    }

    /// Applies waiting engine events within `budget`.
    pub fn poll_engine(&mut self, ctx: &egui::Context, budget: Duration) {
        let events = match self.engine(ctx) {
            Some(engine) => engine.drain(budget),
            None => return,
        };
        for event in events {
            self.apply_event(event);
        }
    }

    fn apply_event(&mut self, event: EngineEvent) {
        match event {
            EngineEvent::Backend(b) => {
                self.status = format!("backend: {b}");
                self.backend = Some(b);
            }
            EngineEvent::Download {
                file,
                done_bytes,
                total_bytes,
            } => {
                self.model_status = ModelStatus::Loading {
                    file: Some((file, done_bytes, total_bytes)),
                };
            }
            EngineEvent::ModelLoaded {
                spec, elapsed_secs, ..
            } => {
                self.status = format!("loaded {spec} in {elapsed_secs:.1}s");
                self.model_status = ModelStatus::Loaded(spec);
            }
            EngineEvent::SettingsApplied(s) => {
                self.status = format!("settings applied from the next job on ({:?})", s.attention);
            }
            EngineEvent::JobStarted { job } => {
                if let Some(j) = self.job_mut(job) {
                    j.state = JobState::Running(None);
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
                }
            }
            EngineEvent::Finished {
                job,
                images,
                scheduler,
                elapsed_secs,
            } => {
                if let Some(index) = self.jobs.iter().position(|j| j.id == job) {
                    let job = self.jobs.remove(index);
                    self.add_images(&job.request, &images, scheduler);
                    self.status = format!("#{} done in {elapsed_secs:.1}s", job.id);
                }
            }
            EngineEvent::Cancelled { job } => {
                self.jobs.retain(|j| j.id != job);
                self.status = format!("#{job} cancelled");
            }
            EngineEvent::Failed { job, error } => {
                match job {
                    Some(job) => self.jobs.retain(|j| j.id != job),
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

    fn job_mut(&mut self, id: JobId) -> Option<&mut Job> {
        self.jobs.iter_mut().find(|j| j.id == id)
    }

    fn add_images(
        &mut self,
        request: &GenerationRequest,
        images: &HostTensor,
        scheduler: &'static str,
    ) {
        let [batch, height, width] = [images.shape[0], images.shape[1], images.shape[2]];
        let per = height * width * 3;
        for (i, chunk) in images.values.chunks(per).take(batch).enumerate() {
            let rgb: Vec<u8> = chunk
                .iter()
                .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
                .collect();
            let path = self.save(request, scheduler, i, width, height, &rgb);
            self.gallery.push(GalleryImage {
                width,
                height,
                rgb,
                prompt: request.prompt.clone(),
                seed: request.seed,
                path,
                texture: OnceLock::new(),
            });
        }
        self.selected = Some(self.gallery.len().saturating_sub(1));
    }

    fn save(
        &mut self,
        request: &GenerationRequest,
        scheduler: &'static str,
        index: usize,
        width: usize,
        height: usize,
        rgb: &[u8],
    ) -> Option<PathBuf> {
        let dir = self.output_dir.clone()?;
        let params = GenerationParameters {
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            steps: request.steps,
            sampler: scheduler.to_string(),
            cfg_scale: request.guidance_scale,
            seed: request.seed,
            width,
            height,
            model: self.model_spec.clone(),
        };
        let path = dir.join(format!(
            "{:05}-{}-{index}.png",
            self.gallery.len(),
            request.seed
        ));
        let written = std::fs::create_dir_all(&dir)
            .map_err(anyhow::Error::from)
            .and_then(|()| write_png(&path, width, height, rgb, &params));
        match written {
            Ok(()) => Some(path),
            Err(e) => {
                self.error = Some(format!("could not save the image: {e:#}"));
                None
            }
        }
    }

    /// Whether a model is loaded (Generate is enabled).
    pub fn model_ready(&self) -> bool {
        matches!(self.model_status, ModelStatus::Loaded(_))
    }

    /// Loads `model_spec`.
    pub fn load_model(&mut self) {
        if let Some(engine) = &self.engine {
            engine.load_model(self.model_spec.clone());
            self.model_status = ModelStatus::Loading { file: None };
        }
    }

    /// Queues a generation from the form.
    pub fn queue_generation(&mut self) {
        if !self.form.seed_locked && !self.gallery.is_empty() {
            self.form.randomise_seed();
        }
        let f = &self.form;
        let request = GenerationRequest {
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
        if let Some(engine) = self.engine.as_mut() {
            let id = engine.generate(request.clone());
            self.jobs.push(Job {
                id,
                request,
                state: JobState::Queued,
                smoothed_it_per_sec: 0.0,
            });
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
        self.settings = settings;
        if let Some(engine) = &self.engine {
            engine.apply_settings(settings);
        }
    }

    /// The image shown in the centre.
    pub fn selected_image(&self) -> Option<&GalleryImage> {
        self.selected.and_then(|i| self.gallery.get(i))
    }
}

/// `~/Pictures/Brushfire` (or `./brushfire-output` without a home folder).
fn dirs_output() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    Some(match home {
        Some(h) => h.join("Pictures").join("Brushfire"),
        None => PathBuf::from("brushfire-output"),
    })
}
