//! Times the attention op of one SD 1.5 self-attention at 512 px ([8, 4096, 40] f32), forward
//! and forward + backward, in each form (nothing is asserted).
//!
//!     cargo run --release --example attn_probe [-- FORM]   (FORM: a prefix of a form's name)
use candle_core::{Device, Tensor, Var};
use lora_diffusion::ops::{self, Kernel};

fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    let (g, n, dh) = (8usize, 4096usize, 40usize);
    let q = Tensor::randn(0f32, 1., (g, n, dh), &d)?;
    let k = Tensor::randn(0f32, 1., (g, n, dh), &d)?;
    let v = Tensor::randn(0f32, 1., (g, n, dh), &d)?;
    let gr = Tensor::randn(0f32, 1., (g, n, dh), &d)?;
    type Form<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>;
    let forms: [(&str, Form); 3] = [
        ("fused (default)", &|q, k, v| {
            ops::attention(q, k, v, 0.158, None)
        }),
        ("tiled 64 MiB", &|q, k, v| {
            ops::attention_tiled(q, k, v, 0.158, None, 64 << 20, Kernel::Auto)
        }),
        ("tiled 16 MiB", &|q, k, v| {
            ops::attention_tiled(q, k, v, 0.158, None, 16 << 20, Kernel::Auto)
        }),
    ];
    let only = std::env::args().nth(1).unwrap_or_default();
    for (name, f) in forms.into_iter().filter(|(n, _)| n.starts_with(&only)) {
        f(&q, &k, &v)?;
        let t = std::time::Instant::now();
        for _ in 0..3 {
            f(&q, &k, &v)?;
        }
        let fwd = t.elapsed().as_secs_f64() / 3.0;
        let (qv, kv, vv) = (
            Var::from_tensor(&q)?,
            Var::from_tensor(&k)?,
            Var::from_tensor(&v)?,
        );
        let t = std::time::Instant::now();
        for _ in 0..2 {
            let y = f(qv.as_tensor(), kv.as_tensor(), vv.as_tensor())?;
            (y * &gr)?.sum_all()?.backward()?;
        }
        let fb = t.elapsed().as_secs_f64() / 2.0;
        println!(
            "{name}: forward {:.0} ms, forward + backward {:.0} ms",
            fwd * 1e3,
            fb * 1e3
        );
    }
    Ok(())
}
