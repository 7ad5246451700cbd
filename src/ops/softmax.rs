//! Softmax over the last dimension of `scale · x` with a hand-written backward
//! `grad_in = scale · y * (g - sum(g * y, -1))` (the scale saves attention a full pass),
//! and the two row kernels of tiled attention: softmax with the row log-sum-exp `L`, and the
//! recomputation `exp(scale · x − L)` of the probabilities from the scores.

use super::bridge::{bridge1, bridge2, fwd_via_kernel, Backend};
use super::par::{
    contiguous_slice, map_inplace, map_into, max_of, par_rows, reduce1, reduce2, Real, SharedMut,
};
use super::Kernel;
use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, InplaceOp1, InplaceOp2, Layout,
    MetalStorage, Result, Shape, Storage, Tensor, WithDType, D,
};
use std::sync::Mutex;

/// Forward with candle's kernels (any device, any float dtype).
pub(crate) fn generic_fwd(x: &Tensor, scale: f64) -> Result<Tensor> {
    if scale == 1.0 {
        candle_nn::ops::softmax_last_dim(x)
    } else {
        candle_nn::ops::softmax_last_dim(&x.affine(scale, 0.0)?)
    }
}

/// Backward with tensor ops (any device): `scale · y * (g - sum(g * y, -1))`.
pub(crate) fn generic_bwd(y: &Tensor, g: &Tensor, scale: f64) -> Result<Tensor> {
    let s = (g * y)?.sum_keepdim(D::Minus1)?;
    let d = g.broadcast_sub(&s)?.mul(y)?;
    if scale == 1.0 {
        Ok(d)
    } else {
        d.affine(scale, 0.0)
    }
}

/// `max(sc · x)` of a non-empty row.
#[inline(always)]
fn scaled_max<T: Real>(x: &[T], scale: f64) -> T {
    let sc = T::from_f64(scale);
    // max(sc · x) = sc · max(x) for sc ≥ 0; sc · x is exact for sc = 1.
    if scale >= 0.0 {
        max_of(x) * sc
    } else {
        x[1..].iter().fold(x[0] * sc, |m, &v| m.maxv(v * sc))
    }
}

/// Normalises a row of exponentials in place.
#[inline(always)]
fn normalise<T: Real>(d: &mut [T]) {
    let inv = T::ONE / reduce1(d, |e| e);
    for d in d.iter_mut() {
        *d *= inv;
    }
}

fn fwd_kernel<T: Real>(s: &CpuStorage, l: &Layout, scale: f64) -> Result<(CpuStorage, Shape)> {
    let src = contiguous_slice::<T>(s, l, "softmax")?;
    let n = l.dims().last().copied().unwrap_or(1);
    let mut dst = vec![T::ZERO; src.len()];
    let sc = T::from_f64(scale);
    par_rows(&mut dst, n, |i, d| {
        let x = &src[i * n..(i + 1) * n];
        let max = scaled_max(x, scale);
        map_into(d, x, |v| (v * sc - max).exp());
        normalise(d);
    });
    Ok((T::to_cpu_storage_owned(dst), l.shape().clone()))
}

fn inplace_kernel<T: Real>(d: &mut [T], n: usize, scale: f64) {
    let sc = T::from_f64(scale);
    par_rows(d, n, |_, d| {
        let max = scaled_max(d, scale);
        map_inplace(d, |v| (v * sc - max).exp());
        normalise(d);
    });
}

/// `softmax(scale · x)` over the last dimension written over `x` (f32 / f64 on the CPU,
/// contiguous): saves attention a score-sized allocation.
struct SoftmaxInPlace {
    scale: f64,
}

impl InplaceOp1 for SoftmaxInPlace {
    fn name(&self) -> &'static str {
        "lora-softmax-in-place"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("softmax in place: the input must be contiguous");
        };
        let n = l.dims().last().copied().unwrap_or(1);
        match s {
            CpuStorage::F32(v) => inplace_kernel(&mut v[a..b], n, self.scale),
            CpuStorage::F64(v) => inplace_kernel(&mut v[a..b], n, self.scale),
            _ => candle_core::bail!("softmax in place: f32 / f64 only, got {:?}", s.dtype()),
        }
        Ok(())
    }
}

