//! The queue slice: the jobs sent to the engine, their progress, rates and live previews, and
//! the reducer that turns the engine's job events into what the rest of the app must do (a
//! finished job's images, a cancel, a failure).

use std::time::Instant;

use eframe::egui;
use engine::pipelines::{GenerationRequest, PromptEmbeds, StepProgress};
use engine::tensor_io::HostTensor;
use engine::worker::{EngineEvent, JobId};

use crate::image_files::to_u8;
use crate::png_meta::ControlNetParameters;

/// Where a queued job is.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    Queued,
    /// Started; the last progress report once one arrived.
    Running(Option<StepProgress>),
}

/// A live preview of a running job (latent resolution, decoded cheaply by the engine).
pub struct Preview {
    pub step: usize,
    pub image: egui::ColorImage,
    texture: Option<egui::TextureHandle>,
    dirty: bool,
}

impl Preview {
    /// The preview as a texture (re-uploaded after each new preview).
    pub fn texture(&mut self, ctx: &egui::Context) -> egui::TextureHandle {
        let options = egui::TextureOptions::NEAREST;
        match &mut self.texture {
            Some(t) if !self.dirty => t.clone(),
            Some(t) => {
                t.set(self.image.clone(), options);
                self.dirty = false;
                t.clone()
            }
            None => {
                let t = ctx.load_texture("live-preview", self.image.clone(), options);
                self.texture = Some(t.clone());
                self.dirty = false;
                t
            }
        }
    }
}

/// A job in the queue.
pub struct Job {
    pub id: JobId,
    pub request: GenerationRequest,
    /// The ControlNet unit its images' parameters record (controlnet jobs).
    pub controlnet: Option<ControlNetParameters>,
    pub state: JobState,
    /// Exponentially smoothed UNet evaluations per second.
    pub smoothed_it_per_sec: f64,
    /// The latest live preview while running.
    pub preview: Option<Preview>,
    /// The model it runs on when not the main one (an IF stage, the x4 upscaler).
    pub model: Option<String>,
    /// The IF page's stage it runs, if any.
    pub cascade_stage: Option<usize>,
    /// When it last started or reported a step (for the "compiling kernels" note).
    pub last_event: Option<Instant>,
}

/// How long a running job may go without a step before the queue says why (GPU backends).
pub const QUIET_STEP_NOTE_SECS: f64 = 5.0;

impl Job {
    /// A job just sent to the engine.
    pub fn queued(
        id: JobId,
        request: GenerationRequest,
        controlnet: Option<ControlNetParameters>,
        model: Option<String>,
        cascade_stage: Option<usize>,
    ) -> Self {
        Self {
            id,
            request,
            controlnet,
            state: JobState::Queued,
            smoothed_it_per_sec: 0.0,
            preview: None,
            model,
            cascade_stage,
            last_event: None,
        }
    }

    /// What to say while a job on a GPU backend has made no step for a while: CubeCL compiles
    /// (and autotunes) every kernel the first time a size and setting run, single-threaded, which
    /// can take minutes; they are kept on disk, so later runs start at once.
    pub fn quiet_note(&self, gpu: bool, now: Instant) -> Option<String> {
        let since = now.duration_since(self.last_event?).as_secs_f64();
        if !gpu || !matches!(self.state, JobState::Running(_)) || since < QUIET_STEP_NOTE_SECS {
            return None;
        }
        let kept = engine::backend::kernel_cache_dir()
            .map_or_else(String::new, |d| format!(" in {}", d.display()));
        Some(format!(
            "no step for {since:.0}s: compiling GPU kernels for this size and these settings \
             (first run only; they are kept{kept})"
        ))
    }

    /// Seconds left at the smoothed rate.
    pub fn eta_secs(&self) -> Option<f64> {
        match &self.state {
            JobState::Running(Some(p)) if self.smoothed_it_per_sec > 0.0 => {
                Some(p.total.saturating_sub(p.step) as f64 / self.smoothed_it_per_sec)
            }
            _ => None,
        }
    }

    /// The denoising loop's own rate (model loading and text encoding excluded) when it was
    /// reported, else the steps over the whole run.
    pub fn loop_rate(&self, elapsed_secs: f64) -> f64 {
        match &self.state {
            JobState::Running(Some(p)) => p.it_per_sec,
            _ => self.request.steps as f64 / elapsed_secs.max(1e-9),
        }
    }
}

