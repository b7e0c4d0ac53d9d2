//! Image files in and out of the engine's host layout: RGB images `[h, w, 3]` and masks
//! `[h, w]`, values in [0, 1] (what `--image`, `--mask` and the app's canvases hand over).

use std::path::Path;

use anyhow::{Context, Result, bail};
use engine::tensor_io::HostTensor;

/// Writes `image` as a PNG at `path`, whole or not at all (a temporary file renamed into place):
/// what the "Save mask…" and "Save map…" buttons write.
pub fn save_png(path: &Path, image: impl Into<image::DynamicImage>) -> Result<()> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .into()
        .write_to(&mut bytes, image::ImageFormat::Png)
        .with_context(|| format!("encoding {}", path.display()))?;
    engine::atomic_file::write_atomic(path, bytes.get_ref())
        .with_context(|| format!("writing {}", path.display()))
}

/// The largest side of a picture Brushfire reads: a ×4 upscale of 4096² is 16384².
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// The most pixels it reads, 128 megapixels (a 16384 × 8192 picture; 0.4 GB as RGB8, 1.5 GB as
/// the engine's floats).
pub const MAX_IMAGE_PIXELS: u64 = 128 * 1024 * 1024;

/// Opens a picture the user gave (`what`: "image", "mask", …), refusing one too large to hold
/// from its header alone, before any pixel is decoded (a 20000 × 20000 PNG is 1.2 GB decoded),
/// and one with no pixels. Any colour type and depth is read (16-bit, grey, RGBA, palette).
pub fn open_image(path: &Path, what: &str) -> Result<image::DynamicImage> {
    let reader = || -> Result<image::ImageReader<std::io::BufReader<std::fs::File>>> {
        image::ImageReader::open(path)
            .and_then(image::ImageReader::with_guessed_format)
            .with_context(|| format!("reading the {what} {}", path.display()))
    };
    let (width, height) = reader()?
        .into_dimensions()
        .with_context(|| format!("reading the {what} {}", path.display()))?;
    if width == 0 || height == 0 {
        bail!(
            "the {what} {} is {width}×{height}: it has no pixels",
            path.display()
        );
    }
    if width > MAX_IMAGE_SIDE
        || height > MAX_IMAGE_SIDE
        || u64::from(width) * u64::from(height) > MAX_IMAGE_PIXELS
    {
        bail!(
            "the {what} {} is {width}×{height}: larger than Brushfire reads (at most \
             {MAX_IMAGE_SIDE} px a side and {} megapixels); scale it down first",
            path.display(),
            MAX_IMAGE_PIXELS / (1024 * 1024)
        );
    }
    let mut reader = reader()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    reader.limits(limits);
    reader
        .decode()
        .with_context(|| format!("reading the {what} {}", path.display()))
}

/// An RGB image from a PNG/JPEG file (alpha dropped, as diffusers' `convert("RGB")`).
pub fn read_rgb(path: &Path) -> Result<HostTensor> {
    let img = open_image(path, "image")?.to_rgb8();
    Ok(rgb8_to_host(
        img.width() as usize,
        img.height() as usize,
        img.as_raw(),
    ))
}

/// A mask from a PNG/JPEG file, as grey levels (diffusers' `convert("L")`): white = repaint.
pub fn read_mask(path: &Path) -> Result<HostTensor> {
    let img = open_image(path, "mask")?.to_luma8();
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
        save_png(&path, image::RgbImage::from_raw(4, 3, rgb.clone()).unwrap()).unwrap();
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
