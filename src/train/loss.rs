//! The denoising objective: noise and timesteps from our RNG, noisy latents and targets from the
//! DDPM scheduler (`add_noise`, `get_velocity`), min-SNR-γ weighting and offset noise as
//! diffusers' training scripts compute them.

use crate::rng::Rng;
use crate::schedulers::{DdpmScheduler, PredictionType};
use candle_core::{DType, Result, Tensor};

/// The inputs and target of one denoising step.
#[derive(Debug, Clone)]
pub struct NoisedBatch {
    /// Noisy latents `[B, C, h, w]` (the UNet input).
    pub noisy: Tensor,
    /// Timesteps, one per item.
    pub timesteps: Vec<usize>,
    /// What the UNet should predict (ε or v).
    pub target: Tensor,
}

/// Draws the noise (plus `noise_offset` · N(0,1) per item and channel, broadcast over pixels,
/// when non-zero) and then uniform timesteps in `[0, T)`, all from `rng` in that order, and
/// builds the noisy latents and the target for the scheduler's prediction type.
pub fn noise_batch(
    sched: &DdpmScheduler,
    prediction: PredictionType,
    latents: &Tensor,
    noise_offset: f64,
    rng: &mut Rng,
) -> anyhow::Result<NoisedBatch> {
    let (b, c, _, _) = latents.dims4()?;
    let dev = latents.device();
    let mut noise = rng.randn(latents.dims(), dev)?;
    if noise_offset != 0.0 {
        let off = rng.randn((b, c, 1, 1), dev)?.affine(noise_offset, 0.0)?;
        noise = noise.broadcast_add(&off)?;
    }
    let t_max = sched.alphas_cumprod().len() as u64;
    let timesteps: Vec<usize> = (0..b).map(|_| rng.below(t_max) as usize).collect();
    let noisy = sched.add_noise(latents, &noise, &timesteps)?;
    let target = match prediction {
        PredictionType::Epsilon => noise,
        PredictionType::VPrediction => sched.get_velocity(latents, &noise, &timesteps)?,
        other => anyhow::bail!(
            "training supports prediction_type epsilon and v_prediction, the scheduler config has {other:?}"
        ),
    };
    Ok(NoisedBatch {
        noisy,
        timesteps,
        target,
    })
}

/// Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) per timestep (diffusers' `compute_snr`, in f32).
pub fn snr(alphas_cumprod: &[f64], timesteps: &[usize]) -> Vec<f32> {
    timesteps
        .iter()
        .map(|&t| {
            let a = alphas_cumprod[t] as f32;
            let alpha = a.sqrt();
            let sigma = (1.0 - a).sqrt();
            (alpha / sigma).powi(2)
        })
        .collect()
}

/// Min-SNR-γ loss weights per item: `min(snr, γ) / snr` for ε-prediction and
/// `min(snr, γ) / (snr + 1)` for v-prediction (diffusers' train_text_to_image, kohya).
pub fn min_snr_weights(
    alphas_cumprod: &[f64],
    timesteps: &[usize],
    gamma: f64,
    prediction: PredictionType,
) -> Vec<f32> {
    snr(alphas_cumprod, timesteps)
        .into_iter()
        .map(|s| {
            let m = s.min(gamma as f32);
            match prediction {
                PredictionType::VPrediction => m / (s + 1.0),
                _ => m / s,
            }
        })
        .collect()
}

/// Mean squared error per item `[B]` (mean over every non-batch dimension), in f32.
pub fn mse_per_item(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    let d = (pred.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?;
    let b = d.dim(0)?;
    d.sqr()?.reshape((b, ()))?.mean(1)
}

/// The training loss of a batch whose first `n_instance` items are instance images and the
/// rest class images (prior preservation): `mean(w · mse_inst) + prior_weight · mean(w · mse_class)`
/// with per-item weights `w` (all 1 without min-SNR).
pub fn dreambooth_loss(
    pred: &Tensor,
    target: &Tensor,
    weights: Option<&[f32]>,
    n_instance: usize,
    prior_weight: f64,
) -> Result<Tensor> {
    let per = mse_per_item(pred, target)?;
    let b = per.dim(0)?;
    let per = match weights {
        Some(w) => {
            let w = Tensor::from_slice(w, b, per.device())?;
            (per * w)?
        }
        None => per,
    };
    let inst = per.narrow(0, 0, n_instance)?.mean_all()?;
    if n_instance == b {
        return Ok(inst);
    }
    let prior = per.narrow(0, n_instance, b - n_instance)?.mean_all()?;
    inst + prior.affine(prior_weight, 0.0)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_snr_weights_formula() {
        let ac = vec![0.9, 0.5, 0.01];
        let w = min_snr_weights(&ac, &[0, 1, 2], 5.0, PredictionType::Epsilon);
        // snr = 9, 1, 0.0101...
        assert!((w[0] - 5.0 / 9.0).abs() < 1e-6);
        assert!((w[1] - 1.0).abs() < 1e-6);
        assert!((w[2] - 1.0).abs() < 1e-6);
        let v = min_snr_weights(&ac, &[0, 1], 5.0, PredictionType::VPrediction);
        assert!((v[0] - 0.5).abs() < 1e-6);
        assert!((v[1] - 0.5).abs() < 1e-6);
    }
}
