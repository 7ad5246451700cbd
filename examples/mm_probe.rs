//! GFLOP/s of candle's CPU matmul (the `gemm` crate) on the SD 1.5 UNet's product shapes at
//! 256 / 512 px: conv im2col products, projections, attention scores (nothing is asserted;
//! compare with `torch.matmul` on the same shapes).
//!
//!     cargo run --release --example mm_probe

use candle_core::{Device, Tensor};
fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    let shapes = [
        (320, 2880, 1024),
        (1024, 320, 320),
        (1024, 320, 1280),
        (4096, 320, 320),
        (320, 2880, 4096),
        (4096, 40, 4096),
        (4096, 4096, 40),
        (1024, 1280, 320),
    ];
    for (m, k, n) in shapes {
        let a = Tensor::randn(0f32, 1., (m, k), &d)?;
        let b = Tensor::randn(0f32, 1., (k, n), &d)?;
        for _ in 0..3 {
            a.matmul(&b)?;
        }
        let t = std::time::Instant::now();
        let r = 10;
        for _ in 0..r {
            a.matmul(&b)?;
        }
        let dt = t.elapsed().as_secs_f64() / r as f64;
        println!(
            "{m}x{k}x{n}: {:.2} ms {:.1} GFLOP/s",
            dt * 1e3,
            2.0 * (m * k * n) as f64 / dt / 1e9
        );
    }
    Ok(())
}
