//! LoRA: low-rank residuals `W' = W + scale · up · down` on the linear and convolution layers
//! of the UNet and the text encoder.
//!
//! [`LoraSet`] is the one in-memory form every file format reads into and writes from: layer
//! weights keyed by the full module path of the layer they adapt, prefixed by the model
//! component (`unet.` or `text_encoder.`), e.g.
//! `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.

pub mod combine;
pub mod extract;
pub mod single_file;
pub mod svd;
pub mod upl;
pub mod upl_tokens;

pub mod adapter;
pub mod host;
pub mod inject;
pub mod key;
pub mod kinds;
pub mod merge;
pub mod targets;

pub use adapter::{AdapterKind, LoraAdapter};
pub use host::{LayerRef, LoraHost};
pub use inject::{
    apply_lora_set, extract, inject_trainable, remove_all, set_enabled, set_scale, InjectedLora,
    LoraHandle,
};
pub use key::{Component, LayerKey};
pub use kinds::{Dora, DoraStyle, FactorName, Factors, KronFactor, LoHa, LoKr, LoraKind};
pub use merge::{collapse, delta_weight, merged_weight};
pub use targets::LoraTargets;

use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

/// The weights of one adapted layer: its factors ([`Factors`]: plain LoRA, LoHa or LoKr),
/// alpha, the shape of the weight they adapt and an optional DoRA magnitude.
///
/// Plain LoRA, Linear: `down` [r, in], `up` [out, r]. Conv2d: `down` [r, in, k, k] (the
/// original layer's kernel, stride and padding), `up` [out, r, 1, 1]. ΔW = (alpha / r) · up ·
/// down. LoHa / LoKr: see [`kinds`]. [`LoraWeights::new`], [`LoraWeights::lycoris`] and
/// [`LoraWeights::with_dora`] are the one place these shapes are checked.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    factors: Factors,
    alpha: f64,
    shape: Vec<usize>,
    dora: Option<Dora>,
}

fn check_float_same(ts: &[&Tensor], what: &str) -> candle_core::Result<()> {
    let first = ts[0];
    for t in ts {
        if !t.dtype().is_float() {
            candle_core::bail!(
                "{what} factors must be floating point, got {:?} (shape {:?})",
                t.dtype(),
                t.dims()
            );
        }
        if t.dtype() != first.dtype() || !t.device().same_device(first.device()) {
            candle_core::bail!(
                "{what} factors differ in dtype or device: {:?} on {:?} vs {:?} on {:?}",
                first.dtype(),
                first.device().location(),
                t.dtype(),
                t.device().location()
            );
        }
    }
    Ok(())
}

impl LoraWeights {
    /// Factors `down` and `up` with `alpha`; an error unless they form a Linear or a Conv2d
    /// LoRA (shapes above, r > 0) of one dtype on one device.
    pub fn new(down: Tensor, up: Tensor, alpha: f64) -> candle_core::Result<Self> {
        let (d, u) = (down.dims(), up.dims());
        let ok = match (d.len(), u.len()) {
            (2, 2) => d[0] == u[1],
            (4, 4) => d[0] == u[1] && u[2] == 1 && u[3] == 1,
            _ => false,
        };
        if !ok || d[0] == 0 {
            candle_core::bail!(
                "LoRA factors down {d:?}, up {u:?} do not form a LoRA (expected down \
                 [r, in(, k, k)], up [out, r(, 1, 1)], r > 0)"
            );
        }
        for t in [&down, &up] {
            if !t.dtype().is_float() {
                candle_core::bail!(
                    "LoRA factors must be floating point, got {:?} (down {d:?}, up {u:?})",
                    t.dtype()
                );
            }
        }
        if down.dtype() != up.dtype() || !down.device().same_device(up.device()) {
            candle_core::bail!(
                "LoRA factors differ in dtype or device: down {:?} on {:?}, up {:?} on {:?}",
                down.dtype(),
                down.device().location(),
                up.dtype(),
                up.device().location()
            );
        }
        let mut shape = vec![u[0]];
        shape.extend_from_slice(&d[1..]);
        Ok(Self {
            factors: Factors::LowRank { down, up },
            alpha,
            shape,
            dora: None,
        })
    }

