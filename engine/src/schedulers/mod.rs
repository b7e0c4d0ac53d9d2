//! Noise schedulers, one per file as in diffusers' `schedulers/`, behind one trait.
//!
//! Every scheduler is built from a diffusers `scheduler_config.json`; keys a scheduler does not
//! know are warned about, never fatal, and missing keys take that scheduler's diffusers default.
//! [`from_config_json`] picks the class from `_class_name` or an override, like diffusers'
//! `SchedulerClass.from_config(pipe.scheduler.config)`.

pub mod common;
pub mod ddim;
pub mod ddpm;
pub mod dpmsolver_multistep;
pub mod euler_ancestral_discrete;
pub mod euler_discrete;
pub mod pndm;

use std::path::Path;
use std::str::FromStr;

use burn::tensor::{Tensor, backend::Backend};
use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::noise::NoiseSource;

pub use ddim::{DDIMScheduler, DDIMSchedulerConfig};
pub use ddpm::{DDPMScheduler, DDPMSchedulerConfig, VarianceType};
pub use dpmsolver_multistep::{DPMSolverMultistepScheduler, DPMSolverMultistepSchedulerConfig};
pub use euler_ancestral_discrete::{
    EulerAncestralDiscreteScheduler, EulerAncestralDiscreteSchedulerConfig,
};
pub use euler_discrete::{EulerDiscreteScheduler, EulerDiscreteSchedulerConfig};
pub use pndm::{PNDMScheduler, PNDMSchedulerConfig};

/// The interface every pipeline drives. Steps are addressed by index into [`Scheduler::timesteps`]
/// (diffusers' `step_index`), which also covers img2img's "start at step k".
pub trait Scheduler<B: Backend>: Send {
    /// Diffusers' `set_timesteps(num_inference_steps)`: computes the timesteps (and sigmas) and
    /// resets any multistep state.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// The timesteps the model is evaluated at, in order (diffusers' `scheduler.timesteps`).
    fn timesteps(&self) -> &[f64];

    /// The standard deviation of the initial noise (diffusers' `init_noise_sigma`; 1 for the
    /// schedulers that work on the unscaled variance-preserving sample).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Scales the denoising model input at step `step_index` (identity for most schedulers).
    ///
    /// # Shapes
    /// - sample: `[batch, channels, height, width]`
    fn scale_model_input(&self, sample: Tensor<B, 4>, step_index: usize) -> Tensor<B, 4> {
        let _ = step_index;
        sample
    }

    /// One reverse-diffusion step: the sample at `timesteps()[step_index]` and the model's
    /// output there give the previous (less noisy) sample. Stochastic schedulers draw from `noise`.
    fn step(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor<B, 4>>;

    /// Forward diffusion: `original` noised to the level of `timesteps()[step_index]`.
    fn add_noise(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        step_index: usize,
    ) -> Tensor<B, 4>;

    /// Diffusers' `scheduler.order` (how many model calls one "step" of the user's count uses).
    fn order(&self) -> usize {
        1
    }

    /// Sets DDIM's `eta` (the pipeline's `eta` argument, which diffusers passes only to
    /// schedulers whose `step` takes it); other schedulers ignore it.
    fn set_eta(&mut self, _eta: f64) {}

    /// A short name for logs and PNG metadata (A1111 sampler names where one exists).
    fn name(&self) -> &'static str;

    /// Whether `step` takes a model output with twice the sample's channels (noise and a
    /// learned variance, IF's UNets); other schedulers are given the noise half only.
    fn learned_variance(&self) -> bool {
        false
    }
}

/// The schedulers Brushfire ports, by their CLI names (`--scheduler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `pndm`: [`PNDMScheduler`].
    Pndm,
    /// `ddim`: [`DDIMScheduler`].
    Ddim,
    /// `euler`: [`EulerDiscreteScheduler`].
    Euler,
    /// `euler-a`: [`EulerAncestralDiscreteScheduler`].
    EulerAncestral,
    /// `dpm++2m`: [`DPMSolverMultistepScheduler`].
    DpmPlusPlus2M,
    /// `ddpm`: [`DDPMScheduler`].
    Ddpm,
}

