//! The session (form, settings, recent models, the pages' pictures by file name) in a file of its
//! own, `session.ron` beside eframe's `app.ron`. eframe writes `app.ron` in place, so a crash or a
//! full disk mid-write leaves it cut short, and eframe then drops it in silence. This file is
//! written to a temporary file and renamed into place ([`engine::atomic_file::write_atomic`]): it
//! always holds the last session written whole. eframe's file keeps only the window's geometry.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use super::Persisted;
use super::cascade::StageSettings;
use super::control_input::MapSource;
use super::image_input::SizeFit;
use super::work::SavedPicture;

/// Where the session lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionFile {
    path: PathBuf,
}

/// What reading the session found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The saved session; `None` when none was saved, or it could not be read.
    pub persisted: Option<Persisted>,
    /// Said once to the user: the file could not be read and was moved aside.
    pub notice: Option<String>,
}

impl SessionFile {
    /// `session.ron` in `dir` (eframe's storage folder, `~/.local/share/brushfire` on Linux).
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: dir.join("session.ron"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the saved session. A setting that is missing (an older Brushfire wrote the file)
    /// takes its default in silence; one this Brushfire cannot read (the wrong type, an edit by
    /// hand) takes its default too, the rest are kept, and [`Loaded::notice`] names what was
    /// reset. A file that cannot be read at all (cut short, not text) is moved aside as
    /// `session.ron.bak` and the app starts with defaults, saying so; the next read finds
    /// nothing to say.
    pub fn load(&self) -> Loaded {
        let problem = match std::fs::read(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::default(),
            Err(e) => e.to_string(),
            Ok(bytes) => match std::str::from_utf8(&bytes) {
                Err(e) => format!("not UTF-8 text: {e}"),
                Ok(text) => match read_settings(text) {
                    Ok((persisted, reset)) => {
                        let notice = (!reset.is_empty()).then(|| {
                            format!(
                                "the session file {} had settings this Brushfire cannot read \
                                 ({}): they are back to their defaults; everything else was kept",
                                self.path.display(),
                                reset.join(", ")
                            )
                        });
                        return Loaded {
                            persisted: Some(persisted),
                            notice,
                        };
                    }
                    Err(e) => e,
                },
            },
        };
        let backup = self.path.with_extension("ron.bak");
        let notice = match std::fs::rename(&self.path, &backup) {
            Ok(()) => format!(
                "the session file {} could not be read ({problem}); it was moved aside as {} and \
                 Brushfire starts with default settings",
                self.path.display(),
                backup.display()
            ),
            Err(e) => format!(
                "the session file {} could not be read ({problem}) nor moved aside ({e}); \
                 Brushfire starts with default settings",
                self.path.display()
            ),
        };
        Loaded {
            persisted: None,
            notice: Some(notice),
        }
    }

    /// Writes `persisted` whole or not at all: a temporary file in the same folder, renamed into
    /// place. The folder is made if missing.
    pub fn save(&self, persisted: &Persisted) -> anyhow::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = ron::ser::to_string_pretty(persisted, ron::ser::PrettyConfig::default())
            .context("writing the session as text")?;
        engine::atomic_file::write_atomic(&self.path, text.as_bytes())
            .with_context(|| format!("saving the session to {}", self.path.display()))
    }
}

/// The session in `text`, and the settings that could not be read and took their defaults.
/// A file without a `version` is the flat format of earlier builds ([`LegacyPersisted`]).
pub fn read_settings(text: &str) -> Result<(Persisted, Vec<String>), String> {
    let value = ron::from_str::<ron::Value>(text).map_err(|e| e.to_string())?;
    let ron::Value::Map(fields) = &value else {
        return Err("not a table of settings".into());
    };
    if fields.get(&ron::Value::String("version".into())).is_some() {
        if let Ok(persisted) = ron::from_str::<Persisted>(text) {
            return Ok((persisted, Vec::new()));
        }
        return read_leniently::<Persisted>(value);
    }
    if let Ok(legacy) = ron::from_str::<LegacyPersisted>(text) {
        return Ok((legacy.into_current(), Vec::new()));
    }
    let (legacy, reset) = read_leniently::<LegacyPersisted>(value)?;
    Ok((legacy.into_current(), reset))
}

