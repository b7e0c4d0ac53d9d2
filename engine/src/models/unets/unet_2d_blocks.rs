//! The UNet's down, mid and up blocks (aka diffusers' `models/unets/unet_2d_blocks.py`:
//! `DownBlock2D`, `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D`,
//! `CrossAttnUpBlock2D`; IF's `ResnetDownsampleBlock2D`, `SimpleCrossAttnDownBlock2D`,
//! `UNetMidBlock2DSimpleCrossAttn`, `ResnetUpsampleBlock2D`, `SimpleCrossAttnUpBlock2D`; and the
//! VAE's `DownEncoderBlock2D`, `UpDecoderBlock2D`, `UNetMidBlock2D`).
//!
//! One struct per direction covers every kind: the attention is a transformer (SD) or an
//! added-KV attention (IF, "simple cross-attention"), and the resampler a conv or a resnet that
//! resamples (IF's `Resnet*sampleBlock2D`).

use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};

use crate::memory::ScoreShape;
use crate::models::attention::{Transformer2DModel, Transformer2DModelConfig};
use crate::models::attention_processor::{
    AddedKvAttention, AddedKvAttentionConfig, Attention, AttentionConfig, AttnProcessor,
};
use crate::models::layout::MemoryFormat;
use crate::models::resnet::{
    Downsample2D, Largest, Resample, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D,
};

/// The attention layer of a block: which one is given by the block type.
#[derive(Debug, Clone)]
pub enum AttentionTemplate {
    /// `CrossAttn*Block2D` / `UNetMidBlock2DCrossAttn`: a `Transformer2DModel` (in channels set
    /// per block).
    Transformer(Transformer2DModelConfig),
    /// `SimpleCrossAttn*Block2D` / `UNetMidBlock2DSimpleCrossAttn`: an added-KV attention.
    AddedKv(AddedKvAttentionConfig),
}

impl AttentionTemplate {
    fn init<B: Backend>(&self, channels: usize, device: &B::Device) -> BlockAttention<B> {
        match self {
            Self::Transformer(t) => {
                let mut t = t.clone();
                t.in_channels = channels;
                BlockAttention::Transformer(t.init(device))
            }
            Self::AddedKv(a) => BlockAttention::AddedKv(a.init(channels, device)),
        }
    }
}

/// A block's attention layer (`attentions.i`).
// A handful per UNet, built once: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum BlockAttention<B: Backend> {
    Transformer(Transformer2DModel<B>),
    AddedKv(AddedKvAttention<B>),
}

impl<B: Backend> BlockAttention<B> {
    /// A transformer needs the text: without one it is skipped (the VAE's blocks have none).
    fn forward_in(
        &self,
        x: Tensor<B, 4>,
        context: Option<&Tensor<B, 3>>,
        format: MemoryFormat,
    ) -> Tensor<B, 4> {
        match (self, context) {
            (Self::Transformer(t), Some(ctx)) => t.forward_in(x, ctx, format),
            (Self::Transformer(_), None) => x,
            (Self::AddedKv(a), ctx) => a.forward_in(x, ctx, format),
        }
    }

    fn set_attn_processor(&mut self, processor: AttnProcessor) {
        match self {
            Self::Transformer(t) => t.set_attn_processor(processor),
            Self::AddedKv(a) => a.set_processor(processor),
        }
    }

    /// The calls of [`Self::forward_in`] over `tokens` image tokens and `context` text tokens.
    fn attention_calls(
        &self,
        batch: usize,
        tokens: usize,
        context: Option<usize>,
        out: &mut Vec<ScoreShape>,
    ) {
        match (self, context) {
            (Self::Transformer(t), Some(ctx)) => t.attention_calls(batch, tokens, ctx, out),
            (Self::Transformer(_), None) => {}
            (Self::AddedKv(a), ctx) => out.push(a.score_shape(batch, tokens, ctx)),
        }
    }
}

/// Sees, in `largest`, the widest per-pixel tensor of a block's `attentions` over a `[h, w]`
/// feature map: a transformer's feed-forward projection (IF's added-KV attention projects to
/// its channels, which the block's resnets already show).
pub(crate) fn see_attentions<B: Backend>(
    largest: &mut Largest,
    attentions: &[BlockAttention<B>],
    size: [usize; 2],
) {
    for a in attentions {
        if let BlockAttention::Transformer(t) = a {
            largest.see(t.widest(), size);
        }
    }
}

/// Appends the attention calls of a block's `attentions` over a `[h, w]` feature map (up and
/// mid blocks run them all at their input's size).
pub(crate) fn blocks_attention_calls<B: Backend>(
    attentions: &[BlockAttention<B>],
    batch: usize,
    [h, w]: [usize; 2],
    context: Option<usize>,
    out: &mut Vec<ScoreShape>,
) {
    for a in attentions {
        a.attention_calls(batch, h * w, context, out);
    }
}

/// What every block of one UNet shares (the `get_down_block`/`get_up_block` arguments).
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// Template for the block's resnets; in/out channels are set per resnet.
    pub resnet: ResnetBlock2DConfig,
    /// Template for the block's attention layers (`None` for blocks without attention).
    pub attention: Option<AttentionTemplate>,
    pub num_layers: usize,
    /// The resampler is a resnet that resamples (IF's blocks) rather than a conv.
    pub resnet_resampler: bool,
}

impl BlockConfig {
    /// One attention layer per layer at `channels` (none for blocks without attention).
    fn attentions<B: Backend>(
        &self,
        channels: usize,
        device: &B::Device,
    ) -> Vec<BlockAttention<B>> {
        let Some(template) = &self.attention else {
            return Vec::new();
        };
        (0..self.num_layers)
            .map(|_| template.init(channels, device))
            .collect()
    }

