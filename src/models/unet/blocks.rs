//! The UNet's down, mid and up blocks (diffusers' `CrossAttnDownBlock2D` / `DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D` / `UpBlock2D`).

use crate::models::walk::{LayerRef, LayerWalk};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::models::blocks::{
    Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Transformer2DConfig, Transformer2DModel,
    Upsample2D,
};

/// Settings shared by every block of one UNet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockCommon {
    /// Width of the time embedding.
    pub temb_channels: usize,
    /// Group norm groups.
    pub groups: usize,
    /// Resnet group norm epsilon.
    pub eps: f64,
    /// Linear `proj_in` / `proj_out`.
    pub use_linear_projection: bool,
    /// f32 attention scores.
    pub upcast_attention: bool,
}

impl BlockCommon {
    fn resnet(&self, cin: usize, cout: usize, scale: f64) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: scale,
        }
    }
}

/// Attention settings of one block (`None` for blocks without transformers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockAttention {
    /// Heads (head dim = channels / heads).
    pub heads: usize,
    /// Transformer blocks per `Transformer2DModel`.
    pub transformer_layers: usize,
    /// Text context channels.
    pub cross_attention_dim: usize,
    /// `attn1` attends to the text context.
    pub only_cross_attention: bool,
}

fn transformer_config(
    common: &BlockCommon,
    attn: &BlockAttention,
    channels: usize,
) -> Transformer2DConfig {
    Transformer2DConfig {
        num_attention_heads: attn.heads,
        attention_head_dim: channels / attn.heads,
        in_channels: channels,
        num_layers: attn.transformer_layers,
        cross_attention_dim: attn.cross_attention_dim,
        norm_num_groups: common.groups,
        use_linear_projection: common.use_linear_projection,
        only_cross_attention: attn.only_cross_attention,
        upcast_attention: common.upcast_attention,
    }
}

fn build_attentions(
    vb: &VarBuilder,
    common: &BlockCommon,
    attn: Option<&BlockAttention>,
    channels: usize,
    count: usize,
) -> Result<Vec<Transformer2DModel>> {
    match attn {
        None => Ok(Vec::new()),
        Some(a) => {
            let cfg = transformer_config(common, a, channels);
            let vb = vb.pp("attentions");
            (0..count)
                .map(|j| Transformer2DModel::new(vb.pp(j), &cfg))
                .collect()
        }
    }
}

/// A down block: `resnets` (each followed by a transformer in `attentions` for
/// `CrossAttnDownBlock2D`) and an optional `downsamplers.0`.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// Loads the block from `vb` (e.g. `down_blocks.0`).
    pub fn new(
        vb: VarBuilder,
        common: &BlockCommon,
        attn: Option<&BlockAttention>,
        (in_channels, out_channels): (usize, usize),
        num_layers: usize,
        downsample_padding: Option<usize>,
    ) -> Result<Self> {
        let vb_r = vb.pp("resnets");
        let resnets = (0..num_layers)
            .map(|j| {
                let cin = if j == 0 { in_channels } else { out_channels };
                ResnetBlock2D::new(vb_r.pp(j), &common.resnet(cin, out_channels, 1.0))
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = build_attentions(&vb, common, attn, out_channels, num_layers)?;
        let downsampler = match downsample_padding {
            Some(p) => Some(Downsample2D::new(
                vb.pp("downsamplers").pp(0),
                out_channels,
                out_channels,
                p,
            )?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// The resnets.
    pub fn resnets(&self) -> &[ResnetBlock2D] {
        &self.resnets
    }

    /// The transformers (empty for `DownBlock2D`).
    pub fn attentions(&self) -> &[Transformer2DModel] {
        &self.attentions
    }

    /// Checkpoints the resnets and transformer blocks (recomputed in the backward).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.resnets
            .iter_mut()
            .for_each(|r| r.set_gradient_checkpointing(on));
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_gradient_checkpointing(on));
    }

    /// `downsamplers.0`, if the block has one.
    pub fn downsampler(&self) -> Option<&Downsample2D> {
        self.downsampler.as_ref()
    }

    /// Runs the block; returns the output and the skip tensors it adds (one per resnet, plus the
    /// downsampled output).
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (j, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }
}

/// `UNetMidBlock2DCrossAttn`: `resnets.0`, then per layer `attentions.i` and `resnets.i+1`.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    /// Loads the block (one attention layer, as diffusers' UNet builds it) from `vb` (`mid_block`).
    pub fn new(
        vb: VarBuilder,
        common: &BlockCommon,
        attn: &BlockAttention,
        channels: usize,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let rcfg = common.resnet(channels, channels, output_scale_factor);
        let vb_r = vb.pp("resnets");
        let resnets = vec![
            ResnetBlock2D::new(vb_r.pp(0), &rcfg)?,
            ResnetBlock2D::new(vb_r.pp(1), &rcfg)?,
        ];
        let attentions = build_attentions(&vb, common, Some(attn), channels, 1)?;
        Ok(Self {
            resnets,
            attentions,
        })
    }

    /// The resnets (`resnets.0` before the attention, then one after each).
    pub fn resnets(&self) -> &[ResnetBlock2D] {
        &self.resnets
    }

    /// The transformers.
    pub fn attentions(&self) -> &[Transformer2DModel] {
        &self.attentions
    }

    /// Checkpoints the resnets and transformer blocks (recomputed in the backward).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.resnets
            .iter_mut()
            .for_each(|r| r.set_gradient_checkpointing(on));
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_gradient_checkpointing(on));
    }

    /// Runs the block.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, Some(temb))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, context)?;
            h = resnet.forward(&h, Some(temb))?;
        }
        Ok(h)
    }
}

