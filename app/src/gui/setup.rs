//! The engine-settings slice (the settings panel's state): what the user chose, what the engine
//! confirmed, what waits for a restart, the backend the engine runs on and VAE tiling, with the
//! reducer for the engine's answers.

use engine::backend::{BackendKind, ExecutionOptions, Precision, SelectedBackend};
use engine::worker::{EngineEvent, EngineSettings};

use super::persisted::attention_name;

/// A setting the panel may grey out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    Fusion,
    ChannelsLast,
    Precision(Precision),
}

/// How the engine runs, as chosen and as confirmed.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSetup {
    /// What the settings panel shows and sends.
    pub settings: EngineSettings,
    /// Every generation encodes and decodes with the VAE in tiles (the request's `vae_tiling`).
    pub vae_tiling: bool,
    /// The backend the engine runs on, once it has said.
    pub backend: Option<SelectedBackend>,
    /// The settings the engine last confirmed (it may refuse a change and keep the old ones).
    pub confirmed: Option<EngineSettings>,
    /// Settings the engine could not apply in this process (a GPU's precision is fixed at its
    /// first tensor): what the next start runs with.
    pub restart_for: Option<EngineSettings>,
}

/// What an engine event meant to the settings.
#[must_use]
pub enum SetupEvent {
    /// Not the slice's: the event, handed back.
    NotMine(Box<EngineEvent>),
    /// Taken in; the status line says this.
    Status(String),
}

impl EngineSetup {
    /// Settings chosen, nothing confirmed yet.
    pub fn new(settings: EngineSettings) -> Self {
        Self {
            settings,
            vae_tiling: false,
            backend: None,
            confirmed: None,
            restart_for: None,
        }
    }

    /// The slice's reducer: the backend the engine chose, the settings it applied (it may
    /// revert a change it could not make), and a change that waits for a restart.
    pub fn apply_event(&mut self, event: EngineEvent) -> SetupEvent {
        let on_off = |on: bool| if on { "on" } else { "off" };
        match event {
            EngineEvent::Backend(b) => {
                let status = format!("ready: {b}");
                self.backend = Some(b);
                SetupEvent::Status(status)
            }
            EngineEvent::SettingsApplied(s) => {
                self.settings = s;
                self.confirmed = Some(s);
                SetupEvent::Status(format!(
                    "settings in effect from the next job: {} attention, fusion {}, \
                     channels-last {}, {}",
                    attention_name(s.attention),
                    on_off(s.execution.fusion),
                    on_off(s.memory_format.is_channels_last()),
                    s.execution.precision
                ))
            }
            EngineEvent::RestartNeeded { wanted, reason } => {
                tracing::info!("{reason}");
                self.restart_for = Some(wanted);
                SetupEvent::Status(format!(
                    "{} (fusion {}) takes effect when Brushfire restarts: a GPU's float type \
                     is fixed for the life of the process",
                    wanted.execution.precision,
                    on_off(wanted.execution.fusion)
                ))
            }
            other => SetupEvent::NotMine(Box::new(other)),
        }
    }

    /// Takes `settings` as the user's choice (the caller sends them to the engine). Choosing
    /// what runs now again drops a change that waited for a restart.
    pub fn choose(&mut self, settings: EngineSettings) {
        if self
            .confirmed
            .is_some_and(|e| e.execution == settings.execution && e.backend == settings.backend)
        {
            self.restart_for = None;
        }
        self.settings = settings;
    }

    /// The execution options the next start runs with.
    pub fn next_start_execution(&self) -> ExecutionOptions {
        self.restart_for
            .map_or(self.settings.execution, |s| s.execution)
    }

    /// Whether the engine runs on a GPU backend.
    pub fn on_gpu(&self) -> bool {
        self.backend
            .as_ref()
            .is_some_and(|b| b.kind != BackendKind::Cpu)
    }

    /// Why `setting` cannot be switched on the backend in use, if it cannot.
    pub fn unavailable_reason(&self, setting: Setting) -> Option<&'static str> {
        let kind = self.backend.as_ref().map(|b| b.kind);
        match setting {
            Setting::Fusion if kind == Some(BackendKind::Cpu) => {
                Some("The CPU backend (flex) has no kernel fusion: nothing to switch.")
            }
            Setting::Precision(Precision::F16) if kind == Some(BackendKind::Cpu) => {
                Some("f16 runs on GPU backends only (CUDA, wgpu); the CPU backend computes in f32.")
            }
            _ => None,
        }
    }
}
