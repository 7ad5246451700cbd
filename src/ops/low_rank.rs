//! The thin products of a rank-r adapter's backward in one pass over the rows, on the CPU:
//! with `H = s · X Dᵀ` recomputed, `∂U = Gᵀ H`, `∂H = s · G U` and `∂D = ∂Hᵀ X`, where `X`
//! `[rows, in]` is the layer input, `G` `[rows, out]` the output gradient, `D` `[r, in]` and
//! `U` `[out, r]` the factors.
//!
//! Run as separate products, each of the four reads `X` or `G` whole from memory (r ≪ in,
//! out: they are memory-bound), and the two that sum over the rows split poorly over
//! threads. Here the rows are cut into chunks of [`CHUNK`]; each task reads its chunk of `X`
//! and `G` once (into cache) for all four products, and keeps its own partial `∂U`, `∂D`;
//! the partials are then summed in chunk order, so results do not depend on the threads.

use super::par::{gemm, output_buffer, par_for, with_slices, Real, SharedMut};
use candle_core::{DType, Device, Result, Tensor};

/// Rows per task.
const CHUNK: usize = 256;

/// The adapter gradients [`grads`] returns.
pub(crate) struct Grads {
    /// `∂H = s · G U` `[rows, r]` (for the input gradient `G W + ∂H D`), when asked.
    pub gh: Option<Tensor>,
    /// `∂D` `[r, in]`, when asked.
    pub gd: Option<Tensor>,
    /// `∂U` `[out, r]`, when asked.
    pub gu: Option<Tensor>,
}

/// Which gradients to form: `∂H`, `∂D` (needs `∂H`'s rows), `∂U`.
#[derive(Clone, Copy)]
pub(crate) struct Want {
    /// `∂H`, returned.
    pub gh: bool,
    /// `∂D`.
    pub gd: bool,
    /// `∂U`.
    pub gu: bool,
}

/// The gradients `want` asks for, for contiguous-able f32 / f64 CPU tensors of one dtype
/// (`x` `[rows, in]`, `g` `[rows, out]`, `d` `[r, in]`, `u` `[out, r]`); `None` where the
/// kernel does not serve (another device or dtype), for the caller's tensor-op form.
pub(crate) fn grads([x, g, d, u]: [&Tensor; 4], scale: f64, want: Want) -> Result<Option<Grads>> {
    let dt = x.dtype();
    let cpu = [x, g, d, u]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == dt);
    if !cpu || !matches!(dt, DType::F32 | DType::F64) {
        return Ok(None);
    }
    let ((rows, in_f), (g_rows, out_f), (r, d_in), (u_out, u_r)) =
        (x.dims2()?, g.dims2()?, d.dims2()?, u.dims2()?);
    if g_rows != rows || d_in != in_f || u_out != out_f || u_r != r || rows == 0 || r == 0 {
        candle_core::bail!(
            "low-rank grads: x {:?}, g {:?}, down {:?}, up {:?} do not fit",
            x.dims(),
            g.dims(),
            d.dims(),
            u.dims()
        );
    }
    let geom = Geom {
        rows,
        in_f,
        out_f,
        r,
    };
    let out = match dt {
        DType::F32 => with_slices::<f32, _>("low-rank grads", &[x, g, d, u], |s| {
            run::<f32>(geom, [s[0], s[1], s[2], s[3]], scale, want)
        })??,
        _ => with_slices::<f64, _>("low-rank grads", &[x, g, d, u], |s| {
            run::<f64>(geom, [s[0], s[1], s[2], s[3]], scale, want)
        })??,
    };
    Ok(Some(out))
}

/// The sizes of one call.
#[derive(Clone, Copy)]
struct Geom {
    rows: usize,
    in_f: usize,
    out_f: usize,
    r: usize,
}

