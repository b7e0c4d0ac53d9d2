//! Diffusers' `ControlNetModel` (aka `models/controlnets/controlnet.py`): a trainable copy of
//! the UNet's contracting half, fed the latents plus an embedded control image, whose every
//! skip and mid-block output goes through a zero-initialised 1×1 conv and is added to the
//! UNet's. The copy runs through the UNet's own down-path code ([`DownPath`]), so there is one
//! implementation of those blocks.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::{Tensor, activation::silu, backend::Backend};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::loading::single_file::{map_controlnet_keys, single_file_layers_per_block};
use crate::memory::{MemoryBudget, ScoreShape};
use crate::models::attention_processor::AttnProcessor;
use crate::models::config::{ModelConfig, read_config};
use crate::models::conv::conv2d_forward_in;
use crate::models::embeddings::{TimestepEmbedding, Timesteps};
use crate::models::layout::{MemoryFormat, set_conv_weight_layout};
use crate::models::normalization::conv2d;
use crate::models::resnet::conv_channels;
use crate::models::unets::unet_2d_blocks::{
    DownBlock2D, UNetMidBlock2DCrossAttn, set_blocks_processor,
};
use crate::models::unets::unet_2d_condition::{
    ClassEmbedding, DownHalf, DownPath, per_item_timesteps,
};
use crate::models::unets::{ClassLabels, ControlResiduals, UNet2DConditionConfig};
use crate::models::weights::{WeightFiles, load_safetensors_renamed, same_keys};
use crate::tensor_io::read_safetensors_shapes;

/// A ControlNet's `config.json`: the UNet keys its down half is built from, plus its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ControlNetConfig {
    /// Channels of the control image (3).
    pub conditioning_channels: usize,
    /// Widths of the conditioning embedding's stages; one stride-2 stage between each.
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// `"rgb"` or `"bgr"` (the control image's channels are flipped for the latter).
    pub controlnet_conditioning_channel_order: String,
    /// Residuals averaged over space (shuffle-style ControlNets); implies guess mode.
    pub global_pool_conditions: bool,
    /// SDXL ControlNet keys this model kind does not use.
    pub addition_embed_type_num_heads: Option<usize>,
    pub addition_time_embed_dim: Option<usize>,
    /// Every other key, read as the UNet's.
    #[serde(flatten)]
    pub unet: UNet2DConditionConfig,
}

impl Default for ControlNetConfig {
    fn default() -> Self {
        Self {
            conditioning_channels: 3,
            conditioning_embedding_out_channels: vec![16, 32, 96, 256],
            controlnet_conditioning_channel_order: "rgb".into(),
            global_pool_conditions: false,
            addition_embed_type_num_heads: None,
            addition_time_embed_dim: None,
            unet: UNet2DConditionConfig::default(),
        }
    }
}

impl ModelConfig for ControlNetConfig {
    fn unknown_keys(&self) -> &BTreeMap<String, Value> {
        &self.unet.extra
    }
}

/// Diffusers' `ControlNetConditioningEmbedding`: the control image (full resolution) down to
/// the latent grid, `conv_in`, then per stage a 3×3 conv and a stride-2 3×3 conv, SiLU after
/// each, then `conv_out` to the UNet's first width.
#[derive(Module, Debug)]
pub struct ControlNetConditioningEmbedding<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub blocks: Vec<Conv2d<B>>,
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> ControlNetConditioningEmbedding<B> {
    fn new(
        channels: usize,
        widths: &[usize],
        out_channels: usize,
        device: &B::Device,
    ) -> Result<Self> {
        let (first, last) = match (widths.first(), widths.last()) {
            (Some(&f), Some(&l)) => (f, l),
            _ => {
                return Err(EngineError::Unsupported(
                    "a ControlNet with no conditioning_embedding_out_channels".into(),
                ));
            }
        };
        let mut blocks = Vec::with_capacity(2 * widths.len());
        for pair in widths.windows(2) {
            blocks.push(conv2d(pair[0], pair[0], 3, 1, 1, device));
            blocks.push(conv2d(pair[0], pair[1], 3, 2, 1, device));
        }
        Ok(Self {
            conv_in: conv2d(channels, first, 3, 1, 1, device),
            blocks,
            conv_out: conv2d(last, out_channels, 3, 1, 1, device),
        })
    }

    /// `[b, channels, H, W]` → `[b, out, H / 2^stages, W / 2^stages]`, both in `format`.
    pub fn forward(&self, image: Tensor<B, 4>, format: MemoryFormat) -> Tensor<B, 4> {
        let mut x = silu(conv2d_forward_in(&self.conv_in, image, format));
        for block in &self.blocks {
            x = silu(conv2d_forward_in(block, x, format));
        }
        conv2d_forward_in(&self.conv_out, x, format)
    }

    /// How much smaller than the control image the latent grid is.
    pub fn downscale(&self) -> usize {
        1 << (self.blocks.len() / 2)
    }
}

