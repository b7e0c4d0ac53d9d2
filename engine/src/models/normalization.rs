//! Normalisation and small building blocks shared by the models (aka diffusers'
//! `models/normalization.py`, `models/activations.py`, and the conv/linear constructors).
//!
//! Weights live in burn-nn's `GroupNorm`/`LayerNorm`/`Conv2d`/`Linear` so they load by their
//! PyTorch names; the forward maths of GroupNorm is ours so the statistics are taken in f32.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{
    GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig, PaddingConfig2d,
};
use burn::tensor::activation;
use burn::tensor::{DType, Tensor, backend::Backend};

use super::flex::flex_group_norm_nhwc;
use super::layout::MemoryFormat;

/// A `GroupNorm` with diffusers' arguments (always affine).
pub fn group_norm<B: Backend>(
    groups: usize,
    channels: usize,
    eps: f64,
    device: &B::Device,
) -> GroupNorm<B> {
    GroupNormConfig::new(groups, channels)
        .with_epsilon(eps)
        .init(device)
}

/// A `LayerNorm` over the last dimension.
pub fn layer_norm<B: Backend>(dim: usize, eps: f64, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(dim).with_epsilon(eps).init(device)
}

/// A `Linear` layer (PyTorch `nn.Linear(d_in, d_out, bias)`).
pub fn linear<B: Backend>(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_in, d_out).with_bias(bias).init(device)
}

/// A square `Conv2d` (PyTorch `nn.Conv2d(c_in, c_out, k, stride, padding)`).
pub fn conv2d<B: Backend>(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    device: &B::Device,
) -> Conv2d<B> {
    Conv2dConfig::new([c_in, c_out], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(
            padding, padding, padding, padding,
        ))
        .init(device)
}

/// GroupNorm forward over `[batch, channels, …]`, statistics computed in f32 whatever the
/// tensor's dtype (docs/architecture.md §1: f16 keeps GroupNorm statistics in f32).
pub fn group_norm_forward<B: Backend, const D: usize>(
    norm: &GroupNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let shape = x.shape();
    let dims = shape.to_vec();
    let batch = dims[0];
    let channels = dims[1];
    let groups = norm.num_groups;
    let per_group = dims[1..].iter().product::<usize>() / groups;
    let channels_per_group = channels / groups;
    let x = x.cast(DType::F32).reshape([batch, groups, per_group]);
    let mean = x.clone().mean_dim(2);
    let var = x.clone().sub(mean.clone()).square().mean_dim(2);
    let rstd = var.add_scalar(norm.epsilon).sqrt().recip();
    // As PyTorch's kernel: y = x·scale + shift with per-(item, channel) scale = γ·rstd and
    // shift = β − mean·scale, applied to `[batch·channels, spatial]` rows (two passes over the
    // activations, and a row-scalar broadcast every backend handles at full speed).
    let per_channel = |t: Tensor<B, 3>| {
        t.repeat_dim(2, channels_per_group)
            .reshape([batch * channels, 1])
    };
    let per_item = |p: Tensor<B, 1>| {
        p.cast(DType::F32)
            .reshape([1, channels])
            .repeat_dim(0, batch)
            .reshape([batch * channels, 1])
    };
    let rstd = per_channel(rstd);
    let mean = per_channel(mean);
    let scale = match &norm.gamma {
        Some(gamma) => rstd.mul(per_item(gamma.val())),
        None => rstd,
    };
    let shift = match &norm.beta {
        Some(beta) => per_item(beta.val()).sub(mean.mul(scale.clone())),
        None => mean.mul(scale.clone()).neg(),
    };
    x.reshape([batch * channels, per_group / channels_per_group])
        .mul(scale)
        .add(shift)
        .reshape(shape)
        .cast(dtype)
}

/// GroupNorm of a feature map in `format` (statistics in f32 as [`group_norm_forward`]).
pub fn group_norm_forward_in<B: Backend>(
    norm: &GroupNorm<B>,
    x: Tensor<B, 4>,
    format: MemoryFormat,
) -> Tensor<B, 4> {
    match format {
        MemoryFormat::Contiguous => group_norm_forward(norm, x),
        MemoryFormat::ChannelsLast => flex_group_norm_nhwc(
            &x,
            norm.num_groups,
            norm.epsilon,
            norm.gamma.as_ref().map(|g| g.val()),
            norm.beta.as_ref().map(|b| b.val()),
        )
        .unwrap_or_else(|| group_norm_nhwc(norm, x)),
    }
}

