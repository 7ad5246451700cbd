//! Group norm → SiLU → frozen conv2d as one differentiable op (diffusers' `ResnetBlock2D`
//! `norm1, nonlinearity, conv1` and `norm2, nonlinearity, conv2`), with the time-embedding
//! add and the residual add folded into its output.
//!
//! The graph keeps the op's arguments only: the norm input `x`, the per-(sample, channel)
//! addend and the skip tensor. The normalised and activated tensors are temporaries of the
//! forward; the backward recomputes them from `x` (the per-group mean and rstd are
//! recomputed too, the same two-pass statistics), then runs the frozen conv's input
//! gradient, the SiLU derivative and the group-norm input gradient. The norm weights and the
//! conv are frozen: no weight gradient exists. The addends are added in place into the
//! fresh conv output; their gradients are the output gradient summed over the spatial dims
//! (per-channel addend) and the output gradient itself (skip).
//!
//! The forward runs exactly the unfused ops ([`super::group_norm_with`], [`super::silu_with`],
//! [`FrozenConv2d`]) on detached tensors, so its values equal the unfused composition for
//! every dtype and device; on the CPU in f32 / f64 the input gradient is one fused kernel
//! with the unfused kernels' arithmetic.

use super::activation::Act;
use super::bias::{add_channels_owned, add_owned};
use super::bridge::{attach_n, bridge3, fwd_via_kernel, Backend};
use super::group_norm::{generic_bwd, generic_fwd, group_input_grad};
use super::par::{contiguous_slice, mean_rstd, par_rows, simd, Real};
use super::{compute_dtype, FrozenConv2d, Kernel};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

const NAME: &str = "lora-group-norm-silu-conv2d";

/// A frozen group norm: per-channel `weight` and `bias` `[C]`, `groups`, `eps`.
#[derive(Clone, Copy, Debug)]
pub struct GroupNormSpec<'a> {
    /// The per-channel scale.
    pub weight: &'a Tensor,
    /// The per-channel shift.
    pub bias: &'a Tensor,
    /// Number of groups.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
}

/// What is added to the convolution output `[N, C_out, H', W']`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConvOutputAdds<'a> {
    /// `[N, C_out]`, broadcast over H', W' (the time-embedding projection).
    pub channels: Option<&'a Tensor>,
    /// Shaped like the output (the residual skip).
    pub skip: Option<&'a Tensor>,
}

/// `conv(silu(group_norm(x))) + channels + skip` (see the module docs), differentiable
/// w.r.t. `x`, `channels` and `skip`; the norm weights and the conv never get a gradient.
pub fn group_norm_silu_conv2d(
    x: &Tensor,
    norm: &GroupNormSpec,
    conv: &FrozenConv2d,
    adds: ConvOutputAdds,
) -> Result<Tensor> {
    group_norm_silu_conv2d_with(x, norm, conv, adds, Kernel::Auto)
}

/// [`group_norm_silu_conv2d`] with an explicit [`Kernel`] choice.
pub fn group_norm_silu_conv2d_with(
    x: &Tensor,
    norm: &GroupNormSpec,
    conv: &FrozenConv2d,
    adds: ConvOutputAdds,
    kernel: Kernel,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (nw, nb) = (norm.weight.detach(), norm.bias.detach());
    let (groups, eps) = (norm.groups, norm.eps);
    let a = super::group_norm_with(&x.detach(), groups, &nw, &nb, eps, kernel)?;
    let s = super::silu_with(&a, kernel)?;
    drop(a);
    let mut y = conv.forward(&s)?;
    drop(s);
    let (n, c_out) = (y.dim(0)?, conv.out_channels());
    if let Some(t) = adds.channels {
        if t.dims() != [n, c_out] {
            candle_core::bail!(
                "{NAME}: channel addend {:?}, expected [{n}, {c_out}]",
                t.shape()
            );
        }
        y = add_channels_owned(y, &t.detach())?;
    }
    if let Some(k) = adds.skip {
        if k.dims() != y.dims() {
            candle_core::bail!("{NAME}: skip {:?}, expected {:?}", k.shape(), y.shape());
        }
        y = add_owned(y, &k.detach())?;
    }
    // Arguments in the order of the unfused graph (`skip + conv(..)`, `conv(..) + t`), so
    // the backward visits the nodes, and sums gradients, in the same order.
    let args: Vec<&Tensor> = adds
        .skip
        .into_iter()
        .chain([x])
        .chain(adds.channels)
        .collect();
    let xi = usize::from(adds.skip.is_some());
    let conv = conv.clone();
    let bwd = move |args: &[&Tensor], g: &Tensor| {
        let mut grads = Vec::with_capacity(args.len());
        for (i, a) in args.iter().enumerate() {
            let grad = match (a.track_op(), i.cmp(&xi)) {
                (false, _) => None,
                (true, std::cmp::Ordering::Less) => Some(g.to_dtype(a.dtype())?),
                (true, std::cmp::Ordering::Equal) => {
                    let dz = conv.input_grad(&g.to_dtype(a.dtype())?, (h, w))?;
                    Some(norm_silu_input_grad(a, &nw, &nb, &dz, groups, eps, kernel)?)
                }
                (true, std::cmp::Ordering::Greater) => Some(g.sum((2, 3))?.to_dtype(a.dtype())?),
            };
            grads.push(grad);
        }
        Ok(grads)
    };
    attach_n(&args, y, NAME, Box::new(bwd))
}