impl SchedulerKind {
    /// Every kind, in CLI order.
    pub const ALL: [SchedulerKind; 6] = [
        Self::Pndm,
        Self::Ddim,
        Self::Euler,
        Self::EulerAncestral,
        Self::DpmPlusPlus2M,
        Self::Ddpm,
    ];

    /// The CLI name.
    pub fn cli_name(self) -> &'static str {
        match self {
            Self::Pndm => "pndm",
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::DpmPlusPlus2M => "dpm++2m",
            Self::Ddpm => "ddpm",
        }
    }

    /// The diffusers class name (`_class_name` in a scheduler config).
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Pndm => "PNDMScheduler",
            Self::Ddim => "DDIMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::DpmPlusPlus2M => "DPMSolverMultistepScheduler",
            Self::Ddpm => "DDPMScheduler",
        }
    }

    /// The kind for a diffusers class name, if ported.
    pub fn from_class_name(class: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.class_name() == class)
    }

    /// The sampler's name as A1111 writes it in a PNG's `Sampler:` field, and as the app lists
    /// it. (A run's own name, [`Scheduler::name`], adds what its config changes: `Karras`, PLMS
    /// for PNDM without its Runge-Kutta warm-up.)
    pub fn sampler_name(self) -> &'static str {
        match self {
            Self::Pndm => "PNDM",
            Self::Ddim => "DDIM",
            Self::Euler => "Euler",
            Self::EulerAncestral => "Euler a",
            Self::DpmPlusPlus2M => "DPM++ 2M",
            Self::Ddpm => "DDPM",
        }
    }

    /// The kind for an A1111 sampler name (or one [`Scheduler::name`] wrote), ignoring the
    /// `Karras` sigma choice; `None` for a sampler Brushfire does not run.
    pub fn from_sampler_name(name: &str) -> Option<Self> {
        match name.trim().trim_end_matches(" Karras") {
            "PLMS" => Some(Self::Pndm),
            base => Self::ALL.into_iter().find(|k| k.sampler_name() == base),
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.cli_name())
    }
}

impl FromStr for SchedulerKind {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.cli_name().eq_ignore_ascii_case(s) || k.class_name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.cli_name()).collect();
                EngineError::invalid(
                    "scheduler",
                    format!(
                        "unknown scheduler `{s}`; expected one of {}",
                        names.join(", ")
                    ),
                )
            })
    }
}

/// Which scheduler a config builds: `class_override` if given, else its `_class_name`.
pub fn resolve_kind(json: &Value, class_override: Option<SchedulerKind>) -> Result<SchedulerKind> {
    if let Some(kind) = class_override {
        return Ok(kind);
    }
    match json.get("_class_name").and_then(Value::as_str) {
        Some(class) => SchedulerKind::from_class_name(class).ok_or_else(|| {
            EngineError::Unsupported(format!(
                "scheduler class `{class}` (ported: {})",
                SchedulerKind::ALL.map(|k| k.class_name()).join(", ")
            ))
        }),
        None => Err(common::config_error(
            "scheduler config has no `_class_name`; choose a scheduler explicitly",
        )),
    }
}

/// Builds a scheduler from a diffusers scheduler config (diffusers' `Cls.from_config(config)`):
/// `_class_name` picks the class unless `class_override` is given; keys of other diffusers
/// schedulers are ignored, unknown keys are warned about. Call `set_timesteps` before use.
pub fn from_config_json<B: Backend>(
    json: &Value,
    class_override: Option<SchedulerKind>,
) -> Result<Box<dyn Scheduler<B>>> {
    let kind = resolve_kind(json, class_override)?;
    let class = kind.class_name();
    Ok(match kind {
        SchedulerKind::Pndm => {
            Box::new(PNDMScheduler::<B>::new(common::parse_config(json, class)?)?)
        }
        SchedulerKind::Ddim => Box::new(DDIMScheduler::new(common::parse_config(json, class)?)?),
        SchedulerKind::Euler => Box::new(EulerDiscreteScheduler::new(common::parse_config(
            json, class,
        )?)?),
        SchedulerKind::EulerAncestral => Box::new(EulerAncestralDiscreteScheduler::new(
            common::parse_config(json, class)?,
        )?),
        SchedulerKind::DpmPlusPlus2M => Box::new(DPMSolverMultistepScheduler::<B>::new(
            common::parse_config(json, class)?,
        )?),
        SchedulerKind::Ddpm => Box::new(DDPMScheduler::new(common::parse_config(json, class)?)?),
    })
}

