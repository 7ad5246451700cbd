//! AutoencoderKL: parity with diffusers on the tiny fixtures, real-size key sets, config parsing,
//! the latent distribution and input checks.

mod common;

use candle_core::{DType, Device, Tensor};
use lora_diffusion::models::vae::{AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian};
use lora_diffusion::models::weights::ModelWeights;
use std::collections::BTreeMap;

use common::{
    assert_requested_keys, fixtures, load_vae, max_abs, max_abs_diff, outputs, read_json,
};

fn parity(model: &str) {
    let vae = load_vae(model, DType::F32);
    assert_eq!(vae.config().downsample_factor(), 2);
    let out = outputs(model);
    let dist = vae.encode(&out["vae.image"]).unwrap();
    for (name, got) in [
        ("vae.latent_mean", &dist.mean),
        ("vae.latent_logvar", &dist.logvar),
    ] {
        let want = &out[name];
        let d = max_abs_diff(got, want);
        eprintln!(
            "{model} {name} max abs diff {d:e} (values up to {})",
            max_abs(want)
        );
        assert!(d <= 1e-4, "{model} {name} differs by {d}");
    }
    let want = &out["vae.decoded"];
    let got = vae.decode(&out["vae.decode_input"]).unwrap();
    let d = max_abs_diff(&got, want);
    eprintln!(
        "{model} vae.decoded max abs diff {d:e} (values up to {})",
        max_abs(want)
    );
    assert!(d <= 1e-4, "{model} decoded differs by {d}");
}

#[test]
fn sd1_tiny_matches_diffusers() {
    parity("sd1");
}

#[test]
fn sd2_tiny_matches_diffusers() {
    parity("sd2");
}

#[test]
fn half_precision_stays_close_to_f32() {
    let out = outputs("sd1");
    let want = &out["vae.decoded"];
    let scale = max_abs(want).max(1.0);
    for (dtype, tol) in [(DType::F16, 0.02f32), (DType::BF16, 0.1)] {
        let vae = load_vae("sd1", dtype);
        let z = out["vae.decode_input"].to_dtype(dtype).unwrap();
        let got = vae.decode(&z).unwrap();
        assert_eq!(got.dtype(), dtype);
        let d = max_abs_diff(&got, want);
        eprintln!("sd1 vae.decoded {dtype:?} max abs diff {d:e}");
        assert!(
            d.is_finite() && d <= tol * scale,
            "{dtype:?} decode differs by {d}"
        );
        let image = out["vae.image"].to_dtype(dtype).unwrap();
        let mean = vae.encode(&image).unwrap().mean;
        let d = max_abs_diff(&mean, &out["vae.latent_mean"]);
        eprintln!("sd1 vae.latent_mean {dtype:?} max abs diff {d:e}");
        assert!(
            d.is_finite() && d <= tol * scale,
            "{dtype:?} encode differs by {d}"
        );
    }
}

