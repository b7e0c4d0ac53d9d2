//! The ControlNet page's inputs: the source image, the control map made from it (its Canny
//! edges, or the image as it is), the strokes drawn over the map (pen adds white lines, the
//! eraser blacks out what is under it), and the ControlNet's settings.
//!
//! The strokes live in their own layer over the map, so moving the Canny thresholds or switching
//! between edges and the image keeps what the user drew.

use std::path::Path;

use anyhow::{Context, Result, bail};
use eframe::egui::{self, Color32};
use engine::pipelines::control_preprocess::Canny;
use engine::pipelines::{ControlNetInput, Task};
use engine::worker::EngineEvent;
use serde::{Deserialize, Serialize};

use super::canvas::{ERASED, PAINTED, PaintCanvas};
use super::download::DownloadState;
use super::image_input::{PageTask, SIDE_MULTIPLE, read_source};
use crate::image_files::rgb8_to_host;
use crate::png_meta::ControlNetParameters;

/// The ControlNet suggested when none was picked yet (diffusers' canny ControlNet for SD 1.5).
pub const DEFAULT_CONTROLNET: &str = "lllyasviel/sd-controlnet-canny";

/// What the control map is made of, under the drawn strokes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MapSource {
    /// Canny edges of the source image (white on black).
    #[default]
    Canny,
    /// The source image as it is (an edge map or sketch made elsewhere; black for a blank map).
    AsIs,
}

/// The image a control map is made from, with the strokes drawn over the map.
pub struct ControlSource {
    /// Where it came from (file name, "blank", or the gallery).
    pub label: String,
    pub width: usize,
    pub height: usize,
    /// RGB8, row-major.
    pub rgb: Vec<u8>,
    /// The strokes: [`PAINTED`] = white line, [`ERASED`] = blacked out, 0 = the map shows.
    pub canvas: PaintCanvas,
    /// The map under the strokes (RGB8), with what it was made from.
    map: Option<(MapSource, Canny, Vec<u8>)>,
    /// Bumped whenever the map is made again.
    map_revision: u64,
    texture: Option<(u64, egui::TextureHandle)>,
}

impl std::fmt::Debug for ControlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlSource")
            .field("label", &self.label)
            .field("size", &(self.width, self.height))
            .finish_non_exhaustive()
    }
}

/// Where restored parameters come from, which decides whether a ControlNet path in them is
/// followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A gallery image of this app (made here, or read back from its own output folder).
    Gallery,
    /// A picture opened or dropped from anywhere: its metadata names hub ids only.
    File,
}

/// A canvas for drawing over control maps: thin white lines, an eraser that blacks out.
fn map_canvas(width: usize, height: usize) -> PaintCanvas {
    let mut canvas = PaintCanvas::new(width, height);
    canvas.brush_radius = 1.5;
    canvas.overlay_color = Color32::WHITE;
    canvas.eraser_value = ERASED;
    canvas.erased_color = Color32::BLACK;
    canvas
}

/// The ControlNet page's state (AppState's `control`): the picture, the ControlNet's loading,
/// and the settings ([`ControlSettings`], reached through `Deref`: `control.scale`).
#[derive(Debug, Default)]
pub struct ControlInputs {
    pub source: Option<ControlSource>,
    pub settings: ControlSettings,
    /// The ControlNet the engine has attached, once it said so.
    pub loaded: Option<String>,
    /// A ControlNet load is under way.
    pub loading: bool,
    /// Its download, while one runs.
    pub download: Option<DownloadState>,
    /// Attach this ControlNet once the model has loaded (the one attached when the app closed).
    pub pending_load: Option<String>,
}

impl std::ops::Deref for ControlInputs {
    type Target = ControlSettings;
    fn deref(&self) -> &ControlSettings {
        &self.settings
    }
}

impl std::ops::DerefMut for ControlInputs {
    fn deref_mut(&mut self) -> &mut ControlSettings {
        &mut self.settings
    }
}

/// The ControlNet page's settings, saved with the session as they are: a field added here is
/// saved and restored with no other edit (`#[serde(default)]`: a session without it takes the
/// default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ControlSettings {
    pub map_source: MapSource,
    pub canny: Canny,
    /// `controlnet_conditioning_scale`.
    pub scale: f64,
    /// `control_guidance_start` / `_end`, fractions of the steps.
    pub guidance_start: f64,
    pub guidance_end: f64,
    pub guess_mode: bool,
    /// The ControlNet to load: a folder, a hub id or a single-file checkpoint.
    pub controlnet_spec: String,
}

