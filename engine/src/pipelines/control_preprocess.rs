//! Control-map preprocessing (aka `controlnet_aux`'s `CannyDetector`, which the ControlNet
//! canny model was trained on): Canny edges through `imageproc`, as a three-channel map in
//! {0, 1} that the ControlNet pipeline takes as its control image.
//!
//! Thresholds are on OpenCV's scale, the one every ControlNet guide and diffusers' docs use
//! (`cv2.Canny(image, 100, 200)`). imageproc's detector smooths with a Gaussian (σ = 1.4)
//! before its Sobel filter and takes the L2 gradient norm, where OpenCV takes the L1 norm of
//! the raw image's Sobel: the same threshold keeps far fewer edges (on four photographs, a
//! sixth of OpenCV's). The thresholds are therefore scaled by [`IMAGEPROC_THRESHOLD_SCALE`],
//! the factor that makes the two agree best on those photographs (`tests/parity/canny.rs`).

use image::GrayImage;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::pipelines::image_processor::image_size;
use crate::tensor_io::HostTensor;

/// Hysteresis thresholds of the Canny detector, on the gradient magnitude of 8-bit grey
/// levels (the scale of OpenCV's `cv2.Canny(image, low, high)`; 100/200 is `controlnet_aux`'s
/// and diffusers' documented default).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Canny {
    pub low: f32,
    pub high: f32,
}

impl Default for Canny {
    fn default() -> Self {
        Self {
            low: 100.0,
            high: 200.0,
        }
    }
}

/// OpenCV-scale thresholds × this = imageproc's. Chosen by measurement: mean F1 (edges within
/// one pixel) against `cv2.Canny(rgb, 100, 200)` on the four photographs of
/// `tests/fixtures/refs/canny/` is 0.78 at 0.15–0.18, 0.71 at 0.3, 0.26 unscaled.
pub const IMAGEPROC_THRESHOLD_SCALE: f32 = 0.18;

/// A threshold no pixel reaches: imageproc's 3×3 Sobel magnitude of 8-bit values is at most
/// `4·255·√2`, on OpenCV's scale divided by [`IMAGEPROC_THRESHOLD_SCALE`].
pub const CANNY_MAX_THRESHOLD: f32 = 1442.5 / IMAGEPROC_THRESHOLD_SCALE;

impl Canny {
    /// Checks the thresholds: finite, `0 ≤ low ≤ high`.
    pub fn check(&self) -> Result<()> {
        for (field, v) in [("canny_low", self.low), ("canny_high", self.high)] {
            if !v.is_finite() || v < 0.0 {
                return Err(EngineError::invalid(
                    field,
                    format!("{v} must be a finite number ≥ 0"),
                ));
            }
        }
        if self.low > self.high {
            return Err(EngineError::invalid(
                "canny_low",
                format!(
                    "the low threshold {} is above the high threshold {}",
                    self.low, self.high
                ),
            ));
        }
        Ok(())
    }

    /// Edges of `image` (`[h, w, 3]` in [0, 1]) as a `[h, w]` 8-bit map (255 = edge).
    pub fn edges(&self, image: &HostTensor) -> Result<GrayImage> {
        self.check()?;
        let (w, h) = image_size(image, "control_image", 3)?;
        let (Ok(w32), Ok(h32)) = (u32::try_from(w), u32::try_from(h)) else {
            return Err(EngineError::invalid(
                "control_image",
                format!("{w}×{h} is too large"),
            ));
        };
        // imageproc's detector leaves a one-pixel border and needs the interior to exist.
        if w < 3 || h < 3 {
            return Err(EngineError::invalid(
                "control_image",
                format!("{w}×{h} is too small for edge detection (at least 3×3)"),
            ));
        }
        let grey = GrayImage::from_fn(w32, h32, |x, y| {
            let i = (y as usize * w + x as usize) * 3;
            image::Luma([luma_u8(&image.values[i..i + 3])])
        });
        Ok(imageproc::edges::canny(
            &grey,
            self.low * IMAGEPROC_THRESHOLD_SCALE,
            self.high * IMAGEPROC_THRESHOLD_SCALE,
        ))
    }

