//! Residual blocks and resampling (aka diffusers' `models/resnet.py`: `ResnetBlock2D`;
//! `models/downsampling.py`: `Downsample2D`; `models/upsampling.py`: `Upsample2D`).

use crate::models::conv::{conv2d_forward_in, conv2d_output_size};
use crate::models::layout::MemoryFormat;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear, PaddingConfig2d};
use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

use super::normalization::{Activation, conv2d, group_norm, group_norm_forward_in, linear};

/// How the time embedding enters a resnet (`resnet_time_scale_shift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeEmbeddingNorm {
    /// Added after conv1 (`"default"`).
    Default,
    /// Scale and shift after norm2 (`"scale_shift"`).
    ScaleShift,
}

impl TimeEmbeddingNorm {
    /// Parses diffusers' `resnet_time_scale_shift`.
    pub fn from_name(name: &str) -> crate::Result<Self> {
        match name {
            "default" => Ok(Self::Default),
            "scale_shift" => Ok(Self::ScaleShift),
            other => Err(crate::EngineError::Unsupported(format!(
                "resnet_time_scale_shift `{other}`"
            ))),
        }
    }
}

/// A resnet that also resamples (`ResnetBlock2D(up=True)` / `(down=True)`: the samplers of IF's
/// `ResnetDownsampleBlock2D` / `ResnetUpsampleBlock2D`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resample {
    #[default]
    None,
    /// Nearest ×2 of the input and of the normalised features before `conv1`.
    Up,
    /// 2×2 average pooling of both (diffusers' `Downsample2D(use_conv=False)`).
    Down,
}

/// The arguments of diffusers' `ResnetBlock2D.__init__` that SD and IF use.
#[derive(Debug, Clone)]
pub struct ResnetBlock2DConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// `None`: no time embedding (the VAE).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub act: Activation,
    pub time_embedding_norm: TimeEmbeddingNorm,
    pub output_scale_factor: f64,
    pub skip_time_act: bool,
    pub resample: Resample,
}

impl ResnetBlock2DConfig {
    /// Builds the block.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ResnetBlock2D<B> {
        let temb_out = match self.time_embedding_norm {
            TimeEmbeddingNorm::Default => self.out_channels,
            TimeEmbeddingNorm::ScaleShift => 2 * self.out_channels,
        };
        ResnetBlock2D {
            norm1: group_norm(self.groups, self.in_channels, self.eps, device),
            conv1: conv2d(self.in_channels, self.out_channels, 3, 1, 1, device),
            time_emb_proj: self
                .temb_channels
                .map(|t| linear(t, temb_out, true, device)),
            norm2: group_norm(self.groups, self.out_channels, self.eps, device),
            conv2: conv2d(self.out_channels, self.out_channels, 3, 1, 1, device),
            conv_shortcut: (self.in_channels != self.out_channels)
                .then(|| conv2d(self.in_channels, self.out_channels, 1, 1, 0, device)),
            act: self.act,
            time_embedding_norm: self.time_embedding_norm,
            output_scale_factor: self.output_scale_factor,
            skip_time_act: self.skip_time_act,
            resample: self.resample,
        }
    }
}

/// Diffusers' `ResnetBlock2D`.
#[derive(Module, Debug)]
pub struct ResnetBlock2D<B: Backend> {
    pub norm1: GroupNorm<B>,
    pub conv1: Conv2d<B>,
    pub time_emb_proj: Option<Linear<B>>,
    pub norm2: GroupNorm<B>,
    pub conv2: Conv2d<B>,
    pub conv_shortcut: Option<Conv2d<B>>,
    #[module(skip)]
    pub act: Activation,
    #[module(skip)]
    pub time_embedding_norm: TimeEmbeddingNorm,
    pub output_scale_factor: f64,
    pub skip_time_act: bool,
    #[module(skip)]
    pub resample: Resample,
}

impl<B: Backend> ResnetBlock2D<B> {
    /// # Shapes
    /// - x: `[batch, in_channels, h, w]`
    /// - temb: `[batch, temb_channels]`
    /// - output: `[batch, out_channels, h, w]`
    pub fn forward(&self, x: Tensor<B, 4>, temb: Option<&Tensor<B, 2>>) -> Tensor<B, 4> {
        self.forward_in(x, temb, MemoryFormat::Contiguous)
    }

