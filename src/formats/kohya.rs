//! kohya-ss sd-scripts / A1111 / ComfyUI / Civitai LoRAs (`networks.lora`, also LoCon conv
//! layers).
//!
//! Keys: `lora_unet_<module path with dots → underscores>` and `lora_te_…` (SDXL-style
//! `lora_te1_…` is read as the text encoder too), each with `.lora_down.weight`,
//! `.lora_up.weight` and a 0-d `.alpha`; ΔW = multiplier · (alpha / rank) · up · down, and
//! scale 1 (alpha = rank) when `.alpha` is absent. Underscored names are resolved by matching
//! them against the module paths of the model architecture, never by guessing which
//! underscores were dots. Written with `ss_network_module` = `networks.lora`,
//! `ss_network_dim`, `ss_network_alpha`, `ss_network_args` (conv_dim/conv_alpha for 3×3 conv
//! layers), `ss_sd_model_name`, and the family, hash and model-spec keys of [`kohya_meta`].
//!
//! One `.alpha` per file: diffusers' kohya converter misnames per-layer attention alphas and
//! applies one alpha to every attention layer, so the writer folds each layer's alpha ratio
//! into its `lora_up` ([`uniform_alpha`]) and writes the most common alpha everywhere; ΔW is
//! unchanged. Per-layer alphas are written on request ([`super::WriteOptions::per_layer_alpha`]).

use super::check::{lora_cross_attention_dim, lora_text_width};
use super::keymap::{KeyIndex, KOHYA};
use super::kohya_meta;
use super::{
    common, finish_shaped, fmt_alpha, gather, ord_f64, Architecture, Encoded, Format, LoraFile,
    LoraFormat, ReadContext,
};
use crate::lora::{LoraSet, LoraWeights};
use anyhow::{bail, Context};
use candle_core::DType;

/// The kohya format.
pub struct Kohya;

impl LoraFormat for Kohya {
    fn format(&self) -> Format {
        Format::Kohya
    }

    fn read(&self, file: &LoraFile, ctx: &ReadContext) -> anyhow::Result<LoraSet> {
        let candidates = ctx.candidates();
        let index = KeyIndex::underscored(&candidates);
        let ambiguous = index.ambiguous();
        if !ambiguous.is_empty() {
            let (k, v) = &ambiguous[0];
            bail!("kohya name {k} is ambiguous in this architecture: it could be any of {v:?}");
        }
        let is_embed = |k: &str| k.starts_with(super::embeddings::KOHYA_PREFIX);
        let raw = gather(file, &KOHYA, &index, is_embed).map_err(|e| {
            let names: Vec<&str> = candidates.iter().map(|a| a.name.as_str()).collect();
            e.context(format!(
                "kohya names are resolved against the layers of {}",
                names.join(" and ")
            ))
        })?;
        let shapes = super::arch_shapes(ctx);
        let mut set = finish_shaped(file, raw, |_, r| Ok(r as f64), &shapes)?;
        set.embeddings = super::embeddings::read_kohya(file)?;
        Ok(set)
    }

