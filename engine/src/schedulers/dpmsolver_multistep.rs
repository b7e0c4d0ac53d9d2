//! DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022): A1111's "DPM++ 2M" with the defaults
//! (`dpmsolver++`, order 2, midpoint). Orders 1 and 2 and the four algorithm types
//! (`dpmsolver`, `dpmsolver++` and their SDE variants, which draw noise each step) are ported;
//! third order, beta sigmas and flow sigmas are reported as unsupported.
//!
//! Mirrors diffusers `src/diffusers/schedulers/scheduling_dpmsolver_multistep.py`
//! (`DPMSolverMultistepScheduler`).

use burn::tensor::{Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

use super::Scheduler;
use super::common::{
    BetaConfig, BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing, config_error,
    karras_sigmas, np_arange_down, np_interp_index, np_linspace, randn_like, sigma_to_t,
    threshold_sample, timestep_at,
};
use super::euler_discrete::FinalSigmasType;
use crate::error::{EngineError, Result};
use crate::noise::NoiseSource;

/// `DPMSolverMultistepScheduler`'s config (its `__init__` arguments and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DPMSolverMultistepSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub solver_order: usize,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    /// `dpmsolver++`, `dpmsolver`, `sde-dpmsolver++`, `sde-dpmsolver` (`deis` reads as `dpmsolver++`).
    pub algorithm_type: String,
    /// `midpoint` or `heun` (`logrho`, `bh1`, `bh2` read as `midpoint`).
    pub solver_type: String,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_lu_lambdas: bool,
    pub use_flow_sigmas: bool,
    pub flow_shift: f64,
    pub final_sigmas_type: FinalSigmasType,
    /// `-inf` in diffusers; JSON has no infinity, so `null` (the default) means unclipped.
    pub lambda_min_clipped: Option<f64>,
    /// `learned` / `learned_range` when the model also predicts a variance (ignored here).
    pub variance_type: Option<String>,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
    pub use_dynamic_shifting: bool,
    pub time_shift_type: String,
}

impl Default for DPMSolverMultistepSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            solver_order: 2,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            algorithm_type: "dpmsolver++".into(),
            solver_type: "midpoint".into(),
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: FinalSigmasType::Zero,
            lambda_min_clipped: None,
            variance_type: None,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: "exponential".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    DpmSolver,
    DpmSolverPlusPlus,
    SdeDpmSolver,
    SdeDpmSolverPlusPlus,
}

impl Algorithm {
    /// The "++" variants work on the data prediction x₀, the others on the noise ε.
    fn predicts_data(self) -> bool {
        matches!(self, Self::DpmSolverPlusPlus | Self::SdeDpmSolverPlusPlus)
    }

    fn is_sde(self) -> bool {
        matches!(self, Self::SdeDpmSolver | Self::SdeDpmSolverPlusPlus)
    }
}

/// α_t = 1/√(σ²+1) and σ_t = σ·α_t of a (variance-exploding) sigma.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = ln α − ln σ (half the log-SNR).
fn lambda(alpha: f64, sigma: f64) -> f64 {
    alpha.ln() - sigma.ln()
}

/// Diffusers' `DPMSolverMultistepScheduler`.
pub struct DPMSolverMultistepScheduler<B: Backend> {
    config: DPMSolverMultistepSchedulerConfig,
    algorithm: Algorithm,
    heun: bool,
    schedule: NoiseSchedule,
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    /// The last `solver_order` converted model outputs, oldest first.
    model_outputs: Vec<Tensor<B, 4>>,
    lower_order_nums: usize,
}

