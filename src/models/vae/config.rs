//! `vae/config.json` of diffusers' `AutoencoderKL`, with diffusers' defaults for absent fields.

use anyhow::{bail, Context};
use serde::{Deserialize, Deserializer};
use std::path::Path;

fn default_channels() -> usize {
    3
}
fn default_down_block_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".to_string()]
}
fn default_up_block_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".to_string()]
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_layers_per_block() -> usize {
    1
}
fn default_act_fn() -> String {
    "silu".to_string()
}
fn default_latent_channels() -> usize {
    4
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_sample_size() -> usize {
    32
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

/// `sample_size` is an int or an `[h, w]` list in the wild; diffusers uses the first entry.
fn de_sample_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        One(usize),
        Many(Vec<usize>),
    }
    match Size::deserialize(d)? {
        Size::One(s) => Ok(s),
        Size::Many(v) => v
            .first()
            .copied()
            .ok_or_else(|| serde::de::Error::custom("sample_size is an empty list")),
    }
}

/// diffusers' `AutoencoderKL` configuration (`vae/config.json`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AutoencoderKLConfig {
    /// Image channels of the encoder input.
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    /// Image channels of the decoder output.
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    /// Encoder block types (only `DownEncoderBlock2D` exists for this model).
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    /// Decoder block types (only `UpDecoderBlock2D`).
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    /// Channels of each encoder block (the decoder uses them reversed).
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    /// Activation of the resnets and before `conv_out` (`silu`/`swish`).
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    /// Channels of the latent space.
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    /// Groups of every group norm.
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    /// Training image size (first entry when the config holds a list).
    #[serde(default = "default_sample_size", deserialize_with = "de_sample_size")]
    pub sample_size: usize,
    /// Latents fed to the UNet are `(mean - shift_factor) * scaling_factor`.
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// Shift subtracted before scaling (SD 3 / FLUX VAEs); `None` for SD 1.x / 2.x.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Per-channel latent means (SDXL-style configs); informative only.
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent standard deviations; informative only.
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// Whether diffusers runs this VAE in f32 even when the pipeline is in f16.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    /// Whether `quant_conv` (1×1, 2·latent → 2·latent) follows the encoder.
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` (1×1, latent → latent) precedes the decoder.
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have their attention layer.
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: default_channels(),
            out_channels: default_channels(),
            down_block_types: default_down_block_types(),
            up_block_types: default_up_block_types(),
            block_out_channels: default_block_out_channels(),
            layers_per_block: default_layers_per_block(),
            act_fn: default_act_fn(),
            latent_channels: default_latent_channels(),
            norm_num_groups: default_norm_num_groups(),
            sample_size: default_sample_size(),
            scaling_factor: default_scaling_factor(),
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl AutoencoderKLConfig {
    /// Parses a config from JSON text; `origin` names the source in errors. Explicit `null`
    /// fields take their defaults.
    pub fn from_json_str(text: &str, origin: &str) -> anyhow::Result<Self> {
        let cfg: Self = super::super::parse_config_json(text, origin, "AutoencoderKL config")?;
        cfg.validate()
            .with_context(|| format!("unsupported AutoencoderKL config in {origin}"))?;
        Ok(cfg)
    }

    /// Reads `vae/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        super::super::read_config(path.as_ref(), "VAE config", Self::from_json_str)
    }

    /// Checks that the model can be built: known block types and activation, matching list
    /// lengths, channels divisible by the group count.
    pub fn validate(&self) -> anyhow::Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("block_out_channels is empty");
        }
        {
            use crate::models::limits::{check, LAYERS, LEVELS, WIDTH};
            let mut checks = vec![
                ("block_out_channels", n, LEVELS),
                ("layers_per_block", self.layers_per_block, LAYERS),
                ("in_channels", self.in_channels, WIDTH),
                ("out_channels", self.out_channels, WIDTH),
                ("latent_channels", self.latent_channels, WIDTH),
            ];
            checks.extend(
                self.block_out_channels
                    .iter()
                    .map(|&c| ("block_out_channels", c, WIDTH)),
            );
            for (field, v, max) in checks {
                check(field, v, max).map_err(anyhow::Error::msg)?;
            }
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "down_block_types ({}) and up_block_types ({}) must have one entry per \
                 block_out_channels entry ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            bail!("down block type {t:?} is not supported (expected DownEncoderBlock2D)");
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            bail!("up block type {t:?} is not supported (expected UpDecoderBlock2D)");
        }
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            bail!("act_fn {:?} is not supported (expected silu)", self.act_fn);
        }
        let g = self.norm_num_groups;
        if g == 0 {
            bail!("norm_num_groups must be > 0");
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| **c == 0 || *c % g != 0)
        {
            bail!("block_out_channels entry {c} is not a positive multiple of norm_num_groups {g}");
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            bail!("in_channels, out_channels and latent_channels must be > 0");
        }
        if self.scaling_factor == 0.0 || !self.scaling_factor.is_finite() {
            bail!(
                "scaling_factor {} must be finite and non-zero",
                self.scaling_factor
            );
        }
        Ok(())
    }

    /// Ratio of image size to latent size, `2^(len(block_out_channels) - 1)`.
    pub fn downsample_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}
