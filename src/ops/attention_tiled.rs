//! The tiled (memory-efficient) form of [`super::attention`]: query tiles whose scores stay
//! under a byte budget, the row log-sum-exp saved for the backward, probabilities
//! recomputed tile by tile there (algorithm and memory in the docs of `attention.rs`).

use super::attention::{note_block, CoreBwd, Dims};
use super::softmax::{backward_owned, exp_lse_owned, softmax_lse_owned, softmax_owned};
use super::Kernel;
use candle_core::{Result, Tensor};

/// Query rows per tile so that one score tile `[groups, rows, nk]` of `elem`-byte values
/// stays within `budget` bytes (at least one row), balanced so the tiles are equally long.
pub(crate) fn tile_rows(groups: usize, nq: usize, nk: usize, elem: usize, budget: usize) -> usize {
    let per_row = groups.saturating_mul(nk).saturating_mul(elem).max(1);
    let rows = (budget / per_row).clamp(1, nq.max(1));
    let tiles = nq.div_ceil(rows).max(1);
    nq.div_ceil(tiles).max(1)
}

/// The `(start, len)` query ranges of the tiles.
fn tiles(nq: usize, rows: usize) -> Vec<(usize, usize)> {
    (0..nq)
        .step_by(rows.max(1))
        .map(|s| (s, rows.min(nq - s)))
        .collect()
}

/// Everything a tile needs besides the inputs: geometry, scale, mask, kernel.
struct Plan {
    groups: usize,
    nq: usize,
    nk: usize,
    lead: Vec<usize>,
    scale: f64,
    /// The mask in the compute dtype, graph-free.
    mask: Option<Tensor>,
    kernel: Kernel,
    tiles: Vec<(usize, usize)>,
}

impl Plan {
    /// The scores `q_t kᵀ` of one tile `[G, len, Nk]` with the scale and the mask applied
    /// when there is a mask; returns them with the scale the softmax still has to apply.
    fn scores(
        &self,
        q3: &Tensor,
        kt: &Tensor,
        (start, len): (usize, usize),
    ) -> Result<(Tensor, f64)> {
        let s = q3.narrow(1, start, len)?.matmul(kt)?;
        note_block(s.elem_count());
        let Some(m) = &self.mask else {
            return Ok((s, self.scale));
        };
        // A mask row dim of 1 broadcasts over the queries; one of Nq is cut like them.
        let mr = m.rank();
        let m = match mr >= 2 && m.dim(mr - 2)? == self.nq && self.nq != 1 {
            true => m.narrow(mr - 2, start, len)?,
            false => m.clone(),
        };
        let mut shape = self.lead.clone();
        shape.extend([len, self.nk]);
        let s = s
            .affine(self.scale, 0.0)?
            .reshape(shape)?
            .broadcast_add(&m)?;
        Ok((s.reshape((self.groups, len, self.nk))?, 1.0))
    }
}

/// `t` `[..., n, c]` as `[groups, n, c]` (a view when `t` is contiguous).
fn flat(t: &Tensor, groups: usize) -> Result<Tensor> {
    let r = t.rank();
    t.reshape((groups, t.dim(r - 2)?, t.dim(r - 1)?))
}

/// `a + b`, or `b` when there is no `a` yet.
fn accumulate(a: Option<Tensor>, b: Tensor) -> Result<Option<Tensor>> {
    Ok(Some(match a {
        Some(a) => (a + b)?,
        None => b,
    }))
}

