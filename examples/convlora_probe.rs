use candle_core::{Device, Tensor, Var};
fn t(label: &str, f: impl Fn() -> candle_core::Result<()>) -> candle_core::Result<()> {
    f()?;
    let s = std::time::Instant::now();
    for _ in 0..5 {
        f()?;
    }
    println!("{label}: {:.2} ms", s.elapsed().as_secs_f64() * 200.0);
    Ok(())
}
fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    let (c, h) = (320usize, 32usize);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (1, c, h, h), &d)?)?;
    let dn = Var::from_tensor(&Tensor::randn(0f32, 0.1, (4, c, 3, 3), &d)?)?;
    let up = Var::from_tensor(&Tensor::randn(0f32, 0.1, (c, 4, 1, 1), &d)?)?;
    let g = Tensor::randn(0f32, 1., (1, c, h, h), &d)?;
    t("down fwd", || {
        x.as_tensor().conv2d(dn.as_tensor(), 1, 1, 1, 1)?;
        Ok(())
    })?;
    t("down fwd+bwd", || {
        let y = x.as_tensor().conv2d(dn.as_tensor(), 1, 1, 1, 1)?;
        let gg = Tensor::randn(0f32, 1., y.dims(), &d)?;
        (y * gg)?.sum_all()?.backward()?;
        Ok(())
    })?;
    t("up fwd+bwd", || {
        let hh = Var::from_tensor(&Tensor::randn(0f32, 1., (1, 4, h, h), &d)?)?;
        let y = hh.as_tensor().conv2d(up.as_tensor(), 0, 1, 1, 1)?;
        (y * &g)?.sum_all()?.backward()?;
        Ok(())
    })?;
    let gr = Tensor::randn(0f32, 1., (1, 4, h, h), &d)?;
    t("conv_transpose2d (dx of down)", || {
        gr.conv_transpose2d(dn.as_tensor(), 1, 0, 1, 1)?;
        Ok(())
    })?;
    Ok(())
}
