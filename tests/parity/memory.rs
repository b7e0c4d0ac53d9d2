//! The memory check before any tensor work (`engine::memory`): every model's own list of the
//! attention calls it makes, held to the calls its processors really get, for every pipeline;
//! and requests, workers and benchmark cells whose attention cannot fit refused with the
//! numbers, without running anything.

use std::collections::HashSet;

use burn::tensor::{Distribution, Tensor};
use engine::backend::{BackendRequest, Precision};
use engine::bench::{BenchColumn, BenchModels, BenchPipeline, BenchPlan, CellOutcome};
use engine::memory::{
    AttentionNeed, FeatureMap, MemoryBudget, ModelCalls, ScoreShape, record_attention_calls,
};
use engine::models::AttnProcessor;
use engine::models::autoencoders::AutoencoderKLConfig;
use engine::models::text_encoders::t5::T5EncoderModel;
use engine::models::unets::{ClassLabels, UNet2DConditionModel};
use engine::pipelines::deepfloyd_if::IFPipeline;
use engine::pipelines::stable_diffusion::{LoadOptions, StableDiffusionPipeline};
use engine::pipelines::{
    CancelToken, CommonRequest, ControlNetInput, GenerationRequest, Img2ImgInput, InpaintInput,
    StepProgress, Task, UpscaleInput, UpscaleSource,
};
use engine::session::{EngineSettings, Session};

use crate::common::{Cpu, fixture, rgb_png};
use crate::img2img_inpaint::{init_image, mask_image};

fn sd(folder: &str) -> StableDiffusionPipeline<Cpu> {
    StableDiffusionPipeline::load(
        &fixture(folder),
        &LoadOptions::default(),
        &Default::default(),
    )
    .expect("load fixture")
}

fn request(task: Task, width: usize, height: usize) -> GenerationRequest {
    GenerationRequest {
        common: CommonRequest {
            prompt: "a red fox in the snow".into(),
            negative_prompt: "blurry".into(),
            steps: 2,
            guidance_scale: 7.5,
            width,
            height,
            batch: 2,
            seed: 7,
            ..Default::default()
        },
        task,
    }
}

fn img2img() -> Task {
    Task::Img2Img(Img2ImgInput {
        image: init_image(),
        strength: Some(0.9),
    })
}

fn upscale() -> Task {
    Task::Upscale(UpscaleInput::new(UpscaleSource::Image(rgb_png(
        "refs/lowres.png",
    ))))
}

fn control_task() -> Task {
    Task::ControlNet(ControlNetInput::new(rgb_png("refs/control.png")))
}

/// Everything `predicted` lists is what the processors were given: each model's list appears
/// whole, in order, in the recording, and the recording holds no shape the lists lack.
fn assert_recorded(predicted: &[ModelCalls], recorded: &[ScoreShape], what: &str) {
    assert!(!recorded.is_empty(), "{what}: no attention ran");
    for m in predicted {
        assert!(!m.calls.is_empty(), "{what}: the {} lists no call", m.model);
        assert!(
            recorded.windows(m.calls.len()).any(|w| w == m.calls),
            "{what}: the {}'s calls {:?} are not in the recording {recorded:?}",
            m.model,
            m.calls
        );
    }
    let listed: HashSet<ScoreShape> = predicted.iter().flat_map(|m| m.calls.clone()).collect();
    let seen: HashSet<ScoreShape> = recorded.iter().copied().collect();
    assert_eq!(seen, listed, "{what}: recorded and listed shapes differ");
}

