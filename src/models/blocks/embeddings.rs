//! Sinusoidal timestep projection (`Timesteps`) and the `TimestepEmbedding` MLP.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use crate::models::layers::{silu, Linear};
use crate::models::walk::{LayerRef, LayerWalk};

/// diffusers' `get_timestep_embedding`: `[N]` timesteps (any float values) -> `[N, dim]` in f32.
///
/// Frequencies are `exp(-ln(10000) · i / (dim/2 - freq_shift))` for `i < dim/2`; the output is
/// `[sin, cos]` (or `[cos, sin]` with `flip_sin_to_cos`), zero-padded when `dim` is odd.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let t = timesteps.flatten_all()?.to_dtype(DType::F32)?;
    let half = dim / 2;
    let denom = half as f64 - freq_shift;
    // Same operation order and precision as diffusers: f32 `(-ln(p) * i) / denom`, then exp.
    let ln_period = -(10000f64.ln()) as f32;
    let denom = denom as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((ln_period * i as f32) / denom).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, half, t.device())?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs.unsqueeze(0)?)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// diffusers' `TimestepEmbedding`: `linear_1`, SiLU, `linear_2`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    /// Loads `linear_1` (`in_channels -> time_embed_dim`) and `linear_2` from `vb`.
    pub fn new(vb: VarBuilder, in_channels: usize, time_embed_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), in_channels, time_embed_dim, true)?,
            linear_2: Linear::new(vb.pp("linear_2"), time_embed_dim, time_embed_dim, true)?,
        })
    }

    /// The first projection.
    pub fn linear_1(&self) -> &Linear {
        &self.linear_1
    }

    /// The second projection.
    pub fn linear_2(&self) -> &Linear {
        &self.linear_2
    }

    /// Maps a projected timestep `[N, in_channels]` to `[N, time_embed_dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&silu(&self.linear_1.forward(x)?)?)
    }
}

impl LayerWalk for TimestepEmbedding {
    /// `linear_1`, `linear_2`.
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.linear_1().walk(f);
        self.linear_2().walk(f);
    }
}
