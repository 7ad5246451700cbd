//! SiLU and exact (erf) GELU with hand-written backward passes.
//!
//! candle has backward formulas for both, but composes them from 6–10 full-size tensor ops
//! (and uses a 6-digit constant for GELU); these ops compute the derivative in one pass
//! on the CPU:
//! `silu'(x) = s · (1 + x · (1 - s))` with `s = sigmoid(x)`, `gelu'(x) = Φ(x) + x · φ(x)`.

use super::bridge::{bridge1, bridge2, fwd_via_kernel, Backend};
use super::par::{contiguous_slice, map_into, par_chunks, simd, Real};
use super::Kernel;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, MetalStorage, Result, Shape,
    Tensor,
};

const CHUNK: usize = 4096;

/// The activation functions of this module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Act {
    Silu,
    GeluErf,
}

impl Act {
    fn name(self) -> &'static str {
        match self {
            Act::Silu => "lora-silu",
            Act::GeluErf => "lora-gelu-erf",
        }
    }

    /// Forward with candle's kernels.
    pub(crate) fn generic_fwd(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Act::Silu => x.silu(),
            Act::GeluErf => x.gelu_erf(),
        }
    }

    /// Backward with tensor ops.
    pub(crate) fn generic_bwd(self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        let d = match self {
            Act::Silu => {
                let s = candle_nn::ops::sigmoid(x)?;
                ((x * s.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)? * s)?
            }
            Act::GeluErf => {
                let cdf = (x / std::f64::consts::SQRT_2)?.erf()?.affine(0.5, 0.5)?;
                let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
                let pdf = x
                    .sqr()?
                    .affine(-0.5, 0.0)?
                    .exp()?
                    .affine(inv_sqrt_2pi, 0.0)?;
                (cdf + (x * pdf)?)?
            }
        };
        g * d
    }

    /// The activation of one element.
    #[inline(always)]
    pub(crate) fn f<T: Real>(self, x: T) -> T {
        match self {
            Act::Silu => x / (T::ONE + (-x).exp()),
            Act::GeluErf => {
                let half = T::from_f64(0.5);
                half * x * (T::ONE + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf())
            }
        }
    }

    /// [`Act::f`] and [`Act::df`] at one element, sharing GELU's erf (same values).
    #[inline(always)]
    pub(crate) fn f_df<T: Real>(self, x: T) -> (T, T) {
        match self {
            Act::Silu => (self.f(x), self.df(x)),
            Act::GeluErf => {
                let half = T::from_f64(0.5);
                let e = (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf();
                let c = T::from_f64(1.0 / (2.0 * std::f64::consts::PI).sqrt());
                let cdf = half * (T::ONE + e);
                (half * x * (T::ONE + e), cdf + x * c * (-half * x * x).exp())
            }
        }
    }

    /// The derivative of the activation at one element.
    #[inline(always)]
    pub(crate) fn df<T: Real>(self, x: T) -> T {
        match self {
            Act::Silu => {
                let s = T::ONE / (T::ONE + (-x).exp());
                s * (T::ONE + x * (T::ONE - s))
            }
            Act::GeluErf => {
                let half = T::from_f64(0.5);
                let cdf =
                    half * (T::ONE + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf());
                let c = T::from_f64(1.0 / (2.0 * std::f64::consts::PI).sqrt());
                cdf + x * c * (-half * x * x).exp()
            }
        }
    }
}

fn fwd_kernel<T: Real>(act: Act, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_slice::<T>(s, l, act.name())?;
    let mut dst = vec![T::ZERO; x.len()];
    par_chunks(&mut dst, CHUNK, |o, d| match act {
        Act::Silu => map_into(d, &x[o..], |v| Act::Silu.f(v)),
        Act::GeluErf => map_into(d, &x[o..], |v| Act::GeluErf.f(v)),
    });
    Ok((T::to_cpu_storage_owned(dst), l.shape().clone()))
}

/// `d[i] = g[i] · df(x[i])`.
#[inline(always)]
fn mul_df<T: Real>(d: &mut [T], x: &[T], g: &[T], df: impl Fn(T) -> T) {
    for ((d, &v), &g) in d.iter_mut().zip(x).zip(g) {
        *d = g * df(v);
    }
}

fn bwd_kernel<T: Real>(
    act: Act,
    (xs, xl): (&CpuStorage, &Layout),
    (gs, gl): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_slice::<T>(xs, xl, act.name())?;
    let g = contiguous_slice::<T>(gs, gl, act.name())?;
    let mut dst = vec![T::ZERO; x.len()];
    par_chunks(&mut dst, CHUNK, |o, d| {
        simd(|| match act {
            Act::Silu => mul_df(d, &x[o..], &g[o..], |v| Act::Silu.df(v)),
            Act::GeluErf => mul_df(d, &x[o..], &g[o..], |v| Act::GeluErf.df(v)),
        })
    });
    Ok((T::to_cpu_storage_owned(dst), xl.shape().clone()))
}

/// The differentiable activation op.
pub(crate) struct Activation {
    pub(crate) act: Act,
    pub(crate) kernel: Kernel,
}

impl Activation {
    /// Whether the fused CPU kernel computes this op for `x` (else candle's kernels do).
    pub(crate) fn fused_on(&self, x: &Tensor) -> bool {
        self.kernel.fused_on(x)
    }
}

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        self.act.name()
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match (self.kernel, s.dtype()) {
            (Kernel::Auto, DType::F32) if l.is_contiguous() => fwd_kernel::<f32>(self.act, s, l),
            (Kernel::Auto, DType::F64) if l.is_contiguous() => fwd_kernel::<f64>(self.act, s, l),
            _ => bridge1(s, l, |x| self.act.generic_fwd(x)),
        }
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        bridge1(s, l, |x| self.act.generic_fwd(x))
    }
    fn metal_fwd(&self, s: &MetalStorage, l: &Layout) -> Result<(MetalStorage, Shape)> {
        bridge1(s, l, |x| self.act.generic_fwd(x))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.to_dtype(x.dtype())?;
        let dx = if self.fused_on(x) {
            let op = ActivationBwd { act: self.act };
            x.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &op)?
        } else {
            self.act.generic_bwd(x, &g)?
        };
        Ok(Some(dx))
    }
}

/// The fused backward as a graph-free op on `(x, grad)`.
struct ActivationBwd {
    act: Act,
}

impl ActivationBwd {
    fn any<S: Backend>(&self, x: (&S, &Layout), g: (&S, &Layout)) -> Result<(S, Shape)> {
        bridge2(x, g, |x, g| self.act.generic_bwd(x, g))
    }
}

impl CustomOp2 for ActivationBwd {
    fn name(&self) -> &'static str {
        "lora-activation-bwd"
    }
    fwd_via_kernel!(self, (x, g), T => bwd_kernel::<T>(self.act, x, g));
}
