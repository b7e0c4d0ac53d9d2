//! The model slice: the model field, the models used lately, the main model's state as the
//! prompt panel shows it, and the reducer for its download and load events.

use std::time::Instant;

use engine::worker::EngineEvent;

use super::download::DownloadState;

/// How many recently used models the picker remembers.
pub const RECENT_MODELS: usize = 8;

/// The model's state as the UI shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelStatus {
    NotLoaded,
    /// A hub model not in the cache: the UI offers the download.
    NeedsDownload {
        repo_id: String,
    },
    /// Not cached and offline: said plainly, nothing to do but pick another model.
    Offline {
        repo_id: String,
    },
    Loading {
        download: Option<DownloadState>,
    },
    Loaded(String),
    Failed(String),
}

impl std::fmt::Display for ModelStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotLoaded => f.write_str("no model loaded"),
            Self::NeedsDownload { repo_id } => {
                write!(f, "{repo_id} is not downloaded yet")
            }
            Self::Offline { repo_id } => write!(
                f,
                "{repo_id} is not downloaded and the hub is off (HF_HUB_OFFLINE): \
                 pick a local folder or a cached model"
            ),
            Self::Loading { download: None } => f.write_str("loading…"),
            Self::Loading { download: Some(d) } => write!(
                f,
                "downloading {}: {:.1}/{:.1} MB, {:.1} MB/s, ETA {:.0}s",
                d.file,
                d.done_bytes as f64 / 1e6,
                d.total_bytes as f64 / 1e6,
                d.rate() / 1e6,
                d.eta_secs()
            ),
            Self::Loaded(name) => write!(f, "loaded: {name}"),
            Self::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// The main model: what the field names, how it stands, and the ones used lately.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSlot {
    /// The model field: a folder, a `.safetensors` file or a hub id.
    pub spec: String,
    pub status: ModelStatus,
    /// Recently loaded models, newest first.
    pub recent: Vec<String>,
}

/// What an engine event meant to the model slot.
#[must_use]
pub enum ModelEvent {
    /// Not the slot's: the event, handed back for the rest of the app.
    NotMine(Box<EngineEvent>),
    /// Taken in; nothing to say (download progress shows in the status).
    Quiet,
    /// The main model is loaded (what waited for it may go on).
    Loaded { spec: String, elapsed_secs: f64 },
    /// A load failed (no job was running): the user must read this.
    Failed(String),
}

impl ModelSlot {
    /// A slot whose field names `spec`, nothing loaded.
    pub fn new(spec: String) -> Self {
        Self {
            spec,
            status: ModelStatus::NotLoaded,
            recent: Vec::new(),
        }
    }

    /// Whether a model is loaded (Generate is enabled).
    pub fn ready(&self) -> bool {
        matches!(self.status, ModelStatus::Loaded(_))
    }

    /// The slot's reducer: the main model's download progress, its load finishing or failing.
    /// The caller first takes what belongs to a job's own model (an IF stage, the upscaler).
    pub fn apply_event(&mut self, event: EngineEvent) -> ModelEvent {
        match event {
            EngineEvent::Download {
                file,
                done_bytes,
                total_bytes,
            } => {
                let started = match &self.status {
                    ModelStatus::Loading { download: Some(d) } if d.file == file => d.started,
                    _ => Instant::now(),
                };
                self.status = ModelStatus::Loading {
                    download: Some(DownloadState {
                        file,
                        done_bytes,
                        total_bytes,
                        started,
                    }),
                };
                ModelEvent::Quiet
            }
            EngineEvent::ModelLoaded {
                spec, elapsed_secs, ..
            } => {
                self.recent.retain(|m| m != &spec);
                self.recent.insert(0, spec.clone());
                self.recent.truncate(RECENT_MODELS);
                self.status = ModelStatus::Loaded(spec.clone());
                ModelEvent::Loaded { spec, elapsed_secs }
            }
            EngineEvent::Failed { job: None, error } => {
                if matches!(self.status, ModelStatus::Loading { .. }) {
                    self.status = ModelStatus::Failed(error.clone());
                }
                ModelEvent::Failed(error)
            }
            other => ModelEvent::NotMine(Box::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_is_remembered_and_a_failure_shown() {
        let mut m = ModelSlot::new("a".into());
        m.status = ModelStatus::Loading { download: None };
        let _ = m.apply_event(EngineEvent::Download {
            file: "unet.safetensors".into(),
            done_bytes: 1,
            total_bytes: 2,
        });
        assert!(matches!(
            &m.status,
            ModelStatus::Loading { download: Some(d) } if d.done_bytes == 1
        ));
        for spec in (0..10).map(|i| format!("m{i}")).chain(["m3".to_string()]) {
            assert!(matches!(
                m.apply_event(EngineEvent::ModelLoaded {
                    spec: spec.clone(),
                    dir: spec.into(),
                    elapsed_secs: 1.0,
                }),
                ModelEvent::Loaded { .. }
            ));
        }
        assert!(m.ready());
        assert_eq!(m.recent.len(), RECENT_MODELS);
        assert_eq!(
            &m.recent[..3],
            ["m3", "m9", "m8"],
            "newest first, once each"
        );
        m.status = ModelStatus::Loading { download: None };
        assert!(matches!(
            m.apply_event(EngineEvent::Failed {
                job: None,
                error: "no unet".into()
            }),
            ModelEvent::Failed(e) if e == "no unet"
        ));
        assert_eq!(m.status, ModelStatus::Failed("no unet".into()));
        assert!(matches!(
            m.apply_event(EngineEvent::Cancelled { job: 3 }),
            ModelEvent::NotMine(_)
        ));
    }
}
