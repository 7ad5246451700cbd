//! Basic layers (`Linear`, `Conv2d`, `GroupNorm`, `LayerNorm`) shared by every model.
//!
//! These are our own types rather than candle_nn's because LoRA adapters attach to `Linear`
//! and `Conv2d`: every such layer remembers its module path (the `VarBuilder` prefix it was
//! built from, equal to the diffusers / transformers state-dict prefix, e.g.
//! `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`), so adapters can find layers
//! by name. Fields are private; use the accessors.
//!
//! Both carry a [`ResidualSlot`]: residuals attached there (LoRA adapters) are added to the
//! layer's output (`base + Σ residual_i(x)`). The slot is shared between clones of a layer. The base product uses the frozen ops of [`crate::ops`] (input gradient only)
//! unless the weight is a candle `Var` (full fine-tuning), where candle's matmul / conv2d
//! provide the weight gradient too.
//!
//! All constructors request every parameter with its full shape through `vb.get(shape, name)`,
//! so `ModelWeights` can check shapes and list the requested keys. Norms go through
//! `crate::ops` (computed in f32, cast back), so layers work for f32, f16 and bf16 weights.

use std::sync::{Arc, OnceLock};

use candle_core::{Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use super::residual::ResidualSlot;
use crate::ops::{frozen_linear, matmul, Conv2dParams, FrozenConv2d};

/// Loads `weight` of `shape` and, when `bias`, `bias` `[out]` from `vb` (in that order).
fn load_weight_bias(
    vb: &VarBuilder,
    shape: impl Into<Shape>,
    out: usize,
    bias: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let weight = vb.get(shape, "weight")?;
    let bias = if bias {
        Some(vb.get(out, "bias")?)
    } else {
        None
    };
    Ok((weight, bias))
}

/// The accessors [`Linear`] and [`Conv2d`] share (fields `weight`, `bias`, `path`,
/// `residuals`), with the three given doc lines for `weight`, `bias` and `path`.
macro_rules! adapted_layer_accessors {
    ($weight_doc:literal, $bias_doc:literal, $path_doc:literal) => {
        #[doc = $weight_doc]
        pub fn weight(&self) -> &Tensor {
            &self.weight
        }

        #[doc = $bias_doc]
        pub fn bias(&self) -> Option<&Tensor> {
            self.bias.as_ref()
        }

        #[doc = $path_doc]
        pub fn path(&self) -> &str {
            &self.path
        }

        /// The residuals (LoRA adapters) attached to this layer.
        pub fn residuals(&self) -> &ResidualSlot {
            &self.residuals
        }

        /// Whether the weight or bias is a trainable `Var` (full fine-tuning).
        pub fn is_trainable(&self) -> bool {
            self.weight.is_variable() || self.bias.as_ref().is_some_and(|b| b.is_variable())
        }
    };
}

/// A fully connected layer `y = x Wᵀ + b` with weight `[out, in]`, applied over the last dim.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    path: String,
    residuals: ResidualSlot,
}

