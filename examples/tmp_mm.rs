use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    for (m, k, n) in [
        (320usize, 2880usize, 4096usize),
        (4096, 2880, 320),
        (320, 2880, 1024),
        (320, 2880, 512),
        (1024, 2880, 320),
    ] {
        let a = Tensor::randn(0f32, 1., (m, k), &d)?;
        let b = Tensor::randn(0f32, 1., (k, n), &d)?;
        let at = Tensor::randn(0f32, 1., (k, m), &d)?;
        a.matmul(&b)?;
        let reps = 10;
        let t = Instant::now();
        for _ in 0..reps {
            a.matmul(&b)?;
        }
        let t1 = t.elapsed().as_secs_f64() / reps as f64;
        let t = Instant::now();
        for _ in 0..reps {
            at.t()?.matmul(&b)?;
        }
        let t2 = t.elapsed().as_secs_f64() / reps as f64;
        let gf = 2.0 * (m * k * n) as f64 / 1e9;
        println!(
            "[{m},{k}]x[{k},{n}]: {:.1} ms ({:.0} GF/s); lhs transposed view {:.1} ms ({:.0} GF/s)",
            t1 * 1e3,
            gf / t1,
            t2 * 1e3,
            gf / t2
        );
    }
    Ok(())
}