/// The upscalers' image-noising scheduler (IF stage II's `image_noising_scheduler`, the x4
/// upscaler's `low_res_scheduler`): a `DDPMScheduler` config whatever its `_class_name`, used
/// only for its `add_noise` at the noise level.
pub fn noising_scheduler(json: &Value) -> Result<DDPMScheduler> {
    DDPMScheduler::new(common::parse_config(json, "DDPMScheduler")?)
}

/// Reads a `scheduler_config.json` (Python's `-Infinity`/`Infinity`/`NaN`, which diffusers
/// writes for e.g. `lambda_min_clipped`, read as `null`, i.e. the default) and builds it with
/// [`from_config_json`].
pub fn from_config_file<B: Backend>(
    path: impl AsRef<Path>,
    class_override: Option<SchedulerKind>,
) -> Result<Box<dyn Scheduler<B>>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    let json: Value =
        serde_json::from_str(&python_json_to_strict(&text)).map_err(|e| EngineError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    from_config_json(&json, class_override).map_err(|e| match e {
        EngineError::Config { message, .. } => EngineError::Config {
            path: path.to_path_buf(),
            message,
        },
        other => other,
    })
}

/// Keys in a scheduler config that no diffusers scheduler uses (what [`from_config_json`]
/// warns about), for the class it would build.
pub fn unknown_config_keys(
    json: &Value,
    class_override: Option<SchedulerKind>,
) -> Result<Vec<String>> {
    Ok(match resolve_kind(json, class_override)? {
        SchedulerKind::Pndm => common::unknown_keys::<PNDMSchedulerConfig>(json),
        SchedulerKind::Ddim => common::unknown_keys::<DDIMSchedulerConfig>(json),
        SchedulerKind::Euler => common::unknown_keys::<EulerDiscreteSchedulerConfig>(json),
        SchedulerKind::EulerAncestral => {
            common::unknown_keys::<EulerAncestralDiscreteSchedulerConfig>(json)
        }
        SchedulerKind::DpmPlusPlus2M => {
            common::unknown_keys::<DPMSolverMultistepSchedulerConfig>(json)
        }
        SchedulerKind::Ddpm => common::unknown_keys::<DDPMSchedulerConfig>(json),
    })
}

/// Replaces the bare `NaN`, `Infinity` and `-Infinity` of Python's `json.dumps` (outside
/// strings) with `null`.
fn python_json_to_strict(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        if let Some(token) = token {
            out.push_str("null");
            rest = &rest[token.len()..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_non_finite_numbers_become_null() {
        let text = r#"{"a": -Infinity, "b": "NaN in a string", "c": [NaN, Infinity]}"#;
        assert_eq!(
            python_json_to_strict(text),
            r#"{"a": null, "b": "NaN in a string", "c": [null, null]}"#
        );
    }

    #[test]
    fn cli_names_round_trip() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.cli_name().parse::<SchedulerKind>().ok(), Some(kind));
        }
        assert!("heun".parse::<SchedulerKind>().is_err());
    }

    #[test]
    fn sampler_names_round_trip_with_a1111_spellings() {
        for kind in SchedulerKind::ALL {
            assert_eq!(
                SchedulerKind::from_sampler_name(kind.sampler_name()),
                Some(kind)
            );
        }
        for (a1111, kind) in [
            ("PLMS", SchedulerKind::Pndm),
            ("Euler a", SchedulerKind::EulerAncestral),
            ("DPM++ 2M Karras", SchedulerKind::DpmPlusPlus2M),
            (" Euler Karras ", SchedulerKind::Euler),
        ] {
            assert_eq!(
                SchedulerKind::from_sampler_name(a1111),
                Some(kind),
                "{a1111}"
            );
        }
        assert_eq!(SchedulerKind::from_sampler_name("Heun"), None);
        assert_eq!(SchedulerKind::from_sampler_name("DPM++ 2M SDE"), None);
    }
}
