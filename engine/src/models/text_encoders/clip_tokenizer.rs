//! CLIP's byte-level BPE tokenizer, as Stable Diffusion repos ship it in `tokenizer/`.
//!
//! Mirrors transformers' `models/clip/tokenization_clip_fast.py` (`CLIPTokenizerFast`, built by
//! `CLIPConverter` in `convert_slow_tokenizer.py`) and the prompt handling of diffusers'
//! `StableDiffusionPipeline.encode_prompt` (pad to `model_max_length`, truncate with a warning).
//!
//! A folder with `tokenizer.json` is loaded as is. Without one, the same tokenizer is built from
//! `vocab.json` + `merges.txt`: NFC, whitespace collapsed, lower-cased; CLIP's regex split then
//! byte-level mapping; BPE with the `</w>` end-of-word suffix; `<|startoftext|> … <|endoftext|>`
//! around every prompt. `tokenizer_config.json` and `special_tokens_map.json` give the pad token
//! and `model_max_length`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{EngineError, Result};

/// CLIP's beginning-of-text token.
pub const DEFAULT_BOS_TOKEN: &str = "<|startoftext|>";
/// CLIP's end-of-text token (also its unknown token and, in SD 1.x, its pad token).
pub const DEFAULT_EOS_TOKEN: &str = "<|endoftext|>";
/// The text encoder's context length in every Stable Diffusion release.
pub const DEFAULT_MODEL_MAX_LENGTH: usize = 77;

/// CLIP's word split (transformers 5's `CLIPTokenizer`, the slow tokenizer's `pat`): the two
/// markers whole, contractions, letter runs, single digits, runs of other non-space characters.
/// Whitespace between matches is dropped. (transformers 4's `CLIPConverter` lacked the markers;
/// they only matter for marker text not caught as an added token, such as `<|ENDOFTEXT|>`.)
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The slow tokenizer keeps only the first `49152 - 256 - 2` merges of `merges.txt`
/// (`tokenization_clip.py`); the fast one is converted from it, so we do the same.
const MAX_MERGES: usize = 49152 - 256 - 2;

/// `text` cut to its first `max_chars` characters, with how much was left out (a 1 MB prompt's
/// warning stays one readable line).
fn abbreviated(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        None => text.to_string(),
        Some((at, _)) => format!(
            "{}… ({} more characters)",
            &text[..at],
            text[at..].chars().count()
        ),
    }
}

/// Prompts turned into model input: one row of `max_length` ids per prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompts {
    /// Token ids, `[prompts.len()][max_length]`: bos, the prompt's tokens, eos, then padding.
    pub input_ids: Vec<Vec<u32>>,
    /// Per prompt: `Some(text cut off)` when it was longer than `max_length` tokens, as
    /// diffusers' warning shows it, else `None`.
    pub truncated: Vec<Option<String>>,
    /// Per prompt: how many of its tokens were dropped (0 when it fit).
    pub dropped: Vec<usize>,
    /// The padded length of every row (the tokenizer's `model_max_length`).
    pub max_length: usize,
}

impl TokenizedPrompts {
    /// Whether any prompt was truncated.
    pub fn any_truncated(&self) -> bool {
        self.truncated.iter().any(Option::is_some)
    }

    /// The ids as a tensor for the text encoder.
    ///
    /// # Shapes
    ///
    /// - output: `[batch, max_length]`
    pub fn to_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        let batch = self.input_ids.len();
        let flat: Vec<i64> = self
            .input_ids
            .iter()
            .flat_map(|row| row.iter().map(|&id| i64::from(id)))
            .collect();
        Tensor::from_data(TensorData::new(flat, [batch, self.max_length]), device)
    }
}

/// transformers' `CLIPTokenizer` (the fast, `tokenizers`-backed one diffusers loads).
#[derive(Debug, Clone)]
pub struct CLIPTokenizer {
    tokenizer: Tokenizer,
    bos_token_id: u32,
    eos_token_id: u32,
    pad_token_id: u32,
    model_max_length: usize,
}

