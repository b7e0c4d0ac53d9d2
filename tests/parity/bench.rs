//! The benchmark runs the real denoising loop on random weights, records failures per cell
//! instead of aborting, and prints the seed's table shape.

use engine::backend::{BackendRequest, Precision};
use engine::bench::{
    BenchColumn, BenchModels, BenchPipeline, BenchPlan, CascadeModels, CellOutcome,
};
use engine::pipelines::CancelToken;
use engine::schedulers;
use engine::session::{EngineSettings, Session};

use crate::common::{Cpu, fixture};

fn tiny_plan() -> BenchPlan {
    BenchPlan {
        pipelines: vec![
            BenchPipeline::SdTxt2Img,
            BenchPipeline::SdImg2Img,
            BenchPipeline::SdInpaint,
            BenchPipeline::SdControlnet,
            BenchPipeline::If,
        ],
        batches: vec![1, 2],
        sizes: vec![(64, 48)],
        columns: vec![
            BenchColumn::Baseline,
            BenchColumn::Fused,
            BenchColumn::ChannelsLast,
        ],
        precision: Precision::F32,
        steps: 3,
        runs: 2,
    }
}

#[test]
fn bench_measures_every_runnable_cell_and_explains_the_rest() {
    let mut session = Session::new(EngineSettings {
        backend: BackendRequest::Cpu,
        ..EngineSettings::default()
    });
    let mut models = BenchModels::from_dir(&fixture("tiny-sd")).unwrap();
    models.cascade = Some(tiny_cascade());
    let plan = tiny_plan();
    let report = session
        .bench(&plan, &models, &CancelToken::new(), &mut ())
        .unwrap();
    assert_eq!(report.cells.len(), 5 * 2 * 3);

    // PNDM with skip_prk_steps: the UNet count is the scheduler's timestep count.
    let json: serde_json::Value = serde_json::from_str(&models.scheduler_config.0).unwrap();
    let mut scheduler = schedulers::from_config_json::<Cpu>(&json, None).unwrap();
    scheduler.set_timesteps(plan.steps).unwrap();
    let evals = scheduler.timesteps().len();
    // img2img at strength 0.8 of 3 steps keeps int(2.4) = 2: the first scheduler step is skipped.
    let img2img_evals = evals - 1;

    for cell in &report.cells {
        let is_if = cell.spec.pipeline == BenchPipeline::If;
        let expected_evals = match cell.spec.pipeline {
            BenchPipeline::SdImg2Img => img2img_evals,
            // IF stage I: DDPM, twice the plan's steps (the seed's 100 for 50).
            BenchPipeline::If => 2 * plan.steps,
            _ => evals,
        };
        match &cell.outcome {
            CellOutcome::Measured {
                it_per_sec,
                unet_evals,
                run_secs,
                peak_reserved_bytes,
                stages,
            } => {
                if is_if {
                    // Stage I / II / x4 at 16² (the batch), 32² and 32² → 128² (batch 1).
                    let summary: Vec<(&str, usize, usize, usize)> = stages
                        .iter()
                        .map(|s| (s.stage, s.unet_evals, s.width, s.batch))
                        .collect();
                    assert_eq!(
                        summary,
                        vec![
                            ("stage I", 2 * plan.steps, 16, cell.spec.batch),
                            ("stage II", plan.steps, 32, 1),
                            ("x4", 5, 128, 1),
                        ],
                        "{}",
                        cell.spec
                    );
                    assert!(stages.iter().all(|s| s.it_per_sec > 0.0));
                } else {
                    assert!(stages.is_empty());
                }
                assert_eq!(*unet_evals, expected_evals, "{}", cell.spec);
                assert_eq!(run_secs.len(), plan.runs);
                let expected = expected_evals as f64 / run_secs[plan.runs - 1];
                assert!((it_per_sec - expected).abs() < 1e-9 * expected);
                assert!(it_per_sec.is_finite() && *it_per_sec > 0.0);
                // The CPU backend's memory is the process's peak resident set (Linux).
                let peak = peak_reserved_bytes.expect("process peak memory on Linux");
                assert!(peak > 1 << 20, "{}: peak {peak} bytes", cell.spec);
            }
            outcome => panic!("{}: unexpected {outcome:?}", cell.spec),
        }
    }

    let markdown = report.to_markdown();
    assert!(markdown.contains("### 64×48, batch 1"), "{markdown}");
    assert!(markdown.contains("### 64×48, batch 2"), "{markdown}");
    assert!(markdown.contains("| baseline (vanilla attention) | fused attention |"));
    let txt2img_rows: Vec<&str> = markdown
        .lines()
        .filter(|l| l.starts_with("| sd-txt2img |"))
        .collect();
    assert_eq!(txt2img_rows.len(), 2);
    assert!(
        txt2img_rows.iter().all(|r| r.matches(" it/s").count() == 3),
        "{markdown}"
    );
    let if_rows: Vec<&str> = markdown
        .lines()
        .filter(|l| l.starts_with("| if |"))
        .collect();
    assert_eq!(if_rows.len(), 2, "{markdown}");
    // Three rates per cell: "a / b / c it/s".
    assert!(
        if_rows.iter().all(|r| r.matches(" / ").count() == 2 * 3),
        "{markdown}"
    );
    for row in ["| sd-img2img |", "| sd-inpaint |", "| sd-controlnet |"] {
        let rows: Vec<&str> = markdown.lines().filter(|l| l.starts_with(row)).collect();
        assert_eq!(rows.len(), 2, "{markdown}");
        assert!(
            rows.iter().all(|r| r.matches(" it/s").count() == 3),
            "{markdown}"
        );
    }

    let csv = report.to_csv();
    assert_eq!(csv.lines().count(), 1 + report.cells.len());
    assert_eq!(csv.lines().filter(|l| l.contains(",measured,")).count(), 30);
    assert!(
        csv.lines()
            .any(|l| l.contains("stage I ") && l.contains("; x4 "))
    );
    let json: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
    assert_eq!(json["cells"].as_array().unwrap().len(), report.cells.len());
    assert_eq!(json["cells"][0]["status"], "measured");
    // Rows and columns are written by their CLI names (`sd-txt2img`, `channels-last`).
    for (cell, value) in report.cells.iter().zip(json["cells"].as_array().unwrap()) {
        assert_eq!(value["pipeline"], cell.spec.pipeline.name());
        assert_eq!(value["column"], cell.spec.column.name());
    }
}

