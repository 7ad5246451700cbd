//! The tiled (memory-efficient) attention of `lora_diffusion::ops` against the materialised
//! form: forward within 1e-5 relative and input gradients (f32 and f64, with and without
//! masks, Nq ≠ Nk, batches, both kernels), central finite differences in f64, gradients of
//! partly tracked inputs, the dispatch of `ops::attention`, and the memory property on one
//! SD-1.5 transformer block at a 64×64 latent. PyTorch parity of the tiled form is in
//! `tests/ops.rs` (fixture cases with a `tile_bytes`).

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{max_abs_diff_f64, max_abs_f64};
use lora_diffusion::lora::{inject_trainable, Component, LoraTargets};
use lora_diffusion::models::blocks::{Transformer2DConfig, Transformer2DModel};
use lora_diffusion::models::weights::ModelWeights;
use lora_diffusion::ops::{self, Kernel};
use lora_diffusion::rng::Rng;

/// One attention problem: inputs, an upstream gradient and an optional mask.
struct Problem {
    name: &'static str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    mask: Option<Tensor>,
    scale: f64,
}

/// `[.., n, n]` causal additive mask (-1e9 above the diagonal).
fn causal(n: usize) -> Tensor {
    let v: Vec<f32> = (0..n * n)
        .map(|i| if i % n > i / n { -1e9 } else { 0.0 })
        .collect();
    Tensor::from_vec(v, (n, n), &Device::Cpu).unwrap()
}

fn problems(dtype: DType) -> Vec<Problem> {
    let mut rng = Rng::new(7);
    let mut r = |s: &[usize]| common::randn(&mut rng, s, 1.0).to_dtype(dtype).unwrap();
    let mut out = vec![];
    // Self-attention, [batch, heads, tokens, d], no mask.
    let (q, k, v, g) = (
        r(&[2, 3, 13, 8]),
        r(&[2, 3, 13, 8]),
        r(&[2, 3, 13, 8]),
        r(&[2, 3, 13, 8]),
    );
    out.push(Problem {
        name: "self",
        q,
        k,
        v,
        g,
        mask: None,
        scale: 8f64.powf(-0.5),
    });
    // Cross-attention Nq ≠ Nk, dv ≠ d, 3-D [batch·heads, tokens, d] as the UNet calls it.
    let (q, k, v, g) = (
        r(&[4, 17, 6]),
        r(&[4, 5, 6]),
        r(&[4, 5, 10]),
        r(&[4, 17, 10]),
    );
    out.push(Problem {
        name: "cross",
        q,
        k,
        v,
        g,
        mask: None,
        scale: 0.4,
    });
    // Causal self-attention as in the CLIP text encoder: [batch, heads, L, d], mask [L, L].
    let (q, k, v, g) = (
        r(&[2, 2, 11, 4]),
        r(&[2, 2, 11, 4]),
        r(&[2, 2, 11, 4]),
        r(&[2, 2, 11, 4]),
    );
    let mask = Some(causal(11).to_dtype(dtype).unwrap());
    out.push(Problem {
        name: "causal",
        q,
        k,
        v,
        g,
        mask,
        scale: 0.5,
    });
    // A per-batch key mask [B, 1, 1, Nk] broadcast over heads and queries, Nq ≠ Nk.
    let (q, k, v, g) = (
        r(&[2, 2, 9, 4]),
        r(&[2, 2, 6, 4]),
        r(&[2, 2, 6, 3]),
        r(&[2, 2, 9, 3]),
    );
    let m: Vec<f32> = (0..12)
        .map(|i| {
            if i % 6 == 5 || i == 2 {
                -1e9
            } else {
                0.1 * i as f32
            }
        })
        .collect();
    let mask = Some(
        Tensor::from_vec(m, (2, 1, 1, 6), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    );
    out.push(Problem {
        name: "key-mask",
        q,
        k,
        v,
        g,
        mask,
        scale: 0.5,
    });
    out
}

/// Row bytes of a problem's scores (`G · Nk · elem`): budgets are multiples of it.
fn row_bytes(p: &Problem) -> usize {
    let d = p.q.dims();
    let groups: usize = d[..d.len() - 2].iter().product();
    groups * p.k.dim(p.k.rank() - 2).unwrap() * p.q.dtype().size_in_bytes()
}

type Attn<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>;

/// Output and the gradients of q, k, v for `sum(y * g)`.
fn run(p: &Problem, f: Attn) -> (Tensor, [Tensor; 3]) {
    let vars = [&p.q, &p.k, &p.v].map(|t| Var::from_tensor(t).unwrap());
    let y = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        p.mask.as_ref(),
    )
    .unwrap();
    let grads = (&y * &p.g).unwrap().sum_all().unwrap().backward().unwrap();
    (
        y,
        vars.map(|v| grads.get(v.as_tensor()).expect("gradient").clone()),
    )
}

