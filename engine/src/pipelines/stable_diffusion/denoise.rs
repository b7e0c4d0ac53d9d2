//! The denoising loop every SD pipeline (and IF's) shares, and what conditions it: guidance,
//! ControlNet residuals, inpainting's known image, the f16 → f32 fallback.

use burn::module::Module;
use burn::tensor::{DType, Tensor, backend::Backend};

use super::pipeline_stable_diffusion::pixels_to_host;
use crate::error::{EngineError, Result};
use crate::models::controlnets::ControlNetModel;
use crate::models::unets::{ClassLabels, ControlResiduals, UNet2DConditionModel};
use crate::models::weights::CastParams;
use crate::noise::NoiseSource;
use crate::pipelines::preview::latents_to_rgb_preview;
use crate::pipelines::{CancelToken, StepClock, StepObserver};
use crate::schedulers::Scheduler;

/// The f16 → f32 fallback of [`denoise`].
#[derive(Default)]
struct UpcastUnet<B: Backend> {
    /// The f32 copy, made at the first non-finite output.
    unet: Option<UNet2DConditionModel<B>>,
}

impl<B: Backend> UpcastUnet<B> {
    /// One UNet evaluation, in f32 once a reduced-precision one has failed.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        unet: &UNet2DConditionModel<B>,
        input: Tensor<B, 4>,
        t: f64,
        context: &Tensor<B, 3>,
        class_labels: &ClassLabels<B>,
        residuals: Option<&ControlResiduals<B>>,
        step: usize,
        observer: &mut dyn StepObserver,
    ) -> Result<Tensor<B, 4>> {
        let dtype = input.dtype();
        if self.unet.is_none() {
            let out =
                unet.forward_with_residuals(input.clone(), &[t], context, class_labels, residuals)?;
            if dtype == DType::F32 || all_finite(&out) {
                return Ok(out);
            }
            observer.on_note(&format!(
                "the UNet's {dtype:?} output had NaN/inf values at step {step}: the step was \
                 redone in f32, and so were the remaining steps"
            ));
            tracing::warn!(
                step,
                ?dtype,
                "non-finite UNet output; redoing the step in f32"
            );
        }
        let upcast = self
            .unet
            .get_or_insert_with(|| unet.clone().map(&mut CastParams(DType::F32)));
        let residuals = residuals.map(|r| ControlResiduals {
            down: r.down.iter().map(|d| d.clone().cast(DType::F32)).collect(),
            mid: r.mid.clone().cast(DType::F32),
        });
        let class_labels = match class_labels {
            ClassLabels::Vectors(v) => ClassLabels::Vectors(v.clone().cast(DType::F32)),
            other => other.clone(),
        };
        let out = upcast.forward_with_residuals(
            input.cast(DType::F32),
            &[t],
            &context.clone().cast(DType::F32),
            &class_labels,
            residuals.as_ref(),
        )?;
        if !all_finite(&out) {
            return Err(EngineError::NonFinite(format!(
                "the UNet produced NaN/inf values at step {step} even in f32: the weights or \
                 inputs are broken"
            )));
        }
        Ok(out.cast(dtype))
    }
}

/// Classifier-free guidance on the UNet's CFG batch `[uncond; text]`. With more output channels
/// than the sample has (IF: noise and a learned variance), only the first `channels` are
/// guided and the text half's variance is kept, as IF's pipelines do.
fn guide<B: Backend>(
    noise_pred: Tensor<B, 4>,
    channels: usize,
    scale: Option<f64>,
) -> Tensor<B, 4> {
    let Some(scale) = scale else {
        return noise_pred;
    };
    let [double, out_channels, _, _] = noise_pred.dims();
    let batch = double / 2;
    let uncond = noise_pred.clone().narrow(0, 0, batch);
    let text = noise_pred.narrow(0, batch, batch);
    if out_channels <= channels {
        return uncond.clone().add(text.sub(uncond).mul_scalar(scale));
    }
    let uncond = uncond.narrow(1, 0, channels);
    let variance = text.clone().narrow(1, channels, out_channels - channels);
    let text = text.narrow(1, 0, channels);
    let guided = uncond.clone().add(text.sub(uncond).mul_scalar(scale));
    Tensor::cat(vec![guided, variance], 1)
}

/// Whether a tensor holds only finite values (reads one flag back from the device).
fn all_finite<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    t.clone()
        .is_finite()
        .all()
        .into_data()
        .iter::<bool>()
        .all(|finite| finite)
}

