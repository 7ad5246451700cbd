//! Linear and Conv2d with frozen weights: the forward is candle's matmul / conv2d on
//! detached inputs, the backward returns the input gradient only (no weight or bias
//! gradient is ever computed, even when the weight is a `Var`).
//!
//! The conv input gradient: on the CPU (one group) a gemm with the kernel's transpose (a
//! view) and col2im (`im2col.rs`), so no rearranged copy of the kernel is ever built or
//! kept (a kept copy per layer doubled the memory of the UNet's conv weights in training).
//! Elsewhere, measured on the CPU (`examples/ops_bench.rs`): for stride 1 a plain conv2d of
//! the output gradient with the kernel transposed (in ↔ out) and flipped spatially, built
//! per call, beats `conv_transpose2d`, which candle implements as a direct loop; for
//! stride > 1 `conv_transpose2d` wins, since the conv2d would run over the zero-dilated
//! gradient (s² times larger). Grouped strided convolutions use the dilated conv2d
//! (candle's `conv_transpose2d` has no groups).

use super::bias::add_bias_owned;
use super::bridge::attach;
use super::dense::{self, cpu_bf16, matmul};
use candle_core::{DType, Result, Tensor};

/// Geometry of a 2D convolution (PyTorch's `Conv2d` arguments, same value for H and W).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    /// Stride.
    pub stride: usize,
    /// Symmetric zero padding.
    pub padding: usize,
    /// Kernel dilation.
    pub dilation: usize,
    /// Number of channel groups.
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

/// The frozen forward conv: our CPU kernels (shifted gemms or im2col + one gemm; bf16 on
/// f32 copies) where they serve, candle's conv2d elsewhere.
pub(super) fn conv2d(
    x: &Tensor,
    k: &Tensor,
    padding: usize,
    stride: usize,
    p: &Conv2dParams,
) -> Result<Tensor> {
    super::profile::scope("conv2d", super::profile::Pass::Forward, || {
        if !cpu_bf16(x) && super::im2col::supported(x, p.groups) {
            super::im2col::conv2d_cpu(x, k, padding, stride, p.dilation)
        } else if cpu_bf16(x) && p.groups == 1 {
            // bf16 on the CPU (no bf16 gemm in candle 0.11): our f32 kernels on f32 copies.
            let (x32, k32) = (x.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?);
            super::im2col::conv2d_cpu(&x32, &k32, padding, stride, p.dilation)?
                .to_dtype(DType::BF16)
        } else {
            dense::conv2d(x, k, padding, stride, p.dilation, p.groups)
        }
    })
}

/// Checks that an optional bias is `[n]` (errors name `who`).
fn check_bias(bias: Option<&Tensor>, n: usize, who: &str) -> Result<()> {
    match bias {
        Some(b) if b.dims() != [n] => {
            candle_core::bail!("{who}: bias {:?}, expected [{n}]", b.shape())
        }
        _ => Ok(()),
    }
}

/// `x @ wᵀ + b` over the last dimension of `x` (`w` is `[out, in]`), differentiable w.r.t.
/// `x` only: the backward is `g @ w`, and `w` / `b` never receive a gradient.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (out_f, in_f) = w.dims2()?;
    let dims = x.dims().to_vec();
    if dims.last().copied() != Some(in_f) {
        candle_core::bail!(
            "frozen_linear: weight {:?} needs input [..., {in_f}], got {dims:?}",
            w.shape()
        );
    }
    check_bias(b, out_f, "frozen_linear")?;
    let w = w.detach();
    let rows = x.elem_count() / in_f.max(1);
    let mut out_dims = dims.clone();
    *out_dims.last_mut().expect("checked non-empty") = out_f;
    let y = super::profile::scope("lora-frozen-linear", super::profile::Pass::Forward, || {
        matmul(&x.detach().reshape((rows, in_f))?, &w.t()?)
    })?;
    let y = match b {
        Some(b) => add_bias_owned(y, &b.detach(), 1)?,
        None => y,
    };
    let y = y.reshape(out_dims)?;
    let bwd = move |x: &Tensor, g: &Tensor| {
        let gx = matmul(&g.reshape((rows, out_f))?, &w)?;
        Ok(Some(gx.reshape(x.shape())?))
    };
    attach(x, y, "lora-frozen-linear", Box::new(bwd))
}

