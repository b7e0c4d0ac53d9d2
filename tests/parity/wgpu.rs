//! The engine on wgpu (Mesa's lavapipe in CI) against the same diffusers references as on the
//! CPU: the text encoder, UNet, scheduler and VAE through two whole txt2img runs, plus the UNet
//! and the VAE encoder on their own. One test, so every kernel is compiled once: on a software
//! adapter each kernel's first call costs seconds. Skips with a notice when no adapter exists.

use burn::backend::Wgpu;
use burn::backend::wgpu::{CubeBackend, WgpuDevice, WgpuRuntime};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, IntDType, Tensor, TensorData, set_default_dtypes};
use engine::backend::{BackendKind, BackendRequest, select_backend};
use engine::models::MemoryFormat;
use engine::models::cube_attention::{
    flash_calls, forced_flash_attention, materialised_fallbacks, own_kernel_calls,
};
use engine::models::unets::ClassLabels;
use engine::tensor_io::HostTensor;

use crate::common::{assert_close, refs};
use crate::txt2img::{check_on, check_on_within, pipeline_on, request};
use engine::pipelines::stable_diffusion::StableDiffusionPipeline;
use engine::pipelines::{CancelToken, StepProgress};

/// Burn's plain CubeCL backend on wgpu: the "fusion off" switch.
type WgpuUnfused = CubeBackend<WgpuRuntime, f32, i32, u32>;
/// f16 bound (absolute + relative) for the UNet's output (|out| ≈ 1 on the tiny model): f16
/// keeps ~3 significant digits and the UNet chains a few dozen roundings; GroupNorm statistics
/// are f32 (docs/architecture.md §1). Measured on lavapipe: max |diff| 1.8e-2.
const F16_UNET_TOLERANCE: f32 = 3e-2;
/// f16 bound for the final image in [0, 1] after 6 PNDM steps (the VAE runs in f32).
/// Measured on lavapipe: max |diff| 2.6e-2.
const F16_IMAGE_TOLERANCE: f32 = 4e-2;

/// Held, for the whole test, by every test that runs attention through the engine's flash
/// routing (fused processor, `forced_flash_attention`), so that one test's kernel calls cannot
/// be counted in another's counter checks (tests run in parallel).
static FLASH_COUNTERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lock_flash_counters() -> std::sync::MutexGuard<'static, ()> {
    FLASH_COUNTERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn adapter() -> Option<WgpuDevice> {
    match select_backend(BackendRequest::Wgpu) {
        Ok(selected) => {
            assert_eq!(selected.kind, BackendKind::Wgpu);
            eprintln!("wgpu adapter: {selected}");
            Some(WgpuDevice::DefaultDevice)
        }
        Err(e) => {
            // CI installs lavapipe and sets this, so a broken adapter cannot pass as a skip.
            assert!(
                std::env::var_os("BRUSHFIRE_REQUIRE_WGPU").is_none(),
                "BRUSHFIRE_REQUIRE_WGPU is set but there is no wgpu adapter: {e}"
            );
            eprintln!("SKIPPED: no wgpu adapter ({e})");
            None
        }
    }
}

fn upload<B: Backend, const D: usize>(t: &HostTensor, device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(
        TensorData::new(t.values.clone(), t.shape.clone()).convert::<B::FloatElem>(),
        device,
    )
}

/// The UNet alone against diffusers' output.
fn check_unet<B: Backend>(
    pipe: &engine::pipelines::stable_diffusion::StableDiffusionPipeline<B>,
    device: &B::Device,
    tolerance: f32,
    what: &str,
) {
    let r = refs("unet");
    let ts: Vec<f64> = r["timestep"].values.iter().map(|&v| v as f64).collect();
    let out = pipe
        .unet
        .forward(
            upload(&r["sample"], device),
            &ts,
            &upload(&r["encoder_hidden_states"], device),
            &ClassLabels::None,
        )
        .unwrap();
    assert_close(
        &HostTensor::from_tensor(out).unwrap(),
        &r["out"],
        tolerance,
        tolerance,
        what,
    );
}

