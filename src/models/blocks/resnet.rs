//! `ResnetBlock2D` as diffusers defines it (group norm, SiLU, 3×3 convs, optional time embedding).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::models::checkpointing::run_block;
use crate::models::layers::{silu, Conv2d, GroupNorm, Linear};
use crate::models::walk::{LayerRef, LayerWalk};

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
    gradient_checkpointing: bool,
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
            gradient_checkpointing: false,
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

    /// Recomputes the block in the backward instead of keeping its activations (training).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Applies the block to `x` `[B, C, H, W]`; `temb` `[B, temb_channels]` is required when the
    /// block was built with `temb_channels` and ignored otherwise.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let inputs: Vec<Tensor> = std::iter::once(x).chain(temb).cloned().collect();
        run_block(self.gradient_checkpointing, self, &inputs, |b, t| {
            b.forward_plain(&t[0], t.get(1))
        })
    }

    /// [`ResnetBlock2D::forward`] without checkpointing.
    fn forward_plain(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = silu(&self.norm1.forward(x)?)?;
        let mut h = self.conv1.forward(&h)?;
        if let Some(proj) = &self.time_emb_proj {
            let Some(temb) = temb else {
                candle_core::bail!("ResnetBlock2D {}: time embedding required", proj.path());
            };
            let t = proj.forward(&silu(temb)?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = silu(&self.norm2.forward(&h)?)?;
        let h = self.conv2.forward(&h)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out.affine(1.0 / self.output_scale_factor, 0.0)
        }
    }
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
