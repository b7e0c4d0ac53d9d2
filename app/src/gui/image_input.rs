//! The image img2img and inpainting start from, the mask painted on it, and their settings.
//! Both pages share one source image, so a mask drawn for inpainting survives a visit to the
//! img2img page (and any failed generation: requests get copies).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use eframe::egui;
use engine::pipelines::{Img2ImgInput, InpaintInput, PipelineKind, Task};
use serde::{Deserialize, Serialize};

use super::canvas::{PAINTED, PaintCanvas};
use crate::image_files::{luma8_to_host, rgb8_to_host};

/// The side lengths the VAE takes are multiples of this.
pub const SIDE_MULTIPLE: usize = 8;

/// How an image whose sides are not multiples of 8 is brought to a size the model takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SizeFit {
    /// Scale the whole image to the nearest smaller multiples of 8 (diffusers' preprocessing).
    #[default]
    Resize,
    /// Cut the extra rows and columns off, centred; no resampling.
    Crop,
}

/// The loaded source image and the mask painted on it.
pub struct SourceImage {
    /// Where it came from (file name, or the gallery).
    pub label: String,
    pub width: usize,
    pub height: usize,
    /// RGB8, row-major.
    pub rgb: Vec<u8>,
    /// The inpainting mask (white = repaint), the image's size.
    pub canvas: PaintCanvas,
    texture: OnceLock<egui::TextureHandle>,
}

impl std::fmt::Debug for SourceImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceImage")
            .field("label", &self.label)
            .field("size", &(self.width, self.height))
            .finish_non_exhaustive()
    }
}

impl SourceImage {
    /// The image as a texture (uploaded on first use).
    pub fn texture(&self, ctx: &egui::Context) -> egui::TextureHandle {
        self.texture
            .get_or_init(|| {
                ctx.load_texture(
                    format!("source-{}", self.label),
                    egui::ColorImage::from_rgb([self.width, self.height], &self.rgb),
                    egui::TextureOptions::LINEAR,
                )
            })
            .clone()
    }
}

/// Reads a PNG/JPEG as a page's source: `(label, width, height, rgb8)`; both sides must be at
/// least 8 pixels.
pub fn read_source(path: &Path) -> Result<(String, usize, usize, Vec<u8>)> {
    let img = crate::image_files::open_image(path, "image")?.to_rgb8();
    let label = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w < SIDE_MULTIPLE || h < SIDE_MULTIPLE {
        bail!("{label} is {w}×{h}: both sides must be at least {SIDE_MULTIPLE} pixels");
    }
    Ok((label, w, h, img.into_raw()))
}

/// What img2img and inpainting run from (AppState's `inputs`): the picture, and the settings
/// ([`ImageSettings`], reached through `Deref`: `inputs.strength`).
#[derive(Debug, Default)]
pub struct ImageInputs {
    pub source: Option<SourceImage>,
    pub settings: ImageSettings,
}

impl std::ops::Deref for ImageInputs {
    type Target = ImageSettings;
    fn deref(&self) -> &ImageSettings {
        &self.settings
    }
}

impl std::ops::DerefMut for ImageInputs {
    fn deref_mut(&mut self) -> &mut ImageSettings {
        &mut self.settings
    }
}

/// The image pages' settings, saved with the session as they are: a field added here is saved
/// and restored with no other edit (`#[serde(default)]`: a session without it takes the
/// default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageSettings {
    /// img2img strength.
    pub strength: f64,
    /// Inpainting strength.
    pub inpaint_strength: f64,
    pub fit: SizeFit,
    /// Mask blur radius, pixels.
    pub mask_blur: f64,
    /// "Only masked": inpaint the mask's box at the prompt panel's size and paste it back.
    pub only_masked: bool,
    /// Padding around the mask's box for "only masked", pixels.
    pub padding: usize,
}

impl Default for ImageSettings {
    fn default() -> Self {
        Self {
            strength: PipelineKind::Img2Img.default_strength(),
            inpaint_strength: PipelineKind::Inpaint.default_strength(),
            fit: SizeFit::Resize,
            mask_blur: 0.0,
            only_masked: false,
            padding: 32,
        }
    }
}

/// What a page adds to a generation request: its task, and the size it works at.
#[derive(Debug, Clone, PartialEq)]
pub struct PageTask {
    pub task: Task,
    pub width: usize,
    pub height: usize,
}

