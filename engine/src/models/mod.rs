//! Models, laid out like diffusers' `models/` (and transformers' CLIP).

pub mod attention;
pub mod attention_processor;
pub mod autoencoders;
pub mod config;
pub mod controlnets;
pub mod conv;
pub mod cube_attention;
pub mod embeddings;
pub mod flex;
pub mod layout;
pub mod normalization;
pub mod resnet;
pub mod text_encoders;
pub mod unets;
pub mod weights;

pub use attention_processor::AttnProcessor;
pub use layout::MemoryFormat;
