//! `DDIMScheduler` (Song et al. 2020) with eta, steps_offset, set_alpha_to_one and the
//! leading / trailing / linspace spacings.

use super::config::SchedulerConfig;
use super::discrete::DiscreteSchedule;
use super::math::{lincomb, step_x0_eps};
use super::{Scheduler, StepInput};
use candle_core::{Result, Tensor};

/// Denoising diffusion implicit model scheduler.
pub struct DdimScheduler {
    schedule: DiscreteSchedule,
    /// ᾱ used before the first training timestep (1, or ᾱ₀ when `set_alpha_to_one` is false).
    final_alpha_cumprod: f64,
    eta: f64,
}

impl DdimScheduler {
    /// Builds the scheduler with eta 0 (deterministic).
    pub fn new(config: &SchedulerConfig) -> anyhow::Result<Self> {
        let schedule = DiscreteSchedule::new(config);
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        Ok(Self {
            schedule,
            final_alpha_cumprod,
            eta: 0.0,
        })
    }

    /// Sets the stochasticity η (0 = DDIM, 1 = DDPM-like).
    pub fn with_eta(mut self, eta: f64) -> Self {
        self.eta = eta;
        self
    }

    /// The current η.
    pub fn eta(&self) -> f64 {
        self.eta
    }

    /// ᾱ_t for every training timestep.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.schedule.alphas_cumprod
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.schedule
            .set_timesteps(num_inference_steps, "DDIMScheduler")
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn needs_noise(&self) -> bool {
        self.eta > 0.0
    }

    fn step_with(&mut self, input: StepInput<'_>) -> Result<Tensor> {
        let s = &self.schedule;
        let Some(steps) = s.num_inference_steps else {
            candle_core::bail!("DDIMScheduler: call set_timesteps before step");
        };
        let n = s.config.num_train_timesteps;
        let t = s.integer(input.timestep, "DDIMScheduler")?;
        // diffusers uses T // N as the stride whatever the spacing.
        let prev_t = t as i64 - (n / steps) as i64;
        let (alpha_t, alpha_prev) = s.alphas(t, prev_t, self.final_alpha_cumprod);
        let (beta_t, beta_prev) = (1.0 - alpha_t, 1.0 - alpha_prev);

        let (_, x0, eps) = step_x0_eps(&s.config, input.model_output, input.sample, alpha_t)?;
        let variance = (beta_prev / beta_t) * (1.0 - alpha_t / alpha_prev);
        let std = self.eta * variance.sqrt();
        let dir = (1.0 - alpha_prev - std * std).sqrt();
        let mut prev = lincomb(&x0, alpha_prev.sqrt(), &eps, dir)?;
        if self.eta > 0.0 {
            prev = input.add_noise(prev, std, "DDIMScheduler (eta > 0)")?;
        }
        prev.to_dtype(input.sample.dtype())
    }
}
