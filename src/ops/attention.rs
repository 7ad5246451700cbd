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
//! Only `L` (`G · Nq` values, f32 or f64) is saved beside the inputs. The backward walks the
//! same tiles: it recomputes `P = exp(scale · S + mask − L)`, then `dV += Pᵀ dO_t`,
//! `dP = dO_t Vᵀ`, `dS = scale · P ⊙ (dP − D)` with `D = rowsum(P ⊙ dP)` (written over `dP`;
//! a tile holds whole key rows),
//! `dQ_t = dS K`, `dK += dSᵀ q_t`. Keys are not tiled: a tile of one query row is `G · Nk`
//! elements (8 heads × 4096 keys = 128 KiB in f32 at 512 px; even SD 2 at 768 px with CFG,
//! 10 × 9216 keys, is 360 KiB), far below any useful budget, so an online softmax over key
//! tiles would buy nothing at Stable Diffusion sizes. Peak attention memory is about two
//! tiles in the backward (`P` and `dP`, which becomes `dS`) and one or two in the forward,
//! instead of `G · Nq · Nk` per layer kept from the forward to the backward. The price is
//! one more `q kᵀ` product and one more exp pass per tile in the backward.
//!
//! [`attention`] takes the tiled form when the whole `P` would exceed
//! [`ATTENTION_TILE_BYTES`], or, when a graph is tracked, [`ATTENTION_MATERIALISE_BYTES`]
//! (the probabilities would be kept until the backward); smaller problems (every tiny
//! model) take the materialised form. [`attention_heads`] takes `[B, N, H·d]` projections
//! as they are and splits the heads inside the op, so the split copies never enter the graph. Both use the fused CPU kernels of
//! `softmax.rs` for f32 / f64 and candle tensor ops elsewhere, and compute the gradients of
//! tracked inputs only. [`attention_peak_elems`] reports the largest score / probability
//! block either form allocated on this thread.

use super::attention_cpu as cpu;
use super::attention_tiled as tiled;
use super::bridge::attach3_out;
use super::softmax::{backward as softmax_backward, softmax_owned};
use super::{compute_dtype, Kernel};
use candle_core::{DType, Result, Tensor};
use std::cell::Cell;

/// Byte budget of one score tile `[G, rows, Nk]` of the tiled attention.
pub const ATTENTION_TILE_BYTES: usize = 64 << 20;

/// The size of the whole probability tensor above which [`attention`] takes the tiled form
/// (when the graph is tracked: a graph-free forward keeps nothing either way).
pub const ATTENTION_MATERIALISE_BYTES: usize = 4 << 20;

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

pub(crate) use super::bridge::Grads3;

/// The backward of one attention form: graph-free `[q, k, v]` in the form's layout and
/// compute dtype, which of them need a gradient, the output gradient and the forward's
/// output (both in the same layout; only the fused form reads the output).
pub(crate) type CoreBwd =
    Box<dyn Fn([&Tensor; 3], [bool; 3], &Tensor, &Tensor) -> Result<Grads3> + Send + Sync>;

/// Which form computes one call.
#[derive(Clone, Copy, Debug)]
enum Form {
    /// One score tensor, its probabilities kept for the backward.
    Materialised,
    /// Query tiles of at most this many bytes of scores.
    Tiled(usize),
    /// The fused CPU kernel of `attention_cpu.rs` (blocks per head, only `L` kept).
    Fused,
}

impl Form {
    /// The default form: tiled when the whole `P` of `dims` would exceed
    /// [`ATTENTION_TILE_BYTES`], or [`ATTENTION_MATERIALISE_BYTES`] for a tracked call
    /// (elements of `elem` bytes).
    fn auto(dims: &Dims, elem: usize, track: bool) -> Self {
        let limit = match track {
            true => ATTENTION_MATERIALISE_BYTES,
            false => ATTENTION_TILE_BYTES,
        };
        match dims.score_elems().saturating_mul(elem) > limit {
            true => Self::Tiled(ATTENTION_TILE_BYTES),
            false => Self::Materialised,
        }
    }

    /// [`Form::auto`], with the fused CPU kernel in place of the tiled and materialised
    /// forms above [`ATTENTION_MATERIALISE_BYTES`] where it serves: on the CPU, without a
    /// mask, with [`Kernel::Auto`] (the forms compute in f32 / f64 whatever the input dtype).
    fn pick(
        dims: &Dims,
        elem: usize,
        track: bool,
        cpu: bool,
        masked: bool,
        kernel: Kernel,
    ) -> Self {
        let large = dims.score_elems().saturating_mul(elem) > ATTENTION_MATERIALISE_BYTES;
        let serves = cpu && !masked && kernel == Kernel::Auto;
        match serves && large && dims.nq > 0 && dims.nk > 0 {
            true => Self::Fused,
            false => Self::auto(dims, elem, track),
        }
    }
}

