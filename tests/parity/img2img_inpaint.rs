//! img2img and inpainting against diffusers' `StableDiffusionImg2ImgPipeline` and
//! `StableDiffusionInpaintPipeline` on the tiny fixtures: the seeded generator path (VAE
//! posterior samples and noise drawn in diffusers' order) and the noise-tape path.

use crate::common::{Cpu, assert_parity, fixture, refs};
use engine::EngineError;
use engine::models::MemoryFormat;
use engine::noise::{NoiseSource, NoiseTape};
use engine::pipelines::image_processor::crop_region;
use engine::pipelines::stable_diffusion::{LoadOptions, StableDiffusionPipeline};
use engine::pipelines::{
    CancelToken, CommonRequest, GenerationRequest, Img2ImgInput, InpaintInput, PipelineKind,
    StepProgress, Task,
};
use engine::tensor_io::HostTensor;

fn load(model: &str) -> StableDiffusionPipeline<Cpu> {
    StableDiffusionPipeline::load(
        &fixture(model),
        &LoadOptions::default(),
        &Default::default(),
    )
    .expect("load fixture")
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(&format!("refs/{name}"))).unwrap())
        .unwrap()
}

pub(crate) fn init_image() -> HostTensor {
    let img = image::open(fixture("refs/init.png")).unwrap().to_rgb8();
    HostTensor {
        shape: vec![img.height() as usize, img.width() as usize, 3],
        values: img.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect(),
    }
}

pub(crate) fn mask_image() -> HostTensor {
    let img = image::open(fixture("refs/mask.png")).unwrap().to_luma8();
    HostTensor {
        shape: vec![img.height() as usize, img.width() as usize],
        values: img.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect(),
    }
}

