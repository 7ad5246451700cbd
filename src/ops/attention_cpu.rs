//! The attention forms' work on the CPU as one fused kernel per head (f32 / f64, contiguous
//! `[G, N, d]` inputs, no mask): FlashAttention's blocking over queries with cache-sized
//! blocks, products through the `gemm` crate (the kernels candle's own matmul uses).
//!
//! A forward block of [`BLOCK_ROWS`] queries of one head holds its scores `[rows, Nk]` (1 MiB
//! for 4096 keys in f32; 32, 128 and 256 rows, and key tiles with an online softmax, measured
//! no faster), turns them into probabilities in place (row max, exp, sum; the row
//! log-sum-exp kept), and multiplies them by `V` straight into the output.
//! The backward walks each head in tiles of queries × keys (`BACKWARD_TILE`), FlashAttention-2
//! style: `P = exp(scale · q kᵀ − L)`, `dV += Pᵀ dO`, `dP = dO Vᵀ`,
//! `dS = scale · P ⊙ (dP − D)`, `dQ += dS K`, `dK += dSᵀ q`, where each row's
//! `D = rowsum(dO ⊙ O) = rowsum(P ⊙ dP)` comes from the forward's output `O`. Heads run in
//! parallel (each owns its `dQ`, `dK`, `dV`), as do the forward's blocks. Only `L` is saved
//! beyond the output the graph holds anyway; the values equal the other forms to rounding.

use super::par::{gemm, par_for, par_for_scratch, reduce2, simd, with_slices, Real, SharedMut};
use candle_core::{DType, Device, Result, Tensor};

/// Queries per block of the forward.
pub(crate) const BLOCK_ROWS: usize = 64;

/// Queries × keys per tile of the backward: its `P` and `dP` tiles (160 KiB each in f32)
/// stay in a core's L2 cache (64 × 4096 tiles spilled to L3: 1.3x the time measured; 128
/// to 512 rows by 128 to 256 keys measured within 5 % of this).
const BACKWARD_TILE: (usize, usize) = (256, 160);

/// The geometry of one call.
#[derive(Clone, Copy)]
struct Geom {
    g: usize,
    nq: usize,
    nk: usize,
    d: usize,
    dv: usize,
}

impl Geom {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        let ((g, nq, d), (_, nk, _), (_, _, dv)) = (q.dims3()?, k.dims3()?, v.dims3()?);
        Ok(Self { g, nq, nk, d, dv })
    }
}

/// `exp(x − max)` over each row of `s` (`[rows, nk]`, already scaled) in place; returns
/// each row's `1 / Σ` (to scale the output rows by) and log-sum-exp.
fn exp_rows<T: Real>(s: &mut [T], nk: usize) -> (Vec<T>, Vec<T>) {
    s.chunks_exact_mut(nk)
        .map(|row| {
            let m = T::row_max(row);
            let sum = T::exp_sub_sum(row, m);
            (T::from_f64(1.0 / sum), T::from_f64(m.to_f64() + sum.ln()))
        })
        .unzip()
}

/// Forward: the output `[G, Nq, dv]` and the row log-sum-exp `[G, Nq]`.
pub(crate) fn forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    match q.dtype() {
        DType::F64 => forward_t::<f64>(q, k, v, scale),
        _ => forward_t::<f32>(q, k, v, scale),
    }
}

fn forward_t<T: Real + 'static>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let gm = Geom::of(q, k, v)?;
    with_slices::<T, _>("fused attention", &[q, k, v], |s| {
        forward_slices(gm, s[0], s[1], s[2], scale)
    })?
}