/// Runs `form` on graph-free `q`, `k`, `v` (compute dtype); the backward is built only when
/// `track`.
#[allow(clippy::too_many_arguments)]
fn core(
    [q, k, v]: [&Tensor; 3],
    track: bool,
    scale: f64,
    mask: Option<&Tensor>,
    dims: &Dims,
    form: Form,
    kernel: Kernel,
) -> Result<(Tensor, Option<CoreBwd>)> {
    let name = match form {
        Form::Materialised => "lora-attention",
        Form::Tiled(_) => "lora-attention-tiled",
        Form::Fused => "lora-attention-fused",
    };
    super::profile::scope(name, super::profile::Pass::Forward, || match form {
        Form::Materialised => materialised(q, k, v, track, scale, mask, dims, kernel),
        Form::Tiled(budget) => tiled::core([q, k, v], track, scale, mask, dims, budget, kernel),
        Form::Fused => fused(q, k, v, track, scale, dims),
    })
}

/// The fused CPU kernel on `[..., N, d]` inputs (leading dims flattened to one).
fn fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    track: bool,
    scale: f64,
    dims: &Dims,
) -> Result<(Tensor, Option<CoreBwd>)> {
    let g = dims.groups;
    let flat = move |t: &Tensor| -> Result<Tensor> {
        let r = t.rank();
        t.reshape((g, t.dim(r - 2)?, t.dim(r - 1)?))
    };
    note_block(cpu::BLOCK_ROWS.min(dims.nq) * dims.nk);
    let (out, lse) = cpu::forward(&flat(q)?, &flat(k)?, &flat(v)?, scale)?;
    let mut out_shape = dims.lead.clone();
    out_shape.extend([dims.nq, dims.dv]);
    let out = out.reshape(out_shape)?;
    if !track {
        return Ok((out, None));
    }
    let bwd = move |[q, k, v]: [&Tensor; 3], track: [bool; 3], g: &Tensor, out: &Tensor| {
        let (dq, dk, dv) = cpu::backward(
            [&flat(q)?, &flat(k)?, &flat(v)?],
            track,
            &lse,
            &flat(g)?,
            &flat(out)?,
            scale,
        )?;
        let back =
            |t: Option<Tensor>, like: &Tensor| t.map(|t| t.reshape(like.shape())).transpose();
        Ok((back(dq, q)?, back(dk, k)?, back(dv, v)?))
    };
    Ok((out, Some(Box::new(bwd))))
}

/// One attention op over `[..., N, d]` inputs in `form`: computed in the compute dtype on
/// graph-free copies of nothing (views), attached to `q`, `k`, `v` with the form's backward.
#[allow(clippy::too_many_arguments)]
fn run(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    dims: &Dims,
    form: Form,
    kernel: Kernel,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let cd = compute_dtype(dtype);
    let (q, k, v) = (q.to_dtype(cd)?, k.to_dtype(cd)?, v.to_dtype(cd)?);
    let track = q.track_op() || k.track_op() || v.track_op();
    let mask = mask
        .map(|m| m.to_dtype(cd).map(|m| m.detach()))
        .transpose()?;
    let inputs = [&q.detach(), &k.detach(), &v.detach()];
    let (out, bwd) = core(inputs, track, scale, mask.as_ref(), dims, form, kernel)?;
    let Some(bwd) = bwd else {
        return out.to_dtype(dtype);
    };
    let name = match form {
        Form::Materialised => "lora-attention",
        Form::Tiled(_) => "lora-attention-tiled",
        Form::Fused => "lora-attention-fused",
    };
    let f = move |[q, k, v]: [&Tensor; 3], out: &Tensor, g: &Tensor| {
        let track = [q.track_op(), k.track_op(), v.track_op()];
        bwd(
            [&q.detach(), &k.detach(), &v.detach()],
            track,
            &g.to_dtype(cd)?,
            &out.detach(),
        )
    };
    attach3_out([&q, &k, &v], out, name, Box::new(f))?.to_dtype(dtype)
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
    let track = q.track_op() || k.track_op() || v.track_op();
    let cd = compute_dtype(q.dtype());
    let cpu = q.device().is_cpu();
    let form = Form::pick(
        &dims,
        cd.size_in_bytes(),
        track,
        cpu,
        mask.is_some(),
        kernel,
    );
    run(q, k, v, scale, mask, &dims, form, kernel)
}

