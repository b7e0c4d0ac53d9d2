//! ControlNet parity with diffusers on the tiny fixture: the model's residuals (plain and guess
//! mode), the UNet taking them (also channels-last), and the ControlNet pipeline.

use crate::common::{Cpu, assert_close, fixture, host, refs, tensor};
use engine::memory::MemoryBudget;
use engine::models::controlnets::ControlNetModel;
use engine::models::unets::{ClassLabels, ControlResiduals, UNet2DConditionModel};
use engine::models::{AttnProcessor, MemoryFormat};

type Refs = std::collections::HashMap<String, engine::tensor_io::HostTensor>;

fn timesteps(r: &Refs) -> Vec<f64> {
    r["timestep"].values.iter().map(|&v| f64::from(v)).collect()
}

fn load_controlnet() -> ControlNetModel<Cpu> {
    ControlNetModel::<Cpu>::load(
        &fixture("tiny-controlnet"),
        None,
        &MemoryBudget::Unchecked,
        &Default::default(),
    )
    .expect("load tiny-controlnet")
    .0
}

fn residuals(r: &Refs, prefix: &str) -> ControlResiduals<Cpu> {
    let n = (0..)
        .take_while(|i| r.contains_key(&format!("{prefix}down.{i}")))
        .count();
    ControlResiduals {
        down: (0..n)
            .map(|i| tensor(r, &format!("{prefix}down.{i}")))
            .collect(),
        mid: tensor(r, &format!("{prefix}mid")),
    }
}

#[test]
fn controlnet_residuals_match_diffusers() {
    let r = refs("controlnet");
    for (processor, format) in [
        (AttnProcessor::Vanilla, MemoryFormat::Contiguous),
        (AttnProcessor::Fused, MemoryFormat::Contiguous),
        (AttnProcessor::Fused, MemoryFormat::ChannelsLast),
    ] {
        let mut controlnet = load_controlnet();
        controlnet.set_attn_processor(processor);
        controlnet.set_memory_format(format);
        for (prefix, guess) in [("", false), ("guess_", true)] {
            let out = controlnet
                .forward(
                    tensor(&r, "sample"),
                    &timesteps(&r),
                    &tensor(&r, "encoder_hidden_states"),
                    tensor(&r, "controlnet_cond"),
                    0.8,
                    guess,
                )
                .expect("controlnet forward");
            let expected = residuals(&r, prefix);
            // What the memory check counts as held through the UNet's pass is what came out.
            let [batch, _, h, w] = tensor(&r, "sample").dims();
            let held: usize = out
                .down
                .iter()
                .chain([&out.mid])
                .map(|t| t.shape().num_elements())
                .sum();
            assert_eq!(controlnet.residual_elements([h, w]) * batch, held);
            assert_eq!(out.down.len(), expected.down.len(), "one residual per skip");
            assert_eq!(out.down.len(), 12);
            for (i, (a, e)) in out.down.into_iter().zip(expected.down).enumerate() {
                assert_close(&host(a), &host(e), 1e-4, 1e-4, &format!("{prefix}down.{i}"));
            }
            assert_close(
                &host(out.mid),
                &host(expected.mid),
                1e-4,
                1e-4,
                &format!("{prefix}mid"),
            );
        }
    }
}