fn forward_slices<T: Real + 'static>(
    gm: Geom,
    qd: &[T],
    kd: &[T],
    vd: &[T],
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let Geom { g, nq, nk, d, dv } = gm;
    let mut out = vec![T::ZERO; g * nq * dv];
    let mut lse = vec![T::ZERO; g * nq];
    let blocks = nq.div_ceil(BLOCK_ROWS);
    let (outp, lsep) = (SharedMut::new(&mut out), SharedMut::new(&mut lse));
    let sc = T::from_f64(scale);
    let scratch = || vec![T::ZERO; BLOCK_ROWS * nk];
    par_for_scratch(g * blocks, BLOCK_ROWS * nk * d, scratch, |s, task| {
        let (gi, b) = (task / blocks, task % blocks);
        let r0 = b * BLOCK_ROWS;
        let rows = BLOCK_ROWS.min(nq - r0);
        let qb = &qd[(gi * nq + r0) * d..(gi * nq + r0 + rows) * d];
        let kg = &kd[gi * nk * d..(gi + 1) * nk * d];
        let vg = &vd[gi * nk * dv..(gi + 1) * nk * dv];
        let s = &mut s[..rows * nk];
        let dims = (rows, nk, d);
        gemm(
            dims,
            (s, nk as isize, 1),
            (qb, d as isize, 1),
            (kg, 1, d as isize),
            sc,
            false,
            T::ONE,
        );
        let (inv, l) = exp_rows(s, nk);
        // SAFETY: block (gi, b) owns rows r0..r0 + rows of head gi, in `out` and `lse`.
        let (o, ls) = unsafe {
            (
                outp.slice((gi * nq + r0) * dv, rows * dv),
                lsep.slice(gi * nq + r0, rows),
            )
        };
        ls.copy_from_slice(&l);
        // The unnormalised probabilities times V, then each output row scaled by 1 / Σ.
        gemm(
            (rows, dv, nk),
            (o, dv as isize, 1),
            (s, nk as isize, 1),
            (vg, dv as isize, 1),
            T::ONE,
            false,
            T::ONE,
        );
        for (orow, &iv) in o.chunks_exact_mut(dv).zip(&inv) {
            for x in orow {
                *x *= iv;
            }
        }
    });
    let dev = Device::Cpu;
    Ok((
        Tensor::from_vec(out, (g, nq, dv), &dev)?,
        Tensor::from_vec(lse, (g, nq), &dev)?,
    ))
}

/// Backward: the gradients of the tracked inputs (`track` = q, k, v) for the output
/// gradient `dout` `[G, Nq, dv]`, from the inputs, the forward's output `out` and its
/// log-sum-exp.
pub(crate) fn backward(
    [q, k, v]: [&Tensor; 3],
    track: [bool; 3],
    lse: &Tensor,
    dout: &Tensor,
    out: &Tensor,
    scale: f64,
) -> Result<super::attention::Grads3> {
    match q.dtype() {
        DType::F64 => backward_t::<f64>([q, k, v], track, lse, dout, out, scale),
        _ => backward_t::<f32>([q, k, v], track, lse, dout, out, scale),
    }
}

fn backward_t<T: Real + 'static>(
    [q, k, v]: [&Tensor; 3],
    [tq, tk, tv]: [bool; 3],
    lse: &Tensor,
    dout: &Tensor,
    out: &Tensor,
    scale: f64,
) -> Result<super::attention::Grads3> {
    let gm = Geom::of(q, k, v)?;
    let dout = dout.to_dtype(q.dtype())?;
    let out = out.to_dtype(q.dtype())?;
    with_slices::<T, _>("fused attention", &[q, k, v, lse, &dout, &out], |s| {
        backward_slices(
            gm,
            [s[0], s[1], s[2], s[3], s[4], s[5]],
            [tq, tk, tv],
            scale,
        )
    })?
}

