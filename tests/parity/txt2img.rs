//! The whole txt2img pipeline against diffusers' `StableDiffusionPipeline` on the tiny fixture,
//! per scheduler, given explicit latents (and a seeded generator for stochastic schedulers).

use crate::common::{Cpu, assert_close, assert_parity, fixture, refs};
use burn::tensor::backend::Backend;
use engine::EngineError;
use engine::models::MemoryFormat;
use engine::noise::NoiseTape;
use engine::pipelines::stable_diffusion::{LoadOptions, StableDiffusionPipeline};
use engine::pipelines::{CancelToken, CommonRequest, GenerationRequest, StepProgress, Task};

fn pipeline() -> StableDiffusionPipeline<Cpu> {
    pipeline_on(&Default::default())
}

pub(crate) fn pipeline_on<B: Backend>(device: &B::Device) -> StableDiffusionPipeline<B> {
    StableDiffusionPipeline::load(&fixture("tiny-sd"), &LoadOptions::default(), device)
        .expect("load tiny-sd")
}

pub(crate) fn request(scheduler: Option<&str>) -> GenerationRequest {
    let params: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("refs/txt2img.json")).unwrap())
            .unwrap();
    GenerationRequest {
        common: CommonRequest {
            prompt: params["prompt"].as_str().unwrap().into(),
            negative_prompt: params["negative_prompt"].as_str().unwrap().into(),
            steps: params["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: params["guidance_scale"].as_f64().unwrap(),
            width: params["width"].as_u64().unwrap() as usize,
            height: params["height"].as_u64().unwrap() as usize,
            batch: params["num_images_per_prompt"].as_u64().unwrap() as usize,
            seed: 1234,
            scheduler: scheduler.map(|s| s.parse().unwrap()),
            ..Default::default()
        },
        task: Task::Txt2Img,
    }
}

fn check(ref_name: &str, scheduler: Option<&str>) {
    check_on(&pipeline(), ref_name, scheduler, false);
}

/// Runs the reference request on `pipe` and compares the images; `tape` replays the draws
/// diffusers recorded instead of the seeded generator.
pub(crate) fn check_on<B: Backend>(
    pipe: &StableDiffusionPipeline<B>,
    ref_name: &str,
    scheduler: Option<&str>,
    tape: bool,
) {
    check_on_within(pipe, ref_name, scheduler, tape, None);
}

/// [`check_on`] with another tolerance (absolute and relative), for f16; `None` is f32's
/// [`parity_tolerance`](crate::common::parity_tolerance).
pub(crate) fn check_on_within<B: Backend>(
    pipe: &StableDiffusionPipeline<B>,
    ref_name: &str,
    scheduler: Option<&str>,
    tape: bool,
    tolerance: Option<f32>,
) {
    let r = refs(ref_name);
    let mut req = request(scheduler);
    req.latents = Some(r["latents"].clone());
    let mut steps = Vec::new();
    let mut observer = |p: &StepProgress| steps.push(*p);
    let mut tape = tape.then(|| {
        NoiseTape::load(fixture(&format!("refs/{ref_name}_tape.safetensors"))).expect("tape")
    });
    let noise = tape
        .as_mut()
        .map(|t| t as &mut dyn engine::noise::NoiseSource);
    let out = pipe
        .generate(&req, noise, &CancelToken::new(), &mut observer)
        .expect("generate");
    match tolerance {
        Some(tolerance) => assert_close(&out.images, &r["image"], tolerance, tolerance, ref_name),
        None => assert_parity(&out.images, ref_name, "image", ref_name),
    }
    let expected_steps = r["timesteps"].values.len();
    assert_eq!(steps.len(), expected_steps, "one report per UNet call");
    assert_eq!(
        steps.last().map(|p| (p.step, p.total)),
        Some((expected_steps, expected_steps))
    );
}

#[test]
fn txt2img_pndm_matches_diffusers() {
    check("txt2img_pndm", None);
}

#[test]
fn txt2img_channels_last_matches_diffusers() {
    let mut pipe = pipeline();
    pipe.set_memory_format(MemoryFormat::ChannelsLast);
    check_on(&pipe, "txt2img_pndm", None, false);
}

#[test]
fn txt2img_ddim_matches_diffusers() {
    check("txt2img_ddim", Some("ddim"));
}

#[test]
fn txt2img_euler_matches_diffusers() {
    check("txt2img_euler", Some("euler"));
}

#[test]
fn txt2img_euler_ancestral_matches_diffusers() {
    check("txt2img_euler_a", Some("euler-a"));
}

#[test]
fn txt2img_dpmpp_2m_matches_diffusers() {
    check("txt2img_dpmpp_2m", Some("dpm++2m"));
}

#[test]
fn txt2img_ddpm_matches_diffusers() {
    check("txt2img_ddpm", Some("ddpm"));
}

#[test]
fn txt2img_from_seed_matches_diffusers() {
    let pipe = pipeline();
    let mut req = request(None);
    req.batch = 1;
    req.seed = 42;
    let out = pipe
        .generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
        .unwrap();
    assert_parity(&out.images, "txt2img_seed", "image", "txt2img from seed 42");
}

#[test]
fn cancel_stops_the_loop() {
    let pipe = pipeline();
    let cancel = CancelToken::new();
    let mut req = request(None);
    req.batch = 1;
    let mut seen = 0;
    let c = cancel.clone();
    let mut observer = |p: &StepProgress| {
        seen = p.step;
        if p.step == 2 {
            c.cancel();
        }
    };
    let err = pipe
        .generate(&req, None, &cancel, &mut observer)
        .unwrap_err();
    assert!(matches!(err, EngineError::Cancelled));
    assert_eq!(seen, 2, "stopped right after the step that cancelled");
}

