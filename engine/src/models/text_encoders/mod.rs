//! Text encoders (transformers' `CLIPTextModel`, `T5EncoderModel`) and their tokenizers.

pub mod clip;
pub mod clip_tokenizer;
pub mod sentencepiece;
pub mod t5;
pub mod t5_tokenizer;
