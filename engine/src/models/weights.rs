//! Loading `*.safetensors` weights into a module through `burn-store`, with PyTorch names.
//!
//! Field names equal the diffusers/transformers state-dict keys, so no renaming happens here; the
//! `PyTorchToBurnAdapter` only transposes `Linear` weights and maps norm `weight`/`bias` to Burn's
//! `gamma`/`beta`, and enum variants (`proj_in` as conv or linear) are skipped in paths. Missing
//! or mis-shaped weights are an error naming the key and the file in the file's own terms.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::rc::Rc;

use burn::tensor::DType;
use burn::tensor::backend::Backend;
use burn_store::{
    ApplyError, BurnToPyTorchAdapter, ChainAdapter, KeyRemapper, ModuleAdapter, ModuleSnapshot,
    ModuleStore, PyTorchToBurnAdapter, SafetensorsStore, TensorSnapshot,
};

use crate::error::{EngineError, Result};
use crate::tensor_io::{read_safetensors_header, read_safetensors_keys};

/// File extensions of PyTorch pickle checkpoints: loading one runs Python's unpickler, which can
/// execute arbitrary code, so Brushfire never reads them.
const PICKLE_EXTENSIONS: &[&str] = &["bin", "ckpt", "pt", "pth", "pkl"];

/// The weights of one model folder as diffusers and transformers save them: `{stem}.safetensors`,
/// or the shards its `{stem}.safetensors.index.json` lists; with a variant, that variant's files
/// where the folder has them (`{stem}.{variant}.safetensors`,
/// `{stem}.safetensors.index.{variant}.json`, shards `{stem}.{variant}-00001-of-00002.safetensors`),
/// else the default ones.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightFiles {
    /// One file, or every shard the index names (sorted, each once).
    pub files: Vec<PathBuf>,
    /// The shard index, when the weights are sharded.
    pub index: Option<PathBuf>,
}

impl WeightFiles {
    /// Finds the weights of the model in `dir` (`stem`: `model` for transformers,
    /// `diffusion_pytorch_model` for diffusers). A folder whose weights exist only as pickle
    /// files (`.bin`, `.ckpt`, …) is refused, naming the file and how to convert it; the pickle
    /// is never opened. A folder with no weights at all names the file it looked for.
    pub fn find(dir: &Path, stem: &str, variant: Option<&str>) -> Result<Self> {
        let names = |variant: Option<&str>| match variant {
            Some(v) => (
                dir.join(format!("{stem}.{v}.safetensors")),
                dir.join(format!("{stem}.safetensors.index.{v}.json")),
            ),
            None => (
                dir.join(format!("{stem}.safetensors")),
                dir.join(format!("{stem}.safetensors.index.json")),
            ),
        };
        let (single, index) = variant
            .map(|v| names(Some(v)))
            .filter(|(single, index)| single.is_file() || index.is_file())
            .unwrap_or_else(|| names(None));
        if index.is_file() {
            return Self::from_index(dir, index);
        }
        if single.is_file() {
            return Ok(Self {
                files: vec![single],
                index: None,
            });
        }
        if let Some(pickle) = pickle_file(dir) {
            return Err(EngineError::Unsupported(format!(
                "{}: the weights are only in `{}`, a PyTorch pickle file, which Brushfire does \
                 not read (loading a pickle can run any code it holds). Convert the model to \
                 safetensors once, where you trust the file: `python -c \"import diffusers; \
                 diffusers.DiffusionPipeline.from_pretrained('MODEL').save_pretrained('MODEL-st', \
                 safe_serialization=True)\"` for a whole pipeline folder, or the model class's own \
                 from_pretrained/save_pretrained for one component",
                dir.display(),
                pickle
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            )));
        }
        Err(EngineError::io(
            &single,
            std::io::Error::new(std::io::ErrorKind::NotFound, "weights file not found"),
        ))
    }

    /// The shards a `*.safetensors.index*.json` lists.
    fn from_index(dir: &Path, index: PathBuf) -> Result<Self> {
        let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
        let config_error = |message: String| EngineError::Config {
            path: index.clone(),
            message,
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| config_error(e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| config_error("no `weight_map` object".into()))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for (key, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| config_error(format!("`{key}` maps to no file name")))?;
            // A shard is a file beside the index, never a path elsewhere.
            let plain = Path::new(shard)
                .file_name()
                .is_some_and(|name| name == std::ffi::OsStr::new(shard));
            if !plain {
                return Err(config_error(format!(
                    "shard `{shard}` is not a file name in the index's folder"
                )));
            }
            let path = dir.join(shard);
            if !files.contains(&path) {
                files.push(path);
            }
        }
        if files.is_empty() {
            return Err(config_error("the `weight_map` lists no shard".into()));
        }
        files.sort();
        Ok(Self {
            files,
            index: Some(index),
        })
    }

