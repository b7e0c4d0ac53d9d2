//! What a request will ask of memory, checked against the device's budget before any tensor work
//! (`crate::memory`): each model's attention calls, the VAE's largest feature maps, tiling.

use burn::tensor::backend::Backend;

use super::pipeline_stable_diffusion::StableDiffusionPipeline;
use crate::error::Result;
use crate::memory::{AttentionNeed, FeatureMap, MemoryBudget, ModelCalls};
use crate::models::autoencoders::VaeTiling;
use crate::pipelines::{GenerationRequest, Task};

impl<B: Backend> StableDiffusionPipeline<B> {
    /// The attention calls one run of `request` makes, per model in the order they run (the
    /// text encoder's 77 × 77 scores aside). Call after [`GenerationRequest::check_inputs`].
    pub fn attention_calls(&self, request: &GenerationRequest) -> Vec<ModelCalls> {
        // A tiling the VAE's config cannot have is refused by `generate`.
        let tiling = self.vae_tiling(request).ok().flatten();
        self.attention_calls_with(request, tiling.as_ref())
    }

    /// [`Self::attention_calls`] with the VAE tiled by `tiling` (or not), whatever the request
    /// says.
    fn attention_calls_with(
        &self,
        request: &GenerationRequest,
        tiling: Option<&VaeTiling>,
    ) -> Vec<ModelCalls> {
        let f = self.vae_config.scale_factor().max(1);
        let latent = [request.height / f, request.width / f];
        let cfg = request.do_classifier_free_guidance();
        let unet_batch = request.unet_batch();
        let tokens = request
            .prompt_embeds
            .as_ref()
            .map_or(self.tokenizer.model_max_length(), |e| {
                e.prompt_embeds.shape.get(1).copied().unwrap_or(0)
            });
        let unet_bytes = self.unet.conv_in.weight.dtype().size() as u64;
        // The VAE runs in f32 (see `into_pipeline`).
        let vae = |model, calls| ModelCalls {
            model,
            float_bytes: 4,
            calls,
        };
        let mut models = Vec::new();
        if request.task.init_image().is_some() {
            // The source image is encoded once, then repeated per image.
            let calls = self
                .vae
                .encode_attention_calls(1, [request.height, request.width], tiling);
            models.push(vae("VAE encoder", calls));
        }
        if let (Task::ControlNet(control), Some(controlnet)) =
            (&request.task, self.controlnet.as_ref())
        {
            let guess = control.guess_mode || controlnet.global_pool_conditions;
            let batch = if cfg && guess {
                request.batch
            } else {
                unet_batch
            };
            models.push(ModelCalls {
                model: "ControlNet",
                float_bytes: unet_bytes,
                calls: controlnet.attention_calls(batch, latent, tokens),
            });
        }
        models.push(ModelCalls {
            model: "UNet",
            float_bytes: unet_bytes,
            calls: self.unet.attention_calls(unet_batch, latent, tokens),
        });
        // `decode_latents` decodes one image at a time.
        let calls = self.vae.decode_attention_calls(1, latent, tiling);
        models.push(vae("VAE decoder", calls));
        models
    }

    /// The VAE's tile geometry when `request` asks for VAE tiling (an error when the VAE's
    /// `sample_size` cannot be tiled).
    pub fn vae_tiling(&self, request: &GenerationRequest) -> Result<Option<VaeTiling>> {
        if request.vae_tiling {
            self.vae_config.tiling().map(Some)
        } else {
            Ok(None)
        }
    }

    /// Refuses `request` when its attention, the UNet's largest feature map or the VAE's would
    /// not fit the memory budget, offering the other processors and, when the VAE is what does
    /// not fit, VAE tiling.
    pub(super) fn check_memory(&self, request: &GenerationRequest) -> Result<()> {
        if self.memory_budget == MemoryBudget::Unchecked {
            return Ok(());
        }
        // `generate` has refused a tiling the VAE's config cannot have.
        let geometry = self.vae_config.tiling().ok();
        // The tiling the request runs with, or the one to offer when it asks for none.
        let (tiling, untiled) = if request.vae_tiling {
            (geometry, None)
        } else {
            (None, geometry)
        };
        let models = self.attention_calls_with(request, tiling.as_ref());
        let need = AttentionNeed::of(self.attn_processor, &models);
        let tiled: Vec<_> = untiled
            .map(|t| {
                let models = self.attention_calls_with(request, Some(&t));
                (
                    "VAE tiling",
                    AttentionNeed::of(self.attn_processor, &models),
                )
            })
            .into_iter()
            .collect();
        self.memory_budget
            .check_with(&need, |p| AttentionNeed::of(p, &models), &tiled)?;

        // The UNet's largest feature map, over the whole (CFG) batch in the UNet's floats.
        let f = self.vae_config.scale_factor().max(1);
        let latent = [request.height / f, request.width / f];
        let unet_batch = request.unet_batch();
        let mut unet_map = self.unet.feature_map(unet_batch, latent);
        if let (Task::ControlNet(_), Some(controlnet)) = (&request.task, self.controlnet.as_ref()) {
            // Its residuals, computed before each UNet pass, are held through it.
            unet_map = unet_map.holding_control_residuals(controlnet.residual_elements(latent));
        }
        self.memory_budget.check_feature_map(&unet_map, None)?;

        // The VAE's largest feature maps, one image at a time, in f32.
        let map = |model, [c, h, w]: [usize; 3]| FeatureMap {
            model,
            shape: [1, c, h, w],
            float_bytes: 4,
            held: None,
        };
        if request.task.init_image().is_some() {
            let size = [request.height, request.width];
            let encode = |t: Option<&VaeTiling>| {
                map("VAE encoder", self.vae.encode_largest_activation(size, t))
            };
            let instead = untiled.map(|t| ("VAE tiling", encode(Some(&t))));
            self.memory_budget
                .check_feature_map(&encode(tiling.as_ref()), instead)?;
        }
        let decode = |t: Option<&VaeTiling>| {
            map("VAE decoder", self.vae.decode_largest_activation(latent, t))
        };
        let instead = untiled.map(|t| ("VAE tiling", decode(Some(&t))));
        self.memory_budget
            .check_feature_map(&decode(tiling.as_ref()), instead)
    }
}
