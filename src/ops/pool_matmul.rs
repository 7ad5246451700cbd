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
use candle_core::{CpuStorage, DType, Device, Layout, Result, Storage, Tensor};

/// Rows (or columns) of the output per tile: large enough that re-packing the other operand
/// per tile costs under 1 % of the tile's multiply-adds.
const TILE: usize = 256;

/// `a @ b` on the worker pool for graph-free f32 / f64 CPU tensors of equal rank ≥ 2 whose
/// leading dims agree and fold to one batch stride, of at least [`MIN_PRODUCT`] multiply-adds
/// per item; `None` where it does not serve (another dtype or device, an operand that tracks
/// gradients, other layouts, smaller products: those stay on candle's matmul, so the tiny
/// models compute bit for bit as before).
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    scaled(a, b, MIN_PRODUCT, 1.0)
}

/// `scale · (a @ b)` as [`matmul`] serves it, for products of any size: the thin products of
/// a rank-r adapter beside a large layer, which candle runs on one thread after zeroing the
/// output.
pub(crate) fn matmul_any(a: &Tensor, b: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    scaled(a, b, 1, scale)
}

/// The operands' geometry as [`tiled`] takes it, where the pool serves the pair.
fn geometry(a: &Tensor, b: &Tensor, min_product: usize) -> Result<Option<(Dims, Vec<usize>)>> {
    if !graph_free_pair(a, b) {
        return Ok(None);
    }
    let rank = a.rank();
    let (m, k) = (a.dim(rank - 2)?, a.dim(rank - 1)?);
    let (kb, n) = (b.dim(rank - 2)?, b.dim(rank - 1)?);
    if k != kb || a.dims()[..rank - 2] != b.dims()[..rank - 2] || m * n * k < min_product {
        return Ok(None);
    }
    if operand(a.layout()).is_none() || operand(b.layout()).is_none() {
        return Ok(None);
    }
    let batch = a.dims()[..rank - 2].iter().product();
    let mut shape = a.dims()[..rank - 2].to_vec();
    shape.extend([m, n]);
    Ok(Some((Dims { m, n, k, batch }, shape)))
}

fn scaled(a: &Tensor, b: &Tensor, min_product: usize, scale: f64) -> Result<Option<Tensor>> {
    let Some((dims, shape)) = geometry(a, b, min_product)? else {
        return Ok(None);
    };
    let (ga, gb) = (a.storage_and_layout(), b.storage_and_layout());
    let (Some((oa, _)), Some((ob, _))) = (operand(ga.1), operand(gb.1)) else {
        return Ok(None);
    };
    let (Storage::Cpu(sa), Storage::Cpu(sb)) = (&*ga.0, &*gb.0) else {
        return Ok(None);
    };
    let out = match a.dtype() {
        DType::F32 => product::<f32>(dims, (sa, oa), (sb, ob), shape, scale)?,
        _ => product::<f64>(dims, (sa, oa), (sb, ob), shape, scale)?,
    };
    Ok(Some(out))
}

/// [`tiled`] on the storages' `T` slices, as a `shape` tensor.
fn product<T: Real>(
    dims: Dims,
    (sa, oa): (&CpuStorage, Operand),
    (sb, ob): (&CpuStorage, Operand),
    shape: Vec<usize>,
    scale: f64,
) -> Result<Tensor> {
    // SAFETY: `tiled` without a destination to add to writes every element before any read.
    let mut c = unsafe { output_buffer::<T>(dims.batch * dims.m * dims.n) };
    let (xa, xb) = (sa.as_slice::<T>()?, sb.as_slice::<T>()?);
    tiled(dims, (xa, oa), (xb, ob), &mut c, false, T::from_f64(scale))?;
    Tensor::from_vec(c, shape, &Device::Cpu)
}

/// `y + a @ b` for a contiguous `y` `[.., m, n]` that nothing else shares (a fresh product):
/// in place on the worker pool where it serves `a @ b` at any size, else `y + a @ b` on
/// candle (the same sums: each element's product is summed first, then added to `y`).
pub(crate) fn add_matmul_owned(y: Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let served = y.dtype() == a.dtype()
        && y.is_contiguous()
        && !y.track_op()
        && matches!(geometry(a, b, 1)?, Some((_, ref shape)) if shape.as_slice() == y.dims());
    if !served {
        return super::bias::add_owned(y, &super::dense::matmul(a, b)?);
    }
    y.inplace_op3(a, b, &AddProduct)?;
    Ok(y)
}