fn generate_sd(pipe: &StableDiffusionPipeline<Cpu>, req: &GenerationRequest) -> Vec<ScoreShape> {
    let (out, calls) = record_attention_calls(|| {
        pipe.generate(req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
    });
    out.expect("generate");
    calls
}

#[test]
fn the_unet_lists_the_calls_of_its_forward_pass_in_order() {
    let device = Default::default();
    for folder in ["tiny-sd/unet", "tiny-if/unet", "tiny-sd-x4/unet"] {
        let (unet, config) =
            UNet2DConditionModel::<Cpu>::load(&fixture(folder), None, &device).expect("load unet");
        let text = config.encoder_hid_dim.unwrap_or_else(|| {
            config
                .cross_attention_dim
                .expand(config.block_out_channels.len(), "cross_attention_dim")
                .expect("cross_attention_dim")[0]
        });
        // Square, and other sides: odd ones that SD's conv downsamplers round up and its
        // upsamplers restore; IF's pooling resnets take multiples of their factor only.
        let other = match unet.size_multiple() {
            1 => [9, 13],
            m => [2 * m, 3 * m],
        };
        for [h, w] in [[8, 8], other] {
            let sample = Tensor::<Cpu, 4>::random(
                [3, config.in_channels, h, w],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let context =
                Tensor::<Cpu, 3>::random([3, 5, text], Distribution::Normal(0.0, 1.0), &device);
            let labels = match config.num_class_embeds {
                Some(_) => ClassLabels::Ids(Tensor::from_ints([1, 1, 1], &device)),
                None if config.class_embed_type.is_some() => ClassLabels::Levels(vec![20.0; 3]),
                None => ClassLabels::None,
            };
            let (out, recorded) = record_attention_calls(|| {
                unet.forward(sample, &[10.0, 10.0, 10.0], &context, &labels)
            });
            out.unwrap_or_else(|e| panic!("{folder} forward at {h}×{w}: {e}"));
            let listed = unet.attention_calls(3, [h, w], 5);
            assert!(!listed.is_empty(), "{folder} has attention");
            assert_eq!(listed, recorded, "{folder} at {h}×{w}");
        }
    }
}

#[test]
fn every_sd_pipeline_lists_the_calls_it_makes() {
    let txt2img = sd("tiny-sd");
    let req = request(Task::Txt2Img, 128, 64);
    let calls = generate_sd(&txt2img, &req);
    let listed = txt2img.attention_calls(&req);
    assert_eq!(
        listed.iter().map(|m| m.model).collect::<Vec<_>>(),
        ["UNet", "VAE decoder"]
    );
    // CFG doubles the UNet's batch; the VAE decodes the images one at a time.
    assert_eq!(listed[0].calls[0].batch, 4);
    assert_eq!(listed[1].calls[0].batch, 1);
    assert_recorded(&listed, &calls, "txt2img");
    let decoder = listed[1].calls[0];
    assert_eq!(
        calls.iter().filter(|&&c| c == decoder).count(),
        2,
        "one decode per image"
    );

    // img2img at a size whose latents are odd (the encoder's downsampling rounds down).
    let mut req = request(img2img(), 72, 40);
    let listed = txt2img.attention_calls(&req);
    assert_eq!(listed[0].model, "VAE encoder");
    assert_recorded(&listed, &generate_sd(&txt2img, &req), "img2img");

    // VAE tiling: 152 × 104 is 3 × 4 tiles both ways (64 px / 8 latents, stride 48 / 6); every
    // tile's calls are listed, in the order the tiles run.
    req.width = 152;
    req.height = 104;
    req.vae_tiling = true;
    let listed = txt2img.attention_calls(&req);
    let (encoder, decoder) = (&listed[0].calls, &listed[2].calls);
    assert_eq!((encoder.len(), decoder.len()), (12, 12));
    assert_eq!(
        encoder[0],
        txt2img.attention_calls(&request(img2img(), 64, 64))[0].calls[0]
    );
    assert_recorded(&listed, &generate_sd(&txt2img, &req), "img2img, VAE tiling");

    let inpaint = sd("tiny-sd-inpaint");
    let req = request(
        Task::Inpaint(InpaintInput::new(init_image(), mask_image())),
        128,
        64,
    );
    assert_recorded(
        &inpaint.attention_calls(&req),
        &generate_sd(&inpaint, &req),
        "inpaint",
    );

    let mut controlnet = sd("tiny-sd");
    controlnet
        .load_controlnet(&fixture("tiny-controlnet"))
        .expect("load controlnet");
    for guess_mode in [false, true] {
        let req = request(
            Task::ControlNet(ControlNetInput {
                guess_mode,
                ..ControlNetInput::new(rgb_png("refs/control.png"))
            }),
            128,
            64,
        );
        let listed = controlnet.attention_calls(&req);
        assert_eq!(listed[0].model, "ControlNet");
        // Guess mode runs the ControlNet on the conditional half only.
        assert_eq!(listed[0].calls[0].batch, if guess_mode { 2 } else { 4 });
        assert_recorded(
            &listed,
            &generate_sd(&controlnet, &req),
            &format!("controlnet, guess mode {guess_mode}"),
        );
    }

    let upscaler = sd("tiny-sd-x4");
    let mut req = request(
        Task::Upscale(UpscaleInput {
            source: UpscaleSource::Image(rgb_png("refs/lowres.png")),
            noise_level: Some(20),
        }),
        128,
        64,
    );
    let listed = upscaler.attention_calls(&req);
    // The x4 VAE decodes at a quarter of the output's side.
    assert_eq!(listed[1].calls[0].queries, (128 / 4) * (64 / 4));
    assert_recorded(&listed, &generate_sd(&upscaler, &req), "upscale");
    // Tiled: its VAE's tiles are 16 latents with a stride of 12, so 16 × 32 latents are
    // decoded as 2 × 3 tiles, as diffusers' `range(0, 16, 12)` makes a second, thin row.
    req.vae_tiling = true;
    let listed = upscaler.attention_calls(&req);
    assert_eq!(
        listed[1]
            .calls
            .iter()
            .map(|c| c.queries)
            .collect::<Vec<_>>(),
        [16 * 16, 16 * 16, 16 * 8, 4 * 16, 4 * 16, 4 * 8]
    );
    assert_recorded(
        &listed,
        &generate_sd(&upscaler, &req),
        "upscale, VAE tiling",
    );
}

#[test]
fn if_lists_the_calls_it_makes() {
    let pipe = IFPipeline::<Cpu>::load(
        &fixture("tiny-if"),
        &LoadOptions::default(),
        &Default::default(),
    )
    .expect("load IF");
    let req = request(Task::If, 16, 16);
    let (out, calls) = record_attention_calls(|| {
        pipe.generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
    });
    out.expect("IF stage I");
    assert_recorded(&pipe.attention_calls(&req), &calls, "IF stage I");
}

/// A budget of `kib` KiB on the host, no allocation limit.
fn kib(kib: u64) -> MemoryBudget {
    MemoryBudget::Fixed {
        available: Some(kib << 10),
        max_allocation: None,
    }
}

#[test]
fn a_request_whose_attention_cannot_fit_is_refused_before_any_work() {
    let mut pipe = sd("tiny-sd");
    let req = request(Task::Txt2Img, 128, 64);
    // The UNet's first level: 4 (CFG) × 4 heads of 128 × 128 scores, 1 MiB, and softmax's copy.
    pipe.set_attn_processor(AttnProcessor::Vanilla);
    pipe.set_memory_budget(kib(64));
    let (out, calls) = record_attention_calls(|| {
        pipe.generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
    });
    let text = out.expect_err("2 MiB in 64 KiB").to_string();
    assert!(calls.is_empty(), "nothing ran: {calls:?}");
    assert!(
        text.starts_with("not enough memory: vanilla attention needs about 2 MiB"),
        "{text}"
    );
    assert!(
        text.contains("4 × 4 matrices of 128 × 128 in the UNet"),
        "{text}"
    );
    assert!(text.contains("this machine has 64 KiB available"), "{text}");
    assert!(
        text.contains("fused attention holds no score matrix"),
        "{text}"
    );
    // One 128 × 128 slice at a time is 128 KiB: not enough here either, so not offered.
    assert!(!text.contains("sliced"), "{text}");
    // The UNet is what does not fit: tiling the VAE would not help, so it is not offered.
    assert!(!text.contains("VAE tiling"), "{text}");

    // With room for one slice, sliced is offered, and runs.
    pipe.set_memory_budget(kib(200));
    let text = pipe
        .generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
        .expect_err("still 2 MiB")
        .to_string();
    assert!(
        text.contains("sliced attention needs about 128 KiB"),
        "{text}"
    );
    // Both run where vanilla's 2 MiB does not fit, with room for the VAE decoder's pass
    // (3 × its [1, 16, 64, 128] f32 map, 1.5 MiB).
    pipe.set_memory_budget(kib(1792));
    for processor in [
        AttnProcessor::Sliced { slice_size: 1 },
        AttnProcessor::Fused,
    ] {
        pipe.set_attn_processor(processor);
        pipe.generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
            .unwrap_or_else(|e| panic!("{processor:?} fits: {e}"));
    }

    // A GPU pool that cannot allocate one score tensor.
    pipe.set_attn_processor(AttnProcessor::Vanilla);
    pipe.set_memory_budget(MemoryBudget::Device {
        max_allocation: 256 << 10,
    });
    let text = pipe
        .generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
        .expect_err("a 1 MiB tensor in 256 KiB pages")
        .to_string();
    assert!(text.contains("one score tensor of about 1 MiB"), "{text}");

    // IF checks its UNet the same way.
    let mut stage1 = IFPipeline::<Cpu>::load(
        &fixture("tiny-if"),
        &LoadOptions::default(),
        &Default::default(),
    )
    .expect("load IF");
    stage1.set_attn_processor(AttnProcessor::Vanilla);
    stage1.set_memory_budget(kib(1));
    let req = request(Task::If, 16, 16);
    let (out, calls) = record_attention_calls(|| {
        stage1.generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
    });
    let text = out.expect_err("IF in 1 KiB").to_string();
    assert!(calls.is_empty() && text.contains("in the UNet"), "{text}");
}

#[test]
fn when_the_vae_does_not_fit_vae_tiling_is_offered_and_fits() {
    // The x4 upscaler's UNet has no attention at its first level, so without CFG its VAE
    // decoder, at the full latent size, holds the largest scores: 512 × 512 at 128 × 64 px out.
    let mut pipe = sd("tiny-sd-x4");
    pipe.set_attn_processor(AttnProcessor::Vanilla);
    let mut req = request(upscale(), 128, 64);
    req.guidance_scale = 1.0;
    req.batch = 1;
    let whole = AttentionNeed::of(AttnProcessor::Vanilla, &pipe.attention_calls(&req));
    assert_eq!(whole.call.map(|(model, _)| model), Some("VAE decoder"));
    req.vae_tiling = true;
    // The UNet's or a tile's, whichever is larger.
    let tiled = AttentionNeed::of(AttnProcessor::Vanilla, &pipe.attention_calls(&req));
    assert!(tiled.footprint.total < whole.footprint.total, "{tiled:?}");
    // The tiled decode's pass must fit as well as its attention.
    let tiling = pipe.vae_tiling(&req).expect("geometry").expect("asked for");
    let [c, h, w] = pipe.vae.decode_largest_activation([16, 32], Some(&tiling));
    let tiled_pass = FeatureMap {
        model: "VAE decoder",
        shape: [1, c, h, w],
        float_bytes: 4,
        held: None,
    }
    .pass_peak();
    req.vae_tiling = false;

    let room = tiled.footprint.total.max(tiled_pass);
    assert!(room < whole.footprint.total, "{room} against {whole:?}");
    let budget = (room + whole.footprint.total) / 2;
    pipe.set_memory_budget(MemoryBudget::Fixed {
        available: Some(budget),
        max_allocation: None,
    });
    let (out, calls) = record_attention_calls(|| {
        pipe.generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
    });
    let text = out.expect_err("the whole decode does not fit").to_string();
    assert!(calls.is_empty(), "nothing ran: {calls:?}");
    assert!(text.contains("512 × 512 in the VAE decoder"), "{text}");
    assert!(
        text.contains(&format!(
            "VAE tiling needs about {} KiB",
            tiled.footprint.total >> 10
        )),
        "{text}"
    );
    req.vae_tiling = true;
    pipe.generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
        .expect("the tiled decode fits the same budget");
}

#[test]
fn a_bench_cell_that_cannot_fit_says_so_and_the_run_goes_on() {
    let mut session = Session::new(EngineSettings {
        backend: BackendRequest::Cpu,
        ..EngineSettings::default()
    });
    let models = BenchModels::from_dir(&fixture("tiny-sd")).expect("tiny configs");
    let plan = BenchPlan {
        pipelines: vec![BenchPipeline::SdTxt2Img],
        batches: vec![1],
        sizes: vec![(8192, 8192), (64, 64)],
        columns: vec![BenchColumn::Baseline],
        precision: Precision::F32,
        steps: 1,
        runs: 1,
    };
    let report = session
        .bench(&plan, &models, &CancelToken::new(), &mut ())
        .expect("run");
    match &report.cells[0].outcome {
        CellOutcome::Failed { reason } => {
            assert!(reason.contains("not enough memory"), "{reason}");
            assert!(reason.contains("in the UNet"), "{reason}");
        }
        other => panic!("8192² vanilla ran: {other:?}"),
    }
    assert!(
        matches!(report.cells[1].outcome, CellOutcome::Measured { .. }),
        "{:?}",
        report.cells[1].outcome
    );
    assert!(report.to_markdown().contains("not enough memory"));
}

/// The seed's batch-16 cell at 512² on SD 1.5's real UNet (shipped config, random weights):
/// what each processor holds at most, the numbers `RESULTS.md` quotes.
#[test]
fn sd15_at_512_batch_16_needs_32_gib_of_vanilla_scores() {
    use engine::models::config::parse_config;
    use engine::models::unets::UNet2DConditionConfig;
    let models = BenchModels::sd15();
    let config: UNet2DConditionConfig =
        parse_config(&models.unet_config.0, &models.unet_config.1).expect("config");
    let unet = config.init::<Cpu>(&Default::default()).expect("unet");
    let calls = [ModelCalls {
        model: "UNet",
        float_bytes: 4,
        calls: unet.attention_calls(32, [64, 64], 77),
    }];
    // 16 transformers, each a self- and a cross-attention.
    assert_eq!(calls[0].calls.len(), 32);
    let need = |p| AttentionNeed::of(p, &calls);
    let vanilla = need(AttnProcessor::Vanilla);
    assert_eq!(vanilla.footprint.total, 32 << 30);
    assert_eq!(vanilla.footprint.largest, 16 << 30);
    assert_eq!(
        vanilla
            .call
            .map(|(_, s)| (s.batch, s.heads, s.queries, s.keys)),
        Some((32, 8, 4096, 4096))
    );
    // In f16: half of that (SD 1.5 does not upcast its attention).
    let half = [ModelCalls {
        float_bytes: 2,
        ..calls[0].clone()
    }];
    assert_eq!(
        AttentionNeed::of(AttnProcessor::Vanilla, &half)
            .footprint
            .total,
        16 << 30
    );
    assert_eq!(
        need(AttnProcessor::Sliced { slice_size: 1 })
            .footprint
            .total,
        128 << 20
    );
    assert_eq!(need(AttnProcessor::Fused).footprint.total, 0);
}

/// The VAEs' largest feature maps from the shipped configs (random weights): the numbers the
/// memory check refuses on, whole and tiled.
#[test]
fn the_shipped_vaes_largest_feature_maps_whole_and_tiled() {
    let vae = |name: &str| {
        let path = fixture(&format!("../../assets/models/{name}/vae/config.json"));
        let config: AutoencoderKLConfig =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("config")).expect("json");
        let tiling = config.tiling().expect("tiling");
        (
            config.init::<Cpu>(&Default::default()).expect("vae"),
            tiling,
        )
    };
    let (sd, tiling) = vae("stable-diffusion-v1-5");
    // 512²: the last up block's input, 256 channels at full resolution (256 MiB in f32).
    assert_eq!(
        sd.decode_largest_activation([64, 64], None),
        [256, 512, 512]
    );
    // 1024²: four times that whole, and a 512² tile's when tiled.
    assert_eq!(
        sd.decode_largest_activation([128, 128], None),
        [256, 1024, 1024]
    );
    assert_eq!(
        sd.decode_largest_activation([128, 128], Some(&tiling)),
        [256, 512, 512]
    );
    // The encoder: conv_in's 128 channels, padded by one before the first downsampler.
    assert_eq!(
        sd.encode_largest_activation([512, 512], None),
        [128, 513, 513]
    );
    assert_eq!(
        sd.encode_largest_activation([1024, 1024], Some(&tiling)),
        [128, 513, 513]
    );
    // The x4 upscaler making 2048² from 512²: 4 GiB whole, 64 MiB per 256² tile.
    let (x4, tiling) = vae("stable-diffusion-x4-upscaler");
    assert_eq!(
        x4.decode_largest_activation([512, 512], None),
        [256, 2048, 2048]
    );
    assert_eq!(
        x4.decode_largest_activation([512, 512], Some(&tiling)),
        [256, 256, 256]
    );
}

#[test]
fn a_vae_decode_too_large_for_the_gpu_pool_is_refused_and_tiling_offered() {
    // Fused attention holds no scores: only the decoder's feature maps are at stake.
    let mut pipe = sd("tiny-sd-x4");
    pipe.set_attn_processor(AttnProcessor::Fused);
    let mut req = request(upscale(), 128, 64);
    let config: AutoencoderKLConfig = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-sd-x4/vae/config.json")).expect("config"),
    )
    .expect("json");
    let tiling = config.tiling().expect("tiling");
    let bytes = |[c, h, w]: [usize; 3]| (c * h * w * 4) as u64;
    let whole = pipe.vae.decode_largest_activation([16, 32], None);
    let tiled = pipe.vae.decode_largest_activation([16, 32], Some(&tiling));
    assert!(bytes(tiled) < bytes(whole), "{tiled:?} against {whole:?}");
    pipe.set_memory_budget(MemoryBudget::Device {
        max_allocation: (bytes(tiled) + bytes(whole)) / 2,
    });
    let (out, calls) = record_attention_calls(|| {
        pipe.generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
    });
    let text = out
        .expect_err("the whole decode's map is too large")
        .to_string();
    assert!(calls.is_empty(), "nothing ran: {calls:?}");
    let [c, h, w] = whole;
    assert!(
        text.contains(&format!(
            "the VAE decoder's largest feature map, [1, {c}, {h}, {w}] in f32"
        )),
        "{text}"
    );
    let [c, h, w] = tiled;
    assert!(
        text.contains(&format!(
            "VAE tiling brings it to [1, {c}, {h}, {w}] in f32"
        )),
        "{text}"
    );
    req.vae_tiling = true;
    pipe.generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
        .expect("tiled, every map fits the pool");
}

