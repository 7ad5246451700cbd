//! LoRA adapters on the tiny fixture models: untrained injection leaves outputs bit-equal,
//! collapse(W) equals the adapter, runtime scale / enable / removal, stacking, errors.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::*;
use lora_diffusion::lora::Component;
use lora_diffusion::lora::{
    apply_lora_set, collapse, extract, inject_trainable, remove_all, set_enabled, set_scale,
    AdapterKind, InjectedLora, LoraAdapter, LoraHost, LoraSet, LoraTargets, LoraWeights,
};
use lora_diffusion::models::layers::Linear;
use lora_diffusion::models::unet::UNet2DConditionModel;
use lora_diffusion::rng::Rng;

const CPU: Device = Device::Cpu;

fn targets(s: &str) -> LoraTargets {
    LoraTargets::parse(s).unwrap()
}

/// UNet inputs from the sd fixtures: (sample, timesteps, encoder_hidden_states).
fn unet_inputs(model: &str) -> (Tensor, Tensor, Tensor) {
    let o = outputs(model);
    let t = Tensor::new(&[250.5f32, 999.0], &CPU).unwrap();
    (
        o["unet.sample"].clone(),
        t,
        o["unet.encoder_hidden_states"].clone(),
    )
}

fn run_unet(unet: &UNet2DConditionModel, model: &str) -> Tensor {
    let (x, t, ehs) = unet_inputs(model);
    unet.forward(&x, &t, &ehs).unwrap()
}

fn clip_ids(model: &str) -> Tensor {
    outputs(model)["clip.input_ids"]
        .narrow(0, 0, 4)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
}

/// Gives every trainable factor (up included) random non-zero values.
fn randomize(inj: &InjectedLora, rng: &mut Rng) {
    for (_, v) in inj.named_vars() {
        v.set(&randn(rng, v.dims(), 0.1)).unwrap();
    }
}

/// A random LoRA (rank `r`, alpha `alpha`) for every `targets` layer of `host`.
fn random_set(
    host: &impl LoraHost,
    comp: &str,
    t: &str,
    r: usize,
    alpha: f64,
    seed: u64,
) -> LoraSet {
    let mut rng = Rng::new(seed);
    let t = targets(t);
    let mut layers = BTreeMap::new();
    for l in host
        .lora_layers()
        .iter()
        .filter(|l| t.matches(comp, l.path()))
    {
        let w = LoraWeights::new(
            randn(&mut rng, &l.down_shape(r), 0.3),
            randn(&mut rng, &l.up_shape(r), 0.1),
            alpha,
        )
        .unwrap();
        layers.insert(format!("{comp}.{}", l.path()).into(), w);
    }
    LoraSet {
        layers,
        embeddings: vec![],
        metadata: BTreeMap::new(),
    }
}

#[test]
fn untrained_injection_is_bit_equal_to_the_base_model() {
    for (model, t) in [("sd1", "all"), ("sd2", "attn,ff,proj,resnet")] {
        let unet = load_unet(model, DType::F32);
        let base = run_unet(&unet, model);
        let mut rng = Rng::new(1);
        let inj = inject_trainable(
            &unet,
            Component::Unet,
            &targets(t),
            4,
            4.0,
            0.0,
            &mut rng,
            &CPU,
        )
        .unwrap();
        let out = run_unet(&unet, model);
        let d = max_abs_diff(&out, &base);
        eprintln!(
            "{model} unet ({t}, {} layers) untrained LoRA max abs diff {d:e}",
            inj.handle().len()
        );
        assert_eq!(d, 0.0);
        assert!(inj.handle().len() > 40);

        let clip = load_clip(model, DType::F32);
        let ids = clip_ids(model);
        let base = clip.forward(&ids).unwrap();
        let tt = targets("text-attn,text-mlp");
        let inj = inject_trainable(
            &clip,
            Component::TextEncoder,
            &tt,
            4,
            8.0,
            0.0,
            &mut rng,
            &CPU,
        )
        .unwrap();
        assert_eq!(inj.handle().len(), 18);
        let d = max_abs_diff(&clip.forward(&ids).unwrap(), &base);
        eprintln!("{model} clip untrained LoRA max abs diff {d:e}");
        assert_eq!(d, 0.0);
    }
    // Half precision: f32 adapters on a bf16 model leave it unchanged too.
    let unet = load_unet("sd1", DType::BF16);
    let base = run_unet(&unet, "sd1");
    let mut rng = Rng::new(2);
    inject_trainable(
        &unet,
        Component::Unet,
        &targets("attn"),
        4,
        4.0,
        0.0,
        &mut rng,
        &CPU,
    )
    .unwrap();
    assert_eq!(max_abs_diff(&run_unet(&unet, "sd1"), &base), 0.0);
}