/// Diffusers' `ControlNetModel` (SD 1.x/2.x ControlNets such as `lllyasviel/sd-controlnet-canny`).
#[derive(Module, Debug)]
pub struct ControlNetModel<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub time_proj: Timesteps,
    pub time_embedding: TimestepEmbedding<B>,
    pub class_embedding: Option<ClassEmbedding<B>>,
    pub controlnet_cond_embedding: ControlNetConditioningEmbedding<B>,
    pub down_blocks: Vec<DownBlock2D<B>>,
    pub mid_block: Option<UNetMidBlock2DCrossAttn<B>>,
    pub controlnet_down_blocks: Vec<Conv2d<B>>,
    pub controlnet_mid_block: Conv2d<B>,
    /// The control image's channels are BGR.
    pub bgr: bool,
    pub global_pool_conditions: bool,
    pub class_embeddings_concat: bool,
    #[module(skip)]
    memory_format: MemoryFormat,
}

impl ControlNetConfig {
    /// Builds the model with freshly initialised (random) weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<ControlNetModel<B>> {
        let bgr = match self.controlnet_conditioning_channel_order.as_str() {
            "rgb" => false,
            "bgr" => true,
            other => {
                return Err(EngineError::Unsupported(format!(
                    "ControlNet conditioning channel order `{other}`"
                )));
            }
        };
        // The config has no up blocks; the UNet checks count them against the down blocks.
        let mut unet = self.unet.clone();
        unet.up_block_types = vec!["UpBlock2D".into(); unet.down_block_types.len()];
        let DownHalf {
            conv_in,
            time_proj,
            time_embedding,
            class_embedding,
            encoder_hid_proj,
            add_embedding,
            down_blocks,
            mid_block,
            act: _,
        } = unet.init_down_half(device)?;
        if encoder_hid_proj.is_some()
            || add_embedding.is_some()
            || unet.time_embedding_act_fn.is_some()
        {
            return Err(EngineError::Unsupported(
                "a ControlNet with IF's text projection, text addition embedding or time \
                 embedding activation"
                    .into(),
            ));
        }
        let boc = &unet.block_out_channels;
        // One zero conv per skip the down path pushes: conv_in's, each resnet's, each
        // downsampler's.
        let mut zero_convs = vec![conv2d(boc[0], boc[0], 1, 1, 0, device)];
        for (i, block) in down_blocks.iter().enumerate() {
            for _ in 0..block.resnets.len() + block.downsamplers.len() {
                zero_convs.push(conv2d(boc[i], boc[i], 1, 1, 0, device));
            }
        }
        let last = *boc.last().ok_or_else(|| {
            EngineError::Unsupported("a ControlNet with no block_out_channels".into())
        })?;
        Ok(ControlNetModel {
            conv_in,
            time_proj,
            time_embedding,
            class_embedding,
            controlnet_cond_embedding: ControlNetConditioningEmbedding::new(
                self.conditioning_channels,
                &self.conditioning_embedding_out_channels,
                boc[0],
                device,
            )?,
            down_blocks,
            mid_block,
            controlnet_down_blocks: zero_convs,
            controlnet_mid_block: conv2d(last, last, 1, 1, 0, device),
            bgr,
            global_pool_conditions: self.global_pool_conditions,
            class_embeddings_concat: unet.class_embeddings_concat,
            memory_format: MemoryFormat::Contiguous,
        })
    }
}

