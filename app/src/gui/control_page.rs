//! The ControlNet page: which ControlNet, the control image and how its map is made (Canny
//! edges with live thresholds, or the image as it is), the drawing tools, the ControlNet's
//! scale and guidance window; the map (with the strokes) on the left, the result on the right.

use eframe::egui;

use super::BrushfireApp;
use super::canvas::ToolLabels;
use super::command::Command;
use super::control_input::MapSource;
use super::image_pages::IMAGE_EXTENSIONS;
use super::state::model_label;

/// The Canny sliders' range (OpenCV's scale; above ~1000 almost nothing passes).
const CANNY_SLIDER_MAX: f32 = 1000.0;

impl BrushfireApp {
    pub(super) fn controlnet_ui(&mut self, ui: &mut egui::Ui) {
        self.controlnet_model_ui(ui);
        self.control_source_ui(ui);
        if self.state.control.source.is_some() {
            self.control_tools_ui(ui);
        }
        ui.separator();
        if self.state.control.source.is_none() {
            ui.centered_and_justified(|ui| {
                ui.label(
                    "Open a picture (its edges become the control map), drop one here, start a \
                     blank map to draw on, or use \"Send to ControlNet\" on a gallery image.",
                );
            });
            return;
        }
        ui.columns(2, |cols| {
            let texture = match self.state.control.map_texture(cols[0].ctx()) {
                Ok(texture) => Some(texture),
                Err(e) => {
                    cols[0].colored_label(cols[0].visuals().error_fg_color, format!("{e:#}"));
                    None
                }
            };
            if let (Some(texture), Some(source)) = (texture, self.state.control.source.as_mut()) {
                source.canvas.ui(&mut cols[0], &texture);
            }
            self.image_ui(&mut cols[1]);
        });
    }

    /// The ControlNet field, its browse buttons, Load and what is loaded.
    fn controlnet_model_ui(&mut self, ui: &mut egui::Ui) {
        let mut load = false;
        let mut browse = None;
        let model_ready = self.state.model_ready();
        let control = &mut self.state.control;
        ui.horizontal_wrapped(|ui| {
            let label = ui.label("ControlNet");
            let edit = ui
                .add(egui::TextEdit::singleline(&mut control.controlnet_spec).desired_width(260.0))
                .labelled_by(label.id)
                .on_hover_text(
                    "A diffusers folder, a hub id (e.g. lllyasviel/sd-controlnet-canny) or a \
                     single-file .safetensors checkpoint. It must match the loaded model's UNet.",
                );
            load |= edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            if ui.button("Folder…").clicked() {
                browse = Some(true);
            }
            if ui.button("File…").clicked() {
                browse = Some(false);
            }
            let ready = model_ready && !control.loading;
            load |= ui
                .add_enabled(ready, egui::Button::new("Load ControlNet"))
                .clicked();
            if control.loading {
                ui.spinner();
                match &control.download {
                    Some(d) => ui.label(format!(
                        "downloading {} {:.0}%",
                        d.file,
                        d.fraction() * 100.0
                    )),
                    None => ui.label("loading…"),
                };
            } else if let Some(loaded) = &control.loaded {
                ui.label(format!("loaded: {}", model_label(loaded)))
                    .on_hover_text(loaded.as_str());
            } else {
                ui.label("no ControlNet loaded");
            }
        });
        if let Some(folder) = browse {
            let dialog = rfd::FileDialog::new();
            let picked = if folder {
                dialog.pick_folder()
            } else {
                dialog
                    .add_filter("safetensors", &["safetensors"])
                    .pick_file()
            };
            if let Some(path) = picked {
                self.state.control.controlnet_spec = path.display().to_string();
                load = model_ready;
            }
        }
        if load {
            self.command(Command::LoadControlNet);
        }
    }

