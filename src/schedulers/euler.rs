//! `EulerDiscreteScheduler` (Karras et al. 2022, Algorithm 2 without churn).

use super::config::{
    alphas_cumprod, check_sigma_options, PredictionType, SchedulerConfig, TimestepSpacing,
};
use super::math::{check_num_steps, f32};
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

/// The step index for `timestep`: the running index once stepping started, else the
/// timestep's position in `timesteps` (an error naming `who` when it is not there).
pub(crate) fn sigma_step_index(
    step_index: Option<usize>,
    timesteps: &[f64],
    timestep: f64,
    who: &str,
) -> Result<usize> {
    match step_index {
        Some(i) => Ok(i),
        None => index_for_timestep(timesteps, timestep).ok_or_else(|| {
            candle_core::Error::Msg(format!("{who}: timestep {timestep} is not in the schedule"))
        }),
    }
}

/// σ of step `i`, or an error naming `who` when no step follows it.
pub(crate) fn step_sigma(sigmas: &[f64], i: usize, who: &str) -> Result<f64> {
    if i + 1 >= sigmas.len() {
        candle_core::bail!("{who}: step called after the last timestep");
    }
    Ok(sigmas[i])
}

/// The Euler ODE derivative `(x - x₀(σ)) / σ` in float32.
pub(crate) fn euler_derivative(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
) -> Result<(Tensor, Tensor)> {
    let (mo, x) = (f32(model_output)?, f32(sample)?);
    let x0 = sigma_x0(prediction, &mo, &x, sigma)?;
    let derivative = (&x - &x0)?.affine(1.0 / sigma, 0.0)?;
    Ok((x, derivative))
}

/// Expands, inside an `impl Scheduler` of Euler / Euler-a (fields `timesteps`, `sigmas`;
/// methods `spacing`, `index`), to `timesteps`, `init_noise_sigma`, `scale_model_input`
/// and `sigmas`.
macro_rules! euler_schedule_accessors {
    () => {
        fn timesteps(&self) -> &[f64] {
            &self.timesteps
        }

        fn init_noise_sigma(&self) -> f64 {
            $crate::schedulers::euler::euler_init_noise_sigma(&self.sigmas, self.spacing())
        }

        fn scale_model_input(
            &self,
            sample: &candle_core::Tensor,
            timestep: f64,
        ) -> candle_core::Result<candle_core::Tensor> {
            $crate::schedulers::euler::scale_by_sigma(sample, self.sigmas[self.index(timestep)?])
        }

        fn sigmas(&self) -> Option<&[f64]> {
            Some(&self.sigmas)
        }
    };
}
pub(crate) use euler_schedule_accessors;

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
        sigma_step_index(
            self.step_index,
            &self.timesteps,
            timestep,
            "EulerDiscreteScheduler",
        )
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.config;
        let n = c.num_train_timesteps;
        check_num_steps(num_inference_steps, n, "EulerDiscreteScheduler")?;
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

    euler_schedule_accessors!();

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
        let sigma = step_sigma(&self.sigmas, i, "EulerDiscreteScheduler")?;
        let (x, derivative) =
            euler_derivative(self.config.prediction_type, model_output, sample, sigma)?;
        let dt = self.sigmas[i + 1] - sigma;
        let prev = (&x + derivative.affine(dt, 0.0)?)?;
        self.step_index = Some(i + 1);
        prev.to_dtype(model_output.dtype())
    }
}