/// `y += a @ b` in place, for [`add_matmul_owned`].
struct AddProduct;

impl candle_core::InplaceOp3 for AddProduct {
    fn name(&self) -> &'static str {
        "lora-add-product"
    }
    fn cpu_fwd(
        &self,
        sy: &mut CpuStorage,
        ly: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<()> {
        let rank = la.dims().len();
        let (m, k, n) = (
            la.dims()[rank - 2],
            la.dims()[rank - 1],
            lb.dims()[rank - 1],
        );
        let batch = la.dims()[..rank - 2].iter().product();
        let (Some((oa, _)), Some((ob, _)), Some((y0, y1))) =
            (operand(la), operand(lb), ly.contiguous_offsets())
        else {
            candle_core::bail!("add product: unsupported operand layouts");
        };
        let dims = Dims { m, n, k, batch };
        if y1 - y0 != batch * m * n {
            candle_core::bail!("add product: output {:?} does not fit {m}x{n}", ly.dims());
        }
        match (sy, sa, sb) {
            (CpuStorage::F32(y), CpuStorage::F32(a), CpuStorage::F32(b)) => {
                tiled(dims, (a, oa), (b, ob), &mut y[y0..y1], true, 1.0)
            }
            (CpuStorage::F64(y), CpuStorage::F64(a), CpuStorage::F64(b)) => {
                tiled(dims, (a, oa), (b, ob), &mut y[y0..y1], true, 1.0)
            }
            _ => candle_core::bail!("add product: f32 or f64 operands of one dtype only"),
        }
    }
}

/// Sizes of one batched product: `[batch, m, k] @ [batch, k, n]`.
#[derive(Clone, Copy)]
struct Dims {
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
}

/// `c = scale · (a @ b)` (or `c += a @ b` with `acc`) for the batched product into `c`
/// `[batch, m, n]`, after checking that every operand element the tiles reach lies inside
/// its slice.
fn tiled<T: Real>(
    d: Dims,
    (xa, oa): (&[T], Operand),
    (xb, ob): (&[T], Operand),
    c: &mut [T],
    acc: bool,
    scale: T,
) -> Result<()> {
    let Dims { m, n, k, batch } = d;
    let reach = |o: Operand, r: usize, c: usize| {
        let (rs, cs) = o.strides();
        o.start + (batch - 1) * o.batch_stride + (r - 1) * rs + (c - 1) * cs + 1
    };
    if batch == 0 || m == 0 || n == 0 || k == 0 {
        candle_core::bail!("pool matmul: empty product");
    }
    if reach(oa, m, k) > xa.len() || reach(ob, k, n) > xb.len() || c.len() != batch * m * n {
        candle_core::bail!("pool matmul: an operand's layout reaches past its storage");
    }
    // Tiles along the longer output side.
    let by_rows = m >= n;
    let side = if by_rows { m } else { n };
    let tiles = side.div_ceil(TILE);
    // The tiles below cover every output element once, each written by gemm (with `read_dst`
    // only when adding to it) before anything reads the buffer.
    let cp = SharedMut::new(c);
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
                acc,
                xa.as_ptr().add(a0),
                acs as isize,
                ars as isize,
                xb.as_ptr().add(b0),
                bcs as isize,
                brs as isize,
                T::ONE,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    });
    Ok(())
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
        // Thin products at any size, scaled, and added in place to a fresh output.
        let (x, d) = (
            Tensor::randn(0f64, 1.0, (300, 7), &dev)?,
            Tensor::randn(0f64, 1.0, (5, 7), &dev)?,
        );
        let got = matmul_any(&x, &d.t()?, 0.5)?.expect("served at any size");
        let want = (x.matmul(&d.t()?)? * 0.5)?;
        let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(err < 1e-12, "thin scaled product: max err {err}");
        let y = Tensor::randn(0f64, 1.0, (300, 5), &dev)?;
        let want = (&y + x.matmul(&d.t()?)?)?;
        let got = add_matmul_owned(y.copy()?, &x, &d.t()?)?;
        let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(err < 1e-12, "added product: max err {err}");
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
