//! Loading the components of a diffusers folder, each with errors that name the file.

use super::lora::fuse_into_weights;
use crate::hub::ModelSource;
use crate::lora::{Component, LoraSet};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::schedulers::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;
use anyhow::Context;
use candle_core::{DType, Device};
use std::path::PathBuf;

/// Reads and parses `<component>/config.json` with `parse`.
pub fn load_component_config<T>(
    source: &ModelSource,
    component: &str,
    parse: impl FnOnce(&std::path::Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let path = source.require(&format!("{component}/config.json"))?;
    parse(&path)
}

/// Loads weights for `component`, builds the model with `build`, then checks the key set.
fn build<M>(
    source: &ModelSource,
    component: &str,
    dtype: DType,
    device: &Device,
    fuse: &[(LoraSet, f64)],
    build: impl FnOnce(candle_nn::VarBuilder<'static>) -> candle_core::Result<M>,
) -> anyhow::Result<M> {
    let weights = source.weights(component)?;
    let weights = match Component::from_name(component) {
        Some(part) => fuse_into_weights(&weights, part, fuse)?,
        None => weights,
    };
    let model = build(weights.var_builder(dtype, device))
        .map_err(|e| anyhow::anyhow!("cannot build {component} of {}: {e}", source.describe()))?;
    weights.finish()?;
    Ok(model)
}

/// The UNet of `source`.
pub fn unet(
    source: &ModelSource,
    dtype: DType,
    device: &Device,
    fuse: &[(LoraSet, f64)],
) -> anyhow::Result<(UNet2DConditionModel, UNet2DConditionConfig)> {
    let cfg = match source {
        ModelSource::SingleFile(s) => s.info()?.configs.unet.clone(),
        _ => load_component_config(source, "unet", |p| UNet2DConditionConfig::from_file(p))?,
    };
    let unet = build(source, "unet", dtype, device, fuse, |vb| {
        UNet2DConditionModel::new(vb, &cfg)
    })?;
    Ok((unet, cfg))
}

/// The text encoder of `source`.
pub fn text_encoder(
    source: &ModelSource,
    dtype: DType,
    device: &Device,
    fuse: &[(LoraSet, f64)],
) -> anyhow::Result<ClipTextModel> {
    let cfg = match source {
        ModelSource::SingleFile(s) => s.info()?.configs.text.clone(),
        _ => load_component_config(source, "text_encoder", |p| ClipTextConfig::from_file(p))?,
    };
    build(source, "text_encoder", dtype, device, fuse, |vb| {
        ClipTextModel::new(vb, &cfg)
    })
}

/// The VAE of `source`.
pub fn vae(source: &ModelSource, dtype: DType, device: &Device) -> anyhow::Result<AutoencoderKL> {
    let cfg = match source {
        ModelSource::SingleFile(s) => s.info()?.configs.vae.clone(),
        _ => load_component_config(source, "vae", |p| AutoencoderKLConfig::from_file(p))?,
    };
    build(source, "vae", dtype, device, &[], |vb| {
        AutoencoderKL::new(vb, &cfg)
    })
}

/// The tokenizer of `source`: its tokenizer folder; for a single file the config folder's or
/// the bundled CLIP vocabulary (pad token `!` for SD 2.x).
pub fn tokenizer(source: &ModelSource) -> anyhow::Result<ClipTokenizer> {
    if let ModelSource::SingleFile(s) = source {
        let (dir, pad) = s.tokenizer()?;
        let t = ClipTokenizer::from_dir(&dir)?;
        return match pad {
            Some(p) => t.with_pad_token(p),
            None => Ok(t),
        };
    }
    ClipTokenizer::from_dir(&tokenizer_dir(source)?)
}

/// The scheduler config of `source` (`scheduler/scheduler_config.json`; for a single file the
/// config folder's or the standard Stable Diffusion one).
pub fn scheduler_config(source: &ModelSource) -> anyhow::Result<SchedulerConfig> {
    if let ModelSource::SingleFile(s) = source {
        return SchedulerConfig::from_json_str(&s.scheduler_config_text()?)
            .with_context(|| format!("scheduler config for {}", s.path.display()));
    }
    let path = source.require("scheduler/scheduler_config.json")?;
    SchedulerConfig::from_file(&path)
}

/// The tokenizer folder of `source` (tokenizer.json, or vocab.json + merges.txt).
pub fn tokenizer_dir(source: &ModelSource) -> anyhow::Result<PathBuf> {
    if let Some(p) = source.file("tokenizer/tokenizer.json")? {
        // The other tokenizer files are optional beside tokenizer.json; fetch them when present.
        let _ = source.file("tokenizer/tokenizer_config.json")?;
        let _ = source.file("tokenizer/special_tokens_map.json")?;
        return Ok(p.parent().map(|d| d.to_path_buf()).unwrap_or_default());
    }
    let vocab = source.require("tokenizer/vocab.json")?;
    source.require("tokenizer/merges.txt")?;
    let _ = source.file("tokenizer/tokenizer_config.json")?;
    let _ = source.file("tokenizer/special_tokens_map.json")?;
    Ok(vocab.parent().map(|d| d.to_path_buf()).unwrap_or_default())
}
