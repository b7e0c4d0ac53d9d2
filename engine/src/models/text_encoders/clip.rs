//! CLIP's text encoder, the prompt encoder of Stable Diffusion 1.x/2.x.
//!
//! Mirrors transformers' `models/clip/modeling_clip.py` (`CLIPTextModel` → `CLIPTextTransformer`
//! → `CLIPTextEmbeddings`, `CLIPEncoder` of `CLIPEncoderLayer`s with `CLIPAttention` and
//! `CLIPMLP`, then `final_layer_norm`) and `configuration_clip.py` (`CLIPTextConfig`).
//!
//! Field names equal the state-dict keys (`text_model.encoder.layers.0.self_attn.q_proj.weight`),
//! so a diffusers `text_encoder/model.safetensors` loads through `burn-store` with no renaming.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{gelu, gelu_approximate, sigmoid, softmax};
use burn::tensor::{Bool, Int, Tensor, backend::Backend};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::models::weights::WeightFiles;

/// The activation between `fc1` and `fc2` (transformers' `ACT2FN[config.hidden_act]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP, SD 1.x.
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP ViT-H, SD 2.x.
    Gelu,
    /// The tanh approximation of GELU.
    #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluNew,
}

impl HiddenAct {
    fn forward<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::QuickGelu => x.clone() * sigmoid(x.mul_scalar(1.702)),
            Self::Gelu => gelu(x),
            Self::GeluNew => gelu_approximate(x),
        }
    }
}

/// transformers' `CLIPTextConfig`, read from `text_encoder/config.json`.
///
/// Defaults are transformers' `__init__` defaults. Keys we do not use are kept in `extra`; the
/// ones no CLIP text config is expected to carry are warned about on load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CLIPTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: HiddenAct,
    pub layer_norm_eps: f64,
    pub pad_token_id: Option<i64>,
    pub bos_token_id: Option<i64>,
    /// SD 1.x configs say 2 (the pre-2023 default): the pooled token is then found by `argmax`
    /// over the ids, as transformers keeps doing for backward compatibility.
    pub eos_token_id: Option<i64>,
    /// Every other key of the file.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for CLIPTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: HiddenAct::QuickGelu,
            layer_norm_eps: 1e-5,
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: Some(49407),
            extra: BTreeMap::new(),
        }
    }
}

/// Keys of a transformers config that carry no meaning for inference here (training knobs,
/// bookkeeping, generation defaults). Anything else unknown is worth a warning.
const IGNORED_CONFIG_KEYS: &[&str] = &[
    "_name_or_path",
    "_commit_hash",
    "architectures",
    "attention_dropout",
    "dropout",
    "dtype",
    "initializer_factor",
    "initializer_range",
    "model_type",
    "torch_dtype",
    "transformers_version",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "use_cache",
    "id2label",
    "label2id",
    "tie_word_embeddings",
    "is_encoder_decoder",
    "chunk_size_feed_forward",
];

impl CLIPTextConfig {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| EngineError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        for key in config.extra.keys() {
            if !IGNORED_CONFIG_KEYS.contains(&key.as_str()) {
                tracing::warn!(file = %path.display(), key = %key, "unknown CLIPTextConfig key");
            }
        }
        config.validate().map_err(|message| EngineError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// Checks the sizes fit together (heads divide the width, nothing is zero).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(format!(
                "layer_norm_eps must be positive, found {}",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }

    /// Builds the model with random weights (random-weight mode, or before loading).
    pub fn init<B: Backend>(&self, device: &B::Device) -> CLIPTextModel<B> {
        CLIPTextModel {
            text_model: CLIPTextTransformer::new(self, device),
        }
    }
}

/// What `CLIPTextModel::forward` returns (transformers' `BaseModelOutputWithPooling` with
/// `output_hidden_states=True`).
#[derive(Debug, Clone)]
pub struct CLIPTextModelOutput<B: Backend> {
    /// The last layer's output after `final_layer_norm`: the prompt embeddings SD conditions on.
    /// `[batch, seq_len, hidden_size]`
    pub last_hidden_state: Tensor<B, 3>,
    /// `last_hidden_state` at each prompt's eos token. `[batch, hidden_size]`
    pub pooler_output: Tensor<B, 2>,
    /// The embeddings, then each layer's output (`num_hidden_layers + 1` tensors, none of them
    /// through `final_layer_norm`), as transformers' `hidden_states`. Clip-skip `n` uses
    /// `final_layer_norm(hidden_states[len - 1 - n])`, as diffusers does.
    pub hidden_states: Vec<Tensor<B, 3>>,
}

