//! 3×3 "same" convolutions (stride 1, padding 1) on the CPU by Winograd's minimal filtering
//! F(2×2, 3×3): 16 products of the transformed kernel by the transformed input instead of 9
//! products over the whole image, so 2.25× fewer multiply-adds.
//!
//! The output is cut into 2×2 tiles; tile `(ty, tx)` reads the 4×4 input patch at rows and
//! columns `2t − 1 .. 2t + 3` (zero outside the image). With the standard matrices
//!
//! ```text
//! Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1]   G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1]
//! Aᵀ = [1 1 1 0; 0 1 −1 −1]
//! ```
//!
//! each input patch `d` becomes `V = Bᵀ d B`, each kernel slice `g = W[o, c]` becomes
//! `U = G g Gᵀ`, and for every one of the 16 positions `ξ` of a 4×4 transform,
//! `M_ξ[o, tile] = Σ_c U_ξ[o, c] · V_ξ[c, tile]` is one product `[out, in] @ [in, tiles]`;
//! the tile's output is `Aᵀ M A`. All factors are sums and halvings, so the values equal the
//! direct convolution to f32 rounding (the parity tests bound it). The input gradient is the
//! same transform with the kernel's transpose, flipped in both spatial dims.
//!
//! Output channels are taken in blocks, and the tiles in chunks of tile rows, whose
//! transformed kernel, transformed input (16/4 = 4× the input) and products stay within
//! [`BLOCK_BYTES`] each; the transformed kernel is built once per call where it fits (none is
//! kept between calls: frozen weights stay the only copy).

use super::par::{
    contiguous_slice, gemm, output_buffer, par_for, par_for_scratch, par_rows, Real, SharedMut,
};
use candle_core::{DType, Device, Result, Storage, Tensor};

/// Fewest 2×2 output tiles per image served (16×16 outputs and up): smaller images make
/// products too narrow to gain from the transform (1280 channels at 8×8: 20.7 ms against
/// 14.3 ms as im2col on a 2-core Zen 4; at 16×16: 34 ms against 43 ms).
pub(crate) const MIN_TILES: usize = 8 * 8;

/// Fewest channels on either side: thin products (a 4-channel `conv_in` or `conv_out`) are
/// bound by memory, not by multiply-adds, and stay with the other forms.
const MIN_CHANNELS: usize = 64;

/// Largest transformed kernel block (16 · output channels · in · element bytes), and largest
/// transformed input and product per chunk of tile rows, built at once: a VAE's 128-channel
/// 512 × 512 conv would otherwise need 0.5 GB for each.
const BLOCK_BYTES: usize = 32 << 20;

/// Whether [`conv2d`] / [`conv2d_input_grad`] serve this convolution: CPU, f32 / f64, one
/// group (the caller's check), a 3×3 kernel, stride 1, padding 1, no dilation, at least
/// [`MIN_TILES`] tiles per image and [`MIN_CHANNELS`] channels in and out, and the BLAS's
/// product threshold per tap (so the tiny models keep their other forms bit for bit).
pub fn serves(x: &Tensor, k: &Tensor, padding: usize, stride: usize, dilation: usize) -> bool {
    let (Ok((_, _, h, w)), Ok((c_out, c_in, kh, kw))) = (x.dims4(), k.dims4()) else {
        return false;
    };
    x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && k.dtype() == x.dtype()
        && (kh, kw, padding, stride, dilation) == (3, 3, 1, 1, 1)
        && h.div_ceil(2) * w.div_ceil(2) >= MIN_TILES
        && c_in.min(c_out) >= MIN_CHANNELS
        && c_in * c_out * h * w >= super::blas::MIN_PRODUCT
}

/// `conv2d(x, k)` with padding 1 for `x` `[N, in, H, W]` and `k` `[out, in, 3, 3]`:
/// `[N, out, H, W]` (see [`serves`]).
pub fn conv2d(x: &Tensor, k: &Tensor) -> Result<Tensor> {
    super::profile::scope("conv2d-winograd", super::profile::Pass::Forward, || {
        run(x, k, false)
    })
}

/// The gradient w.r.t. the input of [`conv2d`] for the output gradient `g` `[N, out, H, W]`
/// and kernel `k` `[out, in, 3, 3]`: `[N, in, H, W]`.
pub fn conv2d_input_grad(g: &Tensor, k: &Tensor) -> Result<Tensor> {
    super::profile::scope("conv2d-winograd", super::profile::Pass::Backward, || {
        run(g, k, true)
    })
}

