//! Single-file checkpoints (aka diffusers' `loaders/single_file_utils.py`): the original LDM /
//! A1111 `.safetensors` layout, one file holding the UNet (`model.diffusion_model.`), the VAE
//! (`first_stage_model.`) and the CLIP text encoder (`cond_stage_model.transformer.`). This is the
//! one remap table of the engine (docs/architecture.md §3): every LDM key gets its diffusers name here and the
//! weights load through the same code as a diffusers folder.

use std::path::Path;

use crate::error::{EngineError, Result};
use crate::models::unets::UNet2DConditionConfig;

/// LDM prefix of the UNet's tensors.
pub const LDM_UNET_PREFIX: &str = "model.diffusion_model.";
/// LDM prefix of the VAE's tensors.
pub const LDM_VAE_PREFIX: &str = "first_stage_model.";
/// LDM prefix of SD 1.x's CLIP text encoder (a transformers `CLIPTextModel`).
pub const LDM_CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// Prefix of a ControlNet's tensors in the original ControlNet releases (`cldm`); some files
/// store the same names without it.
pub const LDM_CONTROLNET_PREFIX: &str = "control_model.";

/// `(key in the file, diffusers key)` for each component of a single-file checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SingleFileKeys {
    pub unet: Vec<(String, String)>,
    pub vae: Vec<(String, String)>,
    pub text_encoder: Vec<(String, String)>,
}

/// Renames the keys of an SD 1.x single-file checkpoint to diffusers keys. `layers_per_block` is
/// the UNet config's (2 for SD): LDM numbers the UNet's input/output blocks consecutively,
/// `layers_per_block + 1` per resolution. Keys that no model reads (EMA copies, `position_ids`,
/// the LDM training schedule buffers) are left out.
pub fn map_single_file_keys(
    keys: &[String],
    layers_per_block: usize,
    file: &Path,
) -> Result<SingleFileKeys> {
    if keys
        .iter()
        .any(|k| k.starts_with("cond_stage_model.model."))
    {
        return Err(EngineError::Unsupported(format!(
            "{}: an SD 2.x single-file checkpoint (OpenCLIP text encoder); load its diffusers \
             folder instead",
            file.display()
        )));
    }
    if keys.iter().any(|k| k.starts_with("conditioner.embedders.")) {
        return Err(EngineError::Unsupported(format!(
            "{}: an SDXL single-file checkpoint; SDXL is not supported",
            file.display()
        )));
    }
    if !keys.iter().any(|k| k.starts_with(LDM_UNET_PREFIX)) {
        return Err(EngineError::Config {
            path: file.to_path_buf(),
            message: format!(
                "not a Stable Diffusion single-file checkpoint: no `{LDM_UNET_PREFIX}*` tensors"
            ),
        });
    }
    let vae_up_blocks = keys
        .iter()
        .filter_map(|k| k.strip_prefix("first_stage_model.decoder.up."))
        .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
    let mut out = SingleFileKeys::default();
    for key in keys {
        if let Some(rest) = key.strip_prefix(LDM_UNET_PREFIX) {
            if let Some(new) = unet_key(rest, layers_per_block) {
                out.unet.push((key.clone(), new));
            }
        } else if let Some(rest) = key.strip_prefix(LDM_VAE_PREFIX) {
            if let Some(new) = vae_key(rest, vae_up_blocks) {
                out.vae.push((key.clone(), new));
            }
        } else if let Some(rest) = key.strip_prefix(LDM_CLIP_PREFIX) {
            // Older checkpoints store the CLIPTextTransformer without its `text_model.` level.
            let new = if rest.starts_with("text_model.") {
                rest.to_string()
            } else {
                format!("text_model.{rest}")
            };
            out.text_encoder.push((key.clone(), new));
        }
    }
    for (name, list) in [("VAE", &out.vae), ("text encoder", &out.text_encoder)] {
        if list.is_empty() {
            return Err(EngineError::Config {
                path: file.to_path_buf(),
                message: format!("the checkpoint holds no {name} tensors"),
            });
        }
    }
    Ok(out)
}

/// The UNet's layers per block, which LDM's block numbering needs; one number for all blocks.
pub fn single_file_layers_per_block(config: &UNet2DConditionConfig) -> Result<usize> {
    let layers = config
        .layers_per_block
        .expand(config.block_out_channels.len(), "layers_per_block")?;
    let per_block = layers.first().copied().unwrap_or(2);
    if layers.iter().any(|&l| l != per_block) {
        return Err(EngineError::Unsupported(
            "single-file checkpoints of UNets with different layers per block".into(),
        ));
    }
    Ok(per_block)
}