/// The UNets' largest feature maps from the shipped configs (random weights, nothing
/// allocated): the numbers the memory check refuses on.
#[test]
fn the_shipped_unets_largest_feature_maps() {
    use engine::models::config::parse_config;
    use engine::models::controlnets::ControlNetConfig;
    use engine::models::unets::{UNet2DConditionConfig, UNet2DConditionModel};
    let config = |name: &str| -> UNet2DConditionConfig {
        let path = fixture(&format!("../../assets/models/{name}/unet/config.json"));
        let text = std::fs::read_to_string(&path).expect("config");
        parse_config(&text, &path).expect("config")
    };
    let unet = |name: &str| -> UNet2DConditionModel<Cpu> {
        config(name).init(&Default::default()).expect("unet")
    };
    let sd_config = config("stable-diffusion-v1-5");
    let sd = unet("stable-diffusion-v1-5");
    // 512²: the first level's feed-forward projection, 2 × 4 × 320 wide (GEGLU).
    assert_eq!(sd.largest_activation([64, 64]), [2560, 64, 64]);
    assert_eq!(sd.largest_activation([128, 128]), [2560, 128, 128]);
    // Batch 16 with CFG in f32: 1.25 GiB, the map the session-11 peaks in RESULTS.md were
    // measured against (3.1 GiB above the weights; the check's estimate is 3 × 1.25).
    let map = sd.feature_map(32, [64, 64]);
    assert_eq!(map.shape, [32, 2560, 64, 64]);
    assert_eq!(map.bytes(), 1280 << 20);
    // A ControlNet's residuals, held through each UNet pass: the skips (conv_in's 320 and
    // two resnets' at 64², the downsampler's 320 at 32², 2 × 640 at 32², 640 at 16², 2 × 1280
    // at 16², 1280 at 8², 2 × 1280 at 8²) and the mid block's 1280 at 8²: 25.6 MiB per image.
    let skips = 320 * 4096 * 3
        + 320 * 1024
        + 640 * 1024 * 2
        + 640 * 256
        + 1280 * 256 * 2
        + 1280 * 64
        + 1280 * 64 * 2
        + 1280 * 64;
    assert_eq!(sd.skip_elements([64, 64]), skips);
    let controlnet = ControlNetConfig {
        unet: sd_config.clone(),
        ..ControlNetConfig::default()
    }
    .init::<Cpu>(&Default::default())
    .expect("controlnet");
    assert_eq!(controlnet.residual_elements([64, 64]), skips);
    // The upscaler runs at its input's size: the second level's feed-forward, 2 × 4 × 512. ×4
    // of a 512² picture: 1 GiB per image in f32, 2 GiB for the CFG pair.
    let x4 = unet("stable-diffusion-x4-upscaler");
    assert_eq!(x4.largest_activation([128, 128]), [4096, 64, 64]);
    assert_eq!(x4.feature_map(2, [512, 512]).bytes(), 2 << 30);
    // IF has no feed-forward: the last up block's first input, 384 upsampled + a 192 skip.
    let stage1 = unet("IF-I-M-v1.0");
    assert_eq!(stage1.largest_activation([64, 64]), [576, 64, 64]);
    // Stage II at 256²: 256 upsampled + a 128 skip.
    let stage2 = unet("IF-II-M-v1.0");
    assert_eq!(stage2.largest_activation([256, 256]), [384, 256, 256]);
}

