//! T5's encoder, DeepFloyd IF's prompt encoder (T5 v1.1 XXL).
//!
//! Mirrors transformers' `models/t5/modeling_t5.py` (`T5EncoderModel` → `T5Stack` of `T5Block`s,
//! each a `T5LayerSelfAttention` and a `T5LayerFF`, then `final_layer_norm`) and
//! `configuration_t5.py` (`T5Config`). What sets T5 apart from CLIP:
//! - RMSNorm without mean or bias (`T5LayerNorm`), computed in f32;
//! - no scaling of the attention scores; a learned bias per head over bucketed relative
//!   positions (block 0 owns it, every block adds the same bias);
//! - the attention mask hides padding keys (IF passes the tokenizer's mask);
//! - v1.1's gated feed-forward: `wo(gelu_tanh(wi_0 x) · wi_1 x)`; no biases anywhere.
//!
//! transformers names the two sub-layers of a block `layer.0` / `layer.1` and capitalises
//! `SelfAttention` and `DenseReluDense`; our fields are `attention` / `ff`, `self_attention`,
//! `dense_relu_dense`, and [`t5_renames`] maps the file's keys to them.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::activation::{gelu_approximate, relu, softmax};
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData, backend::Backend};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::memory::MemoryBudget;
use crate::models::weights::WeightFiles;

/// transformers' `T5Config` (the encoder's part), read from `text_encoder/config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    /// Width of one attention head.
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    /// `"gated-gelu"` (v1.1, IF), `"relu"` (the original T5), `"gated-relu"`, `"gelu"`.
    pub feed_forward_proj: String,
    /// Everything else (decoder settings, ids, dropout…): not used by the encoder.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for T5Config {
    fn default() -> Self {
        // transformers' defaults (t5-small).
        Self {
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".into(),
            extra: BTreeMap::new(),
        }
    }
}

/// The feed-forward's activation and whether it is gated (`feed_forward_proj`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum T5FeedForward {
    Relu,
    /// transformers' `gelu_new` (the tanh approximation), as T5 v1.1 uses.
    Gelu,
}

impl T5Config {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| EngineError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config
            .feed_forward()
            .map_err(|message| EngineError::Config {
                path: path.to_path_buf(),
                message,
            })?;
        config.validate().map_err(|message| EngineError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// `(activation, gated)` from `feed_forward_proj`, as transformers parses it.
    pub fn feed_forward(&self) -> std::result::Result<(T5FeedForward, bool), String> {
        let (gated, act) = match self.feed_forward_proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, self.feed_forward_proj.as_str()),
            Some(_) => {
                return Err(format!(
                    "feed_forward_proj `{}` is not `ACT` or `gated-ACT`",
                    self.feed_forward_proj
                ));
            }
        };
        let act = match act {
            "relu" => T5FeedForward::Relu,
            // T5 v1.1: "gated-gelu" means `gelu_new` (transformers maps it so).
            "gelu" | "gelu_new" => T5FeedForward::Gelu,
            other => {
                return Err(format!(
                    "feed-forward activation `{other}` is not supported"
                ));
            }
        };
        Ok((act, gated))
    }

    /// Checks that no size is zero.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            (
                "relative_attention_num_buckets",
                self.relative_attention_num_buckets,
            ),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if self.relative_attention_num_buckets < 4 {
            return Err("relative_attention_num_buckets must be at least 4".into());
        }
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets / 4 {
            return Err(format!(
                "relative_attention_max_distance {} must exceed num_buckets / 4",
                self.relative_attention_max_distance
            ));
        }
        if self.layer_norm_epsilon.is_nan() || self.layer_norm_epsilon <= 0.0 {
            return Err(format!(
                "layer_norm_epsilon must be positive, found {}",
                self.layer_norm_epsilon
            ));
        }
        Ok(())
    }

    /// Builds the model with random weights (random-weight mode, or before loading).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<T5EncoderModel<B>> {
        let (activation, gated) = self.feed_forward().map_err(EngineError::Unsupported)?;
        let inner = self.num_heads * self.d_kv;
        let linear = |i: usize, o: usize| LinearConfig::new(i, o).with_bias(false).init(device);
        let norm = || T5LayerNorm {
            weight: Param::from_tensor(Tensor::ones([self.d_model], device)),
            eps: self.layer_norm_epsilon,
        };
        let block = (0..self.num_layers)
            .map(|i| T5Block {
                attention: T5LayerSelfAttention {
                    layer_norm: norm(),
                    self_attention: T5Attention {
                        q: linear(self.d_model, inner),
                        k: linear(self.d_model, inner),
                        v: linear(self.d_model, inner),
                        o: linear(inner, self.d_model),
                        relative_attention_bias: (i == 0).then(|| {
                            EmbeddingConfig::new(
                                self.relative_attention_num_buckets,
                                self.num_heads,
                            )
                            .init(device)
                        }),
                        num_heads: self.num_heads,
                        d_kv: self.d_kv,
                    },
                },
                ff: T5LayerFF {
                    layer_norm: norm(),
                    dense_relu_dense: T5DenseActDense {
                        wi_0: linear(self.d_model, self.d_ff),
                        wi_1: gated.then(|| linear(self.d_model, self.d_ff)),
                        wo: linear(self.d_ff, self.d_model),
                        activation,
                    },
                },
            })
            .collect();
        Ok(T5EncoderModel {
            shared: EmbeddingConfig::new(self.vocab_size, self.d_model).init(device),
            encoder: T5Stack {
                block,
                final_layer_norm: norm(),
                num_buckets: self.relative_attention_num_buckets,
                max_distance: self.relative_attention_max_distance,
            },
        })
    }
}

