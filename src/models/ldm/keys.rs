//! diffusers state-dict key → original (LDM) single-file key, per component.
//!
//! The rules are those of diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
//! `convert_ldm_clip_checkpoint` and `convert_open_clip_checkpoint` run backwards; the map is
//! built from the keys a model asks for, so one direction of rules serves reading and writing.

use anyhow::bail;

/// Prefix of the UNet in a single file.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefix of the VAE in a single file.
pub const VAE_PREFIX: &str = "first_stage_model.";
/// Prefix of the SD 1.x CLIP text encoder (Hugging Face layout under it).
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// Prefix of the SD 2.x OpenCLIP text encoder.
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// Prefix of the EMA copy of the UNet (ignored: diffusers reads the non-EMA weights by default).
pub const EMA_PREFIX: &str = "model_ema.";

/// How a diffusers tensor is stored in the single file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The same tensor.
    Whole,
    /// Rows `index·n .. (index+1)·n` of a fused q/k/v tensor (OpenCLIP `in_proj_*`, 3n rows).
    Chunk {
        /// 0 = q, 1 = k, 2 = v.
        index: usize,
    },
    /// A linear weight [o, i] stored as a 1×1 convolution [o, i, 1, 1] (VAE attention).
    Conv1x1,
}

/// The UNet facts the key rules depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetLayout {
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// Number of resolution levels.
    pub levels: usize,
    /// Per up block (diffusers order): whether it has attentions.
    pub up_attention: Vec<bool>,
}

/// The VAE facts the key rules depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeLayout {
    /// Number of resolution levels.
    pub levels: usize,
}

/// Which text encoder layout the file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextLayout {
    /// SD 1.x: Hugging Face CLIP keys under `cond_stage_model.transformer.`.
    Clip,
    /// SD 2.x: OpenCLIP keys under `cond_stage_model.model.` (fused q/k/v `in_proj`).
    OpenClip,
}

fn num(s: &str, key: &str) -> anyhow::Result<usize> {
    s.parse()
        .map_err(|_| anyhow::anyhow!("unexpected index {s:?} in diffusers key {key}"))
}

/// Splits `a.b.rest` after `n` dot-separated parts.
fn split_parts(key: &str, n: usize) -> Option<(Vec<&str>, &str)> {
    let mut parts = vec![];
    let mut rest = key;
    for _ in 0..n {
        let (p, r) = rest.split_once('.')?;
        parts.push(p);
        rest = r;
    }
    Some((parts, rest))
}

