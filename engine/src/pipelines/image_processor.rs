//! Host-side image handling of the image-conditioned pipelines (aka diffusers'
//! `image_processor.py`, `VaeImageProcessor`): resizing to the working size, mask blur and
//! binarisation, the "inpaint only masked" crop region and the paste-back overlay.
//!
//! Images are [`HostTensor`]s `[h, w, 3]` and masks `[h, w]`, values in [0, 1], row-major: the
//! layout PNGs decode to, and what the app's canvases hold.

use image::imageops::{self, FilterType};
use image::{ImageBuffer, Luma, Rgb};

use crate::error::{EngineError, Result};
use crate::tensor_io::HostTensor;

/// `(width, height)` of an image `[h, w, 3]` (`channels == 3`) or a mask `[h, w]`
/// (`channels == 1`), after checking the shape and that every value is finite.
pub fn image_size(t: &HostTensor, field: &'static str, channels: usize) -> Result<(usize, usize)> {
    let ok = match channels {
        1 => t.shape.len() == 2,
        c => t.shape.len() == 3 && t.shape[2] == c,
    };
    let (h, w) = (
        t.shape.first().copied().unwrap_or(0),
        t.shape.get(1).copied().unwrap_or(0),
    );
    if !ok || h == 0 || w == 0 || t.values.len() != t.shape.iter().product::<usize>() {
        let expected = if channels == 1 {
            "[height, width]".to_string()
        } else {
            format!("[height, width, {channels}]")
        };
        return Err(EngineError::invalid(
            field,
            format!(
                "shape {:?}, expected {expected} with both sides ≥ 1",
                t.shape
            ),
        ));
    }
    if t.values.iter().any(|v| !v.is_finite()) {
        return Err(EngineError::invalid(field, "has NaN or infinite values"));
    }
    Ok((w, h))
}

fn channels_of(t: &HostTensor) -> usize {
    if t.shape.len() == 3 { t.shape[2] } else { 1 }
}

/// Resizes an image or mask to `width × height` with a Lanczos-3 filter (what diffusers'
/// preprocessing does to PIL inputs); a no-op copy when the size already matches.
pub fn resize(t: &HostTensor, width: usize, height: usize) -> Result<HostTensor> {
    let (h, w) = (t.shape[0], t.shape[1]);
    if (w, h) == (width, height) {
        return Ok(t.clone());
    }
    let dims = |v: usize| {
        u32::try_from(v)
            .map_err(|_| EngineError::invalid("image", format!("side {v} is too large")))
    };
    let (w32, h32, nw, nh) = (dims(w)?, dims(h)?, dims(width)?, dims(height)?);
    let bad = || EngineError::invalid("image", "pixel buffer does not match its shape");
    let values = match channels_of(t) {
        1 => {
            let img: ImageBuffer<Luma<f32>, Vec<f32>> =
                ImageBuffer::from_raw(w32, h32, t.values.clone()).ok_or_else(bad)?;
            imageops::resize(&img, nw, nh, FilterType::Lanczos3).into_raw()
        }
        3 => {
            let img: ImageBuffer<Rgb<f32>, Vec<f32>> =
                ImageBuffer::from_raw(w32, h32, t.values.clone()).ok_or_else(bad)?;
            imageops::resize(&img, nw, nh, FilterType::Lanczos3).into_raw()
        }
        c => {
            return Err(EngineError::invalid(
                "image",
                format!("{c} channels; expected 1 or 3"),
            ));
        }
    };
    let mut shape = t.shape.clone();
    shape[0] = height;
    shape[1] = width;
    Ok(HostTensor { shape, values })
}

/// Gaussian blur of a mask `[h, w]` with standard deviation `radius` pixels (diffusers'
/// `VaeImageProcessor.blur`, which is PIL's `GaussianBlur(radius)`); `radius == 0` copies.
pub fn blur_mask(mask: &HostTensor, radius: f32) -> Result<HostTensor> {
    if radius <= 0.0 {
        return Ok(mask.clone());
    }
    let (h, w) = (mask.shape[0], mask.shape[1]);
    let img: ImageBuffer<Luma<f32>, Vec<f32>> =
        ImageBuffer::from_raw(w as u32, h as u32, mask.values.clone())
            .ok_or_else(|| EngineError::invalid("mask", "pixel buffer does not match its shape"))?;
    let values = imageops::blur(&img, radius).into_raw();
    Ok(HostTensor {
        shape: mask.shape.clone(),
        values: values.into_iter().map(|v| v.clamp(0.0, 1.0)).collect(),
    })
}

