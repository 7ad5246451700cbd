//! UNet2DConditionModel parity with diffusers (tiny fixtures) and real-size key sets.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{assert_requested_keys, max_abs, max_abs_diff};
use lora_diffusion::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use lora_diffusion::models::weights::ModelWeights;

/// `tests/fixtures`, or `$LORA_FIXTURES_DIR` when set (a freshly generated copy).
fn fixtures() -> PathBuf {
    std::env::var_os("LORA_FIXTURES_DIR").map_or_else(common::fixtures, PathBuf::from)
}

/// The reference outputs of tiny model `model` (`sd1-tiny` -> `sd1.outputs.safetensors`).
fn outputs_path(model: &str) -> PathBuf {
    let short = model.trim_end_matches("-tiny");
    let named = fixtures().join(format!("{model}.outputs.safetensors"));
    if named.exists() {
        named
    } else {
        fixtures().join(format!("{short}.outputs.safetensors"))
    }
}

fn load_unet(model: &str, dtype: DType) -> anyhow::Result<UNet2DConditionModel> {
    let dir = fixtures().join(model).join("unet");
    let cfg = UNet2DConditionConfig::from_file(dir.join("config.json"))?;
    let weights =
        ModelWeights::from_files("unet", &[dir.join("diffusion_pytorch_model.safetensors")])?;
    let unet = UNet2DConditionModel::new(weights.var_builder(dtype, &Device::Cpu), &cfg)?;
    weights.finish()?;
    Ok(unet)
}

/// Runs the UNet for every fixture timestep; returns (timestep, ours, expected) triples.
fn run_fixture(model: &str, dtype: DType) -> anyhow::Result<Vec<(f32, Tensor, Tensor)>> {
    let unet = load_unet(model, dtype)?;
    let path = outputs_path(model);
    let t = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let get = |k: &str| {
        t.get(k)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{} lacks {k}", path.display()))
    };
    let sample = get("unet.sample")?;
    let ehs = get("unet.encoder_hidden_states")?;
    let timesteps = get("unet.timesteps")?.to_vec1::<f32>()?;
    let expected = get("unet.output")?;
    let mut out = Vec::new();
    for (k, &ts) in timesteps.iter().enumerate() {
        let b = sample.dim(0)?;
        let tt = Tensor::full(ts, b, &Device::Cpu)?;
        let ours = unet.forward(&sample, &tt, &ehs)?;
        out.push((ts, ours, expected.get(k)?));
    }
    Ok(out)
}

fn check_fp32(model: &str) -> anyhow::Result<()> {
    let mut worst = 0f32;
    for (ts, ours, exp) in run_fixture(model, DType::F32)? {
        let d = max_abs_diff(&ours, &exp);
        eprintln!(
            "{model} unet t={ts}: max abs diff {d:.3e} (output max abs {:.3})",
            max_abs(&exp)
        );
        worst = worst.max(d);
    }
    assert!(worst <= 1e-4, "{model}: max abs diff {worst:e} > 1e-4");
    Ok(())
}

#[test]
fn sd1_tiny_unet_matches_diffusers() -> anyhow::Result<()> {
    check_fp32("sd1-tiny")
}

#[test]
fn sd2_tiny_unet_matches_diffusers() -> anyhow::Result<()> {
    check_fp32("sd2-tiny")
}

#[test]
fn forward_t_equals_forward_with_tensor() -> anyhow::Result<()> {
    let unet = load_unet("sd1-tiny", DType::F32)?;
    let path = outputs_path("sd1-tiny");
    let t = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let sample = &t["unet.sample"];
    let ehs = &t["unet.encoder_hidden_states"];
    let a = unet.forward_t(sample, 250.5, ehs)?;
    let b = unet.forward(sample, &Tensor::new(&[250.5f32, 250.5], &Device::Cpu)?, ehs)?;
    let d = max_abs_diff(&a, &b);
    eprintln!("forward_t vs forward: max abs diff {d:e}");
    assert_eq!(d, 0.0);
    Ok(())
}

