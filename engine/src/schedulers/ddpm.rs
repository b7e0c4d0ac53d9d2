//! Denoising diffusion probabilistic models (Ho et al. 2020), with the learned-variance
//! extension of Nichol & Dhariwal (2021) and Imagen's dynamic thresholding: DeepFloyd IF's
//! scheduler. Draws variance noise at every step whose timestep is above 0.
//!
//! Mirrors diffusers `src/diffusers/schedulers/scheduling_ddpm.py` (`DDPMScheduler`).

use burn::tensor::{Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

use super::Scheduler;
use super::common::{
    BetaConfig, BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing, config_error,
    randn_like, spaced_timesteps, threshold_sample, timestep_at,
};
use crate::error::{EngineError, Result};
use crate::noise::NoiseSource;

/// `variance_type`: the variance of each reverse step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// β̃_t, the posterior variance.
    FixedSmall,
    /// β̃_t, applied through its log (same value, as diffusers computes it).
    FixedSmallLog,
    /// β_t.
    FixedLarge,
    /// ln β_t; diffusers' step then takes its square root (NaN), so it is refused here.
    FixedLargeLog,
    /// The model's second half of channels is the variance itself.
    Learned,
    /// The model's second half of channels interpolates between ln β̃_t and ln β_t.
    LearnedRange,
}

/// `DDPMScheduler`'s config (its `__init__` arguments and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DDPMSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub variance_type: VarianceType,
    pub clip_sample: bool,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub clip_sample_range: f64,
    pub sample_max_value: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DDPMSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            variance_type: VarianceType::FixedSmall,
            clip_sample: true,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// Diffusers' `DDPMScheduler`. A model output with twice the sample's channels is split into
/// the noise prediction and the predicted variance when `variance_type` is learned.
pub struct DDPMScheduler {
    config: DDPMSchedulerConfig,
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
}

