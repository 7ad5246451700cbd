//! Scheduler parity with diffusers 0.35.2 (tests/fixtures/schedulers.{json,safetensors}).
//!
//! Trajectories are replayed end to end (each step gets our own previous sample) with the
//! recorded model outputs and noise. Tolerance for timesteps, sigmas, init_noise_sigma,
//! scaled inputs and samples: |ours − diffusers| ≤ 1e-4 · max(1, |diffusers|), i.e. 1e-4
//! absolute for values up to 1 and 1e-4 relative above (Euler samples reach ~50 and
//! sigmas ~160). add_noise / get_velocity / alphas_cumprod: 1e-6 absolute.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{fixtures, to_f64s};
use lora_diffusion::schedulers::{
    alphas_cumprod, build_scheduler, build_scheduler_with_eta, try_build_scheduler, DdpmScheduler,
    PredictionType, Scheduler, SchedulerConfig, SchedulerKind, TimestepSpacing,
};
use std::collections::HashMap;
use std::path::Path;

fn load_tensors() -> HashMap<String, Tensor> {
    common::load_tensors(fixtures().join("schedulers.safetensors"))
}

/// max |a − b| / max(1, |b|) and max |a − b|.
fn diffs(ours: &[f64], want: &[f64]) -> (f64, f64) {
    assert_eq!(ours.len(), want.len(), "length mismatch");
    ours.iter()
        .zip(want)
        .fold((0.0f64, 0.0f64), |(rel, abs), (a, b)| {
            let d = (a - b).abs();
            let d = if d.is_nan() { f64::INFINITY } else { d };
            (rel.max(d / b.abs().max(1.0)), abs.max(d))
        })
}

fn kind_of(class: &str) -> SchedulerKind {
    match class {
        "DDPMScheduler" => SchedulerKind::Ddpm,
        "DDIMScheduler" => SchedulerKind::Ddim,
        "EulerDiscreteScheduler" => SchedulerKind::Euler,
        "EulerAncestralDiscreteScheduler" => SchedulerKind::EulerAncestral,
        "DPMSolverMultistepScheduler" => SchedulerKind::DpmPlusPlus2M,
        other => panic!("unexpected scheduler class {other}"),
    }
}

#[test]
fn trajectories_match_diffusers() {
    let text =
        std::fs::read_to_string(fixtures().join("schedulers.json")).expect("schedulers.json");
    // Python's json writes -Infinity (lambda_min_clipped); SchedulerConfig reads it, serde_json
    // does not, so the surrounding file is cleaned here.
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text.replace("-Infinity", "null"))
        .expect("schedulers.json is a list");
    let tensors = load_tensors();
    let get = |k: &str| {
        tensors
            .get(k)
            .unwrap_or_else(|| panic!("missing tensor {k}"))
            .clone()
    };
    let tol = 1e-4;
    let mut failures = Vec::new();
    let mut worst_overall = 0.0f64;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let p = case["prefix"].as_str().unwrap();
        let steps = case["num_inference_steps"].as_u64().unwrap() as usize;
        let eta = case["eta"].as_f64().unwrap_or(0.0);
        let config =
            SchedulerConfig::from_json_str(&case["config"].to_string()).expect("config parses");
        let kind = kind_of(case["class"].as_str().unwrap());
        let mut s = try_build_scheduler(kind, &config, eta).expect("build");
        s.set_timesteps(steps).unwrap();

        let mut worst = [0.0f64; 5]; // timesteps, sigmas, init sigma, scaled inputs, samples
        let mut worst_abs = 0.0f64;
        let ts_want = to_f64s(&get(&format!("{p}.timesteps")));
        worst[0] = diffs(s.timesteps(), &ts_want).0;
        if let Some(sig) = tensors.get(&format!("{p}.sigmas")) {
            let ours = s.sigmas().unwrap_or_else(|| panic!("{name}: no sigmas"));
            worst[1] = diffs(ours, &to_f64s(sig)).0;
        }
        let init_want = to_f64s(&get(&format!("{p}.init_noise_sigma")))[0];
        worst[2] = diffs(&[s.init_noise_sigma()], &[init_want]).0;

        let mut sample = get(&format!("{p}.sample0"));
        let (mos, noise, scaled, samples) = (
            get(&format!("{p}.model_outputs")),
            get(&format!("{p}.noise")),
            get(&format!("{p}.scaled_inputs")),
            get(&format!("{p}.samples")),
        );
        let timesteps = s.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let x_in = s.scale_model_input(&sample, t).unwrap();
            worst[3] = worst[3].max(diffs(&to_f64s(&x_in), &to_f64s(&scaled.i(i).unwrap())).0);
            let n = noise.i(i).unwrap();
            let noise_arg = if s.needs_noise() { Some(&n) } else { None };
            sample = s.step(&mos.i(i).unwrap(), t, &sample, noise_arg).unwrap();
            let (rel, abs) = diffs(&to_f64s(&sample), &to_f64s(&samples.i(i).unwrap()));
            worst[4] = worst[4].max(rel);
            worst_abs = worst_abs.max(abs);
        }
        eprintln!(
            "{name:45} steps {steps:2}: timesteps {:.1e} sigmas {:.1e} init_sigma {:.1e} scaled {:.1e} samples {:.1e} (max abs {:.1e})",
            worst[0], worst[1], worst[2], worst[3], worst[4], worst_abs
        );
        let case_worst = worst.iter().copied().fold(0.0, f64::max);
        worst_overall = worst_overall.max(case_worst);
        if case_worst > tol {
            failures.push(format!("{name}: {worst:?}"));
        }
    }
    eprintln!(
        "{} cases, worst relative-or-absolute diff {worst_overall:.2e}",
        cases.len()
    );
    assert_eq!(cases.len(), 63, "fixture case count");
    assert!(
        failures.is_empty(),
        "cases over {tol}:\n{}",
        failures.join("\n")
    );
}

