//! Diffusers' `Attention` layer with a swappable, weightless processor
//! (aka `models/attention_processor.py`: `Attention`, `AttnProcessor`, `AttnProcessor2_0`,
//! `SlicedAttnProcessor`).
//!
//! The module owns the weights (`to_q`, `to_k`, `to_v`, `to_out.0`, optional `group_norm`); the
//! [`AttnProcessor`] only decides how softmax(QKᵀ·scale)V is computed.

use burn::module::Module;
use burn::nn::{GroupNorm, LayerNorm, Linear};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Tensor, backend::Backend};

use super::layout::MemoryFormat;
use super::normalization::{
    group_norm, group_norm_forward, group_norm_forward_in, layer_norm, linear,
};
use crate::memory::ScoreShape;

/// How the attention product is computed. All variants give the same result within tolerance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttnProcessor {
    /// softmax(QKᵀ·scale)V with the score matrix materialised (diffusers' `AttnProcessor`).
    Vanilla,
    /// Burn's fused attention op (diffusers' `AttnProcessor2_0`, SDPA).
    #[default]
    Fused,
    /// The vanilla maths over `slice_size` (batch × head) slices at a time, for low memory
    /// (diffusers' `SlicedAttnProcessor`).
    Sliced {
        /// How many batch × head slices are computed at once (≥ 1).
        slice_size: usize,
    },
}

impl AttnProcessor {
    /// Parses the CLI/settings names `vanilla`, `fused`, `sliced`. `sliced` computes one
    /// (image, head) score matrix at a time: diffusers' `enable_attention_slicing("max")`, the
    /// least memory (its default, "auto", takes half a layer's heads at a time).
    pub fn from_name(name: &str) -> crate::Result<Self> {
        match name {
            "vanilla" => Ok(Self::Vanilla),
            "fused" => Ok(Self::Fused),
            "sliced" => Ok(Self::Sliced { slice_size: 1 }),
            other => Err(crate::EngineError::invalid(
                "attention",
                format!("`{other}` is not one of vanilla, fused, sliced"),
            )),
        }
    }

    /// The name [`Self::from_name`] parses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vanilla => "vanilla",
            Self::Fused => "fused",
            Self::Sliced { .. } => "sliced",
        }
    }

    /// softmax(q kᵀ · scale) v for q `[n, heads, lq, d]`, k/v `[n, heads, lk, d]`.
    /// `upcast` computes the scores and softmax in f32 (diffusers' `upcast_attention` /
    /// `upcast_softmax`), which only changes anything for f16 tensors.
    pub fn compute<B: Backend>(
        self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        scale: f64,
        upcast: bool,
    ) -> Tensor<B, 4> {
        let [n, heads, lq, _] = q.dims();
        crate::memory::note_attention_call(crate::memory::ScoreShape {
            batch: n,
            heads,
            queries: lq,
            keys: k.dims()[2],
            upcast,
        });
        match self {
            Self::Vanilla => vanilla_attention(q, k, v, scale, upcast),
            Self::Fused => {
                // Burn's CPU backend: our blocked kernel (flex's own is single-threaded here).
                if let Some(out) = super::flex::flex_attention(&q, &k, &v, scale) {
                    return out;
                }
                // CUDA and wgpu: a flash kernel, forced rather than left to autotune (which may
                // pick the materialised fallback, and always does in f32). See cube_attention.
                if let Some(out) = super::cube_attention::forced_flash_attention(&q, &k, &v, scale)
                {
                    return out;
                }
                let options = AttentionModuleOptions {
                    scale: Some(scale),
                    softcap: None,
                    is_causal: false,
                };
                attention(q, k, v, None, None, options)
            }
            Self::Sliced { slice_size } => {
                let [n, heads, lq, d] = q.dims();
                let lk = k.dims()[2];
                let dv = v.dims()[3];
                let total = n * heads;
                let q = q.reshape([total, 1, lq, d]);
                let k = k.reshape([total, 1, lk, d]);
                let v = v.reshape([total, 1, lk, dv]);
                let step = slice_size.max(1);
                let mut outs = Vec::with_capacity(total.div_ceil(step));
                let mut start = 0;
                while start < total {
                    let len = step.min(total - start);
                    outs.push(vanilla_attention(
                        q.clone().narrow(0, start, len),
                        k.clone().narrow(0, start, len),
                        v.clone().narrow(0, start, len),
                        scale,
                        upcast,
                    ));
                    start += len;
                }
                Tensor::cat(outs, 0).reshape([n, heads, lq, dv])
            }
        }
    }
}

