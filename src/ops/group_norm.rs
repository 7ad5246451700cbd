//! Group norm over `[N, C, *]` with per-channel weight and bias, and its hand-written
//! backward (per group of `M = C/G · S` elements, `x̂ = (x - μ) · rstd`, `ĝ = g · w_c`):
//! `dx = rstd · (ĝ - mean(ĝ) - x̂ · mean(ĝ · x̂))`, `dw_c = Σ g · x̂`, `db_c = Σ g`.

use super::bridge::{bridge3, bridge3_grads, fwd_via_kernel, norm_grads, Backend, Grads3};
use super::par::{contiguous_slice, mean_rstd, par_for, reduce1, reduce2, Real, SharedMut};
use super::Kernel;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};

/// Per-channel broadcast shape `[1, C, 1, ...]` for an input of rank `rank`.
fn channel_shape(c: usize, rank: usize) -> Vec<usize> {
    let mut s = vec![1usize; rank];
    s[1] = c;
    s
}

/// `x̂` (in x's shape) and `rstd` (`[N, G, 1]`), with tensor ops.
fn normalize(x: &Tensor, groups: usize, eps: f64) -> Result<(Tensor, Tensor)> {
    let n = x.dim(0)?;
    let xg = x.reshape((n, groups, ()))?;
    let mean = xg.mean_keepdim(D::Minus1)?;
    let xc = xg.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    Ok((xc.broadcast_mul(&rstd)?.reshape(x.shape())?, rstd))
}

/// Forward with tensor ops (candle has no fused group norm).
pub(crate) fn generic_fwd(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let cs = channel_shape(w.elem_count(), x.rank());
    let (xhat, _) = normalize(x, groups, eps)?;
    xhat.broadcast_mul(&w.reshape(cs.as_slice())?)?
        .broadcast_add(&b.reshape(cs.as_slice())?)
}

/// Backward with tensor ops: `(dx, dw, db)`.
pub(crate) fn generic_bwd(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    let cs = channel_shape(c, x.rank());
    let (xhat, rstd) = normalize(x, groups, eps)?;
    let gh = g.broadcast_mul(&w.reshape(cs.as_slice())?)?;
    let ghg = gh.reshape((n, groups, ()))?;
    let xhg = xhat.reshape((n, groups, ()))?;
    let m1 = ghg.mean_keepdim(D::Minus1)?;
    let m2 = (&ghg * &xhg)?.mean_keepdim(D::Minus1)?;
    let dx = ghg
        .broadcast_sub(&m1)?
        .sub(&xhg.broadcast_mul(&m2)?)?
        .broadcast_mul(&rstd)?
        .reshape(x.shape())?;
    let dw = (g * &xhat)?.reshape((n, c, ()))?.sum(2)?.sum(0)?;
    let db = g.reshape((n, c, ()))?.sum(2)?.sum(0)?;
    Ok((dx, dw, db))
}

/// Sizes of a group norm input: `(N, C, S, G)` with S the product of the spatial dims.
fn dims(l: &Layout, c: usize, groups: usize) -> (usize, usize, usize, usize) {
    let n = l.dims()[0];
    let s = l.shape().elem_count() / (n * c).max(1);
    (n, c, s, groups)
}

fn fwd_kernel<T: Real>(
    (xs, xl): (&CpuStorage, &Layout),
    (ws, wl): (&CpuStorage, &Layout),
    (bs, bl): (&CpuStorage, &Layout),
    groups: usize,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_slice::<T>(xs, xl, "group_norm")?;
    let w = contiguous_slice::<T>(ws, wl, "group_norm")?;
    let b = contiguous_slice::<T>(bs, bl, "group_norm")?;
    let (_, c, s, g) = dims(xl, w.len(), groups);
    let cg = c / g;
    let m = cg * s;
    let mut dst = vec![T::ZERO; x.len()];
    super::par::par_rows(&mut dst, m, |i, d| {
        let xr = &x[i * m..(i + 1) * m];
        let (mean, rstd) = mean_rstd(xr, eps);
        for k in 0..cg {
            let ch = (i % g) * cg + k;
            let a = rstd * w[ch].to_f64();
            let (a, o) = (T::from_f64(a), T::from_f64(b[ch].to_f64() - mean * a));
            let range = k * s..(k + 1) * s;
            for (d, &v) in d[range.clone()].iter_mut().zip(&xr[range]) {
                *d = v * a + o;
            }
        }
    });
    Ok((T::to_cpu_storage_owned(dst), xl.shape().clone()))
}

/// The input gradient `dx` of one (sample, group) block `xr` of `w.len()` channels with
/// statistics `(mean, rstd)`, for the output gradient `gg` (the channels' weights `w`);
/// with `partials`, each channel's `Σ g·x̂` and `Σ g` (this sample's dweight and dbias).
pub(crate) fn group_input_grad<T: Real>(
    xr: &[T],
    gg: &[T],
    w: &[T],
    (mean, rstd): (f64, f64),
    dx: &mut [T],
    mut partials: Option<(&mut [f64], &mut [f64])>,
) {
    let cg = w.len();
    let s = xr.len() / cg.max(1);
    let (mut sum_gh, mut sum_ghx) = (0f64, 0f64);
    for (k, &wk) in w.iter().enumerate() {
        let wc = wk.to_f64();
        let range = k * s..(k + 1) * s;
        let (gc, xc) = (&gg[range.clone()], &xr[range]);
        let s1 = reduce1(gc, |v| v.to_f64());
        let s2 = reduce2(gc, xc, |a, b| a.to_f64() * b.to_f64());
        let gx = rstd * (s2 - mean * s1);
        if let Some((pw, pb)) = partials.as_mut() {
            pw[k] = gx;
            pb[k] = s1;
        }
        sum_gh += wc * s1;
        sum_ghx += wc * gx;
    }
    let mf = xr.len() as f64;
    let bcoef = -rstd * rstd * sum_ghx / mf;
    let ccoef = -bcoef * mean - rstd * sum_gh / mf;
    for (k, &wk) in w.iter().enumerate() {
        let a = rstd * wk.to_f64();
        let r = k * s..(k + 1) * s;
        for ((d, &gv), &xv) in dx[r.clone()].iter_mut().zip(&gg[r.clone()]).zip(&xr[r]) {
            *d = T::from_f64(a * gv.to_f64() + bcoef * xv.to_f64() + ccoef);
        }
    }
}

