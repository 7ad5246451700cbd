//! Scaled dot-product attention `softmax(scale · q kᵀ + mask) v` as one differentiable op,
//! in two forms that give the same values.
//!
//! **Materialised** (small problems): the scores `S` and probabilities `P` are one
//! `[..., Nq, Nk]` tensor; only `P` is kept for the backward, which computes `dV = Pᵀ dO`,
//! `dP = dO Vᵀ`, `dS = scale · P ⊙ (dP − Σ dP ⊙ P)`, `dQ = dS K`, `dK = dSᵀ Q`.
//!
//! **Tiled** (memory-efficient, the FlashAttention algorithm over query tiles,
//! `attention_tiled.rs`): the leading dims are flattened to `G`, and the queries are cut
//! into tiles of `c` rows such that one tile `[G, c, Nk]` of scores stays under a byte
//! budget. Per tile the forward computes `S = q_t kᵀ`, `P = softmax(scale · S + mask)`, the
//! row log-sum-exp `L = log Σ exp(scale · S + mask)` and `O_t = P v`, then drops `S` / `P`.
//! Only `L` (`G · Nq` values, f32 or f64) and the output `O` (`G · Nq · dv`, shared with the
//! result) are saved beside the inputs. The backward walks the same tiles: it recomputes
//! `P = exp(scale · S + mask − L)`, then `dV += Pᵀ dO_t`, `dP = dO_t Vᵀ`,
//! `dS = scale · P ⊙ (dP − D)` with `D = rowsum(dO ⊙ O)` (written over `dP`),
//! `dQ_t = dS K`, `dK += dSᵀ q_t`. Keys are not tiled: a tile of one query row is `G · Nk`
//! elements (8 heads × 4096 keys = 128 KiB in f32 at 512 px; even SD 2 at 768 px with CFG,
//! 10 × 9216 keys, is 360 KiB), far below any useful budget, so an online softmax over key
//! tiles would buy nothing at Stable Diffusion sizes. Peak attention memory is about two
//! tiles in the backward (`P` and `dP`, which becomes `dS`) and one or two in the forward,
//! instead of `G · Nq · Nk` per layer kept from the forward to the backward. The price is
//! one more `q kᵀ` product and one more exp pass per tile in the backward.
//!
//! [`attention`] takes the tiled form when the whole `P` would exceed
//! [`ATTENTION_TILE_BYTES`]; smaller problems (every tiny model, cross-attention to 77
//! tokens) take the materialised form unchanged. Both use the fused CPU kernels of
//! `softmax.rs` for f32 / f64 and candle tensor ops elsewhere, and compute the gradients of
//! tracked inputs only. [`attention_peak_elems`] reports the largest score / probability
//! block either form allocated on this thread.

use super::attention_tiled as tiled;
use super::bridge::attach3;
use super::softmax::{backward as softmax_backward, softmax_owned};
use super::{compute_dtype, Kernel};
use candle_core::{Result, Tensor};
use std::cell::Cell;

/// Byte budget of one score tile `[G, rows, Nk]` of the tiled attention, and the size of the
/// whole probability tensor above which [`attention`] tiles.
pub const ATTENTION_TILE_BYTES: usize = 64 << 20;

thread_local! {
    static PEAK_ELEMS: Cell<usize> = const { Cell::new(0) };
}

/// Records a score / probability block of `elems` elements for [`attention_peak_elems`].
pub(crate) fn note_block(elems: usize) {
    PEAK_ELEMS.with(|p| p.set(p.get().max(elems)));
}

/// The largest score / probability block (elements) the attention ops allocated on this
/// thread since the last [`reset_attention_peak`] (forward and backward).
pub fn attention_peak_elems() -> usize {
    PEAK_ELEMS.with(Cell::get)
}

/// Resets [`attention_peak_elems`] to zero for this thread.
pub fn reset_attention_peak() {
    PEAK_ELEMS.with(|p| p.set(0));
}

