//! The prompt panel (left): the prompt, the generation settings, Generate, and the queue with
//! its progress, rates and Cancel.

use std::time::{Duration, Instant};

use eframe::egui;
use engine::schedulers::SchedulerKind;

use super::BrushfireApp;
use super::command::Command;
use super::state::JobState;

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

impl BrushfireApp {
    pub(super) fn prompt_ui(&mut self, ui: &mut egui::Ui) {
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
            let label = ui.label("Steps");
            ui.add(egui::DragValue::new(&mut form.steps).range(1..=1000))
                .labelled_by(label.id);
            ui.end_row();
            let label = ui.label("Guidance");
            ui.add(
                egui::DragValue::new(&mut form.guidance)
                    .range(0.0..=30.0)
                    .speed(0.1),
            )
            .labelled_by(label.id);
            ui.end_row();
            let label = ui.label("Width");
            ui.add(
                egui::DragValue::new(&mut form.width)
                    .range(8..=4096)
                    .speed(8),
            )
            .labelled_by(label.id);
            ui.end_row();
            let label = ui.label("Height");
            ui.add(
                egui::DragValue::new(&mut form.height)
                    .range(8..=4096)
                    .speed(8),
            )
            .labelled_by(label.id);
            ui.end_row();
            let label = ui.label("Batch");
            ui.add(egui::DragValue::new(&mut form.batch).range(1..=16))
                .labelled_by(label.id);
            ui.end_row();
            let label = ui.label("Seed");
            ui.horizontal(|ui| {
                ui.add(egui::DragValue::new(&mut form.seed))
                    .labelled_by(label.id);
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
            self.command(Command::Generate);
        }
        self.queue_ui(ui);
    }

    pub(super) fn queue_ui(&mut self, ui: &mut egui::Ui) {
        let mut cancel = None;
        for job in self.state.jobs.iter() {
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
            self.command(Command::Cancel(id));
        }
    }
}
