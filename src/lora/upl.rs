//! `upl`: a LoRA fused into a diffusers model, written out as a complete new diffusers folder.
//!
//! Every targeted weight becomes `W + alpha · ΔW` (ΔW = (lora_alpha / rank) · up · down, the
//! file's own scale included), computed in f64 and stored in the weight's own dtype; every other
//! tensor, the metadata and every other file are copied unchanged. The folder is written under a
//! temporary name beside the output and renamed into place at the end, so a failure leaves
//! nothing behind.

use super::combine::delta_mat;
use super::{LoraSet, LoraWeights};
use crate::hub::ModelIndex;
use crate::hub::ModelSource;
use crate::tensor_file::{self, encode_f64, out_tensors, TensorFile};
use anyhow::{bail, Context};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// What [`fuse_into_model`] did.
#[derive(Debug, Clone, Default)]
pub struct UplReport {
    /// Layers fused per component, e.g. ("unet", 32).
    pub fused: Vec<(String, usize)>,
    /// Weight files rewritten (paths relative to the output).
    pub rewritten: Vec<String>,
    /// Number of files copied unchanged.
    pub copied: usize,
    /// Files of the input not copied, with the reason.
    pub skipped: Vec<(String, String)>,
    /// The LoRA's learned tokens added to the tokenizer and text encoder.
    pub tokens: super::upl_tokens::AddedTokens,
}

/// File extensions of weight files (any framework).
const WEIGHT_EXT: &[&str] = &[
    "safetensors",
    "bin",
    "ckpt",
    "pt",
    "pth",
    "msgpack",
    "h5",
    "onnx",
    "pb",
];

fn is_weight_like(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    let name = name.strip_suffix(".index.json").unwrap_or(name);
    WEIGHT_EXT.iter().any(|e| name.ends_with(&format!(".{e}")))
}

/// Config and tokenizer files looked for in each component of a Hugging Face model.
const HUB_FILES: &[&str] = &[
    "config.json",
    "scheduler_config.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "added_tokens.json",
];

/// A weight file of a targeted component and the layers it holds.
struct FilePlan {
    rel: String,
    out_rel: String,
    path: PathBuf,
    layers: Vec<(String, LoraWeights)>,
}