/// Special tokens and length read from `tokenizer_config.json` / `special_tokens_map.json`.
#[derive(Debug, Clone)]
struct SpecialTokens {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
    /// Tokens matched after normalization (so `<|STARTOFTEXT|>` is bos too): those whose last
    /// mention, in the order bos, eos, unk, pad, is an `AddedToken` object saying
    /// `"normalized": true`. A token named by a plain string is matched in the raw text only,
    /// as transformers 5 does (SD 1.5's files make bos normalized and eos, via the plain-string
    /// pad token, not).
    normalized: Vec<String>,
    model_max_length: usize,
}

impl Default for SpecialTokens {
    fn default() -> Self {
        Self {
            bos: DEFAULT_BOS_TOKEN.to_owned(),
            eos: DEFAULT_EOS_TOKEN.to_owned(),
            unk: DEFAULT_EOS_TOKEN.to_owned(),
            // `tokenization_clip.py`: `pad_token="<|endoftext|>"  # hack to enable padding`.
            pad: DEFAULT_EOS_TOKEN.to_owned(),
            normalized: Vec::new(),
            model_max_length: DEFAULT_MODEL_MAX_LENGTH,
        }
    }
}

impl CLIPTokenizer {
    /// Loads a diffusers `tokenizer/` folder.
    ///
    /// Uses `tokenizer.json` when present, otherwise builds the tokenizer from `vocab.json` and
    /// `merges.txt`. `tokenizer_config.json` and `special_tokens_map.json` are optional; the
    /// latter wins where both name a token, as in transformers.
    pub fn load(dir: &Path) -> Result<Self> {
        let specials = read_special_tokens(dir)?;
        let tokenizer_json = dir.join("tokenizer.json");
        let tokenizer = if tokenizer_json.is_file() {
            let mut tokenizer = Tokenizer::from_file(&tokenizer_json)
                .map_err(|e| tokenizer_error(&tokenizer_json, e))?;
            // We pad and truncate ourselves (so we can report what was cut off); a file that
            // configures either must not do it a second time.
            tokenizer
                .with_truncation(None)
                .map_err(|e| tokenizer_error(&tokenizer_json, e))?;
            tokenizer.with_padding(None);
            tokenizer
        } else {
            build_from_vocab_and_merges(
                &dir.join("vocab.json"),
                &dir.join("merges.txt"),
                &specials,
            )?
        };
        Self::from_tokenizer(tokenizer, &specials, dir)
    }