fn run(src: &Tensor, k: &Tensor, mirror: bool) -> Result<Tensor> {
    let (n, c, h, w) = src.dims4()?;
    let (ko, ki, kh, kw) = k.dims4()?;
    let (m, cc) = if mirror { (ki, ko) } else { (ko, ki) };
    if (kh, kw) != (3, 3) || cc != c || src.dtype() != k.dtype() {
        candle_core::bail!(
            "winograd conv2d: input {:?} vs kernel {:?}",
            src.shape(),
            k.shape()
        );
    }
    let src = src.contiguous()?;
    let k = k.contiguous()?;
    let (gs, gl) = src.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (Storage::Cpu(s), Storage::Cpu(kc)) = (&*gs, &*ks) else {
        candle_core::bail!("winograd conv2d: CPU tensors only");
    };
    let geo = Geom {
        n,
        c,
        h,
        w,
        m,
        mirror,
    };
    match src.dtype() {
        DType::F64 => {
            let a = contiguous_slice::<f64>(s, gl, "conv2d")?;
            let b = contiguous_slice::<f64>(kc, kl, "conv2d")?;
            winograd(a, b, geo)
        }
        DType::F32 => {
            let a = contiguous_slice::<f32>(s, gl, "conv2d")?;
            let b = contiguous_slice::<f32>(kc, kl, "conv2d")?;
            winograd(a, b, geo)
        }
        dt => candle_core::bail!("winograd conv2d: unsupported dtype {dt:?}"),
    }
}

/// One call: `n` images of `c` channels `h × w` in, `m` channels out; `mirror` reads the
/// kernel `[c, m, 3, 3]` transposed and flipped (input gradient), else as `[m, c, 3, 3]`.
#[derive(Clone, Copy)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    m: usize,
    mirror: bool,
}

impl Geom {
    /// Tiles per tile row, and tile rows per image.
    fn tiles(&self) -> (usize, usize) {
        (self.w.div_ceil(2), self.h.div_ceil(2))
    }
}

fn winograd<T: Real>(src: &[T], kernel: &[T], geo: Geom) -> Result<Tensor> {
    let Geom { n, c, h, w, m, .. } = geo;
    let (tw, th) = geo.tiles();
    let size = std::mem::size_of::<T>();
    let block = (BLOCK_BYTES / (16 * c * size).max(1)).clamp(1, m);
    // Tile rows (of all images, image-major) per chunk, so that the transformed input and
    // the products of one chunk stay within BLOCK_BYTES each.
    let chunk = (BLOCK_BYTES / (16 * c.max(block) * tw * size).max(1)).clamp(1, n * th);
    // SAFETY: the output transform writes every output pixel; the kernel and input
    // transforms write every element of their planes that the products read, and the
    // products write every element the output transform reads (planes' padding unread).
    let (mut out, mut u, mut prod, mut v) = unsafe {
        (
            output_buffer(n * m * h * w),
            output_buffer(16 * plane(block * c)),
            output_buffer(16 * plane(block * chunk * tw)),
            output_buffer(16 * plane(c * chunk * tw)),
        )
    };
    let single = block == m;
    if single {
        kernel_transform(kernel, geo, 0..m, &mut u);
    }
    for g0 in (0..n * th).step_by(chunk) {
        let tiles = g0..(g0 + chunk).min(n * th);
        let nt = tiles.len() * tw;
        let v = &mut v[..16 * plane(c * nt)];
        input_transform(src, geo, tiles.clone(), v);
        for o0 in (0..m).step_by(block) {
            let outs = o0..(o0 + block).min(m);
            let rows = outs.len();
            let u = &mut u[..16 * plane(rows * c)];
            if !single {
                kernel_transform(kernel, geo, outs.clone(), u);
            }
            let prod = &mut prod[..16 * plane(rows * nt)];
            products(u, v, prod, (rows, nt, c));
            output_transform(prod, geo, outs, tiles.clone(), &mut out);
        }
    }
    Tensor::from_vec(out, (n, m, h, w), &Device::Cpu)
}

/// The stride between the 16 positions' matrices of `len` elements: one cache line more, so
/// that the same row of every position does not fall in the same cache set (a 204 × 2560
/// f32 matrix is 0x1FE000 bytes: 4 KiB-aligned rows took the forward 2560 → 1280-channel
/// conv's kernel transform from 4.6 to 12 ms per block).
fn plane(len: usize) -> usize {
    len + 16
}

