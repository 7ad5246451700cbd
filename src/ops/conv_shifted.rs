//! "Same" 2D convolution on the CPU (stride 1, no dilation, `k = 2·padding + 1`) as one gemm
//! per kernel tap on shifted views of the zero-padded input, with no patch matrix.
//!
//! With the input padded to `[C, Hp, Wp]` (`Hp = H + 2p`, `Wp = W + 2p`) and flattened, the
//! input under tap `(ky, kx)` of output pixel `(y, x)` sits at `(y + ky)·Wp + (x + kx)`: the
//! tap's input for every output pixel of a row-padded output grid `[H, Wp]` is one strided
//! view, `[C, H·Wp]` at offset `ky·Wp + kx`. So `out_p = Σ_taps W[:, :, ky, kx] @ view`
//! (each tap's kernel slice a strided view of the kernel too), and the output is `out_p`
//! without its `2p` extra columns per row (computed and dropped: 3 % more work at 64×64).
//! The input gradient of the same conv is the same sum over the padded output gradient with
//! the kernel's transpose and the taps mirrored.
//!
//! The im2col form writes and reads back a patch matrix `k²` times the input (47 MB for a
//! 320-channel 64×64 image); here each task accumulates the nine products for a band of
//! output columns in a cache-sized buffer. Measured faster from 32×32 up; at 16×16 and below
//! (a larger share of dropped columns, small products) im2col stays (see [`serves`]). The
//! 3×3 convs that Winograd's form serves (`conv_winograd.rs`, 64 channels and more) go there
//! first; this form keeps the other kernel sizes and the thin ones (the UNet's `conv_out`).

use super::blas::BlasFloat;
use super::par::{contiguous_slice, gemm, par_for_scratch, par_rows, Real, SharedMut};
use candle_core::{DType, Device, Result, Storage, Tensor};

/// Smallest output (pixels per image) the shifted form serves.
pub(crate) const MIN_PIXELS: usize = 64 * 64;

/// Fewest multiply-adds per tap and image (`in · out · H · W`, output channels counted as
/// at least [`FEW_CHANNELS`]) it serves: the BLAS's threshold, so the tiny models keep their
/// im2col results bit for bit (a 4-channel `conv_in` is also faster as im2col).
pub(crate) const MIN_PRODUCT: usize = super::blas::MIN_PRODUCT;

/// Output channels below which a convolution is served by its input size alone: its product
/// is too thin to pay for a patch matrix 9× the input (the SD UNet's 320 → 4 `conv_out` at
/// 64×64: 30 ms as im2col, 1 ms shifted, forward and input gradient alike).
const FEW_CHANNELS: usize = 64;

/// Whether [`conv2d`] / [`conv2d_input_grad`] serve this convolution: CPU, f32 / f64, one
/// group, stride 1, no dilation, a square odd kernel with `padding = (k − 1) / 2`, at
/// least [`MIN_PIXELS`] output pixels and [`MIN_PRODUCT`] multiply-adds per tap (with at
/// least [`FEW_CHANNELS`] output channels counted).
pub fn serves(x: &Tensor, k: &Tensor, padding: usize, stride: usize, dilation: usize) -> bool {
    let (Ok((_, _, h, w)), Ok((c_out, c_in, kh, kw))) = (x.dims4(), k.dims4()) else {
        return false;
    };
    x.device().is_cpu()
        && c_in * c_out.max(FEW_CHANNELS) * h * w >= MIN_PRODUCT
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && k.dtype() == x.dtype()
        && stride == 1
        && dilation == 1
        && kh == kw
        && kh == 2 * padding + 1
        && kh > 1
        && h * w >= MIN_PIXELS
}

/// The convolution `[N, in, H, W]` ⊛ `[out, in, k, k]` → `[N, out, H, W]` with
/// `k = 2·padding + 1` (see [`serves`]).
pub fn conv2d(x: &Tensor, k: &Tensor, padding: usize) -> Result<Tensor> {
    check(x, k, padding, 0)?;
    let (c_out, c_in, kh, kw) = k.dims4()?;
    let taps = kh * kw;
    // W[o, c, ky, kx] as `[out, in]` at offset ky·kw + kx.
    let plan = Plan {
        m: c_out,
        strides: ((c_in * taps) as isize, taps as isize),
        padding,
        mirror: false,
    };
    super::profile::scope("conv2d-shifted", super::profile::Pass::Forward, || {
        run(x, k, plan)
    })
}

