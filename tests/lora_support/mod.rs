//! Helpers shared by tests/lora.rs and tests/grad_parity.rs: tiny-model loading and
//! tensor comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lora_diffusion::models::clip::{ClipTextConfig, ClipTextModel};
use lora_diffusion::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use lora_diffusion::models::weights::ModelWeights;

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tensors of `<model>-tiny/unet` (e.g. to rebuild a UNet with changed weights).
pub fn unet_tensors(model: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join(format!(
        "{model}-tiny/unet/diffusion_pytorch_model.safetensors"
    ));
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap()
}

/// The config of `<model>-tiny/unet`.
pub fn unet_config(model: &str) -> UNet2DConditionConfig {
    let path = fixtures().join(format!("{model}-tiny/unet/config.json"));
    UNet2DConditionConfig::from_file(path).unwrap()
}

/// Builds the tiny UNet of `model` from `tensors` in `dtype`.
pub fn unet_from(
    model: &str,
    tensors: HashMap<String, Tensor>,
    dtype: DType,
) -> UNet2DConditionModel {
    let weights = ModelWeights::from_tensors("unet", tensors);
    let unet = UNet2DConditionModel::new(
        weights.var_builder(dtype, &Device::Cpu),
        &unet_config(model),
    )
    .unwrap();
    weights.finish().unwrap();
    unet
}

/// The tiny UNet of `model` (`sd1` / `sd2`).
pub fn load_unet(model: &str, dtype: DType) -> UNet2DConditionModel {
    unet_from(model, unet_tensors(model), dtype)
}

/// The tiny text encoder of `model`.
pub fn load_clip(model: &str, dtype: DType) -> ClipTextModel {
    let dir = fixtures().join(format!("{model}-tiny/text_encoder"));
    let cfg = ClipTextConfig::from_file(dir.join("config.json")).unwrap();
    let weights =
        ModelWeights::from_files("text_encoder", &[dir.join("model.safetensors")]).unwrap();
    let clip = ClipTextModel::new(weights.var_builder(dtype, &Device::Cpu), &cfg).unwrap();
    weights.finish().unwrap();
    clip
}

/// `<model>.outputs.safetensors`.
pub fn outputs(model: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join(format!("{model}.outputs.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap()
}

/// max |a - b| in f32 (shapes must agree).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |a| in f32.
pub fn max_abs(a: &Tensor) -> f32 {
    a.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Mean squared error, differentiable.
pub fn mse(a: &Tensor, b: &Tensor) -> Tensor {
    (a - b).unwrap().sqr().unwrap().mean_all().unwrap()
}
