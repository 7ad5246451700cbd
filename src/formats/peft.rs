//! Raw PEFT state dicts: `[base_model.model.]<path>.lora_A.weight` (down) and `.lora_B.weight`
//! (up); the component follows from the path (`text_model.…` is the text encoder).
//!
//! alpha comes from the `lora_adapter_metadata` JSON in the safetensors metadata (a PEFT
//! `LoraConfig`: `r`, `lora_alpha`, `alpha_pattern`, `use_rslora`; unprefixed, or prefixed with
//! `unet.` / `text_encoder.` as diffusers writes it), else from an `adapter_config.json` beside
//! the file; without either, diffusers' rule: alpha = the rank of the first layer
//! ([`first_rank`]) for every layer. Written files use `base_model.model.` keys and an
//! unprefixed config (per-layer deviations in `rank_pattern` / `alpha_pattern`).

use super::keymap::{Component, KeyIndex, PEFT};
use super::{
    common, finish, gather, ord_f64, Architecture, Encoded, Format, LoraFile, LoraFormat,
    ReadContext,
};
use crate::lora::{LayerKey, LoraSet};
use anyhow::Context;
use regex::Regex;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// The metadata key diffusers and PEFT-aware tools store the adapter config under.
pub const METADATA_KEY: &str = "lora_adapter_metadata";

/// The scale-relevant part of a PEFT `LoraConfig`.
#[derive(Debug, Clone, Default)]
pub struct PeftScale {
    /// `lora_alpha`.
    pub lora_alpha: Option<f64>,
    /// `alpha_pattern`: (module-path tail or regex, its compiled form, alpha).
    pub alpha_pattern: Vec<(String, Option<Regex>, f64)>,
    /// `use_rslora`: scale alpha / sqrt(r) instead of alpha / r.
    pub use_rslora: bool,
}

impl PeftScale {
    /// Reads the fields of one config object whose keys carry `prefix` (`""`, `"unet."`).
    pub fn from_json(obj: &Map<String, Value>, prefix: &str) -> anyhow::Result<Option<Self>> {
        let get = |k: &str| obj.get(&format!("{prefix}{k}"));
        if get("r").is_none() && get("lora_alpha").is_none() {
            return Ok(None);
        }
        let mut alpha_pattern = vec![];
        if let Some(p) = get("alpha_pattern").and_then(Value::as_object) {
            for (k, v) in p {
                let a = v
                    .as_f64()
                    .with_context(|| format!("alpha_pattern[{k:?}] is not a number"))?;
                // PEFT matches a pattern key as the regex `(.*\.)?(key)$` on the module name.
                let re = Regex::new(&format!("^(.*\\.)?({k})$")).ok();
                alpha_pattern.push((k.clone(), re, a));
            }
        }
        Ok(Some(Self {
            lora_alpha: get("lora_alpha").and_then(Value::as_f64),
            alpha_pattern,
            use_rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        }))
    }

    /// Our alpha (scale · rank) for a layer at `path` (relative to its component) of rank `r`:
    /// PEFT's scale is lora_alpha / r (or / sqrt(r) with rsLoRA), alpha_pattern first.
    pub fn alpha_for(&self, path: &str, r: usize) -> f64 {
        let pattern = self.alpha_pattern.iter().find(|(k, re, _)| {
            path == k
                || path.ends_with(&format!(".{k}"))
                || re.as_ref().is_some_and(|re| re.is_match(path))
        });
        let alpha = match (pattern, self.lora_alpha) {
            (Some((_, _, a)), _) => *a,
            (None, Some(a)) => a,
            (None, None) => return r as f64,
        };
        if self.use_rslora {
            alpha * (r as f64).sqrt()
        } else {
            alpha
        }
    }
}

/// Parses the `lora_adapter_metadata` JSON into per-component scales (an unprefixed config
/// applies to both components).
pub fn scales_from_metadata(
    meta: &BTreeMap<String, String>,
) -> anyhow::Result<BTreeMap<Component, PeftScale>> {
    let mut out = BTreeMap::new();
    let Some(text) = meta.get(METADATA_KEY) else {
        return Ok(out);
    };
    let v: Value = serde_json::from_str(text)
        .with_context(|| format!("metadata {METADATA_KEY} is not valid JSON"))?;
    let obj = v
        .as_object()
        .with_context(|| format!("metadata {METADATA_KEY} is not a JSON object"))?;
    for c in Component::ALL {
        let prefixed = PeftScale::from_json(obj, &format!("{}.", c.name()))?;
        let plain = PeftScale::from_json(obj, "")?;
        if let Some(s) = prefixed.or(plain) {
            out.insert(c, s);
        }
    }
    Ok(out)
}