    /// [`Self::forward`] on a feature map in `format`.
    pub fn forward_in(
        &self,
        x: Tensor<B, 4>,
        temb: Option<&Tensor<B, 2>>,
        format: MemoryFormat,
    ) -> Tensor<B, 4> {
        let norm = |n: &GroupNorm<B>, h: Tensor<B, 4>| group_norm_forward_in(n, h, format);
        let conv = |c: &Conv2d<B>, h: Tensor<B, 4>| conv2d_forward_in(c, h, format);
        let h = self.act.forward(norm(&self.norm1, x.clone()));
        let (x, h) = match self.resample {
            Resample::None => (x, h),
            Resample::Up => (
                upsample_nearest_in(x, None, format),
                upsample_nearest_in(h, None, format),
            ),
            Resample::Down => (avg_pool_2x2_in(x, format), avg_pool_2x2_in(h, format)),
        };
        let h = conv(&self.conv1, h);
        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = if self.skip_time_act {
                    t.clone()
                } else {
                    self.act.forward(t.clone())
                };
                Some(format.per_channel(proj.forward(t))) // [b, c', 1, 1] or [b, 1, 1, c']
            }
            _ => None,
        };
        let h = match (self.time_embedding_norm, temb) {
            (TimeEmbeddingNorm::Default, Some(t)) => norm(&self.norm2, h.add(t)),
            (TimeEmbeddingNorm::ScaleShift, Some(t)) => {
                let [scale, shift] = format.split_channels(t);
                norm(&self.norm2, h).mul(scale.add_scalar(1.0)).add(shift)
            }
            (_, None) => norm(&self.norm2, h),
        };
        let h = conv(&self.conv2, self.act.forward(h));
        let x = match &self.conv_shortcut {
            Some(c) => conv(c, x),
            None => x,
        };
        let out = x.add(h);
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out.div_scalar(self.output_scale_factor)
        }
    }
}

/// Diffusers' `Downsample2D` with a conv (`downsamplers.0.conv`).
#[derive(Module, Debug)]
pub struct Downsample2D<B: Backend> {
    pub conv: Conv2d<B>,
}

impl<B: Backend> Downsample2D<B> {
    /// A stride-2 3×3 conv. With `padding == 0` diffusers pads right/bottom by one first.
    pub fn new(channels: usize, out_channels: usize, padding: usize, device: &B::Device) -> Self {
        let mut conv = conv2d(channels, out_channels, 3, 2, padding, device);
        if padding == 0 {
            // F.pad(x, (0, 1, 0, 1)) then a valid conv: the same as asymmetric padding.
            conv.padding = PaddingConfig2d::Explicit(0, 0, 1, 1);
        }
        Self { conv }
    }

    /// # Shapes
    /// - x: `[b, c, h, w]` → `[b, c_out, ceil(h/2), ceil(w/2)]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.forward_in(x, MemoryFormat::Contiguous)
    }

    /// [`Self::forward`] on a feature map in `format`.
    pub fn forward_in(&self, x: Tensor<B, 4>, format: MemoryFormat) -> Tensor<B, 4> {
        conv2d_forward_in(&self.conv, x, format)
    }

    /// The output's `[h, w]` for an input of `[h, w]`.
    pub fn output_size(&self, size: [usize; 2]) -> [usize; 2] {
        conv2d_output_size(&self.conv, size)
    }
}

/// Diffusers' `Upsample2D` with a conv (`upsamplers.0.conv`): nearest ×2 then a 3×3 conv.
#[derive(Module, Debug)]
pub struct Upsample2D<B: Backend> {
    pub conv: Conv2d<B>,
}

impl<B: Backend> Upsample2D<B> {
    /// `channels → out_channels`.
    pub fn new(channels: usize, out_channels: usize, device: &B::Device) -> Self {
        Self {
            conv: conv2d(channels, out_channels, 3, 1, 1, device),
        }
    }

    /// `size`: the output size when it is not exactly twice the input (the UNet's
    /// `forward_upsample_size`).
    ///
    /// # Shapes
    /// - x: `[b, c, h, w]` → `[b, c_out, 2h, 2w]` or `[b, c_out, size.0, size.1]`
    pub fn forward(&self, x: Tensor<B, 4>, size: Option<[usize; 2]>) -> Tensor<B, 4> {
        self.forward_in(x, size, MemoryFormat::Contiguous)
    }

    /// [`Self::forward`] on a feature map in `format`.
    pub fn forward_in(
        &self,
        x: Tensor<B, 4>,
        size: Option<[usize; 2]>,
        format: MemoryFormat,
    ) -> Tensor<B, 4> {
        conv2d_forward_in(&self.conv, upsample_nearest_in(x, size, format), format)
    }
}