/// `softmax(scale · x)` over the last dimension without a graph, for an `x` nothing else
/// shares (e.g. fresh attention scores): on the CPU in f32 / f64 with [`Kernel::Auto`] the
/// result overwrites `x`'s storage, elsewhere it is [`Softmax`]'s forward.
pub(crate) fn softmax_owned(x: Tensor, scale: f64, kernel: Kernel) -> Result<Tensor> {
    let fused = kernel.fused_on(&x) && x.is_contiguous() && x.dims().last().is_some_and(|&n| n > 0);
    if fused {
        x.inplace_op1(&SoftmaxInPlace { scale })?;
        return Ok(x);
    }
    x.contiguous()?.apply_op1_no_bwd(&Softmax { kernel, scale })
}

fn bwd_kernel<T: Real>(
    (ys, yl): (&CpuStorage, &Layout),
    (gs, gl): (&CpuStorage, &Layout),
    scale: f64,
) -> Result<(CpuStorage, Shape)> {
    let y = contiguous_slice::<T>(ys, yl, "softmax backward")?;
    let g = contiguous_slice::<T>(gs, gl, "softmax backward")?;
    let n = yl.dims().last().copied().unwrap_or(1);
    let mut dst = vec![T::ZERO; y.len()];
    let sc = T::from_f64(scale);
    par_rows(&mut dst, n, |i, d| {
        let (y, g) = (&y[i * n..(i + 1) * n], &g[i * n..(i + 1) * n]);
        let s = reduce2(y, g, |a, b| a * b);
        if scale == 1.0 {
            for ((d, &a), &b) in d.iter_mut().zip(y).zip(g) {
                *d = a * (b - s);
            }
        } else {
            for ((d, &a), &b) in d.iter_mut().zip(y).zip(g) {
                *d = sc * a * (b - s);
            }
        }
    });
    Ok((T::to_cpu_storage_owned(dst), yl.shape().clone()))
}

/// The differentiable softmax op: `softmax(scale · x)` over the last dimension.
pub(crate) struct Softmax {
    pub(crate) kernel: Kernel,
    pub(crate) scale: f64,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "lora-softmax-last-dim"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match (self.kernel, s.dtype()) {
            (Kernel::Auto, DType::F32) if l.is_contiguous() => fwd_kernel::<f32>(s, l, self.scale),
            (Kernel::Auto, DType::F64) if l.is_contiguous() => fwd_kernel::<f64>(s, l, self.scale),
            _ => bridge1(s, l, |x| generic_fwd(x, self.scale)),
        }
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        bridge1(s, l, |x| generic_fwd(x, self.scale))
    }
    fn metal_fwd(&self, s: &MetalStorage, l: &Layout) -> Result<(MetalStorage, Shape)> {
        bridge1(s, l, |x| generic_fwd(x, self.scale))
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(backward(y, g, self.scale, self.kernel)?))
    }
}

/// The gradient w.r.t. `x` of `y = softmax(scale · x)` for the output gradient `g`.
pub(crate) fn backward(y: &Tensor, g: &Tensor, scale: f64, kernel: Kernel) -> Result<Tensor> {
    let fused = kernel.fused_on(y);
    if fused {
        let g = g.to_dtype(y.dtype())?.contiguous()?;
        y.contiguous()?.apply_op2_no_bwd(&g, &SoftmaxBwd { scale })
    } else {
        generic_bwd(y, g, scale)
    }
}

/// The fused backward (CPU kernel; other devices run [`generic_bwd`]).
struct SoftmaxBwd {
    scale: f64,
}

impl SoftmaxBwd {
    fn any<S: Backend>(&self, a: (&S, &Layout), b: (&S, &Layout)) -> Result<(S, Shape)> {
        bridge2(a, b, |y, g| generic_bwd(y, g, self.scale))
    }
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "lora-softmax-last-dim-bwd"
    }
    fwd_via_kernel!(self, (y, g), T => bwd_kernel::<T>(y, g, self.scale));
}

/// `softmax(scale · x)` rows written over `d`, returning each row's log-sum-exp
/// `L = log Σ exp(scale · x)` (the same arithmetic as [`SoftmaxInPlace`] for the probabilities).
fn lse_inplace_kernel<T: Real>(d: &mut [T], n: usize, scale: f64) -> Vec<T> {
    let mut lse = vec![T::ZERO; d.len() / n];
    let out = SharedMut::new(&mut lse);
    let sc = T::from_f64(scale);
    par_rows(d, n, |i, d| {
        let max = scaled_max(d, scale);
        map_inplace(d, |v| (v * sc - max).exp());
        let sum = reduce1(d, |e| e);
        let inv = T::ONE / sum;
        for d in d.iter_mut() {
            *d *= inv;
        }
        // SAFETY: row i writes element i of `lse` only, inside its bounds.
        unsafe { out.slice(i, 1)[0] = T::from_f64(max.to_f64() + sum.to_f64().ln()) };
    });
    lse
}