/// transformers' `T5EncoderModel`: the token embedding (`shared`) and the encoder stack.
#[derive(Module, Debug)]
pub struct T5EncoderModel<B: Backend> {
    pub shared: Embedding<B>,
    pub encoder: T5Stack<B>,
}

impl<B: Backend> T5EncoderModel<B> {
    /// Loads a `text_encoder/` folder: `config.json` and the weights (`model.safetensors`, or
    /// the shards a `model.safetensors.index.json` lists), of `variant` where the folder has
    /// them (`model.fp16.safetensors`, `model.safetensors.index.fp16.json`).
    pub fn load(dir: &Path, variant: Option<&str>, device: &B::Device) -> Result<(Self, T5Config)> {
        Self::load_checked(dir, variant, &MemoryBudget::Unchecked, device)
    }

    /// [`Self::load`], refused before any weight is read when the weights cannot fit `budget`
    /// (T5-XXL's encoder is 4.76 billion weights: 17.7 GiB in f32).
    pub fn load_checked(
        dir: &Path,
        variant: Option<&str>,
        budget: &MemoryBudget,
        device: &B::Device,
    ) -> Result<(Self, T5Config)> {
        let config = T5Config::from_file(&dir.join("config.json"))?;
        let mut model = config.init(device)?;
        budget.check_weights("the T5 text encoder", model.num_params())?;
        WeightFiles::find(dir, "model", variant)?.load_into(&mut model, t5_renames)?;
        Ok((model, config))
    }

    /// The width of the prompt embeddings (4096 for T5-XXL).
    pub fn d_model(&self) -> usize {
        self.shared.weight.dims()[1]
    }

    /// Encodes token ids; `attention_mask` (1 = token, 0 = padding) hides padding keys.
    ///
    /// # Shapes
    ///
    /// - input_ids, attention_mask: `[batch, seq_len]`
    /// - output: `[batch, seq_len, d_model]` (after `final_layer_norm`)
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
    ) -> Result<Tensor<B, 3>> {
        let [batch, seq_len] = input_ids.dims();
        if attention_mask.dims() != [batch, seq_len] {
            return Err(EngineError::invalid(
                "attention_mask",
                format!(
                    "shape {:?} differs from input_ids' {:?}",
                    attention_mask.dims(),
                    [batch, seq_len]
                ),
            ));
        }
        let vocab = self.shared.weight.dims()[0];
        let max_id = input_ids.clone().max().into_scalar().elem::<i64>();
        if max_id >= vocab as i64 || input_ids.clone().min().into_scalar().elem::<i64>() < 0 {
            return Err(EngineError::invalid(
                "input_ids",
                format!("token id {max_id} is outside the vocabulary of {vocab}"),
            ));
        }
        let hidden = self.shared.forward(input_ids);
        Ok(self.encoder.forward(hidden, attention_mask))
    }
}

