//! diffusers' `Transformer2DModel` (continuous input) with `BasicTransformerBlock`s and the
//! GEGLU feed-forward, as used by the Stable Diffusion UNet.

use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::models::blocks::attention::{Attention, AttentionConfig};
use crate::models::checkpointing::run_block;
use crate::models::layers::{gelu, Conv2d, GroupNorm, Layer, LayerNorm, Linear};
use crate::models::walk::{LayerRef, LayerWalk};

/// Construction parameters of a [`Transformer2DModel`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transformer2DConfig {
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Channels per head.
    pub attention_head_dim: usize,
    /// Channels of the feature map (input and output).
    pub in_channels: usize,
    /// Number of `transformer_blocks`.
    pub num_layers: usize,
    /// Channels of the cross-attention context.
    pub cross_attention_dim: usize,
    /// Groups of the input group norm (eps 1e-6).
    pub norm_num_groups: usize,
    /// `proj_in` / `proj_out` are Linear layers (SD 2) instead of 1×1 convolutions (SD 1).
    pub use_linear_projection: bool,
    /// `attn1` also attends to the context instead of itself.
    pub only_cross_attention: bool,
    /// Compute attention scores and softmax in f32.
    pub upcast_attention: bool,
}

/// diffusers' `GEGLU`: `proj` to twice the width, then `hidden · gelu(gate)`.
#[derive(Debug, Clone)]
pub struct GeGlu {
    proj: Linear,
}

impl GeGlu {
    /// Loads `proj` (`dim_in -> 2·dim_out`) from `vb`.
    pub fn new(vb: VarBuilder, dim_in: usize, dim_out: usize) -> Result<Self> {
        Ok(Self {
            proj: Linear::new(vb.pp("proj"), dim_in, dim_out * 2, true)?,
        })
    }

    /// The projection.
    pub fn proj(&self) -> &Linear {
        &self.proj
    }

    /// Applies the gated GELU over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        let half = h.dim(D::Minus1)? / 2;
        let hidden = h.narrow(D::Minus1, 0, half)?;
        let gate = h.narrow(D::Minus1, half, half)?;
        hidden * gelu(&gate)?
    }
}

/// diffusers' `FeedForward` with `activation_fn="geglu"`: `net.0` (GEGLU), `net.2` (Linear).
#[derive(Debug, Clone)]
pub struct FeedForward {
    geglu: GeGlu,
    out: Linear,
}

impl FeedForward {
    /// Loads `net.0.proj` (`dim -> 2·4dim`) and `net.2` (`4dim -> dim`) from `vb`.
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            geglu: GeGlu::new(vb.pp("net").pp(0), dim, inner)?,
            out: Linear::new(vb.pp("net").pp(2), inner, dim, true)?,
        })
    }

    /// The GEGLU input layer `net.0`.
    pub fn geglu(&self) -> &GeGlu {
        &self.geglu
    }

    /// The output layer `net.2`.
    pub fn out(&self) -> &Linear {
        &self.out
    }

    /// Applies the feed-forward over the last dimension. With a frozen `net.2` and no active
    /// residual (LoRA) on it, the gate and `net.2` run as one op that keeps only the
    /// projection output for the backward ([`crate::ops::geglu_linear`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = &self.out;
        let plain =
            !out.is_trainable() && out.residuals().attached().iter().all(|r| !r.is_active());
        if plain {
            let h = self.geglu.proj.forward(x)?;
            return crate::ops::geglu_linear(&h, out.weight(), out.bias());
        }
        self.out.forward(&self.geglu.forward(x)?)
    }
}

/// diffusers' `BasicTransformerBlock` (layer norms, self-attention `attn1`, cross-attention
/// `attn2`, feed-forward `ff`, each with a residual).
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
    gradient_checkpointing: bool,
}

