//! What diffusers' schedulers share, each of which it copies into every `scheduling_*.py`:
//! the beta schedules (`betas_for_alpha_bar`, `rescale_zero_terminal_snr`), the timestep
//! spacings of `set_timesteps`, `_threshold_sample`, `_sigma_to_t`, `_convert_to_karras`, and
//! the config handling of `configuration_utils.py` (`extract_init_dict`).
//!
//! Diffusers keeps betas, alphas and their cumulative product as f32 tensors; they are computed
//! here in f64 and rounded where diffusers stores f32, so the scheduler coefficients (computed
//! on the host in f64 from those values) agree with diffusers' to f32 precision.

use std::collections::BTreeSet;
use std::path::PathBuf;

use burn::tensor::{Tensor, TensorData, backend::Backend};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};

use crate::error::{EngineError, Result};
use crate::noise::NoiseSource;

/// `beta_schedule` in a diffusers scheduler config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Betas evenly spaced from `beta_start` to `beta_end`.
    Linear,
    /// Square roots of the betas evenly spaced (Stable Diffusion).
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal (DeepFloyd IF).
    SquaredcosCapV2,
    /// A sigmoid from `beta_start` to `beta_end` (DDPM only in diffusers).
    Sigmoid,
    /// The Laplace noise schedule (DDPM only in diffusers).
    Laplace,
}

/// `timestep_spacing`: how `set_timesteps` spreads the inference steps over the training ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// Evenly from the last training timestep to 0, rounded.
    Linspace,
    /// Multiples of `num_train_timesteps / steps` plus `steps_offset` (Stable Diffusion 1.x).
    Leading,
    /// Evenly spaced, ending on the last training timestep.
    Trailing,
}

/// `prediction_type`: what the denoising model outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise.
    Epsilon,
    /// The denoised sample (Euler also accepts diffusers' alias `original_sample`).
    #[serde(alias = "original_sample")]
    Sample,
    /// The velocity `v = √ᾱ·ε − √(1−ᾱ)·x₀`.
    VPrediction,
    /// Flow matching velocity; no scheduler here supports it.
    FlowPrediction,
}

impl PredictionType {
    /// The config spelling, for error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::Sample => "sample",
            Self::VPrediction => "v_prediction",
            Self::FlowPrediction => "flow_prediction",
        }
    }
}

/// The beta settings every diffusers scheduler takes, with their (shared) defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct BetaConfig<'a> {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<&'a [f64]>,
    pub rescale_betas_zero_snr: bool,
}

/// The training noise schedule, as diffusers' f32 tensors.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    /// `betas` (after `rescale_zero_terminal_snr` when asked for).
    pub betas: Vec<f32>,
    /// `alphas_cumprod` (ᾱ).
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// Diffusers' `__init__` beta computation.
    pub fn new(config: &BetaConfig<'_>) -> Result<Self> {
        let n = config.num_train_timesteps;
        if n < 2 {
            return Err(config_error(format!(
                "num_train_timesteps must be at least 2, got {n}"
            )));
        }
        let mut betas: Vec<f32> = match (config.trained_betas, config.beta_schedule) {
            (Some(trained), _) => {
                if trained.len() != n {
                    return Err(config_error(format!(
                        "trained_betas has {} values but num_train_timesteps is {n}",
                        trained.len()
                    )));
                }
                trained.iter().map(|&b| b as f32).collect()
            }
            (None, BetaSchedule::Linear) => linspace_f32(config.beta_start, config.beta_end, n),
            (None, BetaSchedule::ScaledLinear) => {
                linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            (None, BetaSchedule::SquaredcosCapV2) => betas_for_alpha_bar(n, |t| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            }),
            (None, BetaSchedule::Laplace) => betas_for_alpha_bar(n, |t| {
                let lmb = -0.5 * (0.5 - t).signum() * (1.0 - 2.0 * (0.5 - t).abs() + 1e-6).ln();
                let snr = lmb.exp();
                (snr / (1.0 + snr)).sqrt()
            }),
            (None, BetaSchedule::Sigmoid) => linspace_f32(-6.0, 6.0, n)
                .into_iter()
                .map(|x| {
                    let s = 1.0 / (1.0 + (-f64::from(x)).exp());
                    (s * (config.beta_end - config.beta_start) + config.beta_start) as f32
                })
                .collect(),
        };
        if config.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas_cumprod = cumprod_f32(betas.iter().map(|&b| 1.0 - b));
        Ok(Self {
            betas,
            alphas_cumprod,
        })
    }

    /// ᾱ at an integer timestep; negative or out-of-range timesteps take `fallback` (diffusers'
    /// `final_alpha_cumprod` / `one` for the step past the last).
    pub fn alpha_cumprod_at(&self, timestep: i64, fallback: f64) -> f64 {
        usize::try_from(timestep)
            .ok()
            .and_then(|t| self.alphas_cumprod.get(t))
            .map_or(fallback, |&a| f64::from(a))
    }

    /// `((1 - ᾱ) / ᾱ) ** 0.5` for every training timestep, in f32 as diffusers computes it.
    pub fn training_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect()
    }
}

