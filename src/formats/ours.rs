//! Our own LoRA format ("ours", version 1).
//!
//! A safetensors file. For every adapted layer, keyed by its component-prefixed module path
//! (`unet.<diffusers module path>` or `text_encoder.<transformers module path>`, e.g.
//! `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`):
//!
//! | key | shape | dtype |
//! |---|---|---|
//! | `<layer>.lora_down.weight` | `[r, in]` (Linear) or `[r, in, kh, kw]` (Conv2d) | f32, f16 or bf16 |
//! | `<layer>.lora_up.weight` | `[out, r]` or `[out, r, 1, 1]` | same |
//! | `<layer>.alpha` | `[]` | f32 |
//!
//! The layer's weight becomes `W + (alpha / r) · up · down` (for a Conv2d, `up` as `[out, r]`
//! times `down` as `[r, in·kh·kw]`, reshaped to the kernel).
//!
//! Metadata (`__metadata__`, all strings):
//! - `lora_diffusion.format`: `"1"` (this version);
//! - `rank`: the rank shared by most layers (each layer's own is its `lora_down` row count);
//! - `alpha`: the alpha shared by most layers (each layer's own is its `.alpha`);
//! - `targets`: JSON list of the adapted module names (`["to_k","to_out.0","to_q","to_v","q_proj",…]`);
//! - `base_model`: the model it was trained on, when known (`ss_sd_model_name` of a kohya file);
//! - `training_args`: JSON of the training settings, when known;
//! - `lora_diffusion.tokens`: JSON list of the learned tokens, when the LoRA has any; each
//!   token's vectors are the tensor `learned_embeds.<token>` `[n, width]` (kept in its dtype);
//! - any other metadata of the source file (e.g. kohya's training `ss_*` entries) carried over.

use super::keymap::{KeyIndex, OURS};
use super::{
    common, fmt_alpha, gather, ord_f64, Architecture, Encoded, Format, LoraFile, LoraFormat,
    ReadContext,
};
use crate::lora::LoraSet;
use std::collections::BTreeSet;

/// The metadata key naming our format version.
pub const FORMAT_KEY: &str = "lora_diffusion.format";
/// The format version written.
pub const VERSION: &str = "1";

/// Module-name tails reported in `targets` (longest match wins; else the last path segment).
const TARGET_NAMES: &[&str] = &[
    "ff.net.0.proj",
    "ff.net.2",
    "to_out.0",
    "to_q",
    "to_k",
    "to_v",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "fc1",
    "fc2",
];

/// The module name of a layer as listed in `targets` (`to_q`, `to_out.0`, `ff.net.0.proj`, …).
pub fn target_name(layer: &str) -> String {
    TARGET_NAMES
        .iter()
        .filter(|t| layer.ends_with(&format!(".{t}")))
        .max_by_key(|t| t.len())
        .map(|t| t.to_string())
        .unwrap_or_else(|| layer.rsplit('.').next().unwrap_or(layer).to_string())
}

/// The distinct module names a LoRA adapts, sorted.
pub fn targets(set: &LoraSet) -> Vec<String> {
    set.layers
        .keys()
        .map(|l| target_name(l.as_str()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Our format.
pub struct Ours;

impl LoraFormat for Ours {
    fn format(&self) -> Format {
        Format::Ours
    }

    fn read(&self, file: &LoraFile, _ctx: &ReadContext) -> anyhow::Result<LoraSet> {
        if let Some(v) = file.metadata.get(FORMAT_KEY) {
            if v != VERSION {
                anyhow::bail!(
                    "{}: {FORMAT_KEY} is {v:?}; this build reads version {VERSION}",
                    file.path.display()
                );
            }
        }
        let is_embed = |k: &str| k.starts_with(super::embeddings::OURS_PREFIX);
        let raw = gather(file, &OURS, &KeyIndex::default(), is_embed)?;
        let file_alpha: Option<f64> = file.metadata.get("alpha").and_then(|a| a.parse().ok());
        let shapes = super::arch_shapes(_ctx);
        let mut set = super::finish_shaped(
            file,
            raw,
            |_, r| Ok(file_alpha.unwrap_or(r as f64)),
            &shapes,
        )?;
        set.embeddings = super::embeddings::read_ours(file)?;
        Ok(set)
    }

    fn encode(&self, set: &LoraSet, _arch: Option<&Architecture>) -> anyhow::Result<Encoded> {
        let mut enc = Encoded::carrying(set);
        let m = &mut enc.metadata;
        m.insert(FORMAT_KEY.into(), VERSION.into());
        if let Some(r) = common(set, |l| l.rank()) {
            m.insert("rank".into(), r.to_string());
        }
        if let Some(a) = common(set, |l| ord_f64(l.alpha())) {
            let alpha = set
                .layers
                .values()
                .map(|l| l.alpha())
                .find(|x| ord_f64(*x) == a)
                .unwrap_or(0.0);
            m.insert("alpha".into(), fmt_alpha(alpha));
        }
        m.insert("targets".into(), serde_json::to_string(&targets(set))?);
        if !m.contains_key("base_model") {
            if let Some(name) = set.metadata.get("ss_sd_model_name") {
                m.insert("base_model".into(), name.clone());
            }
        }
        for (layer, w) in &set.layers {
            enc.push_layer(&OURS, layer, w, true)?;
        }
        super::embeddings::push_ours(&mut enc, set)?;
        Ok(enc)
    }
}
