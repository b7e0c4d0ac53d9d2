//! Resolving a `--model` argument to a local diffusers folder.
//!
//! A hub id (`org/name`) is looked up in the HF cache first (`$HF_HOME/hub/models--org--name/
//! snapshots/<rev>/…`, the layout `huggingface_hub` writes): when every file the pipeline needs
//! is there, nothing touches the network. Otherwise the files are downloaded with `hf-hub`
//! into that cache, reporting progress.

use std::path::{Path, PathBuf};

pub use hf_hub::Cache;
use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Repo, RepoType};

use crate::error::{EngineError, Result};

/// Receives download progress (bytes of the current file).
pub trait DownloadProgress {
    /// A file download starts; `total_bytes` is its size.
    fn start(&mut self, file: &str, total_bytes: usize);
    /// `bytes` more arrived.
    fn advance(&mut self, bytes: usize);
    /// The current file is complete.
    fn finish(&mut self);
}

/// Ignores progress.
impl DownloadProgress for () {
    fn start(&mut self, _file: &str, _total_bytes: usize) {}
    fn advance(&mut self, _bytes: usize) {}
    fn finish(&mut self) {}
}

/// What a `--model` argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder on disk.
    Local(PathBuf),
    /// A hub repository id, optionally at a revision (`org/name@rev`).
    Hub {
        repo_id: String,
        revision: Option<String>,
    },
}

impl ModelSource {
    /// Reads a `--model` argument: an existing path is local; `org/name[@rev]` is a hub id.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.exists() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        Self::hub(spec).ok_or_else(|| {
            EngineError::invalid(
                "model",
                format!("`{spec}` is neither an existing folder nor a hub id like `org/name`"),
            )
        })
    }

    /// Reads a model name that did not come from the user's own hand (a picture's metadata, a
    /// file someone sent): a hub id only. A path there is never followed (`../`, `/etc`, a
    /// folder that happens to exist here), since the name would then choose what is read.
    pub fn parse_untrusted(spec: &str) -> Result<Self> {
        Self::hub(spec).ok_or_else(|| {
            EngineError::invalid(
                "model",
                format!(
                    "`{spec}` is not a hub id like `org/name`; a path read from a picture's \
                     metadata is not followed"
                ),
            )
        })
    }

    /// `org/name[@revision]` when it is one: each part letters, digits, `-`, `_`, `.` (not `.`
    /// or `..` alone); the revision a branch, tag or commit (`refs/pr/1` has slashes), with no
    /// `..` part and not absolute, since it names a folder in the cache.
    fn hub(spec: &str) -> Option<Self> {
        let (id, revision) = match spec.split_once('@') {
            Some((id, rev)) => (id, Some(rev)),
            None => (spec, None),
        };
        let name_part = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let parts: Vec<&str> = id.split('/').collect();
        let id_ok = parts.len() == 2 && parts.iter().all(|p| name_part(p));
        let revision_ok = revision.is_none_or(|rev| rev.split('/').all(name_part));
        (id_ok && revision_ok).then(|| Self::Hub {
            repo_id: id.to_string(),
            revision: revision.map(String::from),
        })
    }
}

/// What a hub repository holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoLayout {
    /// A diffusers pipeline folder (`model_index.json` + component folders).
    Pipeline,
    /// One diffusers model at the root (`config.json` + `diffusion_pytorch_model.safetensors`),
    /// e.g. `lllyasviel/sd-controlnet-canny`.
    Model,
}

impl RepoLayout {
    /// A model repository's files, `(default, variant)` per file; the first one marks the
    /// snapshot. (A pipeline's come from its model_index.json: [`pipeline_files`].)
    fn model_files(variant: Option<&str>) -> Vec<(String, Option<String>)> {
        vec![
            ("config.json".into(), None),
            (
                "diffusion_pytorch_model.safetensors".into(),
                variant.map(|v| format!("diffusion_pytorch_model.{v}.safetensors")),
            ),
        ]
    }

    /// What the repository should be, for messages.
    fn described(self) -> &'static str {
        match self {
            Self::Pipeline => "a diffusers pipeline repository (model_index.json + components)",
            Self::Model => "a diffusers model repository (config.json + safetensors weights)",
        }
    }
}

/// The components of a pipeline folder that Brushfire's pipelines read (model_index.json keys):
/// SD's, IF stage II's image-noising scheduler and the x4 upscaler's low-res scheduler. Safety
/// checkers, feature extractors and watermarkers are not fetched.
const READ_COMPONENTS: &[&str] = &[
    "unet",
    "vae",
    "text_encoder",
    "tokenizer",
    "scheduler",
    "image_noising_scheduler",
    "low_res_scheduler",
];