/// [`SoftmaxInPlace`] that also records each row's log-sum-exp (read back with `take`).
struct SoftmaxLseInPlace {
    scale: f64,
    lse: Mutex<Option<CpuStorage>>,
}

impl InplaceOp1 for SoftmaxLseInPlace {
    fn name(&self) -> &'static str {
        "lora-softmax-lse-in-place"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("softmax-lse in place: the input must be contiguous");
        };
        let n = l.dims().last().copied().unwrap_or(1);
        let lse = match s {
            CpuStorage::F32(v) => {
                f32::to_cpu_storage_owned(lse_inplace_kernel(&mut v[a..b], n, self.scale))
            }
            CpuStorage::F64(v) => {
                f64::to_cpu_storage_owned(lse_inplace_kernel(&mut v[a..b], n, self.scale))
            }
            _ => candle_core::bail!("softmax-lse in place: f32 / f64 only, got {:?}", s.dtype()),
        };
        match self.lse.lock() {
            Ok(mut slot) => *slot = Some(lse),
            Err(_) => candle_core::bail!("softmax-lse in place: poisoned result slot"),
        }
        Ok(())
    }
}

/// The shape of a row statistic of `x`: its dims with the last one set to 1.
fn row_shape(x: &Tensor) -> Shape {
    let mut d = x.dims().to_vec();
    if let Some(last) = d.last_mut() {
        *last = 1;
    }
    Shape::from(d)
}

/// `softmax(scale · x)` over the last dimension without a graph, for an `x` nothing else
/// shares, plus each row's log-sum-exp `L = log Σ exp(scale · x)` (shape `[..., 1]`, the
/// dtype of `x`): on the CPU in f32 / f64 with [`Kernel::Auto`] the probabilities overwrite
/// `x` and both come from one pass over each row, elsewhere from candle tensor ops.
pub(crate) fn softmax_lse_owned(x: Tensor, scale: f64, kernel: Kernel) -> Result<(Tensor, Tensor)> {
    let fused = kernel.fused_on(&x) && x.is_contiguous() && x.dims().last().is_some_and(|&n| n > 0);
    if fused {
        let op = SoftmaxLseInPlace {
            scale,
            lse: Mutex::new(None),
        };
        x.inplace_op1(&op)?;
        let lse = match op.lse.into_inner() {
            Ok(Some(s)) => s,
            _ => candle_core::bail!("softmax-lse in place: the kernel left no result"),
        };
        let lse = Tensor::from_storage(Storage::Cpu(lse), row_shape(&x), BackpropOp::none(), false);
        return Ok((x, lse));
    }
    let xs = if scale == 1.0 {
        x
    } else {
        x.affine(scale, 0.0)?
    };
    let max = xs.max_keepdim(D::Minus1)?;
    let e = xs.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok((e.broadcast_div(&sum)?, (max + sum.log()?)?))
}

/// `d = exp(scale · d − L_row)` over rows of `n` elements.
fn exp_lse_kernel<T: Real>(d: &mut [T], lse: &[T], n: usize, scale: f64) {
    let sc = T::from_f64(scale);
    par_rows(d, n, |i, d| {
        let l = lse[i];
        map_inplace(d, |v| (v * sc - l).exp());
    });
}

/// `exp(scale · x − L)` with a per-row `L`, written over `x` (f32 / f64 CPU, contiguous).
struct ExpLseInPlace {
    scale: f64,
}

