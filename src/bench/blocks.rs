//! The block workloads of `lora bench train`: one SD-1.5 down-block slice (ResnetBlock2D 320
//! ch with a 1280 time embedding, then a Transformer2DModel of 8 heads × 40 with a 77×768
//! context) and two such slices in a row.

use crate::models::blocks::{
    ResnetBlock2D, ResnetBlock2DConfig, Transformer2DConfig, Transformer2DModel,
};
use crate::models::walk::{LayerRef, LayerWalk};
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// The down-block slice of the SD-block workload.
pub(crate) struct BlockSlice {
    resnet: ResnetBlock2D,
    attn: Transformer2DModel,
}

impl BlockSlice {
    /// Builds the workload's layers from `vb`.
    pub(crate) fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let rcfg = ResnetBlock2DConfig {
            temb_channels: Some(1280),
            eps: 1e-5,
            ..ResnetBlock2DConfig::new(320, 320)
        };
        let tcfg = Transformer2DConfig {
            num_attention_heads: 8,
            attention_head_dim: 40,
            in_channels: 320,
            num_layers: 1,
            cross_attention_dim: 768,
            norm_num_groups: 32,
            use_linear_projection: false,
            only_cross_attention: false,
            upcast_attention: false,
        };
        Ok(Self {
            resnet: ResnetBlock2D::new(vb.pp("resnet"), &rcfg)?,
            attn: Transformer2DModel::new(vb.pp("attn"), &tcfg)?,
        })
    }

    /// Checkpoints the resnet and the transformer blocks.
    pub(crate) fn set_gradient_checkpointing(&mut self, on: bool) {
        self.resnet.set_gradient_checkpointing(on);
        self.attn.set_gradient_checkpointing(on);
    }

    /// Runs the slice(s) on `x` with time embedding `temb` and context `ctx`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.attn.forward(&self.resnet.forward(x, Some(temb))?, ctx)
    }
}

impl LayerWalk for BlockSlice {
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.resnet.walk(f);
        self.attn.walk(f);
    }
}

/// Two down-block slices in a row (the `block2` workload).
pub(crate) struct BlockPair([BlockSlice; 2]);

impl BlockPair {
    /// Builds the workload's layers from `vb`.
    pub(crate) fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self([
            BlockSlice::new(vb.pp(0))?,
            BlockSlice::new(vb.pp(1))?,
        ]))
    }

    /// Runs the slice(s) on `x` with time embedding `temb` and context `ctx`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.0[1].forward(&self.0[0].forward(x, temb, ctx)?, temb, ctx)
    }
}

impl BlockPair {
    /// Checkpoints both slices.
    pub(crate) fn set_gradient_checkpointing(&mut self, on: bool) {
        self.0
            .iter_mut()
            .for_each(|b| b.set_gradient_checkpointing(on));
    }
}

impl LayerWalk for BlockPair {
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.0[0].walk(f);
        self.0[1].walk(f);
    }
}