/// A 2D convolution with a frozen weight `[out, in/groups, kh, kw]` and optional bias,
/// differentiable w.r.t. its input only.
#[derive(Clone, Debug)]
pub struct FrozenConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    params: Conv2dParams,
}

impl FrozenConv2d {
    /// Wraps `weight` and `bias` (detached) with the convolution geometry `params`.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>, params: Conv2dParams) -> Result<Self> {
        let (out_c, _, _, _) = weight.dims4()?;
        let p = params;
        if p.stride == 0 || p.dilation == 0 || p.groups == 0 || out_c % p.groups != 0 {
            candle_core::bail!(
                "FrozenConv2d: invalid params {p:?} for weight {:?}",
                weight.shape()
            );
        }
        check_bias(bias, out_c, "FrozenConv2d")?;
        Ok(Self {
            weight: weight.detach(),
            bias: bias.map(|b| b.detach()),
            params,
        })
    }

    /// Convolves `x` `[N, in, H, W]`; differentiable w.r.t. `x` only.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.params;
        let (_, c_in, h, w) = x.dims4()?;
        let (_, c_k, _, _) = self.weight.dims4()?;
        if c_in != c_k * p.groups {
            candle_core::bail!(
                "FrozenConv2d: input {:?} does not match weight {:?} with {} groups",
                x.shape(),
                self.weight.shape(),
                p.groups
            );
        }
        let y = conv2d(&x.detach(), &self.weight, p.padding, p.stride, &p)?;
        let y = match &self.bias {
            Some(b) => add_bias_owned(y, b, 1)?,
            None => y,
        };
        let op = self.clone();
        let bwd = move |_: &Tensor, g: &Tensor| Ok(Some(op.input_grad(g, (h, w))?));
        attach(x, y, "lora-frozen-conv2d", Box::new(bwd))
    }

    /// The gradient w.r.t. the input (spatial size `input_hw`) for the output gradient `g`
    /// (no rearranged kernel is kept between calls, see the module docs).
    pub(crate) fn input_grad(&self, g: &Tensor, input_hw: (usize, usize)) -> Result<Tensor> {
        super::profile::scope("conv2d-input-grad", super::profile::Pass::Backward, || {
            input_grad(g, &self.weight, input_hw, &self.params)
        })
    }

    /// The number of output channels.
    pub(crate) fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }
}

/// `conv2d(x, w) + b` with a frozen weight: differentiable w.r.t. `x` only (see
/// [`FrozenConv2d`]).
pub fn frozen_conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    let params = Conv2dParams {
        stride,
        padding,
        dilation,
        groups,
    };
    FrozenConv2d::new(w, b, params)?.forward(x)
}

/// The kernel of the input-gradient convolution: `[in, out/groups, kh, kw]`, in ↔ out
/// transposed within each group and flipped in both spatial dimensions.
fn grad_kernel(w: &Tensor, groups: usize) -> Result<Tensor> {
    let (o, ci, kh, kw) = w.dims4()?;
    let kk = kh * kw;
    // [groups, out/g, in/g, kh*kw] -> [kh*kw, groups, in/g, out/g]: the spatial flip is
    // then a reversal of whole contiguous blocks along dim 0.
    let t = w
        .contiguous()?
        .reshape((groups, o / groups, ci, kk))?
        .permute((3, 0, 2, 1))?
        .contiguous()?;
    let t = if kk > 1 {
        let rev: Vec<u32> = (0..kk as u32).rev().collect();
        t.index_select(&Tensor::from_vec(rev, kk, w.device())?, 0)?
    } else {
        t
    };
    t.permute((1, 2, 3, 0))?
        .contiguous()?
        .reshape((groups * ci, o / groups, kh, kw))
}

/// Inserts `s - 1` zeros between the elements of `g` along `dim` and keeps `len` elements.
fn dilate(g: &Tensor, dim: usize, s: usize, len: usize) -> Result<Tensor> {
    if s == 1 {
        return g.narrow(dim, 0, len);
    }
    let g1 = g.unsqueeze(dim + 1)?;
    let mut zdims = g1.dims().to_vec();
    zdims[dim + 1] = s - 1;
    let z = Tensor::zeros(zdims, g.dtype(), g.device())?;
    let mut dims = g.dims().to_vec();
    dims[dim] *= s;
    Tensor::cat(&[&g1, &z], dim + 1)?
        .reshape(dims)?
        .narrow(dim, 0, len)
}

