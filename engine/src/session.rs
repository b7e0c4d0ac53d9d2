//! One way into the engine: a [`Session`] holds the backend, the loaded models, the settings and
//! the memory budget, and serves `load`, `generate` and `bench`. The app's worker thread wraps
//! one ([`crate::worker`]); `brushfire generate` and `brushfire bench` call one directly.
//!
//! This is also the one place where the backend is chosen as a type. Burn's backends are type
//! parameters, and each one compiles a copy of whatever generic code runs on it. The settings
//! pick one of five (CUDA and wgpu, each fused or not, plus the CPU's flex); the precision is
//! not a type but the device's float type, claimed at run time (`claim_precision`). Every
//! entry path goes through [`run_on_backend`] with one [`Work`] type, so each pipeline and
//! each benchmark loop exists once per backend in the binary, not once per entry path; a
//! loaded model is kept behind `dyn` [`LoadedPipeline`], so generating needs no second choice.

use std::path::{Path, PathBuf};

use burn::backend::Wgpu;
use burn::backend::flex::{Flex, FlexDevice};
use burn::backend::wgpu::{CubeBackend, WgpuDevice, WgpuRuntime};
#[cfg(feature = "cuda")]
use burn::backend::{Cuda, cuda::CudaDevice};
use burn::tensor::backend::Backend;
#[cfg(feature = "cuda")]
use cubecl::cuda::CudaRuntime;

use crate::backend::{
    BackendRequest, ExecutionOptions, SelectedBackend, memory_budget, select_backend,
};
use crate::bench::{
    BenchModels, BenchObserver, BenchPlan, BenchReport, CascadeTask, CellOutcome, UnetLoopTask,
    run_bench,
};
use crate::error::{EngineError, Result};
use crate::loading::{DownloadProgress, resolve_controlnet, resolve_model};
use crate::models::{AttnProcessor, MemoryFormat};
use crate::noise::NoiseSource;
use crate::pipelines::deepfloyd_if::{IFPipeline, is_if_folder};
use crate::pipelines::stable_diffusion::{GenerationOutput, LoadOptions, StableDiffusionPipeline};
use crate::pipelines::{
    CancelToken, GenerationRequest, PipelineKind, StepObserver, Task, UpscaleSource,
};
use crate::tensor_io::HostTensor;

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

/// A loaded model on whichever backend the session chose (a Stable Diffusion folder, the x4
/// upscaler, or a DeepFloyd IF stage).
pub trait LoadedPipeline: Send {
    /// Runs `request` (checked first, before any tensor work). `noise` replaces the seeded
    /// generator (a recorded noise tape).
    fn generate(
        &self,
        request: &GenerationRequest,
        noise: Option<&mut dyn NoiseSource>,
        cancel: &CancelToken,
        observer: &mut dyn StepObserver,
    ) -> Result<GenerationOutput>;

    /// The `(width, height)` a request that names no size runs at: img2img at its image's size
    /// rounded down to the VAE factor (diffusers' preprocess), the x4 upscaler at four times its
    /// input's, IF at its UNet's native size, txt2img and inpaint at the model's default.
    fn default_size(&self, request: &GenerationRequest) -> (usize, usize);

    fn set_attn_processor(&mut self, processor: AttnProcessor);
    fn set_memory_format(&mut self, format: MemoryFormat);

    /// Attaches a ControlNet (folder or single file) for the controlnet pipeline.
    fn load_controlnet(&mut self, path: &Path) -> Result<()>;
}

impl<B: Backend> LoadedPipeline for StableDiffusionPipeline<B> {
    fn generate(
        &self,
        request: &GenerationRequest,
        noise: Option<&mut dyn NoiseSource>,
        cancel: &CancelToken,
        observer: &mut dyn StepObserver,
    ) -> Result<GenerationOutput> {
        StableDiffusionPipeline::generate(self, request, noise, cancel, observer)
    }