/// Writes `V[ξ][c][tile]` into `v` for the tile rows `rows` (numbered image-major over all
/// images; every element but the planes' padding is written): each
/// 4×4 input patch as `Bᵀ d B`, tiles in row-major order.
fn input_transform<T: Real>(src: &[T], geo: Geom, rows: std::ops::Range<usize>, v: &mut [T]) {
    let Geom { c, h, w, .. } = geo;
    let (tw, th) = geo.tiles();
    let nt = rows.len() * tw;
    // A padded row: one zero column on the left, the image row, zeros up to 2·tw + 2.
    let wp = 2 * tw + 2;
    let vs = plane(c * nt);
    let vp = SharedMut::new(v);
    par_for(c, nt * 16, |ch| {
        let mut d = vec![T::ZERO; 4 * wp];
        let mut col = [T::ZERO; 4];
        for (k, gr) in rows.clone().enumerate() {
            let (img, ty) = (gr / th, gr % th);
            let plane = &src[(img * c + ch) * h * w..(img * c + ch + 1) * h * w];
            // Input rows 2ty − 1 .. 2ty + 3, zero-padded, then Bᵀ over them in place.
            for (i, row) in d.chunks_exact_mut(wp).enumerate() {
                row.fill(T::ZERO);
                let y = (2 * ty + i).wrapping_sub(1);
                if y < h {
                    row[1..1 + w].copy_from_slice(&plane[y * w..(y + 1) * w]);
                }
            }
            for q in 0..wp {
                let (d0, d1, d2, d3) = (d[q], d[wp + q], d[2 * wp + q], d[3 * wp + q]);
                d[q] = d0 - d2;
                d[wp + q] = d1 + d2;
                d[2 * wp + q] = d2 - d1;
                d[3 * wp + q] = d1 - d3;
            }
            // Then B over each row's 4-column windows at even offsets.
            let base = ch * nt + k * tw;
            for i in 0..4 {
                let r = &d[i * wp..(i + 1) * wp];
                // SAFETY: row ch of every position belongs to this task (channel ch) only.
                let dst: [&mut [T]; 4] =
                    std::array::from_fn(|j| unsafe { vp.slice((4 * i + j) * vs + base, tw) });
                let [v0, v1, v2, v3] = dst;
                for tx in 0..tw {
                    col.copy_from_slice(&r[2 * tx..2 * tx + 4]);
                    v0[tx] = col[0] - col[2];
                    v1[tx] = col[1] + col[2];
                    v2[tx] = col[2] - col[1];
                    v3[tx] = col[1] - col[3];
                }
            }
        }
    });
}

/// Output channels per task of [`kernel_transform`]. The input gradient's kernel is read
/// transposed: each task first copies its channels' taps into memory order, one run of
/// `KERNEL_ROWS` · 9 contiguous taps per input channel (reading nine taps per page instead
/// took the 1280-channel 16×16 input gradient 83 ms against the forward's 48).
const KERNEL_ROWS: usize = 64;

/// Input channels transformed at once by [`kernel_tiles`] (one vector register's f32s).
const LANES: usize = 16;

/// `U[ξ][o − o0][c]` for the output channels `outs`: each 3×3 kernel slice as `G g Gᵀ`.
fn kernel_transform<T: Real>(kernel: &[T], geo: Geom, outs: std::ops::Range<usize>, u: &mut [T]) {
    let Geom { c, m, mirror, .. } = geo;
    let rows = outs.len();
    let us = plane(rows * c);
    let up = SharedMut::new(u);
    let tasks = rows.div_ceil(KERNEL_ROWS);
    par_for_scratch(
        tasks,
        KERNEL_ROWS * c * 16,
        Vec::new,
        |tmp: &mut Vec<T>, rb| {
            let block = rb * KERNEL_ROWS..((rb + 1) * KERNEL_ROWS).min(rows);
            let first = outs.start + block.start;
            // Taps g[ky][kx] of output channel o, input channel ch: [(o − first) · c + ch][·].
            let taps: &[T] = if mirror {
                tmp.resize(block.len() * c * 9, T::ZERO);
                for ch in 0..c {
                    let src = &kernel[(ch * m + first) * 9..][..block.len() * 9];
                    for (i, g) in src.chunks_exact(9).enumerate() {
                        let dst = &mut tmp[(i * c + ch) * 9..][..9];
                        for t in 0..9 {
                            dst[t] = g[8 - t];
                        }
                    }
                }
                tmp
            } else {
                &kernel[first * c * 9..][..block.len() * c * 9]
            };
            tile_rows(taps, c, us, block, &up)
        },
    );
}

/// Writes the transformed kernel rows `block` of `U` from `taps` (`[row][ch][9]`).
fn tile_rows<T: Real>(
    taps: &[T],
    c: usize,
    us: usize,
    block: std::ops::Range<usize>,
    up: &SharedMut<T>,
) {
    for (i, r) in block.enumerate() {
        let row = &taps[i * c * 9..][..c * 9];
        for ch0 in (0..c).step_by(LANES) {
            let lanes = LANES.min(c - ch0);
            let mut g = [[T::ZERO; LANES]; 9];
            for (l, taps) in row[ch0 * 9..][..lanes * 9].chunks_exact(9).enumerate() {
                for t in 0..9 {
                    g[t][l] = taps[t];
                }
            }
            for (xi, vals) in kernel_tiles(&g).iter().enumerate() {
                // SAFETY: rows `block` of every position belong to this task only.
                let dst = unsafe { up.slice(xi * us + r * c + ch0, lanes) };
                dst.copy_from_slice(&vals[..lanes]);
            }
        }
    }
}

