//! Models that host LoRA adapters: [`LoraHost`] lists every `Linear` and `Conv2d` of a model
//! with its module path, in PyTorch's `named_modules()` order (the order diffusers and
//! transformers register the submodules in).

use candle_core::{DType, Tensor};

use crate::lora::adapter::{AdapterKind, AdapterSlot};
use crate::models::blocks::{Projection, ResnetBlock2D, Transformer2DModel};
use crate::models::clip::ClipTextModel;
use crate::models::layers::{Conv2d, Linear};
use crate::models::unet::UNet2DConditionModel;

/// A `Linear` or `Conv2d` layer of a host model.
#[derive(Debug, Clone, Copy)]
pub enum LayerRef<'a> {
    /// A fully connected layer.
    Linear(&'a Linear),
    /// A 2D convolution.
    Conv2d(&'a Conv2d),
}

impl<'a> LayerRef<'a> {
    /// The module path (state-dict prefix), e.g. `down_blocks.0.attentions.0.proj_in`.
    pub fn path(&self) -> &'a str {
        match self {
            Self::Linear(l) => l.path(),
            Self::Conv2d(c) => c.path(),
        }
    }

    /// The adapters attached to the layer.
    pub fn adapters(&self) -> &'a AdapterSlot {
        match self {
            Self::Linear(l) => l.adapters(),
            Self::Conv2d(c) => c.adapters(),
        }
    }

    /// The weight (`[out, in]` or `[out, in, k, k]`).
    pub fn weight(&self) -> &'a Tensor {
        match self {
            Self::Linear(l) => l.weight(),
            Self::Conv2d(c) => c.weight(),
        }
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&'a Tensor> {
        match self {
            Self::Linear(l) => l.bias(),
            Self::Conv2d(c) => c.bias(),
        }
    }

    /// The dtype of the weight.
    pub fn dtype(&self) -> DType {
        self.weight().dtype()
    }

    /// The adapter kind (with the convolution geometry) for this layer.
    pub fn adapter_kind(&self) -> AdapterKind {
        match self {
            Self::Linear(_) => AdapterKind::Linear,
            Self::Conv2d(c) => AdapterKind::Conv2d {
                stride: c.stride(),
                padding: c.padding(),
            },
        }
    }

    /// Output features / channels.
    pub fn out_dim(&self) -> usize {
        match self {
            Self::Linear(l) => l.out_features(),
            Self::Conv2d(c) => c.out_channels(),
        }
    }

    /// Input features, or input channels for a convolution.
    pub fn in_dim(&self) -> usize {
        match self {
            Self::Linear(l) => l.in_features(),
            Self::Conv2d(c) => c.in_channels(),
        }
    }

    /// The kernel size (1 for a Linear layer).
    pub fn kernel_size(&self) -> usize {
        match self {
            Self::Linear(_) => 1,
            Self::Conv2d(c) => c.kernel_size(),
        }
    }

    /// The largest sensible LoRA rank: `min(in·k·k, out)`.
    pub fn max_rank(&self) -> usize {
        let k = self.kernel_size();
        (self.in_dim() * k * k).min(self.out_dim())
    }

    /// The shape a LoRA `down` factor of rank `r` must have.
    pub fn down_shape(&self, r: usize) -> Vec<usize> {
        match self {
            Self::Linear(l) => vec![r, l.in_features()],
            Self::Conv2d(c) => vec![r, c.in_channels(), c.kernel_size(), c.kernel_size()],
        }
    }

    /// The shape a LoRA `up` factor of rank `r` must have.
    pub fn up_shape(&self, r: usize) -> Vec<usize> {
        match self {
            Self::Linear(l) => vec![l.out_features(), r],
            Self::Conv2d(c) => vec![c.out_channels(), r, 1, 1],
        }
    }
}