/// The gradient w.r.t. `x` of `silu(group_norm(x, w, b))` for the output gradient `dz`,
/// computed in f32 (f64 stays f64) and cast to x's dtype.
fn norm_silu_input_grad(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    dz: &Tensor,
    groups: usize,
    eps: f64,
    kernel: Kernel,
) -> Result<Tensor> {
    let cd = compute_dtype(x.dtype());
    let x32 = x.detach().to_dtype(cd)?.contiguous()?;
    let dz = dz.to_dtype(cd)?.contiguous()?;
    let wb = Tensor::cat(&[w.to_dtype(cd)?.flatten_all()?, b.to_dtype(cd)?], 0)?;
    let dx = match kernel.fused_on(&x32) {
        true => x32.apply_op3_no_bwd(&wb, &dz, &NormSiluBwd { groups, eps })?,
        false => generic_input_grad(&x32, &wb, &dz, groups, eps)?,
    };
    dx.to_dtype(x.dtype())
}

/// The input gradient with tensor ops; `wb` is `[weight | bias]`.
fn generic_input_grad(
    x: &Tensor,
    wb: &Tensor,
    dz: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let c = wb.elem_count() / 2;
    let (w, b) = (wb.narrow(0, 0, c)?, wb.narrow(0, c, c)?);
    let a = generic_fwd(x, &w, &b, groups, eps)?;
    let da = Act::Silu.generic_bwd(&a, dz)?;
    Ok(generic_bwd(x, &w, &da, groups, eps)?.0)
}

/// The fused input gradient per (sample, group): the norm output and the SiLU derivative
/// recomputed element by element (as the forward and SiLU kernels compute them), then the
/// group-norm input gradient.
fn bwd_kernel<T: Real>(
    (xs, xl): (&CpuStorage, &Layout),
    (ps, pl): (&CpuStorage, &Layout),
    (gs, gl): (&CpuStorage, &Layout),
    groups: usize,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_slice::<T>(xs, xl, NAME)?;
    let wb = contiguous_slice::<T>(ps, pl, NAME)?;
    let dz = contiguous_slice::<T>(gs, gl, NAME)?;
    let c = wb.len() / 2;
    let (w, b) = wb.split_at(c);
    let n = xl.dims()[0];
    let cg = c / groups;
    let s = x.len() / (n * c).max(1);
    let m = cg * s;
    let mut dx = vec![T::ZERO; x.len()];
    par_rows(&mut dx, m, |i, d| {
        let (xr, gr) = (&x[i * m..(i + 1) * m], &dz[i * m..(i + 1) * m]);
        let (mean, rstd) = mean_rstd(xr, eps);
        let c0 = (i % groups) * cg;
        let mut da = vec![T::ZERO; m];
        for k in 0..cg {
            let a = rstd * w[c0 + k].to_f64();
            let (a, o) = (T::from_f64(a), T::from_f64(b[c0 + k].to_f64() - mean * a));
            let r = k * s..(k + 1) * s;
            simd(|| {
                for ((d, &v), &g) in da[r.clone()].iter_mut().zip(&xr[r.clone()]).zip(&gr[r]) {
                    *d = g * Act::Silu.df(v * a + o);
                }
            })
        }
        group_input_grad(xr, &da, &w[c0..c0 + cg], (mean, rstd), d, None);
    });
    Ok((T::to_cpu_storage_owned(dx), xl.shape().clone()))
}

/// The input gradient as a graph-free op on `(x, [weight | bias], grad of the SiLU output)`.
struct NormSiluBwd {
    groups: usize,
    eps: f64,
}

