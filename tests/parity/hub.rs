//! Hub ids resolve through the standard HF cache layout
//! (`$HF_HOME/hub/models--org--name/{refs/main, snapshots/<rev>/…}`), offline.

use std::path::{Path, PathBuf};

use engine::EngineError;
use engine::loading::hub::{
    Cache, ModelAvailability, ModelSource, RepoLayout, cached_snapshot, model_availability_in,
    resolve_in, resolve_model_in,
};
use engine::pipelines::stable_diffusion::{LoadOptions, StableDiffusionPipeline};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A fresh `$HF_HOME` (named by `tag`) whose hub cache holds `brushfire-test/<name>` at `main`,
/// a copy of the fixture folder `fixture_dir`: `(home, snapshot folder)`.
fn hf_home_with(tag: &str, name: &str, fixture_dir: &str) -> (PathBuf, PathBuf) {
    let home = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let repo = home.join(format!("hub/models--brushfire-test--{name}"));
    let rev = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    let snapshot = repo.join("snapshots").join(rev);
    copy_dir(&fixture(fixture_dir), &snapshot);
    (home, snapshot)
}

#[test]
fn hub_ids_resolve_from_the_hf_cache_offline() {
    let (home, snapshot) = hf_home_with("brushfire-hf-home", "tiny-sd", "tiny-sd");

    // Parsing the --model argument.
    assert_eq!(
        ModelSource::parse("brushfire-test/tiny-sd").unwrap(),
        ModelSource::Hub {
            repo_id: "brushfire-test/tiny-sd".into(),
            revision: None
        }
    );
    assert!(matches!(
        ModelSource::parse("no spaces/allowed here"),
        Err(EngineError::InvalidInput { field: "model", .. })
    ));

    // The cache holds every file: found without any network.
    let cache = Cache::new(home.join("hub"));
    assert_eq!(
        cached_snapshot(&cache, "brushfire-test/tiny-sd", None, None),
        Some(snapshot.clone())
    );
    // A variant is preferred but not required.
    assert_eq!(
        cached_snapshot(&cache, "brushfire-test/tiny-sd", None, Some("fp16")),
        Some(snapshot.clone())
    );

    // What the app checks before loading: cached, so no download offer.
    assert_eq!(
        model_availability_in(&cache, false, "brushfire-test/tiny-sd", None).unwrap(),
        ModelAvailability::Cached(snapshot.clone())
    );
    assert_eq!(
        model_availability_in(&cache, false, "brushfire-test/not-here", None).unwrap(),
        ModelAvailability::NeedsDownload {
            repo_id: "brushfire-test/not-here".into()
        }
    );
    assert_eq!(
        model_availability_in(&cache, true, "brushfire-test/not-here", None).unwrap(),
        ModelAvailability::Offline {
            repo_id: "brushfire-test/not-here".into()
        }
    );
    assert_eq!(
        model_availability_in(&cache, true, fixture("tiny-sd").to_str().unwrap(), None).unwrap(),
        ModelAvailability::Local(fixture("tiny-sd"))
    );

    // Offline, as the CLI runs with HF_HUB_OFFLINE=1 (the CLI test covers the environment).
    assert_eq!(
        resolve_model_in(&cache, true, "brushfire-test/tiny-sd", None, &mut ()).unwrap(),
        snapshot
    );

    // A cache missing a weights file is not complete: offline, that is a clear error.
    std::fs::remove_file(snapshot.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert_eq!(
        cached_snapshot(&cache, "brushfire-test/tiny-sd", None, None),
        None
    );
    let err = resolve_model_in(&cache, true, "brushfire-test/tiny-sd", None, &mut ()).unwrap_err();
    assert!(matches!(err, EngineError::Hub(_)), "{err}");
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");

    // A local folder wins over the hub.
    assert_eq!(
        resolve_model_in(
            &cache,
            true,
            fixture("tiny-sd").to_str().unwrap(),
            None,
            &mut ()
        )
        .unwrap(),
        fixture("tiny-sd")
    );
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn controlnet_hub_ids_resolve_to_a_single_model_snapshot() {
    let (home, snapshot) = hf_home_with("brushfire-hf-cn", "tiny-controlnet", "tiny-controlnet");
    let cache = Cache::new(home.join("hub"));
    let id = "brushfire-test/tiny-controlnet";
    assert_eq!(
        resolve_in(&cache, true, id, None, RepoLayout::Model, &mut ()).unwrap(),
        snapshot
    );
    // Not a pipeline: resolving it as one finds no model_index.json.
    assert!(resolve_in(&cache, true, id, None, RepoLayout::Pipeline, &mut ()).is_err());
    let (model, _) = engine::models::controlnets::ControlNetModel::<crate::common::Cpu>::load(
        &snapshot,
        None,
        &engine::memory::MemoryBudget::Unchecked,
        &Default::default(),
    )
    .expect("the resolved snapshot loads");
    assert_eq!(model.controlnet_down_blocks.len(), 12);
    std::fs::remove_file(snapshot.join("diffusion_pytorch_model.safetensors")).unwrap();
    let err = resolve_in(&cache, true, id, None, RepoLayout::Model, &mut ()).unwrap_err();
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    std::fs::remove_dir_all(&home).unwrap();
}

/// The files fetched for a pipeline come from its model_index.json and the repository's list:
/// SD 1.5's (non-EMA and fp16 weights, .bin files, the safety checker skipped), IF stage I's
/// (T5 in shards, a SentencePiece tokenizer), and the x4 upscaler's (its low-res scheduler).
#[test]
fn pipeline_files_follow_model_index_and_the_repository_listing() {
    use engine::loading::hub::pipeline_files;
    let list = |files: &[&str]| files.iter().map(|f| f.to_string()).collect::<Vec<_>>();
    let sd_index: serde_json::Value = serde_json::from_str(
        r#"{"_class_name": "StableDiffusionPipeline", "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"], "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}"#,
    )
    .unwrap();
    let sd = list(&[
        "model_index.json",
        "feature_extractor/preprocessor_config.json",
        "safety_checker/config.json",
        "safety_checker/model.safetensors",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "v1-5-pruned.safetensors",
    ]);
    let files = pipeline_files(&sd_index, &sd, None).unwrap();
    assert_eq!(
        files,
        list(&[
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ])
    );
    // fp16 where a component has it, the default weights where it does not (the VAE).
    let fp16 = pipeline_files(&sd_index, &sd, Some("fp16")).unwrap();
    assert!(fp16.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
    assert!(!fp16.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
    assert!(fp16.contains(&"vae/diffusion_pytorch_model.safetensors".to_string()));

    let if_index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../assets/models/IF-I-M-v1.0/model_index.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let if_files = list(&[
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json",
        "text_encoder/model.fp16-00001-of-00002.safetensors",
        "text_encoder/model.fp16-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.fp16.json",
        "tokenizer/spiece.model",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "safety_checker/model.safetensors",
        "watermarker/diffusion_pytorch_model.safetensors",
    ]);
    let files = pipeline_files(&if_index, &if_files, None).unwrap();
    for f in [
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json",
        "tokenizer/spiece.model",
    ] {
        assert!(files.contains(&f.to_string()), "{f}: {files:?}");
    }
    assert!(
        !files
            .iter()
            .any(|f| f.contains("fp16-0000") || f.starts_with("safety"))
    );
    // IF stage II's folder: its copy of T5 is not fetched (stage I's embeddings are used).
    let mut stage2_index = if_index.clone();
    stage2_index["_class_name"] = "IFSuperResolutionPipeline".into();
    let stage2 = pipeline_files(&stage2_index, &if_files, None).unwrap();
    assert!(
        !stage2.iter().any(|f| f.starts_with("text_encoder/")),
        "{stage2:?}"
    );
    assert!(stage2.contains(&"tokenizer/spiece.model".to_string()));
    // A component without weights is named.
    let missing: Vec<String> = if_files
        .iter()
        .filter(|f| !f.starts_with("unet/diffusion"))
        .cloned()
        .collect();
    let err = pipeline_files(&if_index, &missing, None).unwrap_err();
    assert!(err.contains("`unet`"), "{err}");
}

/// An IF stage in the HF cache resolves offline like an SD model.
#[test]
fn if_hub_ids_resolve_from_the_hf_cache_offline() {
    let (home, snapshot) = hf_home_with("brushfire-hf-if", "tiny-if", "tiny-if");
    let cache = Cache::new(home.join("hub"));
    assert_eq!(
        resolve_model_in(&cache, true, "brushfire-test/tiny-if", None, &mut ()).unwrap(),
        snapshot
    );
    std::fs::remove_file(snapshot.join("scheduler/scheduler_config.json")).unwrap();
    assert_eq!(
        cached_snapshot(&cache, "brushfire-test/tiny-if", None, None),
        None
    );
    std::fs::remove_dir_all(&home).unwrap();
}

/// In f16 the app and the CLI ask for `fp16` weights (`Precision::weights_variant`, diffusers'
/// `variant="fp16"`): a cache holding only those is complete for f16 but not for f32, and the
/// pipeline reads them.
#[test]
fn fp16_variant_weights_are_found_and_read() {
    let (home, snapshot) = hf_home_with("brushfire-hf-fp16", "tiny-sd-fp16", "tiny-sd");
    for (folder, stem) in [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ] {
        let dir = snapshot.join(folder);
        std::fs::rename(
            dir.join(format!("{stem}.safetensors")),
            dir.join(format!("{stem}.fp16.safetensors")),
        )
        .unwrap();
    }
    let cache = Cache::new(home.join("hub"));
    let id = "brushfire-test/tiny-sd-fp16";
    let fp16 = engine::backend::Precision::F16.weights_variant();
    assert_eq!(fp16, Some("fp16"));
    assert_eq!(engine::backend::Precision::F32.weights_variant(), None);
    assert_eq!(
        model_availability_in(&cache, false, id, fp16).unwrap(),
        ModelAvailability::Cached(snapshot.clone())
    );
    assert_eq!(
        model_availability_in(&cache, false, id, None).unwrap(),
        ModelAvailability::NeedsDownload { repo_id: id.into() }
    );
    assert_eq!(
        resolve_model_in(&cache, true, id, fp16, &mut ()).unwrap(),
        snapshot
    );
    let device = Default::default();
    let options = LoadOptions {
        variant: fp16.map(String::from),
        ..Default::default()
    };
    let mut pipe =
        StableDiffusionPipeline::<crate::common::Cpu>::load(&snapshot, &options, &device)
            .expect("the fp16 files");
    // A ControlNet loaded onto it prefers the same variant; one without it loads its default.
    let controlnet = home.join("controlnet-fp16");
    copy_dir(&fixture("tiny-controlnet"), &controlnet);
    std::fs::rename(
        controlnet.join("diffusion_pytorch_model.safetensors"),
        controlnet.join("diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    pipe.load_controlnet(&controlnet)
        .expect("the fp16 ControlNet");
    pipe.load_controlnet(&fixture("tiny-controlnet"))
        .expect("the default ControlNet");
    // Without the variant the default files are wanted, and the error names the missing one.
    let err = StableDiffusionPipeline::<crate::common::Cpu>::load(
        &snapshot,
        &LoadOptions::default(),
        &device,
    )
    .unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    let mut pipe = StableDiffusionPipeline::<crate::common::Cpu>::load(
        &fixture("tiny-sd"),
        &LoadOptions::default(),
        &device,
    )
    .unwrap();
    let err = pipe.load_controlnet(&controlnet).unwrap_err();
    assert!(
        err.to_string()
            .contains("diffusion_pytorch_model.safetensors"),
        "{err}"
    );
    std::fs::remove_dir_all(&home).unwrap();
}

/// Names from a picture's metadata are hub ids or nothing: no `..`, no absolute path, no folder
/// that happens to exist here, no revision that climbs out of the cache.
#[test]
fn untrusted_model_names_are_hub_ids_only() {
    use engine::loading::ModelSource;
    let here = std::env::temp_dir().to_string_lossy().into_owned();
    for bad in [
        "../..",
        "./x",
        "../secret",
        "/etc",
        here.as_str(),
        "org/..",
        "../name",
        "org/name@../../x",
        "org/name@/abs",
        "org/name/extra",
        "",
    ] {
        let err = ModelSource::parse_untrusted(bad)
            .expect_err(bad)
            .to_string();
        assert!(err.contains("not followed"), "{bad}: {err}");
    }
    for good in [
        "org/name",
        "org/name@main",
        "org/name@refs/pr/1",
        "a.b/c_d-e",
    ] {
        assert!(
            matches!(
                ModelSource::parse_untrusted(good),
                Ok(ModelSource::Hub { .. })
            ),
            "{good}"
        );
    }
    // The user's own `--model` still takes a folder that exists.
    assert!(matches!(
        ModelSource::parse(&here),
        Ok(ModelSource::Local(_))
    ));
    // And still refuses a hub id whose revision climbs out of the cache.
    assert!(ModelSource::parse("org/name@../../x").is_err());
}

/// A download cut short leaves `blobs/….incomplete` and no snapshot link: the model is not
/// cached (offline, a clear error), and an `HF_HOME` that cannot be written is said before
/// anything is asked of the network.
#[test]
fn interrupted_downloads_and_an_unwritable_hf_home_are_clear() {
    let (home, snapshot) = hf_home_with("brushfire-hf-interrupted", "tiny-sd", "tiny-sd");
    let repo = home.join("hub/models--brushfire-test--tiny-sd");
    std::fs::remove_file(snapshot.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::write(repo.join("blobs/0badc0ffee.incomplete"), b"half a file").unwrap();
    let cache = Cache::new(home.join("hub"));
    assert_eq!(
        cached_snapshot(&cache, "brushfire-test/tiny-sd", None, None),
        None
    );
    assert_eq!(
        model_availability_in(&cache, false, "brushfire-test/tiny-sd", None).unwrap(),
        ModelAvailability::NeedsDownload {
            repo_id: "brushfire-test/tiny-sd".into()
        }
    );
    let err = resolve_model_in(&cache, true, "brushfire-test/tiny-sd", None, &mut ()).unwrap_err();
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");

    // HF_HOME under a file: no folder can be made there, whoever runs the test.
    let blocker = home.join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let unwritable = Cache::new(blocker.join("hub"));
    let err = resolve_model_in(
        &unwritable,
        false,
        "brushfire-test/not-cached",
        None,
        &mut (),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("cannot be written") && err.contains("HF_HOME"),
        "asked the network instead of saying the cache is unwritable: {err}"
    );
    std::fs::remove_dir_all(&home).unwrap();
}