impl<B: Backend> ControlNetModel<B> {
    /// Reads a diffusers ControlNet folder: `config.json` and `diffusion_pytorch_model.safetensors`
    /// (`weights` overrides the file, e.g. an `fp16` variant). Refused before any weight is read
    /// when the weights cannot fit `budget` (SD 1.5's ControlNets are 361 million weights, 1.3 GiB
    /// in f32).
    pub fn load(
        dir: &Path,
        variant: Option<&str>,
        budget: &MemoryBudget,
        device: &B::Device,
    ) -> Result<(Self, ControlNetConfig)> {
        let config: ControlNetConfig = read_config(&dir.join("config.json"))?;
        let mut model = config.init(device)?;
        budget.check_weights("the ControlNet", model.num_params())?;
        WeightFiles::find(dir, "diffusion_pytorch_model", variant)?
            .load_into(&mut model, same_keys)?;
        Ok((model, config))
    }

    /// Reads a ControlNet single-file checkpoint (the original releases' `control_model.`
    /// layout, see [`map_controlnet_keys`]). Such files carry no config: the down half is
    /// `unet`'s (the UNet it was trained beside, as `ControlNetModel.from_unet`), the latent and
    /// control channels and the conditioning embedding's widths are read from the tensors.
    /// Refused before any weight is read when the weights cannot fit `budget`.
    pub fn load_single_file(
        file: &Path,
        unet: &UNet2DConditionConfig,
        budget: &MemoryBudget,
        device: &B::Device,
    ) -> Result<(Self, ControlNetConfig)> {
        let tensors = read_safetensors_shapes(file)?;
        let mapped = map_controlnet_keys(&tensors, single_file_layers_per_block(unet)?, file)?;
        let config = ControlNetConfig {
            conditioning_channels: mapped.conditioning_channels,
            conditioning_embedding_out_channels: mapped.conditioning_embedding_out_channels,
            unet: UNet2DConditionConfig {
                in_channels: mapped.in_channels,
                ..unet.clone()
            },
            ..ControlNetConfig::default()
        };
        let mut model = config.init(device)?;
        budget.check_weights("the ControlNet", model.num_params())?;
        load_safetensors_renamed(&mut model, file, &mapped.renames)?;
        Ok((model, config))
    }

    /// The control image's downscale to the latent grid (8 for SD).
    pub fn downscale(&self) -> usize {
        self.controlnet_cond_embedding.downscale()
    }

    /// Sets the attention processor of every attention layer.
    pub fn set_attn_processor(&mut self, processor: AttnProcessor) {
        set_blocks_processor(
            &mut self.down_blocks,
            self.mid_block.as_mut(),
            &mut [],
            processor,
        );
    }

    /// The memory format of the feature maps inside, as the UNet's
    /// ([`crate::models::unets::UNet2DConditionModel::set_memory_format`]): conv weights stored in its order,
    /// activations kept in it from the control image and `conv_in` to the zero convolutions.
    /// Inputs and residuals stay NCHW (the residuals as views of the format's memory, which a
    /// UNet in the same format adds without a copy).
    pub fn set_memory_format(&mut self, format: MemoryFormat) {
        if format == self.memory_format {
            return;
        }
        set_conv_weight_layout(self, format);
        self.memory_format = format;
    }

    /// The memory format set by [`Self::set_memory_format`].
    pub fn memory_format(&self) -> MemoryFormat {
        self.memory_format
    }

