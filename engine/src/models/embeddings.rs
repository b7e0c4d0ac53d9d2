//! Timestep embeddings (aka diffusers' `models/embeddings.py`: `get_timestep_embedding`,
//! `Timesteps`, `TimestepEmbedding`; IF's text-pooled `TextTimeEmbedding` and its
//! `AttentionPooling`).

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Distribution, Tensor, TensorData, backend::Backend};

use super::normalization::{Activation, layer_norm, linear};

/// Sinusoidal timestep features (diffusers' `Timesteps`; no weights).
#[derive(Module, Debug, Clone)]
pub struct Timesteps {
    pub num_channels: usize,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f64,
}

impl Timesteps {
    /// Diffusers' `get_timestep_embedding` with `max_period` 10000 and scale 1.
    /// The table is computed on the host in f64 and uploaded: it is `batch × channels` numbers.
    ///
    /// # Shapes
    /// - output: `[timesteps.len(), num_channels]`
    pub fn forward<B: Backend>(&self, timesteps: &[f64], device: &B::Device) -> Tensor<B, 2> {
        let half = self.num_channels / 2;
        let denom = half as f64 - self.downscale_freq_shift;
        let mut data = Vec::with_capacity(timesteps.len() * self.num_channels);
        for &t in timesteps {
            // torch computes exponent and the product in f32; match it.
            let args: Vec<f32> = (0..half)
                .map(|i| {
                    let exponent = (-(10000f64.ln()) as f32) * i as f32 / denom as f32;
                    t as f32 * exponent.exp()
                })
                .collect();
            let sin = args.iter().map(|a| a.sin());
            let cos = args.iter().map(|a| a.cos());
            if self.flip_sin_to_cos {
                data.extend(cos.chain(sin));
            } else {
                data.extend(sin.chain(cos));
            }
            if self.num_channels % 2 == 1 {
                data.push(0.0);
            }
        }
        Tensor::from_data(
            TensorData::new(data, [timesteps.len(), self.num_channels]),
            device,
        )
    }
}

/// Two linear layers with an activation (diffusers' `TimestepEmbedding`).
#[derive(Module, Debug)]
pub struct TimestepEmbedding<B: Backend> {
    pub linear_1: Linear<B>,
    pub linear_2: Linear<B>,
    #[module(skip)]
    pub act: Activation,
}

impl<B: Backend> TimestepEmbedding<B> {
    /// `in_channels → time_embed_dim → out_dim`.
    pub fn new(
        in_channels: usize,
        time_embed_dim: usize,
        out_dim: Option<usize>,
        act: Activation,
        device: &B::Device,
    ) -> Self {
        Self {
            linear_1: linear(in_channels, time_embed_dim, true, device),
            linear_2: linear(
                time_embed_dim,
                out_dim.unwrap_or(time_embed_dim),
                true,
                device,
            ),
            act,
        }
    }

    /// # Shapes
    /// - x: `[batch, in_channels]` → `[batch, out_dim]`
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.linear_2
            .forward(self.act.forward(self.linear_1.forward(x)))
    }
}

/// IF's attention pooling of the text into one vector (diffusers' `AttentionPooling`, from
/// DeepFloyd's code): a class token (the tokens' mean plus a learned position) attends over
/// itself and every token, multi-head.
#[derive(Module, Debug)]
pub struct AttentionPooling<B: Backend> {
    /// `[1, dim]`.
    pub positional_embedding: Param<Tensor<B, 2>>,
    pub k_proj: Linear<B>,
    pub q_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub num_heads: usize,
}

impl<B: Backend> AttentionPooling<B> {
    /// `num_heads` heads over `dim` channels (`dim` a multiple of `num_heads`).
    pub fn new(num_heads: usize, dim: usize, device: &B::Device) -> Self {
        let std = 1.0 / (dim as f64).sqrt();
        Self {
            positional_embedding: Param::from_tensor(Tensor::random(
                [1, dim],
                Distribution::Normal(0.0, std),
                device,
            )),
            k_proj: linear(dim, dim, true, device),
            q_proj: linear(dim, dim, true, device),
            v_proj: linear(dim, dim, true, device),
            num_heads,
        }
    }

    /// # Shapes
    /// - x: `[batch, tokens, dim]` → `[batch, dim]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, _, dim] = x.dims();
        let heads = self.num_heads;
        let d = dim / heads;
        let split = |t: Tensor<B, 3>| {
            let len = t.dims()[1];
            t.reshape([b, len, heads, d]).swap_dims(1, 2) // [b, heads, len, d]
        };
        let position = self
            .positional_embedding
            .val()
            .cast(x.dtype())
            .unsqueeze_dim(0);
        let class_token = x.clone().mean_dim(1).add(position); // [b, 1, dim]
        let tokens = Tensor::cat(vec![class_token.clone(), x], 1);
        // Both sides scaled by d^-1/4, as the original does for f16's sake.
        let scale = 1.0 / (d as f64).sqrt().sqrt();
        let q = split(self.q_proj.forward(class_token)).mul_scalar(scale);
        let k = split(self.k_proj.forward(tokens.clone())).mul_scalar(scale);
        let v = split(self.v_proj.forward(tokens));
        let dtype = q.dtype();
        let weight = softmax(q.matmul(k.swap_dims(2, 3)).cast(DType::F32), 3).cast(dtype);
        weight.matmul(v).reshape([b, dim]) // [b, heads, 1, d], head-major
    }
}

/// `addition_embed_type="text"` (IF): the text pooled into a vector that is added to the time
/// embedding (diffusers' `TextTimeEmbedding`).
#[derive(Module, Debug)]
pub struct TextTimeEmbedding<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub pool: AttentionPooling<B>,
    pub proj: Linear<B>,
    pub norm2: LayerNorm<B>,
}

impl<B: Backend> TextTimeEmbedding<B> {
    /// `encoder_dim` text channels → `time_embed_dim`.
    pub fn new(
        encoder_dim: usize,
        time_embed_dim: usize,
        num_heads: usize,
        device: &B::Device,
    ) -> Self {
        Self {
            norm1: layer_norm(encoder_dim, 1e-5, device),
            pool: AttentionPooling::new(num_heads, encoder_dim, device),
            proj: linear(encoder_dim, time_embed_dim, true, device),
            norm2: layer_norm(time_embed_dim, 1e-5, device),
        }
    }

    /// # Shapes
    /// - text: `[batch, tokens, encoder_dim]` → `[batch, time_embed_dim]`
    pub fn forward(&self, text: Tensor<B, 3>) -> Tensor<B, 2> {
        let pooled = self.pool.forward(self.norm1.forward(text));
        self.norm2.forward(self.proj.forward(pooled))
    }
}
