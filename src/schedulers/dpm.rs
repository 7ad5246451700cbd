//! `DPMSolverMultistepScheduler` (Lu et al. 2022): DPM-Solver++ / DPM-Solver, orders 1–3,
//! midpoint or heun second-order updates, lower-order final steps, Karras sigmas.

use super::config::{
    check_sigma_options, BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing,
};
use super::discrete::train_timesteps;
use super::euler::sigma_alphas_cumprod;
use super::math::{check_num_steps, f32, lincomb, threshold_sample};
use super::schedule::{
    exponential_sigmas, index_for_timestep, interp, karras_sigmas, log_sigmas, np_arange,
    np_linspace, sigma_to_t, train_sigmas,
};
use super::{Scheduler, StepInput};
use anyhow::bail;
use candle_core::{Result, Tensor};

/// Multistep DPM-Solver; `dpm++2m` is `algorithm_type = "dpmsolver++"`, `solver_order = 2`.
pub struct DpmSolverMultistepScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f64>,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    /// Converted outputs of the last `solver_order` steps, newest last.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    step_index: Option<usize>,
    data_prediction: bool,
    sde: bool,
    midpoint: bool,
}

/// (α_t, σ_t, λ_t) for the VP noise level σ: α = 1/√(σ²+1), σ_t = σ·α, λ = ln α − ln σ_t.
fn alpha_sigma_lambda(sigma: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

impl DpmSolverMultistepScheduler {
    /// Builds the scheduler from the config's algorithm / solver settings.
    pub fn new(config: &SchedulerConfig) -> anyhow::Result<Self> {
        check_sigma_options(config, "DPMSolverMultistepScheduler")?;
        if config.use_flow_sigmas {
            bail!("DPMSolverMultistepScheduler: use_flow_sigmas is not supported");
        }
        let (data_prediction, sde) = match config.algorithm_type.as_str() {
            "dpmsolver++" | "deis" => (true, false),
            "sde-dpmsolver++" => (true, true),
            "dpmsolver" => (false, false),
            "sde-dpmsolver" => (false, true),
            other => {
                bail!("DPMSolverMultistepScheduler: algorithm_type {other:?} is not implemented")
            }
        };
        let midpoint = match config.solver_type.as_str() {
            "midpoint" | "logrho" | "bh1" | "bh2" => true,
            "heun" => false,
            other => bail!("DPMSolverMultistepScheduler: solver_type {other:?} is not implemented"),
        };
        if !(1..=3).contains(&config.solver_order) {
            bail!(
                "DPMSolverMultistepScheduler: solver_order must be 1, 2 or 3, got {}",
                config.solver_order
            );
        }
        if !data_prediction && config.final_sigmas_type == "zero" {
            bail!("DPMSolverMultistepScheduler: final_sigmas_type \"zero\" needs algorithm_type dpmsolver++ or sde-dpmsolver++");
        }
        if !matches!(config.final_sigmas_type.as_str(), "zero" | "sigma_min") {
            bail!("DPMSolverMultistepScheduler: final_sigmas_type must be zero or sigma_min, got {:?}", config.final_sigmas_type);
        }
        let ac = sigma_alphas_cumprod(config);
        let train = train_sigmas(&ac);
        let n = config.num_train_timesteps;
        Ok(Self {
            config: config.clone(),
            alphas_cumprod: ac,
            sigmas: train.clone(),
            train_sigmas: train,
            timesteps: train_timesteps(n),
            model_outputs: vec![None; config.solver_order],
            lower_order_nums: 0,
            step_index: None,
            data_prediction,
            sde,
            midpoint,
        })
    }

    /// Training timesteps kept after `lambda_min_clipped` (all of them by default).
    fn last_timestep(&self) -> usize {
        let clip = self.config.lambda_min_clipped();
        // searchsorted(flip(λ), clip): count of λ_t (float32) below the clip value.
        let below = self
            .alphas_cumprod
            .iter()
            .filter(|&&a| {
                let a = a as f32;
                let lambda = a.sqrt().ln() - (1.0f32 - a).sqrt().ln();
                (lambda as f64) < clip
            })
            .count();
        self.config.num_train_timesteps - below
    }

    /// The model output converted to x₀ (DPM-Solver++) or ε (DPM-Solver).
    fn convert_model_output(&self, mo: &Tensor, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let (alpha_t, sigma_t, _) = alpha_sigma_lambda(sigma);
        let c = &self.config;
        if self.data_prediction {
            let x0 = match c.prediction_type {
                PredictionType::Epsilon => {
                    (x - mo.affine(sigma_t, 0.0)?)?.affine(1.0 / alpha_t, 0.0)?
                }
                PredictionType::Sample => mo.clone(),
                PredictionType::VPrediction => lincomb(x, alpha_t, mo, -sigma_t)?,
            };
            if c.thresholding {
                return threshold_sample(&x0, c.dynamic_thresholding_ratio, c.sample_max_value);
            }
            Ok(x0)
        } else {
            let eps = match c.prediction_type {
                PredictionType::Epsilon => mo.clone(),
                PredictionType::Sample => {
                    (x - mo.affine(alpha_t, 0.0)?)?.affine(1.0 / sigma_t, 0.0)?
                }
                PredictionType::VPrediction => lincomb(mo, alpha_t, x, sigma_t)?,
            };
            if c.thresholding {
                let x0 = (x - eps.affine(sigma_t, 0.0)?)?.affine(1.0 / alpha_t, 0.0)?;
                let x0 = threshold_sample(&x0, c.dynamic_thresholding_ratio, c.sample_max_value)?;
                return (x - x0.affine(alpha_t, 0.0)?)?.affine(1.0 / sigma_t, 0.0);
            }
            Ok(eps)
        }
    }

    /// The step from σ_s (index `i`) to σ_t (index `i + 1`) of the given order.
    fn update(&self, order: usize, i: usize, x: &Tensor, input: &StepInput<'_>) -> Result<Tensor> {
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.sigmas[i]);
        let h = lambda_t - lambda_s0;
        let outputs: Vec<&Tensor> = self
            .model_outputs
            .iter()
            .rev()
            .map_while(|m| m.as_ref())
            .collect();
        let m0 = outputs[0];
        let (eh, e2h) = ((-h).exp(), (-2.0 * h).exp());
        let noise_term = |input: &StepInput<'_>, coef: f64| -> Result<Option<Tensor>> {
            if !self.sde {
                return Ok(None);
            }
            Ok(Some(
                input.scaled_noise(coef, "DPMSolverMultistepScheduler (sde)")?,
            ))
        };
        // (coefficient of x, list of (coefficient, D_k)), plus the SDE noise term.
        let (cx, terms, nz): (f64, Vec<(f64, Tensor)>, Option<Tensor>) = if order == 1 {
            let d0 = m0.clone();
            match (self.data_prediction, self.sde) {
                (true, false) => (sigma_t / sigma_s0, vec![(-alpha_t * (eh - 1.0), d0)], None),
                (false, false) => (
                    alpha_t / alpha_s0,
                    vec![(-sigma_t * (h.exp() - 1.0), d0)],
                    None,
                ),
                (true, true) => (
                    sigma_t / sigma_s0 * eh,
                    vec![(alpha_t * (1.0 - e2h), d0)],
                    noise_term(input, sigma_t * (1.0 - e2h).sqrt())?,
                ),
                (false, true) => (
                    alpha_t / alpha_s0,
                    vec![(-2.0 * sigma_t * (h.exp() - 1.0), d0)],
                    noise_term(input, sigma_t * ((2.0 * h).exp() - 1.0).sqrt())?,
                ),
            }
        } else {
            let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigmas[i - 1]);
            let m1 = outputs[1];
            let h0 = lambda_s0 - lambda_s1;
            let r0 = h0 / h;
            let d1_0 = (m0 - m1)?.affine(1.0 / r0, 0.0)?;
            let (d1, d2) = if order == 2 {
                (d1_0, None)
            } else {
                let (_, _, lambda_s2) = alpha_sigma_lambda(self.sigmas[i - 2]);
                let r1 = (lambda_s1 - lambda_s2) / h;
                let d1_1 = (m1 - outputs[2])?.affine(1.0 / r1, 0.0)?;
                let diff = (&d1_0 - &d1_1)?;
                let d1 = (&d1_0 + diff.affine(r0 / (r0 + r1), 0.0)?)?;
                (d1, Some(diff.affine(1.0 / (r0 + r1), 0.0)?))
            };
            let d0 = m0.clone();
            let em = eh - 1.0;
            let ep = h.exp() - 1.0;
            match (self.data_prediction, self.sde, d2) {
                (true, false, None) => {
                    let c1 = if self.midpoint {
                        -0.5 * alpha_t * em
                    } else {
                        alpha_t * (em / h + 1.0)
                    };
                    (
                        sigma_t / sigma_s0,
                        vec![(-alpha_t * em, d0), (c1, d1)],
                        None,
                    )
                }
                (false, false, None) => {
                    let c1 = if self.midpoint {
                        -0.5 * sigma_t * ep
                    } else {
                        -sigma_t * (ep / h - 1.0)
                    };
                    (
                        alpha_t / alpha_s0,
                        vec![(-sigma_t * ep, d0), (c1, d1)],
                        None,
                    )
                }
                (true, true, None) => {
                    let c1 = if self.midpoint {
                        0.5 * alpha_t * (1.0 - e2h)
                    } else {
                        alpha_t * ((1.0 - e2h) / (-2.0 * h) + 1.0)
                    };
                    (
                        sigma_t / sigma_s0 * eh,
                        vec![(alpha_t * (1.0 - e2h), d0), (c1, d1)],
                        noise_term(input, sigma_t * (1.0 - e2h).sqrt())?,
                    )
                }
                (false, true, None) => {
                    let c1 = if self.midpoint {
                        -sigma_t * ep
                    } else {
                        -2.0 * sigma_t * (ep / h - 1.0)
                    };
                    (
                        alpha_t / alpha_s0,
                        vec![(-2.0 * sigma_t * ep, d0), (c1, d1)],
                        noise_term(input, sigma_t * ((2.0 * h).exp() - 1.0).sqrt())?,
                    )
                }
                (true, false, Some(d2)) => (
                    sigma_t / sigma_s0,
                    vec![
                        (-alpha_t * em, d0),
                        (alpha_t * (em / h + 1.0), d1),
                        (-alpha_t * ((em + h) / (h * h) - 0.5), d2),
                    ],
                    None,
                ),
                (false, false, Some(d2)) => (
                    alpha_t / alpha_s0,
                    vec![
                        (-sigma_t * ep, d0),
                        (-sigma_t * (ep / h - 1.0), d1),
                        (-sigma_t * ((ep - h) / (h * h) - 0.5), d2),
                    ],
                    None,
                ),
                (true, true, Some(d2)) => (
                    sigma_t / sigma_s0 * eh,
                    vec![
                        (alpha_t * (1.0 - e2h), d0),
                        (alpha_t * ((1.0 - e2h) / (-2.0 * h) + 1.0), d1),
                        (
                            alpha_t * ((1.0 - e2h - 2.0 * h) / (2.0 * h).powi(2) - 0.5),
                            d2,
                        ),
                    ],
                    noise_term(input, sigma_t * (1.0 - e2h).sqrt())?,
                ),
                (false, true, Some(_)) => {
                    candle_core::bail!(
                        "DPMSolverMultistepScheduler: sde-dpmsolver has no third-order update"
                    )
                }
            }
        };
        let mut out = x.affine(cx, 0.0)?;
        for (c, d) in terms {
            out = (out + d.affine(c, 0.0)?)?;
        }
        if let Some(nz) = nz {
            out = (out + nz)?;
        }
        Ok(out)
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let c = self.config.clone();
        let n = c.num_train_timesteps;
        check_num_steps(num_inference_steps, n, "DPMSolverMultistepScheduler")?;
        let steps = num_inference_steps;
        let last = self.last_timestep();
        let mut timesteps: Vec<f64> = match c.spacing_or(TimestepSpacing::Linspace) {
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> = np_linspace(0.0, last as f64 - 1.0, steps + 1)
                    .into_iter()
                    .map(f64::round_ties_even)
                    .collect();
                v.reverse();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = last / (steps + 1);
                (1..=steps)
                    .rev()
                    .map(|i| (i * ratio + c.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => np_arange(last as f64, 0.0, -(n as f64 / steps as f64))
                .into_iter()
                .map(|v| v.round_ties_even() - 1.0)
                .filter(|&v| v >= 0.0)
                .collect(),
        };
        let train = &self.train_sigmas;
        let logs = log_sigmas(train);
        let round = c.beta_schedule != BetaSchedule::SquaredcosCapV2;
        // Timesteps of the given sigmas, rounded to integers when `round_t`.
        let to_t = |sigmas: &[f64], round_t: bool| -> Vec<f64> {
            sigmas
                .iter()
                .map(|&x| {
                    let t = sigma_to_t(x, &logs);
                    if round_t {
                        t.round_ties_even()
                    } else {
                        t
                    }
                })
                .collect()
        };
        let mut sigmas: Vec<f64> = if c.use_karras_sigmas || c.use_exponential_sigmas {
            // `in_sigmas` is the flipped training schedule: [-1] = σ_min, [0] = σ_max.
            let lo = c.sigma_min.unwrap_or(train[0]);
            let hi = c.sigma_max.unwrap_or(train[train.len() - 1]);
            let s = if c.use_karras_sigmas {
                karras_sigmas(lo, hi, steps)
            } else {
                exponential_sigmas(lo, hi, steps)
            };
            timesteps = to_t(&s, c.use_karras_sigmas && round);
            s
        } else if c.use_lu_lambdas {
            let (lmin, lmax) = (logs[0], logs[logs.len() - 1]);
            let s: Vec<f64> = np_linspace(0.0, 1.0, steps)
                .into_iter()
                .map(|r| (lmax + r * (lmin - lmax)).exp())
                .collect();
            timesteps = to_t(&s, round);
            s
        } else {
            timesteps.iter().map(|&t| interp(t, train)).collect()
        };
        let final_sigma = if c.final_sigmas_type == "sigma_min" {
            train[0]
        } else {
            0.0
        };
        sigmas.push(final_sigma);
        self.sigmas = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();
        // `.to(torch.int64)` truncates toward zero.
        self.timesteps = timesteps.into_iter().map(f64::trunc).collect();
        self.model_outputs = vec![None; c.solver_order];
        self.lower_order_nums = 0;
        self.step_index = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn needs_noise(&self) -> bool {
        self.sde
    }

    fn step_with(&mut self, input: StepInput<'_>) -> Result<Tensor> {
        let len = self.timesteps.len();
        let i = match self.step_index {
            Some(i) => i,
            None => index_for_timestep(&self.timesteps, input.timestep).unwrap_or(len - 1),
        };
        if i >= len || i + 1 >= self.sigmas.len() {
            candle_core::bail!("DPMSolverMultistepScheduler: step called after the last timestep (set_timesteps first)");
        }
        let c = &self.config;
        let few = c.lower_order_final && len < 15;
        let lower_order_final =
            i == len - 1 && (c.euler_at_final || few || c.final_sigmas_type == "zero");
        let lower_order_second = i + 2 == len && few;
        let (mo, x) = (f32(input.model_output)?, f32(input.sample)?);
        let converted = self.convert_model_output(&mo, &x, self.sigmas[i])?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(converted));
        let order = c.solver_order;
        let use_order = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            1
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            2
        } else {
            3
        };
        let prev = self.update(use_order, i, &x, &input)?;
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.step_index = Some(i + 1);
        prev.to_dtype(input.model_output.dtype())
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
}