/// A ControlNet single-file checkpoint: its renames and what its shapes say about the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlNetFile {
    /// `(key in the file, diffusers key)`.
    pub renames: Vec<(String, String)>,
    /// Channels of the latents it takes (`input_blocks.0.0.weight`'s second dimension).
    pub in_channels: usize,
    /// Channels of the control image (`input_hint_block.0.weight`'s second dimension).
    pub conditioning_channels: usize,
    /// Widths of the conditioning embedding's stages (`conditioning_embedding_out_channels`).
    pub conditioning_embedding_out_channels: Vec<usize>,
}

/// Renames the keys of a ControlNet in the original layout (diffusers'
/// `convert_controlnet_checkpoint`): the UNet's contracting half under LDM names,
/// `input_hint_block.{0,2,…,last}` (the conditioning embedding: convs between SiLUs),
/// `zero_convs.{i}.0` and `middle_block_out.0`, all under `control_model.` or bare.
pub fn map_controlnet_keys(
    tensors: &[(String, Vec<usize>)],
    layers_per_block: usize,
    file: &Path,
) -> Result<ControlNetFile> {
    let config_error = |message: String| EngineError::Config {
        path: file.to_path_buf(),
        message,
    };
    let prefix = if tensors
        .iter()
        .any(|(k, _)| k.starts_with(LDM_CONTROLNET_PREFIX))
    {
        LDM_CONTROLNET_PREFIX
    } else if tensors
        .iter()
        .any(|(k, _)| k.starts_with("input_hint_block."))
    {
        ""
    } else {
        return Err(config_error(format!(
            "not a ControlNet checkpoint: no `{LDM_CONTROLNET_PREFIX}*` or `input_hint_block.*` \
             tensors"
        )));
    };
    let ours: Vec<(&str, &str, &[usize])> = tensors
        .iter()
        .filter_map(|(k, shape)| Some((k.as_str(), k.strip_prefix(prefix)?, shape.as_slice())))
        .collect();
    let shape_of = |name: &str| {
        ours.iter()
            .find(|(_, rest, _)| *rest == name)
            .map(|(_, _, shape)| *shape)
            .filter(|shape| shape.len() == 4)
            .ok_or_else(|| config_error(format!("the checkpoint has no 4-d `{prefix}{name}`")))
    };
    // The conditioning embedding's convs, in order: conv_in, the blocks, conv_out.
    let mut hint: Vec<usize> = ours
        .iter()
        .filter_map(|(_, rest, _)| {
            let index = rest
                .strip_prefix("input_hint_block.")?
                .strip_suffix(".weight")?;
            index.parse().ok()
        })
        .collect();
    hint.sort_unstable();
    if hint.len() < 2 || !hint.len().is_multiple_of(2) {
        return Err(config_error(format!(
            "{} `input_hint_block` convs; a ControlNet has conv_in, pairs of convs and conv_out",
            hint.len()
        )));
    }
    let mut out_channels = vec![shape_of(&format!("input_hint_block.{}.weight", hint[0]))?[0]];
    for pair in hint[1..hint.len() - 1].chunks(2) {
        out_channels.push(shape_of(&format!("input_hint_block.{}.weight", pair[1]))?[0]);
    }
    let hint_name = |index: usize| -> Option<String> {
        let position = hint.iter().position(|&i| i == index)?;
        Some(if position == 0 {
            "conv_in".to_string()
        } else if position == hint.len() - 1 {
            "conv_out".to_string()
        } else {
            format!("blocks.{}", position - 1)
        })
    };
    let mut renames = Vec::new();
    for (key, rest, _) in &ours {
        let new = if let Some(tail) = rest.strip_prefix("input_hint_block.") {
            let (index, param) = tail.split_once('.').unwrap_or((tail, ""));
            index
                .parse()
                .ok()
                .and_then(hint_name)
                .map(|name| format!("controlnet_cond_embedding.{name}.{param}"))
        } else if let Some(tail) = rest.strip_prefix("zero_convs.") {
            let (index, tail) = tail.split_once('.').unwrap_or((tail, ""));
            tail.strip_prefix("0.")
                .map(|param| format!("controlnet_down_blocks.{index}.{param}"))
        } else if let Some(param) = rest.strip_prefix("middle_block_out.0.") {
            Some(format!("controlnet_mid_block.{param}"))
        } else {
            unet_key(rest, layers_per_block)
        };
        if let Some(new) = new {
            renames.push(((*key).to_string(), new));
        }
    }
    Ok(ControlNetFile {
        renames,
        in_channels: shape_of("input_blocks.0.0.weight")?[1],
        conditioning_channels: shape_of(&format!("input_hint_block.{}.weight", hint[0]))?[1],
        conditioning_embedding_out_channels: out_channels,
    })
}

