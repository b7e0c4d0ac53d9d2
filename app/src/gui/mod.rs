//! The desktop app (eframe/egui). The engine runs on its worker thread; this module only sends
//! commands and drains events (on a per-frame time budget), so the window never blocks on a
//! tensor. Layout: prompt panel (left), image view (centre), settings (right), gallery strip
//! and status bar (bottom).

mod bench;
mod bench_panel;
pub mod canvas;
pub mod cascade;
mod cascade_page;
pub mod control_input;
mod control_page;
mod download;
mod gallery;
pub mod image_input;
mod image_pages;
mod saver;
pub mod session;
mod state;
pub mod work;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use eframe::egui;
use engine::backend::{BackendRequest, Precision};
use engine::models::{AttnProcessor, MemoryFormat};
use engine::schedulers::SchedulerKind;
use engine::worker::EngineSettings;

pub use bench::{BenchForm, BenchState};
pub use state::{AppState, JobState, ModelStatus, Persisted, Setting, View};

/// Hub models offered in the picker (those this build's pipelines can run).
const HUB_MODELS: &[&str] = &[
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stable-diffusion-v1-5/stable-diffusion-inpainting",
    "stabilityai/stable-diffusion-2-1-base",
];
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
}

impl BrushfireApp {
    /// A new app that will load `model` (a folder or hub id) on its first frame.
    pub fn new(model: String) -> Self {
        Self {
            state: AppState::new(model),
            session: None,
        }
    }

    /// The app as it was left (the session file); `model` from the command line wins.
    pub fn restored(persisted: &Persisted, model: Option<String>) -> Self {
        Self {
            state: AppState::restore(persisted, model),
            session: None,
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

    /// The whole window (what the UI tests drive, after [`Self::logic`], as eframe does).
    pub fn root_ui(&mut self, ui: &mut egui::Ui) {
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

    fn prompt_ui(&mut self, ui: &mut egui::Ui) {
        let form = &mut self.state.form;
        let label = ui.label("Prompt");
        ui.add(
            egui::TextEdit::multiline(&mut form.prompt)
                .desired_rows(4)
                .hint_text("ghibli style, a fantasy landscape with castles"),
        )
        .labelled_by(label.id);
        let label = ui.label("Negative prompt");
        ui.add(egui::TextEdit::multiline(&mut form.negative_prompt).desired_rows(2))
            .labelled_by(label.id);
        egui::Grid::new("params").num_columns(2).show(ui, |ui| {
            ui.label("Steps");
            ui.add(egui::DragValue::new(&mut form.steps).range(1..=1000));
            ui.end_row();
            ui.label("Guidance");
            ui.add(
                egui::DragValue::new(&mut form.guidance)
                    .range(0.0..=30.0)
                    .speed(0.1),
            );
            ui.end_row();
            ui.label("Width");
            ui.add(
                egui::DragValue::new(&mut form.width)
                    .range(8..=4096)
                    .speed(8),
            );
            ui.end_row();
            ui.label("Height");
            ui.add(
                egui::DragValue::new(&mut form.height)
                    .range(8..=4096)
                    .speed(8),
            );
            ui.end_row();
            ui.label("Batch");
            ui.add(egui::DragValue::new(&mut form.batch).range(1..=16));
            ui.end_row();
            ui.label("Seed");
            ui.horizontal(|ui| {
                ui.add(egui::DragValue::new(&mut form.seed));
                ui.checkbox(&mut form.seed_locked, "Lock");
                if ui.button("🎲").on_hover_text("Random seed").clicked() {
                    form.randomise_seed();
                }
            });
            ui.end_row();
            ui.label("Scheduler");
            egui::ComboBox::from_id_salt("scheduler")
                .selected_text(
                    form.scheduler
                        .map_or("model default", SchedulerKind::sampler_name),
                )
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut form.scheduler, None, "model default");
                    for kind in SchedulerKind::ALL {
                        ui.selectable_value(&mut form.scheduler, Some(kind), kind.sampler_name());
                    }
                });
            ui.end_row();
        });
        ui.separator();
        let generate = ui
            .add_enabled(self.state.model_ready(), egui::Button::new("Generate"))
            .on_disabled_hover_text("Load a model first (settings panel, right).");
        if generate.clicked() {
            self.state.queue_generation();
        }
        self.queue_ui(ui);
    }

