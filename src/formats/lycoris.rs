//! One layer's tensors as read from a file → its [`LoraWeights`] of the right kind: plain LoRA
//! (`lora_down` / `lora_up`), LyCORIS LoHa (`hada_*`) or LoKr (`lokr_*`); any other mix is an
//! error naming what is missing or extra.
//!
//! The weight shape a LoHa / LoKr adapts is spelled by the factors for linear layers and
//! Tucker convolutions; for other convolutions (`hada_w1_b` [r, in·k·k]) it comes from the
//! model architecture the keys were resolved against.

use crate::lora::{FactorName, Factors, KronFactor, LayerKey, LoHa, LoKr, LoraWeights};
use anyhow::{bail, Context};
use candle_core::Tensor;
use std::collections::BTreeMap;

/// The shape `factors` adapt: from `shape_of` when it fits the factors' element count,
/// else `[out, inner]` when the factors are 2-d, else `spelled` (4-d factors).
/// A LyCORIS `dora_scale` of shape `[1, in, 1, 1]` (norm per input column) also spells the
/// kernel: `inner = in · k · k`.
fn resolve_shape(
    layer: &LayerKey,
    out: usize,
    inner: usize,
    spelled: Option<Vec<usize>>,
    shape_of: &dyn Fn(&LayerKey) -> Option<Vec<usize>>,
    magnitude: Option<&[usize]>,
) -> Vec<usize> {
    if let Some(s) = spelled {
        return s;
    }
    match shape_of(layer) {
        Some(s) if s[0] == out && s[1..].iter().product::<usize>() == inner => s,
        _ => match magnitude {
            Some(&[1, c, 1, 1]) if c > 0 && inner.is_multiple_of(c) => {
                let kk = inner / c;
                let k = (kk as f64).sqrt().round() as usize;
                if k * k == kk {
                    vec![out, c, k, k]
                } else {
                    vec![out, inner]
                }
            }
            _ => vec![out, inner],
        },
    }
}

/// Removes `name` from `extra`; an error naming the missing tensor.
fn take(extra: &mut BTreeMap<FactorName, Tensor>, name: FactorName) -> anyhow::Result<Tensor> {
    extra.remove(&name).with_context(|| {
        format!(
            "no {} (a LyCORIS layer with some of its tensors)",
            name.file_name()
        )
    })
}

/// Tensors of the LoHa `extra` as a LoHa adapting its weight.
fn loha(
    layer: &LayerKey,
    extra: &mut BTreeMap<FactorName, Tensor>,
    shape_of: &dyn Fn(&LayerKey) -> Option<Vec<usize>>,
    magnitude: Option<&[usize]>,
) -> anyhow::Result<LoraWeights> {
    let w1_a = take(extra, FactorName::HadaW1A)?;
    let w1_b = take(extra, FactorName::HadaW1B)?;
    let w2_a = take(extra, FactorName::HadaW2A)?;
    let w2_b = take(extra, FactorName::HadaW2B)?;
    let (t1, t2) = (
        extra.remove(&FactorName::HadaT1),
        extra.remove(&FactorName::HadaT2),
    );
    for (n, t) in [
        ("hada_w1_a", &w1_a),
        ("hada_w1_b", &w1_b),
        ("hada_w2_a", &w2_a),
        ("hada_w2_b", &w2_b),
    ] {
        if t.rank() < 2 {
            bail!("{n} has shape {:?}, expected a matrix", t.dims());
        }
    }
    let shape = match (&t1, &t2) {
        (Some(t), Some(_)) if t.rank() == 4 => {
            vec![w1_a.dims()[1], w1_b.dims()[1], t.dims()[2], t.dims()[3]]
        }
        (Some(_), Some(_)) => bail!("hada_t1 must be 4-d [r, r, k, k]"),
        (None, None) => {
            let inner = w1_b.dims()[1..].iter().product();
            resolve_shape(layer, w1_a.dims()[0], inner, None, shape_of, magnitude)
        }
        _ => bail!("a Tucker LoHa needs both hada_t1 and hada_t2, the file has one"),
    };
    let h = LoHa {
        w1_a,
        w1_b,
        w2_a,
        w2_b,
        t1,
        t2,
    };
    Ok(LoraWeights::lycoris(Factors::LoHa(h), 1.0, &shape)?)
}

