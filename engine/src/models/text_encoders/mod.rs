//! Text encoders (transformers' `CLIPTextModel`) and their tokenizers.

pub mod clip;
pub mod clip_tokenizer;