fn vanilla_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f64,
    upcast: bool,
) -> Tensor<B, 4> {
    let dtype = q.dtype();
    let (q, k) = if upcast && dtype != DType::F32 {
        (q.cast(DType::F32), k.cast(DType::F32))
    } else {
        (q, k)
    };
    let scores = q.mul_scalar(scale).matmul(k.swap_dims(2, 3)); // [n, h, lq, lk]
    // The scores are materialised either way; on the CPU backend our row kernel does the
    // softmax, in the scores' own buffer.
    let probs = super::flex::flex_softmax_last_dim(scores).cast(dtype);
    probs.matmul(v)
}

/// Diffusers' `Attention` (self- or cross-attention over token sequences).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Group norm over channels before attention (the VAE's mid-block attention).
    pub group_norm: Option<GroupNorm<B>>,
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    /// `to_out.0` is the output projection (`to_out.1` is a dropout in diffusers).
    pub to_out: Vec<Linear<B>>,
    pub heads: usize,
    pub scale: f64,
    /// `upcast_attention` or `upcast_softmax`: compute scores in f32.
    pub upcast: bool,
    /// Add the input back (`residual_connection`).
    pub residual_connection: bool,
    #[module(skip)]
    pub processor: AttnProcessor,
}

/// The arguments of diffusers' `Attention.__init__` that SD uses.
#[derive(Debug, Clone)]
pub struct AttentionConfig {
    pub query_dim: usize,
    pub cross_attention_dim: Option<usize>,
    pub heads: usize,
    pub dim_head: usize,
    pub bias: bool,
    pub out_bias: bool,
    pub upcast: bool,
    /// `(groups, eps)` of the group norm applied before attention, if any.
    pub norm_num_groups: Option<(usize, f64)>,
    pub residual_connection: bool,
}

impl AttentionConfig {
    /// The defaults of diffusers' `Attention` for a query dimension.
    pub fn new(query_dim: usize, heads: usize, dim_head: usize) -> Self {
        Self {
            query_dim,
            cross_attention_dim: None,
            heads,
            dim_head,
            bias: false,
            out_bias: true,
            upcast: false,
            norm_num_groups: None,
            residual_connection: false,
        }
    }

    /// Builds the module with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Attention<B> {
        let inner = self.heads * self.dim_head;
        let kv_dim = self.cross_attention_dim.unwrap_or(self.query_dim);
        Attention {
            group_norm: self
                .norm_num_groups
                .map(|(groups, eps)| group_norm(groups, self.query_dim, eps, device)),
            to_q: linear(self.query_dim, inner, self.bias, device),
            to_k: linear(kv_dim, inner, self.bias, device),
            to_v: linear(kv_dim, inner, self.bias, device),
            to_out: vec![linear(inner, self.query_dim, self.out_bias, device)],
            heads: self.heads,
            scale: 1.0 / (self.dim_head as f64).sqrt(),
            upcast: self.upcast,
            residual_connection: self.residual_connection,
            processor: AttnProcessor::default(),
        }
    }
}

impl<B: Backend> Attention<B> {
    /// Attention over a token sequence.
    ///
    /// # Shapes
    /// - hidden: `[batch, tokens, query_dim]`
    /// - context: `[batch, context_tokens, cross_attention_dim]` (self-attention when `None`)
    /// - output: `[batch, tokens, query_dim]`
    pub fn forward(&self, hidden: Tensor<B, 3>, context: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        let residual = hidden.clone();
        let hidden = match &self.group_norm {
            // GroupNorm over channels: [b, t, c] → [b, c, t] → norm → back.
            Some(norm) => group_norm_forward(norm, hidden.swap_dims(1, 2)).swap_dims(1, 2),
            None => hidden,
        };
        let context = context.unwrap_or_else(|| hidden.clone());
        let q = self.split_heads(self.to_q.forward(hidden));
        let k = self.split_heads(self.to_k.forward(context.clone()));
        let v = self.split_heads(self.to_v.forward(context));
        let mut out = merge_heads(self.processor.compute(q, k, v, self.scale, self.upcast));
        for layer in &self.to_out {
            out = layer.forward(out);
        }
        if self.residual_connection {
            out.add(residual)
        } else {
            out
        }
    }

    /// Attention over a feature map, as diffusers does for 4-D inputs (the VAE's mid block).
    ///
    /// # Shapes
    /// - x: `[batch, channels, height, width]` → same
    pub fn forward_spatial(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let tokens = x.reshape([b, c, h * w]).swap_dims(1, 2); // [b, hw, c]
        self.forward(tokens, None)
            .swap_dims(1, 2)
            .reshape([b, c, h, w])
    }