/// An up block: `resnets` taking the concatenated skip tensors (each followed by a transformer
/// in `attentions` for `CrossAttnUpBlock2D`) and an optional `upsamplers.0`.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

/// Channel plan of an up block, as diffusers' `get_up_block` receives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpChannels {
    /// Channels of the skip tensor consumed by the last resnet.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Channels of the previous (deeper) block's output.
    pub prev_output_channels: usize,
}

impl UpBlock {
    /// Loads the block from `vb` (e.g. `up_blocks.1`).
    pub fn new(
        vb: VarBuilder,
        common: &BlockCommon,
        attn: Option<&BlockAttention>,
        ch: UpChannels,
        num_layers: usize,
        add_upsample: bool,
    ) -> Result<Self> {
        let vb_r = vb.pp("resnets");
        let out = ch.out_channels;
        let resnets = (0..num_layers)
            .map(|j| {
                let skip = if j + 1 == num_layers {
                    ch.in_channels
                } else {
                    out
                };
                let cin = if j == 0 { ch.prev_output_channels } else { out };
                ResnetBlock2D::new(vb_r.pp(j), &common.resnet(cin + skip, out, 1.0))
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = build_attentions(&vb, common, attn, out, num_layers)?;
        let upsampler = if add_upsample {
            Some(Upsample2D::new(vb.pp("upsamplers").pp(0), out, out)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// The resnets.
    pub fn resnets(&self) -> &[ResnetBlock2D] {
        &self.resnets
    }

    /// The transformers (empty for `UpBlock2D`).
    pub fn attentions(&self) -> &[Transformer2DModel] {
        &self.attentions
    }

    /// Checkpoints the resnets and transformer blocks (recomputed in the backward).
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.resnets
            .iter_mut()
            .for_each(|r| r.set_gradient_checkpointing(on));
        self.attentions
            .iter_mut()
            .for_each(|a| a.set_gradient_checkpointing(on));
    }

    /// `upsamplers.0`, if the block has one.
    pub fn upsampler(&self) -> Option<&Upsample2D> {
        self.upsampler.as_ref()
    }

    /// Runs the block; `skips` are consumed from the end (last pushed first), one per resnet.
    /// `upsample_size` forces the upsampler's output size (odd input sizes).
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        if skips.len() != self.resnets.len() {
            candle_core::bail!(
                "up block: {} skip tensors for {} resnets",
                skips.len(),
                self.resnets.len()
            );
        }
        let mut h = x.clone();
        for (j, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            h = Tensor::cat(&[&h, skip], 1)?;
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, context)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&h, upsample_size),
            None => Ok(h),
        }
    }
}

impl LayerWalk for DownBlock {
    /// `attentions`, `resnets`, `downsamplers.0` (diffusers registers attentions first).
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.attentions.walk(f);
        self.resnets.walk(f);
        self.downsampler.walk(f);
    }
}

impl LayerWalk for UpBlock {
    /// `attentions`, `resnets`, `upsamplers.0`.
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.attentions.walk(f);
        self.resnets.walk(f);
        self.upsampler.walk(f);
    }
}

impl LayerWalk for MidBlock {
    /// `attentions`, `resnets`.
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.attentions.walk(f);
        self.resnets.walk(f);
    }
}
