//! Our f64 linear algebra (src/lora/svd.rs) against matrices with known factorizations.

use lora_diffusion::lora::svd::{
    qr_thin, randomized_svd, svd, svd_of_product, Mat, RandomizedOpts,
};
use lora_diffusion::rng::Rng;

fn max_abs_diff(a: &Mat, b: &Mat) -> f64 {
    assert_eq!((a.rows, a.cols), (b.rows, b.cols));
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Max |QᵀQ − I| over the columns that are not zero.
fn orthonormality_error(q: &Mat) -> f64 {
    let g = q.t().matmul(q).unwrap();
    let mut worst: f64 = 0.0;
    for i in 0..g.rows {
        for j in 0..g.cols {
            let want = if i == j { 1.0 } else { 0.0 };
            worst = worst.max((g.at(i, j) - want).abs());
        }
    }
    worst
}

/// A random m×n matrix with orthonormal columns.
fn random_orthonormal(m: usize, n: usize, rng: &mut Rng) -> Mat {
    qr_thin(&Mat::randn(m, n, rng)).0
}

/// U·diag(s)·Vᵀ with random orthonormal U, V: a matrix whose singular values are `s`.
fn with_spectrum(m: usize, n: usize, s: &[f64], rng: &mut Rng) -> Mat {
    let k = s.len();
    let mut u = random_orthonormal(m, k, rng);
    let v = random_orthonormal(n, k, rng);
    for row in u.data.chunks_exact_mut(k) {
        row.iter_mut().zip(s).for_each(|(x, s)| *x *= s);
    }
    u.matmul(&v.t()).unwrap()
}

#[test]
fn svd_of_a_known_2x2() {
    // AᵀA = [[25, 20], [20, 25]] has eigenvalues 45 and 5.
    let a = Mat::from_vec(2, 2, vec![3.0, 0.0, 4.0, 5.0]).unwrap();
    let s = svd(&a);
    let want = [45f64.sqrt(), 5f64.sqrt()];
    eprintln!("singular values {:?}, expected {:?}", s.s, want);
    for (g, w) in s.s.iter().zip(want) {
        assert!((g - w).abs() < 1e-14, "{g} vs {w}");
    }
    assert!(max_abs_diff(&s.reconstruct().unwrap(), &a) < 1e-14);
}

#[test]
fn svd_of_diagonal_and_rank_deficient_matrices() {
    // A permuted diagonal: singular values are the absolute entries, sorted.
    let a = Mat::from_vec(3, 3, vec![0.0, 0.0, -2.0, 7.0, 0.0, 0.0, 0.0, 0.5, 0.0]).unwrap();
    let s = svd(&a);
    assert_eq!(s.s, vec![7.0, 2.0, 0.5]);
    assert!(max_abs_diff(&s.reconstruct().unwrap(), &a) < 1e-15);

    // Rank 1 (outer product): one non-zero value = |x|·|y|.
    let x = [1.0, 2.0, 2.0, 0.0];
    let y = [3.0, 4.0, 0.0];
    let data: Vec<f64> = x
        .iter()
        .flat_map(|a| y.iter().map(move |b| a * b))
        .collect();
    let a = Mat::from_vec(4, 3, data).unwrap();
    let s = svd(&a);
    eprintln!("rank-1 singular values {:?}", s.s);
    assert!((s.s[0] - 15.0).abs() < 1e-13);
    assert!(s.s[1] < 1e-13 && s.s[2] < 1e-13);
    assert!(max_abs_diff(&s.reconstruct().unwrap(), &a) < 1e-13);
}

#[test]
fn svd_recovers_a_prescribed_spectrum_tall_and_wide() {
    let mut rng = Rng::new(7);
    let spectrum: Vec<f64> = (0..12).map(|i| 10f64.powf(-(i as f64) / 3.0)).collect();
    for (m, n) in [(40, 12), (12, 40), (25, 25)] {
        let k = spectrum.len().min(m).min(n);
        let a = with_spectrum(m, n, &spectrum[..k], &mut rng);
        let s = svd(&a);
        let err =
            s.s.iter()
                .zip(&spectrum)
                .map(|(g, w)| (g - w).abs())
                .fold(0.0, f64::max);
        let recon = max_abs_diff(&s.reconstruct().unwrap(), &a);
        let (ou, ov) = (orthonormality_error(&s.u), orthonormality_error(&s.v));
        eprintln!("{m}x{n}: max |σ − σ_true| {err:.2e}, reconstruction {recon:.2e}, UᵀU−I {ou:.2e}, VᵀV−I {ov:.2e}");
        assert!(err < 1e-13, "{m}x{n}: {err}");
        assert!(recon < 1e-13);
        assert!(ou < 1e-12 && ov < 1e-12);
        assert!(s.s.windows(2).all(|w| w[0] >= w[1]), "not descending");
    }
}

#[test]
fn qr_thin_of_tall_and_wide_matrices() {
    let mut rng = Rng::new(3);
    for (m, n) in [(9, 4), (4, 9), (6, 6), (5, 1)] {
        let a = Mat::randn(m, n, &mut rng);
        let (q, r) = qr_thin(&a);
        let p = m.min(n);
        assert_eq!((q.rows, q.cols, r.rows, r.cols), (m, p, p, n));
        for i in 0..p {
            for j in 0..i.min(n) {
                assert_eq!(r.at(i, j), 0.0, "R not upper triangular at ({i}, {j})");
            }
        }
        let d = max_abs_diff(&q.matmul(&r).unwrap(), &a);
        let o = orthonormality_error(&q);
        eprintln!("QR {m}x{n}: |QR − A| {d:.2e}, |QᵀQ − I| {o:.2e}");
        assert!(d < 1e-14 && o < 1e-14);
    }
}

#[test]
fn svd_of_a_product_equals_svd_of_the_formed_matrix() {
    let mut rng = Rng::new(11);
    // A 70×(8·3·3) conv-like ΔW of rank 8, and a rank-deficient product (inner dim 6, rank 3).
    let up = Mat::randn(70, 8, &mut rng);
    let down = Mat::randn(8, 72, &mut rng);
    let full = up.matmul(&down).unwrap();
    let p = svd_of_product(&up, &down).unwrap();
    let d = svd(&full);
    let err =
        p.s.iter()
            .zip(&d.s)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
    let recon = max_abs_diff(&p.reconstruct().unwrap(), &full);
    eprintln!(
        "product SVD: max |σ − σ_direct| {err:.2e} (σ₁ {:.3}), reconstruction {recon:.2e}",
        d.s[0]
    );
    assert!(err < 1e-11 * d.s[0]);
    assert!(recon < 1e-12 * d.s[0]);
    assert_eq!(p.s.len(), 8);

    let up = Mat::randn(20, 3, &mut rng)
        .matmul(&Mat::randn(3, 6, &mut rng))
        .unwrap();
    let down = Mat::randn(6, 15, &mut rng);
    let p = svd_of_product(&up, &down).unwrap();
    eprintln!("rank-3 product through inner dim 6: σ = {:?}", p.s);
    assert!(p.s[3] < 1e-12 * p.s[0]);
    assert!(max_abs_diff(&p.reconstruct().unwrap(), &up.matmul(&down).unwrap()) < 1e-12 * p.s[0]);
}

#[test]
fn truncation_error_is_the_eckart_young_tail() {
    let mut rng = Rng::new(5);
    let spectrum = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5];
    let a = with_spectrum(30, 20, &spectrum, &mut rng);
    let s = svd(&a);
    for k in 1..=6 {
        let approx = s.truncate(k).reconstruct().unwrap();
        let err_sq = a.add_scaled(&approx, -1.0).unwrap().frob_sq();
        let tail: f64 = spectrum[k..].iter().map(|x| x * x).sum();
        assert!(
            (err_sq - tail).abs() < 1e-12,
            "rank {k}: {err_sq} vs {tail}"
        );
    }
}

