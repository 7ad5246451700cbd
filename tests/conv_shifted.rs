//! The CPU convolution as one gemm per kernel tap on shifted views ("same" convs of at least
//! 64×64 pixels) against candle's own `conv2d` and `conv_transpose2d`, forward and input
//! gradient, f32 and f64, 3×3 and 5×5, batches and non-square images.

mod common;

use candle_core::{DType, Tensor};
use lora_diffusion::ops;
use lora_diffusion::rng::Rng;

/// Largest difference relative to the reference's largest magnitude.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    common::max_abs_diff_f64(a, b) / common::max_abs_f64(b)
}

#[allow(clippy::too_many_arguments)]
fn check(
    n: usize,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    k: usize,
    dtype: DType,
    tol: f64,
) {
    let mut rng = Rng::new((n * 1000 + c_in * 10 + k) as u64);
    let mut r = |s: &[usize], std: f64| common::randn(&mut rng, s, std).to_dtype(dtype).unwrap();
    let p = k / 2;
    let x = r(&[n, c_in, h, w], 1.0);
    let wt = r(&[c_out, c_in, k, k], 0.1);
    let g = r(&[n, c_out, h, w], 1.0);
    assert!(
        ops::shifted_conv_serves(&x, &wt, p, 1, 1),
        "the shifted form serves this case"
    );
    let y = ops::shifted_conv2d(&x, &wt, p).unwrap();
    let y_ref = x.conv2d(&wt, p, 1, 1, 1).unwrap();
    assert_eq!(y.dims(), y_ref.dims());
    let e = rel(&y, &y_ref);
    assert!(
        e <= tol,
        "{n}x{c_in}->{c_out} {h}x{w} k{k} {dtype:?}: forward {e:e}"
    );
    let dx = ops::shifted_conv2d_input_grad(&g, &wt, p).unwrap();
    let dx_ref = g.conv_transpose2d(&wt, p, 0, 1, 1).unwrap();
    assert_eq!(dx.dims(), x.dims());
    let e = rel(&dx, &dx_ref);
    assert!(
        e <= tol,
        "{n}x{c_in}->{c_out} {h}x{w} k{k} {dtype:?}: input grad {e:e}"
    );
}

#[test]
fn shifted_conv_equals_candle_conv_and_its_transpose() {
    check(2, 64, 72, 64, 72, 3, DType::F32, 2e-6);
    check(1, 72, 64, 66, 63, 3, DType::F64, 1e-13);
    check(1, 64, 64, 64, 65, 5, DType::F64, 1e-13);
}

#[test]
fn shifted_conv_serves_only_large_same_convs() {
    let t = |s: &[usize]| Tensor::zeros(s, DType::F32, &candle_core::Device::Cpu).unwrap();
    let (x, k) = (t(&[1, 64, 64, 64]), t(&[64, 64, 3, 3]));
    assert!(ops::shifted_conv_serves(&x, &k, 1, 1, 1));
    assert!(!ops::shifted_conv_serves(&x, &k, 1, 2, 1), "stride 2");
    assert!(!ops::shifted_conv_serves(&x, &k, 0, 1, 1), "no padding");
    assert!(!ops::shifted_conv_serves(&x, &k, 2, 1, 2), "dilation 2");
    let k128 = t(&[128, 128, 3, 3]);
    assert!(
        ops::shifted_conv_serves(&t(&[1, 128, 32, 128]), &k128, 1, 1, 1),
        "4096 px"
    );
    assert!(ops::shifted_conv_serves(
        &t(&[1, 128, 64, 64]),
        &k128,
        1,
        1,
        1
    ));
    assert!(
        !ops::shifted_conv_serves(&t(&[1, 128, 32, 32]), &k128, 1, 1, 1),
        "1024 px"
    );
    let small = t(&[1, 16, 64, 64]);
    assert!(
        !ops::shifted_conv_serves(&small, &t(&[16, 16, 3, 3]), 1, 1, 1),
        "1M multiply-adds"
    );
    assert!(
        !ops::shifted_conv_serves(&t(&[1, 4, 64, 64]), &t(&[320, 4, 3, 3]), 1, 1, 1),
        "4 in"
    );
    assert!(
        !ops::shifted_conv_serves(&x, &t(&[64, 64, 1, 1]), 0, 1, 1),
        "1x1"
    );
    let h = x.to_dtype(DType::F16).unwrap();
    assert!(
        !ops::shifted_conv_serves(&h, &k.to_dtype(DType::F16).unwrap(), 1, 1, 1),
        "f16"
    );
}
