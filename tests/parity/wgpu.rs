//! The same models on wgpu (Mesa's lavapipe in CI). Kept tiny: on a software adapter every
//! kernel's first call compiles it. Skips with a notice when no wgpu adapter exists.

use crate::common::{assert_close, fixture, refs};
use burn::backend::Wgpu;
use burn::backend::wgpu::WgpuDevice;
use burn::tensor::{Tensor, TensorData};
use engine::backend::{BackendKind, BackendRequest, select_backend};
use engine::models::autoencoders::AutoencoderKL;
use engine::models::unets::{ClassLabels, UNet2DConditionModel};
use engine::tensor_io::HostTensor;

fn adapter() -> Option<WgpuDevice> {
    match select_backend(BackendRequest::Wgpu) {
        Ok(selected) => {
            assert_eq!(selected.kind, BackendKind::Wgpu);
            eprintln!("wgpu adapter: {selected}");
            Some(WgpuDevice::DefaultDevice)
        }
        Err(e) => {
            eprintln!("SKIPPED: no wgpu adapter ({e})");
            None
        }
    }
}

fn upload<const D: usize>(t: &HostTensor, device: &WgpuDevice) -> Tensor<Wgpu, D> {
    Tensor::from_data(TensorData::new(t.values.clone(), t.shape.clone()), device)
}

#[test]
fn unet_and_vae_match_diffusers_on_wgpu() {
    let Some(device) = adapter() else { return };
    let r = refs("unet");
    let (unet, _) =
        UNet2DConditionModel::<Wgpu>::load(&fixture("tiny-sd/unet"), None, &device).unwrap();
    let ts: Vec<f64> = r["timestep"].values.iter().map(|&v| v as f64).collect();
    let out = unet
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
    let (vae, _) = AutoencoderKL::<Wgpu>::load(&fixture("tiny-sd/vae"), None, &device).unwrap();
    let decoded = vae.decode(upload(&r["latents"], &device));
    assert_close(
        &HostTensor::from_tensor(decoded).unwrap(),
        &r["decoded"],
        1e-4,
        1e-4,
        "wgpu vae decode",
    );
}
