//! Model architectures as tables of the layers a LoRA can adapt.
//!
//! An [`Architecture`] maps every Linear / Conv2d layer of a UNet and a CLIP text encoder, by
//! component-prefixed module path (`unet.down_blocks.0…to_q`, `text_encoder.text_model…q_proj`,
//! the keys of [`crate::lora::LoraSet::layers`]), to its weight shape. It is built by
//! constructing the models structure-only ([`ModelWeights::structure_only`]) from their configs,
//! so it lists exactly the layers our models have. Formats whose keys do not spell the module
//! path unambiguously (kohya's underscores, cloneofsimo's indices) are resolved against it.

use crate::hub::ModelSource;
use crate::lora::{Component, LayerKey};
use crate::models::clip::{ClipActivation, ClipTextConfig, ClipTextModel};
use crate::models::presets::SD15_UNET_CONFIG;
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::walk::LayerWalk;
use crate::models::weights::ModelWeights;
use anyhow::Context;
use candle_core::{DType, Device};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The component-prefixed module paths and weight shapes of a model's adaptable layers.
#[derive(Debug, Clone, Default)]
pub struct Architecture {
    /// A short name for messages (`SD 1.5`, a model folder, …).
    pub name: String,
    layers: BTreeMap<LayerKey, Vec<usize>>,
}

/// `unet/config.json` of Stable Diffusion 2.1 (the fields that shape the layers).
const SD21_UNET_CONFIG: &str = r#"{
  "attention_head_dim": [5, 10, 20, 20],
  "block_out_channels": [320, 640, 1280, 1280],
  "cross_attention_dim": 1024,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "sample_size": 96,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "upcast_attention": true,
  "use_linear_projection": true
}"#;

fn clip_config(
    hidden: usize,
    layers: usize,
    heads: usize,
    ffn: usize,
    act: ClipActivation,
) -> ClipTextConfig {
    ClipTextConfig {
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: ffn,
        hidden_act: act,
        ..ClipTextConfig::default()
    }
}

impl Architecture {
    /// The layers of one built model part under `component` (`unet` or `text_encoder`), from
    /// its layer walk.
    fn from_walk(name: &str, component: Component, model: &dyn LayerWalk) -> Self {
        let layers = model
            .walk_layers()
            .iter()
            .map(|l| {
                (
                    LayerKey::new(component, l.path()),
                    l.weight().dims().to_vec(),
                )
            })
            .collect();
        Self {
            name: name.to_string(),
            layers,
        }
    }

    /// Adds the layers of `other` (its shapes win for paths both have).
    pub fn merge(mut self, other: &Architecture) -> Self {
        for (k, v) in &other.layers {
            self.layers.insert(k.clone(), v.clone());
        }
        self
    }

    /// Builds the UNet and/or the text encoder structure-only and records their layers.
    pub fn from_configs(
        name: &str,
        unet: Option<&UNet2DConditionConfig>,
        text_encoder: Option<&ClipTextConfig>,
    ) -> anyhow::Result<Self> {
        let mut arch = Self {
            name: name.to_string(),
            layers: BTreeMap::new(),
        };
        if let Some(cfg) = unet {
            let w = ModelWeights::structure_only("unet");
            let unet = UNet2DConditionModel::new(w.var_builder(DType::F32, &Device::Cpu), cfg)
                .with_context(|| format!("cannot build the UNet of {name} from its config"))?;
            arch = arch.merge(&Self::from_walk(name, Component::Unet, &unet));
        }
        if let Some(cfg) = text_encoder {
            let w = ModelWeights::structure_only("text_encoder");
            let te = ClipTextModel::new(w.var_builder(DType::F32, &Device::Cpu), cfg)
                .with_context(|| {
                    format!("cannot build the text encoder of {name} from its config")
                })?;
            arch = arch.merge(&Self::from_walk(name, Component::TextEncoder, &te));
        }
        Ok(arch)
    }

    /// The architecture of a diffusers model (folder or Hugging Face id): `unet/config.json`
    /// and, when present, `text_encoder/config.json`.
    pub fn from_model(model: &ModelSource) -> anyhow::Result<Self> {
        if let ModelSource::SingleFile(s) = model {
            let info = s.info()?;
            let c = &info.configs;
            return Self::from_configs(&model.describe(), Some(&c.unet), Some(&c.text));
        }
        let unet_path = model.require("unet/config.json")?;
        let unet = UNet2DConditionConfig::from_file(&unet_path)?;
        let te = match model.file("text_encoder/config.json")? {
            Some(p) => Some(ClipTextConfig::from_file(&p)?),
            None => None,
        };
        Self::from_configs(&model.describe(), Some(&unet), te.as_ref())
    }