    /// Loads every parameter of `module` from these files; `renames` gives each file's
    /// `(key in the file, module key)` pairs from the file's keys (see
    /// [`load_safetensors_renamed`]).
    pub fn load_into<B: Backend, M: ModuleSnapshot<B>>(
        &self,
        module: &mut M,
        renames: impl Fn(&[String]) -> Vec<(String, String)>,
    ) -> Result<()> {
        let shards = self
            .files
            .iter()
            .map(|file| Ok((file.clone(), renames(&read_safetensors_keys(file)?))))
            .collect::<Result<Vec<_>>>()?;
        match (&self.index, shards.as_slice()) {
            (Some(index), _) => load_safetensors_shards(module, &shards, index),
            (None, [(file, renames)]) => load_safetensors_renamed(module, file, renames),
            (None, _) => Err(EngineError::Unsupported(
                "several weight files without an index".into(),
            )),
        }
    }
}

/// A pickle checkpoint in `dir`, if any (diffusers' `diffusion_pytorch_model.bin`,
/// transformers' `pytorch_model.bin`, an LDM `.ckpt`, …).
fn pickle_file(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.is_file()
                && path
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| PICKLE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// No renaming: the file's keys are the module's.
pub fn same_keys(_keys: &[String]) -> Vec<(String, String)> {
    Vec::new()
}

/// Loads every parameter of `module` from a PyTorch-layout safetensors file through burn-store,
/// turning burn-store's report into our errors: the first missing tensor becomes
/// `MissingTensor`, the first mis-shaped one `ShapeMismatch`, both with the file's key name and
/// layout (`weight`/`bias`, `[out, in]`) rather than Burn's (`gamma`/`beta`, `[in, out]`).
pub fn load_safetensors<B: Backend, M: ModuleSnapshot<B>>(
    module: &mut M,
    file: &Path,
) -> Result<()> {
    load_safetensors_renamed(module, file, &[])
}

/// [`load_safetensors`] from a file whose keys differ from the module's: `renames` holds
/// `(key in the file, module key in PyTorch naming)` (a single-file checkpoint's LDM names,
/// see `loading::single_file`). Keys not renamed are read as they are; 1×1-conv weights stored
/// for a `Linear` (LDM's VAE attention) are reshaped to `[out, in]`. Errors name the file's keys.
pub fn load_safetensors_renamed<B: Backend, M: ModuleSnapshot<B>>(
    module: &mut M,
    file: &Path,
    renames: &[(String, String)],
) -> Result<()> {
    match load_part(module, file, renames)?.into_iter().next() {
        Some(key) => Err(EngineError::MissingTensor {
            key,
            file: file.to_path_buf(),
        }),
        None => Ok(()),
    }
}

/// [`load_safetensors_renamed`] from the shards of one checkpoint (`(file, renames)` each, as a
/// `*.safetensors.index.json` lists them): every parameter must be in one of them; a missing
/// one is named with `index`, the file that promised it.
pub fn load_safetensors_shards<B: Backend, M: ModuleSnapshot<B>>(
    module: &mut M,
    shards: &[(std::path::PathBuf, Vec<(String, String)>)],
    index: &Path,
) -> Result<()> {
    let mut missing: Option<Vec<String>> = None;
    for (file, renames) in shards {
        let part = load_part(module, file, renames)?;
        missing = Some(match missing {
            None => part,
            Some(before) => before.into_iter().filter(|k| part.contains(k)).collect(),
        });
    }
    match missing.unwrap_or_default().into_iter().next() {
        Some(key) => Err(EngineError::MissingTensor {
            key,
            file: index.to_path_buf(),
        }),
        None => Ok(()),
    }
}

/// Loads what `file` holds into `module`; returns the parameters it lacks (file key names).
fn load_part<B: Backend, M: ModuleSnapshot<B>>(
    module: &mut M,
    file: &Path,
    renames: &[(String, String)],
) -> Result<Vec<String>> {
    if !file.is_file() {
        return Err(EngineError::io(
            file,
            std::io::Error::new(std::io::ErrorKind::NotFound, "weights file not found"),
        ));
    }
    // The header checked against the file before burn-store maps it: a file cut short would
    // otherwise be read past its end.
    let header = read_safetensors_header(file)?;
    // Burn path → (key in the file, shape in the file) for every parameter of the module.
    let file_names: HashMap<String, (String, Vec<usize>)> = module
        .collect(None, None, true)
        .iter()
        .map(|snapshot| {
            let torch = BurnToPyTorchAdapter.adapt(snapshot);
            (
                snapshot.full_path(),
                (torch.full_path(), torch.shape.to_vec()),
            )
        })
        .collect();
    // Module key → the file's own key, for messages.
    let original: HashMap<&str, &str> = renames
        .iter()
        .map(|(file_key, module_key)| (module_key.as_str(), file_key.as_str()))
        .collect();
    let in_file = |module_key: &str| -> String {
        original
            .get(module_key)
            .map_or_else(|| module_key.to_owned(), |k| (*k).to_owned())
    };
    let file_key = |burn_path: &str| {
        file_names
            .get(burn_path)
            .map(|(key, _)| in_file(key))
            .unwrap_or_else(|| burn_path.to_owned())
    };
    let safetensors_error = |message: String| EngineError::Safetensors {
        file: file.to_path_buf(),
        message,
    };
    // A weight stored as integers or booleans would make Burn panic while loading it (it casts
    // float tensors only): refused by name first.
    let wanted: std::collections::HashSet<String> =
        file_names.values().map(|(key, _)| in_file(key)).collect();
    if let Some(t) = header.iter().find(|t| {
        wanted.contains(&t.name) && !matches!(t.dtype.as_str(), "F16" | "BF16" | "F32" | "F64")
    }) {
        return Err(safetensors_error(format!(
            "tensor `{}` has dtype {}, expected a float (F32, F16 or BF16)",
            t.name, t.dtype
        )));
    }

    // Weights take the module's float dtype whatever the file stores (an `fp16` variant loads
    // into an f32 model and the reverse); burn-store alone would keep the file's dtype.
    let target = module
        .collect(None, None, true)
        .iter()
        .map(|s| s.dtype)
        .find(|d| d.is_float())
        .unwrap_or(DType::F32);

    // We check the outcome ourselves (below) to name keys in the file's terms.
    let mut remapper = KeyRemapper::new();
    for (from, to) in renames {
        remapper = remapper
            .add_pattern(format!("^{}$", regex_escape(from)), to.clone())
            .map_err(|e| safetensors_error(format!("renaming `{from}`: {e}")))?;
    }
    let mut store = SafetensorsStore::from_file(file)
        .remap(remapper)
        .with_from_adapter(ChainAdapter::new(
            ChainAdapter::new(ConvToLinear, PyTorchToBurnAdapter),
            CastFloats(target),
        ))
        .skip_enum_variants(true)
        .validate(false)
        .allow_partial(true);
    let result = module
        .load_from(&mut store)
        .map_err(|e| safetensors_error(e.to_string()))?;

    if let Some(error) = result.errors.first() {
        return Err(match error {
            ApplyError::ShapeMismatch { path, .. } => {
                let (key, expected) = file_names
                    .get(path)
                    .cloned()
                    .unwrap_or_else(|| (path.clone(), Vec::new()));
                let found = store
                    .get_snapshot(&key)
                    .ok()
                    .flatten()
                    .map(|s| s.shape.to_vec())
                    .unwrap_or_default();
                EngineError::ShapeMismatch {
                    key: in_file(&key),
                    file: file.to_path_buf(),
                    expected,
                    found,
                }
            }
            ApplyError::DTypeMismatch {
                path,
                expected,
                found,
            } => safetensors_error(format!(
                "tensor `{}` has dtype {found:?}, expected {expected:?}",
                file_key(path)
            )),
            ApplyError::AdapterError { path, message }
            | ApplyError::LoadError { path, message } => {
                safetensors_error(format!("tensor `{}`: {message}", file_key(path)))
            }
        });
    }
    tracing::debug!(
        file = %file.display(),
        applied = result.applied.len(),
        unused = result.unused.len(),
        "loaded weights"
    );
    Ok(result
        .missing
        .iter()
        .map(|(path, _)| file_key(path))
        .collect())
}

/// Escapes a literal for use in a regex pattern.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A `Linear` weight stored as a 1×1 conv (`[out, in, 1, 1]` or `[out, in, 1]`, LDM's VAE
/// attention) becomes `[out, in]`, as diffusers' conversion does.
#[derive(Debug, Clone, Copy)]
struct ConvToLinear;

impl ModuleAdapter for ConvToLinear {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let is_linear_weight = snapshot.module_type().as_deref() == Some("Struct:Linear")
            && snapshot
                .path_stack
                .as_ref()
                .and_then(|p| p.last())
                .is_some_and(|name| name == "weight");
        let shape = snapshot.shape.to_vec();
        if !is_linear_weight || shape.len() < 3 || shape[2..].iter().any(|&d| d != 1) {
            return snapshot.clone();
        }
        let (rows, cols) = (shape[0], shape[1]);
        let data = snapshot.clone_data_fn();
        TensorSnapshot::from_closure(
            Rc::new(move || {
                data().map(|mut d| {
                    d.shape = burn::tensor::Shape::new([rows, cols]);
                    d
                })
            }),
            snapshot.dtype,
            burn::tensor::Shape::new([rows, cols]),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(*self)
    }
}

/// Casts every floating-point tensor to one dtype as it is loaded.
#[derive(Debug, Clone, Copy)]
struct CastFloats(DType);

impl ModuleAdapter for CastFloats {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let target = self.0;
        if !snapshot.dtype.is_float() || snapshot.dtype == target {
            return snapshot.clone();
        }
        let data = snapshot.clone_data_fn();
        TensorSnapshot::from_closure(
            Rc::new(move || data().map(|d| d.convert_dtype(target))),
            target,
            snapshot.shape.clone(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(*self)
    }
}

/// Casts every float parameter of a module to `dtype` (e.g. the VAE to f32 inside an f16
/// pipeline: its decoder overflows f16 on some images, as diffusers' `force_upcast` notes).
pub struct CastParams(pub DType);

impl<B: Backend> burn::module::ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<burn::tensor::Tensor<B, D>>,
    ) -> burn::module::Param<burn::tensor::Tensor<B, D>> {
        let dtype = self.0;
        param.map(|t| if t.dtype() == dtype { t } else { t.cast(dtype) })
    }
}
