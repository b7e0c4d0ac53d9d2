//! ControlNet parity with diffusers on the tiny fixture: the model's residuals (plain and guess
//! mode), the UNet taking them (also channels-last), and the ControlNet pipeline.

use crate::common::{Cpu, assert_close, fixture, host, refs, tensor};
use engine::models::controlnets::ControlNetModel;
use engine::models::unets::{ClassLabels, ControlResiduals, UNet2DConditionModel};
use engine::models::{AttnProcessor, MemoryFormat};

type Refs = std::collections::HashMap<String, engine::tensor_io::HostTensor>;

fn timesteps(r: &Refs) -> Vec<f64> {
    r["timestep"].values.iter().map(|&v| f64::from(v)).collect()
}

fn load_controlnet() -> ControlNetModel<Cpu> {
    ControlNetModel::<Cpu>::load(&fixture("tiny-controlnet"), None, &Default::default())
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
    for processor in [AttnProcessor::Vanilla, AttnProcessor::Fused] {
        let mut controlnet = load_controlnet();
        controlnet.set_attn_processor(processor);
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
