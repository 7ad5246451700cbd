//! Tensor helpers shared by the schedulers (all arithmetic in float32, like diffusers).

use super::config::{PredictionType, SchedulerConfig};
use candle_core::{bail, DType, Result, Tensor};

/// The tensor as float32 (a cheap clone when it already is).
pub fn f32(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)
}

/// `a·x + b·y`.
pub fn lincomb(x: &Tensor, a: f64, y: &Tensor, b: f64) -> Result<Tensor> {
    x.affine(a, 0.0)? + y.affine(b, 0.0)?
}

/// Checks that a noise tensor was given when the step needs one.
pub fn require_noise<'a>(noise: Option<&'a Tensor>, who: &str) -> Result<&'a Tensor> {
    match noise {
        Some(n) => Ok(n),
        None => bail!("{who}: this step draws noise; pass `noise` (a standard normal tensor shaped like the sample)"),
    }
}

/// Checks that `timestep` is an integer in `[0, num_train)` and returns it.
pub fn integer_timestep(timestep: f64, num_train: usize, who: &str) -> Result<usize> {
    if timestep.fract() != 0.0 || timestep < 0.0 || timestep >= num_train as f64 {
        bail!("{who}: timestep {timestep} is not an integer in [0, {num_train})");
    }
    Ok(timestep as usize)
}

/// Dynamic thresholding (`_threshold_sample`): per batch item, s = quantile(|x|, ratio)
/// clamped to [1, max]; x ← clamp(x, −s, s) / s.
pub fn threshold_sample(x: &Tensor, ratio: f64, max_value: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let b = dims[0];
    let flat = x.reshape((b, ()))?;
    let rows: Vec<Vec<f32>> = flat.abs()?.to_vec2()?;
    let mut scales = Vec::with_capacity(b);
    for mut row in rows {
        if row.is_empty() {
            scales.push(1.0f32);
            continue;
        }
        row.sort_by(|a, c| a.total_cmp(c));
        let pos = ratio * (row.len() - 1) as f64;
        let lo = pos.floor() as usize;
        let hi = (lo + 1).min(row.len() - 1);
        let frac = pos - lo as f64;
        let q = row[lo] as f64 + (row[hi] as f64 - row[lo] as f64) * frac;
        scales.push(q.clamp(1.0, max_value.max(1.0)) as f32);
    }
    let s = Tensor::from_vec(scales, (b, 1), x.device())?;
    let clamped = flat.broadcast_minimum(&s)?.broadcast_maximum(&s.neg()?)?;
    clamped.broadcast_div(&s)?.reshape(dims)
}

/// Applies DDPM/DDIM's x₀ post-processing: dynamic thresholding or `clip_sample`.
pub fn postprocess_x0(x0: Tensor, config: &SchedulerConfig) -> Result<Tensor> {
    if config.thresholding {
        threshold_sample(
            &x0,
            config.dynamic_thresholding_ratio,
            config.sample_max_value,
        )
    } else if config.clip_sample {
        let r = config.clip_sample_range;
        x0.clamp(-r, r)
    } else {
        Ok(x0)
    }
}

/// (x₀, ε) predicted from `model_output` at ᾱ_t for DDPM/DDIM-style schedulers.
pub fn predict_x0_eps(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod_t: f64,
) -> Result<(Tensor, Tensor)> {
    let (sa, sb) = (alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt());
    Ok(match prediction {
        PredictionType::Epsilon => {
            let x0 = (sample - model_output.affine(sb, 0.0)?)?.affine(1.0 / sa, 0.0)?;
            (x0, model_output.clone())
        }
        PredictionType::Sample => {
            let eps = (sample - model_output.affine(sa, 0.0)?)?.affine(1.0 / sb, 0.0)?;
            (model_output.clone(), eps)
        }
        PredictionType::VPrediction => (
            lincomb(sample, sa, model_output, -sb)?,
            lincomb(model_output, sa, sample, sb)?,
        ),
    })
}

/// Checks `1 <= num_inference_steps <= num_train` (the range every scheduler accepts).
pub fn check_num_steps(num_inference_steps: usize, num_train: usize, who: &str) -> Result<()> {
    if num_inference_steps == 0 || num_inference_steps > num_train {
        bail!("{who}: num_inference_steps must be in 1..={num_train}, got {num_inference_steps}");
    }
    Ok(())
}

/// The DDPM / DDIM step prelude in float32: `(sample, x₀ after post-processing, ε)`
/// predicted from `model_output` at ᾱ_t.
pub fn step_x0_eps(
    config: &SchedulerConfig,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod_t: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (mo, x) = (f32(model_output)?, f32(sample)?);
    let (x0, eps) = predict_x0_eps(config.prediction_type, &mo, &x, alpha_prod_t)?;
    Ok((x, postprocess_x0(x0, config)?, eps))
}
