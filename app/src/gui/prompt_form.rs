//! The prompt panel's slice: its fields (saved with the session as they are), the request part
//! every page shares, and what a PNG's parameters put back into it.

use engine::pipelines::CommonRequest;
use engine::schedulers::SchedulerKind;
use serde::{Deserialize, Serialize};

use crate::png_meta::ParsedParameters;

/// The prompt panel's fields, saved with the session as they are: a field added here is saved
/// and restored with no other edit (`#[serde(default)]`: a session without it takes the
/// default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptForm {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f64,
    pub width: usize,
    pub height: usize,
    pub batch: usize,
    pub seed: u64,
    /// Keep the seed between generations (else a new random one each time).
    pub seed_locked: bool,
    /// Stored by its `--scheduler` name; a name this build does not know is the model's own.
    #[serde(with = "scheduler_name")]
    pub scheduler: Option<SchedulerKind>,
}

/// [`PromptForm::scheduler`] as its CLI name.
mod scheduler_name {
    use engine::schedulers::SchedulerKind;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(kind: &Option<SchedulerKind>, s: S) -> Result<S::Ok, S::Error> {
        kind.map(SchedulerKind::cli_name).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SchedulerKind>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.and_then(|name| name.parse().ok()))
    }
}

impl PromptForm {
    /// What every request from the prompt panel shares, at the form's size.
    pub fn common(&self, vae_tiling: bool) -> CommonRequest {
        CommonRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            guidance_scale: self.guidance,
            width: self.width,
            height: self.height,
            batch: self.batch,
            seed: self.seed,
            scheduler: self.scheduler,
            vae_tiling,
            ..Default::default()
        }
    }
}

impl Default for PromptForm {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 25,
            guidance: 7.5,
            width: 512,
            height: 512,
            batch: 1,
            seed: engine::noise::random_seed(),
            seed_locked: false,
            scheduler: None,
        }
    }
}

impl PromptForm {
    /// What a stored form may not hold (a hand edit, an older build): fixed to the nearest
    /// value the panel allows.
    pub fn sanitize(&mut self) {
        self.steps = self.steps.max(1);
        self.batch = self.batch.max(1);
    }

    /// A new random seed.
    pub fn randomise_seed(&mut self) {
        self.seed = engine::noise::random_seed();
    }

    /// Fills the fields a `parameters` text gives; returns notes on what could not be used.
    pub fn apply_parameters(&mut self, p: &ParsedParameters) -> Vec<String> {
        let mut notes = Vec::new();
        self.prompt.clone_from(&p.prompt);
        self.negative_prompt.clone_from(&p.negative_prompt);
        if let Some(steps) = p.steps {
            self.steps = steps;
        }
        if let Some(cfg) = p.cfg_scale {
            self.guidance = cfg;
        }
        if let Some(seed) = p.seed {
            self.seed = seed;
            // The restored seed is the point: keep it for the next generation.
            self.seed_locked = true;
        }
        if let Some((w, h)) = p.size {
            self.width = w;
            self.height = h;
        }
        if let Some(sampler) = &p.sampler {
            match SchedulerKind::from_sampler_name(sampler) {
                Some(kind) => self.scheduler = Some(kind),
                None => notes.push(format!("sampler `{sampler}` is not available here")),
            }
        }
        notes
    }
}