    /// Edges of `image` as a control map: `[h, w, 3]`, 1 on edges and 0 elsewhere (the
    /// detector's single channel repeated three times, as `controlnet_aux` returns it).
    pub fn control_map(&self, image: &HostTensor) -> Result<HostTensor> {
        let edges = self.edges(image)?;
        let (w, h) = (edges.width() as usize, edges.height() as usize);
        let values = edges
            .into_raw()
            .into_iter()
            .flat_map(|e| [f32::from(e) / 255.0; 3])
            .collect();
        Ok(HostTensor {
            shape: vec![h, w, 3],
            values,
        })
    }
}

/// 8-bit luma of one RGB pixel in [0, 1]: ITU-R BT.601 weights, as OpenCV's `COLOR_RGB2GRAY`
/// and PIL's `convert("L")`, on the pixel's 8-bit values.
fn luma_u8(rgb: &[f32]) -> u8 {
    let q = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round();
    let y = 0.299 * q(rgb[0]) + 0.587 * q(rgb[1]) + 0.114 * q(rgb[2]);
    y.round().clamp(0.0, 255.0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(size: usize) -> HostTensor {
        let mut values = vec![0.0; size * size * 3];
        for y in size / 4..3 * size / 4 {
            for x in size / 4..3 * size / 4 {
                values[(y * size + x) * 3..(y * size + x) * 3 + 3].fill(1.0);
            }
        }
        HostTensor {
            shape: vec![size, size, 3],
            values,
        }
    }

    #[test]
    fn a_white_square_gives_its_outline() {
        let map = Canny::default().control_map(&square(32)).expect("canny");
        assert_eq!(map.shape, vec![32, 32, 3]);
        let at = |x: usize, y: usize| map.values[(y * 32 + x) * 3];
        // Edges lie on the square's border (within a pixel), none in its middle or far outside.
        let edge_rows: Vec<usize> = (0..32).filter(|&y| at(16, y) == 1.0).collect();
        assert!(!edge_rows.is_empty());
        assert!(
            edge_rows
                .iter()
                .all(|&y| (7..=9).contains(&y) || (23..=25).contains(&y))
        );
        assert_eq!(at(16, 16), 0.0);
        assert_eq!(at(2, 2), 0.0);
        // Three equal channels, values 0 or 1 only.
        assert!(map.values.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
        assert!(map.values.iter().all(|&v| v == 0.0 || v == 1.0));
    }

    #[test]
    fn higher_thresholds_keep_fewer_edges() {
        let mut noisy = square(32);
        for (i, v) in noisy.values.iter_mut().enumerate() {
            *v = (*v * 0.6 + ((i * 7919) % 97) as f32 / 97.0 * 0.4).min(1.0);
        }
        let count = |low, high| {
            let e = Canny { low, high }.edges(&noisy).expect("canny");
            e.pixels().filter(|p| p[0] == 255).count()
        };
        assert!(count(30.0, 60.0) > count(100.0, 200.0));
        assert!(count(100.0, 200.0) >= count(400.0, 800.0));
        assert_eq!(count(CANNY_MAX_THRESHOLD, CANNY_MAX_THRESHOLD), 0);
    }

    #[test]
    fn bad_thresholds_and_images_are_refused() {
        let img = square(8);
        let err = Canny {
            low: 200.0,
            high: 100.0,
        }
        .control_map(&img)
        .expect_err("low > high");
        assert!(err.to_string().contains("canny_low"), "{err}");
        let err = Canny {
            low: f32::NAN,
            high: 1.0,
        }
        .check()
        .expect_err("NaN");
        assert!(err.to_string().contains("canny_low"), "{err}");
        let tiny = HostTensor {
            shape: vec![2, 2, 3],
            values: vec![0.0; 12],
        };
        let err = Canny::default().edges(&tiny).expect_err("2×2");
        assert!(err.to_string().contains("too small"), "{err}");
        let grey = HostTensor {
            shape: vec![8, 8],
            values: vec![0.0; 64],
        };
        assert!(Canny::default().edges(&grey).is_err());
    }
}
