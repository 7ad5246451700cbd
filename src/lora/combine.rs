//! Joining two LoRAs into one with weights w₁, w₂: `lpl` (the original code's factor
//! interpolation), `ljl` (exact join by concatenating the factors) and `svd` (the exact join
//! re-compressed to a given rank).
//!
//! Every computation runs in f64 on the CPU. ΔW of a layer is `scale · up · down` with
//! `scale = alpha / rank`, seen as an `out × (in·kh·kw)` matrix for convolutions.

use super::svd::{svd_of_product, Mat};
use super::{LayerKey, LoraSet, LoraWeights};
use anyhow::{bail, Context};
use candle_core::{DType, Device};
use std::collections::BTreeMap;

/// A layer's factors as matrices: `up` out×r and `down` r×(in·kh·kw), scale not applied.
/// An error for LoHa / LoKr / DoRA layers, which have no such pair.
pub fn factor_mats(l: &LoraWeights) -> candle_core::Result<(Mat, Mat)> {
    match l.low_rank_pair() {
        Some((down, up)) if l.dora().is_none() => {
            Ok((Mat::from_tensor(up)?, Mat::from_tensor(down)?))
        }
        _ => candle_core::bail!(
            "a {} layer has no plain LoRA factors to join (joins take plain LoRA only)",
            l.kind_label()
        ),
    }
}

/// ΔW of one layer in f64, as an `out × (in·kh·kw)` matrix (the matrix form of
/// [`crate::lora::delta_weight`], for the SVD code). An error for DoRA layers, whose change
/// depends on the base weight ([`crate::lora::merged_weight`]).
pub fn delta_mat(l: &LoraWeights) -> candle_core::Result<Mat> {
    if l.dora().is_some() {
        candle_core::bail!(
            "a {} layer's change depends on the base weight; it has no ΔW of its own",
            l.kind_label()
        );
    }
    match factor_mats(l) {
        Ok((up, down)) => Ok(up.matmul(&down)?.scaled(l.scale())),
        Err(_) => Mat::from_tensor(&super::merge::delta_weight_in(l, DType::F64)?),
    }
}

/// Refuses LoHa / LoKr / DoRA layers of `set` for a join, naming each.
fn require_plain(set: &LoraSet, which: &str) -> anyhow::Result<()> {
    let bad: Vec<String> = set
        .layers
        .iter()
        .filter(|(_, l)| !l.is_plain())
        .map(|(k, l)| format!("{k} ({})", l.kind_label()))
        .collect();
    if !bad.is_empty() {
        bail!(
            "the {which} LoRA has {} layer(s) that are not plain LoRA; lpl / ljl / svd joins take \
             plain LoRA factors only:{}",
            bad.len(),
            bad.iter()
                .take(12)
                .map(|b| format!("\n    {b}"))
                .collect::<String>()
        );
    }
    Ok(())
}

/// Builds a layer from matrix factors, shaped like `like` (same kernel) but with the rank of
/// `down`, stored as `dtype` on the CPU.
pub fn layer_from_mats(
    up: &Mat,
    down: &Mat,
    alpha: f64,
    like: &LoraWeights,
    dtype: DType,
) -> candle_core::Result<LoraWeights> {
    let r = down.rows;
    let mut down_shape = like.down().dims().to_vec();
    down_shape[0] = r;
    let mut up_shape = like.up().dims().to_vec();
    up_shape[1] = r;
    LoraWeights::new(
        down.to_tensor(&down_shape, dtype, &Device::Cpu)?,
        up.to_tensor(&up_shape, dtype, &Device::Cpu)?,
        alpha,
    )
}

/// The learned tokens of a join: every token of `a`, then those of `b` that `a` lacks (on a
/// conflict the first LoRA's vector wins, as the original `lora_add` keeps path_1's).
pub fn joined_embeddings(a: &LoraSet, b: &LoraSet) -> Vec<super::LearnedToken> {
    let mut out = LoraSet {
        embeddings: a.embeddings.clone(),
        ..LoraSet::default()
    };
    out.merge_embeddings(&b.embeddings);
    out.embeddings
}

/// Checks that both sides adapt a layer of the same shape.
fn check_same_shape(name: &str, a: &LoraWeights, b: &LoraWeights) -> anyhow::Result<()> {
    let (sa, sb) = (a.delta_shape(), b.delta_shape());
    if sa != sb {
        bail!("layer {name}: the first LoRA adapts a weight of shape {sa:?}, the second one of shape {sb:?}");
    }
    Ok(())
}