/// transformers' `CLIPTextModel`: a wrapper whose only child is `text_model`, which gives the
/// state-dict keys their `text_model.` prefix.
#[derive(Module, Debug)]
pub struct CLIPTextModel<B: Backend> {
    pub text_model: CLIPTextTransformer<B>,
}

impl<B: Backend> CLIPTextModel<B> {
    /// Loads a diffusers `text_encoder/` folder: `config.json` and `model.safetensors` (or the
    /// shards its index lists).
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let config = CLIPTextConfig::from_file(&dir.join("config.json"))?;
        let mut model = config.init(device);
        model.load_weights(&WeightFiles::find(dir, "model", None)?)?;
        Ok(model)
    }

    /// Replaces every weight with those in `weights` (PyTorch layout, transformers' key names),
    /// in either layout transformers saves: with the `text_model.` prefix (transformers 4, and
    /// SD 1.5's own files) or without it (`save_pretrained` of transformers 5), with or without
    /// the `position_ids` buffer. A missing or mis-shaped tensor is an error naming it; extra
    /// tensors in the file (such as `text_model.embeddings.position_ids`) are ignored.
    pub fn load_weights(&mut self, weights: &WeightFiles) -> Result<()> {
        weights.load_into(self, clip_renames)
    }

    /// [`Self::load_weights`] from one safetensors file.
    pub fn load_safetensors(&mut self, file: &Path) -> Result<()> {
        self.load_weights(&WeightFiles {
            files: vec![file.to_path_buf()],
            index: None,
        })
    }

    /// Encodes token ids.
    ///
    /// # Shapes
    ///
    /// - input_ids: `[batch, seq_len]`, `seq_len <= max_position_embeddings`
    /// - output: see [`CLIPTextModelOutput`]
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Result<CLIPTextModelOutput<B>> {
        self.text_model.forward(input_ids)
    }

    /// The width of the prompt embeddings (768 for SD 1.x, 1024 for SD 2.x).
    pub fn hidden_size(&self) -> usize {
        self.text_model.final_layer_norm.gamma.val().dims()[0]
    }
}

/// The prefix transformers 4 gives every `CLIPTextModel` key (the wrapper's one child).
const TEXT_MODEL_PREFIX: &str = "text_model.";

/// Renames for a `CLIPTextModel` file saved without the `text_model.` level (transformers 5's
/// `save_pretrained`): every key gets the prefix back. A file with the prefix (or a shard of one
/// holding none of the model's keys) needs none.
pub fn clip_renames(keys: &[String]) -> Vec<(String, String)> {
    if keys.iter().any(|k| k.starts_with(TEXT_MODEL_PREFIX)) {
        return Vec::new();
    }
    keys.iter()
        .map(|key| (key.clone(), format!("{TEXT_MODEL_PREFIX}{key}")))
        .collect()
}

/// transformers' `CLIPTextTransformer`.
#[derive(Module, Debug)]
pub struct CLIPTextTransformer<B: Backend> {
    pub embeddings: CLIPTextEmbeddings<B>,
    pub encoder: CLIPEncoder<B>,
    pub final_layer_norm: LayerNorm<B>,
    /// `None` or 2 selects the legacy `argmax(input_ids)` pooling.
    #[module(skip)]
    pub eos_token_id: Option<i64>,
}

impl<B: Backend> CLIPTextTransformer<B> {
    fn new(config: &CLIPTextConfig, device: &B::Device) -> Self {
        Self {
            embeddings: CLIPTextEmbeddings::new(config, device),
            encoder: CLIPEncoder {
                layers: (0..config.num_hidden_layers)
                    .map(|_| CLIPEncoderLayer::new(config, device))
                    .collect(),
            },
            final_layer_norm: LayerNormConfig::new(config.hidden_size)
                .with_epsilon(config.layer_norm_eps)
                .init(device),
            eos_token_id: config.eos_token_id,
        }
    }

