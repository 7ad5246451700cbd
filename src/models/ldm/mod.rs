//! The original Stable Diffusion (LDM) single-file layout: `model.diffusion_model.*` (UNet),
//! `first_stage_model.*` (VAE), `cond_stage_model.*` (text encoder) in one file.
//!
//! [`Family`] and the configs are inferred from tensor shapes; the key map ([`keys`]) turns
//! the keys a model asks for into single-file keys once, at load.

pub mod keys;

use super::clip::{ClipTextConfig, ClipTextModel};
use super::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use super::vae::{AutoencoderKL, AutoencoderKLConfig};
use super::weights::ModelWeights;
use anyhow::{bail, Context};
use candle_core::{DType, Device};
use keys::{Part, TextLayout, UnetLayout, VaeLayout};
use serde_json::json;
use std::collections::BTreeMap;

/// Tensor name → shape of a whole single file.
pub type Shapes = BTreeMap<String, Vec<usize>>;

/// Keys that identify a single file, as diffusers' `CHECKPOINT_KEY_NAMES` uses them.
pub const UNET_PROBE: &str = "model.diffusion_model.input_blocks.0.0.weight";
/// The key diffusers reads the context dim from (768: SD 1.x, 1024: SD 2.x).
pub const V2_PROBE: &str =
    "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight";
/// The SD 1.x CLIP key diffusers checks.
pub const CLIP_PROBE: &str =
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight";
/// The SD 2.x OpenCLIP key diffusers checks.
pub const OPEN_CLIP_PROBE: &str = "cond_stage_model.model.token_embedding.weight";
/// The first VAE key.
pub const VAE_PROBE: &str = "first_stage_model.encoder.conv_in.weight";
/// Keys of SDXL single files (refused with their name).
const SDXL_PROBES: &[&str] = &[
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
    "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias",
];

/// Stable Diffusion generation of a single file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: CLIP ViT-L text encoder, 8 attention heads, ε-prediction.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H text encoder, 64-channel heads, linear projections.
    Sd2,
}

impl Family {
    /// The diffusers name of the family (`v1`, `v2`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Sd1 => "SD 1.x (v1)",
            Self::Sd2 => "SD 2.x (v2)",
        }
    }
}

/// Decides whether `shapes` is an SD 1.x or 2.x single file: the text encoder's layout, else
/// the cross-attention width as diffusers' `infer_diffusers_model_type` reads it (1024 → v2).
pub fn detect(shapes: &Shapes, file: &str) -> anyhow::Result<Family> {
    if let Some(k) = SDXL_PROBES.iter().find(|k| shapes.contains_key(**k)) {
        bail!("{file}: an SDXL single file (it has {k}); only SD 1.x and 2.x single files are supported");
    }
    if !shapes.contains_key(UNET_PROBE) {
        let mut seen: Vec<&String> = shapes.keys().take(5).collect();
        seen.sort();
        bail!(
            "{file}: not a Stable Diffusion single-file checkpoint: expected the original (LDM) keys \
             {UNET_PROBE}, {VAE_PROBE} and {CLIP_PROBE} (SD 1.x) or {OPEN_CLIP_PROBE} (SD 2.x); \
             the file has {} tensors, e.g. {seen:?}",
            shapes.len()
        );
    }
    if shapes.contains_key(OPEN_CLIP_PROBE) {
        return Ok(Family::Sd2);
    }
    if shapes.contains_key(CLIP_PROBE) {
        return Ok(Family::Sd1);
    }
    match shapes.get(V2_PROBE).and_then(|s| s.last()) {
        Some(1024) => Ok(Family::Sd2),
        _ => Ok(Family::Sd1),
    }
}

fn shape<'a>(shapes: &'a Shapes, key: &str, file: &str) -> anyhow::Result<&'a [usize]> {
    shapes
        .get(key)
        .map(|s| s.as_slice())
        .with_context(|| format!("{file}: expected the key {key}, which the file does not have"))
}

