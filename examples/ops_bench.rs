//! Timing of the training ops against candle's stock differentiable ops (fp32, CPU).
//!
//!     cargo run --release --example ops_bench [softmax|attention|tiled|conv|linear|norms|elementwise|fused]
//!
//! Each figure is the median of 7 runs after 2 warm-ups; "fwd+bwd" is the forward plus
//! `backward()` of `sum(y * g)` with the input as a `Var`. Nothing here is asserted.
//!
//! glibc serves allocations of 32 MB and more with a fresh `mmap` each time, so every such
//! tensor pays its page faults again; much of the allocation-heavy figures is that cost.
//! Compare with `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295`.

use candle_core::{Device, Result, Tensor, Var, D};
use lora_diffusion::ops::{self, Conv2dParams, FrozenConv2d, Kernel};
use std::time::Instant;

fn median_ms(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    let mut v = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[3])
}

fn row(name: &str, ms: f64) {
    println!("{name:58} {ms:9.2} ms");
}

/// Forward + backward of `sum(f(x) * g)` with `x` a Var.
fn fwd_bwd(x: &Tensor, g: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<f64> {
    let xv = Var::from_tensor(x)?;
    median_ms(|| {
        let y = f(xv.as_tensor())?;
        (y * g)?.sum_all()?.backward()?;
        Ok(())
    })
}

fn randn(shape: &[usize], std: f64) -> Result<Tensor> {
    Tensor::randn(0f32, std as f32, shape, &Device::Cpu)
}

fn softmax() -> Result<()> {
    println!("-- softmax over the last dim, [1, 8, 1024, 1024]");
    let x = randn(&[1, 8, 1024, 1024], 1.0)?;
    let g = randn(&[1, 8, 1024, 1024], 1.0)?;
    row(
        "candle softmax_last_dim fwd (no backward)",
        median_ms(|| candle_nn::ops::softmax_last_dim(&x).map(|_| ()))?,
    );
    row(
        "ops::softmax_last_dim fwd",
        median_ms(|| ops::softmax_last_dim(&x).map(|_| ()))?,
    );
    row(
        "stock candle_nn::ops::softmax fwd+bwd",
        fwd_bwd(&x, &g, |x| candle_nn::ops::softmax(x, D::Minus1))?,
    );
    row(
        "ops::softmax_last_dim fwd+bwd (Auto)",
        fwd_bwd(&x, &g, ops::softmax_last_dim)?,
    );
    row(
        "ops::softmax_last_dim fwd+bwd (Generic)",
        fwd_bwd(&x, &g, |x| ops::softmax_last_dim_with(x, Kernel::Generic))?,
    );
    Ok(())
}

fn attention() -> Result<()> {
    println!("-- self-attention q, k, v [1, 8, 1024, 40] (all three Vars), fwd+bwd");
    let (q, k, v) = (
        Var::from_tensor(&randn(&[1, 8, 1024, 40], 1.0)?)?,
        Var::from_tensor(&randn(&[1, 8, 1024, 40], 1.0)?)?,
        Var::from_tensor(&randn(&[1, 8, 1024, 40], 1.0)?)?,
    );
    let g = randn(&[1, 8, 1024, 40], 1.0)?;
    let scale = 40f64.powf(-0.5);
    let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>| {
        median_ms(|| {
            let y = f(q.as_tensor(), k.as_tensor(), v.as_tensor())?;
            (y * &g)?.sum_all()?.backward().map(|_| ())
        })
    };
    row(
        "stock: matmul, scale, candle_nn::ops::softmax, matmul",
        run(&|q, k, v| {
            candle_nn::ops::softmax(&(q.matmul(&k.t()?)? * scale)?, D::Minus1)?.matmul(v)
        })?,
    );
    row(
        "matmul, scale, ops::softmax_last_dim, matmul",
        run(&|q, k, v| ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?.matmul(v))?,
    );
    row(
        "ops::attention (scale folded into the softmax)",
        run(&|q, k, v| ops::attention(q, k, v, scale, None))?,
    );
    Ok(())
}

/// Materialised against tiled attention at the SD 1.5 512-px sizes: the 4096-token
/// self-attention of the 64×64 level and its cross-attention to 77 tokens.
fn tiled() -> Result<()> {
    let scale = 40f64.powf(-0.5);
    for (name, nk) in [("self-attention", 4096), ("cross-attention", 77)] {
        let q = randn(&[1, 8, 4096, 40], 1.0)?;
        let k = randn(&[1, 8, nk, 40], 1.0)?;
        let v = randn(&[1, 8, nk, 40], 1.0)?;
        let g = randn(&[1, 8, 4096, 40], 1.0)?;
        let p_bytes = 8 * 4096 * nk * 4;
        // The default budget where it tiles, else one eighth of P (8 tiles) to time the tiles.
        let budget = match p_bytes > ops::ATTENTION_TILE_BYTES {
            true => ops::ATTENTION_TILE_BYTES,
            false => p_bytes / 8,
        };
        println!(
            "-- {name} [1, 8, 4096, 40] x [1, 8, {nk}, 40]: P {:.0} MiB, tiles of {:.0} MiB",
            p_bytes as f64 / 1048576.0,
            budget as f64 / 1048576.0
        );
        let (qv, kv, vv) = (
            Var::from_tensor(&q)?,
            Var::from_tensor(&k)?,
            Var::from_tensor(&v)?,
        );
        type F<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;
        let forms: [(&str, F); 2] = [
            ("materialised", &|q, k, v| {
                ops::attention_materialised(q, k, v, scale, None, Kernel::Auto)
            }),
            ("tiled", &|q, k, v| {
                ops::attention_tiled(q, k, v, scale, None, budget, Kernel::Auto)
            }),
        ];
        for (form, f) in forms {
            row(
                &format!("{form} fwd"),
                median_ms(|| f(&q, &k, &v).map(|_| ()))?,
            );
            row(
                &format!("{form} fwd+bwd (q, k, v Vars)"),
                median_ms(|| {
                    let y = f(qv.as_tensor(), kv.as_tensor(), vv.as_tensor())?;
                    (y * &g)?.sum_all()?.backward().map(|_| ())
                })?,
            );
        }
    }
    Ok(())
}

fn conv() -> Result<()> {
    println!("-- conv 3x3, 320 -> 320 channels, 32x32, frozen weight");
    let x = randn(&[1, 320, 32, 32], 1.0)?;
    let w = randn(&[320, 320, 3, 3], 0.02)?;
    let b = randn(&[320], 0.1)?;
    let g = randn(&[1, 320, 32, 32], 1.0)?;
    let b4 = b.reshape((1, 320, 1, 1))?;
    row(
        "conv2d fwd",
        median_ms(|| x.conv2d(&w, 1, 1, 1, 1).map(|_| ()))?,
    );
    row(
        "stock conv2d fwd+bwd (x Var; candle also builds dW)",
        fwd_bwd(&x, &g, |x| x.conv2d(&w, 1, 1, 1, 1)?.broadcast_add(&b4))?,
    );
    row(
        "ops::frozen_conv2d fwd+bwd (kernel rearranged per call)",
        fwd_bwd(&x, &g, |x| ops::frozen_conv2d(x, &w, Some(&b), 1, 1, 1, 1))?,
    );
    let p = Conv2dParams {
        stride: 1,
        padding: 1,
        dilation: 1,
        groups: 1,
    };
    let layer = FrozenConv2d::new(&w, Some(&b), p)?;
    row(
        "FrozenConv2d fwd+bwd (kernel cached)",
        fwd_bwd(&x, &g, |x| layer.forward(x))?,
    );
    row(
        "  input grad: conv_transpose2d (candle's stock path)",
        median_ms(|| g.conv_transpose2d(&w, 1, 0, 1, 1).map(|_| ()))?,
    );
    row(
        "  input grad: conv2d_input_grad (flipped conv2d, incl. kernel prep)",
        median_ms(|| ops::conv2d_input_grad(&g, &w, (32, 32), &p).map(|_| ()))?,
    );

    println!("-- conv 3x3 stride 2, 320 channels, 32x32 -> 16x16 (SD downsampler)");
    let g2 = randn(&[1, 320, 16, 16], 1.0)?;
    let p2 = Conv2dParams { stride: 2, ..p };
    row(
        "  input grad: conv_transpose2d, out_padding 1 (what ops uses)",
        median_ms(|| g2.conv_transpose2d(&w, 1, 1, 2, 1).map(|_| ()))?,
    );
    row(
        "  input grad: zero-dilated gradient + flipped conv2d",
        median_ms(|| ops::conv2d_input_grad_flipped(&g2, &w, (32, 32), &p2).map(|_| ()))?,
    );
    let x2 = Var::from_tensor(&x)?;
    row(
        "stock stride-2 conv fwd+bwd (x Var)",
        median_ms(|| {
            let y = x2.as_tensor().conv2d(&w, 1, 2, 1, 1)?.broadcast_add(&b4)?;
            (y * &g2)?.sum_all()?.backward().map(|_| ())
        })?,
    );
    let layer2 = FrozenConv2d::new(&w, Some(&b), p2)?;
    row(
        "FrozenConv2d stride-2 fwd+bwd",
        fwd_bwd(&x, &g2, |x| layer2.forward(x))?,
    );
    let a = g2.conv_transpose2d(&w, 1, 1, 2, 1)?;
    let c = ops::conv2d_input_grad_flipped(&g2, &w, (32, 32), &p2)?;
    println!(
        "  (max abs diff between the two: {:.2e})",
        (a - c)?.abs()?.max_all()?.to_scalar::<f32>()?
    );
    Ok(())
}

fn linear() -> Result<()> {
    println!("-- linear 320 -> 1280 on [1, 1024, 320], frozen weight");
    let x = randn(&[1, 1024, 320], 1.0)?;
    let w = randn(&[1280, 320], 0.05)?;
    let b = randn(&[1280], 0.1)?;
    let g = randn(&[1, 1024, 1280], 1.0)?;
    let lin = candle_nn::Linear::new(w.clone(), Some(b.clone()));
    row(
        "stock candle_nn::Linear fwd+bwd (x Var)",
        fwd_bwd(&x, &g, |x| candle_nn::Module::forward(&lin, x))?,
    );
    row(
        "ops::frozen_linear fwd+bwd",
        fwd_bwd(&x, &g, |x| ops::frozen_linear(x, &w, Some(&b)))?,
    );
    Ok(())
}

fn norms() -> Result<()> {
    println!("-- layer norm [2, 1024, 320] (x, weight, bias all Vars)");
    let x = randn(&[2, 1024, 320], 1.0)?;
    let g = randn(&[2, 1024, 320], 1.0)?;
    let (w, b) = (
        Var::from_tensor(&randn(&[320], 1.0)?)?,
        Var::from_tensor(&randn(&[320], 1.0)?)?,
    );
    let (wt, bt) = (w.as_tensor().clone(), b.as_tensor().clone());
    row(
        "candle_nn::ops::layer_norm fwd (fused, no backward)",
        median_ms(|| candle_nn::ops::layer_norm(&x, &wt, &bt, 1e-5).map(|_| ()))?,
    );
    row(
        "stock composed layer norm (layer_norm_slow) fwd+bwd",
        fwd_bwd(&x, &g, |x| {
            candle_nn::ops::layer_norm_slow(x, &wt, &bt, 1e-5)
        })?,
    );
    row(
        "ops::layer_norm fwd+bwd (Auto)",
        fwd_bwd(&x, &g, |x| ops::layer_norm(x, &wt, &bt, 1e-5))?,
    );
    row(
        "ops::layer_norm fwd+bwd (Generic)",
        fwd_bwd(&x, &g, |x| {
            ops::layer_norm_with(x, &wt, &bt, 1e-5, Kernel::Generic)
        })?,
    );

    println!("-- group norm 32 groups, [1, 320, 64, 64]");
    let x = randn(&[1, 320, 64, 64], 1.0)?;
    let g = randn(&[1, 320, 64, 64], 1.0)?;
    let (w, b) = (
        Var::from_tensor(&randn(&[320], 1.0)?)?,
        Var::from_tensor(&randn(&[320], 1.0)?)?,
    );
    let gn =
        candle_nn::GroupNorm::new(w.as_tensor().clone(), b.as_tensor().clone(), 320, 32, 1e-5)?;
    let (wt, bt) = (w.as_tensor().clone(), b.as_tensor().clone());
    row(
        "stock candle_nn::GroupNorm fwd+bwd",
        fwd_bwd(&x, &g, |x| candle_nn::Module::forward(&gn, x))?,
    );
    row(
        "ops::group_norm fwd+bwd (Auto)",
        fwd_bwd(&x, &g, |x| ops::group_norm(x, 32, &wt, &bt, 1e-5))?,
    );
    row(
        "ops::group_norm fwd+bwd (Generic)",
        fwd_bwd(&x, &g, |x| {
            ops::group_norm_with(x, 32, &wt, &bt, 1e-5, Kernel::Generic)
        })?,
    );
    Ok(())
}

fn elementwise() -> Result<()> {
    println!("-- activations on [1, 1024, 1280] and upsampling [1, 1280, 16, 16] -> 32x32");
    let x = randn(&[1, 1024, 1280], 1.0)?;
    let g = randn(&[1, 1024, 1280], 1.0)?;
    row("stock silu fwd+bwd", fwd_bwd(&x, &g, |x| x.silu())?);
    row("ops::silu fwd+bwd", fwd_bwd(&x, &g, ops::silu)?);
    row("stock gelu_erf fwd+bwd", fwd_bwd(&x, &g, |x| x.gelu_erf())?);
    row("ops::gelu_erf fwd+bwd", fwd_bwd(&x, &g, ops::gelu_erf)?);
    let x = randn(&[1, 1280, 16, 16], 1.0)?;
    let g = randn(&[1, 1280, 32, 32], 1.0)?;
    row(
        "stock upsample_nearest2d fwd+bwd",
        fwd_bwd(&x, &g, |x| x.upsample_nearest2d(32, 32))?,
    );
    row(
        "ops::upsample_nearest2d fwd+bwd",
        fwd_bwd(&x, &g, |x| ops::upsample_nearest2d(x, 32, 32))?,
    );
    Ok(())
}

/// Fused ops against their unfused composition, timed alternately (15 runs each after 2
/// warm-ups, medians), so a busy machine slows both alike.
fn fused() -> Result<()> {
    type Op<'a> = &'a dyn Fn(&Tensor) -> Result<Tensor>;
    let ab = |name: &str, x: &Tensor, g: &Tensor, fs: [Op; 2]| {
        let xv = Var::from_tensor(x)?;
        let run = |f: Op| -> Result<f64> {
            let t = Instant::now();
            (f(xv.as_tensor())? * g)?.sum_all()?.backward()?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        };
        let mut v = [Vec::new(), Vec::new()];
        for i in 0..17 {
            for (k, f) in fs.iter().enumerate() {
                let ms = run(*f)?;
                if i >= 2 {
                    v[k].push(ms);
                }
            }
        }
        for (k, label) in ["unfused", "fused"].iter().enumerate() {
            v[k].sort_by(|a, b| a.total_cmp(b));
            row(&format!("{name} {label} fwd+bwd"), v[k][v[k].len() / 2]);
        }
        Ok::<(), candle_core::Error>(())
    };
    for hw in [32, 64] {
        println!("-- group norm 32 -> SiLU -> conv 3x3 320 -> 320 + skip, [1, 320, {hw}, {hw}]");
        let x = randn(&[1, 320, hw, hw], 1.0)?;
        let skip = randn(&[1, 320, hw, hw], 1.0)?;
        let (nw, nb) = (randn(&[320], 1.0)?, randn(&[320], 1.0)?);
        let kw = randn(&[320, 320, 3, 3], 0.02)?;
        let kb = randn(&[320], 0.1)?;
        let params = Conv2dParams {
            padding: 1,
            ..Default::default()
        };
        let conv = FrozenConv2d::new(&kw, Some(&kb), params)?;
        let norm = ops::GroupNormSpec {
            weight: &nw,
            bias: &nb,
            groups: 32,
            eps: 1e-5,
        };
        let unfused = |x: &Tensor| {
            let a = ops::silu(&ops::group_norm(x, 32, &nw, &nb, 1e-5)?)?;
            &skip + conv.forward(&a)?
        };
        let fused = |x: &Tensor| {
            let adds = ops::ConvOutputAdds {
                channels: None,
                skip: Some(&skip),
            };
            ops::group_norm_silu_conv2d(x, &norm, &conv, adds)
        };
        ab("norm-silu-conv", &x, &skip, [&unfused, &fused])?;
    }
    for n in [1024, 4096] {
        println!("-- GEGLU [1, {n}, 2560] -> Linear 1280 -> 320");
        let h = randn(&[1, n, 2560], 1.0)?;
        let g = randn(&[1, n, 320], 1.0)?;
        let (w, b) = (randn(&[320, 1280], 0.02)?, randn(&[320], 0.1)?);
        let unfused = |h: &Tensor| {
            let hidden = h.narrow(D::Minus1, 0, 1280)?;
            let gate = h.narrow(D::Minus1, 1280, 1280)?;
            ops::frozen_linear(&(hidden * ops::gelu_erf(&gate)?)?, &w, Some(&b))
        };
        let fused = |h: &Tensor| ops::geglu_linear(h, &w, Some(&b));
        ab("geglu-linear", &h, &g, [&unfused, &fused])?;
    }
    Ok(())
}

fn main() -> Result<()> {
    // Optional filter: `ops_bench softmax conv` runs only those sections.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let on = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    println!("threads: {}", candle_core::utils::get_num_threads());
    // Warm-up: the first few hundred ms of large allocations run measurably slower.
    let w = randn(&[320, 320, 3, 3], 0.02)?;
    let x = randn(&[1, 320, 32, 32], 1.0)?;
    fwd_bwd(&x, &x, |x| x.conv2d(&w, 1, 1, 1, 1))?;
    type Section = (&'static str, fn() -> Result<()>);
    let sections: [Section; 8] = [
        ("softmax", softmax),
        ("attention", attention),
        ("tiled", tiled),
        ("conv", conv),
        ("linear", linear),
        ("norms", norms),
        ("elementwise", elementwise),
        ("fused", fused),
    ];
    for (name, f) in sections {
        if on(name) {
            f()?;
        }
    }
    Ok(())
}
