//! Model folders as people have them: SD 1.5's own layout (`tiny-sd`: a `text_model.`-prefixed
//! CLIP with `position_ids`, `vocab.json` + `merges.txt`) and the one today's libraries write
//! (`tiny-sd-current`, `gen_current_layout.py`: transformers 5's unprefixed CLIP in shards,
//! `tokenizer.json`, diffusers' sharded UNet with an `fp16` variant). Both load and give the same
//! images; pickle-only folders are refused without being opened.

use std::path::{Path, PathBuf};

use crate::common::{Cpu, assert_close, fixture};
use engine::pipelines::stable_diffusion::{LoadOptions, StableDiffusionPipeline};
use engine::pipelines::{CancelToken, CommonRequest, GenerationRequest, StepProgress, Task};
use engine::tensor_io::HostTensor;

fn load(folder: &Path, variant: Option<&str>) -> StableDiffusionPipeline<Cpu> {
    let options = LoadOptions {
        variant: variant.map(String::from),
        ..LoadOptions::default()
    };
    StableDiffusionPipeline::load(folder, &options, &Default::default())
        .unwrap_or_else(|e| panic!("{}: {e}", folder.display()))
}

fn images(pipe: &StableDiffusionPipeline<Cpu>) -> HostTensor {
    let request = GenerationRequest {
        common: CommonRequest {
            prompt: "a fox’s den, ghibli style".into(),
            negative_prompt: "blurry".into(),
            steps: 3,
            width: 64,
            height: 64,
            seed: 7,
            ..Default::default()
        },
        task: Task::Txt2Img,
    };
    pipe.generate(
        &request,
        None,
        &CancelToken::new(),
        &mut |_: &StepProgress| {},
    )
    .expect("generate")
    .images
}