fn dim(shapes: &Shapes, key: &str, i: usize, file: &str) -> anyhow::Result<usize> {
    let s = shape(shapes, key, file)?;
    s.get(i).copied().with_context(|| {
        format!(
            "{file}: {key} has shape {s:?}, expected at least {} dims",
            i + 1
        )
    })
}

/// How many `prefix{i}.` groups exist, counting i = 0, 1, … until one is absent.
fn count(shapes: &Shapes, prefix: &str) -> usize {
    (0..)
        .take_while(|i| {
            let p = format!("{prefix}{i}.");
            shapes
                .range(p.clone()..)
                .next()
                .is_some_and(|(k, _)| k.starts_with(&p))
        })
        .count()
}

fn has_prefix(shapes: &Shapes, p: &str) -> bool {
    shapes
        .range(p.to_string()..)
        .next()
        .is_some_and(|(k, _)| k.starts_with(p))
}

/// The UNet config of a single file from its shapes and the family's fixed settings (groups 32;
/// SD 1.x 8 heads, SD 2.x heads of 64 channels, linear projections, upcast attention).
pub fn infer_unet_config(
    shapes: &Shapes,
    family: Family,
    file: &str,
) -> anyhow::Result<UNet2DConditionConfig> {
    let u = keys::UNET_PREFIX;
    let in_ch = dim(shapes, &format!("{u}input_blocks.0.0.weight"), 1, file)?;
    let out_ch = dim(shapes, &format!("{u}out.2.weight"), 0, file)?;
    let inputs = count(shapes, &format!("{u}input_blocks."));
    let first_op =
        (1..inputs).find(|i| shapes.contains_key(&format!("{u}input_blocks.{i}.0.op.weight")));
    let per = first_op.unwrap_or(inputs);
    if per < 2 {
        bail!("{file}: cannot read the UNet's block structure from input_blocks.*");
    }
    let levels = inputs.div_ceil(per);
    let mut channels = vec![];
    let mut down = vec![];
    let mut ctx = None;
    let mut linear = false;
    let mut depth = 1;
    for b in 0..levels {
        let first = 1 + b * per;
        channels.push(dim(
            shapes,
            &format!("{u}input_blocks.{first}.0.out_layers.3.weight"),
            0,
            file,
        )?);
        let attn = format!("{u}input_blocks.{first}.1.");
        let has = shapes.contains_key(&format!("{attn}proj_in.weight"));
        if has && ctx.is_none() {
            ctx = Some(dim(
                shapes,
                &format!("{attn}transformer_blocks.0.attn2.to_k.weight"),
                1,
                file,
            )?);
            linear = shape(shapes, &format!("{attn}proj_in.weight"), file)?.len() == 2;
            depth = count(shapes, &format!("{attn}transformer_blocks.")).max(1);
        }
        down.push(if has {
            "CrossAttnDownBlock2D"
        } else {
            "DownBlock2D"
        });
    }
    let up: Vec<&str> = (0..levels)
        .map(|b| {
            let has =
                shapes.contains_key(&format!("{u}output_blocks.{}.1.proj_in.weight", b * per));
            if has {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            }
        })
        .collect();
    let ctx = ctx.with_context(|| {
        format!("{file}: the UNet has no cross-attention (input_blocks.*.1.proj_in)")
    })?;
    let heads: serde_json::Value = match family {
        Family::Sd1 => json!(8),
        Family::Sd2 => json!(channels.iter().map(|c| c / 64).collect::<Vec<_>>()),
    };
    let mid = has_prefix(shapes, &format!("{u}middle_block.1.proj_in."));
    let cfg = json!({
        "in_channels": in_ch, "out_channels": out_ch,
        "block_out_channels": channels, "layers_per_block": per - 1,
        "down_block_types": down, "up_block_types": up,
        "mid_block_type": if mid { json!("UNetMidBlock2DCrossAttn") } else { json!(null) },
        "cross_attention_dim": ctx, "attention_head_dim": heads,
        "use_linear_projection": linear, "transformer_layers_per_block": depth,
        "upcast_attention": family == Family::Sd2, "norm_num_groups": 32,
        "sample_size": if family == Family::Sd2 { 96 } else { 64 },
        "flip_sin_to_cos": true, "freq_shift": 0, "norm_eps": 1e-5,
    });
    let cfg: UNet2DConditionConfig = serde_json::from_value(cfg)
        .with_context(|| format!("{file}: inferred UNet config does not parse"))?;
    cfg.resolve().map_err(|e| {
        anyhow::anyhow!(
            "{file}: inferred UNet config is not supported: {e} (a model not of the standard \
                 SD layout: pass --model-config DIR, a diffusers folder with its configs)"
        )
    })?;
    Ok(cfg)
}