impl<B: Backend> DPMSolverMultistepScheduler<B> {
    /// Builds the scheduler; call [`Scheduler::set_timesteps`] before stepping.
    pub fn new(config: DPMSolverMultistepSchedulerConfig) -> Result<Self> {
        let algorithm = match config.algorithm_type.as_str() {
            "dpmsolver++" | "deis" => Algorithm::DpmSolverPlusPlus,
            "dpmsolver" => Algorithm::DpmSolver,
            "sde-dpmsolver++" => Algorithm::SdeDpmSolverPlusPlus,
            "sde-dpmsolver" => Algorithm::SdeDpmSolver,
            other => {
                return Err(config_error(format!(
                    "DPMSolverMultistepScheduler: unknown algorithm_type `{other}`"
                )));
            }
        };
        let heun = match config.solver_type.as_str() {
            "midpoint" | "logrho" | "bh1" | "bh2" => false,
            "heun" => true,
            other => {
                return Err(config_error(format!(
                    "DPMSolverMultistepScheduler: unknown solver_type `{other}`"
                )));
            }
        };
        if !algorithm.predicts_data() && config.final_sigmas_type == FinalSigmasType::Zero {
            return Err(config_error(format!(
                "DPMSolverMultistepScheduler: final_sigmas_type `zero` is not supported for algorithm_type `{}`; use `sigma_min`",
                config.algorithm_type
            )));
        }
        if !(1..=2).contains(&config.solver_order) {
            return Err(EngineError::Unsupported(format!(
                "DPMSolverMultistepScheduler with solver_order {} (orders 1 and 2 are ported)",
                config.solver_order
            )));
        }
        if config.use_beta_sigmas || config.use_flow_sigmas || config.use_dynamic_shifting {
            return Err(EngineError::Unsupported(
                "DPMSolverMultistepScheduler with beta sigmas, flow sigmas or dynamic shifting"
                    .into(),
            ));
        }
        if config.prediction_type == PredictionType::FlowPrediction {
            return Err(EngineError::Unsupported(
                "DPMSolverMultistepScheduler with prediction_type `flow_prediction`".into(),
            ));
        }
        let sigma_options = [
            config.use_karras_sigmas,
            config.use_exponential_sigmas,
            config.use_lu_lambdas,
        ];
        if sigma_options.iter().filter(|&&b| b).count() > 1 {
            return Err(config_error(
                "DPMSolverMultistepScheduler: choose only one of use_karras_sigmas, use_exponential_sigmas, use_lu_lambdas",
            ));
        }
        let mut schedule = NoiseSchedule::new(&BetaConfig {
            num_train_timesteps: config.num_train_timesteps,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            beta_schedule: config.beta_schedule,
            trained_betas: config.trained_betas.as_deref(),
            rescale_betas_zero_snr: config.rescale_betas_zero_snr,
        })?;
        // Diffusers sets the last ᾱ to 2⁻²⁴ so its sigma stays finite.
        if config.rescale_betas_zero_snr
            && let Some(last) = schedule.alphas_cumprod.last_mut()
        {
            *last = 2f32.powi(-24);
        }
        Ok(Self {
            config,
            algorithm,
            heun,
            schedule,
            sigmas: Vec::new(),
            timesteps: Vec::new(),
            model_outputs: Vec::new(),
            lower_order_nums: 0,
        })
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &DPMSolverMultistepSchedulerConfig {
        &self.config
    }

    /// The sigmas, one per timestep plus the final one.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    fn sigma(&self, index: usize) -> f64 {
        self.sigmas
            .get(index)
            .or(self.sigmas.last())
            .copied()
            .unwrap_or(0.0)
    }

