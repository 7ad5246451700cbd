//! `UNet2DConditionConfig`: diffusers' `unet/config.json`, with diffusers' defaults for every
//! absent field, and its resolution into per-block settings.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A config value given either once for every block or as a per-block list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// One value for every block.
    One(T),
    /// One value per down block (in down-block order).
    Many(Vec<T>),
}

impl<T: Clone + std::fmt::Debug> PerBlock<T> {
    /// The per-block values for `n` blocks; errors when a list has the wrong length.
    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<T>, String> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Many(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Many(v) => Err(format!(
                "`{field}` has {} entries {v:?}, expected one per down block ({n})",
                v.len()
            )),
        }
    }
}

fn d_channels() -> usize {
    4
}
fn d_true() -> bool {
    true
}
fn d_down_types() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up_types() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_mid_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_only_cross() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn d_block_out() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_one_usize() -> usize {
    1
}
fn d_one_f64() -> f64 {
    1.0
}
fn d_silu() -> String {
    "silu".into()
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_norm_eps() -> f64 {
    1e-5
}
fn d_cross_dim() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn d_tlpb() -> Value {
    Value::from(1)
}
fn d_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_kernel() -> usize {
    3
}

/// diffusers 0.35.2 `UNet2DConditionModel` config (field names and defaults as in diffusers).
///
/// Only the Stable Diffusion 1.x / 2.x feature set is supported; [`UNet2DConditionConfig::resolve`]
/// rejects the rest (class / addition embeddings, SDXL, GLIGEN, Fourier time embedding, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNet2DConditionConfig {
    /// Latent size the model was trained on (informational).
    #[serde(default)]
    pub sample_size: Option<Value>,
    /// Input latent channels.
    #[serde(default = "d_channels")]
    pub in_channels: usize,
    /// Output channels.
    #[serde(default = "d_channels")]
    pub out_channels: usize,
    /// Map the input with `2·x − 1` first.
    #[serde(default)]
    pub center_input_sample: bool,
    /// Timestep projection order `[cos, sin]` instead of `[sin, cos]`.
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the timestep projection.
    #[serde(default)]
    pub freq_shift: f64,
    /// Down block class names (`CrossAttnDownBlock2D`, `DownBlock2D`).
    #[serde(default = "d_down_types")]
    pub down_block_types: Vec<String>,
    /// Mid block class name (`UNetMidBlock2DCrossAttn`) or none.
    #[serde(default = "d_mid_type")]
    pub mid_block_type: Option<String>,
    /// Up block class names (`UpBlock2D`, `CrossAttnUpBlock2D`).
    #[serde(default = "d_up_types")]
    pub up_block_types: Vec<String>,
    /// Whether `attn1` attends to the text context, per block.
    #[serde(default = "d_only_cross")]
    pub only_cross_attention: PerBlock<bool>,
    /// Channels of each resolution level.
    #[serde(default = "d_block_out")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the downsampling convolutions.
    #[serde(default = "d_one_usize")]
    pub downsample_padding: usize,
    /// `output_scale_factor` of the mid block resnets.
    #[serde(default = "d_one_f64")]
    pub mid_block_scale_factor: f64,
    /// Dropout probability (unused at inference).
    #[serde(default)]
    pub dropout: f64,
    /// Activation function; only `silu` is supported.
    #[serde(default = "d_silu")]
    pub act_fn: String,
    /// Groups of every group norm.
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    /// Epsilon of the resnet and output group norms.
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f64,
    /// Channels of the text context, once or per block.
    #[serde(default = "d_cross_dim")]
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer blocks per attention, once or per block (nested lists are not supported).
    #[serde(default = "d_tlpb")]
    pub transformer_layers_per_block: Value,
    /// Asymmetric up-block transformer depths (SDXL refiner style; unsupported).
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Value>,
    /// Unsupported.
    #[serde(default)]
    pub encoder_hid_dim: Option<Value>,
    /// Unsupported.
    #[serde(default)]
    pub encoder_hid_dim_type: Option<Value>,
    /// In diffusers this is the NUMBER OF HEADS (when `num_attention_heads` is null).
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    /// Number of heads; when set it takes precedence over `attention_head_dim`.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Unsupported when true.
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// `proj_in` / `proj_out` are Linear layers (SD 2) instead of 1×1 convolutions.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Unsupported.
    #[serde(default)]
    pub class_embed_type: Option<Value>,
    /// Unsupported (SDXL `text_time`, Kandinsky ...).
    #[serde(default)]
    pub addition_embed_type: Option<Value>,
    /// Unsupported (SDXL).
    #[serde(default)]
    pub addition_time_embed_dim: Option<Value>,
    /// Unsupported.
    #[serde(default)]
    pub num_class_embeds: Option<Value>,
    /// Compute attention scores and softmax in f32.
    #[serde(default)]
    pub upcast_attention: bool,
    /// Only `default` is supported.
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    /// Only used by simple cross-attention blocks (ignored).
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    /// Only used by simple cross-attention blocks (ignored).
    #[serde(default = "d_one_f64")]
    pub resnet_out_scale_factor: f64,
    /// Only `positional` is supported.
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    /// Width of the time embedding (default `4 · block_out_channels[0]`).
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// Unsupported.
    #[serde(default)]
    pub time_embedding_act_fn: Option<Value>,
    /// Unsupported.
    #[serde(default)]
    pub timestep_post_act: Option<Value>,
    /// Unsupported (LCM-style `cond_proj`).
    #[serde(default)]
    pub time_cond_proj_dim: Option<Value>,
    /// Kernel size of `conv_in` (odd).
    #[serde(default = "d_kernel")]
    pub conv_in_kernel: usize,
    /// Kernel size of `conv_out` (odd).
    #[serde(default = "d_kernel")]
    pub conv_out_kernel: usize,
    /// Unsupported (SDXL).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<Value>,
    /// Only `default` is supported.
    #[serde(default = "d_default")]
    pub attention_type: String,
    /// Unsupported when true.
    #[serde(default)]
    pub class_embeddings_concat: bool,
    /// Only used by simple cross-attention mid blocks (ignored).
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    /// Unsupported.
    #[serde(default)]
    pub cross_attention_norm: Option<Value>,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("an empty config takes every default")
    }
}

