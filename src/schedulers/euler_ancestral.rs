//! `EulerAncestralDiscreteScheduler`: Euler steps to σ_down plus fresh noise of size σ_up.

use super::config::SchedulerConfig;
use super::euler::{euler_schedule_accessors, SigmaSchedule};
use super::schedule::interp;
use super::{Scheduler, StepInput};
use candle_core::{Result, Tensor};

/// Ancestral Euler sampler (stochastic).
pub struct EulerAncestralDiscreteScheduler {
    schedule: SigmaSchedule,
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
        let schedule = SigmaSchedule::new(config, "EulerAncestralDiscreteScheduler")?;
        Ok(Self { schedule })
    }

    /// (σ_up, σ_down) of the next step, or `None` after the last step.
    fn next_sigmas(&self, timestep: f64) -> Option<(f64, f64)> {
        let sigmas = &self.schedule.sigmas;
        let i = self.schedule.index(timestep).ok()?;
        let to = *sigmas.get(i + 1)?;
        Some(ancestral_sigmas(sigmas[i], to))
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let timesteps = self.schedule.spaced_timesteps(num_inference_steps)?;
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| f64::from(interp(t, &self.schedule.train_sigmas) as f32))
            .collect();
        sigmas.push(0.0);
        self.schedule.reset(timesteps, sigmas);
        Ok(())
    }

    euler_schedule_accessors!();

    fn needs_noise(&self) -> bool {
        true
    }

    fn step_with(&mut self, input: StepInput<'_>) -> Result<Tensor> {
        let (i, sigma, x, derivative) = self.schedule.derivative(&input)?;
        let (up, down) = self.next_sigmas(input.timestep).unwrap_or((0.0, 0.0));
        let mut prev = (&x + derivative.affine(down - sigma, 0.0)?)?;
        if up > 0.0 {
            prev = input.add_noise(prev, up, "EulerAncestralDiscreteScheduler")?;
        }
        self.schedule.finish(i, prev, &input)
    }
}
