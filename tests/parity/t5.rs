//! T5 (DeepFloyd IF's prompt encoder) against transformers: the tokenizer on IF's prompt
//! handling, the encoder's last hidden state, sharded weights, and bad input.

use burn::tensor::{Int, Tensor, TensorData};
use std::path::Path;

use engine::models::text_encoders::t5::{T5EncoderModel, relative_position_buckets};
use engine::models::text_encoders::t5_tokenizer::T5Tokenizer;
use engine::models::weights::WeightFiles;
use engine::tensor_io::HostTensor;

use crate::common::{Cpu, assert_close, fixture, host, refs};

fn ids(t: &HostTensor) -> Vec<Vec<u32>> {
    let len = t.shape[1];
    t.values
        .chunks(len)
        .map(|row| row.iter().map(|&v| v as u32).collect())
        .collect()
}

fn int_tensor(t: &HostTensor) -> Tensor<Cpu, 2, Int> {
    let values: Vec<i64> = t.values.iter().map(|&v| v as i64).collect();
    Tensor::from_data(
        TensorData::new(values, [t.shape[0], t.shape[1]]),
        &Default::default(),
    )
}

#[test]
fn t5_tokenizer_matches_transformers_on_if_prompts() {
    let r = refs("t5");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("refs/t5.json")).unwrap()).unwrap();
    let prompts: Vec<&str> = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let tokenizer = T5Tokenizer::load(&fixture("tiny-if/tokenizer")).expect("tokenizer");
    let tokens = tokenizer.encode(&prompts).expect("encode");
    assert_eq!(tokens.input_ids, ids(&r["input_ids"]));
    assert_eq!(tokens.attention_mask, ids(&r["attention_mask"]));
    // Prompt 3 is longer than 77 tokens: cut, ending in </s> (id 1).
    let cut: Vec<bool> = tokens.dropped.iter().map(|&n| n > 0).collect();
    assert_eq!(cut, vec![false, false, false, true, false]);
    assert_eq!(tokens.input_ids[3][76], 1);
    // What was cut, counted as transformers counts the untruncated prompt (76 kept + `</s>`).
    let dropped: Vec<usize> = meta["untruncated_lengths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n.as_u64().unwrap() as usize).saturating_sub(tokens.max_length))
        .collect();
    assert_eq!(tokens.dropped, dropped);
    assert!(dropped[3] > 0);
    for (given, expected) in prompts.iter().zip(meta["preprocessed"].as_array().unwrap()) {
        assert_eq!(T5Tokenizer::preprocess(given), expected.as_str().unwrap());
    }
    // IF's repos ship only `spiece.model`: read without sentencepiece's C++ library, it gives
    // the same ids (the fixture's spiece.model was checked against sentencepiece itself).
    let spiece = T5Tokenizer::load(&fixture("tiny-if/tokenizer-spiece")).expect("spiece.model");
    let from_spiece = spiece.encode(&prompts).expect("encode");
    assert_eq!(from_spiece.input_ids, ids(&r["input_ids"]));
    assert_eq!(from_spiece.attention_mask, ids(&r["attention_mask"]));
    // The extra ids are matched whole, as the tokenizer.json's added tokens are. (transformers'
    // Python wrapper also drops the `▁` before one: [3, 9, 32099, …]; the tokenizers library on
    // the same tokenizer.json keeps it, as we do. No image prompt contains these markers.)
    let marked = spiece.encode(&["a <extra_id_0> b"]).unwrap();
    assert_eq!(
        marked.input_ids,
        tokenizer.encode(&["a <extra_id_0> b"]).unwrap().input_ids
    );
    assert_eq!(marked.input_ids[0][..7], [3, 9, 3, 32099, 3, 115, 1]);
}

