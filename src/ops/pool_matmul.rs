//! Large graph-free f32 / f64 CPU products on the crate's worker pool: the output is cut into
//! tiles of whole rows (or columns), each computed by the `gemm` crate on one worker, into a
//! buffer that is not zeroed first.
//!
//! candle's own CPU matmul runs the `gemm` crate on rayon's pool, beside candle's barrier pool
//! that every fused kernel uses: each pool's idle threads spin for a while after their work,
//! on the cores the other pool's threads need, and its output buffer is zeroed first in one
//! single-threaded pass. Here one pool serves both. Tiles are cut by the shape alone, never
//! by the thread count, so results are the same on every machine.

use super::blas::{graph_free_pair, operand, Operand, MIN_PRODUCT};
use super::par::{output_buffer, par_for, Real, SharedMut};
use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};

/// Rows (or columns) of the output per tile: large enough that re-packing the other operand
/// per tile costs under 1 % of the tile's multiply-adds.
const TILE: usize = 256;

/// `a @ b` on the worker pool for graph-free f32 / f64 CPU tensors of equal rank ≥ 2 whose
/// leading dims agree and fold to one batch stride, of at least [`MIN_PRODUCT`] multiply-adds
/// per item; `None` where it does not serve (another dtype or device, an operand that tracks
/// gradients, other layouts, smaller products: those stay on candle's matmul, so the tiny
/// models compute bit for bit as before).
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    if !graph_free_pair(a, b) {
        return Ok(None);
    }
    let rank = a.rank();
    let (m, k) = (a.dim(rank - 2)?, a.dim(rank - 1)?);
    let (kb, n) = (b.dim(rank - 2)?, b.dim(rank - 1)?);
    if k != kb || a.dims()[..rank - 2] != b.dims()[..rank - 2] || m * n * k < MIN_PRODUCT {
        return Ok(None);
    }
    let (ga, gb) = (a.storage_and_layout(), b.storage_and_layout());
    let (Some((oa, batch)), Some((ob, _))) = (operand(ga.1), operand(gb.1)) else {
        return Ok(None);
    };
    let mut shape = a.dims()[..rank - 2].to_vec();
    shape.extend([m, n]);
    let dims = Dims { m, n, k, batch };
    let (Storage::Cpu(sa), Storage::Cpu(sb)) = (&*ga.0, &*gb.0) else {
        return Ok(None);
    };
    let out = match a.dtype() {
        DType::F32 => product::<f32>(dims, (sa, oa), (sb, ob), shape)?,
        _ => product::<f64>(dims, (sa, oa), (sb, ob), shape)?,
    };
    Ok(Some(out))
}

/// [`tiled`] on the storages' `T` slices, as a `shape` tensor.
fn product<T: Real>(
    dims: Dims,
    (sa, oa): (&CpuStorage, Operand),
    (sb, ob): (&CpuStorage, Operand),
    shape: Vec<usize>,
) -> Result<Tensor> {
    let c = tiled(dims, (sa.as_slice::<T>()?, oa), (sb.as_slice::<T>()?, ob))?;
    Tensor::from_vec(c, shape, &Device::Cpu)
}

/// Sizes of one batched product: `[batch, m, k] @ [batch, k, n]`.
#[derive(Clone, Copy)]
struct Dims {
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
}

