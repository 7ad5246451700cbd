//! diffusers LoRA files (`pytorch_lora_weights.safetensors`).
//!
//! Read: `unet.<path>.lora.down.weight` / `.lora.up.weight`, `text_encoder.<path>.lora_linear_layer.…`,
//! PEFT names behind the component prefix (`unet.<path>.lora_A.weight`), and the attention-processor
//! names of diffusers < 0.15 (`[unet.]….attn1.processor.to_q_lora.down.weight`,
//! `text_encoder.….self_attn.to_q_lora.down.weight`). alpha: per-layer `.alpha` keys, else the
//! `lora_adapter_metadata` JSON (`unet.lora_alpha`, `unet.alpha_pattern`, …), else diffusers'
//! own rule: the rank of the component's first layer as alpha for all its layers
//! ([`super::peft::first_rank`]).
//! Written as the diffusers training scripts save (UNet `lora.down/up`, text encoder
//! `lora_linear_layer.down/up`) with `lora_adapter_metadata` carrying r, lora_alpha, the
//! targeted module paths and per-layer rank/alpha patterns, so diffusers loads the scale.

use super::keymap::{Component, KeyIndex, DIFFUSERS};
use super::peft::{alpha_from_scales, config_json, first_rank, scales_from_metadata, METADATA_KEY};
use super::{finish, gather, Architecture, Encoded, Format, LoraFile, LoraFormat, ReadContext};
use crate::lora::LoraSet;
use serde_json::{Map, Value};

/// The diffusers format.
pub struct Diffusers;

impl LoraFormat for Diffusers {
    fn format(&self) -> Format {
        Format::Diffusers
    }

    fn read(&self, file: &LoraFile, _ctx: &ReadContext) -> anyhow::Result<LoraSet> {
        let raw = gather(file, &DIFFUSERS, &KeyIndex::default(), |_| false)?;
        let scales = scales_from_metadata(&file.metadata)?;
        let fallback = first_rank(file, &DIFFUSERS);
        finish(file, raw, |layer, r| {
            Ok(alpha_from_scales(&scales, &fallback, layer, r))
        })
    }

    fn encode(&self, set: &LoraSet, _arch: Option<&Architecture>) -> anyhow::Result<Encoded> {
        let mut enc = Encoded::carrying(set);
        let mut meta = Map::new();
        for c in Component::ALL {
            if let Some(cfg) = config_json(set, c) {
                for (k, v) in cfg {
                    meta.insert(format!("{}.{k}", c.name()), v);
                }
            }
        }
        enc.metadata
            .insert(METADATA_KEY.into(), Value::Object(meta).to_string());
        enc.metadata.insert("format".into(), "pt".into());
        for (layer, w) in &set.layers {
            enc.push_layer(&DIFFUSERS, layer, w, false)?;
        }
        Ok(enc)
    }
}
