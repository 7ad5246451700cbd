//! 2D convolution on the CPU as one im2col plus one gemm per image, in NCHW throughout.
//!
//! candle 0.11's CPU conv2d converts the input to NHWC and the kernel to `[out, kh, kw, in]`
//! on one thread at every call, builds the im2col tiles element by element and scatters the
//! result back to NCHW; on the SD UNet that overhead is about a fifth of the forward. Here
//! the patches are laid out as `[N, in·kh·kw, Ho·Wo]` (rows in the kernel's own
//! `[in, kh, kw]` order, built row-parallel with contiguous copies), so
//! `out[n] = W[out, in·kh·kw] @ cols[n]` is directly NCHW and the kernel is a free reshape.
//! A 1×1, stride-1, unpadded convolution skips the im2col: it is `W @ x[n]` (its input
//! gradient `Wᵀ @ g[n]`). Large 3×3 "same" convs go to Winograd's form (`conv_winograd.rs`),
//! other large "same" convs to shifted views (`conv_shifted.rs`). When the patches
//! of the whole output would exceed [`IM2COL_BYTES`] (a VAE's 128-channel 3×3 convolution at
//! 512×512 needs 1.2 GB), they are built and multiplied for a band of output rows at a time.
//!
//! The gemm is candle's matmul, so results equal a plain matmul of the patches: they may
//! differ from candle's conv2d by f32 rounding only (different summation order).

use super::par::{contiguous_slice, par_rows};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, DType, InplaceOp2, Layout, Result, Shape, Tensor, WithDType,
};

/// Largest patch matrix built at once (bytes); larger outputs are computed in row bands.
pub(crate) const IM2COL_BYTES: usize = 64 << 20;

/// Output channels per output pixel from which the input gradient's patch matrix is built
/// transposed (see [`conv2d_input_grad_cpu`]).
const TRANSPOSED_MIN_RATIO: usize = 4;

/// Whether [`conv2d_cpu`] handles this convolution (CPU, one group, f32 / f64 / f16).
pub(crate) fn supported(x: &Tensor, groups: usize) -> bool {
    x.device().is_cpu() && groups == 1 && matches!(x.dtype(), DType::F32 | DType::F64 | DType::F16)
}

/// `conv2d(x, k)` for `x` `[N, in, H, W]` and `k` `[out, in, kh, kw]` (one group) with
/// symmetric zero `padding`, `stride` and `dilation`; `[N, out, Ho, Wo]`. Only for inputs
/// where [`supported`] holds.
pub(crate) fn conv2d_cpu(
    x: &Tensor,
    k: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    let (n, c_in, h, w) = x.dims4()?;
    let (c_out, c_k, kh, kw) = k.dims4()?;
    if c_k != c_in {
        candle_core::bail!("conv2d: input {:?} vs kernel {:?}", x.shape(), k.shape());
    }
    let span = |len: usize, kk: usize| (len + 2 * padding).checked_sub(dilation * (kk - 1) + 1);
    let (Some(ho), Some(wo)) = (span(h, kh), span(w, kw)) else {
        candle_core::bail!(
            "conv2d: kernel {:?} larger than input {:?}",
            k.shape(),
            x.shape()
        );
    };
    if super::conv_winograd::serves(x, k, padding, stride, dilation) {
        return super::conv_winograd::conv2d(x, k);
    }
    if super::conv_shifted::serves(x, k, padding, stride, dilation) {
        return super::conv_shifted::conv2d(x, k, padding);
    }
    let (ho, wo) = (ho / stride + 1, wo / stride + 1);
    let kdim = c_in * kh * kw;
    let x = x.contiguous()?;
    let k2 = k
        .reshape((1, c_out, kdim))?
        .broadcast_as((n, c_out, kdim))?;
    if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        let cols = x.reshape((n, c_in, h * w))?;
        return super::dense::matmul(&k2, &cols)?.reshape((n, c_out, ho, wo));
    }
    // Output rows per band, so that one band's patches stay within the budget.
    let row_bytes = n * kdim * wo * x.dtype().size_in_bytes();
    let band = (IM2COL_BYTES / row_bytes.max(1)).clamp(1, ho);
    let mut parts = Vec::with_capacity(ho.div_ceil(band));
    for oy0 in (0..ho).step_by(band) {
        let cols = x.apply_op1_no_bwd(&Im2Col {
            kh,
            kw,
            stride,
            padding,
            dilation,
            rows: oy0..(oy0 + band).min(ho),
        })?;
        parts.push(super::dense::matmul(&k2, &cols)?);
    }
    let out = match parts.len() {
        1 => parts.remove(0),
        _ => Tensor::cat(&parts, 2)?,
    };
    out.reshape((n, c_out, ho, wo))
}