#[test]
fn t5_encoder_matches_transformers() {
    let r = refs("t5");
    let (model, config) =
        T5EncoderModel::<Cpu>::load(&fixture("tiny-if/text_encoder"), None, &Default::default())
            .expect("load t5");
    assert!(config.feed_forward().unwrap().1, "v1.1 is gated");
    let out = model
        .forward(
            int_tensor(&r["input_ids"]),
            int_tensor(&r["attention_mask"]),
        )
        .expect("forward");
    assert_close(
        &host(out),
        &r["last_hidden_state"],
        1e-4,
        1e-4,
        "t5 last_hidden_state",
    );
    // transformers' buckets are what the bias is looked up with (checked against the
    // fixture through the output above; here their range).
    let b = relative_position_buckets(77, 32, 128);
    assert!(b.iter().all(|&v| (0..32).contains(&v)));
}

/// Writes the tiny T5's weights into `dir` as two shards named by `shard` (given 1 or 2) with
/// the index `index`, beside its config.
fn write_t5_shards(dir: &Path, shard: impl Fn(usize) -> String, index: &str) {
    let src = fixture("tiny-if/text_encoder");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names: Vec<String> = tensors.names().into_iter().map(String::from).collect();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = shard(i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), tensors.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
    }
    std::fs::write(
        dir.join(index),
        serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
    )
    .unwrap();
}

fn check_t5_output(model: &T5EncoderModel<Cpu>, what: &str) {
    let r = refs("t5");
    let out = model
        .forward(
            int_tensor(&r["input_ids"]),
            int_tensor(&r["attention_mask"]),
        )
        .unwrap();
    assert_close(&host(out), &r["last_hidden_state"], 1e-4, 1e-4, what);
}

/// T5-XXL ships in shards: the same weights split across two files with an index load to the
/// same model.
#[test]
fn sharded_t5_weights_load_like_one_file() {
    let dir = std::env::temp_dir().join(format!("brushfire-t5-shards-{}", std::process::id()));
    write_t5_shards(
        &dir,
        |i| format!("model-0000{i}-of-00002.safetensors"),
        "model.safetensors.index.json",
    );
    let (model, _) = T5EncoderModel::<Cpu>::load(&dir, None, &Default::default()).expect("shards");
    check_t5_output(&model, "sharded");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// In f16 the `fp16` shards are read where the folder has them (DeepFloyd's T5 ships both: the
/// hub download in f16 fetches only these), else the default weights.
#[test]
fn t5_reads_the_variant_shards_when_asked() {
    let dir = std::env::temp_dir().join(format!("brushfire-t5-variant-{}", std::process::id()));
    let variant_shard = |i| format!("model.fp16-0000{i}-of-00002.safetensors");
    write_t5_shards(&dir, variant_shard, "model.safetensors.index.fp16.json");
    let WeightFiles { files, index } = WeightFiles::find(&dir, "model", Some("fp16")).unwrap();
    assert_eq!(files, [1, 2].map(|i| dir.join(variant_shard(i))));
    assert_eq!(index, Some(dir.join("model.safetensors.index.fp16.json")));
    let (model, _) =
        T5EncoderModel::<Cpu>::load(&dir, Some("fp16"), &Default::default()).expect("fp16 shards");
    check_t5_output(&model, "fp16 shards");
    // Without the variant only the default files count, and they are not there.
    let err = T5EncoderModel::<Cpu>::load(&dir, None, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    // A folder without the variant falls back to its default weights.
    let WeightFiles { files, index } =
        WeightFiles::find(&fixture("tiny-if/text_encoder"), "model", Some("fp16")).unwrap();
    assert_eq!(files, [fixture("tiny-if/text_encoder/model.safetensors")]);
    assert_eq!(index, None);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_t5_input_is_an_error() {
    let (model, _) =
        T5EncoderModel::<Cpu>::load(&fixture("tiny-if/text_encoder"), None, &Default::default())
            .unwrap();
    let device = Default::default();
    let ids = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(vec![5i64, 40000], [1, 2]), &device);
    let mask = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(vec![1i64, 1], [1, 2]), &device);
    let err = model.forward(ids.clone(), mask).unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");
    let short = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(vec![1i64], [1, 1]), &device);
    let err = model.forward(ids, short).unwrap_err();
    assert!(err.to_string().contains("attention_mask"), "{err}");
}
