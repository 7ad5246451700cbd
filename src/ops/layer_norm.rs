//! Layer norm over the last dimension with weight and bias, and its hand-written backward:
//! with `x̂ = (x - μ) · rstd` and `ĝ = g · w`,
//! `dx = rstd · (ĝ - mean(ĝ) - x̂ · mean(ĝ · x̂))`, `dw = Σ g · x̂`, `db = Σ g`
//! (the sums run over every row).

use super::bridge::{bridge3, bridge3_grads, fwd_via_kernel, norm_grads, Backend, Grads3};
use super::par::{
    contiguous_slice, mean_rstd, par_for, par_rows, reduce_idx, row_blocks, Real, SharedMut,
};
use super::Kernel;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

/// `(x - mean) * rstd` over the last dimension and `rstd`, with tensor ops.
fn normalize(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    Ok((xc.broadcast_mul(&rstd)?, rstd))
}

/// Forward with candle's kernels: the fused layer norm for f32 / f16 / bf16, tensor ops
/// for f64 (candle's fused kernel has no f64 version).
pub(crate) fn generic_fwd(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == DType::F64 {
        let (xhat, _) = normalize(x, eps)?;
        xhat.broadcast_mul(w)?.broadcast_add(b)
    } else {
        candle_nn::ops::layer_norm(x, w, b, eps as f32)
    }
}

/// Backward with tensor ops: `(dx, dw, db)`.
pub(crate) fn generic_bwd(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = x.dim(D::Minus1)?;
    let (xhat, rstd) = normalize(x, eps)?;
    let gh = g.broadcast_mul(w)?;
    let m1 = gh.mean_keepdim(D::Minus1)?;
    let m2 = (&gh * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = gh
        .broadcast_sub(&m1)?
        .sub(&xhat.broadcast_mul(&m2)?)?
        .broadcast_mul(&rstd)?;
    let rows = x.elem_count() / c.max(1);
    let dw = (g * &xhat)?.reshape((rows, c))?.sum(0)?;
    let db = g.reshape((rows, c))?.sum(0)?;
    Ok((dx, dw, db))
}

#[allow(clippy::too_many_arguments)]
fn fwd_kernel<T: Real>(
    (xs, xl): (&CpuStorage, &Layout),
    (ws, wl): (&CpuStorage, &Layout),
    (bs, bl): (&CpuStorage, &Layout),
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_slice::<T>(xs, xl, "layer_norm")?;
    let w = contiguous_slice::<T>(ws, wl, "layer_norm")?;
    let b = contiguous_slice::<T>(bs, bl, "layer_norm")?;
    let c = w.len();
    let mut dst = vec![T::ZERO; x.len()];
    par_rows(&mut dst, c, |i, d| {
        let x = &x[i * c..(i + 1) * c];
        let (mean, rstd) = mean_rstd(x, eps);
        let (m, r) = (T::from_f64(mean), T::from_f64(rstd));
        for (((d, &x), &w), &b) in d.iter_mut().zip(x).zip(w).zip(b) {
            *d = (x - m) * r * w + b;
        }
    });
    Ok((T::to_cpu_storage_owned(dst), xl.shape().clone()))
}

/// Fused backward: one buffer `[dx (x's size) | dw (C) | db (C)]`.
fn bwd_kernel<T: Real>(
    (xs, xl): (&CpuStorage, &Layout),
    (ws, wl): (&CpuStorage, &Layout),
    (gs, gl): (&CpuStorage, &Layout),
    eps: f64,
    want_wb: bool,
) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_slice::<T>(xs, xl, "layer_norm backward")?;
    let w = contiguous_slice::<T>(ws, wl, "layer_norm backward")?;
    let g = contiguous_slice::<T>(gs, gl, "layer_norm backward")?;
    let c = w.len();
    let len = x.len();
    let rows = len / c.max(1);
    let blocks = row_blocks(rows, c);
    let mut out = vec![T::ZERO; len + 2 * c];
    let mut partial = vec![0f64; if want_wb { blocks.len() * 2 * c } else { 0 }];
    let dx_ptr = SharedMut::new(&mut out[..len]);
    let p_ptr = SharedMut::new(&mut partial);
    let cost = blocks.first().map_or(0, |r| r.len()) * c;
    par_for(blocks.len(), cost, |bi| {
        let rows = blocks[bi].clone();
        // SAFETY: blocks are disjoint row ranges; partial slot bi belongs to this item only.
        let dx = unsafe { dx_ptr.slice(rows.start * c, rows.len() * c) };
        let mut part = want_wb.then(|| unsafe { p_ptr.slice(bi * 2 * c, 2 * c) });
        for (k, r) in rows.enumerate() {
            let (xr, gr) = (&x[r * c..(r + 1) * c], &g[r * c..(r + 1) * c]);
            let (mean, rstd) = mean_rstd(xr, eps);
            // Σ ĝ and Σ ĝ·x̂ with ĝ = g·w, x̂ = (x - mean)·rstd.
            let [s1, sx] = reduce_idx(c, |j| {
                let gh = gr[j].to_f64() * w[j].to_f64();
                [gh, gh * xr[j].to_f64()]
            });
            let s2 = rstd * (sx - mean * s1);
            if let Some(p) = part.as_deref_mut() {
                let (pw, pb) = p.split_at_mut(c);
                for (j, (pw, pb)) in pw.iter_mut().zip(pb.iter_mut()).enumerate() {
                    let gj = gr[j].to_f64();
                    *pw += gj * (xr[j].to_f64() - mean) * rstd;
                    *pb += gj;
                }
            }
            let (m1, m2) = (s1 / c as f64, s2 / c as f64);
            let dxr = &mut dx[k * c..(k + 1) * c];
            for (((d, &xv), &gv), &wv) in dxr.iter_mut().zip(xr).zip(gr).zip(w) {
                let xh = (xv.to_f64() - mean) * rstd;
                *d = T::from_f64(rstd * (gv.to_f64() * wv.to_f64() - m1 - xh * m2));
            }
        }
    });
    if want_wb {
        let mut acc = vec![0f64; 2 * c];
        for p in partial.chunks(2 * c) {
            acc.iter_mut().zip(p).for_each(|(a, v)| *a += v);
        }
        for (o, a) in out[len..].iter_mut().zip(acc) {
            *o = T::from_f64(a);
        }
    }
    Ok((T::to_cpu_storage_owned(out), Shape::from(len + 2 * c)))
}

