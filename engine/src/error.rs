//! The engine's one error type. Every variant names what was wrong so the UI and CLI can show it
//! as is; nothing in the engine panics on bad input.

use std::path::PathBuf;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file could not be read or written. (The OS's reason is in the message, not also a
    /// `source()`: an error chain printed with `{:#}` would say it twice.)
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A file to be written exists but is not a regular file (a folder, a device, a FIFO, a
    /// socket): writing would replace it rather than write to it.
    #[error("{path} is {kind}, not a regular file: refusing to replace it")]
    NotARegularFile { path: PathBuf, kind: &'static str },
    /// A JSON config could not be parsed.
    #[error("{path}: invalid JSON config: {message}")]
    Config { path: PathBuf, message: String },
    /// A weight the model needs is not in the checkpoint.
    #[error("missing tensor `{key}` in {file}")]
    MissingTensor { key: String, file: PathBuf },
    /// A tensor exists but has the wrong shape.
    #[error("tensor `{key}` in {file} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        key: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A safetensors file could not be parsed or written.
    #[error("{file}: {message}")]
    Safetensors { file: PathBuf, message: String },
    /// The request is invalid; `field` names the offending input.
    #[error("invalid {field}: {message}")]
    InvalidInput {
        field: &'static str,
        message: String,
    },
    /// The model, scheduler or backend does not support what was asked.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A noise tape ran out or did not match the draw the pipeline made.
    #[error("noise tape: {0}")]
    NoiseTape(String),
    /// The tokenizer failed to load or encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Downloading from the Hugging Face hub failed.
    #[error("hub: {0}")]
    Hub(String),
    /// No usable device for the requested backend.
    #[error("backend: {0}")]
    Backend(String),
    /// The device already computes in another float type in this process: Burn fixes a
    /// device's float type at its first tensor, so `wanted` needs a new process.
    #[error(
        "this device already computes in {current} in this process, and Burn fixes a device's \
         float type at its first tensor: {wanted} needs a new process (the app: restart it; \
         the CLI: `--dtype {wanted}`)"
    )]
    PrecisionLocked { current: String, wanted: String },
    /// The request would need more memory than the device has (checked before any tensor
    /// work); the text names the numbers and what would fit.
    #[error("not enough memory: {0}")]
    OutOfMemory(String),
    /// The user cancelled the job.
    #[error("cancelled")]
    Cancelled,
    /// A model produced NaN or infinite values even in f32 (broken weights or inputs).
    #[error("{0}")]
    NonFinite(String),
}

/// The engine's result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error,
        }
    }

    /// An invalid request field.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidInput {
            field,
            message: message.into(),
        }
    }
}

/// The message a caught panic carries (`panic!("…")` gives a `&str` or a `String`), if any.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
}
