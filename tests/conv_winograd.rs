//! The CPU 3×3 convolution by Winograd's F(2×2, 3×3) against candle's own `conv2d` and
//! `conv_transpose2d` in f64, forward and input gradient, f32 and f64, batches, odd and
//! non-square images; and which convolutions the UNet sends to it.

mod common;

use candle_core::{DType, Device, Tensor};
use lora_diffusion::ops::{self, Conv2dParams};
use lora_diffusion::rng::Rng;

/// Largest difference relative to the reference's largest magnitude.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    common::max_abs_diff_f64(a, b) / common::max_abs_f64(b)
}

/// Forward and input-gradient errors of the Winograd form, and of the im2col form (the
/// `shifted` / im2col path candle's `conv2d` stands for) in the same dtype, against f64.
fn errors(n: usize, c_in: usize, c_out: usize, h: usize, w: usize, dtype: DType) -> [f64; 4] {
    let mut rng = Rng::new((n * 1000 + c_in * 10 + h) as u64);
    let mut r = |s: &[usize], std: f64| common::randn(&mut rng, s, std);
    let (x, wt, g) = (
        r(&[n, c_in, h, w], 1.0),
        r(&[c_out, c_in, 3, 3], 0.05),
        r(&[n, c_out, h, w], 1.0),
    );
    let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let y_ref = f64s(&x).conv2d(&f64s(&wt), 1, 1, 1, 1).unwrap();
    let dx_ref = f64s(&g).conv_transpose2d(&f64s(&wt), 1, 0, 1, 1).unwrap();
    let d = |t: &Tensor| t.to_dtype(dtype).unwrap();
    let (x, wt, g) = (d(&x), d(&wt), d(&g));
    let y = ops::winograd_conv2d(&x, &wt).unwrap();
    let dx = ops::winograd_conv2d_input_grad(&g, &wt).unwrap();
    assert_eq!(y.dims(), y_ref.dims());
    assert_eq!(dx.dims(), dx_ref.dims());
    let y_plain = x.conv2d(&wt, 1, 1, 1, 1).unwrap();
    let dx_plain = g.conv_transpose2d(&wt, 1, 0, 1, 1).unwrap();
    [
        rel(&y, &y_ref),
        rel(&dx, &dx_ref),
        rel(&y_plain, &y_ref),
        rel(&dx_plain, &dx_ref),
    ]
}

#[test]
fn winograd_conv_equals_the_direct_convolution() {
    // (n, in, out, h, w): a batch, odd sizes (a cropped last tile row and column), more
    // outputs than inputs and fewer; the last with a transformed kernel too large for one
    // block, so both directions build it in two blocks of output channels.
    for (n, ci, co, h, w) in [
        (2, 64, 72, 32, 34),
        (1, 96, 80, 33, 35),
        (1, 72, 64, 31, 40),
        (1, 768, 704, 16, 18),
    ] {
        let [f, b, fp, bp] = errors(n, ci, co, h, w, DType::F32);
        eprintln!("{n}x{ci}->{co} {h}x{w} f32: forward {f:.2e} (direct {fp:.2e}), input grad {b:.2e} (direct {bp:.2e})");
        // Measured 3.3e-7 .. 4.3e-7, 7.6e-7 at 768 channels (candle's direct conv2d:
        // 5.1e-7 .. 6.9e-7 forward, 1.3e-7 .. 2.0e-7 input gradient).
        assert!(
            f < 1e-6 && b < 1e-6,
            "f32 winograd: forward {f:e}, input grad {b:e}"
        );
        let [f, b, ..] = errors(n, ci, co, h, w, DType::F64);
        assert!(
            f < 1e-14 && b < 1e-14,
            "f64 winograd: forward {f:e}, input grad {b:e}"
        );
    }
}

