//! One layer's tensors as read from a file → its [`LoraWeights`] of the right kind: plain LoRA
//! (`lora_down` / `lora_up`), LyCORIS LoHa (`hada_*`) or LoKr (`lokr_*`); any other mix is an
//! error naming what is missing or extra.
//!
//! The weight shape a LoHa / LoKr adapts is spelled by the factors for linear layers and
//! Tucker convolutions; for other convolutions (`hada_w1_b` [r, in·k·k]) it comes from the
//! model architecture the keys were resolved against.
//!
//! Also here: the last step of every reader ([`finish_shaped`]) and the writer of one layer's
//! tensors ([`Encoded::push_layer`]), which handle every kind.

use super::keymap::{self, short_list};
use super::{Cast, Encoded, LoraFile, RawLayer, ReadContext};
use crate::lora::{FactorName, Factors, KronFactor, LayerKey, LoHa, LoKr, LoraSet, LoraWeights};
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

/// The weight shape of each layer in the first candidate architecture that has it (the shape
/// a LoHa / LoKr layer's flattened factors adapt).
pub(crate) fn arch_shapes<'a>(
    ctx: &'a ReadContext<'a>,
) -> impl Fn(&LayerKey) -> Option<Vec<usize>> + 'a {
    move |k: &LayerKey| {
        ctx.candidates()
            .iter()
            .find_map(|a| a.layers().get(k).cloned())
    }
}

/// [`finish`] for files that may hold LoHa / LoKr / DoRA layers: `shape_of` gives the weight
/// shape of a layer where the factors do not spell it.
pub(crate) fn finish_shaped(
    file: &LoraFile,
    raw: BTreeMap<LayerKey, RawLayer>,
    default_alpha: impl Fn(&LayerKey, usize) -> anyhow::Result<f64>,
    shape_of: &dyn Fn(&LayerKey) -> Option<Vec<usize>>,
) -> anyhow::Result<LoraSet> {
    let mut out = BTreeMap::new();
    let mut problems = vec![];
    for (layer, mut r) in raw {
        let mut tensors: Vec<(String, &Tensor)> = vec![];
        if let Some(d) = &r.down {
            tensors.push(("down".into(), d));
        }
        if let Some(u) = &r.up {
            tensors.push(("up".into(), u));
        }
        for (n, t) in &r.extra {
            tensors.push((n.file_name().into(), t));
        }
        if let Some(e) = tensors
            .iter()
            .find_map(|(n, t)| crate::tensor_file::check_finite(t, &format!("{layer} {n}")).err())
        {
            problems.push(e.to_string());
            continue;
        }
        let magnitude = r
            .extra
            .remove(&crate::lora::FactorName::DoraScale)
            .map(|m| (m, true))
            .or_else(|| {
                r.extra
                    .remove(&crate::lora::FactorName::Magnitude)
                    .map(|m| (m, false))
            });
        let hint = magnitude.as_ref().map(|(m, _)| m.dims().to_vec());
        let w = match build(&layer, r.down, r.up, r.extra, shape_of, hint.as_deref()) {
            Ok(w) => w,
            Err(e) => {
                problems.push(format!("{layer}: {e:#}"));
                continue;
            }
        };
        let alpha = match r.alpha {
            Some(a) => a,
            None => default_alpha(&layer, w.rank())?,
        };
        if !alpha.is_finite() {
            problems.push(format!("{layer}: alpha is {alpha}"));
            continue;
        }
        let w = w.with_alpha(alpha);
        let w = match magnitude {
            None => w,
            Some((m, lycoris_key)) => {
                let shape = w.delta_shape();
                let style = if lycoris_key {
                    crate::lora::Dora::lycoris_style(&m, &shape)
                } else {
                    crate::lora::DoraStyle::Peft
                };
                let key = if lycoris_key {
                    "dora_scale"
                } else {
                    "lora_magnitude_vector"
                };
                match w.with_dora(crate::lora::Dora {
                    magnitude: m,
                    style,
                }) {
                    Ok(w) => w,
                    Err(e) => {
                        problems.push(format!("{layer}: {key}: {e}"));
                        continue;
                    }
                }
            }
        };
        out.insert(layer, w);
    }
    if !problems.is_empty() {
        bail!(
            "{}: {} malformed layers:{}",
            file.path.display(),
            problems.len(),
            short_list(&problems, 20)
        );
    }
    Ok(LoraSet {
        layers: out,
        embeddings: vec![],
        metadata: file.metadata.clone(),
    })
}

impl Encoded {
    /// Adds `layer`'s tensors under `scheme`'s keys: down and up (plain LoRA) or the LyCORIS
    /// factors, then, with `with_alpha`, its alpha as a 0-d f32 tensor, then the DoRA
    /// magnitude (`dora_scale` in schemes that have it, else `lora_magnitude_vector`), in the
    /// order LyCORIS writes them. A kind the scheme cannot name is an error naming the layer.
    pub(crate) fn push_layer(
        &mut self,
        scheme: &keymap::KeyScheme,
        layer: &LayerKey,
        w: &LoraWeights,
        with_alpha: bool,
    ) -> anyhow::Result<()> {
        let key = |p| {
            keymap::format_key(scheme, layer, p, None).with_context(|| {
                format!(
                    "cannot name layer {layer} ({}) in {} keys",
                    w.kind_label(),
                    scheme.name
                )
            })
        };
        match w.low_rank_pair() {
            Some((down, up)) => {
                self.tensors
                    .push((key(keymap::Part::Down)?, down.clone(), Cast::Weight));
                self.tensors
                    .push((key(keymap::Part::Up)?, up.clone(), Cast::Weight));
            }
            None => {
                let named = match w.factors() {
                    crate::lora::Factors::LoHa(h) => h.tensors(),
                    crate::lora::Factors::LoKr(k) => k.tensors(),
                    crate::lora::Factors::LowRank { .. } => vec![],
                };
                for (n, t) in named {
                    let k = keymap::format_key(scheme, layer, keymap::Part::Extra(n), None)
                        .with_context(|| {
                            format!(
                                "cannot write layer {layer}: a {} layer has no {} keys (kohya \
                                 and our format hold LyCORIS factors; other formats take plain \
                                 LoRA)",
                                w.kind_label(),
                                scheme.name
                            )
                        })?;
                    self.tensors.push((k, t.clone(), Cast::Weight));
                }
            }
        }
        if with_alpha {
            let alpha = Tensor::new(w.alpha() as f32, &candle_core::Device::Cpu)?;
            self.tensors
                .push((key(keymap::Part::Alpha)?, alpha, Cast::Keep));
        }
        if let Some(d) = w.dora() {
            use crate::lora::{DoraStyle, FactorName};
            let name = match d.style {
                DoraStyle::Lycoris { .. } => FactorName::DoraScale,
                DoraStyle::Peft => FactorName::Magnitude,
            };
            let k = keymap::format_key(scheme, layer, keymap::Part::Extra(name), None)
                .with_context(|| {
                    format!(
                        "cannot write layer {layer}: {} keys have no {} (its DoRA magnitude \
                         follows {} rule, which this format does not carry)",
                        scheme.name,
                        name.file_name(),
                        if name == FactorName::DoraScale {
                            "LyCORIS'"
                        } else {
                            "PEFT's"
                        }
                    )
                })?;
            self.tensors.push((k, d.magnitude.clone(), Cast::Weight));
        }
        Ok(())
    }
}
