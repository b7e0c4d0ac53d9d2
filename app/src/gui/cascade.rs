//! The IF page's state: DeepFloyd IF stage I (64² pixels from the prompt) → stage II (256²) →
//! the x4 upscaler (1024²). Each stage has its own model (loaded by the engine beside the main
//! model on first use), steps, guidance and noise level, and keeps its last result and rate.
//! Stages run one at a time; a stage's input is the previous stage's raw output (`[-1, 1]`,
//! as diffusers chains them with `output_type="pt"`); "Run all" starts each stage when the one
//! before finishes.

use std::sync::OnceLock;

use anyhow::{Result, bail};
use eframe::egui;
use engine::pipelines::{
    CommonRequest, GenerationRequest, PromptEmbeds, Task, UpscaleInput, UpscaleSource,
};
use engine::tensor_io::HostTensor;
use engine::worker::JobId;
use serde::{Deserialize, Serialize};

use crate::image_files::to_u8;

/// The stages, in order.
pub const STAGES: usize = 3;
/// Their names in the UI.
pub const STAGE_NAMES: [&str; STAGES] = ["Stage I", "Stage II", "×4 upscaler"];
/// Stage I's side (IF's stage I UNets all work at 64²).
pub const STAGE1_SIDE: usize = 64;
/// The highest noise level each stage takes (stage II: its scheduler's last timestep; the x4
/// upscaler's `max_noise_level`).
pub const MAX_NOISE: [usize; STAGES] = [0, 999, 350];

/// One stage's settings (stored across restarts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StageSettings {
    /// A folder or hub id.
    pub model: String,
    pub steps: usize,
    pub guidance: f64,
    /// The noise added to the stage's input (stage II, x4 upscaler).
    pub noise_level: usize,
}

impl Default for StageSettings {
    fn default() -> Self {
        Self::defaults(0)
    }
}

impl StageSettings {
    /// Diffusers' defaults for stage `i` (IF-I-M, IF-II-M and the x4 upscaler, the seed's
    /// models).
    pub fn defaults(i: usize) -> Self {
        let (model, steps, guidance, noise_level) = match i {
            0 => ("DeepFloyd/IF-I-M-v1.0", 100, 7.0, 0),
            1 => ("DeepFloyd/IF-II-M-v1.0", 50, 4.0, 250),
            _ => ("stabilityai/stable-diffusion-x4-upscaler", 75, 9.0, 20),
        };
        Self {
            model: model.into(),
            steps,
            guidance,
            noise_level,
        }
    }

    /// The settings stage `i` restores from storage: what is usable, else the default.
    pub fn restored(i: usize, stored: Option<&Self>) -> Self {
        let d = Self::defaults(i);
        let Some(s) = stored else {
            return d;
        };
        Self {
            model: if s.model.trim().is_empty() {
                d.model
            } else {
                s.model.clone()
            },
            steps: if (1..=1000).contains(&s.steps) {
                s.steps
            } else {
                d.steps
            },
            guidance: if (0.0..=30.0).contains(&s.guidance) {
                s.guidance
            } else {
                d.guidance
            },
            noise_level: s.noise_level.min(MAX_NOISE[i.min(STAGES - 1)]),
        }
    }
}

/// A stage's last images.
pub struct StageResult {
    /// `[batch, h, w, 3]` in [0, 1].
    pub images: HostTensor,
    /// What the next stage takes: `[batch, 3, h, w]` in [-1, 1] (IF's stages), else `None`.
    pub raw: Option<HostTensor>,
    /// IF's T5 embeddings of the prompt: stage II takes them instead of running T5 again.
    pub prompt_embeds: Option<PromptEmbeds>,
    pub it_per_sec: f64,
    pub elapsed_secs: f64,
    texture: OnceLock<egui::TextureHandle>,
}

impl StageResult {
    /// `(width, height)` of the images.
    pub fn size(&self) -> (usize, usize) {
        (self.images.shape[2], self.images.shape[1])
    }

    /// How many images.
    pub fn count(&self) -> usize {
        self.images.shape[0]
    }

