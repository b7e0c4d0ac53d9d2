//! Diffusers' `UNet2DConditionModel` (aka `models/unets/unet_2d_condition.py`), configured from
//! its `config.json`: SD 1.x and 2.x (conv or linear projections, per-block heads,
//! `only_cross_attention`, `upcast_attention`, class embeddings), the x4 upscaler, and
//! DeepFloyd IF's stages (simple cross-attention blocks with added-KV attention, resnet
//! resamplers, `scale_shift` time conditioning, the text projection `encoder_hid_proj` and the
//! text-pooled addition embedding).

use crate::memory::{FeatureMap, ScoreShape};
use crate::models::conv::{conv2d_forward_in, conv2d_output_size};
use crate::models::layout::{MemoryFormat, set_conv_weight_layout};
use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{Embedding, EmbeddingConfig, GroupNorm, Linear};
use burn::tensor::{Int, Tensor, backend::Backend};
use serde::Deserialize;
use serde_json::Value;

use super::unet_2d_blocks::{
    AttentionTemplate, BlockConfig, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D, Upsampler,
    blocks_attention_calls, see_attentions, set_blocks_processor,
};
use crate::error::{EngineError, Result};
use crate::models::attention::Transformer2DModelConfig;
use crate::models::attention_processor::{AddedKvAttentionConfig, AttnProcessor};
use crate::models::config::{ModelConfig, PerBlock, read_config};
use crate::models::embeddings::{TextTimeEmbedding, TimestepEmbedding, Timesteps};
use crate::models::normalization::{Activation, conv2d, group_norm, group_norm_forward_in, linear};
use crate::models::resnet::{
    Largest, Resample, ResnetBlock2DConfig, TimeEmbeddingNorm, conv_channels,
};
use crate::models::weights::{WeightFiles, same_keys};

/// `unet/config.json`, with diffusers' `__init__` defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    pub transformer_layers_per_block: PerBlock<usize>,
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub resnet_skip_time_act: bool,
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub class_embeddings_concat: bool,
    pub encoder_hid_dim: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    pub attention_type: String,
    /// Only used by IF's simple cross-attention mid block.
    pub mid_block_only_cross_attention: Option<bool>,
    /// IF: how the text is normalised in the added-KV attention (`"group_norm"`).
    pub cross_attention_norm: Option<String>,
    /// Heads of the text pooling of `addition_embed_type="text"`.
    pub addition_embed_type_num_heads: usize,
    /// SDXL's `text_time` embedding width (not supported; named in the error).
    pub addition_time_embed_dim: Option<usize>,
    /// Training only.
    pub dropout: f64,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        let s = |v: &str| v.to_string();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                s("CrossAttnDownBlock2D"),
                s("CrossAttnDownBlock2D"),
                s("CrossAttnDownBlock2D"),
                s("DownBlock2D"),
            ],
            mid_block_type: Some(s("UNetMidBlock2DCrossAttn")),
            up_block_types: vec![
                s("UpBlock2D"),
                s("CrossAttnUpBlock2D"),
                s("CrossAttnUpBlock2D"),
                s("CrossAttnUpBlock2D"),
            ],
            only_cross_attention: PerBlock::All(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::All(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: s("silu"),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::All(1280),
            transformer_layers_per_block: PerBlock::All(1),
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: s("default"),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: s("positional"),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            class_embeddings_concat: false,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_type: s("default"),
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            addition_embed_type_num_heads: 64,
            addition_time_embed_dim: None,
            dropout: 0.0,
            extra: BTreeMap::new(),
        }
    }
}

impl ModelConfig for UNet2DConditionConfig {
    fn unknown_keys(&self) -> &BTreeMap<String, Value> {
        &self.extra
    }
}

/// The class embedding (`class_embed_type` / `num_class_embeds`).
#[derive(Module, Debug)]
pub enum ClassEmbedding<B: Backend> {
    /// `num_class_embeds` with no `class_embed_type`: a lookup table.
    Embedding(Embedding<B>),
    /// `"timestep"`: the class labels go through the sinusoidal features, then an MLP.
    Timestep(TimestepEmbedding<B>),
    /// `"projection"`: an MLP on the given vectors.
    Projection(TimestepEmbedding<B>),
}

/// What the UNet is conditioned on besides the timestep.
#[derive(Debug, Clone, Default)]
pub enum ClassLabels<B: Backend> {
    /// No class conditioning.
    #[default]
    None,
    /// Integer labels `[batch]` (`num_class_embeds`).
    Ids(Tensor<B, 1, Int>),
    /// Float labels `[batch]` (`class_embed_type="timestep"`, e.g. a noise level).
    Levels(Vec<f64>),
    /// Vectors `[batch, dim]` (`class_embed_type="projection"`).
    Vectors(Tensor<B, 2>),
}

