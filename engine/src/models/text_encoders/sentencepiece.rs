//! SentencePiece `.model` files (a protobuf `ModelProto`) read without the C++ library: the
//! pieces, their scores and types, the unknown id and the normaliser's precompiled charsmap,
//! turned into a `tokenizers` Unigram tokenizer as transformers' `T5Converter` builds it
//! (precompiled normalisation, runs of spaces collapsed, `▁` metaspace, `</s>` appended, the
//! 100 `<extra_id_N>` tokens after the pieces, numbered downwards).

use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::precompiled::Precompiled;
use tokenizers::normalizers::replace::{Replace, ReplacePattern};
use tokenizers::normalizers::{NormalizerWrapper, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// A piece's type in the model (`SentencePiece.Type`).
const TYPE_UNKNOWN: u64 = 2;
const TYPE_CONTROL: u64 = 3;
/// T5's extra ids (`T5Tokenizer(extra_ids=100)`).
const EXTRA_IDS: usize = 100;

/// What a T5 tokenizer needs from a `ModelProto`.
#[derive(Debug, Clone, Default)]
pub struct SentencePieceModel {
    /// `(piece, score, type)`.
    pub pieces: Vec<(String, f32, u64)>,
    /// `NormalizerSpec.precompiled_charsmap`.
    pub precompiled_charsmap: Vec<u8>,
    /// `TrainerSpec.unk_id` (protobuf default 0).
    pub unk_id: usize,
    /// `TrainerSpec.model_type`: 1 = Unigram (the default), 2 = BPE.
    pub model_type: u64,
}

/// A protobuf reader over one message's bytes.
struct Wire<'a> {
    bytes: &'a [u8],
    at: usize,
}

enum Field<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
    Other,
}

impl<'a> Wire<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.at)
                .ok_or("truncated varint in the SentencePiece model")?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or("a field runs past the end of the SentencePiece model")?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    /// The next `(field number, value)`, or `None` at the end.
    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, String> {
        if self.at >= self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Other
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|e| e.to_string())?;
                Field::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Field::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            wire => {
                return Err(format!(
                    "protobuf wire type {wire} is not used by SentencePiece"
                ));
            }
        };
        Ok(Some((key >> 3, field)))
    }
}

/// Parses a SentencePiece `.model`.
pub fn parse_model(bytes: &[u8]) -> Result<SentencePieceModel, String> {
    let mut model = SentencePieceModel {
        model_type: 1,
        ..Default::default()
    };
    let mut wire = Wire::new(bytes);
    while let Some((number, field)) = wire.next()? {
        match (number, field) {
            // repeated SentencePiece pieces = 1 { piece = 1; score = 2; type = 3 }
            (1, Field::Bytes(message)) => {
                let (mut piece, mut score, mut kind) = (String::new(), 0f32, 1u64);
                let mut inner = Wire::new(message);
                while let Some((n, f)) = inner.next()? {
                    match (n, f) {
                        (1, Field::Bytes(b)) => {
                            piece = String::from_utf8(b.to_vec()).map_err(|e| e.to_string())?;
                        }
                        (2, Field::Fixed32(bits)) => score = f32::from_bits(bits),
                        (3, Field::Varint(v)) => kind = v,
                        _ => {}
                    }
                }
                model.pieces.push((piece, score, kind));
            }
            // TrainerSpec trainer_spec = 2 { model_type = 3; unk_id = 40 }
            (2, Field::Bytes(message)) => {
                let mut inner = Wire::new(message);
                while let Some((n, f)) = inner.next()? {
                    match (n, f) {
                        (3, Field::Varint(v)) => model.model_type = v,
                        (40, Field::Varint(v)) => {
                            model.unk_id = usize::try_from(v).map_err(|e| e.to_string())?;
                        }
                        _ => {}
                    }
                }
            }
            // NormalizerSpec normalizer_spec = 3 { precompiled_charsmap = 2 }
            (3, Field::Bytes(message)) => {
                let mut inner = Wire::new(message);
                while let Some((n, f)) = inner.next()? {
                    if let (2, Field::Bytes(b)) = (n, f) {
                        model.precompiled_charsmap = b.to_vec();
                    }
                }
            }
            _ => {}
        }
    }
    if model.pieces.is_empty() {
        return Err("no pieces: not a SentencePiece model".into());
    }
    if model.unk_id >= model.pieces.len() {
        return Err(format!("unk_id {} is not a piece", model.unk_id));
    }
    Ok(model)
}

/// T5's tokenizer from its `spiece.model` (transformers' `T5Converter`).
pub fn t5_tokenizer(bytes: &[u8]) -> Result<Tokenizer, String> {
    let model = parse_model(bytes)?;
    if model.model_type != 1 {
        return Err(format!(
            "model_type {} is not Unigram (T5's SentencePiece models are)",
            model.model_type
        ));
    }
    let mut vocab: Vec<(String, f64)> = model
        .pieces
        .iter()
        .map(|(piece, score, _)| (piece.clone(), f64::from(*score)))
        .collect();
    vocab.extend(
        (0..EXTRA_IDS)
            .rev()
            .map(|i| (format!("<extra_id_{i}>"), 0.0)),
    );
    let unigram = Unigram::from(vocab, Some(model.unk_id), false).map_err(|e| e.to_string())?;
    let mut tokenizer = Tokenizer::new(unigram);
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if !model.precompiled_charsmap.is_empty() {
        let precompiled =
            Precompiled::from(&model.precompiled_charsmap).map_err(|e| e.to_string())?;
        normalizers.push(precompiled.into());
    }
    let spaces =
        Replace::new(ReplacePattern::Regex(" {2,}".into()), " ").map_err(|e| e.to_string())?;
    normalizers.push(spaces.into());
    tokenizer.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
    tokenizer.with_decoder(Some(MetaspaceDecoder::new(
        '▁',
        PrependScheme::Always,
        true,
    )));
    let eos = "</s>";
    let eos_id = tokenizer
        .token_to_id(eos)
        .ok_or("the model has no `</s>` piece")?;
    let post = TemplateProcessing::builder()
        .try_single(format!("$A {eos}"))
        .map_err(|e| e.to_string())?
        .special_tokens(vec![(eos, eos_id)])
        .build()
        .map_err(|e| e.to_string())?;
    tokenizer.with_post_processor(Some(post));
    // Control and unknown pieces, and the extra ids, are matched whole in the text.
    let specials: Vec<AddedToken> = model
        .pieces
        .iter()
        .filter(|(_, _, kind)| matches!(*kind, TYPE_UNKNOWN | TYPE_CONTROL))
        .map(|(piece, _, _)| piece.clone())
        .chain((0..EXTRA_IDS).rev().map(|i| format!("<extra_id_{i}>")))
        .map(|t| AddedToken::from(t, true))
        .collect();
    tokenizer.add_special_tokens(&specials);
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        assert!(parse_model(&[]).unwrap_err().contains("no pieces"));
        assert!(parse_model(&[0xff]).is_err(), "truncated varint");
        // Field 1, length 200, but only 2 bytes follow.
        assert!(parse_model(&[0x0a, 0xc8, 0x01, 0x41, 0x42]).is_err());
        // Wire type 3 (groups) is not SentencePiece's.
        assert!(parse_model(&[0x0b]).is_err());
        // One piece "a" (score 0, normal): parses, but T5 needs `</s>`.
        let bytes = [0x0a, 0x03, 0x0a, 0x01, b'a'];
        assert_eq!(parse_model(&bytes).map(|m| m.pieces.len()), Ok(1));
        assert!(t5_tokenizer(&bytes).unwrap_err().contains("</s>"));
    }
}
