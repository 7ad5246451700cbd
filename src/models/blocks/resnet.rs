//! `ResnetBlock2D` as diffusers defines it (group norm, SiLU, 3×3 convs, optional time embedding).

use std::sync::{Arc, OnceLock};

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::models::checkpointing::run_block;
use crate::models::layers::{silu, Conv2d, GroupNorm, Linear};
use crate::models::walk::{LayerRef, LayerWalk};
use crate::ops::{
    group_norm_silu_conv2d, Conv2dParams, ConvOutputAdds, FrozenConv2d, GroupNormSpec,
};

/// Construction parameters of a [`ResnetBlock2D`] (diffusers' `ResnetBlock2D.__init__` arguments).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResnetBlock2DConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Channels of the time embedding; `None` for blocks without `time_emb_proj` (VAE).
    pub temb_channels: Option<usize>,
    /// Groups of `norm1` and `norm2`.
    pub groups: usize,
    /// Epsilon of both group norms.
    pub eps: f64,
    /// The output is divided by this factor (diffusers `output_scale_factor`).
    pub output_scale_factor: f64,
}

impl ResnetBlock2DConfig {
    /// A config with diffusers' defaults (32 groups, eps 1e-6, scale factor 1, time emb 512).
    pub fn new(in_channels: usize, out_channels: usize) -> Self {
        Self {
            in_channels,
            out_channels,
            temb_channels: Some(512),
            groups: 32,
            eps: 1e-6,
            output_scale_factor: 1.0,
        }
    }
}

/// diffusers' `ResnetBlock2D` with `time_embedding_norm="default"`:
/// `norm1, SiLU, conv1, (+ time_emb_proj(SiLU(temb))), norm2, SiLU, conv2`, plus the
/// (1×1 `conv_shortcut` when channels change) input, divided by `output_scale_factor`.
/// Parameter names: `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
    eps: f64,
    gradient_checkpointing: bool,
    fused_conv1: Arc<OnceLock<FrozenConv2d>>,
    fused_conv2: Arc<OnceLock<FrozenConv2d>>,
}

