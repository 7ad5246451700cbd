//! `EulerDiscreteScheduler` (Karras et al. 2022, Algorithm 2 without churn).

use super::config::{
    alphas_cumprod, check_sigma_options, PredictionType, SchedulerConfig, TimestepSpacing,
};
use super::math::f32;
use super::schedule::{
    exponential_sigmas, index_for_timestep, interp, karras_sigmas, log_sigmas, sigma_to_t,
    spaced_timesteps, train_sigmas,
};
use super::Scheduler;
use anyhow::bail;
use candle_core::{Result, Tensor};

/// ᾱ as the sigma-based schedulers hold it: zero-SNR rescaling sets the last one to 2⁻²⁴.
pub(crate) fn sigma_alphas_cumprod(config: &SchedulerConfig) -> Vec<f64> {
    let mut ac = alphas_cumprod(config);
    if config.rescale_betas_zero_snr {
        if let Some(last) = ac.last_mut() {
            *last = 2f64.powi(-24);
        }
    }
    ac
}

/// `init_noise_sigma` of Euler / Euler-a: σ_max for linspace / trailing, else √(σ_max²+1).
pub(crate) fn euler_init_noise_sigma(sigmas: &[f64], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f64::NEG_INFINITY, f64::max) as f32;
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
    }
}

/// `sample / √(σ²+1)` in float32.
pub(crate) fn scale_by_sigma(sample: &Tensor, sigma: f64) -> Result<Tensor> {
    let s = sigma as f32;
    let denom = (s * s + 1.0).sqrt();
    f32(sample)?
        .affine(1.0 / denom as f64, 0.0)?
        .to_dtype(sample.dtype())
}

/// x₀ predicted at noise level σ (Euler / Euler-a convention).
pub(crate) fn sigma_x0(
    prediction: PredictionType,
    mo: &Tensor,
    x: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    match prediction {
        PredictionType::Epsilon => x - mo.affine(sigma, 0.0)?,
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            mo.affine(-sigma / s2.sqrt(), 0.0)? + x.affine(1.0 / s2, 0.0)?
        }
        PredictionType::Sample => Ok(mo.clone()),
    }
}

/// Euler sampler over the Karras-style sigma schedule.
pub struct EulerDiscreteScheduler {
    config: SchedulerConfig,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    step_index: Option<usize>,
    continuous_v: bool,
}

impl EulerDiscreteScheduler {
    /// Builds the scheduler (its initial schedule covers every training timestep).
    pub fn new(config: &SchedulerConfig) -> anyhow::Result<Self> {
        check_sigma_options(config, "EulerDiscreteScheduler")?;
        if config.interpolation_type != "linear" {
            bail!(
                "EulerDiscreteScheduler: interpolation_type {:?} is not supported (linear)",
                config.interpolation_type
            );
        }
        if !matches!(config.final_sigmas_type.as_str(), "zero" | "sigma_min") {
            bail!(
                "EulerDiscreteScheduler: final_sigmas_type must be zero or sigma_min, got {:?}",
                config.final_sigmas_type
            );
        }
        let continuous_v = match config.timestep_type.as_str() {
            "discrete" => false,
            "continuous" => config.prediction_type == PredictionType::VPrediction,
            other => bail!("EulerDiscreteScheduler: timestep_type must be discrete or continuous, got {other:?}"),
        };
        let train = train_sigmas(&sigma_alphas_cumprod(config));
        let mut sigmas: Vec<f64> = train.iter().rev().copied().collect();
        let n = config.num_train_timesteps;
        let timesteps = if continuous_v {
            sigmas
                .iter()
                .map(|&s| f64::from(0.25 * (s as f32).ln()))
                .collect()
        } else {
            (0..n).rev().map(|t| t as f64).collect()
        };
        sigmas.push(0.0);
        Ok(Self {
            config: config.clone(),
            train_sigmas: train,
            timesteps,
            sigmas,
            step_index: None,
            continuous_v,
        })
    }

    fn spacing(&self) -> TimestepSpacing {
        self.config.spacing_or(TimestepSpacing::Linspace)
    }

    fn index(&self, timestep: f64) -> Result<usize> {
        match self.step_index {
            Some(i) => Ok(i),
            None => index_for_timestep(&self.timesteps, timestep).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "EulerDiscreteScheduler: timestep {timestep} is not in the schedule"
                ))
            }),
        }
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.config;
        let n = c.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > n {
            candle_core::bail!("EulerDiscreteScheduler: num_inference_steps must be in 1..={n}, got {num_inference_steps}");
        }
        let mut timesteps: Vec<f64> = spaced_timesteps(
            self.spacing(),
            n,
            num_inference_steps,
            c.steps_offset,
            false,
        )
        .into_iter()
        .map(|t| f64::from(t as f32))
        .collect();
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| interp(t, &self.train_sigmas))
            .collect();
        if c.use_karras_sigmas || c.use_exponential_sigmas {
            let lo = c.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let hi = c.sigma_max.unwrap_or(sigmas[0]);
            sigmas = if c.use_karras_sigmas {
                karras_sigmas(lo, hi, num_inference_steps)
            } else {
                exponential_sigmas(lo, hi, num_inference_steps)
            };
            let logs = log_sigmas(&self.train_sigmas);
            timesteps = sigmas
                .iter()
                .map(|&s| f64::from(sigma_to_t(s, &logs) as f32))
                .collect();
        }
        let last = if c.final_sigmas_type == "sigma_min" {
            self.train_sigmas[0]
        } else {
            0.0
        };
        sigmas.push(last);
        let sigmas: Vec<f64> = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();
        if self.continuous_v {
            timesteps = sigmas[..sigmas.len() - 1]
                .iter()
                .map(|&s| f64::from(0.25 * (s as f32).ln()))
                .collect();
        }
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.step_index = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        euler_init_noise_sigma(&self.sigmas, self.spacing())
    }

    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        scale_by_sigma(sample, self.sigmas[self.index(timestep)?])
    }

    fn needs_noise(&self) -> bool {
        false
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let i = self.index(timestep)?;
        if i + 1 >= self.sigmas.len() {
            candle_core::bail!("EulerDiscreteScheduler: step called after the last timestep");
        }
        let sigma = self.sigmas[i];
        let (mo, x) = (f32(model_output)?, f32(sample)?);
        let x0 = sigma_x0(self.config.prediction_type, &mo, &x, sigma)?;
        let derivative = (&x - &x0)?.affine(1.0 / sigma, 0.0)?;
        let dt = self.sigmas[i + 1] - sigma;
        let prev = (&x + derivative.affine(dt, 0.0)?)?;
        self.step_index = Some(i + 1);
        prev.to_dtype(model_output.dtype())
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
}