/// `max |a − b| / max(|b|, 1e-3)`.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    max_abs_diff_f64(a, b) / max_abs_f64(b).max(1e-3)
}

#[test]
fn tiled_equals_materialised_forward_and_gradients() {
    for dtype in [DType::F32, DType::F64] {
        for p in problems(dtype) {
            for kernel in [Kernel::Auto, Kernel::Generic] {
                let (y0, g0) = run(&p, &|q, k, v, m| {
                    ops::attention_with(q, k, v, p.scale, m, kernel)
                });
                // Tiles of 1, 2 and 5 query rows, and one tile holding everything.
                for rows in [1, 2, 5, 1000] {
                    let budget = rows * row_bytes(&p);
                    let (y, g) = run(&p, &|q, k, v, m| {
                        ops::attention_tiled(q, k, v, p.scale, m, budget, kernel)
                    });
                    assert_eq!(y.dims(), y0.dims());
                    let mut errs = vec![rel(&y, &y0)];
                    errs.extend(g.iter().zip(&g0).map(|(a, b)| rel(a, b)));
                    let shown: Vec<String> = errs.iter().map(|e| format!("{e:.1e}")).collect();
                    eprintln!(
                        "{} {dtype:?} {kernel:?} {rows} rows: rel diff y, dq, dk, dv {shown:?}",
                        p.name
                    );
                    assert!(
                        errs.iter().all(|&e| e <= 1e-5),
                        "{} {dtype:?} {kernel:?} {rows}: {errs:?}",
                        p.name
                    );
                }
            }
        }
    }
}

#[test]
fn tiled_gradients_match_finite_differences_f64() {
    let h = 1e-5;
    for p in problems(DType::F64) {
        let budget = 2 * row_bytes(&p);
        let f = |q: &Tensor, k: &Tensor, v: &Tensor| {
            ops::attention_tiled(q, k, v, p.scale, p.mask.as_ref(), budget, Kernel::Auto)
        };
        let (_, analytic) = run(&p, &|q, k, v, _| f(q, k, v));
        let loss = |ins: &[Tensor; 3]| -> f64 {
            let y = f(&ins[0], &ins[1], &ins[2]).unwrap();
            (y * &p.g)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let base = [p.q.clone(), p.k.clone(), p.v.clone()];
        for (i, name) in ["q", "k", "v"].iter().enumerate() {
            let vals = base[i].flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let a = analytic[i].flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let mut err = 0f64;
            // Every 3rd element keeps the test fast while touching every tile and head.
            for j in (0..vals.len()).step_by(3) {
                let eval = |delta: f64| {
                    let mut v = vals.clone();
                    v[j] += delta;
                    let mut ins = base.clone();
                    ins[i] = Tensor::from_vec(v, base[i].shape(), &Device::Cpu).unwrap();
                    loss(&ins)
                };
                let numeric = (eval(h) - eval(-h)) / (2.0 * h);
                err = err.max((numeric - a[j]).abs());
            }
            let scale = a.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-3);
            eprintln!(
                "finite-diff {} d/d{name}: relative {:.2e}",
                p.name,
                err / scale
            );
            assert!(
                err / scale < 1e-6,
                "{} d/d{name}: {err:e} / {scale:e}",
                p.name
            );
        }
    }
}

#[test]
fn only_tracked_inputs_get_gradients() {
    let p = problems(DType::F32).remove(2);
    let budget = 3 * row_bytes(&p);
    let (_, reference) = run(&p, &|q, k, v, m| {
        ops::attention_with(q, k, v, p.scale, m, Kernel::Auto)
    });
    for tracked in 0..3 {
        let var = Var::from_tensor([&p.q, &p.k, &p.v][tracked]).unwrap();
        let mut ins = [p.q.clone(), p.k.clone(), p.v.clone()];
        ins[tracked] = var.as_tensor().clone();
        let y = ops::attention_tiled(
            &ins[0],
            &ins[1],
            &ins[2],
            p.scale,
            p.mask.as_ref(),
            budget,
            Kernel::Auto,
        )
        .unwrap();
        let grads = (&y * &p.g).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, t) in ins.iter().enumerate() {
            assert_eq!(
                grads.get(t).is_some(),
                i == tracked,
                "input {i} with {tracked} tracked"
            );
        }
        let d = rel(grads.get(var.as_tensor()).unwrap(), &reference[tracked]);
        assert!(d <= 1e-5, "input {tracked}: {d:e}");
    }
    // Nothing tracked (inference): the same values, no graph.
    let y = ops::attention_tiled(
        &p.q,
        &p.k,
        &p.v,
        p.scale,
        p.mask.as_ref(),
        budget,
        Kernel::Auto,
    )
    .unwrap();
    let y0 = ops::attention(&p.q, &p.k, &p.v, p.scale, p.mask.as_ref()).unwrap();
    assert!(!y.track_op() && rel(&y, &y0) <= 1e-6);
}