/// The differentiable layer norm op on `(x, weight, bias)`.
pub(crate) struct LayerNorm {
    pub(crate) eps: f64,
    pub(crate) kernel: Kernel,
}

impl LayerNorm {
    fn any<S: Backend>(
        &self,
        x: (&S, &Layout),
        w: (&S, &Layout),
        b: (&S, &Layout),
    ) -> Result<(S, Shape)> {
        bridge3(x, w, b, |x, w, b| generic_fwd(x, w, b, self.eps))
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "lora-layer-norm"
    }
    fwd_via_kernel!(self, (x, w, b) if self.kernel == Kernel::Auto, T => {
        fwd_kernel::<T>(x, w, b, self.eps)
    });
    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let track = [x.track_op(), w.track_op(), b.track_op()];
        grads(self.eps, self.kernel, [x, w, b], track, g)
    }
}

/// The gradients of [`LayerNorm`] on f32 / f64 `(x, weight, bias)`, kept where `track` says.
pub(crate) fn grads(
    eps: f64,
    kernel: Kernel,
    [x, w, b]: [&Tensor; 3],
    track: [bool; 3],
    g: &Tensor,
) -> Result<Grads3> {
    let op = LayerNormBwd {
        eps,
        want_wb: track[1] || track[2],
    };
    let fused = kernel.fused_on(x).then_some(&op);
    norm_grads([x, w, b], track, g, fused, |x, w, g| {
        generic_bwd(x, w, g, eps)
    })
}

/// The fused backward as a graph-free op on `(x, weight, grad)`.
struct LayerNormBwd {
    eps: f64,
    want_wb: bool,
}

impl LayerNormBwd {
    fn any<S: Backend>(
        &self,
        x: (&S, &Layout),
        w: (&S, &Layout),
        g: (&S, &Layout),
    ) -> Result<(S, Shape)> {
        bridge3_grads(x, w, g, |x, w, g| generic_bwd(x, w, g, self.eps))
    }
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "lora-layer-norm-bwd"
    }
    fwd_via_kernel!(self, (x, w, g), T => bwd_kernel::<T>(x, w, g, self.eps, self.want_wb));
}