#[test]
fn engine_matches_diffusers_on_wgpu() {
    let Some(device) = adapter() else { return };
    let mut pipe = pipeline_on::<Wgpu>(&device);

    // f32 attention under the fused processor runs our flash kernel, never materialised scores.
    let _counters = lock_flash_counters();
    let (own, materialised) = (own_kernel_calls(), materialised_fallbacks());
    check_unet(&pipe, &device, 1e-4, "wgpu unet");
    assert!(
        own_kernel_calls() > own,
        "the f32 UNet ran our flash kernel"
    );
    assert_eq!(
        materialised_fallbacks(),
        materialised,
        "and never materialised"
    );
    pipe.set_memory_format(MemoryFormat::ChannelsLast);
    check_unet(&pipe, &device, 1e-4, "wgpu channels-last unet");
    pipe.set_memory_format(MemoryFormat::Contiguous);

    let r = refs("vae");
    let posterior = pipe.vae.encode(upload::<Wgpu, 4>(&r["image"], &device));
    assert_close(
        &HostTensor::from_tensor(posterior.mean).unwrap(),
        &r["posterior_mean"],
        1e-4,
        1e-4,
        "wgpu vae encode",
    );

    // CLIP + UNet + PNDM + VAE decode.
    check_on(&pipe, "txt2img_pndm", None, false);
    // A stochastic scheduler, its noise replayed from diffusers' tape.
    check_on(&pipe, "txt2img_euler_a", Some("euler-a"), true);
}

/// The fusion switch off (every op its own kernel) and f16, on wgpu, against the same
/// references: the unfused UNet within 1e-4 like everything else, the f16 UNet and a whole f16
/// txt2img (VAE in f32) within the documented bounds above.
#[test]
fn unfused_and_f16_match_diffusers_on_wgpu() {
    let Some(device) = adapter() else { return };
    let mut pipe = pipeline_on::<WgpuUnfused>(&device);
    let _counters = lock_flash_counters();
    let own = own_kernel_calls();
    check_unet(&pipe, &device, 1e-4, "wgpu unfused unet");
    assert!(
        own_kernel_calls() > own,
        "the unfused f32 UNet ran our flash kernel"
    );
    pipe.set_memory_format(MemoryFormat::ChannelsLast);
    check_unet(&pipe, &device, 1e-4, "wgpu unfused channels-last unet");
    drop(pipe);

    // Burn fixes a device's float type at its first tensor, for every backend type on it, so
    // f16 gets a device of its own: the software adapter by its other name (lavapipe in CI).
    let software = select_backend(BackendRequest::Wgpu).is_ok_and(|s| s.software);
    let f16_device = WgpuDevice::Cpu;
    if !software || !<Wgpu as Backend>::supports_dtype(&f16_device, DType::F16) {
        // Not a pass: say so loudly. Mesa's lavapipe has shaderFloat16, so CI runs this part.
        assert!(
            std::env::var_os("BRUSHFIRE_REQUIRE_WGPU_F16").is_none(),
            "BRUSHFIRE_REQUIRE_WGPU_F16 is set but there is no f16 software adapter"
        );
        eprintln!("NOTICE: no f16 software wgpu adapter; the f16 comparison did not run");
        return;
    }
    // The engine's own way (`ExecutionOptions::check`): the f32 backend type on a device whose
    // float type is f16, so no pipeline is compiled a second time for an f16 type parameter.
    set_default_dtypes::<Wgpu>(&f16_device, FloatDType::F16, IntDType::I32)
        .expect("a fresh device takes f16");
    let pipe = pipeline_on::<Wgpu>(&f16_device);
    assert_eq!(
        pipe.unet.conv_in.weight.val().dtype(),
        DType::F16,
        "the UNet really is f16"
    );
    assert_eq!(
        pipe.vae.decoder.conv_in.weight.val().dtype(),
        DType::F32,
        "the VAE stays f32"
    );
    let (flash, materialised) = (flash_calls(), materialised_fallbacks());
    check_unet(&pipe, &f16_device, F16_UNET_TOLERANCE, "wgpu f16 unet");
    assert!(
        flash_calls() > flash,
        "the fused f16 UNet ran the flash kernel"
    );
    assert_eq!(
        materialised_fallbacks(),
        materialised,
        "and never materialised"
    );
    let mut pipe = pipe;
    pipe.set_memory_format(MemoryFormat::ChannelsLast);
    check_unet(
        &pipe,
        &f16_device,
        F16_UNET_TOLERANCE,
        "wgpu f16 channels-last unet",
    );
    pipe.set_memory_format(MemoryFormat::Contiguous);
    check_on_within(
        &pipe,
        "txt2img_pndm",
        None,
        false,
        Some(F16_IMAGE_TOLERANCE),
    );

    // The NaN fallback: a conv whose outputs overflow f16 (but not f32, where the GroupNorm
    // after it removes the scale) makes the f16 UNet return NaN; the pipeline redoes the step
    // in f32, says so, and gives the image an all-f32 run of the same weights gives.
    overflow_f16(&mut pipe);
    let r = refs("unet");
    let ts: Vec<f64> = r["timestep"].values.iter().map(|&v| v as f64).collect();
    let raw = pipe
        .unet
        .forward(
            upload(&r["sample"], &f16_device),
            &ts,
            &upload(&r["encoder_hidden_states"], &f16_device),
            &ClassLabels::None,
        )
        .unwrap();
    let raw = HostTensor::from_tensor(raw).unwrap();
    assert!(
        raw.values.iter().any(|v| !v.is_finite()),
        "the doctored f16 UNet overflows"
    );
    let req = request(None);
    let out = pipe
        .generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
        .expect("generate with the f32 fallback");
    assert!(
        out.notes.iter().any(|n| n.contains("redone in f32")),
        "{:?}",
        out.notes
    );
    let mut cpu = pipeline_on::<crate::common::Cpu>(&Default::default());
    overflow_f16(&mut cpu);
    let want = cpu
        .generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
        .unwrap();
    assert!(want.notes.is_empty(), "f32 needs no fallback");
    assert_close(
        &out.images,
        &want.images,
        F16_IMAGE_TOLERANCE,
        F16_IMAGE_TOLERANCE,
        "f16 with the f32 fallback vs f32",
    );
}