/// The tiny ControlNet in the original `control_model.` layout (written by
/// `gen_single_file.py`, read back equal by diffusers' `ControlNetModel.from_single_file`),
/// configured from tiny-sd's UNet config, gives diffusers' residuals.
#[test]
fn single_file_controlnet_gives_diffusers_residuals() {
    let (_, unet_config) =
        UNet2DConditionModel::<Cpu>::load(&fixture("tiny-sd/unet"), None, &Default::default())
            .expect("load unet");
    let file = fixture("tiny-controlnet-single-file.safetensors");
    let (controlnet, config) = ControlNetModel::<Cpu>::load_single_file(
        &file,
        &unet_config,
        &MemoryBudget::Unchecked,
        &Default::default(),
    )
    .expect("load single-file controlnet");
    assert_eq!(
        config.conditioning_embedding_out_channels,
        vec![8, 8, 16, 16]
    );
    assert_eq!(config.conditioning_channels, 3);
    let r = refs("controlnet");
    let out = controlnet
        .forward(
            tensor(&r, "sample"),
            &timesteps(&r),
            &tensor(&r, "encoder_hidden_states"),
            tensor(&r, "controlnet_cond"),
            0.8,
            false,
        )
        .expect("controlnet forward");
    let expected = residuals(&r, "");
    assert_eq!(out.down.len(), expected.down.len());
    for (i, (a, e)) in out.down.into_iter().zip(expected.down).enumerate() {
        assert_close(&host(a), &host(e), 1e-4, 1e-4, &format!("down.{i}"));
    }
    assert_close(&host(out.mid), &host(expected.mid), 1e-4, 1e-4, "mid");

    // A Stable Diffusion checkpoint is not a ControlNet, and a ControlNet does not fit a UNet
    // of other widths: both are errors that say so.
    let sd_file = fixture("tiny-sd-single-file.safetensors");
    let err = ControlNetModel::<Cpu>::load_single_file(
        &sd_file,
        &unet_config,
        &MemoryBudget::Unchecked,
        &Default::default(),
    )
    .expect_err("an SD checkpoint");
    assert!(
        err.to_string().contains("not a ControlNet checkpoint"),
        "{err}"
    );
    let (_, sd2) = UNet2DConditionModel::<Cpu>::load(
        &fixture("tiny-sd2-unet/unet"),
        None,
        &Default::default(),
    )
    .expect("load sd2 unet");
    let err = ControlNetModel::<Cpu>::load_single_file(
        &file,
        &sd2,
        &MemoryBudget::Unchecked,
        &Default::default(),
    )
    .expect_err("other UNet");
    assert!(!err.to_string().is_empty());
}

#[test]
fn unet_adds_controlnet_residuals_like_diffusers() {
    let r = refs("controlnet");
    for format in [MemoryFormat::Contiguous, MemoryFormat::ChannelsLast] {
        let (mut unet, _) =
            UNet2DConditionModel::<Cpu>::load(&fixture("tiny-sd/unet"), None, &Default::default())
                .expect("load unet");
        unet.set_memory_format(format);
        let out = unet
            .forward_with_residuals(
                tensor(&r, "sample"),
                &timesteps(&r),
                &tensor(&r, "encoder_hidden_states"),
                &ClassLabels::None,
                Some(&residuals(&r, "")),
            )
            .expect("unet forward");
        assert_close(
            &host(out),
            &r["unet_out"],
            1e-4,
            1e-4,
            &format!("unet_out {format:?}"),
        );
    }
}

#[test]
fn mismatched_control_inputs_are_errors() {
    let r = refs("controlnet");
    let controlnet = load_controlnet();
    // A control image at the latent size instead of the pixel size.
    let err = controlnet
        .forward(
            tensor(&r, "sample"),
            &timesteps(&r),
            &tensor(&r, "encoder_hidden_states"),
            tensor::<4>(&r, "sample").narrow(1, 0, 3),
            1.0,
            false,
        )
        .unwrap_err();
    assert!(err.to_string().contains("control_image"), "{err}");
    let (unet, _) =
        UNet2DConditionModel::<Cpu>::load(&fixture("tiny-sd/unet"), None, &Default::default())
            .unwrap();
    let mut short = residuals(&r, "");
    short.down.pop();
    let err = unet
        .forward_with_residuals(
            tensor(&r, "sample"),
            &timesteps(&r),
            &tensor(&r, "encoder_hidden_states"),
            &ClassLabels::None,
            Some(&short),
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("11 residuals for 12 skips"),
        "{err}"
    );
}

mod pipeline {
    use crate::common::{Cpu, assert_parity, fixture};
    use engine::noise::{NoiseSource, NoiseTape};
    use engine::pipelines::stable_diffusion::{LoadOptions, StableDiffusionPipeline};
    use engine::pipelines::{
        CancelToken, CommonRequest, ControlNetInput, GenerationRequest, StepProgress, Task,
    };
    use engine::tensor_io::HostTensor;

    fn control_image() -> HostTensor {
        crate::common::rgb_png("refs/control.png")
    }

    fn pipeline() -> StableDiffusionPipeline<Cpu> {
        let mut pipe = StableDiffusionPipeline::load(
            &fixture("tiny-sd"),
            &LoadOptions::default(),
            &Default::default(),
        )
        .unwrap();
        pipe.load_controlnet(&fixture("tiny-controlnet")).unwrap();
        pipe
    }