/// The patches of a `[N, C, H, W]` input for the output rows `rows`, as
/// `[N, C·kh·kw, rows·Wo]`.
struct Im2Col {
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
    rows: std::ops::Range<usize>,
}

impl Im2Col {
    fn run<T: WithDType>(&self, src: &[T], l: &Layout) -> Result<(Vec<T>, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let Self {
            kh,
            kw,
            stride: s,
            padding: p,
            dilation: d,
            ..
        } = *self;
        let wo = (w + 2 * p - d * (kw - 1) - 1) / s + 1;
        let oys = self.rows.clone();
        let row = oys.len() * wo;
        let mut dst = vec![T::zero(); n * c * kh * kw * row];
        par_rows(&mut dst, row, |r, out| {
            let kx = r % kw;
            let ky = (r / kw) % kh;
            let plane = r / (kw * kh); // b * c + channel
            let img = &src[plane * h * w..(plane + 1) * h * w];
            // Output columns whose input column ox*s + kx*d - p lies inside [0, w).
            let off = kx * d;
            let ox_lo = p.saturating_sub(off).div_ceil(s);
            let ox_hi = if w + p > off {
                ((w + p - off - 1) / s + 1).min(wo)
            } else {
                0
            };
            for (j, oy) in oys.clone().enumerate() {
                let iy = oy * s + ky * d;
                if iy < p || iy - p >= h || ox_lo >= ox_hi {
                    continue; // stays zero
                }
                let src_row = &img[(iy - p) * w..(iy - p + 1) * w];
                let dst_row = &mut out[j * wo..(j + 1) * wo];
                let ix0 = ox_lo * s + off - p;
                if s == 1 {
                    dst_row[ox_lo..ox_hi].copy_from_slice(&src_row[ix0..ix0 + (ox_hi - ox_lo)]);
                } else {
                    for (i, o) in dst_row[ox_lo..ox_hi].iter_mut().enumerate() {
                        *o = src_row[ix0 + i * s];
                    }
                }
            }
        });
        Ok((dst, Shape::from((n, c * kh * kw, row))))
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "lora-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s.dtype() {
            DType::F32 => {
                let (v, sh) = self.run(contiguous_slice::<f32>(s, l, "im2col")?, l)?;
                Ok((CpuStorage::F32(v), sh))
            }
            DType::F64 => {
                let (v, sh) = self.run(contiguous_slice::<f64>(s, l, "im2col")?, l)?;
                Ok((CpuStorage::F64(v), sh))
            }
            DType::F16 => {
                let (v, sh) = self.run(contiguous_slice::<half::f16>(s, l, "im2col")?, l)?;
                Ok((CpuStorage::F16(v), sh))
            }
            dt => candle_core::bail!("im2col: unsupported dtype {dt:?}"),
        }
    }
}

/// The gradient of `conv2d(x, k)` (one group) w.r.t. the kernel `k` `[out, in, kh, kw]`, for
/// the output gradient `g` `[N, out, Ho, Wo]`: `Σ_n g[n][out, rows·Wo] @ cols[n]ᵀ` over bands
/// of output rows whose patches stay within [`IM2COL_BYTES`] (a 1×1, stride-1, unpadded
/// convolution multiplies by `x[n]ᵀ` directly). Only for inputs where [`supported`] holds.
pub(crate) fn conv2d_weight_grad_cpu(
    x: &Tensor,
    g: &Tensor,
    (kh, kw): (usize, usize),
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    let (n, c_in, h, w) = x.dims4()?;
    let (ng, c_out, ho, wo) = g.dims4()?;
    if ng != n {
        candle_core::bail!(
            "conv2d weight grad: input {:?} vs gradient {:?}",
            x.shape(),
            g.shape()
        );
    }
    let kdim = c_in * kh * kw;
    let (x, g) = (
        x.contiguous()?,
        g.contiguous()?.reshape((n, c_out, ho * wo))?,
    );
    let sum_images = |t: Tensor| -> Result<Tensor> {
        match n {
            1 => t.squeeze(0),
            _ => t.sum(0),
        }
    };
    if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        let cols = x.reshape((n, c_in, h * w))?;
        let gw = super::dense::matmul(&g, &cols.transpose(1, 2)?)?;
        return sum_images(gw)?.reshape((c_out, c_in, 1, 1));
    }
    let row_bytes = n * kdim * wo * x.dtype().size_in_bytes();
    let band = (IM2COL_BYTES / row_bytes.max(1)).clamp(1, ho);
    let mut acc: Option<Tensor> = None;
    for oy0 in (0..ho).step_by(band) {
        let rows = oy0..(oy0 + band).min(ho);
        let cols = x.apply_op1_no_bwd(&Im2Col {
            kh,
            kw,
            stride,
            padding,
            dilation,
            rows: rows.clone(),
        })?;
        let gb = g.narrow(2, oy0 * wo, rows.len() * wo)?;
        let part = sum_images(super::dense::matmul(&gb, &cols.transpose(1, 2)?)?)?;
        acc = Some(match acc {
            Some(a) => (a + part)?,
            None => part,
        });
    }
    acc.expect("at least one band")
        .reshape((c_out, c_in, kh, kw))
}

