//! The image-to-image and inpainting pages: the source image (and the mask canvas) on the
//! left, the result and live preview on the right.

use eframe::egui;

use super::canvas::ToolLabels;
use super::command::Command;
use super::image_input::SizeFit;
use super::{BrushfireApp, View};

/// File types the open dialogs offer.
pub(super) const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

impl BrushfireApp {
    pub(super) fn img2img_ui(&mut self, ui: &mut egui::Ui) {
        self.source_bar_ui(ui, View::Img2Img);
        ui.separator();
        self.input_and_result_ui(ui, |app, ui| {
            let Some(source) = &app.state.inputs.source else {
                return;
            };
            let texture = source.texture(ui.ctx());
            ui.add(egui::Image::new(&texture).shrink_to_fit());
        });
    }

    pub(super) fn inpaint_ui(&mut self, ui: &mut egui::Ui) {
        self.source_bar_ui(ui, View::Inpaint);
        if self.state.inputs.source.is_some() {
            self.mask_tools_ui(ui);
        }
        ui.separator();
        self.input_and_result_ui(ui, |app, ui| {
            let Some(source) = app.state.inputs.source.as_mut() else {
                return;
            };
            let texture = source.texture(ui.ctx());
            source.canvas.ui(ui, &texture);
        });
    }

    /// Open, size handling and strength.
    fn source_bar_ui(&mut self, ui: &mut egui::Ui, view: View) {
        let inputs = &mut self.state.inputs;
        let mut open = false;
        ui.horizontal_wrapped(|ui| {
            open = ui.button("Open image…").clicked();
            if let (Some(source), Some(note)) = (&inputs.source, inputs.size_note()) {
                ui.label(format!("{} · {note}", source.label));
            }
            let odd = inputs
                .source
                .as_ref()
                .zip(inputs.working_size())
                .is_some_and(|(s, w)| (s.width, s.height) != w);
            if odd {
                ui.separator();
                ui.label("Sides not multiples of 8:");
                ui.radio_value(&mut inputs.fit, SizeFit::Resize, "Resize");
                ui.radio_value(&mut inputs.fit, SizeFit::Crop, "Crop");
            }
        });
        ui.horizontal(|ui| {
            let strength = if view == View::Inpaint {
                &mut inputs.inpaint_strength
            } else {
                &mut inputs.strength
            };
            let label = ui.label("Strength");
            ui.add(egui::Slider::new(strength, 0.0..=1.0).step_by(0.01))
                .labelled_by(label.id)
                .on_hover_text(
                    "How much of the schedule runs on the noised image: 0 keeps it, 1 repaints \
                     from pure noise.",
                );
        });
        if open
            && let Some(path) = rfd::FileDialog::new()
                .add_filter("Images", IMAGE_EXTENSIONS)
                .pick_file()
        {
            self.command(Command::OpenSource(path));
        }
    }

    /// Brush, eraser, size, history, view and mask options.
    fn mask_tools_ui(&mut self, ui: &mut egui::Ui) {
        let inputs = &mut self.state.inputs;
        let Some(source) = inputs.source.as_mut() else {
            return;
        };
        let canvas = &mut source.canvas;
        let (mut save, mut load) = (false, false);
        ui.horizontal_wrapped(|ui| {
            let labels = ToolLabels {
                brush: "Brush",
                brush_hint: None,
                eraser_hint: None,
                size: "Brush size",
                clear: "Clear",
                clear_hint: None,
            };
            canvas.tools_ui(ui, &labels, |canvas, ui| {
                if ui.button("Invert").clicked() {
                    canvas.invert();
                }
            });
        });
        ui.horizontal_wrapped(|ui| {
            let label = ui.label("Mask blur");
            ui.add(egui::Slider::new(&mut inputs.mask_blur, 0.0..=64.0).suffix(" px"))
                .labelled_by(label.id);
            ui.separator();
            ui.checkbox(&mut inputs.only_masked, "Only masked")
                .on_hover_text(
                    "Inpaint the mask's box (plus padding) at the prompt panel's size, then paste \
                     it back: more detail for small regions of large images.",
                );
            ui.add_enabled_ui(inputs.only_masked, |ui| {
                let label = ui.label("Padding");
                ui.add(
                    egui::DragValue::new(&mut inputs.padding)
                        .range(0..=1024)
                        .suffix(" px"),
                )
                .labelled_by(label.id);
            });
            ui.separator();
            save = ui.button("Save mask…").clicked();
            load = ui.button("Load mask…").clicked();
        });
        if save
            && let Some(path) = rfd::FileDialog::new()
                .add_filter("PNG", &["png"])
                .set_file_name("mask.png")
                .save_file()
        {
            match self.state.inputs.save_mask(&path) {
                Ok(()) => self.state.status = format!("saved the mask to {}", path.display()),
                Err(e) => self.state.error = Some(format!("{e:#}")),
            }
        }
        if load
            && let Some(path) = rfd::FileDialog::new()
                .add_filter("Images", IMAGE_EXTENSIONS)
                .pick_file()
            && let Err(e) = self.state.inputs.load_mask(&path)
        {
            self.state.error = Some(format!("{e:#}"));
        }
    }

    /// The input (drawn by `input`) on the left, the result on the right; a hint when no image
    /// is loaded yet.
    fn input_and_result_ui(
        &mut self,
        ui: &mut egui::Ui,
        input: impl FnOnce(&mut Self, &mut egui::Ui),
    ) {
        if self.state.inputs.source.is_none() {
            ui.centered_and_justified(|ui| {
                ui.label("Open an image, drop one here, or use \"Send to …\" on a gallery image.");
            });
            return;
        }
        ui.columns(2, |cols| {
            input(self, &mut cols[0]);
            self.image_ui(&mut cols[1]);
        });
    }
}