/// How an inpainting run conditions the denoising loop on the known image.
#[derive(Debug, Clone)]
pub enum InpaintConditioning<B: Backend> {
    /// A 9-channel inpainting UNet: `[mask, masked_image_latents]`, `[CFG batch, 1 + c, h, w]`,
    /// concatenated to the scaled model input on the channel axis every step.
    ExtraChannels(Tensor<B, 4>),
    /// Image channels concatenated to the CFG-doubled input *before* `scale_model_input`
    /// (IF stage II's upscaled image), `[CFG batch, c, h, w]`.
    ImageChannels(Tensor<B, 4>),
    /// A plain UNet: after every step the known region is re-noised to the next step's level
    /// and blended back through the mask (diffusers' 4-channel path).
    Blend {
        /// The init image's latents, `[batch, c, h, w]`.
        image_latents: Tensor<B, 4>,
        /// The noise the initial latents were made with, `[batch, c, h, w]`.
        noise: Tensor<B, 4>,
        /// 1 = repaint, `[batch, 1, h, w]`.
        mask: Tensor<B, 4>,
    },
}

/// What the denoising loop needs besides the models.
#[derive(Debug, Clone)]
pub struct DenoiseOptions<'a, B: Backend> {
    /// Classifier-free guidance scale; `None` runs the UNet on the conditional batch only.
    pub guidance_scale: Option<f64>,
    /// The timesteps to run, `timesteps[i]` being scheduler step `first_step + i`.
    pub timesteps: &'a [f64],
    /// Index of the first timestep in the scheduler's list (img2img starts part-way).
    pub first_step: usize,
    /// Inpainting's conditioning on the known image, if any.
    pub conditioning: Option<&'a InpaintConditioning<B>>,
    /// The ControlNet and its control image, if any.
    pub control: Option<&'a ControlConditioning<'a, B>>,
    /// The UNet's class labels for the whole UNet batch (CFG-doubled where guidance is on):
    /// the upscalers' noise levels.
    pub class_labels: Option<&'a ClassLabels<B>>,
    /// What the live preview shows.
    pub preview: PreviewKind,
}

/// What the denoising loop's live preview is made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreviewKind {
    /// SD 1.x latents through the fixed latent → RGB map.
    #[default]
    Sd15Latents,
    /// Pixels in [-1, 1] (IF's stages denoise images).
    Pixels,
    /// No preview (latents of another VAE).
    None,
}

/// What conditions a pipeline's denoising loop besides the prompt.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conditioning<'a, B: Backend> {
    pub inpaint: Option<&'a InpaintConditioning<B>>,
    pub control: Option<&'a ControlConditioning<'a, B>>,
}

impl<B: Backend> Conditioning<'_, B> {
    /// No conditioning.
    pub fn none() -> Self {
        Self {
            inpaint: None,
            control: None,
        }
    }
}

/// A ControlNet and its control image, as the denoising loop uses them (diffusers'
/// `StableDiffusionControlNetPipeline` loop).
#[derive(Debug, Clone)]
pub struct ControlConditioning<'a, B: Backend> {
    pub model: &'a ControlNetModel<B>,
    /// `[batch, 3, H, W]` in [0, 1], or `[2·batch, …]` (paired for the CFG batch) when the
    /// ControlNet sees the whole CFG batch (guidance on, not guess mode).
    pub image: Tensor<B, 4>,
    /// `controlnet_conditioning_scale`.
    pub scale: f64,
    /// `control_guidance_start` / `_end` as fractions of the loop.
    pub start: f64,
    pub end: f64,
    pub guess_mode: bool,
}

impl<B: Backend> ControlConditioning<'_, B> {
    /// Diffusers' `controlnet_keep[i]`: whether step `i` of `n` lies in the guidance window.
    fn keep(&self, i: usize, n: usize) -> bool {
        let (i, n) = (i as f64, n as f64);
        !(i / n < self.start || (i + 1.0) / n > self.end)
    }

    /// The residuals for the UNet's CFG batch at one step (none outside the window, where
    /// diffusers' are zeros).
    #[allow(clippy::too_many_arguments)]
    fn residuals(
        &self,
        i: usize,
        n: usize,
        scheduler: &dyn Scheduler<B>,
        step: usize,
        latents: &Tensor<B, 4>,
        model_input: &Tensor<B, 4>,
        t: f64,
        context: &Tensor<B, 3>,
        cfg: bool,
    ) -> Result<Option<ControlResiduals<B>>> {
        if !self.keep(i, n) {
            return Ok(None);
        }
        let batch = latents.dims()[0];
        let guess_cfg = self.guess_mode && cfg;
        let (input, ctx) = if guess_cfg {
            // Only the conditional half goes through the ControlNet.
            (
                scheduler.scale_model_input(latents.clone(), step),
                context.clone().narrow(0, batch, batch),
            )
        } else {
            (model_input.clone(), context.clone())
        };
        let mut r = self.model.forward(
            input,
            &[t],
            &ctx,
            self.image.clone(),
            self.scale,
            self.guess_mode,
        )?;
        if guess_cfg {
            let zeros_first = |t: Tensor<B, 4>| Tensor::cat(vec![t.zeros_like(), t], 0);
            r.down = r.down.into_iter().map(zeros_first).collect();
            r.mid = zeros_first(r.mid);
        }
        Ok(Some(r))
    }
}

