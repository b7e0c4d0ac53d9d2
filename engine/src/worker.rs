//! The engine on its own thread (docs/architecture.md §2): the UI sends [`EngineCommand`]s and drains
//! [`EngineEvent`]s each frame; a waker (the UI's `request_repaint`) is called after every
//! event. Jobs run one at a time in the order they were queued; each has a cancel token the UI
//! can set at any moment, so a queued job can be dropped and a running one stops within a step.
//! A panic inside a job (Burn panics on bad shapes) becomes a `Failed` event, never a dead worker.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;

use crate::backend::{
    BackendRequest, BackendTask, ExecutionOptions, SelectedBackend, dispatch_with, memory_budget,
    select_backend,
};
use crate::bench::{
    BenchCell, BenchModels, BenchObserver, BenchPlan, BenchReport, CellSpec, run_bench,
};
use crate::error::{EngineError, Result};
use crate::loading::{DownloadProgress, resolve_controlnet, resolve_model};
use crate::models::{AttnProcessor, MemoryFormat};
use crate::pipelines::deepfloyd_if::{IFPipeline, is_if_folder};
use crate::pipelines::stable_diffusion::{GenerationOutput, LoadOptions, StableDiffusionPipeline};
use crate::pipelines::{CancelToken, GenerationRequest, PromptEmbeds, StepObserver, StepProgress};
use crate::tensor_io::HostTensor;

/// Identifies a queued generation.
pub type JobId = u64;

/// Settings that change how the engine runs (not what it computes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineSettings {
    pub backend: BackendRequest,
    pub attention: AttnProcessor,
    /// The UNet's memory format (the channels-last switch); applied to the loaded model.
    pub memory_format: MemoryFormat,
    /// Fusion and precision: each combination is its own backend type, so changing them
    /// rebuilds the loaded model.
    pub execution: ExecutionOptions,
    /// Decode a live preview from the latents after every step.
    pub preview: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            backend: BackendRequest::Auto,
            attention: AttnProcessor::default(),
            memory_format: MemoryFormat::default(),
            execution: ExecutionOptions::default(),
            preview: true,
        }
    }
}

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
            settings,
            backend: None,
            model: None,
            side_models: Vec::new(),
            reload_spec: None,
            controlnet: None,
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

/// A loaded pipeline on whichever backend was selected.
trait PipelineRunner: Send {
    fn generate(
        &self,
        request: &GenerationRequest,
        cancel: &CancelToken,
        observer: &mut dyn StepObserver,
    ) -> Result<GenerationOutput>;
    fn set_attn_processor(&mut self, processor: AttnProcessor);
    fn set_memory_format(&mut self, format: MemoryFormat);
    fn load_controlnet(&mut self, path: &Path) -> Result<()>;
}

impl<B: Backend> PipelineRunner for IFPipeline<B> {
    fn generate(
        &self,
        request: &GenerationRequest,
        cancel: &CancelToken,
        observer: &mut dyn StepObserver,
    ) -> Result<GenerationOutput> {
        IFPipeline::generate(self, request, None, cancel, observer)
    }

    fn set_attn_processor(&mut self, processor: AttnProcessor) {
        IFPipeline::set_attn_processor(self, processor);
    }

    fn set_memory_format(&mut self, format: MemoryFormat) {
        IFPipeline::set_memory_format(self, format);
    }

    fn load_controlnet(&mut self, _path: &Path) -> Result<()> {
        Err(EngineError::Unsupported(
            "a ControlNet on a DeepFloyd IF model".into(),
        ))
    }
}

impl<B: Backend> PipelineRunner for StableDiffusionPipeline<B> {
    fn generate(
        &self,
        request: &GenerationRequest,
        cancel: &CancelToken,
        observer: &mut dyn StepObserver,
    ) -> Result<GenerationOutput> {
        StableDiffusionPipeline::generate(self, request, None, cancel, observer)
    }

    fn set_attn_processor(&mut self, processor: AttnProcessor) {
        StableDiffusionPipeline::set_attn_processor(self, processor);
    }