fn backward_slices<T: Real + 'static>(
    gm: Geom,
    [qd, kd, vd, ld, god, od]: [&[T]; 6],
    [tq, tk, tv]: [bool; 3],
    scale: f64,
) -> Result<super::attention::Grads3> {
    let Geom { g, nq, nk, d, dv } = gm;
    let (br, bc) = BACKWARD_TILE;
    let mut dq = vec![T::ZERO; if tq { g * nq * d } else { 0 }];
    let mut dk = vec![T::ZERO; if tk { g * nk * d } else { 0 }];
    let mut dvv = vec![T::ZERO; if tv { g * nk * dv } else { 0 }];
    let (dqp, dkp, dvp) = (
        SharedMut::new(&mut dq),
        SharedMut::new(&mut dk),
        SharedMut::new(&mut dvv),
    );
    let sc = T::from_f64(scale);
    par_for(g, nq * nk * d, |gi| {
        // SAFETY: head gi owns its slices of dK, dV and its rows of dQ.
        let (dkg, dvg) = unsafe {
            (
                if tk {
                    dkp.slice(gi * nk * d, nk * d)
                } else {
                    &mut [][..]
                },
                if tv {
                    dvp.slice(gi * nk * dv, nk * dv)
                } else {
                    &mut [][..]
                },
            )
        };
        let mut p = vec![T::ZERO; br * bc];
        let mut dp = vec![T::ZERO; br * bc];
        let mut drow = vec![T::ZERO; br];
        for r0 in (0..nq).step_by(br) {
            let rows = br.min(nq - r0);
            let base = gi * nq + r0;
            let qb = &qd[base * d..(base + rows) * d];
            let gb = &god[base * dv..(base + rows) * dv];
            let ob = &od[base * dv..(base + rows) * dv];
            let lb = &ld[base..base + rows];
            for ((dr, gr), or) in drow
                .iter_mut()
                .zip(gb.chunks_exact(dv))
                .zip(ob.chunks_exact(dv))
            {
                *dr = T::from_f64(reduce2(gr, or, |a, b| (a * b).to_f64()));
            }
            // SAFETY: rows r0..r0 + rows of head gi, owned by this task.
            let dqb = if tq {
                unsafe { dqp.slice(base * d, rows * d) }
            } else {
                &mut [][..]
            };
            for c0 in (0..nk).step_by(bc) {
                let cols = bc.min(nk - c0);
                let kt = &kd[(gi * nk + c0) * d..(gi * nk + c0 + cols) * d];
                let vt = &vd[(gi * nk + c0) * dv..(gi * nk + c0 + cols) * dv];
                let (p, dp) = (&mut p[..rows * cols], &mut dp[..rows * cols]);
                gemm(
                    (rows, cols, d),
                    (p, cols as isize, 1),
                    (qb, d as isize, 1),
                    (kt, 1, d as isize),
                    sc,
                    false,
                    T::ONE,
                );
                for (row, &l) in p.chunks_exact_mut(cols).zip(lb) {
                    T::exp_sub_inplace(row, l);
                }
                if tv {
                    let dvt = &mut dvg[c0 * dv..(c0 + cols) * dv];
                    gemm(
                        (cols, dv, rows),
                        (dvt, dv as isize, 1),
                        (p, 1, cols as isize),
                        (gb, dv as isize, 1),
                        T::ONE,
                        r0 > 0,
                        T::ONE,
                    );
                }
                if !(tq || tk) {
                    continue;
                }
                gemm(
                    (rows, cols, dv),
                    (dp, cols as isize, 1),
                    (gb, dv as isize, 1),
                    (vt, 1, dv as isize),
                    T::ONE,
                    false,
                    T::ONE,
                );
                simd(|| {
                    for ((prow, dprow), &ds) in p
                        .chunks_exact(cols)
                        .zip(dp.chunks_exact_mut(cols))
                        .zip(&drow)
                    {
                        for (o, &pv) in dprow.iter_mut().zip(prow) {
                            *o = sc * pv * (*o - ds);
                        }
                    }
                });
                if tq {
                    gemm(
                        (rows, d, cols),
                        (dqb, d as isize, 1),
                        (dp, cols as isize, 1),
                        (kt, d as isize, 1),
                        T::ONE,
                        c0 > 0,
                        T::ONE,
                    );
                }
                if tk {
                    let dkt = &mut dkg[c0 * d..(c0 + cols) * d];
                    gemm(
                        (cols, d, rows),
                        (dkt, d as isize, 1),
                        (dp, 1, cols as isize),
                        (qb, d as isize, 1),
                        T::ONE,
                        r0 > 0,
                        T::ONE,
                    );
                }
            }
        }
    });
    let dev = Device::Cpu;
    let mk = |v: Vec<T>, on: bool, shape: (usize, usize, usize)| -> Result<Option<Tensor>> {
        match on {
            true => Ok(Some(Tensor::from_vec(v, shape, &dev)?)),
            false => Ok(None),
        }
    };
    Ok((
        mk(dq, tq, (g, nq, d))?,
        mk(dk, tk, (g, nk, d))?,
        mk(dvv, tv, (g, nk, dv))?,
    ))
}