/// The dtype merged layers are stored in: the first LoRA's (f32 when it has none).
fn out_dtype(a: &LoraSet, b: &LoraSet) -> DType {
    a.layers
        .values()
        .chain(b.layers.values())
        .next()
        .map(|l| l.dtype())
        .unwrap_or(DType::F32)
}

/// Relative Frobenius error of the `lpl` rule on one layer.
#[derive(Debug, Clone)]
pub struct LayerError {
    /// Component-prefixed module path.
    pub name: String,
    /// ‖ΔW_lpl − ΔW_exact‖_F.
    pub error: f64,
    /// ‖ΔW_exact‖_F.
    pub exact_norm: f64,
}

impl LayerError {
    /// error / exact_norm (0 when both are 0, ∞ when only the exact ΔW is 0).
    pub fn relative(&self) -> f64 {
        relative(self.error, self.exact_norm)
    }
}

fn relative(err: f64, norm: f64) -> f64 {
    if err == 0.0 {
        0.0
    } else if norm == 0.0 {
        f64::INFINITY
    } else {
        err / norm
    }
}

/// What `lpl` measured: per-layer and overall error against the exact weighted sum.
#[derive(Debug, Clone)]
pub struct LplReport {
    /// Every layer, in module-path order.
    pub layers: Vec<LayerError>,
    /// Layers whose two scales (alpha / rank) differ: scales were folded into `up` first.
    pub folded: usize,
    /// Layers where a rank-1 side was broadcast against the other side's rank.
    pub broadcast: usize,
}

impl LplReport {
    /// sqrt(Σ error²) / sqrt(Σ ‖exact‖²) over all layers.
    pub fn overall(&self) -> f64 {
        let e: f64 = self.layers.iter().map(|l| l.error * l.error).sum();
        let n: f64 = self
            .layers
            .iter()
            .map(|l| l.exact_norm * l.exact_norm)
            .sum();
        relative(e.sqrt(), n.sqrt())
    }

    /// The layer with the largest relative error.
    pub fn worst(&self) -> Option<&LayerError> {
        self.layers
            .iter()
            .max_by(|a, b| a.relative().total_cmp(&b.relative()))
    }
}

/// `lpl`, the original code's rule: `up = w₁·up₁ + w₂·up₂`, `down = w₁·down₁ + w₂·down₂` on
/// every layer (the seed CLI's `--alpha A` is w₁ = A, w₂ = 1−A; the later CLI's `--alpha_1`,
/// `--alpha_2` give both). It is not w₁·ΔW₁ + w₂·ΔW₂: the product has cross terms; the report
/// measures by how much. Both LoRAs must adapt the same layers with the same shapes.
///
/// Ranks: equal, or one side of rank 1 against rank r, which is repeated r times before mixing
/// (the original adds the stored tensors, so PyTorch broadcasts an `out×1` up against `out×r`
/// and a `1×in` down against `r×in`); any other pair of ranks is refused.
///
/// Alphas: when a layer's two scales alpha/rank are equal the raw factors are mixed and the
/// scale kept (alpha = scale · merged rank); when they differ each side's scale is folded into
/// its `up` before mixing and alpha is set to the merged rank (scale 1), so a LoRA mixed with
/// itself gives itself back (w₁ + w₂ = 1).
pub fn lpl(a: &LoraSet, b: &LoraSet, w1: f64, w2: f64) -> anyhow::Result<(LoraSet, LplReport)> {
    require_plain(a, "first")?;
    require_plain(b, "second")?;
    check_lpl_compatible(a, b)?;
    let dtype = out_dtype(a, b);
    let mut out = LoraSet {
        embeddings: joined_embeddings(a, b),
        ..LoraSet::default()
    };
    let mut report = LplReport {
        layers: vec![],
        folded: 0,
        broadcast: 0,
    };
    for (name, la) in &a.layers {
        let lb = &b.layers[name];
        let ctx = || format!("lpl on layer {name}");
        let (ua, da) = factor_mats(la).with_context(ctx)?;
        let (ub, db) = factor_mats(lb).with_context(ctx)?;
        let rank = la.rank().max(lb.rank());
        if la.rank() != lb.rank() {
            report.broadcast += 1;
        }
        let (ua_r, da_r) = repeat_rank(&ua, &da, rank)?;
        let (ub_r, db_r) = repeat_rank(&ub, &db, rank)?;
        let (sa, sb) = (la.scale(), lb.scale());
        let (fa, fb, new_alpha) = if sa == sb {
            let alpha = if la.rank() == rank {
                la.alpha
            } else {
                lb.alpha
            };
            (1.0, 1.0, alpha)
        } else {
            report.folded += 1;
            (sa, sb, rank as f64)
        };
        let up = ua_r.scaled(w1 * fa).add_scaled(&ub_r, w2 * fb)?;
        let down = da_r.scaled(w1).add_scaled(&db_r, w2)?;
        let merged_scale = new_alpha / rank as f64;
        let got = up.matmul(&down)?.scaled(merged_scale);
        let exact = ua
            .matmul(&da)?
            .scaled(w1 * sa)
            .add_scaled(&ub.matmul(&db)?, w2 * sb)?;
        let error = got.add_scaled(&exact, -1.0)?.frob_sq().sqrt();
        report.layers.push(LayerError {
            name: name.to_string(),
            error,
            exact_norm: exact.frob_sq().sqrt(),
        });
        let like = if la.rank() == rank { la } else { lb };
        let layer = layer_from_mats(&up, &down, new_alpha, like, dtype).with_context(ctx)?;
        out.layers.insert(name.clone(), layer);
    }
    out.metadata = merge_metadata("lpl", w1, w2, None);
    Ok((out, report))
}