impl NormSiluBwd {
    fn any<S: Backend>(
        &self,
        x: (&S, &Layout),
        wb: (&S, &Layout),
        g: (&S, &Layout),
    ) -> Result<(S, Shape)> {
        bridge3(x, wb, g, |x, wb, g| {
            generic_input_grad(x, wb, g, self.groups, self.eps)
        })
    }
}

impl CustomOp3 for NormSiluBwd {
    fn name(&self) -> &'static str {
        "lora-group-norm-silu-bwd"
    }
    fwd_via_kernel!(self, (x, wb, g), T => bwd_kernel::<T>(x, wb, g, self.groups, self.eps));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{finite_difference_error, randn, rel_diff, value_and_grads};
    use crate::ops::Conv2dParams;
    use candle_core::DType;

    /// One geometry: `(n, c_in, groups, h, w, c_out, kernel, stride, padding)`.
    type Geom = (
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
    );

    /// Inputs `[x, channels, skip]` (the last two as asked), the norm weights and the conv.
    fn setup(
        g: Geom,
        channels: bool,
        skip: bool,
        dtype: DType,
    ) -> (Vec<Tensor>, Tensor, Tensor, FrozenConv2d, Tensor) {
        let (n, c, _, h, w, co, k, s, p) = g;
        let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let x = randn(1, &[n, c, h, w], dtype).affine(2.0, 0.5).unwrap();
        let nw = randn(2, &[c], dtype).affine(0.5, 1.0).unwrap();
        let nb = (randn(3, &[c], dtype) * 0.3).unwrap();
        let kw = (randn(4, &[co, c, k, k], dtype) * 0.2).unwrap();
        let kb = randn(5, &[co], dtype);
        let params = Conv2dParams {
            stride: s,
            padding: p,
            ..Default::default()
        };
        let conv = FrozenConv2d::new(&kw, Some(&kb), params).unwrap();
        let mut ins = vec![x];
        if channels {
            ins.push(randn(6, &[n, co], dtype));
        }
        if skip {
            ins.push(randn(7, &[n, co, ho, wo], dtype));
        }
        let gout = randn(8, &[n, co, ho, wo], dtype);
        (ins, nw, nb, conv, gout)
    }

    /// The unfused composition the block ran before: norm, SiLU, conv, + t, skip +.
    fn unfused(
        ins: &[Tensor],
        norm: &GroupNormSpec,
        conv: &FrozenConv2d,
        (channels, skip): (bool, bool),
        kernel: Kernel,
    ) -> Result<Tensor> {
        let a = crate::ops::group_norm_with(
            &ins[0],
            norm.groups,
            norm.weight,
            norm.bias,
            norm.eps,
            kernel,
        )?;
        let mut y = conv.forward(&crate::ops::silu_with(&a, kernel)?)?;
        let mut i = 1;
        if channels {
            y = y.broadcast_add(&ins[i].unsqueeze(2)?.unsqueeze(3)?)?;
            i += 1;
        }
        if skip {
            y = (&ins[i] + y)?;
        }
        Ok(y)
    }

    fn fused(
        ins: &[Tensor],
        norm: &GroupNormSpec,
        conv: &FrozenConv2d,
        (channels, skip): (bool, bool),
        kernel: Kernel,
    ) -> Result<Tensor> {
        let adds = ConvOutputAdds {
            channels: channels.then(|| &ins[1]),
            skip: skip.then(|| &ins[ins.len() - 1]),
        };
        group_norm_silu_conv2d_with(&ins[0], norm, conv, adds, kernel)
    }

    const GEOMS: [Geom; 4] = [
        (2, 8, 4, 5, 7, 6, 3, 1, 1),
        (1, 6, 3, 9, 4, 5, 3, 2, 1),
        (3, 4, 1, 1, 3, 4, 1, 1, 0),
        (1, 64, 32, 33, 31, 16, 3, 1, 1),
    ];

    #[test]
    fn matches_the_unfused_composition_f32() {
        let mut worst = (0f64, 0f64);
        for geom in GEOMS {
            for adds in [(false, false), (true, false), (false, true), (true, true)] {
                for kernel in [Kernel::Auto, Kernel::Generic] {
                    let (ins, nw, nb, conv, g) = setup(geom, adds.0, adds.1, DType::F32);
                    let norm = GroupNormSpec {
                        weight: &nw,
                        bias: &nb,
                        groups: geom.2,
                        eps: 1e-5,
                    };
                    let (yu, gu) =
                        value_and_grads(&ins, &g, &|t| unfused(t, &norm, &conv, adds, kernel));
                    let (yf, gf) =
                        value_and_grads(&ins, &g, &|t| fused(t, &norm, &conv, adds, kernel));
                    // The forward runs the unfused ops themselves: equal values.
                    let dy = rel_diff(&yf, &yu);
                    assert_eq!(dy, 0.0, "{geom:?} {adds:?} {kernel:?}: value rel {dy:e}");
                    for (i, (a, b)) in gf.iter().zip(&gu).enumerate() {
                        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
                        let d = rel_diff(a, b);
                        assert!(
                            d <= 1e-5,
                            "{geom:?} {adds:?} {kernel:?}: grad {i} rel {d:e}"
                        );
                        worst.1 = worst.1.max(d);
                    }
                    worst.0 = worst.0.max(dy);
                }
            }
        }
        eprintln!(
            "fused vs unfused: values rel {:.1e}, grads rel {:.1e}",
            worst.0, worst.1
        );
    }

    #[test]
    fn gradients_match_finite_differences_f64() {
        let geom = (2, 4, 2, 3, 4, 3, 3, 1, 1);
        for kernel in [Kernel::Auto, Kernel::Generic] {
            for adds in [(false, false), (true, true)] {
                let (ins, nw, nb, conv, g) = setup(geom, adds.0, adds.1, DType::F64);
                let norm = GroupNormSpec {
                    weight: &nw,
                    bias: &nb,
                    groups: geom.2,
                    eps: 1e-5,
                };
                let err =
                    finite_difference_error(&ins, &g, &|t| fused(t, &norm, &conv, adds, kernel));
                eprintln!("finite differences {kernel:?} {adds:?}: rel {err:.1e}");
                assert!(err < 1e-6, "{kernel:?} {adds:?}: rel error {err:e}");
            }
        }
    }

    #[test]
    fn bf16_follows_f32() {
        let geom = GEOMS[0];
        let adds = (true, true);
        let (ins32, nw, nb, conv32, g) = setup(geom, true, true, DType::F32);
        let norm32 = GroupNormSpec {
            weight: &nw,
            bias: &nb,
            groups: geom.2,
            eps: 1e-5,
        };
        let (y32, g32) = value_and_grads(&ins32, &g, &|t| {
            fused(t, &norm32, &conv32, adds, Kernel::Auto)
        });
        let (ins, nw, nb, conv, g) = setup(geom, true, true, DType::BF16);
        let norm = GroupNormSpec {
            weight: &nw,
            bias: &nb,
            groups: geom.2,
            eps: 1e-5,
        };
        let (y, gr) = value_and_grads(&ins, &g, &|t| fused(t, &norm, &conv, adds, Kernel::Auto));
        assert_eq!(y.dtype(), DType::BF16);
        let (yu, _) = value_and_grads(&ins, &g, &|t| unfused(t, &norm, &conv, adds, Kernel::Auto));
        assert_eq!(
            rel_diff(&y, &yu),
            0.0,
            "bf16 forward equals the unfused ops"
        );
        assert!(rel_diff(&y, &y32) < 3e-2);
        for (a, b) in gr.iter().zip(&g32) {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            assert_eq!(a.dtype(), DType::BF16);
            let d = rel_diff(a, b);
            assert!(d < 5e-2, "bf16 gradient rel {d:e}");
        }
    }

    #[test]
    fn wrong_addend_shapes_are_errors() {
        let (ins, nw, nb, conv, _) = setup(GEOMS[0], false, false, DType::F32);
        let norm = GroupNormSpec {
            weight: &nw,
            bias: &nb,
            groups: 4,
            eps: 1e-5,
        };
        let t = randn(9, &[2, 5], DType::F32);
        let adds = ConvOutputAdds {
            channels: Some(&t),
            skip: None,
        };
        let err = group_norm_silu_conv2d(&ins[0], &norm, &conv, adds).unwrap_err();
        assert!(err.to_string().contains("expected [2, 6]"), "{err}");
        let k = randn(9, &[2, 6, 5, 6], DType::F32);
        let adds = ConvOutputAdds {
            channels: None,
            skip: Some(&k),
        };
        let err = group_norm_silu_conv2d(&ins[0], &norm, &conv, adds).unwrap_err();
        assert!(err.to_string().contains("skip [2, 6, 5, 6]"), "{err}");
    }
}
