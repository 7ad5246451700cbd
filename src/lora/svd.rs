//! Dense linear algebra in f64 on the CPU for merging and extracting LoRAs: Householder QR,
//! one-sided Jacobi SVD, the SVD of a low-rank product `up · down` through the QR of its
//! factors, and a randomized truncated SVD (Halko, Martinsson & Tropp 2011) for full-rank
//! differences of two models.
//!
//! Large products go through candle's f64 CPU matmul (multi-threaded gemm); the factorizations
//! themselves only ever see matrices with one small side.

use crate::rng::Rng;
use candle_core::{DType, Device, Tensor};

/// A dense row-major f64 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// `rows * cols` entries, row after row.
    pub data: Vec<f64>,
}

/// Products with fewer multiply-adds than this run in a plain loop (no tensor round trip).
const SMALL_PRODUCT: usize = 1 << 16;

impl Mat {
    /// A `rows × cols` matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// The `n × n` identity.
    pub fn identity(n: usize) -> Self {
        let mut m = Self::zeros(n, n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    /// A matrix from row-major data; errors when the length is not `rows * cols`.
    pub fn from_vec(rows: usize, cols: usize, data: Vec<f64>) -> candle_core::Result<Self> {
        if data.len() != rows * cols {
            candle_core::bail!(
                "matrix {rows}x{cols} needs {} values, got {}",
                rows * cols,
                data.len()
            );
        }
        Ok(Self { rows, cols, data })
    }

    /// A matrix of independent standard normal samples.
    pub fn randn(rows: usize, cols: usize, rng: &mut Rng) -> Self {
        Self {
            rows,
            cols,
            data: (0..rows * cols).map(|_| rng.normal()).collect(),
        }
    }

    /// A tensor of any float dtype and rank ≥ 1 as a matrix: dim 0 gives the rows, the other
    /// dims are flattened into the columns (a conv kernel [out, in, kh, kw] → [out, in·kh·kw]).
    pub fn from_tensor(t: &Tensor) -> candle_core::Result<Self> {
        let dims = t.dims();
        if dims.is_empty() {
            candle_core::bail!("cannot view a scalar as a matrix");
        }
        let rows = dims[0];
        let cols = dims[1..].iter().product();
        let data = t
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        Self::from_vec(rows, cols, data)
    }

    /// The matrix as a tensor of `shape` (same element count) and `dtype` on `device`.
    pub fn to_tensor(
        &self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.data, (self.rows, self.cols), &Device::Cpu)?
            .reshape(shape)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    /// Entry (i, j).
    #[inline]
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    /// The transpose.
    pub fn t(&self) -> Self {
        let mut out = Self::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                out.data[j * self.rows + i] = self.data[i * self.cols + j];
            }
        }
        out
    }

    /// The product `self · rhs`; errors on mismatched inner dimensions.
    pub fn matmul(&self, rhs: &Mat) -> candle_core::Result<Mat> {
        if self.cols != rhs.rows {
            candle_core::bail!(
                "matmul of {}x{} by {}x{}",
                self.rows,
                self.cols,
                rhs.rows,
                rhs.cols
            );
        }
        let (m, k, n) = (self.rows, self.cols, rhs.cols);
        if m * k * n <= SMALL_PRODUCT || m == 0 || k == 0 || n == 0 {
            let mut out = Mat::zeros(m, n);
            for i in 0..m {
                let row = &mut out.data[i * n..(i + 1) * n];
                for p in 0..k {
                    let a = self.data[i * k + p];
                    if a == 0.0 {
                        continue;
                    }
                    let b = &rhs.data[p * n..(p + 1) * n];
                    for (o, &bv) in row.iter_mut().zip(b) {
                        *o += a * bv;
                    }
                }
            }
            return Ok(out);
        }
        let a = Tensor::from_slice(&self.data, (m, k), &Device::Cpu)?;
        let b = Tensor::from_slice(&rhs.data, (k, n), &Device::Cpu)?;
        let data = a.matmul(&b)?.flatten_all()?.to_vec1::<f64>()?;
        Mat::from_vec(m, n, data)
    }

    /// `self · s` for a scalar s.
    pub fn scaled(&self, s: f64) -> Mat {
        Mat {
            rows: self.rows,
            cols: self.cols,
            data: self.data.iter().map(|v| v * s).collect(),
        }
    }