/// transformers' `T5Stack` (encoder side).
#[derive(Module, Debug)]
pub struct T5Stack<B: Backend> {
    pub block: Vec<T5Block<B>>,
    pub final_layer_norm: T5LayerNorm<B>,
    #[module(skip)]
    pub num_buckets: usize,
    #[module(skip)]
    pub max_distance: usize,
}

impl<B: Backend> T5Stack<B> {
    fn forward(&self, hidden: Tensor<B, 3>, attention_mask: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [batch, seq_len, _] = hidden.dims();
        let device = hidden.device();
        // Padding keys get the dtype's lowest value (transformers: `finfo.min`), added with the
        // position bias once and reused by every block.
        let mask_bias = attention_mask
            .equal_elem(0)
            .float()
            .mul_scalar(f32::MIN)
            .reshape([batch, 1, 1, seq_len]);
        let position_bias = self
            .block
            .first()
            .and_then(|b| b.attention.self_attention.relative_attention_bias.as_ref())
            .map(|bias| {
                let buckets =
                    relative_position_buckets(seq_len, self.num_buckets, self.max_distance);
                let buckets = Tensor::<B, 2, Int>::from_data(
                    TensorData::new(buckets, [seq_len, seq_len]),
                    &device,
                );
                // [l, l, heads] → [1, heads, l, l]
                bias.forward(buckets)
                    .permute([2, 0, 1])
                    .unsqueeze_dim::<4>(0)
            });
        let bias = match position_bias {
            Some(p) => p + mask_bias,
            None => mask_bias,
        };
        let mut hidden = hidden;
        for block in &self.block {
            hidden = block.forward(hidden, bias.clone());
        }
        self.final_layer_norm.forward(hidden)
    }
}

/// transformers' `T5Attention._relative_position_bucket` for the encoder (bidirectional), for
/// every `(query, key)` pair of a `seq_len` sequence, row-major over queries. Half the buckets
/// are for keys after the query; in each half, distances below a quarter of the buckets get
/// their own bucket and longer ones share log-spaced buckets up to `max_distance`. Computed in
/// f32 as torch does.
pub fn relative_position_buckets(
    seq_len: usize,
    num_buckets: usize,
    max_distance: usize,
) -> Vec<i64> {
    let half = num_buckets / 2;
    let max_exact = half / 2;
    let log_range = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    let mut out = Vec::with_capacity(seq_len * seq_len);
    for query in 0..seq_len {
        for key in 0..seq_len {
            let relative = key as i64 - query as i64;
            let mut bucket = if relative > 0 { half as i64 } else { 0 };
            let distance = relative.unsigned_abs() as usize;
            bucket += if distance < max_exact {
                distance as i64
            } else {
                let scaled = ((distance as f32) / (max_exact as f32)).ln() / log_range
                    * (half - max_exact) as f32;
                ((max_exact as f32 + scaled) as i64).min(half as i64 - 1)
            };
            out.push(bucket);
        }
    }
    out
}

/// transformers' `T5Block` (encoder): self-attention, then the feed-forward.
#[derive(Module, Debug)]
pub struct T5Block<B: Backend> {
    /// `layer.0` in the file.
    pub attention: T5LayerSelfAttention<B>,
    /// `layer.1` in the file.
    pub ff: T5LayerFF<B>,
}

impl<B: Backend> T5Block<B> {
    fn forward(&self, hidden: Tensor<B, 3>, bias: Tensor<B, 4>) -> Tensor<B, 3> {
        let hidden = clamp_f16(self.attention.forward(hidden, bias));
        clamp_f16(self.ff.forward(hidden))
    }
}