/// The weights variant of a file name (`fp16` in `diffusion_pytorch_model.fp16.safetensors` or
/// `model.fp16-00001-of-00002.safetensors`), `None` for the default weights.
fn weights_variant(file: &str) -> Option<&str> {
    let name = file.rsplit('/').next().unwrap_or(file);
    let stem = name.strip_suffix(".safetensors")?;
    let tail = stem.split_once('.')?.1;
    Some(tail.split('-').next().unwrap_or(tail))
}

/// The files of a pipeline repository its pipeline reads, from its model_index.json and its
/// file list (`listing`, paths relative to the repository): model_index.json; each component's
/// configs; the tokenizer's files; each model's safetensors weights, all shards of one
/// variant (`variant` where the component has it, else the default weights; `non_ema` and
/// other variants are skipped). An error names what a component lacks.
pub fn pipeline_files(
    index: &serde_json::Value,
    listing: &[String],
    variant: Option<&str>,
) -> std::result::Result<Vec<String>, String> {
    let obj = index
        .as_object()
        .ok_or("model_index.json is not a JSON object")?;
    let mut files = vec!["model_index.json".to_string()];
    // IF stage II takes stage I's prompt embeddings (as DeepFloyd's and diffusers' docs load
    // it, `text_encoder=None`): its copy of T5-XXL (~19 GB) is not fetched.
    let stage2 = obj
        .get("_class_name")
        .and_then(serde_json::Value::as_str)
        .is_some_and(|c| c.starts_with("IFSuperResolution"));
    for (name, value) in obj {
        if stage2 && name == "text_encoder" {
            continue;
        }
        let present = value
            .as_array()
            .is_some_and(|a| a.get(1).is_some_and(|c| !c.is_null()));
        if !present || !READ_COMPONENTS.contains(&name.as_str()) {
            continue;
        }
        let prefix = format!("{name}/");
        let own: Vec<&str> = listing
            .iter()
            .filter_map(|f| f.strip_prefix(&prefix))
            .filter(|rest| !rest.contains('/'))
            .collect();
        let has = |f: &str| own.contains(&f);
        let wanted = variant.filter(|v| {
            own.iter()
                .any(|f| f.ends_with(".safetensors") && weights_variant(f) == Some(*v))
        });
        let mut weights = 0;
        for f in &own {
            let keep = if f.ends_with(".safetensors") {
                let keep = weights_variant(f) == wanted;
                weights += usize::from(keep);
                keep
            } else {
                f.ends_with(".json")
                    || (name == "tokenizer"
                        && (f.ends_with(".model") || f.ends_with(".txt") || f.ends_with(".json")))
            };
            if keep {
                files.push(format!("{prefix}{f}"));
            }
        }
        let complete = match name.as_str() {
            "unet" | "vae" | "text_encoder" => has("config.json") && weights > 0,
            "tokenizer" => {
                has("tokenizer.json")
                    || has("spiece.model")
                    || (has("vocab.json") && has("merges.txt"))
            }
            _ => has("scheduler_config.json"),
        };
        if !complete {
            return Err(format!(
                "its `{name}` folder lacks {}",
                match name.as_str() {
                    "unet" | "vae" | "text_encoder" => "config.json or safetensors weights",
                    "tokenizer" => "tokenizer files",
                    _ => "scheduler_config.json",
                }
            ));
        }
    }
    Ok(files)
}

/// Every file under `dir`, relative to it (two levels: a pipeline folder's components).
fn listing_of(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if path.is_file() {
            out.push(name);
        } else if path.is_dir()
            && let Ok(inner) = std::fs::read_dir(&path)
        {
            out.extend(
                inner
                    .flatten()
                    .filter(|e| e.path().is_file())
                    .map(|e| format!("{name}/{}", e.file_name().to_string_lossy())),
            );
        }
    }
    out
}

/// The HF cache `hf-hub` and `huggingface_hub` share (`$HF_HOME/hub`, default
/// `~/.cache/huggingface/hub`).
pub fn hf_cache() -> Cache {
    Cache::from_env()
}

fn repo(repo_id: &str, revision: Option<&str>) -> Repo {
    match revision {
        Some(rev) => Repo::with_revision(repo_id.to_string(), RepoType::Model, rev.to_string()),
        None => Repo::model(repo_id.to_string()),
    }
}

/// The snapshot folder of a fully cached model, if every required file is present.
pub fn cached_snapshot(
    cache: &Cache,
    repo_id: &str,
    revision: Option<&str>,
    variant: Option<&str>,
) -> Option<PathBuf> {
    cached_snapshot_of(cache, repo_id, revision, variant, RepoLayout::Pipeline)
}

