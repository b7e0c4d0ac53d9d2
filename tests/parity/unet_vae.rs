//! UNet and VAE parity with diffusers on the tiny fixtures (`tests/fixtures/generate.py`).

use crate::common::{Cpu, assert_close, fixture, host, refs, tensor};
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};
use engine::EngineError;
use engine::models::autoencoders::AutoencoderKL;
use engine::models::unets::{ClassLabels, UNet2DConditionModel};
use engine::models::{AttnProcessor, MemoryFormat};

fn timesteps(
    refs: &std::collections::HashMap<String, engine::tensor_io::HostTensor>,
    name: &str,
) -> Vec<f64> {
    refs[name].values.iter().map(|&v| v as f64).collect()
}

fn labels(
    refs: &std::collections::HashMap<String, engine::tensor_io::HostTensor>,
    name: &str,
) -> ClassLabels<Cpu> {
    let ids: Vec<i64> = refs[name].values.iter().map(|&v| v as i64).collect();
    let n = ids.len();
    ClassLabels::Ids(Tensor::<Cpu, 1, Int>::from_data(
        TensorData::new(ids, [n]),
        &Default::default(),
    ))
}

fn check_unet(folder: &str, ref_name: &str, with_labels: bool, processor: AttnProcessor) {
    check_unet_in(
        folder,
        ref_name,
        with_labels,
        processor,
        MemoryFormat::Contiguous,
    );
}

fn check_unet_in(
    folder: &str,
    ref_name: &str,
    with_labels: bool,
    processor: AttnProcessor,
    format: MemoryFormat,
) {
    let device = Default::default();
    let (mut unet, _) =
        UNet2DConditionModel::<Cpu>::load(&fixture(folder), None, &device).expect("load unet");
    unet.set_attn_processor(processor);
    unet.set_memory_format(format);
    let r = refs(ref_name);
    for suffix in ["", "_odd"] {
        let class = if with_labels {
            labels(&r, &format!("class_labels{suffix}"))
        } else {
            ClassLabels::None
        };
        let out = unet
            .forward(
                tensor(&r, &format!("sample{suffix}")),
                &timesteps(&r, &format!("timestep{suffix}")),
                &tensor(&r, &format!("encoder_hidden_states{suffix}")),
                &class,
            )
            .expect("forward");
        assert_close(
            &host(out),
            &r[&format!("out{suffix}")],
            1e-4,
            1e-4,
            &format!("{folder} {processor:?} {format:?} out{suffix}"),
        );
    }
}

#[test]
fn unet_sd15_matches_diffusers() {
    check_unet("tiny-sd/unet", "unet", false, AttnProcessor::Fused);
}

#[test]
fn unet_attention_processors_agree() {
    check_unet("tiny-sd/unet", "unet", false, AttnProcessor::Vanilla);
    check_unet(
        "tiny-sd/unet",
        "unet",
        false,
        AttnProcessor::Sliced { slice_size: 3 },
    );
}

