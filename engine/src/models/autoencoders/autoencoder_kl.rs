//! Diffusers' `AutoencoderKL` (aka `models/autoencoders/autoencoder_kl.py`), configured from
//! `vae/config.json`.

use crate::memory::ScoreShape;
use crate::models::conv::{conv2d_forward, conv2d_output_size};
use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::{Tensor, backend::Backend};
use serde::Deserialize;
use serde_json::Value;

use super::tiling::VaeTiling;
use super::vae::{
    CoderConfig, Decoder, DiagonalGaussianDistribution, Encoder, set_coder_processor,
};
use crate::error::{EngineError, Result};
use crate::models::attention_processor::AttnProcessor;
use crate::models::config::{ModelConfig, read_config};
use crate::models::normalization::{Activation, conv2d};
use crate::models::weights::{WeightFiles, same_keys};

/// `vae/config.json`, with diffusers' `__init__` defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            extra: BTreeMap::new(),
        }
    }
}

impl ModelConfig for AutoencoderKLConfig {
    fn unknown_keys(&self) -> &BTreeMap<String, Value> {
        &self.extra
    }
}

impl AutoencoderKLConfig {
    /// The spatial factor between image and latents: `2^(blocks - 1)` (8 for SD).
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Diffusers' tile geometry for this VAE (`enable_tiling`).
    pub fn tiling(&self) -> Result<VaeTiling> {
        VaeTiling::new(self.sample_size, self.scale_factor())
    }

    /// Builds the model with freshly initialised (random) weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<AutoencoderKL<B>> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(EngineError::Unsupported(
                "VAE with no block_out_channels".into(),
            ));
        }
        if self
            .down_block_types
            .iter()
            .any(|t| t != "DownEncoderBlock2D")
            || self.up_block_types.iter().any(|t| t != "UpDecoderBlock2D")
            || self.down_block_types.len() != n
            || self.up_block_types.len() != n
        {
            return Err(EngineError::Unsupported(format!(
                "VAE blocks {:?} / {:?}",
                self.down_block_types, self.up_block_types
            )));
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c % self.norm_num_groups != 0)
        {
            return Err(EngineError::Unsupported(format!(
                "VAE block of {c} channels with {} groups",
                self.norm_num_groups
            )));
        }
        let coder = CoderConfig {
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            norm_num_groups: self.norm_num_groups,
            act: Activation::from_name(&self.act_fn)?,
            mid_block_add_attention: self.mid_block_add_attention,
        };
        let latent = self.latent_channels;
        Ok(AutoencoderKL {
            encoder: Encoder::new(&coder, self.in_channels, latent, device),
            decoder: Decoder::new(&coder, latent, self.out_channels, device),
            quant_conv: self
                .use_quant_conv
                .then(|| conv2d(2 * latent, 2 * latent, 1, 1, 0, device)),
            post_quant_conv: self
                .use_post_quant_conv
                .then(|| conv2d(latent, latent, 1, 1, 0, device)),
        })
    }
}

/// Diffusers' `AutoencoderKL`.
#[derive(Module, Debug)]
pub struct AutoencoderKL<B: Backend> {
    pub encoder: Encoder<B>,
    pub decoder: Decoder<B>,
    pub quant_conv: Option<Conv2d<B>>,
    pub post_quant_conv: Option<Conv2d<B>>,
}

impl<B: Backend> AutoencoderKL<B> {
    /// Reads `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` (a diffusers `vae/`
    /// folder), or the shards its index lists; `variant` (e.g. `fp16`) is preferred where the
    /// folder has it.
    pub fn load(
        dir: &Path,
        variant: Option<&str>,
        device: &B::Device,
    ) -> Result<(Self, AutoencoderKLConfig)> {
        let config: AutoencoderKLConfig = read_config(&dir.join("config.json"))?;
        let mut model = config.init(device)?;
        WeightFiles::find(dir, "diffusion_pytorch_model", variant)?
            .load_into(&mut model, same_keys)?;
        Ok((model, config))
    }

    /// Images in [-1, 1] to the latent posterior.
    ///
    /// # Shapes
    /// - image: `[b, 3, h, w]` → distribution over `[b, latent, h/f, w/f]`
    pub fn encode(&self, image: Tensor<B, 4>) -> DiagonalGaussianDistribution<B> {
        DiagonalGaussianDistribution::from_moments(self.moments(image))
    }

    /// [`Self::encode`], in tiles when `tiling` is given and the image is larger than one
    /// (diffusers' `encode` with `use_tiling`).
    pub fn encode_tiled(
        &self,
        image: Tensor<B, 4>,
        tiling: Option<&VaeTiling>,
    ) -> DiagonalGaussianDistribution<B> {
        let [_, _, h, w] = image.dims();
        match tiling.filter(|t| t.tiles_encode([h, w])) {
            Some(tiling) => DiagonalGaussianDistribution::from_moments(
                tiling.encode_grid().run(image, |tile| self.moments(tile)),
            ),
            None => self.encode(image),
        }
    }

