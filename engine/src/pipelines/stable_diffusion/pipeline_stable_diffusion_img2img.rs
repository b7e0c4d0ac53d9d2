//! Image-to-image with Stable Diffusion (aka diffusers'
//! `pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py`,
//! `StableDiffusionImg2ImgPipeline`): the init image is encoded by the VAE (a posterior
//! *sample*), noised to the level where `strength` enters the schedule, and denoised from there.

use burn::tensor::{DType, Tensor, backend::Backend};

use crate::error::Result;
use crate::models::autoencoders::VaeTiling;
use crate::noise::NoiseSource;
use crate::pipelines::stable_diffusion::Conditioning;
use crate::pipelines::stable_diffusion::{GenerationOutput, StableDiffusionPipeline};
use crate::pipelines::{CancelToken, GenerationRequest, Img2ImgInput, StepObserver};
use crate::tensor_io::HostTensor;

impl<B: Backend> StableDiffusionPipeline<B> {
    /// Diffusers' `StableDiffusionImg2ImgPipeline.__call__` after `check_inputs`. Gaussian
    /// draws, in diffusers' order: the init image's posterior sample `[1, c, h/f, w/f]`, then
    /// the noise `[batch, c, h/f, w/f]`, then any scheduler noise.
    pub(crate) fn img2img(
        &self,
        request: &GenerationRequest,
        input: &Img2ImgInput,
        noise: &mut dyn NoiseSource,
        cancel: &CancelToken,
        observer: &mut dyn StepObserver,
    ) -> Result<GenerationOutput> {
        let mut scheduler = self.scheduler_for(request)?;

        // 3. Encode the prompt.
        let context = self.encode_prompt(request)?;

        // 4. Preprocess the image.
        let image = self.image_tensor(&input.image, request.width, request.height)?;

        // 5. Timesteps: strength keeps the tail of the schedule.
        scheduler.set_timesteps(request.steps)?;
        let (t_start, _) = request.strength_schedule();
        let first_step = t_start * scheduler.order();

        // 6. Latents: the image's latents noised to the first timestep's level.
        let shape = self.latent_shape(request);
        let init_latents = self.encode_image(image, self.vae_tiling(request)?.as_ref(), noise)?;
        let init_latents = init_latents.repeat_dim(0, shape[0]);
        let noise_tensor = self.randn(noise, &shape)?;
        let init_latents = init_latents.cast(noise_tensor.dtype());
        let latents = scheduler.add_noise(init_latents, noise_tensor, first_step);
        cancel.check()?;

        // 7.–8. Denoise from there and decode.
        let (latents, notes) = self.denoise_from(
            scheduler.as_mut(),
            latents,
            &context,
            request,
            first_step,
            Conditioning::none(),
            noise,
            cancel,
            observer,
        )?;
        Ok(GenerationOutput {
            images: self.decode_latents(latents, self.vae_tiling(request)?.as_ref())?,
            scheduler: scheduler.name(),
            notes,
            raw: None,
            prompt_embeds: None,
        })
    }

    /// An image `[h, w, 3]` in [0, 1], resized to `width × height` if needed, as the VAE's
    /// input: `[1, 3, height, width]` f32 in [-1, 1] (diffusers' `preprocess` + normalise).
    pub(crate) fn image_tensor(
        &self,
        image: &HostTensor,
        width: usize,
        height: usize,
    ) -> Result<Tensor<B, 4>> {
        crate::pipelines::image_to_nchw(image, width, height, &self.device)
    }

    /// VAE-encodes `image` (`[n, 3, h, w]` in [-1, 1]) and draws one posterior sample
    /// (diffusers' `retrieve_latents(vae.encode(image), generator)`), times the VAE's scaling
    /// factor: `[n, c, h/f, w/f]` in f32. With `tiling`, the image is encoded in tiles.
    pub(crate) fn encode_image(
        &self,
        image: Tensor<B, 4>,
        tiling: Option<&VaeTiling>,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor<B, 4>> {
        let posterior = self.vae.encode_tiled(image, tiling);
        let shape = posterior.mean.dims();
        let sample = self.randn(noise, &shape)?.cast(DType::F32);
        Ok(posterior
            .sample(sample)
            .mul_scalar(self.vae_config.scaling_factor))
    }
}
