//! Gradient checkpointing (`--gradient-checkpointing`): on the tiny SD 1.x / 2.x models the
//! loss and the gradient of every LoRA factor equal the run without checkpointing bit for bit
//! (CPU), for every target preset, with the text encoder trained and LoRA dropout on; the
//! dropout generators end in the same state; a short `lora train` saves the same LoRA.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use lora_diffusion::lora::{inject_trainable, Component, InjectedLora, LoraTargets};
use lora_diffusion::models::clip::ClipTextModel;
use lora_diffusion::models::unet::UNet2DConditionModel;
use lora_diffusion::rng::Rng;
use lora_diffusion::train::{train, TrainConfig, TrainHooks};

/// Bound on `max |g_ckpt − g| / max |g|` per LoRA gradient. The recompute sums the
/// gradient contributions inside a block before they meet those from outside it (the text
/// context read by every cross-attention, the skip connections), where the plain backward adds
/// them in one sequence, so the float sums may differ in the last bits.
const GRAD_REL_BOUND: f32 = 1e-5;

/// Bound on `max |Δfactor| / max |factor|` of the saved LoRA after a short `lora train`.
/// AdamW moves an element by about the learning rate whatever its gradient's size, so where a
/// gradient element is near zero, its last-bit difference can change that element's step.
const FACTOR_REL_BOUND: f32 = 1e-3;

/// The bits of every element of `t` (f32).
fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

struct Setup {
    unet: UNet2DConditionModel,
    clip: ClipTextModel,
    lu: InjectedLora,
    lt: InjectedLora,
    ids: Tensor,
    noisy: Tensor,
    noise: Tensor,
    timesteps: Tensor,
}

/// The tiny `model` with trainable LoRA on `unet_targets` / `text_targets` (rank 2, `up`
/// random so every factor gets a non-zero gradient) and dropout `p`.
fn setup(model: &str, unet_targets: &str, text_targets: &str, p: f64) -> Setup {
    let dev = Device::Cpu;
    let unet = load_unet(model, DType::F32);
    let clip = load_clip(model, DType::F32);
    let mut rng = Rng::new(5);
    let inject = |host: &dyn lora_diffusion::lora::LoraHost, c, t: &str, rng: &mut Rng| {
        let targets = LoraTargets::parse(t).unwrap();
        inject_trainable(host, c, &targets, 2, 3.0, p, rng, &dev).unwrap()
    };
    let lu = inject(&unet, Component::Unet, unet_targets, &mut rng);
    let lt = inject(&clip, Component::TextEncoder, text_targets, &mut rng);
    for inj in [&lu, &lt] {
        for (_, v) in inj.named_vars() {
            v.set(&randn(&mut rng, v.dims(), 0.3)).unwrap();
        }
    }
    let cfg = clip.config().clone();
    let len = 7.min(cfg.max_position_embeddings);
    let ids: Vec<u32> = (0..2 * len)
        .map(|i| (i as u32 * 7 + 3) % cfg.vocab_size as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (2, len), &dev).unwrap();
    let cfg_u = unet_config(model);
    let noisy = randn(&mut rng, &[2, cfg_u.in_channels, 8, 8], 1.0);
    let noise = randn(&mut rng, &[2, cfg_u.out_channels, 8, 8], 1.0);
    let timesteps = Tensor::new(&[10f32, 700.0], &dev).unwrap();
    Setup {
        unet,
        clip,
        lu,
        lt,
        ids,
        noisy,
        noise,
        timesteps,
    }
}

/// Loss, every LoRA gradient (by name) and the dropout states after one step.
type Step = (Tensor, Vec<(String, Tensor)>, [[u64; 4]; 2]);

fn step(s: &mut Setup, checkpointing: bool) -> Step {
    s.unet.set_gradient_checkpointing(checkpointing);
    s.clip.set_gradient_checkpointing(checkpointing);
    let ehs = s.clip.forward(&s.ids).unwrap();
    let pred = s.unet.forward(&s.noisy, &s.timesteps, &ehs).unwrap();
    let loss = mse(&pred, &s.noise);
    let grads = loss.backward().unwrap();
    let mut out = vec![];
    for inj in [&s.lu, &s.lt] {
        for (name, var) in inj.named_vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            out.push((name.clone(), g.clone()));
        }
    }
    let states = [s.lu.dropout_rng_state(), s.lt.dropout_rng_state()];
    (loss.detach(), out, states)
}

