//! Noise schedulers (DDPM, DDIM, Euler, Euler ancestral, DPM-Solver++ 2M), following
//! diffusers 0.35.2 step for step.
//!
//! Schedule tables (betas, ᾱ, sigmas, timesteps) are reproduced at diffusers' float32
//! precision; per-step scalar coefficients are computed in f64 and tensor arithmetic runs in
//! float32 (results are cast back to the sample's dtype).

mod config;
mod ddim;
mod ddpm;
mod discrete;
mod dpm;
mod euler;
mod euler_ancestral;
mod math;
mod schedule;

pub use config::{
    alphas_cumprod, betas, BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing,
};
pub use ddim::DdimScheduler;
pub use ddpm::DdpmScheduler;
pub use dpm::DpmSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;

use candle_core::Tensor;
use std::fmt;
use std::str::FromStr;

/// A denoising scheduler: the sampling loop calls `set_timesteps`, then for each `t` in
/// `timesteps()`: `scale_model_input`, the model, and `step`.
pub trait Scheduler: Send {
    /// Prepares the schedule for `num_inference_steps` steps (resets any step state).
    fn set_timesteps(&mut self, num_inference_steps: usize) -> candle_core::Result<()>;
    /// The timesteps to feed the model, in order (fractional for Euler).
    fn timesteps(&self) -> &[f64];
    /// Factor for the initial Gaussian latents (1 unless sigma-based).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Scales the model input for timestep `timestep` (identity except for Euler-type).
    fn scale_model_input(&self, sample: &Tensor, _timestep: f64) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }
    /// True when `step` consumes a standard normal `noise` tensor (DDPM, DDIM eta>0, Euler-a).
    fn needs_noise(&self) -> bool;
    /// One denoising step; returns the previous (less noisy) sample. Errors when the step
    /// needs noise and `noise` is `None`.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.step_with(StepInput {
            model_output,
            timestep,
            sample,
            noise,
        })
    }
    /// [`Scheduler::step`] with its arguments gathered in a [`StepInput`].
    fn step_with(&mut self, input: StepInput<'_>) -> candle_core::Result<Tensor>;
    /// The sigmas (length N+1, ending with the final sigma) for sigma-based schedulers.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }
}

/// The arguments of one [`Scheduler::step`].
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    /// The model's prediction for `sample` at `timestep`.
    pub model_output: &'a Tensor,
    /// The timestep being stepped from.
    pub timestep: f64,
    /// The current (noisier) sample.
    pub sample: &'a Tensor,
    /// A standard normal tensor shaped like the sample, for the steps that draw noise.
    pub noise: Option<&'a Tensor>,
}

impl StepInput<'_> {
    /// The noise in float32 scaled by `std`; an error naming `who` when none was given.
    pub fn scaled_noise(&self, std: f64, who: &str) -> candle_core::Result<Tensor> {
        math::f32(math::require_noise(self.noise, who)?)?.affine(std, 0.0)
    }

    /// `prev + std·noise` (see [`StepInput::scaled_noise`]).
    pub fn add_noise(&self, prev: Tensor, std: f64, who: &str) -> candle_core::Result<Tensor> {
        prev + self.scaled_noise(std, who)?
    }
}

/// The schedulers the CLI can pick by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    /// `DDIMScheduler`.
    Ddim,
    /// `EulerDiscreteScheduler`.
    Euler,
    /// `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
    /// `DPMSolverMultistepScheduler` with dpmsolver++, order 2.
    DpmPlusPlus2M,
    /// `DDPMScheduler`.
    Ddpm,
}

impl SchedulerKind {
    /// Every kind with its command-line name.
    pub const ALL: [(SchedulerKind, &'static str); 5] = [
        (SchedulerKind::Ddim, "ddim"),
        (SchedulerKind::Euler, "euler"),
        (SchedulerKind::EulerAncestral, "euler-a"),
        (SchedulerKind::DpmPlusPlus2M, "dpm++2m"),
        (SchedulerKind::Ddpm, "ddpm"),
    ];

    /// The command-line name (`ddim`, `euler`, `euler-a`, `dpm++2m`, `ddpm`).
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(k, _)| *k == self)
            .map_or("?", |(_, n)| n)
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        Self::ALL
            .iter()
            .find(|(_, n)| *n == lower)
            .map(|(k, _)| *k)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
                anyhow::anyhow!("unknown scheduler {s:?}; valid names: {}", names.join(", "))
            })
    }
}

