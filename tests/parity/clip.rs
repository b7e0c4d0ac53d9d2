//! Parity tests for the CLIP tokenizer and text encoder against transformers, on the CPU backend.
//!
//! Fixtures: `tests/fixtures/tiny-sd/` (real CLIP vocabulary, tiny random `CLIPTextModel`) and
//! `tests/fixtures/refs/clip.{json,safetensors}` (transformers' ids and `last_hidden_state`),
//! both made by `tests/fixtures/*.py`.

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::backend::flex::FlexDevice;
use burn::tensor::{Int, Tensor, TensorData};
use engine::EngineError;
use engine::models::text_encoders::clip::{CLIPTextConfig, CLIPTextModel, HiddenAct};
use engine::models::text_encoders::clip_tokenizer::CLIPTokenizer;
use safetensors::SafeTensors;

type B = Flex;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn tiny_sd() -> PathBuf {
    fixtures().join("tiny-sd")
}

fn tokenizer() -> CLIPTokenizer {
    CLIPTokenizer::load(&tiny_sd().join("tokenizer")).expect("load the fixture tokenizer")
}

/// A fresh scratch folder under the system temp dir.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("brushfire-clip-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// transformers 5.24's `CLIPTokenizer.from_pretrained("tests/fixtures/tiny-sd/tokenizer")(prompt)
/// .input_ids` (no padding, no truncation).
const TRANSFORMERS_IDS: &[(&str, &[u32])] = &[
    (
        "ghibli style, a fantasy landscape with castles",
        &[49406, 40555, 1844, 267, 320, 5267, 5727, 593, 24766, 49407],
    ),
    ("", &[49406, 49407]),
    (
        "  Héllo   WORLD!!  it's 2024 — naïve café 東京 ",
        &[
            49406, 71, 3459, 19293, 1002, 748, 585, 568, 273, 271, 273, 275, 2005, 1097, 35689,
            563, 15304, 48338, 21078, 361, 49407,
        ],
    ),
    (
        "don't can't I'VE",
        &[49406, 847, 713, 753, 713, 328, 1200, 49407],
    ),
    (
        "tab\tnew\nline\u{a0}nbsp",
        &[49406, 14724, 686, 1148, 6459, 4393, 49407],
    ),
    ("e\u{301} NFD", &[49406, 4166, 77, 11525, 49407]),
    ("🔥 emoji ½", &[49406, 3016, 16327, 33613, 49407]),
    ("xxxxxxxxxx", &[49406, 32035, 5675, 22819, 49407]),
    // Markers in the text: bos is matched after lower-casing, eos only verbatim; an unmatched
    // marker is one pre-token that BPE splits.
    (
        "a<|endoftext|>b <|STARTOFTEXT|>",
        &[49406, 320, 49407, 321, 49406, 49407],
    ),
    (
        "a <|endoftext|><|endoftext|>",
        &[49406, 320, 49407, 49407, 49407],
    ),
    (
        "a<|ENDOFTEXT|>b",
        &[49406, 320, 27, 347, 40786, 4160, 91, 285, 321, 49407],
    ),
    (
        "x <|EndOfText|> y <|startoftext|>z",
        &[
            49406, 343, 27, 347, 40786, 4160, 91, 285, 344, 49406, 345, 49407,
        ],
    ),
];

fn assert_matches_transformers(tokenizer: &CLIPTokenizer) {
    assert_eq!(tokenizer.model_max_length(), 77);
    assert_eq!(tokenizer.pad_token_id(), 49407);
    let prompts: Vec<&str> = TRANSFORMERS_IDS.iter().map(|(p, _)| *p).collect();
    let encoded = tokenizer.encode(&prompts).expect("encode");
    assert_eq!(encoded.max_length, 77);
    assert!(!encoded.any_truncated());
    for ((prompt, expected), ids) in TRANSFORMERS_IDS.iter().zip(&encoded.input_ids) {
        let mut padded = expected.to_vec();
        padded.resize(77, 49407);
        assert_eq!(ids, &padded, "{prompt:?}");
    }
}