#[test]
fn bench_rejects_bad_plans_before_running() {
    let mut session = Session::new(EngineSettings {
        backend: BackendRequest::Cpu,
        ..EngineSettings::default()
    });
    let models = BenchModels::sd15();
    for (plan, field) in [
        (
            BenchPlan {
                sizes: vec![(500, 512)],
                ..tiny_plan()
            },
            "sizes",
        ),
        (
            BenchPlan {
                batches: vec![0],
                ..tiny_plan()
            },
            "batches",
        ),
        (
            BenchPlan {
                runs: 0,
                ..tiny_plan()
            },
            "runs",
        ),
        (
            BenchPlan {
                columns: vec![],
                ..tiny_plan()
            },
            "columns",
        ),
    ] {
        let err = session
            .bench(&plan, &models, &CancelToken::new(), &mut ())
            .unwrap_err();
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
}

#[test]
fn f16_on_the_cpu_backend_is_a_failed_cell_not_a_panic() {
    let mut session = Session::new(EngineSettings {
        backend: BackendRequest::Cpu,
        ..EngineSettings::default()
    });
    let models = BenchModels::from_dir(&fixture("tiny-sd")).unwrap();
    let plan = BenchPlan {
        pipelines: vec![BenchPipeline::SdTxt2Img],
        batches: vec![1],
        columns: vec![BenchColumn::Fused],
        precision: Precision::F16,
        ..tiny_plan()
    };
    let report = session
        .bench(&plan, &models, &CancelToken::new(), &mut ())
        .unwrap();
    match &report.cells[0].outcome {
        CellOutcome::Failed { reason } => assert!(reason.contains("GPU"), "{reason}"),
        other => panic!("expected a failed cell, got {other:?}"),
    }
}

/// The tiny IF stages and x4 upscaler as the IF row's models.
fn tiny_cascade() -> CascadeModels {
    CascadeModels::from_dirs(
        &fixture("tiny-if"),
        &fixture("tiny-if-ii"),
        &fixture("tiny-sd-x4"),
    )
    .unwrap()
}

/// The IF row's shipped configs build UNets with exactly the real checkpoints' parameter
/// counts (diffusers' `UNet2DConditionModel.from_config` on the same files).
#[test]
fn if_cascade_configs_shipped_in_assets_build_the_real_unets() {
    use burn::module::Module;
    use engine::models::config::parse_config;
    use engine::models::unets::UNet2DConditionConfig;
    let cascade = BenchModels::sd15().cascade.expect("shipped");
    // Size multiples: IF's resampling resnets only double, so its sides must divide by
    // 2^upsamplers (stage II has four); the x4 upscaler's convs take any size.
    for (stage, params, multiple) in [
        (&cascade.stage1, 371_605_830, 8),
        (&cascade.stage2, 461_064_198, 16),
        (&cascade.upscaler, 473_398_020, 1),
    ] {
        let (json, path) = &stage.unet_config;
        let config: UNet2DConditionConfig = parse_config(json, path).unwrap();
        let unet = config.init::<Cpu>(&Default::default()).unwrap();
        assert_eq!(unet.num_params(), params, "{}", path.display());
        assert_eq!(unet.size_multiple(), multiple, "{}", path.display());
        let json: serde_json::Value = serde_json::from_str(&stage.scheduler_config.0).unwrap();
        schedulers::from_config_json::<Cpu>(&json, None).unwrap();
    }
}

#[test]
fn sd15_configs_shipped_in_assets_build_the_real_unet_shape() {
    use engine::models::config::parse_config;
    use engine::models::unets::UNet2DConditionConfig;
    let models = BenchModels::sd15();
    let config: UNet2DConditionConfig =
        parse_config(&models.unet_config.0, &models.unet_config.1).unwrap();
    assert_eq!(config.block_out_channels, vec![320, 640, 1280, 1280]);
    assert_eq!(config.in_channels, 4);
    let json: serde_json::Value = serde_json::from_str(&models.scheduler_config.0).unwrap();
    let mut scheduler = schedulers::from_config_json::<Cpu>(&json, None).unwrap();
    assert_eq!(scheduler.name(), "PLMS");
    scheduler.set_timesteps(50).unwrap();
    // The seed's 50 PNDM steps are 51 UNet evaluations (skip_prk_steps).
    assert_eq!(scheduler.timesteps().len(), 51);
    // The same folder reads single-file checkpoints: configs, tokenizer and scheduler.
    let dir = engine::pipelines::stable_diffusion::sd15_config_dir().unwrap();
    for file in [
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
    ] {
        assert!(dir.join(file).is_file(), "{file}");
    }
    let tokenizer =
        engine::models::text_encoders::clip_tokenizer::CLIPTokenizer::load(&dir.join("tokenizer"))
            .unwrap();
    let ids = tokenizer.encode(&["a photo of a cat"]).unwrap();
    // <|startoftext|> a photo of a cat <|endoftext|>, padded to 77 with <|endoftext|>.
    let row = &ids.input_ids[0];
    assert_eq!(&row[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert_eq!(row.len(), 77);
    assert_eq!(row[76], 49407);
}

/// An installed binary has no source tree: the SD 1.5 configs single-file checkpoints are read
/// with are built in and written out once, byte for byte the shipped `assets/` folder, every file
/// of it, and a folder the pipeline and the tokenizer read.
#[test]
fn the_built_in_sd15_configs_are_the_shipped_folder() {
    use engine::pipelines::stable_diffusion::{SD15_CONFIG_FILES, write_sd15_configs};
    let shipped = crate::common::fixture("../../assets/models/stable-diffusion-v1-5");
    let mut files = Vec::new();
    let mut stack = vec![shipped.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let name = path
                    .strip_prefix(&shipped)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                files.push(name);
            }
        }
    }
    files.sort();
    let built_in: Vec<&str> = SD15_CONFIG_FILES.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        files, built_in,
        "every shipped file is built in, and nothing else"
    );

    let dir = std::env::temp_dir().join(format!("brushfire-sd15-configs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A torn file from an earlier, interrupted run is replaced.
    std::fs::create_dir_all(dir.join("unet")).unwrap();
    std::fs::write(dir.join("unet/config.json"), "{").unwrap();
    for _ in 0..2 {
        assert_eq!(write_sd15_configs(&dir).unwrap(), dir);
        for name in &files {
            assert_eq!(
                std::fs::read(dir.join(name)).unwrap(),
                std::fs::read(shipped.join(name)).unwrap(),
                "{name}"
            );
        }
    }
    let tokenizer =
        engine::models::text_encoders::clip_tokenizer::CLIPTokenizer::load(&dir.join("tokenizer"))
            .unwrap();
    let ids = tokenizer.encode(&["a photo of a cat"]).unwrap();
    assert_eq!(
        &ids.input_ids[0][..7],
        &[49406, 320, 1125, 539, 320, 2368, 49407]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