    /// Builds the tokenizer from `vocab.json` and `merges.txt` alone, with CLIP's default special
    /// tokens and a `model_max_length` of 77.
    pub fn from_vocab_and_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        let specials = SpecialTokens::default();
        let tokenizer = build_from_vocab_and_merges(vocab, merges, &specials)?;
        let dir = vocab.parent().unwrap_or(vocab);
        Self::from_tokenizer(tokenizer, &specials, dir)
    }

    fn from_tokenizer(tokenizer: Tokenizer, specials: &SpecialTokens, dir: &Path) -> Result<Self> {
        let id = |token: &str, role: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                EngineError::Tokenizer(format!(
                    "{}: the {role} token {token:?} is not in the vocabulary",
                    dir.display()
                ))
            })
        };
        let bos_token_id = id(&specials.bos, "bos")?;
        let eos_token_id = id(&specials.eos, "eos")?;
        let pad_token_id = id(&specials.pad, "pad")?;
        if specials.model_max_length < 2 {
            return Err(EngineError::Tokenizer(format!(
                "{}: model_max_length {} leaves no room for bos and eos",
                dir.display(),
                specials.model_max_length
            )));
        }
        Ok(Self {
            tokenizer,
            bos_token_id,
            eos_token_id,
            pad_token_id,
            model_max_length: specials.model_max_length,
        })
    }

    /// The padded length of every encoded prompt (77 in Stable Diffusion).
    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }

    /// The id of `<|startoftext|>`.
    pub fn bos_token_id(&self) -> u32 {
        self.bos_token_id
    }

    /// The id of `<|endoftext|>`.
    pub fn eos_token_id(&self) -> u32 {
        self.eos_token_id
    }

    /// The id rows are padded with (`<|endoftext|>` = 49407 in SD 1.x, `!` = 0 in SD 2.x).
    pub fn pad_token_id(&self) -> u32 {
        self.pad_token_id
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Encodes prompts as transformers' `tokenizer(prompts, padding="max_length",
    /// max_length=model_max_length, truncation=True)` does.
    ///
    /// A prompt longer than `model_max_length` tokens (bos and eos included) keeps bos, its first
    /// `model_max_length - 2` tokens and eos; a warning names the prompt and the text cut off,
    /// like diffusers' `encode_prompt`.
    pub fn encode(&self, prompts: &[&str]) -> Result<TokenizedPrompts> {
        let max_length = self.model_max_length;
        let mut input_ids = Vec::with_capacity(prompts.len());
        let mut truncated = Vec::with_capacity(prompts.len());
        let mut dropped = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let encoding = self
                .tokenizer
                .encode(*prompt, true)
                .map_err(|e| EngineError::Tokenizer(format!("encoding {prompt:?}: {e}")))?;
            let mut ids = encoding.get_ids().to_vec();
            let mut cut = None;
            if ids.len() > max_length {
                // diffusers decodes `untruncated_ids[:, max_length - 1 : -1]`: the prompt tokens
                // beyond what fits, without the closing eos.
                let removed = &ids[max_length - 1..ids.len() - 1];
                let removed_text = self.decode_with(removed, false)?;
                // The pipelines tell the user (a note with the images, `prompt_notes`).
                tracing::debug!(
                    "{} tokens of the prompt were dropped because CLIP can only handle \
                     sequences up to {max_length} tokens: {}",
                    removed.len(),
                    abbreviated(&removed_text, 200)
                );
                let last = ids[ids.len() - 1];
                ids.truncate(max_length - 1);
                ids.push(last);
                cut = Some(removed_text);
            }
            dropped.push(encoding.get_ids().len().saturating_sub(max_length));
            ids.resize(max_length, self.pad_token_id);
            input_ids.push(ids);
            truncated.push(cut);
        }
        Ok(TokenizedPrompts {
            input_ids,
            truncated,
            dropped,
            max_length,
        })
    }

    /// Turns ids back into text, skipping special tokens (transformers' `decode` with
    /// `skip_special_tokens=True`; `</w>` becomes a space, as `CLIPTokenizerFast` does).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, true)
    }

    fn decode_with(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| EngineError::Tokenizer(format!("decoding {ids:?}: {e}")))?;
        Ok(text.replace("</w>", " ").trim().to_owned())
    }
}

fn tokenizer_error(path: &Path, error: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(format!("{}: {error}", path.display()))
}

/// Builds what `CLIPConverter.converted()` builds.
fn build_from_vocab_and_merges(
    vocab_path: &Path,
    merges_path: &Path,
    specials: &SpecialTokens,
) -> Result<Tokenizer> {
    let vocab = read_vocab(vocab_path)?;
    let merges = read_merges(merges_path)?;
    let id_of = |token: &str| {
        vocab.get(token).copied().ok_or_else(|| {
            tokenizer_error(
                vocab_path,
                format!("special token {token:?} is not in the vocabulary"),
            )
        })
    };
    let bos_id = id_of(&specials.bos)?;
    let eos_id = id_of(&specials.eos)?;
    id_of(&specials.unk)?;
    id_of(&specials.pad)?;

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_owned())
        .fuse_unk(false)
        .unk_token(specials.unk.clone())
        .build()
        .map_err(|e| {
            tokenizer_error(
                merges_path,
                format!("vocab.json and merges.txt do not make a BPE model: {e}"),
            )
        })?;

    let mut tokenizer = Tokenizer::new(bpe);
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".to_owned()), " ")
        .map_err(|e| EngineError::Tokenizer(format!("CLIP normalizer: {e}")))?;
    tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
        NFC.into(),
        whitespace.into(),
        Lowercase.into(),
    ])));
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_PATTERN.to_owned()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| EngineError::Tokenizer(format!("CLIP pre-tokenizer: {e}")))?;
    // Python's `pre_tokenizers.ByteLevel(add_prefix_space=False)`: trim_offsets and use_regex
    // keep their defaults (true).
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    // The converter's "hack to have a ByteLevel and TemplateProcessor": bos … eos.
    tokenizer.with_post_processor(Some(
        RobertaProcessing::new(
            (specials.eos.clone(), eos_id),
            (specials.bos.clone(), bos_id),
        )
        .add_prefix_space(false)
        .trim_offsets(false),
    ));
    // transformers registers every special token (pad included: SD 2's `!`) as an added token,
    // so each is matched whole before normalization and BPE.
    let mut added: Vec<AddedToken> = Vec::new();
    for token in [&specials.bos, &specials.eos, &specials.unk, &specials.pad] {
        if !added.iter().any(|t| &t.content == token) {
            let normalized = specials.normalized.contains(token);
            added.push(AddedToken::from(token.clone(), true).normalized(normalized));
        }
    }
    tokenizer.add_special_tokens(&added);
    Ok(tokenizer)
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| tokenizer_error(path, e))
}