    /// The encoder and `quant_conv`: the posterior's mean and log-variance, stacked.
    fn moments(&self, image: Tensor<B, 4>) -> Tensor<B, 4> {
        let moments = self.encoder.forward(image);
        match &self.quant_conv {
            Some(conv) => conv2d_forward(conv, moments),
            None => moments,
        }
    }

    /// Latents (already divided by the scaling factor) to images in about [-1, 1].
    ///
    /// # Shapes
    /// - z: `[b, latent, h, w]` → `[b, 3, h·f, w·f]`
    pub fn decode(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv2d_forward(conv, z),
            None => z,
        };
        self.decoder.forward(z)
    }

    /// [`Self::decode`], in tiles when `tiling` is given and the latents are larger than one
    /// tile (diffusers' `decode` with `use_tiling`).
    pub fn decode_tiled(&self, z: Tensor<B, 4>, tiling: Option<&VaeTiling>) -> Tensor<B, 4> {
        let [_, _, h, w] = z.dims();
        match tiling.filter(|t| t.tiles_decode([h, w])) {
            Some(tiling) => tiling.decode_grid().run(z, |tile| self.decode(tile)),
            None => self.decode(z),
        }
    }

    /// The image sizes [`Self::encode_tiled`] runs the encoder on: the tiles' with `tiling`,
    /// where the image is larger than one, else the image's.
    fn encoder_inputs(&self, size: [usize; 2], tiling: Option<&VaeTiling>) -> Vec<[usize; 2]> {
        match tiling.filter(|t| t.tiles_encode(size)) {
            Some(tiling) => tiling.encode_grid().tile_sizes(size),
            None => vec![size],
        }
    }

    /// The sizes [`Self::decode_tiled`] runs the decoder on (after `post_quant_conv`): the
    /// tiles' with `tiling`, where the latents are larger than one, else the latents'.
    fn decoder_inputs(&self, size: [usize; 2], tiling: Option<&VaeTiling>) -> Vec<[usize; 2]> {
        let tiles = match tiling.filter(|t| t.tiles_decode(size)) {
            Some(tiling) => tiling.decode_grid().tile_sizes(size),
            None => vec![size],
        };
        match &self.post_quant_conv {
            Some(conv) => tiles
                .into_iter()
                .map(|size| conv2d_output_size(conv, size))
                .collect(),
            None => tiles,
        }
    }

    /// The attention calls of [`Self::encode_tiled`] over `batch` images of `[h, w]`.
    pub fn encode_attention_calls(
        &self,
        batch: usize,
        size: [usize; 2],
        tiling: Option<&VaeTiling>,
    ) -> Vec<ScoreShape> {
        self.encoder_inputs(size, tiling)
            .into_iter()
            .flat_map(|size| self.encoder.attention_calls(batch, size))
            .collect()
    }

    /// The attention calls of [`Self::decode_tiled`] over `batch` latents of `[h, w]`.
    pub fn decode_attention_calls(
        &self,
        batch: usize,
        size: [usize; 2],
        tiling: Option<&VaeTiling>,
    ) -> Vec<ScoreShape> {
        self.decoder_inputs(size, tiling)
            .into_iter()
            .flat_map(|size| self.decoder.attention_calls(batch, size))
            .collect()
    }

    /// The largest feature map `[c, h, w]` of [`Self::encode_tiled`] over one image of
    /// `[h, w]` (of its largest tile when tiled).
    pub fn encode_largest_activation(
        &self,
        size: [usize; 2],
        tiling: Option<&VaeTiling>,
    ) -> [usize; 3] {
        largest(
            self.encoder_inputs(size, tiling)
                .into_iter()
                .map(|size| self.encoder.largest_activation(size)),
        )
    }

    /// The largest feature map `[c, h, w]` of [`Self::decode_tiled`] over one latent of
    /// `[h, w]` (of its largest tile when tiled).
    pub fn decode_largest_activation(
        &self,
        size: [usize; 2],
        tiling: Option<&VaeTiling>,
    ) -> [usize; 3] {
        largest(
            self.decoder_inputs(size, tiling)
                .into_iter()
                .map(|size| self.decoder.largest_activation(size)),
        )
    }

    /// Sets the processor of the mid-block attentions.
    pub fn set_attn_processor(&mut self, processor: AttnProcessor) {
        set_coder_processor(&mut self.encoder, &mut self.decoder, processor);
    }
}

/// The `[c, h, w]` with the most elements.
fn largest(shapes: impl Iterator<Item = [usize; 3]>) -> [usize; 3] {
    shapes
        .max_by_key(|s| s.iter().product::<usize>())
        .unwrap_or_default()
}
