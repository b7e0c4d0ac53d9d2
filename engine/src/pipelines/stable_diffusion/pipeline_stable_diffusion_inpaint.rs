//! Inpainting with Stable Diffusion (aka diffusers'
//! `pipelines/stable_diffusion/pipeline_stable_diffusion_inpaint.py`,
//! `StableDiffusionInpaintPipeline`).
//!
//! With the 9-channel inpainting UNet every step sees `cat[latents, mask, masked_image_latents]`;
//! with a plain 4-channel UNet the known region is re-noised and blended back after every step.
//! `padding_mask_crop` ("inpaint only masked") works on the mask's box at full resolution and
//! pastes the result back through the mask.

use burn::tensor::{Tensor, backend::Backend};

use crate::error::Result;
use crate::noise::NoiseSource;
use crate::pipelines::image_processor::{
    CropRegion, binarize, blur_mask, crop, crop_region, mask_to_latent_grid, overlay, resize,
};
use crate::pipelines::stable_diffusion::Conditioning;
use crate::pipelines::stable_diffusion::{
    GenerationOutput, InpaintConditioning, StableDiffusionPipeline,
};
use crate::pipelines::{CancelToken, GenerationRequest, InpaintInput, StepObserver};
use crate::tensor_io::HostTensor;

/// The inputs of an inpainting run at the working size.
struct Prepared {
    /// The image as the VAE sees it (cropped and resized when "only masked").
    image: HostTensor,
    /// The binarised mask at the working size, `[h, w]`, 1 = repaint.
    mask: HostTensor,
    /// The blurred, unbinarised mask at the original size (the overlay's blend weights).
    soft_mask: HostTensor,
    /// The crop box when "only masked".
    crop: Option<CropRegion>,
}

impl<B: Backend> StableDiffusionPipeline<B> {
    /// Diffusers' `StableDiffusionInpaintPipeline.__call__` after `check_inputs`. Gaussian
    /// draws, in diffusers' order: the init image's posterior sample (when strength < 1 or the
    /// UNet has 4 channels), the noise (unless `latents` are given), the masked image's
    /// posterior sample (drawn even for a 4-channel UNet, which does not use it), then any
    /// scheduler noise.
    pub(crate) fn inpaint(
        &self,
        request: &GenerationRequest,
        input: &InpaintInput,
        noise: &mut dyn NoiseSource,
        cancel: &CancelToken,
        observer: &mut dyn StepObserver,
    ) -> Result<GenerationOutput> {
        let mut scheduler = self.scheduler_for(request)?;
        let prepared = prepare_inputs(input, request.width, request.height)?;

        // 3. Encode the prompt.
        let context = self.encode_prompt(request)?;

        // 4. Timesteps.
        scheduler.set_timesteps(request.steps)?;
        let (t_start, _) = request.strength_schedule();
        let first_step = t_start * scheduler.order();
        let is_strength_max = request.strength() == 1.0;

        // 5. Preprocess the image.
        let (width, height) = (request.width, request.height);
        let init_image = self.image_tensor(&prepared.image, width, height)?;

        // 6. Latents.
        let shape = self.latent_shape(request);
        let plain_unet = self.unet_config.in_channels == shape[1];
        let image_latents = if plain_unet || (request.latents.is_none() && !is_strength_max) {
            Some(
                self.encode_image(
                    init_image.clone(),
                    self.vae_tiling(request)?.as_ref(),
                    noise,
                )?
                .repeat_dim(0, shape[0]),
            )
        } else {
            None
        };
        let (latents, noise_tensor) = match &request.latents {
            Some(given) => {
                let given = given.to_tensor::<B, 4>("latents", &self.device)?;
                (
                    given.clone().mul_scalar(scheduler.init_noise_sigma()),
                    given,
                )
            }
            None => {
                let drawn = self.randn(noise, &shape)?;
                let latents = match (&image_latents, is_strength_max) {
                    (Some(image_latents), false) => scheduler.add_noise(
                        image_latents.clone().cast(drawn.dtype()),
                        drawn.clone(),
                        first_step,
                    ),
                    _ => drawn.clone().mul_scalar(scheduler.init_noise_sigma()),
                };
                (latents, drawn)
            }
        };
        let dtype = latents.dtype();

        // 7. Mask and masked-image latents.
        let mask_grid = mask_to_latent_grid(&prepared.mask, shape[2], shape[3]);
        let mask = mask_grid
            .to_tensor::<B, 2>("mask", &self.device)?
            .cast(dtype)
            .reshape([1, 1, shape[2], shape[3]])
            .repeat_dim(0, shape[0]);
        let keep = prepared
            .mask
            .to_tensor::<B, 2>("mask", &self.device)?
            .cast(init_image.dtype())
            .neg()
            .add_scalar(1.0)
            .unsqueeze::<4>();
        let masked_image = init_image.mul(keep);
        let masked_image_latents = self
            .encode_image(masked_image, self.vae_tiling(request)?.as_ref(), noise)?
            .cast(dtype)
            .repeat_dim(0, shape[0]);
        cancel.check()?;

        // 8. Denoise.
        let cfg_pair = |t: Tensor<B, 4>| -> Tensor<B, 4> {
            if request.do_classifier_free_guidance() {
                Tensor::cat(vec![t.clone(), t], 0)
            } else {
                t
            }
        };
        let conditioning = match image_latents {
            // Always encoded for a plain UNet (above).
            Some(image_latents) if plain_unet => InpaintConditioning::Blend {
                image_latents: image_latents.cast(dtype),
                noise: noise_tensor,
                mask,
            },
            _ => InpaintConditioning::ExtraChannels(cfg_pair(Tensor::cat(
                vec![mask, masked_image_latents],
                1,
            ))),
        };
        let (latents, notes) = self.denoise_from(
            scheduler.as_mut(),
            latents,
            &context,
            request,
            first_step,
            Conditioning {
                inpaint: Some(&conditioning),
                control: None,
            },
            noise,
            cancel,
            observer,
        )?;

        // 9. Decode, and paste back when "only masked".
        let mut images = self.decode_latents(latents, self.vae_tiling(request)?.as_ref())?;
        if let Some(region) = prepared.crop {
            images = paste_back(&images, &prepared.soft_mask, &input.image, region)?;
        }
        Ok(GenerationOutput {
            images,
            scheduler: scheduler.name(),
            notes,
            raw: None,
            prompt_embeds: None,
        })
    }
}

