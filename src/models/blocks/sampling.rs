//! `Downsample2D` and `Upsample2D` as diffusers defines them (the `use_conv=True` variants).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::models::layers::Conv2d;
use crate::models::walk::{LayerRef, LayerWalk};

/// diffusers' `Downsample2D(use_conv=True)`: a 3×3 convolution with stride 2 named `conv`.
/// With `padding == 0` (the VAE encoder) the input is first zero-padded by one on the right
/// and bottom, as diffusers does.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    /// Loads `conv` (`[out, channels, 3, 3]` + bias) from `vb` (e.g. `down_blocks.0.downsamplers.0`).
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        let conv = Conv2d::new(vb.pp("conv"), channels, out_channels, 3, 2, padding, true)?;
        Ok(Self { conv, padding })
    }

    /// The stride-2 convolution.
    pub fn conv(&self) -> &Conv2d {
        &self.conv
    }

    /// Halves the spatial size of `x` `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers' `Upsample2D(use_conv=True)`: nearest-neighbour ×2 (or to an explicit size), then a
/// 3×3 convolution named `conv`.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Loads `conv` (`[out, channels, 3, 3]` + bias) from `vb` (e.g. `up_blocks.0.upsamplers.0`).
    pub fn new(vb: VarBuilder, channels: usize, out_channels: usize) -> Result<Self> {
        let conv = Conv2d::new(vb.pp("conv"), channels, out_channels, 3, 1, 1, true)?;
        Ok(Self { conv })
    }

    /// The 3×3 convolution.
    pub fn conv(&self) -> &Conv2d {
        &self.conv
    }

    /// Upsamples `x` `[B, C, H, W]` to `output_size` `(h, w)` when given (PyTorch nearest
    /// semantics), else to `(2H, 2W)`, then applies the convolution.
    pub fn forward(&self, x: &Tensor, output_size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = output_size.unwrap_or((2 * h, 2 * w));
        let x = crate::ops::upsample_nearest2d(x, th, tw)?;
        self.conv.forward(&x)
    }
}

impl LayerWalk for Downsample2D {
    /// `conv`.
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.conv().walk(f);
    }
}

impl LayerWalk for Upsample2D {
    /// `conv`.
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.conv().walk(f);
    }
}