/// Splits `a.b.rest` into `("a", "b", "rest")`.
fn split3(s: &str) -> Option<(&str, &str, &str)> {
    let (a, r) = s.split_once('.')?;
    let (b, r) = r.split_once('.')?;
    Some((a, b, r))
}

/// LDM's resnet names inside the UNet → diffusers' `ResnetBlock2D` fields.
fn unet_resnet(rest: &str) -> String {
    const RULES: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),             // GroupNorm before the first conv
        ("in_layers.2.", "conv1."),             // first 3×3 conv (index 1 is the SiLU)
        ("emb_layers.1.", "time_emb_proj."),    // time embedding projection (after SiLU)
        ("out_layers.0.", "norm2."),            // GroupNorm before the second conv
        ("out_layers.3.", "conv2."),            // second 3×3 conv (SiLU, dropout before it)
        ("skip_connection.", "conv_shortcut."), // 1×1 conv when channels change
    ];
    for (ldm, diffusers) in RULES {
        if let Some(tail) = rest.strip_prefix(ldm) {
            return format!("{diffusers}{tail}");
        }
    }
    rest.to_string()
}

/// One UNet key (without `model.diffusion_model.`) → its diffusers name.
fn unet_key(rest: &str, layers_per_block: usize) -> Option<String> {
    let per = layers_per_block + 1;
    let fixed = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    for (ldm, diffusers) in fixed {
        if let Some(tail) = rest.strip_prefix(ldm) {
            return Some(format!("{diffusers}{tail}"));
        }
    }
    let (group, index, tail) = split3(rest)?;
    let index: usize = index.parse().ok()?;
    let (slot, tail) = tail.split_once('.')?;
    match (group, slot) {
        // input_blocks.{1 + block·per + layer}: resnet (.0), attention (.1); the last index of
        // each resolution holds the downsampler (`.0.op`).
        ("input_blocks", "0") if tail.starts_with("op.") => {
            let block = index / per - 1;
            Some(format!(
                "down_blocks.{block}.downsamplers.0.conv.{}",
                tail.trim_start_matches("op.")
            ))
        }
        ("input_blocks", "0") => {
            let (block, layer) = ((index - 1) / per, (index - 1) % per);
            Some(format!(
                "down_blocks.{block}.resnets.{layer}.{}",
                unet_resnet(tail)
            ))
        }
        ("input_blocks", "1") => {
            let (block, layer) = ((index - 1) / per, (index - 1) % per);
            Some(format!("down_blocks.{block}.attentions.{layer}.{tail}"))
        }
        // output_blocks.{block·per + layer}: resnet (.0), attention (.1), upsampler after the
        // block's last layer (`.1.conv` without attention, `.2.conv` with).
        ("output_blocks", "0") => {
            let (block, layer) = (index / per, index % per);
            Some(format!(
                "up_blocks.{block}.resnets.{layer}.{}",
                unet_resnet(tail)
            ))
        }
        ("output_blocks", "1" | "2") if tail.starts_with("conv.") => {
            let block = index / per;
            Some(format!(
                "up_blocks.{block}.upsamplers.0.conv.{}",
                tail.trim_start_matches("conv.")
            ))
        }
        ("output_blocks", "1") => {
            let (block, layer) = (index / per, index % per);
            Some(format!("up_blocks.{block}.attentions.{layer}.{tail}"))
        }
        _ => None,
    }
    // middle_block: resnet, attention, resnet.
    .or_else(|| middle_block_key(rest))
}

