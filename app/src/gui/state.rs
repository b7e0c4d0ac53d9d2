//! Everything the window shows, and how engine events change it. No egui layout here, so the
//! behaviour can be tested on its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use eframe::egui;

use engine::pipelines::PipelineKind;
use engine::tensor_io::HostTensor;
use engine::worker::{EngineEvent, EngineHandle, EngineSettings};

use super::bench::BenchState;
use super::cascade::{CascadeState, STAGES};
use super::control_input::{ControlEvent, ControlInputs};
pub use super::gallery::{Gallery, GalleryImage};
use super::image_input::ImageInputs;
pub use super::model::ModelStatus;
use super::model::{ModelEvent, ModelSlot};
pub use super::persisted::Persisted;
pub use super::prompt_form::PromptForm;
pub use super::queue::JobState;
use super::queue::{FinishedJob, Job, Queue, QueueEvent};
use super::setup::SetupEvent;
pub use super::setup::{EngineSetup, Setting};
use super::work::SavedPicture;
use crate::image_files::to_u8;
use crate::png_meta::GenerationParameters;

/// The app's state.
pub struct AppState {
    pub(super) engine: Option<EngineHandle>,
    pub form: PromptForm,
    /// How the engine runs: the settings chosen and confirmed, the backend, VAE tiling.
    pub setup: EngineSetup,
    /// The model field, the main model's state and the models used lately.
    pub model: ModelSlot,
    pub jobs: Queue,
    /// The finished images, the one selected, and their saving.
    pub gallery: Gallery,
    /// The last error, shown once until dismissed.
    pub error: Option<String>,
    pub status: String,
    /// Where images are saved (`None`: not saved).
    pub output_dir: Option<PathBuf>,
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
    /// Where the pictures being worked on (the inpainting and ControlNet sources with what was
    /// painted on them) are written with the settings; `None`: not written. The window sets it.
    pub work_dir: Option<PathBuf>,
    /// What was last written for each of [`WORK_NAMES`], with the picture's fingerprint.
    pub(super) saved_work: [Option<(u64, SavedPicture)>; 2],
}

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

impl AppState {
    /// State that will load `model` once the engine starts.
    pub fn new(model: String) -> Self {
        Self {
            engine: None,
            form: PromptForm::default(),
            setup: EngineSetup::new(EngineSettings::default()),
            model: ModelSlot::new(model),
            jobs: Queue::default(),
            gallery: Gallery::default(),
            error: None,
            status: "starting…".into(),
            output_dir: dirs_output(),
            view: View::default(),
            bench: BenchState::default(),
            inputs: ImageInputs::default(),
            control: ControlInputs::default(),
            cascade: CascadeState::new(),
            work_dir: None,
            saved_work: [None, None],
        }
    }