    /// The first image as a texture.
    pub fn texture(&self, ctx: &egui::Context, stage: usize) -> egui::TextureHandle {
        self.texture
            .get_or_init(|| {
                let (w, h) = self.size();
                let rgb = to_u8(&self.images.values[..w * h * 3]);
                ctx.load_texture(
                    format!("if-stage-{stage}-{}", self.images.values.len()),
                    egui::ColorImage::from_rgb([w, h], &rgb),
                    egui::TextureOptions::NEAREST,
                )
            })
            .clone()
    }

    /// The next stage's input: the raw images, or the shown ones mapped back to [-1, 1].
    fn next_input(&self) -> HostTensor {
        if let Some(raw) = &self.raw {
            return raw.clone();
        }
        let [b, h, w] = [
            self.images.shape[0],
            self.images.shape[1],
            self.images.shape[2],
        ];
        let mut values = vec![0.0; b * 3 * h * w];
        for (i, v) in self.images.values.iter().enumerate() {
            let (image, pixel, c) = (i / (h * w * 3), (i / 3) % (h * w), i % 3);
            values[(image * 3 + c) * h * w + pixel] = v * 2.0 - 1.0;
        }
        HostTensor {
            shape: vec![b, 3, h, w],
            values,
        }
    }
}

/// The IF page.
#[derive(Default)]
pub struct CascadeState {
    pub stages: [StageSettings; STAGES],
    pub results: [Option<StageResult>; STAGES],
    /// The stage queued or running, and its job.
    pub running: Option<(usize, JobId)>,
    /// "Run all": the next stage starts when one finishes.
    pub chain: bool,
    /// Stage I's side (64, what IF's stage I models are trained at).
    pub stage1_side: usize,
}

impl CascadeState {
    /// Every stage at its defaults.
    pub fn new() -> Self {
        Self {
            stages: [0, 1, 2].map(StageSettings::defaults),
            stage1_side: STAGE1_SIDE,
            ..Self::default()
        }
    }

    /// Whether stage `i` can run now (its input exists and no stage is running).
    pub fn can_run(&self, i: usize) -> bool {
        self.running.is_none() && (i == 0 || self.results[i - 1].is_some())
    }

    /// The request for stage `i` and the model it runs on. `base` comes from the prompt panel
    /// (prompt, seed, batch; the batch only matters to stage I: later stages make one image
    /// per input image); the stage sets its own steps, guidance and size.
    pub fn request(&self, i: usize, base: CommonRequest) -> Result<(GenerationRequest, String)> {
        let Some(s) = self.stages.get(i) else {
            bail!("there is no stage {i}");
        };
        if s.model.trim().is_empty() {
            bail!("{}: choose a model first", STAGE_NAMES[i]);
        }
        let common = CommonRequest {
            steps: s.steps,
            guidance_scale: s.guidance,
            ..base
        };
        let request = if i == 0 {
            let side = self.stage1_side;
            GenerationRequest {
                common: CommonRequest {
                    width: side,
                    height: side,
                    ..common
                },
                task: Task::If,
            }
        } else {
            let Some(previous) = &self.results[i - 1] else {
                bail!(
                    "{}: run {} first (its images are this stage's input)",
                    STAGE_NAMES[i],
                    STAGE_NAMES[i - 1]
                );
            };
            let array = previous.next_input();
            let (w, h) = previous.size();
            let common = CommonRequest {
                width: 4 * w,
                height: 4 * h,
                batch: array.shape[0],
                // Stage I's T5 embeddings (IF-II's folder need not hold T5).
                prompt_embeds: if i == 1 {
                    previous.prompt_embeds.clone()
                } else {
                    common.prompt_embeds
                },
                ..common
            };
            let input = UpscaleInput {
                source: UpscaleSource::Array(array),
                noise_level: Some(s.noise_level),
            };
            GenerationRequest {
                common,
                task: if i == 1 {
                    Task::IfStage2(input)
                } else {
                    Task::Upscale(input)
                },
            }
        };
        Ok((request, s.model.trim().to_string()))
    }

    /// Stage `i` finished: its result replaces the last one, and the later stages' results
    /// (made from older input) are dropped.
    pub fn finished(
        &mut self,
        i: usize,
        images: HostTensor,
        (raw, prompt_embeds): (Option<HostTensor>, Option<PromptEmbeds>),
        it_per_sec: f64,
        elapsed_secs: f64,
    ) {
        if i >= STAGES {
            return;
        }
        self.results[i] = Some(StageResult {
            images,
            raw,
            prompt_embeds,
            it_per_sec,
            elapsed_secs,
            texture: OnceLock::new(),
        });
        for later in self.results.iter_mut().skip(i + 1) {
            *later = None;
        }
        self.running = None;
    }

