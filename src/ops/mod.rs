//! Numerical building blocks shared by every model, differentiable for training.
//!
//! Every model calls softmax / layer norm / group norm through this module only. Each op
//! has a fast forward and a hand-written backward (candle 0.11's `softmax_last_dim` and
//! `layer_norm` have none, and its composed versions are 2–30× slower to differentiate, see
//! `examples/ops_bench.rs`):
//!
//! | op | forward | backward |
//! |---|---|---|
//! | [`softmax_last_dim`] | fused | `y · (g − Σ g·y)` |
//! | [`layer_norm`], [`group_norm`] | fused, two-pass statistics | dx, dweight, dbias |
//! | [`silu`], [`gelu_erf`] | fused | one-pass derivative |
//! | [`upsample_nearest2d`] | fused copy | sum-pool of the gradient |
//! | [`attention`], [`attention_heads`] | matmul, fused scaled softmax, matmul; tiled over queries above [`ATTENTION_TILE_BYTES`] ([`ATTENTION_MATERIALISE_BYTES`] when tracked) | keeps only the probabilities, or (tiled) only the row log-sum-exp and recomputes them per tile |
//! | [`lora_linear`] | frozen linear + one LoRA adapter, sums in place | `x`, `down`, `up` gradients; the rank-r hidden recomputed |
//! | [`checkpoint`] | the block without a graph | the block run again, then its backward |
//! | [`frozen_linear`], [`frozen_conv2d`], [`FrozenConv2d`] | candle matmul; conv2d as im2col + one gemm on the CPU, candle's conv2d elsewhere; bias added in place | input gradient only |
//! | [`trainable_conv2d`] | as [`frozen_conv2d`] | input gradient as [`frozen_conv2d`]'s, kernel gradient one gemm per band of output rows' im2col patches (CPU f32 / f64; candle's backward elsewhere) |
//! | [`group_norm_silu_conv2d`] | the unfused ops; time embedding and skip added in place | keeps only its arguments, recomputes norm and SiLU |
//! | [`geglu_linear`] | the unfused ops | keeps only `h`, recomputes `gelu(gate)` |
//!
//! "Fused" kernels run on the CPU for f32 / f64 ([`Kernel::Auto`]); on CUDA / Metal (and
//! with [`Kernel::Generic`]) the forward is candle's own kernel and the backward is written
//! with candle tensor ops, so every op works on every device. A backward only computes the
//! gradients of inputs that are part of the graph (frozen norm weights cost nothing).

mod activation;
mod attention;
mod attention_cpu;
mod attention_tiled;
mod bias;
mod blas;
mod bridge;
mod checkpoint;
mod conv_shifted;
mod conv_winograd;
mod dense;
mod frozen;
mod geglu_linear;
mod group_norm;
mod im2col;
mod layer_norm;
mod lora_linear;
mod low_rank;
mod norm_silu_conv;
mod par;
mod pool_matmul;
pub mod profile;
#[cfg(target_arch = "x86_64")]
mod simd512;
mod softmax;
#[cfg(test)]
mod testing;
mod trainable_conv;
mod upsample;

pub use attention::{
    attention, attention_heads, attention_materialised, attention_peak_elems, attention_tiled,
    attention_with, reset_attention_peak, ATTENTION_MATERIALISE_BYTES, ATTENTION_TILE_BYTES,
};
pub use blas::{blas_name, gemm_kernels};
pub use checkpoint::{checkpoint, BlockFn, Replay};
pub use conv_shifted::{
    conv2d as shifted_conv2d, conv2d_input_grad as shifted_conv2d_input_grad,
    serves as shifted_conv_serves,
};
pub use conv_winograd::{
    conv2d as winograd_conv2d, conv2d_input_grad as winograd_conv2d_input_grad,
    serves as winograd_conv_serves,
};
pub use dense::{conv2d, matmul};
pub use frozen::{
    conv2d_input_grad, conv2d_input_grad_flipped, frozen_conv2d, frozen_linear, Conv2dParams,
    FrozenConv2d,
};
pub use geglu_linear::{geglu_linear, geglu_linear_with};
pub use lora_linear::lora_linear;
pub use norm_silu_conv::{
    group_norm_silu_conv2d, group_norm_silu_conv2d_with, ConvOutputAdds, GroupNormSpec,
};
pub use trainable_conv::trainable_conv2d;
pub use upsample::upsample_nearest2d;

use candle_core::{CustomOp3, DType, Result, Tensor, D};

/// Which implementation a training op uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernel {
    /// Fused CPU kernels for f32 / f64 on the CPU; [`Kernel::Generic`] everywhere else.
    #[default]
    Auto,
    /// Forward with candle's own kernels, backward with candle tensor ops: the path every
    /// non-CPU device takes (selectable on the CPU so tests cover it).
    Generic,
}

impl Kernel {
    /// Whether the fused CPU kernel serves `x` (CPU, f32 / f64, [`Kernel::Auto`]).
    pub(crate) fn fused_on(self, x: &Tensor) -> bool {
        self == Kernel::Auto && x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
    }
}

/// The dtype an op computes in: f64 stays f64, everything else runs in f32.
fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Softmax over the last dimension, computed in f32 (f64 stays f64) and cast back to the
/// input dtype; differentiable, with a hand-written backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    softmax_last_dim_with(x, Kernel::Auto)
}