    /// Fusion and precision as the next start will have them.
    pub fn next_start_execution(&self) -> engine::backend::ExecutionOptions {
        self.setup.next_start_execution()
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

    fn engine(&mut self, ctx: &egui::Context) -> Option<&mut EngineHandle> {
        if self.engine.is_none() {
            let ctx = ctx.clone();
            match EngineHandle::spawn(self.setup.settings, move || ctx.request_repaint()) {
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
        if !self.model.spec.is_empty() {
            self.load_model();
        }
    }

    /// Whether the engine runs on a GPU backend (CUDA or wgpu).
    pub fn on_gpu(&self) -> bool {
        self.setup.on_gpu()
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

    /// The router: each slice's reducer takes its own events (the benchmark, the ControlNet
    /// page, the queue, the model) and says what the rest of the app must do; what no slice
    /// takes (the backend, the settings) is handled here.
    fn apply_event(&mut self, event: EngineEvent) {
        let Some(event) = self.bench.apply_event(event) else {
            return;
        };
        let event = match self.control.apply_event(event) {
            ControlEvent::NotMine(event) => *event,
            ControlEvent::Quiet => return,
            ControlEvent::Status(status) => return self.status = status,
            ControlEvent::Error(error) => return self.error = Some(error),
        };
        let event = match self.jobs.apply_event(event) {
            QueueEvent::NotMine(event) => *event,
            QueueEvent::Quiet => return,
            QueueEvent::Finished(done) => return self.finished(*done),
            QueueEvent::Cancelled(job) => {
                self.cascade.stopped(job);
                return self.status = format!("#{job} cancelled");
            }
            QueueEvent::Failed { job, error } => {
                self.cascade.stopped(job);
                return self.error = Some(error);
            }
        };
        // A job's own model (an IF stage, the x4 upscaler) loads beside the main one: its
        // download and load are told in the status line, and leave the model slot alone.
        match &event {
            EngineEvent::Download {
                file,
                done_bytes,
                total_bytes,
            } if self.side_model_pending() => {
                let percent = 100.0 * *done_bytes as f64 / (*total_bytes).max(1) as f64;
                return self.status = format!("downloading {file}: {percent:.0}%");
            }
            EngineEvent::ModelLoaded {
                spec, elapsed_secs, ..
            } if self.jobs.runs_on(spec) => {
                return self.status = format!("loaded {spec} in {elapsed_secs:.1}s");
            }
            _ => {}
        }
        let event = match self.model.apply_event(event) {
            ModelEvent::NotMine(event) => *event,
            ModelEvent::Quiet => return,
            ModelEvent::Loaded { spec, elapsed_secs } => {
                self.status = format!("loaded {spec} in {elapsed_secs:.1}s");
                if let Some(controlnet) = self.control.pending_load.take() {
                    self.control.controlnet_spec = controlnet;
                    self.load_controlnet();
                }
                return;
            }
            ModelEvent::Failed(error) => return self.error = Some(error),
        };
        match self.setup.apply_event(event) {
            SetupEvent::Status(status) => self.status = status,
            // News of a job or a benchmark this window no longer tracks.
            SetupEvent::NotMine(_) => {}
        }
    }

    /// A job finished: its images go to the gallery, an IF stage's result to the IF page
    /// (which may start the next stage).
    fn finished(&mut self, done: FinishedJob) {
        let FinishedJob {
            job,
            images,
            raw,
            prompt_embeds,
            scheduler,
            elapsed_secs,
            notes,
        } = done;
        self.add_images(&job, &images, scheduler);
        if let Some(stage) = job.cascade_stage {
            self.cascade.finished(
                stage,
                images,
                (raw, prompt_embeds),
                job.loop_rate(elapsed_secs),
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

    /// Whether the next job waits for its own model (downloads are that model's).
    fn side_model_pending(&self) -> bool {
        self.model_ready() && self.jobs.next_waits_for_its_model()
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
            model: model_label(job.model.as_deref().unwrap_or(&self.model.spec)),
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
    use engine::backend::Precision;
    use engine::pipelines::GenerationRequest;

    #[test]
    fn a_precision_the_gpu_cannot_switch_to_waits_for_the_next_start() {
        let mut state = AppState::new("tiny-sd".into());
        let running = EngineSettings::default();
        state.setup.confirmed = Some(running);
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
        assert_eq!(state.setup.settings, running);
        assert_eq!(state.setup.restart_for, Some(wanted));
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
            AppState::restore(&persisted, None).setup.settings.execution,
            wanted.execution,
            "the next start runs with it"
        );
        assert_eq!(state.restart_blocker(), None);
        state.jobs.push(Job::queued(
            1,
            GenerationRequest::default(),
            None,
            None,
            None,
        ));
        assert!(
            state.restart_blocker().is_some(),
            "a queued job blocks a restart"
        );
        state.apply_event(EngineEvent::Cancelled { job: 1 });
        // Choosing what runs now again drops the pending change.
        state.apply_settings(running);
        assert_eq!(state.setup.restart_for, None);
        assert_eq!(
            state.to_persisted().engine.precision,
            running.execution.precision.to_string()
        );
    }
}