/// The gradient w.r.t. the input of [`conv2d`] for the output gradient `g` `[N, out, H, W]`.
pub fn conv2d_input_grad(g: &Tensor, k: &Tensor, padding: usize) -> Result<Tensor> {
    check(g, k, padding, 1)?;
    let (_, c_in, kh, kw) = k.dims4()?;
    let taps = kh * kw;
    // W[o, c, ky, kx] as `[in, out]` (the transpose) at offset ky·kw + kx.
    let plan = Plan {
        m: c_in,
        strides: (taps as isize, (c_in * taps) as isize),
        padding,
        mirror: true,
    };
    super::profile::scope("conv2d-shifted", super::profile::Pass::Backward, || {
        run(g, k, plan)
    })
}

/// An error unless `k` is a square `2·padding + 1` kernel whose dim `side` (0: input
/// channels of the forward, 1: of the input gradient, its output channels) matches `src`.
fn check(src: &Tensor, k: &Tensor, padding: usize, side: usize) -> Result<()> {
    let (_, c, _, _) = src.dims4()?;
    let (ko, ki, kh, kw) = k.dims4()?;
    let want = if side == 0 { ki } else { ko };
    if c != want || kh != kw || kh != 2 * padding + 1 || src.dtype() != k.dtype() {
        candle_core::bail!(
            "shifted conv2d: input {:?} {:?} vs kernel {:?} {:?} with padding {padding}",
            src.shape(),
            src.dtype(),
            k.shape(),
            k.dtype()
        );
    }
    Ok(())
}

/// One call's products: `m` output channels, the kernel slice's (row, column) strides, and
/// whether the taps are mirrored (input gradient).
#[derive(Clone, Copy)]
struct Plan {
    m: usize,
    strides: (isize, isize),
    padding: usize,
    mirror: bool,
}

fn run(src: &Tensor, k: &Tensor, plan: Plan) -> Result<Tensor> {
    let src = src.contiguous()?;
    let k = k.contiguous()?;
    let dims = src.dims4()?;
    let kk = k.dim(2)?;
    let (gs, gl) = src.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (Storage::Cpu(s), Storage::Cpu(kc)) = (&*gs, &*ks) else {
        candle_core::bail!("shifted conv2d: CPU tensors only");
    };
    match src.dtype() {
        DType::F64 => {
            let (a, b) = (
                contiguous_slice::<f64>(s, gl, "conv2d")?,
                contiguous_slice::<f64>(kc, kl, "conv2d")?,
            );
            shifted(a, b, dims, kk, plan)
        }
        _ => {
            let (a, b) = (
                contiguous_slice::<f32>(s, gl, "conv2d")?,
                contiguous_slice::<f32>(kc, kl, "conv2d")?,
            );
            shifted(a, b, dims, kk, plan)
        }
    }
}

