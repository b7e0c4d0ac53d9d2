//! The desktop app (eframe/egui). The engine runs on its worker thread; this module only sends
//! commands and drains events (on a per-frame time budget), so the window never blocks on a
//! tensor. Layout: prompt panel (left), image view (centre), settings (right), gallery strip
//! and status bar (bottom).

mod bench;
mod bench_panel;
pub mod canvas;
pub mod cascade;
mod cascade_page;
pub mod command;
pub mod control_input;
mod control_page;
mod download;
mod gallery;
mod gallery_panel;
pub mod image_input;
mod image_pages;
pub mod model;
mod persisted;
pub mod prompt_form;
mod prompt_panel;
pub mod queue;
mod saver;
pub mod session;
mod settings_panel;
pub mod setup;
mod state;
pub mod work;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use eframe::egui;

pub use bench::{BenchForm, BenchState};
use command::Command;
use settings_panel::HUB_MODELS;
pub use state::{AppState, JobState, ModelStatus, Persisted, Setting, View};

/// Where eframe's storage keeps our state.
const STORAGE_KEY: &str = "brushfire";
/// The window icon (also the .desktop entry's).
const ICON_PNG: &[u8] = include_bytes!("../../../assets/brushfire.png");

/// How long one frame may spend applying engine events.
const EVENT_BUDGET: Duration = Duration::from_millis(8);

/// The eframe application.
pub struct BrushfireApp {
    pub state: AppState,
    /// Where [`Self::save_session`] writes (none in tests that do not ask for it).
    pub session: Option<session::SessionFile>,
    /// What this frame's UI asked for, applied once after it is drawn.
    commands: Vec<Command>,
}

impl BrushfireApp {
    /// A new app that will load `model` (a folder or hub id) on its first frame.
    pub fn new(model: String) -> Self {
        Self {
            state: AppState::new(model),
            session: None,
            commands: Vec::new(),
        }
    }

    /// The app as it was left (the session file); `model` from the command line wins.
    pub fn restored(persisted: &Persisted, model: Option<String>) -> Self {
        Self {
            state: AppState::restore(persisted, model),
            session: None,
            commands: Vec::new(),
        }
    }

    /// Writes the pictures being worked on, then the session that names them (eframe's autosave
    /// and the window closing call this). A failure is said in the window; the session file
    /// keeps its last whole version.
    pub fn save_session(&mut self) {
        // The gallery's images being written: the session names their files.
        self.state.finish_saves();
        // First, so the session names the pictures as written.
        if let Err(e) = self.state.save_work() {
            tracing::warn!("the pictures being worked on were not saved: {e:#}");
            self.state.error = Some(format!(
                "the pictures being worked on were not saved: {e:#}"
            ));
        }
        if let Some(file) = &self.session
            && let Err(e) = file.save(&self.state.to_persisted())
        {
            tracing::warn!("{e:#}");
            self.state.error = Some(format!("{e:#}"));
        }
    }

    /// What runs before every frame's UI, and also while the window is hidden or minimised
    /// (eframe's `App::logic`, called whenever the engine's waker asks for a repaint): engine
    /// events are applied, so finished images are saved and "Run all stages" goes on to the next
    /// stage with no window on screen; restored gallery images arrive.
    pub fn logic(&mut self, ctx: &egui::Context) {
        self.state.poll_engine(ctx, EVENT_BUDGET);
    }

    /// Asks for `command`; it is applied once this frame's UI is drawn.
    pub fn command(&mut self, command: Command) {
        self.commands.push(command);
    }

    /// The whole window (what the UI tests drive, after [`Self::logic`], as eframe does).
    pub fn root_ui(&mut self, ui: &mut egui::Ui) {
        self.draw(ui);
        for command in std::mem::take(&mut self.commands) {
            self.state.apply(command);
        }
    }

