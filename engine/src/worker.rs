//! The engine on its own thread (docs/architecture.md §2): the UI sends [`EngineCommand`]s and drains
//! [`EngineEvent`]s each frame; a waker (the UI's `request_repaint`) is called after every
//! event. Jobs run one at a time in the order they were queued; each has a cancel token the UI
//! can set at any moment, so a queued job can be dropped and a running one stops within a step.
//! A panic inside a job (Burn panics on bad shapes) becomes a `Failed` event, never a dead worker.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::SelectedBackend;
use crate::bench::{BenchCell, BenchModels, BenchObserver, BenchPlan, BenchReport, CellSpec};
use crate::error::{EngineError, Result};
use crate::loading::DownloadProgress;
use crate::pipelines::{CancelToken, GenerationRequest, PromptEmbeds, StepObserver, StepProgress};
pub use crate::session::EngineSettings;
use crate::session::Session;
use crate::tensor_io::HostTensor;

/// Identifies a queued generation.
pub type JobId = u64;

/// What the UI asks of the engine.
#[derive(Debug, Clone)]
pub enum EngineCommand {
    /// Load a diffusers folder or hub id (downloading it if needed).
    LoadModel { spec: String },
    /// Load a ControlNet (folder, hub id or single-file checkpoint) onto the loaded model for
    /// the controlnet pipeline; it stays attached across model reloads and setting changes.
    LoadControlNet { spec: String },
    /// Run a generation (queued behind earlier jobs) on the loaded model, or with `model` on
    /// that one (an IF stage or the x4 upscaler, loaded beside the main model on first use and
    /// kept).
    Generate {
        job: JobId,
        request: Box<GenerationRequest>,
        model: Option<String>,
    },
    /// Change settings; a backend change reloads the model on the new backend.
    ApplySettings(EngineSettings),
    /// Run the benchmark (queued like a job, so it never shares the device with one).
    Bench {
        job: JobId,
        plan: Box<BenchPlan>,
        models: Box<BenchModels>,
    },
    /// Stop the worker.
    Shutdown,
}

/// What the engine reports back.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// The backend in use (after start and after every backend change).
    Backend(SelectedBackend),
    /// Bytes of a model file downloaded so far.
    Download {
        file: String,
        done_bytes: usize,
        total_bytes: usize,
    },
    /// A model is ready.
    ModelLoaded {
        spec: String,
        dir: PathBuf,
        elapsed_secs: f64,
    },
    /// A ControlNet is attached to the loaded model.
    ControlNetLoaded {
        spec: String,
        path: PathBuf,
        elapsed_secs: f64,
    },
    /// A ControlNet could not be loaded (or no longer fits a newly loaded model). `attached`
    /// is the one still attached (the previous one, if any).
    ControlNetFailed {
        spec: String,
        error: String,
        attached: Option<String>,
    },
    /// New settings are in effect.
    SettingsApplied(EngineSettings),
    /// A job left the queue and started.
    JobStarted { job: JobId },
    /// One denoising step of a job finished.
    Progress { job: JobId, progress: StepProgress },
    /// A live preview of a job's first image after `step`: `[h, w, 3]` in [0, 1], latent size.
    Preview {
        job: JobId,
        step: usize,
        image: HostTensor,
    },
    /// A job's images: `[batch, height, width, 3]` in [0, 1].
    Finished {
        job: JobId,
        images: HostTensor,
        /// IF's images as its next stage takes them, `[batch, 3, h, w]` in [-1, 1].
        raw: Option<HostTensor>,
        /// IF's T5 embeddings of the prompt, for the next stage.
        prompt_embeds: Option<PromptEmbeds>,
        scheduler: &'static str,
        elapsed_secs: f64,
        /// What the user should know about the run (e.g. steps redone in f32).
        notes: Vec<String>,
    },
    /// A job was cancelled (before or while running).
    Cancelled { job: JobId },
    /// A benchmark cell starts (`index` of `total`).
    BenchCellStarted {
        job: JobId,
        index: usize,
        total: usize,
        spec: CellSpec,
    },
    /// A denoising step of run `run` (0-based) of the current benchmark cell.
    BenchStep {
        job: JobId,
        run: usize,
        progress: StepProgress,
    },
    /// A benchmark cell was measured (or failed, with the reason).
    BenchCellFinished {
        job: JobId,
        index: usize,
        cell: BenchCell,
    },
    /// The whole benchmark finished.
    BenchFinished { job: JobId, report: BenchReport },
    /// Something failed; `job` is `None` for model loading and settings.
    Failed { job: Option<JobId>, error: String },
    /// `wanted` could not be applied in this process (the device's float type is fixed at its
    /// first tensor); it takes effect when the app starts again. The engine keeps running with
    /// the settings of the `SettingsApplied` sent just before.
    RestartNeeded {
        wanted: EngineSettings,
        reason: String,
    },
}