/// The tiled attention on graph-free `q`, `k`, `v` in the compute dtype (shapes checked
/// into `dims`), tiles of at most `budget` bytes; the backward is built only when `track`.
pub(crate) fn core(
    [q, k, v]: [&Tensor; 3],
    track: bool,
    scale: f64,
    mask: Option<&Tensor>,
    dims: &Dims,
    budget: usize,
    kernel: Kernel,
) -> Result<(Tensor, Option<CoreBwd>)> {
    let g = dims.groups;
    let rows = tile_rows(g, dims.nq, dims.nk, q.dtype().size_in_bytes(), budget);
    let plan = Plan {
        groups: g,
        nq: dims.nq,
        nk: dims.nk,
        lead: dims.lead.clone(),
        scale,
        mask: mask.cloned(),
        kernel,
        tiles: tiles(dims.nq, rows),
    };
    let (q3, k3, v3) = (flat(q, g)?, flat(k, g)?, flat(v, g)?);
    let kt = k3.t()?;
    let mut outs = Vec::with_capacity(plan.tiles.len());
    let mut lse = Vec::with_capacity(plan.tiles.len());
    for &tile in &plan.tiles {
        let (s, sm_scale) = plan.scores(&q3, &kt, tile)?;
        let p = if track {
            let (p, l) = softmax_lse_owned(s, sm_scale, kernel)?;
            lse.push(l);
            p
        } else {
            softmax_owned(s, sm_scale, kernel)?
        };
        outs.push(p.matmul(&v3)?);
    }
    let mut out_shape = dims.lead.clone();
    out_shape.extend([dims.nq, dims.dv]);
    let out = match outs.len() {
        1 => outs.pop().expect("one tile").reshape(out_shape)?,
        _ => Tensor::cat(&outs, 1)?.reshape(out_shape)?,
    };
    drop(outs);
    if !track {
        return Ok((out, None));
    }
    let bwd = move |[q, k, v]: [&Tensor; 3], [tq, tk, tv]: [bool; 3], grad: &Tensor, _: &Tensor| {
        let g = plan.groups;
        let (q3, k3, v3) = (flat(q, g)?, flat(k, g)?, flat(v, g)?);
        let g3 = flat(grad, g)?;
        let (kt, vt) = (k3.t()?, v3.t()?);
        let (mut dq, mut dk, mut dv) = (Vec::new(), None, None);
        for (&tile, l) in plan.tiles.iter().zip(&lse) {
            let (s, sm_scale) = plan.scores(&q3, &kt, tile)?;
            let p = exp_lse_owned(s, l, sm_scale, plan.kernel)?;
            let gt = g3.narrow(1, tile.0, tile.1)?;
            if tv {
                dv = accumulate(dv, p.t()?.matmul(&gt)?)?;
            }
            if !(tq || tk) {
                continue;
            }
            let dp = gt.matmul(&vt)?;
            note_block(dp.elem_count());
            // d/dS of softmax(scale · S + mask) = scale · P ⊙ (dP − rowsum(P ⊙ dP)), mask or
            // not: the whole key range of a query row is in its tile.
            let ds = backward_owned(&p, dp, plan.scale, plan.kernel)?;
            drop(p);
            if tq {
                dq.push(ds.matmul(&k3)?);
            }
            if tk {
                dk = accumulate(dk, ds.t()?.matmul(&q3.narrow(1, tile.0, tile.1)?)?)?;
            }
        }
        let dq = match tq {
            true => Some(match dq.len() {
                1 => dq.pop().expect("one tile").reshape(q.shape())?,
                _ => Tensor::cat(&dq, 1)?.reshape(q.shape())?,
            }),
            false => None,
        };
        let dk = dk.map(|t| t.reshape(k.shape())).transpose()?;
        let dv = dv.map(|t| t.reshape(v.shape())).transpose()?;
        Ok((dq, dk, dv))
    };
    Ok((out, Some(Box::new(bwd) as CoreBwd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_queries_within_the_budget() {
        // 8 heads × 4096 keys in f32 = 128 KiB per query row; 64 MiB → 512 rows, 8 tiles.
        assert_eq!(tile_rows(8, 4096, 4096, 4, 64 << 20), 512);
        // Budget below one row: one row per tile.
        assert_eq!(tile_rows(8, 10, 4096, 4, 1), 1);
        // 100 queries, at most 30 rows a tile: 4 balanced tiles of 25.
        assert_eq!(tile_rows(1, 100, 10, 4, 30 * 40), 25);
        let t = tiles(10, 4);
        assert_eq!(t, vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(tiles(0, 1), vec![]);
    }
}
