//! `scheduler_config.json` (the union of the diffusers 0.35.2 scheduler arguments) and the
//! beta / alpha schedules, reproduced at diffusers' float32 precision.

use anyhow::{bail, Context};
use serde::Deserialize;
use std::path::Path;

/// What the denoising model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise ε.
    #[default]
    Epsilon,
    /// v = √ᾱ·ε − √(1−ᾱ)·x₀.
    VPrediction,
    /// The clean sample x₀ (`original_sample` is accepted as an alias, as Euler does).
    #[serde(alias = "original_sample")]
    Sample,
}

/// How betas are laid out over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end)`.
    #[default]
    Linear,
    /// `linspace(√beta_start, √beta_end)²` (Stable Diffusion).
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal, betas capped at 0.999.
    SquaredcosCapV2,
    /// `sigmoid(linspace(-6, 6)) · (beta_end − beta_start) + beta_start` (DDPM only).
    Sigmoid,
}

/// How inference timesteps are spaced (Table 2 of "Common Diffusion Noise Schedules and
/// Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `arange(0, N) · (T // N) + steps_offset`, descending.
    Leading,
    /// `round(arange(T, 0, −T/N)) − 1`.
    Trailing,
    /// `linspace(0, T − 1, N)`, descending.
    Linspace,
}

/// Every field a diffusers 0.35.2 DDPM / DDIM / Euler / Euler-ancestral / DPM-Solver
/// multistep config may hold, with diffusers' defaults; unknown fields are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// `_class_name`, e.g. `"PNDMScheduler"`.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Number of training timesteps T (1000).
    pub num_train_timesteps: usize,
    /// First beta (0.0001).
    pub beta_start: f64,
    /// Last beta (0.02).
    pub beta_end: f64,
    /// Beta layout (linear).
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding the schedule (null).
    pub trained_betas: Option<Vec<f64>>,
    /// What the model predicts (epsilon).
    pub prediction_type: PredictionType,
    /// Offset added to leading-spaced timesteps (0).
    pub steps_offset: usize,
    /// DDIM: use ᾱ = 1 before the first timestep (true); otherwise ᾱ₀.
    pub set_alpha_to_one: bool,
    /// DDPM / DDIM: clamp the predicted x₀ (true).
    pub clip_sample: bool,
    /// Clamp range for `clip_sample` (1.0).
    pub clip_sample_range: f64,
    /// Dynamic thresholding of x₀ (false).
    pub thresholding: bool,
    /// Percentile for dynamic thresholding (0.995).
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound of the dynamic threshold (1.0).
    pub sample_max_value: f64,
    /// Timestep spacing; `None` means the class default (leading for DDPM/DDIM,
    /// linspace for Euler, Euler-a and DPM-Solver).
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Rescale betas to zero terminal SNR (false).
    pub rescale_betas_zero_snr: bool,
    /// DDPM variance type (`fixed_small`); DPM's `learned*` variants.
    pub variance_type: Option<String>,
    /// Euler / DPM: Karras sigmas (false).
    pub use_karras_sigmas: bool,
    /// Euler / DPM: exponential sigmas (false).
    pub use_exponential_sigmas: bool,
    /// Euler / DPM: beta-distribution sigmas (false; not supported here).
    pub use_beta_sigmas: bool,
    /// DPM: uniform-logSNR lambdas (false).
    pub use_lu_lambdas: bool,
    /// DPM: flow-matching sigmas (false; not supported here).
    pub use_flow_sigmas: bool,
    /// Karras / exponential sigma range override.
    pub sigma_min: Option<f64>,
    /// Karras / exponential sigma range override.
    pub sigma_max: Option<f64>,
    /// Euler sigma interpolation: `linear` or `log_linear`.
    pub interpolation_type: String,
    /// Euler timestep type: `discrete` or `continuous`.
    pub timestep_type: String,
    /// Euler / DPM final sigma: `zero` or `sigma_min`.
    pub final_sigmas_type: String,
    /// DPM solver order (2).
    pub solver_order: usize,
    /// DPM algorithm: `dpmsolver++`, `sde-dpmsolver++`, `dpmsolver`, `sde-dpmsolver`.
    pub algorithm_type: String,
    /// DPM second-order solver: `midpoint` or `heun`.
    pub solver_type: String,
    /// DPM: lower-order steps at the end for fewer than 15 steps (true).
    pub lower_order_final: bool,
    /// DPM: first-order final step (false).
    pub euler_at_final: bool,
    /// DPM: clip lambda(t) from below (−∞; JSON null or -Infinity read as −∞).
    pub lambda_min_clipped: Option<f64>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            steps_offset: 0,
            set_alpha_to_one: true,
            clip_sample: true,
            clip_sample_range: 1.0,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            timestep_spacing: None,
            rescale_betas_zero_snr: false,
            variance_type: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            interpolation_type: "linear".to_string(),
            timestep_type: "discrete".to_string(),
            final_sigmas_type: "zero".to_string(),
            solver_order: 2,
            algorithm_type: "dpmsolver++".to_string(),
            solver_type: "midpoint".to_string(),
            lower_order_final: true,
            euler_at_final: false,
            lambda_min_clipped: None,
        }
    }
}