    /// # Shapes
    ///
    /// - input_ids: `[batch, seq_len]`
    /// - output: see [`CLIPTextModelOutput`]
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Result<CLIPTextModelOutput<B>> {
        let [batch, seq_len] = input_ids.dims();
        let max_positions = self.embeddings.position_embedding.weight.val().dims()[0];
        if seq_len == 0 || seq_len > max_positions || batch == 0 {
            return Err(EngineError::invalid(
                "input_ids",
                format!(
                    "shape [{batch}, {seq_len}]: need a non-empty batch of 1 to \
                     {max_positions} tokens"
                ),
            ));
        }
        let device = input_ids.device();

        let embeddings = self.embeddings.forward(input_ids.clone()); // [b, l, d]
        // Additive causal mask: token i sees tokens 0..=i (`_create_4d_causal_attention_mask`).
        let future = Tensor::<B, 2, Bool>::tril_mask([seq_len, seq_len], 0, &device);
        let causal_mask = Tensor::<B, 2>::zeros([seq_len, seq_len], (&device, embeddings.dtype()))
            .mask_fill(future, f32::NEG_INFINITY)
            .reshape([1, 1, seq_len, seq_len]);

        let hidden_states = self.encoder.forward(embeddings, causal_mask);
        let last = hidden_states
            .last()
            .cloned()
            .ok_or_else(|| EngineError::Unsupported("CLIP encoder without states".into()))?;
        let last_hidden_state = self.final_layer_norm.forward(last); // [b, l, d]

        let pooler_output = self.pool(&last_hidden_state, input_ids);
        Ok(CLIPTextModelOutput {
            last_hidden_state,
            pooler_output,
            hidden_states,
        })
    }

    /// The hidden state at each row's first eos token (or, for legacy configs, at its largest
    /// id, which is eos in CLIP's vocabulary).
    fn pool(&self, last_hidden_state: &Tensor<B, 3>, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [batch, seq_len, hidden] = last_hidden_state.dims();
        let device = input_ids.device();
        let len = seq_len as i64;
        // A score whose maximum is unique and lies at the first maximal key, so the result does
        // not depend on how a backend breaks argmax ties (torch takes the first).
        let tie_break = Tensor::<B, 1, Int>::arange(0..len, &device)
            .neg()
            .add_scalar(len - 1)
            .reshape([1, seq_len]); // [1, l]: l-1 … 0
        let key = match self.eos_token_id {
            Some(eos) if eos != 2 => input_ids.equal_elem(eos).int(),
            _ => input_ids,
        };
        let index = (key.mul_scalar(len) + tie_break).argmax(1); // [b, 1]
        let index = index.reshape([batch, 1, 1]).expand([batch, 1, hidden]);
        last_hidden_state
            .clone()
            .gather(1, index)
            .reshape([batch, hidden])
    }
}

/// transformers' `CLIPTextEmbeddings`: token plus learned absolute position embeddings.
#[derive(Module, Debug)]
pub struct CLIPTextEmbeddings<B: Backend> {
    pub token_embedding: Embedding<B>,
    pub position_embedding: Embedding<B>,
}

impl<B: Backend> CLIPTextEmbeddings<B> {
    fn new(config: &CLIPTextConfig, device: &B::Device) -> Self {
        Self {
            token_embedding: EmbeddingConfig::new(config.vocab_size, config.hidden_size)
                .init(device),
            position_embedding: EmbeddingConfig::new(
                config.max_position_embeddings,
                config.hidden_size,
            )
            .init(device),
        }
    }

    /// # Shapes
    ///
    /// - input_ids: `[batch, seq_len]`
    /// - output: `[batch, seq_len, hidden_size]`
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [_, seq_len] = input_ids.dims();
        let positions = Tensor::<B, 1, Int>::arange(0..seq_len as i64, &input_ids.device())
            .reshape([1, seq_len]);
        self.token_embedding.forward(input_ids) + self.position_embedding.forward(positions)
    }
}

/// transformers' `CLIPEncoder`: the stack of layers.
#[derive(Module, Debug)]
pub struct CLIPEncoder<B: Backend> {
    pub layers: Vec<CLIPEncoderLayer<B>>,
}

impl<B: Backend> CLIPEncoder<B> {
    /// Returns the input followed by every layer's output.
    ///
    /// # Shapes
    ///
    /// - hidden_states: `[batch, seq_len, hidden_size]`
    /// - causal_mask: `[1, 1, seq_len, seq_len]`, added to the attention scores
    /// - output: `num_layers + 1` tensors of `[batch, seq_len, hidden_size]`
    pub fn forward(
        &self,
        hidden_states: Tensor<B, 3>,
        causal_mask: Tensor<B, 4>,
    ) -> Vec<Tensor<B, 3>> {
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        let mut hidden = hidden_states;
        for layer in &self.layers {
            states.push(hidden.clone());
            hidden = layer.forward(hidden, causal_mask.clone());
        }
        states.push(hidden);
        states
    }
}

