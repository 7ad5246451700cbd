//! Wall time and GFLOP/s of our frozen CPU convolution, forward and input gradient, on the
//! SD 1.5 UNet's convolutions at 512 px (each shape with the number of times one forward runs
//! it, as PyTorch's module hooks list them), or on a file of shapes, one per line:
//! `in out k stride padding h w [count]`. Prints which form serves each (Winograd, shifted
//! views, im2col) and the count-weighted totals. Nothing is asserted; compare with
//! `torch.nn.Conv2d` on the same shapes.
//!
//!     cargo run --release --example conv_probe [-- shapes.txt]

use candle_core::{DType, Device, Result, Tensor};
use lora_diffusion::ops::{self, Conv2dParams, FrozenConv2d};
use std::time::Instant;

/// One convolution: in, out, kernel, stride, padding, h, w, calls per forward.
type Shape = (usize, usize, usize, usize, usize, usize, usize, usize);

/// The SD 1.5 UNet's convolutions at 512 px.
const SD15_512: [Shape; 35] = [
    (1280, 1280, 3, 1, 1, 8, 8, 11),
    (320, 320, 1, 1, 0, 64, 64, 10),
    (640, 640, 1, 1, 0, 32, 32, 10),
    (1280, 1280, 1, 1, 0, 16, 16, 10),
    (320, 320, 3, 1, 1, 64, 64, 7),
    (1280, 1280, 3, 1, 1, 16, 16, 7),
    (640, 640, 3, 1, 1, 32, 32, 6),
    (2560, 1280, 3, 1, 1, 8, 8, 3),
    (2560, 1280, 1, 1, 0, 8, 8, 3),
    (1280, 1280, 1, 1, 0, 8, 8, 2),
    (2560, 1280, 3, 1, 1, 16, 16, 2),
    (2560, 1280, 1, 1, 0, 16, 16, 2),
    (640, 320, 3, 1, 1, 64, 64, 2),
    (640, 320, 1, 1, 0, 64, 64, 2),
    (4, 320, 3, 1, 1, 64, 64, 1),
    (320, 320, 3, 2, 1, 64, 64, 1),
    (320, 640, 3, 1, 1, 32, 32, 1),
    (320, 640, 1, 1, 0, 32, 32, 1),
    (640, 640, 3, 2, 1, 32, 32, 1),
    (640, 1280, 3, 1, 1, 16, 16, 1),
    (640, 1280, 1, 1, 0, 16, 16, 1),
    (1280, 1280, 3, 2, 1, 16, 16, 1),
    (1920, 1280, 3, 1, 1, 16, 16, 1),
    (1920, 1280, 1, 1, 0, 16, 16, 1),
    (1280, 1280, 3, 1, 1, 32, 32, 1),
    (1920, 640, 3, 1, 1, 32, 32, 1),
    (1920, 640, 1, 1, 0, 32, 32, 1),
    (1280, 640, 3, 1, 1, 32, 32, 1),
    (1280, 640, 1, 1, 0, 32, 32, 1),
    (960, 640, 3, 1, 1, 32, 32, 1),
    (960, 640, 1, 1, 0, 32, 32, 1),
    (640, 640, 3, 1, 1, 64, 64, 1),
    (960, 320, 3, 1, 1, 64, 64, 1),
    (960, 320, 1, 1, 0, 64, 64, 1),
    (320, 4, 3, 1, 1, 64, 64, 1),
];

fn median_ms(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut v = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[2])
}

fn shapes() -> Vec<[usize; 8]> {
    let Some(path) = std::env::args().nth(1) else {
        return SD15_512
            .iter()
            .map(|&(a, b, c, d, e, f, g, h)| [a, b, c, d, e, f, g, h])
            .collect();
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut f = [1usize; 8];
            for (slot, v) in f.iter_mut().zip(l.split_whitespace()) {
                *slot = v
                    .parse()
                    .unwrap_or_else(|_| panic!("{path}: bad number {v:?}"));
            }
            f
        })
        .collect()
}

fn main() -> Result<()> {
    lora_diffusion::sys::tune_allocator();
    let d = Device::Cpu;
    let (mut tf, mut tb) = (0.0, 0.0);
    for [ci, co, k, s, p, h, w, n] in shapes() {
        let wt = Tensor::randn(0f32, 0.05, (co, ci, k, k), &d)?;
        let b = Tensor::zeros(co, DType::F32, &d)?;
        let params = Conv2dParams {
            stride: s,
            padding: p,
            ..Default::default()
        };
        let conv = FrozenConv2d::new(&wt, Some(&b), params)?;
        let x = Tensor::randn(0f32, 1., (1, ci, h, w), &d)?;
        let y = conv.forward(&x)?;
        let g = Tensor::randn(0f32, 1., y.shape(), &d)?;
        let form = if (k, s, p) == (1, 1, 0) {
            "1x1 gemm"
        } else if ops::winograd_conv_serves(&x, &wt, p, s, 1) {
            "winograd"
        } else if ops::shifted_conv_serves(&x, &wt, p, s, 1) {
            "shifted"
        } else {
            "im2col"
        };
        let fwd = median_ms(|| conv.forward(&x).map(|_| ()))?;
        let bwd = median_ms(|| ops::conv2d_input_grad(&g, &wt, (h, w), &params).map(|_| ()))?;
        let (_, _, ho, wo) = y.dims4()?;
        let mflop = 2.0 * (ci * co * k * k * ho * wo) as f64 / 1e6;
        println!(
            "{ci:5} -> {co:5} k{k} s{s} {h:3}x{w:<3} x{n:2} {form:9} fwd {fwd:7.2} ms {:6.1} GF/s   input grad {bwd:7.2} ms {:6.1} GF/s",
            mflop / fwd,
            mflop / bwd
        );
        tf += fwd * n as f64;
        tb += bwd * n as f64;
    }
    println!("total (count-weighted): forward {tf:.1} ms, input grad {tb:.1} ms");
    Ok(())
}