/// The VAE config of a single file from its shapes (groups 32, scaling factor 0.18215).
pub fn infer_vae_config(
    shapes: &Shapes,
    family: Family,
    file: &str,
) -> anyhow::Result<AutoencoderKLConfig> {
    let v = keys::VAE_PREFIX;
    let levels = count(shapes, &format!("{v}encoder.down."));
    if levels == 0 {
        bail!("{file}: expected VAE keys {v}encoder.down.0.*, which the file does not have");
    }
    let channels: Vec<usize> = (0..levels)
        .map(|i| {
            dim(
                shapes,
                &format!("{v}encoder.down.{i}.block.0.conv2.weight"),
                0,
                file,
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let cfg = json!({
        "in_channels": dim(shapes, &format!("{v}encoder.conv_in.weight"), 1, file)?,
        "out_channels": dim(shapes, &format!("{v}decoder.conv_out.weight"), 0, file)?,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "block_out_channels": channels,
        "layers_per_block": count(shapes, &format!("{v}encoder.down.0.block.")),
        "latent_channels": dim(shapes, &format!("{v}post_quant_conv.weight"), 0, file)?,
        "norm_num_groups": 32,
        "sample_size": if family == Family::Sd2 { 768 } else { 512 },
        "scaling_factor": 0.18215,
    });
    AutoencoderKLConfig::from_json_str(
        &cfg.to_string(),
        &format!("the VAE config inferred from {file}"),
    )
}

/// The text-encoder config of a single file from its shapes (heads of 64 channels; SD 1.x
/// quick-GELU, SD 2.x GELU; a 24-block OpenCLIP encoder is used to its penultimate block).
pub fn infer_text_config(
    shapes: &Shapes,
    layout: TextLayout,
    file: &str,
) -> anyhow::Result<ClipTextConfig> {
    let (tok, pos, layers, fc1, act) = match layout {
        TextLayout::Clip => {
            let p = keys::CLIP_PREFIX;
            (
                format!("{p}text_model.embeddings.token_embedding.weight"),
                format!("{p}text_model.embeddings.position_embedding.weight"),
                count(shapes, &format!("{p}text_model.encoder.layers.")),
                format!("{p}text_model.encoder.layers.0.mlp.fc1.weight"),
                "quick_gelu",
            )
        }
        TextLayout::OpenClip => {
            let p = keys::OPEN_CLIP_PREFIX;
            let n = count(shapes, &format!("{p}transformer.resblocks."));
            (
                format!("{p}token_embedding.weight"),
                format!("{p}positional_embedding"),
                if n == 24 { 23 } else { n },
                format!("{p}transformer.resblocks.0.mlp.c_fc.weight"),
                "gelu",
            )
        }
    };
    let hidden = dim(shapes, &tok, 1, file)?;
    let cfg = json!({
        "vocab_size": dim(shapes, &tok, 0, file)?,
        "hidden_size": hidden,
        "max_position_embeddings": dim(shapes, &pos, 0, file)?,
        "num_hidden_layers": layers,
        "intermediate_size": dim(shapes, &fc1, 0, file)?,
        "num_attention_heads": (hidden / 64).max(1),
        "hidden_act": act,
        "projection_dim": hidden,
    });
    ClipTextConfig::from_json_str(
        &cfg.to_string(),
        &format!("the text-encoder config inferred from {file}"),
    )
}

/// The key layout of the three components, from their configs.
#[derive(Debug, Clone)]
pub struct Layout {
    /// UNet rules.
    pub unet: UnetLayout,
    /// VAE rules.
    pub vae: VaeLayout,
    /// Text-encoder rules.
    pub text: TextLayout,
}

impl Layout {
    /// The layout for models of these configs (the single-file layout has one resnet count
    /// for every level).
    pub fn new(
        unet: &UNet2DConditionConfig,
        vae: &AutoencoderKLConfig,
        text: TextLayout,
    ) -> anyhow::Result<Self> {
        let levels = unet.block_out_channels.len();
        let per = unet
            .layers_per_block
            .expand(levels, "layers_per_block")
            .map_err(|e| anyhow::anyhow!(e))?;
        if per.windows(2).any(|w| w[0] != w[1]) {
            bail!("UNet layers_per_block {per:?} differs per level; the single-file layout has one count");
        }
        Ok(Self {
            unet: UnetLayout {
                layers_per_block: per.first().copied().unwrap_or(1),
                levels: unet.block_out_channels.len(),
                up_attention: unet
                    .up_block_types
                    .iter()
                    .map(|t| t.contains("CrossAttn"))
                    .collect(),
            },
            vae: VaeLayout {
                levels: vae.block_out_channels.len(),
            },
            text,
        })
    }

    /// The text layout of `family`.
    pub fn text_of(family: Family) -> TextLayout {
        match family {
            Family::Sd1 => TextLayout::Clip,
            Family::Sd2 => TextLayout::OpenClip,
        }
    }

    /// The full single-file key of a diffusers key of `component`, and how it is stored.
    pub fn ldm_key(&self, component: &str, key: &str) -> anyhow::Result<(String, Part)> {
        Ok(match component {
            "unet" => (
                format!("{}{}", keys::UNET_PREFIX, keys::unet_key(key, &self.unet)?),
                Part::Whole,
            ),
            "vae" => {
                let (k, p) = keys::vae_key(key, &self.vae)?;
                (format!("{}{k}", keys::VAE_PREFIX), p)
            }
            "text_encoder" => {
                let (k, p) = keys::text_key(key, self.text)?;
                let prefix = match self.text {
                    TextLayout::Clip => keys::CLIP_PREFIX,
                    TextLayout::OpenClip => keys::OPEN_CLIP_PREFIX,
                };
                (format!("{prefix}{k}"), p)
            }
            other => bail!("a single file has no component {other}"),
        })
    }
}

/// Configs of the three components of one model.
#[derive(Debug, Clone)]
pub struct Configs {
    /// UNet config.
    pub unet: UNet2DConditionConfig,
    /// VAE config.
    pub vae: AutoencoderKLConfig,
    /// Text-encoder config.
    pub text: ClipTextConfig,
}

/// One diffusers tensor of a component and where it lives in the single file.
#[derive(Debug, Clone)]
pub struct Mapped {
    /// diffusers key (our module path).
    pub key: String,
    /// Its shape in the model.
    pub shape: Vec<usize>,
    /// Single-file key.
    pub ldm: String,
    /// How it is stored there.
    pub part: Part,
}

/// Every tensor `component` of a model with `configs` needs, with its single-file key: the
/// model is built from placeholders and the keys it asks for are mapped.
pub fn component_map(
    component: &str,
    configs: &Configs,
    layout: &Layout,
) -> anyhow::Result<Vec<Mapped>> {
    let w = ModelWeights::structure_only(component);
    let vb = w.var_builder(DType::F32, &Device::Cpu);
    match component {
        "unet" => UNet2DConditionModel::new(vb, &configs.unet).map(|_| ())?,
        "vae" => AutoencoderKL::new(vb, &configs.vae).map(|_| ())?,
        "text_encoder" => ClipTextModel::new(vb, &configs.text).map(|_| ())?,
        other => bail!("a single file has no component {other}"),
    }
    w.requested()
        .into_iter()
        .map(|(key, shape)| {
            let (ldm, part) = layout.ldm_key(component, &key)?;
            Ok(Mapped {
                key,
                shape,
                ldm,
                part,
            })
        })
        .collect()
}