/// [`cached_snapshot`] for a repository of `layout`.
pub fn cached_snapshot_of(
    cache: &Cache,
    repo_id: &str,
    revision: Option<&str>,
    variant: Option<&str>,
    layout: RepoLayout,
) -> Option<PathBuf> {
    let cached = cache.repo(repo(repo_id, revision));
    if layout == RepoLayout::Pipeline {
        let index = cached.get("model_index.json")?;
        let dir = index.parent()?.to_path_buf();
        let json = std::fs::read_to_string(&index).ok()?;
        let json: serde_json::Value = serde_json::from_str(&json).ok()?;
        let listing = listing_of(&dir);
        pipeline_files(&json, &listing, variant).ok()?;
        return Some(dir);
    }
    let files = RepoLayout::model_files(variant);
    let index = cached.get(&files.first()?.0)?;
    for (default, preferred) in files {
        let found = preferred
            .as_deref()
            .and_then(|p| cached.get(p))
            .or_else(|| cached.get(&default));
        found.as_ref()?;
    }
    index.parent().map(Path::to_path_buf)
}

/// Where a model stands before loading, so a UI can offer a download instead of starting one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelAvailability {
    /// A folder on disk.
    Local(PathBuf),
    /// A hub model already in the HF cache.
    Cached(PathBuf),
    /// A hub model that loading would download.
    NeedsDownload { repo_id: String },
    /// A hub model not in the cache while `HF_HUB_OFFLINE` is set.
    Offline { repo_id: String },
}

/// Checks `spec` against the disk and the HF cache without touching the network.
/// `variant` as for [`resolve_model`]: a cache holding that variant's weights, or the default
/// ones, counts.
pub fn model_availability(spec: &str, variant: Option<&str>) -> Result<ModelAvailability> {
    model_availability_in(&hf_cache(), hub_offline(), spec, variant)
}

/// [`model_availability`] with the cache and offline mode given explicitly.
pub fn model_availability_in(
    cache: &Cache,
    offline: bool,
    spec: &str,
    variant: Option<&str>,
) -> Result<ModelAvailability> {
    Ok(match ModelSource::parse(spec)? {
        ModelSource::Local(path) => ModelAvailability::Local(path),
        ModelSource::Hub { repo_id, revision } => {
            match cached_snapshot(cache, &repo_id, revision.as_deref(), variant) {
                Some(dir) => ModelAvailability::Cached(dir),
                None if offline => ModelAvailability::Offline { repo_id },
                None => ModelAvailability::NeedsDownload { repo_id },
            }
        }
    })
}

/// `HF_HUB_OFFLINE` as `huggingface_hub` reads it.
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Resolves `spec` to a local diffusers folder, downloading from the hub when needed.
/// `variant` prefers `*.{variant}.safetensors` weights (e.g. `fp16`). Reads `HF_HOME` and
/// `HF_HUB_OFFLINE` from the environment, as `huggingface_hub` does.
pub fn resolve_model(
    spec: &str,
    variant: Option<&str>,
    progress: &mut dyn DownloadProgress,
) -> Result<PathBuf> {
    resolve_model_in(&hf_cache(), hub_offline(), spec, variant, progress)
}

/// [`resolve_model`] with the cache and offline mode given explicitly.
pub fn resolve_model_in(
    cache: &Cache,
    offline: bool,
    spec: &str,
    variant: Option<&str>,
    progress: &mut dyn DownloadProgress,
) -> Result<PathBuf> {
    resolve_in(
        cache,
        offline,
        spec,
        variant,
        RepoLayout::Pipeline,
        progress,
    )
}

/// Resolves a ControlNet `spec` (a folder, or a hub id whose repository holds one model) to a
/// local folder, downloading from the hub when needed, like [`resolve_model`] (`variant` too).
pub fn resolve_controlnet(
    spec: &str,
    variant: Option<&str>,
    progress: &mut dyn DownloadProgress,
) -> Result<PathBuf> {
    resolve_in(
        &hf_cache(),
        hub_offline(),
        spec,
        variant,
        RepoLayout::Model,
        progress,
    )
}

/// Resolves `spec` for a repository of `layout`.
pub fn resolve_in(
    cache: &Cache,
    offline: bool,
    spec: &str,
    variant: Option<&str>,
    layout: RepoLayout,
    progress: &mut dyn DownloadProgress,
) -> Result<PathBuf> {
    match ModelSource::parse(spec)? {
        ModelSource::Local(path) => {
            let safetensors = path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
            if path.is_dir() || (path.is_file() && safetensors) {
                Ok(path)
            } else {
                Err(EngineError::Unsupported(format!(
                    "{}: neither a diffusers folder nor a single-file `.safetensors` checkpoint \
                     (pickled `.ckpt` files are not read)",
                    path.display()
                )))
            }
        }
        ModelSource::Hub { repo_id, revision } => {
            if let Some(dir) =
                cached_snapshot_of(cache, &repo_id, revision.as_deref(), variant, layout)
            {
                tracing::info!(repo_id, dir = %dir.display(), "using the cached model");
                return Ok(dir);
            }
            if offline {
                return Err(EngineError::Hub(format!(
                    "`{repo_id}` is not in the HF cache ({}) and HF_HUB_OFFLINE=1",
                    cache.path().display()
                )));
            }
            download(
                cache.clone(),
                &repo_id,
                revision.as_deref(),
                variant,
                layout,
                progress,
            )
        }
    }
}