impl Default for ControlSettings {
    fn default() -> Self {
        Self {
            map_source: MapSource::Canny,
            canny: Canny::default(),
            scale: 1.0,
            guidance_start: 0.0,
            guidance_end: 1.0,
            guess_mode: false,
            controlnet_spec: DEFAULT_CONTROLNET.into(),
        }
    }
}

impl ControlSettings {
    /// What a stored value may not hold (a hand edit, an older build): back to the default.
    pub fn sanitize(&mut self) {
        let defaults = Self::default();
        if self.controlnet_spec.trim().is_empty() {
            self.controlnet_spec = defaults.controlnet_spec;
        }
        if !(0.0..=2.0).contains(&self.scale) {
            self.scale = defaults.scale;
        }
        let (start, end) = (self.guidance_start, self.guidance_end);
        if !((0.0..=1.0).contains(&start) && (0.0..=1.0).contains(&end) && start <= end) {
            (self.guidance_start, self.guidance_end) =
                (defaults.guidance_start, defaults.guidance_end);
        }
        if self.canny.check().is_err() {
            self.canny = defaults.canny;
        }
    }
}

/// What an engine event meant to the ControlNet page.
#[derive(Debug)]
#[must_use]
pub enum ControlEvent {
    /// Not the page's: the event, handed back for the rest of the app.
    NotMine(Box<EngineEvent>),
    /// Taken in; nothing to say.
    Quiet,
    /// Taken in; the status line says this.
    Status(String),
    /// Taken in; the user must read this.
    Error(String),
}

impl ControlInputs {
    /// The page's reducer: a ControlNet's download progress, its load finishing or failing.
    /// Everything else is handed back.
    pub fn apply_event(&mut self, event: EngineEvent) -> ControlEvent {
        match event {
            EngineEvent::Download {
                file,
                done_bytes,
                total_bytes,
            } if self.loading => {
                let started = match &self.download {
                    Some(d) if d.file == file => d.started,
                    _ => std::time::Instant::now(),
                };
                self.download = Some(DownloadState {
                    file,
                    done_bytes,
                    total_bytes,
                    started,
                });
                ControlEvent::Quiet
            }
            EngineEvent::ControlNetLoaded {
                spec, elapsed_secs, ..
            } => {
                let status = format!("loaded the ControlNet {spec} in {elapsed_secs:.1}s");
                self.loaded = Some(spec);
                self.loading = false;
                self.download = None;
                ControlEvent::Status(status)
            }
            EngineEvent::ControlNetFailed {
                spec,
                error,
                attached,
            } => {
                self.loaded = attached;
                self.loading = false;
                self.download = None;
                ControlEvent::Error(format!("ControlNet {spec}: {error}"))
            }
            other => ControlEvent::NotMine(Box::new(other)),
        }
    }

    /// Makes `rgb` the source. Strokes over a map of the same size are kept (a new version of
    /// the same picture keeps them); another size starts a clean layer.
    pub fn set_source(&mut self, label: String, width: usize, height: usize, rgb: Vec<u8>) {
        let canvas = match self.source.take() {
            Some(old) if (old.width, old.height) == (width, height) => old.canvas,
            Some(old) => {
                let mut canvas = map_canvas(width, height);
                canvas.brush_radius = old.canvas.brush_radius;
                canvas.tool = old.canvas.tool;
                canvas
            }
            None => map_canvas(width, height),
        };
        self.source = Some(ControlSource {
            label,
            width,
            height,
            rgb,
            canvas,
            map: None,
            map_revision: 0,
            texture: None,
        });
    }

    /// Loads a PNG/JPEG file as the source.
    pub fn open(&mut self, path: &Path) -> Result<()> {
        let (label, w, h, rgb) = read_source(path)?;
        self.set_source(label, w, h, rgb);
        Ok(())
    }

    /// A black map of `width × height` to draw on (the map is used as it is).
    pub fn new_blank(&mut self, width: usize, height: usize) {
        self.set_source("blank".into(), width, height, vec![0; width * height * 3]);
        self.map_source = MapSource::AsIs;
    }