/// Runs one step without and one with checkpointing from the same dropout state and checks
/// that loss, gradients and final generator states are bit-equal.
fn check(model: &str, unet_targets: &str, text_targets: &str, p: f64) {
    let mut s = setup(model, unet_targets, text_targets, p);
    let start = [s.lu.dropout_rng_state(), s.lt.dropout_rng_state()];
    let (loss_a, grads_a, end_a) = step(&mut s, false);
    s.lu.set_dropout_rng_state(start[0]);
    s.lt.set_dropout_rng_state(start[1]);
    let (loss_b, grads_b, end_b) = step(&mut s, true);
    let case = format!("{model} {unet_targets} + {text_targets}, dropout {p}");
    assert_eq!(bits(&loss_a), bits(&loss_b), "{case}: loss differs");
    assert_eq!(end_a, end_b, "{case}: dropout generators end elsewhere");
    assert_eq!(grads_a.len(), grads_b.len());
    assert!(!grads_a.is_empty(), "{case}: nothing trained");
    let (mut worst, mut exact, mut nonzero) = ((0f32, String::new()), 0, 0);
    for ((name, a), (_, b)) in grads_a.iter().zip(&grads_b) {
        // With dropout a rank-2 hidden activation may be dropped whole: a zero gradient then
        // must be zero in both runs.
        let scale = max_abs(a);
        nonzero += usize::from(scale > 0.0);
        let rel = max_abs_diff(a, b) / scale.max(f32::MIN_POSITIVE);
        assert!(
            rel <= GRAD_REL_BOUND,
            "{case}: gradient of {name} off by {rel:e} (relative)"
        );
        exact += usize::from(bits(a) == bits(b));
        if rel >= worst.0 {
            worst = (rel, name.clone());
        }
    }
    assert!(
        nonzero * 10 >= grads_a.len() * 9,
        "{case}: only {nonzero} of {} gradients are non-zero",
        grads_a.len()
    );
    if p > 0.0 {
        assert_ne!(start, end_a, "{case}: dropout drew nothing");
    }
    eprintln!(
        "{case}: loss bit-equal; {exact} of {} LoRA gradients bit-equal, worst relative \
         difference {:e} at {}",
        grads_a.len(),
        worst.0,
        worst.1
    );
}

#[test]
fn checkpointed_gradients_equal_plain_ones_for_every_unet_preset() {
    for preset in ["attn", "ff", "proj", "resnet", "extended"] {
        check("sd1", preset, "text-attn,text-mlp", 0.25);
    }
}

#[test]
fn checkpointed_gradients_equal_plain_ones_for_every_text_preset() {
    for preset in ["text-attn", "text-mlp"] {
        check("sd1", "attn", preset, 0.25);
        check("sd2", "extended", preset, 0.0);
    }
}

#[test]
fn dropout_masks_are_replayed_in_the_recompute() {
    // Without replay the recompute would draw fresh masks: the gradients would then differ
    // from the plain run's although the loss (from the forward) is the same.
    check("sd1", "extended", "text-attn", 0.5);
    check("sd2", "attn,resnet", "text-mlp", 0.5);
}

#[test]
fn inference_output_is_unchanged_by_checkpointing() {
    let mut s = setup("sd1", "attn", "text-attn", 0.0);
    let run = |s: &Setup| {
        let ehs = s.clip.forward(&s.ids).unwrap();
        s.unet.forward(&s.noisy, &s.timesteps, &ehs).unwrap()
    };
    let a = run(&s);
    s.unet.set_gradient_checkpointing(true);
    s.clip.set_gradient_checkpointing(true);
    let b = run(&s);
    assert_eq!(bits(&a), bits(&b));
}

fn quiet() -> TrainHooks {
    TrainHooks {
        quiet: true,
        ..Default::default()
    }
}