    /// Stable Diffusion 1.x (UNet of 1.5, CLIP ViT-L/14 text encoder).
    pub fn sd15() -> &'static Architecture {
        static A: OnceLock<Architecture> = OnceLock::new();
        A.get_or_init(|| {
            let unet: UNet2DConditionConfig =
                serde_json::from_str(SD15_UNET_CONFIG).expect("built-in SD 1.5 config parses");
            let te = clip_config(768, 12, 12, 3072, ClipActivation::QuickGelu);
            Self::from_configs("SD 1.x", Some(&unet), Some(&te)).expect("built-in SD 1.5 builds")
        })
    }

    /// Stable Diffusion 2.x (UNet of 2.1, OpenCLIP ViT-H text encoder with 23 layers).
    pub fn sd21() -> &'static Architecture {
        static A: OnceLock<Architecture> = OnceLock::new();
        A.get_or_init(|| {
            let unet: UNet2DConditionConfig =
                serde_json::from_str(SD21_UNET_CONFIG).expect("built-in SD 2.1 config parses");
            let te = clip_config(1024, 23, 16, 4096, ClipActivation::Gelu);
            Self::from_configs("SD 2.x", Some(&unet), Some(&te)).expect("built-in SD 2.1 builds")
        })
    }

    /// The built-in architectures, tried in this order when no model is given.
    pub fn known() -> [&'static Architecture; 2] {
        [Self::sd15(), Self::sd21()]
    }

    /// Every layer: component-prefixed module path → weight shape.
    pub fn layers(&self) -> &BTreeMap<LayerKey, Vec<usize>> {
        &self.layers
    }

    /// The weight shape of one layer.
    pub fn get(&self, path: &str) -> Option<&[usize]> {
        self.layers.get(path).map(|v| v.as_slice())
    }

    /// True when the architecture has no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The UNet's cross-attention width (input width of any `attn2.to_k`).
    pub fn cross_attention_dim(&self) -> Option<usize> {
        self.layers
            .iter()
            .find(|(k, s)| {
                k.component() == Some(Component::Unet)
                    && k.path().ends_with(".attn2.to_k")
                    && s.len() == 2
            })
            .map(|(_, s)| s[1])
    }

    /// The text encoder's width (input width of any `self_attn.q_proj`).
    pub fn text_width(&self) -> Option<usize> {
        self.layers
            .iter()
            .find(|(k, _)| {
                k.component() == Some(Component::TextEncoder)
                    && k.path().ends_with(".self_attn.q_proj")
            })
            .map(|(_, s)| s[1])
    }
}

/// The Stable Diffusion family a cross-attention (or, without UNet layers, text-encoder) width
/// belongs to, as `lora inspect` prints it.
pub fn base_model_name(cross_attention_dim: Option<usize>, text_width: Option<usize>) -> String {
    match (cross_attention_dim, text_width) {
        (Some(768), _) => "SD 1.x (cross-attention dim 768)".into(),
        (Some(1024), _) => "SD 2.x (cross-attention dim 1024)".into(),
        (Some(2048), _) => "SDXL (cross-attention dim 2048)".into(),
        (Some(n), _) => format!("unknown (cross-attention dim {n})"),
        (None, Some(768)) => "SD 1.x (text encoder width 768)".into(),
        (None, Some(1024)) => "SD 2.x (text encoder width 1024)".into(),
        (None, Some(n)) => format!("unknown (text encoder width {n})"),
        (None, None) => "unknown (no cross-attention or text-encoder layer to tell)".into(),
    }
}

/// The module-path rank of a segment in diffusers' / transformers' registration order, with
/// the one difference of diffusers < 0.15: a transformer block registered `attn1, ff, attn2`.
/// Used to sort paths into the traversal order cloneofsimo's files index by.
const SEGMENT_ORDER: &[(&str, u32)] = &[
    // UNet2DConditionModel
    ("conv_in", 0),
    ("time_proj", 1),
    ("time_embedding", 2),
    ("down_blocks", 3),
    ("up_blocks", 4),
    ("mid_block", 5),
    ("conv_norm_out", 6),
    ("conv_out", 7),
    ("linear_1", 0),
    ("linear_2", 1),
    // blocks
    ("attentions", 0),
    ("resnets", 1),
    ("downsamplers", 2),
    ("upsamplers", 2),
    // Transformer2DModel
    ("norm", 0),
    ("proj_in", 1),
    ("transformer_blocks", 2),
    ("proj_out", 3),
    // BasicTransformerBlock (pre-0.15 order)
    ("attn1", 0),
    ("ff", 1),
    ("attn2", 2),
    // Attention / FeedForward
    ("to_q", 0),
    ("to_k", 1),
    ("to_v", 2),
    ("to_out", 3),
    ("net", 0),
    ("proj", 0),
    // ResnetBlock2D
    ("conv1", 0),
    ("time_emb_proj", 1),
    ("conv2", 2),
    ("conv_shortcut", 3),
    ("conv", 0),
    // CLIP
    ("text_model", 0),
    ("encoder", 1),
    ("layers", 0),
    ("self_attn", 0),
    ("mlp", 1),
    ("k_proj", 0),
    ("v_proj", 1),
    ("q_proj", 2),
    ("out_proj", 3),
    ("fc1", 0),
    ("fc2", 1),
];

/// A sort key putting module paths into pre-diffusers-0.15 module-traversal order (parents
/// before children, siblings in registration order, indices numerically).
pub fn traversal_key(path: &str) -> Vec<(u32, u64, String)> {
    path.split('.')
        .map(|seg| match seg.parse::<u64>() {
            Ok(n) => (0, n, String::new()),
            Err(_) => match SEGMENT_ORDER.iter().find(|(s, _)| *s == seg) {
                Some((_, r)) => (*r, 0, String::new()),
                None => (1000, 0, seg.to_string()),
            },
        })
        .collect()
}