    /// `self + s · other`; errors on mismatched shapes.
    pub fn add_scaled(&self, other: &Mat, s: f64) -> candle_core::Result<Mat> {
        if (self.rows, self.cols) != (other.rows, other.cols) {
            candle_core::bail!(
                "adding {}x{} and {}x{}",
                self.rows,
                self.cols,
                other.rows,
                other.cols
            );
        }
        let data = self
            .data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| a + s * b)
            .collect();
        Ok(Mat {
            rows: self.rows,
            cols: self.cols,
            data,
        })
    }

    /// The squared Frobenius norm Σ a_ij².
    pub fn frob_sq(&self) -> f64 {
        self.data.iter().map(|v| v * v).sum()
    }

    /// The first `n` columns.
    pub fn left_cols(&self, n: usize) -> Mat {
        let n = n.min(self.cols);
        let mut out = Mat::zeros(self.rows, n);
        for i in 0..self.rows {
            out.data[i * n..(i + 1) * n]
                .copy_from_slice(&self.data[i * self.cols..i * self.cols + n]);
        }
        out
    }

    /// `[self, other]`, side by side; errors when the row counts differ.
    pub fn hcat(&self, other: &Mat) -> candle_core::Result<Mat> {
        if self.rows != other.rows {
            candle_core::bail!("hcat of {} rows and {} rows", self.rows, other.rows);
        }
        let n = self.cols + other.cols;
        let mut out = Mat::zeros(self.rows, n);
        for i in 0..self.rows {
            out.data[i * n..i * n + self.cols]
                .copy_from_slice(&self.data[i * self.cols..(i + 1) * self.cols]);
            out.data[i * n + self.cols..(i + 1) * n]
                .copy_from_slice(&other.data[i * other.cols..(i + 1) * other.cols]);
        }
        Ok(out)
    }

    /// `[self; other]`, stacked; errors when the column counts differ.
    pub fn vcat(&self, other: &Mat) -> candle_core::Result<Mat> {
        if self.cols != other.cols {
            candle_core::bail!("vcat of {} columns and {} columns", self.cols, other.cols);
        }
        let mut data = self.data.clone();
        data.extend_from_slice(&other.data);
        Mat::from_vec(self.rows + other.rows, self.cols, data)
    }
}

/// A thin QR factorization by Householder reflections: `a = q · r` with `q` m×p having
/// orthonormal columns and `r` p×n upper triangular (trapezoidal), p = min(m, n).
pub fn qr_thin(a: &Mat) -> (Mat, Mat) {
    let (m, n) = (a.rows, a.cols);
    let p = m.min(n);
    // Column-major working copy: column j is w[j*m..(j+1)*m].
    let mut w = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            w[j * m + i] = a.data[i * n + j];
        }
    }
    let mut reflectors: Vec<Vec<f64>> = Vec::with_capacity(p);
    for j in 0..p {
        let col = &w[j * m + j..(j + 1) * m];
        let norm = col.iter().map(|v| v * v).sum::<f64>().sqrt();
        let mut v = col.to_vec();
        if norm == 0.0 {
            reflectors.push(vec![]);
            continue;
        }
        let alpha = if v[0] >= 0.0 { -norm } else { norm };
        v[0] -= alpha;
        let vnorm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if vnorm == 0.0 {
            reflectors.push(vec![]);
            continue;
        }
        v.iter_mut().for_each(|x| *x /= vnorm);
        // Apply H = I - 2 v vᵀ to columns j..n, rows j..m.
        for c in j..n {
            let colc = &mut w[c * m + j..(c + 1) * m];
            let d: f64 = colc.iter().zip(&v).map(|(x, y)| x * y).sum();
            colc.iter_mut().zip(&v).for_each(|(x, y)| *x -= 2.0 * d * y);
        }
        reflectors.push(v);
    }
    let mut r = Mat::zeros(p, n);
    for i in 0..p {
        for j in i..n {
            r.data[i * n + j] = w[j * m + i];
        }
    }
    // Q = H_0 · … · H_{p-1} · [I_p; 0], built column-major then transposed into place.
    let mut qc = vec![0.0; m * p];
    for j in 0..p {
        qc[j * m + j] = 1.0;
    }
    for (j, v) in reflectors.iter().enumerate().rev() {
        if v.is_empty() {
            continue;
        }
        for c in 0..p {
            let colc = &mut qc[c * m + j..(c + 1) * m];
            let d: f64 = colc.iter().zip(v).map(|(x, y)| x * y).sum();
            if d != 0.0 {
                colc.iter_mut().zip(v).for_each(|(x, y)| *x -= 2.0 * d * y);
            }
        }
    }
    let mut q = Mat::zeros(m, p);
    for i in 0..m {
        for j in 0..p {
            q.data[i * p + j] = qc[j * m + i];
        }
    }
    (q, r)
}

