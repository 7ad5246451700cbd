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
use super::blas::MIN_PRODUCT;
use super::bridge::attach3;
use super::dense::matmul;
use super::low_rank::{self, Grads, Want};
use super::pool_matmul::{add_matmul_owned, matmul_any};
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
    let fd = d.dtype();
    let y = super::profile::scope("lora-linear", super::profile::Pass::Forward, || {
        matmul(&x2, &w.t()?)
    })?;
    let y = match b {
        Some(b) => add_bias_owned(y, &b.detach(), 1)?,
        None => y,
    };
    // Beside a large base product, the rank-r products run on the worker pool (candle would
    // run them on one thread) and add straight into the fresh output.
    let thin = rows * in_f * out_f >= MIN_PRODUCT;
    // `H = (s · D Xᵀ)ᵀ`: formed transposed, the thin product's long side is its rows.
    let h = match thin {
        true => scaled(&d, &x2.to_dtype(fd)?.t()?, scale, thin)?.t()?,
        false => scaled(&x2.to_dtype(fd)?, &d.t()?, scale, thin)?,
    };
    let y = add_product(y, &h, &u.t()?, thin)?.reshape(out_dims)?;
    drop((x2, h));
    let bwd = move |[x, down, up]: [&Tensor; 3], g: &Tensor| {
        let x2 = x.detach().reshape((rows, in_f))?;
        let xf = x2.to_dtype(fd)?;
        let (d, u) = (down.detach(), up.detach());
        let g2 = g.reshape((rows, out_f))?;
        let gf = g2.to_dtype(fd)?;
        let want = Want {
            gh: x.track_op(),
            gd: down.track_op(),
            gu: up.track_op(),
        };
        let fused = match thin {
            true => low_rank::grads([&xf, &gf, &d, &u], scale, want)?,
            false => None,
        };
        let Grads { gh, gd, gu } = match fused {
            Some(gr) => gr,
            None => separate([&xf, &gf, &d, &u], scale, want)?,
        };
        let gx = match gh {
            Some(gh) => Some(add_product(matmul(&g2, &w)?, &gh, &d, thin)?.reshape(x.shape())?),
            None => None,
        };
        Ok((gx, gd, gu))
    };
    attach3([x, down, up], y, "lora-linear", Box::new(bwd))
}

/// [`low_rank::grads`] as separate products, on any device and dtype.
fn separate([x, g, d, u]: [&Tensor; 4], scale: f64, want: Want) -> Result<Grads> {
    let gu = match want.gu {
        true => Some(matmul(&g.t()?, &matmul(x, &d.t()?)?.affine(scale, 0.0)?)?),
        false => None,
    };
    let gh = match want.gh || want.gd {
        true => Some(matmul(g, u)?.affine(scale, 0.0)?),
        false => None,
    };
    let gd = match (&gh, want.gd) {
        (Some(gh), true) => Some(matmul(&gh.t()?, x)?),
        _ => None,
    };
    let gh = gh.filter(|_| want.gh);
    Ok(Grads { gh, gd, gu })
}

/// `scale · (a @ b)`: on the worker pool for a `thin` product it serves, else candle's.
fn scaled(a: &Tensor, b: &Tensor, scale: f64, thin: bool) -> Result<Tensor> {
    if thin {
        if let Some(c) = matmul_any(a, b, scale)? {
            return Ok(c);
        }
    }
    matmul(a, b)?.affine(scale, 0.0)
}

/// `y + a @ b` for a fresh `y` of `x`'s dtype and `a`, `b` of the factors' (cast before the
/// sum): added in place on the worker pool for a `thin` product of one dtype.
fn add_product(y: Tensor, a: &Tensor, b: &Tensor, thin: bool) -> Result<Tensor> {
    if thin && y.dtype() == a.dtype() {
        return add_matmul_owned(y, a, b);
    }
    let dt = y.dtype();
    add_owned(y, &matmul(a, b)?.to_dtype(dt)?)
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

    /// A layer large enough for the pooled thin products (three row chunks, the last one
    /// partial), in f64 and f32, with every subset of tracked inputs the trainer uses.
    #[test]
    fn large_layer_follows_the_composition() {
        let (rows, i, o) = (600, 192, 160);
        assert!(
            rows * i * o >= MIN_PRODUCT,
            "the test must reach the pooled path"
        );
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            let w = randn(&[o, i], 41, dt);
            let b = randn(&[o], 42, dt);
            let x = Var::from_tensor(&randn(&[2, rows / 2, i], 43, dt)).unwrap();
            let d = Var::from_tensor(&randn(&[4, i], 44, dt)).unwrap();
            let u = Var::from_tensor(&randn(&[o, 4], 45, dt)).unwrap();
            let gy = randn(&[2, rows / 2, o], 46, dt);
            let loss = |y: &Tensor| (y * &gy).unwrap().sum_all().unwrap();
            for tracked in [
                [true, true, true],
                [false, true, true],
                [false, false, true],
            ] {
                let xs = match tracked[0] {
                    true => x.as_tensor().clone(),
                    false => x.as_tensor().detach(),
                };
                let ds = match tracked[1] {
                    true => d.as_tensor().clone(),
                    false => d.as_tensor().detach(),
                };
                let yf = lora_linear(&xs, &w, Some(&b), &ds, &u, 0.75).unwrap();
                let yc = composed(&xs, &w, Some(&b), &ds, &u, 0.75);
                assert!(
                    max_rel(&yf, &yc) < tol,
                    "{dt:?} value {}",
                    max_rel(&yf, &yc)
                );
                let (gf, gc) = (loss(&yf).backward().unwrap(), loss(&yc).backward().unwrap());
                for (v, on) in [(&x, tracked[0]), (&d, tracked[1]), (&u, tracked[2])] {
                    match on {
                        true => {
                            let (a, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
                            assert_eq!(a.dims(), c.dims());
                            assert!(max_rel(a, c) < tol, "{dt:?} {tracked:?} {}", max_rel(a, c));
                        }
                        false => assert!(gf.get(v).is_none(), "{tracked:?}: untracked grad"),
                    }
                }
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
