//! Loading the components of a diffusers folder, each with errors that name the file.

use super::lora::fuse_into_weights;
use crate::hub::ModelSource;
use crate::lora::{Component, LoraSet};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::weights::ModelWeights;
use anyhow::{bail, Context};
use candle_core::{DType, Device};
use std::path::PathBuf;

/// The parts of model_index.json we check: which class each component is.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    /// `_class_name`, e.g. StableDiffusionPipeline.
    pub class_name: String,
    /// component name → (library, class), e.g. unet → (diffusers, UNet2DConditionModel).
    pub components: Vec<(String, String, String)>,
}

impl ModelIndex {
    /// Reads model_index.json of `source`.
    pub fn read(source: &ModelSource) -> anyhow::Result<Self> {
        let path = source.require("model_index.json")?;
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let obj = json
            .as_object()
            .with_context(|| format!("{} is not a JSON object", path.display()))?;
        let class_name = obj
            .get("_class_name")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let mut components = vec![];
        for (k, v) in obj {
            if k.starts_with('_') {
                continue;
            }
            if let Some([lib, class]) = v.as_array().map(|a| a.as_slice()) {
                if let (Some(lib), Some(class)) = (lib.as_str(), class.as_str()) {
                    components.push((k.clone(), lib.to_string(), class.to_string()));
                }
            }
        }
        Ok(Self {
            class_name,
            components,
        })
    }

    /// Errors when a component we need is absent or of a class we do not implement.
    pub fn check_supported(&self, source: &ModelSource) -> anyhow::Result<()> {
        let want = [
            ("unet", &["UNet2DConditionModel"][..]),
            ("text_encoder", &["CLIPTextModel"][..]),
            ("vae", &["AutoencoderKL"][..]),
            ("tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"][..]),
        ];
        for (name, classes) in want {
            match self.components.iter().find(|c| c.0 == name) {
                None => bail!(
                    "model {}: model_index.json lists no `{name}` component (a Stable Diffusion \
                     pipeline needs unet, text_encoder, vae, tokenizer, scheduler)",
                    source.describe()
                ),
                Some((_, _, class)) if !classes.contains(&class.as_str()) => bail!(
                    "model {}: component `{name}` is a {class}; supported: {}",
                    source.describe(),
                    classes.join(", ")
                ),
                _ => {}
            }
        }
        Ok(())
    }
}

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
    let files = source.component_weights(component)?;
    let weights = ModelWeights::from_files(component, &files)?;
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
    let cfg = load_component_config(source, "unet", |p| UNet2DConditionConfig::from_file(p))?;
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
    let cfg = load_component_config(source, "text_encoder", |p| ClipTextConfig::from_file(p))?;
    build(source, "text_encoder", dtype, device, fuse, |vb| {
        ClipTextModel::new(vb, &cfg)
    })
}

/// The VAE of `source`.
pub fn vae(source: &ModelSource, dtype: DType, device: &Device) -> anyhow::Result<AutoencoderKL> {
    let cfg = load_component_config(source, "vae", |p| AutoencoderKLConfig::from_file(p))?;
    build(source, "vae", dtype, device, &[], |vb| {
        AutoencoderKL::new(vb, &cfg)
    })
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
