//! What crosses slices. The UI (and the tests) say what should happen as a [`Command`]; the
//! window applies the frame's commands once, after drawing (`BrushfireApp::ui`), through
//! [`AppState::apply`], the one place where an action reaches into more than one slice (a
//! generation reads the prompt panel and a page and writes the queue; "Send to" reads the
//! gallery and writes a page). A page's own edits (its sliders, its canvas) stay inside it.

use std::path::{Path, PathBuf};

use engine::loading::{ModelAvailability, model_availability};
use engine::pipelines::{
    CommonRequest, GenerationRequest, PipelineKind, Task, UpscaleInput, UpscaleSource,
};
use engine::tensor_io::HostTensor;
use engine::worker::{EngineSettings, JobId};

use super::control_input::{MapSource, Origin};
use super::image_input::PageTask;
use super::model::ModelStatus;
use super::queue::{Job, Preview};
use super::state::{AppState, GalleryImage, Setting, View, model_label};
use crate::png_meta::{ControlNetParameters, ParsedParameters, read_parameters_text};

/// One thing the user asked for.
#[must_use = "a command does nothing until the app applies it"]
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Generate with the page shown (the IF page runs its stages one after another).
    Generate,
    /// Run the IF page's stage `i` on its own.
    RunStage(usize),
    /// Run the IF page's stages one after another, from stage I.
    RunAllStages,
    /// Upscale gallery image `i` ×4 (the IF page's x4 upscaler and settings).
    Upscale(usize),
    /// Cancel a queued or running job.
    Cancel(JobId),
    /// Make gallery image `i` the source of a page, and show the page.
    SendTo(usize, View),
    /// Take gallery image `i`'s seed into the prompt panel.
    ReuseSeed(usize),
    /// Take all of gallery image `i`'s parameters into the prompt panel.
    ReuseParameters(usize),
    /// Load the model the model field names (a hub model not yet downloaded asks first).
    LoadModel,
    /// Download the model the model field names, then load it.
    DownloadModel,
    /// Attach the ControlNet the ControlNet page names.
    LoadControlNet,
    /// Open an image as the img2img/inpainting source.
    OpenSource(PathBuf),
    /// Open an image as the ControlNet's control image.
    OpenControl(PathBuf),
    /// A file dropped on the window: an image for the page shown, or a PNG's parameters.
    DropFile(PathBuf),
    /// Send new engine settings.
    ApplySettings(EngineSettings),
    /// Save finished images to this folder (`None`: do not save them).
    SetOutputDir(Option<PathBuf>),
    /// Start the benchmark panel's run.
    StartBench,
    /// Stop the benchmark panel's run.
    CancelBench,
    /// Close the error banner.
    DismissError,
}

impl AppState {
    /// Applies one command.
    pub fn apply(&mut self, command: Command) {
        match command {
            Command::Generate => self.queue_generation(),
            Command::RunStage(i) => self.queue_stage(i),
            Command::RunAllStages => self.run_all_stages(),
            Command::Upscale(i) => self.upscale_image(i),
            Command::Cancel(job) => self.cancel(job),
            Command::SendTo(i, view) => self.send_to(i, view),
            Command::ReuseSeed(i) => self.reuse_seed(i),
            Command::ReuseParameters(i) => self.reuse_parameters(i),
            Command::LoadModel => self.load_model(),
            Command::DownloadModel => self.download_model(),
            Command::LoadControlNet => self.load_controlnet(),
            Command::OpenSource(path) => self.open_source(&path),
            Command::OpenControl(path) => self.open_control(&path),
            Command::DropFile(path) => self.drop_file(&path),
            Command::ApplySettings(settings) => self.apply_settings(settings),
            Command::SetOutputDir(dir) => self.output_dir = dir,
            Command::StartBench => self.start_bench(),
            Command::CancelBench => self.cancel_bench(),
            Command::DismissError => self.error = None,
        }
    }
}

/// The handlers: each command as the slices see it.
impl AppState {
    /// Whether a model is loaded (Generate is enabled).
    pub fn model_ready(&self) -> bool {
        self.model.ready()
    }

    /// Loads `model_spec` if it is on disk or cached; a hub model that is not yet downloaded
    /// waits for the user to accept the download ([`Self::download_model`]).
    pub(super) fn load_model(&mut self) {
        let spec = self.model.spec.trim().to_string();
        let variant = self.setup.settings.execution.precision.weights_variant();
        match model_availability(&spec, variant) {
            Ok(ModelAvailability::NeedsDownload { repo_id }) => {
                self.model.status = ModelStatus::NeedsDownload { repo_id };
            }
            Ok(ModelAvailability::Offline { repo_id }) => {
                self.model.status = ModelStatus::Offline { repo_id };
            }
            Ok(ModelAvailability::Local(_) | ModelAvailability::Cached(_)) => self.send_load(spec),
            Err(e) => {
                self.model.status = ModelStatus::Failed(e.to_string());
                self.error = Some(e.to_string());
            }
        }
    }

    /// Downloads (through the hub cache) and loads `model_spec`.
    pub(super) fn download_model(&mut self) {
        let spec = self.model.spec.trim().to_string();
        self.send_load(spec);
    }

    pub(super) fn send_load(&mut self, spec: String) {
        if let Some(engine) = &self.engine {
            engine.load_model(spec);
            self.model.status = ModelStatus::Loading { download: None };
        }
    }