impl InplaceOp2 for ExpLseInPlace {
    fn name(&self) -> &'static str {
        "lora-exp-lse-in-place"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout, ls: &CpuStorage, ll: &Layout) -> Result<()> {
        let (Some((a, b)), Some((la, lb))) = (l.contiguous_offsets(), ll.contiguous_offsets())
        else {
            candle_core::bail!("exp-lse in place: the inputs must be contiguous");
        };
        let n = l.dims().last().copied().unwrap_or(1);
        if (b - a) != (lb - la) * n {
            candle_core::bail!(
                "exp-lse in place: {:?} rows but {} statistics",
                l.dims(),
                lb - la
            );
        }
        match (s, ls) {
            (CpuStorage::F32(v), CpuStorage::F32(w)) => {
                exp_lse_kernel(&mut v[a..b], &w[la..lb], n, self.scale)
            }
            (CpuStorage::F64(v), CpuStorage::F64(w)) => {
                exp_lse_kernel(&mut v[a..b], &w[la..lb], n, self.scale)
            }
            (s, _) => candle_core::bail!("exp-lse in place: f32 / f64 only, got {:?}", s.dtype()),
        }
        Ok(())
    }
}

/// The probabilities `exp(scale · x − L)` recomputed from the scores `x` (nothing else
/// shares them) and the row log-sum-exp `L` of [`softmax_lse_owned`]; written over `x` by
/// the fused CPU kernel, else with candle tensor ops.
pub(crate) fn exp_lse_owned(x: Tensor, lse: &Tensor, scale: f64, kernel: Kernel) -> Result<Tensor> {
    let fused = kernel.fused_on(&x)
        && x.is_contiguous()
        && lse.is_contiguous()
        && lse.dtype() == x.dtype()
        && x.dims().last().is_some_and(|&n| n > 0);
    if fused {
        x.inplace_op2(lse, &ExpLseInPlace { scale })?;
        return Ok(x);
    }
    x.affine(scale, 0.0)?.broadcast_sub(lse)?.exp()
}

/// `g = scale · y ⊙ (g − Σ_row g ⊙ y)` over rows of `n` elements.
fn grad_rows_kernel<T: Real>(g: &mut [T], y: &[T], n: usize, scale: f64) {
    let sc = T::from_f64(scale);
    par_rows(g, n, |i, g| {
        let y = &y[i * n..(i + 1) * n];
        let s = reduce2(y, g, |a, b| a * b);
        for (g, &p) in g.iter_mut().zip(y) {
            *g = sc * p * (*g - s);
        }
    });
}

/// The softmax backward written over the output gradient.
struct GradRowsInPlace {
    scale: f64,
}

impl InplaceOp2 for GradRowsInPlace {
    fn name(&self) -> &'static str {
        "lora-softmax-bwd-in-place"
    }
    fn cpu_fwd(
        &self,
        gs: &mut CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<()> {
        let (Some((ga, gb)), Some((ya, yb))) = (gl.contiguous_offsets(), yl.contiguous_offsets())
        else {
            candle_core::bail!("softmax backward in place: the inputs must be contiguous");
        };
        let n = gl.dims().last().copied().unwrap_or(1);
        if gb - ga != yb - ya {
            candle_core::bail!(
                "softmax backward in place: gradient {:?}, probabilities {:?}",
                gl.dims(),
                yl.dims()
            );
        }
        match (gs, ys) {
            (CpuStorage::F32(g), CpuStorage::F32(y)) => {
                grad_rows_kernel(&mut g[ga..gb], &y[ya..yb], n, self.scale)
            }
            (CpuStorage::F64(g), CpuStorage::F64(y)) => {
                grad_rows_kernel(&mut g[ga..gb], &y[ya..yb], n, self.scale)
            }
            (g, _) => candle_core::bail!(
                "softmax backward in place: f32 / f64 only, got {:?}",
                g.dtype()
            ),
        }
        Ok(())
    }
}

/// The gradient w.r.t. `x` of `y = softmax(scale · x)` for an output gradient `g` that
/// nothing else shares (e.g. a fresh `dP` tile in attention): `scale · y ⊙ (g − Σ g ⊙ y)`,
/// written over `g` by the fused CPU kernel, else [`backward`].
pub(crate) fn backward_owned(y: &Tensor, g: Tensor, scale: f64, kernel: Kernel) -> Result<Tensor> {
    let fused = kernel.fused_on(&g)
        && [y, &g]
            .iter()
            .all(|t| t.is_contiguous() && t.dtype() == g.dtype())
        && y.dims() == g.dims()
        && g.dims().last().is_some_and(|&n| n > 0);
    if fused {
        g.inplace_op2(y, &GradRowsInPlace { scale })?;
        return Ok(g);
    }
    backward(y, &g, scale, kernel)
}
