//! The session (form, settings, recent models, the pages' pictures by file name) in a file of its
//! own, `session.ron` beside eframe's `app.ron`. eframe writes `app.ron` in place, so a crash or a
//! full disk mid-write leaves it cut short, and eframe then drops it in silence. This file is
//! written to a temporary file and renamed into place ([`engine::atomic_file::write_atomic`]): it
//! always holds the last session written whole. eframe's file keeps only the window's geometry.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::Persisted;

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
/// Each setting is tried on its own (the others at their defaults, as `#[serde(default)]` on
/// [`Persisted`] gives them), so one bad value costs only itself.
fn read_settings(text: &str) -> Result<(Persisted, Vec<String>), String> {
    if let Ok(persisted) = ron::from_str::<Persisted>(text) {
        return Ok((persisted, Vec::new()));
    }
    let ron::Value::Map(fields) = ron::from_str::<ron::Value>(text).map_err(|e| e.to_string())?
    else {
        return Err("not a table of settings".into());
    };
    let mut kept = ron::Map::new();
    let mut reset = Vec::new();
    for (key, value) in fields {
        let mut alone = ron::Map::new();
        alone.insert(key.clone(), value.clone());
        if ron::Value::Map(alone).into_rust::<Persisted>().is_ok() {
            kept.insert(key, value);
        } else {
            reset.push(match key {
                ron::Value::String(name) => name,
                other => format!("{other:?}"),
            });
        }
    }
    let persisted = ron::Value::Map(kept)
        .into_rust::<Persisted>()
        .map_err(|e| e.to_string())?;
    Ok((persisted, reset))
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
        assert_eq!(file.load().persisted.map(|p| p.steps), Some(7));
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
        assert_eq!(persisted.prompt, "keep me");
        assert_eq!(persisted.model_spec, "org/model");
        let defaults = Persisted::default();
        assert_eq!(persisted.steps, defaults.steps);
        assert_eq!(persisted.guidance, defaults.guidance);
        let notice = loaded.notice.expect("a notice");
        assert!(
            notice.contains("steps") && notice.contains("guidance"),
            "{notice}"
        );
        assert!(
            !notice.contains("from_the_future") && !notice.contains("prompt"),
            "{notice}"
        );
        assert!(file.path().exists(), "not moved aside");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
