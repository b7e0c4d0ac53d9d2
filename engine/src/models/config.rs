//! Reading a model's own `config.json` the way diffusers' `ConfigMixin` does: missing keys take the
//! class's `__init__` default (serde defaults on each config struct), unknown keys are collected
//! and warned about, never fatal. Aka `configuration_utils.py`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{EngineError, Result};

/// A config struct that collects the keys it does not know (`#[serde(flatten)] extra`).
pub trait ModelConfig: DeserializeOwned {
    /// Keys the struct did not recognise.
    fn unknown_keys(&self) -> &BTreeMap<String, Value>;
}

/// Parses `json` (read from `path`, used in messages) into `C`, warning about unknown keys.
/// Diffusers' private keys (`_class_name`, `_diffusers_version`, `_name_or_path`, …) are skipped.
pub fn parse_config<C: ModelConfig>(json: &str, path: &Path) -> Result<C> {
    let config: C = serde_json::from_str(json).map_err(|e| EngineError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    for key in config.unknown_keys().keys() {
        if !key.starts_with('_') {
            tracing::warn!(file = %path.display(), key, "unknown config key ignored");
        }
    }
    Ok(config)
}

/// Reads and parses a config file.
pub fn read_config<C: ModelConfig>(path: &Path) -> Result<C> {
    let json = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    parse_config(&json, path)
}

/// A diffusers config value that is either one value for every block or one per block
/// (`layers_per_block`, `attention_head_dim`, `only_cross_attention`, …).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same value for every block.
    All(T),
    /// One value per block, in down-block order.
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// Expands to one value per block, checking the list length against `blocks`.
    pub fn expand(&self, blocks: usize, key: &str) -> Result<Vec<T>> {
        match self {
            Self::All(v) => Ok(vec![v.clone(); blocks]),
            Self::Each(list) if list.len() == blocks => Ok(list.clone()),
            Self::Each(list) => Err(EngineError::Unsupported(format!(
                "config `{key}` has {} entries but the model has {blocks} blocks",
                list.len()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::unets::UNet2DConditionConfig;

    #[test]
    fn unknown_keys_are_kept_not_fatal_and_defaults_fill_the_rest() {
        let json = r#"{"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "some_future_key": 3}"#;
        let config: UNet2DConditionConfig =
            parse_config(json, Path::new("unet/config.json")).unwrap();
        assert_eq!(config.block_out_channels, vec![32, 64]);
        assert_eq!(config.cross_attention_dim, PerBlock::All(1280));
        assert_eq!(config.norm_eps, 1e-5);
        assert!(config.unknown_keys().contains_key("some_future_key"));
    }

    #[test]
    fn bad_json_names_the_file() {
        let err =
            parse_config::<UNet2DConditionConfig>("{", Path::new("unet/config.json")).unwrap_err();
        assert!(err.to_string().starts_with("unet/config.json"), "{err}");
    }

    #[test]
    fn per_block_lists_must_match_the_block_count() {
        assert_eq!(PerBlock::All(2).expand(3, "k").unwrap(), vec![2, 2, 2]);
        assert_eq!(
            PerBlock::Each(vec![1, 2]).expand(2, "k").unwrap(),
            vec![1, 2]
        );
        assert!(
            PerBlock::Each(vec![1, 2])
                .expand(3, "layers_per_block")
                .is_err()
        );
    }
}
