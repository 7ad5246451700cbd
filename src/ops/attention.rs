//! Scaled dot-product attention `softmax(scale · q kᵀ + mask) v` as one differentiable op.
//!
//! Composed from differentiable pieces, the graph would keep the scores, the scaled
//! scores and the probabilities of every attention layer alive until the backward pass
//! (each `[B, heads, Nq, Nk]`). This op keeps only the probabilities `P` and computes
//! `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = scale · P ⊙ (dP − Σ dP ⊙ P)`, `dQ = dS K`,
//! `dK = dSᵀ Q`, skipping the gradients of inputs outside the graph.

use super::bridge::attach3;
use super::softmax::{backward as softmax_backward, softmax_owned};
use super::{compute_dtype, Kernel};
use candle_core::{Result, Tensor};

/// Attention over `q` `[..., Nq, d]`, `k` `[..., Nk, d]`, `v` `[..., Nk, dv]` (same leading
/// dims), returning `[..., Nq, dv]`; `mask` is an optional additive bias broadcastable to
/// `[..., Nq, Nk]` (e.g. a causal mask; it gets no gradient). Computed in f32 (f64 stays
/// f64) and cast back to `q`'s dtype.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    attention_with(q, k, v, scale, mask, Kernel::Auto)
}

/// [`attention`] with an explicit [`Kernel`] choice for its softmax.
pub fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    kernel: Kernel,
) -> Result<Tensor> {
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    let r = qd.len();
    let ok = r >= 2
        && kd.len() == r
        && vd.len() == r
        && qd[..r - 2] == kd[..r - 2]
        && qd[..r - 2] == vd[..r - 2]
        && qd[r - 1] == kd[r - 1]
        && kd[r - 2] == vd[r - 2];
    if !ok {
        candle_core::bail!("attention: incompatible q {qd:?}, k {kd:?}, v {vd:?}");
    }
    let dtype = q.dtype();
    let cd = compute_dtype(dtype);
    let (q, k, v) = (q.to_dtype(cd)?, k.to_dtype(cd)?, v.to_dtype(cd)?);
    let (qc, kc, vc) = (q.detach(), k.detach(), v.detach());
    let scores = qc.matmul(&kc.t()?)?;
    // With a mask the scale is applied before adding it, so the softmax itself is unscaled.
    let (scores, sm_scale) = match mask {
        Some(m) => {
            let s = scores.affine(scale, 0.0)?;
            (s.broadcast_add(&m.to_dtype(cd)?.detach())?, 1.0)
        }
        None => (scores, scale),
    };
    // The scores are fresh (nothing else holds them), so the softmax may overwrite them.
    let p = softmax_owned(scores, sm_scale, kernel)?;
    let out = p.matmul(&vc)?;
    let masked = mask.is_some();
    let bwd = move |[q, k, v]: [&Tensor; 3], g: &Tensor| {
        let g = g.to_dtype(p.dtype())?;
        let dv = match v.track_op() {
            true => Some(p.t()?.matmul(&g)?),
            false => None,
        };
        if !(q.track_op() || k.track_op()) {
            return Ok((None, None, dv));
        }
        let dp = g.matmul(&v.detach().t()?)?;
        let ds = softmax_backward(&p, &dp, sm_scale, kernel)?;
        let ds = if masked { ds.affine(scale, 0.0)? } else { ds };
        let dq = match q.track_op() {
            true => Some(ds.matmul(&k.detach())?),
            false => None,
        };
        let dk = match k.track_op() {
            true => Some(ds.t()?.matmul(&q.detach())?),
            false => None,
        };
        Ok((dq, dk, dv))
    };
    attach3([&q, &k, &v], out, "lora-attention", Box::new(bwd))?.to_dtype(dtype)
}