/// The UI's side of the worker.
pub struct EngineHandle {
    commands: Sender<EngineCommand>,
    events: Receiver<EngineEvent>,
    cancels: Arc<Mutex<HashMap<JobId, CancelToken>>>,
    next_job: JobId,
    thread: Option<JoinHandle<()>>,
}

impl EngineHandle {
    /// Starts the worker thread. `waker` is called after every event (e.g. `ctx.request_repaint`).
    pub fn spawn(settings: EngineSettings, waker: impl Fn() + Send + 'static) -> Result<Self> {
        let (commands, command_rx) = channel();
        let (event_tx, events) = channel();
        let cancels: Arc<Mutex<HashMap<JobId, CancelToken>>> = Arc::default();
        let worker = Worker {
            events: event_tx,
            waker: Box::new(waker),
            cancels: cancels.clone(),
            session: Session::new(settings),
        };
        let thread = std::thread::Builder::new()
            .name("brushfire-engine".into())
            .spawn(move || worker.run(command_rx))
            .map_err(|e| EngineError::Backend(format!("could not start the engine thread: {e}")))?;
        Ok(Self {
            commands,
            events,
            cancels,
            next_job: 1,
            thread: Some(thread),
        })
    }

    fn send(&self, command: EngineCommand) {
        // The worker only stops on Shutdown (sent by Drop), so sending cannot fail before that.
        let _ = self.commands.send(command);
    }

    /// Loads a model (replacing the current one once loaded).
    pub fn load_model(&self, spec: impl Into<String>) {
        self.send(EngineCommand::LoadModel { spec: spec.into() });
    }

    /// Queues a generation and returns its id.
    /// Loads a ControlNet onto the model (after any model load queued before it).
    pub fn load_controlnet(&self, spec: impl Into<String>) {
        self.send(EngineCommand::LoadControlNet { spec: spec.into() });
    }

    pub fn generate(&mut self, request: GenerationRequest) -> JobId {
        self.generate_on(request, None)
    }

    /// Queues a generation on `model` (a folder or hub id: an IF stage, the x4 upscaler),
    /// loaded beside the main model on first use; `None` is the main model.
    pub fn generate_on(&mut self, request: GenerationRequest, model: Option<String>) -> JobId {
        let job = self.next_job;
        self.next_job += 1;
        self.lock_cancels().insert(job, CancelToken::new());
        self.send(EngineCommand::Generate {
            job,
            request: Box::new(request),
            model,
        });
        job
    }

    /// Queues a benchmark run and returns its id (cancel it like a job).
    pub fn bench(&mut self, plan: BenchPlan, models: BenchModels) -> JobId {
        let job = self.next_job;
        self.next_job += 1;
        self.lock_cancels().insert(job, CancelToken::new());
        self.send(EngineCommand::Bench {
            job,
            plan: Box::new(plan),
            models: Box::new(models),
        });
        job
    }

    /// Cancels a queued or running job (no effect on finished ones).
    pub fn cancel(&self, job: JobId) {
        if let Some(token) = self.lock_cancels().get(&job) {
            token.cancel();
        }
    }

