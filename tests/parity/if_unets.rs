//! DeepFloyd IF UNets (stage I, stage II, and the options IF's configs leave at defaults)
//! against diffusers on the tiny fixtures (`tests/fixtures/gen_if.py`).

use crate::common::{Cpu, assert_close, fixture, host, refs, tensor};
use engine::EngineError;
use engine::models::unets::{ClassLabels, UNet2DConditionModel};
use engine::models::{AttnProcessor, MemoryFormat};

fn check(folder: &str, name: &str, processor: AttnProcessor, format: MemoryFormat) {
    let device = Default::default();
    let (mut unet, _) =
        UNet2DConditionModel::<Cpu>::load(&fixture(folder), None, &device).expect("load unet");
    unet.set_attn_processor(processor);
    unet.set_memory_format(format);
    let r = refs("if_unets");
    let key = |k: &str| format!("{name}.{k}");
    let timesteps: Vec<f64> = r[&key("timestep")]
        .values
        .iter()
        .map(|&v| v as f64)
        .collect();
    let class = match r.get(&key("class_labels")) {
        Some(levels) => ClassLabels::Levels(levels.values.iter().map(|&v| v as f64).collect()),
        None => ClassLabels::None,
    };
    let out = unet
        .forward(
            tensor(&r, &key("sample")),
            &timesteps,
            &tensor(&r, &key("encoder_hidden_states")),
            &class,
        )
        .expect("forward");
    assert_close(
        &host(out),
        &r[&key("out")],
        1e-4,
        1e-4,
        &format!("{folder} {processor:?} {format:?}"),
    );
}

#[test]
fn if_stage_i_unet_matches_diffusers() {
    check(
        "tiny-if/unet",
        "if_i",
        AttnProcessor::Fused,
        MemoryFormat::Contiguous,
    );
}

#[test]
fn if_stage_ii_unet_matches_diffusers() {
    check(
        "tiny-if-ii/unet",
        "if_ii",
        AttnProcessor::Fused,
        MemoryFormat::Contiguous,
    );
}

#[test]
fn if_unet_options_match_diffusers() {
    check(
        "tiny-if-variant/unet",
        "if_variant",
        AttnProcessor::Fused,
        MemoryFormat::Contiguous,
    );
}

/// Every speed switch leaves the IF UNets' output within the f32 bound.
#[test]
fn if_unets_under_every_processor_and_channels_last() {
    for processor in [
        AttnProcessor::Vanilla,
        AttnProcessor::Sliced { slice_size: 1 },
    ] {
        check("tiny-if/unet", "if_i", processor, MemoryFormat::Contiguous);
    }
    check(
        "tiny-if/unet",
        "if_i",
        AttnProcessor::Fused,
        MemoryFormat::ChannelsLast,
    );
    check(
        "tiny-if-ii/unet",
        "if_ii",
        AttnProcessor::Vanilla,
        MemoryFormat::ChannelsLast,
    );
}

/// A text of the wrong width is an error naming it, not a panic in the projection.
#[test]
fn if_unet_rejects_a_text_of_the_wrong_width() {
    let device = Default::default();
    let (unet, _) = UNet2DConditionModel::<Cpu>::load(&fixture("tiny-if/unet"), None, &device)
        .expect("load unet");
    let r = refs("if_unets");
    let wrong = burn::tensor::Tensor::<Cpu, 3>::zeros([2, 5, 7], &device);
    let err = unet
        .forward(
            tensor(&r, "if_i.sample"),
            &[10.0],
            &wrong,
            &ClassLabels::None,
        )
        .expect_err("width 7");
    assert!(
        matches!(&err, EngineError::InvalidInput { field, .. } if *field == "encoder_hidden_states"),
        "{err}"
    );
}