/// Factors of rank 1 repeated to rank `r` (up's column, down's row), as PyTorch broadcasting
/// does; factors already of rank `r` are returned as they are.
fn repeat_rank(up: &Mat, down: &Mat, r: usize) -> candle_core::Result<(Mat, Mat)> {
    let (mut u, mut d) = (up.clone(), down.clone());
    if down.rows != r {
        for _ in 1..r {
            u = u.hcat(up)?;
            d = d.vcat(down)?;
        }
    }
    Ok((u, d))
}

/// Lists every way two LoRAs differ in targets, ranks or shapes (one error). Ranks may differ
/// when one of them is 1 (broadcast, see [`lpl`]).
fn check_lpl_compatible(a: &LoraSet, b: &LoraSet) -> anyhow::Result<()> {
    let only_a: Vec<&LayerKey> = a
        .layers
        .keys()
        .filter(|k| !b.layers.contains_key(*k))
        .collect();
    let only_b: Vec<&LayerKey> = b
        .layers
        .keys()
        .filter(|k| !a.layers.contains_key(*k))
        .collect();
    let mut ranks = vec![];
    let mut shapes = vec![];
    for (name, la) in &a.layers {
        if let Some(lb) = b.layers.get(name) {
            let (ra, rb) = (la.rank(), lb.rank());
            let (ad, au, bd, bu) = (
                la.down().dims(),
                la.up().dims(),
                lb.down().dims(),
                lb.up().dims(),
            );
            let same_geometry =
                ad[1..] == bd[1..] && au[0] == bu[0] && au[2..] == bu[2..] && ad.len() == bd.len();
            if !same_geometry {
                shapes.push(format!(
                    "{name}: down {ad:?} / up {au:?} vs down {bd:?} / up {bu:?}"
                ));
            } else if ra != rb && ra != 1 && rb != 1 {
                ranks.push(format!("{name}: rank {ra} vs {rb}"));
            }
        }
    }
    if only_a.is_empty() && only_b.is_empty() && ranks.is_empty() && shapes.is_empty() {
        return Ok(());
    }
    let mut msg = String::from(
        "lpl needs two LoRAs with the same targets and shapes, and equal ranks or rank 1 against \
         rank r (it mixes the factors element by element, broadcasting a rank-1 factor as the \
         original does); use --mode ljl (exact, rank r₁+r₂) or --mode svd --rank R instead. \
         They differ:",
    );
    let mut section = |title: &str, items: Vec<String>| {
        if items.is_empty() {
            return;
        }
        msg.push_str(&format!("\n  {} {title}:", items.len()));
        for i in items.iter().take(12) {
            msg.push_str(&format!("\n    {i}"));
        }
        if items.len() > 12 {
            msg.push_str(&format!("\n    ... and {} more", items.len() - 12));
        }
    };
    section(
        "layers only in the first LoRA",
        only_a.iter().map(|s| s.to_string()).collect(),
    );
    section(
        "layers only in the second LoRA",
        only_b.iter().map(|s| s.to_string()).collect(),
    );
    section(
        "layers with different ranks (neither is 1, so they do not broadcast)",
        ranks,
    );
    section("layers with different shapes", shapes);
    bail!(msg)
}