/// Fused backward: one buffer `[dx (x's size) | dw (C) | db (C)]`.
fn bwd_kernel<T: Real>(
    (xs, xl): (&CpuStorage, &Layout),
    (ws, wl): (&CpuStorage, &Layout),
    (gs, gl): (&CpuStorage, &Layout),
    groups: usize,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_slice::<T>(xs, xl, "group_norm backward")?;
    let w = contiguous_slice::<T>(ws, wl, "group_norm backward")?;
    let gr = contiguous_slice::<T>(gs, gl, "group_norm backward")?;
    let (n, c, s, g) = dims(xl, w.len(), groups);
    let (cg, len) = (c / g, x.len());
    let m = cg * s;
    let mut out = vec![T::ZERO; len + 2 * c];
    // Per (sample, channel) partial sums of g·x̂ and g, reduced over samples afterwards.
    let mut pw = vec![0f64; n * c];
    let mut pb = vec![0f64; n * c];
    let (dx_ptr, pw_ptr, pb_ptr) = (
        SharedMut::new(&mut out[..len]),
        SharedMut::new(&mut pw),
        SharedMut::new(&mut pb),
    );
    par_for(n * g, m, |i| {
        // SAFETY: item i = (sample, group) owns elements [i*m, (i+1)*m) and channels
        // [i*cg, (i+1)*cg) of the [N*C] partial buffers.
        let (dx, pw, pb) = unsafe {
            (
                dx_ptr.slice(i * m, m),
                pw_ptr.slice(i * cg, cg),
                pb_ptr.slice(i * cg, cg),
            )
        };
        let (xr, gg) = (&x[i * m..(i + 1) * m], &gr[i * m..(i + 1) * m]);
        let stats = mean_rstd(xr, eps);
        let wg = &w[(i % g) * cg..(i % g + 1) * cg];
        group_input_grad(xr, gg, wg, stats, dx, Some((pw, pb)));
    });
    for ch in 0..c {
        let (mut dw, mut db) = (0f64, 0f64);
        for smp in 0..n {
            dw += pw[smp * c + ch];
            db += pb[smp * c + ch];
        }
        out[len + ch] = T::from_f64(dw);
        out[len + c + ch] = T::from_f64(db);
    }
    Ok((T::to_cpu_storage_owned(out), Shape::from(len + 2 * c)))
}

/// The differentiable group norm op on `(x, weight, bias)`.
pub(crate) struct GroupNorm {
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) kernel: Kernel,
}

impl GroupNorm {
    fn any<S: Backend>(
        &self,
        x: (&S, &Layout),
        w: (&S, &Layout),
        b: (&S, &Layout),
    ) -> Result<(S, Shape)> {
        bridge3(x, w, b, |x, w, b| {
            generic_fwd(x, w, b, self.groups, self.eps)
        })
    }
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "lora-group-norm"
    }
    fwd_via_kernel!(self, (x, w, b) if self.kernel == Kernel::Auto, T => {
        fwd_kernel::<T>(x, w, b, self.groups, self.eps)
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
        grads((self.groups, self.eps), self.kernel, [x, w, b], track, g)
    }
}

/// The gradients of [`GroupNorm`] (`(groups, eps)`) on f32 / f64 `(x, weight, bias)`, kept
/// where `track` says.
pub(crate) fn grads(
    (groups, eps): (usize, f64),
    kernel: Kernel,
    [x, w, b]: [&Tensor; 3],
    track: [bool; 3],
    g: &Tensor,
) -> Result<Grads3> {
    let op = GroupNormBwd { groups, eps };
    let fused = kernel.fused_on(x).then_some(&op);
    norm_grads([x, w, b], track, g, fused, |x, w, g| {
        generic_bwd(x, w, g, groups, eps)
    })
}

/// The fused backward as a graph-free op on `(x, weight, grad)`.
struct GroupNormBwd {
    groups: usize,
    eps: f64,
}

impl GroupNormBwd {
    fn any<S: Backend>(
        &self,
        x: (&S, &Layout),
        w: (&S, &Layout),
        g: (&S, &Layout),
    ) -> Result<(S, Shape)> {
        bridge3_grads(x, w, g, |x, w, g| {
            generic_bwd(x, w, g, self.groups, self.eps)
        })
    }
}

impl CustomOp3 for GroupNormBwd {
    fn name(&self) -> &'static str {
        "lora-group-norm-bwd"
    }
    fwd_via_kernel!(self, (x, w, g), T => bwd_kernel::<T>(x, w, g, self.groups, self.eps));
}