fn run<T: Real + 'static>(
    gm: Geom,
    [x, g, d, u]: [&[T]; 4],
    scale: f64,
    want: Want,
) -> Result<Grads> {
    let Geom {
        rows,
        in_f,
        out_f,
        r,
    } = gm;
    let need_gh = want.gh || want.gd;
    let chunks = rows.div_ceil(CHUNK);
    let s = T::from_f64(scale);
    // Every product is formed transposed (`Hᵀ = s · D Xᵀ`, `∂Hᵀ = s · Uᵀ Gᵀ`, `∂Uᵀ = Hᵀ G`,
    // `∂D = ∂Hᵀ X`): the gemm kernels then run their vector lanes along a long side (rows
    // of the chunk, `in`, `out`), not along r.
    // SAFETY (all three): every element is written by a task's gemm (without reading the
    // destination) before anything reads it: chunk c owns block c (`[r, rows in chunk]`) of `∂Hᵀ` and
    // partial c of `gu_p` / `gd_p`.
    let mut ght = unsafe { output_buffer::<T>(if need_gh { r * rows } else { 0 }) };
    let mut gu_p = unsafe { output_buffer::<T>(if want.gu { chunks * r * out_f } else { 0 }) };
    let mut gd_p = unsafe { output_buffer::<T>(if want.gd { chunks * r * in_f } else { 0 }) };
    let (ghp, gup, gdp) = (
        SharedMut::new(&mut ght),
        SharedMut::new(&mut gu_p),
        SharedMut::new(&mut gd_p),
    );
    let (ii, oo, rr) = (in_f as isize, out_f as isize, r as isize);
    par_for(chunks, CHUNK * (in_f + out_f) * r, |c| {
        let r0 = c * CHUNK;
        let n = CHUNK.min(rows - r0);
        let nn = n as isize;
        let xc = &x[r0 * in_f..(r0 + n) * in_f];
        let gc = &g[r0 * out_f..(r0 + n) * out_f];
        if want.gu {
            let mut ht = vec![T::ZERO; r * n];
            gemm(
                (r, n, in_f),
                (&mut ht, nn, 1),
                (d, ii, 1),
                (xc, 1, ii),
                s,
                false,
                T::ONE,
            );
            // SAFETY: partial c belongs to this task alone.
            let gu_c = unsafe { gup.slice(c * r * out_f, r * out_f) };
            gemm(
                (r, out_f, n),
                (gu_c, oo, 1),
                (&ht, nn, 1),
                (gc, oo, 1),
                T::ONE,
                false,
                T::ONE,
            );
        }
        if need_gh {
            // SAFETY: the chunk's block `[r, n]` of ∂Hᵀ belongs to this task alone.
            let ghc = unsafe { ghp.slice(r0 * r, r * n) };
            gemm(
                (r, n, out_f),
                (&mut *ghc, nn, 1),
                (u, 1, rr),
                (gc, 1, oo),
                s,
                false,
                T::ONE,
            );
            if want.gd {
                // SAFETY: partial c belongs to this task alone.
                let gd_c = unsafe { gdp.slice(c * r * in_f, r * in_f) };
                gemm(
                    (r, in_f, n),
                    (gd_c, ii, 1),
                    (&*ghc, nn, 1),
                    (xc, ii, 1),
                    T::ONE,
                    false,
                    T::ONE,
                );
            }
        }
    });
    let dev = Device::Cpu;
    let sum = |p: Vec<T>, len: usize| -> Vec<T> {
        let mut acc = p[..len].to_vec();
        for part in p[len..].chunks_exact(len) {
            for (a, &b) in acc.iter_mut().zip(part) {
                *a += b;
            }
        }
        acc
    };
    let gu = match want.gu {
        true => {
            let ut = Tensor::from_vec(sum(gu_p, r * out_f), (r, out_f), &dev)?;
            Some(ut.t()?.contiguous()?)
        }
        false => None,
    };
    let gd = match want.gd {
        true => Some(Tensor::from_vec(sum(gd_p, r * in_f), (r, in_f), &dev)?),
        false => None,
    };
    // ∂H `[rows, r]` from the chunks' blocks of ∂Hᵀ.
    let gh = match want.gh {
        true => {
            let mut h = vec![T::ZERO; rows * r];
            for (c, block) in ght.chunks(CHUNK * r).enumerate() {
                let n = block.len() / r;
                for (j, col) in block.chunks_exact(n).enumerate() {
                    for (i, &v) in col.iter().enumerate() {
                        h[(c * CHUNK + i) * r + j] = v;
                    }
                }
            }
            Some(Tensor::from_vec(h, (rows, r), &dev)?)
        }
        false => None,
    };
    Ok(Grads { gh, gd, gu })
}