/// A (thin) singular value decomposition `a = u · diag(s) · vᵀ`, singular values descending.
///
/// `u` is m×p and `v` is n×p (p = number of values kept); their columns are orthonormal
/// except that columns belonging to a zero singular value are zero.
#[derive(Debug, Clone)]
pub struct Svd {
    /// Left singular vectors as columns.
    pub u: Mat,
    /// Singular values, descending.
    pub s: Vec<f64>,
    /// Right singular vectors as columns.
    pub v: Mat,
}

impl Svd {
    /// The leading `k` triplets.
    pub fn truncate(&self, k: usize) -> Svd {
        let k = k.min(self.s.len());
        Svd {
            u: self.u.left_cols(k),
            s: self.s[..k].to_vec(),
            v: self.v.left_cols(k),
        }
    }

    /// Σ σ² over all values kept here.
    pub fn energy(&self) -> f64 {
        self.s.iter().map(|s| s * s).sum()
    }

    /// Balanced low-rank factors of the leading `k` triplets: `up = u·diag(√s)` (m×k) and
    /// `down = diag(√s)·vᵀ` (k×n), so that `up · down` is the best rank-k approximation.
    pub fn factors(&self, k: usize) -> (Mat, Mat) {
        let t = self.truncate(k);
        let k = t.s.len();
        let roots: Vec<f64> = t.s.iter().map(|s| s.sqrt()).collect();
        let mut up = t.u.clone();
        if k > 0 {
            for row in up.data.chunks_exact_mut(k) {
                row.iter_mut().zip(&roots).for_each(|(x, r)| *x *= r);
            }
        }
        let mut down = t.v.t();
        let n = down.cols;
        if n > 0 {
            for (row, r) in down.data.chunks_exact_mut(n).zip(&roots) {
                row.iter_mut().for_each(|x| *x *= r);
            }
        }
        (up, down)
    }

    /// `u · diag(s) · vᵀ`.
    pub fn reconstruct(&self) -> candle_core::Result<Mat> {
        let (up, down) = self.factors(self.s.len());
        up.matmul(&down)
    }
}

/// Largest number of Jacobi sweeps; convergence takes 6–12 in practice.
const MAX_SWEEPS: usize = 80;

/// The SVD of a matrix by one-sided (Hestenes) Jacobi rotations, after a QR step when the
/// matrix is tall. Accurate to a few ulps relative to the largest singular value.
pub fn svd(a: &Mat) -> Svd {
    let (m, n) = (a.rows, a.cols);
    if m < n {
        let t = svd(&a.t());
        return Svd {
            u: t.v,
            s: t.s,
            v: t.u,
        };
    }
    if n == 0 {
        return Svd {
            u: Mat::zeros(m, 0),
            s: vec![],
            v: Mat::zeros(0, 0),
        };
    }
    if m > n {
        let (q, r) = qr_thin(a);
        let inner = svd_square(&r);
        // q·inner.u: columns of q are orthonormal, so the product keeps them orthonormal.
        let u = matmul_plain(&q, &inner.u);
        return Svd {
            u,
            s: inner.s,
            v: inner.v,
        };
    }
    svd_square(a)
}

fn matmul_plain(a: &Mat, b: &Mat) -> Mat {
    // Shapes come from our own factorizations, so they always agree.
    a.matmul(b).unwrap_or_else(|_| Mat::zeros(a.rows, b.cols))
}

/// One-sided Jacobi on an m×n matrix with m ≥ n.
fn svd_square(a: &Mat) -> Svd {
    let (m, n) = (a.rows, a.cols);
    // Column-major copies of A (columns rotated towards U·Σ) and of V.
    let mut w = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            w[j * m + i] = a.data[i * n + j];
        }
    }
    let mut v = vec![0.0; n * n];
    for j in 0..n {
        v[j * n + j] = 1.0;
    }
    let eps = f64::EPSILON;
    for _sweep in 0..MAX_SWEEPS {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (cp, cq) = (&w[p * m..(p + 1) * m], &w[q * m..(q + 1) * m]);
                let alpha: f64 = cp.iter().map(|x| x * x).sum();
                let beta: f64 = cq.iter().map(|x| x * x).sum();
                let gamma: f64 = cp.iter().zip(cq).map(|(x, y)| x * y).sum();
                if gamma == 0.0 || gamma.abs() <= eps * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                rotate(&mut w, m, p, q, c, s);
                rotate(&mut v, n, p, q, c, s);
            }
        }
        if !rotated {
            break;
        }
    }
    let mut order: Vec<(f64, usize)> = (0..n)
        .map(|j| {
            (
                w[j * m..(j + 1) * m]
                    .iter()
                    .map(|x| x * x)
                    .sum::<f64>()
                    .sqrt(),
                j,
            )
        })
        .collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut u = Mat::zeros(m, n);
    let mut vm = Mat::zeros(n, n);
    let mut s = Vec::with_capacity(n);
    for (k, &(sigma, j)) in order.iter().enumerate() {
        s.push(sigma);
        if sigma > 0.0 {
            for i in 0..m {
                u.data[i * n + k] = w[j * m + i] / sigma;
            }
        }
        for i in 0..n {
            vm.data[i * n + k] = v[j * n + i];
        }
    }
    Svd { u, s, v: vm }
}

