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
pub mod merge;
pub mod targets;

pub use adapter::{AdapterKind, LoraAdapter};
pub use host::{LayerRef, LoraHost};
pub use inject::{
    apply_lora_set, extract, inject_trainable, remove_all, set_enabled, set_scale, InjectedLora,
    LoraHandle,
};
pub use key::{Component, LayerKey};
pub use merge::{collapse, delta_weight};
pub use targets::LoraTargets;

use candle_core::Tensor;
use std::collections::BTreeMap;

/// The low-rank factors of one adapted layer.
///
/// Linear: `down` [r, in], `up` [out, r]. Conv2d: `down` [r, in, k, k] (the original layer's
/// kernel, stride and padding), `up` [out, r, 1, 1]. ΔW = (alpha / r) · up · down.
/// [`LoraWeights::new`] is the one place these shapes are checked.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    down: Tensor,
    up: Tensor,
    alpha: f64,
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
        Ok(Self { down, up, alpha })
    }

    /// The down projection (applied first).
    pub fn down(&self) -> &Tensor {
        &self.down
    }

    /// The up projection.
    pub fn up(&self) -> &Tensor {
        &self.up
    }

    /// alpha; the scale is alpha / rank.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The same factors with another alpha.
    pub fn with_alpha(self, alpha: f64) -> Self {
        Self { alpha, ..self }
    }

    /// `(down, up, alpha)`.
    pub fn into_parts(self) -> (Tensor, Tensor, f64) {
        (self.down, self.up, self.alpha)
    }

    /// Both factors mapped by `f` (a dtype or device change, a reshape that keeps the
    /// rules); the result is checked again.
    pub fn map(
        &self,
        mut f: impl FnMut(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Self> {
        Self::new(f(&self.down)?, f(&self.up)?, self.alpha)
    }

    /// The rank r (rows of `down`).
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// alpha / rank.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    /// True for a convolution adapter (4-d factors).
    pub fn is_conv(&self) -> bool {
        self.down.rank() == 4
    }

    /// The shape of the weight ΔW adapts: `up`'s rows, then `down`'s input dims
    /// (`[out, in]` or `[out, in, kh, kw]`).
    pub fn delta_shape(&self) -> Vec<usize> {
        let mut s = vec![self.up.dims()[0]];
        s.extend_from_slice(&self.down.dims()[1..]);
        s
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