#[test]
fn half_inputs_come_back_in_their_dtype() {
    let p = problems(DType::F32).remove(0);
    for dtype in [DType::F16, DType::BF16] {
        let [q, k, v] = [&p.q, &p.k, &p.v].map(|t| t.to_dtype(dtype).unwrap());
        let y =
            ops::attention_tiled(&q, &k, &v, p.scale, None, row_bytes(&p), Kernel::Auto).unwrap();
        let y0 = ops::attention(&q, &k, &v, p.scale, None).unwrap();
        assert_eq!(y.dtype(), dtype);
        assert!(max_abs_diff_f64(&y, &y0) < 1e-2, "{dtype:?}");
    }
}

#[test]
fn bad_masks_and_shapes_are_errors() {
    let p = problems(DType::F32).remove(0);
    let bad = Tensor::zeros((13, 12), DType::F32, &Device::Cpu).unwrap();
    let e = ops::attention_tiled(&p.q, &p.k, &p.v, 1.0, Some(&bad), 64, Kernel::Auto).unwrap_err();
    assert!(
        e.to_string()
            .contains("mask [13, 12] does not broadcast to the scores [2, 3, 13, 13]"),
        "{e}"
    );
    let e = ops::attention(&p.q, &p.k, &p.v, 1.0, Some(&bad)).unwrap_err();
    assert!(e.to_string().contains("does not broadcast"), "{e}");
    let e = ops::attention_tiled(
        &p.q,
        &p.v.narrow(3, 0, 5).unwrap(),
        &p.v,
        1.0,
        None,
        64,
        Kernel::Auto,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("incompatible q [2, 3, 13, 8], k [2, 3, 13, 5]"),
        "{e}"
    );
}

#[test]
fn gauge_reports_the_largest_tile() {
    let p = problems(DType::F32).remove(1); // [4, 17, 6] × [4, 5, 6]
    ops::reset_attention_peak();
    run(&p, &|q, k, v, m| {
        ops::attention_tiled(q, k, v, p.scale, m, 4 * row_bytes(&p), Kernel::Auto)
    });
    // 17 queries in tiles of at most 4 rows: 5 balanced tiles of 4 (the last 1); 4 × 4 × 5.
    assert_eq!(ops::attention_peak_elems(), 4 * 4 * 5);
    ops::reset_attention_peak();
    run(&p, &|q, k, v, m| {
        ops::attention_with(q, k, v, p.scale, m, Kernel::Auto)
    });
    assert_eq!(ops::attention_peak_elems(), 4 * 17 * 5);
    ops::reset_attention_peak();
    assert_eq!(ops::attention_peak_elems(), 0);
}

#[test]
fn attention_tiles_when_the_probabilities_exceed_the_budget() {
    // [1, 1, 4100, 4096] scores in f32 are 64.06 MiB: just above the budget.
    let mut rng = Rng::new(3);
    let q = common::randn(&mut rng, &[1, 1, 4100, 8], 1.0);
    let k = common::randn(&mut rng, &[1, 1, 4096, 8], 1.0);
    let v = common::randn(&mut rng, &[1, 1, 4096, 8], 1.0);
    // One tile holding every row is the materialised computation.
    let y0 = ops::attention_tiled(&q, &k, &v, 0.35, None, usize::MAX, Kernel::Auto).unwrap();
    // The generic kernels tile above the budget ...
    ops::reset_attention_peak();
    let y = ops::attention_with(&q, &k, &v, 0.35, None, Kernel::Generic).unwrap();
    let peak = ops::attention_peak_elems();
    assert!(
        peak * 4 <= ops::ATTENTION_TILE_BYTES,
        "largest tile {peak} elements"
    );
    assert!(peak < 4100 * 4096);
    assert!(rel(&y, &y0) <= 1e-6, "{}", rel(&y, &y0));
    // ... and, one query fewer, materialise the whole probabilities.
    ops::reset_attention_peak();
    ops::attention_with(
        &q.narrow(2, 0, 4095).unwrap(),
        &k,
        &v,
        0.35,
        None,
        Kernel::Generic,
    )
    .unwrap();
    assert_eq!(ops::attention_peak_elems(), 4095 * 4096);
    // On the CPU in f32 the fused kernel takes both: blocks of 64 queries over every key.
    ops::reset_attention_peak();
    let y = ops::attention(&q, &k, &v, 0.35, None).unwrap();
    assert_eq!(ops::attention_peak_elems(), 64 * 4096);
    assert!(rel(&y, &y0) <= 1e-6, "{}", rel(&y, &y0));
}

