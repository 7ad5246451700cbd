//! CPU helpers for the fused kernels: a float trait for f32 / f64 and row-parallel loops
//! on candle's own persistent worker pool (`candle_core::utils::barrier_pool`).

use candle_core::{CpuStorage, Layout, Result, WithDType};
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub};

/// The element types the fused CPU kernels are written for (f32 and f64).
pub(crate) trait Real:
    WithDType
    + Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + MulAssign
    + Default
{
    const ZERO: Self;
    const ONE: Self;
    /// e^x.
    fn exp(self) -> Self;
    /// The error function (candle's implementation).
    fn erf(self) -> Self;
    /// The larger of two values.
    fn maxv(self, other: Self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f32(self)
    }
    fn maxv(self, other: Self) -> Self {
        f32::max(self, other)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }
    fn maxv(self, other: Self) -> Self {
        f64::max(self, other)
    }
}

/// The contiguous slice a layout designates, or an error naming the op.
pub(crate) fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: the fused CPU kernel needs a contiguous input"),
    }
}

/// Below this many elements the kernels run on the calling thread only.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// A raw pointer that may be shared between the workers of one parallel loop.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(*mut T);

// SAFETY: the loops below hand every worker disjoint index ranges, so no two threads
// ever touch the same element through this pointer.
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// Wraps a mutable slice.
    pub(crate) fn new(s: &mut [T]) -> Self {
        Self(s.as_mut_ptr())
    }

    /// The sub-slice `[start, start + len)`.
    ///
    /// # Safety
    /// The range must lie in the wrapped slice and no other live slice may overlap it.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// Runs `f(i)` for every `i < n_items`, in parallel when `n_items * cost` is large.
///
/// `cost` is the number of elements one item touches; it only decides whether the pool
/// is worth waking up.
pub(crate) fn par_for(n_items: usize, cost: usize, f: impl Fn(usize) + Sync) {
    if n_items <= 1 || n_items.saturating_mul(cost) < PAR_MIN_ELEMS {
        (0..n_items).for_each(f);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(n_items, |range| range.for_each(&f));
}

/// Splits `dst` into rows of `row` elements and runs `f(row_index, row)` on each.
pub(crate) fn par_rows<T: Send>(dst: &mut [T], row: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if row == 0 {
        return;
    }
    let n = dst.len() / row;
    let ptr = SharedMut::new(dst);
    par_for(n, row, |i| {
        // SAFETY: row i covers [i*row, (i+1)*row), disjoint for distinct i, inside dst.
        let r = unsafe { ptr.slice(i * row, row) };
        f(i, r)
    });
}

/// Splits `n_rows` rows of `row_len` elements into blocks for loops that also reduce (one
/// partial result per block, summed afterwards in block order). The split depends on the
/// shape only, never on the thread count, so results are the same on every machine.
pub(crate) fn row_blocks(n_rows: usize, row_len: usize) -> Vec<std::ops::Range<usize>> {
    let per = (8192 / row_len.max(1)).max(1);
    (0..n_rows)
        .step_by(per)
        .map(|s| s..(s + per).min(n_rows))
        .collect()
}

/// Splits `dst` into chunks of `chunk` elements (the last one may be shorter) and runs
/// `f(offset_of_chunk, chunk)` on each, in parallel for large buffers.
pub(crate) fn par_chunks<T: Send>(dst: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let len = dst.len();
    let chunk = chunk.max(1);
    let n = len.div_ceil(chunk);
    let ptr = SharedMut::new(dst);
    par_for(n, chunk, |i| {
        let start = i * chunk;
        let l = chunk.min(len - start);
        // SAFETY: chunk i covers [start, start + l), disjoint for distinct i, inside dst.
        f(start, unsafe { ptr.slice(start, l) })
    });
}

/// Lanes of the reductions below: independent partial sums let the compiler vectorise
/// (a single float accumulator is a serial dependency chain it may not reorder).
const LANES: usize = 8;

/// `Σ f(a_i, b_i)` over two equally long slices, accumulated in `Acc` with [`LANES`] lanes.
#[inline(always)]
pub(crate) fn reduce2<T: Copy, Acc: Copy + AddAssign + Default>(
    a: &[T],
    b: &[T],
    f: impl Fn(T, T) -> Acc,
) -> Acc {
    let mut acc = [Acc::default(); LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += f(x[l], y[l]);
        }
    }
    let mut total = Acc::default();
    for (&x, &y) in ar.iter().zip(br) {
        total += f(x, y);
    }
    for v in acc {
        total += v;
    }
    total
}

/// `Σ f(a_i)`, accumulated in `Acc` with [`LANES`] lanes.
#[inline(always)]
pub(crate) fn reduce1<T: Copy, Acc: Copy + AddAssign + Default>(
    a: &[T],
    f: impl Fn(T) -> Acc,
) -> Acc {
    reduce2(a, a, |x, _| f(x))
}

/// The largest element of a non-empty slice, with [`LANES`] lanes.
#[inline(always)]
pub(crate) fn max_of<T: Real>(a: &[T]) -> T {
    let mut m = [a[0]; LANES];
    let chunks = a.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            m[l] = m[l].maxv(c[l]);
        }
    }
    let mut out = rest.iter().fold(m[0], |x, &v| x.maxv(v));
    for v in m {
        out = out.maxv(v);
    }
    out
}

/// `K` sums `Σ_i f(i)[k]` over `i < n` in f64, with [`LANES`] lanes.
#[inline(always)]
pub(crate) fn reduce_idx<const K: usize>(n: usize, f: impl Fn(usize) -> [f64; K]) -> [f64; K] {
    let mut acc = [[0f64; K]; LANES];
    let full = n / LANES * LANES;
    for base in (0..full).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            let v = f(base + l);
            for k in 0..K {
                a[k] += v[k];
            }
        }
    }
    let mut total = [0f64; K];
    for i in full..n {
        let v = f(i);
        for k in 0..K {
            total[k] += v[k];
        }
    }
    for a in acc {
        for k in 0..K {
            total[k] += a[k];
        }
    }
    total
}

/// Mean and `1 / sqrt(var + eps)` of a slice, two-pass in f64.
pub(crate) fn mean_rstd<T: Real>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = reduce1(x, |v| v.to_f64()) / n;
    let var = reduce1(x, |v| {
        let d = v.to_f64() - mean;
        d * d
    }) / n;
    (mean, 1.0 / (var + eps).sqrt())
}
