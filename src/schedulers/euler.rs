//! `EulerDiscreteScheduler` (Karras et al. 2022, Algorithm 2 without churn).

use super::config::{
    alphas_cumprod, check_sigma_options, PredictionType, SchedulerConfig, TimestepSpacing,
};
use super::discrete::train_timesteps;
use super::math::{check_num_steps, f32};
use super::schedule::{
    exponential_sigmas, index_for_timestep, interp, karras_sigmas, log_sigmas, sigma_to_t,
    spaced_timesteps, train_sigmas,
};
use super::{Scheduler, StepInput};
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

/// The state Euler and Euler-a share: config, training sigmas and the current schedule.
pub(crate) struct SigmaSchedule {
    pub config: SchedulerConfig,
    pub train_sigmas: Vec<f64>,
    pub timesteps: Vec<f64>,
    /// σ per timestep, then the final σ.
    pub sigmas: Vec<f64>,
    pub step_index: Option<usize>,
    /// The class name errors start with.
    who: &'static str,
}

impl SigmaSchedule {
    /// The schedule before `set_timesteps`: every training timestep, σ descending then 0.
    pub fn new(config: &SchedulerConfig, who: &'static str) -> anyhow::Result<Self> {
        check_sigma_options(config, who)?;
        let train = train_sigmas(&sigma_alphas_cumprod(config));
        let mut sigmas: Vec<f64> = train.iter().rev().copied().collect();
        sigmas.push(0.0);
        Ok(Self {
            config: config.clone(),
            train_sigmas: train,
            timesteps: train_timesteps(config.num_train_timesteps),
            sigmas,
            step_index: None,
            who,
        })
    }

    /// The configured spacing (linspace by default).
    pub fn spacing(&self) -> TimestepSpacing {
        self.config.spacing_or(TimestepSpacing::Linspace)
    }

    /// The step index for `timestep`: the running index once stepping started, else the
    /// timestep's position in the schedule (an error when it is not there).
    pub fn index(&self, timestep: f64) -> Result<usize> {
        match self.step_index {
            Some(i) => Ok(i),
            None => index_for_timestep(&self.timesteps, timestep).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "{}: timestep {timestep} is not in the schedule",
                    self.who
                ))
            }),
        }
    }

    /// `init_noise_sigma`: σ_max for linspace / trailing, else √(σ_max²+1).
    pub fn init_noise_sigma(&self) -> f64 {
        euler_init_noise_sigma(&self.sigmas, self.spacing())
    }

    /// `scale_model_input`: `sample / √(σ²+1)` at `timestep`'s σ.
    pub fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        scale_by_sigma(sample, self.sigmas[self.index(timestep)?])
    }

    /// The spaced inference timesteps (float32 values) after checking the step count.
    pub fn spaced_timesteps(&self, num_inference_steps: usize) -> Result<Vec<f64>> {
        let c = &self.config;
        let n = c.num_train_timesteps;
        check_num_steps(num_inference_steps, n, self.who)?;
        Ok(spaced_timesteps(
            self.spacing(),
            n,
            num_inference_steps,
            c.steps_offset,
            false,
        )
        .into_iter()
        .map(|t| f64::from(t as f32))
        .collect())
    }

    /// Installs a new schedule and restarts stepping.
    pub fn reset(&mut self, timesteps: Vec<f64>, sigmas: Vec<f64>) {
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.step_index = None;
    }

    /// The step prelude: (index, σ, sample in float32, Euler derivative).
    pub fn derivative(&self, input: &StepInput<'_>) -> Result<(usize, f64, Tensor, Tensor)> {
        let i = self.index(input.timestep)?;
        if i + 1 >= self.sigmas.len() {
            candle_core::bail!("{}: step called after the last timestep", self.who);
        }
        let sigma = self.sigmas[i];
        let (mo, x) = (f32(input.model_output)?, f32(input.sample)?);
        let x0 = sigma_x0(self.config.prediction_type, &mo, &x, sigma)?;
        let derivative = (&x - &x0)?.affine(1.0 / sigma, 0.0)?;
        Ok((i, sigma, x, derivative))
    }

    /// Advances past step `i` and returns `prev` in the model output's dtype.
    pub fn finish(&mut self, i: usize, prev: Tensor, input: &StepInput<'_>) -> Result<Tensor> {
        self.step_index = Some(i + 1);
        prev.to_dtype(input.model_output.dtype())
    }
}