/// Replaces the non-JSON tokens Python's `json.dumps` writes (`NaN`, `Infinity`,
/// `-Infinity`) outside strings by `null`.
fn sanitize_python_json(text: &str) -> String {
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
        match token {
            Some(t) => {
                out.push_str("null");
                rest = &rest[t.len()..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

impl SchedulerConfig {
    /// Parses a `scheduler_config.json` text; keys listed in `_use_default_values` fall back
    /// to the defaults, as diffusers' `from_config` does.
    pub fn from_json_str(text: &str) -> anyhow::Result<Self> {
        let mut value: serde_json::Value = serde_json::from_str(&sanitize_python_json(text))?;
        let Some(obj) = value.as_object_mut() else {
            bail!("a scheduler config must be a JSON object");
        };
        if let Some(defaults) = obj.remove("_use_default_values") {
            for key in defaults.as_array().into_iter().flatten() {
                if let Some(k) = key.as_str() {
                    obj.remove(k);
                }
            }
        }
        obj.retain(|_, v| !v.is_null());
        let config: Self = serde_json::from_value(value)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a `scheduler_config.json` file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read scheduler config {}", path.display()))?;
        Self::from_json_str(&text)
            .with_context(|| format!("invalid scheduler config {}", path.display()))
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.num_train_timesteps < 2 {
            bail!(
                "num_train_timesteps must be at least 2, got {}",
                self.num_train_timesteps
            );
        }
        if self.num_train_timesteps > 1_000_000 {
            bail!(
                "num_train_timesteps {} is beyond the supported maximum 1000000",
                self.num_train_timesteps
            );
        }
        let (b0, b1) = (self.beta_start, self.beta_end);
        if self.trained_betas.is_none() && !(b0 > 0.0 && b0 <= b1 && b1 < 1.0) {
            bail!("beta_start {b0} and beta_end {b1} must satisfy 0 < beta_start <= beta_end < 1");
        }
        if let Some(b) = &self.trained_betas {
            if let Some(x) = b.iter().find(|x| !(**x > 0.0 && **x < 1.0)) {
                bail!("trained_betas holds {x}; every beta must be in (0, 1)");
            }
            if b.len() != self.num_train_timesteps {
                bail!(
                    "trained_betas has {} values, expected num_train_timesteps = {}",
                    b.len(),
                    self.num_train_timesteps
                );
            }
        }
        Ok(())
    }

    /// The configured spacing, or `default` when the config leaves it unset.
    pub fn spacing_or(&self, default: TimestepSpacing) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(default)
    }

    /// λ lower clip (−∞ unless set).
    pub fn lambda_min_clipped(&self) -> f64 {
        self.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY)
    }
}

/// `torch.linspace(start, end, n, dtype=torch.float32)` bit for bit: the step is a float32
/// division; each value is `start + step·i` (first half) or `end − step·(n−1−i)` (second
/// half), rounded once to float32.
pub fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n <= 1 {
        return vec![s; n];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                (s as f64 + step as f64 * i as f64) as f32
            } else {
                (e as f64 - step as f64 * (n - 1 - i) as f64) as f32
            }
        })
        .collect()
}

/// The cosine ᾱ(t) of `betas_for_alpha_bar` (f64, as Python floats), betas capped at 0.999.
fn squaredcos_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod` of float32 values (accumulated in double, each output rounded to f32).
fn cumprod_f32(x: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    x.iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// `rescale_zero_terminal_snr` (Lin et al. 2023, Algorithm 1) in float32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_bar[0];
    let last = sqrt_bar[sqrt_bar.len() - 1];
    let scale = first / (first - last);
    for v in sqrt_bar.iter_mut() {
        *v = (*v - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// The training betas as diffusers stores them (float32 tensor).
pub fn betas(config: &SchedulerConfig) -> Vec<f32> {
    let n = config.num_train_timesteps;
    let betas = if let Some(b) = &config.trained_betas {
        b.iter().map(|&v| v as f32).collect()
    } else {
        match config.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(config.beta_start, config.beta_end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|v| v * v)
                    .collect()
            }
            BetaSchedule::SquaredcosCapV2 => squaredcos_betas(n),
            BetaSchedule::Sigmoid => {
                let span = config.beta_end - config.beta_start;
                torch_linspace_f32(-6.0, 6.0, n)
                    .into_iter()
                    .map(|x| {
                        let s = (1.0 / (1.0 + (-(x as f64)).exp())) as f32;
                        s * span as f32 + config.beta_start as f32
                    })
                    .collect()
            }
        }
    };
    if config.rescale_betas_zero_snr {
        rescale_zero_terminal_snr(&betas)
    } else {
        betas
    }
}

/// ᾱ_t = ∏(1 − β) as diffusers computes it (float32 values, returned as f64).
pub fn alphas_cumprod(config: &SchedulerConfig) -> Vec<f64> {
    let alphas: Vec<f32> = betas(config).iter().map(|b| 1.0 - b).collect();
    cumprod_f32(&alphas).into_iter().map(f64::from).collect()
}

/// Checks that the sigma-based schedulers can honour the config's sigma options.
pub(crate) fn check_sigma_options(config: &SchedulerConfig, class: &str) -> anyhow::Result<()> {
    let chosen = [
        config.use_karras_sigmas,
        config.use_exponential_sigmas,
        config.use_beta_sigmas,
    ]
    .iter()
    .filter(|&&b| b)
    .count();
    if chosen > 1 {
        bail!("{class}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set");
    }
    if config.use_beta_sigmas {
        bail!("{class}: use_beta_sigmas is not supported");
    }
    if config.beta_schedule == BetaSchedule::Sigmoid {
        bail!("{class}: beta_schedule \"sigmoid\" is only implemented by DDPM");
    }
    Ok(())
}
