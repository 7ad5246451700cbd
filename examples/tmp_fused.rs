use candle_core::{Device, Tensor, Var};
use lora_diffusion::ops;
fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    let (g, n, dh) = (8usize, 4096usize, 40usize);
    let q = Var::from_tensor(&Tensor::randn(0f32, 1., (g, n, dh), &d)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1., (g, n, dh), &d)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1., (g, n, dh), &d)?)?;
    let gr = Tensor::randn(0f32, 1., (g, n, dh), &d)?;
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let t = std::time::Instant::now();
    for _ in 0..reps {
        ops::attention(
            &q.as_tensor().detach(),
            &k.as_tensor().detach(),
            &v.as_tensor().detach(),
            0.158,
            None,
        )?;
    }
    let f = t.elapsed().as_secs_f64() / reps as f64;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        let y = ops::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.158, None)?;
        (y * &gr)?.sum_all()?.backward()?;
    }
    let fb = t.elapsed().as_secs_f64() / reps as f64;
    println!("fwd {:.0} ms  fwd+bwd {:.0} ms", f * 1e3, fb * 1e3);
    Ok(())
}
