//! Where model files come from: a local diffusers folder, or a Hugging Face hub id downloaded
//! through `hf-hub` into the standard cache (`HF_HOME`, `HF_TOKEN`), with progress.

pub mod hub;
pub mod single_file;

pub use hub::{
    DownloadProgress, ModelAvailability, ModelSource, RepoLayout, model_availability,
    model_availability_in, resolve_controlnet, resolve_in, resolve_model, resolve_model_in,
};
