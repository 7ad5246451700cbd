//! The VAE `Encoder` and `Decoder` and their blocks (`DownEncoderBlock2D`, `UpDecoderBlock2D`,
//! `UNetMidBlock2D` without time embedding), with diffusers' module names.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::AutoencoderKLConfig;
use crate::models::blocks::{
    Attention, AttentionConfig, Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D,
};
use crate::models::layers::{silu, Conv2d, GroupNorm};

/// Epsilon of every norm inside the VAE (diffusers hard-codes 1e-6).
const VAE_EPS: f64 = 1e-6;

fn resnet(vb: VarBuilder, cin: usize, cout: usize, groups: usize) -> Result<ResnetBlock2D> {
    let cfg = ResnetBlock2DConfig {
        in_channels: cin,
        out_channels: cout,
        temb_channels: None,
        groups,
        eps: VAE_EPS,
        output_scale_factor: 1.0,
    };
    ResnetBlock2D::new(vb, &cfg)
}

/// `num_layers` resnets `resnets.{i}` under `vb`: the first maps `cin` to `cout` channels,
/// the others `cout` to `cout`.
fn resnet_stack(
    vb: &VarBuilder,
    cin: usize,
    cout: usize,
    num_layers: usize,
    groups: usize,
) -> Result<Vec<ResnetBlock2D>> {
    (0..num_layers)
        .map(|i| {
            let c = if i == 0 { cin } else { cout };
            resnet(vb.pp("resnets").pp(i), c, cout, groups)
        })
        .collect()
}

/// Runs `x` through `resnets` in order (no time embedding).
fn run_resnets(resnets: &[ResnetBlock2D], x: &Tensor) -> Result<Tensor> {
    let mut h = x.clone();
    for r in resnets {
        h = r.forward(&h, None)?;
    }
    Ok(h)
}

/// `UNetMidBlock2D` as the VAE uses it: resnet, (single-head attention with group norm and
/// residual connection), resnet; no time embedding.
#[derive(Debug, Clone)]
pub struct VaeMidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<Attention>,
}

impl VaeMidBlock {
    /// Loads `resnets.0`, `attentions.0` (when `add_attention`), `resnets.1` from `vb`.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        groups: usize,
        add_attention: bool,
    ) -> Result<Self> {
        let resnets = resnet_stack(&vb, channels, channels, 2, groups)?;
        let attention = if add_attention {
            let cfg = AttentionConfig {
                query_dim: channels,
                cross_attention_dim: None,
                heads: 1,
                dim_head: channels,
                bias: true,
                out_bias: true,
                upcast_attention: true,
                norm_num_groups: Some(groups),
                norm_eps: VAE_EPS,
                residual_connection: true,
                rescale_output_factor: 1.0,
            };
            Some(Attention::new(vb.pp("attentions").pp(0), &cfg)?)
        } else {
            None
        };
        Ok(Self { resnets, attention })
    }

    /// The attention layer, if the block has one.
    pub fn attention(&self) -> Option<&Attention> {
        self.attention.as_ref()
    }

    /// Applies the block to `x` `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, None)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h, None)?;
        }
        self.resnets[1].forward(&h, None)
    }
}

/// `DownEncoderBlock2D`: resnets, then an optional padding-0 `Downsample2D`.
#[derive(Debug, Clone)]
pub struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

impl DownEncoderBlock2D {
    /// Loads `resnets.{i}` and `downsamplers.0` from `vb` (`encoder.down_blocks.{i}`).
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        num_layers: usize,
        groups: usize,
        add_downsample: bool,
    ) -> Result<Self> {
        let resnets = resnet_stack(&vb, cin, cout, num_layers, groups)?;
        let downsampler = if add_downsample {
            Some(Downsample2D::new(
                vb.pp("downsamplers").pp(0),
                cout,
                cout,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            downsampler,
        })
    }

    /// Applies the block to `x` `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = run_resnets(&self.resnets, x)?;
        match &self.downsampler {
            Some(d) => d.forward(&h),
            None => Ok(h),
        }
    }
}