/// Nearest-neighbour upsampling with torch's `F.interpolate(mode="nearest")` index rule
/// (`src = floor(dst · in / out)`).
pub fn upsample_nearest<B: Backend>(x: Tensor<B, 4>, size: Option<[usize; 2]>) -> Tensor<B, 4> {
    upsample_nearest_in(x, size, MemoryFormat::Contiguous)
}

/// [`upsample_nearest`] of a feature map in `format`.
pub fn upsample_nearest_in<B: Backend>(
    x: Tensor<B, 4>,
    size: Option<[usize; 2]>,
    format: MemoryFormat,
) -> Tensor<B, 4> {
    let dims = x.dims();
    let [h, w] = format.spatial(dims);
    let (b, c) = (dims[0], format.channels(dims));
    let (row_dim, col_dim) = match format {
        MemoryFormat::Contiguous => (2, 3),
        MemoryFormat::ChannelsLast => (1, 2),
    };
    match (size, format) {
        (None, MemoryFormat::Contiguous) => x
            .reshape([b, c, h, 1, w, 1])
            .expand([b, c, h, 2, w, 2])
            .reshape([b, c, 2 * h, 2 * w]),
        (None, MemoryFormat::ChannelsLast) => x
            .reshape([b, h, 1, w, 1, c])
            .expand([b, h, 2, w, 2, c])
            .reshape([b, 2 * h, 2 * w, c]),
        (Some([oh, ow]), _) => {
            let device = x.device();
            let rows = nearest_indices::<B>(h, oh, &device);
            let cols = nearest_indices::<B>(w, ow, &device);
            x.select(row_dim, rows).select(col_dim, cols)
        }
    }
}

/// 2×2 average pooling with stride 2 (torch's `F.avg_pool2d(x, 2, 2)`: an odd last row or
/// column is dropped), in `format`.
///
/// # Shapes
/// - x: `[b, c, h, w]` → `[b, c, h/2, w/2]` (or the channels-last equivalents)
pub fn avg_pool_2x2_in<B: Backend>(x: Tensor<B, 4>, format: MemoryFormat) -> Tensor<B, 4> {
    let dims = x.dims();
    let [h, w] = format.spatial(dims);
    let (b, c) = (dims[0], format.channels(dims));
    let (oh, ow) = (h / 2, w / 2);
    let (row_dim, col_dim) = match format {
        MemoryFormat::Contiguous => (2, 3),
        MemoryFormat::ChannelsLast => (1, 2),
    };
    let x = if h % 2 == 1 || w % 2 == 1 {
        x.narrow(row_dim, 0, 2 * oh).narrow(col_dim, 0, 2 * ow)
    } else {
        x
    };
    match format {
        MemoryFormat::Contiguous => x
            .reshape([b, c, oh, 2, ow, 2])
            .sum_dim(5)
            .sum_dim(3)
            .reshape([b, c, oh, ow]),
        MemoryFormat::ChannelsLast => x
            .reshape([b, oh, 2, ow, 2, c])
            .sum_dim(4)
            .sum_dim(2)
            .reshape([b, oh, ow, c]),
    }
    .div_scalar(4.0)
}

fn nearest_indices<B: Backend>(
    input: usize,
    output: usize,
    device: &B::Device,
) -> Tensor<B, 1, Int> {
    let scale = input as f32 / output as f32;
    let idx: Vec<i64> = (0..output)
        .map(|i| ((i as f32 * scale).floor() as usize).min(input - 1) as i64)
        .collect();
    Tensor::from_data(TensorData::new(idx, [output]), device)
}

/// The largest feature map `[c, h, w]` seen by a model's walk (the VAE's and the UNet's
/// `largest_activation`).
#[derive(Default)]
pub(crate) struct Largest(pub [usize; 3]);

impl Largest {
    pub fn see(&mut self, channels: usize, [h, w]: [usize; 2]) {
        if channels * h * w > self.0.iter().product() {
            self.0 = [channels, h, w];
        }
    }

    /// A conv's input and output at `size` (it keeps the size).
    pub fn see_conv<B: Backend>(&mut self, conv: &Conv2d<B>, size: [usize; 2]) {
        let [out, input] = conv_channels(conv);
        self.see(input, size);
        self.see(out, size);
    }

    /// A block's resnets at `size`: each one's input and output widths.
    pub fn see_resnets<B: Backend>(&mut self, resnets: &[ResnetBlock2D<B>], size: [usize; 2]) {
        for resnet in resnets {
            self.see_conv(&resnet.conv1, size);
        }
    }
}

/// A conv's `[out, in]` channels.
pub(crate) fn conv_channels<B: Backend>(conv: &Conv2d<B>) -> [usize; 2] {
    let [out, input, _, _] = conv.weight.shape().dims();
    [out, input]
}