/// A job the engine finished, with what it made.
pub struct FinishedJob {
    pub job: Job,
    pub images: HostTensor,
    /// IF's images as its next stage takes them.
    pub raw: Option<HostTensor>,
    /// IF's T5 embeddings of the prompt, for the next stage.
    pub prompt_embeds: Option<PromptEmbeds>,
    pub scheduler: &'static str,
    pub elapsed_secs: f64,
    pub notes: Vec<String>,
}

/// What an engine event meant to the queue.
#[must_use]
pub enum QueueEvent {
    /// Not the queue's: the event, handed back for the rest of the app.
    NotMine(Box<EngineEvent>),
    /// Taken in (a start, a step, a preview, or news of a job this window no longer tracks).
    Quiet,
    /// A job finished: it has left the queue; its images go to the gallery (and the IF page).
    Finished(Box<FinishedJob>),
    /// A job was cancelled and has left the queue.
    Cancelled(JobId),
    /// A job failed and has left the queue.
    Failed { job: JobId, error: String },
}

/// The jobs sent to the engine and not yet finished, oldest first.
#[derive(Default)]
pub struct Queue {
    jobs: Vec<Job>,
}

impl std::ops::Deref for Queue {
    type Target = [Job];
    fn deref(&self) -> &[Job] {
        &self.jobs
    }
}

impl Queue {
    /// Tracks a job just sent to the engine.
    pub fn push(&mut self, job: Job) {
        self.jobs.push(job);
    }

    fn job_mut(&mut self, id: JobId) -> Option<&mut Job> {
        self.jobs.iter_mut().find(|j| j.id == id)
    }

    /// Whether a job runs on its own model `spec` (an IF stage, the x4 upscaler).
    pub fn runs_on(&self, spec: &str) -> bool {
        self.jobs.iter().any(|j| j.model.as_deref() == Some(spec))
    }

    /// Whether the next job waits for its own model to load (downloads are then that model's).
    pub fn next_waits_for_its_model(&self) -> bool {
        self.jobs
            .first()
            .is_some_and(|j| j.model.is_some() && j.state == JobState::Queued)
    }

    /// Job `id`'s live preview, if it has one.
    pub fn preview_of(&mut self, id: JobId) -> Option<&mut Preview> {
        self.job_mut(id).and_then(|j| j.preview.as_mut())
    }

    /// The running job's live preview, if any.
    pub fn running_preview(&mut self) -> Option<&mut Preview> {
        self.jobs
            .iter_mut()
            .find(|j| matches!(j.state, JobState::Running(_)))
            .and_then(|j| j.preview.as_mut())
    }