/// The alpha of `layer` (component-prefixed) given per-component scales; a component without
/// one takes its entry in `fallback` (diffusers' first-layer rank, [`first_rank`]), else the
/// layer's rank (scale 1).
pub fn alpha_from_scales(
    scales: &BTreeMap<Component, PeftScale>,
    fallback: &BTreeMap<Component, usize>,
    layer: &LayerKey,
    r: usize,
) -> f64 {
    match layer.component() {
        Some(c) => match (scales.get(&c), fallback.get(&c)) {
            (Some(s), _) => s.alpha_for(layer.path(), r),
            (None, Some(first)) => *first as f64,
            (None, None) => r as f64,
        },
        None => r as f64,
    }
}

/// Position of a text-encoder layer in CLIP's module order (`layers.<i>`, then `k_proj`,
/// `v_proj`, `q_proj`, `out_proj`, `fc1`, `fc2`); paths outside it sort last, by name.
fn text_module_order(path: &str) -> (usize, usize, String) {
    const ORDER: [&str; 6] = ["k_proj", "v_proj", "q_proj", "out_proj", "fc1", "fc2"];
    let index = path
        .split_once("layers.")
        .and_then(|(_, rest)| rest.split('.').next())
        .and_then(|i| i.parse().ok())
        .unwrap_or(usize::MAX);
    let tail = path.rsplit('.').next().unwrap_or_default();
    let pos = ORDER.iter().position(|t| *t == tail).unwrap_or(ORDER.len());
    (index, pos, path.to_string())
}

/// The rank diffusers takes as `lora_alpha` for every layer of a component when a file carries
/// no alpha (`get_peft_kwargs`: the rank of the first layer it finds): for the UNet the first
/// up key in the file's sorted key order, for the text encoder the first layer in the model's
/// module order.
pub fn first_rank(
    file: &LoraFile,
    scheme: &super::keymap::KeyScheme,
) -> BTreeMap<Component, usize> {
    let mut out = BTreeMap::new();
    let mut text: Option<((usize, usize, String), usize)> = None;
    for (key, t) in &file.tensors {
        let Some(p) = super::keymap::parse_key(scheme, key, &KeyIndex::default()) else {
            continue;
        };
        if p.part != super::keymap::Part::Up || t.rank() < 2 {
            continue;
        }
        let r = t.dims()[1];
        match p.layer.component() {
            Some(Component::Unet) => {
                out.entry(Component::Unet).or_insert(r);
            }
            Some(Component::TextEncoder) => {
                let order = text_module_order(p.layer.path());
                if text.as_ref().is_none_or(|(o, _)| order < *o) {
                    text = Some((order, r));
                }
            }
            None => {}
        }
    }
    if let Some((_, r)) = text {
        out.insert(Component::TextEncoder, r);
    }
    out
}