impl DDPMScheduler {
    /// Builds the scheduler; call [`Scheduler::set_timesteps`] before stepping.
    pub fn new(config: DDPMSchedulerConfig) -> Result<Self> {
        if config.prediction_type == PredictionType::FlowPrediction {
            return Err(config_error(
                "DDPMScheduler: prediction_type must be `epsilon`, `sample` or `v_prediction`",
            ));
        }
        if config.variance_type == VarianceType::FixedLargeLog {
            return Err(EngineError::Unsupported(
                "DDPMScheduler with variance_type `fixed_large_log` (diffusers' step yields NaN)"
                    .into(),
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
        let timesteps = (0..config.num_train_timesteps)
            .rev()
            .map(|t| t as f64)
            .collect();
        Ok(Self {
            config,
            schedule,
            timesteps,
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &DDPMSchedulerConfig {
        &self.config
    }

    /// Diffusers' `add_noise(original, noise, timesteps)` at a training timestep (not a step
    /// index): what the upscalers' image-noising schedulers do to their input at
    /// `noise_level`. √ᾱ_t·x + √(1−ᾱ_t)·ε.
    pub fn add_noise_at_timestep<B: Backend>(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        timestep: usize,
    ) -> Result<Tensor<B, 4>> {
        if timestep >= self.config.num_train_timesteps {
            return Err(EngineError::invalid(
                "noise_level",
                format!(
                    "{timestep} is outside the {} training timesteps",
                    self.config.num_train_timesteps
                ),
            ));
        }
        let alpha_prod = self.schedule.alpha_cumprod_at(timestep as i64, 1.0);
        Ok(original
            .mul_scalar(alpha_prod.sqrt())
            .add(noise.mul_scalar((1.0 - alpha_prod).sqrt())))
    }

    /// Whether the model predicts a variance in a second half of its output channels.
    fn learned(&self) -> bool {
        matches!(
            self.config.variance_type,
            VarianceType::Learned | VarianceType::LearnedRange
        )
    }
}

impl<B: Backend> Scheduler<B> for DDPMScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let ascending = spaced_timesteps(
            self.config.timestep_spacing,
            self.config.num_train_timesteps,
            num_inference_steps,
            self.config.steps_offset,
        )?;
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
        let t = timestep_at(&self.timesteps, step_index)? as i64;
        // `previous_timestep`: the next entry of the schedule, -1 after the last.
        let prev_t = self.timesteps.get(step_index + 1).map_or(-1, |&p| p as i64);

        let channels = sample.dims()[1];
        let (model_output, predicted_variance) =
            if self.learned() && model_output.dims()[1] == 2 * channels {
                let variance = model_output.clone().narrow(1, channels, channels);
                (model_output.narrow(1, 0, channels), Some(variance))
            } else {
                (model_output, None)
            };

        let alpha_prod_t = self.schedule.alpha_cumprod_at(t, 1.0);
        let alpha_prod_t_prev = self.schedule.alpha_cumprod_at(prev_t, 1.0);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;

        let mut pred_original = match self.config.prediction_type {
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => sample
                .clone()
                .mul_scalar(alpha_prod_t.sqrt())
                .sub(model_output.clone().mul_scalar(beta_prod_t.sqrt())),
            _ => sample
                .clone()
                .sub(model_output.clone().mul_scalar(beta_prod_t.sqrt()))
                .div_scalar(alpha_prod_t.sqrt()),
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

        // Eq. (7) of the DDPM paper: the posterior mean.
        let original_coeff = alpha_prod_t_prev.sqrt() * current_beta_t / beta_prod_t;
        let sample_coeff = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
        let mut prev = pred_original
            .mul_scalar(original_coeff)
            .add(sample.mul_scalar(sample_coeff));

        if t > 0 {
            let variance_noise = randn_like(noise, &model_output)?;
            // `_get_variance`: β̃_t, clamped away from 0.
            let posterior = (beta_prod_t_prev / beta_prod_t * current_beta_t).max(1e-20);
            let scaled = match (self.config.variance_type, predicted_variance) {
                (VarianceType::FixedSmall, _) => variance_noise.mul_scalar(posterior.sqrt()),
                (VarianceType::FixedSmallLog, _) => {
                    variance_noise.mul_scalar((0.5 * posterior.ln()).exp())
                }
                (VarianceType::FixedLarge, _) => variance_noise.mul_scalar(current_beta_t.sqrt()),
                (VarianceType::LearnedRange, Some(v)) => {
                    let (min_log, max_log) = (posterior.ln(), current_beta_t.ln());
                    // frac = (v + 1) / 2; log-variance = frac·max_log + (1 − frac)·min_log.
                    let frac = v.add_scalar(1.0).div_scalar(2.0);
                    let log_variance = frac
                        .clone()
                        .mul_scalar(max_log)
                        .add(frac.neg().add_scalar(1.0).mul_scalar(min_log));
                    log_variance.mul_scalar(0.5).exp().mul(variance_noise)
                }
                (VarianceType::Learned, Some(v)) => v.sqrt().mul(variance_noise),
                (VarianceType::Learned | VarianceType::LearnedRange, None) => {
                    return Err(EngineError::invalid(
                        "model_output",
                        format!(
                            "DDPMScheduler with a learned variance needs {} output channels (noise + variance), got {channels}",
                            2 * channels
                        ),
                    ));
                }
                (VarianceType::FixedLargeLog, _) => {
                    return Err(EngineError::Unsupported(
                        "DDPMScheduler with variance_type `fixed_large_log`".into(),
                    ));
                }
            };
            prev = prev.add(scaled);
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
        let alpha_prod = self.schedule.alpha_cumprod_at(timestep, 1.0);
        original
            .mul_scalar(alpha_prod.sqrt())
            .add(noise.mul_scalar((1.0 - alpha_prod).sqrt()))
    }

    fn name(&self) -> &'static str {
        "DDPM"
    }

    fn learned_variance(&self) -> bool {
        self.learned()
    }
}
