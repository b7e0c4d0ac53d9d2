//! The gallery: the finished images, the one selected, their saving (on the saver thread,
//! `saver.rs`) and the images of the last session read back at start. The state's slice for
//! it: what comes in (a finished image, a save's outcome, a restored image) and what it keeps.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, TryRecvError};

use eframe::egui;

use super::saver::{ImageSaver, SaveRequest, Saved, free_path};
use crate::png_meta::{GenerationParameters, ParsedParameters, read_parameters_text, write_png};

/// How many of the gallery's newest saved images come back at the next start (held in memory
/// as RGB, like every gallery image: 48 at 1024² is ~150 MB).
const GALLERY_KEPT: usize = 48;

/// One finished image.
pub struct GalleryImage {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
    /// How it was made (what its PNG says).
    pub params: GenerationParameters,
    pub path: Option<PathBuf>,
    /// Set while the saver thread writes it (the outcome names it).
    pub(super) save_id: Option<u64>,
    pub(super) texture: OnceLock<egui::TextureHandle>,
}

impl GalleryImage {
    /// A saved image read back (its pixels and its `parameters`), for a gallery restored at
    /// start.
    pub fn from_png(path: &Path) -> anyhow::Result<Self> {
        let img = crate::image_files::open_image(path, "image")?.to_rgb8();
        let (width, height) = (img.width() as usize, img.height() as usize);
        let text = read_parameters_text(path)?.unwrap_or_default();
        Ok(Self {
            width,
            height,
            rgb: img.into_raw(),
            params: GenerationParameters::from_parsed(
                &ParsedParameters::parse(&text),
                width,
                height,
            ),
            path: Some(path.to_path_buf()),
            save_id: None,
            texture: OnceLock::new(),
        })
    }

    /// Whether its PNG is being written right now.
    pub fn saving(&self) -> bool {
        self.save_id.is_some()
    }

    /// The image as a texture (uploaded on first use).
    pub fn texture(&self, ctx: &egui::Context) -> egui::TextureHandle {
        self.texture
            .get_or_init(|| {
                ctx.load_texture(
                    format!("image-{}-{}", self.params.seed, self.rgb.len()),
                    egui::ColorImage::from_rgb([self.width, self.height], &self.rgb),
                    egui::TextureOptions::LINEAR,
                )
            })
            .clone()
    }

    /// The pixels for the clipboard.
    pub fn color_image(&self) -> egui::ColorImage {
        egui::ColorImage::from_rgb([self.width, self.height], &self.rgb)
    }
}

/// The finished images (a `Vec` of them: `gallery[i]`, `gallery.len()`) and their saving.
pub struct Gallery {
    images: Vec<GalleryImage>,
    /// The image shown large.
    pub selected: Option<usize>,
    /// Saved images being read back at start, on a thread (decoding PNGs takes a while), and
    /// how many have arrived (they go before anything made since).
    loader: Option<(Receiver<GalleryImage>, usize)>,
    /// Writes finished images off the UI thread (started on first use).
    saver: Option<ImageSaver>,
    /// The id of the next image handed to the saver.
    next_save_id: u64,
}

impl Default for Gallery {
    fn default() -> Self {
        Self {
            images: Vec::new(),
            selected: None,
            loader: None,
            saver: None,
            next_save_id: 1,
        }
    }
}

impl std::ops::Deref for Gallery {
    type Target = Vec<GalleryImage>;
    fn deref(&self) -> &Vec<GalleryImage> {
        &self.images
    }
}

impl std::ops::DerefMut for Gallery {
    fn deref_mut(&mut self) -> &mut Vec<GalleryImage> {
        &mut self.images
    }
}

