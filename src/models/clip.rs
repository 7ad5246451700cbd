//! The CLIP text encoder (transformers' `CLIPTextModel`) used by Stable Diffusion 1.x / 2.x.
//!
//! Parameter paths equal the transformers state-dict keys (`text_model.embeddings...`,
//! `text_model.encoder.layers.{i}.self_attn.q_proj`, ..., `text_model.final_layer_norm`), so
//! every [`Linear`] carries the module path a LoRA file names. The checkpoint buffer
//! `text_model.embeddings.position_ids` is never requested: positions are `0..L`.

use anyhow::Context;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use std::path::Path;

use crate::models::checkpointing::run_block;
use crate::models::layers::{LayerNorm, Linear};
use crate::models::walk::{LayerRef, LayerWalk};

/// The activation of the CLIP MLP (`hidden_act` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)` (SD 1.x).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact erf GELU (SD 2.x).
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation of GELU.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluNew,
}

impl ClipActivation {
    /// Applies the activation elementwise.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?),
            Self::Gelu => x.gelu_erf(),
            Self::GeluNew => x.gelu(),
        }
    }
}

fn default_vocab_size() -> usize {
    49408
}
fn default_hidden_size() -> usize {
    512
}
fn default_intermediate_size() -> usize {
    2048
}
fn default_projection_dim() -> usize {
    512
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    8
}
fn default_max_position_embeddings() -> usize {
    77
}
fn default_hidden_act() -> ClipActivation {
    ClipActivation::QuickGelu
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_pad_token_id() -> u32 {
    1
}
fn default_bos_token_id() -> u32 {
    49406
}
fn default_eos_token_id() -> u32 {
    49407
}

/// `text_encoder/config.json` (transformers `CLIPTextConfig`; absent fields take its defaults).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipTextConfig {
    /// Number of token embeddings.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Width of the residual stream.
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    /// Width of the MLP.
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    /// Output size of the (unused here) text projection.
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    /// Number of encoder layers.
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    /// Number of position embeddings (longest input).
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// MLP activation.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: ClipActivation,
    /// Epsilon of every layer norm.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Padding token id.
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: u32,
    /// Start-of-text token id.
    #[serde(default = "default_bos_token_id")]
    pub bos_token_id: u32,
    /// End-of-text token id.
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: default_vocab_size(),
            hidden_size: default_hidden_size(),
            intermediate_size: default_intermediate_size(),
            projection_dim: default_projection_dim(),
            num_hidden_layers: default_num_hidden_layers(),
            num_attention_heads: default_num_attention_heads(),
            max_position_embeddings: default_max_position_embeddings(),
            hidden_act: default_hidden_act(),
            layer_norm_eps: default_layer_norm_eps(),
            pad_token_id: default_pad_token_id(),
            bos_token_id: default_bos_token_id(),
            eos_token_id: default_eos_token_id(),
        }
    }
}

impl ClipTextConfig {
    /// Parses a config from JSON text; `origin` names the source in errors.
    pub fn from_json_str(text: &str, origin: &str) -> anyhow::Result<Self> {
        let cfg: Self = super::parse_config_json(text, origin, "CLIP text config")?;
        cfg.validate()
            .with_context(|| format!("invalid CLIP text config in {origin}"))?;
        Ok(cfg)
    }

    /// Reads `text_encoder/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        super::read_config(path.as_ref(), "CLIP text config", Self::from_json_str)
    }

    /// Checks the sizes the model relies on.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            anyhow::bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        use crate::models::limits::{check, LAYERS, TOKENS, WIDTH};
        for (field, v, max) in [
            ("num_hidden_layers", self.num_hidden_layers, LAYERS),
            ("hidden_size", self.hidden_size, WIDTH),
            ("intermediate_size", self.intermediate_size, 4 * WIDTH),
            ("projection_dim", self.projection_dim, WIDTH),
            ("vocab_size", self.vocab_size, TOKENS),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                TOKENS,
            ),
        ] {
            check(field, v, max).map_err(anyhow::Error::msg)?;
        }
        if self.vocab_size == 0 || self.max_position_embeddings == 0 || self.hidden_size == 0 {
            anyhow::bail!(
                "vocab_size ({}), max_position_embeddings ({}) and hidden_size ({}) must be > 0",
                self.vocab_size,
                self.max_position_embeddings,
                self.hidden_size
            );
        }
        Ok(())
    }

    /// Channels per attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }
}