    fn request(case: &str) -> GenerationRequest {
        let m: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture("refs/controlnet.json")).unwrap(),
        )
        .unwrap();
        let c = &m["cases"][case];
        GenerationRequest {
            common: CommonRequest {
                prompt: m["prompt"].as_str().unwrap().into(),
                negative_prompt: m["negative_prompt"].as_str().unwrap().into(),
                steps: 5,
                guidance_scale: c["guidance_scale"].as_f64().unwrap(),
                width: 128,
                height: 64,
                batch: 2,
                seed: 2468,
                scheduler: Some(match c["scheduler"].as_str().unwrap() {
                    "PNDMScheduler" => engine::schedulers::SchedulerKind::Pndm,
                    _ => engine::schedulers::SchedulerKind::Ddim,
                }),
                ..Default::default()
            },
            task: Task::ControlNet(ControlNetInput {
                image: control_image(),
                scale: c["controlnet_conditioning_scale"].as_f64().unwrap(),
                guidance: (
                    c["control_guidance_start"].as_f64().unwrap(),
                    c["control_guidance_end"].as_f64().unwrap(),
                ),
                guess_mode: c["guess_mode"].as_bool().unwrap(),
            }),
        }
    }

    fn control(req: &mut GenerationRequest) -> &mut ControlNetInput {
        match &mut req.task {
            Task::ControlNet(control) => control,
            other => panic!("{other:?}"),
        }
    }

    fn check(pipe: &StableDiffusionPipeline<Cpu>, name: &str, tape: bool) {
        let mut tape = tape
            .then(|| NoiseTape::load(fixture(&format!("refs/{name}_tape.safetensors"))).unwrap());
        let out = pipe
            .generate(
                &request(name),
                tape.as_mut().map(|t| t as &mut dyn NoiseSource),
                &CancelToken::new(),
                &mut |_: &StepProgress| {},
            )
            .expect("generate");
        assert_parity(&out.images, name, "image", name);
    }

    #[test]
    fn controlnet_pipeline_matches_diffusers() {
        let pipe = pipeline();
        check(&pipe, "controlnet_pndm", false);
        // Guess mode, scale 0.7, the ControlNet only on steps 2-4 of 5, from the tape.
        check(&pipe, "controlnet_ddim_guess", true);
    }

    /// Channels-last reaches the ControlNet whether it is set before or after the ControlNet
    /// loads, and changes nothing beyond the parity bound.
    #[test]
    fn controlnet_pipeline_in_channels_last_matches_diffusers() {
        use engine::models::MemoryFormat;
        let mut pipe = pipeline();
        pipe.set_memory_format(MemoryFormat::ChannelsLast);
        let format =
            |p: &StableDiffusionPipeline<Cpu>| p.controlnet.as_ref().unwrap().memory_format();
        assert_eq!(format(&pipe), MemoryFormat::ChannelsLast);
        check(&pipe, "controlnet_pndm", false);
        pipe.load_controlnet(&fixture("tiny-controlnet")).unwrap();
        assert_eq!(format(&pipe), MemoryFormat::ChannelsLast);
        check(&pipe, "controlnet_ddim_guess", true);
        pipe.set_memory_format(MemoryFormat::Contiguous);
        assert_eq!(format(&pipe), MemoryFormat::Contiguous);
    }

    #[test]
    fn controlnet_requests_are_checked() {
        let plain = StableDiffusionPipeline::<Cpu>::load(
            &fixture("tiny-sd"),
            &LoadOptions::default(),
            &Default::default(),
        )
        .unwrap();
        let run = |pipe: &StableDiffusionPipeline<Cpu>, req: &GenerationRequest| {
            pipe.generate(req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
                .unwrap_err()
                .to_string()
        };
        let err = run(&plain, &request("controlnet_pndm"));
        assert!(err.contains("load one first"), "{err}");
        let pipe = pipeline();
        let mut req = request("controlnet_pndm");
        control(&mut req).guidance = (0.8, 0.2);
        assert!(run(&pipe, &req).contains("control_guidance"));
        let mut req = request("controlnet_pndm");
        control(&mut req).image = HostTensor {
            shape: vec![4, 4],
            values: vec![0.0; 16],
        };
        assert!(run(&pipe, &req).contains("control_image"));
        let mut req = request("controlnet_pndm");
        control(&mut req).scale = f64::NAN;
        assert!(run(&pipe, &req).contains("controlnet_scale"));
    }
}