/// Diffusers' `UNet2DConditionModel`.
#[derive(Module, Debug)]
pub struct UNet2DConditionModel<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub time_proj: Timesteps,
    pub time_embedding: TimestepEmbedding<B>,
    pub class_embedding: Option<ClassEmbedding<B>>,
    /// IF: the text's projection to `cross_attention_dim` (`encoder_hid_dim_type="text_proj"`).
    pub encoder_hid_proj: Option<Linear<B>>,
    /// IF: the pooled text added to the time embedding (`addition_embed_type="text"`).
    pub add_embedding: Option<TextTimeEmbedding<B>>,
    pub down_blocks: Vec<DownBlock2D<B>>,
    pub mid_block: Option<UNetMidBlock2DCrossAttn<B>>,
    pub up_blocks: Vec<UpBlock2D<B>>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
    #[module(skip)]
    pub act: Activation,
    /// Applied to the summed embedding (`time_embedding_act_fn`, IF stage II).
    #[module(skip)]
    pub time_embed_act: Option<Activation>,
    pub center_input_sample: bool,
    pub class_embeddings_concat: bool,
    /// `2^(number of upsamplers)`: latent sides must be multiples of it or sizes are passed down.
    pub overall_up_factor: usize,
    #[module(skip)]
    memory_format: MemoryFormat,
}

/// The per-block values `init` derives from the config, and the block templates built from them.
struct BlockBuilders<'a> {
    config: &'a UNet2DConditionConfig,
    groups: usize,
    act: Activation,
    only_cross: Vec<bool>,
    layers: Vec<usize>,
    cross_dim: Vec<usize>,
    tlayers: Vec<usize>,
    /// Transformer heads (`num_attention_heads`, or SD's `attention_head_dim`).
    heads: Vec<usize>,
    /// Added-KV attention head widths (`attention_head_dim` as written).
    head_dims: Vec<usize>,
    time_embed_dim: usize,
    temb_channels: usize,
    time_embedding_norm: TimeEmbeddingNorm,
}

impl BlockBuilders<'_> {
    /// The resnet template (in/out channels set per resnet).
    fn resnet(&self, scale: f64) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            in_channels: 0,
            out_channels: 0,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.config.norm_eps,
            act: self.act,
            time_embedding_norm: self.time_embedding_norm,
            output_scale_factor: scale,
            skip_time_act: self.config.resnet_skip_time_act,
            resample: Resample::None,
        }
    }

    /// The block template of block `i` (`r` indexes the per-block lists that diffusers reverses
    /// for up blocks; `i` the `attention_head_dim` list, which it does not reverse).
    fn block(
        &self,
        kind: BlockKind,
        i: usize,
        only_cross: bool,
        num_layers: usize,
        scale: f64,
    ) -> Result<BlockConfig> {
        Ok(BlockConfig {
            resnet: self.resnet(scale),
            attention: self.attention(kind.attention, i, i, only_cross)?,
            num_layers,
            resnet_resampler: kind.resnet_resampler,
        })
    }

    /// The attention template of a block with channels/lists at `r` and head width at `hd`.
    fn attention(
        &self,
        kind: AttentionKind,
        r: usize,
        hd: usize,
        only_cross: bool,
    ) -> Result<Option<AttentionTemplate>> {
        let c = &self.config;
        let channels = c.block_out_channels[r];
        Ok(match kind {
            AttentionKind::None => None,
            AttentionKind::Transformer => {
                let heads = self.heads[r];
                if heads == 0 || !channels.is_multiple_of(heads) {
                    return Err(EngineError::Unsupported(format!(
                        "UNet block {r}: {channels} channels with {heads} heads"
                    )));
                }
                Some(AttentionTemplate::Transformer(Transformer2DModelConfig {
                    num_attention_heads: heads,
                    attention_head_dim: channels / heads,
                    in_channels: channels,
                    num_layers: self.tlayers[r],
                    cross_attention_dim: self.cross_dim[r],
                    norm_num_groups: self.groups,
                    use_linear_projection: c.use_linear_projection,
                    only_cross_attention: only_cross,
                    upcast_attention: c.upcast_attention,
                }))
            }
            AttentionKind::AddedKv => {
                let a = AddedKvAttentionConfig {
                    attention_head_dim: self.head_dims[hd],
                    added_kv_proj_dim: self.cross_dim[r],
                    norm_num_groups: self.groups,
                    only_cross_attention: only_cross,
                    cross_attention_norm: c.cross_attention_norm.clone(),
                };
                a.check(channels)?;
                Some(AttentionTemplate::AddedKv(a))
            }
        })
    }
}

/// The attention layer a block type has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttentionKind {
    None,
    /// `CrossAttn*`: transformers.
    Transformer,
    /// `SimpleCrossAttn*` (IF): added-KV attention.
    AddedKv,
}

