//! Models that host LoRA adapters: every model part with a [`LayerWalk`] lists its `Linear` and
//! `Conv2d` layers, with their module paths, in PyTorch's `named_modules()` order.

pub use crate::models::walk::LayerRef;
use crate::models::walk::LayerWalk;

/// A model whose `Linear` / `Conv2d` layers can carry LoRA adapters.
pub trait LoraHost {
    /// Every `Linear` and `Conv2d` with its module path, in `named_modules()` order.
    fn lora_layers(&self) -> Vec<LayerRef<'_>>;
}

impl<T: LayerWalk + ?Sized> LoraHost for T {
    fn lora_layers(&self) -> Vec<LayerRef<'_>> {
        self.walk_layers()
    }
}
