//! The state DDPM and DDIM share: the config, the ᾱ table and the integer schedule.

use super::config::{alphas_cumprod, SchedulerConfig};
use super::math::{check_num_steps, integer_timestep};
use super::schedule::discrete_timesteps;
use candle_core::Result;

/// Config, ᾱ_t per training timestep and the current descending integer timesteps.
pub(crate) struct DiscreteSchedule {
    pub config: SchedulerConfig,
    pub alphas_cumprod: Vec<f64>,
    pub timesteps: Vec<f64>,
    pub num_inference_steps: Option<usize>,
}

/// Every training timestep, T−1 … 0 (the schedule before `set_timesteps`).
pub(crate) fn train_timesteps(num_train: usize) -> Vec<f64> {
    (0..num_train).rev().map(|t| t as f64).collect()
}

impl DiscreteSchedule {
    /// The schedule before `set_timesteps`: every training timestep.
    pub fn new(config: &SchedulerConfig) -> Self {
        Self {
            config: config.clone(),
            alphas_cumprod: alphas_cumprod(config),
            timesteps: train_timesteps(config.num_train_timesteps),
            num_inference_steps: None,
        }
    }

    /// `set_timesteps`: checks the step count (errors name `who`) and spaces the schedule.
    pub fn set_timesteps(&mut self, num_inference_steps: usize, who: &str) -> Result<()> {
        check_num_steps(num_inference_steps, self.config.num_train_timesteps, who)?;
        self.timesteps = discrete_timesteps(&self.config, num_inference_steps);
        self.num_inference_steps = Some(num_inference_steps);
        Ok(())
    }

    /// `timestep` checked to be an integer training timestep (errors name `who`).
    pub fn integer(&self, timestep: f64, who: &str) -> Result<usize> {
        integer_timestep(timestep, self.config.num_train_timesteps, who)
    }

    /// (ᾱ_t, ᾱ_prev) for a step from `t` to `prev_t`; `final_alpha` when `prev_t` < 0.
    pub fn alphas(&self, t: usize, prev_t: i64, final_alpha: f64) -> (f64, f64) {
        let alpha_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            final_alpha
        };
        (self.alphas_cumprod[t], alpha_prev)
    }
}
