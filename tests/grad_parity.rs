//! Whole-model gradient parity with PyTorch + PEFT: the gradient of every LoRA factor of the
//! tiny UNet and text encoder for one fixed batch (fixtures from
//! scripts/fixture_lora_grads.py, reference computed in f64), within 1e-4 relative to each
//! tensor's largest magnitude. Also checks that no base weight receives a gradient.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use lora_diffusion::lora::Component;
use lora_diffusion::lora::{inject_trainable, LoraHost, LoraSet, LoraTargets, LoraWeights};
use lora_diffusion::rng::Rng;

const REL_TOL: f32 = 1e-4;

struct Case {
    tensors: std::collections::HashMap<String, Tensor>,
    meta: serde_json::Value,
}

fn load_case(name: &str) -> Case {
    let dir = fixtures().join("lora_grads");
    Case {
        tensors: load_tensors(dir.join(format!("{name}.safetensors"))),
        meta: read_json(dir.join(format!("{name}.json"))),
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// The fixture's LoRA factors of `component` as a LoraSet.
fn fixture_set(case: &Case, component: &str, alpha: f64) -> LoraSet {
    let mut layers = BTreeMap::new();
    let prefix = format!("lora.{component}.");
    for (k, down) in &case.tensors {
        let Some(path) = k
            .strip_prefix(&prefix)
            .and_then(|p| p.strip_suffix(".lora_down.weight"))
        else {
            continue;
        };
        let up = case.tensors[&format!("{prefix}{path}.lora_up.weight")].clone();
        let w = LoraWeights::new(down.clone(), up, alpha).unwrap();
        layers.insert(format!("{component}.{path}").into(), w);
    }
    LoraSet {
        layers,
        embeddings: vec![],
        metadata: BTreeMap::new(),
    }
}

fn run(case_name: &str, unet_targets: &str, text_targets: &str) {
    let case = load_case(case_name);
    let model = case.meta["model"].as_str().unwrap();
    let rank = case.meta["rank"].as_u64().unwrap() as usize;
    let alpha = case.meta["alpha"].as_f64().unwrap();
    let unet = load_unet(model, DType::F32);
    let clip = load_clip(model, DType::F32);

    let mut rng = Rng::new(0);
    let dev = Device::Cpu;
    let ut = LoraTargets::parse(unet_targets).unwrap();
    let tt = LoraTargets::parse(text_targets).unwrap();
    let lu = inject_trainable(
        &unet,
        Component::Unet,
        &ut,
        rank,
        alpha,
        0.0,
        &mut rng,
        &dev,
    )
    .unwrap();
    let lt = inject_trainable(
        &clip,
        Component::TextEncoder,
        &tt,
        rank,
        alpha,
        0.0,
        &mut rng,
        &dev,
    )
    .unwrap();

    // Same layers, same (named_modules) order as PEFT.
    let ours: Vec<String> = lu.handle().adapters().map(|(p, _)| p.to_string()).collect();
    assert_eq!(
        ours,
        strings(&case.meta["unet_lora_layers"]),
        "{case_name} unet layers"
    );
    let ours: Vec<String> = lt.handle().adapters().map(|(p, _)| p.to_string()).collect();
    assert_eq!(
        ours,
        strings(&case.meta["text_lora_layers"]),
        "{case_name} text layers"
    );

    lu.load_weights(&fixture_set(&case, "unet", alpha)).unwrap();
    lt.load_weights(&fixture_set(&case, "text_encoder", alpha))
        .unwrap();

    let t = &case.tensors;
    let ids = t["input.input_ids"].to_dtype(DType::U32).unwrap();
    let timesteps = t["input.timesteps"].to_dtype(DType::F32).unwrap();
    let (noisy, noise) = (&t["input.noisy"], &t["input.noise"]);

    let ehs = clip.forward(&ids).unwrap();
    let d_ehs = max_abs_diff(&ehs, &t["output.encoder_hidden_states"]);
    let pred = unet.forward(noisy, &timesteps, &ehs).unwrap();
    let d_pred = max_abs_diff(&pred, &t["output.pred"]);
    let loss = mse(&pred, noise);
    let (l, l_ref) = (
        loss.to_scalar::<f32>().unwrap(),
        case.meta["loss"].as_f64().unwrap(),
    );
    eprintln!(
        "{case_name}: encoder_hidden_states max abs diff {d_ehs:e}, pred {d_pred:e}, \
         loss {l} vs {l_ref} (diff {:e})",
        (l as f64 - l_ref).abs()
    );
    assert!(
        d_ehs <= 1e-4 && d_pred <= 1e-4,
        "{case_name}: forward differs"
    );
    assert!(
        (l as f64 - l_ref).abs() <= 1e-5 * l_ref.abs(),
        "{case_name}: loss differs"
    );

    let grads = loss.backward().unwrap();
    let mut worst = (0f32, String::new());
    let mut count = 0;
    for inj in [&lu, &lt] {
        for (name, var) in inj.named_vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let want = &t[&format!("grad.{name}")];
            let scale = max_abs(want);
            assert!(scale > 0.0, "{name}: reference gradient is zero");
            let rel = max_abs_diff(g, want) / scale;
            if rel >= worst.0 {
                worst = (rel, name.clone());
            }
            assert!(
                rel <= REL_TOL,
                "{case_name}: {name} gradient off by {rel:e} (relative)"
            );
            count += 1;
        }
    }
    eprintln!(
        "{case_name}: {count} LoRA gradients, worst relative diff {:e} at {}",
        worst.0, worst.1
    );

    // Frozen base: no Linear / Conv2d weight or bias received a gradient.
    let mut layers = unet.lora_layers();
    layers.extend(clip.lora_layers());
    for l in &layers {
        assert!(
            grads.get(l.weight()).is_none(),
            "{}: base weight got a gradient",
            l.path()
        );
        if let Some(b) = l.bias() {
            assert!(
                grads.get(b).is_none(),
                "{}: base bias got a gradient",
                l.path()
            );
        }
    }
}

#[test]
fn sd1_attention_lora_gradients_match_peft() {
    run("sd1_attn", "attn", "text-attn");
}

#[test]
fn sd2_attention_lora_gradients_match_peft() {
    run("sd2_attn", "attn", "text-attn");
}

#[test]
fn sd1_every_layer_lora_gradients_match_peft() {
    run("sd1_all", "all", "text-attn,text-mlp");
}

#[test]
fn layer_enumeration_matches_named_modules() {
    for (case, model) in [("sd1_all", "sd1"), ("sd2_attn", "sd2")] {
        let c = load_case(case);
        let unet = load_unet(model, DType::F32);
        let clip = load_clip(model, DType::F32);
        let paths = |host: &dyn LoraHost| -> Vec<String> {
            host.lora_layers()
                .iter()
                .map(|l| l.path().to_string())
                .collect()
        };
        assert_eq!(
            paths(&unet),
            strings(&c.meta["unet_modules"]),
            "{model} unet modules"
        );
        assert_eq!(
            paths(&clip),
            strings(&c.meta["text_modules"]),
            "{model} text modules"
        );
    }
}