/// `G g Gᵀ` (4 × 4, row-major) of [`LANES`] 3×3 kernel slices at once, `g[t][lane]` holding
/// tap `t` (row-major) of each.
#[inline(always)]
fn kernel_tiles<T: Real>(g: &[[T; LANES]; 9]) -> [[T; LANES]; 16] {
    let half = T::from_f64(0.5);
    // G g (4 × 3), then (G g) Gᵀ (4 × 4).
    let mut gg = [[T::ZERO; LANES]; 12];
    for x in 0..3 {
        for l in 0..LANES {
            let (a, b, e) = (g[x][l], g[3 + x][l], g[6 + x][l]);
            gg[x][l] = a;
            gg[3 + x][l] = half * (a + b + e);
            gg[6 + x][l] = half * (a - b + e);
            gg[9 + x][l] = e;
        }
    }
    let mut out = [[T::ZERO; LANES]; 16];
    for y in 0..4 {
        for l in 0..LANES {
            let (a, b, e) = (gg[3 * y][l], gg[3 * y + 1][l], gg[3 * y + 2][l]);
            out[4 * y][l] = a;
            out[4 * y + 1][l] = half * (a + b + e);
            out[4 * y + 2][l] = half * (a - b + e);
            out[4 * y + 3][l] = e;
        }
    }
    out
}

/// `prod[ξ] = u[ξ] @ v[ξ]` for the 16 positions (`[rows, c] @ [c, nt]` each), one position
/// per worker on the `gemm` crate (measured faster than one multi-threaded BLAS call per
/// position: 0.98 s against 1.38 s for the SD 1.5 UNet's 3×3 convs at 512 px on a 2-core
/// Zen 4), so the values do not depend on whether a BLAS is loaded.
fn products<T: Real>(u: &[T], v: &[T], prod: &mut [T], (rows, nt, c): (usize, usize, usize)) {
    let (us, vs, ps) = (plane(rows * c), plane(c * nt), plane(rows * nt));
    par_rows(prod, ps, |xi, p| {
        gemm(
            (rows, nt, c),
            (p, nt as isize, 1),
            (&u[xi * us..], c as isize, 1),
            (&v[xi * vs..], nt as isize, 1),
            T::ONE,
            false,
            T::ONE,
        );
    });
}

/// Each tile's 2×2 output `Aᵀ M A` for the output channels `outs` and the tile rows `rows`,
/// cropped to the image.
fn output_transform<T: Real>(
    prod: &[T],
    geo: Geom,
    outs: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    out: &mut [T],
) {
    let Geom { h, w, m, .. } = geo;
    let (tw, th) = geo.tiles();
    let nt = rows.len() * tw;
    let ps = plane(outs.len() * nt);
    let op = SharedMut::new(out);
    par_for(outs.len(), nt * 16, |r| {
        let o = outs.start + r;
        let mut s = vec![T::ZERO; 8 * tw];
        for (k, gr) in rows.clone().enumerate() {
            let (img, ty) = (gr / th, gr % th);
            let base = r * nt + k * tw;
            let mrow = |xi: usize| &prod[xi * ps + base..][..tw];
            // Aᵀ over the rows i of each column j: s[j] = m0j + m1j + m2j, s[4 + j] = m1j − m2j − m3j.
            for j in 0..4 {
                let (m0, m1, m2, m3) = (mrow(j), mrow(4 + j), mrow(8 + j), mrow(12 + j));
                for tx in 0..tw {
                    s[j * tw + tx] = m0[tx] + m1[tx] + m2[tx];
                    s[(4 + j) * tw + tx] = m1[tx] - m2[tx] - m3[tx];
                }
            }
            for a in 0..2 {
                let y = 2 * ty + a;
                if y >= h {
                    break;
                }
                // SAFETY: channel o of every image belongs to this task only.
                let dst = unsafe { op.slice(((img * m + o) * h + y) * w, w) };
                let srow = |j: usize| &s[(4 * a + j) * tw..][..tw];
                let (s0, s1, s2, s3) = (srow(0), srow(1), srow(2), srow(3));
                for tx in 0..tw {
                    let x = 2 * tx;
                    dst[x] = s0[tx] + s1[tx] + s2[tx];
                    if x + 1 < w {
                        dst[x + 1] = s1[tx] - s2[tx] - s3[tx];
                    }
                }
            }
        }
    });
}