/// What a block type name says about the block.
#[derive(Debug, Clone, Copy)]
struct BlockKind {
    attention: AttentionKind,
    /// IF's blocks resample with a resnet rather than a conv.
    resnet_resampler: bool,
}

/// Parses a block type of direction `dir` (`Down`/`Up`).
fn block_kind(kind: &str, dir: &str) -> Result<BlockKind> {
    let (attention, resnet_resampler) = match kind {
        k if k == format!("{dir}Block2D") => (AttentionKind::None, false),
        k if k == format!("CrossAttn{dir}Block2D") => (AttentionKind::Transformer, false),
        k if k == format!("Resnet{dir}sampleBlock2D") => (AttentionKind::None, true),
        k if k == format!("SimpleCrossAttn{dir}Block2D") => (AttentionKind::AddedKv, true),
        other => {
            return Err(EngineError::Unsupported(format!(
                "UNet block type `{other}`"
            )));
        }
    };
    Ok(BlockKind {
        attention,
        resnet_resampler,
    })
}

/// The UNet's contracting half, owned: what a ControlNet copies (aka diffusers'
/// `ControlNetModel.from_unet`).
pub(crate) struct DownHalf<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub time_proj: Timesteps,
    pub time_embedding: TimestepEmbedding<B>,
    pub class_embedding: Option<ClassEmbedding<B>>,
    pub encoder_hid_proj: Option<Linear<B>>,
    pub add_embedding: Option<TextTimeEmbedding<B>>,
    pub down_blocks: Vec<DownBlock2D<B>>,
    pub mid_block: Option<UNetMidBlock2DCrossAttn<B>>,
    pub act: Activation,
}

