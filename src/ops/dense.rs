//! Differentiable matmul and conv2d on candle's kernels, for every dtype and device: bf16 on
//! the CPU (where candle 0.11 has no bf16 gemm / conv) is computed in f32 and cast back.

use candle_core::{DType, Result, Tensor};

/// Whether `x` is bf16 on the CPU.
pub(crate) fn cpu_bf16(x: &Tensor) -> bool {
    x.dtype() == DType::BF16 && x.device().is_cpu()
}

/// Batched matrix product `a @ b`, differentiable in both operands.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if let Some(c) = super::blas::matmul(a, b)? {
        return Ok(c);
    }
    if let Some(c) = super::pool_matmul::matmul(a, b)? {
        return Ok(c);
    }
    if cpu_bf16(a) {
        matmul(&a.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?)?.to_dtype(DType::BF16)
    } else {
        a.matmul(b)
    }
}

/// 2D convolution of `x` `[N, C, H, W]` with kernel `k` (candle's `conv2d` argument order),
/// differentiable in both operands.
pub fn conv2d(
    x: &Tensor,
    k: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    if cpu_bf16(x) {
        x.to_dtype(DType::F32)?
            .conv2d(&k.to_dtype(DType::F32)?, padding, stride, dilation, groups)?
            .to_dtype(DType::BF16)
    } else {
        x.conv2d(k, padding, stride, dilation, groups)
    }
}