/// The gradient of `conv2d(x, k)` (one group) w.r.t. `x` `[N, in, h, w]` for the output
/// gradient `g` `[N, out, Ho, Wo]`: per image and band of output rows,
/// `cols = kᵀ[in·kh·kw, out] @ g[out, rows·Wo]` (the kernel's transpose is a view), then
/// col2im adds each patch entry back to the input position it was read from. No rearranged
/// kernel is built or kept. Only for inputs where [`supported`] holds (f16 is computed in f32).
pub(crate) fn conv2d_input_grad_cpu(
    g: &Tensor,
    k: &Tensor,
    (h, w): (usize, usize),
    padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    let (n, c_out, ho, wo) = g.dims4()?;
    let (k_out, c_in, kh, kw) = k.dims4()?;
    if k_out != c_out {
        candle_core::bail!(
            "conv2d input grad: gradient {:?} vs kernel {:?}",
            g.shape(),
            k.shape()
        );
    }
    let dtype = g.dtype();
    let cd = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let kdim = c_in * kh * kw;
    let g = g.to_dtype(cd)?.contiguous()?;
    let kc = k.to_dtype(cd)?;
    if (h, w) == (ho, wo) && super::conv_winograd::serves(&g, &kc, padding, stride, dilation) {
        return super::conv_winograd::conv2d_input_grad(&g, &kc)?.to_dtype(dtype);
    }
    if (h, w) == (ho, wo) && super::conv_shifted::serves(&g, &kc, padding, stride, dilation) {
        return super::conv_shifted::conv2d_input_grad(&g, &kc, padding)?.to_dtype(dtype);
    }
    let k2 = kc.contiguous()?.reshape((c_out, kdim))?;
    let kt = k2.t()?;
    if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        // A 1×1 convolution's patches are the input itself: `dx[n] = kᵀ @ g[n]`, no col2im.
        let kt = kt.unsqueeze(0)?.broadcast_as((n, c_in, c_out))?;
        let dx = super::dense::matmul(&kt, &g.reshape((n, c_out, ho * wo))?)?;
        return dx.reshape((n, c_in, h, w))?.to_dtype(dtype);
    }
    let dx = Tensor::zeros((n, c_in, h, w), cd, g.device())?;
    let row_bytes = kdim * wo * cd.size_in_bytes();
    let band = (IM2COL_BYTES / row_bytes.max(1)).clamp(1, ho.max(1));
    // Few output pixels against many output channels (the 8×8 convs of a 1280-channel UNet):
    // the patches as `gᵀ @ k`, with `k` read row-major, and col2im reading them transposed
    // (`kᵀ` as the left operand of a product only 64 columns wide runs at half speed: 23 ms
    // against 17 ms for 1280 → 1280 channels at 8×8).
    let transposed = band == ho && ho * wo * TRANSPOSED_MIN_RATIO <= c_out;
    for img in 0..n {
        let gi = g.get(img)?.reshape((c_out, ho * wo))?;
        for oy0 in (0..ho).step_by(band) {
            let rows = band.min(ho - oy0);
            let gb = match rows == ho {
                true => gi.clone(),
                false => gi.narrow(1, oy0 * wo, rows * wo)?.contiguous()?,
            };
            let cols = match transposed {
                true => super::dense::matmul(&gb.t()?.contiguous()?, &k2)?,
                false => super::dense::matmul(&kt, &gb)?,
            };
            let op = Col2Im {
                transposed,
                image: img,
                kh,
                kw,
                stride,
                padding,
                dilation,
                rows: oy0..oy0 + rows,
                wo,
            };
            dx.inplace_op2(&cols, &op)?;
        }
    }
    if dtype == cd {
        return Ok(dx);
    }
    let out = dx.to_dtype(dtype);
    drop(dx);
    out
}