    /// Diffusers' `convert_model_output`: x₀ for the "++" algorithms, ε for the others.
    fn convert_model_output(
        &self,
        model_output: Tensor<B, 4>,
        sample: &Tensor<B, 4>,
        step_index: usize,
    ) -> Result<Tensor<B, 4>> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigma(step_index));
        let channels = sample.dims()[1];
        let learned = matches!(
            self.config.variance_type.as_deref(),
            Some("learned" | "learned_range")
        );
        // Diffusers keeps `model_output[:, :3]` (IF's 3 image channels); the first half in general.
        let model_output = if learned && model_output.dims()[1] == 2 * channels {
            model_output.narrow(1, 0, channels)
        } else {
            model_output
        };
        let prediction = self.config.prediction_type;
        if self.algorithm.predicts_data() {
            let x0 = match prediction {
                PredictionType::Sample => model_output,
                PredictionType::VPrediction => sample
                    .clone()
                    .mul_scalar(alpha_t)
                    .sub(model_output.mul_scalar(sigma_t)),
                _ => sample
                    .clone()
                    .sub(model_output.mul_scalar(sigma_t))
                    .div_scalar(alpha_t),
            };
            if self.config.thresholding {
                return threshold_sample(
                    x0,
                    self.config.dynamic_thresholding_ratio,
                    self.config.sample_max_value,
                );
            }
            Ok(x0)
        } else {
            let eps = match prediction {
                PredictionType::Sample => sample
                    .clone()
                    .sub(model_output.mul_scalar(alpha_t))
                    .div_scalar(sigma_t),
                PredictionType::VPrediction => model_output
                    .mul_scalar(alpha_t)
                    .add(sample.clone().mul_scalar(sigma_t)),
                _ => model_output,
            };
            if self.config.thresholding {
                let x0 = sample
                    .clone()
                    .sub(eps.mul_scalar(sigma_t))
                    .div_scalar(alpha_t);
                let x0 = threshold_sample(
                    x0,
                    self.config.dynamic_thresholding_ratio,
                    self.config.sample_max_value,
                )?;
                return Ok(sample
                    .clone()
                    .sub(x0.mul_scalar(alpha_t))
                    .div_scalar(sigma_t));
            }
            Ok(eps)
        }
    }

    /// Diffusers' `dpm_solver_first_order_update` (DDIM in λ).
    fn first_order(
        &self,
        m0: Tensor<B, 4>,
        sample: Tensor<B, 4>,
        step_index: usize,
        noise: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigma(step_index + 1));
        let (alpha_s, sigma_s) = alpha_sigma(self.sigma(step_index));
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        let x = match self.algorithm {
            Algorithm::DpmSolverPlusPlus => sample
                .mul_scalar(sigma_t / sigma_s)
                .sub(m0.mul_scalar(alpha_t * ((-h).exp() - 1.0))),
            Algorithm::DpmSolver => sample
                .mul_scalar(alpha_t / alpha_s)
                .sub(m0.mul_scalar(sigma_t * (h.exp() - 1.0))),
            Algorithm::SdeDpmSolverPlusPlus => sample
                .mul_scalar(sigma_t / sigma_s * (-h).exp())
                .add(m0.mul_scalar(alpha_t * (1.0 - (-2.0 * h).exp()))),
            Algorithm::SdeDpmSolver => sample
                .mul_scalar(alpha_t / alpha_s)
                .sub(m0.mul_scalar(2.0 * sigma_t * (h.exp() - 1.0))),
        };
        add_sde_noise(x, noise, self.algorithm, sigma_t, h)
    }

    /// Diffusers' `multistep_dpm_solver_second_order_update`.
    fn second_order(
        &self,
        sample: Tensor<B, 4>,
        step_index: usize,
        noise: Option<Tensor<B, 4>>,
    ) -> Result<Tensor<B, 4>> {
        let n = self.model_outputs.len();
        if n < 2 || step_index == 0 {
            return Err(EngineError::invalid(
                "step_index",
                "a second-order DPM-Solver step needs the previous step's model output",
            ));
        }
        let (alpha_t, sigma_t) = alpha_sigma(self.sigma(step_index + 1));
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigma(step_index));
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigma(step_index - 1));
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let (m0, m1) = (
            self.model_outputs[n - 1].clone(),
            self.model_outputs[n - 2].clone(),
        );
        let h = lambda_t - lambda_s0;
        let r0 = (lambda_s0 - lambda_s1) / h;
        let d0 = m0.clone();
        let d1 = m0.sub(m1).mul_scalar(1.0 / r0);
        let x = match (self.algorithm, self.heun) {
            (Algorithm::DpmSolverPlusPlus, false) => {
                let c = alpha_t * ((-h).exp() - 1.0);
                sample
                    .mul_scalar(sigma_t / sigma_s0)
                    .sub(d0.mul_scalar(c))
                    .sub(d1.mul_scalar(0.5 * c))
            }
            (Algorithm::DpmSolverPlusPlus, true) => {
                let c = alpha_t * ((-h).exp() - 1.0);
                sample
                    .mul_scalar(sigma_t / sigma_s0)
                    .sub(d0.mul_scalar(c))
                    .add(d1.mul_scalar(alpha_t * (((-h).exp() - 1.0) / h + 1.0)))
            }
            (Algorithm::DpmSolver, false) => {
                let c = sigma_t * (h.exp() - 1.0);
                sample
                    .mul_scalar(alpha_t / alpha_s0)
                    .sub(d0.mul_scalar(c))
                    .sub(d1.mul_scalar(0.5 * c))
            }
            (Algorithm::DpmSolver, true) => sample
                .mul_scalar(alpha_t / alpha_s0)
                .sub(d0.mul_scalar(sigma_t * (h.exp() - 1.0)))
                .sub(d1.mul_scalar(sigma_t * ((h.exp() - 1.0) / h - 1.0))),
            (Algorithm::SdeDpmSolverPlusPlus, false) => {
                let c = alpha_t * (1.0 - (-2.0 * h).exp());
                sample
                    .mul_scalar(sigma_t / sigma_s0 * (-h).exp())
                    .add(d0.mul_scalar(c))
                    .add(d1.mul_scalar(0.5 * c))
            }
            (Algorithm::SdeDpmSolverPlusPlus, true) => sample
                .mul_scalar(sigma_t / sigma_s0 * (-h).exp())
                .add(d0.mul_scalar(alpha_t * (1.0 - (-2.0 * h).exp())))
                .add(d1.mul_scalar(alpha_t * ((1.0 - (-2.0 * h).exp()) / (-2.0 * h) + 1.0))),
            (Algorithm::SdeDpmSolver, false) => {
                let c = sigma_t * (h.exp() - 1.0);
                sample
                    .mul_scalar(alpha_t / alpha_s0)
                    .sub(d0.mul_scalar(2.0 * c))
                    .sub(d1.mul_scalar(c))
            }
            (Algorithm::SdeDpmSolver, true) => sample
                .mul_scalar(alpha_t / alpha_s0)
                .sub(d0.mul_scalar(2.0 * sigma_t * (h.exp() - 1.0)))
                .sub(d1.mul_scalar(2.0 * sigma_t * ((h.exp() - 1.0) / h - 1.0))),
        };
        Ok(add_sde_noise(x, noise, self.algorithm, sigma_t, h))
    }
}