/// The denoising loop every SD pipeline shares: per timestep, the CFG batch through the UNet,
/// guidance, the scheduler step; the cancel token is checked and the observer told each step.
/// This is the loop the benchmark times (its it/s is the UNet evaluation rate).
///
/// In f16 (or any float type but f32) every UNet output is checked for NaN/∞: f16 overflows
/// where f32 does not (activations past 65504). A step that produced one is redone with an f32
/// copy of the UNet, which then runs the remaining steps of this call too, and the observer gets
/// a note. NaN in f32 is an error naming the step.
///
/// # Shapes
/// - latents: `[batch, channels, h, w]` (already scaled by `init_noise_sigma`)
/// - context: `[2·batch, tokens, dim]` with guidance (negative first), else `[batch, tokens, dim]`
#[allow(clippy::too_many_arguments)]
pub fn denoise<B: Backend>(
    unet: &UNet2DConditionModel<B>,
    scheduler: &mut dyn Scheduler<B>,
    mut latents: Tensor<B, 4>,
    context: &Tensor<B, 3>,
    options: &DenoiseOptions<'_, B>,
    noise: &mut dyn NoiseSource,
    cancel: &CancelToken,
    observer: &mut dyn StepObserver,
) -> Result<Tensor<B, 4>> {
    let channels = latents.dims()[1];
    let clock = StepClock::start(options.timesteps.len());
    let mut upcast = UpcastUnet::default();
    for (i, &t) in options.timesteps.iter().enumerate() {
        cancel.check()?;
        let step = options.first_step + i;
        let model_input = match options.guidance_scale {
            Some(_) => Tensor::cat(vec![latents.clone(), latents.clone()], 0),
            None => latents.clone(),
        };
        let model_input = match options.conditioning {
            Some(InpaintConditioning::ImageChannels(image)) => {
                Tensor::cat(vec![model_input, image.clone()], 1)
            }
            _ => model_input,
        };
        let model_input = scheduler.scale_model_input(model_input, step);
        let model_input = match options.conditioning {
            Some(InpaintConditioning::ExtraChannels(extra)) => {
                Tensor::cat(vec![model_input, extra.clone()], 1)
            }
            _ => model_input,
        };
        let residuals = match options.control {
            Some(control) => control.residuals(
                i,
                options.timesteps.len(),
                scheduler,
                step,
                &latents,
                &model_input,
                t,
                context,
                options.guidance_scale.is_some(),
            )?,
            None => None,
        };
        let noise_pred = upcast.forward(
            unet,
            model_input,
            t,
            context,
            options.class_labels.unwrap_or(&ClassLabels::None),
            residuals.as_ref(),
            i + 1,
            observer,
        )?;
        let noise_pred = guide(noise_pred, channels, options.guidance_scale);
        // A learned variance goes to the schedulers that use it; the others get the noise.
        let noise_pred = if noise_pred.dims()[1] > channels && !scheduler.learned_variance() {
            noise_pred.narrow(1, 0, channels)
        } else {
            noise_pred
        };
        latents = scheduler.step(noise_pred, step, latents, noise)?;
        if let Some(InpaintConditioning::Blend {
            image_latents,
            noise,
            mask,
        }) = options.conditioning
        {
            let known = if i + 1 < options.timesteps.len() {
                scheduler.add_noise(image_latents.clone(), noise.clone(), step + 1)
            } else {
                image_latents.clone()
            };
            let keep = mask.clone().neg().add_scalar(1.0);
            latents = keep.mul(known).add(mask.clone().mul(latents));
        }
        observer.on_step(&clock.progress(i + 1, t));
        if i + 1 < options.timesteps.len() && observer.wants_preview(i + 1) {
            // Unit-variance latents for the preview (what the UNet sees at this step).
            let first = latents.clone().narrow(0, 0, 1);
            let preview = match options.preview {
                PreviewKind::Sd15Latents => {
                    latents_to_rgb_preview(scheduler.scale_model_input(first, step + 1))?
                }
                PreviewKind::Pixels => Some(pixels_to_host(first)?),
                PreviewKind::None => None,
            };
            if let Some(preview) = preview {
                observer.on_preview(i + 1, preview);
            }
        }
    }
    Ok(latents)
}