/// The blurred mask, the crop box when "only masked", and the image and binarised mask at the
/// working size (diffusers' `mask_processor.blur` by the caller, `get_crop_region`, then
/// `preprocess` of image and mask with `crops_coords`).
fn prepare_inputs(input: &InpaintInput, width: usize, height: usize) -> Result<Prepared> {
    let image = &input.image;
    let soft_mask = blur_mask(&input.mask, input.mask_blur as f32)?;
    let (image, mask, crop_box) = match input.padding_mask_crop {
        Some(pad) => {
            let region = crop_region(&soft_mask, width, height, pad)?;
            (
                resize(&crop(image, region), width, height)?,
                resize(&crop(&soft_mask, region), width, height)?,
                Some(region),
            )
        }
        None => (
            resize(image, width, height)?,
            resize(&soft_mask, width, height)?,
            None,
        ),
    };
    Ok(Prepared {
        image,
        mask: binarize(&mask),
        soft_mask,
        crop: crop_box,
    })
}

/// Every generated crop `[b, h, w, 3]` pasted into the original through the soft mask:
/// `[b, original h, original w, 3]`.
fn paste_back(
    images: &HostTensor,
    soft_mask: &HostTensor,
    original: &HostTensor,
    region: CropRegion,
) -> Result<HostTensor> {
    let per = images.shape[1..].iter().product::<usize>();
    let mut values = Vec::new();
    for generated in images.values.chunks(per.max(1)) {
        let generated = HostTensor {
            shape: images.shape[1..].to_vec(),
            values: generated.to_vec(),
        };
        values.extend(overlay(soft_mask, original, &generated, region)?.values);
    }
    let mut shape = vec![images.shape[0]];
    shape.extend_from_slice(&original.shape);
    Ok(HostTensor { shape, values })
}