/// `ljl`: the exact join `ΔW = w₁·ΔW₁ + w₂·ΔW₂` by concatenation (the original's `lora_join`
/// is w₁ = w₂ = 1). A layer in both LoRAs gets `up = [w₁·s₁·up₁, w₂·s₂·up₂]`,
/// `down = [down₁; down₂]` and alpha = rank = r₁ + r₂ (scale 1). A layer in one LoRA only is
/// kept with its weight folded into `up` and its alpha unchanged. A side whose weight is
/// exactly 0 contributes nothing.
pub fn ljl(a: &LoraSet, b: &LoraSet, w1: f64, w2: f64) -> anyhow::Result<LoraSet> {
    require_plain(a, "first")?;
    require_plain(b, "second")?;
    let dtype = out_dtype(a, b);
    let mut out = LoraSet {
        embeddings: joined_embeddings(a, b),
        ..LoraSet::default()
    };
    for (name, j) in join_mats(a, b, w1, w2)? {
        let layer = layer_from_mats(&j.up, &j.down, j.alpha, j.like, dtype)
            .with_context(|| format!("ljl on layer {name}"))?;
        out.layers.insert(name, layer);
    }
    out.metadata = merge_metadata("ljl", w1, w2, None);
    Ok(out)
}

/// One layer of an exact join, in f64: ΔW = (alpha / rank) · up · down.
struct Joined<'a> {
    up: Mat,
    down: Mat,
    alpha: f64,
    /// A source layer (for the kernel shape).
    like: &'a LoraWeights,
}

/// The exact join of [`ljl`] as f64 factors (no rounding to the storage dtype).
fn join_mats<'a>(
    a: &'a LoraSet,
    b: &'a LoraSet,
    wa: f64,
    wb: f64,
) -> anyhow::Result<Vec<(LayerKey, Joined<'a>)>> {
    let names: std::collections::BTreeSet<&LayerKey> =
        a.layers.keys().chain(b.layers.keys()).collect();
    let mut out = vec![];
    for name in names {
        let ctx = || format!("joining layer {name}");
        let sides: Vec<(&LoraWeights, f64)> = [(a.layers.get(name), wa), (b.layers.get(name), wb)]
            .into_iter()
            .filter_map(|(l, w)| l.filter(|_| w != 0.0).map(|l| (l, w)))
            .collect();
        let joined = match sides.as_slice() {
            [] => continue,
            [(l, w)] => {
                let (up, down) = factor_mats(l).with_context(ctx)?;
                Joined {
                    up: up.scaled(*w),
                    down,
                    alpha: l.alpha,
                    like: l,
                }
            }
            [(l1, w1), (l2, w2)] => {
                check_same_shape(name.as_str(), l1, l2)?;
                let (u1, d1) = factor_mats(l1).with_context(ctx)?;
                let (u2, d2) = factor_mats(l2).with_context(ctx)?;
                let up = u1
                    .scaled(w1 * l1.scale())
                    .hcat(&u2.scaled(w2 * l2.scale()))?;
                let down = d1.vcat(&d2)?;
                let r = down.rows as f64;
                Joined {
                    up,
                    down,
                    alpha: r,
                    like: l1,
                }
            }
            _ => unreachable!("at most two sides"),
        };
        out.push((name.clone(), joined));
    }
    Ok(out)
}

/// Energy kept by the SVD re-compression of one layer.
#[derive(Debug, Clone)]
pub struct LayerEnergy {
    /// Component-prefixed module path.
    pub name: String,
    /// Rank of ΔW before compression (r₁ + r₂ or r for a join; min(out, in) for extract).
    pub rank_in: usize,
    /// Rank kept.
    pub rank_out: usize,
    /// Σσ² over the kept values.
    pub kept: f64,
    /// Σσ² over all values (= ‖ΔW_exact‖²_F).
    pub total: f64,
    /// Singular values of ΔW, descending (all of them for a join, the top ones for extract).
    pub singular_values: Vec<f64>,
}

impl LayerEnergy {
    /// kept / total (1 for a zero layer).
    pub fn fraction(&self) -> f64 {
        if self.total == 0.0 {
            1.0
        } else {
            self.kept / self.total
        }
    }
}

/// Per-layer energies of an SVD compression plus the overall figure.
#[derive(Debug, Clone, Default)]
pub struct EnergyReport {
    /// Every layer, in module-path order.
    pub layers: Vec<LayerEnergy>,
}