/// A UNet pass whose feature maps cannot fit is refused with nothing run, in SD and in IF.
#[test]
fn a_unet_pass_too_large_for_the_memory_left_is_refused_before_any_work() {
    /// Runs `generate` under a budget one byte short of `map`'s pass: refused, nothing run.
    fn expect_refused<T: std::fmt::Debug>(
        map: &FeatureMap,
        generate: impl FnOnce(MemoryBudget) -> engine::Result<T>,
    ) -> String {
        let budget = MemoryBudget::Fixed {
            available: Some(map.pass_peak() - 1),
            max_allocation: None,
        };
        let (out, calls) = record_attention_calls(|| generate(budget));
        let text = out.expect_err("refused").to_string();
        assert!(calls.is_empty(), "nothing ran: {calls:?}");
        let [b, c, h, w] = map.shape;
        assert!(
            text.contains(&format!(
                "the UNet's largest feature map is [{b}, {c}, {h}, {w}] in f32"
            )),
            "{text}"
        );
        assert!(
            text.ends_with("lower the batch size or the image size"),
            "{text}"
        );
        text
    }
    let mut pipe = sd("tiny-sd");
    pipe.set_attn_processor(AttnProcessor::Fused);
    let req = request(Task::Txt2Img, 128, 64);
    // Batch 2 with CFG: the UNet sees 4 latents of 8 × 16.
    let map = pipe.unet.feature_map(4, [8, 16]);
    expect_refused(&map, |budget| {
        pipe.set_memory_budget(budget);
        pipe.generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
    });

    // With a ControlNet, its residuals are held through each UNet pass: a budget that admits
    // txt2img's pass refuses the ControlNet's, and names them.
    pipe.set_memory_budget(MemoryBudget::Unchecked);
    pipe.load_controlnet(&fixture("tiny-controlnet"))
        .expect("load controlnet");
    let controlnet = pipe.controlnet.as_ref().expect("loaded");
    let per_image = controlnet.residual_elements([8, 16]);
    let held = per_image * 4 * 4;
    let control = request(control_task(), 128, 64);
    let with_residuals = map.holding_control_residuals(per_image);
    assert_eq!(with_residuals.pass_peak(), map.pass_peak() + held as u64);
    // The budget, one byte short, admits the UNet's own maps.
    assert!(with_residuals.pass_peak() > map.pass_peak());
    let text = expect_refused(&with_residuals, |budget| {
        pipe.set_memory_budget(budget);
        pipe.generate(
            &control,
            None,
            &CancelToken::new(),
            &mut |_: &StepProgress| {},
        )
    });
    assert!(
        text.contains("of them and the ControlNet's residuals, "),
        "{text}"
    );

    let mut pipe = IFPipeline::<Cpu>::load(
        &fixture("tiny-if"),
        &LoadOptions::default(),
        &Default::default(),
    )
    .expect("load IF");
    let req = request(Task::If, 16, 16);
    let map = pipe.unet.feature_map(4, [16, 16]);
    expect_refused(&map, |budget| {
        pipe.set_memory_budget(budget);
        pipe.generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
    });
}

