//! LoRAs at generation time: attached as run-time adapters (each with its own scale) or fused
//! into the weights before the model is built.

use super::StableDiffusion;
use crate::formats::{self, Architecture};
use crate::hub::ModelSource;
use crate::lora::{apply_lora_set, merged_weight, Component, LoraHandle, LoraSet};
use crate::models::weights::ModelWeights;
use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A LoRA file with the scale it is applied at (`FILE[:SCALE]` on the command line).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The LoRA file (any supported format).
    pub path: PathBuf,
    /// The multiplier of its ΔW (1.0 = as trained).
    pub scale: f64,
}

impl std::str::FromStr for LoraSpec {
    type Err = anyhow::Error;

    /// Parses `FILE` or `FILE:SCALE`.
    fn from_str(s: &str) -> anyhow::Result<Self> {
        if let Some((path, scale)) = s.rsplit_once(':') {
            if let Ok(v) = scale.parse::<f64>() {
                if !v.is_finite() {
                    bail!("--lora {s}: scale {scale} is not a finite number");
                }
                return Ok(Self {
                    path: path.into(),
                    scale: v,
                });
            }
            if !Path::new(s).exists() && !scale.contains('/') {
                bail!("--lora {s}: `{scale}` is not a number (expected FILE or FILE:SCALE)");
            }
        }
        Ok(Self {
            path: s.into(),
            scale: 1.0,
        })
    }
}

/// Reads the LoRA files of `specs`, resolving kohya-style keys against `source`'s architecture.
pub fn read_loras(source: &ModelSource, specs: &[LoraSpec]) -> anyhow::Result<Vec<(LoraSet, f64)>> {
    if specs.is_empty() {
        return Ok(vec![]);
    }
    let arch = Architecture::from_model(source)?;
    specs
        .iter()
        .map(|s| {
            let set = formats::read_with(&s.path, Some(&arch))?;
            formats::check_against(&set, &arch).with_context(|| {
                format!(
                    "LoRA {} does not fit model {}",
                    s.path.display(),
                    source.describe()
                )
            })?;
            Ok((set, s.scale))
        })
        .collect()
}

impl StableDiffusion {
    /// Attaches a LoRA to the UNet and text encoder as run-time adapters at `scale`; the
    /// returned handles change its scale or remove it.
    pub fn add_lora(&self, set: &LoraSet, scale: f64) -> anyhow::Result<Vec<LoraHandle>> {
        let mut handles = vec![apply_lora_set(&self.unet, Component::Unet, set, scale)?];
        if set
            .layers
            .keys()
            .any(|k| k.component() == Some(Component::TextEncoder))
        {
            handles.push(apply_lora_set(
                self.text_encoder()?,
                Component::TextEncoder,
                set,
                scale,
            )?);
        }
        Ok(handles)
    }
}

/// `weights` of `component` with every LoRA of `loras` fused in: W' = W + scale·ΔW per layer
/// (DoRA layers rescaled, [`merged_weight`]),
/// computed in f32 and stored in the weight's dtype. Unknown layers and shape mismatches are
/// reported together.
pub fn fuse_into_weights(
    weights: &ModelWeights,
    component: Component,
    loras: &[(LoraSet, f64)],
) -> anyhow::Result<ModelWeights> {
    if !loras
        .iter()
        .any(|(s, _)| s.layers.keys().any(|k| k.component() == Some(component)))
    {
        return Ok(weights.clone());
    }
    let shapes = weights.file_shapes();
    // Fused weights in f32, each with the dtype it is stored in.
    let mut fused: HashMap<String, (Tensor, DType)> = HashMap::new();
    let mut problems = vec![];
    for (set, scale) in loras {
        for (key, l) in &set.layers {
            let Some(path) = key.path_in(component) else {
                continue;
            };
            let wkey = format!("{path}.weight");
            let Some(shape) = shapes.get(&wkey) else {
                problems.push(format!(
                    "{key}: the model has no layer {path} in {component}"
                ));
                continue;
            };
            let ds = l.delta_shape();
            if ds.iter().product::<usize>() != shape.iter().product::<usize>() {
                problems.push(format!(
                    "{key}: LoRA ΔW has shape {ds:?}, the model's weight {shape:?}"
                ));
                continue;
            }
            let (base, stored) = match fused.remove(&wkey) {
                Some(entry) => entry,
                None => {
                    let w = weights.load_one(&wkey)?;
                    let stored = w.dtype();
                    (w.to_dtype(DType::F32)?, stored)
                }
            };
            let merged =
                merged_weight(&base, l, *scale).with_context(|| format!("LoRA layer {key}"))?;
            fused.insert(wkey, (merged, stored));
        }
    }
    if !problems.is_empty() {
        bail!(
            "cannot fuse the LoRA into {component}: {} problem(s):\n  {}",
            problems.len(),
            problems.join("\n  ")
        );
    }
    let fused = fused
        .into_iter()
        .map(|(k, (t, stored))| Ok((k, t.to_dtype(stored)?)))
        .collect::<anyhow::Result<HashMap<_, _>>>()
        .context("cannot convert fused weights")?;
    weights.with_replacements(fused)
}