    /// The running stage's job ended without images (failed or cancelled): the chain stops.
    pub fn stopped(&mut self, job: JobId) {
        if self.running.is_some_and(|(_, j)| j == job) {
            self.running = None;
            self.chain = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::pipelines::PipelineKind;

    fn images(b: usize, side: usize) -> HostTensor {
        HostTensor {
            shape: vec![b, side, side, 3],
            values: (0..b * side * side * 3)
                .map(|i| (i % 7) as f32 / 6.0)
                .collect(),
        }
    }

    #[test]
    fn stages_chain_their_outputs_and_refuse_to_run_without_input() {
        let mut c = CascadeState::new();
        assert!(c.can_run(0) && !c.can_run(1) && !c.can_run(2));
        let base = CommonRequest {
            prompt: "a corgi".into(),
            negative_prompt: "blurry".into(),
            seed: 7,
            batch: 2,
            ..Default::default()
        };
        let err = c.request(1, base.clone()).unwrap_err().to_string();
        assert!(err.contains("run Stage I first"), "{err}");
        let (r, model) = c.request(0, base.clone()).unwrap();
        assert_eq!(
            (r.pipeline(), r.width, r.batch, r.steps),
            (PipelineKind::If, 64, 2, 100)
        );
        assert_eq!(model, "DeepFloyd/IF-I-M-v1.0");
        c.running = Some((0, 1));
        assert!(!c.can_run(0), "one stage at a time");
        let raw = HostTensor {
            shape: vec![2, 3, 64, 64],
            values: vec![0.25; 2 * 3 * 64 * 64],
        };
        let embeds = PromptEmbeds {
            prompt_embeds: HostTensor {
                shape: vec![1, 2, 4],
                values: vec![0.5; 8],
            },
            negative_prompt_embeds: None,
        };
        c.finished(
            0,
            images(2, 64),
            (Some(raw.clone()), Some(embeds.clone())),
            3.0,
            1.0,
        );
        assert!(c.running.is_none() && c.can_run(1));
        let (r, _) = c.request(1, base.clone()).unwrap();
        assert_eq!(
            (r.pipeline(), r.width, r.height, r.batch, r.noise_level()),
            (PipelineKind::IfStage2, 256, 256, 2, 250)
        );
        assert_eq!(
            r.task.upscale_input().map(|input| &input.source),
            Some(&UpscaleSource::Array(raw)),
            "stage I's raw output"
        );
        assert_eq!(r.prompt_embeds, Some(embeds), "stage I's T5 embeddings");
        assert_eq!(r.prompt, "a corgi", "kept for the images' parameters");
        // A result without raw images (the x4 input from shown pixels) maps [0, 1] → [-1, 1].
        c.finished(1, images(1, 4), (None, None), 2.0, 1.0);
        let (r, _) = c.request(2, base).unwrap();
        let Task::Upscale(UpscaleInput {
            source: UpscaleSource::Array(input),
            ..
        }) = &r.task
        else {
            panic!("{:?}", r.task)
        };
        assert_eq!(input.shape, vec![1, 3, 4, 4]);
        // Pixel 1's red is NHWC value 3: (3 % 7) / 6 = 0.5 → 0.
        assert_eq!(input.values[1], 0.0);
        assert_eq!(input.values[0], -1.0);
        assert_eq!((r.pipeline(), r.width), (PipelineKind::Upscale, 16));
        // Re-running stage I drops what was made from its old output.
        c.finished(0, images(2, 64), (None, None), 3.0, 1.0);
        assert!(c.results[1].is_none() && c.results[2].is_none());
    }

    #[test]
    fn stored_settings_are_checked() {
        let bad = StageSettings {
            model: " ".into(),
            steps: 0,
            guidance: f64::NAN,
            noise_level: 5000,
        };
        let s = StageSettings::restored(2, Some(&bad));
        assert_eq!(s, {
            let mut d = StageSettings::defaults(2);
            d.noise_level = 350;
            d
        });
    }
}