    /// One ControlNet evaluation: the residuals for the UNet, scaled by `conditioning_scale`
    /// (in guess mode by `logspace(-1, 0)` × scale, shallow to deep, as diffusers does).
    ///
    /// # Shapes
    /// - sample: `[batch, latent channels, h, w]` (the scaled model input)
    /// - context: `[batch, tokens, dim]`
    /// - control: `[batch, conditioning channels, h · f, w · f]` in [0, 1]
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timesteps: &[f64],
        context: &Tensor<B, 3>,
        control: Tensor<B, 4>,
        conditioning_scale: f64,
        guess_mode: bool,
    ) -> Result<ControlResiduals<B>> {
        let [batch, _, h, w] = sample.dims();
        let [cb, _, ch, cw] = control.dims();
        let f = self.downscale();
        if cb != batch || ch != h * f || cw != w * f {
            return Err(EngineError::invalid(
                "control_image",
                format!(
                    "shape {:?} does not fit latents {:?} (expected [{batch}, c, {}, {}])",
                    control.dims(),
                    sample.dims(),
                    h * f,
                    w * f
                ),
            ));
        }
        let timesteps = per_item_timesteps(timesteps, batch)?;
        let control = if self.bgr { control.flip([1]) } else { control };
        let down = self.down_path();
        let emb = down.embedding(
            &timesteps,
            &ClassLabels::None,
            sample.dtype(),
            &sample.device(),
        )?;
        let format = self.memory_format;
        let cond = self
            .controlnet_cond_embedding
            .forward(format.from_nchw(control.cast(sample.dtype())), format);
        let (x, skips) = down.run(format.from_nchw(sample), &emb, context, Some(cond), format);
        let n = skips.len();
        let scales: Vec<f64> = if guess_mode && !self.global_pool_conditions {
            // torch.logspace(-1, 0, n + 1): n + 1 exponents evenly from -1 to 0.
            (0..=n)
                .map(|i| 10f64.powf(-1.0 + i as f64 / n as f64) * conditioning_scale)
                .collect()
        } else {
            vec![conditioning_scale; n + 1]
        };
        let pool = |t: Tensor<B, 4>| -> Tensor<B, 4> {
            if self.global_pool_conditions {
                t.mean_dim(2).mean_dim(3)
            } else {
                t
            }
        };
        let down: Vec<Tensor<B, 4>> = skips
            .into_iter()
            .zip(&self.controlnet_down_blocks)
            .zip(&scales)
            .map(|((skip, zero_conv), &scale)| {
                let residual = conv2d_forward_in(zero_conv, skip, format).mul_scalar(scale);
                pool(format.to_nchw(residual))
            })
            .collect();
        let mid = conv2d_forward_in(&self.controlnet_mid_block, x, format).mul_scalar(scales[n]);
        let mid = pool(format.to_nchw(mid));
        Ok(ControlResiduals { down, mid })
    }

    /// The elements of one image's residuals over `[h, w]` latents (the down path's skips and
    /// the mid block's output, or one value per channel where the conditions are pooled): what
    /// the UNet's pass holds beside its own maps.
    pub fn residual_elements(&self, size: [usize; 2]) -> usize {
        if self.global_pool_conditions {
            let mut channels: usize = self
                .controlnet_down_blocks
                .iter()
                .map(|c| conv_channels(c)[0])
                .sum();
            channels += conv_channels(&self.controlnet_mid_block)[0];
            return channels;
        }
        self.down_path().skip_elements(size)
    }

    /// The UNet down-path code's view of this model.
    fn down_path(&self) -> DownPath<'_, B> {
        DownPath {
            conv_in: &self.conv_in,
            time_proj: &self.time_proj,
            time_embedding: &self.time_embedding,
            class_embedding: self.class_embedding.as_ref(),
            class_embeddings_concat: self.class_embeddings_concat,
            down_blocks: &self.down_blocks,
            mid_block: self.mid_block.as_ref(),
        }
    }

    /// The attention calls of one forward pass over `batch` latents of `[h, w]` attending to
    /// `context` text tokens, in order.
    pub fn attention_calls(
        &self,
        batch: usize,
        size: [usize; 2],
        context: usize,
    ) -> Vec<ScoreShape> {
        let mut out = Vec::new();
        self.down_path()
            .attention_calls(batch, size, context, &mut out);
        out
    }
}