/// Builds the real-size model from a structure fixture and compares the requested key set.
fn structure(model: &str) {
    let path = fixtures().join(format!("structure/{model}.vae.json"));
    let json = read_json(&path);
    let cfg = AutoencoderKLConfig::from_json_str(&json["config"].to_string(), "structure").unwrap();
    assert_eq!(cfg.downsample_factor(), 8);
    let want: BTreeMap<String, Vec<usize>> = serde_json::from_value(json["keys"].clone()).unwrap();
    let weights = ModelWeights::structure_only("vae");
    AutoencoderKL::new(weights.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    assert_requested_keys(&format!("{model} vae"), &want, &weights.requested());
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
fn config_defaults_and_validation() {
    let cfg = AutoencoderKLConfig::from_json_str("{}", "empty").unwrap();
    assert_eq!(cfg, AutoencoderKLConfig::default());
    assert_eq!(
        (cfg.in_channels, cfg.out_channels, cfg.latent_channels),
        (3, 3, 4)
    );
    assert_eq!(cfg.block_out_channels, vec![64]);
    assert_eq!(cfg.layers_per_block, 1);
    assert_eq!(cfg.norm_num_groups, 32);
    assert_eq!(cfg.sample_size, 32);
    assert_eq!(cfg.scaling_factor, 0.18215);
    assert_eq!(cfg.shift_factor, None);
    assert!(cfg.force_upcast && cfg.use_quant_conv && cfg.use_post_quant_conv);
    assert!(cfg.mid_block_add_attention);
    assert_eq!(cfg.downsample_factor(), 1);

    let cfg = AutoencoderKLConfig::from_json_str(
        r#"{"block_out_channels": [32, 64, 64], "down_block_types": ["DownEncoderBlock2D",
            "DownEncoderBlock2D", "DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D",
            "UpDecoderBlock2D", "UpDecoderBlock2D"], "norm_num_groups": 8, "sample_size": [512, 512],
            "shift_factor": 0.1159, "latents_mean": null, "scaling_factor": 0.3611,
            "_class_name": "AutoencoderKL"}"#,
        "inline",
    )
    .unwrap();
    assert_eq!(cfg.downsample_factor(), 4);
    assert_eq!(cfg.sample_size, 512);
    assert_eq!(cfg.shift_factor, Some(0.1159));

    for (bad, needle) in [
        (r#"{"down_block_types": ["DownBlock2D"]}"#, "DownBlock2D"),
        (r#"{"block_out_channels": [64, 128]}"#, "one entry per"),
        (r#"{"act_fn": "mish"}"#, "mish"),
        (
            r#"{"block_out_channels": [48]}"#,
            "multiple of norm_num_groups",
        ),
        (r#"{"block_out_channels": []}"#, "empty"),
        (r#"{"latent_channels": "four"}"#, "inline"),
    ] {
        let err = AutoencoderKLConfig::from_json_str(bad, "inline").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(needle), "{bad}: {msg}");
    }
    assert!(AutoencoderKLConfig::from_file("/nonexistent/config.json").is_err());
}

#[test]
fn diagonal_gaussian_follows_diffusers() {
    let dev = Device::Cpu;
    // Moments [1, 4, 1, 2]: mean channels 0..2, logvar channels 2..4 (with out-of-range values).
    let moments = Tensor::new(
        &[[
            [[0.5f32, -1.0]],
            [[2.0, 0.0]],
            [[-40.0, 0.2]],
            [[25.0, -2.0]],
        ]],
        &dev,
    )
    .unwrap();
    let d = DiagonalGaussian::from_moments(&moments).unwrap();
    let mean: Vec<f32> = d.mean.flatten_all().unwrap().to_vec1().unwrap();
    let logvar: Vec<f32> = d.logvar.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(mean, vec![0.5, -1.0, 2.0, 0.0]);
    assert_eq!(logvar, vec![-30.0, 0.2, 20.0, -2.0]);
    let noise = Tensor::new(&[[[[1.0f32, -0.5]], [[2.0, 3.0]]]], &dev).unwrap();
    let s: Vec<f32> = d
        .sample(&noise)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let n = [1.0f32, -0.5, 2.0, 3.0];
    for i in 0..4 {
        let want = mean[i] + (0.5 * logvar[i]).exp() * n[i];
        assert!(
            (s[i] - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{i}: {} vs {want}",
            s[i]
        );
    }
    let var: Vec<f32> = d.var().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!((var[1] - 0.2f32.exp()).abs() < 1e-6);
    assert!(d.sample(&noise.narrow(3, 0, 1).unwrap()).is_err());
    assert!(DiagonalGaussian::from_moments(&moments.narrow(1, 0, 3).unwrap()).is_err());
}

#[test]
fn shapes_scaling_and_bad_inputs() {
    let vae = load_vae("sd1", DType::F32);
    let dev = Device::Cpu;
    // Odd sizes work as in diffusers: pad right/bottom by one, stride-2 conv (9 -> 4).
    let x = Tensor::zeros((2, 3, 9, 12), DType::F32, &dev).unwrap();
    let dist = vae.encode(&x).unwrap();
    assert_eq!(dist.mean.dims(), &[2, 4, 4, 6]);
    assert_eq!(dist.std().unwrap().dims(), &[2, 4, 4, 6]);
    assert_eq!(vae.decode(&dist.mean).unwrap().dims(), &[2, 3, 8, 12]);

    let z = Tensor::new(&[1.0f32, -2.0], &dev).unwrap();
    let scaled: Vec<f32> = vae.scale_latents(&z).unwrap().to_vec1().unwrap();
    assert!((scaled[0] - 0.18215).abs() < 1e-7 && (scaled[1] + 0.3643).abs() < 1e-7);
    let back = vae
        .unscale_latents(&vae.scale_latents(&z).unwrap())
        .unwrap();
    assert!(max_abs_diff(&back, &z) < 1e-6);

    assert!(vae
        .encode(&Tensor::zeros((1, 4, 8, 8), DType::F32, &dev).unwrap())
        .is_err());
    assert!(vae
        .encode(&Tensor::zeros((3, 8, 8), DType::F32, &dev).unwrap())
        .is_err());
    assert!(vae
        .decode(&Tensor::zeros((1, 3, 8, 8), DType::F32, &dev).unwrap())
        .is_err());
}