    /// Open / blank, the map's source and thresholds, and the ControlNet's settings.
    fn control_source_ui(&mut self, ui: &mut egui::Ui) {
        let control = &mut self.state.control;
        let (mut open, mut blank) = (false, false);
        ui.horizontal_wrapped(|ui| {
            open = ui.button("Open image…").clicked();
            blank = ui
                .button("Blank map")
                .on_hover_text("A black map of the prompt panel's size, to draw on.")
                .clicked();
            if let (Some(source), Some((w, h))) = (&control.source, control.working_size()) {
                let note = if (w, h) == (source.width, source.height) {
                    format!("{w}×{h}")
                } else {
                    format!("{}×{}, works at {w}×{h}", source.width, source.height)
                };
                ui.label(format!("{} · {note}", source.label));
            }
        });
        if control.source.is_some() {
            ui.horizontal_wrapped(|ui| {
                ui.label("Map:");
                ui.radio_value(&mut control.map_source, MapSource::Canny, "Canny edges");
                ui.radio_value(&mut control.map_source, MapSource::AsIs, "Image as is")
                    .on_hover_text("For a map made elsewhere (edges, a sketch): used unchanged.");
                if control.map_source == MapSource::Canny {
                    ui.separator();
                    let canny = &mut control.canny;
                    let label = ui.label("Low");
                    let low = ui
                        .add(egui::Slider::new(&mut canny.low, 0.0..=CANNY_SLIDER_MAX))
                        .labelled_by(label.id);
                    let label = ui.label("High");
                    let high = ui
                        .add(egui::Slider::new(&mut canny.high, 0.0..=CANNY_SLIDER_MAX))
                        .labelled_by(label.id)
                        .on_hover_text(
                            "Edges start where the gradient passes High and continue while it \
                             stays above Low (OpenCV's scale; 100/200 is the usual pair).",
                        );
                    // Keep low ≤ high: the one moved pushes the other.
                    if low.changed() && canny.low > canny.high {
                        canny.high = canny.low;
                    }
                    if high.changed() && canny.high < canny.low {
                        canny.low = canny.high;
                    }
                }
            });
        }
        ui.horizontal_wrapped(|ui| {
            let label = ui.label("Scale");
            ui.add(egui::Slider::new(&mut control.scale, 0.0..=2.0).step_by(0.05))
                .labelled_by(label.id)
                .on_hover_text("controlnet_conditioning_scale: how strongly the map steers.");
            let label = ui.label("Start");
            let start = ui
                .add(egui::Slider::new(&mut control.guidance_start, 0.0..=1.0).step_by(0.01))
                .labelled_by(label.id);
            let label = ui.label("End");
            let end = ui
                .add(egui::Slider::new(&mut control.guidance_end, 0.0..=1.0).step_by(0.01))
                .labelled_by(label.id)
                .on_hover_text("The fraction of the steps the ControlNet acts on: start to end.");
            if start.changed() && control.guidance_start > control.guidance_end {
                control.guidance_end = control.guidance_start;
            }
            if end.changed() && control.guidance_end < control.guidance_start {
                control.guidance_start = control.guidance_end;
            }
            ui.checkbox(&mut control.guess_mode, "Guess mode").on_hover_text(
                "The ControlNet sees only the prompt's half of the batch (works without a prompt).",
            );
        });
        if blank {
            let (w, h) = (self.state.form.width, self.state.form.height);
            self.state.control.new_blank(w, h);
        }
        if open
            && let Some(path) = rfd::FileDialog::new()
                .add_filter("Images", IMAGE_EXTENSIONS)
                .pick_file()
        {
            self.command(Command::OpenControl(path));
        }
    }

    /// Pen, eraser, size, history, view, save.
    fn control_tools_ui(&mut self, ui: &mut egui::Ui) {
        let mut save = false;
        let Some(source) = self.state.control.source.as_mut() else {
            return;
        };
        let canvas = &mut source.canvas;
        ui.horizontal_wrapped(|ui| {
            let labels = ToolLabels {
                brush: "Pen",
                brush_hint: Some("Draws white lines over the map."),
                eraser_hint: Some("Blacks out the map under it (edges included)."),
                size: "Size",
                clear: "Clear strokes",
                clear_hint: Some("Removes what was drawn; the map stays (undoable)."),
            };
            canvas.tools_ui(ui, &labels, |_, _| {});
            ui.separator();
            save = ui.button("Save map…").clicked();
        });
        if save
            && let Some(path) = rfd::FileDialog::new()
                .add_filter("PNG", &["png"])
                .set_file_name("control.png")
                .save_file()
        {
            match self.state.control.save_map(&path) {
                Ok(()) => {
                    self.state.status = format!("saved the control map to {}", path.display())
                }
                Err(e) => self.state.error = Some(format!("{e:#}")),
            }
        }
    }
}
