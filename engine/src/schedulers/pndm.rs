//! Pseudo numerical methods for diffusion models (Liu et al. 2022): Runge–Kutta warm-up steps
//! (PRK) then linear multistep (PLMS). Stable Diffusion 1.x's default scheduler, run with
//! `skip_prk_steps` (PLMS only).
//!
//! Mirrors diffusers `src/diffusers/schedulers/scheduling_pndm.py` (`PNDMScheduler`).

use burn::tensor::{Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

use super::Scheduler;
use super::common::{
    BetaConfig, BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing, config_error,
    spaced_timesteps, timestep_at,
};
use crate::error::{EngineError, Result};
use crate::noise::NoiseSource;

/// `PNDMScheduler`'s config (its `__init__` arguments and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PNDMSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub skip_prk_steps: bool,
    pub set_alpha_to_one: bool,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
}

impl Default for PNDMSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            skip_prk_steps: false,
            set_alpha_to_one: false,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
        }
    }
}

/// Diffusers' `PNDMScheduler`. Its state (`counter`, `ets`, `cur_sample`, …) advances with each
/// `step` call in order, as in diffusers; the step index only selects the timestep.
pub struct PNDMScheduler<B: Backend> {
    config: PNDMSchedulerConfig,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f64,
    num_inference_steps: usize,
    /// How many leading entries of `timesteps` are PRK steps.
    num_prk_steps: usize,
    timesteps: Vec<f64>,
    counter: usize,
    ets: Vec<Tensor<B, 4>>,
    cur_sample: Option<Tensor<B, 4>>,
    cur_model_output: Option<Tensor<B, 4>>,
}

impl<B: Backend> PNDMScheduler<B> {
    /// Builds the scheduler; call [`Scheduler::set_timesteps`] before stepping.
    pub fn new(config: PNDMSchedulerConfig) -> Result<Self> {
        if matches!(
            config.prediction_type,
            PredictionType::Sample | PredictionType::FlowPrediction
        ) {
            return Err(config_error(format!(
                "PNDMScheduler: prediction_type `{}` must be `epsilon` or `v_prediction`",
                config.prediction_type.as_str()
            )));
        }
        let schedule = NoiseSchedule::new(&BetaConfig {
            num_train_timesteps: config.num_train_timesteps,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            beta_schedule: config.beta_schedule,
            trained_betas: config.trained_betas.as_deref(),
            rescale_betas_zero_snr: false,
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
            num_prk_steps: 0,
            timesteps: Vec::new(),
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &PNDMSchedulerConfig {
        &self.config
    }

    /// `num_train_timesteps // num_inference_steps`, the PLMS stride.
    fn stride(&self) -> i64 {
        (self.config.num_train_timesteps / self.num_inference_steps.max(1)) as i64
    }

    /// Diffusers' `_get_prev_sample`: the DDIM-like transfer from `timestep` to `prev_timestep`
    /// with the (combined) noise estimate `model_output`.
    fn prev_sample(
        &self,
        sample: Tensor<B, 4>,
        timestep: i64,
        prev_timestep: i64,
        model_output: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let alpha_prod_t = self
            .schedule
            .alpha_cumprod_at(timestep, self.final_alpha_cumprod);
        let alpha_prod_t_prev = self
            .schedule
            .alpha_cumprod_at(prev_timestep, self.final_alpha_cumprod);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let model_output = match self.config.prediction_type {
            PredictionType::VPrediction => model_output
                .mul_scalar(alpha_prod_t.sqrt())
                .add(sample.clone().mul_scalar(beta_prod_t.sqrt())),
            _ => model_output,
        };
        let sample_coeff = (alpha_prod_t_prev / alpha_prod_t).sqrt();
        let denom = alpha_prod_t * beta_prod_t_prev.sqrt()
            + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).sqrt();
        sample
            .mul_scalar(sample_coeff)
            .sub(model_output.mul_scalar((alpha_prod_t_prev - alpha_prod_t) / denom))
    }

    /// Diffusers' `step_prk`: four model calls per step, combined as classical RK4.
    fn step_prk(
        &mut self,
        model_output: Tensor<B, 4>,
        timestep: i64,
        sample: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let half_stride = self.stride() / 2;
        let diff_to_prev = if self.counter % 2 == 1 {
            0
        } else {
            half_stride
        };
        let prev_timestep = timestep - diff_to_prev;
        let base = timestep_at(&self.timesteps, self.counter / 4 * 4)? as i64;
        let model_output = match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(model_output.clone().mul_scalar(1.0 / 6.0));
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
                model_output
            }
            1 | 2 => {
                let weighted = model_output.clone().mul_scalar(1.0 / 3.0);
                self.cur_model_output = Some(match self.cur_model_output.take() {
                    Some(acc) => acc.add(weighted),
                    None => weighted,
                });
                model_output
            }
            _ => {
                let weighted = model_output.mul_scalar(1.0 / 6.0);
                match self.cur_model_output.take() {
                    Some(acc) => acc.add(weighted),
                    None => weighted,
                }
            }
        };
        let cur_sample = self.cur_sample.clone().unwrap_or(sample);
        let prev = self.prev_sample(cur_sample, base, prev_timestep, model_output);
        self.counter += 1;
        Ok(prev)
    }

