//! `upl-ckpt-v2`: a model (diffusers folder or single file), optionally with a LoRA fused in,
//! written as one `.safetensors` file in the original (LDM) layout that A1111, ComfyUI and
//! diffusers' `from_single_file` read.
//!
//! Each tensor keeps its dtype; fused weights are `W + alpha · ΔW` computed in f32 and stored
//! in the weight's dtype. The OpenCLIP text encoder of SD 2.x gets its q/k/v joined into
//! `in_proj_weight` / `in_proj_bias`; the VAE attention projections become 1×1 convolutions.

use super::merge::collapse;
use super::LoraSet;
use crate::hub::single::text_layout_of;
use crate::hub::ModelSource;
use crate::lora::Component;
use crate::models::clip::ClipTextConfig;
use crate::models::ldm::keys::Part;
use crate::models::ldm::{self, Configs, Layout};
use crate::models::unet::UNet2DConditionConfig;
use crate::models::vae::AutoencoderKLConfig;
use crate::tensor_file::{self, OutTensor};
use anyhow::{bail, Context};
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The components of a single file, in the order they are written.
pub const COMPONENTS: [&str; 3] = ["unet", "vae", "text_encoder"];

/// What [`write_single_file`] did.
#[derive(Debug, Clone, Default)]
pub struct SingleFileReport {
    /// Tensors written per component.
    pub tensors: Vec<(String, usize)>,
    /// LoRA layers fused per component.
    pub fused: Vec<(String, usize)>,
}

/// Configs and key layout of `source`.
pub fn configs_and_layout(source: &ModelSource) -> anyhow::Result<(Configs, Layout)> {
    if let ModelSource::SingleFile(s) = source {
        let info = s.info()?;
        return Ok((info.configs.clone(), info.layout.clone()));
    }
    let configs = Configs {
        unet: UNet2DConditionConfig::from_file(source.require("unet/config.json")?)?,
        vae: AutoencoderKLConfig::from_file(source.require("vae/config.json")?)?,
        text: ClipTextConfig::from_file(source.require("text_encoder/config.json")?)?,
    };
    let layout = Layout::new(&configs.unet, &configs.vae, text_layout_of(&configs.text))?;
    Ok((configs, layout))
}

/// The single-file tensors of `source` with `lora` fused at `alpha` (key → tensor, LDM names).
pub fn single_file_tensors(
    source: &ModelSource,
    lora: Option<&LoraSet>,
    alpha: f64,
    report: &mut SingleFileReport,
) -> anyhow::Result<BTreeMap<String, Tensor>> {
    let (configs, layout) = configs_and_layout(source)?;
    let mut out = BTreeMap::new();
    let mut unused: Vec<String> = lora
        .map(|l| l.layers.keys().map(|k| k.to_string()).collect())
        .unwrap_or_default();
    for comp in COMPONENTS {
        let weights = source.weights(comp)?;
        let mut tensors: HashMap<String, Tensor> = weights.load_all()?;
        let mut fused = 0;
        if let (Some(set), Some(part)) = (lora, Component::from_name(comp)) {
            for (key, l) in &set.layers {
                let Some(path) = key.path_in(part) else {
                    continue;
                };
                let wkey = format!("{path}.weight");
                let w = tensors.get(&wkey).with_context(|| {
                    format!("LoRA layer {key}: the model has no weight {comp}.{wkey}")
                })?;
                let new = collapse(w, l, alpha).with_context(|| format!("LoRA layer {key}"))?;
                tensors.insert(wkey, new);
                unused.retain(|u| *u != key.to_string());
                fused += 1;
            }
        }
        let map = ldm::component_map(comp, &configs, &layout)?;
        let mut chunks: HashMap<String, Vec<Option<Tensor>>> = HashMap::new();
        for m in &map {
            let t = tensors.remove(&m.key).with_context(|| {
                format!("{}: {comp} has no tensor {}", source.describe(), m.key)
            })?;
            match m.part {
                Part::Whole => {
                    out.insert(m.ldm.clone(), t);
                }
                Part::Conv1x1 => {
                    let s = ldm::keys::stored_shape(&m.shape, m.part);
                    out.insert(m.ldm.clone(), t.reshape(s)?);
                }
                Part::Chunk { index } => {
                    chunks
                        .entry(m.ldm.clone())
                        .or_insert_with(|| vec![None, None, None])[index] = Some(t);
                }
            }
        }
        for (k, parts) in chunks {
            let parts: Vec<Tensor> = parts
                .into_iter()
                .collect::<Option<_>>()
                .with_context(|| format!("{k}: one of q/k/v is missing"))?;
            out.insert(k, Tensor::cat(&parts, 0)?);
        }
        report.tensors.push((comp.to_string(), map.len()));
        report.fused.push((comp.to_string(), fused));
    }
    if !unused.is_empty() {
        bail!(
            "{} LoRA layers match no layer of the model, e.g. {}",
            unused.len(),
            unused[0]
        );
    }
    Ok(out)
}

/// Writes `source` (with `lora` fused at `alpha`) to `output` as an LDM-layout `.safetensors`
/// file; refused when it exists unless `force`, or when a value is not finite unless
/// `allow_nonfinite`.
pub fn write_single_file(
    source: &ModelSource,
    lora: Option<&LoraSet>,
    alpha: f64,
    output: &Path,
    force: bool,
    allow_nonfinite: bool,
) -> anyhow::Result<SingleFileReport> {
    if output.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!(
            "{}: single files are written as .safetensors (pickled .ckpt is read, never written)",
            output.display()
        );
    }
    crate::atomic::check_writable(output, force)?;
    let mut report = SingleFileReport::default();
    let tensors = single_file_tensors(source, lora, alpha, &mut report)?;
    if !allow_nonfinite {
        for (k, t) in &tensors {
            tensor_file::check_finite(t, &format!("tensor {k} of {}", output.display()))
                .context("pass --allow-nonfinite to write it anyway")?;
        }
    }
    let out: Vec<(String, OutTensor<'static>)> = tensor_file::out_tensors(tensors.iter())?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    tensor_file::write(output, out, &meta, force)?;
    Ok(report)
}
