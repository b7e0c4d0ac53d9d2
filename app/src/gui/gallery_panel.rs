//! The image in the centre with its actions (save, copy, open the folder, reuse, send to a
//! page, upscale), and the gallery strip below.

use std::path::Path;

use eframe::egui;

use super::BrushfireApp;
use super::command::Command;
use super::state::View;

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

impl BrushfireApp {
    pub(super) fn image_ui(&mut self, ui: &mut egui::Ui) {
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
            GalleryAction::ReuseSeed => self.command(Command::ReuseSeed(index)),
            GalleryAction::ReuseParameters => self.command(Command::ReuseParameters(index)),
            GalleryAction::SendTo(view) => self.command(Command::SendTo(index, view)),
            GalleryAction::Upscale => self.command(Command::Upscale(index)),
        }
    }

    pub(super) fn gallery_ui(&mut self, ui: &mut egui::Ui) {
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
}