/// `out[n, o, y, x] = Σ_taps Σ_c K_tap[o, c] · src_p[n, c, y·Wp + x + offset(tap)]`.
fn shifted<T: Real + BlasFloat>(
    src: &[T],
    kernel: &[T],
    (n, c, h, w): (usize, usize, usize, usize),
    kk: usize,
    plan: Plan,
) -> Result<Tensor> {
    let Plan {
        m,
        strides: (krs, kcs),
        padding: p,
        mirror,
    } = plan;
    let (hp, wp) = (h + 2 * p, w + 2 * p);
    // Channel stride of the padded copy: 2p spare zeros keep the last tap's view in bounds.
    let plane = hp * wp + 2 * p;
    let mut padded = vec![T::ZERO; n * c * plane];
    par_rows(&mut padded, plane, |i, out| {
        let img = &src[i * h * w..(i + 1) * h * w];
        for (y, row) in img.chunks_exact(w).enumerate() {
            let at = (y + p) * wp + p;
            out[at..at + w].copy_from_slice(row);
        }
    });
    let cols = h * wp;
    // One band of output columns per thread and image: larger bands measured faster (the
    // gemm crate blocks each product for the caches itself), from 32 to 512 channels.
    let band = cols.div_ceil(candle_core::utils::get_num_threads().max(1));
    let bands = cols.div_ceil(band);
    // Each tap's offset into the padded input (tap t is kernel element t = ky·k + kx).
    let taps: Vec<usize> = (0..kk * kk)
        .map(|t| {
            let (ky, kx) = (t / kk, t % kk);
            match mirror {
                false => ky * wp + kx,
                true => (2 * p - ky) * wp + (2 * p - kx),
            }
        })
        .collect();
    let mut out = vec![T::ZERO; n * m * h * w];
    // The BLAS takes only products of at least its threshold (not a thin `conv_out`'s).
    if super::blas::available() && m * cols * c >= super::blas::MIN_PRODUCT {
        blas_products(&mut out, &padded, kernel, &taps, (n, c, h, w), plan)?;
        return Tensor::from_vec(out, (n, m, h, w), &Device::Cpu);
    }
    let outp = SharedMut::new(&mut out);
    let scratch = || vec![T::ZERO; m * band];
    par_for_scratch(n * bands, m * band * c, scratch, |buf, task| {
        let (img, b) = (task / bands, task % bands);
        let j0 = b * band;
        let len = band.min(cols - j0);
        let buf = &mut buf[..m * len];
        let src_img = &padded[img * c * plane..(img + 1) * c * plane];
        for (t, &at) in taps.iter().enumerate() {
            gemm(
                (m, len, c),
                (buf, len as isize, 1),
                (&kernel[t..], krs, kcs),
                (&src_img[at + j0..], plane as isize, 1),
                T::ONE,
                t > 0,
                T::ONE,
            );
        }
        // Columns j0..j0 + len of the row-padded grid: each padded row's first w columns are
        // output pixels, copied out as runs.
        let mut j = j0;
        while j < j0 + len {
            let (y, x) = (j / wp, j % wp);
            let end = (j - x + wp).min(j0 + len);
            if x < w {
                let take = (w - x).min(end - j);
                for o in 0..m {
                    let from = o * len + (j - j0);
                    // SAFETY: pixels (y, x..x + take) of channel o of image img lie in this
                    // task's band only.
                    let to = unsafe { outp.slice(((img * m + o) * h + y) * w + x, take) };
                    to.copy_from_slice(&buf[from..from + take]);
                }
            }
            j = end;
        }
    });
    Tensor::from_vec(out, (n, m, h, w), &Device::Cpu)
}

/// The products through the BLAS (which runs each on its own threads): the kernel's tap
/// slices copied to contiguous `[taps, m, c]` (CBLAS needs one unit stride; 9 × 0.4 MB for
/// a 320-channel 3×3 kernel), then per image one call per tap over the whole row-padded
/// grid, cropped into `out`.
fn blas_products<T: Real + BlasFloat>(
    out: &mut [T],
    padded: &[T],
    kernel: &[T],
    taps: &[usize],
    (n, c, h, w): (usize, usize, usize, usize),
    plan: Plan,
) -> Result<()> {
    let Plan {
        m,
        strides: (krs, kcs),
        padding: p,
        ..
    } = plan;
    let (wp, cols) = (w + 2 * p, h * (w + 2 * p));
    let plane = (h + 2 * p) * wp + 2 * p;
    let mut kr = vec![T::ZERO; taps.len() * m * c];
    par_rows(&mut kr, m * c, |t, dst| {
        for (i, row) in dst.chunks_exact_mut(c).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = kernel[t + i * krs as usize + j * kcs as usize];
            }
        }
    });
    let mut buf = vec![T::ZERO; m * cols];
    for img in 0..n {
        let src = &padded[img * c * plane..(img + 1) * c * plane];
        for (t, &at) in taps.iter().enumerate() {
            let done = super::blas::gemm_rows(
                (m, cols, c),
                (&kr[t * m * c..(t + 1) * m * c], c),
                (&src[at..], plane),
                &mut buf,
                t > 0,
            );
            if !done {
                candle_core::bail!("shifted conv2d: product {m}x{cols}x{c} too large for CBLAS");
            }
        }
        par_rows(
            &mut out[img * m * h * w..(img + 1) * m * h * w],
            h * w,
            |o, dst| {
                for (y, row) in dst.chunks_exact_mut(w).enumerate() {
                    let at = o * cols + y * wp;
                    row.copy_from_slice(&buf[at..at + w]);
                }
            },
        );
    }
    Ok(())
}
