//! The settings panel (right): the model picker, the engine's speed settings (attention,
//! fusion, channels-last, precision, VAE tiling), a restart for what needs one, and the output
//! folder.

use std::sync::atomic::Ordering;

use eframe::egui;
use engine::backend::{BackendRequest, Precision};
use engine::models::{AttnProcessor, MemoryFormat};
use engine::worker::EngineSettings;

use super::command::Command;
use super::state::{ModelStatus, Setting};
use super::{BrushfireApp, RESTART};

/// Hub models offered in the picker (those this build's pipelines can run).
pub(super) const HUB_MODELS: &[&str] = &[
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stable-diffusion-v1-5/stable-diffusion-inpainting",
    "stabilityai/stable-diffusion-2-1-base",
];

impl BrushfireApp {
    pub(super) fn settings_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Settings");
        self.model_ui(ui);
        ui.separator();
        let mut settings = self.state.setup.settings;
        ui.label("Backend");
        egui::ComboBox::from_id_salt("backend")
            .selected_text(settings.backend.label())
            .show_ui(ui, |ui| {
                for b in BackendRequest::ALL {
                    ui.selectable_value(&mut settings.backend, b, b.label());
                }
            });
        if let Some(b) = &self.state.setup.backend {
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
        if let Some(wanted) = self.state.setup.restart_for {
            self.restart_ui(ui, wanted);
        }
        ui.checkbox(&mut settings.preview, "Live preview")
            .on_hover_text("Show the image forming at every step (a cheap decode of the latents)");
        ui.checkbox(&mut self.state.setup.vae_tiling, "VAE tiling")
            .on_hover_text(
                "Encode and decode pictures larger than the VAE's tile (512 px for SD 1.5, \
                 256 px for the x4 upscaler) in overlapping, blended tiles, as diffusers' \
                 enable_vae_tiling: far less memory for large pictures and ×4 upscales; the \
                 pixels differ slightly from an untiled decode",
            );
        if settings != self.state.setup.settings {
            self.command(Command::ApplySettings(settings));
        }
        ui.separator();
        self.output_ui(ui);
    }

    /// A precision (or fusion) change the engine could not make in this process: it waits for
    /// the next start, which "Restart now" brings about (the session is saved first).
    pub(super) fn restart_ui(&mut self, ui: &mut egui::Ui, wanted: EngineSettings) {
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

    pub(super) fn model_ui(&mut self, ui: &mut egui::Ui) {
        ui.label("Model");
        let mut load = false;
        ui.horizontal(|ui| {
            let edit = ui.add(
                egui::TextEdit::singleline(&mut self.state.model.spec)
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
                    let recent = self.state.model.recent.clone();
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
                            .selectable_label(self.state.model.spec == m, label)
                            .clicked()
                        {
                            self.state.model.spec = m;
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
                self.state.model.spec = dir.display().to_string();
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
                self.state.model.spec = file.display().to_string();
                load = true;
            }
        });
        if load {
            self.command(Command::LoadModel);
        }
        match &self.state.model.status {
            ModelStatus::NeedsDownload { repo_id } => {
                ui.label(format!(
                    "{repo_id} is not on this computer yet (Stable Diffusion 1.5 is about 4 GB)."
                ));
                if ui.button("Download").clicked() {
                    self.command(Command::DownloadModel);
                }
            }
            ModelStatus::Loading { download: Some(d) } => {
                ui.add(egui::ProgressBar::new(d.fraction()).show_percentage());
                ui.small(self.state.model.status.to_string());
            }
            other => {
                ui.small(other.to_string());
            }
        }
    }

    pub(super) fn output_ui(&mut self, ui: &mut egui::Ui) {
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
                self.command(Command::SetOutputDir(Some(dir)));
            }
        });
    }
}
