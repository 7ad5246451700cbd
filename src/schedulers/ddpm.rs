//! `DDPMScheduler` (Ho et al. 2020), including the training helpers `add_noise` and
//! `get_velocity`.

use super::config::SchedulerConfig;
use super::discrete::DiscreteSchedule;
use super::math::{f32, lincomb, step_x0_eps};
use super::{Scheduler, StepInput};
use anyhow::bail;
use candle_core::{Result, Tensor};

/// DDPM posterior variance choice (`variance_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // diffusers' names: fixed_small, fixed_small_log, fixed_large
enum VarianceType {
    FixedSmall,
    FixedSmallLog,
    FixedLarge,
}

/// Denoising diffusion probabilistic model scheduler.
pub struct DdpmScheduler {
    schedule: DiscreteSchedule,
    variance: VarianceType,
}

impl DdpmScheduler {
    /// Builds the scheduler; before `set_timesteps` its timesteps are T−1 … 0.
    pub fn new(config: &SchedulerConfig) -> anyhow::Result<Self> {
        let variance = match config.variance_type.as_deref().unwrap_or("fixed_small") {
            "fixed_small" => VarianceType::FixedSmall,
            "fixed_small_log" => VarianceType::FixedSmallLog,
            "fixed_large" => VarianceType::FixedLarge,
            other => bail!(
                "DDPMScheduler: variance_type {other:?} is not supported (fixed_small, fixed_small_log, fixed_large)"
            ),
        };
        Ok(Self {
            schedule: DiscreteSchedule::new(config),
            variance,
        })
    }

    /// ᾱ_t for every training timestep (float32 values as diffusers holds them).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.schedule.alphas_cumprod
    }

    /// Per-item (√ᾱ_t, √(1−ᾱ_t)) as [B, 1, …, 1] float32 tensors for `reference`'s rank.
    fn coefficients(&self, reference: &Tensor, timesteps: &[usize]) -> Result<(Tensor, Tensor)> {
        let b = reference.dim(0)?;
        if timesteps.len() != b {
            candle_core::bail!(
                "DDPMScheduler: {} timesteps for a batch of {b}",
                timesteps.len()
            );
        }
        let mut sa = Vec::with_capacity(b);
        let mut sb = Vec::with_capacity(b);
        for &t in timesteps {
            let a = *self.schedule.alphas_cumprod.get(t).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "DDPMScheduler: timestep {t} outside [0, {})",
                    self.schedule.alphas_cumprod.len()
                ))
            })? as f32;
            sa.push(a.sqrt());
            sb.push((1.0f32 - a).sqrt());
        }
        let mut shape = vec![1usize; reference.rank()];
        shape[0] = b;
        let sa = Tensor::from_vec(sa, shape.as_slice(), reference.device())?;
        let sb = Tensor::from_vec(sb, shape.as_slice(), reference.device())?;
        Ok((sa, sb))
    }

    /// Forward diffusion: √ᾱ_t·x₀ + √(1−ᾱ_t)·ε per batch item.
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        let (sa, sb) = self.coefficients(original, timesteps)?;
        let out = (f32(original)?.broadcast_mul(&sa)? + f32(noise)?.broadcast_mul(&sb)?)?;
        out.to_dtype(original.dtype())
    }

    /// v-prediction target: √ᾱ_t·ε − √(1−ᾱ_t)·x₀ per batch item.
    pub fn get_velocity(
        &self,
        sample: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        let (sa, sb) = self.coefficients(sample, timesteps)?;
        let out = (f32(noise)?.broadcast_mul(&sa)? - f32(sample)?.broadcast_mul(&sb)?)?;
        out.to_dtype(sample.dtype())
    }

    /// The timestep after `t` in the schedule (−1 after the last one).
    fn previous_timestep(&self, t: usize) -> Result<i64> {
        if self.schedule.num_inference_steps.is_none() {
            return Ok(t as i64 - 1);
        }
        let idx = self
            .schedule
            .timesteps
            .iter()
            .position(|&x| x == t as f64)
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "DDPMScheduler: timestep {t} is not in the schedule"
                ))
            })?;
        Ok(self
            .schedule
            .timesteps
            .get(idx + 1)
            .map_or(-1, |&p| p as i64))
    }
}

impl Scheduler for DdpmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.schedule
            .set_timesteps(num_inference_steps, "DDPMScheduler")
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn needs_noise(&self) -> bool {
        true
    }

    fn step_with(&mut self, input: StepInput<'_>) -> Result<Tensor> {
        let t = self.schedule.integer(input.timestep, "DDPMScheduler")?;
        let prev_t = self.previous_timestep(t)?;
        let (alpha_t, alpha_prev) = self.schedule.alphas(t, prev_t, 1.0);
        let (beta_t, beta_prev) = (1.0 - alpha_t, 1.0 - alpha_prev);
        let current_alpha = alpha_t / alpha_prev;
        let current_beta = 1.0 - current_alpha;

        let (mo, sample) = (input.model_output, input.sample);
        let (x, x0, _) = step_x0_eps(&self.schedule.config, mo, sample, alpha_t)?;
        let c_x0 = alpha_prev.sqrt() * current_beta / beta_t;
        let c_x = current_alpha.sqrt() * beta_prev / beta_t;
        let mut prev = lincomb(&x0, c_x0, &x, c_x)?;
        if t > 0 {
            let variance = (beta_prev / beta_t * current_beta).max(1e-20);
            let std = match self.variance {
                VarianceType::FixedSmall | VarianceType::FixedSmallLog => variance.sqrt(),
                VarianceType::FixedLarge => current_beta.sqrt(),
            };
            prev = input.add_noise(prev, std, "DDPMScheduler")?;
        }
        prev.to_dtype(sample.dtype())
    }
}
