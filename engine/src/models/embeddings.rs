//! Timestep embeddings (aka diffusers' `models/embeddings.py`: `get_timestep_embedding`,
//! `Timesteps`, `TimestepEmbedding`).

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{Tensor, TensorData, backend::Backend};

use super::normalization::{Activation, linear};

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