#[test]
fn lora_train_saves_the_same_lora_with_gradient_checkpointing() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, on: bool| {
        let out = dir.path().join(name);
        let c = TrainConfig {
            instance_data_dir: Some(repo().join("tests/fixtures/train-data")),
            instance_prompt: Some("a photo of sks toy".into()),
            output_dir: Some(out.clone()),
            resolution: 64,
            max_train_steps: 3,
            learning_rate: 1e-3,
            targets: "extended,proj".into(),
            train_text_encoder: true,
            text_targets: "text-attn,text-mlp".into(),
            dropout: 0.1,
            gradient_checkpointing: on,
            seed: 3,
            ..Default::default()
        };
        train(c, quiet()).unwrap();
        let loss = std::fs::read_to_string(out.join("loss.csv")).unwrap();
        (out.join("lora.safetensors"), loss)
    };
    let (a, loss_a) = run("plain", false);
    let (b, loss_b) = run("checkpointed", true);
    // Per step the gradients agree within GRAD_REL_BOUND (not bit for bit), so the saved
    // factors after three AdamW steps agree within a bound, not byte for byte.
    let numbers = |t: &str| -> Vec<f64> {
        t.split([',', '\n'])
            .filter_map(|f| f.trim().parse::<f64>().ok())
            .collect()
    };
    let (na, nb) = (numbers(&loss_a), numbers(&loss_b));
    assert!(
        na.len() >= 3 && na.len() == nb.len(),
        "loss logs {loss_a} / {loss_b}"
    );
    for (x, y) in na.iter().zip(&nb) {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "loss log {x} vs {y}"
        );
    }
    let (sa, sb) = (
        lora_diffusion::formats::read(&a).unwrap(),
        lora_diffusion::formats::read(&b).unwrap(),
    );
    assert_eq!(sa.layers.len(), sb.layers.len());
    let (mut worst, mut exact) = (0f32, 0);
    for (k, w) in &sa.layers {
        let v = &sb.layers[k];
        assert_eq!(w.alpha(), v.alpha(), "{k}: alpha");
        for (x, y) in [(w.down(), v.down()), (w.up(), v.up())] {
            let rel = max_abs_diff(x, y) / max_abs(x);
            assert!(rel <= FACTOR_REL_BOUND, "{k}: factors differ by {rel:e}");
            worst = worst.max(rel);
            exact += usize::from(bits(x) == bits(y));
        }
    }
    let args = |m: &std::collections::BTreeMap<String, String>, want: bool| {
        let mut v: serde_json::Value = serde_json::from_str(&m["training_args"]).unwrap();
        let obj = v.as_object_mut().unwrap();
        assert_eq!(obj.remove("gradient_checkpointing"), Some(want.into()));
        v
    };
    assert_eq!(args(&sa.metadata, false), args(&sb.metadata, true));
    let rest = |m: &std::collections::BTreeMap<String, String>| {
        let mut m = m.clone();
        // The hashes are over the (not bit-equal) factors.
        for k in ["training_args", "sshs_model_hash", "sshs_legacy_hash"] {
            m.remove(k);
        }
        m
    };
    assert_eq!(rest(&sa.metadata), rest(&sb.metadata));
    eprintln!(
        "{} LoRA layers: {exact} of {} factors bit-equal, worst relative difference {worst:e}",
        sa.layers.len(),
        2 * sa.layers.len()
    );
}

#[test]
fn gradient_checkpointing_is_a_toml_key_recorded_in_the_training_args() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("train.toml");
    std::fs::write(&file, "gradient_checkpointing = true\nrank = 2\n").unwrap();
    let c = TrainConfig::from_sources(Some(&file), serde_json::json!({})).unwrap();
    assert!(c.gradient_checkpointing && c.rank == 2);
    assert!(!TrainConfig::default().gradient_checkpointing);
    let args = c.training_args();
    assert_eq!(args["gradient_checkpointing"], serde_json::json!(true));
    // Switching it on resume changes memory and time, not the result: no conflict; a run
    // saved before the option existed resumes too.
    let mut saved = args.clone();
    saved["gradient_checkpointing"] = false.into();
    assert!(c.resume_conflicts(&saved).is_empty());
    saved
        .as_object_mut()
        .unwrap()
        .remove("gradient_checkpointing");
    assert!(c.resume_conflicts(&saved).is_empty());
    // Full fine-tuning is refused with the option named.
    let full = TrainConfig {
        instance_data_dir: Some(dir.path().to_path_buf()),
        instance_prompt: Some("a photo".into()),
        output_dir: Some(dir.path().join("out")),
        full: true,
        ..c
    };
    let e = err_text(full.validate());
    assert!(
        e.contains("--gradient-checkpointing") && e.contains("--full"),
        "{e}"
    );
}
