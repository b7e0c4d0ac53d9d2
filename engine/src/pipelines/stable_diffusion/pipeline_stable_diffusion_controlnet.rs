//! Text-to-image guided by a ControlNet (aka diffusers'
//! `pipelines/controlnet/pipeline_controlnet.py`, `StableDiffusionControlNetPipeline`): the
//! txt2img loop, with the ControlNet's residuals added to the UNet at every step of the
//! guidance window.

use burn::tensor::{DType, backend::Backend};

use crate::error::{EngineError, Result};
use crate::pipelines::image_processor::resize;
use crate::pipelines::stable_diffusion::{ControlConditioning, StableDiffusionPipeline};
use crate::pipelines::{ControlNetInput, GenerationRequest};

impl<B: Backend> StableDiffusionPipeline<B> {
    /// The loaded ControlNet with the request's control image (diffusers' `prepare_image`:
    /// resized to the output size, [0, 1], one per image), scale, window and guess mode.
    pub(crate) fn control_conditioning(
        &self,
        request: &GenerationRequest,
        input: &ControlNetInput,
    ) -> Result<ControlConditioning<'_, B>> {
        let model = self.controlnet.as_ref().ok_or_else(|| {
            EngineError::invalid(
                "controlnet",
                "the controlnet pipeline needs a ControlNet: load one first (--controlnet)",
            )
        })?;
        let image = resize(&input.image, request.width, request.height)?
            .to_tensor::<B, 3>("control_image", &self.device)?
            .cast(DType::F32)
            .permute([2, 0, 1])
            .unsqueeze_dim::<4>(0)
            .repeat_dim(0, request.batch);
        let guess_mode = input.guess_mode || model.global_pool_conditions;
        // Paired once here, not every step: the ControlNet sees the whole CFG batch unless in
        // guess mode (diffusers' `prepare_image`).
        let image = if request.do_classifier_free_guidance() && !guess_mode {
            image.repeat_dim(0, 2)
        } else {
            image
        };
        Ok(ControlConditioning {
            model,
            image,
            scale: input.scale,
            start: input.guidance.0,
            end: input.guidance.1,
            guess_mode,
        })
    }
}
