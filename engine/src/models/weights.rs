//! Loading `*.safetensors` weights into a module through `burn-store`, with PyTorch names.
//!
//! Field names equal the diffusers state-dict keys, so no renaming happens here; the
//! `PyTorchToBurnAdapter` only transposes `Linear` weights and maps norm `weight`/`bias` to Burn's
//! `gamma`/`beta`. Missing or mis-shaped weights are an error naming the key and the file.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn_store::{ApplyError, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};

use crate::error::{EngineError, Result};

/// Loads `file` into `module`. Extra tensors in the file are ignored (logged at debug level).
pub fn load_safetensors<B: Backend, M: ModuleSnapshot<B>>(
    module: &mut M,
    file: &Path,
) -> Result<()> {
    if !file.is_file() {
        return Err(EngineError::io(
            file,
            std::io::Error::new(std::io::ErrorKind::NotFound, "weights file not found"),
        ));
    }
    let mut store = SafetensorsStore::from_file(file)
        .with_from_adapter(PyTorchToBurnAdapter)
        .skip_enum_variants(true)
        .allow_partial(true)
        .validate(false);
    let result = module
        .load_from(&mut store)
        .map_err(|e| EngineError::Safetensors {
            file: file.to_path_buf(),
            message: e.to_string(),
        })?;
    if let Some(err) = result.errors.first() {
        return Err(match err {
            ApplyError::ShapeMismatch {
                path,
                expected,
                found,
            } => EngineError::ShapeMismatch {
                key: path.clone(),
                file: file.to_path_buf(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            },
            other => EngineError::Safetensors {
                file: file.to_path_buf(),
                message: other.to_string(),
            },
        });
    }
    if let Some((key, _)) = result.missing.first() {
        return Err(EngineError::MissingTensor {
            key: pytorch_name(key),
            file: file.to_path_buf(),
        });
    }
    if !result.unused.is_empty() {
        tracing::debug!(file = %file.display(), unused = ?result.unused, "tensors in the file not used by the model");
    }
    Ok(())
}

/// Burn's norm parameter names back to the PyTorch names a user sees in the file.
fn pytorch_name(key: &str) -> String {
    if let Some(stem) = key.strip_suffix(".gamma") {
        format!("{stem}.weight")
    } else if let Some(stem) = key.strip_suffix(".beta") {
        format!("{stem}.bias")
    } else {
        key.to_string()
    }
}