impl UNet2DConditionConfig {
    /// The per-block lists and templates, checked.
    fn block_builders(&self, groups: usize, act: Activation) -> Result<BlockBuilders<'_>> {
        let n = self.block_out_channels.len();
        let boc = &self.block_out_channels;
        // Diffusers' naming quirk: `attention_head_dim` in SD configs is the number of heads.
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .expand(n, "num_attention_heads")?;
        for (i, &c) in boc.iter().enumerate() {
            if groups == 0 || !c.is_multiple_of(groups) {
                return Err(EngineError::Unsupported(format!(
                    "UNet block {i}: {c} channels in {groups} groups"
                )));
            }
        }
        let time_embed_dim = self.time_embedding_dim.unwrap_or(boc[0] * 4);
        Ok(BlockBuilders {
            config: self,
            groups,
            act,
            only_cross: self
                .only_cross_attention
                .expand(n, "only_cross_attention")?,
            layers: self.layers_per_block.expand(n, "layers_per_block")?,
            cross_dim: self.cross_attention_dim.expand(n, "cross_attention_dim")?,
            tlayers: self
                .transformer_layers_per_block
                .expand(n, "transformer_layers_per_block")?,
            heads,
            head_dims: self.attention_head_dim.expand(n, "attention_head_dim")?,
            time_embed_dim,
            temb_channels: if self.class_embeddings_concat {
                time_embed_dim * 2
            } else {
                time_embed_dim
            },
            time_embedding_norm: TimeEmbeddingNorm::from_name(&self.resnet_time_scale_shift)?,
        })
    }

    /// Rejects configurations this implementation does not cover, with the reason.
    fn check_supported(&self) -> Result<()> {
        let unsupported = |what: String| Err(EngineError::Unsupported(what));
        if self.dual_cross_attention {
            return unsupported("UNet `dual_cross_attention`".into());
        }
        if let Some(t) = &self.addition_embed_type
            && t != "text"
        {
            return unsupported(format!("UNet addition_embed_type `{t}`"));
        }
        match (self.encoder_hid_dim_type.as_deref(), self.encoder_hid_dim) {
            (None | Some("text_proj"), Some(_)) | (None, None) => {}
            (Some(t), None) => {
                return unsupported(format!(
                    "UNet encoder_hid_dim_type `{t}` without encoder_hid_dim"
                ));
            }
            (Some(t), Some(_)) => {
                return unsupported(format!("UNet encoder_hid_dim_type `{t}`"));
            }
        }
        if self.time_embedding_type != "positional" {
            return unsupported(format!(
                "UNet time_embedding_type `{}`",
                self.time_embedding_type
            ));
        }
        if self.time_cond_proj_dim.is_some() {
            return unsupported("UNet time_cond_proj_dim (LCM guidance embedding)".into());
        }
        if self.attention_type != "default" {
            return unsupported(format!("UNet attention_type `{}`", self.attention_type));
        }
        if self.timestep_post_act.is_some() {
            return unsupported("UNet timestep_post_act".into());
        }
        if let Some(name) = &self.time_embedding_act_fn {
            Activation::from_name(name)?;
        }
        if self.down_block_types.len() != self.block_out_channels.len()
            || self.up_block_types.len() != self.block_out_channels.len()
        {
            return unsupported(format!(
                "UNet with {} down blocks, {} up blocks and {} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len(),
                self.block_out_channels.len()
            ));
        }
        self.mid_block_kind()?;
        Ok(())
    }

    /// The mid block's attention (`None` for no mid block).
    fn mid_block_kind(&self) -> Result<Option<AttentionKind>> {
        match self.mid_block_type.as_deref() {
            None => Ok(None),
            Some("UNetMidBlock2DCrossAttn") => Ok(Some(AttentionKind::Transformer)),
            Some("UNetMidBlock2DSimpleCrossAttn") => Ok(Some(AttentionKind::AddedKv)),
            Some(m) => Err(EngineError::Unsupported(format!(
                "UNet mid_block_type `{m}`"
            ))),
        }
    }

    /// The single `cross_attention_dim` (the text projection and pooling need one width).
    fn single_cross_attention_dim(&self, what: &str) -> Result<usize> {
        match &self.cross_attention_dim {
            PerBlock::All(d) => Ok(*d),
            PerBlock::Each(_) => Err(EngineError::Unsupported(format!(
                "UNet {what} with a per-block cross_attention_dim"
            ))),
        }
    }

    /// Builds the contracting half (time embedding, `conv_in`, down blocks, mid block) with
    /// freshly initialised weights: the part the UNet and a ControlNet share.
    pub(crate) fn init_down_half<B: Backend>(&self, device: &B::Device) -> Result<DownHalf<B>> {
        self.check_supported()?;
        let n = self.block_out_channels.len();
        let boc = &self.block_out_channels;
        let groups = self
            .norm_num_groups
            .ok_or_else(|| EngineError::Unsupported("UNet without norm_num_groups".into()))?;
        let act = Activation::from_name(&self.act_fn)?;
        let blocks = self.block_builders(groups, act)?;
        let time_embed_dim = blocks.time_embed_dim;
        let time_proj = Timesteps {
            num_channels: boc[0],
            flip_sin_to_cos: self.flip_sin_to_cos,
            downscale_freq_shift: self.freq_shift,
        };
        let time_embedding = TimestepEmbedding::new(boc[0], time_embed_dim, None, act, device);
        let encoder_hid_proj = match self.encoder_hid_dim {
            Some(dim) => Some(linear(
                dim,
                self.single_cross_attention_dim("encoder_hid_proj")?,
                true,
                device,
            )),
            None => None,
        };
        let add_embedding = match self.addition_embed_type.as_deref() {
            Some(_) => {
                let dim = match self.encoder_hid_dim {
                    Some(d) => d,
                    None => self.single_cross_attention_dim("addition_embed_type `text`")?,
                };
                let heads = self.addition_embed_type_num_heads;
                if heads == 0 || !dim.is_multiple_of(heads) {
                    return Err(EngineError::Unsupported(format!(
                        "text pooling of {dim} channels in {heads} heads"
                    )));
                }
                Some(TextTimeEmbedding::new(dim, time_embed_dim, heads, device))
            }
            None => None,
        };
        let class_embedding = match (self.class_embed_type.as_deref(), self.num_class_embeds) {
            (None, None) => None,
            (None, Some(num)) => Some(ClassEmbedding::Embedding(
                EmbeddingConfig::new(num, time_embed_dim).init(device),
            )),
            (Some("timestep"), _) => Some(ClassEmbedding::Timestep(TimestepEmbedding::new(
                boc[0],
                time_embed_dim,
                None,
                act,
                device,
            ))),
            (Some("projection"), _) => {
                let dim = self.projection_class_embeddings_input_dim.ok_or_else(|| {
                    EngineError::Unsupported(
                        "class_embed_type `projection` without projection_class_embeddings_input_dim".into(),
                    )
                })?;
                Some(ClassEmbedding::Projection(TimestepEmbedding::new(
                    dim,
                    time_embed_dim,
                    None,
                    act,
                    device,
                )))
            }
            (Some(other), _) => {
                return Err(EngineError::Unsupported(format!(
                    "UNet class_embed_type `{other}`"
                )));
            }
        };
        let mut down_blocks = Vec::with_capacity(n);
        let mut in_ch = boc[0];
        for (i, kind) in self.down_block_types.iter().enumerate() {
            let config = blocks.block(
                block_kind(kind, "Down")?,
                i,
                blocks.only_cross[i],
                blocks.layers[i],
                self.resnet_out_scale_factor,
            )?;
            let is_final = i == n - 1;
            down_blocks.push(DownBlock2D::new(
                &config,
                in_ch,
                boc[i],
                (!is_final).then_some(self.downsample_padding),
                device,
            ));
            in_ch = boc[i];
        }

        let mid_block = match self.mid_block_kind()? {
            None => None,
            Some(kind) => {
                // UNetMidBlock2DCrossAttn takes no only_cross_attention; the simple one takes
                // `mid_block_only_cross_attention`, which defaults to a single
                // `only_cross_attention` flag.
                let only_cross = match (kind, self.mid_block_only_cross_attention) {
                    (AttentionKind::AddedKv, Some(v)) => v,
                    (AttentionKind::AddedKv, None) => {
                        matches!(self.only_cross_attention, PerBlock::All(true))
                    }
                    _ => false,
                };
                let config = BlockConfig {
                    resnet: blocks.resnet(self.mid_block_scale_factor),
                    attention: blocks.attention(kind, n - 1, n - 1, only_cross)?,
                    num_layers: 1,
                    resnet_resampler: false,
                };
                Some(UNetMidBlock2DCrossAttn::new(&config, boc[n - 1], device))
            }
        };
        let pad_in = (self.conv_in_kernel - 1) / 2;
        Ok(DownHalf {
            conv_in: conv2d(
                self.in_channels,
                boc[0],
                self.conv_in_kernel,
                1,
                pad_in,
                device,
            ),
            time_proj,
            time_embedding,
            class_embedding,
            encoder_hid_proj,
            add_embedding,
            down_blocks,
            mid_block,
            act,
        })
    }

    /// Builds the model with freshly initialised (random) weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<UNet2DConditionModel<B>> {
        let DownHalf {
            conv_in,
            time_proj,
            time_embedding,
            class_embedding,
            encoder_hid_proj,
            add_embedding,
            down_blocks,
            mid_block,
            act,
        } = self.init_down_half(device)?;
        let n = self.block_out_channels.len();
        let boc = &self.block_out_channels;
        let groups = self
            .norm_num_groups
            .ok_or_else(|| EngineError::Unsupported("UNet without norm_num_groups".into()))?;
        let blocks = self.block_builders(groups, act)?;

        // Skip widths in the order the down path pushes them.
        let mut skip_widths = vec![boc[0]];
        for (i, block) in down_blocks.iter().enumerate() {
            skip_widths.extend(std::iter::repeat_n(boc[i], block.resnets.len()));
            if !block.downsamplers.is_empty() {
                skip_widths.push(boc[i]);
            }
        }

        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_out = boc[n - 1];
        let mut num_upsamplers = 0;
        for (i, kind) in self.up_block_types.iter().enumerate() {
            let r = n - 1 - i; // the matching down block
            let is_final = i == n - 1;
            let num_layers = blocks.layers[r] + 1;
            let config = BlockConfig {
                resnet: blocks.resnet(self.resnet_out_scale_factor),
                // diffusers reverses every per-block list for the up blocks except
                // `attention_head_dim`.
                attention: blocks.attention(
                    block_kind(kind, "Up")?.attention,
                    r,
                    i,
                    blocks.only_cross[r],
                )?,
                num_layers,
                resnet_resampler: block_kind(kind, "Up")?.resnet_resampler,
            };
            let mut skips = Vec::with_capacity(num_layers);
            for _ in 0..num_layers {
                skips.push(skip_widths.pop().ok_or_else(|| {
                    EngineError::Unsupported(
                        "UNet up blocks consume more skips than the down path makes".into(),
                    )
                })?);
            }
            up_blocks.push(UpBlock2D::new(
                &config, prev_out, boc[r], &skips, !is_final, device,
            ));
            if !is_final {
                num_upsamplers += 1;
            }
            prev_out = boc[r];
        }

        let pad_out = (self.conv_out_kernel - 1) / 2;
        Ok(UNet2DConditionModel {
            conv_in,
            time_proj,
            time_embedding,
            class_embedding,
            encoder_hid_proj,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(groups, boc[0], self.norm_eps, device),
            conv_out: conv2d(
                boc[0],
                self.out_channels,
                self.conv_out_kernel,
                1,
                pad_out,
                device,
            ),
            act,
            time_embed_act: self
                .time_embedding_act_fn
                .as_deref()
                .map(Activation::from_name)
                .transpose()?,
            center_input_sample: self.center_input_sample,
            class_embeddings_concat: self.class_embeddings_concat,
            overall_up_factor: 1 << num_upsamplers,
            memory_format: MemoryFormat::Contiguous,
        })
    }
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// Reads `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` (a diffusers `unet/`
    /// folder), or the shards its index lists; `variant` (e.g. `fp16`) is preferred where the
    /// folder has it.
    pub fn load(
        dir: &Path,
        variant: Option<&str>,
        device: &B::Device,
    ) -> Result<(Self, UNet2DConditionConfig)> {
        let config: UNet2DConditionConfig = read_config(&dir.join("config.json"))?;
        let mut model = config.init(device)?;
        WeightFiles::find(dir, "diffusion_pytorch_model", variant)?
            .load_into(&mut model, same_keys)?;
        Ok((model, config))
    }

    /// One UNet evaluation.
    ///
    /// # Shapes
    /// - sample: `[batch, in_channels, h, w]`
    /// - timesteps: one per batch item (or one for all)
    /// - context: `[batch, tokens, cross_attention_dim]`
    /// - output: `[batch, out_channels, h, w]`
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timesteps: &[f64],
        context: &Tensor<B, 3>,
        class_labels: &ClassLabels<B>,
    ) -> Result<Tensor<B, 4>> {
        self.forward_with_residuals(sample, timesteps, context, class_labels, None)
    }

    /// [`Self::forward`] with a ControlNet's residuals added to the skips and to the mid block's
    /// output (diffusers' `down_block_additional_residuals` / `mid_block_additional_residual`).
    pub fn forward_with_residuals(
        &self,
        sample: Tensor<B, 4>,
        timesteps: &[f64],
        context: &Tensor<B, 3>,
        class_labels: &ClassLabels<B>,
        residuals: Option<&ControlResiduals<B>>,
    ) -> Result<Tensor<B, 4>> {
        let [batch, _, h, w] = sample.dims();
        let timesteps = per_item_timesteps(timesteps, batch)?;
        if let Some(proj) = &self.encoder_hid_proj {
            let expected = proj.weight.dims()[0];
            let [_, _, width] = context.dims();
            if width != expected {
                return Err(EngineError::invalid(
                    "encoder_hidden_states",
                    format!("text of width {width}, this UNet takes {expected}"),
                ));
            }
        }
        let factor = self.overall_up_factor;
        let forward_upsample_size = h % factor != 0 || w % factor != 0;

        let sample = if self.center_input_sample {
            sample.mul_scalar(2.0).sub_scalar(1.0)
        } else {
            sample
        };
        let down = self.down_path();
        let mut emb = down.embedding(&timesteps, class_labels, sample.dtype(), &sample.device())?;
        if let Some(add) = &self.add_embedding {
            emb = emb.add(add.forward(context.clone()));
        }
        if let Some(act) = self.time_embed_act {
            emb = act.forward(emb);
        }
        let projected;
        let context = match &self.encoder_hid_proj {
            Some(proj) => {
                projected = proj.forward(context.clone());
                &projected
            }
            None => context,
        };
        let format = self.memory_format;
        let (mut x, mut skips) = down.run(format.from_nchw(sample), &emb, context, None, format);
        if let Some(r) = residuals {
            if r.down.len() != skips.len() {
                return Err(EngineError::invalid(
                    "down_block_additional_residuals",
                    format!("{} residuals for {} skips", r.down.len(), skips.len()),
                ));
            }
            for (skip, res) in skips.iter_mut().zip(&r.down) {
                *skip = skip.clone().add(format.from_nchw(res.clone()));
            }
            x = x.add(format.from_nchw(r.mid.clone()));
        }
        let last = self.up_blocks.len().saturating_sub(1);
        for (i, block) in self.up_blocks.iter().enumerate() {
            let n_res = block.resnets.len();
            let upsample_size = if i != last && forward_upsample_size {
                // The size of the skip the next block will consume first.
                skips
                    .len()
                    .checked_sub(n_res + 1)
                    .and_then(|k| skips.get(k))
                    .map(|t| format.spatial(t.dims()))
            } else {
                None
            };
            x = block.forward(
                x,
                Some(&emb),
                Some(context),
                &mut skips,
                upsample_size,
                format,
            );
        }
        let x = self
            .act
            .forward(group_norm_forward_in(&self.conv_norm_out, x, format));
        Ok(format.to_nchw(conv2d_forward_in(&self.conv_out, x, format)))
    }

    /// What the input's sides must be a multiple of: 1 where the upsamplers take the skips'
    /// sizes (convs: odd sizes round trip), `2^upsamplers` where they only double (IF's
    /// resampling resnets; diffusers fails on other sizes there too).
    pub fn size_multiple(&self) -> usize {
        let doubling_only = self
            .up_blocks
            .iter()
            .flat_map(|b| &b.upsamplers)
            .any(|u| matches!(u, Upsampler::Resnet(_)));
        if doubling_only {
            self.overall_up_factor
        } else {
            1
        }
    }

    /// The attention calls of one [`Self::forward`] over `batch` latents of `[h, w]` attending
    /// to `context` text tokens, in the order the processors get them.
    pub fn attention_calls(
        &self,
        batch: usize,
        size: [usize; 2],
        context: usize,
    ) -> Vec<ScoreShape> {
        let mut out = Vec::new();
        let sizes = self
            .down_path()
            .attention_calls(batch, size, context, &mut out);
        // Up block i runs at the size of down block n-1-i, whose skips it takes (the last down
        // block has no downsampler, so the mid block's output has that size too).
        let n = self.down_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let level = n.saturating_sub(i + 1);
            let at = sizes.get(level).copied().unwrap_or(size);
            blocks_attention_calls(&block.attentions, batch, at, Some(context), &mut out);
        }
        out
    }

    /// The largest feature map `[c, h, w]` of one [`Self::forward`] over one latent of `[h, w]`
    /// (each image of a batch has its own): every resnet's input and output (an up block's
    /// input is its running features and a skip, concatenated), an upsampler's conv at twice
    /// the size, and each transformer's feed-forward projection, twice its inner width per
    /// pixel. SD 1.5 at 512²: the first level's `[2560, 64, 64]`.
    pub fn largest_activation(&self, size: [usize; 2]) -> [usize; 3] {
        let sizes = self
            .down_path()
            .attention_calls(1, size, 1, &mut Vec::new());
        let at = |level: usize| sizes.get(level).copied().unwrap_or(size);
        let mut largest = Largest::default();
        largest.see_conv(&self.conv_in, at(0));
        for (level, block) in self.down_blocks.iter().enumerate() {
            largest.see_resnets(&block.resnets, at(level));
            see_attentions(&mut largest, &block.attentions, at(level));
        }
        let n = self.down_blocks.len();
        if let Some(mid) = &self.mid_block {
            largest.see_resnets(&mid.resnets, at(n));
            see_attentions(&mut largest, &mid.attentions, at(n));
        }
        // Up block i runs at down block n-1-i's size (see `attention_calls`).
        for (i, block) in self.up_blocks.iter().enumerate() {
            let [h, w] = at(n.saturating_sub(i + 1));
            largest.see_resnets(&block.resnets, [h, w]);
            see_attentions(&mut largest, &block.attentions, [h, w]);
            if let Some(Upsampler::Conv(up)) = block.upsamplers.first() {
                largest.see_conv(&up.conv, [2 * h, 2 * w]);
            }
        }
        largest.0
    }

    /// [`Self::largest_activation`] for a `batch` of latents of `[h, w]` in the model's float
    /// type, for [`crate::memory::MemoryBudget::check_feature_map`].
    pub fn feature_map(&self, batch: usize, size: [usize; 2]) -> FeatureMap {
        let [c, h, w] = self.largest_activation(size);
        FeatureMap {
            model: "UNet",
            shape: [batch, c, h, w],
            float_bytes: self.conv_in.weight.dtype().size() as u64,
            held: None,
        }
    }

    /// The elements of one image's skips and mid-block output over `[h, w]` latents: the
    /// residuals a ControlNet built from this UNet's config hands it.
    pub fn skip_elements(&self, size: [usize; 2]) -> usize {
        self.down_path().skip_elements(size)
    }

    /// The contracting half's parts, borrowed for the forward pass.
    fn down_path(&self) -> DownPath<'_, B> {
        DownPath {
            conv_in: &self.conv_in,
            time_proj: &self.time_proj,
            time_embedding: &self.time_embedding,
            class_embedding: self.class_embedding.as_ref(),
            class_embeddings_concat: self.class_embeddings_concat,
            down_blocks: &self.down_blocks,
            mid_block: self.mid_block.as_ref(),
        }
    }

    /// The memory format of the feature maps inside (diffusers'
    /// `unet.to(memory_format=torch.channels_last)`): stores the conv weights in its order
    /// (OHWI for channels-last) and keeps activations in it between the first and last
    /// convolution. Inputs and outputs stay NCHW. Switching converts every conv weight once.
    pub fn set_memory_format(&mut self, format: MemoryFormat) {
        if format == self.memory_format {
            return;
        }
        set_conv_weight_layout(self, format);
        self.memory_format = format;
    }

    /// The memory format set by [`Self::set_memory_format`].
    pub fn memory_format(&self) -> MemoryFormat {
        self.memory_format
    }

    /// Sets the attention processor of every attention layer (diffusers' `set_attn_processor`).
    pub fn set_attn_processor(&mut self, processor: AttnProcessor) {
        set_blocks_processor(
            &mut self.down_blocks,
            self.mid_block.as_mut(),
            &mut self.up_blocks,
            processor,
        );
    }
}