fn resnet_inner(rest: &str) -> String {
    const MAP: &[(&str, &str)] = &[
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("time_emb_proj.", "emb_layers.1."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("conv_shortcut.", "skip_connection."),
    ];
    for (d, l) in MAP {
        if let Some(tail) = rest.strip_prefix(d) {
            return format!("{l}{tail}");
        }
    }
    rest.to_string()
}

/// The single-file key (without [`UNET_PREFIX`]) of a diffusers UNet key.
pub fn unet_key(key: &str, layout: &UnetLayout) -> anyhow::Result<String> {
    const TOP: &[(&str, &str)] = &[
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ];
    for (d, l) in TOP {
        if let Some(tail) = key.strip_prefix(d) {
            return Ok(format!("{l}{tail}"));
        }
    }
    let per = layout.layers_per_block + 1;
    let unknown = || anyhow::anyhow!("no single-file name for UNet key {key}");
    if let Some(rest) = key.strip_prefix("mid_block.") {
        let (p, tail) = split_parts(rest, 2).ok_or_else(unknown)?;
        return match (p[0], p[1]) {
            ("resnets", "0") => Ok(format!("middle_block.0.{}", resnet_inner(tail))),
            ("resnets", "1") => Ok(format!("middle_block.2.{}", resnet_inner(tail))),
            ("attentions", "0") => Ok(format!("middle_block.1.{tail}")),
            _ => Err(unknown()),
        };
    }
    let (p, tail) = split_parts(key, 4).ok_or_else(unknown)?;
    let b = num(p[1], key)?;
    let j = num(p[3], key)?;
    match (p[0], p[2]) {
        ("down_blocks", "resnets") => Ok(format!(
            "input_blocks.{}.0.{}",
            1 + b * per + j,
            resnet_inner(tail)
        )),
        ("down_blocks", "attentions") => Ok(format!("input_blocks.{}.1.{tail}", 1 + b * per + j)),
        ("down_blocks", "downsamplers") => {
            let tail = tail.strip_prefix("conv.").ok_or_else(unknown)?;
            Ok(format!("input_blocks.{}.0.op.{tail}", (b + 1) * per))
        }
        ("up_blocks", "resnets") => Ok(format!(
            "output_blocks.{}.0.{}",
            b * per + j,
            resnet_inner(tail)
        )),
        ("up_blocks", "attentions") => Ok(format!("output_blocks.{}.1.{tail}", b * per + j)),
        ("up_blocks", "upsamplers") => {
            let attn = layout.up_attention.get(b).copied().unwrap_or(false);
            Ok(format!(
                "output_blocks.{}.{}.{tail}",
                b * per + layout.layers_per_block,
                if attn { 2 } else { 1 }
            ))
        }
        _ => Err(unknown()),
    }
}

/// The single-file key (without [`VAE_PREFIX`]) of a diffusers VAE key, and how it is stored.
pub fn vae_key(key: &str, layout: &VaeLayout) -> anyhow::Result<(String, Part)> {
    let unknown = || anyhow::anyhow!("no single-file name for VAE key {key}");
    if key.starts_with("quant_conv.") || key.starts_with("post_quant_conv.") {
        return Ok((key.to_string(), Part::Whole));
    }
    let (side, rest) = key.split_once('.').ok_or_else(unknown)?;
    if side != "encoder" && side != "decoder" {
        return Err(unknown());
    }
    let resnet = |t: &str| t.replace("conv_shortcut.", "nin_shortcut.");
    let whole = |s: String| Ok((format!("{side}.{s}"), Part::Whole));
    for top in ["conv_in.", "conv_out."] {
        if rest.starts_with(top) {
            return whole(rest.to_string());
        }
    }
    if let Some(t) = rest.strip_prefix("conv_norm_out.") {
        return whole(format!("norm_out.{t}"));
    }
    if let Some(r) = rest.strip_prefix("mid_block.") {
        let (p, tail) = split_parts(r, 2).ok_or_else(unknown)?;
        return match (p[0], p[1]) {
            ("resnets", "0") => whole(format!("mid.block_1.{}", resnet(tail))),
            ("resnets", "1") => whole(format!("mid.block_2.{}", resnet(tail))),
            ("attentions", "0") => {
                let (name, param) = tail.rsplit_once('.').ok_or_else(unknown)?;
                let ldm = match name {
                    "group_norm" => "norm",
                    "to_q" => "q",
                    "to_k" => "k",
                    "to_v" => "v",
                    "to_out.0" => "proj_out",
                    _ => return Err(unknown()),
                };
                let part = if name != "group_norm" && param == "weight" {
                    Part::Conv1x1
                } else {
                    Part::Whole
                };
                Ok((format!("{side}.mid.attn_1.{ldm}.{param}"), part))
            }
            _ => Err(unknown()),
        };
    }
    let (p, tail) = split_parts(rest, 4).ok_or_else(unknown)?;
    let b = num(p[1], key)?;
    let level = match (side, p[0]) {
        ("encoder", "down_blocks") => b,
        ("decoder", "up_blocks") if b < layout.levels => layout.levels - 1 - b,
        _ => return Err(unknown()),
    };
    let group = if side == "encoder" { "down" } else { "up" };
    match p[2] {
        "resnets" => whole(format!("{group}.{level}.block.{}.{}", p[3], resnet(tail))),
        "downsamplers" | "upsamplers" => {
            let what = if side == "encoder" {
                "downsample"
            } else {
                "upsample"
            };
            whole(format!("{group}.{level}.{what}.{tail}"))
        }
        _ => Err(unknown()),
    }
}

/// The single-file key (without the text prefix) of a diffusers CLIP text-encoder key.
pub fn text_key(key: &str, layout: TextLayout) -> anyhow::Result<(String, Part)> {
    if layout == TextLayout::Clip {
        return Ok((key.to_string(), Part::Whole));
    }
    let unknown = || anyhow::anyhow!("no OpenCLIP name for text-encoder key {key}");
    const TOP: &[(&str, &str)] = &[
        (
            "text_model.embeddings.position_embedding.weight",
            "positional_embedding",
        ),
        (
            "text_model.embeddings.token_embedding.weight",
            "token_embedding.weight",
        ),
        ("text_model.final_layer_norm.weight", "ln_final.weight"),
        ("text_model.final_layer_norm.bias", "ln_final.bias"),
    ];
    if let Some((_, l)) = TOP.iter().find(|(d, _)| *d == key) {
        return Ok((l.to_string(), Part::Whole));
    }
    let rest = key
        .strip_prefix("text_model.encoder.layers.")
        .ok_or_else(unknown)?;
    let (i, tail) = rest.split_once('.').ok_or_else(unknown)?;
    let i = num(i, key)?;
    let base = format!("transformer.resblocks.{i}.");
    const INNER: &[(&str, &str)] = &[
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
        ("self_attn.out_proj.", "attn.out_proj."),
    ];
    for (d, l) in INNER {
        if let Some(t) = tail.strip_prefix(d) {
            return Ok((format!("{base}{l}{t}"), Part::Whole));
        }
    }
    for (index, proj) in ["q_proj.", "k_proj.", "v_proj."].iter().enumerate() {
        if let Some(param) = tail
            .strip_prefix("self_attn.")
            .and_then(|t| t.strip_prefix(proj))
        {
            let fused = match param {
                "weight" => "in_proj_weight",
                "bias" => "in_proj_bias",
                _ => return Err(unknown()),
            };
            return Ok((format!("{base}attn.{fused}"), Part::Chunk { index }));
        }
    }
    bail!("no OpenCLIP name for text-encoder key {key}")
}

/// The shape a tensor of diffusers shape `shape` has in the single file.
pub fn stored_shape(shape: &[usize], part: Part) -> Vec<usize> {
    match part {
        Part::Whole => shape.to_vec(),
        Part::Chunk { .. } => {
            let mut s = shape.to_vec();
            if let Some(d) = s.first_mut() {
                *d *= 3;
            }
            s
        }
        Part::Conv1x1 => {
            let mut s = shape.to_vec();
            s.extend([1, 1]);
            s
        }
    }
}