    /// Applies new settings from the next job on.
    pub fn apply_settings(&self, settings: EngineSettings) {
        self.send(EngineCommand::ApplySettings(settings));
    }

    /// The next event, if one is waiting.
    pub fn try_recv(&self) -> Option<EngineEvent> {
        self.events.try_recv().ok()
    }

    /// Waits up to `timeout` for the next event.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<EngineEvent> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Every waiting event, stopping early when `budget` is spent (the UI's frame budget).
    pub fn drain(&self, budget: Duration) -> Vec<EngineEvent> {
        let start = Instant::now();
        let mut out = Vec::new();
        while start.elapsed() < budget {
            match self.try_recv() {
                Some(event) => out.push(event),
                None => break,
            }
        }
        out
    }

    fn lock_cancels(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, CancelToken>> {
        self.cancels.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        for token in self.lock_cancels().values() {
            token.cancel();
        }
        self.send(EngineCommand::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Worker {
    events: Sender<EngineEvent>,
    waker: Box<dyn Fn() + Send>,
    cancels: Arc<Mutex<HashMap<JobId, CancelToken>>>,
    session: Session,
}

/// Forwards download progress as events.
struct DownloadEvents<'a> {
    events: &'a Sender<EngineEvent>,
    waker: &'a (dyn Fn() + Send),
    file: String,
    done: usize,
    total: usize,
}

impl<'a> DownloadEvents<'a> {
    fn new(events: &'a Sender<EngineEvent>, waker: &'a (dyn Fn() + Send)) -> Self {
        Self {
            events,
            waker,
            file: String::new(),
            done: 0,
            total: 0,
        }
    }

    fn emit(&self) {
        let _ = self.events.send(EngineEvent::Download {
            file: self.file.clone(),
            done_bytes: self.done,
            total_bytes: self.total,
        });
        (self.waker)();
    }
}

impl DownloadProgress for DownloadEvents<'_> {
    fn start(&mut self, file: &str, total_bytes: usize) {
        self.file = file.to_string();
        self.done = 0;
        self.total = total_bytes;
        self.emit();
    }
    fn advance(&mut self, bytes: usize) {
        self.done += bytes;
        self.emit();
    }
    fn finish(&mut self) {
        self.done = self.total;
        self.emit();
    }
}

impl Worker {
    fn emit(&self, event: EngineEvent) {
        let _ = self.events.send(event);
        (self.waker)();
    }

    fn run(mut self, commands: Receiver<EngineCommand>) {
        // Say which backend is in use before any model loads, so the UI can show it (and grey
        // out what it cannot do) from the start.
        if let Err(e) = self.selected_backend() {
            self.emit(EngineEvent::Failed {
                job: None,
                error: e.to_string(),
            });
        }
        while let Ok(command) = commands.recv() {
            if matches!(command, EngineCommand::Shutdown) {
                break;
            }
            let job = match &command {
                EngineCommand::Generate { job, .. } | EngineCommand::Bench { job, .. } => {
                    Some(*job)
                }
                _ => None,
            };
            let outcome = catch_unwind(AssertUnwindSafe(|| self.handle(command)));
            let error = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(EngineError::Cancelled)) => {
                    if let Some(job) = job {
                        self.emit(EngineEvent::Cancelled { job });
                    }
                    None
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(panic) => Some(format!(
                    "internal error: {}",
                    crate::error::panic_message(panic.as_ref())
                        .unwrap_or_else(|| "a panic without a message".into())
                )),
            };
            if let Some(error) = error {
                self.emit(EngineEvent::Failed { job, error });
            }
            if let Some(job) = job {
                self.cancels
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&job);
            }
        }
    }

