//! Live preview without the VAE: SD 1.x latents map to RGB through a fixed linear map
//! (docs/architecture.md §4; the factors ComfyUI's `latent_formats.py` publishes for SD 1.5), at latent
//! resolution. Cheap enough to run every step; only `[h, w, 3]` floats come back to the host.

use burn::tensor::{Tensor, TensorData, backend::Backend};

use crate::error::Result;
use crate::tensor_io::HostTensor;

/// Rows: latent channels 0..4; columns: R, G, B.
pub const SD15_LATENT_RGB_FACTORS: [[f32; 3]; 4] = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
];

/// The first image of `latents` `[b, 4, h, w]` as RGB `[h, w, 3]` in [0, 1]; `None` for latents
/// that are not 4-channel (the factors are SD's).
pub fn latents_to_rgb_preview<B: Backend>(latents: Tensor<B, 4>) -> Result<Option<HostTensor>> {
    let [_, channels, h, w] = latents.dims();
    if channels != SD15_LATENT_RGB_FACTORS.len() {
        return Ok(None);
    }
    let device = latents.device();
    let factors = Tensor::<B, 2>::from_data(
        TensorData::new(SD15_LATENT_RGB_FACTORS.concat(), [4, 3]),
        &device,
    );
    let pixels = latents
        .narrow(0, 0, 1)
        .reshape([channels, h * w])
        .transpose() // [h·w, 4]
        .matmul(factors) // [h·w, 3]
        .add_scalar(1.0)
        .div_scalar(2.0)
        .clamp(0.0, 1.0)
        .reshape([h, w, 3]);
    HostTensor::from_tensor(pixels).map(Some)
}

/// The reference maths on the host, for tests: pixel `(y, x)` = Σ_c latent[c, y, x] · F[c].
pub fn latents_to_rgb_preview_reference(latents: &HostTensor) -> Option<HostTensor> {
    let (c, h, w) = (latents.shape[1], latents.shape[2], latents.shape[3]);
    if c != 4 {
        return None;
    }
    let mut values = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        for x in 0..w {
            let mut pixel = [0f32; 3];
            for (ch, factors) in SD15_LATENT_RGB_FACTORS.iter().enumerate() {
                let v = latents.values[ch * h * w + y * w + x];
                for (p, f) in pixel.iter_mut().zip(factors) {
                    *p += v * f;
                }
            }
            values.extend(pixel.map(|v| ((v + 1.0) / 2.0).clamp(0.0, 1.0)));
        }
    }
    Some(HostTensor {
        shape: vec![h, w, 3],
        values,
    })
}