    fn set_memory_format(&mut self, format: MemoryFormat) {
        StableDiffusionPipeline::set_memory_format(self, format);
    }

    fn load_controlnet(&mut self, path: &Path) -> Result<()> {
        StableDiffusionPipeline::load_controlnet(self, path)
    }
}

struct LoadTask<'a> {
    dir: &'a Path,
    options: LoadOptions,
    attention: AttnProcessor,
    memory_format: MemoryFormat,
}

impl BackendTask for LoadTask<'_> {
    type Output = Result<Box<dyn PipelineRunner>>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        if is_if_folder(self.dir) {
            let mut pipe = IFPipeline::<B>::load(self.dir, &self.options, &device)?;
            pipe.set_attn_processor(self.attention);
            pipe.set_memory_format(self.memory_format);
            return Ok(Box::new(pipe));
        }
        let mut pipe = StableDiffusionPipeline::<B>::load_path(self.dir, &self.options, &device)?;
        pipe.set_attn_processor(self.attention);
        pipe.set_memory_format(self.memory_format);
        Ok(Box::new(pipe))
    }
}

struct LoadedModel {
    /// What the user asked for, to reload it on another backend.
    spec: String,
    runner: Box<dyn PipelineRunner>,
}

struct Worker {
    events: Sender<EngineEvent>,
    waker: Box<dyn Fn() + Send>,
    cancels: Arc<Mutex<HashMap<JobId, CancelToken>>>,
    settings: EngineSettings,
    backend: Option<SelectedBackend>,
    model: Option<LoadedModel>,
    /// Models jobs name beside the main one (IF stages, the x4 upscaler), by spec.
    side_models: Vec<LoadedModel>,
    /// The model to load back if a settings change fails after unloading it.
    reload_spec: Option<String>,
    /// The ControlNet the user picked, attached again whenever the model is (re)loaded.
    controlnet: Option<String>,
}

/// Forwards download progress as events.
struct DownloadEvents<'a> {
    worker: &'a Worker,
    file: String,
    done: usize,
    total: usize,
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