/// Scales the first resnet's conv1 by 10⁵ (computed in f32): its outputs (~10⁵) overflow
/// f16's 65504 while its weights (≤ 3.3·10⁴ on the fixture) still fit.
fn overflow_f16<B: Backend>(pipe: &mut StableDiffusionPipeline<B>) {
    let scale = |t: Tensor<B, 4>| {
        let dtype = t.dtype();
        t.cast(DType::F32).mul_scalar(1e5).cast(dtype)
    };
    let conv = &mut pipe.unet.down_blocks[0].resnets[0].conv1;
    conv.weight = conv.weight.clone().map(scale);
    if let Some(bias) = conv.bias.take() {
        conv.bias = Some(bias.map(|b| {
            let dtype = b.dtype();
            b.cast(DType::F32).mul_scalar(1e5).cast(dtype)
        }));
    }
}

/// The forced flash kernel (unfused backend here; the UNet tests above go through fusion) in
/// f16 against the materialised maths in f32: heads-split (strided) queries, cross-attention
/// lengths, head sizes 4–32, non-multiple-of-tile lengths.
///
/// The bound is each element's own f16 error budget (see [`f16_attention_bound`]), not one
/// number seen on one machine: a fixed 2e-3 held on the AVX-512 Xeon's lavapipe and failed on
/// the AVX2 EPYC's (2.0e-3), because an output near 4 has an f16 spacing of 3.9e-3 by itself.
#[test]
fn forced_flash_attention_matches_the_definition_in_f16() {
    use burn::tensor::{Distribution, activation::softmax};
    let Some(device) = adapter() else { return };
    type W = WgpuUnfused;
    let normal = Distribution::Normal(0.0, 1.0);
    let f16 = |t: &Tensor<W, 4>| t.clone().cast(DType::F16);
    let _counters = lock_flash_counters();
    for (n, h, lq, lk, d, strided) in [
        (1, 1, 16, 16, 8, false),
        (2, 2, 64, 77, 8, false),
        (2, 2, 64, 64, 8, true),
        (2, 2, 64, 64, 4, false),
        (2, 2, 60, 60, 32, true),
    ] {
        let q = if strided {
            Tensor::<W, 4>::random([n, lq, h, d], normal, &device).swap_dims(1, 2)
        } else {
            Tensor::<W, 4>::random([n, h, lq, d], normal, &device)
        };
        let k = Tensor::<W, 4>::random([n, h, lk, d], normal, &device);
        let v = Tensor::<W, 4>::random([n, h, lk, d], normal, &device);
        let flash = flash_calls();
        let scale = 1.0 / (d as f64).sqrt();
        let got = forced_flash_attention(&f16(&q), &f16(&k), &f16(&v), scale)
            .expect("a CubeCL backend")
            .cast(DType::F32);
        assert_eq!(flash_calls(), flash + 1, "a flash kernel ran");
        let scores = q
            .clone()
            .mul_scalar(scale)
            .matmul(k.clone().swap_dims(2, 3));
        let p = softmax(scores, 3);
        let want = p.clone().matmul(v.clone());
        let bound = f16_attention_bound(&q, &k, &v, &p, &want, scale);
        // Margin 2 over the first-order budget (second-order terms, f32 accumulation).
        let excess: f32 = (got - want)
            .abs()
            .sub(bound.mul_scalar(2.0))
            .max()
            .into_scalar();
        assert!(
            excess <= 0.0,
            "{:?}: an element exceeds twice its f16 error budget by {excess}",
            (n, h, lq, lk, d, strided)
        );
    }
}

