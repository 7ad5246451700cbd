//! CPU helpers for the fused kernels: a float trait for f32 / f64 and row-parallel loops
//! on candle's own persistent worker pool (`candle_core::utils::barrier_pool`).

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor, WithDType};
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
    /// e^x (f32: [`exp_f32`]).
    fn exp(self) -> Self;
    /// The error function (f32: [`erf_f32`], f64: candle's implementation).
    fn erf(self) -> Self;
    /// The larger of two values.
    fn maxv(self, other: Self) -> Self;
    /// `row[i] = e^(row[i] − shift)` in place (f32 on AVX2 + FMA: [`exp_f32_fused`]).
    fn exp_sub_inplace(row: &mut [Self], shift: Self) {
        map_inplace(row, |x| (x - shift).exp())
    }
    /// [`Real::exp_sub_inplace`], returning the row's new sum (in f64).
    fn exp_sub_sum(row: &mut [Self], shift: Self) -> f64 {
        Self::exp_sub_inplace(row, shift);
        reduce1(row, |x| x.to_f64())
    }
    /// The largest element of a non-empty row ([`max_of`]; f32 on AVX-512: 16 lanes).
    fn row_max(row: &[Self]) -> Self {
        max_of(row)
    }
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        erf_f32(self)
    }
    fn maxv(self, other: Self) -> Self {
        f32::max(self, other)
    }
    fn exp_sub_inplace(row: &mut [f32], shift: f32) {
        #[cfg(target_arch = "x86_64")]
        if super::simd512::available() {
            // SAFETY: the CPU has the features the AVX-512 pass is compiled for.
            unsafe { super::simd512::exp_sub::<false>(row, shift) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features exp_sub_fma is compiled for.
            return unsafe { exp_sub_fma(row, shift) };
        }
        map_inplace(row, |x| exp_f32(x - shift))
    }
    fn exp_sub_sum(row: &mut [f32], shift: f32) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if super::simd512::available() {
            // SAFETY: as in exp_sub_inplace.
            return unsafe { super::simd512::exp_sub::<true>(row, shift) };
        }
        Self::exp_sub_inplace(row, shift);
        reduce1(row, |x| x.to_f64())
    }
    fn row_max(row: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if super::simd512::available() {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { super::simd512::max(row) };
        }
        max_of(row)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_fma(row: &mut [f32], shift: f32) {
    for v in row {
        *v = exp_f32_fused(*v - shift);
    }
}

/// [`exp_f32`] with each product-and-sum fused (`mul_add`, one rounding each): 1.5x its
/// throughput in the attention kernels' exp passes. Only called where FMA instructions
/// exist (elsewhere `mul_add` is a slow library call); relative error about 2e-7 too.
#[inline(always)]
pub(crate) fn exp_f32_fused(x: f32) -> f32 {
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.376_26;
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI);
    let n = xc.mul_add(std::f32::consts::LOG2_E, MAGIC) - MAGIC;
    let r = n.mul_add(2.121_944_4e-4, n.mul_add(-0.693_359_4, xc));
    let p = 1.987_569_1e-4f32
        .mul_add(r, 1.398_199_9e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 0.166_666_65)
        .mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r) + 1.0;
    scaled(x, n, y)
}

/// e^x for f32, branch-free so element loops vectorise (`f32::exp` is a libm call per
/// element): Cephes' `expf` (x = n·ln2 + r, |r| ≤ ln2/2, degree-6 polynomial, scaled by
/// 2^n through the exponent bits), relative error about 2e-7. Underflows to 0 below
/// -87.33 (where f32 turns subnormal), overflows to infinity above 88.376 (e^x > 2.4e38); NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.376_26; // keeps n + 127 ≤ 254
    let xc = x.clamp(LO, HI);
    // Round to nearest through the float mantissa (no libm `round` call); |n| < 2^22.
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    let n = (xc * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = xc - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    scaled(x, n, y)
}

/// `y · 2^n` for the exp of `x` (n + 127 in [1, 254] sits in the low mantissa bits of
/// n + 127 + 2^23), 0 below the f32 range and infinity above it.
#[inline(always)]
fn scaled(x: f32, n: f32, y: f32) -> f32 {
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.376_26;
    let y = y * f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// erf for f32 as PyTorch's vectorised CPU kernels compute it (Abramowitz & Stegun 7.1.26,
/// absolute error below 6e-7 in f32 arithmetic, measured in the tests): branch-free, so the
/// element loops vectorise, unlike `libm::erff`, which cost 8x PyTorch's time on GELU.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let r = 1.0 - poly * exp_f32(-a * a);
    r.copysign(x)
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
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

/// Runs `f` on the elements of the CPU tensors `ts` (made contiguous, no copy when they
/// are); `op` names the caller in errors.
pub(crate) fn with_slices<T: WithDType, R>(
    op: &str,
    ts: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> R,
) -> Result<R> {
    let cs = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = cs.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (g, l) in &guards {
        let Storage::Cpu(s) = &**g else {
            candle_core::bail!("{op}: CPU tensors only");
        };
        slices.push(contiguous_slice::<T>(s, l, op)?);
    }
    Ok(f(&slices))
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

/// A buffer of `len` elements left unset, for kernel outputs and scratch that the kernel
/// writes in full before reading (zeroing them first is a whole single-threaded pass over
/// memory: tens of MB per 3×3 conv at 512 px).
///
/// # Safety
/// Every element must be written before it is read; the buffer's spare padding, if any,
/// must never be read.
// Left unset on purpose, as candle's own `alloc_uninit` does for its CPU outputs.
#[allow(clippy::uninit_vec)]
pub(crate) unsafe fn output_buffer<T: Real>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: `T` is a plain float (Copy, no Drop, every bit pattern a value); the caller
    // writes each element before any read.
    unsafe { v.set_len(len) };
    v
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

/// [`par_for`] with per-worker scratch: `init` runs once per worker's range of items, and
/// `f(&mut scratch, i)` for each item in it (buffers are allocated once, not per item).
pub(crate) fn par_for_scratch<S>(
    n_items: usize,
    cost: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, usize) + Sync,
) {
    let run = |range: std::ops::Range<usize>| {
        let mut s = init();
        range.for_each(|i| f(&mut s, i));
    };
    if n_items <= 1 || n_items.saturating_mul(cost) < PAR_MIN_ELEMS {
        return run(0..n_items);
    }
    candle_core::utils::barrier_pool().execute_chunked(n_items, run);
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

/// `dst[i] = f(src[i])`; on x86-64 CPUs with AVX2 and FMA the loop is compiled for them
/// (selected at run time), so branch-free element functions (e.g. [`exp_f32`]) run 8 lanes
/// wide instead of SSE2's 4. Rust never contracts `a * b + c` into an FMA, so both paths
/// give identical results.
#[inline(always)]
pub(crate) fn map_into<T: Copy, F: Fn(T) -> T>(dst: &mut [T], src: &[T], f: F) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features map_avx2 is compiled for.
        return unsafe { map_avx2(dst, src, f) };
    }
    map_plain(dst, src, f)
}