/// Checks the cache folder can take a download, before anything is asked of the network: a
/// download into an `HF_HOME` that cannot be written would fail after its first file, or not
/// say why.
fn check_cache_writable(cache: &Cache) -> Result<()> {
    let dir = cache.path();
    let probe = dir.join(format!(".brushfire-write-check-{}", std::process::id()));
    let written = std::fs::create_dir_all(dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&probe)
            .map(drop)
    });
    let _ = std::fs::remove_file(&probe);
    written.map_err(|e| {
        EngineError::Hub(format!(
            "the Hugging Face cache {} cannot be written ({e}): set HF_HOME to a folder you \
             can write",
            dir.display()
        ))
    })
}

fn download(
    cache: Cache,
    repo_id: &str,
    revision: Option<&str>,
    variant: Option<&str>,
    layout: RepoLayout,
    progress: &mut dyn DownloadProgress,
) -> Result<PathBuf> {
    check_cache_writable(&cache)?;
    let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
    let mut builder = ApiBuilder::from_cache(cache).with_progress(false);
    if let Some(endpoint) = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()) {
        builder = builder.with_endpoint(endpoint);
    }
    if token.is_some() {
        builder = builder.with_token(token);
    }
    let api: Api = builder
        .build()
        .map_err(|e| hub_error(repo_id, &e.to_string()))?;
    let api_repo = api.repo(repo(repo_id, revision));
    let info = api_repo
        .info()
        .map_err(|e| hub_error(repo_id, &e.to_string()))?;
    let listed = |f: &str| info.siblings.iter().any(|s| s.rfilename == f);
    if layout == RepoLayout::Pipeline {
        if !listed("model_index.json") {
            return Err(EngineError::Hub(format!(
                "`{repo_id}` has no `model_index.json`: is it {}?",
                layout.described()
            )));
        }
        let index_path = fetch(&api_repo, "model_index.json", progress, repo_id)?;
        let text =
            std::fs::read_to_string(&index_path).map_err(|e| EngineError::io(&index_path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            EngineError::Hub(format!("`{repo_id}`: model_index.json is not JSON ({e})"))
        })?;
        let listing: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
        let files = pipeline_files(&json, &listing, variant)
            .map_err(|e| EngineError::Hub(format!("`{repo_id}`: {e}")))?;
        for file in files.iter().skip(1) {
            fetch(&api_repo, file, progress, repo_id)?;
        }
        return index_path
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| EngineError::Hub(format!("`{repo_id}`: no snapshot folder")));
    }
    let mut index = None;
    let files = RepoLayout::model_files(variant);
    let anchor = files.first().map(|(f, _)| f.clone()).unwrap_or_default();
    for (default, preferred) in files {
        let file = match preferred {
            Some(p) if listed(&p) => p,
            _ => default,
        };
        if !listed(&file) {
            return Err(EngineError::Hub(format!(
                "`{repo_id}` has no `{file}`: is it {}?",
                layout.described()
            )));
        }
        let path = fetch(&api_repo, &file, progress, repo_id)?;
        if file == anchor {
            index = Some(path);
        }
    }
    index
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .ok_or_else(|| EngineError::Hub(format!("`{repo_id}`: {anchor} was not downloaded")))
}

fn fetch(
    api_repo: &ApiRepo,
    file: &str,
    progress: &mut dyn DownloadProgress,
    repo_id: &str,
) -> Result<PathBuf> {
    api_repo
        .download_with_progress(file, ProgressAdapter(progress))
        .map_err(|e| hub_error(repo_id, &format!("{file}: {e}")))
}

fn hub_error(repo_id: &str, message: &str) -> EngineError {
    EngineError::Hub(format!(
        "could not fetch `{repo_id}` from the Hugging Face hub ({message}); offline? Gated repos need HF_TOKEN"
    ))
}

/// Bridges our progress trait to hf-hub's.
struct ProgressAdapter<'a>(&'a mut dyn DownloadProgress);

impl hf_hub::api::Progress for ProgressAdapter<'_> {
    fn init(&mut self, size: usize, filename: &str) {
        self.0.start(filename, size);
    }
    fn update(&mut self, size: usize) {
        self.0.advance(size);
    }
    fn finish(&mut self) {
        self.0.finish();
    }
}