impl Gallery {
    /// A gallery that reads `paths` back on a thread (images deleted or moved since are left
    /// out); they arrive through [`Self::receive`].
    pub fn restore(paths: Vec<PathBuf>) -> Self {
        let mut gallery = Self::default();
        if paths.is_empty() {
            return gallery;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("gallery-restore".into())
            .spawn(move || {
                for path in paths {
                    match GalleryImage::from_png(&path) {
                        Ok(img) => {
                            if tx.send(img).is_err() {
                                break;
                            }
                        }
                        Err(e) => tracing::info!("gallery image not restored: {e:#}"),
                    }
                }
            });
        match spawned {
            Ok(_) => gallery.loader = Some((rx, 0)),
            Err(e) => tracing::warn!("the gallery is not restored: {e}"),
        }
        gallery
    }

    /// Puts restored images in place as they arrive (`wait`: until all have). Returns whether
    /// more are coming.
    pub fn receive(&mut self, wait: bool) -> bool {
        let Some((rx, arrived)) = self.loader.as_mut() else {
            return false;
        };
        loop {
            let next = if wait {
                rx.recv().ok()
            } else {
                match rx.try_recv() {
                    Ok(img) => Some(img),
                    Err(TryRecvError::Empty) => return true,
                    Err(TryRecvError::Disconnected) => None,
                }
            };
            let Some(img) = next else {
                self.loader = None;
                return false;
            };
            // Older than anything made since the start: before it, in saved order.
            self.images.insert(*arrived, img);
            // The newest restored image stays selected, unless something newer is.
            self.selected = match self.selected {
                None => Some(*arrived),
                Some(i) if i + 1 == *arrived => Some(*arrived),
                Some(i) if i >= *arrived => Some(i + 1),
                Some(i) => Some(i),
            };
            *arrived += 1;
        }
    }

    /// Adds a finished image (image `index` of its batch) and selects it; with an `output_dir`
    /// it is handed to the saver thread, to be written there under a fresh name (an existing
    /// file is never replaced, even by another Brushfire writing the same folder).
    pub fn add(
        &mut self,
        rgb: Vec<u8>,
        params: GenerationParameters,
        index: usize,
        output_dir: Option<&Path>,
    ) {
        let save_id = output_dir.map(|dir| {
            let id = self.next_save_id;
            self.next_save_id += 1;
            let number = self.images.len();
            self.saver
                .get_or_insert_with(|| ImageSaver::spawn(|| {}))
                .save(SaveRequest {
                    id,
                    dir: dir.to_path_buf(),
                    number,
                    index,
                    width: params.width,
                    height: params.height,
                    rgb: rgb.clone(),
                    params: params.clone(),
                });
            id
        });
        self.images.push(GalleryImage {
            width: params.width,
            height: params.height,
            rgb,
            params,
            path: None,
            save_id,
            texture: OnceLock::new(),
        });
        self.selected = Some(self.images.len() - 1);
    }

    /// Applies the saves that finished; returns what the user should read (a save that failed,
    /// parameters that could not be embedded). Starts the saver with `ctx`'s repaint as its
    /// waker if none runs yet.
    pub fn poll_saves(&mut self, ctx: &egui::Context) -> Vec<String> {
        let saver = self.saver.get_or_insert_with(|| {
            let ctx = ctx.clone();
            ImageSaver::spawn(move || ctx.request_repaint())
        });
        let saved = saver.try_results();
        saved
            .into_iter()
            .filter_map(|s| self.apply_saved(s))
            .collect()
    }

    /// Waits for the images being written (before a restart, and before the session names
    /// the gallery's files); returns what the user should read.
    pub fn finish_saves(&mut self) -> Vec<String> {
        let saved = self.saver.as_mut().map(ImageSaver::finish);
        saved
            .into_iter()
            .flatten()
            .filter_map(|s| self.apply_saved(s))
            .collect()
    }

    fn apply_saved(&mut self, saved: Saved) -> Option<String> {
        let image = self
            .images
            .iter_mut()
            .find(|g| g.save_id == Some(saved.id))?;
        image.save_id = None;
        match saved.result {
            Ok((path, warning)) => {
                image.path = Some(path);
                warning
            }
            Err(e) => Some(format!(
                "could not save the image: {e}. It stays in the gallery, unsaved: \
                 \"Save as…\" writes it elsewhere"
            )),
        }
    }

    /// Writes the images that are not saved (no save folder, or a failed save) into `dir`,
    /// where the next start reads them back (before a restart).
    pub fn keep_unsaved_in(&mut self, dir: &Path) -> anyhow::Result<()> {
        self.finish_saves();
        std::fs::create_dir_all(dir)?;
        for (i, img) in self.images.iter_mut().enumerate() {
            if img.path.is_some() {
                continue;
            }
            let path = free_path(dir, i, img.params.seed, 0);
            // Unsaved images keep their parameters when they can; the picture matters more.
            let _metadata = write_png(&path, img.width, img.height, &img.rgb, &img.params)?;
            img.path = Some(path);
        }
        Ok(())
    }

    /// The saved images the next start reads back: the newest [`GALLERY_KEPT`], oldest first.
    pub fn kept_paths(&self) -> Vec<PathBuf> {
        let saved: Vec<PathBuf> = self.images.iter().filter_map(|g| g.path.clone()).collect();
        saved[saved.len().saturating_sub(GALLERY_KEPT)..].to_vec()
    }

    /// The selected image.
    pub fn selected_image(&self) -> Option<&GalleryImage> {
        self.selected.and_then(|i| self.images.get(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gui::AppState;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("brushfire-gallery-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn image(seed: u64, path: Option<PathBuf>) -> GalleryImage {
        let (width, height) = (8, 4);
        GalleryImage {
            width,
            height,
            rgb: (0..width * height * 3)
                .map(|i| (i * 7 + seed as usize) as u8)
                .collect(),
            params: GenerationParameters {
                prompt: format!("a lighthouse {seed}"),
                negative_prompt: "blurry".into(),
                steps: 20,
                sampler: "PNDM".into(),
                cfg_scale: 7.5,
                seed,
                width,
                height,
                model: "tiny-sd".into(),
                denoising_strength: Some(0.6),
                controlnet: None,
            },
            path,
            save_id: None,
            texture: OnceLock::new(),
        }
    }

    #[test]
    fn the_gallery_comes_back_at_the_next_start_without_overwriting_anything() {
        let dir = temp_dir("gallery");
        let mut state = AppState::new("tiny-sd".into());
        state.output_dir = Some(dir.clone());
        for seed in [42, 42] {
            let img = image(seed, None);
            state.gallery.add(img.rgb, img.params, 0, Some(&dir));
            // Written in order: the second finds the first's name taken.
            state.finish_saves();
        }
        // Same seed and position as a file from an earlier session: a new name, not an overwrite.
        let paths: Vec<PathBuf> = state
            .gallery
            .iter()
            .map(|g| g.path.clone().unwrap())
            .collect();
        assert_ne!(paths[0], paths[1]);
        let mut fresh = AppState::new("tiny-sd".into());
        fresh.output_dir = Some(dir.clone());
        let again = image(42, None);
        fresh.gallery.add(again.rgb, again.params, 0, Some(&dir));
        fresh.finish_saves();
        let third = fresh.gallery[0].path.clone().unwrap();
        assert!(
            !paths.contains(&third),
            "{third:?} overwrote an earlier image"
        );

        // One image never saved (no folder): kept in the cache before a restart.
        state.gallery.push(image(7, None));
        std::fs::remove_file(&paths[1]).unwrap(); // deleted by the user since
        let cache = temp_dir("cache");
        state.gallery.keep_unsaved_in(&cache).unwrap();
        let kept = state.gallery[2]
            .path
            .clone()
            .expect("written before the restart");
        assert!(kept.starts_with(&cache), "{kept:?}");

        let persisted = state.to_persisted();
        assert_eq!(
            persisted.gallery,
            vec![paths[0].clone(), paths[1].clone(), kept.clone()]
        );
        let mut restored = AppState::restore(&persisted, None);
        assert!(!restored.gallery.receive(true), "all arrived");
        assert_eq!(restored.gallery.len(), 2, "the deleted image is left out");
        for (got, want) in restored
            .gallery
            .iter()
            .zip([&state.gallery[0], &state.gallery[2]])
        {
            assert_eq!((got.width, got.height), (want.width, want.height));
            assert_eq!(got.rgb, want.rgb);
            assert_eq!(got.params, want.params);
        }
        assert_eq!(restored.gallery.selected, Some(1));
    }
}