impl ImageSettings {
    /// What a stored value may not hold (a hand edit, an older build): back to the default, or
    /// to the nearest value the page allows.
    pub fn sanitize(&mut self) {
        let defaults = Self::default();
        let unit = |v: f64, default: f64| if (0.0..=1.0).contains(&v) { v } else { default };
        self.strength = unit(self.strength, defaults.strength);
        self.inpaint_strength = unit(self.inpaint_strength, defaults.inpaint_strength);
        self.mask_blur = if self.mask_blur.is_finite() {
            self.mask_blur.clamp(0.0, 64.0)
        } else {
            defaults.mask_blur
        };
        self.padding = self.padding.min(1024);
    }
}

impl ImageInputs {
    /// Makes `rgb` the source image. A mask of the same size is kept (a new version of the same
    /// picture keeps its mask); another size starts an empty one.
    pub fn set_source(&mut self, label: String, width: usize, height: usize, rgb: Vec<u8>) {
        let canvas = match self.source.take() {
            Some(old) if (old.width, old.height) == (width, height) => old.canvas,
            Some(old) => {
                let mut canvas = PaintCanvas::new(width, height);
                canvas.brush_radius = old.canvas.brush_radius;
                canvas.tool = old.canvas.tool;
                canvas
            }
            None => PaintCanvas::new(width, height),
        };
        self.source = Some(SourceImage {
            label,
            width,
            height,
            rgb,
            canvas,
            texture: OnceLock::new(),
        });
    }

    /// Loads a PNG/JPEG file as the source image.
    pub fn open(&mut self, path: &Path) -> Result<()> {
        let (label, w, h, rgb) = read_source(path)?;
        self.set_source(label, w, h, rgb);
        Ok(())
    }

    /// The size generation works at: the image's sides rounded down to multiples of 8.
    pub fn working_size(&self) -> Option<(usize, usize)> {
        let s = self.source.as_ref()?;
        let round = |v: usize| (v / SIDE_MULTIPLE * SIDE_MULTIPLE).max(SIDE_MULTIPLE);
        Some((round(s.width), round(s.height)))
    }

    /// What happens to the image's size, for the page: e.g. "1023×767, works at 1016×760
    /// (resized)".
    pub fn size_note(&self) -> Option<String> {
        let s = self.source.as_ref()?;
        let (w, h) = self.working_size()?;
        Some(if (w, h) == (s.width, s.height) {
            format!("{w}×{h}")
        } else {
            let how = match self.fit {
                SizeFit::Resize => "resized",
                SizeFit::Crop => "cropped",
            };
            format!("{}×{}, works at {w}×{h} ({how})", s.width, s.height)
        })
    }

    /// Saves the mask as a grey PNG (white = repaint).
    pub fn save_mask(&self, path: &Path) -> Result<()> {
        let s = self.source.as_ref().context("no image is loaded")?;
        let mask =
            image::GrayImage::from_raw(s.width as u32, s.height as u32, s.canvas.layer().to_vec())
                .context("mask buffer")?;
        crate::image_files::save_png(path, mask)
    }

    /// Loads a mask PNG (grey levels ≥ 128 are painted) into the canvas, as one undo step.
    pub fn load_mask(&mut self, path: &Path) -> Result<()> {
        let s = self
            .source
            .as_mut()
            .context("load an image before its mask")?;
        let img = crate::image_files::open_image(path, "mask")?.to_luma8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        if (w, h) != (s.width, s.height) {
            bail!(
                "the mask {} is {w}×{h} but the image is {}×{}",
                path.display(),
                s.width,
                s.height
            );
        }
        let layer = img
            .into_raw()
            .into_iter()
            .map(|v| if v >= 128 { PAINTED } else { 0 })
            .collect();
        s.canvas.replace_layer(layer).map_err(anyhow::Error::msg)
    }