/// A ControlNet's output: residuals for every skip of the UNet's down path and for its mid
/// block, NCHW.
#[derive(Debug, Clone)]
pub struct ControlResiduals<B: Backend> {
    pub down: Vec<Tensor<B, 4>>,
    pub mid: Tensor<B, 4>,
}

/// One timestep per batch item (one given for all is repeated).
pub(crate) fn per_item_timesteps(timesteps: &[f64], batch: usize) -> Result<Vec<f64>> {
    match timesteps.len() {
        1 => Ok(vec![timesteps[0]; batch]),
        n if n == batch => Ok(timesteps.to_vec()),
        n => Err(EngineError::invalid(
            "timesteps",
            format!("{n} timesteps for a batch of {batch}"),
        )),
    }
}

/// The contracting half's parts, borrowed: the one forward path of the UNet's down half and of
/// a ControlNet (its trainable copy).
pub(crate) struct DownPath<'a, B: Backend> {
    pub conv_in: &'a Conv2d<B>,
    pub time_proj: &'a Timesteps,
    pub time_embedding: &'a TimestepEmbedding<B>,
    pub class_embedding: Option<&'a ClassEmbedding<B>>,
    pub class_embeddings_concat: bool,
    pub down_blocks: &'a [DownBlock2D<B>],
    pub mid_block: Option<&'a UNetMidBlock2DCrossAttn<B>>,
}