#[test]
fn winograd_conv_in_chunks_of_tile_rows_equals_the_direct_convolution() {
    // 2 × 80 tile rows of 80 tiles at 64 channels: two chunks of at most 32 MB of transformed
    // input, the second one starting inside the first image.
    let [f, b, fp, bp] = errors(2, 64, 64, 160, 160, DType::F32);
    eprintln!(
        "chunked f32: forward {f:.2e} (direct {fp:.2e}), input grad {b:.2e} (direct {bp:.2e})"
    );
    assert!(
        f < 1e-6 && b < 1e-6,
        "chunked winograd: forward {f:e}, input grad {b:e}"
    );
}

#[test]
fn frozen_conv_takes_winograd_for_large_3x3_same_convs() {
    let t = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    let serves = |x: &[usize], k: &[usize], p, s| ops::winograd_conv_serves(&t(x), &t(k), p, s, 1);
    // The SD 1.5 UNet's 3×3 convs at 512 px: 64×64, 32×32 and 16×16 latents, not 8×8.
    assert!(serves(&[1, 320, 64, 64], &[320, 320, 3, 3], 1, 1));
    assert!(serves(&[2, 1920, 32, 32], &[640, 1920, 3, 3], 1, 1));
    assert!(serves(&[1, 2560, 16, 16], &[1280, 2560, 3, 3], 1, 1));
    assert!(
        serves(&[1, 128, 33, 33], &[128, 128, 3, 3], 1, 1),
        "odd sizes"
    );
    assert!(
        !serves(&[1, 1280, 8, 8], &[1280, 1280, 3, 3], 1, 1),
        "4x4 tiles"
    );
    assert!(
        !serves(&[1, 1280, 14, 14], &[1280, 1280, 3, 3], 1, 1),
        "7x7 tiles"
    );
    assert!(
        !serves(&[1, 320, 64, 64], &[320, 320, 3, 3], 1, 2),
        "stride 2"
    );
    assert!(!serves(&[1, 320, 64, 64], &[320, 320, 1, 1], 0, 1), "1x1");
    assert!(
        !serves(&[1, 320, 64, 64], &[4, 320, 3, 3], 1, 1),
        "4 out (conv_out)"
    );
    assert!(
        !serves(&[1, 4, 64, 64], &[320, 4, 3, 3], 1, 1),
        "4 in (conv_in)"
    );
    assert!(
        !serves(&[1, 64, 32, 32], &[64, 64, 3, 3], 1, 1),
        "4M multiply-adds"
    );
    let h = t(&[1, 320, 64, 64]).to_dtype(DType::F16).unwrap();
    let kh = t(&[320, 320, 3, 3]).to_dtype(DType::F16).unwrap();
    assert!(!ops::winograd_conv_serves(&h, &kh, 1, 1, 1), "f16");

    // Through the frozen conv (bias added after): the Winograd values, bit for bit.
    let mut rng = Rng::new(7);
    let x = common::randn(&mut rng, &[1, 128, 32, 32], 1.0);
    let wt = common::randn(&mut rng, &[128, 128, 3, 3], 0.05);
    let b = common::randn(&mut rng, &[128], 1.0);
    let y = ops::frozen_conv2d(&x, &wt, Some(&b), 1, 1, 1, 1).unwrap();
    let direct = ops::winograd_conv2d(&x, &wt)
        .unwrap()
        .broadcast_add(&b.reshape((1, 128, 1, 1)).unwrap())
        .unwrap();
    assert_eq!(common::max_abs_diff(&y, &direct), 0.0);
    let g = common::randn(&mut rng, &[1, 128, 32, 32], 1.0);
    let p = Conv2dParams {
        padding: 1,
        ..Default::default()
    };
    let dx = ops::conv2d_input_grad(&g, &wt, (32, 32), &p).unwrap();
    let dx_w = ops::winograd_conv2d_input_grad(&g, &wt).unwrap();
    assert_eq!(common::max_abs_diff(&dx, &dx_w), 0.0);
}