    /// LyCORIS factors (LoHa or LoKr; [`Factors::LowRank`] goes through [`LoraWeights::new`])
    /// adapting a weight of `shape` (`[out, in]` or `[out, in, kh, kw]`), checked against it.
    pub fn lycoris(factors: Factors, alpha: f64, shape: &[usize]) -> candle_core::Result<Self> {
        if !(shape.len() == 2 || shape.len() == 4) || shape.contains(&0) {
            candle_core::bail!("a LyCORIS layer adapts a [out, in(, k, k)] weight, got {shape:?}");
        }
        let what = factors.kind().name();
        match &factors {
            Factors::LowRank { down, up } => {
                let w = Self::new(down.clone(), up.clone(), alpha)?;
                if w.shape.iter().product::<usize>() != shape.iter().product::<usize>() {
                    candle_core::bail!("LoRA ΔW {:?} does not fit the weight {shape:?}", w.shape);
                }
                return Ok(w);
            }
            Factors::LoHa(h) => h.check(shape)?,
            Factors::LoKr(k) => k.check(shape)?,
        }
        check_float_same(&factors.all(), what)?;
        Ok(Self {
            factors,
            alpha,
            shape: shape.to_vec(),
            dora: None,
        })
    }

    /// The same weights with a DoRA magnitude (checked against the weight's shape).
    pub fn with_dora(mut self, dora: Dora) -> candle_core::Result<Self> {
        dora.check(&self.shape)?;
        if !dora.magnitude.dtype().is_float() {
            candle_core::bail!(
                "DoRA magnitude must be floating point, got {:?}",
                dora.magnitude.dtype()
            );
        }
        self.dora = Some(dora);
        Ok(self)
    }

    /// The factors.
    pub fn factors(&self) -> &Factors {
        &self.factors
    }

    /// The DoRA magnitude, if any.
    pub fn dora(&self) -> Option<&Dora> {
        self.dora.as_ref()
    }

    /// The factor kind.
    pub fn kind(&self) -> LoraKind {
        self.factors.kind()
    }

    /// The kind as listed: `LoRA`, `LoHa`, `LoKr`, with `+DoRA` when a magnitude is present
    /// (plain LoRA with a magnitude is `DoRA`).
    pub fn kind_label(&self) -> String {
        match (self.kind(), self.dora.is_some()) {
            (LoraKind::Lora, true) => "DoRA".into(),
            (k, true) => format!("{}+DoRA", k.name()),
            (k, false) => k.name().into(),
        }
    }

    /// Whether this is a plain LoRA without DoRA (what every LoRA format can hold).
    pub fn is_plain(&self) -> bool {
        self.kind() == LoraKind::Lora && self.dora.is_none()
    }

    /// `(down, up)` of a plain LoRA (with or without DoRA); `None` for LoHa / LoKr.
    pub fn low_rank_pair(&self) -> Option<(&Tensor, &Tensor)> {
        match &self.factors {
            Factors::LowRank { down, up } => Some((down, up)),
            _ => None,
        }
    }

    /// The down projection (applied first) of a plain LoRA. LoHa / LoKr have no down/up pair:
    /// this is then their first tensor (`hada_w1_a`, `lokr_w1` / `lokr_w1_a`), which answers
    /// dtype and device questions; use [`LoraWeights::factors`] for their factors.
    pub fn down(&self) -> &Tensor {
        match &self.factors {
            Factors::LowRank { down, .. } => down,
            f => f.all()[0],
        }
    }

    /// The up projection of a plain LoRA (for LoHa / LoKr see [`LoraWeights::down`]: their
    /// second tensor).
    pub fn up(&self) -> &Tensor {
        match &self.factors {
            Factors::LowRank { up, .. } => up,
            f => f.all()[1],
        }
    }

    /// The dtype of the factors.
    pub fn dtype(&self) -> DType {
        self.down().dtype()
    }

    /// alpha; the scale is alpha / rank.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The same factors with another alpha.
    pub fn with_alpha(self, alpha: f64) -> Self {
        Self { alpha, ..self }
    }

    /// `(down, up, alpha)` of a plain LoRA; an error naming the kind otherwise.
    pub fn into_parts(self) -> candle_core::Result<(Tensor, Tensor, f64)> {
        let label = self.kind_label();
        match self.factors {
            Factors::LowRank { down, up } if self.dora.is_none() => Ok((down, up, self.alpha)),
            _ => candle_core::bail!("a {label} layer has no plain down/up factors"),
        }
    }