/// `torch.linspace(start, end, n, dtype=float32)`, up to an ulp (torch's own result depends on
/// the CPU's vector width).
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let step = (end - start) / (n - 1) as f64;
    (0..n)
        .map(|i| {
            if i < n / 2 {
                (start + step * i as f64) as f32
            } else {
                (end - step * (n - 1 - i) as f64) as f32
            }
        })
        .collect()
}

/// `torch.cumprod` on CPU: accumulated in f64, each partial product stored as f32.
fn cumprod_f32(values: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .map(|v| {
            acc *= f64::from(v);
            acc as f32
        })
        .collect()
}

/// Diffusers' `betas_for_alpha_bar` with `max_beta = 0.999`.
fn betas_for_alpha_bar(n: usize, alpha_bar: impl Fn(f64) -> f64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, algorithm 1).
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas_cumprod = cumprod_f32(betas.iter().map(|&b| 1.0 - b));
    let sqrt: Vec<f64> = alphas_cumprod
        .iter()
        .map(|&a| f64::from(a.sqrt()))
        .collect();
    let (first, last) = (sqrt[0], sqrt[sqrt.len() - 1]);
    let alphas_bar: Vec<f64> = sqrt
        .iter()
        .map(|&s| ((s - last) * (first / (first - last))).powi(2))
        .collect();
    let mut out = Vec::with_capacity(betas.len());
    out.push((1.0 - alphas_bar[0]) as f32);
    for w in alphas_bar.windows(2) {
        out.push((1.0 - w[1] / w[0]) as f32);
    }
    out
}

/// Ascending `num_inference_steps` integer timesteps for the three spacings, as
/// `DDIMScheduler.set_timesteps` computes them before reversing (shared by DDIM, DDPM, PNDM).
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Result<Vec<i64>> {
    if num_inference_steps == 0 || num_inference_steps > num_train_timesteps {
        return Err(EngineError::invalid(
            "steps",
            format!(
                "{num_inference_steps} inference steps asked for; the scheduler allows 1 to {num_train_timesteps}"
            ),
        ));
    }
    let n_train = num_train_timesteps as i64;
    let n = num_inference_steps;
    Ok(match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
            .into_iter()
            .map(|t| t.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = n_train / n as i64;
            (0..n as i64)
                .map(|i| i * ratio + steps_offset as i64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train_timesteps as f64 / n as f64;
            let mut t: Vec<i64> = np_arange_down(num_train_timesteps as f64, ratio)
                .into_iter()
                .map(|t| t.round_ties_even() as i64 - 1)
                .collect();
            t.reverse();
            t
        }
    })
}

/// Descending float timesteps of the sigma-based schedulers (Euler, Euler ancestral):
/// diffusers computes them in numpy and stores them as f32.
pub fn float_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Result<Vec<f32>> {
    if num_inference_steps == 0 {
        return Err(EngineError::invalid(
            "steps",
            "at least one inference step is needed",
        ));
    }
    let n_train = num_train_timesteps;
    let n = num_inference_steps;
    Ok(match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = n_train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as f32 + steps_offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange_down(n_train as f64, n_train as f64 / n as f64)
            .into_iter()
            .map(|t| t.round_ties_even() as f32 - 1.0)
            .collect(),
    })
}

