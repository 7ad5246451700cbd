//! GEGLU → frozen Linear as one differentiable op (diffusers' `FeedForward`: `net.0` gates
//! the projection `h = [hidden | gate]` to `hidden · gelu(gate)`, `net.2` maps it back).
//!
//! The graph keeps only `h`: the gate's contiguous copy, `gelu(gate)` and the product are
//! temporaries of the forward. The backward takes the product's gradient `gp = g @ W` (the
//! frozen linear's input gradient) and recomputes `gelu(gate)` from `h`:
//! `d hidden = gp · gelu(gate)`, `d gate = gp · hidden · gelu'(gate)`, written side by side
//! into one gradient of `h`'s shape. The forward runs exactly the unfused ops
//! ([`super::gelu_erf_with`], the product, [`super::frozen_linear`]) on detached tensors, so
//! its values equal the unfused composition for every dtype and device; on the CPU in f32 /
//! f64 the backward is one kernel with the unfused kernels' arithmetic.

use super::activation::Act;
use super::bridge::{attach, bridge2, fwd_via_kernel, Backend};
use super::dense::matmul;
use super::par::{contiguous_slice, par_rows, simd, Real};
use super::{compute_dtype, frozen_linear, Kernel};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};

const NAME: &str = "lora-geglu-linear";

/// `(hidden · gelu(gate)) @ wᵀ + b` for `h = [hidden | gate]` split over its last dim
/// (`w` is `[out, h_last / 2]`); differentiable w.r.t. `h` only, `w` and `b` are frozen.
pub fn geglu_linear(h: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    geglu_linear_with(h, w, b, Kernel::Auto)
}

/// [`geglu_linear`] with an explicit [`Kernel`] choice.
pub fn geglu_linear_with(
    h: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    kernel: Kernel,
) -> Result<Tensor> {
    let two = h.dim(D::Minus1)?;
    let (out_f, in_f) = w.dims2()?;
    if two != 2 * in_f {
        candle_core::bail!(
            "{NAME}: weight {:?} needs input [..., {}], got {:?}",
            w.shape(),
            2 * in_f,
            h.shape()
        );
    }
    let hd = h.detach();
    let hidden = hd.narrow(D::Minus1, 0, in_f)?;
    let gate = hd.narrow(D::Minus1, in_f, in_f)?;
    let p = (hidden * super::gelu_erf_with(&gate, kernel)?)?;
    let y = frozen_linear(&p, w, b)?;
    drop(p);
    let w = w.detach();
    let rows = h.elem_count() / two.max(1);
    let bwd = move |h: &Tensor, g: &Tensor| {
        let gp = matmul(&g.reshape((rows, out_f))?, &w)?;
        Ok(Some(geglu_input_grad(h, &gp, kernel)?.reshape(h.shape())?))
    };
    attach(h, y, NAME, Box::new(bwd))
}

/// The gradient w.r.t. `h` (`[.., 2I]`) of `hidden · gelu(gate)` for the product's
/// gradient `gp` `[rows, I]`, computed in f32 (f64 stays f64) and cast to h's dtype.
fn geglu_input_grad(h: &Tensor, gp: &Tensor, kernel: Kernel) -> Result<Tensor> {
    let cd = compute_dtype(h.dtype());
    let two = h.dim(D::Minus1)?;
    let h2 = h.detach().to_dtype(cd)?.reshape(((), two))?.contiguous()?;
    let gp = gp.to_dtype(cd)?.contiguous()?;
    let dh = match kernel.fused_on(&h2) {
        true => h2.apply_op2_no_bwd(&gp, &GegluBwd)?,
        false => generic_input_grad(&h2, &gp)?,
    };
    dh.to_dtype(h.dtype())
}

/// The input gradient with tensor ops, for `h` `[rows, 2I]` and `gp` `[rows, I]`.
fn generic_input_grad(h: &Tensor, gp: &Tensor) -> Result<Tensor> {
    let inner = h.dim(1)? / 2;
    let hidden = h.narrow(1, 0, inner)?;
    let gate = h.narrow(1, inner, inner)?.contiguous()?;
    let d_hidden = (gp * Act::GeluErf.generic_fwd(&gate)?)?;
    let d_gate = Act::GeluErf.generic_bwd(&gate, &(gp * hidden)?)?;
    Tensor::cat(&[d_hidden, d_gate], 1)
}

fn bwd_kernel<T: Real>(
    (hs, hl): (&CpuStorage, &Layout),
    (gs, gl): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let h = contiguous_slice::<T>(hs, hl, NAME)?;
    let gp = contiguous_slice::<T>(gs, gl, NAME)?;
    let two = hl.dims()[1];
    let inner = two / 2;
    let mut dh = vec![T::ZERO; h.len()];
    par_rows(&mut dh, two, |r, d| {
        let (hr, gr) = (&h[r * two..(r + 1) * two], &gp[r * inner..(r + 1) * inner]);
        let (hidden, gate) = hr.split_at(inner);
        let (d_hidden, d_gate) = d.split_at_mut(inner);
        simd(|| {
            for j in 0..inner {
                let (gv, z) = (gr[j], gate[j]);
                let (f, df) = Act::GeluErf.f_df(z);
                d_hidden[j] = gv * f;
                d_gate[j] = (gv * hidden[j]) * df;
            }
        })
    });
    Ok((T::to_cpu_storage_owned(dh), hl.shape().clone()))
}

