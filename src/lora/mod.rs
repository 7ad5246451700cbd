//! LoRA: low-rank residuals `W' = W + scale · up · down` on the linear and convolution layers
//! of the UNet and the text encoder.
//!
//! [`LoraSet`] is the one in-memory form every file format reads into and writes from: layer
//! weights keyed by the full module path of the layer they adapt, prefixed by the model
//! component (`unet.` or `text_encoder.`), e.g.
//! `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.

pub mod combine;
pub mod extract;
pub mod svd;
pub mod upl;

pub mod adapter;
pub mod host;
pub mod inject;
pub mod merge;
pub mod targets;

pub use adapter::{AdapterKind, LoraAdapter};
pub use host::{LayerRef, LoraHost};
pub use inject::{
    apply_lora_set, extract, inject_trainable, remove_all, set_enabled, set_scale, InjectedLora,
    LoraHandle,
};
pub use merge::{collapse, delta_weight};
pub use targets::LoraTargets;

use candle_core::Tensor;
use std::collections::BTreeMap;

/// The low-rank factors of one adapted layer.
///
/// Linear: `down` [r, in], `up` [out, r]. Conv2d: `down` [r, in, k, k] (the original layer's
/// kernel, stride and padding), `up` [out, r, 1, 1]. ΔW = (alpha / r) · up · down.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    /// The down projection (applied first).
    pub down: Tensor,
    /// The up projection.
    pub up: Tensor,
    /// alpha; the scale is alpha / rank.
    pub alpha: f64,
}

impl LoraWeights {
    /// The rank r (rows of `down`).
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// alpha / rank.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    /// True for a convolution adapter (4-d factors).
    pub fn is_conv(&self) -> bool {
        self.down.rank() == 4
    }

    /// The shape of the weight ΔW adapts: `up`'s rows, then `down`'s input dims
    /// (`[out, in]` or `[out, in, kh, kw]`).
    pub fn delta_shape(&self) -> Vec<usize> {
        let mut s = vec![self.up.dims().first().copied().unwrap_or(0)];
        s.extend_from_slice(self.down.dims().get(1..).unwrap_or(&[]));
        s
    }
}

/// A complete LoRA: every adapted layer plus the file's metadata.
#[derive(Debug, Clone, Default)]
pub struct LoraSet {
    /// Adapted layers by component-prefixed module path (`unet.…`, `text_encoder.…`).
    pub layers: BTreeMap<String, LoraWeights>,
    /// Free-form metadata (the safetensors header's `__metadata__`).
    pub metadata: BTreeMap<String, String>,
}