#[test]
fn bad_requests_are_rejected_before_any_work() {
    let pipe = pipeline();
    for (field, edit) in [
        (
            "width",
            Box::new(|r: &mut GenerationRequest| r.width = 100)
                as Box<dyn Fn(&mut GenerationRequest)>,
        ),
        ("height", Box::new(|r: &mut GenerationRequest| r.height = 0)),
        ("steps", Box::new(|r: &mut GenerationRequest| r.steps = 0)),
        ("batch", Box::new(|r: &mut GenerationRequest| r.batch = 0)),
        (
            "guidance",
            Box::new(|r: &mut GenerationRequest| r.guidance_scale = f64::NAN),
        ),
        (
            "latents",
            Box::new(|r: &mut GenerationRequest| {
                r.latents = Some(engine::tensor_io::HostTensor {
                    shape: vec![1, 4, 8, 8],
                    values: vec![0.0; 256],
                })
            }),
        ),
    ] {
        let mut req = request(None);
        edit(&mut req);
        let mut called = false;
        let err = pipe
            .generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {
                called = true
            })
            .unwrap_err();
        match err {
            EngineError::InvalidInput { field: f, .. } => assert_eq!(f, field),
            other => panic!("{field}: expected InvalidInput, got {other}"),
        }
        assert!(!called, "{field}: no step may run");
    }
}

/// Records every step and every preview.
#[derive(Default)]
struct PreviewRecorder {
    steps: usize,
    previews: Vec<(usize, engine::tensor_io::HostTensor)>,
}

impl engine::pipelines::StepObserver for PreviewRecorder {
    fn on_step(&mut self, _progress: &StepProgress) {
        self.steps += 1;
    }
    fn wants_preview(&self, _step: usize) -> bool {
        true
    }
    fn on_preview(&mut self, step: usize, preview: engine::tensor_io::HostTensor) {
        self.previews.push((step, preview));
    }
}

/// The live preview after step k is the SD 1.5 latent→RGB map of diffusers' latents after
/// step k (PNDM's model input is the latents unscaled), for every step but the last (which is
/// decoded by the VAE instead).
#[test]
fn live_previews_map_diffusers_latents_of_each_step() {
    use engine::pipelines::preview::latents_to_rgb_preview_reference;
    use engine::tensor_io::HostTensor;
    let r = refs("txt2img_pndm");
    let mut req = request(None);
    req.latents = Some(r["latents"].clone());
    let mut recorder = PreviewRecorder::default();
    pipeline()
        .generate(&req, None, &CancelToken::new(), &mut recorder)
        .expect("generate");
    let steps = r["timesteps"].values.len();
    assert_eq!(recorder.steps, steps);
    assert_eq!(
        recorder
            .previews
            .iter()
            .map(|(s, _)| *s)
            .collect::<Vec<_>>(),
        (1..steps).collect::<Vec<_>>()
    );
    let all = &r["step_latents"]; // [steps, batch, 4, h, w]
    let [batch, c, h, w] = [all.shape[1], all.shape[2], all.shape[3], all.shape[4]];
    for (step, preview) in &recorder.previews {
        let start = (step - 1) * batch * c * h * w;
        let first_image = HostTensor {
            shape: vec![1, c, h, w],
            values: all.values[start..start + c * h * w].to_vec(),
        };
        let expected = latents_to_rgb_preview_reference(&first_image).unwrap();
        assert_eq!(preview.shape, vec![h, w, 3]);
        assert_close(preview, &expected, 1e-4, 1e-4, &format!("preview {step}"));
    }
}

/// The same tiny weights in the LDM / A1111 single-file layout (written by
/// `tests/fixtures/gen_single_file.py` and read back equal by diffusers' `from_single_file`)
/// give diffusers' image: every key is renamed and reshaped as diffusers does.
#[test]
fn single_file_checkpoint_gives_the_folders_image() {
    let pipe = StableDiffusionPipeline::<Cpu>::load_single_file(
        &fixture("tiny-sd-single-file.safetensors"),
        &fixture("tiny-sd"),
        &Default::default(),
    )
    .expect("load the single file");
    check_on(&pipe, "txt2img_pndm", None, false);
}

#[test]
fn files_that_are_not_sd1_checkpoints_are_named_errors() {
    // A safetensors file without a UNet.
    let not_sd = fixture("refs/txt2img_pndm.safetensors");
    let err = StableDiffusionPipeline::<Cpu>::load_single_file(
        &not_sd,
        &fixture("tiny-sd"),
        &Default::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, EngineError::Config { path, message } if path == &not_sd && message.contains("model.diffusion_model")),
        "{err}"
    );
    // An SD 2.x checkpoint (OpenCLIP text encoder) is refused with a reason.
    let keys: Vec<String> = [
        "model.diffusion_model.out.2.weight",
        "cond_stage_model.model.token_embedding.weight",
    ]
    .map(String::from)
    .to_vec();
    let err = engine::loading::single_file::map_single_file_keys(
        &keys,
        2,
        std::path::Path::new("sd21.safetensors"),
    )
    .unwrap_err();
    assert!(
        matches!(&err, EngineError::Unsupported(m) if m.contains("SD 2.x")),
        "{err}"
    );
}
