//! Softmax over the last dimension of `scale · x` with a hand-written backward
//! `grad_in = scale · y * (g - sum(g * y, -1))` (the scale saves attention a full pass).

use super::bridge::{bridge1, bridge2, fwd_via_kernel, Backend};
use super::par::{
    contiguous_slice, map_inplace, map_into, max_of, par_rows, reduce1, reduce2, Real,
};
use super::Kernel;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, InplaceOp1, Layout, MetalStorage, Result,
    Shape, Tensor, D,
};

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