#[test]
fn a_model_too_large_for_the_memory_left_is_refused_before_its_weights_are_read() {
    let tight = LoadOptions {
        memory_budget: kib(64),
        ..Default::default()
    };
    let err =
        StableDiffusionPipeline::<Cpu>::load(&fixture("tiny-sd"), &tight, &Default::default())
            .expect_err("the tiny model's weights are more than 64 KiB");
    let text = err.to_string();
    assert!(
        text.starts_with("not enough memory: loading the model needs about"),
        "{text}"
    );
    assert!(text.contains("this machine has 64 KiB available"), "{text}");
    // The single-file path checks the same way.
    let err = StableDiffusionPipeline::<Cpu>::load_path(
        &fixture("tiny-sd-single-file.safetensors"),
        &tight,
        &Default::default(),
    )
    .expect_err("refused");
    assert!(err.to_string().contains("loading the model"), "{err}");
    // IF's UNet, and its T5 (loaded when a prompt first needs it).
    let err = IFPipeline::<Cpu>::load(&fixture("tiny-if"), &tight, &Default::default())
        .expect_err("refused");
    assert!(err.to_string().contains("loading the UNet"), "{err}");
    let err = T5EncoderModel::<Cpu>::load_checked(
        &fixture("tiny-if/text_encoder"),
        None,
        &kib(64),
        &Default::default(),
    )
    .expect_err("refused");
    assert!(
        err.to_string().contains("loading the T5 text encoder"),
        "{err}"
    );

    // With room, the budget carries over to the pipeline's requests.
    let roomy = LoadOptions {
        memory_budget: kib(1 << 20),
        ..Default::default()
    };
    let mut pipe =
        StableDiffusionPipeline::<Cpu>::load(&fixture("tiny-sd"), &roomy, &Default::default())
            .expect("1 GiB is room enough");
    // A ControlNet loaded later is checked against what is left then: refused, folder or single
    // file, with the pipeline as it was; with room it loads.
    pipe.set_memory_budget(kib(64));
    for path in [
        fixture("tiny-controlnet"),
        fixture("tiny-controlnet-single-file.safetensors"),
    ] {
        let err = pipe.load_controlnet(&path).expect_err("refused");
        assert!(
            err.to_string()
                .starts_with("not enough memory: loading the ControlNet needs about"),
            "{err}"
        );
        assert!(pipe.controlnet.is_none(), "nothing was loaded");
    }
    pipe.set_memory_budget(kib(1 << 20));
    pipe.load_controlnet(&fixture("tiny-controlnet"))
        .expect("1 GiB is room enough");
    assert!(pipe.controlnet.is_some());

    pipe.set_attn_processor(AttnProcessor::Vanilla);
    let mut req = request(Task::Txt2Img, 1024, 1024);
    req.batch = 4;
    let (out, calls) = record_attention_calls(|| {
        pipe.generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
    });
    let err = out.expect_err("vanilla scores at 1024² do not fit 1 GiB");
    assert!(calls.is_empty(), "nothing ran: {calls:?}");
    assert!(err.to_string().starts_with("not enough memory"), "{err}");
}
