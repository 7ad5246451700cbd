//! CLIP text encoder: parity with transformers on the tiny fixtures, real-size key sets, config
//! parsing and input checks.

mod common;

use candle_core::{DType, Device, Tensor};
use lora_diffusion::models::clip::{ClipActivation, ClipTextConfig, ClipTextModel};
use lora_diffusion::models::weights::ModelWeights;
use std::collections::BTreeMap;

use common::{
    assert_requested_keys, fixtures, load_clip, max_abs, max_abs_diff, outputs, read_json,
};

fn parity(model: &str) {
    let clip = load_clip(model, DType::F32);
    let out = outputs(model);
    let ids = out["clip.input_ids"].to_dtype(DType::U32).unwrap();
    let want = &out["clip.last_hidden_state"];
    let got = clip.forward(&ids).unwrap();
    let d = max_abs_diff(&got, want);
    eprintln!("{model} clip.last_hidden_state max abs diff {d:e}");
    assert!(d <= 1e-4, "{model} last_hidden_state differs by {d}");

    let want = &out["clip.skip1"];
    let got = clip.forward_with_clip_skip(&ids, 1).unwrap();
    let d = max_abs_diff(&got, want);
    eprintln!("{model} clip.skip1 max abs diff {d:e}");
    assert!(d <= 1e-4, "{model} skip1 differs by {d}");
    // Skip 1 really is a different output.
    assert!(max_abs_diff(&got, &out["clip.last_hidden_state"]) > 1e-3);

    // The i64 ids of the fixture are accepted as they are.
    let got = clip.forward(&out["clip.input_ids"]).unwrap();
    assert!(max_abs_diff(&got, &out["clip.last_hidden_state"]) <= 1e-4);
}

#[test]
fn sd1_tiny_matches_transformers() {
    parity("sd1");
}

#[test]
fn sd2_tiny_matches_transformers() {
    parity("sd2");
}

#[test]
fn half_precision_stays_close_to_f32() {
    let out = outputs("sd1");
    let ids = out["clip.input_ids"].narrow(0, 0, 2).unwrap();
    let want = out["clip.last_hidden_state"].narrow(0, 0, 2).unwrap();
    let scale = max_abs(&want);
    for (dtype, tol) in [(DType::F16, 0.02f32), (DType::BF16, 0.1)] {
        let clip = load_clip("sd1", dtype);
        let got = clip.forward(&ids).unwrap();
        assert_eq!(got.dtype(), dtype);
        let d = max_abs_diff(&got, &want);
        eprintln!("sd1 clip {dtype:?} max abs diff {d:e} (output scale {scale})");
        assert!(
            d.is_finite() && d <= tol * scale.max(1.0),
            "{dtype:?} differs by {d}"
        );
    }
}