    fn queue_ui(&mut self, ui: &mut egui::Ui) {
        let mut cancel = None;
        for job in &self.state.jobs {
            ui.horizontal(|ui| {
                let queued = job.state == JobState::Queued;
                match &job.state {
                    JobState::Queued => ui.label(format!(
                        "#{} queued: {}",
                        job.id,
                        ellipsis(&job.request.prompt, 28)
                    )),
                    JobState::Running(Some(p)) => ui.label(format!(
                        "#{} step {}/{} · {:.2} it/s · {:.0}s, ETA {:.0}s",
                        job.id,
                        p.step,
                        p.total,
                        job.smoothed_it_per_sec,
                        p.elapsed_secs,
                        job.eta_secs().unwrap_or(0.0)
                    )),
                    JobState::Running(None) => ui.label(format!("#{} starting", job.id)),
                };
                let (label, tip) = if queued {
                    ("Remove", "Take this job out of the queue")
                } else {
                    ("Cancel", "Stop after the current step")
                };
                if ui.small_button(label).on_hover_text(tip).clicked() {
                    cancel = Some(job.id);
                }
            });
            if let JobState::Running(Some(p)) = &job.state {
                ui.add(egui::ProgressBar::new(
                    p.step as f32 / p.total.max(1) as f32,
                ));
            }
            if matches!(job.state, JobState::Running(_)) && self.state.on_gpu() {
                if let Some(note) = job.quiet_note(true, Instant::now()) {
                    ui.horizontal(|ui| {
                        ui.spinner();
                        ui.label(egui::RichText::new(note).weak());
                    });
                }
                // The note appears without an engine event: look again in a second.
                ui.ctx().request_repaint_after(Duration::from_secs(1));
            }
        }
        if let Some(id) = cancel {
            self.state.cancel(id);
        }
    }

