//! The x4 upscaler (aka diffusers'
//! `pipelines/stable_diffusion/pipeline_stable_diffusion_upscale.py`,
//! `StableDiffusionUpscalePipeline`): a low-resolution image, noised to `noise_level` by the
//! `low_res_scheduler`, is concatenated to the latents every step (a 7-channel UNet that also
//! takes the noise level as a class label); the latents are at the input's resolution and the
//! VAE (scaling factor 0.08333) decodes them at four times it.

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

use crate::error::{EngineError, Result};
use crate::models::unets::ClassLabels;
use crate::noise::NoiseSource;
use crate::pipelines::deepfloyd_if::cascade_input;
use crate::pipelines::stable_diffusion::{
    DenoiseOptions, GenerationOutput, InpaintConditioning, PreviewKind, StableDiffusionPipeline,
    denoise,
};
use crate::pipelines::{CancelToken, GenerationRequest, NoteCollector, StepObserver};
use crate::schedulers::noising_scheduler;

impl<B: Backend> StableDiffusionPipeline<B> {
    /// Diffusers' `StableDiffusionUpscalePipeline.__call__` after `check_inputs`. The request's
    /// width × height is the output; the input is resized to a quarter of it (a PNG) or must be
    /// that size (an array). Gaussian draws, in diffusers' order: the input's noise
    /// `[n, 3, h/4, w/4]`, then the latents `[batch, 4, h/4, w/4]`, then scheduler noise.
    pub(crate) fn upscale(
        &self,
        request: &GenerationRequest,
        noise: &mut dyn NoiseSource,
        cancel: &CancelToken,
        observer: &mut dyn StepObserver,
    ) -> Result<GenerationOutput> {
        let low_res = self.low_res_scheduler_config.as_ref().ok_or_else(|| {
            EngineError::invalid(
                "pipeline",
                "this model has no low_res_scheduler: not an upscaler",
            )
        })?;
        let low_res = noising_scheduler(low_res)?;
        let mut scheduler = self.scheduler_for(request)?;
        let cfg = request.do_classifier_free_guidance();
        let batch = request.batch;

        // 3. Encode the prompt.
        let context = self.encode_prompt(request)?;

        // 4. The input image, `[n, 3, h/f, w/f]` in [-1, 1].
        let f = self.vae_config.scale_factor();
        let (w, h) = (request.width / f, request.height / f);
        let image = cascade_input::<B>(request, Some((w, h)), &self.device)?;

        // 5. Timesteps.
        scheduler.set_timesteps(request.steps)?;

        // 6. Noise the input to `noise_level`, then one copy per UNet batch item.
        let level = request.noise_level();
        let image_noise = self.randn(noise, &image.dims())?;
        let image = low_res.add_noise_at_timestep(image, image_noise, level)?;
        let image = if image.dims()[0] == batch {
            image
        } else {
            image.repeat_dim(0, batch)
        };
        let image = if cfg {
            Tensor::cat(vec![image.clone(), image], 0)
        } else {
            image
        };
        let unet_batch = image.dims()[0];
        let levels = Tensor::<B, 1, Int>::from_data(
            TensorData::new(vec![level as i64; unet_batch], [unet_batch]),
            &self.device,
        );
        let class_labels = ClassLabels::Ids(levels);

        // 7. Latents at the input's resolution.
        let shape = self.latent_shape(request);
        let latents = match &request.latents {
            Some(l) => l.to_tensor::<B, 4>("latents", &self.device)?,
            None => self.randn(noise, &shape)?,
        };
        let latents = latents.mul_scalar(scheduler.init_noise_sigma());
        cancel.check()?;

        // 8.–10. Denoise with the noised image beside the latents, decode.
        let timesteps = scheduler.timesteps().to_vec();
        let mut collector = NoteCollector {
            inner: observer,
            notes: Vec::new(),
        };
        let conditioning = InpaintConditioning::ExtraChannels(image.cast(latents.dtype()));
        let latents = denoise(
            &self.unet,
            scheduler.as_mut(),
            latents,
            &context,
            &DenoiseOptions {
                guidance_scale: cfg.then_some(request.guidance_scale),
                timesteps: &timesteps,
                first_step: 0,
                conditioning: Some(&conditioning),
                control: None,
                class_labels: Some(&class_labels),
                preview: PreviewKind::None,
            },
            noise,
            cancel,
            &mut collector,
        )?;
        cancel.check()?;
        Ok(GenerationOutput {
            images: self.decode_latents(latents, self.vae_tiling(request)?.as_ref())?,
            scheduler: scheduler.name(),
            notes: collector.notes,
            raw: None,
            prompt_embeds: None,
        })
    }
}