#[inline(always)]
fn map_plain<T: Copy, F: Fn(T) -> T>(dst: &mut [T], src: &[T], f: F) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f(s);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn map_avx2<T: Copy, F: Fn(T) -> T>(dst: &mut [T], src: &[T], f: F) {
    map_plain(dst, src, f)
}

/// Runs `f` compiled for AVX-512F, else AVX2, with FMA where the CPU has them (selected at
/// run time, like [`map_into`]), so the element loops inlined into it vectorise 16 or 8
/// lanes wide; the results are identical either way.
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if super::simd512::available() {
        // SAFETY: the CPU supports the features simd_avx512 is compiled for.
        return unsafe { simd_avx512(f) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features simd_avx2 is compiled for.
        return unsafe { simd_avx2(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn simd_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn simd_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `d[i] = f(d[i])`, dispatched like [`map_into`].
#[inline(always)]
pub(crate) fn map_inplace<T: Copy, F: Fn(T) -> T>(d: &mut [T], f: F) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features map_inplace_avx2 is compiled for.
        return unsafe { map_inplace_avx2(d, f) };
    }
    map_inplace_plain(d, f)
}

#[inline(always)]
fn map_inplace_plain<T: Copy, F: Fn(T) -> T>(d: &mut [T], f: F) {
    for v in d.iter_mut() {
        *v = f(*v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn map_inplace_avx2<T: Copy, F: Fn(T) -> T>(d: &mut [T], f: F) {
    map_inplace_plain(d, f)
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

/// `dst[m×n] = scale · lhs[m×k] · rhs[k×n]` (`acc`: added to `dst`), every matrix given by
/// its row and column strides, on this thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: 'static + Copy>(
    (m, n, k): (usize, usize, usize),
    dst: (&mut [T], isize, isize),
    lhs: (&[T], isize, isize),
    rhs: (&[T], isize, isize),
    scale: T,
    acc: bool,
    one: T,
) {
    // SAFETY: the callers pass slices covering every element the strides reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0.as_mut_ptr(),
            dst.2,
            dst.1,
            acc,
            lhs.0.as_ptr(),
            lhs.2,
            lhs.1,
            rhs.0.as_ptr(),
            rhs.2,
            rhs.1,
            one,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_and_erf_match_libm() {
        let (mut e_rel, mut erf_abs) = (0f64, 0f64);
        let mut x = -90f32;
        while x < 88.37 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            if want > f32::MIN_POSITIVE as f64 && want < f32::MAX as f64 {
                e_rel = e_rel.max(((got - want) / want).abs());
            }
            if (-6.0..6.0).contains(&x) {
                let we = candle_core::cpu::erf::erf_f64(x as f64);
                erf_abs = erf_abs.max((erf_f32(x) as f64 - we).abs());
            }
            x += 0.000_37;
        }
        eprintln!("exp_f32 max rel err {e_rel:.2e}, erf_f32 max abs err {erf_abs:.2e}");
        assert!(e_rel < 3e-7, "exp rel err {e_rel}");
        assert!(erf_abs < 6e-7, "erf abs err {erf_abs}");
        for f in [exp_f32_fused] {
            assert_eq!(f(-100.0), 0.0);
            assert_eq!(f(100.0), f32::INFINITY);
            assert!(f(f32::NAN).is_nan());
            assert_eq!(f(0.0), 1.0);
            let mut worst = 0f64;
            for i in 0..200_001 {
                let x = (-87.0 + 175.0 * i as f64 / 200_000.0) as f32;
                let want = (x as f64).exp();
                worst = worst.max((f(x) as f64 - want).abs() / want);
            }
            assert!(worst < 4e-7, "fused exp relative error {worst:e}");
        }
        let mut row = vec![-3.0f32, 0.5, 2.0, -90.0];
        f32::exp_sub_inplace(&mut row, 0.5);
        for (got, x) in row.iter().zip([-3.0f64, 0.5, 2.0, -90.0]) {
            let want = (x - 0.5).exp();
            assert!(
                (*got as f64 - want).abs() <= 4e-7 * want + 1e-30,
                "{got} vs {want}"
            );
        }
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