/// `value` as a `T` whose unreadable settings took their defaults, and their names. Each
/// setting is tried on its own (the others at their defaults, as `#[serde(default)]` gives
/// them), and within a page's table each of its settings, so one bad value costs only itself.
fn read_leniently<T: DeserializeOwned>(value: ron::Value) -> Result<(T, Vec<String>), String> {
    let ron::Value::Map(fields) = value else {
        return Err("not a table of settings".into());
    };
    let readable = |key: &ron::Value, value: &ron::Value| {
        let mut alone = ron::Map::new();
        alone.insert(key.clone(), value.clone());
        ron::Value::Map(alone).into_rust::<T>().is_ok()
    };
    let name = |key: &ron::Value| match key {
        ron::Value::String(name) => name.clone(),
        other => format!("{other:?}"),
    };
    let mut kept = ron::Map::new();
    let mut reset = Vec::new();
    for (key, value) in fields {
        if readable(&key, &value) {
            kept.insert(key, value);
            continue;
        }
        let ron::Value::Map(table) = value else {
            reset.push(name(&key));
            continue;
        };
        // A page's table: keep the settings in it that read.
        let mut good = ron::Map::new();
        for (inner, v) in table {
            let mut one = ron::Map::new();
            one.insert(inner.clone(), v.clone());
            if readable(&key, &ron::Value::Map(one)) {
                good.insert(inner, v);
            } else {
                reset.push(format!("{}.{}", name(&key), name(&inner)));
            }
        }
        kept.insert(key, ron::Value::Map(good));
    }
    let persisted = ron::Value::Map(kept)
        .into_rust::<T>()
        .map_err(|e| e.to_string())?;
    Ok((persisted, reset))
}

/// The session as builds before [`SESSION_VERSION`] 2 wrote it: one flat table. Frozen: read
/// once and turned into [`Persisted`]; a new setting never goes here. A field is `None` when
/// the file lacks it (today's default then) and `Some` of the stored value otherwise, read with
/// [`present`] (ron wants `Some(…)` around an `Option`'s value; a stored `None` stays `None`).
///
/// [`SESSION_VERSION`]: super::state::SESSION_VERSION
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct LegacyPersisted {
    #[serde(deserialize_with = "present")]
    prompt: Option<String>,
    #[serde(deserialize_with = "present")]
    negative_prompt: Option<String>,
    #[serde(deserialize_with = "present")]
    steps: Option<usize>,
    #[serde(deserialize_with = "present")]
    guidance: Option<f64>,
    #[serde(deserialize_with = "present")]
    width: Option<usize>,
    #[serde(deserialize_with = "present")]
    height: Option<usize>,
    #[serde(deserialize_with = "present")]
    batch: Option<usize>,
    #[serde(deserialize_with = "present")]
    seed: Option<u64>,
    #[serde(deserialize_with = "present")]
    seed_locked: Option<bool>,
    #[serde(deserialize_with = "present")]
    scheduler: Option<Option<String>>,
    #[serde(deserialize_with = "present")]
    backend: Option<String>,
    #[serde(deserialize_with = "present")]
    attention: Option<String>,
    #[serde(deserialize_with = "present")]
    fusion: Option<bool>,
    #[serde(deserialize_with = "present")]
    channels_last: Option<bool>,
    #[serde(deserialize_with = "present")]
    precision: Option<String>,
    #[serde(deserialize_with = "present")]
    preview: Option<bool>,
    #[serde(deserialize_with = "present")]
    vae_tiling: Option<bool>,
    #[serde(deserialize_with = "present")]
    model_spec: Option<String>,
    #[serde(deserialize_with = "present")]
    recent_models: Option<Vec<String>>,
    #[serde(deserialize_with = "present")]
    output_dir: Option<Option<PathBuf>>,
    #[serde(deserialize_with = "present")]
    strength: Option<f64>,
    #[serde(deserialize_with = "present")]
    inpaint_strength: Option<f64>,
    #[serde(deserialize_with = "present")]
    size_fit: Option<SizeFit>,
    #[serde(deserialize_with = "present")]
    mask_blur: Option<f64>,
    #[serde(deserialize_with = "present")]
    only_masked: Option<bool>,
    #[serde(deserialize_with = "present")]
    mask_padding: Option<usize>,
    #[serde(deserialize_with = "present")]
    controlnet_spec: Option<String>,
    #[serde(deserialize_with = "present")]
    controlnet_loaded: Option<Option<String>>,
    #[serde(deserialize_with = "present")]
    controlnet_scale: Option<f64>,
    #[serde(deserialize_with = "present")]
    control_guidance_start: Option<f64>,
    #[serde(deserialize_with = "present")]
    control_guidance_end: Option<f64>,
    #[serde(deserialize_with = "present")]
    guess_mode: Option<bool>,
    #[serde(deserialize_with = "present")]
    canny_low: Option<f32>,
    #[serde(deserialize_with = "present")]
    canny_high: Option<f32>,
    #[serde(deserialize_with = "present")]
    control_map_source: Option<String>,
    #[serde(deserialize_with = "present")]
    view: Option<String>,
    #[serde(deserialize_with = "present")]
    if_stages: Option<Vec<StageSettings>>,
    #[serde(deserialize_with = "present")]
    gallery: Option<Vec<PathBuf>>,
    #[serde(deserialize_with = "present")]
    inpaint_picture: Option<Option<SavedPicture>>,
    #[serde(deserialize_with = "present")]
    control_picture: Option<Option<SavedPicture>>,
}