    fn settings_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Settings");
        self.model_ui(ui);
        ui.separator();
        let mut settings = self.state.settings;
        ui.label("Backend");
        egui::ComboBox::from_id_salt("backend")
            .selected_text(settings.backend.label())
            .show_ui(ui, |ui| {
                for b in BackendRequest::ALL {
                    ui.selectable_value(&mut settings.backend, b, b.label());
                }
            });
        if let Some(b) = &self.state.backend {
            ui.small(b.to_string());
        }
        ui.label("Attention");
        ui.horizontal(|ui| {
            for (value, label, tip) in [
                (
                    AttnProcessor::Vanilla,
                    "Vanilla",
                    "softmax(QKᵀ)V with the score matrix in memory (diffusers' AttnProcessor)",
                ),
                (
                    AttnProcessor::Fused,
                    "Fused",
                    "Flash attention, the score matrix never held in memory (diffusers' SDPA processor)",
                ),
                (
                    AttnProcessor::Sliced { slice_size: 1 },
                    "Sliced",
                    "One head at a time: least memory, slowest (diffusers' attention slicing)",
                ),
            ] {
                ui.selectable_value(&mut settings.attention, value, label)
                    .on_hover_text(tip);
            }
        });
        let fusion_reason = self.state.unavailable_reason(Setting::Fusion);
        ui.add_enabled_ui(fusion_reason.is_none(), |ui| {
            // Where the backend has no fusion it shows off; the choice is kept for a backend
            // that has.
            let mut off = false;
            let shown = if fusion_reason.is_some() {
                &mut off
            } else {
                &mut settings.execution.fusion
            };
            ui.checkbox(shown, "Kernel fusion (\"compile\")")
                .on_hover_text("Burn's fusion backend: fuses element-wise kernels and autotunes")
                .on_disabled_hover_text(fusion_reason.unwrap_or_default());
        });
        let channels_last_reason = self.state.unavailable_reason(Setting::ChannelsLast);
        ui.add_enabled_ui(channels_last_reason.is_none(), |ui| {
            let mut on = settings.memory_format.is_channels_last();
            if ui
                .checkbox(&mut on, "Channels-last")
                .on_hover_text(
                    "UNet conv weights stored OHWI and activations kept NHWC between convs \
                     (torch.channels_last); same images, different kernels",
                )
                .on_disabled_hover_text(channels_last_reason.unwrap_or_default())
                .changed()
            {
                settings.memory_format = MemoryFormat::from_channels_last(on);
            }
        });
        ui.horizontal(|ui| {
            ui.label("Precision");
            for (value, label) in [(Precision::F32, "f32"), (Precision::F16, "f16")] {
                let reason = self.state.unavailable_reason(Setting::Precision(value));
                ui.add_enabled_ui(reason.is_none(), |ui| {
                    ui.selectable_value(&mut settings.execution.precision, value, label)
                        .on_disabled_hover_text(reason.unwrap_or_default());
                });
            }
        });
        if let Some(wanted) = self.state.restart_for {
            self.restart_ui(ui, wanted);
        }
        ui.checkbox(&mut settings.preview, "Live preview")
            .on_hover_text("Show the image forming at every step (a cheap decode of the latents)");
        ui.checkbox(&mut self.state.vae_tiling, "VAE tiling")
            .on_hover_text(
                "Encode and decode pictures larger than the VAE's tile (512 px for SD 1.5, \
                 256 px for the x4 upscaler) in overlapping, blended tiles, as diffusers' \
                 enable_vae_tiling: far less memory for large pictures and ×4 upscales; the \
                 pixels differ slightly from an untiled decode",
            );
        if settings != self.state.settings {
            self.state.apply_settings(settings);
        }
        ui.separator();
        self.output_ui(ui);
    }

    /// A precision (or fusion) change the engine could not make in this process: it waits for
    /// the next start, which "Restart now" brings about (the session is saved first).
    fn restart_ui(&mut self, ui: &mut egui::Ui, wanted: EngineSettings) {
        ui.horizontal_wrapped(|ui| {
            ui.label(
                egui::RichText::new(format!(
                    "{} from the next start",
                    wanted.execution.precision
                ))
                .weak(),
            )
            .on_hover_text(
                "Burn fixes a GPU's float type at its first tensor, so another precision needs \
                 a new process. Restarting keeps the prompt, the settings, the gallery and the \
                 pictures being worked on (masks and strokes included).",
            );
            let blocker = self.state.restart_blocker();
            let restart = ui
                .add_enabled(blocker.is_none(), egui::Button::new("Restart now"))
                .on_disabled_hover_text(blocker.unwrap_or_default());
            if restart.clicked() {
                match self.state.keep_unsaved_images() {
                    Ok(()) => {
                        RESTART.store(true, Ordering::SeqCst);
                        ui.ctx().send_viewport_cmd(egui::ViewportCommand::Close);
                    }
                    Err(e) => {
                        self.state.error = Some(format!(
                            "not restarting: unsaved images could not be kept: {e:#}"
                        ))
                    }
                }
            }
        });
    }

    fn model_ui(&mut self, ui: &mut egui::Ui) {
        ui.label("Model");
        let mut load = false;
        ui.horizontal(|ui| {
            let edit = ui.add(
                egui::TextEdit::singleline(&mut self.state.model_spec)
                    .desired_width(150.0)
                    .hint_text("org/name or a folder"),
            );
            if edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)) {
                load = true;
            }
            egui::ComboBox::from_id_salt("model-picker")
                .selected_text("")
                .width(20.0)
                .show_ui(ui, |ui| {
                    let recent = self.state.recent_models.clone();
                    let mut picks: Vec<String> = recent.clone();
                    for m in HUB_MODELS {
                        if !picks.iter().any(|p| p == m) {
                            picks.push((*m).to_string());
                        }
                    }
                    for m in picks {
                        let label = if recent.contains(&m) {
                            format!("🕘 {m}")
                        } else {
                            m.clone()
                        };
                        if ui
                            .selectable_label(self.state.model_spec == m, label)
                            .clicked()
                        {
                            self.state.model_spec = m;
                            load = true;
                        }
                    }
                });
        });
        ui.horizontal(|ui| {
            if ui.button("Load").clicked() {
                load = true;
            }
            if ui
                .button("Folder…")
                .on_hover_text("A diffusers folder (model_index.json, unet/, vae/, …)")
                .clicked()
                && let Some(dir) = rfd::FileDialog::new().pick_folder()
            {
                self.state.model_spec = dir.display().to_string();
                load = true;
            }
            if ui
                .button("File…")
                .on_hover_text("A single-file .safetensors checkpoint")
                .clicked()
                && let Some(file) = rfd::FileDialog::new()
                    .add_filter("checkpoint", &["safetensors"])
                    .pick_file()
            {
                self.state.model_spec = file.display().to_string();
                load = true;
            }
        });
        if load {
            self.state.load_model();
        }
        match &self.state.model_status {
            ModelStatus::NeedsDownload { repo_id } => {
                ui.label(format!(
                    "{repo_id} is not on this computer yet (Stable Diffusion 1.5 is about 4 GB)."
                ));
                if ui.button("Download").clicked() {
                    self.state.download_model();
                }
            }
            ModelStatus::Loading { download: Some(d) } => {
                ui.add(egui::ProgressBar::new(d.fraction()).show_percentage());
                ui.small(self.state.model_status.to_string());
            }
            other => {
                ui.small(other.to_string());
            }
        }
    }

    fn output_ui(&mut self, ui: &mut egui::Ui) {
        ui.label("Save images to");
        ui.horizontal(|ui| {
            let shown = self
                .state
                .output_dir
                .as_ref()
                .map_or_else(|| "(not saved)".to_string(), |d| d.display().to_string());
            ui.small(shown);
            if ui.small_button("Choose…").clicked()
                && let Some(dir) = rfd::FileDialog::new().pick_folder()
            {
                self.state.output_dir = Some(dir);
            }
        });
    }

    fn image_ui(&mut self, ui: &mut egui::Ui) {
        if let Some(preview) = self.state.running_preview() {
            let step = preview.step;
            let texture = preview.texture(ui.ctx());
            ui.vertical_centered(|ui| {
                ui.small(format!("live preview, step {step}"));
                // Scale the latent-sized preview up to the view, keeping its aspect ratio.
                let [w, h] = texture.size().map(|s| s.max(1) as f32);
                let room = ui.available_size();
                let scale = (room.x / w).min(room.y / h);
                ui.add(egui::Image::new(&texture).fit_to_exact_size(egui::vec2(w, h) * scale));
            });
            return;
        }
        let Some(index) = self.state.gallery.selected else {
            ui.centered_and_justified(|ui| {
                ui.label(if self.state.view == View::Generate {
                    "Type a prompt and press Generate. Drop a PNG here to reuse its parameters."
                } else {
                    "The result appears here."
                });
            });
            return;
        };
        let Some(image) = self.state.gallery.get(index) else {
            return;
        };
        let texture = image.texture(ui.ctx());
        let mut action = None;
        // Wrapped: in a half-width column (the image pages) the buttons take two rows.
        ui.horizontal_wrapped(|ui| {
            if ui.button("Save as…").clicked() {
                action = Some(GalleryAction::SaveAs);
            }
            if ui.button("Copy").clicked() {
                action = Some(GalleryAction::Copy);
            }
            if ui
                .add_enabled(image.path.is_some(), egui::Button::new("Open folder"))
                .on_disabled_hover_text(if image.saving() {
                    "being saved…"
                } else {
                    "not saved: no output folder, or it could not be written"
                })
                .clicked()
            {
                action = Some(GalleryAction::OpenFolder);
            }
            if ui.button("Reuse seed").clicked() {
                action = Some(GalleryAction::ReuseSeed);
            }
            if ui.button("Reuse parameters").clicked() {
                action = Some(GalleryAction::ReuseParameters);
            }
            if ui.button("Send to img2img").clicked() {
                action = Some(GalleryAction::SendTo(View::Img2Img));
            }
            if ui.button("Send to inpaint").clicked() {
                action = Some(GalleryAction::SendTo(View::Inpaint));
            }
            if ui
                .button("Send to ControlNet")
                .on_hover_text("Its Canny edges become the control map.")
                .clicked()
            {
                action = Some(GalleryAction::SendTo(View::ControlNet));
            }
            if ui
                .button("Upscale ×4")
                .on_hover_text(
                    "The x4 upscaler (model and settings on the IF page), with this image's \
                     prompt and seed.",
                )
                .clicked()
            {
                action = Some(GalleryAction::Upscale);
            }
        });
        ui.small(format!(
            "seed {} · {} steps · {} · CFG {}",
            image.params.seed, image.params.steps, image.params.sampler, image.params.cfg_scale
        ));
        ui.add(egui::Image::new(&texture).shrink_to_fit());
        if let Some(action) = action {
            self.gallery_action(ui.ctx(), index, action);
        }
    }

    fn gallery_action(&mut self, ctx: &egui::Context, index: usize, action: GalleryAction) {
        let Some(image) = self.state.gallery.get(index) else {
            return;
        };
        match action {
            GalleryAction::SaveAs => {
                let name = image.path.as_ref().and_then(|p| p.file_name()).map_or_else(
                    || format!("brushfire-{}.png", image.params.seed),
                    |n| n.to_string_lossy().into_owned(),
                );
                if let Some(path) = rfd::FileDialog::new()
                    .add_filter("PNG", &["png"])
                    .set_file_name(name)
                    .save_file()
                {
                    let written = crate::png_meta::write_png(
                        &path,
                        image.width,
                        image.height,
                        &image.rgb,
                        &image.params,
                    );
                    match written {
                        Ok(metadata) => {
                            self.state.status = format!("saved {}", path.display());
                            self.state.error = metadata.warning(&path);
                        }
                        Err(e) => self.state.error = Some(format!("{e:#}")),
                    }
                }
            }
            GalleryAction::Copy => {
                ctx.copy_image(image.color_image());
                self.state.status = "image copied".into();
            }
            GalleryAction::OpenFolder => {
                if let Some(dir) = image.path.as_deref().and_then(Path::parent)
                    && let Err(e) = open_in_file_manager(dir)
                {
                    self.state.error = Some(format!("{e:#}"));
                }
            }
            GalleryAction::ReuseSeed => self.state.reuse_seed(index),
            GalleryAction::ReuseParameters => self.state.reuse_parameters(index),
            GalleryAction::SendTo(view) => self.state.send_to(index, view),
            GalleryAction::Upscale => self.state.upscale_image(index),
        }
    }

    fn gallery_ui(&mut self, ui: &mut egui::Ui) {
        egui::ScrollArea::horizontal().show(ui, |ui| {
            ui.horizontal(|ui| {
                let mut clicked = None;
                for (i, image) in self.state.gallery.iter().enumerate() {
                    let texture = image.texture(ui.ctx());
                    let selected = self.state.gallery.selected == Some(i);
                    let button = egui::Button::image(egui::Image::new(&texture).max_height(90.0))
                        .selected(selected);
                    if ui.add(button).on_hover_text(&image.params.prompt).clicked() {
                        clicked = Some(i);
                    }
                }
                if let Some(i) = clicked {
                    self.state.gallery.selected = Some(i);
                }
            });
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
            self.state.drop_file(path);
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
                    self.state.error = None;
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

/// What the buttons above the selected image do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GalleryAction {
    SaveAs,
    Copy,
    OpenFolder,
    ReuseSeed,
    ReuseParameters,
    /// Make it the img2img/inpainting source and show that page.
    SendTo(View),
    /// Queue it on the x4 upscaler.
    Upscale,
}

/// Opens `dir` in the system's file manager.
fn open_in_file_manager(dir: &Path) -> anyhow::Result<()> {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(target_os = "windows") {
        "explorer"
    } else {
        "xdg-open"
    };
    std::process::Command::new(opener)
        .arg(dir)
        .spawn()
        .map(drop)
        .map_err(|e| anyhow::anyhow!("could not run {opener} to open {}: {e}", dir.display()))
}

/// `text` cut to `max` characters with an ellipsis.
fn ellipsis(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() <= max {
        line.to_string()
    } else {
        let cut: String = line.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
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
