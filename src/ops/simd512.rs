//! AVX-512 forms of the softmax passes over f32 rows (row maximum, `exp(x − shift)` in
//! place, with or without the row sum), 16 lanes wide with masked tails. The exp is
//! [`exp_f32_fused`](super::par::exp_f32_fused) lane for lane, so every path gives the same
//! values; sums are accumulated in f64. Chosen at run time where the CPU has AVX-512F
//! ([`available`]); in the fused attention forward these passes took more time than the
//! product `q kᵀ` before them. Compiled on x86-64 only.

use std::arch::x86_64::*;

/// Whether this CPU runs the kernels below (AVX-512F with FMA).
#[inline(always)]
pub(crate) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
}

/// `exp` of 16 lanes: the operations of `exp_f32_fused`, in the same order.
#[target_feature(enable = "avx512f,fma")]
#[inline]
fn exp16(x: __m512) -> __m512 {
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.376_26;
    const MAGIC: f32 = 12_582_912.0;
    let s = _mm512_set1_ps;
    // max(LO, x) and min(HI, ·) keep a NaN x (the second operand is returned on NaN).
    let xc = _mm512_min_ps(s(HI), _mm512_max_ps(s(LO), x));
    let n = _mm512_sub_ps(
        _mm512_fmadd_ps(xc, s(std::f32::consts::LOG2_E), s(MAGIC)),
        s(MAGIC),
    );
    let r = _mm512_fmadd_ps(
        n,
        s(2.121_944_4e-4),
        _mm512_fmadd_ps(n, s(-0.693_359_4), xc),
    );
    let mut p = _mm512_fmadd_ps(s(1.987_569_1e-4), r, s(1.398_199_9e-3));
    p = _mm512_fmadd_ps(p, r, s(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, s(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, s(0.166_666_65));
    p = _mm512_fmadd_ps(p, r, s(0.5));
    let y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), s(1.0));
    let bits = _mm512_slli_epi32::<23>(_mm512_castps_si512(_mm512_add_ps(
        n,
        s(127.0 + 8_388_608.0),
    )));
    let y = _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
    let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, s(LO));
    let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, s(HI));
    let y = _mm512_mask_blend_ps(under, y, _mm512_setzero_ps());
    _mm512_mask_blend_ps(over, y, s(f32::INFINITY))
}

/// The mask of the first `n` (< 16) lanes.
#[inline(always)]
fn tail_mask(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

/// Adds the 16 lanes of `v` to two f64 accumulators of 8 lanes.
#[target_feature(enable = "avx512f")]
#[inline]
fn add_f64(acc: &mut [__m512d; 2], v: __m512) {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    acc[0] = _mm512_add_pd(acc[0], _mm512_cvtps_pd(lo));
    acc[1] = _mm512_add_pd(acc[1], _mm512_cvtps_pd(hi));
}

/// `row[i] = exp(row[i] − shift)`; with `SUM`, returns `Σ row[i]` (f64), else 0.
///
/// # Safety
/// The CPU must have AVX-512F and FMA ([`available`]).
#[target_feature(enable = "avx512f,fma")]
pub(crate) unsafe fn exp_sub<const SUM: bool>(row: &mut [f32], shift: f32) -> f64 {
    let sh = _mm512_set1_ps(shift);
    let mut acc = [_mm512_setzero_pd(); 2];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        // SAFETY: `c` holds 16 f32.
        let e = unsafe { exp16(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), sh)) };
        unsafe { _mm512_storeu_ps(c.as_mut_ptr(), e) };
        if SUM {
            add_f64(&mut acc, e);
        }
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let m = tail_mask(rest.len());
        // SAFETY: the masked lanes lie inside `rest`; the others are neither read nor written.
        let x = unsafe { _mm512_maskz_loadu_ps(m, rest.as_ptr()) };
        let e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(x, sh)));
        unsafe { _mm512_mask_storeu_ps(rest.as_mut_ptr(), m, e) };
        if SUM {
            add_f64(&mut acc, e);
        }
    }
    if SUM {
        _mm512_reduce_add_pd(_mm512_add_pd(acc[0], acc[1]))
    } else {
        0.0
    }
}

/// The largest element of a non-empty row.
///
/// # Safety
/// The CPU must have AVX-512F ([`available`]).
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn max(row: &[f32]) -> f32 {
    let mut m = _mm512_set1_ps(row[0]);
    let chunks = row.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        // SAFETY: `c` holds 16 f32.
        m = _mm512_max_ps(m, unsafe { _mm512_loadu_ps(c.as_ptr()) });
    }
    if !rest.is_empty() {
        // SAFETY: only the lanes inside `rest` are read; the others keep `m`.
        m = _mm512_mask_max_ps(m, tail_mask(rest.len()), m, unsafe {
            _mm512_maskz_loadu_ps(tail_mask(rest.len()), rest.as_ptr())
        });
    }
    _mm512_reduce_max_ps(m)
}

#[cfg(test)]
mod tests {
    use super::super::par::exp_f32_fused;

    #[test]
    fn avx512_passes_equal_the_scalar_ones() {
        if !super::available() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        for n in [1usize, 15, 16, 17, 40, 77, 160, 4096 + 5] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.17)
                .chain([f32::NAN, -1e30, 1e30].into_iter().filter(|_| n == 77))
                .collect();
            let shift = 3.25f32;
            let want: Vec<f32> = x.iter().map(|&v| exp_f32_fused(v - shift)).collect();
            let (mut a, mut b) = (x.clone(), x.clone());
            // SAFETY: available() said the CPU has the features.
            let sum = unsafe { super::exp_sub::<true>(&mut a, shift) };
            unsafe { super::exp_sub::<false>(&mut b, shift) };
            for ((&g, &h), &w) in a.iter().zip(&b).zip(&want) {
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "{g} vs {w}"
                );
                assert!(h.to_bits() == w.to_bits() || (h.is_nan() && w.is_nan()));
            }
            let ws: f64 = want.iter().map(|&v| v as f64).sum();
            assert!(
                (sum - ws).abs() <= 1e-12 * ws.abs() || (sum.is_nan() && ws.is_nan()),
                "n {n}: sum {sum} vs {ws}"
            );
            let finite: Vec<f32> = x.iter().copied().filter(|v| !v.is_nan()).collect();
            let wm = finite.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            // SAFETY: as above.
            assert_eq!(unsafe { super::max(&finite) }, wm, "n {n}");
        }
    }
}