/// Builds the scheduler `kind` from a model's `scheduler_config.json` (DDIM with eta 0).
/// `dpm++2m` forces `algorithm_type = "dpmsolver++"` and `solver_order = 2`.
///
/// Never fails here: a config the chosen class cannot honour (e.g. `use_beta_sigmas`) yields
/// a scheduler whose `set_timesteps` returns that error. Use [`try_build_scheduler`] to get
/// the error up front.
pub fn build_scheduler(kind: SchedulerKind, config: &SchedulerConfig) -> Box<dyn Scheduler> {
    build_scheduler_with_eta(kind, config, 0.0)
}

/// [`build_scheduler`] with DDIM's `eta` (ignored by the other kinds).
pub fn build_scheduler_with_eta(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    eta: f64,
) -> Box<dyn Scheduler> {
    try_build_scheduler(kind, config, eta).unwrap_or_else(|e| {
        Box::new(Unavailable {
            message: format!("{kind} scheduler: {e:#}"),
        })
    })
}

/// Builds the scheduler `kind` (DDIM uses `eta`), reporting an unsupported config at once.
pub fn try_build_scheduler(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    eta: f64,
) -> anyhow::Result<Box<dyn Scheduler>> {
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(DdimScheduler::new(config)?.with_eta(eta)),
        SchedulerKind::Euler => Box::new(EulerDiscreteScheduler::new(config)?),
        SchedulerKind::EulerAncestral => Box::new(EulerAncestralDiscreteScheduler::new(config)?),
        SchedulerKind::DpmPlusPlus2M => {
            let mut c = config.clone();
            c.algorithm_type = "dpmsolver++".to_string();
            c.solver_order = 2;
            Box::new(DpmSolverMultistepScheduler::new(&c)?)
        }
        SchedulerKind::Ddpm => Box::new(DdpmScheduler::new(config)?),
    })
}

/// Stand-in returned by [`build_scheduler`] for a config the class rejects: every fallible
/// call reports the construction error.
struct Unavailable {
    message: String,
}

impl Scheduler for Unavailable {
    fn set_timesteps(&mut self, _num_inference_steps: usize) -> candle_core::Result<()> {
        Err(candle_core::Error::Msg(self.message.clone()))
    }

    fn timesteps(&self) -> &[f64] {
        &[]
    }

    fn scale_model_input(&self, _sample: &Tensor, _timestep: f64) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(self.message.clone()))
    }

    fn needs_noise(&self) -> bool {
        false
    }

    fn step_with(&mut self, _input: StepInput<'_>) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(self.message.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for (k, n) in SchedulerKind::ALL {
            assert_eq!(n.parse::<SchedulerKind>().unwrap(), k);
            assert_eq!(k.to_string(), n);
        }
        let err = "heun".parse::<SchedulerKind>().unwrap_err().to_string();
        assert!(err.contains("heun") && err.contains("dpm++2m") && err.contains("euler-a"));
    }

    #[test]
    fn unsupported_config_errors_at_set_timesteps() {
        let config = SchedulerConfig {
            use_beta_sigmas: true,
            ..SchedulerConfig::default()
        };
        assert!(try_build_scheduler(SchedulerKind::Euler, &config, 0.0).is_err());
        let mut s = build_scheduler(SchedulerKind::Euler, &config);
        let err = s.set_timesteps(10).unwrap_err().to_string();
        assert!(err.contains("use_beta_sigmas"), "{err}");
        // DDIM does not look at sigma options.
        let mut ddim = build_scheduler(SchedulerKind::Ddim, &config);
        assert!(ddim.set_timesteps(10).is_ok());
    }
}
