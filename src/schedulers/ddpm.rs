//! `DDPMScheduler` (Ho et al. 2020), including the training helpers `add_noise` and
//! `get_velocity`.

use super::config::{alphas_cumprod, SchedulerConfig};
use super::math::{check_num_steps, f32, integer_timestep, lincomb, require_noise, step_x0_eps};
use super::schedule::discrete_timesteps;
use super::Scheduler;
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
    config: SchedulerConfig,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
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
        let n = config.num_train_timesteps;
        Ok(Self {
            config: config.clone(),
            alphas_cumprod: alphas_cumprod(config),
            timesteps: (0..n).rev().map(|t| t as f64).collect(),
            num_inference_steps: None,
            variance,
        })
    }

    /// ᾱ_t for every training timestep (float32 values as diffusers holds them).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
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
            let a = *self.alphas_cumprod.get(t).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "DDPMScheduler: timestep {t} outside [0, {})",
                    self.alphas_cumprod.len()
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
        if self.num_inference_steps.is_none() {
            return Ok(t as i64 - 1);
        }
        let idx = self
            .timesteps
            .iter()
            .position(|&x| x == t as f64)
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "DDPMScheduler: timestep {t} is not in the schedule"
                ))
            })?;
        Ok(self.timesteps.get(idx + 1).map_or(-1, |&p| p as i64))
    }
}

impl Scheduler for DdpmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n = self.config.num_train_timesteps;
        check_num_steps(num_inference_steps, n, "DDPMScheduler")?;
        self.timesteps = discrete_timesteps(&self.config, num_inference_steps);
        self.num_inference_steps = Some(num_inference_steps);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn needs_noise(&self) -> bool {
        true
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let t = integer_timestep(timestep, self.config.num_train_timesteps, "DDPMScheduler")?;
        let prev_t = self.previous_timestep(t)?;
        let alpha_t = self.alphas_cumprod[t];
        let alpha_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            1.0
        };
        let (beta_t, beta_prev) = (1.0 - alpha_t, 1.0 - alpha_prev);
        let current_alpha = alpha_t / alpha_prev;
        let current_beta = 1.0 - current_alpha;

        let (x, x0, _) = step_x0_eps(&self.config, model_output, sample, alpha_t)?;
        let c_x0 = alpha_prev.sqrt() * current_beta / beta_t;
        let c_x = current_alpha.sqrt() * beta_prev / beta_t;
        let mut prev = lincomb(&x0, c_x0, &x, c_x)?;
        if t > 0 {
            let noise = f32(require_noise(noise, "DDPMScheduler")?)?;
            let variance = (beta_prev / beta_t * current_beta).max(1e-20);
            let std = match self.variance {
                VarianceType::FixedSmall | VarianceType::FixedSmallLog => variance.sqrt(),
                VarianceType::FixedLarge => current_beta.sqrt(),
            };
            prev = (prev + noise.affine(std, 0.0)?)?;
        }
        prev.to_dtype(sample.dtype())
    }
}