/// The batched product into a fresh `[batch, m, n]` buffer, after checking that every
/// operand element the tiles reach lies inside its slice.
fn tiled<T: Real>(d: Dims, (xa, oa): (&[T], Operand), (xb, ob): (&[T], Operand)) -> Result<Vec<T>> {
    let Dims { m, n, k, batch } = d;
    let reach = |o: Operand, r: usize, c: usize| {
        let (rs, cs) = o.strides();
        o.start + (batch - 1) * o.batch_stride + (r - 1) * rs + (c - 1) * cs + 1
    };
    if batch == 0 || m == 0 || n == 0 || k == 0 {
        candle_core::bail!("pool matmul: empty product");
    }
    if reach(oa, m, k) > xa.len() || reach(ob, k, n) > xb.len() {
        candle_core::bail!("pool matmul: an operand's layout reaches past its storage");
    }
    // Tiles along the longer output side.
    let by_rows = m >= n;
    let side = if by_rows { m } else { n };
    let tiles = side.div_ceil(TILE);
    // SAFETY: the tiles below cover every output element once, each written by gemm with
    // `read_dst` off before anything reads the buffer.
    let mut c = unsafe { output_buffer::<T>(batch * m * n) };
    let cp = SharedMut::new(&mut c);
    let ((ars, acs), (brs, bcs)) = (oa.strides(), ob.strides());
    par_for(batch * tiles, TILE * n.max(m) * k, |task| {
        let (item, t) = (task / tiles, task % tiles);
        let (s0, s1) = (t * TILE, ((t + 1) * TILE).min(side));
        let (r0, rows, c0, cols) = match by_rows {
            true => (s0, s1 - s0, 0, n),
            false => (0, m, s0, s1 - s0),
        };
        let a0 = oa.start + item * oa.batch_stride + r0 * ars;
        let b0 = ob.start + item * ob.batch_stride + c0 * bcs;
        let c_off = item * m * n + r0 * n + c0;
        // SAFETY: the operand offsets were checked against their slices above; this task's
        // output elements (rows r0.., columns c0.. of item `item`) belong to it alone, and
        // `slice` only lends the start pointer of that (strided) block.
        unsafe {
            let dst = cp.slice(c_off, 0).as_mut_ptr();
            gemm::gemm(
                rows,
                cols,
                k,
                dst,
                1,
                n as isize,
                false,
                xa.as_ptr().add(a0),
                acs as isize,
                ars as isize,
                xb.as_ptr().add(b0),
                bcs as isize,
                brs as isize,
                T::ZERO,
                T::ONE,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    });
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both tilings (by rows, by columns), transposed and batched operands against candle's
    /// matmul; and the gates that leave products to candle.
    #[test]
    fn tiles_match_candle_matmul() -> Result<()> {
        let dev = Device::Cpu;
        for (m, k, n) in [(600, 96, 300), (300, 200, 700), (257, 256, 257)] {
            let a = Tensor::randn(0f32, 1.0, (2, m, k), &dev)?;
            let bt = Tensor::randn(0f32, 1.0, (2, n, k), &dev)?;
            let b = bt.transpose(1, 2)?;
            let got = matmul(&a, &b)?.expect("a large graph-free product is served");
            let want = a.matmul(&b.contiguous()?)?;
            assert_eq!(got.dims(), want.dims());
            let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err <= 1e-5 * scale, "{m}x{k}x{n}: max err {err} of {scale}");
            // A broadcast right operand (stride 0 over the batch) and f64.
            let w = Tensor::randn(0f64, 1.0, (k, n), &dev)?;
            let a64 = a.to_dtype(DType::F64)?;
            let wb = w.unsqueeze(0)?.broadcast_as((2, k, n))?;
            let got = matmul(&a64, &wb)?.expect("broadcast operand is served");
            let want = a64.broadcast_matmul(&w)?;
            let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(err < 1e-10, "f64 {m}x{k}x{n}: max err {err}");
        }
        let small = Tensor::randn(0f32, 1.0, (64, 64), &dev)?;
        assert!(
            matmul(&small, &small)?.is_none(),
            "small products stay on candle"
        );
        let var = candle_core::Var::randn(0f32, 1.0, (600, 300), &dev)?;
        let big = Tensor::randn(0f32, 1.0, (300, 600), &dev)?;
        assert!(
            matmul(var.as_tensor(), &big)?.is_none(),
            "tracked operands stay on candle"
        );
        Ok(())
    }
}
