//! The benchmark page: plan controls, progress with cancel, the seed's table, a bar chart of
//! it/s per column, and export (markdown / CSV / JSON).

use eframe::egui;
use egui_plot::{Bar, BarChart, Legend, Plot};
use engine::backend::Precision;
use engine::bench::{BenchCell, BenchColumn, BenchPipeline, CellOutcome};

use super::BrushfireApp;
use super::bench::{BENCH_BATCHES, BENCH_SIZES, BenchForm, it_per_sec};
use super::command::Command;

/// Bar colours per settings column (baseline, fused, fusion, channels-last).
const COLUMN_COLOURS: [egui::Color32; 4] = [
    egui::Color32::from_rgb(140, 140, 150),
    egui::Color32::from_rgb(230, 120, 40),
    egui::Color32::from_rgb(200, 60, 40),
    egui::Color32::from_rgb(120, 80, 200),
];

impl BrushfireApp {
    pub(super) fn bench_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Benchmark");
        ui.label(
            "The seed's protocol: random-weight models from SD 1.5's configs, PNDM, CFG, \
             it/s = UNet evaluations per second of the denoising loop, the last of the runs \
             reported. It runs on the engine after any queued generation.",
        );
        ui.separator();
        let running = self.state.bench.running.is_some();
        ui.add_enabled_ui(!running, |ui| self.bench_form_ui(ui));
        ui.horizontal(|ui| {
            if running {
                if ui.button("Cancel benchmark").clicked() {
                    self.command(Command::CancelBench);
                }
            } else {
                let ready = self.state.setup.backend.is_some();
                let run = ui
                    .add_enabled(ready, egui::Button::new("▶ Run benchmark"))
                    .on_disabled_hover_text("The engine is still starting.");
                if run.clicked() {
                    self.command(Command::StartBench);
                }
            }
            if let Some(backend) = &self.state.setup.backend {
                ui.small(format!("on {backend}"));
            }
        });
        if let Some(run) = &self.state.bench.running {
            let text = match (&run.cell, &run.step) {
                (Some((index, total, spec)), Some((r, p))) => format!(
                    "cell {}/{total}: {spec} · run {}/{} · step {}/{} · {:.2} it/s",
                    index + 1,
                    r + 1,
                    run.plan.runs,
                    p.step,
                    p.total,
                    p.it_per_sec
                ),
                (Some((index, total, spec)), None) => {
                    format!("cell {}/{total}: {spec} · building the model…", index + 1)
                }
                _ => "waiting for the engine…".to_string(),
            };
            ui.add(egui::ProgressBar::new(run.fraction()).text(text));
        }
        if let Some(status) = &self.state.bench.status {
            ui.small(status.as_str());
        }
        ui.separator();
        egui::ScrollArea::vertical().show(ui, |ui| {
            self.bench_table_ui(ui);
            self.bench_chart_ui(ui);
            self.bench_export_ui(ui);
        });
    }

    fn bench_form_ui(&mut self, ui: &mut egui::Ui) {
        let cpu = self
            .state
            .setup
            .backend
            .as_ref()
            .is_some_and(|b| b.kind == engine::backend::BackendKind::Cpu);
        let form = &mut self.state.bench.form;
        egui::Grid::new("bench_form")
            .num_columns(2)
            .spacing([12.0, 6.0])
            .show(ui, |ui| {
                ui.label("Pipelines");
                ui.horizontal_wrapped(|ui| {
                    for p in BenchPipeline::ALL {
                        let mut on = form.pipelines.contains(&p);
                        let response = ui.checkbox(&mut on, p.name());
                        let response = if p == BenchPipeline::If {
                            response.on_hover_text(
                                "The IF cascade: stage I (64², the batch), stage II (256²) and \
                                 the x4 upscaler (to 1024²), three rates in one cell.",
                            )
                        } else {
                            response
                        };
                        if response.changed() {
                            BenchForm::toggle(&mut form.pipelines, p, on, &BenchPipeline::ALL);
                        }
                    }
                });
                ui.end_row();

                ui.label("Batch sizes");
                ui.horizontal(|ui| {
                    for b in BENCH_BATCHES {
                        let mut on = form.batches.contains(&b);
                        if ui.checkbox(&mut on, b.to_string()).changed() {
                            BenchForm::toggle(&mut form.batches, b, on, &BENCH_BATCHES);
                        }
                    }
                });
                ui.end_row();

                ui.label("Size");
                egui::ComboBox::from_id_salt("bench_size")
                    .selected_text(format!("{0}×{0}", form.size))
                    .show_ui(ui, |ui| {
                        for s in BENCH_SIZES {
                            ui.selectable_value(&mut form.size, s, format!("{s}×{s}"));
                        }
                    });
                ui.end_row();

                ui.label("Columns");
                ui.horizontal_wrapped(|ui| {
                    for c in BenchColumn::ALL {
                        let mut on = form.columns.contains(&c);
                        if ui
                            .checkbox(&mut on, c.name())
                            .on_hover_text(c.label())
                            .changed()
                        {
                            BenchForm::toggle(&mut form.columns, c, on, &BenchColumn::ALL);
                        }
                    }
                });
                ui.end_row();

                ui.label("Precision");
                ui.horizontal(|ui| {
                    ui.radio_value(&mut form.precision, None, "as the app runs")
                        .on_hover_text(
                            "Burn fixes a device's float type for the whole process: another \
                             precision is measured with `brushfire bench --dtype`.",
                        );
                    ui.radio_value(&mut form.precision, Some(Precision::F32), "f32");
                    ui.add_enabled_ui(!cpu, |ui| {
                        ui.radio_value(&mut form.precision, Some(Precision::F16), "f16")
                            .on_disabled_hover_text("f16 runs on GPU backends only.");
                    });
                });
                ui.end_row();

                ui.label("Steps");
                ui.add(egui::DragValue::new(&mut form.steps).range(1..=200))
                    .on_hover_text("PNDM: 50 steps are 51 UNet evaluations.");
                ui.end_row();

                ui.label("Runs per cell");
                ui.add(egui::DragValue::new(&mut form.runs).range(1..=10))
                    .on_hover_text("The first run compiles kernels; the last one is reported.");
                ui.end_row();
            });
    }

    fn bench_table_ui(&mut self, ui: &mut egui::Ui) {
        let bench = &self.state.bench;
        if bench.cells.is_empty() {
            ui.weak("No results yet.");
            return;
        }
        if let Some(report) = &bench.report {
            ui.small(format!(
                "{} · {} · {} steps · run {} of {} reported · models: {}",
                report.backend,
                report.precision,
                report.steps,
                report.runs,
                report.runs,
                report.model
            ));
        }
        let columns = bench.columns();
        egui::Grid::new("bench_table")
            .striped(true)
            .num_columns(columns.len() + 1)
            .show(ui, |ui| {
                ui.strong("pipeline");
                for c in &columns {
                    ui.strong(c.label());
                }
                ui.end_row();
                for row in bench.table() {
                    ui.label(row.label());
                    for &c in &columns {
                        match row.cell(c) {
                            // The reason in full on hover: a memory refusal is a paragraph.
                            Some(BenchCell {
                                outcome: CellOutcome::Failed { reason },
                                ..
                            }) => ui
                                .label(format!("not run: {}", short_reason(reason)))
                                .on_hover_text(reason),
                            Some(cell) => ui.label(cell.outcome.cell_text()),
                            None => ui.weak("…"),
                        };
                    }
                    ui.end_row();
                }
            });
    }

    fn bench_chart_ui(&mut self, ui: &mut egui::Ui) {
        let bench = &self.state.bench;
        let rows = bench.table();
        let columns = bench.columns();
        if rows.is_empty()
            || !rows
                .iter()
                .any(|r| r.cells.iter().any(|c| it_per_sec(c).is_some()))
        {
            return;
        }
        let n = columns.len().max(1) as f64;
        let width = 0.8 / n;
        let labels: Vec<String> = rows.iter().map(|r| r.label()).collect();
        let charts: Vec<BarChart> = columns
            .iter()
            .enumerate()
            .map(|(ci, &column)| {
                let bars = rows
                    .iter()
                    .enumerate()
                    .filter_map(|(ri, row)| {
                        let value = row.cell(column).and_then(it_per_sec)?;
                        let x = ri as f64 + (ci as f64 - (n - 1.0) / 2.0) * width;
                        Some(Bar::new(x, value).width(width * 0.95).name(format!(
                            "{} · {}",
                            labels[ri],
                            column.label()
                        )))
                    })
                    .collect();
                let colour = COLUMN_COLOURS[BenchColumn::ALL
                    .iter()
                    .position(|c| *c == column)
                    .unwrap_or(0)
                    % COLUMN_COLOURS.len()];
                BarChart::new(column.label(), bars).color(colour)
            })
            .collect();
        ui.add_space(8.0);
        Plot::new("bench_chart")
            .legend(Legend::default())
            .height(240.0)
            .y_axis_label("it/s")
            .allow_zoom(false)
            .allow_drag(false)
            .allow_scroll(false)
            .x_axis_formatter(move |mark, _range| {
                let i = mark.value.round();
                if (mark.value - i).abs() < 1e-6 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .show(ui, |plot| {
                for chart in charts {
                    plot.bar_chart(chart);
                }
            });
    }

    fn bench_export_ui(&mut self, ui: &mut egui::Ui) {
        let Some(markdown) = self.state.bench.markdown() else {
            return;
        };
        ui.add_space(8.0);
        ui.horizontal(|ui| {
            if ui.button("Copy markdown").clicked() {
                ui.ctx().copy_text(markdown.clone());
                self.state.bench.status = Some("table copied as markdown".into());
            }
            for (label, ext) in [
                ("Save markdown…", "md"),
                ("Save CSV…", "csv"),
                ("Save JSON…", "json"),
            ] {
                if ui.button(label).clicked() {
                    let picked = rfd::FileDialog::new()
                        .set_file_name(format!("brushfire-bench.{ext}"))
                        .add_filter(ext, &[ext])
                        .save_file();
                    if let Some(path) = picked
                        && let Err(e) = self.state.bench.export(&path)
                    {
                        self.state.error = Some(format!("{e:#}"));
                    }
                }
            }
        });
    }
}

/// What a failed cell shows in the table: its error's kind ("not enough memory",
/// "unsupported"), the text before the first colon, or its first 40 characters.
pub fn short_reason(reason: &str) -> String {
    let head = reason.split(':').next().unwrap_or(reason).trim();
    if head.chars().count() <= 40 {
        head.to_string()
    } else {
        format!("{}…", head.chars().take(40).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::short_reason;

    #[test]
    fn a_failed_cell_shows_the_kind_of_its_error() {
        assert_eq!(
            short_reason("not enough memory: vanilla attention needs about 32.0 GiB"),
            "not enough memory"
        );
        assert_eq!(short_reason("unsupported: f16 on the CPU"), "unsupported");
        let long = "the backend panicked while compiling a kernel for this device today";
        assert_eq!(
            short_reason(long),
            "the backend panicked while compiling a k…"
        );
    }
}