/// Fuses `lora` at multiplier `alpha` into the model at `source` and writes the complete
/// model to `output` (refused when it exists, unless `force`). `on_layer` is called once per
/// fused layer (progress).
pub fn fuse_into_model(
    source: &ModelSource,
    lora: &LoraSet,
    alpha: f64,
    output: &Path,
    force: bool,
    allow_nonfinite: bool,
    on_layer: &dyn Fn(),
) -> anyhow::Result<UplReport> {
    let index = ModelIndex::read(source)
        .with_context(|| format!("{} is not a diffusers model", source.describe()))?;
    if lora.layers.is_empty() {
        bail!("the LoRA has no layers; nothing to fuse");
    }
    let plans = plan(source, &index, lora)?;
    let mut files = list_files(source, &index)?;
    // An output inside the input folder (replaced with --force) is not part of the model.
    if let Ok(out) = output.canonicalize() {
        files.retain(|(_, p)| !p.canonicalize().is_ok_and(|p| p.starts_with(&out)));
    }
    let tmp = begin_output(output, force, source)?;
    let result =
        write_model(&tmp, &files, &plans, alpha, allow_nonfinite, on_layer).and_then(|mut r| {
            r.tokens = super::upl_tokens::add_tokens_to_model(&tmp, &lora.embeddings)?;
            Ok(r)
        });
    match result {
        Ok(mut report) => {
            crate::atomic::replace_dir(&tmp, output)?;
            let mut per: BTreeMap<String, usize> = BTreeMap::new();
            for p in &plans {
                let comp = p.rel.split('/').next().unwrap_or("").to_string();
                *per.entry(comp).or_default() += p.layers.len();
            }
            report.fused = per.into_iter().collect();
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Maps every LoRA layer to the weight file and key it changes, checking names and shapes;
/// one error lists every problem.
fn plan(source: &ModelSource, index: &ModelIndex, lora: &LoraSet) -> anyhow::Result<Vec<FilePlan>> {
    let mut by_comp: BTreeMap<&str, Vec<(String, &LoraWeights)>> = BTreeMap::new();
    for (path, l) in &lora.layers {
        let (comp, module) = path.as_str().split_once('.').with_context(|| {
            format!("LoRA layer {path} has no component prefix (unet. / text_encoder.)")
        })?;
        by_comp
            .entry(comp)
            .or_default()
            .push((format!("{module}.weight"), l));
    }
    let mut problems = vec![];
    let mut plans = vec![];
    for (comp, layers) in by_comp {
        if !index.components.iter().any(|c| c.0 == comp) {
            problems.push(format!(
                "{} LoRA layers target `{comp}`, which model {} does not have",
                layers.len(),
                source.describe()
            ));
            continue;
        }
        let paths = source.component_weights(comp)?;
        if paths.len() > 1
            && paths
                .iter()
                .any(|p| p.extension().is_some_and(|e| e == "bin"))
        {
            bail!("{comp}: sharded PyTorch .bin weights are not supported by upl; convert them to safetensors first");
        }
        // key → (file index, dtype name, shape)
        let mut keys: HashMap<String, (usize, String, Vec<usize>)> = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            for (k, dtype, shape) in file_entries(p)? {
                keys.insert(k, (i, dtype, shape));
            }
        }
        let mut per_file: Vec<Vec<(String, LoraWeights)>> = vec![vec![]; paths.len()];
        for (key, l) in layers {
            let want = l.delta_shape();
            match keys.get(&key) {
                None => problems.push(format!(
                    "{comp}: the model has no weight {key} (LoRA layer {comp}.{})",
                    key.trim_end_matches(".weight")
                )),
                Some((_, dtype, _))
                    if !matches!(dtype.as_str(), "F32" | "F16" | "BF16" | "F64") =>
                {
                    problems.push(format!(
                        "{comp}: weight {key} is {dtype}, not a float tensor"
                    ))
                }
                Some((_, _, shape)) if !shapes_fit(&want, shape) => {
                    problems.push(shape_problem(comp, &key, &want, shape))
                }
                Some((i, _, _)) => per_file[*i].push((key, l.clone())),
            }
        }
        for (p, layers) in paths.iter().zip(per_file) {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let out_name = match name.as_str() {
                "pytorch_model.bin" => "model.safetensors".to_string(),
                n => n
                    .strip_suffix(".bin")
                    .map(|s| format!("{s}.safetensors"))
                    .unwrap_or(name.clone()),
            };
            plans.push(FilePlan {
                rel: format!("{comp}/{name}"),
                out_rel: format!("{comp}/{out_name}"),
                path: p.clone(),
                layers,
            });
        }
    }
    if !problems.is_empty() {
        let mut msg = format!("the LoRA does not fit model {}:", source.describe());
        for p in problems.iter().take(20) {
            msg.push_str(&format!("\n  {p}"));
        }
        if problems.len() > 20 {
            msg.push_str(&format!("\n  ... and {} more", problems.len() - 20));
        }
        bail!(msg);
    }
    Ok(plans)
}

/// (name, dtype, shape) of every tensor of a safetensors or PyTorch file, without loading data.
fn file_entries(p: &Path) -> anyhow::Result<Vec<(String, String, Vec<usize>)>> {
    if p.extension().is_some_and(|e| e == "bin") {
        let infos = crate::pickle::read_tensor_info(p)
            .map_err(|e| anyhow::anyhow!("cannot read PyTorch weights: {e:#}"))?;
        return Ok(infos
            .into_iter()
            .map(|i| {
                let dtype = format!("{:?}", i.dtype).to_uppercase();
                (i.name, dtype, i.shape)
            })
            .collect());
    }
    let f = TensorFile::open(p)?;
    Ok(f.entries
        .into_iter()
        .map(|(k, e)| (k, format!("{:?}", e.dtype), e.shape))
        .collect())
}

/// A ΔW of shape `delta` fits a weight of shape `w`: equal, or a linear ΔW on a 1×1 conv (or
/// the reverse).
fn shapes_fit(delta: &[usize], w: &[usize]) -> bool {
    let squeeze = |s: &[usize]| -> Vec<usize> {
        let mut v = s.to_vec();
        while v.len() > 2 && v.last() == Some(&1) {
            v.pop();
        }
        v
    };
    delta == w || squeeze(delta) == squeeze(w)
}

fn shape_problem(comp: &str, key: &str, lora: &[usize], model: &[usize]) -> String {
    let mut msg = format!(
        "{comp}.{key}: the LoRA changes a weight of shape {lora:?}, the model's is {model:?}"
    );
    let cross = key.contains("attn2.to_k") || key.contains("attn2.to_v");
    if cross && lora.len() >= 2 && model.len() >= 2 && lora[0] == model[0] {
        msg.push_str(&format!(
            " (cross-attention dim {} in the LoRA, {} in the model: a LoRA for another base, e.g. SD 2 vs SD 1?)",
            lora[1], model[1]
        ));
    }
    msg
}

/// Every file of the model as (path relative to the model root, local path).
fn list_files(source: &ModelSource, index: &ModelIndex) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out = vec![];
    match source {
        ModelSource::Local(dir) => walk(dir, "", &mut out)?,
        ModelSource::SingleFile(s) => bail!(
            "{}: upl writes a diffusers folder from a diffusers model; for a single file use \
             --mode upl-ckpt-v2",
            s.path.display()
        ),
        ModelSource::Hub { .. } => {
            out.push((
                "model_index.json".to_string(),
                source.require("model_index.json")?,
            ));
            for (comp, _, _) in &index.components {
                let mut has_config = false;
                for f in HUB_FILES {
                    let rel = format!("{comp}/{f}");
                    if let Some(p) = source.file(&rel)? {
                        has_config |= *f == "config.json";
                        out.push((rel, p));
                    }
                }
                if has_config {
                    for p in source.component_weights(comp)? {
                        let name = p
                            .file_name()
                            .map(|n| n.to_string_lossy().to_string())
                            .unwrap_or_default();
                        out.push((format!("{comp}/{name}"), p));
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0);
    Ok(out)
}

/// Lists the files under `dir` recursively (hidden entries skipped).
fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) -> anyhow::Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        let rel = format!("{prefix}{name}");
        let path = e.path();
        if path.is_dir() {
            walk(&path, &format!("{rel}/"), out)?;
        } else {
            out.push((rel, path));
        }
    }
    Ok(())
}

fn write_model(
    tmp: &Path,
    files: &[(String, PathBuf)],
    plans: &[FilePlan],
    alpha: f64,
    allow_nonfinite: bool,
    on_layer: &dyn Fn(),
) -> anyhow::Result<UplReport> {
    let mut report = UplReport::default();
    let targeted: Vec<&str> = plans
        .iter()
        .filter_map(|p| p.rel.split('/').next())
        .collect();
    for (rel, path) in files {
        if plans.iter().any(|p| &p.rel == rel) {
            continue; // written below
        }
        let comp = rel.split_once('/').map(|c| c.0);
        if is_weight_like(rel) {
            match comp {
                None => {
                    report.skipped.push((
                        rel.clone(),
                        "a single-file checkpoint at the root, stale after fusing".into(),
                    ));
                    continue;
                }
                Some(c) if targeted.contains(&c) && !is_index_of(path, plans) => {
                    report.skipped.push((
                        rel.clone(),
                        format!("another copy of the {c} weights, stale after fusing"),
                    ));
                    continue;
                }
                _ => {}
            }
        }
        let dst = tmp.join(rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::copy(path, &dst)
            .with_context(|| format!("cannot copy {} to {}", path.display(), dst.display()))?;
        report.copied += 1;
    }
    for p in plans {
        let dst = tmp.join(&p.out_rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let src = if p.path.extension().is_some_and(|e| e == "bin") {
            let scratch = tmp.join(format!(".{}.converted", p.out_rel.replace('/', "_")));
            let tensors: BTreeMap<String, candle_core::Tensor> =
                crate::pickle::read_state_dict(&p.path)
                    .map_err(|e| anyhow::anyhow!("cannot read PyTorch weights: {e:#}"))?
                    .into_iter()
                    .collect();
            tensor_file::write(&scratch, out_tensors(&tensors)?, &BTreeMap::new(), true)
                .with_context(|| format!("cannot convert {}", p.path.display()))?;
            Some(scratch)
        } else {
            None
        };
        let file = TensorFile::open(src.as_deref().unwrap_or(&p.path))?;
        let mut replace = HashMap::new();
        for (key, l) in &p.layers {
            let entry = &file.entries[key];
            let mut w = file.to_f64(key)?;
            if l.delta_shape().iter().product::<usize>() != w.len() {
                bail!(
                    "{}: the {} layer's ΔW {:?} has {} elements, {key} has {}",
                    p.rel,
                    l.kind_label(),
                    l.delta_shape(),
                    l.delta_shape().iter().product::<usize>(),
                    w.len()
                );
            }
            if l.dora().is_some() {
                // DoRA rescales W + ΔW: the merge needs the weight itself (in f64).
                let wt = candle_core::Tensor::from_vec(
                    std::mem::take(&mut w),
                    l.delta_shape(),
                    &candle_core::Device::Cpu,
                )?;
                w = super::merged_weight(&wt, l, alpha)
                    .with_context(|| format!("DoRA merge of LoRA layer for {}/{key}", p.rel))?
                    .flatten_all()?
                    .to_vec1::<f64>()?;
            } else {
                let d = delta_mat(l)
                    .with_context(|| format!("ΔW of LoRA layer for {}/{key}", p.rel))?;
                w.iter_mut().zip(&d.data).for_each(|(w, d)| *w += alpha * d);
            }
            let limit = match entry.dtype {
                safetensors::Dtype::F16 => 65504.0,
                _ => f64::MAX,
            };
            if let Some((i, v)) = w
                .iter()
                .enumerate()
                .find(|(_, v)| !allow_nonfinite && (!v.is_finite() || v.abs() > limit))
            {
                bail!(
                    "{}/{key}: the fused weight holds {v} at flat index {i}, which {:?} cannot \
                     store; refusing to write it (check the LoRA and --alpha; --allow-nonfinite writes it anyway)",
                    p.rel,
                    entry.dtype
                );
            }
            replace.insert(key.clone(), encode_f64(&w, entry.dtype)?);
            on_layer();
        }
        tensor_file::rewrite(&file, &dst, &replace)?;
        drop(file);
        if let Some(s) = src {
            let _ = std::fs::remove_file(s);
        }
        report.rewritten.push(p.out_rel.clone());
    }
    Ok(report)
}

/// True when `path` is a `*.index.json` whose shards are all files being rewritten.
fn is_index_of(path: &Path, plans: &[FilePlan]) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if !name.ends_with(".index.json") {
        return false;
    }
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        return false;
    };
    map.values().all(|v| {
        v.as_str().is_some_and(|f| {
            plans
                .iter()
                .any(|p| p.path.file_name().is_some_and(|n| n.to_string_lossy() == f))
        })
    })
}

/// Checks the output path and creates the temporary folder beside it.
pub fn begin_output(output: &Path, force: bool, source: &ModelSource) -> anyhow::Result<PathBuf> {
    if output.exists() && !force {
        bail!(
            "{} already exists; pass --force to replace it",
            output.display()
        );
    }
    if let (ModelSource::Local(dir), Ok(out)) = (source, output.canonicalize()) {
        if dir.canonicalize().is_ok_and(|d| d == out) {
            bail!(
                "the output {} is the input model; choose another folder",
                output.display()
            );
        }
    }
    crate::atomic::temp_dir(output)
}
