//! The one walk over a model's `Linear` and `Conv2d` layers, in PyTorch's `named_modules()`
//! order (the order diffusers and transformers register submodules in). Every block lists
//! its own layers ([`LayerWalk`]); LoRA hosts, architecture tables and benchmarks all use it.

use candle_core::{DType, Tensor};

use super::layers::{Conv2d, Layer, Linear};
use super::residual::ResidualSlot;

/// A borrowed `Linear` or `Conv2d` layer of a model.
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

    /// The residuals (LoRA adapters) attached to the layer.
    pub fn residuals(&self) -> &'a ResidualSlot {
        match self {
            Self::Linear(l) => l.residuals(),
            Self::Conv2d(c) => c.residuals(),
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

    /// The largest rank of a low-rank factorization of the weight: `min(in·k·k, out)`.
    pub fn max_rank(&self) -> usize {
        let k = self.kernel_size();
        (self.in_dim() * k * k).min(self.out_dim())
    }

    /// The shape of the first (down) factor of a rank-`r` factorization: `[r, in(, k, k)]`.
    pub fn down_shape(&self, r: usize) -> Vec<usize> {
        match self {
            Self::Linear(l) => vec![r, l.in_features()],
            Self::Conv2d(c) => vec![r, c.in_channels(), c.kernel_size(), c.kernel_size()],
        }
    }

    /// The shape of the second (up) factor of a rank-`r` factorization: `[out, r(, 1, 1)]`.
    pub fn up_shape(&self, r: usize) -> Vec<usize> {
        match self {
            Self::Linear(l) => vec![l.out_features(), r],
            Self::Conv2d(c) => vec![c.out_channels(), r, 1, 1],
        }
    }
}

/// A model or block whose `Linear` / `Conv2d` layers can be listed in module order.
pub trait LayerWalk {
    /// Calls `f` on every `Linear` / `Conv2d`, in `named_modules()` order.
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>));

    /// Every `Linear` / `Conv2d`, in `named_modules()` order.
    fn walk_layers(&self) -> Vec<LayerRef<'_>> {
        let mut out = Vec::new();
        self.walk(&mut |l| out.push(l));
        out
    }
}

impl LayerWalk for Linear {
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        f(LayerRef::Linear(self))
    }
}

impl LayerWalk for Conv2d {
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        f(LayerRef::Conv2d(self))
    }
}

impl LayerWalk for Layer {
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        match self {
            Layer::Linear(l) => l.walk(f),
            Layer::Conv2d(c) => c.walk(f),
        }
    }
}

impl<T: LayerWalk + ?Sized> LayerWalk for &T {
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        (**self).walk(f)
    }
}

impl<T: LayerWalk> LayerWalk for [T] {
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.iter().for_each(|t| t.walk(f))
    }
}

impl<T: LayerWalk> LayerWalk for Vec<T> {
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.as_slice().walk(f)
    }
}

impl<T: LayerWalk> LayerWalk for Option<T> {
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        if let Some(t) = self {
            t.walk(f)
        }
    }
}
