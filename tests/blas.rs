//! The optional BLAS path of the CPU products (`ops::matmul` when a system OpenBLAS loads,
//! for products of at least 2^24 multiply-adds): equal to candle's matmul on every layout
//! it takes (transposed operands, broadcast and folded batches, views with offsets), and
//! the convolutions equal with and without it. The test binary re-runs itself with
//! `LORA_BLAS` naming the library (none is loaded by default), so that the BLAS path is
//! covered wherever the system OpenBLAS is installed, and with `LORA_BLAS=off`.

mod common;

use candle_core::{DType, Device, Tensor};
use lora_diffusion::ops;
use lora_diffusion::rng::Rng;

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    common::max_abs_diff_f64(a, b) / common::max_abs_f64(b)
}

/// The library the children name (`LORA_BLAS`).
const LIBRARY: &str = "libopenblas.so.0";

/// Runs test `name` of this binary again with `LORA_BLAS=blas`, `LORA_BLAS_CHILD=out`, and
/// asserts it passed.
fn run_child(name: &str, blas: &str, out: &std::path::Path) {
    let run = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture"])
        .env("LORA_BLAS", blas)
        .env("LORA_BLAS_CHILD", out)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the LORA_BLAS={blas} run failed: {said}"
    );
    println!(
        "LORA_BLAS={blas}: {}",
        said.lines().find(|l| l.contains("BLAS")).unwrap_or("")
    );
}

#[test]
fn blas_matmul_equals_candle_on_every_layout() {
    if std::env::var_os("LORA_BLAS_CHILD").is_none() {
        let dir = tempfile::tempdir().unwrap();
        run_child(
            "blas_matmul_equals_candle_on_every_layout",
            LIBRARY,
            dir.path(),
        );
    }
    match ops::blas_name() {
        Some(name) => println!("BLAS in use: {name}"),
        None => println!(
            "no BLAS in use (LORA_BLAS={:?}): candle's matmul on both sides",
            std::env::var("LORA_BLAS").ok()
        ),
    }
    let mut rng = Rng::new(11);
    for dtype in [DType::F32, DType::F64] {
        let tol = if dtype == DType::F64 { 1e-13 } else { 2e-6 };
        let mut r = |s: &[usize]| common::randn(&mut rng, s, 1.0).to_dtype(dtype).unwrap();
        let a = r(&[256, 300]);
        let b = r(&[300, 240]);
        let bt = r(&[240, 300]);
        let a3 = r(&[3, 256, 300]);
        let b3 = r(&[3, 300, 240]);
        let a4 = r(&[2, 3, 256, 300]);
        let b4 = r(&[2, 3, 300, 240]);
        let wide = r(&[300, 360]);
        let cases: Vec<(&str, Tensor, Tensor)> = vec![
            ("plain", a.clone(), b.clone()),
            ("b transposed", a.clone(), bt.t().unwrap()),
            (
                "a transposed",
                a.t().unwrap().contiguous().unwrap().t().unwrap(),
                b.clone(),
            ),
            ("batched", a3.clone(), b3.clone()),
            (
                "broadcast lhs",
                a.unsqueeze(0).unwrap().broadcast_as((3, 256, 300)).unwrap(),
                b3.clone(),
            ),
            ("folded 4d", a4.clone(), b4.clone()),
            (
                "row view",
                wide.narrow(0, 3, 256).unwrap().narrow(1, 7, 300).unwrap(),
                b.clone(),
            ),
            ("column", a.clone(), b.narrow(1, 4, 1).unwrap()),
        ];
        for (name, x, y) in cases {
            let got = ops::matmul(&x, &y).unwrap();
            let want = x
                .contiguous()
                .unwrap()
                .matmul(&y.contiguous().unwrap())
                .unwrap();
            assert_eq!(got.dims(), want.dims(), "{name}");
            let e = rel(&got, &want);
            assert!(e <= tol, "{name} {dtype:?}: {e:e}");
        }
    }
}

#[test]
fn convolutions_agree_with_and_without_the_blas() {
    // SD-like shapes on both conv paths: the shifted form (64×64, forward and input
    // gradient) and im2col (stride 2).
    let mut rng = Rng::new(3);
    let x = common::randn(&mut rng, &[1, 64, 64, 64], 1.0);
    let w = common::randn(&mut rng, &[64, 64, 3, 3], 0.05);
    let g = common::randn(&mut rng, &[1, 64, 64, 64], 1.0);
    let params = ops::Conv2dParams {
        stride: 1,
        padding: 1,
        dilation: 1,
        groups: 1,
    };
    let results = vec![
        (
            "y".to_string(),
            ops::frozen_conv2d(&x, &w, None, 1, 1, 1, 1).unwrap(),
        ),
        (
            "y2".to_string(),
            ops::frozen_conv2d(&x, &w, None, 2, 1, 1, 1).unwrap(),
        ),
        (
            "dx".to_string(),
            ops::conv2d_input_grad(&g, &w, (64, 64), &params).unwrap(),
        ),
    ];
    if let Ok(to) = std::env::var("LORA_BLAS_CHILD") {
        println!("BLAS in use: {:?}", ops::blas_name());
        candle_core::safetensors::save(&results.into_iter().collect(), to).unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let load = |blas: &str| {
        let out = dir.path().join(format!("conv-{blas}.safetensors"));
        run_child("convolutions_agree_with_and_without_the_blas", blas, &out);
        candle_core::safetensors::load(&out, &Device::Cpu).unwrap()
    };
    let (with, without) = (load("openblas"), load("off"));
    for (name, t) in &results {
        let e = rel(&with[name], &without[name]);
        assert!(e <= 2e-6, "{name} with vs without the BLAS: {e:e}");
        let e = rel(t, &without[name]);
        assert!(
            e <= 2e-6,
            "{name} default choice vs without the BLAS: {e:e}"
        );
    }
    assert!(rel(&results[0].1, &x.conv2d(&w, 1, 1, 1, 1).unwrap()) <= 2e-6);
    assert!(rel(&results[1].1, &x.conv2d(&w, 1, 2, 1, 1).unwrap()) <= 2e-6);
    let dx_ref = g.conv_transpose2d(&w, 1, 0, 1, 1).unwrap();
    assert!(rel(&results[2].1, &dx_ref) <= 2e-6);
}