/// Builds the real-size model from a structure fixture and compares the requested key set.
fn structure(model: &str) {
    let path = fixtures().join(format!("structure/{model}.text_encoder.json"));
    let json = read_json(&path);
    let cfg = ClipTextConfig::from_json_str(&json["config"].to_string(), "structure").unwrap();
    let want: BTreeMap<String, Vec<usize>> = serde_json::from_value(json["keys"].clone()).unwrap();
    let want: BTreeMap<String, Vec<usize>> = want
        .into_iter()
        .filter(|(k, _)| k != "text_model.embeddings.position_ids")
        .collect();
    let weights = ModelWeights::structure_only("text_encoder");
    ClipTextModel::new(weights.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    assert_requested_keys(
        &format!("{model} text encoder"),
        &want,
        &weights.requested(),
    );
}

#[test]
fn sd15_real_size_keys() {
    structure("sd15");
}

#[test]
fn sd21_real_size_keys() {
    structure("sd21");
}

#[test]
fn config_defaults_and_activations() {
    let cfg = ClipTextConfig::from_json_str("{}", "empty").unwrap();
    assert_eq!(cfg, ClipTextConfig::default());
    assert_eq!(cfg.vocab_size, 49408);
    assert_eq!(cfg.hidden_size, 512);
    assert_eq!(cfg.intermediate_size, 2048);
    assert_eq!(cfg.num_hidden_layers, 12);
    assert_eq!(cfg.num_attention_heads, 8);
    assert_eq!(cfg.max_position_embeddings, 77);
    assert_eq!(cfg.hidden_act, ClipActivation::QuickGelu);
    assert_eq!(cfg.layer_norm_eps, 1e-5);

    let cfg = ClipTextConfig::from_json_str(
        r#"{"hidden_act": "gelu", "hidden_size": 64, "num_attention_heads": 4,
            "projection_dim": null, "model_type": "clip_text_model"}"#,
        "inline",
    )
    .unwrap();
    assert_eq!(cfg.hidden_act, ClipActivation::Gelu);
    assert_eq!(cfg.projection_dim, 512);
    assert_eq!(cfg.head_dim(), 16);
    let cfg = ClipTextConfig::from_json_str(r#"{"hidden_act": "gelu_new"}"#, "inline").unwrap();
    assert_eq!(cfg.hidden_act, ClipActivation::GeluNew);

    let err = ClipTextConfig::from_json_str(r#"{"hidden_act": "relu6"}"#, "inline").unwrap_err();
    assert!(format!("{err:#}").contains("inline"), "{err:#}");
    let err =
        ClipTextConfig::from_json_str(r#"{"hidden_size": 30, "num_attention_heads": 4}"#, "inline")
            .unwrap_err();
    assert!(format!("{err:#}").contains("divisible"), "{err:#}");
    assert!(ClipTextConfig::from_file("/nonexistent/config.json").is_err());
}

#[test]
#[allow(clippy::type_complexity)]
fn activations_match_their_formulas() {
    let x = Tensor::new(&[-3.0f32, -1.0, -0.25, 0.0, 0.5, 2.0], &Device::Cpu).unwrap();
    let xs: Vec<f32> = x.to_vec1().unwrap();
    let erf_gelu = |v: f64| {
        // x * Phi(x), with Phi integrated by Simpson's rule.
        let n = 20000;
        let (a, b) = (-10.0f64, v);
        let h = (b - a) / n as f64;
        let pdf = |t: f64| (-(t * t) / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let mut s = pdf(a) + pdf(b);
        for i in 1..n {
            s += pdf(a + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        v * s * h / 3.0
    };
    let cases: [(ClipActivation, Box<dyn Fn(f64) -> f64>); 3] = [
        (
            ClipActivation::QuickGelu,
            Box::new(|v: f64| v / (1.0 + (-1.702 * v).exp())),
        ),
        (ClipActivation::Gelu, Box::new(erf_gelu)),
        (
            ClipActivation::GeluNew,
            Box::new(|v: f64| {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
            }),
        ),
    ];
    for (act, f) in cases.iter() {
        let y: Vec<f32> = act.forward(&x).unwrap().to_vec1().unwrap();
        for (xi, yi) in xs.iter().zip(&y) {
            let want = f(*xi as f64);
            assert!(
                (*yi as f64 - want).abs() < 1e-5,
                "{act:?}({xi}) = {yi}, expected {want}"
            );
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let clip = load_clip("sd1", DType::F32);
    let ok = Tensor::new(&[[49406u32, 320, 49407]], &Device::Cpu).unwrap();
    assert_eq!(clip.forward(&ok).unwrap().dims(), &[1, 3, 32]);
    // Fewer tokens than 77 see the same prefix as with padding after them (causal mask).
    let padded = Tensor::new(&[[49406u32, 320, 49407, 49407]], &Device::Cpu).unwrap();
    let long = clip.forward(&padded).unwrap().narrow(1, 0, 3).unwrap();
    assert!(max_abs_diff(&long, &clip.forward(&ok).unwrap()) < 1e-5);

    let out_of_vocab = Tensor::new(&[[49406u32, 49408]], &Device::Cpu).unwrap();
    let err = clip.forward(&out_of_vocab).unwrap_err().to_string();
    assert!(err.contains("49408"), "{err}");
    let negative = Tensor::new(&[[0i64, -1]], &Device::Cpu).unwrap();
    assert!(clip.forward(&negative).is_err());
    let too_long = Tensor::zeros((1, 78), DType::U32, &Device::Cpu).unwrap();
    assert!(clip.forward(&too_long).is_err());
    let float = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(clip.forward(&float).is_err());
    let rank1 = Tensor::zeros(4, DType::U32, &Device::Cpu).unwrap();
    assert!(clip.forward(&rank1).is_err());
    assert!(clip.forward_with_clip_skip(&ok, 4).is_err());
    // clip_skip == number of layers is the embedding output, normalised.
    assert_eq!(
        clip.forward_with_clip_skip(&ok, 3).unwrap().dims(),
        &[1, 3, 32]
    );
}