    /// `[b, t, heads*d]` → `[b, heads, t, d]`.
    fn split_heads(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        split_heads(x, self.heads)
    }

    /// Sets this layer's processor (diffusers' `set_processor`).
    pub fn set_processor(&mut self, processor: AttnProcessor) {
        self.processor = processor;
    }

    /// The scores of a call with `queries` tokens attending to `keys` tokens.
    pub fn score_shape(&self, batch: usize, queries: usize, keys: usize) -> ScoreShape {
        ScoreShape {
            batch,
            heads: self.heads,
            queries,
            keys,
            upcast: self.upcast,
        }
    }
}

/// `[b, t, heads·d]` → `[b, heads, t, d]`.
fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, t, inner] = x.dims();
    x.reshape([b, t, heads, inner / heads]).swap_dims(1, 2)
}

/// `[b, heads, t, d]` → `[b, t, heads·d]`.
fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, t, d] = x.dims();
    x.swap_dims(1, 2).reshape([b, t, h * d])
}

/// How the text is normalised before `add_k_proj`/`add_v_proj` (`cross_attention_norm`).
#[derive(Module, Debug)]
pub enum CrossAttentionNorm<B: Backend> {
    /// `"group_norm"`: over the text's channels (32 groups, eps 1e-5).
    Group(GroupNorm<B>),
    /// `"layer_norm"`.
    Layer(LayerNorm<B>),
}

/// Diffusers' `Attention` with `added_kv_proj_dim`, run by `AttnAddedKVProcessor`: IF's
/// attention over a feature map. The image tokens are group-normed; the text gets its own key
/// and value projections (`add_k_proj`/`add_v_proj`) and its keys/values come before the image's
/// (which are left out with `only_cross_attention`); the input is added back.
#[derive(Module, Debug)]
pub struct AddedKvAttention<B: Backend> {
    pub group_norm: GroupNorm<B>,
    pub norm_cross: Option<CrossAttentionNorm<B>>,
    pub to_q: Linear<B>,
    pub to_k: Option<Linear<B>>,
    pub to_v: Option<Linear<B>>,
    pub add_k_proj: Linear<B>,
    pub add_v_proj: Linear<B>,
    /// `to_out.0` (`to_out.1` is a dropout).
    pub to_out: Vec<Linear<B>>,
    pub heads: usize,
    pub scale: f64,
    #[module(skip)]
    pub processor: AttnProcessor,
}

/// The arguments IF's blocks give `Attention` (query and key widths are the block's channels,
/// `bias=True`, `upcast_softmax=True`).
#[derive(Debug, Clone, PartialEq)]
pub struct AddedKvAttentionConfig {
    /// Per head; the block's channels / this is the number of heads.
    pub attention_head_dim: usize,
    /// The text's width (`added_kv_proj_dim`, the UNet's `cross_attention_dim`).
    pub added_kv_proj_dim: usize,
    /// Group norm groups over the image tokens (the block's `resnet_groups`).
    pub norm_num_groups: usize,
    pub only_cross_attention: bool,
    /// `cross_attention_norm`: `None`, `"group_norm"` or `"layer_norm"`.
    pub cross_attention_norm: Option<String>,
}

impl AddedKvAttentionConfig {
    /// Checks what [`Self::init`] relies on, for a block of `channels`.
    pub fn check(&self, channels: usize) -> crate::Result<()> {
        let d = self.attention_head_dim;
        let groups_ok =
            |c: usize| self.norm_num_groups > 0 && c.is_multiple_of(self.norm_num_groups);
        if d == 0 || !channels.is_multiple_of(d) || !groups_ok(channels) {
            return Err(crate::EngineError::Unsupported(format!(
                "added-KV attention over {channels} channels with head dim {d} and {} groups",
                self.norm_num_groups
            )));
        }
        match self.cross_attention_norm.as_deref() {
            None => Ok(()),
            // diffusers sizes this norm by the block's width, so only a text as wide fits.
            Some("layer_norm") if self.added_kv_proj_dim == channels => Ok(()),
            Some("group_norm") if self.added_kv_proj_dim.is_multiple_of(32) => Ok(()),
            Some(other) => Err(crate::EngineError::Unsupported(format!(
                "cross_attention_norm `{other}` over a text of width {}",
                self.added_kv_proj_dim
            ))),
        }
    }