#[test]
fn sd15_transformer_block_at_64x64_keeps_no_full_probability_tensor() {
    // down_blocks.0.attentions.0 of SD 1.5: 320 channels, 8 heads × 40, context 77 × 768; at a
    // 64×64 latent (512 px) its self-attention has 4096 tokens: P would be 8 × 4096 × 4096.
    let cfg = Transformer2DConfig {
        num_attention_heads: 8,
        attention_head_dim: 40,
        in_channels: 320,
        num_layers: 1,
        cross_attention_dim: 768,
        norm_num_groups: 32,
        use_linear_projection: false,
        only_cross_attention: false,
        upcast_attention: false,
    };
    let dev = Device::Cpu;
    let vb = ModelWeights::random("unet", 0).var_builder(DType::F32, &dev);
    let block = Transformer2DModel::new(vb.pp("down_blocks.0.attentions.0"), &cfg).unwrap();
    let lora = inject_trainable(
        &block,
        Component::Unet,
        &LoraTargets::parse("attn").unwrap(),
        4,
        4.0,
        0.0,
        &mut Rng::new(1),
        &dev,
    )
    .unwrap();
    let mut rng = Rng::new(2);
    let x = common::randn(&mut rng, &[1, 320, 64, 64], 1.0);
    let ctx = common::randn(&mut rng, &[1, 77, 768], 1.0);
    ops::reset_attention_peak();
    let y = block.forward(&x, &ctx).unwrap();
    let grads = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
    let peak = ops::attention_peak_elems();
    eprintln!(
        "largest attention block: {peak} elements (full P: {})",
        8 * 4096 * 4096
    );
    assert!(
        peak * 4 <= ops::ATTENTION_TILE_BYTES,
        "largest tile {peak} elements"
    );
    // The self-attention ran (and was tiled): a tile of its 4096 keys is the largest block.
    assert_eq!(peak % (8 * 4096), 0, "{peak}");
    let named = lora.named_vars();
    assert_eq!(
        named.len(),
        16,
        "down/up of q, k, v, out in attn1 and attn2"
    );
    for (name, var) in named {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        if name.ends_with("lora_up.weight") {
            assert!(max_abs_f64(g) > 0.0, "{name}: zero gradient");
        }
    }
}

/// `[B, N, H·d]` → `[B·H, N, d]`.
fn split_heads(t: &Tensor, heads: usize) -> Tensor {
    let (b, n, c) = t.dims3().unwrap();
    t.reshape((b, n, heads, c / heads))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b * heads, n, c / heads))
        .unwrap()
}

/// `[B·H, N, d]` → `[B, N, H·d]`.
fn merge_heads(t: &Tensor, heads: usize) -> Tensor {
    let (bh, n, d) = t.dims3().unwrap();
    t.reshape((bh / heads, heads, n, d))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((bh / heads, n, heads * d))
        .unwrap()
}