    /// Every tensor (factors, then the DoRA magnitude) mapped by `f` (a dtype or device
    /// change, a reshape that keeps the rules); the result is checked again.
    pub fn map(
        &self,
        mut f: impl FnMut(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Self> {
        let w = match &self.factors {
            Factors::LowRank { down, up } => Self::new(f(down)?, f(up)?, self.alpha)?,
            other => Self::lycoris(other.map(&mut f)?, self.alpha, &self.shape)?,
        };
        match &self.dora {
            Some(d) => w.with_dora(Dora {
                magnitude: f(&d.magnitude)?,
                style: d.style,
            }),
            None => Ok(w),
        }
    }

    /// The rank r: rows of `down` (LoRA), of `hada_w1_b` (LoHa), of the low-rank side's
    /// second factor (LoKr); a LoKr with both sides full reports 1 (LyCORIS' `lora_dim`).
    pub fn rank(&self) -> usize {
        self.low_rank().unwrap_or(1)
    }

    /// The rank, `None` for a LoKr with both sides full.
    pub fn low_rank(&self) -> Option<usize> {
        match &self.factors {
            Factors::LowRank { down, .. } => Some(down.dims()[0]),
            Factors::LoHa(h) => Some(h.rank()),
            Factors::LoKr(k) => k.rank(),
        }
    }

    /// alpha / rank; 1 for a LoKr with both sides full (LyCORIS ignores alpha there).
    pub fn scale(&self) -> f64 {
        match self.low_rank() {
            Some(r) => self.alpha / r as f64,
            None => 1.0,
        }
    }

    /// True for a convolution adapter (a 4-d weight).
    pub fn is_conv(&self) -> bool {
        self.shape.len() == 4
    }

    /// The shape of the weight ΔW adapts (`[out, in]` or `[out, in, kh, kw]`).
    pub fn delta_shape(&self) -> Vec<usize> {
        self.shape.clone()
    }

    /// The number of stored values (factors and DoRA magnitude).
    pub fn parameters(&self) -> usize {
        self.factors
            .all()
            .iter()
            .map(|t| t.elem_count())
            .sum::<usize>()
            + self.dora.as_ref().map_or(0, |d| d.magnitude.elem_count())
    }
}

/// A learned token (textual inversion / pivotal tuning): its text and its vectors
/// `[n, width]` in the text encoder's embedding space. `n > 1` is a multi-vector embedding,
/// applied as the tokens `token`, `token_1`, … `token_{n-1}`.
#[derive(Debug, Clone)]
pub struct LearnedToken {
    /// The token text (`<s1>`).
    pub token: String,
    /// The vectors `[n, width]`.
    pub vectors: Tensor,
}

impl LearnedToken {
    /// A token with vectors `[width]` or `[n, width]` (stored as `[n, width]`); an error for
    /// another rank, no vectors, an empty token or a non-float dtype.
    pub fn new(token: &str, vectors: Tensor) -> candle_core::Result<Self> {
        let vectors = match vectors.rank() {
            1 => vectors.unsqueeze(0)?,
            2 => vectors,
            _ => candle_core::bail!(
                "embedding {token:?} has shape {:?}; expected [width] or [n, width]",
                vectors.dims()
            ),
        };
        if token.is_empty() || vectors.dims()[0] == 0 || vectors.dims()[1] == 0 {
            candle_core::bail!("embedding {token:?} of shape {:?} is empty", vectors.dims());
        }
        if !vectors.dtype().is_float() {
            candle_core::bail!(
                "embedding {token:?} must be floating point, got {:?}",
                vectors.dtype()
            );
        }
        Ok(Self {
            token: token.to_string(),
            vectors,
        })
    }

    /// The number of vectors.
    pub fn count(&self) -> usize {
        self.vectors.dims()[0]
    }

    /// The embedding width.
    pub fn width(&self) -> usize {
        self.vectors.dims()[1]
    }

    /// The tokenizer tokens of the vectors: `token`, `token_1`, … (diffusers'
    /// `load_textual_inversion` naming).
    pub fn token_names(&self) -> Vec<String> {
        (0..self.count())
            .map(|i| {
                if i == 0 {
                    self.token.clone()
                } else {
                    format!("{}_{i}", self.token)
                }
            })
            .collect()
    }
}

/// A complete LoRA: every adapted layer, the learned tokens and the file's metadata.
#[derive(Debug, Clone, Default)]
pub struct LoraSet {
    /// Adapted layers by key (`unet.…`, `text_encoder.…`).
    pub layers: BTreeMap<LayerKey, LoraWeights>,
    /// Learned token embeddings, in file order.
    pub embeddings: Vec<LearnedToken>,
    /// Free-form metadata (the safetensors header's `__metadata__`).
    pub metadata: BTreeMap<String, String>,
}

impl LoraSet {
    /// The learned token named `token`.
    pub fn embedding(&self, token: &str) -> Option<&LearnedToken> {
        self.embeddings.iter().find(|e| e.token == token)
    }

    /// Adds the learned tokens of `other` whose names this set lacks (on a conflict the
    /// vector already here is kept); returns the tokens skipped.
    pub fn merge_embeddings(&mut self, other: &[LearnedToken]) -> Vec<String> {
        let mut skipped = vec![];
        for e in other {
            if self.embedding(&e.token).is_some() {
                skipped.push(e.token.clone());
            } else {
                self.embeddings.push(e.clone());
            }
        }
        skipped
    }
}