/// A field that is in the file, whatever its value (`None` included).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

impl LegacyPersisted {
    /// The same session in today's format: what the file holds over today's defaults.
    pub(super) fn into_current(self) -> Persisted {
        fn set<T>(field: &mut T, value: Option<T>) {
            if let Some(v) = value {
                *field = v;
            }
        }
        let mut p = Persisted::default();
        let f = &mut p.form;
        set(&mut f.prompt, self.prompt);
        set(&mut f.negative_prompt, self.negative_prompt);
        set(&mut f.steps, self.steps);
        set(&mut f.guidance, self.guidance);
        set(&mut f.width, self.width);
        set(&mut f.height, self.height);
        set(&mut f.batch, self.batch);
        set(&mut f.seed, self.seed);
        set(&mut f.seed_locked, self.seed_locked);
        if let Some(name) = self.scheduler {
            f.scheduler = name.and_then(|n| n.parse().ok());
        }
        let e = &mut p.engine;
        set(&mut e.backend, self.backend);
        set(&mut e.attention, self.attention);
        set(&mut e.fusion, self.fusion);
        set(&mut e.channels_last, self.channels_last);
        set(&mut e.precision, self.precision);
        set(&mut e.preview, self.preview);
        set(&mut p.vae_tiling, self.vae_tiling);
        set(&mut p.model_spec, self.model_spec);
        set(&mut p.recent_models, self.recent_models);
        set(&mut p.output_dir, self.output_dir);
        let i = &mut p.image;
        set(&mut i.strength, self.strength);
        set(&mut i.inpaint_strength, self.inpaint_strength);
        set(&mut i.fit, self.size_fit);
        set(&mut i.mask_blur, self.mask_blur);
        set(&mut i.only_masked, self.only_masked);
        set(&mut i.padding, self.mask_padding);
        let c = &mut p.control;
        set(&mut c.controlnet_spec, self.controlnet_spec);
        set(&mut c.scale, self.controlnet_scale);
        set(&mut c.guidance_start, self.control_guidance_start);
        set(&mut c.guidance_end, self.control_guidance_end);
        set(&mut c.guess_mode, self.guess_mode);
        set(&mut c.canny.low, self.canny_low);
        set(&mut c.canny.high, self.canny_high);
        if self.control_map_source.as_deref() == Some("as-is") {
            c.map_source = MapSource::AsIs;
        }
        set(&mut p.controlnet_loaded, self.controlnet_loaded);
        set(&mut p.view, self.view);
        set(&mut p.if_stages, self.if_stages);
        set(&mut p.gallery, self.gallery);
        set(&mut p.inpaint_picture, self.inpaint_picture);
        set(&mut p.control_picture, self.control_picture);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gui::AppState;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("brushfire-session-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_session_reads_back_as_written_and_no_temporary_file_stays() {
        let dir = scratch("roundtrip");
        let file = SessionFile::in_dir(&dir.join("not yet made"));
        let none = file.load();
        assert!(none.persisted.is_none() && none.notice.is_none());
        let mut state = AppState::new("org/model".into());
        state.form.prompt = "a fox’s den, 猫, 🎨".into();
        state.form.steps = 42;
        let persisted = state.to_persisted();
        file.save(&persisted).unwrap();
        let back = file.load();
        assert_eq!(back.persisted.as_ref(), Some(&persisted));
        assert!(back.notice.is_none());
        // A second save replaces the first whole.
        state.form.steps = 7;
        file.save(&state.to_persisted()).unwrap();
        assert_eq!(file.load().persisted.map(|p| p.form.steps), Some(7));
        let names: Vec<_> = std::fs::read_dir(file.path().parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["session.ron"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unreadable_session_is_set_aside_once() {
        let dir = scratch("broken");
        let file = SessionFile::in_dir(&dir);
        let good = ron::to_string(&AppState::new("tiny".into()).to_persisted()).unwrap();
        for broken in [
            good.as_bytes()[..good.len() / 2].to_vec(),
            vec![0xff, 0xfe, 0x00],
            b"[1, 2, 3]".to_vec(),
        ] {
            std::fs::write(file.path(), &broken).unwrap();
            let loaded = file.load();
            assert!(loaded.persisted.is_none());
            let notice = loaded.notice.expect("a notice");
            assert!(
                notice.contains("session.ron.bak") && notice.contains("default settings"),
                "{notice}"
            );
            assert!(!file.path().exists());
            assert_eq!(std::fs::read(dir.join("session.ron.bak")).unwrap(), broken);
            let again = file.load();
            assert!(
                again.persisted.is_none() && again.notice.is_none(),
                "said once"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_session_that_cannot_be_written_says_where() {
        let dir = scratch("unwritable");
        // A folder where the file should be: refused, named, and the folder left alone.
        std::fs::create_dir_all(dir.join("session.ron")).unwrap();
        let file = SessionFile::in_dir(&dir);
        let err = file
            .save(&AppState::new("tiny".into()).to_persisted())
            .unwrap_err();
        assert!(format!("{err:#}").contains("session.ron"), "{err:#}");
        assert!(dir.join("session.ron").is_dir());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_setting_of_the_wrong_type_is_reset_and_the_rest_kept() {
        let dir = scratch("one-bad");
        let file = SessionFile::in_dir(&dir);
        let mut state = AppState::new("org/model".into());
        state.form.prompt = "keep me".into();
        state.form.steps = 42;
        state.form.guidance = 5.0;
        let good = ron::to_string(&state.to_persisted()).unwrap();
        assert!(
            good.contains("steps:42") && good.contains("guidance:5.0"),
            "{good}"
        );
        // An older build knew fewer settings; a hand edit broke two; one is from a newer build.
        let edited = good
            .replace("steps:42", "steps:\"many\"")
            .replace("guidance:5.0", "guidance:[1]")
            .replacen('(', "(from_the_future:true,", 1);
        std::fs::write(file.path(), &edited).unwrap();
        let loaded = file.load();
        let persisted = loaded.persisted.expect("the rest is kept");
        assert_eq!(persisted.form.prompt, "keep me");
        assert_eq!(persisted.model_spec, "org/model");
        let defaults = Persisted::default();
        assert_eq!(persisted.form.steps, defaults.form.steps);
        assert_eq!(persisted.form.guidance, defaults.form.guidance);
        let notice = loaded.notice.expect("a notice");
        assert!(
            notice.contains("form.steps") && notice.contains("form.guidance"),
            "{notice}"
        );
        assert!(
            !notice.contains("from_the_future") && !notice.contains("prompt"),
            "{notice}"
        );
        assert!(file.path().exists(), "not moved aside");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Each page's settings are stored as the page keeps them: every field of the form, the
    /// image pages' and the ControlNet page's settings comes back from the file equal (whole
    /// structs compared, so a field added to one is covered with no edit here or anywhere).
    #[test]
    fn every_page_setting_comes_back_from_the_file() {
        let dir = scratch("pages");
        let file = SessionFile::in_dir(&dir);
        let mut state = AppState::new("org/model".into());
        let f = &mut state.form;
        f.prompt = "a lighthouse".into();
        f.negative_prompt = "fog".into();
        (f.steps, f.guidance, f.width, f.height, f.batch, f.seed) = (9, 4.5, 320, 256, 3, 77);
        f.seed_locked = true;
        f.scheduler = Some(engine::schedulers::SchedulerKind::EulerAncestral);
        let i = &mut state.inputs;
        (i.strength, i.inpaint_strength, i.mask_blur, i.padding) = (0.3, 0.9, 4.0, 8);
        i.fit = SizeFit::Crop;
        i.only_masked = true;
        let c = &mut state.control;
        c.map_source = MapSource::AsIs;
        c.canny = engine::pipelines::control_preprocess::Canny {
            low: 20.0,
            high: 90.0,
        };
        (c.scale, c.guidance_start, c.guidance_end) = (0.6, 0.1, 0.8);
        c.guess_mode = true;
        c.controlnet_spec = "org/controlnet".into();
        file.save(&state.to_persisted()).unwrap();
        let text = std::fs::read_to_string(file.path()).unwrap();
        assert!(text.contains("version: 2"), "{text}");
        let loaded = file.load();
        assert!(loaded.notice.is_none(), "{:?}", loaded.notice);
        let restored = AppState::restore(&loaded.persisted.unwrap(), None);
        assert_eq!(restored.form, state.form);
        assert_eq!(restored.inputs.settings, state.inputs.settings);
        assert_eq!(restored.control.settings, state.control.settings);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A session written by a build before the page tables (one flat table) still loads, every
    /// value in its place, enums and stored `None`s included.
    #[test]
    fn a_session_from_an_earlier_build_still_loads() {
        let dir = scratch("legacy");
        let file = SessionFile::in_dir(&dir);
        let old = r#"(prompt:"old prompt",negative_prompt:"",steps:12,guidance:6.0,width:384,height:256,batch:2,seed:5,seed_locked:true,scheduler:Some("euler"),backend:"cpu",attention:"vanilla",fusion:false,channels_last:true,precision:"f32",preview:false,vae_tiling:true,model_spec:"org/old",recent_models:["org/old"],output_dir:None,strength:0.4,inpaint_strength:0.7,size_fit:Crop,mask_blur:3.0,only_masked:true,mask_padding:16,controlnet_spec:"org/cn",controlnet_loaded:Some("org/cn"),controlnet_scale:0.5,control_guidance_start:0.2,control_guidance_end:0.9,guess_mode:true,canny_low:30.0,canny_high:120.0,control_map_source:"as-is",view:"inpaint",if_stages:[],gallery:[],inpaint_picture:None,control_picture:None)"#;
        std::fs::write(file.path(), old).unwrap();
        let loaded = file.load();
        assert!(loaded.notice.is_none(), "{:?}", loaded.notice);
        let p = loaded.persisted.expect("read");
        assert_eq!(
            (
                p.form.prompt.as_str(),
                p.form.steps,
                p.form.batch,
                p.form.seed
            ),
            ("old prompt", 12, 2, 5)
        );
        assert_eq!(
            p.form.scheduler,
            Some(engine::schedulers::SchedulerKind::Euler)
        );
        assert_eq!(
            (p.engine.backend.as_str(), p.engine.attention.as_str()),
            ("cpu", "vanilla")
        );
        assert!(!p.engine.fusion && p.engine.channels_last && !p.engine.preview);
        assert_eq!(p.output_dir, None, "a stored None stays None");
        assert_eq!(p.image.fit, SizeFit::Crop);
        assert_eq!((p.image.strength, p.image.padding), (0.4, 16));
        assert_eq!(p.control.map_source, MapSource::AsIs);
        assert_eq!((p.control.canny.low, p.control.canny.high), (30.0, 120.0));
        assert_eq!(p.controlnet_loaded.as_deref(), Some("org/cn"));
        assert_eq!(
            (p.view.as_str(), p.model_spec.as_str()),
            ("inpaint", "org/old")
        );
        // Saved again, it is written in today's format.
        file.save(&p).unwrap();
        let again = file.load().persisted.unwrap();
        assert_eq!(again, p);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
