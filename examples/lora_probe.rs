//! Time of one LoRA-adapted projection (forward + backward) against the frozen linear alone,
//! on the SD 1.5 UNet's attention-projection shapes at 512 px (nothing is asserted).
//!
//!     cargo run --release --example lora_probe

use candle_core::{Device, Tensor, Var};
use lora_diffusion::ops::{frozen_linear, lora_linear};

fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    for (rows, c) in [(4096, 320), (1024, 640), (256, 1280)] {
        let x = Var::randn(0f32, 1., (1, rows, c), &d)?;
        let w = Tensor::randn(0f32, 0.05, (c, c), &d)?;
        let dn = Var::randn(0f32, 0.05, (4, c), &d)?;
        let up = Var::randn(0f32, 0.05, (c, 4), &d)?;
        let g = Tensor::randn(0f32, 1., (1, rows, c), &d)?;
        let run = |lora: bool| -> candle_core::Result<(f64, f64)> {
            let t = std::time::Instant::now();
            let y = match lora {
                true => lora_linear(x.as_tensor(), &w, None, dn.as_tensor(), up.as_tensor(), 1.0)?,
                false => frozen_linear(x.as_tensor(), &w, None)?,
            };
            let f = t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            let gs = (y * &g)?.sum_all()?.backward()?;
            let _ = gs.get(x.as_tensor()).expect("x grad");
            Ok((f, t.elapsed().as_secs_f64()))
        };
        for lora in [false, true, false, true] {
            let mut tf = 0.0;
            let mut tb = 0.0;
            for i in 0..12 {
                let (f, b) = run(lora)?;
                if i >= 2 {
                    tf += f / 10.0;
                    tb += b / 10.0;
                }
            }
            for (n, p, inc, own, calls) in lora_diffusion::ops::profile::take() {
                println!(
                    "    {n} {p:?} {:.2} ms/call (own {:.2}) {calls}",
                    inc * 1e3 / calls as f64,
                    own * 1e3 / calls as f64
                );
            }
            println!(
                "{rows}x{c} lora={lora}: fwd {:.2} ms  bwd(+mul,sum) {:.2} ms",
                tf * 1e3,
                tb * 1e3
            );
        }
    }
    Ok(())
}