impl<B: Backend> DownPath<'_, B> {
    /// The time embedding (plus the class embedding), `[batch, temb]`.
    pub fn embedding(
        &self,
        timesteps: &[f64],
        class_labels: &ClassLabels<B>,
        dtype: burn::tensor::DType,
        device: &B::Device,
    ) -> Result<Tensor<B, 2>> {
        let batch = timesteps.len();
        let t_emb = self.time_proj.forward::<B>(timesteps, device).cast(dtype);
        let emb = self.time_embedding.forward(t_emb);
        let Some(class_embedding) = self.class_embedding else {
            return Ok(emb);
        };
        let class_emb = match (class_embedding, class_labels) {
            (ClassEmbedding::Embedding(e), ClassLabels::Ids(ids)) => e
                .forward(ids.clone().unsqueeze_dim::<2>(1))
                .squeeze_dim::<2>(1),
            (ClassEmbedding::Timestep(mlp), ClassLabels::Levels(levels)) => {
                let levels = match levels.len() {
                    1 => vec![levels[0]; batch],
                    _ => levels.clone(),
                };
                mlp.forward(self.time_proj.forward::<B>(&levels, device).cast(dtype))
            }
            (ClassEmbedding::Projection(mlp), ClassLabels::Vectors(v)) => mlp.forward(v.clone()),
            _ => {
                return Err(EngineError::invalid(
                    "class_labels",
                    "this UNet needs class labels of the kind its config names",
                ));
            }
        };
        Ok(if self.class_embeddings_concat {
            Tensor::cat(vec![emb, class_emb], 1)
        } else {
            emb.add(class_emb)
        })
    }

    /// Appends the attention calls of [`Self::run`] over `[h, w]` latents with `context` text
    /// tokens, and returns the feature map's size at each down block's input and after the
    /// path (where the mid block and the first up block run).
    pub fn attention_calls(
        &self,
        batch: usize,
        size: [usize; 2],
        context: usize,
        out: &mut Vec<ScoreShape>,
    ) -> Vec<[usize; 2]> {
        let mut size = conv2d_output_size(self.conv_in, size);
        let mut sizes = Vec::with_capacity(self.down_blocks.len() + 1);
        for block in self.down_blocks {
            sizes.push(size);
            size = block.attention_calls(batch, size, Some(context), out);
        }
        if let Some(mid) = self.mid_block {
            blocks_attention_calls(&mid.attentions, batch, size, Some(context), out);
        }
        sizes.push(size);
        sizes
    }

    /// The elements, per image over `[h, w]` latents, of what [`Self::run`] returns: every
    /// skip and the mid block's output. A ControlNet's residuals have these shapes, and the
    /// UNet's pass holds them throughout.
    pub fn skip_elements(&self, size: [usize; 2]) -> usize {
        let sizes = self.attention_calls(1, size, 1, &mut Vec::new());
        let pixels = |level: usize| sizes.get(level).map_or(0, |[h, w]| h * w);
        let mut channels = conv_channels(self.conv_in)[0];
        let mut total = channels * pixels(0);
        for (level, block) in self.down_blocks.iter().enumerate() {
            for resnet in &block.resnets {
                channels = conv_channels(&resnet.conv2)[0];
                total += channels * pixels(level);
            }
            // A downsampler keeps the channels; its output is the next block's input.
            if !block.downsamplers.is_empty() {
                total += channels * pixels(level + 1);
            }
        }
        if self.mid_block.is_some() {
            total += channels * pixels(self.down_blocks.len());
        }
        total
    }

    /// `conv_in`, then `cond` added to its output (a ControlNet's conditioning embedding), the
    /// down blocks and the mid block: the features and every skip, in `format`.
    pub fn run(
        &self,
        sample: Tensor<B, 4>,
        emb: &Tensor<B, 2>,
        context: &Tensor<B, 3>,
        cond: Option<Tensor<B, 4>>,
        format: MemoryFormat,
    ) -> (Tensor<B, 4>, Vec<Tensor<B, 4>>) {
        let mut x = conv2d_forward_in(self.conv_in, sample, format);
        if let Some(cond) = cond {
            x = x.add(cond);
        }
        let mut skips = vec![x.clone()];
        for block in self.down_blocks {
            x = block.forward(x, Some(emb), Some(context), &mut skips, format);
        }
        if let Some(mid) = self.mid_block {
            x = mid.forward(x, emb, context, format);
        }
        (x, skips)
    }
}