/// The channels-last switch (NHWC activations, OHWI conv weights, our NHWC conv and GroupNorm
/// on the CPU backend) with every attention processor, on both UNet fixtures (the second has
/// linear projections and class labels), even and odd latent sizes: diffusers' output within
/// 1e-4. Then back to NCHW: the weights are restored and the output is again diffusers'.
#[test]
fn unet_channels_last_matches_diffusers() {
    for processor in [
        AttnProcessor::Fused,
        AttnProcessor::Vanilla,
        AttnProcessor::Sliced { slice_size: 3 },
    ] {
        check_unet_in(
            "tiny-sd/unet",
            "unet",
            false,
            processor,
            MemoryFormat::ChannelsLast,
        );
    }
    check_unet_in(
        "tiny-sd2-unet/unet",
        "unet_sd2",
        true,
        AttnProcessor::Fused,
        MemoryFormat::ChannelsLast,
    );

    let device = Default::default();
    let (mut unet, _) =
        UNet2DConditionModel::<Cpu>::load(&fixture("tiny-sd/unet"), None, &device).unwrap();
    let before = unet.conv_in.weight.val().into_data();
    unet.set_memory_format(MemoryFormat::ChannelsLast);
    assert_eq!(unet.memory_format(), MemoryFormat::ChannelsLast);
    // Every 3×3 conv weight is OHWI in memory behind its [out, in, 3, 3] shape.
    let strides = |w: Tensor<Cpu, 4>| match w.into_primitive() {
        TensorPrimitive::Float(t) => t.layout().strides().to_vec(),
        TensorPrimitive::QFloat(_) => unreachable!("f32 weights"),
    };
    let conv1 = &unet.down_blocks[0].resnets[0].conv1;
    let [_, i, kh, kw] = conv1.weight.dims();
    assert_eq!(
        strides(conv1.weight.val()),
        vec![(i * kh * kw) as isize, 1, (kw * i) as isize, i as isize]
    );
    assert_eq!(
        unet.conv_in.weight.val().into_data(),
        before,
        "same values, only the memory order changes"
    );
    unet.set_memory_format(MemoryFormat::Contiguous);
    let conv1 = &unet.down_blocks[0].resnets[0].conv1;
    assert_eq!(
        strides(conv1.weight.val()),
        vec![(i * kh * kw) as isize, (kh * kw) as isize, kw as isize, 1]
    );
    let r = refs("unet");
    let out = unet
        .forward(
            tensor(&r, "sample"),
            &timesteps(&r, "timestep"),
            &tensor(&r, "encoder_hidden_states"),
            &ClassLabels::None,
        )
        .unwrap();
    assert_close(&host(out), &r["out"], 1e-4, 1e-4, "back to NCHW");
}

#[test]
fn unet_sd2_style_matches_diffusers() {
    // Linear projections, per-block heads, upcast attention, only_cross_attention, class embeds.
    check_unet("tiny-sd2-unet/unet", "unet_sd2", true, AttnProcessor::Fused);
}