#[test]
fn ddpm_training_helpers_match_diffusers() {
    let tensors = load_tensors();
    let config = SchedulerConfig::from_json_str(
        r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#,
    )
    .unwrap();
    let ddpm = DdpmScheduler::new(&config).unwrap();
    let ts: Vec<usize> = to_f64s(&tensors["add_noise.timesteps"])
        .iter()
        .map(|&t| t as usize)
        .collect();
    let (orig, noise) = (&tensors["add_noise.original"], &tensors["add_noise.noise"]);
    let noisy = ddpm.add_noise(orig, noise, &ts).unwrap();
    let (_, d_noisy) = diffs(&to_f64s(&noisy), &to_f64s(&tensors["add_noise.noisy"]));
    let vel = ddpm.get_velocity(orig, noise, &ts).unwrap();
    let (_, d_vel) = diffs(&to_f64s(&vel), &to_f64s(&tensors["add_noise.velocity"]));
    eprintln!("add_noise max abs diff {d_noisy:.2e}, get_velocity {d_vel:.2e}");
    assert!(d_noisy <= 1e-6 && d_vel <= 1e-6);
    assert_eq!(
        ddpm.add_noise(orig, noise, &ts).unwrap().dtype(),
        DType::F32
    );
    assert!(
        ddpm.add_noise(orig, noise, &ts[..3]).is_err(),
        "batch / timesteps mismatch"
    );
    assert!(
        ddpm.add_noise(orig, noise, &[0, 1, 2, 1000]).is_err(),
        "timestep out of range"
    );

    for schedule in ["linear", "scaled_linear", "squaredcos_cap_v2"] {
        let c = SchedulerConfig::from_json_str(&format!(
            r#"{{"beta_schedule": "{schedule}", "beta_start": 0.00085, "beta_end": 0.012}}"#
        ))
        .unwrap();
        let (_, d) = diffs(
            &alphas_cumprod(&c),
            &to_f64s(&tensors[&format!("alphas_cumprod.{schedule}")]),
        );
        let (_, d2) = diffs(
            DdpmScheduler::new(&c).unwrap().alphas_cumprod(),
            &to_f64s(&tensors[&format!("alphas_cumprod.{schedule}")]),
        );
        eprintln!("alphas_cumprod.{schedule}: max abs diff {d:.2e}");
        assert!(d <= 1e-6 && d2 <= 1e-6, "{schedule}: {d}");
    }
}