/// Adds the patch matrix `[in·kh·kw, rows·Wo]` of output rows `rows` of image `image` into
/// the input gradient `[N, in, H, W]` (the transpose of [`Im2Col`]); `transposed`: the
/// matrix is given as its transpose `[rows·Wo, in·kh·kw]`.
struct Col2Im {
    transposed: bool,
    image: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
    rows: std::ops::Range<usize>,
    wo: usize,
}

impl Col2Im {
    fn run<T: WithDType>(&self, dx: &mut [T], dl: &Layout, cols: &[T]) -> Result<()> {
        let (_, c, h, w) = dl.shape().dims4()?;
        let Self {
            kh,
            kw,
            stride: s,
            padding: p,
            dilation: d,
            wo,
            ..
        } = *self;
        let plane = h * w;
        let width = self.rows.len() * wo;
        let img = &mut dx[self.image * c * plane..(self.image + 1) * c * plane];
        let kdim = c * kh * kw;
        par_rows(img, plane, |ch, out| {
            let mut gathered = Vec::new();
            for ky in 0..kh {
                for kx in 0..kw {
                    let r = (ch * kh + ky) * kw + kx;
                    let src: &[T] = if self.transposed {
                        gathered.clear();
                        gathered.extend((0..width).map(|i| cols[i * kdim + r]));
                        &gathered
                    } else {
                        &cols[r * width..(r + 1) * width]
                    };
                    let off = kx * d;
                    let ox_lo = p.saturating_sub(off).div_ceil(s);
                    let ox_hi = if w + p > off {
                        ((w + p - off - 1) / s + 1).min(wo)
                    } else {
                        0
                    };
                    if ox_lo >= ox_hi {
                        continue;
                    }
                    for (j, oy) in self.rows.clone().enumerate() {
                        let iy = oy * s + ky * d;
                        if iy < p || iy - p >= h {
                            continue;
                        }
                        let dst = &mut out[(iy - p) * w..(iy - p + 1) * w];
                        let srow = &src[j * wo..(j + 1) * wo];
                        let ix0 = ox_lo * s + off - p;
                        if s == 1 {
                            let len = ox_hi - ox_lo;
                            for (o, &v) in dst[ix0..ix0 + len].iter_mut().zip(&srow[ox_lo..ox_hi]) {
                                *o += v;
                            }
                        } else {
                            for (i, &v) in srow[ox_lo..ox_hi].iter().enumerate() {
                                dst[ix0 + i * s] += v;
                            }
                        }
                    }
                }
            }
        });
        Ok(())
    }
}

