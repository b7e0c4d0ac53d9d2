//! Denoising diffusion implicit models (Song et al. 2021): deterministic for `eta = 0`, with
//! `eta > 0` adding fresh noise each step (`eta = 1` is DDPM-like).
//!
//! Mirrors diffusers `src/diffusers/schedulers/scheduling_ddim.py` (`DDIMScheduler`).

use burn::tensor::{Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

use super::Scheduler;
use super::common::{
    BetaConfig, BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing, config_error,
    randn_like, spaced_timesteps, threshold_sample, timestep_at,
};
use crate::error::Result;
use crate::noise::NoiseSource;

/// `DDIMScheduler`'s config (its `__init__` arguments and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DDIMSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub clip_sample_range: f64,
    pub sample_max_value: f64,
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DDIMSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

/// Diffusers' `DDIMScheduler`. `eta` is an argument of diffusers' `step` (the pipeline's `eta`,
/// default 0); here it is set once with [`Scheduler::set_eta`].
pub struct DDIMScheduler {
    config: DDIMSchedulerConfig,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f64,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
    eta: f64,
}

impl DDIMScheduler {
    /// Builds the scheduler; call [`Scheduler::set_timesteps`] before stepping.
    pub fn new(config: DDIMSchedulerConfig) -> Result<Self> {
        if config.prediction_type == PredictionType::FlowPrediction {
            return Err(config_error(
                "DDIMScheduler: prediction_type must be `epsilon`, `sample` or `v_prediction`",
            ));
        }
        let schedule = NoiseSchedule::new(&BetaConfig {
            num_train_timesteps: config.num_train_timesteps,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            beta_schedule: config.beta_schedule,
            trained_betas: config.trained_betas.as_deref(),
            rescale_betas_zero_snr: config.rescale_betas_zero_snr,
        })?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            f64::from(schedule.alphas_cumprod[0])
        };
        Ok(Self {
            config,
            schedule,
            final_alpha_cumprod,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            eta: 0.0,
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &DDIMSchedulerConfig {
        &self.config
    }

    /// The `eta` each step uses.
    pub fn eta(&self) -> f64 {
        self.eta
    }
}

impl<B: Backend> Scheduler<B> for DDIMScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let ascending = spaced_timesteps(
            self.config.timestep_spacing,
            self.config.num_train_timesteps,
            num_inference_steps,
            self.config.steps_offset,
        )?;
        self.num_inference_steps = num_inference_steps;
        self.timesteps = ascending.into_iter().rev().map(|t| t as f64).collect();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor<B, 4>> {
        let timestep = timestep_at(&self.timesteps, step_index)? as i64;
        let prev_timestep =
            timestep - (self.config.num_train_timesteps / self.num_inference_steps.max(1)) as i64;
        let alpha_prod_t = self
            .schedule
            .alpha_cumprod_at(timestep, self.final_alpha_cumprod);
        let alpha_prod_t_prev = self
            .schedule
            .alpha_cumprod_at(prev_timestep, self.final_alpha_cumprod);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_a, sqrt_b) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());

        let (mut pred_original, pred_epsilon) = match self.config.prediction_type {
            PredictionType::Sample => {
                let eps = sample
                    .clone()
                    .sub(model_output.clone().mul_scalar(sqrt_a))
                    .div_scalar(sqrt_b);
                (model_output, eps)
            }
            PredictionType::VPrediction => (
                sample
                    .clone()
                    .mul_scalar(sqrt_a)
                    .sub(model_output.clone().mul_scalar(sqrt_b)),
                model_output
                    .mul_scalar(sqrt_a)
                    .add(sample.clone().mul_scalar(sqrt_b)),
            ),
            _ => (
                sample
                    .clone()
                    .sub(model_output.clone().mul_scalar(sqrt_b))
                    .div_scalar(sqrt_a),
                model_output,
            ),
        };
        if self.config.thresholding {
            pred_original = threshold_sample(
                pred_original,
                self.config.dynamic_thresholding_ratio,
                self.config.sample_max_value,
            )?;
        } else if self.config.clip_sample {
            let range = self.config.clip_sample_range;
            pred_original = pred_original.clamp(-range, range);
        }

        // σ_t of the DDIM paper's eq. (16), scaled by eta.
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let variance = (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = self.eta * variance.sqrt();
        let direction_coeff = (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt();
        let mut prev = pred_original
            .mul_scalar(alpha_prod_t_prev.sqrt())
            .add(pred_epsilon.mul_scalar(direction_coeff));
        if self.eta > 0.0 {
            let variance_noise = randn_like(noise, &prev)?;
            prev = prev.add(variance_noise.mul_scalar(std_dev_t));
        }
        Ok(prev)
    }

    fn add_noise(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        step_index: usize,
    ) -> Tensor<B, 4> {
        let timestep = self.timesteps.get(step_index).copied().unwrap_or(0.0) as i64;
        let alpha_prod = self
            .schedule
            .alpha_cumprod_at(timestep, self.final_alpha_cumprod);
        original
            .mul_scalar(alpha_prod.sqrt())
            .add(noise.mul_scalar((1.0 - alpha_prod).sqrt()))
    }

    fn set_eta(&mut self, eta: f64) {
        self.eta = eta.max(0.0);
    }

    fn name(&self) -> &'static str {
        "DDIM"
    }
}
