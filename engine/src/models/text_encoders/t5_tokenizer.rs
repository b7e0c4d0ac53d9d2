//! T5's SentencePiece (Unigram) tokenizer, as DeepFloyd IF uses it.
//!
//! Mirrors transformers' `T5TokenizerFast` loaded from a `tokenizer.json` (precompiled-charsmap
//! normalisation, whitespace collapsed, `▁` metaspace, Unigram, `</s>` appended) and the prompt
//! handling of diffusers' `IFPipeline.encode_prompt`: prompts lower-cased and stripped (its
//! `_text_preprocessing` without caption cleaning), padded to 77 tokens with `<pad>`, longer
//! ones truncated to 76 tokens plus `</s>`, and an attention mask marking the real tokens.

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::error::{EngineError, Result};

/// IF's prompt length (`IFPipeline.encode_prompt`'s `max_length`).
pub const IF_MAX_LENGTH: usize = 77;

/// Prompts as T5 input: ids and attention mask, `[prompts][max_length]` each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct T5Tokens {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
    /// Per prompt: how many of its tokens were cut off (0 when it fit).
    pub dropped: Vec<usize>,
    pub max_length: usize,
}

impl T5Tokens {
    fn tensor<B: Backend>(rows: &[Vec<u32>], len: usize, device: &B::Device) -> Tensor<B, 2, Int> {
        let flat: Vec<i64> = rows.iter().flatten().map(|&v| i64::from(v)).collect();
        Tensor::from_data(TensorData::new(flat, [rows.len(), len]), device)
    }

    /// `(input_ids, attention_mask)` tensors, `[batch, max_length]` each.
    pub fn to_tensors<B: Backend>(
        &self,
        device: &B::Device,
    ) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
        (
            Self::tensor(&self.input_ids, self.max_length, device),
            Self::tensor(&self.attention_mask, self.max_length, device),
        )
    }
}

/// transformers' `T5TokenizerFast`, set up as IF calls it.
#[derive(Debug, Clone)]
pub struct T5Tokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
}

impl T5Tokenizer {
    /// Loads a `tokenizer/` folder: `tokenizer.json` when present, else SentencePiece's
    /// `spiece.model` (what IF's repos ship), converted as transformers' `T5Converter` does.
    pub fn load(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let spiece = dir.join("spiece.model");
        let tokenizer = if json.is_file() {
            Tokenizer::from_file(&json)
                .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", json.display())))?
        } else if spiece.is_file() {
            let bytes = std::fs::read(&spiece).map_err(|e| EngineError::io(&spiece, e))?;
            super::sentencepiece::t5_tokenizer(&bytes)
                .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", spiece.display())))?
        } else {
            return Err(EngineError::io(
                &json,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no T5 tokenizer here (tokenizer.json or spiece.model)",
                ),
            ));
        };
        Self::new(tokenizer, IF_MAX_LENGTH)
    }

    /// Wraps a `tokenizers` tokenizer: `max_length` tokens per prompt, padded with `<pad>`.
    pub fn new(mut tokenizer: Tokenizer, max_length: usize) -> Result<Self> {
        let pad_id = tokenizer.token_to_id("<pad>").ok_or_else(|| {
            EngineError::Tokenizer("the T5 vocabulary has no `<pad>` token".into())
        })?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| EngineError::Tokenizer(format!("truncation: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_id,
            pad_token: "<pad>".into(),
            ..Default::default()
        }));
        Ok(Self {
            tokenizer,
            max_length,
        })
    }

    /// IF's `_text_preprocessing` without caption cleaning: lower-case, strip.
    pub fn preprocess(prompt: &str) -> String {
        prompt.to_lowercase().trim().to_string()
    }

    /// Tokenizes prompts as `IFPipeline.encode_prompt` does (after [`Self::preprocess`]).
    pub fn encode(&self, prompts: &[&str]) -> Result<T5Tokens> {
        let mut out = T5Tokens {
            input_ids: Vec::with_capacity(prompts.len()),
            attention_mask: Vec::with_capacity(prompts.len()),
            dropped: Vec::with_capacity(prompts.len()),
            max_length: self.max_length,
        };
        for prompt in prompts {
            let text = Self::preprocess(prompt);
            let encoding = self
                .tokenizer
                .encode(text.as_str(), true)
                .map_err(|e| EngineError::Tokenizer(format!("encoding {prompt:?}: {e}")))?;
            // The overflow comes back as further (padded, `</s>`-closed) encodings: count their
            // real tokens.
            out.dropped.push(
                encoding
                    .get_overflowing()
                    .iter()
                    .map(|o| {
                        o.get_attention_mask()
                            .iter()
                            .zip(o.get_special_tokens_mask())
                            .filter(|&(&attended, &special)| attended == 1 && special == 0)
                            .count()
                    })
                    .sum(),
            );
            out.input_ids.push(encoding.get_ids().to_vec());
            out.attention_mask
                .push(encoding.get_attention_mask().to_vec());
        }
        Ok(out)
    }
}
