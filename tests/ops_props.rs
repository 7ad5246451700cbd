//! Properties of the training ops in `lora_diffusion::ops` beyond the fixture cases of
//! `tests/ops.rs`: fused CPU kernels against the generic path on large (multi-threaded)
//! inputs, gradient accumulation, frozen affine inputs, half-precision inputs, and the
//! fused attention against its composition from differentiable candle ops.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{max_abs_diff_f64, max_abs_f64};
use lora_diffusion::ops::{self, Kernel};

/// Deterministic pseudo-normal values (xorshift + Box-Muller), so the test needs no seed API.
fn randn(shape: &[usize], seed: u64, scale: f32, shift: f32) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2) = (next(), next());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            z as f32 * scale + shift
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Output and input gradients of `f` for `sum(f(inputs) * g)`.
fn grads_of(
    inputs: &[Tensor],
    g: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let gs = (&y * g).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = vars
        .iter()
        .map(|v| gs.get(v.as_tensor()).expect("gradient").clone())
        .collect();
    (y, grads)
}

#[test]
fn fused_kernels_match_generic_on_large_inputs() {
    type Op = Box<dyn Fn(&[Tensor], Kernel) -> Result<Tensor>>;
    let c = 320;
    let cases: Vec<(&str, Vec<Tensor>, Op)> = vec![
        (
            "softmax [4,64,257]",
            vec![randn(&[4, 64, 257], 1, 3.0, 0.0)],
            Box::new(|t, k| ops::softmax_last_dim_with(&t[0], k)),
        ),
        (
            "layer_norm [2,300,320]",
            vec![
                randn(&[2, 300, c], 2, 2.0, 1.0),
                randn(&[c], 3, 0.3, 1.0),
                randn(&[c], 4, 0.3, 0.0),
            ],
            Box::new(|t, k| ops::layer_norm_with(&t[0], &t[1], &t[2], 1e-5, k)),
        ),
        (
            "group_norm [2,64,33,31] g32",
            vec![
                randn(&[2, 64, 33, 31], 5, 2.0, 1.0),
                randn(&[64], 6, 0.3, 1.0),
                randn(&[64], 7, 0.3, 0.0),
            ],
            Box::new(|t, k| ops::group_norm_with(&t[0], 32, &t[1], &t[2], 1e-6, k)),
        ),
        (
            "silu [100003]",
            vec![randn(&[100_003], 8, 4.0, 0.0)],
            Box::new(|t, k| ops::silu_with(&t[0], k)),
        ),
        (
            "gelu_erf [100003]",
            vec![randn(&[100_003], 9, 4.0, 0.0)],
            Box::new(|t, k| ops::gelu_erf_with(&t[0], k)),
        ),
    ];
    for (name, ins, op) in cases {
        let y0 = op(&ins, Kernel::Generic).unwrap();
        let g = randn(y0.dims(), 10, 1.0, 0.0);
        let (ya, ga) = grads_of(&ins, &g, &|t| op(t, Kernel::Auto));
        let (yg, gg) = grads_of(&ins, &g, &|t| op(t, Kernel::Generic));
        let mut diffs = vec![max_abs_diff_f64(&ya, &yg) / max_abs_f64(&yg).max(1.0)];
        diffs.extend(
            ga.iter()
                .zip(&gg)
                .map(|(a, b)| max_abs_diff_f64(a, b) / max_abs_f64(b).max(1.0)),
        );
        let shown: Vec<String> = diffs.iter().map(|d| format!("{d:.1e}")).collect();
        eprintln!("fused vs generic {name:28} relative max diffs (y, grads...) {shown:?}");
        assert!(diffs.iter().all(|&d| d < 2e-5), "{name}: {diffs:?}");
    }
}