impl DownloadEvents<'_> {
    fn emit(&self) {
        self.worker.emit(EngineEvent::Download {
            file: self.file.clone(),
            done_bytes: self.done,
            total_bytes: self.total,
        });
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
                        attached: self.controlnet.clone(),
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

    fn selected_backend(&mut self) -> Result<SelectedBackend> {
        if let Some(b) = &self.backend {
            return Ok(b.clone());
        }
        let selected = select_backend(self.settings.backend)?;
        self.emit(EngineEvent::Backend(selected.clone()));
        self.backend = Some(selected.clone());
        Ok(selected)
    }

    /// Resolves (downloading if needed) and loads a model on the current backend.
    fn load_runner(&mut self, spec: &str) -> Result<(PathBuf, Box<dyn PipelineRunner>)> {
        let mut progress = DownloadEvents {
            worker: self,
            file: String::new(),
            done: 0,
            total: 0,
        };
        let variant = self.settings.execution.precision.weights_variant();
        let dir = resolve_model(spec, variant, &mut progress)?;
        let backend = self.selected_backend()?;
        self.settings.execution.check(&backend)?;
        let runner = dispatch_with(
            &backend,
            self.settings.execution,
            LoadTask {
                dir: &dir,
                options: LoadOptions {
                    variant: variant.map(String::from),
                    memory_budget: memory_budget(&backend),
                },
                attention: self.settings.attention,
                memory_format: self.settings.memory_format,
            },
        )?;
        Ok((dir, runner))
    }

    fn load(&mut self, spec: String) -> Result<()> {
        let start = Instant::now();
        let (dir, runner) = self.load_runner(&spec)?;
        self.model = Some(LoadedModel {
            spec: spec.clone(),
            runner,
        });
        self.emit(EngineEvent::ModelLoaded {
            spec,
            dir,
            elapsed_secs: start.elapsed().as_secs_f64(),
        });
        if let Some(controlnet) = self.controlnet.take()
            && let Err(e) = self.load_controlnet(controlnet.clone())
        {
            // The model stands; a ControlNet that does not fit it is dropped, saying why.
            self.emit(EngineEvent::ControlNetFailed {
                spec: controlnet,
                error: format!("unloaded with the new model: {e}"),
                attached: None,
            });
        }
        Ok(())
    }

    fn load_controlnet(&mut self, spec: String) -> Result<()> {
        let start = Instant::now();
        let variant = self.settings.execution.precision.weights_variant();
        let mut progress = DownloadEvents {
            worker: self,
            file: String::new(),
            done: 0,
            total: 0,
        };
        let path = resolve_controlnet(&spec, variant, &mut progress)?;
        let model = self.model.as_mut().ok_or_else(|| {
            EngineError::invalid("controlnet", "load a model before its ControlNet")
        })?;
        model.runner.load_controlnet(&path)?;
        self.controlnet = Some(spec.clone());
        self.emit(EngineEvent::ControlNetLoaded {
            spec,
            path,
            elapsed_secs: start.elapsed().as_secs_f64(),
        });
        Ok(())
    }

    /// The side model `spec`, loaded on first use (with a `ModelLoaded` event).
    fn side_model(&mut self, spec: &str) -> Result<&LoadedModel> {
        if let Some(i) = self.side_models.iter().position(|m| m.spec == spec) {
            return Ok(&self.side_models[i]);
        }
        let start = Instant::now();
        let (dir, runner) = self.load_runner(spec)?;
        self.side_models.push(LoadedModel {
            spec: spec.to_string(),
            runner,
        });
        self.emit(EngineEvent::ModelLoaded {
            spec: spec.to_string(),
            dir,
            elapsed_secs: start.elapsed().as_secs_f64(),
        });
        self.side_models
            .last()
            .ok_or_else(|| EngineError::invalid("model", "the model did not stay loaded"))
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
            self.side_model(spec)?;
        }
        let model = match &model {
            Some(spec) => self.side_models.iter().find(|m| &m.spec == spec),
            None => self.model.as_ref(),
        }
        .ok_or_else(|| EngineError::invalid("model", "no model is loaded"))?;
        self.emit(EngineEvent::JobStarted { job });
        let start = Instant::now();
        let mut observer = JobObserver {
            job,
            events: &self.events,
            waker: &self.waker,
            preview: self.settings.preview,
        };
        let out = model.runner.generate(request, &cancel, &mut observer)?;
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
        let backend = self.selected_backend()?;
        let mut observer = BenchEvents {
            job,
            events: &self.events,
            waker: &self.waker,
        };
        let report = run_bench(&backend, plan, models, &cancel, &mut observer)?;
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
        let previous = self.settings;
        let backend_changed = settings.backend != previous.backend;
        let rebuild = backend_changed || settings.execution != previous.execution;
        self.settings = settings;
        if rebuild {
            let previous_backend = self.backend.clone();
            if backend_changed {
                self.backend = None;
            }
            if let Err(e) = self.rebuild() {
                // Back to what worked, so the UI and the engine agree on the settings.
                self.settings = previous;
                self.backend = previous_backend;
                if let Some(b) = &self.backend {
                    self.emit(EngineEvent::Backend(b.clone()));
                }
                if let Some(spec) = self.reload_spec.take() {
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
        } else {
            for model in self.model.iter_mut().chain(self.side_models.iter_mut()) {
                model.runner.set_attn_processor(settings.attention);
                model.runner.set_memory_format(settings.memory_format);
            }
        }
        self.emit(EngineEvent::SettingsApplied(settings));
        Ok(())
    }

    /// Rebuilds the loaded model (if any) for the current backend and execution options,
    /// freeing the old one first (two copies may not fit the device).
    fn rebuild(&mut self) -> Result<()> {
        let backend = self.selected_backend()?;
        self.settings.execution.check(&backend)?;
        // Side models load again on their next job, on the new backend.
        self.side_models.clear();
        if let Some(model) = self.model.take() {
            self.reload_spec = Some(model.spec.clone());
            drop(model);
            let spec = self.reload_spec.clone().unwrap_or_default();
            self.load(spec)?;
            self.reload_spec = None;
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
