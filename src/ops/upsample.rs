//! Nearest-neighbour upsampling by integer factors with a backward that sum-pools the
//! gradient over each `fh × fw` block.
//!
//! candle's own `upsample_nearest2d` backward computes the sum-pool as a grouped conv2d
//! (one convolution per channel on the CPU) and *overwrites* the argument's accumulated
//! gradient instead of adding to it, which is wrong when the argument feeds other ops too.

use super::bridge::bridge1;
use super::par::{contiguous_slice, par_rows};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Layout, MetalStorage, Result, Shape, Tensor,
    WithDType,
};

/// Forward with candle's kernel.
fn generic_fwd(x: &Tensor, fh: usize, fw: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    x.upsample_nearest2d(h * fh, w * fw)
}

/// Backward with tensor ops: the sum over each block.
pub(crate) fn generic_bwd(g: &Tensor, fh: usize, fw: usize) -> Result<Tensor> {
    let (n, c, ho, wo) = g.dims4()?;
    g.reshape((n, c, ho / fh, fh, wo / fw, fw))?.sum(5)?.sum(3)
}

fn fwd_kernel<T: WithDType>(
    s: &CpuStorage,
    l: &Layout,
    fh: usize,
    fw: usize,
) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_slice::<T>(s, l, "upsample_nearest2d")?;
    let (n, c, h, w) = l.shape().dims4()?;
    let wo = w * fw;
    let mut dst = vec![T::zero(); n * c * h * fh * wo];
    par_rows(&mut dst, wo, |r, d| {
        // Output row r belongs to plane r / (h*fh) and input row (r % (h*fh)) / fh.
        let (plane, ro) = (r / (h * fh), r % (h * fh));
        let src = &x[(plane * h + ro / fh) * w..][..w];
        for (j, &v) in src.iter().enumerate() {
            d[j * fw..(j + 1) * fw].fill(v);
        }
    });
    Ok((
        T::to_cpu_storage_owned(dst),
        Shape::from((n, c, h * fh, wo)),
    ))
}

/// The differentiable upsampling op.
struct UpsampleNearest {
    fh: usize,
    fw: usize,
}

impl CustomOp1 for UpsampleNearest {
    fn name(&self) -> &'static str {
        "lora-upsample-nearest2d"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (fh, fw) = (self.fh, self.fw);
        if !l.is_contiguous() {
            return bridge1(s, l, |x| generic_fwd(x, fh, fw));
        }
        match s.dtype() {
            DType::F32 => fwd_kernel::<f32>(s, l, fh, fw),
            DType::F64 => fwd_kernel::<f64>(s, l, fh, fw),
            DType::F16 => fwd_kernel::<half::f16>(s, l, fh, fw),
            DType::BF16 => fwd_kernel::<half::bf16>(s, l, fh, fw),
            _ => bridge1(s, l, |x| generic_fwd(x, fh, fw)),
        }
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        bridge1(s, l, |x| generic_fwd(x, self.fh, self.fw))
    }
    fn metal_fwd(&self, s: &MetalStorage, l: &Layout) -> Result<(MetalStorage, Shape)> {
        bridge1(s, l, |x| generic_fwd(x, self.fh, self.fw))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(generic_bwd(g, self.fh, self.fw)?))
    }
}

/// The source index of each of `dst` output positions over `src` inputs: `⌊o · src / dst⌋`
/// (candle's and PyTorch's `nearest` rule).
fn nearest_indices(src: usize, dst: usize, device: &candle_core::Device) -> Result<Tensor> {
    let scale = src as f64 / dst as f64;
    let idx: Vec<u32> = (0..dst)
        .map(|o| ((o as f64 * scale) as usize).min(src.saturating_sub(1)) as u32)
        .collect();
    Tensor::from_vec(idx, dst, device)
}

/// Nearest-neighbour upsampling of `x` `[N, C, H, W]` to `[N, C, target_h, target_w]`.
/// Integer factors are differentiable (sum-pool backward); other sizes (odd latent sizes, e.g.
/// aspect-ratio buckets) are two index selects, whose backward adds each gradient to its
/// source; outside a graph it is candle's own op.
pub fn upsample_nearest2d(x: &Tensor, target_h: usize, target_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if !x.track_op() {
        return x.upsample_nearest2d(target_h, target_w);
    }
    let integer = h > 0 && w > 0 && target_h.is_multiple_of(h) && target_w.is_multiple_of(w);
    if !integer {
        let ih = nearest_indices(h, target_h, x.device())?;
        let iw = nearest_indices(w, target_w, x.device())?;
        return x.index_select(&ih, 2)?.index_select(&iw, 3);
    }
    let op = UpsampleNearest {
        fh: target_h / h,
        fw: target_w / w,
    };
    x.contiguous()?.apply_op1(op)
}
