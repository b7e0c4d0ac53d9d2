//! Transformer blocks (aka diffusers' `models/attention.py`: `BasicTransformerBlock`,
//! `FeedForward`; `models/activations.py`: `GEGLU`) and `Transformer2DModel`
//! (`models/transformers/transformer_2d.py`, continuous input only: what SD uses).

use crate::memory::ScoreShape;
use crate::models::conv::conv2d_forward_in;
use crate::models::layout::MemoryFormat;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{Dropout, DropoutConfig, GroupNorm, LayerNorm, Linear};
use burn::tensor::activation::gelu;
use burn::tensor::{Tensor, backend::Backend};

use super::attention_processor::{Attention, AttentionConfig, AttnProcessor};
use super::normalization::{conv2d, group_norm, group_norm_forward_in, layer_norm, linear};

/// `GEGLU`: a projection to twice the width, one half gating the other through GELU.
#[derive(Module, Debug)]
pub struct GEGLU<B: Backend> {
    pub proj: Linear<B>,
}

/// The layers of `FeedForward.net`: `net.0` is the GEGLU, `net.1` a dropout, `net.2` the output.
#[derive(Module, Debug)]
pub enum FeedForwardLayer<B: Backend> {
    /// `net.0` (aka `GEGLU`).
    Geglu(GEGLU<B>),
    /// `net.1` (dropout: no weights, identity at inference).
    Dropout(Dropout),
    /// `net.2`.
    Linear(Linear<B>),
}

/// Diffusers' `FeedForward` with the GEGLU activation.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    pub net: Vec<FeedForwardLayer<B>>,
}

impl<B: Backend> FeedForward<B> {
    /// `dim → 4·dim (gated) → dim`.
    pub fn new(dim: usize, device: &B::Device) -> Self {
        let inner = dim * 4;
        Self {
            net: vec![
                FeedForwardLayer::Geglu(GEGLU {
                    proj: linear(dim, inner * 2, true, device),
                }),
                FeedForwardLayer::Dropout(DropoutConfig::new(0.0).init()),
                FeedForwardLayer::Linear(linear(inner, dim, true, device)),
            ],
        }
    }

    /// # Shapes
    /// - x: `[batch, tokens, dim]` → same
    pub fn forward(&self, mut x: Tensor<B, 3>) -> Tensor<B, 3> {
        for layer in &self.net {
            x = match layer {
                FeedForwardLayer::Geglu(geglu) => {
                    let h = geglu.proj.forward(x);
                    let half = h.dims()[2] / 2;
                    let gate = h.clone().narrow(2, half, half);
                    h.narrow(2, 0, half).mul(gelu(gate))
                }
                FeedForwardLayer::Dropout(_) => x,
                FeedForwardLayer::Linear(l) => l.forward(x),
            };
        }
        x
    }
}

/// Diffusers' `BasicTransformerBlock` with `norm_type="layer_norm"`.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn1: Attention<B>,
    pub norm2: LayerNorm<B>,
    pub attn2: Attention<B>,
    pub norm3: LayerNorm<B>,
    pub ff: FeedForward<B>,
    /// attn1 attends to the text too (`only_cross_attention`).
    pub only_cross_attention: bool,
}

impl<B: Backend> BasicTransformerBlock<B> {
    /// # Shapes
    /// - x: `[batch, tokens, dim]`, context: `[batch, ctx_tokens, cross_dim]` → `[batch, tokens, dim]`
    pub fn forward(&self, x: Tensor<B, 3>, context: &Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.norm1.forward(x.clone());
        let attn_context = self.only_cross_attention.then(|| context.clone());
        let x = self.attn1.forward(h, attn_context).add(x);
        let h = self.norm2.forward(x.clone());
        let x = self.attn2.forward(h, Some(context.clone())).add(x);
        let h = self.norm3.forward(x.clone());
        self.ff.forward(h).add(x)
    }
}

/// `proj_in`/`proj_out`: a 1×1 conv (SD 1.x) or a linear layer (`use_linear_projection`, SD 2.x).
#[derive(Module, Debug)]
pub enum Projection<B: Backend> {
    Conv(Conv2d<B>),
    Linear(Linear<B>),
}

/// Diffusers' `Transformer2DModel` for continuous (feature-map) input.
#[derive(Module, Debug)]
pub struct Transformer2DModel<B: Backend> {
    pub norm: GroupNorm<B>,
    pub proj_in: Projection<B>,
    pub transformer_blocks: Vec<BasicTransformerBlock<B>>,
    pub proj_out: Projection<B>,
}

/// The arguments of `Transformer2DModel.__init__` that SD's UNet passes.
#[derive(Debug, Clone)]
pub struct Transformer2DModelConfig {
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub num_layers: usize,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
    pub upcast_attention: bool,
}