/// The stochastic term of the SDE variants: σ_t·√(1−e^{−2h})·z (`++`) or σ_t·√(e^{2h}−1)·z.
fn add_sde_noise<B: Backend>(
    x: Tensor<B, 4>,
    noise: Option<Tensor<B, 4>>,
    algorithm: Algorithm,
    sigma_t: f64,
    h: f64,
) -> Tensor<B, 4> {
    match (noise, algorithm) {
        (Some(z), Algorithm::SdeDpmSolverPlusPlus) => {
            x.add(z.mul_scalar(sigma_t * (1.0 - (-2.0 * h).exp()).sqrt()))
        }
        (Some(z), Algorithm::SdeDpmSolver) => {
            x.add(z.mul_scalar(sigma_t * ((2.0 * h).exp() - 1.0).sqrt()))
        }
        (_, _) => x,
    }
}

impl<B: Backend> Scheduler<B> for DPMSolverMultistepScheduler<B> {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.config;
        let n_train = c.num_train_timesteps;
        if num_inference_steps == 0 {
            return Err(EngineError::invalid(
                "steps",
                "at least one inference step is needed",
            ));
        }
        let ac = &self.schedule.alphas_cumprod;
        // Clip the tail where λ = ln(α/σ) < lambda_min_clipped: `searchsorted` on flipped λ.
        let clipped = c.lambda_min_clipped.map_or(0, |min| {
            ac.iter()
                .rev()
                .map(|&a| {
                    let (alpha, sigma) = (a.sqrt(), (1.0 - a).sqrt());
                    f64::from(alpha.ln() - sigma.ln())
                })
                .take_while(|&l| l < min)
                .count()
        });
        let last_timestep = n_train - clipped;
        let n = num_inference_steps;
        let mut timesteps: Vec<f64> = match c.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut t: Vec<f64> = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                    .into_iter()
                    .map(f64::round_ties_even)
                    .collect();
                t.reverse();
                t.truncate(n);
                t
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + c.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                np_arange_down(last_timestep as f64, n_train as f64 / n as f64)
                    .into_iter()
                    .map(|t| t.round_ties_even() - 1.0)
                    .collect()
            }
        };
        let train_sigmas = self.schedule.training_sigmas();
        let log_sigmas: Vec<f64> = train_sigmas.iter().map(|&s| f64::from(s.ln())).collect();
        let descending: Vec<f64> = train_sigmas.iter().rev().map(|&s| f64::from(s)).collect();
        let (train_min, train_max) = (
            descending.last().copied().unwrap_or(0.0),
            descending.first().copied().unwrap_or(0.0),
        );
        let round_t = c.beta_schedule != BetaSchedule::SquaredcosCapV2;
        let mut sigmas: Vec<f64> = if c.use_karras_sigmas {
            let s = karras_sigmas(train_min, train_max, n);
            timesteps = s
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas))
                .map(|t| if round_t { t.round_ties_even() } else { t })
                .collect();
            s
        } else if c.use_lu_lambdas {
            let (lambda_min, lambda_max) = (train_min.ln(), train_max.ln());
            let s: Vec<f64> = np_linspace(0.0, 1.0, n)
                .into_iter()
                .map(|r| (lambda_max + r * (lambda_min - lambda_max)).exp())
                .collect();
            timesteps = s
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas))
                .map(|t| if round_t { t.round_ties_even() } else { t })
                .collect();
            s
        } else if c.use_exponential_sigmas {
            let s: Vec<f64> = np_linspace(train_max.ln(), train_min.ln(), n)
                .into_iter()
                .map(f64::exp)
                .collect();
            timesteps = s.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
            s
        } else {
            timesteps
                .iter()
                .map(|&t| np_interp_index(t, &train_sigmas))
                .collect()
        };
        let last = match c.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train_sigmas.first().map_or(0.0, |&s| f64::from(s)),
        };
        sigmas.push(last);
        self.sigmas = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();
        // `torch.from_numpy(timesteps).to(torch.int64)` truncates.
        self.timesteps = timesteps.into_iter().map(f64::trunc).collect();
        self.model_outputs.clear();
        self.lower_order_nums = 0;
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
        timestep_at(&self.timesteps, step_index)?;
        let len = self.timesteps.len();
        let c = &self.config;
        let lower_order_final = step_index == len - 1
            && (c.euler_at_final
                || (c.lower_order_final && len < 15)
                || c.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = step_index + 2 == len && c.lower_order_final && len < 15;

        let converted = self.convert_model_output(model_output, &sample, step_index)?;
        if self.model_outputs.len() == c.solver_order {
            self.model_outputs.remove(0);
        }
        self.model_outputs.push(converted.clone());
        let sde_noise = if self.algorithm.is_sde() {
            Some(randn_like(noise, &converted)?)
        } else {
            None
        };
        let order = c.solver_order;
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(converted, sample, step_index, sde_noise)
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(sample, step_index, sde_noise)?
        } else {
            return Err(EngineError::Unsupported(
                "third-order DPM-Solver steps".into(),
            ));
        };
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }

    fn add_noise(
        &self,
        original: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        step_index: usize,
    ) -> Tensor<B, 4> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigma(step_index));
        original.mul_scalar(alpha_t).add(noise.mul_scalar(sigma_t))
    }

    fn name(&self) -> &'static str {
        match (self.algorithm.is_sde(), self.config.use_karras_sigmas) {
            (false, false) => "DPM++ 2M",
            (false, true) => "DPM++ 2M Karras",
            (true, false) => "DPM++ 2M SDE",
            (true, true) => "DPM++ 2M SDE Karras",
        }
    }
}
