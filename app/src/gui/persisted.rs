//! What survives a restart: the session's format ([`Persisted`]: each slice's settings as the
//! slice keeps them), the pictures being worked on beside it, and the images not yet saved.

use std::path::PathBuf;

use engine::backend::ExecutionOptions;
use engine::models::{AttnProcessor, MemoryFormat};
use engine::worker::EngineSettings;
use serde::{Deserialize, Serialize};

use super::cascade::StageSettings;
use super::control_input::ControlSettings;
use super::image_input::ImageSettings;
use super::prompt_form::PromptForm;
use super::state::{AppState, Gallery, View};
use super::work::{Picture, SavedPicture, read_picture, remove_picture, write_picture};

/// File names of the pictures being worked on: the img2img/inpainting source, the ControlNet
/// source.
const WORK_NAMES: [&str; 2] = ["inpaint", "controlnet"];

/// The session's format: 2, each page's settings under its own name. Files without a version
/// are the flat format of builds before it (`session::LegacyPersisted`), still read.
pub const SESSION_VERSION: u32 = 2;

/// What survives a restart (`session.ron`). Each page's settings are stored as the page keeps
/// them ([`PromptForm`], [`ImageSettings`], [`ControlSettings`], [`StageSettings`]): a setting
/// added to one of those is saved and restored with no other edit. Engine settings are stored
/// by name, so an older or newer Brushfire reads them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Persisted {
    pub version: u32,
    pub form: PromptForm,
    pub engine: EngineChoices,
    pub image: ImageSettings,
    pub control: ControlSettings,
    /// The ControlNet attached when the app closed (attached again after the model loads).
    pub controlnet_loaded: Option<String>,
    /// The IF page's stages (model, steps, guidance, noise level).
    pub if_stages: Vec<StageSettings>,
    pub model_spec: String,
    pub recent_models: Vec<String>,
    pub output_dir: Option<PathBuf>,
    pub vae_tiling: bool,
    /// The page shown when the app closed (`View::name`).
    pub view: String,
    /// The gallery's images on disk, oldest first (read back at the next start).
    pub gallery: Vec<PathBuf>,
    /// The img2img/inpainting source and its mask, as last written (`work.rs`).
    pub inpaint_picture: Option<SavedPicture>,
    /// The ControlNet source and its strokes, as last written.
    pub control_picture: Option<SavedPicture>,
}

impl Default for Persisted {
    fn default() -> Self {
        AppState::new(String::new()).to_persisted()
    }
}

/// The engine settings by name (`--backend`, `--attention`, `--dtype` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineChoices {
    pub backend: String,
    pub attention: String,
    pub fusion: bool,
    pub channels_last: bool,
    pub precision: String,
    pub preview: bool,
}

impl Default for EngineChoices {
    fn default() -> Self {
        let settings = EngineSettings::default();
        Self::of(&settings, settings.execution)
    }
}

impl EngineChoices {
    /// `settings`, with the execution options the next start runs (a change that waits for a
    /// restart).
    pub fn of(settings: &EngineSettings, next_start: ExecutionOptions) -> Self {
        Self {
            backend: settings.backend.cli_name().into(),
            attention: attention_name(settings.attention).into(),
            fusion: next_start.fusion,
            channels_last: settings.memory_format.is_channels_last(),
            precision: next_start.precision.to_string(),
            preview: settings.preview,
        }
    }

    /// Applies the names this build knows to `settings`; an unknown name keeps the default.
    pub fn apply(&self, settings: &mut EngineSettings) {
        if let Ok(b) = self.backend.parse() {
            settings.backend = b;
        }
        if let Ok(a) = AttnProcessor::from_name(&self.attention) {
            settings.attention = a;
        }
        settings.execution.fusion = self.fusion;
        settings.memory_format = MemoryFormat::from_channels_last(self.channels_last);
        if let Ok(precision) = self.precision.parse() {
            settings.execution.precision = precision;
        }
        settings.preview = self.preview;
    }
}

/// The settings names the UI and storage use.
pub fn attention_name(a: AttnProcessor) -> &'static str {
    a.name()
}

impl AppState {
    /// The pictures being worked on, as [`WORK_NAMES`] orders them.
    pub(super) fn work_pictures(&self) -> [Option<Picture<'_>>; 2] {
        [
            self.inputs.source.as_ref().map(|s| Picture {
                label: &s.label,
                width: s.width,
                height: s.height,
                rgb: &s.rgb,
                layer: s.canvas.layer(),
            }),
            self.control.source.as_ref().map(|s| Picture {
                label: &s.label,
                width: s.width,
                height: s.height,
                rgb: &s.rgb,
                layer: s.canvas.layer(),
            }),
        ]
    }