fn check_low_precision(model: &str, dtype: DType, tol: f32) -> anyhow::Result<()> {
    let mut worst = 0f32;
    for (ts, ours, exp) in run_fixture(model, dtype)? {
        assert_eq!(ours.dtype(), dtype);
        let d = max_abs_diff(&ours, &exp);
        eprintln!(
            "{model} unet {dtype:?} t={ts}: max abs diff vs f32 diffusers {d:.3e} (output max abs {:.3})",
            max_abs(&exp)
        );
        worst = worst.max(d);
    }
    assert!(
        worst.is_finite() && worst <= tol,
        "{dtype:?}: max abs diff {worst} > {tol}"
    );
    Ok(())
}

#[test]
fn sd1_tiny_unet_f16_close_to_f32() -> anyhow::Result<()> {
    check_low_precision("sd1-tiny", DType::F16, 1e-2)
}

#[test]
fn sd2_tiny_unet_f16_close_to_f32() -> anyhow::Result<()> {
    // sd2-tiny has upcast_attention: scores and softmax in f32.
    check_low_precision("sd2-tiny", DType::F16, 1e-2)
}

#[test]
fn sd1_tiny_unet_bf16_close_to_f32() -> anyhow::Result<()> {
    check_low_precision("sd1-tiny", DType::BF16, 5e-2)
}

#[test]
fn odd_latent_sizes_run() -> anyhow::Result<()> {
    // diffusers forwards the skip sizes to the upsamplers when H, W are not multiples of 4.
    let unet = load_unet("sd1-tiny", DType::F32)?;
    let sample = Tensor::randn(0f32, 1., (1, 4, 7, 5), &Device::Cpu)?;
    let ehs = Tensor::randn(0f32, 1., (1, 77, 32), &Device::Cpu)?;
    let out = unet.forward_t(&sample, 10.0, &ehs)?;
    assert_eq!(out.dims(), &[1, 4, 7, 5]);
    Ok(())
}

fn check_structure(name: &str) -> anyhow::Result<()> {
    let path = fixtures().join(format!("structure/{name}.unet.json"));
    let text = std::fs::read_to_string(&path)?;
    let json: serde_json::Value = serde_json::from_str(&text)?;
    let cfg: UNet2DConditionConfig = serde_json::from_value(json["config"].clone())?;
    let expected: BTreeMap<String, Vec<usize>> = serde_json::from_value(json["keys"].clone())?;
    let weights = ModelWeights::structure_only("unet");
    let _unet = UNet2DConditionModel::new(weights.var_builder(DType::F32, &Device::Cpu), &cfg)?;
    assert_requested_keys(&format!("{name} unet"), &expected, &weights.requested());
    Ok(())
}

#[test]
fn sd15_unet_structure_matches_diffusers_keys() -> anyhow::Result<()> {
    check_structure("sd15")
}

#[test]
fn sd21_unet_structure_matches_diffusers_keys() -> anyhow::Result<()> {
    check_structure("sd21")
}

#[test]
fn config_defaults_and_rejections() -> anyhow::Result<()> {
    let cfg: UNet2DConditionConfig = serde_json::from_str("{}")?;
    assert_eq!(cfg.block_out_channels, vec![320, 640, 1280, 1280]);
    assert_eq!(cfg.norm_num_groups, Some(32));
    let r = cfg.resolve().map_err(anyhow::Error::msg)?;
    assert_eq!(r.time_embed_dim, 1280);
    assert_eq!(r.levels[0].heads, 8);
    assert!(r.mid_block);
    for bad in [
        r#"{"addition_embed_type": "text_time"}"#,
        r#"{"class_embed_type": "timestep"}"#,
        r#"{"time_embedding_type": "fourier"}"#,
        r#"{"resnet_time_scale_shift": "scale_shift"}"#,
        r#"{"transformer_layers_per_block": [[1], [2], [3], [4]]}"#,
        r#"{"attention_head_dim": [5, 10]}"#,
        r#"{"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]}"#,
    ] {
        let cfg: UNet2DConditionConfig = serde_json::from_str(bad)?;
        let err = cfg.resolve().expect_err(bad);
        eprintln!("rejected {bad}: {err}");
        let weights = ModelWeights::structure_only("unet");
        assert!(
            UNet2DConditionModel::new(weights.var_builder(DType::F32, &Device::Cpu), &cfg).is_err()
        );
    }
    Ok(())
}
