//! Image files in and out of the engine's host layout: RGB images `[h, w, 3]` and masks
//! `[h, w]`, values in [0, 1] (what `--image`, `--mask` and the app's canvases hand over).

use std::path::Path;

use anyhow::{Context, Result};
use engine::tensor_io::HostTensor;

/// An RGB image from a PNG/JPEG file (alpha dropped, as diffusers' `convert("RGB")`).
pub fn read_rgb(path: &Path) -> Result<HostTensor> {
    let img = image::open(path)
        .with_context(|| format!("reading the image {}", path.display()))?
        .to_rgb8();
    Ok(rgb8_to_host(
        img.width() as usize,
        img.height() as usize,
        img.as_raw(),
    ))
}

/// A mask from a PNG/JPEG file, as grey levels (diffusers' `convert("L")`): white = repaint.
pub fn read_mask(path: &Path) -> Result<HostTensor> {
    let img = image::open(path)
        .with_context(|| format!("reading the mask {}", path.display()))?
        .to_luma8();
    Ok(luma8_to_host(
        img.width() as usize,
        img.height() as usize,
        img.as_raw(),
    ))
}

/// RGB8 pixels → `[h, w, 3]` in [0, 1].
pub fn rgb8_to_host(width: usize, height: usize, rgb: &[u8]) -> HostTensor {
    HostTensor {
        shape: vec![height, width, 3],
        values: rgb.iter().map(|&v| f32::from(v) / 255.0).collect(),
    }
}

/// Grey-level pixels → `[h, w]` in [0, 1].
pub fn luma8_to_host(width: usize, height: usize, luma: &[u8]) -> HostTensor {
    HostTensor {
        shape: vec![height, width],
        values: luma.iter().map(|&v| f32::from(v) / 255.0).collect(),
    }
}

/// `[.., 3]` or `[.., 1]` floats in [0, 1] → 8-bit values, rounded as diffusers' `numpy_to_pil`.
pub fn to_u8(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rgb_and_mask_files_read_back_as_written() {
        let dir = std::env::temp_dir().join(format!("bf-image-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rgb: Vec<u8> = (0..4 * 3 * 3).map(|i| (i * 7) as u8).collect();
        let path = dir.join("rgb.png");
        image::RgbImage::from_raw(4, 3, rgb.clone())
            .unwrap()
            .save(&path)
            .unwrap();
        let host = read_rgb(&path).unwrap();
        assert_eq!(host.shape, vec![3, 4, 3]);
        assert_eq!(to_u8(&host.values), rgb);
        let mask = read_mask(&path).unwrap();
        assert_eq!(mask.shape, vec![3, 4]);
        let err = read_rgb(&dir.join("missing.png")).unwrap_err();
        assert!(format!("{err:#}").contains("missing.png"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