#[test]
fn injection_names_init_and_parameter_count() {
    let unet = load_unet("sd1", DType::F32);
    let mut rng = Rng::new(3);
    let (r, alpha) = (4, 2.0);
    let inj = inject_trainable(
        &unet,
        Component::Unet,
        &targets("attn"),
        r,
        alpha,
        0.0,
        &mut rng,
        &CPU,
    )
    .unwrap();
    let names: Vec<&str> = inj.named_vars().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), 2 * 88);
    assert_eq!(
        names[0],
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_down.weight"
    );
    assert_eq!(
        names[1],
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_up.weight"
    );
    assert!(
        names[7].ends_with("attn1.to_out.0.lora_up.weight"),
        "{}",
        names[7]
    );
    // Every adapter: scale alpha / r, f32 variables, up = 0, down ~ N(0, (1/r)^2).
    let mut downs = Vec::new();
    for (name, v) in inj.named_vars() {
        assert!(
            v.as_tensor().is_variable() && v.dtype() == DType::F32,
            "{name}"
        );
        if name.ends_with("lora_up.weight") {
            assert_eq!(max_abs(v.as_tensor()), 0.0, "{name}");
        } else {
            downs.extend(
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
        }
    }
    let n = downs.len() as f64;
    let mean = downs.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (downs
        .iter()
        .map(|&x| (x as f64 - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    eprintln!(
        "down init: {n} values, mean {mean:.5}, std {std:.5} (expected {})",
        1.0 / r as f64
    );
    assert!((std - 1.0 / r as f64).abs() < 0.01 && mean.abs() < 0.01);
    let (_, a) = inj.handle().adapters().next().unwrap();
    assert_eq!(a.effective_scale(), alpha / r as f64);
    let expected: usize = unet
        .lora_layers()
        .iter()
        .filter(|l| targets("attn").matches("unet", l.path()))
        .map(|l| r * (l.in_dim() + l.out_dim()))
        .sum();
    assert_eq!(inj.num_parameters(), expected);
    // Same seed, same values.
    let unet2 = load_unet("sd1", DType::F32);
    let inj2 = inject_trainable(
        &unet2,
        Component::Unet,
        &targets("attn"),
        r,
        alpha,
        0.0,
        &mut Rng::new(3),
        &CPU,
    )
    .unwrap();
    let (a, b) = (&inj.named_vars()[0].1, &inj2.named_vars()[0].1);
    assert_eq!(max_abs_diff(a.as_tensor(), b.as_tensor()), 0.0);
}

/// Rebuilds the tiny UNet with every adapted weight collapsed.
fn collapsed_unet(model: &str, set: &LoraSet) -> UNet2DConditionModel {
    let mut tensors: HashMap<String, Tensor> = unet_tensors(model);
    for (key, lora) in &set.layers {
        let wkey = format!("{}.weight", key.as_str().strip_prefix("unet.").unwrap());
        let w = tensors.get(&wkey).unwrap().clone();
        tensors.insert(wkey, collapse(&w, lora, 1.0).unwrap());
    }
    unet_from(model, tensors, DType::F32)
}

#[test]
fn fully_collapsed_unet_equals_the_adapted_unet() {
    for model in ["sd1", "sd2"] {
        let unet = load_unet(model, DType::F32);
        let base = run_unet(&unet, model);
        let mut rng = Rng::new(5);
        let inj = inject_trainable(
            &unet,
            Component::Unet,
            &targets("all"),
            4,
            8.0,
            0.0,
            &mut rng,
            &CPU,
        )
        .unwrap();
        randomize(&inj, &mut rng);
        let adapted = run_unet(&unet, model);
        let set = extract(&unet, Component::Unet).unwrap();
        assert_eq!(set.layers.len(), unet.lora_layers().len());
        let merged = run_unet(&collapsed_unet(model, &set), model);
        let (d, moved) = (
            max_abs_diff(&adapted, &merged),
            max_abs_diff(&adapted, &base),
        );
        eprintln!("{model}: collapsed vs adapted UNet max abs diff {d:e} (LoRA moved the output by {moved:e})");
        assert!(d <= 1e-4);
        assert!(moved > 1e-2, "the LoRA should change the output");
    }
}

#[test]
fn scale_enable_and_remove_at_run_time() {
    let unet = load_unet("sd1", DType::F32);
    let base = run_unet(&unet, "sd1");
    let set = random_set(&unet, "unet", "attn,proj", 4, 4.0, 6);
    let h = apply_lora_set(&unet, Component::Unet, &set, 1.0).unwrap();
    assert_eq!(h.len(), 88 + 22);
    let full = run_unet(&unet, "sd1");
    assert!(max_abs_diff(&full, &base) > 1e-2);
    h.set_scale(0.0);
    assert_eq!(
        max_abs_diff(&run_unet(&unet, "sd1"), &base),
        0.0,
        "scale 0 == base"
    );
    set_scale(&unet, 1.0);
    assert_eq!(
        max_abs_diff(&run_unet(&unet, "sd1"), &full),
        0.0,
        "scale 1 again"
    );
    set_enabled(&unet, false);
    assert_eq!(
        max_abs_diff(&run_unet(&unet, "sd1"), &base),
        0.0,
        "disabled == base"
    );
    h.set_enabled(true);
    assert_eq!(
        max_abs_diff(&run_unet(&unet, "sd1"), &full),
        0.0,
        "enabled again"
    );
    // Extract gives back exactly what was applied.
    let got = extract(&unet, Component::Unet).unwrap();
    assert_eq!(got.layers.len(), set.layers.len());
    for (k, w) in &set.layers {
        let g = &got.layers[k];
        assert_eq!(
            max_abs_diff(g.down(), w.down()) + max_abs_diff(g.up(), w.up()),
            0.0,
            "{k}"
        );
        assert_eq!(g.alpha(), w.alpha());
    }
    assert_eq!(h.remove(), 110);
    assert_eq!(
        max_abs_diff(&run_unet(&unet, "sd1"), &base),
        0.0,
        "removed == base"
    );
    assert!(unet.lora_layers().iter().all(|l| l.residuals().is_empty()));
    apply_lora_set(&unet, Component::Unet, &set, 1.0).unwrap();
    assert_eq!(remove_all(&unet), 110);
}

#[test]
fn two_loras_on_the_same_layers_add_up() {
    let mut rng = Rng::new(7);
    let (w, b) = (randn(&mut rng, &[24, 16], 0.2), randn(&mut rng, &[24], 0.1));
    let x = randn(&mut rng, &[5, 16], 1.0);
    let loras: Vec<LoraWeights> = [(2, 2.0), (5, 1.0)]
        .iter()
        .map(|&(r, alpha)| {
            LoraWeights::new(
                randn(&mut rng, &[r, 16], 0.3),
                randn(&mut rng, &[24, r], 0.3),
                alpha,
            )
            .unwrap()
        })
        .collect();
    let layer = Linear::from_tensors(w.clone(), Some(b.clone()), "l");
    let base = layer.forward(&x).unwrap();
    let mut singles = Vec::new();
    for (i, l) in loras.iter().enumerate() {
        let a = Arc::new(
            LoraAdapter::frozen(
                l.down().clone(),
                l.up().clone(),
                l.alpha(),
                AdapterKind::Linear,
                10 + i as u64,
            )
            .unwrap(),
        );
        a.set_multiplier([0.8, -0.5][i]);
        let one = Linear::from_tensors(w.clone(), Some(b.clone()), "one");
        one.residuals().push(a.clone());
        singles.push((one.forward(&x).unwrap() - &base).unwrap());
        layer.residuals().push(a);
    }
    let both = (layer.forward(&x).unwrap() - &base).unwrap();
    let d = max_abs_diff(&both, &(&singles[0] + &singles[1]).unwrap());
    eprintln!("two adapters vs sum of single residuals max abs diff {d:e}");
    assert!(d <= 1e-5);
    let w2 = collapse(&collapse(&w, &loras[0], 0.8).unwrap(), &loras[1], -0.5).unwrap();
    let merged = Linear::from_tensors(w2, Some(b), "m").forward(&x).unwrap();
    assert!(max_abs_diff(&merged, &layer.forward(&x).unwrap()) <= 1e-5);
    assert_eq!(layer.residuals().remove_owner(10), 1);
    assert!(max_abs_diff(&(layer.forward(&x).unwrap() - &base).unwrap(), &singles[1]) <= 1e-6);

    // Whole UNet: two loaded LoRAs, each with its own handle and scale.
    let unet = load_unet("sd1", DType::F32);
    let (sa, sb) = (
        random_set(&unet, "unet", "attn", 4, 4.0, 8),
        random_set(&unet, "unet", "attn,ff", 2, 1.0, 9),
    );
    let hb = apply_lora_set(&unet, Component::Unet, &sb, 0.5).unwrap();
    let only_b = run_unet(&unet, "sd1");
    let ha = apply_lora_set(&unet, Component::Unet, &sa, 1.0).unwrap();
    assert!(max_abs_diff(&run_unet(&unet, "sd1"), &only_b) > 1e-2);
    assert!(extract(&unet, Component::Unet)
        .unwrap_err()
        .to_string()
        .contains("carries 2 LoRAs"));
    ha.set_scale(0.0);
    assert_eq!(max_abs_diff(&run_unet(&unet, "sd1"), &only_b), 0.0);
    assert_eq!(ha.remove(), 88);
    assert_eq!(max_abs_diff(&run_unet(&unet, "sd1"), &only_b), 0.0);
    assert_eq!(hb.extract().unwrap().layers.len(), sb.layers.len());
}

#[test]
fn rank_too_large_and_empty_targets_are_clear_errors() {
    let unet = load_unet("sd1", DType::F32);
    let mut rng = Rng::new(10);
    let mut error = |t: &str, rank: usize, alpha: f64, dropout: f64| {
        inject_trainable(
            &unet,
            Component::Unet,
            &targets(t),
            rank,
            alpha,
            dropout,
            &mut rng,
            &CPU,
        )
        .unwrap_err()
        .to_string()
    };
    let e = error("attn", 40, 40.0, 0.0);
    eprintln!("{e}");
    assert!(e.contains("rank 40"), "{e}");
    assert!(
        e.contains("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        "{e}"
    );
    assert!(e.contains("in = 32") && e.contains("out = 32"), "{e}");
    // Convolutions: min(in·k·k, out); conv_out has 4 output channels.
    let e = error("conv_out", 5, 5.0, 0.0);
    assert!(
        e.contains("unet.conv_out") && e.contains("in·k·k = 32·3·3 = 288") && e.contains("out = 4"),
        "{e}"
    );
    // Nothing was attached by the failed calls.
    assert!(unet.lora_layers().iter().all(|l| l.residuals().is_empty()));
    let e = error("text-attn", 4, 4.0, 0.0);
    assert!(
        e.contains("match no layer") && e.contains("text-attn"),
        "{e}"
    );
    assert!(error("attn", 0, 4.0, 0.0).contains("rank"));
    assert!(error("attn", 4, 4.0, 1.0).contains("dropout"));
}

#[test]
fn loaded_lora_errors_name_keys_and_shapes() {
    let unet = load_unet("sd1", DType::F32);
    let mut set = random_set(&unet, "unet", "attn", 4, 4.0, 11);
    let q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let old = set.layers[q].clone();
    let bad_down = Tensor::zeros((4, 31), DType::F32, &CPU).unwrap();
    let bad = LoraWeights::new(bad_down, old.up().clone(), old.alpha()).unwrap();
    set.layers.insert(q.to_string().into(), bad);
    let w = set.layers[q].clone();
    set.layers
        .insert("unet.down_blocks.9.nonexistent".into(), w.clone());
    set.layers.insert("vae.decoder.conv_in".into(), w.clone());
    set.layers.insert(
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj".into(),
        w,
    );
    let e = apply_lora_set(&unet, Component::Unet, &set, 1.0)
        .unwrap_err()
        .to_string();
    eprintln!("{e}");
    assert!(
        e.contains("unet.down_blocks.9.nonexistent") && e.contains("no such layer"),
        "{e}"
    );
    assert!(e.contains("vae.decoder.conv_in"), "{e}");
    assert!(
        e.contains(q) && e.contains("[32, 32]") && e.contains("[4, 31]"),
        "{e}"
    );
    assert!(
        !e.contains("text_encoder.text_model"),
        "other components are not this call's business: {e}"
    );
    assert!(unet.lora_layers().iter().all(|l| l.residuals().is_empty()));
}

#[test]
fn linear_shaped_lora_fits_a_1x1_conv_and_back() {
    // sd1 has conv 1x1 proj_in / proj_out; a linear-shaped LoRA for them works, and equals
    // the conv-shaped one.
    let unet = load_unet("sd1", DType::F32);
    let conv_set = random_set(&unet, "unet", "proj", 4, 4.0, 12);
    let mut lin_set = conv_set.clone();
    for w in lin_set.layers.values_mut() {
        *w = w.map(|t| t.squeeze(3)?.squeeze(2)).unwrap();
    }
    let h = apply_lora_set(&unet, Component::Unet, &conv_set, 1.0).unwrap();
    let a = run_unet(&unet, "sd1");
    h.remove();
    apply_lora_set(&unet, Component::Unet, &lin_set, 1.0).unwrap();
    assert_eq!(max_abs_diff(&run_unet(&unet, "sd1"), &a), 0.0);
}

#[test]
fn dropout_only_in_training_and_reproducible() {
    let clip = load_clip("sd1", DType::F32);
    let ids = clip_ids("sd1");
    let mut rng = Rng::new(13);
    let t = targets("text-attn");
    let inj = inject_trainable(
        &clip,
        Component::TextEncoder,
        &t,
        4,
        4.0,
        0.5,
        &mut rng,
        &CPU,
    )
    .unwrap();
    randomize(&inj, &mut rng);
    inj.set_training(false);
    let eval = clip.forward(&ids).unwrap();
    inj.set_training(true);
    let state = inj.dropout_rng_state();
    let a = clip.forward(&ids).unwrap();
    let b = clip.forward(&ids).unwrap();
    inj.set_dropout_rng_state(state);
    let a2 = clip.forward(&ids).unwrap();
    let (da, dab) = (max_abs_diff(&a, &eval), max_abs_diff(&a, &b));
    eprintln!("dropout: train vs eval {da:e}, two train passes {dab:e}");
    assert!(da > 1e-3 && dab > 1e-3);
    assert_eq!(
        max_abs_diff(&a, &a2),
        0.0,
        "same generator state, same masks"
    );
    // Without dropout the evaluation output is what a p = 0 LoRA gives.
    let clip2 = load_clip("sd1", DType::F32);
    let inj2 = inject_trainable(
        &clip2,
        Component::TextEncoder,
        &t,
        4,
        4.0,
        0.0,
        &mut Rng::new(0),
        &CPU,
    )
    .unwrap();
    inj2.load_weights(&inj.to_lora_set().unwrap()).unwrap();
    assert_eq!(max_abs_diff(&clip2.forward(&ids).unwrap(), &eval), 0.0);
}