    /// The map under the strokes (RGB8), made again when the source or thresholds changed.
    /// Canny thresholds are checked first; a bad pair is an error and the old map stays.
    pub fn base_map(&mut self) -> Result<&[u8]> {
        let (mode, canny) = (self.map_source, self.canny);
        let s = self.source.as_mut().context("no image is loaded")?;
        let fresh = matches!(&s.map, Some((m, c, _)) if *m == mode && (mode == MapSource::AsIs || *c == canny));
        if !fresh {
            let rgb = match mode {
                MapSource::AsIs => s.rgb.clone(),
                MapSource::Canny => {
                    let edges = canny.edges(&rgb8_to_host(s.width, s.height, &s.rgb))?;
                    edges.into_raw().into_iter().flat_map(|e| [e; 3]).collect()
                }
            };
            s.map = Some((mode, canny, rgb));
            s.map_revision += 1;
        }
        Ok(s.map.as_ref().map_or(&[][..], |(_, _, rgb)| rgb.as_slice()))
    }

    /// The map under the strokes as a texture (for the canvas), uploaded again when it changed.
    pub fn map_texture(&mut self, ctx: &egui::Context) -> Result<egui::TextureHandle> {
        self.base_map()?;
        let s = self.source.as_mut().context("no image is loaded")?;
        if let Some((revision, texture)) = &s.texture
            && *revision == s.map_revision
        {
            return Ok(texture.clone());
        }
        let rgb = s.map.as_ref().map_or(&[][..], |(_, _, rgb)| rgb.as_slice());
        let image = egui::ColorImage::from_rgb([s.width, s.height], rgb);
        let texture = match s.texture.take() {
            Some((_, mut texture)) => {
                texture.set(image, egui::TextureOptions::NEAREST);
                texture
            }
            None => ctx.load_texture("control-map", image, egui::TextureOptions::NEAREST),
        };
        s.texture = Some((s.map_revision, texture.clone()));
        Ok(texture)
    }

    /// Whether the canvas's texture shows the current map (the live preview is up to date).
    pub fn map_texture_is_current(&self) -> bool {
        self.source.as_ref().is_some_and(|s| {
            s.map.as_ref().is_some_and(|(m, c, _)| {
                *m == self.map_source && (*m == MapSource::AsIs || *c == self.canny)
            }) && s
                .texture
                .as_ref()
                .is_some_and(|(revision, _)| *revision == s.map_revision)
        })
    }

    /// The control map the ControlNet gets: the map with the strokes over it, RGB8.
    pub fn control_map(&mut self) -> Result<Vec<u8>> {
        let base = self.base_map()?.to_vec();
        let s = self.source.as_ref().context("no image is loaded")?;
        Ok(base
            .chunks(3)
            .zip(s.canvas.layer())
            .flat_map(|(px, &v)| match v {
                0 => [px[0], px[1], px[2]],
                PAINTED => [255; 3],
                _ => [0; 3],
            })
            .collect())
    }

    /// The size generation works at: the map's sides rounded down to multiples of 8 (the
    /// pipeline resizes the map to it, as diffusers sizes its output from the control image).
    pub fn working_size(&self) -> Option<(usize, usize)> {
        let s = self.source.as_ref()?;
        let round = |v: usize| (v / SIDE_MULTIPLE * SIDE_MULTIPLE).max(SIDE_MULTIPLE);
        Some((round(s.width), round(s.height)))
    }

    /// Takes a restored unit's settings: the map (canny with its thresholds, or the image as it
    /// is), weight, guidance window, control mode, and the ControlNet when it names a hub id, or
    /// (from a gallery image made here) a folder or file that exists (A1111 names its models
    /// `name [hash]`). Returns a note on what was not taken. The source image and the strokes
    /// stay as they are.
    pub fn apply_unit(&mut self, unit: &ControlNetParameters, origin: Origin) -> Vec<String> {
        let mut notes = Vec::new();
        match unit.canny {
            Some((low, high)) => match (Canny { low, high }).check() {
                Ok(()) => {
                    self.map_source = MapSource::Canny;
                    self.canny = Canny { low, high };
                }
                Err(e) => notes.push(format!("ControlNet canny thresholds not taken: {e}")),
            },
            None => self.map_source = MapSource::AsIs,
        }
        self.scale = unit.weight;
        let (start, end) = (unit.guidance_start, unit.guidance_end);
        if (0.0..=1.0).contains(&start) && (start..=1.0).contains(&end) {
            (self.guidance_start, self.guidance_end) = (start, end);
        } else {
            notes.push(format!(
                "ControlNet guidance window {start}…{end} not taken (0 ≤ start ≤ end ≤ 1)"
            ));
        }
        self.guess_mode = unit.guess_mode;
        let model = unit.model.trim();
        if model.is_empty() || model == self.controlnet_spec {
            return notes;
        }
        // A picture from elsewhere names a hub id only, never a path to follow.
        let usable = match origin {
            Origin::Gallery => Path::new(model).exists(),
            Origin::File => false,
        } || engine::loading::ModelSource::parse_untrusted(model).is_ok();
        if usable {
            self.controlnet_spec = model.to_string();
            if self.loaded.as_deref() != Some(model) {
                notes.push(format!("ControlNet {model} restored: load it to use it"));
            }
        } else {
            notes.push(format!(
                "ControlNet `{model}` is not a hub id (a path in a picture's metadata is not \
                 followed): {} kept",
                self.controlnet_spec
            ));
        }
        notes
    }