    /// Diffusers' `step_plms`: Adams–Bashforth over the last (up to) four noise estimates.
    fn step_plms(
        &mut self,
        model_output: Tensor<B, 4>,
        timestep: i64,
        sample: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        if !self.config.skip_prk_steps && self.ets.len() < 3 {
            return Err(EngineError::invalid(
                "step_index",
                "PNDMScheduler can only run PLMS steps after at least 12 PRK steps",
            ));
        }
        let mut timestep = timestep;
        let mut prev_timestep = timestep - self.stride();
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_timestep = timestep;
            timestep += self.stride();
        }
        let n = self.ets.len();
        let mut sample = sample;
        let model_output = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output
        } else if n == 1 && self.counter == 1 {
            if let Some(cur) = self.cur_sample.take() {
                sample = cur;
            }
            model_output.add(self.ets[0].clone()).div_scalar(2.0)
        } else if n == 2 {
            self.ets[1]
                .clone()
                .mul_scalar(3.0)
                .sub(self.ets[0].clone())
                .div_scalar(2.0)
        } else if n == 3 {
            self.ets[2]
                .clone()
                .mul_scalar(23.0)
                .sub(self.ets[1].clone().mul_scalar(16.0))
                .add(self.ets[0].clone().mul_scalar(5.0))
                .div_scalar(12.0)
        } else {
            self.ets[n - 1]
                .clone()
                .mul_scalar(55.0)
                .sub(self.ets[n - 2].clone().mul_scalar(59.0))
                .add(self.ets[n - 3].clone().mul_scalar(37.0))
                .sub(self.ets[n - 4].clone().mul_scalar(9.0))
                .mul_scalar(1.0 / 24.0)
        };
        let prev = self.prev_sample(sample, timestep, prev_timestep, model_output);
        self.counter += 1;
        Ok(prev)
    }
}

impl<B: Backend> Scheduler<B> for PNDMScheduler<B> {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n_train = self.config.num_train_timesteps;
        // Ascending, as diffusers' `_timesteps`.
        let ascending = spaced_timesteps(
            self.config.timestep_spacing,
            n_train,
            num_inference_steps,
            self.config.steps_offset,
        )?;
        self.num_inference_steps = num_inference_steps;
        let len = ascending.len();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if self.config.skip_prk_steps {
            // [t0, …, t(n-2), t(n-2), t(n-1)] reversed: the first PLMS step is taken twice.
            let mut plms: Vec<i64> = ascending[..len - 1].to_vec();
            if len >= 2 {
                plms.push(ascending[len - 2]);
            }
            plms.push(ascending[len - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if len < 4 {
                return Err(EngineError::invalid(
                    "steps",
                    "PNDMScheduler without skip_prk_steps needs at least 4 inference steps",
                ));
            }
            let half = (n_train / num_inference_steps / 2) as i64;
            // Each of the last 4 timesteps t gives t and t + half, then every value but the
            // last is repeated, and the ends trimmed: RK4's evaluations at t, t+h/2, t+h/2, t+h.
            let pairs: Vec<i64> = ascending[len - 4..]
                .iter()
                .flat_map(|&t| [t, t + half])
                .collect();
            let repeated: Vec<i64> = pairs[..pairs.len() - 1]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            let mut prk = repeated[1..repeated.len() - 1].to_vec();
            prk.reverse();
            let mut plms = ascending[..len - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        self.num_prk_steps = prk.len();
        self.timesteps = prk.into_iter().chain(plms).map(|t| t as f64).collect();
        self.counter = 0;
        self.ets.clear();
        self.cur_sample = None;
        self.cur_model_output = None;
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor<B, 4>> {
        let timestep = timestep_at(&self.timesteps, step_index)? as i64;
        if self.counter < self.num_prk_steps && !self.config.skip_prk_steps {
            self.step_prk(model_output, timestep, sample)
        } else {
            self.step_plms(model_output, timestep, sample)
        }
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

    fn name(&self) -> &'static str {
        if self.config.skip_prk_steps {
            "PLMS"
        } else {
            "PNDM"
        }
    }
}