/// transformers' `CLIPEncoderLayer`: pre-norm attention and MLP, each with a residual.
#[derive(Module, Debug)]
pub struct CLIPEncoderLayer<B: Backend> {
    pub self_attn: CLIPAttention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub mlp: CLIPMLP<B>,
    pub layer_norm2: LayerNorm<B>,
}

impl<B: Backend> CLIPEncoderLayer<B> {
    fn new(config: &CLIPTextConfig, device: &B::Device) -> Self {
        let norm = || {
            LayerNormConfig::new(config.hidden_size)
                .with_epsilon(config.layer_norm_eps)
                .init(device)
        };
        Self {
            self_attn: CLIPAttention::new(config, device),
            layer_norm1: norm(),
            mlp: CLIPMLP::new(config, device),
            layer_norm2: norm(),
        }
    }

    /// # Shapes
    ///
    /// - hidden_states: `[batch, seq_len, hidden_size]`
    /// - causal_mask: `[1, 1, seq_len, seq_len]`
    /// - output: `[batch, seq_len, hidden_size]`
    pub fn forward(&self, hidden_states: Tensor<B, 3>, causal_mask: Tensor<B, 4>) -> Tensor<B, 3> {
        let residual = hidden_states.clone();
        let hidden = self
            .self_attn
            .forward(self.layer_norm1.forward(hidden_states), causal_mask);
        let hidden = residual + hidden;
        let residual = hidden.clone();
        residual + self.mlp.forward(self.layer_norm2.forward(hidden))
    }
}

/// transformers' `CLIPAttention`: multi-head self-attention, softmax(QKᵀ/√d + mask)V
/// materialised (77 tokens: the UNet's swappable attention processors are not needed here).
#[derive(Module, Debug)]
pub struct CLIPAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    #[module(skip)]
    pub num_heads: usize,
}

impl<B: Backend> CLIPAttention<B> {
    fn new(config: &CLIPTextConfig, device: &B::Device) -> Self {
        let proj = || LinearConfig::new(config.hidden_size, config.hidden_size).init(device);
        Self {
            q_proj: proj(),
            k_proj: proj(),
            v_proj: proj(),
            out_proj: proj(),
            num_heads: config.num_attention_heads,
        }
    }

    /// # Shapes
    ///
    /// - hidden_states: `[batch, seq_len, hidden_size]`
    /// - causal_mask: `[1, 1, seq_len, seq_len]`, added to the scores
    /// - output: `[batch, seq_len, hidden_size]`
    pub fn forward(&self, hidden_states: Tensor<B, 3>, causal_mask: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, seq_len, width] = hidden_states.dims();
        let heads = self.num_heads;
        let head_dim = width / heads;
        let split_heads = |x: Tensor<B, 3>| {
            x.reshape([batch, seq_len, heads, head_dim]).swap_dims(1, 2) // [b, h, l, d]
        };
        let query = split_heads(self.q_proj.forward(hidden_states.clone()));
        let key = split_heads(self.k_proj.forward(hidden_states.clone()));
        let value = split_heads(self.v_proj.forward(hidden_states));

        let scale = (head_dim as f64).powf(-0.5);
        let scores = query.matmul(key.swap_dims(2, 3)).mul_scalar(scale) + causal_mask; // [b, h, l, l]
        let probs = softmax(scores, 3);
        let context = probs
            .matmul(value) // [b, h, l, d]
            .swap_dims(1, 2)
            .reshape([batch, seq_len, width]);
        self.out_proj.forward(context)
    }
}

/// transformers' `CLIPMLP`: `fc2(act(fc1(x)))`.
#[allow(clippy::upper_case_acronyms)] // transformers' class name
#[derive(Module, Debug)]
pub struct CLIPMLP<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    #[module(skip)]
    pub activation: HiddenAct,
}

impl<B: Backend> CLIPMLP<B> {
    fn new(config: &CLIPTextConfig, device: &B::Device) -> Self {
        Self {
            fc1: LinearConfig::new(config.hidden_size, config.intermediate_size).init(device),
            fc2: LinearConfig::new(config.intermediate_size, config.hidden_size).init(device),
            activation: config.hidden_act,
        }
    }

    /// # Shapes
    ///
    /// - hidden_states: `[batch, seq_len, hidden_size]`
    /// - output: `[batch, seq_len, hidden_size]`
    pub fn forward(&self, hidden_states: Tensor<B, 3>) -> Tensor<B, 3> {
        self.fc2
            .forward(self.activation.forward(self.fc1.forward(hidden_states)))
    }
}