/// The request of case `case` of `refs/{meta}`.
fn request(meta: &str, case: &str, pipeline: PipelineKind) -> GenerationRequest {
    let m = json(meta);
    let c = &m["cases"][case];
    let scheduler = match c["scheduler"].as_str().unwrap() {
        "PNDMScheduler" => "pndm",
        "DDIMScheduler" => "ddim",
        other => panic!("scheduler {other}"),
    };
    let seed = c["generator"]
        .as_str()
        .unwrap()
        .trim_start_matches("torch.Generator('cpu').manual_seed(")
        .trim_end_matches(')')
        .parse()
        .unwrap();
    let strength = Some(c["strength"].as_f64().unwrap());
    let task = match pipeline {
        PipelineKind::Inpaint => Task::Inpaint(InpaintInput {
            strength,
            ..InpaintInput::new(init_image(), mask_image())
        }),
        PipelineKind::Img2Img => Task::Img2Img(Img2ImgInput {
            image: init_image(),
            strength,
        }),
        other => panic!("{other:?}"),
    };
    GenerationRequest {
        common: CommonRequest {
            prompt: m["prompt"].as_str().unwrap().into(),
            negative_prompt: m["negative_prompt"].as_str().unwrap().into(),
            steps: c["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: c["guidance_scale"].as_f64().unwrap(),
            width: 128,
            height: 64,
            batch: c["num_images_per_prompt"].as_u64().unwrap() as usize,
            seed,
            scheduler: Some(scheduler.parse().unwrap()),
            ..Default::default()
        },
        task,
    }
}

fn inpaint(req: &mut GenerationRequest) -> &mut InpaintInput {
    match &mut req.task {
        Task::Inpaint(input) => input,
        other => panic!("{other:?}"),
    }
}

/// Runs `req` on `pipe` (from the seed, or replaying the reference's tape) and compares the
/// images with `refs/{name}` and the number of UNet calls with its timesteps.
fn check(pipe: &StableDiffusionPipeline<Cpu>, req: &GenerationRequest, name: &str, tape: bool) {
    let r = refs(name);
    let mut tape = tape
        .then(|| NoiseTape::load(fixture(&format!("refs/{name}_tape.safetensors"))).expect("tape"));
    let mut steps = Vec::new();
    let mut observer = |p: &StepProgress| steps.push(p.timestep);
    let out = pipe
        .generate(
            req,
            tape.as_mut().map(|t| t as &mut dyn NoiseSource),
            &CancelToken::new(),
            &mut observer,
        )
        .expect("generate");
    assert_parity(&out.images, name, "image", name);
    let expected: Vec<f64> = r["timesteps"]
        .values
        .iter()
        .map(|&t| f64::from(t))
        .collect();
    assert_eq!(steps, expected, "{name}: the timesteps strength leaves");
    if let Some(t) = tape {
        assert_eq!(t.remaining(), 0, "{name}: every recorded draw used");
    }
}

#[test]
fn img2img_pndm_from_seed_matches_diffusers() {
    let req = request("img2img.json", "pndm", PipelineKind::Img2Img);
    check(&load("tiny-sd"), &req, "img2img_pndm", false);
}

#[test]
fn img2img_ddim_from_tape_matches_diffusers() {
    let req = request("img2img.json", "ddim", PipelineKind::Img2Img);
    check(&load("tiny-sd"), &req, "img2img_ddim", true);
}

#[test]
fn img2img_with_vae_tiling_matches_diffusers() {
    // 64 × 128 is two 64 px tiles wide: the init image's encode and the decode are tiled.
    let mut req = request("img2img.json", "pndm", PipelineKind::Img2Img);
    req.vae_tiling = true;
    let pipe = load("tiny-sd");
    let mut tape = NoiseTape::load(fixture("refs/vae_tiled_img2img_tape.safetensors")).unwrap();
    let out = pipe
        .generate(
            &req,
            Some(&mut tape),
            &CancelToken::new(),
            &mut |_: &StepProgress| {},
        )
        .expect("generate");
    assert_eq!(tape.remaining(), 0, "every recorded draw used");
    assert_parity(
        &out.images,
        "vae_tiled_img2img",
        "image",
        "img2img with VAE tiling",
    );
}

#[test]
fn inpaint_pndm_from_seed_matches_diffusers() {
    let req = request("inpaint.json", "inpaint_pndm", PipelineKind::Inpaint);
    check(&load("tiny-sd-inpaint"), &req, "inpaint_pndm", false);
}

#[test]
fn inpaint_ddim_from_tape_matches_diffusers() {
    let req = request("inpaint.json", "inpaint_ddim", PipelineKind::Inpaint);
    check(&load("tiny-sd-inpaint"), &req, "inpaint_ddim", true);
}

#[test]
fn inpaint_channels_last_matches_diffusers() {
    let mut pipe = load("tiny-sd-inpaint");
    pipe.set_memory_format(MemoryFormat::ChannelsLast);
    let req = request("inpaint.json", "inpaint_ddim", PipelineKind::Inpaint);
    check(&pipe, &req, "inpaint_ddim", false);
}

#[test]
fn inpaint_with_a_plain_unet_matches_diffusers() {
    let req = request("inpaint.json", "inpaint_legacy_ddim", PipelineKind::Inpaint);
    check(&load("tiny-sd"), &req, "inpaint_legacy_ddim", false);
}

#[test]
fn crop_regions_match_diffusers() {
    let m = json("inpaint.json");
    let cases = m["crop_regions"].as_object().unwrap();
    assert!(cases.len() >= 5);
    for (name, c) in cases {
        let n = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
        let (w, h) = (n(&c["image_size"][0]), n(&c["image_size"][1]));
        let b: Vec<usize> = c["box"].as_array().unwrap().iter().map(n).collect();
        let mut values = vec![0.0; w * h];
        for y in b[1]..b[3] {
            for x in b[0]..b[2] {
                values[y * w + x] = 1.0;
            }
        }
        let mask = HostTensor {
            shape: vec![h, w],
            values,
        };
        let region = crop_region(
            &mask,
            n(&c["processing_size"][0]),
            n(&c["processing_size"][1]),
            n(&c["pad"]),
        )
        .unwrap();
        let expected: Vec<usize> = c["crop_region"].as_array().unwrap().iter().map(n).collect();
        assert_eq!(
            [region.x1, region.y1, region.x2, region.y2].to_vec(),
            expected,
            "{name}"
        );
    }
}

#[test]
fn only_masked_inpainting_changes_only_the_masked_pixels() {
    let pipe = load("tiny-sd-inpaint");
    let mut req = request("inpaint.json", "inpaint_ddim", PipelineKind::Inpaint);
    // Work on the mask's box at 64×64 and paste back into the 128×64 original.
    req.width = 64;
    req.height = 64;
    req.batch = 1;
    inpaint(&mut req).padding_mask_crop = Some(4);
    let out = pipe
        .generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
        .unwrap();
    let original = init_image();
    let mask = mask_image();
    assert_eq!(out.images.shape, vec![1, 64, 128, 3], "the original's size");
    let mut changed = 0;
    for (i, m) in mask.values.iter().enumerate() {
        for c in 0..3 {
            let (a, o) = (out.images.values[i * 3 + c], original.values[i * 3 + c]);
            if *m == 0.0 {
                assert_eq!(
                    a, o,
                    "pixel {i} is outside the mask and must be the original's"
                );
            } else if (a - o).abs() > 1e-3 {
                changed += 1;
            }
        }
    }
    let painted = mask.values.iter().filter(|&&m| m > 0.0).count() * 3;
    assert!(
        changed * 2 > painted,
        "most masked values are repainted ({changed} of {painted})"
    );
}

#[test]
fn bad_image_requests_are_rejected_before_any_work() {
    let pipe = load("tiny-sd-inpaint");
    let plain = load("tiny-sd");
    let run = |pipe: &StableDiffusionPipeline<Cpu>, req: &GenerationRequest| {
        pipe.generate(req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
            .unwrap_err()
    };
    let field_of = |e: EngineError| match e {
        EngineError::InvalidInput { field, message } => (field, message),
        other => panic!("expected an invalid-input error, got {other}"),
    };
    let base = request("inpaint.json", "inpaint_ddim", PipelineKind::Inpaint);

    let mut req = base.clone();
    inpaint(&mut req).strength = Some(1.5);
    assert_eq!(field_of(run(&pipe, &req)).0, "strength");

    let mut req = base.clone();
    inpaint(&mut req).strength = Some(0.1); // int(5 · 0.1) = 0 steps
    let (field, message) = field_of(run(&pipe, &req));
    assert_eq!(field, "strength");
    assert!(message.contains("no step"), "{message}");

    let mut req = base.clone();
    inpaint(&mut req).mask = HostTensor {
        shape: vec![32, 32],
        values: vec![1.0; 32 * 32],
    };
    assert_eq!(field_of(run(&pipe, &req)).0, "mask");

    let mut req = base.clone();
    inpaint(&mut req).image = HostTensor {
        shape: vec![64, 128, 4],
        values: vec![0.5; 64 * 128 * 4],
    };
    assert_eq!(field_of(run(&pipe, &req)).0, "image");

    let mut req = base.clone();
    inpaint(&mut req).padding_mask_crop = Some(8);
    inpaint(&mut req).mask = HostTensor {
        shape: vec![64, 128],
        values: vec![0.0; 64 * 128],
    };
    let (field, message) = field_of(run(&pipe, &req));
    assert_eq!(field, "mask");
    assert!(message.contains("empty"), "{message}");

    // An inpainting UNet cannot run txt2img/img2img; img2img takes no latents (its latents
    // are the noised image) and an RGB image only. (A mask given to img2img, or an inpainting
    // without one, cannot be written down: the task types have no place for them.)
    let mut req = base.clone();
    req.task = Task::Txt2Img;
    assert_eq!(field_of(run(&pipe, &req)).0, "pipeline");
    let mut req = request("img2img.json", "ddim", PipelineKind::Img2Img);
    req.latents = Some(HostTensor {
        shape: vec![req.batch, 4, 8, 16],
        values: vec![0.0; req.batch * 4 * 8 * 16],
    });
    assert_eq!(field_of(run(&plain, &req)).0, "latents");
    let mut req = request("img2img.json", "ddim", PipelineKind::Img2Img);
    req.task = Task::Img2Img(Img2ImgInput {
        image: HostTensor {
            shape: vec![64, 128],
            values: vec![0.5; 64 * 128],
        },
        strength: None,
    });
    assert_eq!(field_of(run(&plain, &req)).0, "image");
}

#[test]
fn img2img_resizes_an_image_of_another_size() {
    // A 100×50 picture: resized to the 128×64 working size before encoding, as diffusers'
    // preprocessing does, so the run succeeds at the requested size.
    let pipe = load("tiny-sd");
    let mut req = request("img2img.json", "ddim", PipelineKind::Img2Img);
    req.batch = 1;
    let original = init_image();
    let Task::Img2Img(input) = &mut req.task else {
        panic!("{:?}", req.task)
    };
    input.image = engine::pipelines::image_processor::resize(&original, 100, 50).unwrap();
    let out = pipe
        .generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
        .unwrap();
    assert_eq!(out.images.shape, vec![1, 64, 128, 3]);
    assert!(out.images.values.iter().all(|v| (0.0..=1.0).contains(v)));
}