impl InplaceOp2 for Col2Im {
    fn name(&self) -> &'static str {
        "lora-col2im"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (Some((a, e)), Some((ca, ce))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("col2im: contiguous inputs only");
        };
        match (s1, s2) {
            (CpuStorage::F32(dx), CpuStorage::F32(c)) => self.run(&mut dx[a..e], l1, &c[ca..ce]),
            (CpuStorage::F64(dx), CpuStorage::F64(c)) => self.run(&mut dx[a..e], l1, &c[ca..ce]),
            (dx, c) => candle_core::bail!("col2im: dtypes {:?} and {:?}", dx.dtype(), c.dtype()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Batch, in and out channels; input size; kernel, stride, padding, dilation.
    fn check(
        (n, c, o): (usize, usize, usize),
        hw: (usize, usize),
        (k, s, p, d): (usize, usize, usize, usize),
    ) {
        let dev = Device::Cpu;
        let len = n * c * hw.0 * hw.1;
        let x: Vec<f64> = (0..len)
            .map(|i| ((i * 7919 % 1013) as f64 / 1013.0) - 0.5)
            .collect();
        let x = Tensor::from_vec(x, (n, c, hw.0, hw.1), &dev).unwrap();
        let wl = o * c * k * k;
        let w: Vec<f64> = (0..wl)
            .map(|i| ((i * 104729 % 997) as f64 / 997.0) - 0.5)
            .collect();
        let w = Tensor::from_vec(w, (o, c, k, k), &dev).unwrap();
        let want = x.conv2d(&w, p, s, d, 1).unwrap();
        for dt in [DType::F64, DType::F32] {
            let (xd, wd) = (x.to_dtype(dt).unwrap(), w.to_dtype(dt).unwrap());
            let got = conv2d_cpu(&xd, &wd, p, s, d).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (got.to_dtype(DType::F64).unwrap() - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
            eprintln!("im2col conv {dt:?} k{k} s{s} p{p} d{d} {hw:?}: max abs diff {diff:.2e}");
            assert!(diff <= tol, "k{k} s{s} p{p} d{d}: diff {diff}");
        }
    }

    #[test]
    fn matches_candle_conv2d() {
        check((2, 3, 4), (7, 9), (3, 1, 1, 1));
        check((2, 3, 4), (8, 8), (3, 2, 1, 1));
        check((1, 5, 2), (9, 7), (3, 2, 0, 1));
        check((2, 4, 3), (6, 6), (1, 1, 0, 1));
        check((1, 4, 3), (6, 5), (1, 2, 0, 1));
        check((1, 2, 3), (10, 11), (3, 1, 2, 2));
        check((1, 2, 3), (5, 5), (5, 3, 2, 1));
        check((2, 320, 8), (16, 16), (3, 1, 1, 1));
    }

    #[test]
    fn row_bands_equal_one_pass() {
        // 64 channels × 9 × 160 columns × 4 bytes = 368,640 bytes per output row: a 64 MiB
        // budget takes 182 rows per band, so 400 rows run in three bands (the last one shorter).
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 64, 400, 160), &dev).unwrap();
        let k = Tensor::randn(0f32, 0.1, (4, 64, 3, 3), &dev).unwrap();
        let banded = conv2d_cpu(&x, &k, 1, 1, 1).unwrap();
        let want = x.conv2d(&k, 1, 1, 1, 1).unwrap();
        let diff = (banded - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "banded conv differs from candle's by {diff}");
    }

    #[test]
    fn col2im_input_grad_equals_the_flipped_kernel_convolution() {
        // (batch, in, out), (h, w), (kernel, stride, padding, dilation)
        let cases = [
            ((2, 3, 4), (7, 9), (3, 1, 1, 1)),
            ((1, 5, 2), (8, 8), (3, 2, 1, 1)),
            ((1, 2, 3), (9, 7), (3, 2, 0, 1)),
            ((1, 3, 3), (6, 5), (1, 1, 0, 1)),
            ((1, 2, 2), (10, 11), (3, 1, 2, 2)),
            ((1, 4, 2), (7, 8), (1, 2, 0, 1)),
            // At least 4 output channels per output pixel: the transposed patch matrix.
            ((2, 5, 64), (4, 4), (3, 1, 1, 1)),
            ((1, 3, 72), (8, 7), (3, 2, 1, 1)),
            ((1, 2, 40), (5, 5), (3, 1, 0, 1)),
        ];
        let dev = Device::Cpu;
        for ((n, c, o), (h, w), (k, s, p, d)) in cases {
            let x = Tensor::randn(0f64, 1.0, (n, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f64, 1.0, (o, c, k, k), &dev).unwrap();
            let y = x.conv2d(&wt, p, s, d, 1).unwrap();
            let g = Tensor::randn(0f64, 1.0, y.dims(), &dev).unwrap();
            // The zero-dilated, flipped-kernel convolution (PyTorch parity in tests/ops.rs).
            let params = crate::ops::Conv2dParams {
                stride: s,
                padding: p,
                dilation: d,
                groups: 1,
            };
            let want = &crate::ops::conv2d_input_grad_flipped(&g, &wt, (h, w), &params).unwrap();
            for dt in [DType::F64, DType::F32] {
                let got = conv2d_input_grad_cpu(
                    &g.to_dtype(dt).unwrap(),
                    &wt.to_dtype(dt).unwrap(),
                    (h, w),
                    p,
                    s,
                    d,
                )
                .unwrap();
                assert_eq!(got.dims(), want.dims());
                let diff = (got.to_dtype(DType::F64).unwrap() - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                let tol = if dt == DType::F64 { 1e-12 } else { 1e-4 };
                assert!(diff <= tol, "k{k} s{s} p{p} d{d} {dt:?}: diff {diff}");
            }
        }
    }

    #[test]
    fn col2im_row_bands_equal_one_pass() {
        // 64 channels × 9 × 160 columns × 4 bytes per output row: three bands of 182 rows.
        let dev = Device::Cpu;
        let g = Tensor::randn(0f32, 1.0, (1, 4, 400, 160), &dev).unwrap();
        let k = Tensor::randn(0f32, 0.1, (4, 64, 3, 3), &dev).unwrap();
        let banded = conv2d_input_grad_cpu(&g, &k, (400, 160), 1, 1, 1).unwrap();
        let x = candle_core::Var::zeros((1, 64, 400, 160), DType::F32, &dev).unwrap();
        let y = x.conv2d(&k, 1, 1, 1, 1).unwrap();
        let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let diff = (banded - grads.get(&x).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff < 1e-4,
            "banded input grad differs from candle's by {diff}"
        );
    }
}