/// The current layout is really the current one (so this test cannot pass on old files).
#[test]
fn the_current_fixture_has_todays_layout() {
    let dir = fixture("tiny-sd-current");
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("text_encoder/model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let keys: Vec<&String> = index["weight_map"].as_object().unwrap().keys().collect();
    assert!(
        keys.iter().all(|k| !k.starts_with("text_model.")),
        "{keys:?}"
    );
    assert!(keys.iter().all(|k| !k.contains("position_ids")), "{keys:?}");
    let config = std::fs::read_to_string(dir.join("text_encoder/config.json")).unwrap();
    assert!(config.contains("\"dtype\"") && !config.contains("torch_dtype"));
    assert!(dir.join("tokenizer/tokenizer.json").is_file());
    assert!(!dir.join("tokenizer/vocab.json").exists());
    assert!(
        !dir.join("unet/diffusion_pytorch_model.safetensors")
            .exists()
    );
    assert!(
        dir.join("unet/diffusion_pytorch_model.safetensors.index.fp16.json")
            .is_file()
    );
}

/// A folder saved by transformers 5 / diffusers 0.42 loads and gives the old layout's images to
/// within 1e-6 (the same weights, read through other names and files).
#[test]
fn a_folder_saved_by_todays_libraries_matches_the_old_layout() {
    let old = images(&load(&fixture("tiny-sd"), None));
    let current = images(&load(&fixture("tiny-sd-current"), None));
    assert_close(&current, &old, 1e-6, 0.0, "tiny-sd-current against tiny-sd");
}

/// The `fp16` variant's shards are what is read when asked for: close to the f32 weights'
/// images (f16 rounding of the weights), and not identical to them.
#[test]
fn the_fp16_variants_shards_load() {
    let full = images(&load(&fixture("tiny-sd-current"), None));
    let half = images(&load(&fixture("tiny-sd-current"), Some("fp16")));
    let differs = full.values.iter().zip(&half.values).any(|(a, b)| a != b);
    assert!(differs, "the fp16 shards were not read");
    assert_close(&half, &full, 2e-2, 2e-2, "fp16 variant against f32");
}

/// A copy of `tiny-sd` (its files linked) in a fresh folder, to break on purpose.
fn scratch_copy(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("brushfire-layout-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let source = fixture("tiny-sd");
    for entry in walk(&source) {
        let rel = entry.strip_prefix(&source).unwrap();
        let to = dir.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &to).unwrap();
    }
    dir
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Weights only in pickle files are refused, naming the file and the way to convert it; the
/// pickle is never opened (here it is not even a pickle).
#[test]
fn pickle_only_weights_are_refused_by_name() {
    for (component, stem) in [
        ("unet", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ] {
        let dir = scratch_copy(component);
        let folder = dir.join(component);
        std::fs::remove_file(folder.join(format!("{stem}.safetensors"))).unwrap();
        let pickle = if component == "text_encoder" {
            "pytorch_model.bin"
        } else {
            "diffusion_pytorch_model.bin"
        };
        std::fs::write(folder.join(pickle), b"not read").unwrap();
        let err = StableDiffusionPipeline::<Cpu>::load(
            &dir,
            &LoadOptions::default(),
            &Default::default(),
        )
        .expect_err("a pickle-only component")
        .to_string();
        for needle in [
            pickle,
            "pickle",
            "safetensors",
            "save_pretrained",
            component,
        ] {
            assert!(err.contains(needle), "`{needle}` not in: {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A `model_index.json` naming a pipeline Brushfire does not run is refused by name, as
/// diffusers refuses a class it does not know, instead of loading something else.
#[test]
fn an_unknown_pipeline_class_is_refused_by_name() {
    for class in ["StableDiffusionXLPipeline", "NoSuchPipeline"] {
        let dir = scratch_copy(class);
        let index = dir.join("model_index.json");
        let text = std::fs::read_to_string(&index)
            .unwrap()
            .replace("\"StableDiffusionPipeline\"", &format!("\"{class}\""));
        std::fs::write(&index, text).unwrap();
        let err = StableDiffusionPipeline::<Cpu>::load(
            &dir,
            &LoadOptions::default(),
            &Default::default(),
        )
        .expect_err("an unknown class")
        .to_string();
        assert!(
            err.contains(&format!("`{class}`")) && err.contains("model_index.json"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A shard index may only name files beside it: `../` or an absolute path is refused.
#[test]
fn a_shard_index_cannot_point_outside_its_folder() {
    use engine::models::weights::WeightFiles;
    let dir = scratch_copy("shard-escape");
    let unet = dir.join("unet");
    for shard in ["../vae/diffusion_pytorch_model.safetensors", "/etc/passwd"] {
        let index = serde_json::json!({ "weight_map": { "conv_in.weight": shard } });
        std::fs::write(
            unet.join("diffusion_pytorch_model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let err = WeightFiles::find(&unet, "diffusion_pytorch_model", None)
            .expect_err("an escaping shard")
            .to_string();
        assert!(
            err.contains(shard) && err.contains("not a file name"),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Broken weight files are refused with the file (and the tensor, where one is at fault) named,
/// never a panic: cut short, a header that claims more bytes than the file has, a header of
/// 200 MB, a tensor of the wrong shape or dtype, a single file of an unknown layout.
#[test]
fn broken_weight_files_are_refused_by_name() {
    use engine::tensor_io::read_safetensors;
    let dir = scratch_copy("broken-weights");
    let unet_file = dir.join("unet/diffusion_pytorch_model.safetensors");
    let original = std::fs::read(&unet_file).unwrap();
    let load = || {
        let loaded = std::panic::catch_unwind(|| {
            StableDiffusionPipeline::<Cpu>::load(&dir, &LoadOptions::default(), &Default::default())
                .map(drop)
        });
        loaded
            .expect("a broken file is an error, not a panic")
            .expect_err("a broken file is refused")
            .to_string()
    };
    let header_len = |claimed: u64| {
        let mut bytes = claimed.to_le_bytes().to_vec();
        bytes.extend(b"{}");
        bytes
    };
    for (what, bytes, needles) in [
        (
            "cut short",
            original[..original.len() / 2].to_vec(),
            vec!["diffusion_pytorch_model.safetensors"],
        ),
        (
            "a header longer than the file",
            header_len(1 << 20),
            vec!["diffusion_pytorch_model.safetensors", "header"],
        ),
        (
            "a 200 MB header",
            header_len(200 << 20),
            vec!["diffusion_pytorch_model.safetensors", "header of"],
        ),
    ] {
        std::fs::write(&unet_file, &bytes).unwrap();
        let err = load();
        for needle in needles {
            assert!(err.contains(needle), "{what}: `{needle}` not in: {err}");
        }
    }

    // The wrong shape, and the wrong dtype, for `conv_in.weight`.
    std::fs::write(&unet_file, &original).unwrap();
    let unet = read_safetensors(&unet_file).unwrap();
    let rewrite = |dtype: safetensors::Dtype, shape: Vec<usize>| {
        let raw: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = unet
            .iter()
            .map(|(name, t)| {
                if name == "conv_in.weight" {
                    let n: usize = shape.iter().product();
                    let width = if dtype == safetensors::Dtype::I64 {
                        8
                    } else {
                        4
                    };
                    (name.clone(), vec![0u8; n * width], shape.clone(), dtype)
                } else {
                    let bytes = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
                    (
                        name.clone(),
                        bytes,
                        t.shape.clone(),
                        safetensors::Dtype::F32,
                    )
                }
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = raw
            .iter()
            .map(|(n, d, s, t)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*t, s.clone(), d).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &unet_file).unwrap();
    };
    let shape = unet["conv_in.weight"].shape.clone();
    rewrite(safetensors::Dtype::F32, vec![shape[0], shape[1] + 1, 3, 3]);
    let err = load();
    assert!(
        err.contains("conv_in.weight") && err.contains("shape"),
        "{err}"
    );
    rewrite(safetensors::Dtype::I64, shape);
    let err = load();
    assert!(err.contains("conv_in.weight"), "wrong dtype: {err}");

    // A single file whose tensors are no Stable Diffusion layout Brushfire knows.
    let single = dir.join("mystery.safetensors");
    std::fs::copy(dir.join("vae/diffusion_pytorch_model.safetensors"), &single).unwrap();
    let err = StableDiffusionPipeline::<Cpu>::load_path(
        &single,
        &LoadOptions::default(),
        &Default::default(),
    )
    .map(drop)
    .expect_err("an unknown single-file layout")
    .to_string();
    assert!(
        err.contains("mystery.safetensors") && err.contains("not a Stable Diffusion"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