/// First-order error budget of attention computed in f16 (inputs, scores, probabilities and
/// output each rounded once, relative error `u = 2⁻¹¹`), against the exact maths, per output
/// element `o_i = Σ_j p_ij v_j`:
/// - scores: q and k rounded (`2u·scale·Σ_d |q_d||k_d|`) and the score itself (`u·|s_ij|`) move
///   `o_i` by at most `max_j |Δs_ij| · Σ_j p_ij |v_j − o_i|` (softmax's derivative);
/// - v rounded, p rounded: `2u · Σ_j p_ij |v_j|`;
/// - the output rounded: `u · |o_i|`.
///
/// # Shapes
/// - q `[n, h, lq, d]`, k and v `[n, h, lk, d]`, p `[n, h, lq, lk]`, o `[n, h, lq, d]` → `[n, h, lq, d]`
fn f16_attention_bound<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    p: &Tensor<B, 4>,
    o: &Tensor<B, 4>,
    scale: f64,
) -> Tensor<B, 4> {
    let u = 2f64.powi(-11);
    let abs_dot = q.clone().abs().matmul(k.clone().abs().swap_dims(2, 3)); // [n,h,lq,lk]
    let scores = q
        .clone()
        .matmul(k.clone().swap_dims(2, 3))
        .mul_scalar(scale)
        .abs();
    let ds = abs_dot
        .mul_scalar(2.0 * u * scale)
        .add(scores.mul_scalar(u)); // [n,h,lq,lk]
    let ds_max = ds.max_dim(3); // [n,h,lq,1]
    // Σ_j p_ij |v_j − o_i|, over [n,h,lq,lk,d].
    let spread = v
        .clone()
        .unsqueeze_dim::<5>(2)
        .sub(o.clone().unsqueeze_dim::<5>(3))
        .abs()
        .mul(p.clone().unsqueeze_dim::<5>(4))
        .sum_dim(3)
        .squeeze_dim::<4>(3); // [n,h,lq,d]
    let weighted_v = p.clone().matmul(v.clone().abs()); // [n,h,lq,d]
    spread
        .mul(ds_max)
        .add(weighted_v.mul_scalar(2.0 * u))
        .add(o.clone().abs().mul_scalar(u))
}