#[test]
fn model_configs_parse_and_give_sd_timesteps() {
    let sd1 =
        SchedulerConfig::from_file(&fixtures().join("sd1-tiny/scheduler/scheduler_config.json"))
            .unwrap();
    assert_eq!(sd1.class_name.as_deref(), Some("DDIMScheduler"));
    assert_eq!(sd1.prediction_type, PredictionType::Epsilon);
    assert_eq!(sd1.steps_offset, 1);
    let mut ddim = build_scheduler(SchedulerKind::Ddim, &sd1);
    ddim.set_timesteps(50).unwrap();
    let want: Vec<f64> = (0..50).rev().map(|i| (i * 20 + 1) as f64).collect();
    assert_eq!(ddim.timesteps(), want.as_slice());

    let sd2 =
        SchedulerConfig::from_file(&fixtures().join("sd2-tiny/scheduler/scheduler_config.json"))
            .unwrap();
    assert_eq!(sd2.prediction_type, PredictionType::VPrediction);
    assert_eq!(sd2.timestep_spacing, Some(TimestepSpacing::Trailing));
    let mut ddim = build_scheduler(SchedulerKind::Ddim, &sd2);
    ddim.set_timesteps(4).unwrap();
    assert_eq!(ddim.timesteps(), &[999.0, 749.0, 499.0, 249.0]);

    // A PNDM-era SD 1.5 config: unknown keys ignored, Euler falls back to its linspace default.
    let pndm = SchedulerConfig::from_json_str(
        r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1, "trained_betas": null,
            "lambda_min_clipped": -Infinity}"#,
    )
    .unwrap();
    assert_eq!(pndm.timestep_spacing, None);
    assert_eq!(pndm.lambda_min_clipped(), f64::NEG_INFINITY);
    let mut euler = build_scheduler(SchedulerKind::Euler, &pndm);
    euler.set_timesteps(3).unwrap();
    assert_eq!(euler.timesteps(), &[999.0, 499.5, 0.0]);
    let sig = euler.sigmas().unwrap();
    assert_eq!(sig.len(), 4);
    assert_eq!(sig[3], 0.0);
    assert!(
        (euler.init_noise_sigma() - sig[0]).abs() < 1e-12,
        "linspace: init sigma = sigma_max"
    );
    // `_use_default_values` keys fall back to the class default.
    let c = SchedulerConfig::from_json_str(
        r#"{"timestep_spacing": "leading", "_use_default_values": ["timestep_spacing"]}"#,
    )
    .unwrap();
    assert_eq!(c.timestep_spacing, None);
}

#[test]
fn bad_configs_and_missing_noise_are_errors() {
    let missing = Path::new("/nonexistent/scheduler_config.json");
    let msg = format!("{:#}", SchedulerConfig::from_file(missing).unwrap_err());
    assert!(msg.contains("/nonexistent/scheduler_config.json"), "{msg}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler_config.json");
    std::fs::write(&path, r#"{"prediction_type": "flow"}"#).unwrap();
    let msg = format!("{:#}", SchedulerConfig::from_file(&path).unwrap_err());
    assert!(
        msg.contains("scheduler_config.json") && msg.contains("v_prediction"),
        "{msg}"
    );
    std::fs::write(&path, r#"{"beta_start": "#).unwrap();
    assert!(SchedulerConfig::from_file(&path).is_err());
    let bad_betas = SchedulerConfig::from_json_str(r#"{"trained_betas": [0.1, 0.2]}"#);
    assert!(format!("{:#}", bad_betas.unwrap_err()).contains("trained_betas"));

    let config = SchedulerConfig::default();
    let sample = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let out = sample.affine(0.1, 0.0).unwrap();
    for (kind, eta) in [
        (SchedulerKind::Ddpm, 0.0),
        (SchedulerKind::Ddim, 0.5),
        (SchedulerKind::EulerAncestral, 0.0),
    ] {
        let mut s = build_scheduler_with_eta(kind, &config, eta);
        s.set_timesteps(5).unwrap();
        assert!(s.needs_noise(), "{kind}");
        let t = s.timesteps()[0];
        let err = s.step(&out, t, &sample, None).unwrap_err().to_string();
        assert!(err.contains("noise"), "{kind}: {err}");
    }
    for kind in [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::DpmPlusPlus2M,
    ] {
        let mut s = build_scheduler(kind, &config);
        s.set_timesteps(5).unwrap();
        assert!(!s.needs_noise(), "{kind}");
        let t = s.timesteps()[0];
        assert!(s.step(&out, t, &sample, None).is_ok(), "{kind}");
        assert!(s.set_timesteps(0).is_err() && s.set_timesteps(1001).is_err());
    }
    let dpm_sde = SchedulerConfig {
        algorithm_type: "sde-dpmsolver++".into(),
        ..Default::default()
    };
    let s = lora_diffusion::schedulers::DpmSolverMultistepScheduler::new(&dpm_sde).unwrap();
    assert!(s.needs_noise());
}

#[test]
fn f16_samples_keep_their_dtype() {
    let config = SchedulerConfig::default();
    let sample = Tensor::ones((1, 4, 2, 2), DType::F16, &Device::Cpu).unwrap();
    let out = sample.affine(0.1, 0.0).unwrap();
    for (kind, _) in SchedulerKind::ALL {
        let mut s = build_scheduler(kind, &config);
        s.set_timesteps(4).unwrap();
        let t = s.timesteps()[0];
        let x = s.scale_model_input(&sample, t).unwrap();
        assert_eq!(x.dtype(), DType::F16, "{kind}");
        let noise = sample.zeros_like().unwrap();
        let prev = s.step(&out, t, &sample, Some(&noise)).unwrap();
        assert_eq!(prev.dtype(), DType::F16, "{kind}");
    }
}