/// The checked geometry of one attention call.
pub(crate) struct Dims {
    /// The leading dims shared by q, k and v.
    pub(crate) lead: Vec<usize>,
    /// Their product (batch × heads).
    pub(crate) groups: usize,
    pub(crate) nq: usize,
    pub(crate) nk: usize,
    pub(crate) dv: usize,
}

impl Dims {
    /// Checks the shapes of `q`, `k`, `v` and, when given, that `mask` broadcasts to the
    /// scores `[..., Nq, Nk]`.
    pub(crate) fn of(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Self> {
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
        let lead = qd[..r - 2].to_vec();
        let dims = Self {
            groups: lead.iter().product(),
            nq: qd[r - 2],
            nk: kd[r - 2],
            dv: vd[r - 1],
            lead,
        };
        if let Some(m) = mask {
            let scores = dims.scores_shape(dims.nq);
            if m.broadcast_as(scores.as_slice()).is_err() {
                candle_core::bail!(
                    "attention: mask {:?} does not broadcast to the scores {scores:?}",
                    m.dims()
                );
            }
        }
        Ok(dims)
    }

    /// `[..., rows, Nk]`: the scores of `rows` queries in the inputs' leading dims.
    pub(crate) fn scores_shape(&self, rows: usize) -> Vec<usize> {
        let mut s = self.lead.clone();
        s.extend([rows, self.nk]);
        s
    }

    /// Elements of the whole score / probability tensor.
    fn score_elems(&self) -> usize {
        self.groups.saturating_mul(self.nq).saturating_mul(self.nk)
    }
}

/// Attention over `q` `[..., Nq, d]`, `k` `[..., Nk, d]`, `v` `[..., Nk, dv]` (same leading
/// dims), returning `[..., Nq, dv]`; `mask` is an optional additive bias broadcastable to
/// `[..., Nq, Nk]` (e.g. a causal mask; it gets no gradient). Computed in f32 (f64 stays
/// f64) and cast back to `q`'s dtype; tiled over queries when the probabilities would
/// exceed [`ATTENTION_TILE_BYTES`] (see the module docs).
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
    let dims = Dims::of(q, k, v, mask)?;
    let elem = compute_dtype(q.dtype()).size_in_bytes();
    if dims.score_elems().saturating_mul(elem) > ATTENTION_TILE_BYTES {
        return tiled::forward(q, k, v, scale, mask, &dims, ATTENTION_TILE_BYTES, kernel);
    }
    materialised(q, k, v, scale, mask, &dims, kernel)
}

/// The tiled (memory-efficient) attention with an explicit tile budget in bytes, whatever
/// the problem size: the same values as [`attention_with`] (tests force small tiles).
pub fn attention_tiled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    tile_bytes: usize,
    kernel: Kernel,
) -> Result<Tensor> {
    let dims = Dims::of(q, k, v, mask)?;
    if dims.nq == 0 || dims.nk == 0 {
        return materialised(q, k, v, scale, mask, &dims, kernel);
    }
    tiled::forward(q, k, v, scale, mask, &dims, tile_bytes, kernel)
}

/// The materialised form whatever the problem size: one score tensor, its probabilities
/// kept for the backward (benchmarks compare it with [`attention_tiled`]).
pub fn attention_materialised(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    kernel: Kernel,
) -> Result<Tensor> {
    let dims = Dims::of(q, k, v, mask)?;
    materialised(q, k, v, scale, mask, &dims, kernel)
}

/// The materialised form: one score tensor, its probabilities kept for the backward.
fn materialised(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    dims: &Dims,
    kernel: Kernel,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let cd = compute_dtype(dtype);
    let (q, k, v) = (q.to_dtype(cd)?, k.to_dtype(cd)?, v.to_dtype(cd)?);
    let (qc, kc, vc) = (q.detach(), k.detach(), v.detach());
    let scores = qc.matmul(&kc.t()?)?;
    note_block(dims.score_elems());
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