impl EnergyReport {
    /// Σ kept / Σ total over all layers.
    pub fn overall(&self) -> f64 {
        let k: f64 = self.layers.iter().map(|l| l.kept).sum();
        let t: f64 = self.layers.iter().map(|l| l.total).sum();
        if t == 0.0 {
            1.0
        } else {
            k / t
        }
    }

    /// The layer keeping the smallest fraction of its energy.
    pub fn worst(&self) -> Option<&LayerEnergy> {
        self.layers
            .iter()
            .min_by(|a, b| a.fraction().total_cmp(&b.fraction()))
    }
}

/// `svd`: the exact join w₁·ΔW₁ + w₂·ΔW₂ (as [`ljl`]) re-compressed per layer to rank ≤ `rank` by SVD, the best
/// rank-R approximation in Frobenius norm (Eckart–Young). Factors are balanced
/// (`up = U·√Σ`, `down = √Σ·Vᵀ`) and alpha = the kept rank (scale 1). A layer whose exact rank
/// is below `rank` keeps its exact rank.
pub fn svd_join(
    a: &LoraSet,
    b: &LoraSet,
    w1: f64,
    w2: f64,
    rank: usize,
) -> anyhow::Result<(LoraSet, EnergyReport)> {
    if rank == 0 {
        bail!("--rank must be at least 1 for --mode svd");
    }
    let dtype = out_dtype(a, b);
    let mut out = LoraSet {
        embeddings: joined_embeddings(a, b),
        ..LoraSet::default()
    };
    let mut report = EnergyReport::default();
    for (name, j) in join_mats(a, b, w1, w2)? {
        let scale = j.alpha / j.down.rows as f64;
        let (layer, energy) = compress_layer(
            name.as_str(),
            &j.up.scaled(scale),
            &j.down,
            j.like,
            rank,
            dtype,
        )?;
        report.layers.push(energy);
        out.layers.insert(name, layer);
    }
    out.metadata = merge_metadata("svd", w1, w2, Some(rank));
    Ok((out, report))
}

/// Re-compresses every layer of `set` to rank ≤ `rank` by the SVD of its ΔW.
pub fn compress(set: &LoraSet, rank: usize) -> anyhow::Result<(LoraSet, EnergyReport)> {
    if rank == 0 {
        bail!("the rank must be at least 1");
    }
    let mut out = LoraSet {
        layers: BTreeMap::new(),
        embeddings: set.embeddings.clone(),
        metadata: set.metadata.clone(),
    };
    let mut report = EnergyReport::default();
    for (name, l) in &set.layers {
        let (up, down) = factor_mats(l).with_context(|| format!("SVD of layer {name}"))?;
        let (layer, energy) = compress_layer(
            name.as_str(),
            &up.scaled(l.scale()),
            &down,
            l,
            rank,
            l.dtype(),
        )?;
        report.layers.push(energy);
        out.layers.insert(name.clone(), layer);
    }
    Ok((out, report))
}

/// The best rank-≤`rank` factors of ΔW = up · down (scale already in `up`), balanced, alpha =
/// kept rank, stored as `dtype`.
fn compress_layer(
    name: &str,
    up: &Mat,
    down: &Mat,
    like: &LoraWeights,
    rank: usize,
    dtype: DType,
) -> anyhow::Result<(LoraWeights, LayerEnergy)> {
    let ctx = || format!("SVD of layer {name}");
    let svd = svd_of_product(up, down).with_context(ctx)?;
    let k = rank.min(svd.s.len()).max(1);
    let (u, d) = svd.factors(k);
    let kept: f64 = svd.s[..k.min(svd.s.len())].iter().map(|s| s * s).sum();
    let energy = LayerEnergy {
        name: name.to_string(),
        rank_in: down.rows,
        rank_out: d.rows,
        kept,
        total: svd.energy(),
        singular_values: svd.s.clone(),
    };
    let layer = layer_from_mats(&u, &d, d.rows as f64, like, dtype).with_context(ctx)?;
    Ok((layer, energy))
}

/// Metadata recording how a LoRA was merged.
fn merge_metadata(mode: &str, w1: f64, w2: f64, rank: Option<usize>) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("lora_add.mode".to_string(), mode.to_string());
    m.insert("lora_add.alpha_1".to_string(), w1.to_string());
    m.insert("lora_add.alpha_2".to_string(), w2.to_string());
    if let Some(r) = rank {
        m.insert("lora_add.rank".to_string(), r.to_string());
    }
    m
}