    /// The image (and mask) a request of `pipeline` takes, at the size it works at;
    /// `form_size` is the prompt panel's size ("only masked" works at that size). Errors say
    /// what the user must do first.
    pub fn task(&self, pipeline: PipelineKind, form_size: (usize, usize)) -> Result<PageTask> {
        let Some(s) = &self.source else {
            bail!(
                "load an image first: Open image…, drop a file here, or send one from the gallery"
            );
        };
        let inpaint = pipeline == PipelineKind::Inpaint;
        if inpaint && s.canvas.is_empty() {
            bail!("paint the region to repaint first (the mask is empty)");
        }
        let (w8, h8) = self.working_size().context("no image")?;
        let (x0, y0, cw, ch) = match self.fit {
            SizeFit::Crop => ((s.width - w8) / 2, (s.height - h8) / 2, w8, h8),
            SizeFit::Resize => (0, 0, s.width, s.height),
        };
        let mut rgb = Vec::with_capacity(cw * ch * 3);
        let mut mask = Vec::with_capacity(cw * ch);
        for y in y0..y0 + ch {
            let row = y * s.width;
            rgb.extend_from_slice(&s.rgb[(row + x0) * 3..(row + x0 + cw) * 3]);
            mask.extend_from_slice(&s.canvas.layer()[row + x0..row + x0 + cw]);
        }
        let only_masked = inpaint && self.only_masked;
        let (width, height) = if only_masked { form_size } else { (w8, h8) };
        let image = rgb8_to_host(cw, ch, &rgb);
        let task = if inpaint {
            Task::Inpaint(InpaintInput {
                image,
                mask: luma8_to_host(cw, ch, &mask),
                strength: Some(self.inpaint_strength),
                mask_blur: self.mask_blur,
                padding_mask_crop: only_masked.then_some(self.padding),
            })
        } else {
            Task::Img2Img(Img2ImgInput {
                image,
                strength: Some(self.strength),
            })
        };
        Ok(PageTask {
            task,
            width,
            height,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(w: usize, h: usize) -> ImageInputs {
        let mut i = ImageInputs::default();
        i.set_source("x".into(), w, h, (0..w * h * 3).map(|v| v as u8).collect());
        i
    }

    #[test]
    fn odd_sizes_are_resized_or_cropped_to_multiples_of_eight() {
        let mut i = inputs(21, 17);
        assert_eq!(i.working_size(), Some((16, 16)));
        assert_eq!(i.size_note().unwrap(), "21×17, works at 16×16 (resized)");
        let r = i.task(PipelineKind::Img2Img, (512, 512)).unwrap();
        let Task::Img2Img(input) = &r.task else {
            panic!("{:?}", r.task)
        };
        assert_eq!(input.image.shape, vec![17, 21, 3], "the engine resizes");
        assert_eq!((r.width, r.height), (16, 16));
        assert_eq!(input.strength, Some(0.8));
        i.fit = SizeFit::Crop;
        let r = i.task(PipelineKind::Img2Img, (512, 512)).unwrap();
        let image = r.task.init_image().unwrap();
        assert_eq!(image.shape, vec![16, 16, 3]);
        // centred: starts at column 2, row 0
        assert_eq!(image.values[0], (2.0 * 3.0) / 255.0);
    }

    #[test]
    fn inpainting_needs_a_mask_and_keeps_it_across_a_same_size_image() {
        let mut i = inputs(16, 16);
        let err = i.task(PipelineKind::Inpaint, (8, 8)).unwrap_err();
        assert!(err.to_string().contains("mask is empty"), "{err}");
        let s = i.source.as_mut().unwrap();
        s.canvas.begin_stroke(egui::pos2(8.0, 8.0));
        s.canvas.finish_stroke();
        i.only_masked = true;
        let r = i.task(PipelineKind::Inpaint, (8, 8)).unwrap();
        assert_eq!(
            (r.width, r.height),
            (8, 8),
            "only masked works at the form's size"
        );
        let Task::Inpaint(input) = r.task else {
            panic!("{:?}", r.task)
        };
        assert_eq!(input.padding_mask_crop, Some(32));
        assert!(input.mask.values.contains(&1.0));
        i.set_source("y".into(), 16, 16, vec![0; 16 * 16 * 3]);
        assert!(!i.source.as_ref().unwrap().canvas.is_empty(), "mask kept");
        i.set_source("z".into(), 24, 16, vec![0; 24 * 16 * 3]);
        assert!(
            i.source.as_ref().unwrap().canvas.is_empty(),
            "new size, new mask"
        );
    }

    #[test]
    fn no_image_is_a_clear_error() {
        let i = ImageInputs::default();
        let err = i.task(PipelineKind::Img2Img, (8, 8)).unwrap_err();
        assert!(err.to_string().contains("load an image first"), "{err}");
    }
}