/// Expands, inside an `impl Scheduler` of Euler / Euler-a (field `schedule`, a
/// [`SigmaSchedule`]), to `timesteps`, `init_noise_sigma`, `scale_model_input` and `sigmas`.
macro_rules! euler_schedule_accessors {
    () => {
        fn timesteps(&self) -> &[f64] {
            &self.schedule.timesteps
        }

        fn init_noise_sigma(&self) -> f64 {
            self.schedule.init_noise_sigma()
        }

        fn scale_model_input(
            &self,
            sample: &candle_core::Tensor,
            timestep: f64,
        ) -> candle_core::Result<candle_core::Tensor> {
            self.schedule.scale_model_input(sample, timestep)
        }

        fn sigmas(&self) -> Option<&[f64]> {
            Some(&self.schedule.sigmas)
        }
    };
}
pub(crate) use euler_schedule_accessors;

/// Euler sampler over the Karras-style sigma schedule.
pub struct EulerDiscreteScheduler {
    schedule: SigmaSchedule,
    continuous_v: bool,
}

impl EulerDiscreteScheduler {
    /// Builds the scheduler (its initial schedule covers every training timestep).
    pub fn new(config: &SchedulerConfig) -> anyhow::Result<Self> {
        let mut schedule = SigmaSchedule::new(config, "EulerDiscreteScheduler")?;
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
        if continuous_v {
            schedule.timesteps = continuous_timesteps(&schedule.sigmas);
        }
        Ok(Self {
            schedule,
            continuous_v,
        })
    }
}

/// Continuous v-prediction timesteps `0.25·ln σ` (float32) for every σ but the final one.
fn continuous_timesteps(sigmas: &[f64]) -> Vec<f64> {
    sigmas[..sigmas.len() - 1]
        .iter()
        .map(|&s| f64::from(0.25 * (s as f32).ln()))
        .collect()
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let s = &self.schedule;
        let c = &s.config;
        let mut timesteps = s.spaced_timesteps(num_inference_steps)?;
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| interp(t, &s.train_sigmas))
            .collect();
        if c.use_karras_sigmas || c.use_exponential_sigmas {
            let lo = c.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let hi = c.sigma_max.unwrap_or(sigmas[0]);
            sigmas = if c.use_karras_sigmas {
                karras_sigmas(lo, hi, num_inference_steps)
            } else {
                exponential_sigmas(lo, hi, num_inference_steps)
            };
            let logs = log_sigmas(&s.train_sigmas);
            timesteps = sigmas
                .iter()
                .map(|&s| f64::from(sigma_to_t(s, &logs) as f32))
                .collect();
        }
        let last = if c.final_sigmas_type == "sigma_min" {
            s.train_sigmas[0]
        } else {
            0.0
        };
        sigmas.push(last);
        let sigmas: Vec<f64> = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();
        if self.continuous_v {
            timesteps = continuous_timesteps(&sigmas);
        }
        self.schedule.reset(timesteps, sigmas);
        Ok(())
    }

    euler_schedule_accessors!();

    fn needs_noise(&self) -> bool {
        false
    }

    fn step_with(&mut self, input: StepInput<'_>) -> Result<Tensor> {
        let (i, sigma, x, derivative) = self.schedule.derivative(&input)?;
        let dt = self.schedule.sigmas[i + 1] - sigma;
        let prev = (&x + derivative.affine(dt, 0.0)?)?;
        self.schedule.finish(i, prev, &input)
    }
}