#[test]
fn randomized_svd_is_near_optimal_and_its_energy_is_exact() {
    let mut rng = Rng::new(21);
    // Slowly decaying spectrum σ_i = 1/(1+i)^0.7 over 150 values: a hard case for sketching.
    let spectrum: Vec<f64> = (0..150).map(|i| 1.0 / (1.0 + i as f64).powf(0.7)).collect();
    let a = with_spectrum(400, 300, &spectrum, &mut rng);
    let total = a.frob_sq();
    for (k, iters) in [(8, 3), (16, 3), (16, 0)] {
        let opts = RandomizedOpts {
            power_iters: iters,
            ..Default::default()
        };
        let r = randomized_svd(&a, k, opts).unwrap();
        assert_eq!(r.s.len(), k);
        let approx = r.reconstruct().unwrap();
        let err_sq = a.add_scaled(&approx, -1.0).unwrap().frob_sq();
        let predicted = total - r.energy();
        let optimum: f64 = spectrum[k..].iter().map(|x| x * x).sum();
        let excess = err_sq.sqrt() / optimum.sqrt() - 1.0;
        let sigma_err =
            r.s.iter()
                .zip(&spectrum)
                .map(|(g, w)| (g - w).abs() / w)
                .fold(0.0, f64::max);
        eprintln!(
            "rank {k}, {iters} power iterations: ‖A − A_k‖ {:.5} vs optimum {:.5} (excess {:.3}%), \
             energy identity error {:.1e}, max rel σ error {sigma_err:.2e}",
            err_sq.sqrt(),
            optimum.sqrt(),
            100.0 * excess,
            (err_sq - predicted).abs()
        );
        // The reported energy is exact for the factors produced.
        assert!((err_sq - predicted).abs() < 1e-10 * total);
        if iters > 0 {
            assert!(excess < 0.005, "excess {excess}");
            assert!(sigma_err < 0.02);
        } else {
            // Without power iterations a flat spectrum costs ~20 %: why the default uses 3.
            assert!(excess < 0.3, "excess {excess}");
        }
    }
}

/// Timings at Stable Diffusion 1.5 sizes (run with `--ignored --nocapture`).
#[test]
#[ignore]
fn timings_at_real_size() {
    let mut rng = Rng::new(1);
    for (out, inp, k) in [(320, 320, 16), (1280, 1280, 64), (1280, 11520, 64)] {
        let up = Mat::randn(out, k, &mut rng);
        let down = Mat::randn(k, inp, &mut rng);
        let t = std::time::Instant::now();
        let p = svd_of_product(&up, &down).unwrap();
        eprintln!(
            "svd_of_product {out}x{inp} rank {k}: {:.1} ms (σ₁ {:.1})",
            t.elapsed().as_secs_f64() * 1e3,
            p.s[0]
        );
    }
    for (m, n, r) in [(320, 768, 32), (1280, 1280, 32), (1280, 11520, 32)] {
        let a = Mat::randn(m, n, &mut rng);
        let t = std::time::Instant::now();
        let s = randomized_svd(&a, r, RandomizedOpts::default()).unwrap();
        eprintln!(
            "randomized_svd {m}x{n} rank {r}: {:.1} ms (σ₁ {:.1})",
            t.elapsed().as_secs_f64() * 1e3,
            s.s[0]
        );
    }
}