    fn draw(&mut self, ui: &mut egui::Ui) {
        self.dropped_files_ui(ui);
        egui::Panel::bottom("status").show(ui, |ui| self.status_ui(ui));
        egui::Panel::bottom("gallery")
            .resizable(true)
            .default_size(110.0)
            .show(ui, |ui| self.gallery_ui(ui));
        egui::Panel::left("prompt")
            .resizable(true)
            .default_size(300.0)
            .show(ui, |ui| self.prompt_ui(ui));
        egui::Panel::right("settings")
            .resizable(true)
            .default_size(220.0)
            .show(ui, |ui| self.settings_ui(ui));
        egui::CentralPanel::default().show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.selectable_value(&mut self.state.view, View::Generate, "🖼 Generate");
                ui.selectable_value(&mut self.state.view, View::Img2Img, "🎨 Image to image");
                ui.selectable_value(&mut self.state.view, View::Inpaint, "✏ Inpaint");
                ui.selectable_value(&mut self.state.view, View::ControlNet, "⚡ ControlNet");
                ui.selectable_value(&mut self.state.view, View::Cascade, "🪜 IF cascade");
                let bench = if self.state.bench.running.is_some() {
                    "⏱ Benchmark (running)"
                } else {
                    "⏱ Benchmark"
                };
                ui.selectable_value(&mut self.state.view, View::Benchmark, bench);
            });
            ui.separator();
            match self.state.view {
                View::Generate => self.image_ui(ui),
                View::Img2Img => self.img2img_ui(ui),
                View::Inpaint => self.inpaint_ui(ui),
                View::ControlNet => self.controlnet_ui(ui),
                View::Cascade => self.cascade_ui(ui),
                View::Benchmark => self.bench_ui(ui),
            }
        });
    }

    /// PNGs dropped on the window restore their parameters; a hint shows while hovering.
    fn dropped_files_ui(&mut self, ui: &mut egui::Ui) {
        let (hovering, dropped): (bool, Vec<PathBuf>) = ui.ctx().input(|i| {
            (
                !i.raw.hovered_files.is_empty(),
                i.raw
                    .dropped_files
                    .iter()
                    .filter_map(|f| f.path.clone())
                    .collect(),
            )
        });
        if hovering {
            egui::Area::new(egui::Id::new("drop-hint"))
                .anchor(egui::Align2::CENTER_CENTER, egui::Vec2::ZERO)
                .show(ui.ctx(), |ui| {
                    egui::Frame::popup(ui.style()).show(ui, |ui| {
                        ui.heading(
                            if matches!(
                                self.state.view,
                                View::Img2Img | View::Inpaint | View::ControlNet
                            ) {
                                "Drop an image to start from it"
                            } else {
                                "Drop a PNG to restore its parameters"
                            },
                        );
                    });
                });
        }
        if let Some(path) = dropped.last() {
            self.command(Command::DropFile(path.clone()));
        }
    }

    /// The status line, or the last error in full: errors say what to change (a memory
    /// refusal names sizes and alternatives), so they wrap rather than run off the window, and
    /// their Dismiss button comes first so it is always on screen.
    fn status_ui(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            if let Some(error) = &self.state.error {
                let dismiss = ui.small_button("Dismiss").clicked();
                let text = egui::RichText::new(error).color(ui.visuals().error_fg_color);
                ui.add(egui::Label::new(text).wrap());
                if dismiss {
                    self.command(Command::DismissError);
                }
            } else {
                ui.add(egui::Label::new(&self.state.status).truncate());
            }
        });
    }
}

impl eframe::App for BrushfireApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        BrushfireApp::logic(self, ctx);
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.root_ui(ui);
    }

    fn save(&mut self, _storage: &mut dyn eframe::Storage) {
        // The session goes to its own file, written atomically (`session`); eframe's storage
        // keeps the window's geometry only.
        self.save_session();
    }
}

/// Set by "Restart now": [`run`] starts Brushfire again once the window has closed (and the
/// session has been saved).
static RESTART: AtomicBool = AtomicBool::new(false);

/// Whether "Restart now" was clicked in this process.
pub fn restart_requested() -> bool {
    RESTART.load(Ordering::SeqCst)
}

/// eframe's settings file: `app.ron` in its storage folder (`~/.local/share/brushfire` on Linux):
/// the window's geometry and egui's memory, and the session of Brushfire before `session.ron`.
fn settings_file() -> Option<PathBuf> {
    eframe::storage_dir("brushfire").map(|d| d.join("app.ron"))
}

/// Checks the settings file before eframe reads it. One that cannot be read back (cut short by a
/// crash, edited by hand, written by an incompatible Brushfire) would be dropped by eframe in
/// silence and overwritten at exit; instead it is moved aside as `app.ron.bak`, the app starts
/// with defaults, and the returned line says so (shown once, until dismissed).
pub fn set_aside_unreadable_settings(path: &Path) -> Option<String> {
    let problem = match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => e.to_string(),
        Ok(bytes) => match std::str::from_utf8(&bytes) {
            Err(e) => format!("not UTF-8 text: {e}"),
            Ok(text) => match ron::from_str::<std::collections::HashMap<String, String>>(text) {
                Err(e) => e.to_string(),
                Ok(values) => match values.get(STORAGE_KEY).map(|v| session::read_settings(v)) {
                    Some(Err(e)) => format!("`{STORAGE_KEY}`: {e}"),
                    None | Some(Ok(_)) => return None,
                },
            },
        },
    };
    let backup = path.with_extension("ron.bak");
    Some(match std::fs::rename(path, &backup) {
        Ok(()) => format!(
            "the window settings file {} could not be read ({problem}); it was moved aside as {} \
             and the window starts from its defaults",
            path.display(),
            backup.display()
        ),
        Err(e) => format!(
            "the window settings file {} could not be read ({problem}) nor moved aside ({e}); \
             the window starts from its defaults",
            path.display()
        ),
    })
}