    /// Writes the pictures being worked on into [`Self::work_dir`], those that changed since
    /// the last write, and removes the files of a page that has none any more. Called before
    /// [`Self::to_persisted`], which names what is on disk. A failure leaves the last written
    /// version named; the first error is returned after trying both.
    pub fn save_work(&mut self) -> anyhow::Result<()> {
        let Some(dir) = self.work_dir.clone() else {
            return Ok(());
        };
        let pictures = self.work_pictures();
        let mut first_error = None;
        let mut written = [None, None];
        for (i, (picture, name)) in pictures.iter().zip(WORK_NAMES).enumerate() {
            let Some(picture) = picture else { continue };
            let fingerprint = picture.fingerprint();
            if matches!(&self.saved_work[i], Some((f, _)) if *f == fingerprint) {
                continue;
            }
            match write_picture(&dir, name, picture) {
                Ok(saved) => written[i] = Some((fingerprint, saved)),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let present = pictures.map(|p| p.is_some());
        for ((slot, new), present) in self.saved_work.iter_mut().zip(written).zip(present) {
            if let Some(new) = new {
                *slot = Some(new);
            } else if !present && let Some((_, old)) = slot.take() {
                remove_picture(&old);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Puts the pictures named in `p` back on their pages; one that cannot be read is left out
    /// and said as an error, which stays until dismissed (the status line is soon taken by the
    /// model loading).
    pub(super) fn restore_work(&mut self, p: &Persisted) {
        let mut lost = Vec::new();
        let mut first_reason = None;
        for (i, saved) in [&p.inpaint_picture, &p.control_picture]
            .into_iter()
            .enumerate()
        {
            let Some(saved) = saved else { continue };
            if !saved.is_ours(&WORK_NAMES) {
                lost.push(saved.label.clone());
                first_reason.get_or_insert_with(|| {
                    format!(
                        "the settings name {} and {}, which are not Brushfire's work pictures: \
                         neither read nor removed",
                        saved.image.display(),
                        saved.layer.display()
                    )
                });
                continue;
            }
            let (label, w, h, rgb, layer) = match read_picture(saved) {
                Ok(restored) => restored,
                Err(e) => {
                    tracing::info!("picture not restored: {e:#}");
                    lost.push(saved.label.clone());
                    first_reason.get_or_insert_with(|| format!("{e:#}"));
                    continue;
                }
            };
            let canvas = if i == 0 {
                self.inputs.set_source(label, w, h, rgb);
                self.inputs.source.as_mut().map(|s| &mut s.canvas)
            } else {
                self.control.set_source(label, w, h, rgb);
                self.control.source.as_mut().map(|s| &mut s.canvas)
            };
            if let Some(canvas) = canvas
                && canvas.replace_layer(layer).is_ok()
            {
                canvas.forget_history();
            }
            self.saved_work[i] = self.work_pictures()[i].map(|p| (p.fingerprint(), saved.clone()));
        }
        if let Some(reason) = first_reason {
            self.error = Some(format!(
                "could not restore {} from the last session: {reason}",
                lost.join(", ")
            ));
        }
    }

    /// Before a restart: writes the gallery's unsaved images (no save folder, or a failed save)
    /// where the next start reads them back, so nothing made in this session is lost.
    pub fn keep_unsaved_images(&mut self) -> anyhow::Result<()> {
        self.finish_saves();
        if self.gallery.iter().all(|g| g.path.is_some()) {
            return Ok(());
        }
        let Some(dir) = engine::backend::cache_dir().map(|c| c.join("unsaved")) else {
            anyhow::bail!("no cache folder ($XDG_CACHE_HOME or $HOME) to keep unsaved images in");
        };
        self.gallery.keep_unsaved_in(&dir)
    }

    /// What to store for the next start.
    pub fn to_persisted(&self) -> Persisted {
        Persisted {
            version: SESSION_VERSION,
            form: self.form.clone(),
            engine: EngineChoices::of(&self.setup.settings, self.next_start_execution()),
            image: self.inputs.settings.clone(),
            control: self.control.settings.clone(),
            controlnet_loaded: self.control.loaded.clone(),
            if_stages: self.cascade.stages.to_vec(),
            model_spec: self.model.spec.clone(),
            recent_models: self.model.recent.clone(),
            output_dir: self.output_dir.clone(),
            vae_tiling: self.setup.vae_tiling,
            view: self.view.name().into(),
            gallery: self.gallery.kept_paths(),
            inpaint_picture: self.saved_work[0].as_ref().map(|(_, s)| s.clone()),
            control_picture: self.saved_work[1].as_ref().map(|(_, s)| s.clone()),
        }
    }

    /// State restored from storage; anything unreadable keeps its default. `model` (from the
    /// command line) wins over the stored model when given.
    pub fn restore(p: &Persisted, model: Option<String>) -> Self {
        let mut s = Self::new(model.unwrap_or_else(|| p.model_spec.clone()));
        s.form = p.form.clone();
        s.form.sanitize();
        p.engine.apply(&mut s.setup.settings);
        s.setup.vae_tiling = p.vae_tiling;
        s.model.recent.clone_from(&p.recent_models);
        s.output_dir.clone_from(&p.output_dir);
        s.inputs.settings = p.image.clone();
        s.inputs.settings.sanitize();
        s.control.settings = p.control.clone();
        s.control.settings.sanitize();
        s.control.pending_load.clone_from(&p.controlnet_loaded);
        s.view = View::ALL
            .into_iter()
            .find(|v| v.name() == p.view)
            .unwrap_or_default();
        s.cascade.stages = [0, 1, 2].map(|i| StageSettings::restored(i, p.if_stages.get(i)));
        s.restore_work(p);
        s.gallery = Gallery::restore(p.gallery.clone());
        s
    }
}