/// A model whose `Linear` / `Conv2d` layers can carry LoRA adapters.
pub trait LoraHost {
    /// Every `Linear` and `Conv2d` with its module path, in `named_modules()` order.
    fn lora_layers(&self) -> Vec<LayerRef<'_>>;
}

fn push_proj<'a>(out: &mut Vec<LayerRef<'a>>, p: &'a Projection) {
    match p {
        Projection::Conv(c) => out.push(LayerRef::Conv2d(c)),
        Projection::Linear(l) => out.push(LayerRef::Linear(l)),
    }
}

/// `Transformer2DModel`: `proj_in`, blocks (attn1, attn2, ff), `proj_out`.
fn push_transformer<'a>(out: &mut Vec<LayerRef<'a>>, t: &'a Transformer2DModel) {
    push_proj(out, t.proj_in());
    for b in t.transformer_blocks() {
        for attn in [b.attn1(), b.attn2()] {
            for l in [attn.to_q(), attn.to_k(), attn.to_v(), attn.to_out()] {
                out.push(LayerRef::Linear(l));
            }
        }
        out.push(LayerRef::Linear(b.ff().geglu().proj()));
        out.push(LayerRef::Linear(b.ff().out()));
    }
    push_proj(out, t.proj_out());
}

/// `ResnetBlock2D`: conv1, time_emb_proj, conv2, conv_shortcut.
fn push_resnet<'a>(out: &mut Vec<LayerRef<'a>>, r: &'a ResnetBlock2D) {
    out.push(LayerRef::Conv2d(r.conv1()));
    if let Some(t) = r.time_emb_proj() {
        out.push(LayerRef::Linear(t));
    }
    out.push(LayerRef::Conv2d(r.conv2()));
    if let Some(c) = r.conv_shortcut() {
        out.push(LayerRef::Conv2d(c));
    }
}

impl LoraHost for UNet2DConditionModel {
    /// diffusers registers `conv_in`, `time_embedding`, `down_blocks`, `up_blocks`,
    /// `mid_block`, `conv_out`; blocks register `attentions` before `resnets`.
    fn lora_layers(&self) -> Vec<LayerRef<'_>> {
        let mut out = vec![LayerRef::Conv2d(self.conv_in())];
        out.push(LayerRef::Linear(self.time_embedding().linear_1()));
        out.push(LayerRef::Linear(self.time_embedding().linear_2()));
        for b in self.down_blocks() {
            b.attentions()
                .iter()
                .for_each(|t| push_transformer(&mut out, t));
            b.resnets().iter().for_each(|r| push_resnet(&mut out, r));
            if let Some(d) = b.downsampler() {
                out.push(LayerRef::Conv2d(d.conv()));
            }
        }
        for b in self.up_blocks() {
            b.attentions()
                .iter()
                .for_each(|t| push_transformer(&mut out, t));
            b.resnets().iter().for_each(|r| push_resnet(&mut out, r));
            if let Some(u) = b.upsampler() {
                out.push(LayerRef::Conv2d(u.conv()));
            }
        }
        if let Some(m) = self.mid_block() {
            m.attentions()
                .iter()
                .for_each(|t| push_transformer(&mut out, t));
            m.resnets().iter().for_each(|r| push_resnet(&mut out, r));
        }
        out.push(LayerRef::Conv2d(self.conv_out()));
        out
    }
}

impl LoraHost for ClipTextModel {
    /// transformers' `CLIPAttention` registers `k_proj`, `v_proj`, `q_proj`, `out_proj`;
    /// then `mlp.fc1`, `mlp.fc2`.
    fn lora_layers(&self) -> Vec<LayerRef<'_>> {
        let mut out = Vec::new();
        for layer in self.layers() {
            let [q, k, v, o] = layer.self_attn().linears();
            for l in [k, v, q, o] {
                out.push(LayerRef::Linear(l));
            }
            for l in layer.mlp().linears() {
                out.push(LayerRef::Linear(l));
            }
        }
        out
    }
}
