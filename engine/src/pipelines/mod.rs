//! Pipelines (aka diffusers' `pipelines/`), and what every pipeline shares: the request type,
//! the cancel token and the per-step progress report.

pub mod control_preprocess;
pub mod deepfloyd_if;
pub mod image_processor;
pub mod preview;
pub mod request;
pub mod stable_diffusion;

pub use request::{
    CommonRequest, ControlNetInput, GenerationRequest, Img2ImgInput, InpaintInput, ModelLimits,
    PipelineKind, PromptEmbeds, Task, UpscaleInput, UpscaleSource, strength_schedule,
};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::error::{EngineError, Result};
use crate::tensor_io::HostTensor;

/// Cancels a running job between steps. Clones share the flag.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A fresh, not cancelled token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the job to stop at the next step.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(Cancelled)` once cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(EngineError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// One denoising step finished.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepProgress {
    /// 1-based index of the step that finished.
    pub step: usize,
    /// Steps in this run.
    pub total: usize,
    /// Seconds since the denoising loop started.
    pub elapsed_secs: f64,
    /// UNet evaluations per second over the loop so far (the progress-bar rate diffusers shows).
    pub it_per_sec: f64,
    /// The timestep the step was taken at.
    pub timestep: f64,
}

/// Receives a report after every step.
pub trait StepObserver {
    /// Called after step `progress.step` of `progress.total`.
    fn on_step(&mut self, progress: &StepProgress);

    /// Whether to decode a live preview after this step (1-based). Previews read a small image
    /// back from the device, which waits for the step to finish: ask only when one is shown.
    fn wants_preview(&self, _step: usize) -> bool {
        false
    }

    /// A preview of the first image after `step`: `[h, w, 3]` in [0, 1] at latent resolution.
    fn on_preview(&mut self, _step: usize, _preview: HostTensor) {}

    /// Something the user should know about the run (e.g. a step redone in f32).
    fn on_note(&mut self, _note: &str) {}
}

/// Passes everything on to `inner` and keeps the notes.
pub(crate) struct NoteCollector<'a> {
    pub inner: &'a mut dyn StepObserver,
    pub notes: Vec<String>,
}

impl StepObserver for NoteCollector<'_> {
    fn on_step(&mut self, progress: &StepProgress) {
        self.inner.on_step(progress);
    }

    fn wants_preview(&self, step: usize) -> bool {
        self.inner.wants_preview(step)
    }

    fn on_preview(&mut self, step: usize, preview: HostTensor) {
        self.inner.on_preview(step, preview);
    }

    fn on_note(&mut self, note: &str) {
        self.notes.push(note.to_string());
        self.inner.on_note(note);
    }
}

impl<F: FnMut(&StepProgress)> StepObserver for F {
    fn on_step(&mut self, progress: &StepProgress) {
        self(progress)
    }
}

/// Times the denoising loop for [`StepProgress`].
#[derive(Debug)]
pub(crate) struct StepClock {
    start: Instant,
    total: usize,
}

impl StepClock {
    pub(crate) fn start(total: usize) -> Self {
        Self {
            start: Instant::now(),
            total,
        }
    }

    /// The report for `step` (1-based) finished at `timestep`.
    pub(crate) fn progress(&self, step: usize, timestep: f64) -> StepProgress {
        let elapsed_secs = self.start.elapsed().as_secs_f64();
        StepProgress {
            step,
            total: self.total,
            elapsed_secs,
            it_per_sec: if elapsed_secs > 0.0 {
                step as f64 / elapsed_secs
            } else {
                0.0
            },
            timestep,
        }
    }
}

/// The scheduler a request asks for: its own config, else the model's `model_config`; its class
/// override, else the config's `_class_name`.
pub(crate) fn request_scheduler<B: burn::tensor::backend::Backend>(
    request: &GenerationRequest,
    model_config: &serde_json::Value,
) -> Result<Box<dyn crate::schedulers::Scheduler<B>>> {
    let config = request.scheduler_config.as_ref().unwrap_or(model_config);
    crate::schedulers::from_config_json::<B>(config, request.scheduler)
}

/// What the user should know before the images when a prompt is longer than the text encoder
/// reads: its end was dropped (diffusers truncates with a warning), and how much. `dropped` holds
/// the prompt's then the negative prompt's count of cut tokens.
pub(crate) fn truncation_notes(dropped: &[usize], max_length: usize) -> Vec<String> {
    ["prompt", "negative prompt"]
        .into_iter()
        .zip(dropped)
        .filter(|(_, dropped)| **dropped > 0)
        .map(|(which, dropped)| {
            format!(
                "the {which}'s last {dropped} tokens were dropped: the text encoder reads \
                 {max_length} (long prompts are not split into chunks yet)"
            )
        })
        .collect()
}

/// One Gaussian draw of `shape` from `noise`, on `device`.
pub(crate) fn randn_tensor<B: burn::tensor::backend::Backend>(
    noise: &mut dyn crate::noise::NoiseSource,
    shape: &[usize],
    device: &B::Device,
) -> Result<burn::tensor::Tensor<B, 4>> {
    HostTensor {
        shape: shape.to_vec(),
        values: noise.randn(shape)?,
    }
    .to_tensor::<B, 4>("noise", device)
}

/// An image `[h, w, 3]` in [0, 1], resized to `width × height` if needed, as a model input:
/// `[1, 3, height, width]` f32 in [-1, 1] (diffusers' `preprocess` + normalise).
pub(crate) fn image_to_nchw<B: burn::tensor::backend::Backend>(
    image: &HostTensor,
    width: usize,
    height: usize,
    device: &B::Device,
) -> Result<burn::tensor::Tensor<B, 4>> {
    image_processor::image_size(image, "image", 3)?;
    let image = image_processor::resize(image, width, height)?;
    Ok(image
        .to_tensor::<B, 3>("image", device)?
        .cast(burn::tensor::DType::F32)
        .permute([2, 0, 1])
        .unsqueeze_dim::<4>(0)
        .mul_scalar(2.0)
        .sub_scalar(1.0))
}