/// Opens the window. `model` (from `--model`) overrides the model remembered from last time;
/// with neither, SD 1.5 from the hub is offered. `files` are opened as by [`AppState::open_files`].
pub fn run(model: Option<String>, files: Vec<PathBuf>) -> anyhow::Result<()> {
    let mut viewport = egui::ViewportBuilder::default()
        .with_title("Brushfire")
        .with_app_id("brushfire")
        .with_inner_size([1280.0, 800.0])
        .with_drag_and_drop(true);
    match eframe::icon_data::from_png_bytes(ICON_PNG) {
        Ok(icon) => viewport = viewport.with_icon(Arc::new(icon)),
        Err(e) => tracing::warn!("the window icon could not be decoded: {e}"),
    }
    let options = eframe::NativeOptions {
        viewport,
        ..Default::default()
    };
    let settings_notice = settings_file().and_then(|path| set_aside_unreadable_settings(&path));
    eframe::run_native(
        "Brushfire",
        options,
        Box::new(move |cc| {
            let session =
                eframe::storage_dir("brushfire").map(|d| session::SessionFile::in_dir(&d));
            let loaded = session
                .as_ref()
                .map(session::SessionFile::load)
                .unwrap_or_default();
            // Brushfire before the session file kept the session in eframe's storage.
            let persisted: Option<Persisted> = loaded.persisted.or_else(|| {
                let text = cc.storage?.get_string(STORAGE_KEY)?;
                session::read_settings(&text).ok().map(|(p, _)| p)
            });
            let mut app = match persisted {
                Some(p) if !p.model_spec.is_empty() || model.is_some() => {
                    BrushfireApp::restored(&p, model)
                }
                Some(p) => BrushfireApp::restored(&p, Some(HUB_MODELS[0].to_string())),
                None => BrushfireApp::new(model.unwrap_or_else(|| HUB_MODELS[0].to_string())),
            };
            app.session = session;
            // Beside eframe's own storage (`~/.local/share/brushfire` on Linux).
            app.state.work_dir = eframe::storage_dir("brushfire").map(|d| d.join("work"));
            app.state.open_files(&files);
            if let Some(notice) = settings_notice.or(loaded.notice) {
                app.state.error = Some(notice);
            }
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow::anyhow!("could not open the window: {e}"))?;
    if restart_requested() {
        // The same command line again; the saved session supplies the new settings.
        let exe = std::env::current_exe().context("finding the brushfire executable")?;
        std::process::Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .spawn()
            .with_context(|| format!("restarting {}", exe.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_settings_file_is_set_aside_once() {
        let dir = std::env::temp_dir().join(format!("brushfire-settings-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.ron");
        let backup = dir.join("app.ron.bak");
        // None yet: nothing to say.
        assert_eq!(set_aside_unreadable_settings(&path), None);
        // A good file stays where it is.
        let persisted = AppState::new("tiny".into()).to_persisted();
        let mut values = std::collections::HashMap::new();
        values.insert(STORAGE_KEY.to_string(), ron::to_string(&persisted).unwrap());
        let good = ron::to_string(&values).unwrap();
        std::fs::write(&path, &good).unwrap();
        assert_eq!(set_aside_unreadable_settings(&path), None);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), good);
        // Cut short by a crash, not UTF-8, or our part broken: moved aside, said once.
        for broken in [
            good.as_bytes()[..good.len() / 2].to_vec(),
            vec![0xff, 0xfe, 0x00],
            ron::to_string(&std::collections::HashMap::from([(
                STORAGE_KEY.to_string(),
                // Cut short: one bad setting alone is reset, not the file (`session`).
                "(steps: \"many\"".to_string(),
            )]))
            .unwrap()
            .into_bytes(),
        ] {
            std::fs::write(&path, &broken).unwrap();
            let notice = set_aside_unreadable_settings(&path).expect("a notice");
            assert!(
                notice.contains("app.ron.bak") && notice.contains("defaults"),
                "{notice}"
            );
            assert!(!path.exists());
            assert_eq!(std::fs::read(&backup).unwrap(), broken);
            assert_eq!(set_aside_unreadable_settings(&path), None, "said once");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