/// The gradient of `conv2d(x, w)` w.r.t. `x` (spatial size `input_hw`) for the output
/// gradient `g`: on the CPU with one group (not f16) a gemm with the kernel's transpose and
/// col2im; elsewhere for stride 1 (or groups > 1) a conv2d with the transposed, flipped
/// kernel of the zero-dilated gradient, for stride > 1 and one group `conv_transpose2d`,
/// which skips the zeros (both measured in `examples/ops_bench.rs`).
pub fn conv2d_input_grad(
    g: &Tensor,
    w: &Tensor,
    input_hw: (usize, usize),
    params: &Conv2dParams,
) -> Result<Tensor> {
    input_grad(g, w, input_hw, params)
}

/// [`conv2d_input_grad`] always as a conv2d with the transposed, flipped kernel (for
/// stride > 1 on the zero-dilated gradient), whatever the geometry; for comparisons.
pub fn conv2d_input_grad_flipped(
    g: &Tensor,
    w: &Tensor,
    input_hw: (usize, usize),
    params: &Conv2dParams,
) -> Result<Tensor> {
    let k = grad_kernel(w, params.groups)?;
    flipped_input_grad(g, w, &k, input_hw, params)
}

pub(super) fn input_grad(
    g: &Tensor,
    w: &Tensor,
    (h, wd): (usize, usize),
    p: &Conv2dParams,
) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let s = p.stride;
    if g.device().is_cpu() && p.groups == 1 && g.dtype() != DType::F16 {
        return super::im2col::conv2d_input_grad_cpu(g, w, (h, wd), p.padding, s, p.dilation);
    }
    if s > 1 && p.groups == 1 {
        // The rows the forward's stride skipped at the end of each spatial dim.
        let r = |inp: usize, kk: usize| (inp + 2 * p.padding - p.dilation * (kk - 1) - 1) % s;
        let g = g.contiguous()?;
        let (g32, w32) = if cpu_bf16(&g) {
            (g.to_dtype(DType::F32)?, w.to_dtype(DType::F32)?)
        } else {
            (g.clone(), w.clone())
        };
        let out_pad = r(h, kh).max(r(wd, kw));
        let gx = g32.conv_transpose2d(&w32, p.padding, out_pad, s, p.dilation)?;
        return gx.narrow(2, 0, h)?.narrow(3, 0, wd)?.to_dtype(g.dtype());
    }
    flipped_input_grad(g, w, &grad_kernel(w, p.groups)?, (h, wd), p)
}

fn flipped_input_grad(
    g: &Tensor,
    w: &Tensor,
    k: &Tensor,
    (h, wd): (usize, usize),
    p: &Conv2dParams,
) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let (_, _, ho, wo) = g.dims4()?;
    let (s, d) = (p.stride, p.dilation);
    // Per spatial dim: the length of the zero-dilated gradient (with the `r` rows the
    // forward's stride skipped at the end) and the padding of the stride-1 convolution.
    let geom = |inp: usize, out: usize, kk: usize| -> (usize, isize) {
        let r = (inp + 2 * p.padding - d * (kk - 1) - 1) % s;
        let pad = (d * (kk - 1)) as isize - p.padding as isize;
        ((out - 1) * s + 1 + r, pad)
    };
    let (lh, ph) = geom(h, ho, kh);
    let (lw, pw) = geom(wd, wo, kw);
    let g = g.contiguous()?;
    let mut g = if s > 1 {
        dilate(&dilate(&g, 2, s, lh)?, 3, s, lw)?
    } else {
        g
    };
    let cp = Conv2dParams {
        groups: p.groups,
        dilation: d,
        ..Default::default()
    };
    if ph == pw && ph >= 0 {
        return conv2d(&g, k, ph as usize, 1, &cp);
    }
    for (dim, pad) in [(2, ph), (3, pw)] {
        g = if pad >= 0 {
            g.pad_with_zeros(dim, pad as usize, pad as usize)?
        } else {
            let cut = (-pad) as usize;
            let len = g.dim(dim)? - 2 * cut;
            g.narrow(dim, cut, len)?
        };
    }
    conv2d(&g, k, 0, 1, &cp)
}
