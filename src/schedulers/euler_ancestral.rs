//! `EulerAncestralDiscreteScheduler`: Euler steps to σ_down plus fresh noise of size σ_up.

use super::config::{check_sigma_options, SchedulerConfig, TimestepSpacing};
use super::euler::{
    euler_derivative, euler_schedule_accessors, sigma_alphas_cumprod, sigma_step_index, step_sigma,
};
use super::math::{check_num_steps, f32, require_noise};
use super::schedule::{interp, spaced_timesteps, train_sigmas};
use super::Scheduler;
use candle_core::{Result, Tensor};

/// Ancestral Euler sampler (stochastic).
pub struct EulerAncestralDiscreteScheduler {
    config: SchedulerConfig,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    step_index: Option<usize>,
}

/// (σ_up, σ_down) for a step from `from` to `to`, in float32 like diffusers.
fn ancestral_sigmas(from: f64, to: f64) -> (f64, f64) {
    let (f, t) = (from as f32, to as f32);
    let up = (t * t * (f * f - t * t) / (f * f)).sqrt();
    let down = (t * t - up * up).sqrt();
    (up as f64, down as f64)
}

impl EulerAncestralDiscreteScheduler {
    /// Builds the scheduler (its initial schedule covers every training timestep).
    pub fn new(config: &SchedulerConfig) -> anyhow::Result<Self> {
        check_sigma_options(config, "EulerAncestralDiscreteScheduler")?;
        let train = train_sigmas(&sigma_alphas_cumprod(config));
        let mut sigmas: Vec<f64> = train.iter().rev().copied().collect();
        sigmas.push(0.0);
        let timesteps = (0..config.num_train_timesteps)
            .rev()
            .map(|t| t as f64)
            .collect();
        Ok(Self {
            config: config.clone(),
            train_sigmas: train,
            timesteps,
            sigmas,
            step_index: None,
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
            "EulerAncestralDiscreteScheduler",
        )
    }

    /// (σ_up, σ_down) of the next step, or `None` after the last step.
    fn next_sigmas(&self, timestep: f64) -> Option<(f64, f64)> {
        let i = self.index(timestep).ok()?;
        let to = *self.sigmas.get(i + 1)?;
        Some(ancestral_sigmas(self.sigmas[i], to))
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = &self.config;
        let n = c.num_train_timesteps;
        check_num_steps(num_inference_steps, n, "EulerAncestralDiscreteScheduler")?;
        let timesteps: Vec<f64> = spaced_timesteps(
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
            .map(|&t| f64::from(interp(t, &self.train_sigmas) as f32))
            .collect();
        sigmas.push(0.0);
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.step_index = None;
        Ok(())
    }

    euler_schedule_accessors!();

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
        let i = self.index(timestep)?;
        let sigma = step_sigma(&self.sigmas, i, "EulerAncestralDiscreteScheduler")?;
        let (up, down) = self.next_sigmas(timestep).unwrap_or((0.0, 0.0));
        let (x, derivative) =
            euler_derivative(self.config.prediction_type, model_output, sample, sigma)?;
        let mut prev = (&x + derivative.affine(down - sigma, 0.0)?)?;
        if up > 0.0 {
            let noise = f32(require_noise(noise, "EulerAncestralDiscreteScheduler")?)?;
            prev = (prev + noise.affine(up, 0.0)?)?;
        }
        self.step_index = Some(i + 1);
        prev.to_dtype(model_output.dtype())
    }
}
