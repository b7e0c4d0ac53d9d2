//! Ancestral sampling with Euler steps (k-diffusion's `sample_euler_ancestral`, A1111's
//! "Euler a"): each step goes down to σ_down deterministically, then adds fresh noise of
//! standard deviation σ_up. It draws noise at every step, the last one included.
//!
//! Mirrors diffusers `src/diffusers/schedulers/scheduling_euler_ancestral_discrete.py`
//! (`EulerAncestralDiscreteScheduler`).

use burn::tensor::{Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

use super::Scheduler;
use super::common::{
    BetaConfig, BetaSchedule, PredictionType, TimestepSpacing, config_error, euler_step,
    float_timesteps, np_interp_index, randn_like, scale_by_sigma, sigma_at, sigma_init_noise,
    sigma_pred_original, timestep_at, training_sigma_schedule,
};
use crate::error::{EngineError, Result};
use crate::noise::NoiseSource;

/// `EulerAncestralDiscreteScheduler`'s config (its `__init__` arguments and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EulerAncestralDiscreteSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
}

impl Default for EulerAncestralDiscreteSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// Diffusers' `EulerAncestralDiscreteScheduler`.
pub struct EulerAncestralDiscreteScheduler {
    config: EulerAncestralDiscreteSchedulerConfig,
    train_sigmas: Vec<f32>,
    /// One more than `timesteps`: the last is 0.
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
}

impl EulerAncestralDiscreteScheduler {
    /// Builds the scheduler; call [`Scheduler::set_timesteps`] before stepping.
    pub fn new(config: EulerAncestralDiscreteSchedulerConfig) -> Result<Self> {
        match config.prediction_type {
            PredictionType::Epsilon | PredictionType::VPrediction => {}
            PredictionType::Sample => {
                // Diffusers raises NotImplementedError for it too.
                return Err(EngineError::Unsupported(
                    "EulerAncestralDiscreteScheduler with prediction_type `sample`".into(),
                ));
            }
            PredictionType::FlowPrediction => {
                return Err(config_error(
                    "EulerAncestralDiscreteScheduler: prediction_type must be `epsilon` or `v_prediction`",
                ));
            }
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
    pub fn config(&self) -> &EulerAncestralDiscreteSchedulerConfig {
        &self.config
    }

    /// The sigmas, one per timestep plus the final 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn sigma(&self, index: usize) -> f64 {
        sigma_at(&self.sigmas, index)
    }
}

impl<B: Backend> Scheduler<B> for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.config;
        let timesteps = float_timesteps(
            c.timestep_spacing,
            c.num_train_timesteps,
            num_inference_steps,
            c.steps_offset,
        )?;
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| f64::from(np_interp_index(f64::from(t), &self.train_sigmas) as f32))
            .collect();
        sigmas.push(0.0);
        self.sigmas = sigmas;
        self.timesteps = timesteps.into_iter().map(f64::from).collect();
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
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor<B, 4>> {
        timestep_at(&self.timesteps, step_index)?;
        let sigma = self.sigma(step_index);
        let sigma_to = self.sigma(step_index + 1);
        let pred_original = sigma_pred_original(
            self.config.prediction_type,
            model_output.clone(),
            &sample,
            sigma,
        );
        let sigma_up =
            (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();
        let prev = euler_step(sample, pred_original, sigma, sigma_down);
        let fresh = randn_like(noise, &model_output)?;
        Ok(prev.add(fresh.mul_scalar(sigma_up)))
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
        "Euler a"
    }
}
