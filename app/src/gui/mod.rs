//! The desktop app (eframe/egui). The engine runs on its worker thread; this module only sends
//! commands and drains events (on a per-frame time budget), so the window never blocks on a
//! tensor. Layout: prompt panel (left), image view (centre), settings (right), gallery strip
//! and status bar (bottom).

mod state;

use std::time::Duration;

use eframe::egui;
use engine::backend::BackendRequest;
use engine::models::AttnProcessor;
use engine::schedulers::SchedulerKind;

pub use state::{AppState, JobState};

/// How long one frame may spend applying engine events.
const EVENT_BUDGET: Duration = Duration::from_millis(8);

/// The eframe application.
pub struct BrushfireApp {
    pub state: AppState,
}

impl BrushfireApp {
    /// A new app that will load `model` (a folder or hub id) on its first frame.
    pub fn new(model: String) -> Self {
        Self {
            state: AppState::new(model),
        }
    }

    /// The whole window (also what the UI tests drive).
    pub fn root_ui(&mut self, ui: &mut egui::Ui) {
        self.state.poll_engine(ui.ctx(), EVENT_BUDGET);
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
        egui::CentralPanel::default().show(ui, |ui| self.image_ui(ui));
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
                .selected_text(form.scheduler.map_or("model default", scheduler_name))
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut form.scheduler, None, "model default");
                    for kind in SchedulerKind::ALL {
                        ui.selectable_value(&mut form.scheduler, Some(kind), scheduler_name(kind));
                    }
                });
            ui.end_row();
        });
        ui.separator();
        if ui
            .add_enabled(self.state.model_ready(), egui::Button::new("Generate"))
            .clicked()
        {
            self.state.queue_generation();
        }
        self.queue_ui(ui);
    }

    fn queue_ui(&mut self, ui: &mut egui::Ui) {
        let mut cancel = None;
        for job in &self.state.jobs {
            ui.horizontal(|ui| {
                match &job.state {
                    JobState::Queued => ui.label(format!("#{} queued", job.id)),
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
                if ui.small_button("Cancel").clicked() {
                    cancel = Some(job.id);
                }
            });
            if let JobState::Running(Some(p)) = &job.state {
                ui.add(egui::ProgressBar::new(
                    p.step as f32 / p.total.max(1) as f32,
                ));
            }
        }
        if let Some(id) = cancel {
            self.state.cancel(id);
        }
    }

    fn settings_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Settings");
        ui.label("Model");
        ui.horizontal(|ui| {
            ui.text_edit_singleline(&mut self.state.model_spec);
            if ui.button("Load").clicked() {
                self.state.load_model();
            }
        });
        ui.label(self.state.model_status.to_string());
        ui.separator();
        let mut settings = self.state.settings;
        ui.label("Backend");
        egui::ComboBox::from_id_salt("backend")
            .selected_text(backend_name(settings.backend))
            .show_ui(ui, |ui| {
                for b in [
                    BackendRequest::Auto,
                    BackendRequest::Cuda,
                    BackendRequest::Wgpu,
                    BackendRequest::Cpu,
                ] {
                    ui.selectable_value(&mut settings.backend, b, backend_name(b));
                }
            });
        if let Some(b) = &self.state.backend {
            ui.small(b.to_string());
        }
        ui.label("Attention");
        ui.horizontal(|ui| {
            ui.selectable_value(&mut settings.attention, AttnProcessor::Vanilla, "Vanilla");
            ui.selectable_value(&mut settings.attention, AttnProcessor::Fused, "Fused");
            ui.selectable_value(
                &mut settings.attention,
                AttnProcessor::Sliced { slice_size: 1 },
                "Sliced",
            );
        });
        if settings != self.state.settings {
            self.state.apply_settings(settings);
        }
    }

    fn image_ui(&mut self, ui: &mut egui::Ui) {
        match self.state.selected_image() {
            Some(image) => {
                let texture = image.texture(ui.ctx());
                ui.add(egui::Image::new(&texture).shrink_to_fit());
            }
            None => {
                ui.centered_and_justified(|ui| {
                    ui.label("Type a prompt and press Generate.");
                });
            }
        }
    }

    fn gallery_ui(&mut self, ui: &mut egui::Ui) {
        egui::ScrollArea::horizontal().show(ui, |ui| {
            ui.horizontal(|ui| {
                let mut clicked = None;
                for (i, image) in self.state.gallery.iter().enumerate() {
                    let texture = image.texture(ui.ctx());
                    let selected = self.state.selected == Some(i);
                    let button = egui::Button::image(egui::Image::new(&texture).max_height(90.0))
                        .selected(selected);
                    if ui.add(button).on_hover_text(&image.prompt).clicked() {
                        clicked = Some(i);
                    }
                }
                if let Some(i) = clicked {
                    self.state.selected = Some(i);
                }
            });
        });
    }

    fn status_ui(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            if let Some(error) = &self.state.error {
                ui.colored_label(ui.visuals().error_fg_color, error);
                if ui.small_button("Dismiss").clicked() {
                    self.state.error = None;
                }
            } else {
                ui.label(&self.state.status);
            }
        });
    }
}

impl eframe::App for BrushfireApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.root_ui(ui);
    }
}

fn scheduler_name(kind: SchedulerKind) -> &'static str {
    match kind {
        SchedulerKind::Pndm => "PNDM",
        SchedulerKind::Ddim => "DDIM",
        SchedulerKind::Euler => "Euler",
        SchedulerKind::EulerAncestral => "Euler a",
        SchedulerKind::DpmPlusPlus2M => "DPM++ 2M",
        SchedulerKind::Ddpm => "DDPM",
    }
}

fn backend_name(b: BackendRequest) -> &'static str {
    match b {
        BackendRequest::Auto => "Auto",
        BackendRequest::Cuda => "CUDA",
        BackendRequest::Wgpu => "wgpu",
        BackendRequest::Cpu => "CPU",
    }
}

/// Opens the window.
pub fn run(model: String) -> anyhow::Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Brushfire")
            .with_inner_size([1280.0, 800.0]),
        ..Default::default()
    };
    eframe::run_native(
        "Brushfire",
        options,
        Box::new(|_cc| Ok(Box::new(BrushfireApp::new(model)))),
    )
    .map_err(|e| anyhow::anyhow!("could not open the window: {e}"))
}
