//! The VAE's encoder and decoder (aka diffusers' `models/autoencoders/vae.py`: `Encoder`,
//! `Decoder`, `DiagonalGaussianDistribution`).

use crate::memory::ScoreShape;
use crate::models::conv::{conv2d_forward, conv2d_output_size};
use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::{Tensor, backend::Backend};

use crate::models::attention_processor::AttnProcessor;
use crate::models::normalization::{Activation, conv2d, group_norm, group_norm_forward};
use crate::models::resnet::{
    Largest, Resample, ResnetBlock2DConfig, TimeEmbeddingNorm, conv_channels,
};
use crate::models::unets::unet_2d_blocks::{
    BlockConfig, DownBlock2D, Downsampler, UNetMidBlock2D, UpBlock2D, Upsampler,
};

/// What the encoder and decoder share.
#[derive(Debug, Clone)]
pub struct CoderConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub act: Activation,
    pub mid_block_add_attention: bool,
}

impl CoderConfig {
    fn resnet(&self) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            in_channels: 0,
            out_channels: 0,
            temb_channels: None,
            groups: self.norm_num_groups,
            eps: 1e-6,
            act: self.act,
            time_embedding_norm: TimeEmbeddingNorm::Default,
            output_scale_factor: 1.0,
            skip_time_act: false,
            resample: Resample::None,
        }
    }
}

/// Diffusers' `Encoder` (`DownEncoderBlock2D`s, a mid block, `double_z` output).
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub down_blocks: Vec<DownBlock2D<B>>,
    pub mid_block: UNetMidBlock2D<B>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
    #[module(skip)]
    pub act: Activation,
}

impl<B: Backend> Encoder<B> {
    /// `in_channels` image channels → `2 · out_channels` (mean and log-variance).
    pub fn new(
        config: &CoderConfig,
        in_channels: usize,
        out_channels: usize,
        device: &B::Device,
    ) -> Self {
        let boc = &config.block_out_channels;
        let n = boc.len();
        let block = BlockConfig {
            resnet: config.resnet(),
            attention: None,
            resnet_resampler: false,
            num_layers: config.layers_per_block,
        };
        let mut prev = boc[0];
        let down_blocks = boc
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                // DownEncoderBlock2D: downsample_padding 0 (pad right/bottom, then conv).
                let b = DownBlock2D::new(&block, prev, out, (i != n - 1).then_some(0), device);
                prev = out;
                b
            })
            .collect();
        let last = boc[n - 1];
        Self {
            conv_in: conv2d(in_channels, boc[0], 3, 1, 1, device),
            down_blocks,
            mid_block: UNetMidBlock2D::new(
                &config.resnet(),
                last,
                config.mid_block_add_attention,
                device,
            ),
            conv_norm_out: group_norm(config.norm_num_groups, last, 1e-6, device),
            conv_out: conv2d(last, 2 * out_channels, 3, 1, 1, device),
            act: config.act,
        }
    }

    /// # Shapes
    /// - x: `[b, in, h, w]` → `[b, 2·latent, h/f, w/f]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = conv2d_forward(&self.conv_in, x);
        for block in &self.down_blocks {
            x = block.forward_encoder(x);
        }
        let x = self.mid_block.forward(x);
        let x = self.act.forward(group_norm_forward(&self.conv_norm_out, x));
        conv2d_forward(&self.conv_out, x)
    }

    /// The largest feature map `[c, h, w]` of [`Self::forward`] over one image of `[h, w]`:
    /// `conv_in`'s output or a down block's, at its own resolution (a downsampler's padded input
    /// included).
    pub fn largest_activation(&self, size: [usize; 2]) -> [usize; 3] {
        let mut size = conv2d_output_size(&self.conv_in, size);
        let mut largest = Largest::default();
        largest.see(conv_channels(&self.conv_in)[0], size);
        for block in &self.down_blocks {
            largest.see_resnets(&block.resnets, size);
            if let Some(Downsampler::Conv(down)) = block.downsamplers.first() {
                // Diffusers pads right and bottom by one before a padding-0 downsampler.
                let padded = [size[0] + 1, size[1] + 1];
                largest.see(conv_channels(&down.conv)[1], padded);
                size = down.output_size(size);
            }
        }
        largest.0
    }

    /// The attention calls of [`Self::forward`] over `batch` images of `[h, w]`.
    pub fn attention_calls(&self, batch: usize, size: [usize; 2]) -> Vec<ScoreShape> {
        let mut out = Vec::new();
        let mut size = conv2d_output_size(&self.conv_in, size);
        for block in &self.down_blocks {
            size = block.attention_calls(batch, size, None, &mut out);
        }
        self.mid_block.attention_calls(batch, size, &mut out);
        out
    }
}

