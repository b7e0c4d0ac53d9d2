//! The x4 upscaler (`StableDiffusionUpscalePipeline`) against diffusers on `tiny-sd-x4`
//! (`tests/fixtures/gen_if.py`), replaying its noise tape (the input's noise, the latents).

use crate::common::{Cpu, assert_parity, fixture, rgb_png};
use engine::noise::{NoiseSource, NoiseTape};
use engine::pipelines::stable_diffusion::{LoadOptions, StableDiffusionPipeline};
use engine::pipelines::{
    CancelToken, CommonRequest, GenerationRequest, PipelineKind, StepProgress, Task, UpscaleInput,
    UpscaleSource,
};

fn pipeline() -> StableDiffusionPipeline<Cpu> {
    StableDiffusionPipeline::load(
        &fixture("tiny-sd-x4"),
        &LoadOptions::default(),
        &Default::default(),
    )
    .expect("load the x4 upscaler")
}

fn request() -> GenerationRequest {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("refs/upscale.json")).unwrap())
            .unwrap();
    GenerationRequest {
        common: CommonRequest {
            prompt: m["prompt"].as_str().unwrap().into(),
            negative_prompt: m["negative_prompt"].as_str().unwrap().into(),
            steps: m["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: m["guidance_scale"].as_f64().unwrap(),
            width: 128,
            height: 64,
            batch: 2,
            seed: m["seed"].as_u64().unwrap(),
            ..Default::default()
        },
        task: Task::Upscale(UpscaleInput {
            source: UpscaleSource::Image(rgb_png("refs/lowres.png")),
            noise_level: Some(m["noise_level"].as_u64().unwrap() as usize),
        }),
    }
}

fn generate(
    pipe: &StableDiffusionPipeline<Cpu>,
    request: &GenerationRequest,
) -> engine::Result<engine::pipelines::stable_diffusion::GenerationOutput> {
    let mut tape = NoiseTape::load(fixture("refs/upscale_tape.safetensors")).unwrap();
    let out = pipe.generate(
        request,
        Some(&mut tape as &mut dyn NoiseSource),
        &CancelToken::new(),
        &mut |_: &StepProgress| {},
    )?;
    assert_eq!(tape.remaining(), 0, "every draw of the tape is used");
    Ok(out)
}

#[test]
fn x4_upscaler_matches_diffusers() {
    let pipe = pipeline();
    assert_eq!(pipe.limits().family, Some(PipelineKind::Upscale));
    assert_eq!(pipe.limits().max_noise_level, 350);
    let out = generate(&pipe, &request()).expect("upscale");
    assert_eq!(out.images.shape, vec![2, 64, 128, 3]);
    assert_parity(&out.images, "upscale", "image", "x4 upscaler");
}

/// The same input as an array (`--image-array`, [-1, 1]) gives the same images.
#[test]
fn x4_upscaler_takes_an_image_array() {
    let pipe = pipeline();
    let png = rgb_png("refs/lowres.png");
    let (h, w) = (png.shape[0], png.shape[1]);
    let mut values = vec![0.0; 3 * h * w];
    for (i, v) in png.values.iter().enumerate() {
        let (pixel, c) = (i / 3, i % 3);
        values[c * h * w + pixel] = v * 2.0 - 1.0;
    }
    let mut req = request();
    if let Task::Upscale(input) = &mut req.task {
        input.source = UpscaleSource::Array(engine::tensor_io::HostTensor {
            shape: vec![1, 3, h, w],
            values,
        });
    }
    let out = generate(&pipe, &req).expect("upscale");
    assert_parity(&out.images, "upscale", "image", "from an array");
}

#[test]
fn x4_upscaler_requests_are_checked() {
    let pipe = pipeline();
    let err = |req: &GenerationRequest| match generate(&pipe, req) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    let mut req = request();
    if let Task::Upscale(input) = &mut req.task {
        input.noise_level = Some(351);
    }
    assert!(err(&req).contains("noise_level"), "{}", err(&req));
    let mut req = request();
    req.width = 120;
    assert!(err(&req).contains("width"), "{}", err(&req));
    let mut req = request();
    req.task = Task::Txt2Img;
    assert!(err(&req).contains("upscale pipeline"), "{}", err(&req));
    // An SD model cannot upscale.
    let sd = StableDiffusionPipeline::<Cpu>::load(
        &fixture("tiny-sd"),
        &LoadOptions::default(),
        &Default::default(),
    )
    .unwrap();
    let e = sd
        .generate(
            &request(),
            None,
            &CancelToken::new(),
            &mut |_: &StepProgress| {},
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("cannot run upscale"), "{e}");
}