/// Diffusers' mask binarisation (`do_binarize`): below 0.5 keeps (0), from 0.5 up repaints (1).
pub fn binarize(mask: &HostTensor) -> HostTensor {
    HostTensor {
        shape: mask.shape.clone(),
        values: mask
            .values
            .iter()
            .map(|&v| if v < 0.5 { 0.0 } else { 1.0 })
            .collect(),
    }
}

/// A rectangle of pixels, `x1..x2` × `y1..y2` (end exclusive), as diffusers' `crops_coords`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropRegion {
    pub x1: usize,
    pub y1: usize,
    pub x2: usize,
    pub y2: usize,
}

impl CropRegion {
    pub fn width(&self) -> usize {
        self.x2 - self.x1
    }
    pub fn height(&self) -> usize {
        self.y2 - self.y1
    }
}

/// Whether a mask value counts as painted for the crop box (non-zero once stored as 8 bits, as
/// diffusers tests the `L` image).
fn painted(v: f32) -> bool {
    (v * 255.0).round() >= 1.0
}

/// "Inpaint only masked" (diffusers' `VaeImageProcessor.get_crop_region`): the box around every
/// painted pixel of `mask`, grown by `pad` pixels and then widened (or heightened) to the aspect
/// ratio of the working size `width × height`, kept inside the image. Integer arithmetic follows
/// diffusers step by step, so the box is the same pixel for pixel.
pub fn crop_region(
    mask: &HostTensor,
    width: usize,
    height: usize,
    pad: usize,
) -> Result<CropRegion> {
    let (w, h) = image_size(mask, "mask", 1)?;
    let at = |x: usize, y: usize| mask.values[y * w + x];
    let col_empty = |x: usize| (0..h).all(|y| !painted(at(x, y)));
    let row_empty = |y: usize| (0..w).all(|x| !painted(at(x, y)));
    let left = (0..w).take_while(|&x| col_empty(x)).count();
    if left == w {
        return Err(EngineError::invalid(
            "mask",
            "is empty: paint the region to repaint before using \"only masked\"",
        ));
    }
    let right = (0..w).rev().take_while(|&x| col_empty(x)).count();
    let top = (0..h).take_while(|&y| row_empty(y)).count();
    let bottom = (0..h).rev().take_while(|&y| row_empty(y)).count();
    let (w, h, pad) = (w as i64, h as i64, pad as i64);
    let mut x1 = (left as i64 - pad).max(0);
    let mut y1 = (top as i64 - pad).max(0);
    let mut x2 = (w - right as i64 + pad).min(w);
    let mut y2 = (h - bottom as i64 + pad).min(h);
    let ratio_crop = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio_processing = width as f64 / height as f64;
    if ratio_crop > ratio_processing {
        let desired_height = (x2 - x1) as f64 / ratio_processing;
        let diff = (desired_height - (y2 - y1) as f64) as i64; // Python's int(): truncation
        y1 -= diff.div_euclid(2);
        y2 += diff - diff.div_euclid(2);
        if y2 >= h {
            let over = y2 - h;
            y2 -= over;
            y1 -= over;
        }
        if y1 < 0 {
            y2 -= y1;
            y1 = 0;
        }
        y2 = y2.min(h);
    } else {
        let desired_width = (y2 - y1) as f64 * ratio_processing;
        let diff = (desired_width - (x2 - x1) as f64) as i64;
        x1 -= diff.div_euclid(2);
        x2 += diff - diff.div_euclid(2);
        if x2 >= w {
            let over = x2 - w;
            x2 -= over;
            x1 -= over;
        }
        if x1 < 0 {
            x2 -= x1;
            x1 = 0;
        }
        x2 = x2.min(w);
    }
    // A box as wide as the image can still be pushed past an edge above; diffusers would then
    // crop outside the image. Keep it inside.
    let clamp = |v: i64, hi: i64| v.clamp(0, hi) as usize;
    Ok(CropRegion {
        x1: clamp(x1, w),
        y1: clamp(y1, h),
        x2: clamp(x2, w),
        y2: clamp(y2, h),
    })
}

/// The pixels of `region` of an image or mask.
pub fn crop(t: &HostTensor, region: CropRegion) -> HostTensor {
    let (w, c) = (t.shape[1], channels_of(t));
    let mut values = Vec::with_capacity(region.width() * region.height() * c);
    for y in region.y1..region.y2 {
        let row = (y * w + region.x1) * c;
        values.extend_from_slice(&t.values[row..row + region.width() * c]);
    }
    let mut shape = t.shape.clone();
    shape[0] = region.height();
    shape[1] = region.width();
    HostTensor { shape, values }
}

