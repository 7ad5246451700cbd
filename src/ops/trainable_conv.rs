//! A 2D convolution whose kernel trains (the LoRA factors of an adapted convolution, or a
//! fully fine-tuned one), one group, dilation 1. On the CPU (f32 / f64) the forward is the
//! frozen convolution's (Winograd, shifted views or im2col + one gemm, see `frozen.rs`) on
//! detached inputs, the input gradient is the frozen one's too, and the kernel gradient is
//! one gemm per band of output rows against the input's patches (`im2col.rs`); each is
//! computed only for an argument that needs it. candle's own conv2d backward builds the input
//! gradient with `conv_transpose2d`, a direct loop on the CPU: the rank-4 down factor of a
//! 320-channel 3×3 conv at 32×32 took 57 ms forward and backward there, 9.7 ms here
//! (`examples/convlora_probe`). Elsewhere (other devices, bf16 or f16 on the CPU) candle's
//! conv2d and its backward.

use super::bridge::attach2;
use super::frozen::{conv2d as fast_conv2d, input_grad, Conv2dParams};
use candle_core::{DType, Result, Tensor};

/// `conv2d(x, k)` with symmetric zero `padding` and `stride`, differentiable in `x` and `k`.
pub fn trainable_conv2d(x: &Tensor, k: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let fast = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && k.dtype() == x.dtype();
    if !fast {
        return super::dense::conv2d(x, k, padding, stride, 1, 1);
    }
    let p = Conv2dParams {
        stride,
        padding,
        dilation: 1,
        groups: 1,
    };
    let (_, c_in, h, w) = x.dims4()?;
    let (_, c_k, kh, kw) = k.dims4()?;
    if c_in != c_k {
        candle_core::bail!(
            "conv2d: input {:?} does not match kernel {:?}",
            x.shape(),
            k.shape()
        );
    }
    let y = fast_conv2d(&x.detach(), &k.detach(), padding, stride, &p)?;
    let bwd = move |[x, k]: [&Tensor; 2], g: &Tensor| {
        let gx = match x.track_op() {
            true => Some(super::profile::scope(
                "conv2d-input-grad",
                super::profile::Pass::Backward,
                || input_grad(g, &k.detach(), (h, w), &p),
            )?),
            false => None,
        };
        let gk = match k.track_op() {
            true => Some(super::profile::scope(
                "conv2d-weight-grad",
                super::profile::Pass::Backward,
                || {
                    super::im2col::conv2d_weight_grad_cpu(
                        &x.detach(),
                        g,
                        (kh, kw),
                        padding,
                        stride,
                        1,
                    )
                },
            )?),
            false => None,
        };
        Ok((gx, gk))
    };
    attach2([x, k], y, "lora-trainable-conv2d", Box::new(bwd))
}

#[cfg(test)]
mod tests {
    use super::super::testing::{finite_difference_error, randn, rel_diff, value_and_grads};
    use super::*;
    use candle_core::Var;

    /// Forward and both gradients equal candle's conv2d and its backward, for each geometry
    /// (3×3 "same", stride 2, unpadded 1×1, a LoRA down 3×3 to rank 4, batch 2, and a 64×64
    /// input whose patches take two bands).
    #[test]
    fn trainable_conv2d_equals_candle() {
        let cases: [(&[usize], &[usize], usize, usize); 6] = [
            (&[1, 6, 9, 9], &[5, 6, 3, 3], 1, 1),
            (&[2, 6, 10, 10], &[5, 6, 3, 3], 1, 2),
            (&[2, 8, 7, 7], &[3, 8, 1, 1], 0, 1),
            (&[1, 32, 12, 12], &[4, 32, 3, 3], 1, 1),
            (&[2, 4, 8, 8], &[32, 4, 1, 1], 0, 1),
            (&[1, 256, 64, 64], &[4, 256, 3, 3], 1, 1),
        ];
        for (i, &(xs, ks, pad, stride)) in cases.iter().enumerate() {
            let bands = xs[1] == 256;
            for dtype in [DType::F64, DType::F32] {
                if bands && dtype == DType::F32 {
                    continue;
                }
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                let x = randn(10 + i as u64, xs, dtype);
                let k = randn(20 + i as u64, ks, dtype);
                let y0 = x.conv2d(&k, pad, stride, 1, 1).unwrap();
                let g = randn(30 + i as u64, y0.dims(), dtype);
                let ours = |t: &[Tensor]| trainable_conv2d(&t[0], &t[1], pad, stride);
                let theirs = |t: &[Tensor]| t[0].conv2d(&t[1], pad, stride, 1, 1);
                let (y, gr) = value_and_grads(&[x.clone(), k.clone()], &g, &ours);
                let (yc, gc) = value_and_grads(&[x.clone(), k.clone()], &g, &theirs);
                let e = rel_diff(&y, &yc);
                assert!(e <= tol, "case {i} {dtype:?}: forward {e:e}");
                for (name, a, b) in [("x", &gr[0], &gc[0]), ("k", &gr[1], &gc[1])] {
                    let e = rel_diff(a.as_ref().unwrap(), b.as_ref().unwrap());
                    assert!(e <= tol, "case {i} {dtype:?}: grad {name} {e:e}");
                }
            }
        }
    }

    /// Only the tracked argument gets a gradient (a frozen input, a frozen kernel), and the
    /// gradients match central finite differences (stride 1 and 2).
    #[test]
    fn trainable_conv2d_gradients_follow_what_is_tracked() {
        let x = randn(1, &[1, 3, 6, 6], DType::F64);
        let k = randn(2, &[2, 3, 3, 3], DType::F64);
        let g = randn(3, &[1, 2, 6, 6], DType::F64);
        let f = |t: &[Tensor]| trainable_conv2d(&t[0], &t[1], 1, 1);
        assert!(finite_difference_error(&[x.clone(), k.clone()], &g, &f) < 1e-8);
        // Stride 2 on an odd width (candle's own backward gets this input gradient's shape wrong).
        let xo = randn(4, &[2, 3, 7, 6], DType::F64);
        let go = randn(5, &[2, 2, 4, 3], DType::F64);
        let fo = |t: &[Tensor]| trainable_conv2d(&t[0], &t[1], 1, 2);
        assert!(finite_difference_error(&[xo, k.clone()], &go, &fo) < 1e-8);
        let kv = Var::from_tensor(&k).unwrap();
        let loss = (trainable_conv2d(&x, kv.as_tensor(), 1, 1).unwrap() * &g)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(kv.as_tensor()).is_some());
        let xv = Var::from_tensor(&x).unwrap();
        let loss = (trainable_conv2d(xv.as_tensor(), &k, 1, 1).unwrap() * &g)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(xv.as_tensor()).is_some());
        assert!(grads.get(&k).is_none());
    }
}