/// The input gradient as a graph-free op on `(h [rows, 2I], gp [rows, I])`.
struct GegluBwd;

impl GegluBwd {
    fn any<S: Backend>(&self, h: (&S, &Layout), g: (&S, &Layout)) -> Result<(S, Shape)> {
        bridge2(h, g, generic_input_grad)
    }
}

impl CustomOp2 for GegluBwd {
    fn name(&self) -> &'static str {
        "lora-geglu-bwd"
    }
    fwd_via_kernel!(self, (h, g), T => bwd_kernel::<T>(h, g));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{finite_difference_error, randn, rel_diff, value_and_grads};
    use candle_core::DType;

    /// The unfused composition: `hidden · gelu(gate)`, then the frozen linear.
    fn unfused(h: &Tensor, w: &Tensor, b: Option<&Tensor>, kernel: Kernel) -> Result<Tensor> {
        let inner = h.dim(D::Minus1)? / 2;
        let hidden = h.narrow(D::Minus1, 0, inner)?;
        let gate = h.narrow(D::Minus1, inner, inner)?;
        frozen_linear(
            &(hidden * super::super::gelu_erf_with(&gate, kernel)?)?,
            w,
            b,
        )
    }

    /// `(h dims, out features, bias)`.
    const CASES: [(&[usize], usize, bool); 4] = [
        (&[2, 5, 14], 3, true),
        (&[7, 6], 5, false),
        (&[1, 1, 2], 1, true),
        (&[1, 300, 160], 40, true),
    ];

    fn setup(dims: &[usize], out: usize, dtype: DType) -> (Tensor, Tensor, Tensor, Tensor) {
        let inner = dims[dims.len() - 1] / 2;
        let h = randn(1, dims, dtype).affine(1.5, 0.2).unwrap();
        let w = randn(2, &[out, inner], dtype).affine(0.3, 0.0).unwrap();
        let b = randn(3, &[out], dtype);
        let mut gdims = dims.to_vec();
        *gdims.last_mut().unwrap() = out;
        (h, w, b, randn(4, &gdims, dtype))
    }

    #[test]
    fn matches_the_unfused_composition_f32() {
        let mut worst = 0f64;
        for (dims, out, bias) in CASES {
            for kernel in [Kernel::Auto, Kernel::Generic] {
                let (h, w, b, g) = setup(dims, out, DType::F32);
                let b = bias.then_some(&b);
                let ins = [h];
                let (yu, gu) = value_and_grads(&ins, &g, &|t| unfused(&t[0], &w, b, kernel));
                let (yf, gf) =
                    value_and_grads(&ins, &g, &|t| geglu_linear_with(&t[0], &w, b, kernel));
                // The forward runs the unfused ops themselves: equal values.
                assert_eq!(rel_diff(&yf, &yu), 0.0, "{dims:?} {kernel:?}");
                let (a, b) = (gf[0].as_ref().unwrap(), gu[0].as_ref().unwrap());
                assert_eq!(a.dims(), dims);
                let d = rel_diff(a, b);
                assert!(d <= 1e-5, "{dims:?} {kernel:?}: grad rel {d:e}");
                worst = worst.max(d);
            }
        }
        eprintln!("fused vs unfused GEGLU: grads rel {worst:.1e}");
    }

    #[test]
    fn gradients_match_finite_differences_f64() {
        for kernel in [Kernel::Auto, Kernel::Generic] {
            for (dims, out, bias) in &CASES[..3] {
                let (h, w, b, g) = setup(dims, *out, DType::F64);
                let b = bias.then_some(&b);
                let err =
                    finite_difference_error(&[h], &g, &|t| geglu_linear_with(&t[0], &w, b, kernel));
                eprintln!("finite differences {kernel:?} {dims:?}: rel {err:.1e}");
                assert!(err < 1e-6, "{kernel:?} {dims:?}: rel error {err:e}");
            }
        }
    }

    #[test]
    fn bf16_follows_f32() {
        let (dims, out) = (CASES[0].0, CASES[0].1);
        let (h, w, b, g) = setup(dims, out, DType::F32);
        let (y32, g32) = value_and_grads(&[h], &g, &|t| geglu_linear(&t[0], &w, Some(&b)));
        let (h, w, b, g) = setup(dims, out, DType::BF16);
        let (y, gr) = value_and_grads(std::slice::from_ref(&h), &g, &|t| {
            geglu_linear(&t[0], &w, Some(&b))
        });
        let (yu, _) = value_and_grads(&[h], &g, &|t| unfused(&t[0], &w, Some(&b), Kernel::Auto));
        assert_eq!(
            rel_diff(&y, &yu),
            0.0,
            "bf16 forward equals the unfused ops"
        );
        assert!(rel_diff(&y, &y32) < 3e-2);
        let gr = gr[0].as_ref().unwrap();
        assert_eq!(gr.dtype(), DType::BF16);
        let d = rel_diff(gr, g32[0].as_ref().unwrap());
        assert!(d < 5e-2, "bf16 gradient rel {d:e}");
    }

    #[test]
    fn a_weight_of_the_wrong_width_is_an_error() {
        let (h, _, _, _) = setup(&[2, 8], 3, DType::F32);
        let w = randn(2, &[3, 5], DType::F32);
        let err = geglu_linear(&h, &w, None).unwrap_err();
        assert!(err.to_string().contains("needs input [..., 10]"), "{err}");
    }
}