/// Pastes a generated crop back (diffusers' `VaeImageProcessor.apply_overlay`): `generated` is
/// resized to `region`, and every pixel of the result is `original·(1 − m) + generated·m` with
/// `m` the (unbinarised, possibly blurred) mask, so the painted region blends softly and
/// everything else is the original, untouched.
pub fn overlay(
    mask: &HostTensor,
    original: &HostTensor,
    generated: &HostTensor,
    region: CropRegion,
) -> Result<HostTensor> {
    let (w, h) = image_size(original, "image", 3)?;
    let generated = resize(generated, region.width(), region.height())?;
    let mut out = original.clone();
    for y in 0..h {
        for x in 0..w {
            let m = mask.values[y * w + x];
            let inside = (region.x1..region.x2).contains(&x) && (region.y1..region.y2).contains(&y);
            for ch in 0..3 {
                let i = (y * w + x) * 3 + ch;
                let gen_value = if inside {
                    generated.values[((y - region.y1) * region.width() + (x - region.x1)) * 3 + ch]
                } else {
                    0.0
                };
                out.values[i] = original.values[i] * (1.0 - m) + gen_value * m;
            }
        }
    }
    Ok(out)
}

/// A mask `[h, w]` resized to the latent grid `[lh, lw]` by nearest neighbour exactly as
/// `torch.nn.functional.interpolate(mask, size=…)` (default mode) picks source pixels.
pub fn mask_to_latent_grid(mask: &HostTensor, lh: usize, lw: usize) -> HostTensor {
    let (h, w) = (mask.shape[0], mask.shape[1]);
    let index = |dst: usize, out: usize, input: usize| -> usize {
        if out == input {
            dst
        } else if out == 2 * input {
            dst >> 1
        } else {
            let scale = input as f32 / out as f32;
            ((dst as f32 * scale).floor() as usize).min(input - 1)
        }
    };
    let mut values = Vec::with_capacity(lh * lw);
    for y in 0..lh {
        let sy = index(y, lh, h);
        for x in 0..lw {
            values.push(mask.values[sy * w + index(x, lw, w)]);
        }
    }
    HostTensor {
        shape: vec![lh, lw],
        values,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_with_box(w: usize, h: usize, x0: usize, y0: usize, x1: usize, y1: usize) -> HostTensor {
        let mut values = vec![0.0; w * h];
        for y in y0..y1 {
            for x in x0..x1 {
                values[y * w + x] = 1.0;
            }
        }
        HostTensor {
            shape: vec![h, w],
            values,
        }
    }

    #[test]
    fn empty_mask_has_no_crop_region() {
        let err = crop_region(&mask_with_box(8, 8, 0, 0, 0, 0), 8, 8, 2).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }

    #[test]
    fn crop_and_overlay_keep_the_unmasked_pixels() {
        let (w, h) = (12, 10);
        let original = HostTensor {
            shape: vec![h, w, 3],
            values: (0..w * h * 3).map(|i| (i % 7) as f32 / 7.0).collect(),
        };
        let mask = mask_with_box(w, h, 3, 2, 7, 5);
        let region = crop_region(&mask, 8, 8, 1).unwrap();
        assert_eq!(region.width(), region.height());
        let cropped = crop(&original, region);
        assert_eq!(cropped.shape, vec![region.height(), region.width(), 3]);
        let generated = HostTensor {
            shape: vec![8, 8, 3],
            values: vec![1.0; 8 * 8 * 3],
        };
        let out = overlay(&mask, &original, &generated, region).unwrap();
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let i = (y * w + x) * 3 + c;
                    let expected = if mask.values[y * w + x] > 0.0 {
                        1.0
                    } else {
                        original.values[i]
                    };
                    assert!((out.values[i] - expected).abs() < 1e-6, "({x},{y},{c})");
                }
            }
        }
    }

    #[test]
    fn latent_grid_takes_every_eighth_pixel() {
        let mask = HostTensor {
            shape: vec![16, 24],
            values: (0..16 * 24).map(|i| i as f32).collect(),
        };
        let grid = mask_to_latent_grid(&mask, 2, 3);
        assert_eq!(grid.values, vec![0.0, 8.0, 16.0, 192.0, 200.0, 208.0]);
    }

    #[test]
    fn resize_keeps_a_flat_image_flat() {
        let img = HostTensor {
            shape: vec![5, 7, 3],
            values: vec![0.25; 5 * 7 * 3],
        };
        let out = resize(&img, 16, 8).unwrap();
        assert_eq!(out.shape, vec![8, 16, 3]);
        assert!(out.values.iter().all(|v| (v - 0.25).abs() < 1e-5));
        let blurred = blur_mask(&binarize(&mask_with_box(9, 9, 3, 3, 6, 6)), 1.5).unwrap();
        assert!(blurred.values[4 * 9 + 4] < 1.0 && blurred.values[4 * 9 + 2] > 0.0);
    }
}
