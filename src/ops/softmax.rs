//! Softmax over the last dimension with a hand-written backward
//! `grad_in = y * (g - sum(g * y, -1))`.

use super::bridge::{bridge1, bridge2, Backend};
use super::par::{contiguous_slice, par_rows, Real};
use super::Kernel;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, MetalStorage, Result, Shape,
    Tensor, D,
};

/// Forward with candle's kernels (any device, any float dtype).
pub(crate) fn generic_fwd(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax_last_dim(x)
}

/// Backward with tensor ops (any device): `y * (g - sum(g * y, -1))`.
pub(crate) fn generic_bwd(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let s = (g * y)?.sum_keepdim(D::Minus1)?;
    g.broadcast_sub(&s)?.mul(y)
}

fn fwd_kernel<T: Real>(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let src = contiguous_slice::<T>(s, l, "softmax")?;
    let n = l.dims().last().copied().unwrap_or(1);
    let mut dst = vec![T::ZERO; src.len()];
    par_rows(&mut dst, n, |i, d| {
        let x = &src[i * n..(i + 1) * n];
        let max = x[1..].iter().fold(x[0], |m, &v| Real::max(m, v));
        for (d, &v) in d.iter_mut().zip(x) {
            *d = (v - max).exp();
        }
        let mut sum = T::ZERO;
        for &e in d.iter() {
            sum += e;
        }
        let inv = T::ONE / sum;
        for d in d.iter_mut() {
            *d = *d * inv;
        }
    });
    Ok((T::to_cpu_storage_owned(dst), l.shape().clone()))
}

fn bwd_kernel<T: Real>(
    ys: &CpuStorage,
    yl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let y = contiguous_slice::<T>(ys, yl, "softmax backward")?;
    let g = contiguous_slice::<T>(gs, gl, "softmax backward")?;
    let n = yl.dims().last().copied().unwrap_or(1);
    let mut dst = vec![T::ZERO; y.len()];
    par_rows(&mut dst, n, |i, d| {
        let (y, g) = (&y[i * n..(i + 1) * n], &g[i * n..(i + 1) * n]);
        let mut s = T::ZERO;
        for (&a, &b) in y.iter().zip(g) {
            s += a * b;
        }
        for ((d, &a), &b) in d.iter_mut().zip(y).zip(g) {
            *d = a * (b - s);
        }
    });
    Ok((T::to_cpu_storage_owned(dst), yl.shape().clone()))
}

/// The differentiable softmax op.
pub(crate) struct Softmax {
    pub(crate) kernel: Kernel,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "lora-softmax-last-dim"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match (self.kernel, s.dtype()) {
            (Kernel::Auto, DType::F32) if l.is_contiguous() => fwd_kernel::<f32>(s, l),
            (Kernel::Auto, DType::F64) if l.is_contiguous() => fwd_kernel::<f64>(s, l),
            _ => bridge1(s, l, generic_fwd),
        }
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        bridge1(s, l, generic_fwd)
    }
    fn metal_fwd(&self, s: &MetalStorage, l: &Layout) -> Result<(MetalStorage, Shape)> {
        bridge1(s, l, generic_fwd)
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let fused = self.kernel == Kernel::Auto
            && y.device().is_cpu()
            && matches!(y.dtype(), DType::F32 | DType::F64);
        let dx = if fused {
            y.contiguous()?
                .apply_op2_no_bwd(&g.to_dtype(y.dtype())?.contiguous()?, &SoftmaxBwd)?
        } else {
            generic_bwd(y, g)?
        };
        Ok(Some(dx))
    }
}

/// The fused backward (CPU kernel; other devices run [`generic_bwd`]).
struct SoftmaxBwd;

impl SoftmaxBwd {
    fn any<S: Backend>(&self, a: (&S, &Layout), b: (&S, &Layout)) -> Result<(S, Shape)> {
        bridge2(a, b, generic_bwd)
    }
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "lora-softmax-last-dim-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match s1.dtype() {
            DType::F32 => bwd_kernel::<f32>(s1, l1, s2, l2),
            DType::F64 => bwd_kernel::<f64>(s1, l1, s2, l2),
            _ => self.any((s1, l1), (s2, l2)),
        }
    }
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.any((s1, l1), (s2, l2))
    }
    fn metal_fwd(
        &self,
        s1: &MetalStorage,
        l1: &Layout,
        s2: &MetalStorage,
        l2: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.any((s1, l1), (s2, l2))
    }
}
