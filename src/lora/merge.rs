//! Folding a LoRA into the weight it adapts: `W' = W + multiplier · (alpha / r) · up · down`.
//!
//! NOTE (from the lora_add engineer): this file was accidentally overwritten while both of us
//! were assigned `src/lora/merge.rs`; what follows is a reconstruction of `delta_weight` and
//! `collapse` from the agreed signatures. The LoRA joins (lpl / ljl / svd) live in
//! `src/lora/combine.rs`. Replace this file with the original if it differs.

use super::LoraWeights;
use candle_core::{DType, Result, Tensor};

/// ΔW = (alpha / r) · up · down, shaped like the adapted weight (`[out, in]` for a linear
/// layer, `[out, in, kh, kw]` for a convolution), computed in f32 and returned as f32.
pub fn delta_weight(l: &LoraWeights) -> Result<Tensor> {
    let up = l.up.to_dtype(DType::F32)?;
    let down = l.down.to_dtype(DType::F32)?;
    let (out, r) = (up.dims()[0], l.rank());
    let mut shape = vec![out];
    shape.extend_from_slice(&down.dims()[1..]);
    let up2 = up.reshape((out, r))?;
    let down2 = down.flatten_from(1)?;
    (up2.matmul(&down2)? * l.scale())?.reshape(shape)
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