#[test]
fn unet_without_class_labels_is_an_error() {
    let device = Default::default();
    let (unet, _) =
        UNet2DConditionModel::<Cpu>::load(&fixture("tiny-sd2-unet/unet"), None, &device).unwrap();
    let r = refs("unet_sd2");
    let err = unet
        .forward(
            tensor(&r, "sample"),
            &[1.0],
            &tensor(&r, "encoder_hidden_states"),
            &ClassLabels::None,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::InvalidInput {
                field: "class_labels",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn vae_encode_and_decode_match_diffusers() {
    let device = Default::default();
    let (vae, config) = AutoencoderKL::<Cpu>::load(&fixture("tiny-sd/vae"), None, &device).unwrap();
    assert_eq!(config.scale_factor(), 8);
    let r = refs("vae");
    let posterior = vae.encode(tensor(&r, "image"));
    assert_close(
        &host(posterior.mean.clone()),
        &r["posterior_mean"],
        1e-4,
        1e-4,
        "posterior mean",
    );
    assert_close(
        &host(posterior.logvar.clone()),
        &r["posterior_logvar"],
        1e-4,
        1e-4,
        "posterior logvar",
    );
    let decoded = vae.decode(tensor(&r, "latents"));
    assert_close(&host(decoded), &r["decoded"], 1e-4, 1e-4, "decoded");
}

#[test]
fn vae_tiled_encode_and_decode_match_diffusers() {
    let device = Default::default();
    let (vae, config) = AutoencoderKL::<Cpu>::load(&fixture("tiny-sd/vae"), None, &device).unwrap();
    let tiling = config.tiling().unwrap();
    assert_eq!((tiling.sample_tile, tiling.latent_tile), (64, 8));
    // 104 × 152 px / 13 × 19 latents: 3 × 4 tiles, the last row and column one latent thin.
    let r = refs("vae_tiled");
    let posterior = vae.encode_tiled(tensor(&r, "image"), Some(&tiling));
    assert_close(
        &host(posterior.mean.clone()),
        &r["posterior_mean"],
        1e-4,
        1e-4,
        "tiled posterior mean",
    );
    assert_close(
        &host(posterior.logvar.clone()),
        &r["posterior_logvar"],
        1e-4,
        1e-4,
        "tiled posterior logvar",
    );
    let decoded = host(vae.decode_tiled(tensor(&r, "latents"), Some(&tiling)));
    assert_close(&decoded, &r["decoded"], 1e-4, 1e-4, "tiled decode");
    // The same latents decoded whole differ by far more than the tolerance, so the test above
    // tells tiling apart from none.
    let whole = host(vae.decode_tiled(tensor(&r, "latents"), None));
    let gap = whole
        .values
        .iter()
        .zip(&r["decoded"].values)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(gap > 0.1, "untiled decode within {gap} of the tiled one");
}

#[test]
fn vae_processors_agree() {
    let device = Default::default();
    let (mut vae, _) = AutoencoderKL::<Cpu>::load(&fixture("tiny-sd/vae"), None, &device).unwrap();
    let r = refs("vae");
    vae.set_attn_processor(AttnProcessor::Vanilla);
    assert_close(
        &host(vae.decode(tensor(&r, "latents"))),
        &r["decoded"],
        1e-4,
        1e-4,
        "decoded vanilla",
    );
}

#[test]
fn missing_unet_weight_names_the_key_and_file() {
    let dir = std::env::temp_dir().join(format!("brushfire-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("tiny-sd/unet/config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(fixture("tiny-sd/unet/diffusion_pytorch_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(k, _)| k != "conv_out.weight")
        .collect();
    let file = dir.join("diffusion_pytorch_model.safetensors");
    safetensors::serialize_to_file(kept, None, &file).unwrap();
    let err = UNet2DConditionModel::<Cpu>::load(&dir, None, &Default::default()).unwrap_err();
    match &err {
        EngineError::MissingTensor { key, file: f } => {
            assert_eq!(key, "conv_out.weight");
            assert_eq!(f, &file);
        }
        other => panic!("expected MissingTensor, got {other}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn misshaped_vae_config_is_a_shape_error() {
    // A config that disagrees with the weights: the error names the tensor.
    let dir = std::env::temp_dir().join(format!("brushfire-shape-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-sd/vae/config.json")).unwrap())
            .unwrap();
    config["latent_channels"] = serde_json::json!(8);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        fixture("tiny-sd/vae/diffusion_pytorch_model.safetensors"),
        dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let err = AutoencoderKL::<Cpu>::load(&dir, None, &Default::default()).unwrap_err();
    assert!(matches!(err, EngineError::ShapeMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("quant_conv")
            || err.to_string().contains("conv_out")
            || err.to_string().contains("conv_in"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fp16_weights_load_into_an_f32_model() {
    // An `fp16` variant file: the model stays f32 and agrees with the f32 weights to f16 precision.
    let dir = std::env::temp_dir().join(format!("brushfire-fp16-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("tiny-sd/vae/config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(fixture("tiny-sd/vae/diffusion_pytorch_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let halves: Vec<(String, Vec<u8>, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view
                .data()
                .chunks_exact(4)
                .flat_map(|c| {
                    burn::tensor::f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .to_le_bytes()
                })
                .collect();
            (name, data, view.shape().to_vec())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = halves
        .iter()
        .map(|(n, d, s)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F16, s.clone(), d)
                .unwrap();
            (n.clone(), view)
        })
        .collect();
    let file = dir.join("diffusion_pytorch_model.fp16.safetensors");
    safetensors::serialize_to_file(views, None, &file).unwrap();

    let (vae, _) = AutoencoderKL::<Cpu>::load(&dir, Some("fp16"), &Default::default()).unwrap();
    let r = refs("vae");
    let decoded = vae.decode(tensor(&r, "latents"));
    assert_eq!(decoded.dtype(), burn::tensor::DType::F32);
    assert_close(
        &host(decoded),
        &r["decoded"],
        2e-2,
        2e-2,
        "decoded from fp16 weights",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
