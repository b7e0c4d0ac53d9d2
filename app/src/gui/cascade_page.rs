//! The IF page: three columns, one per stage (IF stage I → stage II → x4 upscaler), each with
//! its model, steps, guidance and noise level, a Run button, its progress and rate while it
//! runs, and its last result. "Run all stages" chains them.

use eframe::egui;

use super::BrushfireApp;
use super::cascade::{MAX_NOISE, STAGE_NAMES, STAGES};
use super::command::Command;
use super::state::{AppState, JobState};

/// What a click asked for.
enum StageAction {
    Run(usize),
    RunAll,
    Cancel,
}

impl BrushfireApp {
    pub(crate) fn cascade_ui(&mut self, ui: &mut egui::Ui) {
        ui.label(
            "DeepFloyd IF: stage I draws 64² pixels from the prompt (T5 reads it), stage II \
             takes them to 256², the x4 upscaler to 1024². Prompt, negative prompt, seed and \
             batch come from the left panel; each stage uses its own model, loaded on first use.",
        );
        let mut action = None;
        ui.horizontal(|ui| {
            let cascade = &self.state.cascade;
            if ui
                .add_enabled(cascade.can_run(0), egui::Button::new("▶ Run all stages"))
                .clicked()
            {
                action = Some(StageAction::RunAll);
            }
            if cascade.running.is_some() && ui.button("Cancel").clicked() {
                action = Some(StageAction::Cancel);
            }
        });
        ui.separator();
        ui.columns(STAGES, |columns| {
            for (i, ui) in columns.iter_mut().enumerate() {
                if let Some(a) = stage_ui(ui, &mut self.state, i) {
                    action = Some(a);
                }
            }
        });
        match action {
            Some(StageAction::Run(i)) => self.command(Command::RunStage(i)),
            Some(StageAction::RunAll) => self.command(Command::RunAllStages),
            Some(StageAction::Cancel) => {
                if let Some((_, job)) = self.state.cascade.running {
                    self.state.cascade.chain = false;
                    self.command(Command::Cancel(job));
                }
            }
            None => {}
        }
    }
}

/// One stage's column.
fn stage_ui(ui: &mut egui::Ui, state: &mut AppState, i: usize) -> Option<StageAction> {
    let name = STAGE_NAMES[i];
    let mut action = None;
    ui.heading(name);
    let side = state.cascade.stage1_side * [1, 4, 16][i];
    ui.small(format!("{side}×{side}"));
    let running = state.cascade.running.filter(|(stage, _)| *stage == i);
    let can_run = state.cascade.can_run(i);
    let s = &mut state.cascade.stages[i];
    let label = ui.label("Model");
    ui.add(
        egui::TextEdit::singleline(&mut s.model)
            .hint_text("folder or hub id")
            .desired_width(f32::INFINITY),
    )
    .labelled_by(label.id);
    // Short slider texts: the columns are narrow and the heading names the stage.
    ui.spacing_mut().slider_width = (ui.available_width() - 110.0).clamp(60.0, 200.0);
    ui.add(egui::Slider::new(&mut s.steps, 1..=200).text("steps"));
    ui.add(egui::Slider::new(&mut s.guidance, 0.0..=20.0).text("guidance"));
    if i > 0 {
        ui.add(egui::Slider::new(&mut s.noise_level, 0..=MAX_NOISE[i]).text("noise"))
            .on_hover_text("Noise added to this stage's input before it is upscaled.");
    }
    let hint = if i == 0 {
        "Draw 64² images from the prompt."
    } else {
        "Upscale the previous stage's images ×4."
    };
    if ui
        .add_enabled(can_run, egui::Button::new(format!("Run {name}")))
        .on_hover_text(hint)
        .on_disabled_hover_text(if running.is_some() || state.cascade.running.is_some() {
            "A stage is running."
        } else {
            "Run the stage before this one first: its images are this one's input."
        })
        .clicked()
    {
        action = Some(StageAction::Run(i));
    }
    if let Some((_, job)) = running {
        if let Some(preview) = state.jobs.preview_of(job) {
            // IF denoises pixels: the preview is the image itself.
            let texture = preview.texture(ui.ctx());
            let room = ui.available_width();
            ui.add(egui::Image::new(&texture).fit_to_exact_size(egui::vec2(room, room)));
        }
        match state
            .jobs
            .iter()
            .find(|j| j.id == job)
            .map(|j| (&j.state, j))
        {
            Some((JobState::Running(Some(p)), j)) => {
                ui.add(
                    egui::ProgressBar::new(p.step as f32 / p.total.max(1) as f32).text(format!(
                        "step {}/{} · {:.2} it/s",
                        p.step, p.total, j.smoothed_it_per_sec
                    )),
                );
            }
            Some((JobState::Running(None), _)) => {
                ui.label("starting (loading the model, encoding the prompt)…");
            }
            _ => {
                ui.label("queued…");
            }
        }
    }
    if let Some(result) = &state.cascade.results[i] {
        let (w, h) = result.size();
        ui.label(format!(
            "{w}×{h} · {} image{} · {:.2} it/s · {:.1}s",
            result.count(),
            if result.count() == 1 { "" } else { "s" },
            result.it_per_sec,
            result.elapsed_secs
        ));
        let texture = result.texture(ui.ctx(), i);
        let room = ui.available_width();
        ui.add(egui::Image::new(&texture).fit_to_exact_size(egui::vec2(room, room)));
    }
    action
}