/// `UpDecoderBlock2D`: resnets, then an optional nearest-×2 `Upsample2D`.
#[derive(Debug, Clone)]
pub struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    /// Loads `resnets.{i}` and `upsamplers.0` from `vb` (`decoder.up_blocks.{i}`).
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        num_layers: usize,
        groups: usize,
        add_upsample: bool,
    ) -> Result<Self> {
        let resnets = resnet_stack(&vb, cin, cout, num_layers, groups)?;
        let upsampler = if add_upsample {
            Some(Upsample2D::new(vb.pp("upsamplers").pp(0), cout, cout)?)
        } else {
            None
        };
        Ok(Self { resnets, upsampler })
    }

    /// Applies the block to `x` `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = run_resnets(&self.resnets, x)?;
        match &self.upsampler {
            Some(u) => u.forward(&h, None),
            None => Ok(h),
        }
    }
}

/// The VAE encoder: image `[B, in, H, W]` to moments `[B, 2·latent, H/f, W/f]` (before
/// `quant_conv`).
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    /// Loads the encoder from `vb` (`encoder`).
    pub fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1, true)?;
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut prev = ch[0];
        for (i, &out) in ch.iter().enumerate() {
            let is_final = i + 1 == ch.len();
            down_blocks.push(DownEncoderBlock2D::new(
                vb.pp("down_blocks").pp(i),
                prev,
                out,
                cfg.layers_per_block,
                g,
                !is_final,
            )?);
            prev = out;
        }
        let last = ch[ch.len() - 1];
        let mid_block = VaeMidBlock::new(vb.pp("mid_block"), last, g, cfg.mid_block_add_attention)?;
        let conv_norm_out = GroupNorm::new(vb.pp("conv_norm_out"), g, last, VAE_EPS)?;
        let conv_out = Conv2d::new(
            vb.pp("conv_out"),
            last,
            2 * cfg.latent_channels,
            3,
            1,
            1,
            true,
        )?;
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block,
            conv_norm_out,
            conv_out,
        })
    }

    /// The mid block.
    pub fn mid_block(&self) -> &VaeMidBlock {
        &self.mid_block
    }

    /// Encodes `x` `[B, in, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            h = b.forward(&h)?;
        }
        let h = self.mid_block.forward(&h)?;
        let h = silu(&self.conv_norm_out.forward(&h)?)?;
        self.conv_out.forward(&h)
    }
}

/// The VAE decoder: latents `[B, latent, h, w]` (after `post_quant_conv`) to an image
/// `[B, out, h·f, w·f]`.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// Loads the decoder from `vb` (`decoder`).
    pub fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let last = ch[ch.len() - 1];
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.latent_channels, last, 3, 1, 1, true)?;
        let mid_block = VaeMidBlock::new(vb.pp("mid_block"), last, g, cfg.mid_block_add_attention)?;
        let mut up_blocks = Vec::with_capacity(ch.len());
        let mut prev = last;
        for (i, &out) in ch.iter().rev().enumerate() {
            let is_final = i + 1 == ch.len();
            up_blocks.push(UpDecoderBlock2D::new(
                vb.pp("up_blocks").pp(i),
                prev,
                out,
                cfg.layers_per_block + 1,
                g,
                !is_final,
            )?);
            prev = out;
        }
        let conv_norm_out = GroupNorm::new(vb.pp("conv_norm_out"), g, ch[0], VAE_EPS)?;
        let conv_out = Conv2d::new(vb.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1, true)?;
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    /// The mid block.
    pub fn mid_block(&self) -> &VaeMidBlock {
        &self.mid_block
    }

    /// Decodes `z` `[B, latent, h, w]`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        let mut h = self.mid_block.forward(&h)?;
        for b in &self.up_blocks {
            h = b.forward(&h)?;
        }
        let h = silu(&self.conv_norm_out.forward(&h)?)?;
        self.conv_out.forward(&h)
    }
}
