//! Adding a bias to a freshly computed linear / convolution output in place.
//!
//! `y.broadcast_add(b)` allocates and writes a second output-sized tensor; on the CPU the
//! frozen linear and conv2d add their bias into the gemm's own result instead (f32 / f64 /
//! f16, contiguous), everywhere else they use `broadcast_add`. Same sums, same rounding.

use super::par::par_rows;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, WithDType};

/// `y[o, c, i] += b[c]` for `y` viewed as `[outer, C, inner]`.
struct AddBias {
    inner: usize,
}

fn add<T: WithDType>(y: &mut [T], b: &[T], inner: usize) {
    let c = b.len();
    par_rows(y, c * inner, |_, row| {
        for (chunk, &bv) in row.chunks_exact_mut(inner).zip(b) {
            for v in chunk {
                *v += bv;
            }
        }
    });
}

impl InplaceOp2 for AddBias {
    fn name(&self) -> &'static str {
        "lora-add-bias"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (Some((a, e)), Some((ba, be))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("add bias: contiguous inputs only");
        };
        match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(b)) => add(&mut y[a..e], &b[ba..be], self.inner),
            (CpuStorage::F64(y), CpuStorage::F64(b)) => add(&mut y[a..e], &b[ba..be], self.inner),
            (CpuStorage::F16(y), CpuStorage::F16(b)) => add(&mut y[a..e], &b[ba..be], self.inner),
            (y, b) => candle_core::bail!("add bias: dtypes {:?} and {:?}", y.dtype(), b.dtype()),
        }
        Ok(())
    }
}

/// `y + b` with `b` `[C]` broadcast over `y`'s dim `dim` (of size C), for a `y` nothing
/// else shares (a fresh gemm / conv result): in place on the CPU, else `broadcast_add`.
pub(crate) fn add_bias_owned(y: Tensor, b: &Tensor, dim: usize) -> Result<Tensor> {
    let c = b.elem_count();
    let dims = y.dims().to_vec();
    if dim >= dims.len() || dims[dim] != c {
        candle_core::bail!("add bias: bias [{c}] does not fit dim {dim} of {dims:?}");
    }
    let inner: usize = dims[dim + 1..].iter().product();
    let fused = y.device().is_cpu()
        && y.dtype() == b.dtype()
        && matches!(y.dtype(), DType::F32 | DType::F64 | DType::F16)
        && y.is_contiguous()
        && b.is_contiguous()
        && inner > 0
        && c > 0;
    if fused {
        y.inplace_op2(b, &AddBias { inner })?;
        return Ok(y);
    }
    let mut bshape = vec![1; dims.len()];
    bshape[dim] = c;
    y.broadcast_add(&b.reshape(bshape)?)
}

/// `y += o` elementwise for two contiguous CPU tensors of one shape and dtype.
struct AddInPlace;

fn add_all<T: WithDType>(y: &mut [T], o: &[T]) {
    let ptr = super::par::SharedMut::new(y);
    let chunk = 1 << 14;
    super::par::par_for(o.len().div_ceil(chunk), chunk, |i| {
        let start = i * chunk;
        let len = chunk.min(o.len() - start);
        // SAFETY: chunk i covers [start, start + len), disjoint for distinct i, inside y.
        let d = unsafe { ptr.slice(start, len) };
        for (v, &w) in d.iter_mut().zip(&o[start..start + len]) {
            *v += w;
        }
    });
}

impl InplaceOp2 for AddInPlace {
    fn name(&self) -> &'static str {
        "lora-add-in-place"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (Some((a, e)), Some((oa, oe))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("add in place: contiguous inputs only");
        };
        match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(o)) => add_all(&mut y[a..e], &o[oa..oe]),
            (CpuStorage::F64(y), CpuStorage::F64(o)) => add_all(&mut y[a..e], &o[oa..oe]),
            (CpuStorage::F16(y), CpuStorage::F16(o)) => add_all(&mut y[a..e], &o[oa..oe]),
            (CpuStorage::BF16(y), CpuStorage::BF16(o)) => add_all(&mut y[a..e], &o[oa..oe]),
            (y, o) => {
                candle_core::bail!("add in place: dtypes {:?} and {:?}", y.dtype(), o.dtype())
            }
        }
        Ok(())
    }
}

/// `y + o` (same shape) for a `y` nothing else shares: in place on the CPU, else `o + y`.
pub(crate) fn add_owned(y: Tensor, o: &Tensor) -> Result<Tensor> {
    if y.dims() != o.dims() {
        candle_core::bail!("add: shapes {:?} and {:?} differ", y.shape(), o.shape());
    }
    let fused = y.device().is_cpu()
        && y.dtype() == o.dtype()
        && matches!(
            y.dtype(),
            DType::F32 | DType::F64 | DType::F16 | DType::BF16
        )
        && y.is_contiguous()
        && o.is_contiguous()
        && !y.track_op();
    if fused {
        y.inplace_op2(o, &AddInPlace)?;
        return Ok(y);
    }
    o + y
}

/// `y + t` with `t` `[N, C]` broadcast over the trailing dims of `y` `[N, C, ...]` (a
/// time embedding over H, W), for a fresh `y`: in place where [`add_bias_owned`] can.
pub(crate) fn add_channels_owned(y: Tensor, t: &Tensor) -> Result<Tensor> {
    let dims = y.dims().to_vec();
    if dims.len() < 2 || t.dims() != &dims[..2] {
        candle_core::bail!(
            "add per channel: {:?} does not fit [N, C] of {dims:?}",
            t.shape()
        );
    }
    let nc = dims[0] * dims[1];
    let inner = y.elem_count() / nc.max(1);
    let flat = y.reshape((1, nc, inner))?;
    add_bias_owned(flat, &t.contiguous()?.reshape(nc)?, 1)?.reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_broadcast_add() {
        let dev = Device::Cpu;
        for (shape, dim) in [
            (vec![2usize, 3, 4, 5], 1usize),
            (vec![6, 7], 1),
            (vec![2, 3, 7], 2),
        ] {
            let y = Tensor::randn(0f32, 1.0, shape.clone(), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, shape[dim], &dev).unwrap();
            let mut bs = vec![1; shape.len()];
            bs[dim] = shape[dim];
            let want = y.broadcast_add(&b.reshape(bs).unwrap()).unwrap();
            let got = add_bias_owned(y.copy().unwrap(), &b, dim).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{shape:?} dim {dim}");
        }
    }
}