    /// The resampling resnet of IF's blocks (`channels → channels`).
    fn resampling_resnet<B: Backend>(
        &self,
        channels: usize,
        resample: Resample,
        device: &B::Device,
    ) -> ResnetBlock2D<B> {
        let mut r = self.resnet.clone();
        r.in_channels = channels;
        r.out_channels = channels;
        r.resample = resample;
        r.init(device)
    }
}

/// A down block's `downsamplers.0`.
// A handful per UNet, built once: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Downsampler<B: Backend> {
    /// A stride-2 conv (`Downsample2D`).
    Conv(Downsample2D<B>),
    /// A resnet that average-pools (`ResnetBlock2D(down=True)`), conditioned on the time.
    Resnet(ResnetBlock2D<B>),
}

/// An up block's `upsamplers.0`.
// A handful per UNet, built once: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Upsampler<B: Backend> {
    /// Nearest ×2 then a conv (`Upsample2D`).
    Conv(Upsample2D<B>),
    /// A resnet that upsamples (`ResnetBlock2D(up=True)`), conditioned on the time.
    Resnet(ResnetBlock2D<B>),
}

/// `DownBlock2D` / `CrossAttnDownBlock2D` / `ResnetDownsampleBlock2D` /
/// `SimpleCrossAttnDownBlock2D` (by their attention and downsampler).
#[derive(Module, Debug)]
pub struct DownBlock2D<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<BlockAttention<B>>,
    pub downsamplers: Vec<Downsampler<B>>,
}

impl<B: Backend> DownBlock2D<B> {
    /// `add_downsample`: `Some(padding)` adds `downsamplers.0` (a conv with that padding, or the
    /// resampling resnet).
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
        let attentions = config.attentions(out_channels, device);
        Self {
            resnets,
            attentions,
            downsamplers: add_downsample
                .map(|padding| {
                    if config.resnet_resampler {
                        Downsampler::Resnet(config.resampling_resnet(
                            out_channels,
                            Resample::Down,
                            device,
                        ))
                    } else {
                        Downsampler::Conv(Downsample2D::new(
                            out_channels,
                            out_channels,
                            padding,
                            device,
                        ))
                    }
                })
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
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward_in(x, context, format);
            }
            skips.push(x.clone());
        }
        for down in &self.downsamplers {
            x = match down {
                Downsampler::Conv(d) => d.forward_in(x, format),
                Downsampler::Resnet(r) => r.forward_in(x, temb, format),
            };
            skips.push(x.clone());
        }
        x
    }

    /// Appends the attention calls of [`Self::forward`] over a `[h, w]` input and returns the
    /// output's size.
    pub fn attention_calls(
        &self,
        batch: usize,
        size: [usize; 2],
        context: Option<usize>,
        out: &mut Vec<ScoreShape>,
    ) -> [usize; 2] {
        blocks_attention_calls(&self.attentions, batch, size, context, out);
        self.downsamplers
            .iter()
            .fold(size, |[h, w], down| match down {
                Downsampler::Conv(d) => d.output_size([h, w]),
                // `F.avg_pool2d(x, 2, 2)` drops an odd last row and column.
                Downsampler::Resnet(_) => [h / 2, w / 2],
            })
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

/// `UpBlock2D` / `CrossAttnUpBlock2D` / `ResnetUpsampleBlock2D` / `SimpleCrossAttnUpBlock2D`
/// (by their attention and upsampler).
#[derive(Module, Debug)]
pub struct UpBlock2D<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<BlockAttention<B>>,
    pub upsamplers: Vec<Upsampler<B>>,
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
        let attentions = config.attentions(out_channels, device);
        Self {
            resnets,
            attentions,
            upsamplers: add_upsample
                .then(|| {
                    if config.resnet_resampler {
                        Upsampler::Resnet(config.resampling_resnet(
                            out_channels,
                            Resample::Up,
                            device,
                        ))
                    } else {
                        Upsampler::Conv(Upsample2D::new(out_channels, out_channels, device))
                    }
                })
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
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward_in(x, context, format);
            }
        }
        for up in &self.upsamplers {
            x = match up {
                Upsampler::Conv(u) => u.forward_in(x, upsample_size, format),
                // diffusers passes no output size to these (IF's sizes are multiples of 2^n).
                Upsampler::Resnet(r) => r.forward_in(x, temb, format),
            };
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

/// `UNetMidBlock2DCrossAttn` / `UNetMidBlock2DSimpleCrossAttn`: resnet, then (attention,
/// resnet) pairs.
#[derive(Module, Debug)]
pub struct UNetMidBlock2DCrossAttn<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<BlockAttention<B>>,
}

impl<B: Backend> UNetMidBlock2DCrossAttn<B> {
    /// `config.num_layers` transformer/resnet pairs after the first resnet.
    pub fn new(config: &BlockConfig, channels: usize, device: &B::Device) -> Self {
        let mut r = config.resnet.clone();
        r.in_channels = channels;
        r.out_channels = channels;
        Self {
            resnets: (0..=config.num_layers).map(|_| r.init(device)).collect(),
            attentions: config.attentions(channels, device),
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
            x = attn.forward_in(x, Some(context), format);
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

    /// Appends the attention calls of [`Self::forward`] over a `[h, w]` input (self-attention
    /// over its pixels).
    pub fn attention_calls(&self, batch: usize, [h, w]: [usize; 2], out: &mut Vec<ScoreShape>) {
        for a in &self.attentions {
            out.push(a.score_shape(batch, h * w, h * w));
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