    fn handle(&mut self, command: EngineCommand) -> Result<()> {
        match command {
            EngineCommand::LoadModel { spec } => self.load(spec),
            EngineCommand::LoadControlNet { spec } => {
                if let Err(e) = self.load_controlnet(spec.clone()) {
                    self.emit(EngineEvent::ControlNetFailed {
                        spec,
                        error: e.to_string(),
                        attached: self.session.controlnet().map(String::from),
                    });
                }
                Ok(())
            }
            EngineCommand::Generate {
                job,
                request,
                model,
            } => self.generate(job, &request, model),
            EngineCommand::ApplySettings(settings) => self.apply(settings),
            EngineCommand::Bench { job, plan, models } => self.bench(job, &plan, &models),
            EngineCommand::Shutdown => Ok(()),
        }
    }

    /// The backend in use, announced with a `Backend` event when it is chosen now.
    fn selected_backend(&mut self) -> Result<SelectedBackend> {
        if let Some(b) = self.session.backend() {
            return Ok(b.clone());
        }
        let selected = self.session.select_backend()?;
        self.emit(EngineEvent::Backend(selected.clone()));
        Ok(selected)
    }

    fn load(&mut self, spec: String) -> Result<()> {
        let start = Instant::now();
        self.selected_backend()?;
        let mut progress = DownloadEvents::new(&self.events, self.waker.as_ref());
        let loaded = self.session.load(&spec, &mut progress)?;
        self.emit(EngineEvent::ModelLoaded {
            spec,
            dir: loaded.dir,
            elapsed_secs: start.elapsed().as_secs_f64(),
        });
        if let Some(controlnet) = loaded.controlnet {
            self.emit(match controlnet.outcome {
                Ok(elapsed_secs) => EngineEvent::ControlNetLoaded {
                    spec: controlnet.spec,
                    path: controlnet.path,
                    elapsed_secs,
                },
                // The model stands; a ControlNet that does not fit it is dropped, saying why.
                Err(e) => EngineEvent::ControlNetFailed {
                    spec: controlnet.spec,
                    error: format!("unloaded with the new model: {e}"),
                    attached: None,
                },
            });
        }
        Ok(())
    }

    fn load_controlnet(&mut self, spec: String) -> Result<()> {
        let start = Instant::now();
        let mut progress = DownloadEvents::new(&self.events, self.waker.as_ref());
        let path = self.session.load_controlnet(&spec, &mut progress)?;
        self.emit(EngineEvent::ControlNetLoaded {
            spec,
            path,
            elapsed_secs: start.elapsed().as_secs_f64(),
        });
        Ok(())
    }

    fn generate(
        &mut self,
        job: JobId,
        request: &GenerationRequest,
        model: Option<String>,
    ) -> Result<()> {
        let cancel = self.cancel_token(job);
        cancel.check()?;
        if let Some(spec) = &model {
            let start = Instant::now();
            self.selected_backend()?;
            let mut progress = DownloadEvents::new(&self.events, self.waker.as_ref());
            if let Some(dir) = self.session.load_side_model(spec, &mut progress)? {
                self.emit(EngineEvent::ModelLoaded {
                    spec: spec.clone(),
                    dir,
                    elapsed_secs: start.elapsed().as_secs_f64(),
                });
            }
        } else if self.session.model_spec().is_none() {
            return Err(EngineError::invalid("model", "no model is loaded"));
        }
        self.emit(EngineEvent::JobStarted { job });
        let start = Instant::now();
        let mut observer = JobObserver {
            job,
            events: &self.events,
            waker: self.waker.as_ref(),
            preview: self.session.settings().preview,
        };
        let out = self
            .session
            .generate(model.as_deref(), request, None, &cancel, &mut observer)?;
        self.emit(EngineEvent::Finished {
            job,
            images: out.images,
            raw: out.raw,
            prompt_embeds: out.prompt_embeds,
            scheduler: out.scheduler,
            elapsed_secs: start.elapsed().as_secs_f64(),
            notes: out.notes,
        });
        Ok(())
    }