/// [`softmax_last_dim`] with an explicit [`Kernel`] choice.
pub fn softmax_last_dim_with(x: &Tensor, kernel: Kernel) -> Result<Tensor> {
    let dtype = x.dtype();
    let xc = x.to_dtype(compute_dtype(dtype))?.contiguous()?;
    xc.apply_op1(softmax::Softmax { kernel, scale: 1.0 })?
        .to_dtype(dtype)
}

/// Layer norm over the last dimension with an affine weight and bias (PyTorch semantics),
/// computed in f32 (f64 stays f64) and cast back; differentiable w.r.t. all three inputs.
/// A half-precision graph keeps the half input, not its f32 copy.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    layer_norm_with(x, weight, bias, eps, Kernel::Auto)
}

/// [`layer_norm`] with an explicit [`Kernel`] choice.
pub fn layer_norm_with(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    kernel: Kernel,
) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    if weight.dims() != [c] || bias.dims() != [c] {
        candle_core::bail!(
            "layer_norm: input {:?} needs weight and bias of shape [{c}], got {:?} and {:?}",
            x.shape(),
            weight.shape(),
            bias.shape()
        );
    }
    let op = layer_norm::LayerNorm { eps, kernel };
    norm_op(
        [x, weight, bias],
        op,
        "lora-layer-norm-half",
        move |a, track, g| layer_norm::grads(eps, kernel, a, track, g),
    )
}

/// The norm `op` on `(x, weight, bias)` in the compute dtype: the op itself for f32 / f64
/// input; for a half `x` through [`bridge::keep_half`] (the graph keeps the half input), with
/// `grads` (the op's gradients on compute-dtype arguments) as its backward.
fn norm_op(
    [x, weight, bias]: [&Tensor; 3],
    op: impl CustomOp3 + Send + Sync + 'static,
    half_name: &'static str,
    grads: impl Fn([&Tensor; 3], [bool; 3], &Tensor) -> Result<bridge::Grads3> + Send + Sync + 'static,
) -> Result<Tensor> {
    let cd = compute_dtype(x.dtype());
    if x.dtype() != cd {
        let fwd = |[x, w, b]: [&Tensor; 3]| x.apply_op3_no_bwd(w, b, &op);
        return bridge::keep_half([x, weight, bias], cd, half_name, fwd, Box::new(grads));
    }
    let w = weight.to_dtype(cd)?.contiguous()?;
    let b = bias.to_dtype(cd)?.contiguous()?;
    x.contiguous()?.apply_op3(&w, &b, op)
}

/// Group norm over [N, C, ...] with per-channel affine weight and bias (PyTorch semantics),
/// computed in f32 (f64 stays f64) and cast back; differentiable w.r.t. all three inputs.
/// A half-precision graph keeps the half input, not its f32 copy.
pub fn group_norm(
    x: &Tensor,
    num_groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    group_norm_with(x, num_groups, weight, bias, eps, Kernel::Auto)
}

/// [`group_norm`] with an explicit [`Kernel`] choice.
pub fn group_norm_with(
    x: &Tensor,
    num_groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    kernel: Kernel,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || dims.contains(&0) {
        candle_core::bail!("group_norm: input must be [N, C, ...] and non-empty, got {dims:?}");
    }
    let c = dims[1];
    if num_groups == 0 || !c.is_multiple_of(num_groups) {
        candle_core::bail!("group_norm: {c} channels are not divisible by {num_groups} groups");
    }
    if weight.dims() != [c] || bias.dims() != [c] {
        candle_core::bail!(
            "group_norm: input {:?} needs weight and bias of shape [{c}], got {:?} and {:?}",
            x.shape(),
            weight.shape(),
            bias.shape()
        );
    }
    let op = group_norm::GroupNorm {
        groups: num_groups,
        eps,
        kernel,
    };
    norm_op(
        [x, weight, bias],
        op,
        "lora-group-norm-half",
        move |a, track, g| group_norm::grads((num_groups, eps), kernel, a, track, g),
    )
}

/// SiLU `x · sigmoid(x)`, differentiable with a one-pass backward on the CPU (outside a
/// graph: the fused kernel on the CPU for f32 / f64, candle's own `silu` elsewhere).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    silu_with(x, Kernel::Auto)
}

/// [`silu`] with an explicit [`Kernel`] choice.
pub fn silu_with(x: &Tensor, kernel: Kernel) -> Result<Tensor> {
    activation_with(x, activation::Act::Silu, kernel, Tensor::silu)
}

/// The activation `act` as a differentiable op; outside a graph, `candle_fallback` (candle's
/// own kernel) where the fused kernel does not run.
fn activation_with(
    x: &Tensor,
    act: activation::Act,
    kernel: Kernel,
    candle_fallback: fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let op = activation::Activation { act, kernel };
    if !x.track_op() {
        // Outside a graph: the fused kernel where it exists (it also takes strided
        // inputs, e.g. GEGLU's gate half, after one contiguous copy), else candle's own.
        if op.fused_on(x) {
            return x.contiguous()?.apply_op1_no_bwd(&op);
        }
        return candle_fallback(x);
    }
    x.contiguous()?.apply_op1(op)
}

/// Exact GELU `x · Φ(x)` (PyTorch's default `approximate="none"`), differentiable with a
/// one-pass backward on the CPU (outside a graph: the fused kernel on the CPU for f32 / f64,
/// candle's own `gelu_erf` elsewhere).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    gelu_erf_with(x, Kernel::Auto)
}

/// [`gelu_erf`] with an explicit [`Kernel`] choice.
pub fn gelu_erf_with(x: &Tensor, kernel: Kernel) -> Result<Tensor> {
    activation_with(x, activation::Act::GeluErf, kernel, Tensor::gelu_erf)
}