/// Rotates columns p and q (column-major, `len` rows): (x, y) → (c·x − s·y, s·x + c·y).
fn rotate(w: &mut [f64], len: usize, p: usize, q: usize, c: f64, s: f64) {
    let (head, tail) = w.split_at_mut(q * len);
    let cp = &mut head[p * len..(p + 1) * len];
    let cq = &mut tail[..len];
    for (x, y) in cp.iter_mut().zip(cq.iter_mut()) {
        let (a, b) = (*x, *y);
        *x = c * a - s * b;
        *y = s * a + c * b;
    }
}

/// The SVD of the product `up · down` (m×k times k×n, k small) without forming it:
/// `up = Qu·Ru`, `downᵀ = Qd·Rd`, then the SVD of the small core `Ru·Rdᵀ`.
/// Exact up to rounding; costs O((m + n)·k²) plus the product's core.
pub fn svd_of_product(up: &Mat, down: &Mat) -> candle_core::Result<Svd> {
    if up.cols != down.rows {
        candle_core::bail!(
            "low-rank product of {}x{} and {}x{}",
            up.rows,
            up.cols,
            down.rows,
            down.cols
        );
    }
    let (qu, ru) = qr_thin(up);
    let (qd, rd) = qr_thin(&down.t());
    let core = ru.matmul(&rd.t())?;
    let inner = svd(&core);
    Ok(Svd {
        u: qu.matmul(&inner.u)?,
        s: inner.s,
        v: qd.matmul(&inner.v)?,
    })
}

/// Settings of [`randomized_svd`].
#[derive(Debug, Clone, Copy)]
pub struct RandomizedOpts {
    /// Extra sample columns beyond the rank asked for.
    pub oversample: usize,
    /// Power (subspace) iterations; each one sharpens the captured subspace by σ_{l+1}/σ_k.
    pub power_iters: usize,
    /// Seed of the Gaussian test matrix.
    pub seed: u64,
}

impl Default for RandomizedOpts {
    fn default() -> Self {
        Self {
            oversample: 10,
            power_iters: 3,
            seed: 0,
        }
    }
}

/// A truncated SVD of rank `k` by randomized range finding with power iterations
/// (Halko, Martinsson & Tropp, Algorithm 4.4 + 5.1). The factors are exact for the subspace
/// found: `u·diag(s)·vᵀ = P·a` restricted to the top k, with P an orthogonal projector, so
/// ‖a − u·diag(s)·vᵀ‖²_F = ‖a‖²_F − Σ s² exactly; the error exceeds the Eckart–Young optimum
/// only by the subspace mismatch, which decays like (σ_{k+p+1}/σ_k)^(2q+1). Falls back to the
/// exact [`svd`] when k + oversample reaches half the smaller side (nothing would be saved).
pub fn randomized_svd(a: &Mat, k: usize, opts: RandomizedOpts) -> candle_core::Result<Svd> {
    let small = a.rows.min(a.cols);
    let l = (k + opts.oversample).min(small);
    if 2 * l >= small {
        return Ok(svd(a).truncate(k));
    }
    let at = a.t();
    let mut rng = Rng::new(opts.seed);
    let omega = Mat::randn(a.cols, l, &mut rng);
    let mut q = qr_thin(&a.matmul(&omega)?).0;
    for _ in 0..opts.power_iters {
        let z = qr_thin(&at.matmul(&q)?).0;
        q = qr_thin(&a.matmul(&z)?).0;
    }
    // B = Qᵀ·A (l×n); its SVD lifts to A's through Q.
    let b = q.t().matmul(a)?;
    let inner = svd(&b).truncate(k);
    Ok(Svd {
        u: q.matmul(&inner.u)?,
        s: inner.s,
        v: inner.v,
    })
}