/// Our flash kernel (`shaders::flash_attention`) against its plain-tensor definition on wgpu:
/// one query row to several 64-row blocks, key counts that are not multiples of its 32-key
/// tile, head sizes 1–512 (SD's 40/80/160, the VAE's single 512-wide head), a value size that
/// differs from the query's, heads-split (strided) views, scales other than 1/√d and scores
/// large enough that the running maximum moves between tiles. f32 within 1e-4; f16 against the
/// f32 maths of the same rounded inputs within 2e-3.
#[test]
fn brushfire_flash_attention_matches_its_reference() {
    /// (n, heads, lq, lk, d, dv, scale, heads-split views, also in f16)
    type Case = (usize, usize, usize, usize, usize, usize, f64, bool, bool);
    use burn::tensor::{Distribution, TensorPrimitive};
    use shaders::{flash_attention, flash_attention_reference};
    let Some(device) = adapter() else { return };
    type W = WgpuUnfused;
    let normal = Distribution::Normal(0.0, 1.0);
    let run = |q: &Tensor<W, 4>, k: &Tensor<W, 4>, v: &Tensor<W, 4>, scale: f64| {
        let [q, k, v] = [q, k, v].map(|t| t.clone().into_primitive().tensor());
        let out = flash_attention(q, k, v, scale as f32).expect("the kernel takes the problem");
        Tensor::<W, 4>::from_primitive(TensorPrimitive::Float(out))
    };
    let cases: [Case; 7] = [
        (1, 1, 1, 1, 1, 1, 1.0, false, false),
        (2, 3, 70, 77, 40, 40, 1.0 / 40f64.sqrt(), true, true),
        (1, 2, 130, 64, 80, 80, 1.0 / 80f64.sqrt(), false, false),
        (1, 1, 33, 96, 160, 160, 0.5, false, true),
        (1, 1, 20, 40, 512, 512, 1.0 / 512f64.sqrt(), false, false),
        (1, 2, 16, 40, 8, 24, 0.7, true, false),
        // Scores with a spread of ~±30: the row maximum moves between key tiles.
        (1, 1, 64, 100, 40, 40, 5.0, false, false),
    ];
    for (n, h, lq, lk, d, dv, scale, strided, half) in cases {
        let make = |len: usize, width: usize| {
            if strided {
                Tensor::<W, 4>::random([n, len, h, width], normal, &device).swap_dims(1, 2)
            } else {
                Tensor::<W, 4>::random([n, h, len, width], normal, &device)
            }
        };
        let (q, k, v) = (make(lq, d), make(lk, d), make(lk, dv));
        let case = (n, h, lq, lk, d, dv, scale, strided);
        let want = flash_attention_reference(q.clone(), k.clone(), v.clone(), scale);
        let got = run(&q, &k, &v, scale);
        assert_eq!(got.dims(), [n, h, lq, dv], "{case:?}");
        let diff: f32 = (got - want).abs().max().into_scalar();
        eprintln!("f32 {case:?}: max diff {diff:.2e}");
        assert!(diff < 1e-4, "f32 {case:?}: max diff {diff}");
        if half {
            // Against the f32 maths of the same f16-rounded inputs: what is left is the
            // kernel's own error and the output's rounding to f16 (half an ulp: ≤ 1e-3 below 4).
            let f16 = |t: &Tensor<W, 4>| t.clone().cast(DType::F16);
            let (q, k, v) = (f16(&q), f16(&k), f16(&v));
            let got = run(&q, &k, &v, scale);
            assert_eq!(got.dtype(), DType::F16, "{case:?}");
            let f32 = |t: Tensor<W, 4>| t.cast(DType::F32);
            let want = flash_attention_reference(f32(q), f32(k), f32(v), scale);
            let diff: f32 = (f32(got) - want).abs().max().into_scalar();
            eprintln!("f16 {case:?}: max diff {diff:.2e}");
            assert!(diff < 2e-3, "f16 {case:?}: max diff {diff}");
        }
    }

    // Bad problems are refused before any launch, naming what is wrong.
    let t = |dims: [usize; 4]| {
        Tensor::<W, 4>::zeros(dims, &device)
            .into_primitive()
            .tensor()
    };
    for (q, k, v, want) in [
        (
            [1, 2, 8, 16],
            [1, 2, 9, 8],
            [1, 2, 9, 8],
            "head dimension 16",
        ),
        (
            [1, 2, 8, 8],
            [1, 2, 9, 8],
            [1, 2, 7, 8],
            "9 tokens but v has 7",
        ),
        ([1, 2, 8, 8], [2, 2, 9, 8], [2, 2, 9, 8], "[n, heads]"),
        (
            [1, 1, 8, 8],
            [1, 1, 9, 8],
            [1, 1, 9, 600],
            "value head dimension 600",
        ),
        ([1, 1, 0, 8], [1, 1, 9, 8], [1, 1, 9, 8], "empty dimension"),
    ] {
        let e = flash_attention(t(q), t(k), t(v), 1.0)
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains(want)),
            "{want}: {e:?}"
        );
    }
}