impl ResnetBlock2D {
    /// Loads the block from `vb` (e.g. `down_blocks.0.resnets.0`).
    pub fn new(vb: VarBuilder, cfg: &ResnetBlock2DConfig) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let norm1 = GroupNorm::new(vb.pp("norm1"), cfg.groups, cin, cfg.eps)?;
        let conv1 = Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1, true)?;
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(Linear::new(vb.pp("time_emb_proj"), t, cout, true)?),
            None => None,
        };
        let norm2 = GroupNorm::new(vb.pp("norm2"), cfg.groups, cout, cfg.eps)?;
        let conv2 = Conv2d::new(vb.pp("conv2"), cout, cout, 3, 1, 1, true)?;
        let conv_shortcut = if cin != cout {
            Some(Conv2d::new(
                vb.pp("conv_shortcut"),
                cin,
                cout,
                1,
                1,
                0,
                true,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
            eps: cfg.eps,
            gradient_checkpointing: false,
            fused_conv1: Arc::new(OnceLock::new()),
            fused_conv2: Arc::new(OnceLock::new()),
        })
    }

    /// The first convolution.
    pub fn conv1(&self) -> &Conv2d {
        &self.conv1
    }

    /// The second convolution.
    pub fn conv2(&self) -> &Conv2d {
        &self.conv2
    }

    /// The time-embedding projection, if the block has one.
    pub fn time_emb_proj(&self) -> Option<&Linear> {
        self.time_emb_proj.as_ref()
    }

    /// The 1×1 shortcut convolution, present when input and output channels differ.
    pub fn conv_shortcut(&self) -> Option<&Conv2d> {
        self.conv_shortcut.as_ref()
    }

    /// Recomputes the block in the backward instead of keeping its activations (training),
    /// where it does not run on the fused op (see [`ResnetBlock2D::forward`]).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Applies the block to `x` `[B, C, H, W]`; `temb` `[B, temb_channels]` is required when the
    /// block was built with `temb_channels` and ignored otherwise.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let inputs: Vec<Tensor> = std::iter::once(x).chain(temb).cloned().collect();
        // On the fused path the graph keeps only the input, the first conv's output and
        // the output, so recomputing both convs would free one feature map (5 MB at
        // 64×64×320) for a third of the step's time: checkpointing applies to the unfused
        // block only (trainable norms or convs, conv LoRA). Measured at 512 px (SD 1.5,
        // attn LoRA): graph 476 → 552 MB, LoRA step 21.2 → 16.8 s.
        let on = self.gradient_checkpointing && !self.runs_fused();
        run_block(on, self, &inputs, |b, t| b.forward_plain(&t[0], t.get(1)))
    }

    /// [`ResnetBlock2D::forward`] without checkpointing.
    fn forward_plain(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = match fused_op(&self.norm1, &self.conv1, &self.fused_conv1)? {
            Some(conv) => {
                let t = self.time_projection(temb)?;
                let adds = ConvOutputAdds {
                    channels: t.as_ref(),
                    skip: None,
                };
                group_norm_silu_conv2d(x, &self.norm_spec(&self.norm1), conv, adds)?
            }
            None => {
                // conv1 runs before the projection (the order residuals draw dropout in).
                let h = self.conv1.forward(&silu(&self.norm1.forward(x)?)?)?;
                match self.time_projection(temb)? {
                    Some(t) => h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?,
                    None => h,
                }
            }
        };
        let out = match fused_op(&self.norm2, &self.conv2, &self.fused_conv2)? {
            Some(conv) => {
                let skip = self.skip(x)?;
                let adds = ConvOutputAdds {
                    channels: None,
                    skip: Some(&skip),
                };
                group_norm_silu_conv2d(&h, &self.norm_spec(&self.norm2), conv, adds)?
            }
            None => {
                let h = self.conv2.forward(&silu(&self.norm2.forward(&h)?)?)?;
                (self.skip(x)? + h)?
            }
        };
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out.affine(1.0 / self.output_scale_factor, 0.0)
        }
    }

    /// Both convolutions run through the fused op (frozen norms, plain frozen convs).
    fn runs_fused(&self) -> bool {
        fusable(&self.norm1, &self.conv1) && fusable(&self.norm2, &self.conv2)
    }

    /// The residual branch: `conv_shortcut(x)`, or `x` itself.
    fn skip(&self, x: &Tensor) -> Result<Tensor> {
        match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => Ok(x.clone()),
        }
    }

    /// `time_emb_proj(silu(temb))` `[B, out_channels]`, when the block has a projection.
    fn time_projection(&self, temb: Option<&Tensor>) -> Result<Option<Tensor>> {
        let Some(proj) = &self.time_emb_proj else {
            return Ok(None);
        };
        let Some(temb) = temb else {
            candle_core::bail!("ResnetBlock2D {}: time embedding required", proj.path());
        };
        Ok(Some(proj.forward(&silu(temb)?)?))
    }

    /// The frozen group norm `norm` as the fused op takes it.
    fn norm_spec<'a>(&self, norm: &'a GroupNorm) -> GroupNormSpec<'a> {
        GroupNormSpec {
            weight: norm.weight(),
            bias: norm.bias(),
            groups: norm.num_groups(),
            eps: self.eps,
        }
    }
}

/// `norm → SiLU → conv` can run as one fused op: frozen norm weights, a frozen conv, no
/// active residual (LoRA).
fn fusable(norm: &GroupNorm, conv: &Conv2d) -> bool {
    let frozen_norm = !norm.weight().is_variable() && !norm.bias().is_variable();
    frozen_norm
        && !conv.is_trainable()
        && conv.residuals().attached().iter().all(|r| !r.is_active())
}

/// The frozen convolution op of `conv` (built once into `cache`) when `norm → SiLU → conv`
/// is [`fusable`].
fn fused_op<'a>(
    norm: &GroupNorm,
    conv: &Conv2d,
    cache: &'a OnceLock<FrozenConv2d>,
) -> Result<Option<&'a FrozenConv2d>> {
    if !fusable(norm, conv) {
        return Ok(None);
    }
    if let Some(op) = cache.get() {
        return Ok(Some(op));
    }
    let params = Conv2dParams {
        stride: conv.stride(),
        padding: conv.padding(),
        ..Default::default()
    };
    let _ = cache.set(FrozenConv2d::new(conv.weight(), conv.bias(), params)?);
    Ok(cache.get())
}

impl LayerWalk for ResnetBlock2D {
    /// `conv1`, `time_emb_proj`, `conv2`, `conv_shortcut`.
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.conv1().walk(f);
        self.time_emb_proj.walk(f);
        self.conv2().walk(f);
        self.conv_shortcut.walk(f);
    }
}