/// Settings of one down block (index = level) after resolving the config.
#[derive(Debug, Clone, PartialEq)]
pub struct LevelSettings {
    /// The block has transformers (`CrossAttn...` type).
    pub cross_attention: bool,
    /// Output channels of the level.
    pub channels: usize,
    /// Resnets of the down block.
    pub layers: usize,
    /// Transformer blocks per `Transformer2DModel`.
    pub transformer_layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Text context channels.
    pub cross_attention_dim: usize,
    /// `attn1` attends to the text context.
    pub only_cross_attention: bool,
}

/// The config resolved into per-level settings (down-block order), after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedUNetConfig {
    /// Per down block / level settings.
    pub levels: Vec<LevelSettings>,
    /// Per up block: whether it has transformers (up-block order).
    pub up_cross_attention: Vec<bool>,
    /// Whether there is a `UNetMidBlock2DCrossAttn`.
    pub mid_block: bool,
    /// Group norm groups.
    pub groups: usize,
    /// Width of the time embedding.
    pub time_embed_dim: usize,
}

fn reject_some(v: &Option<Value>, field: &str) -> Result<(), String> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(v) => Err(format!("`{field}` = {v} is not supported (expected null)")),
    }
}

impl UNet2DConditionConfig {
    /// Reads and validates `unet/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading UNet config {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("parsing UNet config {}", path.display()))?;
        cfg.resolve()
            .map_err(|e| anyhow::anyhow!("unsupported UNet config {}: {e}", path.display()))?;
        Ok(cfg)
    }

    /// Validates the config and resolves per-block settings, as diffusers' `__init__` does.
    pub fn resolve(&self) -> Result<ResolvedUNetConfig, String> {
        let n = self.down_block_types.len();
        if n == 0 {
            return Err("`down_block_types` is empty".into());
        }
        if self.up_block_types.len() != n || self.block_out_channels.len() != n {
            return Err(format!(
                "`down_block_types` ({n}), `up_block_types` ({}) and `block_out_channels` ({}) \
                 must have the same length",
                self.up_block_types.len(),
                self.block_out_channels.len()
            ));
        }
        for (field, v) in [
            (
                "reverse_transformer_layers_per_block",
                &self.reverse_transformer_layers_per_block,
            ),
            ("encoder_hid_dim", &self.encoder_hid_dim),
            ("encoder_hid_dim_type", &self.encoder_hid_dim_type),
            ("class_embed_type", &self.class_embed_type),
            ("addition_embed_type", &self.addition_embed_type),
            ("addition_time_embed_dim", &self.addition_time_embed_dim),
            ("num_class_embeds", &self.num_class_embeds),
            ("time_embedding_act_fn", &self.time_embedding_act_fn),
            ("timestep_post_act", &self.timestep_post_act),
            ("time_cond_proj_dim", &self.time_cond_proj_dim),
            (
                "projection_class_embeddings_input_dim",
                &self.projection_class_embeddings_input_dim,
            ),
            ("cross_attention_norm", &self.cross_attention_norm),
        ] {
            reject_some(v, field)?;
        }
        let expect = |ok: bool, msg: String| if ok { Ok(()) } else { Err(msg) };
        expect(
            !self.dual_cross_attention,
            "`dual_cross_attention` = true is not supported".into(),
        )?;
        expect(
            !self.class_embeddings_concat,
            "`class_embeddings_concat` = true is not supported".into(),
        )?;
        expect(
            self.act_fn == "silu",
            format!("`act_fn` = {:?} is not supported (silu)", self.act_fn),
        )?;
        expect(
            self.resnet_time_scale_shift == "default",
            format!(
                "`resnet_time_scale_shift` = {:?} is not supported (default)",
                self.resnet_time_scale_shift
            ),
        )?;
        expect(
            self.time_embedding_type == "positional",
            format!(
                "`time_embedding_type` = {:?} is not supported (positional)",
                self.time_embedding_type
            ),
        )?;
        expect(
            self.attention_type == "default",
            format!(
                "`attention_type` = {:?} is not supported (default)",
                self.attention_type
            ),
        )?;
        for (field, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            expect(k % 2 == 1, format!("`{field}` = {k} must be odd"))?;
        }
        let groups = self
            .norm_num_groups
            .ok_or("`norm_num_groups` = null is not supported")?;
        let mid_block = match self.mid_block_type.as_deref() {
            None => false,
            Some("UNetMidBlock2DCrossAttn") => true,
            Some(other) => {
                return Err(format!(
                    "`mid_block_type` = {other:?} is not supported (UNetMidBlock2DCrossAttn)"
                ))
            }
        };
        let down_cross = self
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(true),
                "DownBlock2D" => Ok(false),
                _ => Err(format!(
                    "down block type {t:?} is not supported (CrossAttnDownBlock2D, DownBlock2D)"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let up_cross_attention = self
            .up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock2D" => Ok(true),
                "UpBlock2D" => Ok(false),
                _ => Err(format!(
                    "up block type {t:?} is not supported (CrossAttnUpBlock2D, UpBlock2D)"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let heads_src = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim);
        let heads_field = if self.num_attention_heads.is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        let heads = heads_src.expand(n, heads_field)?;
        let layers = self.layers_per_block.expand(n, "layers_per_block")?;
        let cross = self.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let only_cross = self
            .only_cross_attention
            .expand(n, "only_cross_attention")?;
        let tlpb: PerBlock<usize> = serde_json::from_value(self.transformer_layers_per_block.clone())
            .map_err(|_| {
                format!(
                    "`transformer_layers_per_block` = {} is not supported (an integer or a list of integers)",
                    self.transformer_layers_per_block
                )
            })?;
        let tlpb = tlpb.expand(n, "transformer_layers_per_block")?;
        use crate::models::limits::{check, LAYERS, LEVELS, WIDTH};
        check("down_block_types", n, LEVELS)?;
        for (field, values, max) in [
            ("layers_per_block", &layers, LAYERS),
            ("transformer_layers_per_block", &tlpb, LAYERS),
            ("block_out_channels", &self.block_out_channels, WIDTH),
            ("cross_attention_dim", &cross, WIDTH),
            (heads_field, &heads, WIDTH),
        ] {
            for v in values {
                check(field, *v, max)?;
            }
        }
        for (field, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("time_embedding_dim", self.time_embedding_dim.unwrap_or(0)),
        ] {
            check(field, v, WIDTH)?;
        }
        let mut levels = Vec::with_capacity(n);
        for i in 0..n {
            let channels = self.block_out_channels[i];
            if !channels.is_multiple_of(groups) {
                return Err(format!("block_out_channels[{i}] = {channels} is not divisible by norm_num_groups {groups}"));
            }
            let uses_heads =
                down_cross[i] || up_cross_attention[n - 1 - i] || (mid_block && i == n - 1);
            if uses_heads && (heads[i] == 0 || !channels.is_multiple_of(heads[i])) {
                return Err(format!(
                    "block_out_channels[{i}] = {channels} is not divisible by {} heads",
                    heads[i]
                ));
            }
            levels.push(LevelSettings {
                cross_attention: down_cross[i],
                channels,
                layers: layers[i],
                transformer_layers: tlpb[i],
                heads: heads[i],
                cross_attention_dim: cross[i],
                only_cross_attention: only_cross[i],
            });
        }
        Ok(ResolvedUNetConfig {
            levels,
            up_cross_attention,
            mid_block,
            groups,
            time_embed_dim: self
                .time_embedding_dim
                .unwrap_or(self.block_out_channels[0] * 4),
        })
    }
}
