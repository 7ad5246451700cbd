//! diffusers' `Attention` module (multi-head scaled dot-product attention with `to_q`, `to_k`,
//! `to_v`, `to_out.0`, optional `group_norm` and residual connection).

use candle_core::{Result, Tensor};

use crate::ops::Kernel;
use candle_nn::VarBuilder;

use crate::models::layers::{GroupNorm, Linear};
use crate::models::walk::{LayerRef, LayerWalk};

/// Construction parameters of an [`Attention`] (diffusers' `Attention.__init__` arguments).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionConfig {
    /// Channels of the query input (and of the output).
    pub query_dim: usize,
    /// Channels of the key/value context; `None` for self-attention.
    pub cross_attention_dim: Option<usize>,
    /// Number of heads.
    pub heads: usize,
    /// Channels per head.
    pub dim_head: usize,
    /// Whether `to_q`, `to_k`, `to_v` have a bias (UNet: false, VAE: true).
    pub bias: bool,
    /// Whether `to_out.0` has a bias (true in SD).
    pub out_bias: bool,
    /// Compute `q·kᵀ` and the softmax in f32 (diffusers `upcast_attention`); the attention op
    /// always does, so this records the config only.
    pub upcast_attention: bool,
    /// Groups of an input `group_norm` (VAE mid block); `None` for no norm.
    pub norm_num_groups: Option<usize>,
    /// Epsilon of `group_norm`.
    pub norm_eps: f64,
    /// Add the input to the output (VAE mid block).
    pub residual_connection: bool,
    /// The output is divided by this factor (diffusers `rescale_output_factor`).
    pub rescale_output_factor: f64,
}

impl AttentionConfig {
    /// Plain attention as the UNet transformer blocks use it (no q/k/v bias, output bias).
    pub fn new(query_dim: usize, heads: usize, dim_head: usize) -> Self {
        Self {
            query_dim,
            cross_attention_dim: None,
            heads,
            dim_head,
            bias: false,
            out_bias: true,
            upcast_attention: false,
            norm_num_groups: None,
            norm_eps: 1e-5,
            residual_connection: false,
            rescale_output_factor: 1.0,
        }
    }
}

/// diffusers' `Attention` with the default processor: scores `softmax(q kᵀ / sqrt(dim_head))`.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    group_norm: Option<GroupNorm>,
    heads: usize,
    scale: f64,
    residual_connection: bool,
    rescale_output_factor: f64,
}

impl Attention {
    /// Loads `to_q`, `to_k`, `to_v`, `to_out.0` (and `group_norm`) from `vb` (e.g. `...attn1`).
    pub fn new(vb: VarBuilder, cfg: &AttentionConfig) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        let kv_dim = cfg.cross_attention_dim.unwrap_or(cfg.query_dim);
        let group_norm = match cfg.norm_num_groups {
            Some(g) => Some(GroupNorm::new(
                vb.pp("group_norm"),
                g,
                cfg.query_dim,
                cfg.norm_eps,
            )?),
            None => None,
        };
        Ok(Self {
            to_q: Linear::new(vb.pp("to_q"), cfg.query_dim, inner, cfg.bias)?,
            to_k: Linear::new(vb.pp("to_k"), kv_dim, inner, cfg.bias)?,
            to_v: Linear::new(vb.pp("to_v"), kv_dim, inner, cfg.bias)?,
            to_out: Linear::new(vb.pp("to_out").pp(0), inner, cfg.query_dim, cfg.out_bias)?,
            group_norm,
            heads: cfg.heads,
            scale: 1.0 / (cfg.dim_head as f64).sqrt(),
            residual_connection: cfg.residual_connection,
            rescale_output_factor: cfg.rescale_output_factor,
        })
    }

    /// The query projection `to_q`.
    pub fn to_q(&self) -> &Linear {
        &self.to_q
    }

    /// The key projection `to_k`.
    pub fn to_k(&self) -> &Linear {
        &self.to_k
    }

    /// The value projection `to_v`.
    pub fn to_v(&self) -> &Linear {
        &self.to_v
    }

    /// The output projection `to_out.0`.
    pub fn to_out(&self) -> &Linear {
        &self.to_out
    }

    /// Number of heads.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Attends `hidden_states` (`[B, N, C]`, or `[B, C, H, W]` which is flattened to tokens and
    /// restored) to `context` `[B, M, cross_dim]` (self-attention when `None`).
    pub fn forward(&self, hidden_states: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let residual = hidden_states;
        let spatial = hidden_states.rank() == 4;
        let mut x = if spatial {
            let (b, c, h, w) = hidden_states.dims4()?;
            hidden_states.reshape((b, c, h * w))?
        } else {
            hidden_states.clone()
        };
        if let Some(gn) = &self.group_norm {
            if !spatial {
                x = x.transpose(1, 2)?;
            }
            x = gn.forward(&x)?;
            if !spatial {
                x = x.transpose(1, 2)?;
            }
        }
        if spatial {
            x = x.transpose(1, 2)?;
        }
        let ctx = context.unwrap_or(&x);
        let q = self.to_q.forward(&x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        // Heads are split inside the op (scores in f32 whatever the model dtype, so
        // `upcast_attention` holds by construction); only q, k, v and the output stay in the graph.
        let out = crate::ops::attention_heads(&q, &k, &v, self.heads, self.scale, Kernel::Auto)?;
        let mut out = self.to_out.forward(&out)?;
        if spatial {
            out = out.transpose(1, 2)?.reshape(hidden_states.dims())?;
        }
        if self.residual_connection {
            out = (out + residual)?;
        }
        if self.rescale_output_factor != 1.0 {
            out = out.affine(1.0 / self.rescale_output_factor, 0.0)?;
        }
        Ok(out)
    }
}

impl LayerWalk for Attention {
    /// `to_q`, `to_k`, `to_v`, `to_out.0`.
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        for l in [&self.to_q, &self.to_k, &self.to_v, &self.to_out] {
            l.walk(f);
        }
    }
}