/// Multi-head attention over `q` `[B, Nq, H·d]`, `k` `[B, Nk, H·d]`, `v` `[B, Nk, H·dv]`
/// (heads side by side in the last dim, as projections give them), returning
/// `[B, Nq, H·dv]`: the same values as [`attention`] on the heads split out to `[B·H, N, d]`.
/// The split and merged copies are temporaries of the forward and of the backward, so the
/// graph keeps only `q`, `k`, `v`, the output and what the form saves.
pub fn attention_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    kernel: Kernel,
) -> Result<Tensor> {
    let ((b, _, cq), (bk, nk, ck), (bv, nv, cv)) = (q.dims3()?, k.dims3()?, v.dims3()?);
    let fits = heads > 0
        && b == bk
        && b == bv
        && nk == nv
        && cq == ck
        && cq % heads == 0
        && cv % heads == 0;
    if !fits {
        candle_core::bail!(
            "attention_heads: {heads} heads do not fit q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let dtype = q.dtype();
    let cd = compute_dtype(dtype);
    // Heads split and cast to the compute dtype on graph-free copies: for half inputs the
    // graph keeps q, k, v as they are (no f32 copies), and gets the output in their dtype.
    let split = move |t: &Tensor| -> Result<Tensor> {
        let (b, n, c) = t.dims3()?;
        t.detach()
            .to_dtype(cd)?
            .reshape((b, n, heads, c / heads))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * heads, n, c / heads))
    };
    let merge = move |t: &Tensor, to: DType| -> Result<Tensor> {
        let (bh, n, d) = t.dims3()?;
        t.reshape((bh / heads, heads, n, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((bh / heads, n, heads * d))?
            .to_dtype(to)
    };
    let (qh, kh, vh) = (split(q)?, split(k)?, split(v)?);
    let dims = Dims::of(&qh, &kh, &vh, None)?;
    let track = q.track_op() || k.track_op() || v.track_op();
    let cpu = q.device().is_cpu();
    let form = Form::pick(&dims, cd.size_in_bytes(), track, cpu, false, kernel);
    let (out, bwd) = core([&qh, &kh, &vh], track, scale, None, &dims, form, kernel)?;
    drop((qh, kh, vh));
    let out = merge(&out, dtype)?;
    let Some(bwd) = bwd else {
        return Ok(out);
    };
    let f = move |[q, k, v]: [&Tensor; 3], out: &Tensor, g: &Tensor| {
        let track = [q.track_op(), k.track_op(), v.track_op()];
        let heads = [split(q)?, split(k)?, split(v)?];
        let (gh, oh) = (split(g)?, split(out)?);
        let (dq, dk, dv) = bwd([&heads[0], &heads[1], &heads[2]], track, &gh, &oh)?;
        drop((heads, gh, oh));
        let m = |t: Option<Tensor>, like: &Tensor| t.map(|t| merge(&t, like.dtype())).transpose();
        Ok((m(dq, q)?, m(dk, k)?, m(dv, v)?))
    };
    attach3_out([q, k, v], out, "lora-attention-heads", Box::new(f))
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
    let form = match dims.nq == 0 || dims.nk == 0 {
        true => Form::Materialised,
        false => Form::Tiled(tile_bytes),
    };
    run(q, k, v, scale, mask, &dims, form, kernel)
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
    run(q, k, v, scale, mask, &dims, Form::Materialised, kernel)
}

/// The materialised form on graph-free inputs: one score tensor, its probabilities kept
/// for the backward.
#[allow(clippy::too_many_arguments)]
fn materialised(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    track: bool,
    scale: f64,
    mask: Option<&Tensor>,
    dims: &Dims,
    kernel: Kernel,
) -> Result<(Tensor, Option<CoreBwd>)> {
    let scores = q.matmul(&k.t()?)?;
    note_block(dims.score_elems());
    // With a mask the scale is applied before adding it, so the softmax itself is unscaled.
    let (scores, sm_scale) = match mask {
        Some(m) => (scores.affine(scale, 0.0)?.broadcast_add(m)?, 1.0),
        None => (scores, scale),
    };
    // The scores are fresh (nothing else holds them), so the softmax may overwrite them.
    let p = softmax_owned(scores, sm_scale, kernel)?;
    let out = p.matmul(v)?;
    if !track {
        return Ok((out, None));
    }
    let masked = mask.is_some();
    let bwd = move |[q, k, v]: [&Tensor; 3], [tq, tk, tv]: [bool; 3], g: &Tensor, _: &Tensor| {
        let dv = match tv {
            true => Some(p.t()?.matmul(g)?),
            false => None,
        };
        if !(tq || tk) {
            return Ok((None, None, dv));
        }
        let dp = g.matmul(&v.t()?)?;
        let ds = softmax_backward(&p, &dp, sm_scale, kernel)?;
        let ds = if masked { ds.affine(scale, 0.0)? } else { ds };
        let dq = match tq {
            true => Some(ds.matmul(k)?),
            false => None,
        };
        let dk = match tk {
            true => Some(ds.t()?.matmul(q)?),
            false => None,
        };
        Ok((dq, dk, dv))
    };
    Ok((out, Some(Box::new(bwd))))
}
