//! The memory format of the UNet's feature maps: diffusers'
//! `unet.to(memory_format=torch.channels_last)` (docs/architecture.md §1).
//!
//! With [`MemoryFormat::ChannelsLast`] the UNet keeps its activations as contiguous
//! `[batch, h, w, channels]` tensors between its first and last convolution, and its conv
//! weights stored OHWI (still seen as `[out, in, kh, kw]`, so they load and save by their PyTorch
//! shapes). Burn's GPU convolutions compute in NHWC: fed an NCHW tensor they read it through a
//! strided NHWC view on every call (no vectorised loads along channels), while fed these they
//! read contiguous channel runs and write their output straight into the next layer's layout.
//! GroupNorm, the time-embedding broadcast, skip concatenation, upsampling and the transformer's
//! token reshapes are written for each format, so nothing re-lays data out between
//! convolutions. On the CPU backend our own NHWC convolution runs (`super::conv`).

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Tensor, backend::Backend};

/// How a 4-D feature map is laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum MemoryFormat {
    /// `[batch, channels, h, w]`, row-major: PyTorch's default (`torch.contiguous_format`).
    #[default]
    Contiguous,
    /// `[batch, h, w, channels]`, row-major (`torch.channels_last`).
    ChannelsLast,
}

impl MemoryFormat {
    /// `true` → channels-last (the `--channels-last on|off` switch).
    pub fn from_channels_last(on: bool) -> Self {
        if on {
            Self::ChannelsLast
        } else {
            Self::Contiguous
        }
    }

    /// Whether this is channels-last.
    pub fn is_channels_last(self) -> bool {
        self == Self::ChannelsLast
    }

    /// The dimension that holds channels.
    pub fn channel_dim(self) -> usize {
        match self {
            Self::Contiguous => 1,
            Self::ChannelsLast => 3,
        }
    }

    /// Channels of a feature map in this format.
    pub fn channels(self, dims: [usize; 4]) -> usize {
        dims[self.channel_dim()]
    }

    /// Height and width of a feature map in this format.
    pub fn spatial(self, dims: [usize; 4]) -> [usize; 2] {
        match self {
            Self::Contiguous => [dims[2], dims[3]],
            Self::ChannelsLast => [dims[1], dims[2]],
        }
    }

    /// A `[batch, channels]` vector shaped to broadcast over a feature map in this format.
    pub fn per_channel<B: Backend>(self, t: Tensor<B, 2>) -> Tensor<B, 4> {
        match self {
            Self::Contiguous => t.unsqueeze_dims::<4>(&[2, 3]),
            Self::ChannelsLast => t.unsqueeze_dims::<4>(&[1, 2]),
        }
    }

    /// An NCHW tensor (the model's input) in this format. Channels-last gives a permuted view;
    /// the first convolution reads it.
    pub fn from_nchw<B: Backend>(self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            Self::Contiguous => x,
            Self::ChannelsLast => x.permute([0, 2, 3, 1]),
        }
    }

    /// A feature map in this format as an NCHW tensor (the model's output; a view).
    pub fn to_nchw<B: Backend>(self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            Self::Contiguous => x,
            Self::ChannelsLast => x.permute([0, 3, 1, 2]),
        }
    }

    /// Concatenates feature maps along channels (the up blocks' skip connections).
    pub fn cat_channels<B: Backend>(self, maps: Vec<Tensor<B, 4>>) -> Tensor<B, 4> {
        Tensor::cat(maps, self.channel_dim())
    }

    /// Splits a feature map's channels into two equal halves (torch's `chunk(2, dim=1)`).
    pub fn split_channels<B: Backend>(self, x: Tensor<B, 4>) -> [Tensor<B, 4>; 2] {
        let dim = self.channel_dim();
        let half = x.dims()[dim] / 2;
        [x.clone().narrow(dim, 0, half), x.narrow(dim, half, half)]
    }
}

/// Stores every conv weight (the 4-D float params) of a module in `format`'s memory order:
/// OHWI for channels-last, OIHW otherwise. The shape stays `[out, in, kh, kw]`.
///
/// A reshape of a view whose strides cannot be merged copies it into row-major order on every
/// backend; permuting to `[out, kh, kw, in]`, flattening (the copy) and permuting back leaves an
/// OIHW-shaped view of OHWI memory, which Burn's NHWC convolutions read as contiguous.
pub struct ConvWeightLayout(pub MemoryFormat);

impl<B: Backend> ModuleMapper<B> for ConvWeightLayout {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if D != 4 {
            return param;
        }
        let format = self.0;
        param.map(|t| {
            let dims = t.dims();
            let [o, i, kh, kw] = [dims[0], dims[1], dims[2], dims[3]];
            let t: Tensor<B, 4> = match format {
                MemoryFormat::ChannelsLast => t
                    .permute(ohwi_axes::<D>())
                    .reshape([o, kh * kw * i])
                    .reshape([o, kh, kw, i])
                    .permute([0, 3, 1, 2]),
                MemoryFormat::Contiguous => t.reshape([o, i * kh * kw]).reshape([o, i, kh, kw]),
            };
            // Rank 4 is rank D here; a reshape would copy the view back into OIHW order.
            Tensor::from_primitive(t.into_primitive())
        })
    }
}

/// `[0, 2, 3, 1]` for the rank-4 params the mapper touches.
fn ohwi_axes<const D: usize>() -> [isize; D] {
    let mut axes = [0isize; D];
    for (slot, axis) in axes.iter_mut().zip([0isize, 2, 3, 1]) {
        *slot = axis;
    }
    axes
}

/// Applies `mapper` to `module` in place (one child at a time keeps the transient copy small).
/// Stores every convolution weight of `module` in `format`'s order: every rank-4 parameter,
/// which in these models are exactly the convolutions' weights (linear layers are rank 2, norms
/// rank 1).
pub(crate) fn set_conv_weight_layout<B: Backend, M: Module<B>>(
    module: &mut M,
    format: MemoryFormat,
) {
    map_in_place(module, &mut ConvWeightLayout(format));
}

pub(crate) fn map_in_place<B: Backend, M: Module<B>>(
    module: &mut M,
    mapper: &mut impl ModuleMapper<B>,
) {
    *module = module.clone().map(mapper);
}
