//! The pictures being worked on — the img2img/inpainting source with its painted mask, the
//! ControlNet source with the strokes drawn over its map — written beside the app's settings
//! whenever those are saved (eframe's autosave, closing, "Restart now"), and read back at the
//! next start. A precision switch restarts the app; a mask someone spent minutes on must not go
//! with it.
//!
//! Each picture is two lossless PNGs: the image (RGB8) and its layer (one byte per pixel, the
//! canvas' own values). Unchanged pictures are not written again.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// A saved picture: where its two files are, and its label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPicture {
    /// What the page calls it (file name, "blank", "gallery").
    pub label: String,
    /// The image, RGB8 PNG.
    pub image: PathBuf,
    /// The canvas layer, 8-bit grey PNG of the layer's bytes.
    pub layer: PathBuf,
}

impl SavedPicture {
    /// Whether both files are ones Brushfire itself writes: `<folder>/<name>.png` and
    /// `<folder>/<name>-layer.png` for one of `names`, the same absolute folder, no `..`. The
    /// paths come from the settings file, and a picture that is replaced or cleared has its files
    /// removed: a tampered settings file must not make Brushfire read or delete anything else.
    pub fn is_ours(&self, names: &[&str]) -> bool {
        let plain = |p: &Path| {
            p.is_absolute()
                && p.components()
                    .all(|c| !matches!(c, std::path::Component::ParentDir))
        };
        let file_name = |p: &Path| p.file_name().and_then(|n| n.to_str()).map(String::from);
        plain(&self.image)
            && plain(&self.layer)
            && self.image.parent().is_some()
            && self.image.parent() == self.layer.parent()
            && names.iter().any(|name| {
                file_name(&self.image).as_deref() == Some(format!("{name}.png").as_str())
                    && file_name(&self.layer).as_deref()
                        == Some(format!("{name}-layer.png").as_str())
            })
    }
}

/// A picture as the pages hold it.
#[derive(Clone, Copy)]
pub struct Picture<'a> {
    pub label: &'a str,
    pub width: usize,
    pub height: usize,
    /// RGB8, row-major.
    pub rgb: &'a [u8],
    /// One byte per pixel.
    pub layer: &'a [u8],
}

impl Picture<'_> {
    /// A cheap fingerprint of everything written (to skip unchanged pictures).
    pub fn fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.label, self.width, self.height, self.rgb, self.layer).hash(&mut h);
        h.finish()
    }
}

/// A picture read back: `(label, width, height, rgb, layer)`.
pub type Restored = (String, usize, usize, Vec<u8>, Vec<u8>);

/// Writes `picture` as `<dir>/<name>.png` and `<dir>/<name>-layer.png` (atomically).
pub fn write_picture(dir: &Path, name: &str, picture: &Picture) -> Result<SavedPicture> {
    let (w, h) = (picture.width, picture.height);
    if picture.rgb.len() != w * h * 3 || picture.layer.len() != w * h {
        bail!(
            "{name}: {} image bytes and {} layer bytes for {w}×{h}",
            picture.rgb.len(),
            picture.layer.len()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let saved = SavedPicture {
        label: picture.label.to_string(),
        image: dir.join(format!("{name}.png")),
        layer: dir.join(format!("{name}-layer.png")),
    };
    let (wu, hu) = (u32::try_from(w)?, u32::try_from(h)?);
    write_png(&saved.image, wu, hu, png::ColorType::Rgb, picture.rgb)?;
    write_png(
        &saved.layer,
        wu,
        hu,
        png::ColorType::Grayscale,
        picture.layer,
    )?;
    Ok(saved)
}

fn write_png(
    path: &Path,
    width: u32,
    height: u32,
    color: png::ColorType,
    data: &[u8],
) -> Result<()> {
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, width, height);
        encoder.set_color(color);
        encoder.set_depth(png::BitDepth::Eight);
        // These files are written on the UI thread (eframe's save): a 2048² picture took
        // ~800 ms at the default level, a stutter every autosave while someone paints; ~40 ms
        // here, for files a few times larger.
        encoder.set_compression(png::Compression::Fastest);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(data)?;
        writer.finish()?;
    }
    engine::tensor_io::write_atomic(path, &bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Reads a saved picture back; the two files must agree in size.
pub fn read_picture(saved: &SavedPicture) -> Result<Restored> {
    let image = image::open(&saved.image)
        .with_context(|| format!("reading {}", saved.image.display()))?
        .to_rgb8();
    let layer = image::open(&saved.layer)
        .with_context(|| format!("reading {}", saved.layer.display()))?
        .to_luma8();
    if image.dimensions() != layer.dimensions() {
        bail!(
            "{} is {:?} but its layer {} is {:?}",
            saved.image.display(),
            image.dimensions(),
            saved.layer.display(),
            layer.dimensions()
        );
    }
    let (w, h) = image.dimensions();
    Ok((
        saved.label.clone(),
        w as usize,
        h as usize,
        image.into_raw(),
        layer.into_raw(),
    ))
}

/// Removes a saved picture's files (the page has none any more); missing files are fine.
pub fn remove_picture(saved: &SavedPicture) {
    for path in [&saved.image, &saved.layer] {
        if let Err(e) = std::fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("could not remove {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_picture_and_its_layer_come_back_byte_for_byte() {
        let dir = std::env::temp_dir().join(format!("brushfire-work-{}", std::process::id()));
        let rgb: Vec<u8> = (0..5 * 3 * 3).map(|v| (v * 7) as u8).collect();
        let layer: Vec<u8> = (0..15).map(|v| [0, 255, 128][v % 3]).collect();
        let picture = Picture {
            label: "photo.jpg",
            width: 5,
            height: 3,
            rgb: &rgb,
            layer: &layer,
        };
        let saved = write_picture(&dir, "inpaint", &picture).unwrap();
        assert_eq!(saved.image, dir.join("inpaint.png"));
        let back = read_picture(&saved).unwrap();
        assert_eq!(
            back,
            ("photo.jpg".to_string(), 5, 3, rgb.clone(), layer.clone())
        );
        // Any change moves the fingerprint.
        let mut other = layer.clone();
        other[7] = 1;
        let changed = Picture {
            layer: &other,
            ..picture
        };
        assert_ne!(picture.fingerprint(), changed.fingerprint());
        // Sizes that disagree are refused, on writing and on reading.
        let short = Picture {
            layer: &layer[..14],
            ..picture
        };
        assert!(write_picture(&dir, "bad", &short).is_err());
        let mismatched = SavedPicture {
            layer: write_picture(
                &dir,
                "small",
                &Picture {
                    width: 1,
                    height: 1,
                    rgb: &rgb[..3],
                    layer: &layer[..1],
                    ..picture
                },
            )
            .unwrap()
            .layer,
            ..saved.clone()
        };
        let err = read_picture(&mismatched).unwrap_err().to_string();
        assert!(err.contains("is (5, 3) but its layer"), "{err}");
        remove_picture(&saved);
        assert!(!saved.image.exists() && !saved.layer.exists());
        remove_picture(&saved);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