impl Transformer2DModelConfig {
    /// Builds the model.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Transformer2DModel<B> {
        let inner = self.num_attention_heads * self.attention_head_dim;
        let projection = |c_in: usize, c_out: usize| {
            if self.use_linear_projection {
                Projection::Linear(linear(c_in, c_out, true, device))
            } else {
                Projection::Conv(conv2d(c_in, c_out, 1, 1, 0, device))
            }
        };
        let block = || {
            let mut attn1 =
                AttentionConfig::new(inner, self.num_attention_heads, self.attention_head_dim);
            attn1.upcast = self.upcast_attention;
            if self.only_cross_attention {
                attn1.cross_attention_dim = Some(self.cross_attention_dim);
            }
            let mut attn2 = attn1.clone();
            attn2.cross_attention_dim = Some(self.cross_attention_dim);
            BasicTransformerBlock {
                norm1: layer_norm(inner, 1e-5, device),
                attn1: attn1.init(device),
                norm2: layer_norm(inner, 1e-5, device),
                attn2: attn2.init(device),
                norm3: layer_norm(inner, 1e-5, device),
                ff: FeedForward::new(inner, device),
                only_cross_attention: self.only_cross_attention,
            }
        };
        Transformer2DModel {
            norm: group_norm(self.norm_num_groups, self.in_channels, 1e-6, device),
            proj_in: projection(self.in_channels, inner),
            transformer_blocks: (0..self.num_layers).map(|_| block()).collect(),
            proj_out: projection(inner, self.in_channels),
        }
    }
}

impl<B: Backend> Transformer2DModel<B> {
    /// The widest per-token tensor of [`Self::forward_in`]: the feed-forward's GEGLU projection,
    /// twice its inner width (SD 1.5's first level: 2 × 4 × 320 = 2560 per pixel).
    pub fn widest(&self) -> usize {
        self.transformer_blocks
            .iter()
            .flat_map(|block| &block.ff.net)
            .map(|layer| match layer {
                FeedForwardLayer::Geglu(geglu) => geglu.proj.weight.dims()[1],
                FeedForwardLayer::Linear(linear) => linear.weight.dims()[1],
                FeedForwardLayer::Dropout(_) => 0,
            })
            .max()
            .unwrap_or(0)
    }

    /// # Shapes
    /// - x: `[batch, channels, h, w]`, context: `[batch, ctx_tokens, cross_dim]` → `[batch, channels, h, w]`
    pub fn forward(&self, x: Tensor<B, 4>, context: &Tensor<B, 3>) -> Tensor<B, 4> {
        self.forward_in(x, context, MemoryFormat::Contiguous)
    }

    /// [`Self::forward`] on a feature map in `format`. Channels-last feature maps are already
    /// `[batch, h·w, channels]` tokens in memory: both reshapes are free.
    pub fn forward_in(
        &self,
        x: Tensor<B, 4>,
        context: &Tensor<B, 3>,
        format: MemoryFormat,
    ) -> Tensor<B, 4> {
        let dims = x.dims();
        let (b, c) = (dims[0], format.channels(dims));
        let [h, w] = format.spatial(dims);
        let residual = x.clone();
        let x = group_norm_forward_in(&self.norm, x, format);
        // Feature map → tokens `[b, hw, channels]`, and back.
        let to_tokens = |x: Tensor<B, 4>| {
            let inner = format.channels(x.dims());
            match format {
                MemoryFormat::Contiguous => x.reshape([b, inner, h * w]).swap_dims(1, 2),
                MemoryFormat::ChannelsLast => x.reshape([b, h * w, inner]),
            }
        };
        let to_map = |t: Tensor<B, 3>| {
            let inner = t.dims()[2];
            match format {
                MemoryFormat::Contiguous => t.swap_dims(1, 2).reshape([b, inner, h, w]),
                MemoryFormat::ChannelsLast => t.reshape([b, h, w, inner]),
            }
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv2d_forward_in(conv, x, format)),
            Projection::Linear(l) => l.forward(to_tokens(x)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(tokens, context);
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv2d_forward_in(conv, to_map(tokens), format),
            Projection::Linear(l) => to_map(l.forward(tokens)),
        };
        debug_assert_eq!(format.channels(out.dims()), c);
        out.add(residual)
    }

    /// Sets the processor of every attention layer inside.
    pub fn set_attn_processor(&mut self, processor: AttnProcessor) {
        for block in &mut self.transformer_blocks {
            block.attn1.set_processor(processor);
            block.attn2.set_processor(processor);
        }
    }

    /// Appends the attention calls of [`Self::forward_in`] over `tokens` image tokens and
    /// `context` text tokens, in order.
    pub fn attention_calls(
        &self,
        batch: usize,
        tokens: usize,
        context: usize,
        out: &mut Vec<ScoreShape>,
    ) {
        for block in &self.transformer_blocks {
            let self_keys = if block.only_cross_attention {
                context
            } else {
                tokens
            };
            out.push(block.attn1.score_shape(batch, tokens, self_keys));
            out.push(block.attn2.score_shape(batch, tokens, context));
        }
    }
}