    fn default_size(&self, request: &GenerationRequest) -> (usize, usize) {
        let factor = self.vae_config.scale_factor();
        // `(width, height)` of the input the output size follows: an image is `[h, w, 3]`, an
        // array `[n, 3, h, w]`.
        let image_size = |t: &HostTensor| (t.shape.len() == 3).then(|| (t.shape[1], t.shape[0]));
        let input = match &request.task {
            Task::Img2Img(input) => image_size(&input.image),
            Task::Upscale(input) => match &input.source {
                UpscaleSource::Image(image) => image_size(image),
                UpscaleSource::Array(array) => {
                    (array.shape.len() == 4).then(|| (array.shape[3], array.shape[2]))
                }
            },
            _ => None,
        };
        let round = |v: usize| (v / factor * factor).max(factor);
        match (input, request.pipeline()) {
            (Some((w, h)), PipelineKind::Img2Img) => (round(w), round(h)),
            (Some((w, h)), PipelineKind::Upscale) => (round(w) * factor, round(h) * factor),
            _ => {
                let side = self.unet_config.sample_size.unwrap_or(64) * factor;
                (side, side)
            }
        }
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

impl<B: Backend> LoadedPipeline for IFPipeline<B> {
    fn generate(
        &self,
        request: &GenerationRequest,
        noise: Option<&mut dyn NoiseSource>,
        cancel: &CancelToken,
        observer: &mut dyn StepObserver,
    ) -> Result<GenerationOutput> {
        IFPipeline::generate(self, request, noise, cancel, observer)
    }

    fn default_size(&self, _request: &GenerationRequest) -> (usize, usize) {
        (self.native_size(), self.native_size())
    }

    fn set_attn_processor(&mut self, processor: AttnProcessor) {
        IFPipeline::set_attn_processor(self, processor);
    }

    fn set_memory_format(&mut self, format: MemoryFormat) {
        IFPipeline::set_memory_format(self, format);
    }

    fn load_controlnet(&mut self, _path: &Path) -> Result<()> {
        Err(EngineError::Unsupported(
            "a ControlNet on a DeepFloyd IF model (ControlNets fit Stable Diffusion models)".into(),
        ))
    }
}

/// A model the session holds: what the user named, and the pipeline.
struct Resident {
    spec: String,
    pipeline: Box<dyn LoadedPipeline>,
}

/// What loading the main model did beside loading it.
#[derive(Debug)]
pub struct Loaded {
    /// The folder (or file) the model was read from.
    pub dir: PathBuf,
    /// The ControlNet that was attached to the previous model, attached again to this one.
    pub controlnet: Option<Reattached>,
}

/// A ControlNet attached again after its model was (re)loaded.
#[derive(Debug)]
pub struct Reattached {
    /// What the user named.
    pub spec: String,
    /// Where it was found.
    pub path: PathBuf,
    /// The seconds attaching took, or why it does not fit the new model (it is then detached).
    pub outcome: Result<f64>,
}

/// The backend, the loaded models and the settings they run with (see the module docs).
pub struct Session {
    settings: EngineSettings,
    backend: Option<SelectedBackend>,
    /// The model jobs run on unless they name another.
    model: Option<Resident>,
    /// Models jobs name beside the main one (IF stages, the x4 upscaler), loaded on first use.
    side_models: Vec<Resident>,
    /// The ControlNet the user picked (spec, resolved path), attached again whenever the main
    /// model is (re)loaded.
    controlnet: Option<(String, PathBuf)>,
}

impl Session {
    /// A session with nothing selected or loaded yet: the backend is chosen on first use.
    pub fn new(settings: EngineSettings) -> Self {
        Self {
            settings,
            backend: None,
            model: None,
            side_models: Vec::new(),
            controlnet: None,
        }
    }

    pub fn settings(&self) -> EngineSettings {
        self.settings
    }

    /// The backend in use, if one was chosen yet.
    pub fn backend(&self) -> Option<&SelectedBackend> {
        self.backend.as_ref()
    }

    /// The backend in use, chosen now (by `settings.backend`) if none was yet.
    pub fn select_backend(&mut self) -> Result<SelectedBackend> {
        if let Some(b) = &self.backend {
            return Ok(b.clone());
        }
        let selected = select_backend(self.settings.backend)?;
        self.backend = Some(selected.clone());
        Ok(selected)
    }

    /// The backend, checked against the execution options (f16 where it runs).
    fn checked_backend(&mut self) -> Result<SelectedBackend> {
        let backend = self.select_backend()?;
        self.settings.execution.check(&backend)?;
        Ok(backend)
    }

    /// The main model's spec (what the user named), if one is loaded.
    pub fn model_spec(&self) -> Option<&str> {
        self.model.as_ref().map(|m| m.spec.as_str())
    }

    /// The ControlNet attached to the main model, by the spec the user named.
    pub fn controlnet(&self) -> Option<&str> {
        self.controlnet.as_ref().map(|(spec, _)| spec.as_str())
    }

    /// The weights variant the precision prefers (`fp16` files in f16).
    fn variant(&self) -> Option<&'static str> {
        self.settings.execution.precision.weights_variant()
    }

    /// Resolves `spec` (a folder, a single file or a hub id, downloading with `progress` if
    /// needed) and makes it the main model; an attached ControlNet is attached to it again.
    pub fn load(&mut self, spec: &str, progress: &mut dyn DownloadProgress) -> Result<Loaded> {
        let dir = resolve_model(spec, self.variant(), progress)?;
        self.load_dir(spec, dir)
    }

    /// [`Session::load`] of a model already resolved to `dir`.
    pub fn load_dir(&mut self, spec: &str, dir: PathBuf) -> Result<Loaded> {
        // The old model stays until this one is in (a failed load leaves it usable); a settings
        // change that rebuilds the model unloads it first (two copies may not fit the device).
        let pipeline = self.load_pipeline(&dir)?;
        self.model = Some(Resident {
            spec: spec.to_string(),
            pipeline,
        });
        let controlnet = self.controlnet.take().map(|(spec, path)| {
            let start = std::time::Instant::now();
            let outcome = self
                .load_controlnet_path(&spec, &path)
                .map(|()| start.elapsed().as_secs_f64());
            Reattached {
                spec,
                path,
                outcome,
            }
        });
        Ok(Loaded { dir, controlnet })
    }

    /// Resolves and attaches a ControlNet to the main model (replacing any attached one); it
    /// stays attached across model reloads and setting changes. Returns where it was found.
    pub fn load_controlnet(
        &mut self,
        spec: &str,
        progress: &mut dyn DownloadProgress,
    ) -> Result<PathBuf> {
        let path = resolve_controlnet(spec, self.variant(), progress)?;
        self.load_controlnet_path(spec, &path)?;
        Ok(path)
    }

    /// [`Session::load_controlnet`] of a ControlNet already resolved to `path`.
    pub fn load_controlnet_path(&mut self, spec: &str, path: &Path) -> Result<()> {
        let model = self.model.as_mut().ok_or_else(|| {
            EngineError::invalid("controlnet", "load a model before its ControlNet")
        })?;
        model.pipeline.load_controlnet(path)?;
        self.controlnet = Some((spec.to_string(), path.to_path_buf()));
        Ok(())
    }

    /// Makes sure the side model `spec` is loaded; returns its folder when it was loaded now.
    pub fn load_side_model(
        &mut self,
        spec: &str,
        progress: &mut dyn DownloadProgress,
    ) -> Result<Option<PathBuf>> {
        if self.side_models.iter().any(|m| m.spec == spec) {
            return Ok(None);
        }
        let dir = resolve_model(spec, self.variant(), progress)?;
        let pipeline = self.load_pipeline(&dir)?;
        self.side_models.push(Resident {
            spec: spec.to_string(),
            pipeline,
        });
        Ok(Some(dir))
    }

    /// Runs `request` on the main model, or on the side model `model` (loaded before with
    /// [`Session::load_side_model`]). A width or height of 0 is the model's default for it.
    pub fn generate(
        &self,
        model: Option<&str>,
        request: &GenerationRequest,
        noise: Option<&mut dyn NoiseSource>,
        cancel: &CancelToken,
        observer: &mut dyn StepObserver,
    ) -> Result<GenerationOutput> {
        let resident = match model {
            Some(spec) => self.side_models.iter().find(|m| m.spec == spec),
            None => self.model.as_ref(),
        }
        .ok_or_else(|| EngineError::invalid("model", "no model is loaded"))?;
        let pipeline = resident.pipeline.as_ref();
        if request.width == 0 || request.height == 0 {
            let (width, height) = pipeline.default_size(request);
            let mut sized = request.clone();
            if sized.width == 0 {
                sized.width = width;
            }
            if sized.height == 0 {
                sized.height = height;
            }
            return pipeline.generate(&sized, noise, cancel, observer);
        }
        pipeline.generate(request, noise, cancel, observer)
    }

    /// Takes new settings. Attention and memory format apply to the loaded models at once;
    /// returns `true` when the backend or its execution options changed, which the loaded
    /// models cannot follow: then they are unloaded ([`Session::unload`]) and load again on
    /// the new backend (the caller reloads the main model; side models load on their next job).
    pub fn set_settings(&mut self, settings: EngineSettings) -> bool {
        let previous = self.settings;
        self.settings = settings;
        if settings.backend != previous.backend {
            self.backend = None;
        }
        let rebuild =
            settings.backend != previous.backend || settings.execution != previous.execution;
        if !rebuild {
            for model in self.model.iter_mut().chain(self.side_models.iter_mut()) {
                model.pipeline.set_attn_processor(settings.attention);
                model.pipeline.set_memory_format(settings.memory_format);
            }
        }
        rebuild
    }

    /// Checks that the settings can run on their backend (choosing it if needed).
    pub fn check_settings(&mut self) -> Result<SelectedBackend> {
        self.checked_backend()
    }

    /// Puts back settings and a backend that worked (after new ones failed).
    pub fn restore(&mut self, settings: EngineSettings, backend: Option<SelectedBackend>) {
        self.settings = settings;
        self.backend = backend;
    }

    /// Unloads every model (the main one's spec is returned, to load it again); the ControlNet
    /// choice is kept and attaches to the next main model.
    pub fn unload(&mut self) -> Option<String> {
        self.side_models.clear();
        self.model.take().map(|model| model.spec)
    }

    /// Runs the benchmark on the backend in use (its own random-weight models; the loaded
    /// models stay loaded).
    pub fn bench(
        &mut self,
        plan: &BenchPlan,
        models: &BenchModels,
        cancel: &CancelToken,
        observer: &mut dyn BenchObserver,
    ) -> Result<BenchReport> {
        let backend = self.select_backend()?;
        run_bench(&backend, plan, models, cancel, observer)
    }

    fn load_pipeline(&mut self, dir: &Path) -> Result<Box<dyn LoadedPipeline>> {
        let backend = self.checked_backend()?;
        let work = Work::Load {
            dir,
            options: LoadOptions {
                variant: self.variant().map(String::from),
                memory_budget: memory_budget(&backend),
            },
            attention: self.settings.attention,
            memory_format: self.settings.memory_format,
        };
        match run_on_backend(&backend, self.settings.execution, work)? {
            Done::Pipeline(pipeline) => Ok(pipeline),
            Done::Cell(_) => Err(EngineError::Backend(
                "internal error: loading returned a benchmark cell".into(),
            )),
        }
    }
}

/// Everything that runs generic over the backend, as one type: see the module docs.
pub(crate) enum Work<'a> {
    Load {
        dir: &'a Path,
        options: LoadOptions,
        attention: AttnProcessor,
        memory_format: MemoryFormat,
    },
    UnetLoop(UnetLoopTask<'a>),
    Cascade(CascadeTask<'a>),
}

pub(crate) enum Done {
    Pipeline(Box<dyn LoadedPipeline>),
    Cell(CellOutcome),
}

impl Work<'_> {
    fn run<B: Backend>(self, device: B::Device) -> Result<Done> {
        match self {
            Work::Load {
                dir,
                options,
                attention,
                memory_format,
            } => {
                let mut pipeline: Box<dyn LoadedPipeline> = if is_if_folder(dir) {
                    Box::new(IFPipeline::<B>::load(dir, &options, &device)?)
                } else {
                    Box::new(StableDiffusionPipeline::<B>::load_path(
                        dir, &options, &device,
                    )?)
                };
                pipeline.set_attn_processor(attention);
                pipeline.set_memory_format(memory_format);
                Ok(Done::Pipeline(pipeline))
            }
            Work::UnetLoop(task) => task.run::<B>(device).map(Done::Cell),
            Work::Cascade(task) => task.run::<B>(device).map(Done::Cell),
        }
    }
}

/// Burn's CUDA backend without fusion.
#[cfg(feature = "cuda")]
type CudaUnfused<F> = CubeBackend<CudaRuntime, F, i32, u8>;
/// Burn's wgpu backend without fusion.
type WgpuUnfused<F> = CubeBackend<WgpuRuntime, F, i32, u32>;

/// Runs `work` on the selected backend with `options`: the single point where the backend
/// becomes a type. Call [`ExecutionOptions::check`] first: it refuses f16 on the CPU backend and
/// makes the precision the device's float type.
pub(crate) fn run_on_backend(
    selected: &SelectedBackend,
    options: ExecutionOptions,
    work: Work<'_>,
) -> Result<Done> {
    use crate::backend::BackendKind;
    // One backend type per (backend, fusion): the precision is the device's float type, which
    // `ExecutionOptions::check` claimed (`claim_precision`), and every tensor the work makes
    // follows it. An f16 type parameter would only compile every pipeline a second time.
    match (selected.kind, options.fusion) {
        #[cfg(feature = "cuda")]
        (BackendKind::Cuda, true) => work.run::<Cuda<f32>>(CudaDevice::default()),
        #[cfg(feature = "cuda")]
        (BackendKind::Cuda, false) => work.run::<CudaUnfused<f32>>(CudaDevice::default()),
        #[cfg(not(feature = "cuda"))]
        (BackendKind::Cuda, _) => Err(EngineError::Backend(
            "this build has no CUDA backend (it was built without the `cuda` feature)".into(),
        )),
        (BackendKind::Wgpu, true) => work.run::<Wgpu<f32>>(WgpuDevice::DefaultDevice),
        (BackendKind::Wgpu, false) => work.run::<WgpuUnfused<f32>>(WgpuDevice::DefaultDevice),
        (BackendKind::Cpu, _) => work.run::<Flex>(FlexDevice),
    }
}