/// The fused processor's entry point on the fusion backend in f32 (a custom operation in the
/// fusion stream, with the scale it was given) runs our kernel and matches the definition.
#[test]
fn fused_f32_attention_runs_our_kernel_under_fusion() {
    use burn::tensor::Distribution;
    let Some(device) = adapter() else { return };
    let normal = Distribution::Normal(0.0, 1.0);
    let q = Tensor::<Wgpu, 4>::random([2, 2, 50, 40], normal, &device);
    let k = Tensor::<Wgpu, 4>::random([2, 2, 77, 40], normal, &device);
    let v = Tensor::<Wgpu, 4>::random([2, 2, 77, 40], normal, &device);
    // Ops before and after it in the same fusion stream.
    let q = q.mul_scalar(2.0).add_scalar(0.1);
    let _counters = lock_flash_counters();
    let own = own_kernel_calls();
    let got = forced_flash_attention(&q, &k, &v, 0.3)
        .expect("a CubeCL backend")
        .add_scalar(1.0);
    let want = shaders::flash_attention_reference(q, k, v, 0.3).add_scalar(1.0);
    let diff: f32 = (got - want).abs().max().into_scalar();
    assert!(diff < 1e-4, "max diff {diff}");
    assert_eq!(own_kernel_calls(), own + 1, "our kernel ran once");
}

/// IF's UNets (added-KV attention over text and image keys, the noise level's class embedding,
/// resnet resamplers) and the ControlNet on wgpu, against the same diffusers references as on
/// the CPU: the blocks the SD UNet does not have, under fused attention, channels-last and
/// fusion, before a CUDA session meets them.
#[test]
fn if_unets_and_controlnet_match_diffusers_on_wgpu() {
    use engine::memory::MemoryBudget;
    use engine::models::AttnProcessor;
    use engine::models::controlnets::ControlNetModel;
    use engine::models::unets::UNet2DConditionModel;

    use crate::common::fixture;

    let Some(device) = adapter() else { return };
    // Its fused attention runs our kernel: not while another test counts the calls.
    let _counters = lock_flash_counters();
    let r = refs("if_unets");
    for (folder, name, format) in [
        ("tiny-if/unet", "if_i", MemoryFormat::Contiguous),
        ("tiny-if-ii/unet", "if_ii", MemoryFormat::ChannelsLast),
    ] {
        let (mut unet, _) =
            UNet2DConditionModel::<Wgpu>::load(&fixture(folder), None, &device).expect(folder);
        unet.set_attn_processor(AttnProcessor::Fused);
        unet.set_memory_format(format);
        let key = |k: &str| format!("{name}.{k}");
        let timesteps: Vec<f64> = r[&key("timestep")]
            .values
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let class = match r.get(&key("class_labels")) {
            Some(levels) => {
                ClassLabels::Levels(levels.values.iter().map(|&v| f64::from(v)).collect())
            }
            None => ClassLabels::None,
        };
        let out = unet
            .forward(
                upload(&r[&key("sample")], &device),
                &timesteps,
                &upload(&r[&key("encoder_hidden_states")], &device),
                &class,
            )
            .expect("forward");
        assert_close(
            &HostTensor::from_tensor(out).unwrap(),
            &r[&key("out")],
            1e-4,
            1e-4,
            &format!("wgpu {folder} {format:?}"),
        );
    }

    let r = refs("controlnet");
    let (mut controlnet, _) = ControlNetModel::<Wgpu>::load(
        &fixture("tiny-controlnet"),
        None,
        &MemoryBudget::Unchecked,
        &device,
    )
    .unwrap();
    controlnet.set_attn_processor(AttnProcessor::Fused);
    controlnet.set_memory_format(MemoryFormat::ChannelsLast);
    let timesteps: Vec<f64> = r["timestep"].values.iter().map(|&v| f64::from(v)).collect();
    let out = controlnet
        .forward(
            upload(&r["sample"], &device),
            &timesteps,
            &upload(&r["encoder_hidden_states"], &device),
            upload(&r["controlnet_cond"], &device),
            0.8,
            false,
        )
        .expect("controlnet forward");
    for (i, residual) in out.down.into_iter().enumerate() {
        assert_close(
            &HostTensor::from_tensor(residual).unwrap(),
            &r[&format!("down.{i}")],
            1e-4,
            1e-4,
            &format!("wgpu controlnet down.{i}"),
        );
    }
    assert_close(
        &HostTensor::from_tensor(out.mid).unwrap(),
        &r["mid"],
        1e-4,
        1e-4,
        "wgpu controlnet mid",
    );
}