/// Multi-head self-attention with a causal mask (`self_attn`: `q_proj`, `k_proj`, `v_proj`,
/// `out_proj`, all with bias).
#[derive(Debug, Clone)]
pub struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    /// Loads the four projections from `vb` (`...layers.{i}.self_attn`).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: Linear::new(vb.pp("q_proj"), d, d, true)?,
            k_proj: Linear::new(vb.pp("k_proj"), d, d, true)?,
            v_proj: Linear::new(vb.pp("v_proj"), d, d, true)?,
            out_proj: Linear::new(vb.pp("out_proj"), d, d, true)?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        x.reshape((b, l, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Attends `x` `[B, L, D]` to itself; `mask` is an additive f32 `[L, L]` mask.
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let dtype = x.dtype();
        let q = self.split_heads(&self.q_proj.forward(x)?)?;
        let k = self.split_heads(&self.k_proj.forward(x)?)?;
        let v = self.split_heads(&self.v_proj.forward(x)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = crate::ops::attention(&q, &k, &v, scale, Some(mask))?
            .to_dtype(dtype)?
            .transpose(1, 2)?
            .reshape((b, l, d))?;
        self.out_proj.forward(&out)
    }
}

/// The feed-forward block `fc2(act(fc1(x)))` (`mlp.fc1`, `mlp.fc2`).
#[derive(Debug, Clone)]
pub struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    act: ClipActivation,
}

impl ClipMlp {
    /// Loads `fc1` and `fc2` from `vb` (`...layers.{i}.mlp`).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(vb.pp("fc1"), cfg.hidden_size, cfg.intermediate_size, true)?,
            fc2: Linear::new(vb.pp("fc2"), cfg.intermediate_size, cfg.hidden_size, true)?,
            act: cfg.hidden_act,
        })
    }

    /// Applies the MLP to `x` `[..., D]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)?)?)
    }
}

/// One pre-norm encoder layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    mlp: ClipMlp,
    layer_norm2: LayerNorm,
    gradient_checkpointing: bool,
}

impl ClipEncoderLayer {
    /// Loads the layer from `vb` (`text_model.encoder.layers.{i}`).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            self_attn: ClipAttention::new(vb.pp("self_attn"), cfg)?,
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), cfg.hidden_size, cfg.layer_norm_eps)?,
            mlp: ClipMlp::new(vb.pp("mlp"), cfg)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), cfg.hidden_size, cfg.layer_norm_eps)?,
            gradient_checkpointing: false,
        })
    }

    /// The self-attention.
    pub fn self_attn(&self) -> &ClipAttention {
        &self.self_attn
    }

    /// The feed-forward block.
    pub fn mlp(&self) -> &ClipMlp {
        &self.mlp
    }

    /// Recomputes the layer in the backward instead of keeping its activations (training).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Applies the layer to `x` `[B, L, D]` with the additive f32 `[L, L]` `mask`.
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let inputs = [x.clone(), mask.clone()];
        run_block(self.gradient_checkpointing, self, &inputs, |l, t| {
            l.forward_plain(&t[0], &t[1])
        })
    }

    /// [`ClipEncoderLayer::forward`] without checkpointing.
    fn forward_plain(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.layer_norm2.forward(&x)?)?;
        x + h
    }
}

/// An additive causal mask `[L, L]` in f32: 0 on and below the diagonal, `f32::MIN` above
/// (transformers fills with the dtype's minimum).
pub fn causal_mask(len: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::MIN } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (len, len), device)
}

