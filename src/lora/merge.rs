//! Folding a LoRA into the weight it adapts: `W' = W + multiplier · ΔW` for every factor kind,
//! and the DoRA rescale on top (PEFT's and LyCORIS' rules, [`merged_weight`]).
//! The LoRA joins (lpl / ljl / svd) live in `src/lora/combine.rs`.

use super::{DoraStyle, Factors, LoraWeights};
use candle_core::{DType, Result, Tensor};

/// ΔW of a plain LoRA as a matrix product: `(out, r, in·kh·kw)` for `up` (out×r) · `down`
/// (r×(in·kh·kw)); for LoHa / LoKr `(out, rank, in·kh·kw)`.
pub fn factor_dims(l: &LoraWeights) -> (usize, usize, usize) {
    let s = l.delta_shape();
    (s[0], l.rank(), s[1..].iter().product())
}

/// ΔW = scale · product of the factors (LoRA: up · down; LoHa: Hadamard; LoKr: Kronecker),
/// shaped like the adapted weight (`[out, in]` or `[out, in, kh, kw]`), computed and returned
/// in `dtype`. The DoRA magnitude is not part of ΔW (see [`merged_weight`]).
pub fn delta_weight_in(l: &LoraWeights, dtype: DType) -> Result<Tensor> {
    let shape = l.delta_shape();
    let product = match l.factors() {
        Factors::LowRank { down, up } => {
            let (out, r, cols) = factor_dims(l);
            let up = up.to_dtype(dtype)?.reshape((out, r))?;
            let down = down.to_dtype(dtype)?.reshape((r, cols))?;
            up.matmul(&down)?.reshape(shape)?
        }
        Factors::LoHa(h) => h.product(&shape, dtype)?,
        Factors::LoKr(k) => k.product(&shape, dtype)?,
    };
    product * l.scale()
}

/// [`delta_weight_in`] in f32. [`crate::lora::combine::delta_mat`] is the same in f64, as a
/// matrix.
pub fn delta_weight(l: &LoraWeights) -> Result<Tensor> {
    delta_weight_in(l, DType::F32)
}

/// The per-row (`dim 0`, `on_out`) or per-column (`dim 1`) L2 norm of `v`, kept as a
/// broadcastable tensor of `v`'s rank.
fn norm_along(v: &Tensor, on_out: bool) -> Result<Tensor> {
    let dims = v.dims().to_vec();
    let sq = v.sqr()?;
    if on_out {
        let n = sq.reshape((dims[0], ()))?.sum_keepdim(1)?.sqrt()?;
        let mut s = vec![1; dims.len()];
        s[0] = dims[0];
        n.reshape(s)
    } else {
        // Sum over every dim but 1.
        let mut t = sq.sum_keepdim(0)?;
        for d in 2..dims.len() {
            t = t.sum_keepdim(d)?;
        }
        t.sqrt()
    }
}

/// The adapted weight `W'` for `weight` (any float dtype; computed in it) at runtime
/// `multiplier`:
/// - without DoRA: `W + multiplier · ΔW`;
/// - PEFT DoRA: `V = W + multiplier · ΔW`, `W' = m / ‖V‖ ⊙ V`, norm per output row;
/// - LyCORIS DoRA: `V = W + ΔW`, `k = m / (‖V‖ + ε)` (ε = f32 epsilon) per output row or
///   input column, `W' = V ⊙ (multiplier · (k − 1) + 1)` (LyCORIS' `weight_decompose`).
///
/// A 2-d ΔW is reshaped onto a 1×1 conv weight (and back) when the element counts agree.
pub fn merged_weight(weight: &Tensor, l: &LoraWeights, multiplier: f64) -> Result<Tensor> {
    let dtype = weight.dtype();
    let delta = delta_weight_in(l, dtype)?.to_device(weight.device())?;
    let delta = fit(delta, weight.dims())?;
    let Some(dora) = l.dora() else {
        return weight + (delta * multiplier)?;
    };
    let mag = dora.magnitude.to_dtype(dtype)?.to_device(weight.device())?;
    // The magnitude in the layout of l's own weight shape, then in the weight's.
    let shape = l.delta_shape();
    match dora.style {
        DoraStyle::Peft => {
            let v = (weight + (delta * multiplier)?)?;
            let n = norm_along(&v.reshape(shape.as_slice())?, true)?;
            let mut s = vec![1; shape.len()];
            s[0] = shape[0];
            let k = (mag.reshape(s)? / n)?;
            v.reshape(shape.as_slice())?
                .broadcast_mul(&k)?
                .reshape(weight.dims())
        }
        DoraStyle::Lycoris { on_out } => {
            let v = (weight + delta)?.reshape(shape.as_slice())?;
            let n = (norm_along(&v, on_out)? + f32::EPSILON as f64)?;
            let k = mag.reshape(n.dims())?.div(&n)?;
            let k = if multiplier != 1.0 {
                ((k - 1.0)? * multiplier)? + 1.0
            } else {
                Ok(k)
            }?;
            v.broadcast_mul(&k)?.reshape(weight.dims())
        }
    }
}

/// `delta` reshaped to `dims` when it is the same weight in another layout (a 2-d ΔW on a
/// 1×1 conv and back); an error otherwise.
fn fit(delta: Tensor, dims: &[usize]) -> Result<Tensor> {
    if delta.dims() == dims {
        Ok(delta)
    } else if delta.elem_count() == dims.iter().product::<usize>()
        && delta.dims().first() == dims.first()
    {
        delta.reshape(dims)
    } else {
        candle_core::bail!(
            "LoRA ΔW of shape {:?} does not fit the weight of shape {:?}",
            delta.dims(),
            dims
        )
    }
}

/// `weight + multiplier · ΔW` (with the DoRA rescale where the layer has one) in the weight's
/// dtype, computed in f32.
pub fn collapse(weight: &Tensor, l: &LoraWeights, multiplier: f64) -> Result<Tensor> {
    let dtype = weight.dtype();
    merged_weight(&weight.to_dtype(DType::F32)?, l, multiplier)?.to_dtype(dtype)
}
