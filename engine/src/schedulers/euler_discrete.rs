//! Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, algorithm 2
//! without churn): k-diffusion's and A1111's "Euler".
//!
//! Mirrors diffusers `src/diffusers/schedulers/scheduling_euler_discrete.py`
//! (`EulerDiscreteScheduler`). The `s_churn` options of diffusers' `step` are left at their
//! defaults (no churn), as every diffusers pipeline leaves them.

use burn::tensor::{Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

use super::Scheduler;
use super::common::{
    BetaConfig, BetaSchedule, PredictionType, TimestepSpacing, config_error, euler_step,
    float_timesteps, karras_sigmas, np_interp_index, np_linspace, scale_by_sigma, sigma_at,
    sigma_init_noise, sigma_pred_original, sigma_to_t, timestep_at, training_sigma_schedule,
};
use crate::error::{EngineError, Result};
use crate::noise::NoiseSource;

/// `interpolation_type`: how sigmas are read off the training schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterpolationType {
    /// Linear in the timestep.
    Linear,
    /// Evenly spaced in log-sigma between the extreme training sigmas.
    LogLinear,
}

/// `timestep_type`: what the model is given as its timestep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepType {
    /// The (fractional) training timestep.
    Discrete,
    /// `0.25·ln σ` (EDM-style v-prediction models).
    Continuous,
}

/// `final_sigmas_type`: the sigma after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    /// Denoise fully.
    Zero,
    /// Stop at the smallest training sigma.
    SigmaMin,
}

/// `EulerDiscreteScheduler`'s config (its `__init__` arguments and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EulerDiscreteSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub interpolation_type: InterpolationType,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_spacing: TimestepSpacing,
    pub timestep_type: TimestepType,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
    pub final_sigmas_type: FinalSigmasType,
}

impl Default for EulerDiscreteSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            interpolation_type: InterpolationType::Linear,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            timestep_spacing: TimestepSpacing::Linspace,
            timestep_type: TimestepType::Discrete,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            final_sigmas_type: FinalSigmasType::Zero,
        }
    }
}

/// Diffusers' `EulerDiscreteScheduler`.
pub struct EulerDiscreteScheduler {
    config: EulerDiscreteSchedulerConfig,
    /// Training sigmas `√((1−ᾱ)/ᾱ)`, ascending in t, as diffusers' f32 values.
    train_sigmas: Vec<f32>,
    /// One more than `timesteps`: the last is the final sigma.
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
}

impl EulerDiscreteScheduler {
    /// Builds the scheduler; call [`Scheduler::set_timesteps`] before stepping.
    pub fn new(config: EulerDiscreteSchedulerConfig) -> Result<Self> {
        if config.prediction_type == PredictionType::FlowPrediction {
            return Err(config_error(
                "EulerDiscreteScheduler: prediction_type must be `epsilon`, `sample` or `v_prediction`",
            ));
        }
        let selected = [
            config.use_karras_sigmas,
            config.use_exponential_sigmas,
            config.use_beta_sigmas,
        ]
        .iter()
        .filter(|&&b| b)
        .count();
        if selected > 1 {
            return Err(config_error(
                "EulerDiscreteScheduler: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set",
            ));
        }
        if config.use_beta_sigmas {
            return Err(EngineError::Unsupported(
                "EulerDiscreteScheduler with use_beta_sigmas (needs scipy's beta ppf)".into(),
            ));
        }
        let (train_sigmas, sigmas, timesteps) = training_sigma_schedule(&BetaConfig {
            num_train_timesteps: config.num_train_timesteps,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            beta_schedule: config.beta_schedule,
            trained_betas: config.trained_betas.as_deref(),
            rescale_betas_zero_snr: config.rescale_betas_zero_snr,
        })?;
        Ok(Self {
            config,
            train_sigmas,
            sigmas,
            timesteps,
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &EulerDiscreteSchedulerConfig {
        &self.config
    }

    /// The sigmas, one per timestep plus the final one.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn sigma(&self, index: usize) -> f64 {
        sigma_at(&self.sigmas, index)
    }
}

impl<B: Backend> Scheduler<B> for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.config;
        let mut timesteps: Vec<f64> = float_timesteps(
            c.timestep_spacing,
            c.num_train_timesteps,
            num_inference_steps,
            c.steps_offset,
        )?
        .into_iter()
        .map(f64::from)
        .collect();
        let train = &self.train_sigmas;
        let mut sigmas: Vec<f64> = match c.interpolation_type {
            InterpolationType::Linear => timesteps
                .iter()
                .map(|&t| np_interp_index(t, train))
                .collect(),
            InterpolationType::LogLinear => {
                let (lo, hi) = match (train.last(), train.first()) {
                    (Some(&lo), Some(&hi)) => (f64::from(lo), f64::from(hi)),
                    _ => return Err(config_error("EulerDiscreteScheduler: empty noise schedule")),
                };
                // torch.linspace(log σ_last, log σ_first, steps + 1).exp(), in f32.
                np_linspace(lo.ln(), hi.ln(), num_inference_steps + 1)
                    .into_iter()
                    .map(|l| f64::from((l as f32).exp()))
                    .collect()
            }
        };
        let log_sigmas: Vec<f64> = train.iter().map(|&s| f64::from(s.ln())).collect();
        let sigma_range = |sigmas: &[f64]| {
            let min = c
                .sigma_min
                .unwrap_or_else(|| sigmas.last().copied().unwrap_or(0.0));
            let max = c
                .sigma_max
                .unwrap_or_else(|| sigmas.first().copied().unwrap_or(0.0));
            (min, max)
        };
        if c.use_karras_sigmas {
            let (min, max) = sigma_range(&sigmas);
            sigmas = karras_sigmas(min, max, num_inference_steps);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        } else if c.use_exponential_sigmas {
            let (min, max) = sigma_range(&sigmas);
            sigmas = np_linspace(max.ln(), min.ln(), num_inference_steps)
                .into_iter()
                .map(f64::exp)
                .collect();
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        }
        let last = match c.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train.first().map_or(0.0, |&s| f64::from(s)),
        };
        sigmas.push(last);
        // Stored as f32, as diffusers does.
        self.sigmas = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();
        self.timesteps = if c.timestep_type == TimestepType::Continuous
            && c.prediction_type == PredictionType::VPrediction
        {
            self.sigmas[..self.sigmas.len() - 1]
                .iter()
                .map(|&s| f64::from(0.25 * (s as f32).ln()))
                .collect()
        } else {
            timesteps.into_iter().map(|t| f64::from(t as f32)).collect()
        };
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        sigma_init_noise(&self.sigmas, self.config.timestep_spacing)
    }

    fn scale_model_input(&self, sample: Tensor<B, 4>, step_index: usize) -> Tensor<B, 4> {
        scale_by_sigma(sample, self.sigma(step_index))
    }

    fn step(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor<B, 4>> {
        timestep_at(&self.timesteps, step_index)?;
        let sigma = self.sigma(step_index);
        let sigma_next = self.sigma(step_index + 1);
        // No churn: sigma_hat = sigma.
        let pred_original =
            sigma_pred_original(self.config.prediction_type, model_output, &sample, sigma);
        Ok(euler_step(sample, pred_original, sigma, sigma_next))
    }

    fn add_noise(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        step_index: usize,
    ) -> Tensor<B, 4> {
        original.add(noise.mul_scalar(self.sigma(step_index)))
    }

    fn name(&self) -> &'static str {
        if self.config.use_karras_sigmas {
            "Euler Karras"
        } else {
            "Euler"
        }
    }
}
