//! A frozen linear layer and one plain LoRA adapter as one op:
//! `y = x Wᵀ + b + (s · x Dᵀ) Uᵀ`, with `W` `[out, in]` and `b` frozen, `D` `[r, in]` and
//! `U` `[out, r]` differentiable.
//!
//! Composed from separate ops, the graph keeps the base output, the adapter output and their
//! sum (three output-sized tensors per adapted projection); here it keeps the output alone
//! and the rank-r hidden `x Dᵀ` is recomputed in the backward (r ≪ in: one thin product).
//! The sums are the same and in the same order as the composition, so results are equal.
//!
//! Backward with `G = ∂L/∂y` (rows of `x` flattened): `∂U = s Gᵀ H`, `∂H = s G U`,
//! `∂D = ∂Hᵀ X`, `∂X = G W + ∂H D`, where `H = X Dᵀ`. Only tracked inputs get a gradient.

use super::bias::{add_bias_owned, add_owned};
use super::bridge::attach3;
use super::dense::matmul;
use candle_core::{Result, Tensor};

/// `x @ wᵀ + b + (scale · x @ downᵀ) @ upᵀ` over the last dim of `x`; differentiable
/// w.r.t. `x`, `down` and `up` (never `w` / `b`). `x`, `w`, `b` share one dtype and `down`,
/// `up` another (mixed precision: a half model with f32 factors); the adapter's product runs
/// in the factors' dtype and is cast to `x`'s before the sum, as the composed adapter does.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    down: &Tensor,
    up: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (out_f, in_f) = w.dims2()?;
    let (r, down_in) = down.dims2()?;
    let (up_out, up_r) = up.dims2()?;
    let dims = x.dims().to_vec();
    if dims.last().copied() != Some(in_f) || down_in != in_f || up_out != out_f || up_r != r {
        candle_core::bail!(
            "lora_linear: x {dims:?}, weight {:?}, down {:?}, up {:?} do not fit",
            w.dims(),
            down.dims(),
            up.dims()
        );
    }
    if let Some(b) = b {
        if b.dims() != [out_f] {
            candle_core::bail!("lora_linear: bias {:?}, expected [{out_f}]", b.dims());
        }
    }
    let rows = x.elem_count() / in_f.max(1);
    let mut out_dims = dims;
    *out_dims.last_mut().expect("checked non-empty") = out_f;
    let w = w.detach();
    let x2 = x.detach().reshape((rows, in_f))?;
    let (d, u) = (down.detach(), up.detach());
    let (xd, fd) = (x.dtype(), d.dtype());
    let y = super::profile::scope("lora-linear", super::profile::Pass::Forward, || {
        matmul(&x2, &w.t()?)
    })?;
    let y = match b {
        Some(b) => add_bias_owned(y, &b.detach(), 1)?,
        None => y,
    };
    let h = matmul(&x2.to_dtype(fd)?, &d.t()?)?.affine(scale, 0.0)?;
    let y = add_owned(y, &matmul(&h, &u.t()?)?.to_dtype(xd)?)?.reshape(out_dims)?;
    drop((x2, h));
    let bwd = move |[x, down, up]: [&Tensor; 3], g: &Tensor| {
        let x2 = x.detach().reshape((rows, in_f))?;
        let xf = x2.to_dtype(fd)?;
        let (d, u) = (down.detach(), up.detach());
        let g2 = g.reshape((rows, out_f))?;
        let gf = g2.to_dtype(fd)?;
        let gu = match up.track_op() {
            true => {
                let h = matmul(&xf, &d.t()?)?.affine(scale, 0.0)?;
                Some(matmul(&gf.t()?, &h)?)
            }
            false => None,
        };
        if !(x.track_op() || down.track_op()) {
            return Ok((None, None, gu));
        }
        let gh = matmul(&gf, &u)?.affine(scale, 0.0)?;
        let gd = match down.track_op() {
            true => Some(matmul(&gh.t()?, &xf)?),
            false => None,
        };
        let gx = match x.track_op() {
            true => {
                let gx = add_owned(matmul(&g2, &w)?, &matmul(&gh, &d)?.to_dtype(xd)?)?;
                Some(gx.reshape(x.shape())?)
            }
            false => None,
        };
        Ok((gx, gd, gu))
    };
    attach3([x, down, up], y, "lora-linear", Box::new(bwd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::frozen_linear;
    use candle_core::{DType, Device, Var};

    fn randn(shape: &[usize], seed: u64, dt: DType) -> Tensor {
        crate::rng::Rng::new(seed)
            .randn(shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let m = b.abs().unwrap().max_all().unwrap();
        let (d, m) = (
            d.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(),
            m.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(),
        );
        d / m.max(1e-30)
    }

    /// The composed form the op replaces: frozen base, then `up(scale · down(x))` added.
    fn composed(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        d: &Tensor,
        u: &Tensor,
        s: f64,
    ) -> Tensor {
        let base = frozen_linear(x, w, b).unwrap();
        let h = x
            .broadcast_matmul(&d.t().unwrap())
            .unwrap()
            .affine(s, 0.0)
            .unwrap();
        (base + h.broadcast_matmul(&u.t().unwrap()).unwrap()).unwrap()
    }

    #[test]
    fn equals_the_composition_in_value_and_gradients() {
        for (bias, dims) in [(true, vec![2, 5, 6]), (false, vec![7, 6])] {
            let dt = DType::F32;
            let w = randn(&[4, 6], 1, dt);
            let b = bias.then(|| randn(&[4], 2, dt));
            let x = Var::from_tensor(&randn(&dims, 3, dt)).unwrap();
            let d = Var::from_tensor(&randn(&[3, 6], 4, dt)).unwrap();
            let u = Var::from_tensor(&randn(&[4, 3], 5, dt)).unwrap();
            let gy = randn(
                &[dims[..dims.len() - 1].iter().product::<usize>() * 4],
                6,
                dt,
            );
            let loss = |y: &Tensor| (y.flatten_all().unwrap() * &gy).unwrap().sum_all().unwrap();
            let yf = lora_linear(&x, &w, b.as_ref(), &d, &u, 0.75).unwrap();
            let yc = composed(&x, &w, b.as_ref(), &d, &u, 0.75);
            assert_eq!(yf.dims(), yc.dims());
            assert!(max_rel(&yf, &yc) < 1e-6, "value {}", max_rel(&yf, &yc));
            let (gf, gc) = (loss(&yf).backward().unwrap(), loss(&yc).backward().unwrap());
            for v in [&x, &d, &u] {
                let (a, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
                assert!(max_rel(a, c) < 1e-5, "grad {}", max_rel(a, c));
            }
        }
    }

    #[test]
    fn half_model_with_f32_factors_follows_the_composition() {
        let (h, f) = (DType::BF16, DType::F32);
        let w = randn(&[4, 6], 31, h);
        let b = randn(&[4], 32, h);
        let x = Var::from_tensor(&randn(&[5, 6], 33, h)).unwrap();
        let d = Var::from_tensor(&randn(&[2, 6], 34, f)).unwrap();
        let u = Var::from_tensor(&randn(&[4, 2], 35, f)).unwrap();
        let yf = lora_linear(&x, &w, Some(&b), &d, &u, 0.5).unwrap();
        assert_eq!(yf.dtype(), h);
        // The adapter's own composition: the residual in f32, cast, added to the half base.
        let base = frozen_linear(&x, &w, Some(&b)).unwrap();
        let xf = x.to_dtype(f).unwrap();
        let r = xf
            .matmul(&d.t().unwrap())
            .unwrap()
            .affine(0.5, 0.0)
            .unwrap();
        let r = r.matmul(&u.t().unwrap()).unwrap().to_dtype(h).unwrap();
        let yc = (base + r).unwrap();
        assert_eq!(max_rel(&yf, &yc), 0.0);
        let gy = randn(&[5, 4], 36, h);
        let loss = |y: &Tensor| (y * &gy).unwrap().to_dtype(f).unwrap().sum_all().unwrap();
        let (gf, gc) = (loss(&yf).backward().unwrap(), loss(&yc).backward().unwrap());
        for v in [&x, &d, &u] {
            let (a, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
            assert_eq!(a.dtype(), v.dtype());
            assert!(max_rel(a, c) < 1e-2, "grad {}", max_rel(a, c));
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let dt = DType::F64;
        let w = randn(&[3, 4], 11, dt);
        let b = randn(&[3], 12, dt);
        let x0 = randn(&[2, 4], 13, dt);
        let d0 = randn(&[2, 4], 14, dt);
        let u0 = randn(&[3, 2], 15, dt);
        let gy = randn(&[2, 3], 16, dt);
        let f = |x: &Tensor, d: &Tensor, u: &Tensor| -> f64 {
            let y = lora_linear(x, &w, Some(&b), d, u, 1.5).unwrap();
            (y * &gy)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let (x, d, u) = (
            Var::from_tensor(&x0).unwrap(),
            Var::from_tensor(&d0).unwrap(),
            Var::from_tensor(&u0).unwrap(),
        );
        let y = lora_linear(&x, &w, Some(&b), &d, &u, 1.5).unwrap();
        let grads = (y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        let eps = 1e-6;
        for which in 0..3 {
            let base = [&x0, &d0, &u0][which];
            let g: Vec<f64> = grads
                .get([&x, &d, &u][which])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let flat: Vec<f64> = base.flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..flat.len() {
                let bump = |e: f64| {
                    let mut v = flat.clone();
                    v[i] += e;
                    Tensor::from_vec(v, base.shape(), &Device::Cpu).unwrap()
                };
                let (p, m) = (bump(eps), bump(-eps));
                let fd = match which {
                    0 => (f(&p, &d0, &u0) - f(&m, &d0, &u0)) / (2.0 * eps),
                    1 => (f(&x0, &p, &u0) - f(&x0, &m, &u0)) / (2.0 * eps),
                    _ => (f(&x0, &d0, &p) - f(&x0, &d0, &m)) / (2.0 * eps),
                };
                assert!(
                    (fd - g[i]).abs() < 1e-7,
                    "input {which} elem {i}: fd {fd} vs {}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn untracked_inputs_get_no_graph() {
        let dt = DType::F32;
        let x = randn(&[3, 4], 21, dt);
        let y = lora_linear(
            &x,
            &randn(&[2, 4], 22, dt),
            None,
            &randn(&[1, 4], 23, dt),
            &randn(&[2, 1], 24, dt),
            1.0,
        )
        .unwrap();
        assert!(!y.track_op());
        assert_eq!(y.dims(), [3, 2]);
    }
}
