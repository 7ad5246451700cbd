//! `DDIMScheduler` (Song et al. 2020) with eta, steps_offset, set_alpha_to_one and the
//! leading / trailing / linspace spacings.

use super::config::{alphas_cumprod, SchedulerConfig};
use super::math::{check_num_steps, f32, integer_timestep, lincomb, require_noise, step_x0_eps};
use super::schedule::discrete_timesteps;
use super::Scheduler;
use candle_core::{Result, Tensor};

/// Denoising diffusion implicit model scheduler.
pub struct DdimScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f64>,
    /// ᾱ used before the first training timestep (1, or ᾱ₀ when `set_alpha_to_one` is false).
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    eta: f64,
}

impl DdimScheduler {
    /// Builds the scheduler with eta 0 (deterministic).
    pub fn new(config: &SchedulerConfig) -> anyhow::Result<Self> {
        let ac = alphas_cumprod(config);
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { ac[0] };
        Ok(Self {
            config: config.clone(),
            timesteps: (0..config.num_train_timesteps)
                .rev()
                .map(|t| t as f64)
                .collect(),
            alphas_cumprod: ac,
            final_alpha_cumprod,
            num_inference_steps: None,
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
        &self.alphas_cumprod
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n = self.config.num_train_timesteps;
        check_num_steps(num_inference_steps, n, "DDIMScheduler")?;
        self.timesteps = discrete_timesteps(&self.config, num_inference_steps);
        self.num_inference_steps = Some(num_inference_steps);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn needs_noise(&self) -> bool {
        self.eta > 0.0
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let Some(steps) = self.num_inference_steps else {
            candle_core::bail!("DDIMScheduler: call set_timesteps before step");
        };
        let n = self.config.num_train_timesteps;
        let t = integer_timestep(timestep, n, "DDIMScheduler")?;
        // diffusers uses T // N as the stride whatever the spacing.
        let prev_t = t as i64 - (n / steps) as i64;
        let alpha_t = self.alphas_cumprod[t];
        let alpha_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let (beta_t, beta_prev) = (1.0 - alpha_t, 1.0 - alpha_prev);

        let (_, x0, eps) = step_x0_eps(&self.config, model_output, sample, alpha_t)?;
        let variance = (beta_prev / beta_t) * (1.0 - alpha_t / alpha_prev);
        let std = self.eta * variance.sqrt();
        let dir = (1.0 - alpha_prev - std * std).sqrt();
        let mut prev = lincomb(&x0, alpha_prev.sqrt(), &eps, dir)?;
        if self.eta > 0.0 {
            let noise = f32(require_noise(noise, "DDIMScheduler (eta > 0)")?)?;
            prev = (prev + noise.affine(std, 0.0)?)?;
        }
        prev.to_dtype(sample.dtype())
    }
}