#[test]
fn upsample_gradient_accumulates_with_other_uses() {
    // x feeds both the upsampling and a direct product; candle's stock backward would
    // overwrite the direct-product gradient.
    let x = Var::from_tensor(&randn(&[1, 3, 4, 4], 11, 1.0, 0.0)).unwrap();
    let g_up = randn(&[1, 3, 8, 8], 12, 1.0, 0.0);
    let g_id = randn(&[1, 3, 4, 4], 13, 1.0, 0.0);
    let up = ops::upsample_nearest2d(x.as_tensor(), 8, 8).unwrap();
    let loss = ((&up * &g_up).unwrap().sum_all().unwrap()
        + (x.as_tensor() * &g_id).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let expected = (g_up
        .reshape((1, 3, 4, 2, 4, 2))
        .unwrap()
        .sum(5)
        .unwrap()
        .sum(3)
        .unwrap()
        + &g_id)
        .unwrap();
    let d = max_abs_diff_f64(grads.get(x.as_tensor()).unwrap(), &expected);
    eprintln!("upsample accumulate: max abs diff {d:.2e}");
    assert!(d < 1e-5);
}

#[test]
fn norm_weight_gradients_without_input_gradient() {
    // Only the affine parameters train (x is data): dw / db still flow, x gets none.
    let x = randn(&[2, 8, 5, 5], 14, 1.0, 0.0);
    let (w, b) = (
        Var::from_tensor(&randn(&[8], 15, 0.3, 1.0)).unwrap(),
        Var::from_tensor(&randn(&[8], 16, 0.3, 0.0)).unwrap(),
    );
    let g = randn(&[2, 8, 5, 5], 17, 1.0, 0.0);
    for kernel in [Kernel::Auto, Kernel::Generic] {
        let y = ops::group_norm_with(&x, 4, w.as_tensor(), b.as_tensor(), 1e-5, kernel).unwrap();
        let gs = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let db = gs.get(b.as_tensor()).expect("db");
        let expect_db = g.sum((0, 2, 3)).unwrap();
        assert!(gs.get(w.as_tensor()).is_some() && gs.get(&x).is_none());
        let d = max_abs_diff_f64(db, &expect_db);
        eprintln!("group_norm {kernel:?} weight-only: db max abs diff {d:.2e}");
        assert!(d < 1e-5);
    }
}

#[test]
fn half_precision_inputs_keep_their_dtype() {
    let x = randn(&[2, 8, 6, 6], 18, 1.0, 0.5);
    let w = randn(&[8], 19, 0.3, 1.0);
    let b = randn(&[8], 20, 0.3, 0.0);
    let lw = randn(&[6], 21, 0.3, 1.0);
    let lb = randn(&[6], 22, 0.3, 0.0);
    for dtype in [DType::F16, DType::BF16] {
        let xh = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
        let (wh, bh) = (w.to_dtype(dtype).unwrap(), b.to_dtype(dtype).unwrap());
        let (lwh, lbh) = (lw.to_dtype(dtype).unwrap(), lb.to_dtype(dtype).unwrap());
        let xr = xh.as_tensor().to_dtype(DType::F32).unwrap();
        let pairs = [
            (
                ops::softmax_last_dim(xh.as_tensor()),
                ops::softmax_last_dim(&xr),
            ),
            (
                ops::layer_norm(xh.as_tensor(), &lwh, &lbh, 1e-5),
                ops::layer_norm(&xr, &lw, &lb, 1e-5),
            ),
            (
                ops::group_norm(xh.as_tensor(), 4, &wh, &bh, 1e-5),
                ops::group_norm(&xr, 4, &w, &b, 1e-5),
            ),
            (ops::silu(xh.as_tensor()), ops::silu(&xr)),
            (ops::gelu_erf(xh.as_tensor()), ops::gelu_erf(&xr)),
            (
                ops::upsample_nearest2d(xh.as_tensor(), 12, 12),
                ops::upsample_nearest2d(&xr, 12, 12),
            ),
        ];
        for (i, (half, full)) in pairs.into_iter().enumerate() {
            let (half, full) = (half.unwrap(), full.unwrap());
            assert_eq!(half.dtype(), dtype);
            let d = max_abs_diff_f64(&half, &full);
            let grads = half.sum_all().unwrap().backward().unwrap();
            let gx = grads
                .get(xh.as_tensor())
                .expect("gradient reaches the half input");
            assert_eq!(gx.dtype(), dtype);
            eprintln!("{dtype:?} op {i}: max abs diff to f32 {d:.2e}");
            assert!(d < 0.05, "{dtype:?} op {i}: {d}");
        }
    }
}

#[test]
fn attention_matches_composed_candle_ops() {
    // [batch, heads, tokens, head_dim] with cross-attention lengths, as in the UNet.
    let q = randn(&[2, 4, 96, 40], 30, 1.0, 0.0);
    let k = randn(&[2, 4, 77, 40], 31, 1.0, 0.0);
    let v = randn(&[2, 4, 77, 40], 32, 1.0, 0.0);
    let g = randn(&[2, 4, 96, 40], 33, 1.0, 0.0);
    let scale = 40f64.powf(-0.5);
    let composed = |t: &[Tensor]| -> Result<Tensor> {
        let s = (t[0].matmul(&t[1].t()?)? * scale)?;
        candle_nn::ops::softmax(&s, candle_core::D::Minus1)?.matmul(&t[2])
    };
    let ins = [q.clone(), k.clone(), v.clone()];
    let (yc, gc) = grads_of(&ins, &g, &composed);
    for kernel in [Kernel::Auto, Kernel::Generic] {
        let (y, gs) = grads_of(&ins, &g, &|t| {
            ops::attention_with(&t[0], &t[1], &t[2], scale, None, kernel)
        });
        let mut d = vec![max_abs_diff_f64(&y, &yc)];
        d.extend(gs.iter().zip(&gc).map(|(a, b)| max_abs_diff_f64(a, b)));
        let shown: Vec<String> = d.iter().map(|x| format!("{x:.1e}")).collect();
        eprintln!("attention {kernel:?} vs composed: max abs diff (y, dq, dk, dv) {shown:?}");
        assert!(d.iter().all(|&x| x < 1e-5), "{kernel:?}: {d:?}");
    }
    // Only q in the graph (e.g. LoRA on to_q only): k and v get no gradient.
    let qv = Var::from_tensor(&q).unwrap();
    let y = ops::attention(qv.as_tensor(), &k, &v, scale, None).unwrap();
    let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let d = max_abs_diff_f64(grads.get(qv.as_tensor()).unwrap(), &gc[0]);
    assert!(grads.get(&k).is_none() && grads.get(&v).is_none() && d < 1e-5);
}