/// transformers' `CLIPTextModel`: token + position embeddings, causal pre-norm transformer,
/// final layer norm.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Tensor,
    /// Rows for the ids after `token_embedding` read at every forward (a trained variable).
    live_rows: Option<Tensor>,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Loads the model from the root of a text-encoder checkpoint (keys `text_model.*`).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let vb = vb.pp("text_model");
        let emb = vb.pp("embeddings");
        let token_embedding = emb
            .pp("token_embedding")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((cfg.max_position_embeddings, cfg.hidden_size), "weight")?;
        let vb_layers = vb.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(vb_layers.pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(
            vb.pp("final_layer_norm"),
            cfg.hidden_size,
            cfg.layer_norm_eps,
        )?;
        Ok(Self {
            token_embedding,
            live_rows: None,
            position_embedding,
            layers,
            final_layer_norm,
            config: cfg.clone(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The fixed token embedding rows (`[vocab_size, hidden_size]` without live rows).
    pub fn token_embedding(&self) -> &Tensor {
        &self.token_embedding
    }

    /// The whole token embedding `[vocab_size, hidden_size]`: the fixed rows, then the live
    /// rows (detached copies).
    pub fn token_embedding_all(&self) -> Result<Tensor> {
        match &self.live_rows {
            None => Ok(self.token_embedding.clone()),
            Some(r) => {
                let r = r.detach().to_dtype(self.token_embedding.dtype())?;
                Tensor::cat(&[&self.token_embedding, &r], 0)
            }
        }
    }

    /// Attaches `rows` `[n, hidden_size]` as the ids `vocab_size..`, read at every forward so
    /// that a trained variable (pivotal tuning) reaches the output and gets gradients; the
    /// fixed rows never do. Returns the first new id; an error when live rows are attached
    /// already.
    pub fn set_live_token_rows(&mut self, rows: Tensor) -> Result<usize> {
        let (n, width) = rows.dims2()?;
        if width != self.config.hidden_size {
            candle_core::bail!(
                "token embedding rows of width {width} do not fit the text encoder's hidden size {}",
                self.config.hidden_size
            );
        }
        if self.live_rows.is_some() {
            candle_core::bail!("the text encoder has live token rows already");
        }
        let first = self.config.vocab_size;
        self.live_rows = Some(rows);
        self.config.vocab_size = first + n;
        Ok(first)
    }

    /// Appends `rows` `[n, hidden_size]` to the token embedding as the ids `vocab_size..`
    /// (converted to its dtype and device); returns the first new id.
    pub fn append_token_embeddings(&mut self, rows: &Tensor) -> Result<usize> {
        let (_, width) = rows.dims2()?;
        if width != self.config.hidden_size {
            candle_core::bail!(
                "token embedding rows of width {width} do not fit the text encoder's hidden size {}",
                self.config.hidden_size
            );
        }
        let rows = rows
            .to_dtype(self.token_embedding.dtype())?
            .to_device(self.token_embedding.device())?;
        if self.live_rows.is_some() {
            candle_core::bail!("cannot append fixed token rows after live ones");
        }
        let first = self.config.vocab_size;
        self.token_embedding = Tensor::cat(&[&self.token_embedding, &rows], 0)?;
        self.config.vocab_size = self.token_embedding.dim(0)?;
        Ok(first)
    }

    /// The encoder layers, in order.
    pub fn layers(&self) -> &[ClipEncoderLayer] {
        &self.layers
    }

    /// Gradient checkpointing of every encoder layer (transformers'
    /// `gradient_checkpointing_enable`); gradients are unchanged.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.layers
            .iter_mut()
            .for_each(|l| l.set_gradient_checkpointing(on));
    }

    /// Checks `input_ids` `[B, L]` (any integer dtype) and returns them as u32.
    fn check_ids(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, len) = input_ids.dims2()?;
        if len == 0 || len > self.config.max_position_embeddings {
            candle_core::bail!(
                "CLIP input length {len} must be between 1 and max_position_embeddings {}",
                self.config.max_position_embeddings
            );
        }
        if input_ids.dtype().is_float() {
            candle_core::bail!(
                "CLIP input_ids must be integers, got {:?}",
                input_ids.dtype()
            );
        }
        let ids = input_ids.to_dtype(DType::I64)?;
        let flat: Vec<i64> = ids.flatten_all()?.to_vec1()?;
        let vocab = self.config.vocab_size as i64;
        if let Some(bad) = flat.iter().find(|&&t| t < 0 || t >= vocab) {
            candle_core::bail!("CLIP token id {bad} is outside the vocabulary 0..{vocab}");
        }
        ids.to_dtype(DType::U32)
    }

    /// Token plus position embeddings, `[B, L, D]` (the first of `hidden_states`).
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let ids = self.check_ids(input_ids)?;
        let (b, len) = ids.dims2()?;
        let d = self.config.hidden_size;
        let tok = match &self.live_rows {
            None => self.token_embedding.index_select(&ids.flatten_all()?, 0)?,
            Some(rows) => self.lookup_with_live(&ids, rows)?,
        }
        .reshape((b, len, d))?;
        let pos = self.position_embedding.narrow(0, 0, len)?;
        tok.broadcast_add(&pos)
    }

    /// Token rows `[B·L, D]` of `ids` when live rows follow the fixed ones: each position takes
    /// its fixed or its live row (a selection, no arithmetic).
    fn lookup_with_live(&self, ids: &Tensor, rows: &Tensor) -> Result<Tensor> {
        let fixed = self.token_embedding.dim(0)? as u32;
        let flat: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let dev = self.token_embedding.device();
        let n = flat.len();
        let fixed_ids: Vec<u32> = flat
            .iter()
            .map(|&i| if i < fixed { i } else { 0 })
            .collect();
        let live_ids: Vec<u32> = flat.iter().map(|&i| i.saturating_sub(fixed)).collect();
        let mask: Vec<u8> = flat.iter().map(|&i| u8::from(i >= fixed)).collect();
        let a = self
            .token_embedding
            .index_select(&Tensor::from_vec(fixed_ids, n, dev)?, 0)?;
        let rows = rows.to_dtype(self.token_embedding.dtype())?;
        let b = rows.index_select(&Tensor::from_vec(live_ids, n, dev)?, 0)?;
        let d = self.config.hidden_size;
        let m = Tensor::from_vec(mask, (n, 1), dev)?
            .broadcast_as((n, d))?
            .contiguous()?;
        m.where_cond(&b, &a)
    }

    /// Runs the first `num_layers` encoder layers, without the final layer norm.
    pub fn hidden_state_after(&self, input_ids: &Tensor, num_layers: usize) -> Result<Tensor> {
        if num_layers > self.layers.len() {
            candle_core::bail!(
                "CLIP has {} layers, {num_layers} requested",
                self.layers.len()
            );
        }
        let mut x = self.embed(input_ids)?;
        let mask = causal_mask(x.dim(1)?, x.device())?;
        for layer in &self.layers[..num_layers] {
            x = layer.forward(&x, &mask)?;
        }
        Ok(x)
    }

    /// `last_hidden_state` `[B, L, D]` of `input_ids` `[B, L]` (final layer norm applied).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_with_clip_skip(input_ids, 0)
    }

    /// diffusers' `clip_skip`: `final_layer_norm(hidden_states[-(clip_skip + 1)])`; 0 is
    /// [`forward`](Self::forward). Fails when `clip_skip` exceeds the number of layers.
    pub fn forward_with_clip_skip(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let n = self.layers.len();
        if clip_skip > n {
            candle_core::bail!("clip_skip {clip_skip} exceeds the {n} layers of the text encoder");
        }
        let h = self.hidden_state_after(input_ids, n - clip_skip)?;
        self.final_layer_norm.forward(&h)
    }
}

impl LayerWalk for ClipAttention {
    /// transformers' `CLIPAttention` registers `k_proj`, `v_proj`, `q_proj`, `out_proj`.
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        for l in [&self.k_proj, &self.v_proj, &self.q_proj, &self.out_proj] {
            l.walk(f);
        }
    }
}

impl LayerWalk for ClipMlp {
    /// `fc1`, `fc2`.
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.fc1.walk(f);
        self.fc2.walk(f);
    }
}

impl LayerWalk for ClipEncoderLayer {
    /// `self_attn`, `mlp` (the layer norms have no weights a LoRA adapts).
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.self_attn.walk(f);
        self.mlp.walk(f);
    }
}

impl LayerWalk for ClipTextModel {
    /// `text_model.encoder.layers.*`.
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.layers.walk(f);
    }
}