    fn encode(&self, set: &LoraSet, _arch: Option<&Architecture>) -> anyhow::Result<Encoded> {
        let mut enc = Encoded::carrying(set);
        let alpha_of = |layers: Vec<&crate::lora::LoraWeights>| {
            let mut sub = LoraSet::default();
            for (i, l) in layers.into_iter().enumerate() {
                sub.layers.insert(i.to_string().into(), l.clone());
            }
            let r = common(&sub, |l| l.rank());
            let a = common(&sub, |l| ord_f64(l.alpha())).and_then(|a| {
                sub.layers
                    .values()
                    .map(|l| l.alpha())
                    .find(|x| ord_f64(*x) == a)
            });
            (r, a)
        };
        let (linear, conv): (Vec<_>, Vec<_>) = set
            .layers
            .values()
            .partition(|l| !(l.is_conv() && l.delta_shape()[2] * l.delta_shape()[3] > 1));
        let lycoris = is_lycoris(set);
        let m = &mut enc.metadata;
        m.insert("ss_network_module".into(), "networks.lora".into());
        if lycoris {
            // LyCORIS' own network module and arguments (algo, conv_dim, dora_wd, …) as the
            // file they came from had them.
            m.insert("ss_network_module".into(), "lycoris.kohya".into());
        }
        let (r, a) = alpha_of(if linear.is_empty() {
            conv.clone()
        } else {
            linear
        });
        if let Some(r) = r {
            m.insert("ss_network_dim".into(), r.to_string());
        }
        if let Some(a) = a {
            m.insert("ss_network_alpha".into(), fmt_alpha(a));
        }
        if lycoris {
            for k in [
                "ss_network_module",
                "ss_network_args",
                "ss_network_dim",
                "ss_network_alpha",
            ] {
                if let Some(v) = set.metadata.get(k) {
                    m.insert(k.into(), v.clone());
                }
            }
        } else if !conv.is_empty() {
            let (cr, ca) = alpha_of(conv);
            let args = serde_json::json!({
                "conv_dim": cr.map(|r| r.to_string()),
                "conv_alpha": ca.map(fmt_alpha),
            });
            m.insert("ss_network_args".into(), args.to_string());
        }
        let from_shapes = match (lora_cross_attention_dim(set), lora_text_width(set)) {
            (Some(768), _) | (None, Some(768)) => Some(false),
            (Some(1024), _) | (None, Some(1024)) => Some(true),
            _ => None,
        };
        if let Some(family) = kohya_meta::family(from_shapes, &set.metadata) {
            kohya_meta::add_family_keys(m, family);
        }
        if let Some(b) = set.metadata.get("base_model") {
            m.entry("ss_sd_model_name".into())
                .or_insert_with(|| b.clone());
        }
        for (layer, w) in &set.layers {
            enc.push_layer(&KOHYA, layer, w, true)?;
        }
        super::embeddings::push_kohya(&mut enc, set)?;
        Ok(enc)
    }
}

/// The same ΔW with one alpha for every layer: the most common alpha `A`; a layer with alpha
/// `a` gets `lora_up · (a / A)` (computed in f32, stored in the layer's dtype).
///
/// A set with LoHa / LoKr / DoRA layers (a LyCORIS file) is returned as it is: LyCORIS keeps
/// one alpha per layer and its DoRA rescale is not linear in `lora_up`.
pub fn uniform_alpha(set: &LoraSet) -> anyhow::Result<LoraSet> {
    if is_lycoris(set) {
        return Ok(set.clone());
    }
    let Some(common_alpha) = common(set, |l| ord_f64(l.alpha())) else {
        return Ok(set.clone());
    };
    let Some(target) = set
        .layers
        .values()
        .map(|l| l.alpha())
        .find(|a| ord_f64(*a) == common_alpha)
    else {
        return Ok(set.clone());
    };
    if target == 0.0 || !target.is_finite() {
        return Ok(set.clone());
    }
    let mut out = LoraSet {
        layers: Default::default(),
        embeddings: set.embeddings.clone(),
        metadata: set.metadata.clone(),
    };
    for (k, w) in &set.layers {
        let folded = if w.alpha() == target {
            w.clone()
        } else {
            let ratio = w.alpha() / target;
            let up = w.up();
            let scaled = (up.to_dtype(DType::F32)? * ratio)?.to_dtype(up.dtype())?;
            LoraWeights::new(w.down().clone(), scaled, target)
                .with_context(|| format!("folding the alpha of {k} into lora_up"))?
        };
        out.layers.insert(k.clone(), folded);
    }
    Ok(out)
}

/// Whether `set` has a layer only LyCORIS writes (LoHa, LoKr, DoRA).
pub fn is_lycoris(set: &LoraSet) -> bool {
    set.layers.values().any(|l| !l.is_plain())
}