#[test]
fn tokenizer_matches_transformers_on_tricky_prompts() {
    assert_matches_transformers(&tokenizer());
}

#[test]
fn tokenizer_json_is_used_when_present() {
    let src = tiny_sd().join("tokenizer");
    let dir = scratch_dir("tokenizer-json");
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(src.join(file), dir.join(file)).expect("copy");
    }
    tokenizer()
        .tokenizer()
        .save(dir.join("tokenizer.json"), false)
        .expect("save tokenizer.json");
    // No vocab.json / merges.txt: only tokenizer.json can have been read.
    assert_matches_transformers(&CLIPTokenizer::load(&dir).expect("load"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Checks a `tokenizer/` folder saved by transformers (with its `tokenizer.json`). Run with
/// `python -c "from transformers import CLIPTokenizer as T; T.from_pretrained('tests/fixtures/tiny-sd/tokenizer').save_pretrained('/tmp/hf_tok')"`
/// then `CLIP_TOKENIZER_DIR=/tmp/hf_tok cargo test --workspace --test clip -- --ignored`.
#[test]
#[ignore = "needs CLIP_TOKENIZER_DIR: a tokenizer folder saved by transformers"]
fn transformers_tokenizer_json_matches() {
    let dir = std::env::var("CLIP_TOKENIZER_DIR").expect("CLIP_TOKENIZER_DIR");
    assert_matches_transformers(&CLIPTokenizer::load(Path::new(&dir)).expect("load"));
}

/// The `tokenizer.json` transformers 5 saves (`tiny-sd-current`, no vocab.json/merges.txt)
/// tokenizes as transformers does.
#[test]
fn the_current_layouts_tokenizer_json_matches() {
    let dir = crate::common::fixture("tiny-sd-current/tokenizer");
    assert!(!dir.join("vocab.json").exists());
    assert_matches_transformers(&CLIPTokenizer::load(&dir).expect("load"));
}

/// A prompt of a megabyte (pasted by accident) keeps bos, 75 tokens and eos, and says what it
/// dropped; it does not take the tokenizer minutes.
#[test]
fn a_megabyte_prompt_keeps_77_tokens() {
    let tokenizer = tokenizer();
    let huge = "a castle on a hill, ".repeat(1 << 16);
    assert!(huge.len() > 1 << 20);
    let start = std::time::Instant::now();
    let encoded = tokenizer.encode(&[&huge]).expect("encode");
    eprintln!(
        "1 MB prompt tokenized in {:.2} s",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(encoded.input_ids[0].len(), 77);
    assert_eq!(encoded.input_ids[0][76], 49407);
    let dropped = encoded.truncated[0].as_deref().expect("truncated");
    // Everything after the 75th token: 6 tokens a phrase, 2¹⁶ phrases.
    assert!(
        dropped.starts_with("a hill , a castle on a hill"),
        "{}",
        &dropped[..40]
    );
    assert!(
        dropped.len() > huge.len() * 9 / 10,
        "{} of {}",
        dropped.len(),
        huge.len()
    );
}

#[test]
fn long_prompt_is_truncated_to_bos_75_tokens_eos() {
    let tokenizer = tokenizer();
    let long = "a castle ".repeat(50); // 100 tokens
    let encoded = tokenizer.encode(&[&long, "short"]).expect("encode");
    // transformers: `batch_decode(untruncated_ids[:, 76:-1])`, the last 25 of 100 tokens.
    let removed = format!("castle{}", " a castle".repeat(12));
    assert_eq!(encoded.truncated, vec![Some(removed), None]);
    let ids = &encoded.input_ids[0];
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], 49406);
    assert_eq!(ids[76], 49407);
    assert!(ids[1..76].iter().all(|&id| id != 49407));
    let kept = tokenizer.decode(&ids[1..76]).expect("decode");
    assert!(kept.starts_with("a castle a castle"), "{kept}");
}

#[test]
fn tokenizer_from_vocab_and_merges_without_configs() {
    let dir = tiny_sd().join("tokenizer");
    let tokenizer =
        CLIPTokenizer::from_vocab_and_merges(&dir.join("vocab.json"), &dir.join("merges.txt"))
            .expect("build");
    let encoded = tokenizer.encode(&["a photo of a cat"]).expect("encode");
    assert_eq!(encoded.input_ids[0][0], 49406);
    assert_eq!(encoded.input_ids[0][77 - 1], 49407);
}

#[test]
fn sd2_style_pad_token_pads_with_bang() {
    let src = tiny_sd().join("tokenizer");
    let dir = scratch_dir("sd2-tokenizer");
    for file in ["vocab.json", "merges.txt", "special_tokens_map.json"] {
        std::fs::copy(src.join(file), dir.join(file)).expect("copy");
    }
    // stabilityai/stable-diffusion-2-1's tokenizer_config.json pads with "!".
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"model_max_length": 77, "pad_token": {"__type": "AddedToken", "content": "!",
            "lstrip": false, "normalized": true, "rstrip": false, "single_word": false}}"#,
    )
    .expect("write config");
    // special_tokens_map.json (copied from SD 1.5) says "<|endoftext|>" and wins, as in
    // transformers; rewrite it the way SD 2 ships it.
    std::fs::write(
        dir.join("special_tokens_map.json"),
        r#"{"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
            "unk_token": "<|endoftext|>"}"#,
    )
    .expect("write map");
    let tokenizer = CLIPTokenizer::load(&dir).expect("load");
    assert_eq!(tokenizer.pad_token_id(), 0);
    let ids = &tokenizer.encode(&["a cat"]).expect("encode").input_ids[0];
    assert_eq!(&ids[..4], &[49406, 320, 2368, 49407]);
    assert!(ids[4..].iter().all(|&id| id == 0));
    // transformers matches the pad token "!" whole, so "!!" is two pad ids, not BPE's "!!".
    let ids = &tokenizer.encode(&["wow!! yes!"]).expect("encode").input_ids[0];
    assert_eq!(&ids[..8], &[49406, 2781, 0, 0, 1958, 0, 49407, 0]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_tokenizer_file_is_named_in_the_error() {
    let dir = scratch_dir("no-vocab");
    std::fs::copy(
        tiny_sd().join("tokenizer/merges.txt"),
        dir.join("merges.txt"),
    )
    .expect("copy");
    let error = CLIPTokenizer::load(&dir).expect_err("vocab.json is missing");
    assert!(matches!(error, EngineError::Tokenizer(_)), "{error:?}");
    assert!(error.to_string().contains("vocab.json"), "{error}");

    std::fs::write(dir.join("vocab.json"), "[1, 2]").expect("write");
    let error = CLIPTokenizer::load(&dir).expect_err("vocab.json is not an object");
    assert!(error.to_string().contains("vocab.json"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_reads_transformers_keys_with_defaults() {
    let config =
        CLIPTextConfig::from_file(&tiny_sd().join("text_encoder/config.json")).expect("config");
    assert_eq!(config.hidden_size, 16);
    assert_eq!(config.intermediate_size, 37);
    assert_eq!(config.num_hidden_layers, 2);
    assert_eq!(config.num_attention_heads, 4);
    assert_eq!(config.hidden_act, HiddenAct::QuickGelu);
    assert!(config.extra.contains_key("architectures"));

    let defaults: CLIPTextConfig =
        serde_json::from_str(r#"{"hidden_act": "gelu"}"#).expect("parse");
    assert_eq!(defaults.hidden_size, 512);
    assert_eq!(defaults.intermediate_size, 2048);
    assert_eq!(defaults.max_position_embeddings, 77);
    assert_eq!(defaults.hidden_act, HiddenAct::Gelu);
    assert_eq!(defaults.layer_norm_eps, 1e-5);
}

fn read_f32(tensors: &SafeTensors<'_>, name: &str) -> (Vec<f32>, Vec<usize>) {
    let view = tensors.tensor(name).expect(name);
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    let values = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (values, view.shape().to_vec())
}

fn read_i64(tensors: &SafeTensors<'_>, name: &str) -> (Vec<i64>, Vec<usize>) {
    let view = tensors.tensor(name).expect(name);
    assert_eq!(view.dtype(), safetensors::Dtype::I64, "{name}");
    let values = view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect();
    (values, view.shape().to_vec())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn reference_prompts() -> Vec<String> {
    let text = std::fs::read_to_string(fixtures().join("refs/clip.json")).expect("refs/clip.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("clip.json");
    let prompts = json.get("prompts").unwrap_or(&json);
    prompts
        .as_array()
        .expect("prompts array")
        .iter()
        .map(|p| p.as_str().expect("prompt string").to_owned())
        .collect()
}

#[test]
fn tokenizer_and_text_encoder_match_transformers_references() {
    let refs_bytes = std::fs::read(fixtures().join("refs/clip.safetensors")).expect("refs");
    let refs = SafeTensors::deserialize(&refs_bytes).expect("parse refs");
    let (ref_ids, ids_shape) = read_i64(&refs, "input_ids");
    let (ref_hidden, hidden_shape) = read_f32(&refs, "last_hidden_state");

    let prompts = reference_prompts();
    assert_eq!(ids_shape, vec![prompts.len(), 77]);
    let prompt_refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let encoded = tokenizer().encode(&prompt_refs).expect("encode");
    let ours: Vec<i64> = encoded
        .input_ids
        .iter()
        .flatten()
        .map(|&id| i64::from(id))
        .collect();
    for (row, prompt) in prompts.iter().enumerate() {
        assert_eq!(
            &ours[row * 77..(row + 1) * 77],
            &ref_ids[row * 77..(row + 1) * 77],
            "ids of {prompt:?}"
        );
    }
    // diffusers' warning: `tokenizer.batch_decode(untruncated_ids[:, 76:-1])`.
    assert_eq!(
        encoded.truncated[3].as_deref(),
        Some("painting by a renaissance master")
    );
    assert!(encoded.truncated[..3].iter().all(Option::is_none));

    let device = FlexDevice;
    let model = CLIPTextModel::<B>::load(&tiny_sd().join("text_encoder"), &device).expect("load");
    // Feed transformers' own ids so the encoder is checked independently of the tokenizer.
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ref_ids.clone(), [ids_shape[0], ids_shape[1]]),
        &device,
    );
    let output = model.forward(ids).expect("forward");
    assert_eq!(output.last_hidden_state.dims().to_vec(), hidden_shape);
    assert_eq!(output.hidden_states.len(), 3);

    let (ref_pooled, _) = read_f32(&refs, "pooler_output");
    let pooled = output
        .pooler_output
        .clone()
        .into_data()
        .to_vec::<f32>()
        .expect("f32");
    let diff = max_abs_diff(&pooled, &ref_pooled);
    assert!(diff < 1e-4, "pooler_output differs by {diff}");

    // Clip-skip 0 as diffusers computes it: final_layer_norm(hidden_states[-1]).
    let last_state = output.hidden_states.last().cloned().expect("states");
    let renormed = model
        .text_model
        .final_layer_norm
        .forward(last_state)
        .into_data()
        .to_vec::<f32>()
        .expect("f32");
    let ours = output
        .last_hidden_state
        .into_data()
        .to_vec::<f32>()
        .expect("f32");
    let diff = max_abs_diff(&ours, &ref_hidden);
    assert!(diff < 1e-4, "last_hidden_state differs by {diff}");
    assert_eq!(renormed, ours);
    eprintln!("last_hidden_state max |diff| = {diff:e}");

    // Same result through our tokenizer's tensor.
    let output = model
        .forward(encoded.to_tensor::<B>(&device))
        .expect("forward");
    let ours = output
        .last_hidden_state
        .into_data()
        .to_vec::<f32>()
        .expect("f32");
    assert!(max_abs_diff(&ours, &ref_hidden) < 1e-4);
}

/// Writes a copy of the fixture text encoder whose safetensors file went through `edit`.
fn edited_text_encoder(name: &str, edit: impl Fn(&str, &[usize]) -> Option<Vec<usize>>) -> PathBuf {
    let src = tiny_sd().join("text_encoder");
    let dir = scratch_dir(name);
    std::fs::copy(src.join("config.json"), dir.join("config.json")).expect("copy config");
    let bytes = std::fs::read(src.join("model.safetensors")).expect("read weights");
    let tensors = SafeTensors::deserialize(&bytes).expect("parse weights");
    let mut kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = Vec::new();
    let mut owned: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = Vec::new();
    for (key, view) in tensors.tensors() {
        match edit(&key, view.shape()) {
            None => {}
            Some(shape) if shape == view.shape() => kept.push((key, view)),
            Some(shape) => {
                let elem = view.data().len() / view.shape().iter().product::<usize>();
                let len = shape.iter().product::<usize>() * elem;
                owned.push((key, vec![0; len], shape, view.dtype()));
            }
        }
    }
    for (key, data, shape, dtype) in &owned {
        let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).expect("view");
        kept.push((key.clone(), view));
    }
    safetensors::serialize_to_file(kept, None, &dir.join("model.safetensors")).expect("write");
    dir
}

#[test]
fn missing_tensor_is_an_error_naming_the_key_and_file() {
    let device = FlexDevice;
    for removed in [
        "text_model.encoder.layers.1.mlp.fc2.weight",
        "text_model.encoder.layers.0.self_attn.k_proj.bias",
        "text_model.final_layer_norm.weight",
        "text_model.embeddings.token_embedding.weight",
    ] {
        let dir = edited_text_encoder("missing", |key, shape| {
            (key != removed).then(|| shape.to_vec())
        });
        let error = CLIPTextModel::<B>::load(&dir, &device).expect_err("a tensor is missing");
        match &error {
            EngineError::MissingTensor { key, file } => {
                assert_eq!(key, removed);
                assert_eq!(file, &dir.join("model.safetensors"));
            }
            other => panic!("expected MissingTensor for {removed}, got {other:?}"),
        }
        assert!(error.to_string().contains(removed), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn mis_shaped_tensor_is_an_error_in_the_files_layout() {
    let device = FlexDevice;
    let target = "text_model.encoder.layers.0.mlp.fc1.weight"; // [intermediate, hidden]
    let config =
        CLIPTextConfig::from_file(&tiny_sd().join("text_encoder/config.json")).expect("config");
    let (out_features, in_features) = (config.intermediate_size, config.hidden_size);
    let dir = edited_text_encoder("shape", |key, shape| {
        Some(if key == target {
            vec![out_features - 1, in_features]
        } else {
            shape.to_vec()
        })
    });
    let error = CLIPTextModel::<B>::load(&dir, &device).expect_err("wrong shape");
    match error {
        EngineError::ShapeMismatch {
            key,
            expected,
            found,
            ..
        } => {
            assert_eq!(key, target);
            assert_eq!(expected, vec![out_features, in_features]);
            assert_eq!(found, vec![out_features - 1, in_features]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn random_weight_model_runs_and_pools_at_eos() {
    let device = FlexDevice;
    let config: CLIPTextConfig = serde_json::from_str(
        r#"{"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 49408}"#,
    )
    .expect("config");
    let model = config.init::<B>(&device);
    let encoded = tokenizer().encode(&["a cat", ""]).expect("encode");
    let output = model
        .forward(encoded.to_tensor::<B>(&device))
        .expect("forward");
    assert_eq!(output.last_hidden_state.dims(), [2, 77, 16]);
    assert_eq!(output.pooler_output.dims(), [2, 16]);
    // Row 0's eos is at position 3, row 1's at position 1.
    let hidden = output.last_hidden_state.clone();
    for (row, eos) in [(0usize, 3usize), (1, 1)] {
        let expected = hidden
            .clone()
            .slice([row..row + 1, eos..eos + 1, 0..16])
            .reshape([16])
            .into_data()
            .to_vec::<f32>()
            .expect("f32");
        let pooled = output
            .pooler_output
            .clone()
            .slice([row..row + 1, 0..16])
            .reshape([16])
            .into_data()
            .to_vec::<f32>()
            .expect("f32");
        assert_eq!(expected, pooled);
    }
    assert!(
        model
            .forward(Tensor::<B, 2, Int>::zeros([1, 78], &device))
            .is_err(),
        "more positions than the model has"
    );
}
