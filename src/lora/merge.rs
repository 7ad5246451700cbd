//! Folding a LoRA into the weight it adapts: `W' = W + multiplier · (alpha / r) · up · down`.
//! The LoRA joins (lpl / ljl / svd) live in `src/lora/combine.rs`.

use super::LoraWeights;
use candle_core::{DType, Result, Tensor};

/// ΔW as a matrix product: `(out, r, in·kh·kw)` for `up` (out×r) · `down` (r×(in·kh·kw)).
pub fn factor_dims(l: &LoraWeights) -> (usize, usize, usize) {
    let (ud, dd) = (l.up().dims(), l.down().dims());
    (ud[0], dd[0], dd[1..].iter().product())
}

/// ΔW = (alpha / r) · up · down, shaped like the adapted weight (`[out, in]` for a linear
/// layer, `[out, in, kh, kw]` for a convolution), computed in f32 and returned as f32.
/// [`crate::lora::combine::delta_mat`] is the same product in f64, as a matrix.
pub fn delta_weight(l: &LoraWeights) -> Result<Tensor> {
    let (out, r, cols) = factor_dims(l);
    let up = l.up.to_dtype(DType::F32)?.reshape((out, r))?;
    let down = l.down.to_dtype(DType::F32)?.reshape((r, cols))?;
    (up.matmul(&down)? * l.scale())?.reshape(l.delta_shape())
}

/// `weight + multiplier · ΔW` in the weight's dtype; a 2-d ΔW is reshaped onto a 1×1 conv
/// weight (and back) when the element counts agree.
pub fn collapse(weight: &Tensor, l: &LoraWeights, multiplier: f64) -> Result<Tensor> {
    let delta = delta_weight(l)?.to_device(weight.device())?;
    let delta = if delta.dims() == weight.dims() {
        delta
    } else if delta.elem_count() == weight.elem_count() && delta.dims()[0] == weight.dims()[0] {
        delta.reshape(weight.dims())?
    } else {
        candle_core::bail!(
            "LoRA ΔW of shape {:?} does not fit the weight of shape {:?}",
            delta.dims(),
            weight.dims()
        )
    };
    let dtype = weight.dtype();
    (weight.to_dtype(DType::F32)? + (delta * multiplier)?)?.to_dtype(dtype)
}
