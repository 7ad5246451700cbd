//! Times a conv LoRA's factors at the SD block's size (320 channels, 32×32, rank 4), forward
//! and backward, on candle's conv2d and on `ops::trainable_conv2d` (nothing is asserted).
//!
//!     cargo run --release --example convlora_probe
use candle_core::{Device, Tensor, Var};
use lora_diffusion::ops;

type Conv<'a> = &'a dyn Fn(&Tensor, &Tensor, usize) -> candle_core::Result<Tensor>;

fn ms(f: &dyn Fn() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    f()?;
    let t = std::time::Instant::now();
    for _ in 0..5 {
        f()?;
    }
    Ok(t.elapsed().as_secs_f64() * 200.0)
}

fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    let (c, hw, r) = (320usize, 32usize, 4usize);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (1, c, hw, hw), &d)?)?;
    let h = Var::from_tensor(&Tensor::randn(0f32, 1., (1, r, hw, hw), &d)?)?;
    let down = Var::from_tensor(&Tensor::randn(0f32, 0.1, (r, c, 3, 3), &d)?)?;
    let up = Var::from_tensor(&Tensor::randn(0f32, 0.1, (c, r, 1, 1), &d)?)?;
    let forms: [(&str, Conv); 2] = [
        ("candle conv2d", &|x, k, p| x.conv2d(k, p, 1, 1, 1)),
        ("trainable_conv2d", &|x, k, p| {
            ops::trainable_conv2d(x, k, p, 1)
        }),
    ];
    for (name, conv) in forms {
        let step = |x: &Var, k: &Var, p: usize| -> candle_core::Result<()> {
            let y = conv(x.as_tensor(), k.as_tensor(), p)?;
            let g = Tensor::ones(y.dims(), y.dtype(), &d)?;
            (y * g)?.sum_all()?.backward()?;
            Ok(())
        };
        let fwd = ms(&|| conv(x.as_tensor(), down.as_tensor(), 1).map(|_| ()))?;
        let dn = ms(&|| step(&x, &down, 1))?;
        let u = ms(&|| step(&h, &up, 0))?;
        println!("{name}: down 3x3 forward {fwd:.2} ms, forward+backward {dn:.2} ms; up 1x1 forward+backward {u:.2} ms");
    }
    Ok(())
}