fn read_vocab(path: &Path) -> Result<Vocab> {
    let text = read_text(path)?;
    let map: HashMap<String, u32> = serde_json::from_str(&text)
        .map_err(|e| tokenizer_error(path, format!("not a token → id JSON object: {e}")))?;
    Ok(map.into_iter().collect())
}

/// Reads `merges.txt`: an optional `#version` header, then one `left right` pair per line.
fn read_merges(path: &Path) -> Result<Merges> {
    let text = read_text(path)?;
    let mut merges = Merges::new();
    for (number, line) in text.trim().lines().enumerate() {
        if number == 0 && line.starts_with("#version") {
            continue;
        }
        if merges.len() == MAX_MERGES {
            break;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_owned(), b.to_owned()));
            }
            _ => {
                return Err(tokenizer_error(
                    path,
                    format!("line {}: expected two symbols, found {line:?}", number + 1),
                ));
            }
        }
    }
    if merges.is_empty() {
        return Err(tokenizer_error(path, "no merges"));
    }
    Ok(merges)
}

fn read_json(path: &Path) -> Result<Option<serde_json::Map<String, Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = read_text(path)?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(tokenizer_error(path, "expected a JSON object")),
        Err(e) => Err(tokenizer_error(path, format!("invalid JSON: {e}"))),
    }
}

/// A token given either as a string or as a serialized `AddedToken` (`{"content": …}`).
/// Also returns its `normalized` flag when the object gives one.
fn token_content(value: &Value) -> Option<(String, Option<bool>)> {
    match value {
        Value::String(s) => Some((s.clone(), None)),
        Value::Object(map) => {
            let content = map.get("content")?.as_str()?.to_owned();
            Some((content, map.get("normalized").and_then(Value::as_bool)))
        }
        _ => None,
    }
}

fn read_special_tokens(dir: &Path) -> Result<SpecialTokens> {
    let mut specials = SpecialTokens::default();
    let files: [PathBuf; 2] = [
        dir.join("tokenizer_config.json"),
        dir.join("special_tokens_map.json"),
    ];
    for path in &files {
        let Some(map) = read_json(path)? else {
            continue;
        };
        for (key, slot) in [
            ("bos_token", &mut specials.bos),
            ("eos_token", &mut specials.eos),
            ("unk_token", &mut specials.unk),
            ("pad_token", &mut specials.pad),
        ] {
            if let Some((token, normalized)) = map.get(key).and_then(token_content) {
                specials.normalized.retain(|t| t != &token);
                if normalized == Some(true) {
                    specials.normalized.push(token.clone());
                }
                *slot = token;
            }
        }
        if let Some(length) = map.get("model_max_length") {
            // transformers writes a huge sentinel (1e30) when the length is unknown; keep 77.
            match length.as_u64() {
                Some(n) if n <= 1 << 20 => specials.model_max_length = n as usize,
                Some(_) => {}
                None if length.is_f64() => {}
                None => {
                    return Err(tokenizer_error(
                        path,
                        format!("model_max_length must be an integer, found {length}"),
                    ));
                }
            }
        }
    }
    Ok(specials)
}