/// transformers keeps f16 activations finite after each sub-layer by clamping to
/// `finfo(f16).max - 1000` (T5-XXL's activations overflow f16 otherwise). It clamps only when
/// an inf appeared; clamping always differs only for values already within 1000 of overflow.
fn clamp_f16<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    if x.dtype() == DType::F16 {
        let limit = 65504.0 - 1000.0;
        x.clamp(-limit, limit)
    } else {
        x
    }
}

/// transformers' `T5LayerSelfAttention`: `x + o(attention(norm(x)))`.
#[derive(Module, Debug)]
pub struct T5LayerSelfAttention<B: Backend> {
    pub layer_norm: T5LayerNorm<B>,
    /// `SelfAttention` in the file.
    pub self_attention: T5Attention<B>,
}

impl<B: Backend> T5LayerSelfAttention<B> {
    fn forward(&self, hidden: Tensor<B, 3>, bias: Tensor<B, 4>) -> Tensor<B, 3> {
        let normed = self.layer_norm.forward(hidden.clone());
        hidden + self.self_attention.forward(normed, bias)
    }
}

/// transformers' `T5Attention` (self-attention, no cache): `softmax(QKᵀ + bias) V`, unscaled.
#[derive(Module, Debug)]
pub struct T5Attention<B: Backend> {
    pub q: Linear<B>,
    pub k: Linear<B>,
    pub v: Linear<B>,
    pub o: Linear<B>,
    /// Block 0 only: `[num_buckets, num_heads]`.
    pub relative_attention_bias: Option<Embedding<B>>,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub d_kv: usize,
}

impl<B: Backend> T5Attention<B> {
    /// # Shapes
    ///
    /// - hidden: `[batch, seq_len, d_model]`
    /// - bias: `[batch or 1, heads or 1, seq_len, seq_len]` (position bias + mask)
    /// - output: `[batch, seq_len, d_model]`
    fn forward(&self, hidden: Tensor<B, 3>, bias: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, seq_len, _] = hidden.dims();
        let (heads, d_kv) = (self.num_heads, self.d_kv);
        let split = |x: Tensor<B, 3>| x.reshape([batch, seq_len, heads, d_kv]).swap_dims(1, 2);
        let q = split(self.q.forward(hidden.clone()));
        let k = split(self.k.forward(hidden.clone()));
        let v = split(self.v.forward(hidden));
        // Scores and softmax in f32 (transformers: `softmax(scores.float())`).
        let dtype = q.dtype();
        let scores = q
            .cast(DType::F32)
            .matmul(k.cast(DType::F32).swap_dims(2, 3))
            + bias.cast(DType::F32);
        let probs = softmax(scores, 3).cast(dtype);
        let context = probs
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch, seq_len, heads * d_kv]);
        self.o.forward(context)
    }
}

/// transformers' `T5LayerFF`: `x + ff(norm(x))`.
#[derive(Module, Debug)]
pub struct T5LayerFF<B: Backend> {
    pub layer_norm: T5LayerNorm<B>,
    /// `DenseReluDense` in the file.
    pub dense_relu_dense: T5DenseActDense<B>,
}

impl<B: Backend> T5LayerFF<B> {
    fn forward(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let normed = self.layer_norm.forward(hidden.clone());
        hidden + self.dense_relu_dense.forward(normed)
    }
}

/// transformers' `T5DenseActDense` (`wi`) and `T5DenseGatedActDense` (`wi_0`, `wi_1`). The
/// ungated file's `wi` is read into `wi_0`.
#[derive(Module, Debug)]
pub struct T5DenseActDense<B: Backend> {
    pub wi_0: Linear<B>,
    pub wi_1: Option<Linear<B>>,
    pub wo: Linear<B>,
    #[module(skip)]
    pub activation: T5FeedForward,
}

impl<B: Backend> T5DenseActDense<B> {
    fn forward(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.wi_0.forward(hidden.clone());
        let h = match self.activation {
            T5FeedForward::Relu => relu(h),
            T5FeedForward::Gelu => gelu_approximate(h),
        };
        let h = match &self.wi_1 {
            Some(wi_1) => h * wi_1.forward(hidden),
            None => h,
        };
        self.wo.forward(h)
    }
}