/// The `LoraConfig` fields describing the layers of one component: common r and alpha,
/// deviations in `rank_pattern` / `alpha_pattern`, every adapted path in `target_modules`.
pub fn config_json(set: &LoraSet, component: Component) -> Option<Map<String, Value>> {
    let layers: Vec<(&str, &crate::lora::LoraWeights)> = set
        .layers
        .iter()
        .filter_map(|(k, w)| k.path_in(component).map(|p| (p, w)))
        .collect();
    if layers.is_empty() {
        return None;
    }
    let mut sub = LoraSet::default();
    for (p, w) in &layers {
        sub.layers.insert((*p).into(), (*w).clone());
    }
    let r = common(&sub, |l| l.rank())?;
    let a = common(&sub, |l| ord_f64(l.alpha()))? as f64 / 1e6;
    let alpha = sub
        .layers
        .values()
        .map(|l| l.alpha())
        .find(|x| ord_f64(*x) as f64 / 1e6 == a)
        .unwrap_or(a);
    let mut rank_pattern = Map::new();
    let mut alpha_pattern = Map::new();
    for (p, w) in &layers {
        if w.rank() != r {
            rank_pattern.insert(p.to_string(), json!(w.rank()));
        }
        if ord_f64(w.alpha()) != ord_f64(alpha) {
            alpha_pattern.insert(p.to_string(), json!(w.alpha()));
        }
    }
    let targets: Vec<Value> = layers.iter().map(|(p, _)| json!(p)).collect();
    let mut m = Map::new();
    m.insert("peft_type".into(), json!("LORA"));
    m.insert("r".into(), json!(r));
    m.insert("lora_alpha".into(), json!(alpha));
    m.insert("target_modules".into(), Value::Array(targets));
    m.insert("rank_pattern".into(), Value::Object(rank_pattern));
    m.insert("alpha_pattern".into(), Value::Object(alpha_pattern));
    m.insert("use_rslora".into(), json!(false));
    let dora = layers.iter().any(|(_, w)| {
        w.dora()
            .is_some_and(|d| d.style == crate::lora::DoraStyle::Peft)
    });
    m.insert("use_dora".into(), json!(dora));
    m.insert("lora_dropout".into(), json!(0.0));
    m.insert("bias".into(), json!("none"));
    Some(m)
}

/// The raw PEFT format.
pub struct Peft;

impl LoraFormat for Peft {
    fn format(&self) -> Format {
        Format::Peft
    }

    fn read(&self, file: &LoraFile, _ctx: &ReadContext) -> anyhow::Result<LoraSet> {
        let raw = gather(file, &PEFT, &KeyIndex::default(), |_| false)?;
        let mut scales = scales_from_metadata(&file.metadata)?;
        if scales.is_empty() {
            if let Some(dir) = file.path.parent() {
                let cfg = dir.join("adapter_config.json");
                if cfg.is_file() {
                    let text = std::fs::read_to_string(&cfg)
                        .with_context(|| format!("cannot read {}", cfg.display()))?;
                    let v: Value = serde_json::from_str(&text)
                        .with_context(|| format!("{} is not valid JSON", cfg.display()))?;
                    if let Some(s) = v
                        .as_object()
                        .map(|o| PeftScale::from_json(o, ""))
                        .transpose()?
                        .flatten()
                    {
                        for c in Component::ALL {
                            scales.insert(c, s.clone());
                        }
                    }
                }
            }
        }
        let fallback = first_rank(file, &PEFT);
        finish(file, raw, |layer, r| {
            Ok(alpha_from_scales(&scales, &fallback, layer, r))
        })
    }

    fn encode(&self, set: &LoraSet, _arch: Option<&Architecture>) -> anyhow::Result<Encoded> {
        let mut enc = Encoded::carrying(set);
        let configs: Vec<Map<String, Value>> = Component::ALL
            .iter()
            .filter_map(|c| config_json(set, *c))
            .collect();
        // One unprefixed config: merge the components (paths are distinct between them).
        let mut cfg = configs.first().cloned().unwrap_or_default();
        for other in configs.iter().skip(1) {
            merge_config(&mut cfg, other);
        }
        enc.metadata
            .insert(METADATA_KEY.into(), Value::Object(cfg).to_string());
        for (layer, w) in &set.layers {
            enc.push_layer(&PEFT, layer, w, false)?;
        }
        Ok(enc)
    }
}

/// Merges a second component's config into the first: differing r / alpha become patterns.
fn merge_config(into: &mut Map<String, Value>, other: &Map<String, Value>) {
    let num = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_f64);
    let targets = |m: &Map<String, Value>| {
        m.get("target_modules")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    for (field, pattern) in [("r", "rank_pattern"), ("lora_alpha", "alpha_pattern")] {
        let same = num(into, field) == num(other, field);
        let mut pat = into
            .get(pattern)
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        if let Some(p) = other.get(pattern).and_then(Value::as_object) {
            pat.extend(p.clone());
        }
        if !same {
            for t in targets(other) {
                if let (Some(t), Some(v)) = (t.as_str(), other.get(field)) {
                    pat.entry(t.to_string()).or_insert(v.clone());
                }
            }
        }
        into.insert(pattern.into(), Value::Object(pat));
    }
    let mut all = targets(into);
    all.extend(targets(other));
    into.insert("target_modules".into(), Value::Array(all));
}