impl BasicTransformerBlock {
    /// Loads the block from `vb` (e.g. `...attentions.0.transformer_blocks.0`); `dim` = heads·head_dim.
    pub fn new(vb: VarBuilder, dim: usize, cfg: &Transformer2DConfig) -> Result<Self> {
        let mut acfg = AttentionConfig::new(dim, cfg.num_attention_heads, cfg.attention_head_dim);
        acfg.upcast_attention = cfg.upcast_attention;
        let mut a1 = acfg;
        if cfg.only_cross_attention {
            a1.cross_attention_dim = Some(cfg.cross_attention_dim);
        }
        let mut a2 = acfg;
        a2.cross_attention_dim = Some(cfg.cross_attention_dim);
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), &a1)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(vb.pp("attn2"), &a2)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            only_cross_attention: cfg.only_cross_attention,
            gradient_checkpointing: false,
        })
    }

    /// The self-attention (cross-attention when `only_cross_attention`).
    pub fn attn1(&self) -> &Attention {
        &self.attn1
    }

    /// The cross-attention.
    pub fn attn2(&self) -> &Attention {
        &self.attn2
    }

    /// The feed-forward.
    pub fn ff(&self) -> &FeedForward {
        &self.ff
    }

    /// Recomputes the block in the backward instead of keeping its activations (training).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Applies the block to tokens `x` `[B, N, dim]` with context `[B, M, cross_dim]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let inputs = [x.clone(), context.clone()];
        run_block(self.gradient_checkpointing, self, &inputs, |b, t| {
            b.forward_plain(&t[0], &t[1])
        })
    }

    /// [`BasicTransformerBlock::forward`] without checkpointing.
    fn forward_plain(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let ctx1 = if self.only_cross_attention {
            Some(context)
        } else {
            None
        };
        let x = (self.attn1.forward(&self.norm1.forward(x)?, ctx1)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + &x
    }
}

/// diffusers' `Transformer2DModel` for continuous inputs: group `norm`, `proj_in`,
/// `transformer_blocks`, `proj_out`, plus the input as residual.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Layer,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Layer,
}

impl Transformer2DModel {
    /// Loads the model from `vb` (e.g. `down_blocks.0.attentions.0`).
    pub fn new(vb: VarBuilder, cfg: &Transformer2DConfig) -> Result<Self> {
        let c = cfg.in_channels;
        let inner = cfg.num_attention_heads * cfg.attention_head_dim;
        let norm = GroupNorm::new(vb.pp("norm"), cfg.norm_num_groups, c, 1e-6)?;
        let (proj_in, proj_out) = if cfg.use_linear_projection {
            (
                Layer::Linear(Linear::new(vb.pp("proj_in"), c, inner, true)?),
                Layer::Linear(Linear::new(vb.pp("proj_out"), inner, c, true)?),
            )
        } else {
            (
                Layer::Conv2d(Conv2d::new(vb.pp("proj_in"), c, inner, 1, 1, 0, true)?),
                Layer::Conv2d(Conv2d::new(vb.pp("proj_out"), inner, c, 1, 1, 0, true)?),
            )
        };
        let vb_t = vb.pp("transformer_blocks");
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| BasicTransformerBlock::new(vb_t.pp(i), inner, cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm,
            proj_in,
            transformer_blocks,
            proj_out,
        })
    }

    /// `proj_in` (a 1×1 convolution, or a Linear layer with `use_linear_projection`).
    pub fn proj_in(&self) -> &Layer {
        &self.proj_in
    }

    /// `proj_out`.
    pub fn proj_out(&self) -> &Layer {
        &self.proj_out
    }

    /// The transformer blocks.
    pub fn transformer_blocks(&self) -> &[BasicTransformerBlock] {
        &self.transformer_blocks
    }

    /// Checkpoints every transformer block (see [`BasicTransformerBlock::set_gradient_checkpointing`]).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        for b in &mut self.transformer_blocks {
            b.set_gradient_checkpointing(on);
        }
    }

    /// Applies the model to `x` `[B, C, H, W]` with context `[B, M, cross_dim]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))
        };
        let mut tokens = match &self.proj_in {
            Layer::Conv2d(conv) => to_tokens(&conv.forward(&normed)?)?,
            Layer::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let from_tokens = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(2)?;
            t.reshape((b, h, w, ch))?
                .permute((0, 3, 1, 2))?
                .contiguous()
        };
        let out = match &self.proj_out {
            Layer::Conv2d(conv) => conv.forward(&from_tokens(&tokens)?)?,
            Layer::Linear(lin) => from_tokens(&lin.forward(&tokens)?)?,
        };
        debug_assert_eq!(out.dim(1).ok(), Some(c));
        out + x
    }
}

impl LayerWalk for GeGlu {
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.proj.walk(f);
    }
}

impl LayerWalk for FeedForward {
    /// `net.0.proj`, `net.2`.
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.geglu().walk(f);
        self.out().walk(f);
    }
}

impl LayerWalk for BasicTransformerBlock {
    /// `attn1`, `attn2`, `ff` (diffusers registers the norms between them).
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.attn1().walk(f);
        self.attn2().walk(f);
        self.ff().walk(f);
    }
}

impl LayerWalk for Transformer2DModel {
    /// `proj_in`, `transformer_blocks`, `proj_out`.
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.proj_in.walk(f);
        self.transformer_blocks.walk(f);
        self.proj_out.walk(f);
    }
}