    /// The queue's reducer: starts, steps and previews update the job; a finish, cancel or
    /// failure removes it and says so; anything else is handed back.
    pub fn apply_event(&mut self, event: EngineEvent) -> QueueEvent {
        match event {
            EngineEvent::JobStarted { job } => {
                if let Some(j) = self.job_mut(job) {
                    j.state = JobState::Running(None);
                    j.last_event = Some(Instant::now());
                }
                QueueEvent::Quiet
            }
            EngineEvent::Progress { job, progress } => {
                if let Some(j) = self.job_mut(job) {
                    // Smooth the per-step rate so the readout does not jitter.
                    let rate = progress.it_per_sec;
                    j.smoothed_it_per_sec = if j.smoothed_it_per_sec == 0.0 {
                        rate
                    } else {
                        0.7 * j.smoothed_it_per_sec + 0.3 * rate
                    };
                    j.state = JobState::Running(Some(progress));
                    j.last_event = Some(Instant::now());
                }
                QueueEvent::Quiet
            }
            EngineEvent::Preview { job, step, image } => {
                if let Some(j) = self.job_mut(job) {
                    let (h, w) = (image.shape[0], image.shape[1]);
                    let image = egui::ColorImage::from_rgb([w, h], &to_u8(&image.values));
                    match &mut j.preview {
                        Some(p) => {
                            p.step = step;
                            p.image = image;
                            p.dirty = true;
                        }
                        None => {
                            j.preview = Some(Preview {
                                step,
                                image,
                                texture: None,
                                dirty: true,
                            });
                        }
                    }
                }
                QueueEvent::Quiet
            }
            EngineEvent::Finished {
                job,
                images,
                raw,
                prompt_embeds,
                scheduler,
                elapsed_secs,
                notes,
            } => match self.jobs.iter().position(|j| j.id == job) {
                Some(index) => QueueEvent::Finished(Box::new(FinishedJob {
                    job: self.jobs.remove(index),
                    images,
                    raw,
                    prompt_embeds,
                    scheduler,
                    elapsed_secs,
                    notes,
                })),
                None => QueueEvent::Quiet,
            },
            EngineEvent::Cancelled { job } => {
                self.jobs.retain(|j| j.id != job);
                QueueEvent::Cancelled(job)
            }
            EngineEvent::Failed {
                job: Some(job),
                error,
            } => {
                self.jobs.retain(|j| j.id != job);
                QueueEvent::Failed { job, error }
            }
            other => QueueEvent::NotMine(Box::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(step: usize, it_per_sec: f64) -> StepProgress {
        StepProgress {
            step,
            total: 10,
            elapsed_secs: 1.0,
            it_per_sec,
            timestep: 500.0,
        }
    }

    fn job(state: JobState, quiet_secs: u64) -> (Job, Instant) {
        let started = Instant::now();
        let job = Job {
            state,
            last_event: Some(started),
            ..Job::queued(1, GenerationRequest::default(), None, None, None)
        };
        (job, started + std::time::Duration::from_secs(quiet_secs))
    }

    #[test]
    fn a_quiet_gpu_job_says_it_is_compiling_kernels() {
        let (running, later) = job(JobState::Running(None), 12);
        let note = running.quiet_note(true, later).expect("a note after 12 s");
        assert!(
            note.starts_with("no step for 12s: compiling GPU kernels"),
            "{note}"
        );
        // Not on the CPU backend (nothing is compiled there), not before the threshold, not
        // for a queued job.
        assert_eq!(running.quiet_note(false, later), None);
        let (soon, at) = job(JobState::Running(None), 2);
        assert_eq!(soon.quiet_note(true, at), None);
        let (queued, later) = job(JobState::Queued, 60);
        assert_eq!(queued.quiet_note(true, later), None);
    }

    #[test]
    fn the_queue_tracks_its_jobs_and_hands_back_the_rest() {
        let mut q = Queue::default();
        q.push(Job::queued(
            1,
            GenerationRequest::default(),
            None,
            None,
            None,
        ));
        q.push(Job::queued(
            2,
            GenerationRequest::default(),
            None,
            None,
            None,
        ));
        assert!(matches!(
            q.apply_event(EngineEvent::JobStarted { job: 1 }),
            QueueEvent::Quiet
        ));
        assert_eq!(q[0].state, JobState::Running(None));
        let _ = q.apply_event(EngineEvent::Progress {
            job: 1,
            progress: progress(1, 2.0),
        });
        let _ = q.apply_event(EngineEvent::Progress {
            job: 1,
            progress: progress(2, 4.0),
        });
        assert!(
            (q[0].smoothed_it_per_sec - 2.6).abs() < 1e-9,
            "0.7·2 + 0.3·4"
        );
        let eta = q[0].eta_secs().expect("an ETA while running");
        assert!(
            (eta - 8.0 / 2.6).abs() < 1e-9,
            "8 steps left at 2.6 it/s: {eta}"
        );
        match q.apply_event(EngineEvent::Finished {
            job: 1,
            images: HostTensor {
                shape: vec![1, 1, 1, 3],
                values: vec![0.0; 3],
            },
            raw: None,
            prompt_embeds: None,
            scheduler: "Euler",
            elapsed_secs: 1.0,
            notes: vec![],
        }) {
            QueueEvent::Finished(done) => {
                assert_eq!(done.job.id, 1);
                assert_eq!(done.job.loop_rate(1.0), 4.0, "the loop's own rate");
            }
            _ => panic!("job 1 finished"),
        }
        assert_eq!(q.len(), 1);
        assert!(matches!(
            q.apply_event(EngineEvent::Cancelled { job: 2 }),
            QueueEvent::Cancelled(2)
        ));
        assert!(q.is_empty());
        assert!(matches!(
            q.apply_event(EngineEvent::Failed {
                job: None,
                error: "no model".into()
            }),
            QueueEvent::NotMine(_)
        ));
    }
}