/// Diffusers' `Decoder` (a mid block, `UpDecoderBlock2D`s).
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub mid_block: UNetMidBlock2D<B>,
    pub up_blocks: Vec<UpBlock2D<B>>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
    #[module(skip)]
    pub act: Activation,
}

impl<B: Backend> Decoder<B> {
    /// `in_channels` latent channels → `out_channels` image channels.
    pub fn new(
        config: &CoderConfig,
        in_channels: usize,
        out_channels: usize,
        device: &B::Device,
    ) -> Self {
        let boc = &config.block_out_channels;
        let n = boc.len();
        let block = BlockConfig {
            resnet: config.resnet(),
            attention: None,
            resnet_resampler: false,
            num_layers: config.layers_per_block + 1,
        };
        let mut prev = boc[n - 1];
        let up_blocks = (0..n)
            .map(|i| {
                let out = boc[n - 1 - i];
                let b = UpBlock2D::new_decoder(&block, prev, out, i != n - 1, device);
                prev = out;
                b
            })
            .collect();
        Self {
            conv_in: conv2d(in_channels, boc[n - 1], 3, 1, 1, device),
            mid_block: UNetMidBlock2D::new(
                &config.resnet(),
                boc[n - 1],
                config.mid_block_add_attention,
                device,
            ),
            up_blocks,
            conv_norm_out: group_norm(config.norm_num_groups, boc[0], 1e-6, device),
            conv_out: conv2d(boc[0], out_channels, 3, 1, 1, device),
            act: config.act,
        }
    }

    /// # Shapes
    /// - z: `[b, latent, h, w]` → `[b, out, h·f, w·f]`
    pub fn forward(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.mid_block.forward(conv2d_forward(&self.conv_in, z));
        for block in &self.up_blocks {
            x = block.forward_decoder(x);
        }
        let x = self.act.forward(group_norm_forward(&self.conv_norm_out, x));
        conv2d_forward(&self.conv_out, x)
    }

    /// The largest feature map `[c, h, w]` of [`Self::forward`] over one latent of `[h, w]`:
    /// at full resolution, the last up block's input (the upsampled features before the conv).
    pub fn largest_activation(&self, size: [usize; 2]) -> [usize; 3] {
        let mut size = conv2d_output_size(&self.conv_in, size);
        let mut largest = Largest::default();
        largest.see(conv_channels(&self.conv_in)[0], size);
        for block in &self.up_blocks {
            largest.see_resnets(&block.resnets, size);
            if let Some(Upsampler::Conv(up)) = block.upsamplers.first() {
                size = [2 * size[0], 2 * size[1]];
                largest.see_conv(&up.conv, size);
            }
        }
        largest.0
    }

    /// The attention calls of [`Self::forward`] over `batch` latents of `[h, w]`: the mid
    /// block's, at the latents' size (its up blocks are built without attention).
    pub fn attention_calls(&self, batch: usize, size: [usize; 2]) -> Vec<ScoreShape> {
        let mut out = Vec::new();
        let size = conv2d_output_size(&self.conv_in, size);
        self.mid_block.attention_calls(batch, size, &mut out);
        out
    }
}

/// Diffusers' `DiagonalGaussianDistribution` over latents.
#[derive(Debug, Clone)]
pub struct DiagonalGaussianDistribution<B: Backend> {
    /// `[b, c, h, w]`
    pub mean: Tensor<B, 4>,
    /// `[b, c, h, w]`, clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor<B, 4>,
}

impl<B: Backend> DiagonalGaussianDistribution<B> {
    /// Splits the encoder's `[b, 2c, h, w]` moments into mean and log-variance.
    pub fn from_moments(moments: Tensor<B, 4>) -> Self {
        let c = moments.dims()[1] / 2;
        Self {
            mean: moments.clone().narrow(1, 0, c),
            logvar: moments.narrow(1, c, c).clamp(-30.0, 20.0),
        }
    }

    /// The standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Tensor<B, 4> {
        self.logvar.clone().mul_scalar(0.5).exp()
    }

    /// `mean + std · noise` with `noise` a standard-normal draw of the mean's shape.
    pub fn sample(&self, noise: Tensor<B, 4>) -> Tensor<B, 4> {
        self.mean.clone().add(self.std().mul(noise))
    }
}

/// Sets the processor of the mid-block attention of an encoder/decoder pair.
pub(crate) fn set_coder_processor<B: Backend>(
    encoder: &mut Encoder<B>,
    decoder: &mut Decoder<B>,
    p: AttnProcessor,
) {
    encoder.mid_block.set_attn_processor(p);
    decoder.mid_block.set_attn_processor(p);
}