/// GroupNorm over `[batch, h, w, channels]`: channels stay innermost, so a group is a
/// `[pixels, channels_per_group]` slab and scale/shift broadcast along the rows.
fn group_norm_nhwc<B: Backend>(norm: &GroupNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let dtype = x.dtype();
    let [batch, h, w, channels] = x.dims();
    let groups = norm.num_groups;
    let per_group = channels / groups;
    let x = x
        .cast(DType::F32)
        .reshape([batch, h * w, groups, per_group]);
    // Every row holds the same number of a group's values: the mean of row means is the mean.
    let mean = x.clone().mean_dim(3).mean_dim(1); // [batch, 1, groups, 1]
    let var = x.clone().sub(mean.clone()).square().mean_dim(3).mean_dim(1);
    let rstd = var.add_scalar(norm.epsilon).sqrt().recip();
    let per_channel = |t: Tensor<B, 4>| {
        t.expand([batch, 1, groups, per_group])
            .reshape([batch, 1, channels])
    };
    let affine = |p: Tensor<B, 1>| p.cast(DType::F32).reshape([1, 1, channels]);
    let rstd = per_channel(rstd);
    let mean = per_channel(mean);
    let scale = match &norm.gamma {
        Some(gamma) => rstd.mul(affine(gamma.val())),
        None => rstd,
    };
    let shift = match &norm.beta {
        Some(beta) => affine(beta.val()).sub(mean.mul(scale.clone())),
        None => mean.mul(scale.clone()).neg(),
    };
    x.reshape([batch, h * w, channels])
        .mul(scale)
        .add(shift)
        .reshape([batch, h, w, channels])
        .cast(dtype)
}

/// The activation functions diffusers' configs name (`act_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`.
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    /// `mish`.
    Mish,
}

impl Activation {
    /// Parses a diffusers `act_fn` string.
    pub fn from_name(name: &str) -> crate::Result<Self> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            "gelu" => Ok(Self::Gelu),
            "mish" => Ok(Self::Mish),
            other => Err(crate::EngineError::Unsupported(format!(
                "activation function `{other}`"
            ))),
        }
    }

    /// Applies the activation.
    pub fn forward<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Silu => activation::silu(x),
            Self::Gelu => activation::gelu(x),
            Self::Mish => activation::mish(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::tensor::Distribution;

    type F = burn::backend::Flex;

    /// Both channels-last GroupNorms (flex's kernel and the generic ops other backends run)
    /// equal the NCHW one on the same values.
    #[test]
    fn channels_last_group_norm_equals_nchw() {
        let device = Default::default();
        let normal = Distribution::Normal(0.5, 2.0);
        for (groups, [b, c, h, w]) in [(4, [2, 8, 5, 3]), (1, [1, 3, 4, 4]), (8, [3, 16, 1, 7])] {
            let mut norm = group_norm::<F>(groups, c, 1e-5, &device);
            norm.gamma = Some(Param::from_tensor(Tensor::random([c], normal, &device)));
            norm.beta = Some(Param::from_tensor(Tensor::random([c], normal, &device)));
            let x = Tensor::<F, 4>::random([b, c, h, w], normal, &device);
            let want = group_norm_forward(&norm, x.clone()).permute([0, 2, 3, 1]);
            let nhwc = x.permute([0, 2, 3, 1]);
            let flex = group_norm_forward_in(&norm, nhwc.clone(), MemoryFormat::ChannelsLast);
            let generic = group_norm_nhwc(&norm, nhwc);
            for (got, what) in [(flex, "flex"), (generic, "generic")] {
                assert_eq!(got.dims(), [b, h, w, c]);
                let diff: f32 = (got - want.clone()).abs().max().into_scalar();
                assert!(
                    diff < 1e-5,
                    "{what} {groups} groups {:?}: {diff}",
                    [b, c, h, w]
                );
            }
        }
    }
}