    /// Builds the layer for a block of `channels` with fresh weights (call [`Self::check`]
    /// first).
    pub fn init<B: Backend>(&self, channels: usize, device: &B::Device) -> AddedKvAttention<B> {
        let d = self.attention_head_dim.max(1);
        let heads = channels / d;
        let inner = heads * d;
        let text = self.added_kv_proj_dim;
        let self_kv = !self.only_cross_attention;
        AddedKvAttention {
            group_norm: group_norm(self.norm_num_groups, channels, 1e-5, device),
            norm_cross: match self.cross_attention_norm.as_deref() {
                Some("group_norm") => Some(CrossAttentionNorm::Group(group_norm(
                    32, text, 1e-5, device,
                ))),
                Some("layer_norm") => Some(CrossAttentionNorm::Layer(layer_norm(
                    channels, 1e-5, device,
                ))),
                _ => None,
            },
            to_q: linear(channels, inner, true, device),
            to_k: self_kv.then(|| linear(channels, inner, true, device)),
            to_v: self_kv.then(|| linear(channels, inner, true, device)),
            add_k_proj: linear(text, inner, true, device),
            add_v_proj: linear(text, inner, true, device),
            to_out: vec![linear(inner, channels, true, device)],
            heads,
            scale: 1.0 / (d as f64).sqrt(),
            processor: AttnProcessor::default(),
        }
    }
}

impl<B: Backend> AddedKvAttention<B> {
    /// Attention of a feature map (in `format`) over itself and `context`; without a context
    /// the feature map's own (un-normalised) tokens stand in for the text, as in diffusers.
    ///
    /// # Shapes
    /// - x: `[b, c, h, w]` (or channels-last) → same
    /// - context: `[b, text_tokens, added_kv_proj_dim]`
    pub fn forward_in(
        &self,
        x: Tensor<B, 4>,
        context: Option<&Tensor<B, 3>>,
        format: MemoryFormat,
    ) -> Tensor<B, 4> {
        let dims = x.dims();
        let (b, c) = (dims[0], format.channels(dims));
        let [h, w] = format.spatial(dims);
        let to_tokens = |m: Tensor<B, 4>| match format {
            MemoryFormat::Contiguous => m.reshape([b, c, h * w]).swap_dims(1, 2),
            MemoryFormat::ChannelsLast => m.reshape([b, h * w, c]),
        };
        let residual = x.clone();
        let text = match context {
            None => to_tokens(x.clone()),
            Some(t) => match &self.norm_cross {
                None => t.clone(),
                Some(CrossAttentionNorm::Layer(n)) => n.forward(t.clone()),
                Some(CrossAttentionNorm::Group(n)) => {
                    group_norm_forward(n, t.clone().swap_dims(1, 2)).swap_dims(1, 2)
                }
            },
        };
        let tokens = to_tokens(group_norm_forward_in(&self.group_norm, x, format));
        let q = split_heads(self.to_q.forward(tokens.clone()), self.heads);
        let text_k = split_heads(self.add_k_proj.forward(text.clone()), self.heads);
        let text_v = split_heads(self.add_v_proj.forward(text), self.heads);
        let (k, v) = match (&self.to_k, &self.to_v) {
            (Some(to_k), Some(to_v)) => (
                Tensor::cat(
                    vec![
                        text_k,
                        split_heads(to_k.forward(tokens.clone()), self.heads),
                    ],
                    2,
                ),
                Tensor::cat(
                    vec![text_v, split_heads(to_v.forward(tokens), self.heads)],
                    2,
                ),
            ),
            _ => (text_k, text_v),
        };
        let mut out = merge_heads(self.processor.compute(q, k, v, self.scale, true));
        for layer in &self.to_out {
            out = layer.forward(out);
        }
        let out = match format {
            MemoryFormat::Contiguous => out.swap_dims(1, 2).reshape([b, c, h, w]),
            MemoryFormat::ChannelsLast => out.reshape([b, h, w, c]),
        };
        out.add(residual)
    }

    /// Sets this layer's processor.
    pub fn set_processor(&mut self, processor: AttnProcessor) {
        self.processor = processor;
    }

    /// The scores of [`Self::forward_in`] over `tokens` image tokens and `context` text tokens
    /// (the image's own tokens stand in for a missing text).
    pub fn score_shape(&self, batch: usize, tokens: usize, context: Option<usize>) -> ScoreShape {
        let own = if self.to_k.is_some() { tokens } else { 0 };
        ScoreShape {
            batch,
            heads: self.heads,
            queries: tokens,
            keys: context.unwrap_or(tokens) + own,
            upcast: true,
        }
    }
}
