//! The UNet's down, mid and up blocks (aka diffusers' `models/unets/unet_2d_blocks.py`:
//! `DownBlock2D`, `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D`,
//! `CrossAttnUpBlock2D`; and the VAE's `DownEncoderBlock2D`, `UpDecoderBlock2D`, `UNetMidBlock2D`).

use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};

use crate::models::attention::{Transformer2DModel, Transformer2DModelConfig};
use crate::models::attention_processor::{Attention, AttentionConfig, AttnProcessor};
use crate::models::layout::MemoryFormat;
use crate::models::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};

/// What every block of one UNet shares (the `get_down_block`/`get_up_block` arguments).
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// Template for the block's resnets; in/out channels are set per resnet.
    pub resnet: ResnetBlock2DConfig,
    /// Template for the block's transformers (`None` for blocks without attention).
    pub transformer: Option<Transformer2DModelConfig>,
    pub num_layers: usize,
}

impl BlockConfig {
    /// One transformer per layer at `channels` (none for blocks without attention).
    fn transformers<B: Backend>(
        &self,
        channels: usize,
        device: &B::Device,
    ) -> Vec<Transformer2DModel<B>> {
        let Some(template) = &self.transformer else {
            return Vec::new();
        };
        let mut t = template.clone();
        t.in_channels = channels;
        (0..self.num_layers).map(|_| t.init(device)).collect()
    }
}

/// `DownBlock2D` / `CrossAttnDownBlock2D` (the latter when `attentions` is non-empty).
#[derive(Module, Debug)]
pub struct DownBlock2D<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2DModel<B>>,
    pub downsamplers: Vec<Downsample2D<B>>,
}

impl<B: Backend> DownBlock2D<B> {
    /// `add_downsample`: `Some(padding)` adds `downsamplers.0` with that padding.
    pub fn new(
        config: &BlockConfig,
        in_channels: usize,
        out_channels: usize,
        add_downsample: Option<usize>,
        device: &B::Device,
    ) -> Self {
        let resnets = (0..config.num_layers)
            .map(|i| {
                let mut r = config.resnet.clone();
                r.in_channels = if i == 0 { in_channels } else { out_channels };
                r.out_channels = out_channels;
                r.init(device)
            })
            .collect();
        let attentions = config.transformers(out_channels, device);
        Self {
            resnets,
            attentions,
            downsamplers: add_downsample
                .map(|padding| Downsample2D::new(out_channels, out_channels, padding, device))
                .into_iter()
                .collect(),
        }
    }

    /// Returns the block output and the skip connections it produces (one per resnet, plus one
    /// after the downsampler).
    ///
    /// # Shapes
    /// - x: `[b, c_in, h, w]` → `[b, c_out, h', w']` (in `format`, as are the skips)
    pub fn forward(
        &self,
        mut x: Tensor<B, 4>,
        temb: Option<&Tensor<B, 2>>,
        context: Option<&Tensor<B, 3>>,
        skips: &mut Vec<Tensor<B, 4>>,
        format: MemoryFormat,
    ) -> Tensor<B, 4> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward_in(x, temb, format);
            if let (Some(attn), Some(ctx)) = (self.attentions.get(i), context) {
                x = attn.forward_in(x, ctx, format);
            }
            skips.push(x.clone());
        }
        for down in &self.downsamplers {
            x = down.forward_in(x, format);
            skips.push(x.clone());
        }
        x
    }

    /// The VAE encoder's use: no skips kept.
    pub fn forward_encoder(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut skips = Vec::new();
        self.forward(x, None, None, &mut skips, MemoryFormat::Contiguous)
    }

    fn set_attn_processor(&mut self, processor: AttnProcessor) {
        for a in &mut self.attentions {
            a.set_attn_processor(processor);
        }
    }
}

/// `UpBlock2D` / `CrossAttnUpBlock2D` (the latter when `attentions` is non-empty).
#[derive(Module, Debug)]
pub struct UpBlock2D<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2DModel<B>>,
    pub upsamplers: Vec<Upsample2D<B>>,
}

impl<B: Backend> UpBlock2D<B> {
    /// The UNet's up block: resnet `i` takes the running features concatenated with a skip.
    /// `skip_channels[i]` is the width of the skip consumed by resnet `i`.
    pub fn new(
        config: &BlockConfig,
        prev_output_channel: usize,
        out_channels: usize,
        skip_channels: &[usize],
        add_upsample: bool,
        device: &B::Device,
    ) -> Self {
        let resnets = (0..config.num_layers)
            .map(|i| {
                let mut r = config.resnet.clone();
                let running = if i == 0 {
                    prev_output_channel
                } else {
                    out_channels
                };
                r.in_channels = running + skip_channels[i];
                r.out_channels = out_channels;
                r.init(device)
            })
            .collect();
        let attentions = config.transformers(out_channels, device);
        Self {
            resnets,
            attentions,
            upsamplers: add_upsample
                .then(|| Upsample2D::new(out_channels, out_channels, device))
                .into_iter()
                .collect(),
        }
    }