/// `np.linspace(start, stop, num)` in f64: `i * step + start`, with the last value exactly `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = v.last_mut() {
        *last = stop;
    }
    v
}

/// `np.arange(start, 0, -step)` for floats: numpy fills `start + i·δ` where δ is the difference
/// of its first two values, `(start − step) − start`, not `−step` itself.
pub fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = (start / step).ceil().max(0.0) as usize;
    let delta = (start - step) - start;
    (0..len).map(|i| start + i as f64 * delta).collect()
}

/// `np.interp(x, arange(len(fp)), fp)` for `x` within `[0, len - 1]`.
pub fn np_interp_index(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len().saturating_sub(1);
    if x <= 0.0 {
        return fp.first().map_or(0.0, |&v| f64::from(v));
    }
    if x >= last as f64 {
        return fp.get(last).map_or(0.0, |&v| f64::from(v));
    }
    let j = x.floor() as usize;
    let (lo, hi) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    if x == j as f64 {
        return lo;
    }
    (hi - lo) * (x - j as f64) + lo
}

/// Diffusers' `_sigma_to_t`: the (fractional) training timestep of `sigma`, interpolating
/// linearly in log-sigma.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // argmax of the cumulative count of `log_sigma >= log_sigmas[i]`: the last such index.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l >= 0.0)
        .unwrap_or(0)
        .min(n.saturating_sub(2));
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// Diffusers' `_convert_to_karras` with ρ = 7, from `sigma_max` down to `sigma_min`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, num_inference_steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, num_inference_steps)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Diffusers' `_threshold_sample` (Imagen's dynamic thresholding): per batch item, `s` is the
/// `ratio` quantile of |x| clamped to `[1, max_value]`, and x becomes `clamp(x, -s, s) / s`.
/// The quantile is computed on the host (one read of a small tensor per step).
///
/// # Shapes
/// - x: `[batch, channels, height, width]`
pub fn threshold_sample<B: Backend>(
    x: Tensor<B, 4>,
    ratio: f64,
    max_value: f64,
) -> Result<Tensor<B, 4>> {
    let dims = x.dims();
    let per_item = dims[1] * dims[2] * dims[3];
    let data = x
        .clone()
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| {
            EngineError::Unsupported(format!("reading a sample for thresholding: {e:?}"))
        })?;
    let mut bounds = Vec::with_capacity(dims[0]);
    for item in data.chunks(per_item.max(1)) {
        let mut abs: Vec<f32> = item.iter().map(|v| v.abs()).collect();
        abs.sort_unstable_by(f32::total_cmp);
        bounds.push(quantile_sorted(&abs, ratio).clamp(1.0, max_value.max(1.0)) as f32);
    }
    let device = x.device();
    let s = Tensor::<B, 4>::from_data(
        TensorData::new(bounds, [dims[0], 1, 1, 1]),
        (&device, x.dtype()),
    )
    .expand(dims);
    Ok(x.max_pair(s.clone().neg()).min_pair(s.clone()).div(s))
}