/// `middle_block.{0,1,2}.…` → `mid_block.resnets.0`, `mid_block.attentions.0`, `mid_block.resnets.1`.
fn middle_block_key(rest: &str) -> Option<String> {
    let tail = rest.strip_prefix("middle_block.")?;
    let (index, tail) = tail.split_once('.')?;
    match index {
        "0" => Some(format!("mid_block.resnets.0.{}", unet_resnet(tail))),
        "1" => Some(format!("mid_block.attentions.0.{tail}")),
        "2" => Some(format!("mid_block.resnets.1.{}", unet_resnet(tail))),
        _ => None,
    }
}

/// One VAE key (without `first_stage_model.`) → its diffusers name. LDM numbers the decoder's
/// up blocks from the lowest resolution upwards; diffusers from the top.
fn vae_key(rest: &str, up_blocks: usize) -> Option<String> {
    let (side, rest) = rest.split_once('.')?;
    let renamed = |tail: &str| tail.replace("nin_shortcut", "conv_shortcut");
    if !matches!(side, "encoder" | "decoder") {
        // quant_conv / post_quant_conv keep their names.
        return matches!(side, "quant_conv" | "post_quant_conv").then(|| format!("{side}.{rest}"));
    }
    if let Some(tail) = rest.strip_prefix("norm_out.") {
        return Some(format!("{side}.conv_norm_out.{tail}"));
    }
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return Some(format!("{side}.{rest}"));
    }
    if let Some(tail) = rest.strip_prefix("mid.") {
        let (part, tail) = tail.split_once('.')?;
        return match part {
            "block_1" => Some(format!("{side}.mid_block.resnets.0.{}", renamed(tail))),
            "block_2" => Some(format!("{side}.mid_block.resnets.1.{}", renamed(tail))),
            "attn_1" => {
                let (name, param) = tail.split_once('.')?;
                let name = match name {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    _ => return None,
                };
                Some(format!("{side}.mid_block.attentions.0.{name}.{param}"))
            }
            _ => None,
        };
    }
    let (kind, index, tail) = split3(rest)?;
    let index: usize = index.parse().ok()?;
    let (block, up) = match (side, kind) {
        ("encoder", "down") => (index, false),
        ("decoder", "up") => (up_blocks.checked_sub(index + 1)?, true),
        _ => return None,
    };
    let blocks = if up { "up_blocks" } else { "down_blocks" };
    let (part, tail) = tail.split_once('.')?;
    match part {
        "block" => {
            let (layer, tail) = tail.split_once('.')?;
            Some(format!(
                "{side}.{blocks}.{block}.resnets.{layer}.{}",
                renamed(tail)
            ))
        }
        "downsample" | "upsample" => {
            let sampler = if up { "upsamplers" } else { "downsamplers" };
            let tail = tail.strip_prefix("conv.")?;
            Some(format!("{side}.{blocks}.{block}.{sampler}.0.conv.{tail}"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_keys_follow_diffusers_numbering() {
        let cases = [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("input_blocks.0.0.bias", "conv_in.bias"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.bias",
                "down_blocks.1.resnets.0.conv_shortcut.bias",
            ),
            (
                "input_blocks.11.0.out_layers.3.weight",
                "down_blocks.3.resnets.1.conv2.weight",
            ),
            (
                "middle_block.1.norm.weight",
                "mid_block.attentions.0.norm.weight",
            ),
            (
                "middle_block.2.emb_layers.1.bias",
                "mid_block.resnets.1.time_emb_proj.bias",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
                "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            ("out.2.weight", "conv_out.weight"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(unet_key(ldm, 2).as_deref(), Some(diffusers), "{ldm}");
        }
    }

    #[test]
    fn vae_keys_reverse_the_decoder_order() {
        let cases = [
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "encoder.down.0.downsample.conv.bias",
                "encoder.down_blocks.0.downsamplers.0.conv.bias",
            ),
            (
                "decoder.up.3.block.2.conv1.weight",
                "decoder.up_blocks.0.resnets.2.conv1.weight",
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
            ),
            (
                "decoder.mid.attn_1.proj_out.weight",
                "decoder.mid_block.attentions.0.to_out.0.weight",
            ),
            (
                "encoder.mid.block_2.norm1.bias",
                "encoder.mid_block.resnets.1.norm1.bias",
            ),
            ("encoder.norm_out.weight", "encoder.conv_norm_out.weight"),
            ("post_quant_conv.bias", "post_quant_conv.bias"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(vae_key(ldm, 4).as_deref(), Some(diffusers), "{ldm}");
        }
    }
}