    /// Makes gallery image `index` the source of `view` (img2img/inpainting, or the
    /// ControlNet's control image) and shows it.
    pub(super) fn send_to(&mut self, index: usize, view: View) {
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
    pub(super) fn load_controlnet(&mut self) {
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
    pub(super) fn open_control(&mut self, path: &Path) {
        match self.control.open(path) {
            Ok(()) => self.status = format!("opened {}", path.display()),
            Err(e) => self.error = Some(format!("{e:#}")),
        }
    }

    /// Opens an image file as the img2img/inpainting source.
    pub(super) fn open_source(&mut self, path: &Path) {
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
    pub(super) fn drop_file(&mut self, path: &Path) {
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
                    && model != &model_label(&self.model.spec)
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
    pub(super) fn reuse_seed(&mut self, index: usize) {
        if let Some(img) = self.gallery.get(index) {
            self.form.seed = img.params.seed;
            self.form.seed_locked = true;
        }
    }

    /// Puts all of a gallery image's parameters back in the form (and the pages' settings).
    pub(super) fn reuse_parameters(&mut self, index: usize) {
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
        self.setup.unavailable_reason(setting)
    }

    /// Queues a generation from the form, with the page's pipeline (the source image and its
    /// mask for img2img/inpainting). A request that cannot be made says why in the status bar.
    pub(super) fn queue_generation(&mut self) {
        if self.view == View::Cascade {
            self.run_all_stages();
            return;
        }
        let pipeline = self.view.pipeline();
        let f = &self.form;
        let page = match pipeline {
            PipelineKind::Txt2Img => Ok(PageTask {
                task: Task::Txt2Img,
                width: f.width,
                height: f.height,
            }),
            PipelineKind::ControlNet => self.control.task(),
            _ => self.inputs.task(pipeline, (f.width, f.height)),
        };
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                self.error = Some(format!("{e:#}"));
                return;
            }
        };
        if !self.form.seed_locked && !self.gallery.is_empty() {
            self.form.randomise_seed();
        }
        let request = GenerationRequest {
            common: CommonRequest {
                width: page.width,
                height: page.height,
                ..self.form.common(self.setup.vae_tiling)
            },
            task: page.task,
        };
        let controlnet = match &request.task {
            Task::ControlNet(c) => Some(ControlNetParameters {
                model: self.control.loaded.clone().unwrap_or_default(),
                canny: (self.control.map_source == MapSource::Canny)
                    .then_some((self.control.canny.low, self.control.canny.high)),
                weight: c.scale,
                guidance_start: c.guidance.0,
                guidance_end: c.guidance.1,
                guess_mode: c.guess_mode,
            }),
            _ => None,
        };
        self.submit(request, controlnet, None, None);
    }

    /// Sends a request to the engine (on `model` when not the main one) and tracks it.
    pub(super) fn submit(
        &mut self,
        request: GenerationRequest,
        controlnet: Option<ControlNetParameters>,
        model: Option<String>,
        cascade_stage: Option<usize>,
    ) -> Option<JobId> {
        let engine = self.engine.as_mut()?;
        let id = engine.generate_on(request.clone(), model.clone());
        self.jobs
            .push(Job::queued(id, request, controlnet, model, cascade_stage));
        Some(id)
    }

    /// Queues the IF page's stage `i` (its input is the previous stage's last result).
    pub(super) fn queue_stage(&mut self, i: usize) {
        let f = &self.form;
        let made = self.cascade.request(i, f.common(self.setup.vae_tiling));
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
    pub(super) fn run_all_stages(&mut self) {
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
    pub(super) fn upscale_image(&mut self, index: usize) {
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
            common: CommonRequest {
                prompt: image.params.prompt.clone(),
                negative_prompt: image.params.negative_prompt.clone(),
                steps: s.steps,
                guidance_scale: s.guidance,
                width: 4 * w,
                height: 4 * h,
                batch: 1,
                seed: image.params.seed,
                vae_tiling: self.setup.vae_tiling,
                ..Default::default()
            },
            task: Task::Upscale(UpscaleInput {
                source: UpscaleSource::Image(HostTensor {
                    shape: vec![image.height, image.width, 3],
                    values: image.rgb.iter().map(|&v| f32::from(v) / 255.0).collect(),
                }),
                noise_level: Some(s.noise_level),
            }),
        };
        let model = s.model.trim().to_string();
        self.submit(request, None, Some(model), None);
        self.status = format!("upscaling image {} ×4 to {}×{}", index + 1, 4 * w, 4 * h);
    }

    /// Queues the benchmark panel's plan on the engine (behind any generation).
    pub(super) fn start_bench(&mut self) {
        let current = self.setup.confirmed.map(|s| s.execution.precision);
        let plan = self
            .bench
            .form
            .plan(self.setup.backend.as_ref().map(|b| b.kind), current);
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
    pub(super) fn cancel_bench(&mut self) {
        if let Some(run) = &self.bench.running {
            let job = run.job;
            self.cancel(job);
        }
    }

    /// Cancels a queued or running job.
    pub(super) fn cancel(&mut self, id: JobId) {
        if let Some(engine) = &self.engine {
            engine.cancel(id);
        }
    }

    /// Sends new settings to the engine.
    pub(super) fn apply_settings(&mut self, settings: EngineSettings) {
        self.setup.choose(settings);
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
        self.jobs.running_preview()
    }
}