    /// Runs the benchmark on the backend in use (its own random-weight models; the loaded
    /// model stays loaded).
    fn bench(&mut self, job: JobId, plan: &BenchPlan, models: &BenchModels) -> Result<()> {
        let cancel = self.cancel_token(job);
        cancel.check()?;
        self.selected_backend()?;
        let mut observer = BenchEvents {
            job,
            events: &self.events,
            waker: self.waker.as_ref(),
        };
        let report = self.session.bench(plan, models, &cancel, &mut observer)?;
        self.emit(EngineEvent::BenchFinished { job, report });
        Ok(())
    }

    fn cancel_token(&self, job: JobId) -> CancelToken {
        self.cancels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&job)
            .cloned()
            .unwrap_or_default()
    }

    fn apply(&mut self, settings: EngineSettings) -> Result<()> {
        let previous = self.session.settings();
        let previous_backend = self.session.backend().cloned();
        if self.session.set_settings(settings) {
            let mut unloaded = None;
            if let Err(e) = self.rebuild(&mut unloaded) {
                // Back to what worked, so the UI and the engine agree on the settings.
                self.session.restore(previous, previous_backend);
                if let Some(b) = self.session.backend() {
                    self.emit(EngineEvent::Backend(b.clone()));
                }
                if let Some(spec) = unloaded {
                    self.load(spec)?;
                }
                self.emit(EngineEvent::SettingsApplied(previous));
                if matches!(e, EngineError::PrecisionLocked { .. }) {
                    self.emit(EngineEvent::RestartNeeded {
                        wanted: settings,
                        reason: e.to_string(),
                    });
                    return Ok(());
                }
                return Err(e);
            }
        }
        self.emit(EngineEvent::SettingsApplied(settings));
        Ok(())
    }

    /// Loads the model again for the current backend and execution options, once they are
    /// known to work, freeing the old one first (two copies may not fit the device). The
    /// model's spec is in `unloaded` while it is not loaded. Side models load again on their
    /// next job.
    fn rebuild(&mut self, unloaded: &mut Option<String>) -> Result<()> {
        self.selected_backend()?;
        self.session.check_settings()?;
        *unloaded = self.session.unload();
        if let Some(spec) = unloaded.clone() {
            self.load(spec)?;
            *unloaded = None;
        }
        Ok(())
    }
}

/// Forwards a benchmark's progress as events.
struct BenchEvents<'a> {
    job: JobId,
    events: &'a Sender<EngineEvent>,
    waker: &'a (dyn Fn() + Send),
}

impl BenchEvents<'_> {
    fn emit(&self, event: EngineEvent) {
        let _ = self.events.send(event);
        (self.waker)();
    }
}

impl BenchObserver for BenchEvents<'_> {
    fn cell_started(&mut self, index: usize, total: usize, spec: &CellSpec) {
        self.emit(EngineEvent::BenchCellStarted {
            job: self.job,
            index,
            total,
            spec: *spec,
        });
    }

    fn step(&mut self, run: usize, progress: &StepProgress) {
        self.emit(EngineEvent::BenchStep {
            job: self.job,
            run,
            progress: *progress,
        });
    }

    fn cell_finished(&mut self, index: usize, cell: &BenchCell) {
        self.emit(EngineEvent::BenchCellFinished {
            job: self.job,
            index,
            cell: cell.clone(),
        });
    }
}

/// Forwards a job's steps and previews as events.
struct JobObserver<'a> {
    job: JobId,
    events: &'a Sender<EngineEvent>,
    waker: &'a (dyn Fn() + Send),
    preview: bool,
}

impl StepObserver for JobObserver<'_> {
    fn on_step(&mut self, progress: &StepProgress) {
        let _ = self.events.send(EngineEvent::Progress {
            job: self.job,
            progress: *progress,
        });
        (self.waker)();
    }

    fn wants_preview(&self, _step: usize) -> bool {
        self.preview
    }

    fn on_preview(&mut self, step: usize, image: HostTensor) {
        let _ = self.events.send(EngineEvent::Preview {
            job: self.job,
            step,
            image,
        });
        (self.waker)();
    }
}