    /// What a ControlNet request takes. Errors say what the user must do first.
    pub fn task(&mut self) -> Result<PageTask> {
        if self.source.is_none() {
            bail!(
                "load a control image first: Open image…, drop one here, a blank map, or send one \
                 from the gallery"
            );
        }
        if self.loaded.is_none() {
            bail!("load a ControlNet first (the ControlNet field above the map)");
        }
        let rgb = self.control_map()?;
        let (width, height) = self.working_size().context("no image is loaded")?;
        let s = self.source.as_ref().context("no image is loaded")?;
        Ok(PageTask {
            task: Task::ControlNet(ControlNetInput {
                image: rgb8_to_host(s.width, s.height, &rgb),
                scale: self.scale,
                guidance: (self.guidance_start, self.guidance_end),
                guess_mode: self.guess_mode,
            }),
            width,
            height,
        })
    }

    /// Saves the control map (with the strokes) as a PNG.
    pub fn save_map(&mut self, path: &Path) -> Result<()> {
        let rgb = self.control_map()?;
        let s = self.source.as_ref().context("no image is loaded")?;
        let map = image::RgbImage::from_raw(s.width as u32, s.height as u32, rgb)
            .context("map buffer")?;
        crate::image_files::save_png(path, map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::pipelines::control_preprocess::CANNY_MAX_THRESHOLD;

    #[test]
    fn a_restored_unit_takes_what_is_valid_and_says_what_is_not() {
        let mut c = ControlInputs::default();
        let unit = ControlNetParameters {
            model: "someone/their-canny-controlnet".into(),
            canny: Some((50.0, 150.0)),
            weight: 0.7,
            guidance_start: 0.2,
            guidance_end: 0.9,
            guess_mode: true,
        };
        assert_eq!(
            c.apply_unit(&unit, Origin::File),
            ["ControlNet someone/their-canny-controlnet restored: load it to use it"]
        );
        assert_eq!(c.controlnet_spec, "someone/their-canny-controlnet");
        assert_eq!((c.canny.low, c.canny.high, c.scale), (50.0, 150.0, 0.7));
        assert_eq!(
            (c.guidance_start, c.guidance_end, c.guess_mode),
            (0.2, 0.9, true)
        );
        // Thresholds the wrong way round and a window past the end are left as they were.
        let bad = ControlNetParameters {
            model: "not a model [1234abcd]".into(),
            canny: Some((200.0, 100.0)),
            guidance_end: 1.5,
            ..unit
        };
        let notes = c.apply_unit(&bad, Origin::File);
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(
            notes[0].starts_with("ControlNet canny thresholds not taken: "),
            "{notes:?}"
        );
        assert!(
            notes[1].starts_with("ControlNet guidance window 0.2…1.5 not taken"),
            "{notes:?}"
        );
        assert_eq!(
            notes[2],
            "ControlNet `not a model [1234abcd]` is not a hub id (a path in a picture's \
             metadata is not followed): someone/their-canny-controlnet kept"
        );
        assert_eq!((c.canny.low, c.canny.high), (50.0, 150.0));
        assert_eq!((c.guidance_start, c.guidance_end), (0.2, 0.9));
        // `none`: the image as it is.
        c.apply_unit(&ControlNetParameters { canny: None, ..bad }, Origin::File);
        assert_eq!(c.map_source, MapSource::AsIs);
    }

    /// A 32×24 picture: a bright square on a dark ground.
    fn inputs() -> ControlInputs {
        let (w, h) = (32, 24);
        let mut rgb = vec![20u8; w * h * 3];
        for y in 6..18 {
            for x in 8..24 {
                rgb[(y * w + x) * 3..(y * w + x) * 3 + 3].fill(230);
            }
        }
        let mut i = ControlInputs::default();
        i.set_source("square".into(), w, h, rgb);
        i
    }

    fn edges(map: &[u8]) -> usize {
        map.chunks(3).filter(|p| p[0] == 255).count()
    }

    #[test]
    fn the_map_follows_the_thresholds_and_keeps_the_strokes() {
        let mut i = inputs();
        let outline = edges(i.base_map().unwrap());
        assert!(outline > 20, "the square's outline: {outline}");
        i.canny = Canny {
            low: CANNY_MAX_THRESHOLD,
            high: CANNY_MAX_THRESHOLD,
        };
        assert_eq!(edges(i.base_map().unwrap()), 0, "nothing passes");
        // A stroke drawn now stays when the thresholds move back.
        let s = i.source.as_mut().unwrap();
        s.canvas.begin_stroke(egui::pos2(2.0, 2.0));
        s.canvas.finish_stroke();
        let drawn = edges(&i.control_map().unwrap());
        assert!(drawn > 0);
        i.canny = Canny::default();
        assert_eq!(edges(&i.control_map().unwrap()), outline + drawn);
        // The eraser blacks out edges under it.
        let s = i.source.as_mut().unwrap();
        s.canvas.tool = super::super::canvas::Tool::Eraser;
        s.canvas.brush_radius = 40.0;
        s.canvas.begin_stroke(egui::pos2(16.0, 12.0));
        s.canvas.finish_stroke();
        assert_eq!(edges(&i.control_map().unwrap()), 0);
        assert!(i.source.as_mut().unwrap().canvas.undo());
        assert_eq!(edges(&i.control_map().unwrap()), outline + drawn);
    }

    #[test]
    fn as_is_uses_the_image_and_bad_thresholds_are_errors() {
        let mut i = inputs();
        i.map_source = MapSource::AsIs;
        let rgb = i.source.as_ref().unwrap().rgb.clone();
        assert_eq!(i.base_map().unwrap(), rgb.as_slice());
        i.map_source = MapSource::Canny;
        i.canny = Canny {
            low: 300.0,
            high: 100.0,
        };
        let err = i.base_map().unwrap_err();
        assert!(err.to_string().contains("canny_low"), "{err}");
    }

    #[test]
    fn a_request_needs_an_image_and_a_controlnet() {
        let mut i = ControlInputs::default();
        let err = i.task().unwrap_err();
        assert!(err.to_string().contains("load a control image"), "{err}");
        i.new_blank(20, 17);
        let err = i.task().unwrap_err();
        assert!(err.to_string().contains("load a ControlNet"), "{err}");
        i.loaded = Some("cn".into());
        i.scale = 0.6;
        let r = i.task().unwrap();
        assert_eq!((r.width, r.height), (16, 16));
        let Task::ControlNet(control) = r.task else {
            panic!("{:?}", r.task)
        };
        assert_eq!(control.image.shape, vec![17, 20, 3]);
        assert!(control.image.values.iter().all(|&v| v == 0.0), "blank");
        assert_eq!(control.scale, 0.6);
    }

    #[test]
    fn the_page_takes_its_own_events_and_hands_back_the_rest() {
        let mut c = ControlInputs::default();
        let download = |file: &str| EngineEvent::Download {
            file: file.into(),
            done_bytes: 1,
            total_bytes: 4,
        };
        // Not loading a ControlNet: a download is the model's.
        assert!(matches!(
            c.apply_event(download("unet.safetensors")),
            ControlEvent::NotMine(e) if matches!(*e, EngineEvent::Download { .. })
        ));
        c.loading = true;
        assert!(matches!(
            c.apply_event(download("cn.safetensors")),
            ControlEvent::Quiet
        ));
        assert_eq!(c.download.as_ref().map(|d| d.done_bytes), Some(1));
        let failed = c.apply_event(EngineEvent::ControlNetFailed {
            spec: "org/cn".into(),
            error: "does not fit".into(),
            attached: Some("org/old".into()),
        });
        assert!(
            matches!(&failed, ControlEvent::Error(e) if e.contains("org/cn") && e.contains("does not fit")),
            "{failed:?}"
        );
        assert_eq!(c.loaded.as_deref(), Some("org/old"));
        assert!(!c.loading && c.download.is_none());
        assert!(matches!(
            c.apply_event(EngineEvent::JobStarted { job: 3 }),
            ControlEvent::NotMine(e) if matches!(*e, EngineEvent::JobStarted { job: 3 })
        ));
    }
}
