//! The engine on wgpu (Mesa's lavapipe in CI) against the same diffusers references as on the
//! CPU: the text encoder, UNet, scheduler and VAE through two whole txt2img runs, plus the UNet
//! and the VAE encoder on their own. One test, so every kernel is compiled once: on a software
//! adapter each kernel's first call costs seconds. Skips with a notice when no adapter exists.

use burn::backend::Wgpu;
use burn::backend::wgpu::WgpuDevice;
use burn::tensor::{Tensor, TensorData};
use engine::backend::{BackendKind, BackendRequest, select_backend};
use engine::models::unets::ClassLabels;
use engine::tensor_io::HostTensor;

use crate::common::{assert_close, refs};
use crate::txt2img::{check_on, pipeline_on};

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

fn upload<const D: usize>(t: &HostTensor, device: &WgpuDevice) -> Tensor<Wgpu, D> {
    Tensor::from_data(TensorData::new(t.values.clone(), t.shape.clone()), device)
}

#[test]
fn engine_matches_diffusers_on_wgpu() {
    let Some(device) = adapter() else { return };
    let pipe = pipeline_on::<Wgpu>(&device);

    let r = refs("unet");
    let ts: Vec<f64> = r["timestep"].values.iter().map(|&v| v as f64).collect();
    let out = pipe
        .unet
        .forward(
            upload(&r["sample"], &device),
            &ts,
            &upload(&r["encoder_hidden_states"], &device),
            &ClassLabels::None,
        )
        .unwrap();
    assert_close(
        &HostTensor::from_tensor(out).unwrap(),
        &r["out"],
        1e-4,
        1e-4,
        "wgpu unet",
    );

    let r = refs("vae");
    let posterior = pipe.vae.encode(upload(&r["image"], &device));
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
