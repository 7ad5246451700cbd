//! Mixed-precision training (`--mixed-precision bf16|fp16`) and the parts of the model that
//! training frees, on the bundled tiny model.

mod common;

use candle_core::DType;
use common::{expect_success, load_tensors, lora, max_abs, repo, s};
use lora_diffusion::train::config::MixedPrecision;
use lora_diffusion::train::{TrainConfig, TrainHooks, Trainer};
use std::path::Path;

fn quiet() -> TrainHooks {
    TrainHooks {
        quiet: true,
        ..Default::default()
    }
}

fn cfg(out: &Path, mp: MixedPrecision) -> TrainConfig {
    TrainConfig {
        instance_data_dir: Some(repo().join("tests/fixtures/train-data")),
        instance_prompt: Some("a photo of sks toy".into()),
        output_dir: Some(out.to_path_buf()),
        resolution: 64,
        max_train_steps: 40,
        learning_rate: 1e-2,
        batch_size: 2,
        targets: "attn,ff,proj".into(),
        center_crop: true,
        cache_latents: true,
        seed: 1,
        mixed_precision: mp,
        ..Default::default()
    }
}

/// Mean of the first and of the last ten losses.
fn first_last(losses: &[f64]) -> (f64, f64) {
    let n = losses.len();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    (mean(&losses[..10]), mean(&losses[n - 10..]))
}

#[test]
fn half_precision_training_learns_and_saves_f32() {
    for mp in [MixedPrecision::Bf16, MixedPrecision::Fp16] {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Trainer::new(cfg(&dir.path().join("run"), mp), quiet()).unwrap();
        assert_eq!(t.sd().dtype, mp.dtype());
        let outcome = t.run().unwrap();
        let l: Vec<f64> = outcome.losses.iter().map(|p| p.loss).collect();
        assert_eq!(
            l.len(),
            40,
            "{mp}: every step applied (no fp16 overflow here)"
        );
        let (first, last) = first_last(&l);
        eprintln!("{mp}: mean loss of steps 1-10 {first:.4}, of steps 31-40 {last:.4}");
        // Margin as for f32 training: the last ten average at least 25% below the first ten.
        assert!(last < 0.75 * first, "{mp}: {first} -> {last}");
        let saved = load_tensors(outcome.output.unwrap());
        assert!(!saved.is_empty());
        for (k, v) in &saved {
            assert_eq!(v.dtype(), DType::F32, "{mp}: {k}");
            let m = max_abs(v);
            assert!(m.is_finite(), "{mp}: {k}");
        }
        let ups: f32 = saved
            .iter()
            .filter(|(k, _)| k.contains("lora_up"))
            .map(|(_, v)| {
                v.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .sum();
        assert!(ups > 0.0, "{mp}: the up factors moved from their zero init");
    }
}

#[test]
fn fp16_overflow_skips_the_step_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let data = repo().join("tests/fixtures/train-data");
    // A loss scale of 1e30 overflows fp16 gradients: every step is skipped, halving the scale.
    let o = lora(&[
        "train",
        "--instance-data-dir",
        s(&data),
        "--instance-prompt",
        "a toy",
        "--resolution",
        "64",
        "--max-train-steps",
        "3",
        "--mixed-precision",
        "fp16",
        "--initial-loss-scale",
        "1e30",
        "--output-dir",
        s(&out),
    ]);
    expect_success(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    for step in 1..=3 {
        let want = format!("step {step}: fp16 overflow");
        assert!(err.contains(&want), "missing '{want}' in: {err}");
    }
    let lora_file = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .expect("a LoRA file");
    // No step was applied: the up factors keep their zero init, nothing is NaN.
    for (k, v) in load_tensors(&lora_file) {
        let m = max_abs(&v);
        assert!(m.is_finite(), "{k}");
        if k.contains("lora_up") {
            assert_eq!(m, 0.0, "{k}");
        }
    }
}

#[test]
fn training_frees_what_it_does_not_run_and_the_result_is_unchanged() {
    let run = |cache_text: bool| {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(&dir.path().join("run"), MixedPrecision::No);
        c.max_train_steps = 4;
        c.cache_text_embeddings = cache_text;
        let mut t = Trainer::new(c, quiet()).unwrap();
        let sd = t.sd();
        assert!(
            sd.vae.encoder().is_none(),
            "latents are cached: encoder freed"
        );
        assert!(sd.vae.decoder().is_none(), "no samples: decoder freed");
        assert_eq!(sd.text_encoder().is_err(), cache_text);
        let out = t.run().unwrap().output.unwrap();
        (std::fs::read(out).unwrap(), dir)
    };
    let (cached, _d1) = run(true);
    let (encoded, _d2) = run(false);
    assert!(
        cached == encoded,
        "cached embeddings must give the same LoRA bytes"
    );
}