    /// The VAE decoder's `UpDecoderBlock2D`: no skips.
    pub fn new_decoder(
        config: &BlockConfig,
        in_channels: usize,
        out_channels: usize,
        add_upsample: bool,
        device: &B::Device,
    ) -> Self {
        let skips = vec![0; config.num_layers];
        Self::new(
            config,
            in_channels,
            out_channels,
            &skips,
            add_upsample,
            device,
        )
    }

    /// Pops one skip per resnet from the end of `skips`.
    ///
    /// # Shapes
    /// - x: `[b, c_prev, h, w]` → `[b, c_out, 2h, 2w]` (or `upsample_size`)
    pub fn forward(
        &self,
        mut x: Tensor<B, 4>,
        temb: Option<&Tensor<B, 2>>,
        context: Option<&Tensor<B, 3>>,
        skips: &mut Vec<Tensor<B, 4>>,
        upsample_size: Option<[usize; 2]>,
        format: MemoryFormat,
    ) -> Tensor<B, 4> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            if let Some(skip) = skips.pop() {
                x = format.cat_channels(vec![x, skip]);
            }
            x = resnet.forward_in(x, temb, format);
            if let (Some(attn), Some(ctx)) = (self.attentions.get(i), context) {
                x = attn.forward_in(x, ctx, format);
            }
        }
        for up in &self.upsamplers {
            x = up.forward_in(x, upsample_size, format);
        }
        x
    }

    /// The VAE decoder's use.
    pub fn forward_decoder(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut none = Vec::new();
        self.forward(x, None, None, &mut none, None, MemoryFormat::Contiguous)
    }

    fn set_attn_processor(&mut self, processor: AttnProcessor) {
        for a in &mut self.attentions {
            a.set_attn_processor(processor);
        }
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Module, Debug)]
pub struct UNetMidBlock2DCrossAttn<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2DModel<B>>,
}

impl<B: Backend> UNetMidBlock2DCrossAttn<B> {
    /// `config.num_layers` transformer/resnet pairs after the first resnet.
    pub fn new(config: &BlockConfig, channels: usize, device: &B::Device) -> Self {
        let mut r = config.resnet.clone();
        r.in_channels = channels;
        r.out_channels = channels;
        let mut t = config.transformer.clone();
        if let Some(t) = t.as_mut() {
            t.in_channels = channels;
        }
        Self {
            resnets: (0..=config.num_layers).map(|_| r.init(device)).collect(),
            attentions: t
                .map(|t| (0..config.num_layers).map(|_| t.init(device)).collect())
                .unwrap_or_default(),
        }
    }

    /// # Shapes
    /// - x: `[b, c, h, w]` → same (in `format`)
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        temb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
        format: MemoryFormat,
    ) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward_in(x, Some(temb), format);
        for (attn, resnet) in self.attentions.iter().zip(self.resnets.iter().skip(1)) {
            x = attn.forward_in(x, context, format);
            x = resnet.forward_in(x, Some(temb), format);
        }
        x
    }

    fn set_attn_processor(&mut self, processor: AttnProcessor) {
        for a in &mut self.attentions {
            a.set_attn_processor(processor);
        }
    }
}

/// The VAE's `UNetMidBlock2D`: resnet, self-attention with group norm, resnet.
#[derive(Module, Debug)]
pub struct UNetMidBlock2D<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Attention<B>>,
}

impl<B: Backend> UNetMidBlock2D<B> {
    /// `attention_head_dim` = channels: one head (diffusers' AutoencoderKL).
    pub fn new(
        resnet: &ResnetBlock2DConfig,
        channels: usize,
        add_attention: bool,
        device: &B::Device,
    ) -> Self {
        let mut r = resnet.clone();
        r.in_channels = channels;
        r.out_channels = channels;
        let mut attn = AttentionConfig::new(channels, 1, channels);
        attn.bias = true;
        attn.upcast = true;
        attn.norm_num_groups = Some((resnet.groups, resnet.eps));
        attn.residual_connection = true;
        Self {
            resnets: vec![r.init(device), r.init(device)],
            attentions: if add_attention {
                vec![attn.init(device)]
            } else {
                Vec::new()
            },
        }
    }

    /// # Shapes
    /// - x: `[b, c, h, w]` → same
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x, None);
        for attn in &self.attentions {
            x = attn.forward_spatial(x);
        }
        for resnet in self.resnets.iter().skip(1) {
            x = resnet.forward(x, None);
        }
        x
    }

    /// Sets the processor of the mid-block attention.
    pub fn set_attn_processor(&mut self, processor: AttnProcessor) {
        for a in &mut self.attentions {
            a.set_processor(processor);
        }
    }
}

/// Walks a UNet's blocks (used by `UNet2DConditionModel::set_attn_processor`).
pub(crate) fn set_blocks_processor<B: Backend>(
    down: &mut [DownBlock2D<B>],
    mid: Option<&mut UNetMidBlock2DCrossAttn<B>>,
    up: &mut [UpBlock2D<B>],
    processor: AttnProcessor,
) {
    for b in down {
        b.set_attn_processor(processor);
    }
    if let Some(m) = mid {
        m.set_attn_processor(processor);
    }
    for b in up {
        b.set_attn_processor(processor);
    }
}