#[test]
fn heads_side_by_side_equal_the_split_heads() {
    // (batch, heads, Nq, Nk, d, dv): self-attention, cross-attention with dv ≠ d, and one
    // whose tracked probabilities (2 × 1100 × 1100 f32 = 9.7 MB) take the tiled form.
    for (b, h, nq, nk, d, dv) in [
        (2, 3, 13, 13, 8, 8),
        (1, 2, 17, 5, 6, 4),
        (1, 2, 1100, 1100, 4, 4),
    ] {
        for dtype in [DType::F32, DType::F64] {
            for kernel in [Kernel::Auto, Kernel::Generic] {
                let mut rng = Rng::new(11);
                let mut r = |s: &[usize]| common::randn(&mut rng, s, 1.0).to_dtype(dtype).unwrap();
                let p = Problem {
                    name: "heads",
                    q: r(&[b, nq, h * d]),
                    k: r(&[b, nk, h * d]),
                    v: r(&[b, nk, h * dv]),
                    g: r(&[b, nq, h * dv]),
                    mask: None,
                    scale: (d as f64).powf(-0.5),
                };
                let (y0, g0) = run(&p, &|q, k, v, _| {
                    let (q, k, v) = (split_heads(q, h), split_heads(k, h), split_heads(v, h));
                    Ok(merge_heads(
                        &ops::attention_materialised(&q, &k, &v, p.scale, None, kernel)?,
                        h,
                    ))
                });
                let (y1, g1) = run(&p, &|q, k, v, _| {
                    ops::attention_heads(q, k, v, h, p.scale, kernel)
                });
                let tol = if dtype == DType::F64 { 1e-12 } else { 2e-5 };
                assert!(
                    rel(&y1, &y0) <= tol,
                    "{b}x{h}x{nq}x{nk} {dtype:?} value {}",
                    rel(&y1, &y0)
                );
                for (i, (a, c)) in g1.iter().zip(&g0).enumerate() {
                    assert_eq!(a.dims(), c.dims());
                    assert!(
                        rel(a, c) <= tol * 10.0,
                        "{b}x{h}x{nq}x{nk} {dtype:?} grad {i}: {}",
                        rel(a, c)
                    );
                }
            }
        }
    }
    let t = Tensor::zeros((1, 4, 6), DType::F32, &Device::Cpu).unwrap();
    let e = ops::attention_heads(&t, &t, &t, 4, 1.0, Kernel::Auto).unwrap_err();
    assert!(e.to_string().contains("4 heads do not fit"), "{e}");
}

#[test]
fn fused_cpu_kernel_equals_materialised_and_finite_differences() {
    // Scores 6 × 300 × 1800 f32 = 13 MB: above the materialise limit, so `ops::attention`
    // takes the fused CPU kernel; 300 queries leave a short last block in the forward (64
    // rows) and in the backward (256 rows), 1800 keys a short last key tile (160); dv ≠ d.
    for dtype in [DType::F32, DType::F64] {
        let mut rng = Rng::new(5);
        let mut r = |s: &[usize]| common::randn(&mut rng, s, 1.0).to_dtype(dtype).unwrap();
        let p = Problem {
            name: "fused",
            q: r(&[2, 3, 300, 8]),
            k: r(&[2, 3, 1800, 8]),
            v: r(&[2, 3, 1800, 5]),
            g: r(&[2, 3, 300, 5]),
            mask: None,
            scale: 0.35,
        };
        ops::reset_attention_peak();
        let (y1, g1) = run(&p, &|q, k, v, _| ops::attention(q, k, v, p.scale, None));
        assert_eq!(
            ops::attention_peak_elems(),
            64 * 1800,
            "the fused kernel ran"
        );
        let (y0, g0) = run(&p, &|q, k, v, _| {
            ops::attention_materialised(q, k, v, p.scale, None, Kernel::Auto)
        });
        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        assert!(rel(&y1, &y0) <= tol, "{dtype:?} value {}", rel(&y1, &y0));
        for (i, (a, c)) in g1.iter().zip(&g0).enumerate() {
            assert!(rel(a, c) <= tol * 10.0, "{dtype:?} grad {i}: {}", rel(a, c));
        }
        // Only v tracked: no gradient for q and k, the same one for v.
        let vv = Var::from_tensor(&p.v).unwrap();
        let y = ops::attention(&p.q, &p.k, vv.as_tensor(), p.scale, None).unwrap();
        let grads = (&y * &p.g).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(rel(grads.get(vv.as_tensor()).unwrap(), &g0[2]) <= tol * 10.0);
        if dtype != DType::F64 {
            continue;
        }
        // Central differences on a few elements of each input.
        let f = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
            let y = ops::attention(q, k, v, p.scale, None).unwrap();
            (y * &p.g)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let eps = 1e-5;
        for (which, t) in [&p.q, &p.k, &p.v].into_iter().enumerate() {
            let flat: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
            let grad: Vec<f64> = g1[which].flatten_all().unwrap().to_vec1().unwrap();
            for i in [0, flat.len() / 3, flat.len() - 1] {
                let bump = |e: f64| {
                    let mut v = flat.clone();
                    v[i] += e;
                    Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap()
                };
                let mut args = [p.q.clone(), p.k.clone(), p.v.clone()];
                args[which] = bump(eps);
                let hi = f(&args[0], &args[1], &args[2]);
                args[which] = bump(-eps);
                let lo = f(&args[0], &args[1], &args[2]);
                let fd = (hi - lo) / (2.0 * eps);
                assert!(
                    (fd - grad[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
                    "input {which} elem {i}: {fd} vs {}",
                    grad[i]
                );
            }
        }
    }
}