/// Burn fixes a device's float type at its first tensor: once the adapter computes in f32, f16
/// is refused with the error the app turns into "f16 from the next start".
#[test]
fn a_second_precision_on_one_device_waits_for_a_new_process() {
    use engine::EngineError;
    use engine::backend::{ExecutionOptions, Precision};
    let Some(_device) = adapter() else { return };
    let selected = select_backend(BackendRequest::Wgpu).unwrap();
    let f32 = ExecutionOptions {
        fusion: true,
        precision: Precision::F32,
    };
    f32.check(&selected)
        .expect("the default device computes in f32 here");
    let f16 = ExecutionOptions {
        precision: Precision::F16,
        ..f32
    };
    match f16.check(&selected) {
        Err(EngineError::PrecisionLocked { current, wanted }) => {
            assert_eq!((current.as_str(), wanted.as_str()), ("f32", "f16"));
        }
        // An adapter without f16 says that first (not CI's lavapipe, which has f16).
        Err(EngineError::Unsupported(reason)) => {
            assert!(reason.contains("f16"), "{reason}");
            assert!(
                std::env::var_os("BRUSHFIRE_REQUIRE_WGPU_F16").is_none(),
                "BRUSHFIRE_REQUIRE_WGPU_F16 is set but the adapter has no f16: {reason}"
            );
        }
        other => panic!("expected PrecisionLocked, got {other:?}"),
    }
}

/// A score tensor larger than the largest buffer the adapter's memory pool allocates is refused
/// with the numbers before any work (it used to fail inside the matmul with "Memory page 0
/// doesn't exist").
#[test]
fn a_score_tensor_larger_than_the_pools_largest_page_is_refused_before_any_work() {
    use engine::memory::{MemoryBudget, record_attention_calls};
    use engine::models::AttnProcessor;
    let Some(device) = adapter() else { return };
    let selected = select_backend(BackendRequest::Wgpu).unwrap();
    let budget = engine::backend::memory_budget(&selected);
    let MemoryBudget::Device { max_allocation } = budget else {
        panic!("a GPU budget, got {budget:?}");
    };
    eprintln!("largest allocation of the pool: {max_allocation} bytes");
    assert!(max_allocation >= 1 << 20, "{max_allocation}");
    let mut pipe: StableDiffusionPipeline<Wgpu> = pipeline_on(&device);
    pipe.set_attn_processor(AttnProcessor::Vanilla);
    pipe.set_memory_budget(budget);
    let mut req = request(None);
    (req.width, req.height) = (8192, 8192);
    let (out, calls) = record_attention_calls(|| {
        pipe.generate(&req, None, &CancelToken::new(), &mut |_: &StepProgress| {})
    });
    let err = out.expect_err("terabytes of scores").to_string();
    assert!(calls.is_empty(), "nothing ran: {calls:?}");
    assert!(err.contains("one score tensor of about"), "{err}");
    assert!(
        err.contains("the GPU's memory pool allocates at most"),
        "{err}"
    );
    assert!(
        err.contains("fused attention holds no score matrix"),
        "{err}"
    );
}