/// transformers' `T5LayerNorm`: RMS normalisation with a scale, no mean, no bias, in f32.
#[derive(Module, Debug)]
pub struct T5LayerNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    #[module(skip)]
    pub eps: f64,
}

impl<B: Backend> T5LayerNorm<B> {
    fn forward(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let dtype = hidden.dtype();
        let x = hidden.cast(DType::F32);
        let variance = x.clone().powi_scalar(2).mean_dim(2);
        let normed = x * variance.add_scalar(self.eps).sqrt().recip();
        normed.cast(dtype) * self.weight.val().cast(dtype).unsqueeze::<3>()
    }
}

/// `(key in the file, module key)` for a T5 encoder checkpoint's keys: the two sub-layers of
/// each block by role, transformers' capitalised names in snake case, `wi` (ungated) as `wi_0`,
/// and `encoder.embed_tokens` (the tied copy of `shared`) read as `shared` when `shared` itself
/// is absent.
pub fn t5_renames(keys: &[String]) -> Vec<(String, String)> {
    let has_shared = keys.iter().any(|k| k == "shared.weight");
    keys.iter()
        .filter_map(|key| {
            if key == "encoder.embed_tokens.weight" {
                return (!has_shared).then(|| (key.clone(), "shared.weight".to_string()));
            }
            let renamed = key
                .replace(".layer.0.SelfAttention.", ".attention.self_attention.")
                .replace(".layer.0.layer_norm.", ".attention.layer_norm.")
                .replace(".layer.1.DenseReluDense.", ".ff.dense_relu_dense.")
                .replace(".layer.1.layer_norm.", ".ff.layer_norm.")
                .replace(".dense_relu_dense.wi.", ".dense_relu_dense.wi_0.");
            (renamed != *key).then(|| (key.clone(), renamed))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_map_transformers_names_to_fields() {
        let keys: Vec<String> = [
            "shared.weight",
            "encoder.embed_tokens.weight",
            "encoder.block.0.layer.0.SelfAttention.q.weight",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder.block.3.layer.1.DenseReluDense.wi_1.weight",
            "encoder.block.3.layer.1.layer_norm.weight",
            "encoder.final_layer_norm.weight",
        ]
        .map(String::from)
        .to_vec();
        let renames = t5_renames(&keys);
        let get = |k: &str| {
            renames
                .iter()
                .find(|(f, _)| f == k)
                .map(|(_, m)| m.as_str())
        };
        assert_eq!(
            get("encoder.embed_tokens.weight"),
            None,
            "shared is present"
        );
        assert_eq!(
            get("encoder.block.0.layer.0.SelfAttention.q.weight"),
            Some("encoder.block.0.attention.self_attention.q.weight")
        );
        assert_eq!(
            get("encoder.block.3.layer.1.DenseReluDense.wi_1.weight"),
            Some("encoder.block.3.ff.dense_relu_dense.wi_1.weight")
        );
        assert_eq!(
            get("encoder.block.3.layer.1.layer_norm.weight"),
            Some("encoder.block.3.ff.layer_norm.weight")
        );
        assert_eq!(get("encoder.final_layer_norm.weight"), None, "same name");
        let only_tied = t5_renames(&["encoder.embed_tokens.weight".to_string()]);
        assert_eq!(only_tied[0].1, "shared.weight");
    }

    #[test]
    fn buckets_follow_transformers() {
        // transformers' `_relative_position_bucket(key - query, bidirectional=True, 32, 128)`
        // for query 0 and keys 0..=76 (keys after the query use buckets 16..32).
        let expected: [(usize, i64); 12] = [
            (0, 0),
            (1, 17),
            (7, 23),
            (8, 24),
            (11, 24),
            (12, 25),
            (16, 26),
            (23, 27),
            (32, 28),
            (46, 29),
            (64, 30),
            (76, 30),
        ];
        let b = relative_position_buckets(77, 32, 128);
        for (key, bucket) in expected {
            assert_eq!(b[key], bucket, "key {key}");
        }
        // Keys before the query use buckets 0..16: query 76, key 0 is distance 76.
        assert_eq!(b[76 * 77], 14);
        assert_eq!(b[76 * 77 + 75], 1);
    }
}