impl Linear {
    /// Loads `weight` `[out_dim, in_dim]` and, when `bias`, `bias` `[out_dim]` from `vb`.
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let (weight, bias) = load_weight_bias(&vb, (out_dim, in_dim), out_dim, bias)?;
        Ok(Self::from_tensors(weight, bias, vb.prefix()))
    }

    /// Builds a layer from existing tensors (weight `[out, in]`, bias `[out]`) and a module path.
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>, path: impl Into<String>) -> Self {
        Self {
            weight,
            bias,
            path: path.into(),
            residuals: ResidualSlot::new(),
        }
    }

    adapted_layer_accessors!(
        "The weight, shape `[out_features, in_features]`.",
        "The bias, shape `[out_features]`, if the layer has one.",
        "The module path (state-dict prefix without `.weight`), e.g. `...attn1.to_q`."
    );

    /// Number of input features.
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Number of output features.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Applies the layer to `x` `[..., in]`, returning `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = self.in_features();
        if dims.last().copied() != Some(in_dim) {
            candle_core::bail!(
                "Linear {}: expected last dim {in_dim}, got input shape {:?}",
                self.path,
                dims
            );
        }
        if !self.is_trainable() {
            if let Some(y) = self
                .residuals
                .fused_linear(x, &self.weight, self.bias.as_ref())
            {
                return y;
            }
            let base = frozen_linear(x, &self.weight, self.bias.as_ref())?;
            return self.residuals.apply(x, base);
        }
        let y = if dims.len() == 2 {
            matmul(x, &self.weight.t()?)?
        } else {
            let rows = x.elem_count() / in_dim;
            let mut out_dims = dims.to_vec();
            *out_dims.last_mut().expect("non-empty dims") = self.out_features();
            matmul(&x.reshape((rows, in_dim))?, &self.weight.t()?)?.reshape(out_dims)?
        };
        let base = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        self.residuals.apply(x, base)
    }
}

/// A 2D convolution (dilation 1, groups 1) with weight `[out, in, k, k]` and optional bias.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    path: String,
    residuals: ResidualSlot,
    frozen: Arc<OnceLock<FrozenConv2d>>,
}

impl Conv2d {
    /// Loads `weight` `[out_c, in_c, kernel, kernel]` and, when `bias`, `bias` `[out_c]`;
    /// the convolution uses `stride` and symmetric zero `padding`.
    pub fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Self> {
        let (weight, bias) = load_weight_bias(&vb, (out_c, in_c, kernel, kernel), out_c, bias)?;
        Ok(Self::from_tensors(
            weight,
            bias,
            stride,
            padding,
            vb.prefix(),
        ))
    }

    /// Builds a convolution from existing tensors and a module path.
    pub fn from_tensors(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        path: impl Into<String>,
    ) -> Self {
        Self {
            weight,
            bias,
            stride,
            padding,
            path: path.into(),
            residuals: ResidualSlot::new(),
            frozen: Arc::new(OnceLock::new()),
        }
    }

    adapted_layer_accessors!(
        "The kernel, shape `[out_channels, in_channels, k, k]`.",
        "The bias, shape `[out_channels]`, if the layer has one.",
        "The module path (state-dict prefix without `.weight`), e.g. `conv_in`."
    );

    /// The stride of the convolution.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// The symmetric zero padding of the convolution.
    pub fn padding(&self) -> usize {
        self.padding
    }

    /// The kernel size k (square kernels).
    pub fn kernel_size(&self) -> usize {
        self.weight.dims()[2]
    }

    /// Number of input channels.
    pub fn in_channels(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Number of output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Applies the convolution to `x` `[B, in, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.is_trainable() {
            let base = self.frozen_op()?.forward(x)?;
            return self.residuals.apply(x, base);
        }
        let y = crate::ops::trainable_conv2d(x, &self.weight, self.padding, self.stride)?;
        let base = match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?,
            None => y,
        };
        self.residuals.apply(x, base)
    }

    /// The frozen-weight convolution op, built on first use and kept across calls.
    fn frozen_op(&self) -> Result<&FrozenConv2d> {
        if let Some(op) = self.frozen.get() {
            return Ok(op);
        }
        let params = Conv2dParams {
            stride: self.stride,
            padding: self.padding,
            ..Default::default()
        };
        let op = FrozenConv2d::new(&self.weight, self.bias.as_ref(), params)?;
        let _ = self.frozen.set(op);
        Ok(self.frozen.get().expect("just set"))
    }
}

/// A `Linear` or a `Conv2d` layer (a projection that is one or the other by config, or a
/// LoRA factor shaped after the layer it adapts).
#[derive(Debug, Clone)]
pub enum Layer {
    /// A fully connected layer on `[..., features]`.
    Linear(Linear),
    /// A 2D convolution on `[B, C, H, W]`.
    Conv2d(Conv2d),
}

impl Layer {
    /// Applies the layer.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Linear(l) => l.forward(x),
            Self::Conv2d(c) => c.forward(x),
        }
    }

    /// The weight (`[out, in]` or `[out, in, k, k]`).
    pub fn weight(&self) -> &Tensor {
        match self {
            Self::Linear(l) => l.weight(),
            Self::Conv2d(c) => c.weight(),
        }
    }
}

/// Group normalisation over `[N, C, ...]` with per-channel affine `weight` and `bias`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` (both `[channels]`) for `num_groups` groups.
    pub fn new(vb: VarBuilder, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if num_groups == 0 || !channels.is_multiple_of(num_groups) {
            candle_core::bail!(
                "GroupNorm {}: {channels} channels are not divisible into {num_groups} groups",
                vb.prefix()
            );
        }
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        Ok(Self {
            weight,
            bias,
            num_groups,
            eps,
        })
    }

    /// The per-channel scale.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The per-channel shift.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Number of groups.
    pub fn num_groups(&self) -> usize {
        self.num_groups
    }

    /// Applies the norm (computed in f32) to `x` `[N, C, ...]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::group_norm(x, self.num_groups, &self.weight, &self.bias, self.eps)
    }
}

/// Layer normalisation over the last dimension with affine `weight` and `bias`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` (both `[dim]`).
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        let bias = vb.get(dim, "bias")?;
        Ok(Self { weight, bias, eps })
    }

    /// The scale.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The shift.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Applies the norm (computed in f32) over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// SiLU activation `x · sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    crate::ops::silu(x)
}

/// Exact (erf) GELU as PyTorch's `F.gelu` with `approximate="none"`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    crate::ops::gelu_erf(x)
}

/// `candle_nn::Module` for layers whose inherent `forward(&self, x)` is the whole forward.
macro_rules! module_by_forward {
    ($($t:ty),+) => {
        $(impl Module for $t {
            fn forward(&self, x: &Tensor) -> Result<Tensor> {
                <$t>::forward(self, x)
            }
        })+
    };
}

module_by_forward!(Linear, Conv2d, GroupNorm, LayerNorm);
