//! LoRA adapters on single `Linear` / `Conv2d` layers: collapse(W) equals the adapter output
//! (linear, strided and 1x1 convolutions, trainable and frozen adapters), and the frozen base
//! path gives no weight gradient while a `Var` weight (full fine-tuning) gets the right one.

mod common;

use std::sync::Arc;

use candle_core::Var;
use lora_diffusion::lora::{collapse, delta_weight, AdapterKind, LoraAdapter, LoraWeights};
use lora_diffusion::models::layers::{Conv2d, Linear};
use lora_diffusion::rng::Rng;

use common::{max_abs_diff, randn};

/// A layer output with one frozen adapter vs the collapsed weight.
#[test]
fn collapsed_weight_equals_the_adapter_on_single_layers() {
    let mut rng = Rng::new(4);
    // Linear 32 -> 48 with bias, 3-d input.
    let (w, b) = (randn(&mut rng, &[48, 32], 0.2), randn(&mut rng, &[48], 0.1));
    let lora = LoraWeights::new(
        randn(&mut rng, &[3, 32], 0.3),
        randn(&mut rng, &[48, 3], 0.3),
        5.0,
    )
    .unwrap();
    let x = randn(&mut rng, &[2, 7, 32], 1.0);
    let layer = Linear::from_tensors(w.clone(), Some(b.clone()), "l");
    let a = LoraAdapter::frozen(
        lora.down().clone(),
        lora.up().clone(),
        5.0,
        AdapterKind::Linear,
        1,
    )
    .unwrap();
    layer.residuals().push(Arc::new(a));
    let merged = Linear::from_tensors(collapse(&w, &lora, 1.0).unwrap(), Some(b), "m");
    let d = max_abs_diff(&layer.forward(&x).unwrap(), &merged.forward(&x).unwrap());
    eprintln!("linear collapse vs adapter max abs diff {d:e}");
    assert!(d <= 1e-5);
    // delta_weight = (alpha / r) up down.
    let manual = (lora.up().matmul(lora.down()).unwrap() * (5.0 / 3.0)).unwrap();
    assert!(max_abs_diff(&delta_weight(&lora).unwrap(), &manual) <= 1e-6);

    // Conv 3x3, stride 2, padding 1 and a 1x1 conv; trainable and frozen adapters.
    for (k, stride, padding) in [(3, 2, 1), (3, 1, 1), (1, 1, 0)] {
        let (w, b) = (
            randn(&mut rng, &[16, 8, k, k], 0.2),
            randn(&mut rng, &[16], 0.1),
        );
        let lora = LoraWeights::new(
            randn(&mut rng, &[4, 8, k, k], 0.3),
            randn(&mut rng, &[16, 4, 1, 1], 0.3),
            2.0,
        )
        .unwrap();
        let x = randn(&mut rng, &[2, 8, 9, 9], 1.0);
        let kind = AdapterKind::Conv2d { stride, padding };
        let merged = Conv2d::from_tensors(
            collapse(&w, &lora, 0.7).unwrap(),
            Some(b.clone()),
            stride,
            padding,
            "m",
        );
        let want = merged.forward(&x).unwrap();
        for trainable in [false, true] {
            let layer = Conv2d::from_tensors(w.clone(), Some(b.clone()), stride, padding, "c");
            let a = if trainable {
                let (d, u) = (
                    Var::from_tensor(lora.down()).unwrap(),
                    Var::from_tensor(lora.up()).unwrap(),
                );
                LoraAdapter::trainable(d, u, 2.0, kind, 1, None).unwrap()
            } else {
                LoraAdapter::frozen(lora.down().clone(), lora.up().clone(), 2.0, kind, 1).unwrap()
            };
            a.set_multiplier(0.7);
            layer.residuals().push(Arc::new(a));
            let d = max_abs_diff(&layer.forward(&x).unwrap(), &want);
            eprintln!("conv k{k} s{stride} p{padding} (trainable {trainable}) collapse max abs diff {d:e}");
            assert!(d <= 1e-5);
        }
    }
}

#[test]
fn full_fine_tuning_weights_get_gradients_frozen_ones_do_not() {
    let mut rng = Rng::new(14);
    let x = Var::from_tensor(&randn(&mut rng, &[3, 8], 1.0)).unwrap();
    let w = randn(&mut rng, &[6, 8], 0.3);
    let frozen = Linear::from_tensors(w.clone(), None, "f");
    let wv = Var::from_tensor(&w).unwrap();
    let full = Linear::from_tensors(wv.as_tensor().clone(), None, "v");
    assert!(!frozen.is_trainable() && full.is_trainable());
    let (yf, yv) = (frozen.forward(&x).unwrap(), full.forward(&x).unwrap());
    assert_eq!(max_abs_diff(&yf, &yv), 0.0);
    let gf = yf.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let gv = yv.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(gf.get(&w).is_none(), "frozen weight got a gradient");
    assert!(max_abs_diff(gf.get(&x).unwrap(), gv.get(&x).unwrap()) <= 1e-6);
    // d/dW sum((xWᵀ)²) = 2 (xWᵀ)ᵀ x
    let want = (yv.t().unwrap().matmul(&x).unwrap() * 2.0).unwrap();
    assert!(max_abs_diff(gv.get(wv.as_tensor()).unwrap(), &want) <= 1e-5);
}