/// One LoKr side: the full tensor or both low-rank factors.
fn kron_side(
    extra: &mut BTreeMap<FactorName, Tensor>,
    full: FactorName,
    a: FactorName,
    b: FactorName,
) -> anyhow::Result<KronFactor> {
    match (extra.remove(&full), extra.remove(&a), extra.remove(&b)) {
        (Some(w), None, None) => Ok(KronFactor::Full(w)),
        (None, Some(x), Some(y)) => Ok(KronFactor::Product(x, y)),
        (None, Some(_), None) => bail!("{} without {}", a.file_name(), b.file_name()),
        (None, None, Some(_)) => bail!("{} without {}", b.file_name(), a.file_name()),
        (None, None, None) => bail!(
            "no {} (nor {} / {})",
            full.file_name(),
            a.file_name(),
            b.file_name()
        ),
        _ => bail!(
            "both {} and {} / {}",
            full.file_name(),
            a.file_name(),
            b.file_name()
        ),
    }
}

/// Tensors of the LoKr `extra` as a LoKr adapting its weight.
fn lokr(
    layer: &LayerKey,
    extra: &mut BTreeMap<FactorName, Tensor>,
    shape_of: &dyn Fn(&LayerKey) -> Option<Vec<usize>>,
    magnitude: Option<&[usize]>,
) -> anyhow::Result<LoraWeights> {
    use FactorName::*;
    let w1 = kron_side(extra, LokrW1, LokrW1A, LokrW1B)?;
    let w2 = kron_side(extra, LokrW2, LokrW2A, LokrW2B)?;
    let t2 = extra.remove(&LokrT2);
    let dims = |f: &KronFactor| -> anyhow::Result<(usize, Vec<usize>)> {
        let (rows, cols) = match f {
            KronFactor::Full(w) => (
                w.dims().first().copied(),
                w.dims().get(1..).map(<[usize]>::to_vec),
            ),
            KronFactor::Product(a, b) => (
                a.dims().first().copied(),
                b.dims().get(1..).map(<[usize]>::to_vec),
            ),
        };
        match (rows, cols) {
            (Some(r), Some(c)) if !c.is_empty() => Ok((r, c)),
            _ => bail!("LoKr factors must be matrices"),
        }
    };
    let (a, c) = dims(&w1)?;
    let c = c.iter().product::<usize>();
    // Tucker: w2_a [r, b], w2_b [r, d]; else w2 / w2_a have b rows.
    let (b, d) = match (&t2, &w2) {
        (Some(_), KronFactor::Product(x, y)) if x.rank() == 2 && y.rank() == 2 => {
            (x.dims()[1], vec![y.dims()[1]])
        }
        (Some(_), _) => bail!("lokr_t2 needs 2-d lokr_w2_a and lokr_w2_b"),
        _ => dims(&w2)?,
    };
    let out = a * b;
    let spelled = match (&t2, &w2) {
        (Some(t), _) if t.rank() == 4 => Some(vec![out, c * d[0], t.dims()[2], t.dims()[3]]),
        (None, KronFactor::Full(w)) if w.rank() == 4 => {
            Some(vec![out, c * d[0], w.dims()[2], w.dims()[3]])
        }
        _ => None,
    };
    let shape = resolve_shape(
        layer,
        out,
        c * d.iter().product::<usize>(),
        spelled,
        shape_of,
        magnitude,
    );
    let k = LoKr { w1, w2, t2 };
    Ok(LoraWeights::lycoris(Factors::LoKr(k), 1.0, &shape)?)
}

/// The layer's weights (alpha 1; the caller sets it) from its plain factors or its LyCORIS
/// tensors `extra` (DoRA magnitudes already taken out; `magnitude` is the shape of the
/// layer's, a hint for the weight shape).
pub(crate) fn build(
    layer: &LayerKey,
    down: Option<Tensor>,
    up: Option<Tensor>,
    mut extra: BTreeMap<FactorName, Tensor>,
    shape_of: &dyn Fn(&LayerKey) -> Option<Vec<usize>>,
    magnitude: Option<&[usize]>,
) -> anyhow::Result<LoraWeights> {
    let loha_keys = extra.keys().any(|n| n.is_loha());
    let lokr_keys = extra.keys().any(|n| n.is_lokr());
    let plain = down.is_some() || up.is_some();
    let w = match (plain, loha_keys, lokr_keys) {
        (true, false, false) => match (down, up) {
            (Some(d), Some(u)) => LoraWeights::new(d, u, 1.0)?,
            (d, _) => bail!("no {} factor", if d.is_none() { "down" } else { "up" }),
        },
        (false, true, false) => loha(layer, &mut extra, shape_of, magnitude)?,
        (false, false, true) => lokr(layer, &mut extra, shape_of, magnitude)?,
        (false, false, false) => bail!("no factors (only a DoRA magnitude or an alpha)"),
        _ => bail!("tensors of several kinds (lora_down/up, hada_*, lokr_*) for one layer"),
    };
    if let Some(n) = extra.keys().next() {
        bail!(
            "{} does not belong to a {} layer",
            n.file_name(),
            w.kind_label()
        );
    }
    Ok(w)
}