/// `torch.quantile(values, q)` with linear interpolation, on ascending values.
fn quantile_sorted(sorted: &[f32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let below = rank.floor() as usize;
    let above = rank.ceil() as usize;
    let (lo, hi) = (f64::from(sorted[below]), f64::from(sorted[above]));
    lo + (hi - lo) * (rank - below as f64)
}

/// One Gaussian draw shaped like `like` (diffusers' `randn_tensor(model_output.shape, …)`),
/// on its device and in its dtype.
pub fn randn_like<B: Backend>(
    noise: &mut dyn NoiseSource,
    like: &Tensor<B, 4>,
) -> Result<Tensor<B, 4>> {
    let dims = like.dims();
    let values = noise.randn(&dims)?;
    Ok(Tensor::from_data(
        TensorData::new(values, dims),
        (&like.device(), like.dtype()),
    ))
}

/// The error for an invalid scheduler config.
pub fn config_error(message: impl Into<String>) -> EngineError {
    EngineError::Config {
        path: PathBuf::from("scheduler config"),
        message: message.into(),
    }
}

/// Config keys of diffusers schedulers other than the one being built; `extract_init_dict`
/// drops these quietly when a config is reused across scheduler classes.
const OTHER_SCHEDULER_KEYS: &[&str] = &[
    "algorithm_type",
    "beta_end",
    "beta_schedule",
    "beta_start",
    "clip_sample",
    "clip_sample_range",
    "dynamic_thresholding_ratio",
    "euler_at_final",
    "final_sigmas_type",
    "flow_shift",
    "interpolation_type",
    "lambda_min_clipped",
    "lower_order_final",
    "num_train_timesteps",
    "prediction_type",
    "rescale_betas_zero_snr",
    "sample_max_value",
    "set_alpha_to_one",
    "shift",
    "sigma_max",
    "sigma_min",
    "skip_prk_steps",
    "solver_order",
    "solver_type",
    "steps_offset",
    "thresholding",
    "time_shift_type",
    "timestep_spacing",
    "timestep_type",
    "trained_betas",
    "use_beta_sigmas",
    "use_dynamic_shifting",
    "use_exponential_sigmas",
    "use_flow_sigmas",
    "use_karras_sigmas",
    "use_lu_lambdas",
    "variance_type",
    "predict_x0",
    "disable_corrector",
    "solver_p",
    "s_noise",
    "rho",
    "sigma_data",
    "timestep_scaling",
    "original_inference_steps",
    "c",
    "noise_sampler_seed",
    "lambda_min",
];

/// Keys of a config that no diffusers scheduler knows (those are warned about).
pub fn unknown_keys<C: Serialize + Default>(json: &Value) -> Vec<String> {
    let known = known_keys::<C>();
    json.as_object()
        .map(|obj| {
            obj.keys()
                .filter(|k| !k.starts_with('_') && !known.contains(k.as_str()))
                .filter(|k| !OTHER_SCHEDULER_KEYS.contains(&k.as_str()))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

fn known_keys<C: Serialize + Default>() -> BTreeSet<String> {
    match serde_json::to_value(C::default()) {
        Ok(Value::Object(map)) => map.into_iter().map(|(k, _)| k).collect(),
        _ => BTreeSet::new(),
    }
}

/// Diffusers' `from_config` for one class: the keys the class knows are read (missing ones and
/// `null`s take the class's defaults, as do keys listed in `_use_default_values`), private
/// `_…` keys and keys of other diffusers schedulers are dropped quietly, and anything else is
/// warned about and ignored.
pub fn parse_config<C: DeserializeOwned + Serialize + Default>(
    json: &Value,
    class: &str,
) -> Result<C> {
    let obj = json
        .as_object()
        .ok_or_else(|| config_error(format!("{class} config must be a JSON object")))?;
    let known = known_keys::<C>();
    let use_defaults: BTreeSet<&str> = obj
        .get("_use_default_values")
        .and_then(Value::as_array)
        .map(|keys| keys.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut clean = Map::new();
    for (key, value) in obj {
        if known.contains(key) {
            if !value.is_null() && !use_defaults.contains(key.as_str()) {
                clean.insert(key.clone(), value.clone());
            }
        } else if key.starts_with('_') || OTHER_SCHEDULER_KEYS.contains(&key.as_str()) {
            tracing::debug!("{class}: ignoring config key `{key}` (not used by this scheduler)");
        } else {
            tracing::warn!("{class}: unknown config key `{key}` = {value} is ignored");
        }
    }
    serde_json::from_value(Value::Object(clean)).map_err(|e| config_error(format!("{class}: {e}")))
}

/// The timestep at `step_index`, or an error naming the schedule's length.
pub fn timestep_at(timesteps: &[f64], step_index: usize) -> Result<f64> {
    timesteps.get(step_index).copied().ok_or_else(|| {
        EngineError::invalid(
            "step_index",
            format!(
                "step {step_index} is past the schedule of {} timesteps (call set_timesteps first)",
                timesteps.len()
            ),
        )
    })
}

/// The sigma at step `index` of a sigma schedule (diffusers' `self.sigmas[step_index]`); past
/// the end, the last one (0).
pub fn sigma_at(sigmas: &[f64], index: usize) -> f64 {
    sigmas.get(index).or(sigmas.last()).copied().unwrap_or(0.0)
}

/// `init_noise_sigma` of the Euler schedulers: σmax, or sqrt(σmax² + 1) with leading spacing.
pub fn sigma_init_noise(sigmas: &[f64], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(0.0, f64::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    }
}

/// What the Euler schedulers' `__init__` computes from the betas: the training sigmas
/// `√((1−ᾱ)/ᾱ)` ascending in t (diffusers' f32 values) and, until `set_timesteps`, every
/// training sigma descending plus a final 0, with the training timesteps descending.
/// With `rescale_betas_zero_snr` the last ᾱ is set to 2⁻²⁴ so its sigma stays finite, as
/// diffusers does.
pub fn training_sigma_schedule(betas: &BetaConfig<'_>) -> Result<(Vec<f32>, Vec<f64>, Vec<f64>)> {
    let mut schedule = NoiseSchedule::new(betas)?;
    if betas.rescale_betas_zero_snr
        && let Some(last) = schedule.alphas_cumprod.last_mut()
    {
        *last = 2f32.powi(-24);
    }
    let train_sigmas = schedule.training_sigmas();
    let mut sigmas: Vec<f64> = train_sigmas.iter().rev().map(|&s| f64::from(s)).collect();
    sigmas.push(0.0);
    let timesteps = (0..betas.num_train_timesteps)
        .rev()
        .map(|t| t as f64)
        .collect();
    Ok((train_sigmas, sigmas, timesteps))
}

/// One Euler step of the probability-flow ODE from `sigma` to `sigma_to` (k-diffusion's
/// `to_d` and the step both Euler schedulers take): `x + (x − x̂₀)/σ · (σ_to − σ)`.
///
/// # Shapes
/// - sample, pred_original: `[batch, channels, height, width]`
pub fn euler_step<B: Backend>(
    sample: Tensor<B, 4>,
    pred_original: Tensor<B, 4>,
    sigma: f64,
    sigma_to: f64,
) -> Tensor<B, 4> {
    let derivative = sample.clone().sub(pred_original).div_scalar(sigma);
    sample.add(derivative.mul_scalar(sigma_to - sigma))
}

/// The Euler schedulers' `scale_model_input`: the sample divided by sqrt(σ² + 1).
///
/// # Shapes
/// - sample: `[batch, channels, height, width]`
pub fn scale_by_sigma<B: Backend>(sample: Tensor<B, 4>, sigma: f64) -> Tensor<B, 4> {
    sample.div_scalar((sigma * sigma + 1.0).sqrt())
}

/// The Euler schedulers' `pred_original_sample` (x₀) at `sigma`: from ε as `x − σ·ε`, from v as
/// `v·(−σ/√(σ²+1)) + x/(σ²+1)`; a `sample` model's output is x₀ itself.
///
/// # Shapes
/// - model_output, sample: `[batch, channels, height, width]`
pub fn sigma_pred_original<B: Backend>(
    prediction: PredictionType,
    model_output: Tensor<B, 4>,
    sample: &Tensor<B, 4>,
    sigma: f64,
) -> Tensor<B, 4> {
    match prediction {
        PredictionType::Sample => model_output,
        PredictionType::VPrediction => model_output
            .mul_scalar(-sigma / (sigma * sigma + 1.0).sqrt())
            .add(sample.clone().div_scalar(sigma * sigma + 1.0)),
        PredictionType::Epsilon | PredictionType::FlowPrediction => {
            sample.clone().sub(model_output.mul_scalar(sigma))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_arange_uses_numpy_delta() {
        // 1000 / 3 does not divide evenly: numpy's values are 1000, 666.67, 333.33.
        assert_eq!(
            spaced_timesteps(TimestepSpacing::Trailing, 1000, 3, 0).ok(),
            Some(vec![332, 666, 999])
        );
    }

    #[test]
    fn quantile_interpolates() {
        assert!((quantile_sorted(&[0.0, 1.0, 2.0, 3.0], 0.5) - 1.5).abs() < 1e-12);
    }
}
