//! One LoRA adapter on one layer ([`LoraAdapter`]): the [`LayerResidual`] that LoRA attaches
//! to the [`crate::models::residual::ResidualSlot`] of a `Linear` or `Conv2d`.
//!
//! An adapter adds `scale · up(dropout(down(x)))` to its layer's output, with
//! `scale = multiplier · alpha / rank`. Linear: `down` [r, in], `up` [out, r]. Conv2d: `down`
//! is a convolution with the layer's kernel size, stride and padding into r channels
//! ([r, in, k, k]), `up` a 1×1 convolution r → out ([out, r, 1, 1]).
//!
//! The factors are our own `Linear` / `Conv2d` layers (no bias), built after the adapted
//! layer's type: trainable factors hold candle [`Var`]s (differentiable matmul / conv2d),
//! frozen ones (a loaded LoRA) take the layers' frozen path, which never computes gradients
//! for the factor weights.
//!
//! LoHa, LoKr and DoRA layers ([`LoraAdapter::dense`], frozen only) have no rank-r hidden
//! activation: the adapter builds the weight change `W' − W` once per multiplier (ΔW·m, or for
//! DoRA [`crate::lora::merged_weight`] of the base weight it was given minus that weight) and
//! applies it with the layer's own op (matmul, or conv2d with the layer's stride and padding),
//! as LyCORIS' rebuild forward does.

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Result, Tensor, Var};

use crate::lora::LoraWeights;
use crate::models::layers::{Conv2d, Layer, Linear};
use crate::models::residual::LayerResidual;
use crate::models::walk::LayerRef;
use crate::rng::Rng;

/// The kind of layer an adapter belongs to, with the convolution geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKind {
    /// A `Linear` layer: factors are matrices.
    Linear,
    /// A `Conv2d` layer: `down` uses this stride and padding.
    Conv2d {
        /// Stride of the layer (and of `down`).
        stride: usize,
        /// Zero padding of the layer (and of `down`).
        padding: usize,
    },
}

impl AdapterKind {
    /// The kind (with the convolution geometry) of an adapter on `layer`.
    pub fn of(layer: &LayerRef) -> Self {
        match layer {
            LayerRef::Linear(_) => Self::Linear,
            LayerRef::Conv2d(c) => Self::Conv2d {
                stride: c.stride(),
                padding: c.padding(),
            },
        }
    }
}

/// The dropout of a trainable adapter: probability and the shared generator it draws from.
#[derive(Clone)]
pub struct Dropout {
    /// Probability of zeroing one element of the rank-r hidden activation.
    pub p: f64,
    /// The generator shared by every adapter of one injection (its state is checkpointed).
    pub rng: Arc<Mutex<Rng>>,
}

/// The change of a LoHa / LoKr / DoRA adapter, rebuilt when the multiplier changes.
struct Dense {
    weights: LoraWeights,
    /// The adapted layer's weight (DoRA only), f32.
    base: Option<Tensor>,
    /// The layer's weight shape and dtype.
    shape: Vec<usize>,
    dtype: candle_core::DType,
    /// `(multiplier bits, W' − W as a layer)`.
    cache: Mutex<Option<(u64, Arc<Layer>)>>,
}

/// A low-rank residual on one layer (see the module docs).
pub struct LoraAdapter {
    down: Layer,
    up: Layer,
    dense: Option<Dense>,
    vars: Option<(Var, Var)>,
    alpha: f64,
    kind: AdapterKind,
    owner: u64,
    multiplier: AtomicU64,
    enabled: AtomicBool,
    training: AtomicBool,
    dropout: Option<Dropout>,
}

impl std::fmt::Debug for LoraAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraAdapter")
            .field("down", &self.down().shape())
            .field("up", &self.up().shape())
            .field("alpha", &self.alpha)
            .field("kind", &self.kind)
            .field("owner", &self.owner)
            .field("multiplier", &self.multiplier())
            .field("enabled", &self.is_enabled())
            .field("trainable", &self.is_trainable())
            .finish()
    }
}

/// Checks the factors through [`LoraWeights::new`] and that they fit a layer of `kind`.
fn check_factors(down: &Tensor, up: &Tensor, kind: AdapterKind) -> Result<()> {
    let w = LoraWeights::new(down.clone(), up.clone(), 1.0)?;
    if w.is_conv() != matches!(kind, AdapterKind::Conv2d { .. }) {
        candle_core::bail!(
            "LoRA factors do not fit a {kind:?} layer: down {:?}, up {:?}",
            down.dims(),
            up.dims()
        );
    }
    Ok(())
}

impl LoraAdapter {
    /// A trainable adapter over the variables `down` and `up`, belonging to LoRA `owner`.
    pub fn trainable(
        down: Var,
        up: Var,
        alpha: f64,
        kind: AdapterKind,
        owner: u64,
        dropout: Option<Dropout>,
    ) -> Result<Self> {
        check_factors(down.as_tensor(), up.as_tensor(), kind)?;
        if let Some(d) = &dropout {
            if !(0.0..1.0).contains(&d.p) {
                candle_core::bail!("LoRA dropout must be in [0, 1), got {}", d.p);
            }
        }
        let (dt, ut) = (down.as_tensor().clone(), up.as_tensor().clone());
        Ok(Self::build(
            dt,
            ut,
            Some((down, up)),
            alpha,
            kind,
            owner,
            dropout,
        ))
    }

    /// A frozen adapter (no gradients for its factors), e.g. a LoRA loaded from a file.
    pub fn frozen(
        down: Tensor,
        up: Tensor,
        alpha: f64,
        kind: AdapterKind,
        owner: u64,
    ) -> Result<Self> {
        check_factors(&down, &up, kind)?;
        let (down, up) = (down.detach(), up.detach());
        Ok(Self::build(down, up, None, alpha, kind, owner, None))
    }

    /// A frozen adapter for a LoHa, LoKr or DoRA layer (any kind [`LoraWeights`] holds) on a
    /// layer of `kind` whose weight is `base` (`W' − W` is applied in `base`'s dtype and
    /// shape). `base` is kept only for DoRA, whose change depends on it.
    pub fn dense(
        weights: LoraWeights,
        base: &Tensor,
        kind: AdapterKind,
        owner: u64,
    ) -> Result<Self> {
        let shape = base.dims().to_vec();
        let ds = weights.delta_shape();
        if ds.iter().product::<usize>() != shape.iter().product::<usize>() || ds[0] != shape[0] {
            candle_core::bail!(
                "{} ΔW of shape {ds:?} does not fit the layer weight {shape:?}",
                weights.kind_label()
            );
        }
        if matches!(kind, AdapterKind::Linear) != (shape.len() == 2) {
            candle_core::bail!("a {kind:?} layer with a weight of shape {shape:?}");
        }
        let weights = weights.map(|t| t.to_device(base.device()))?;
        let keep = if weights.dora().is_some() {
            Some(base.detach().to_dtype(candle_core::DType::F32)?)
        } else {
            None
        };
        let (d, u) = (weights.down().clone(), weights.up().clone());
        let mut a = Self::build(d, u, None, weights.alpha(), kind, owner, None);
        a.dense = Some(Dense {
            weights,
            base: keep,
            shape,
            dtype: base.dtype(),
            cache: Mutex::new(None),
        });
        Ok(a)
    }

    /// `W' − W` at the current multiplier as a layer with this adapter's geometry (cached).
    fn dense_layer(&self, d: &Dense) -> Result<Arc<Layer>> {
        let m = self.multiplier();
        let mut cache = d.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((bits, layer)) = cache.as_ref() {
            if *bits == m.to_bits() {
                return Ok(layer.clone());
            }
        }
        let change = match &d.base {
            Some(w) => {
                let w = w.reshape(d.shape.as_slice())?;
                (crate::lora::merged_weight(&w, &d.weights, m)? - &w)?
            }
            None => (crate::lora::delta_weight(&d.weights)?.reshape(d.shape.as_slice())? * m)?,
        };
        let change = change.to_dtype(d.dtype)?;
        let layer = Arc::new(match self.kind {
            AdapterKind::Linear => Layer::Linear(Linear::from_tensors(change, None, "lora_delta")),
            AdapterKind::Conv2d { stride, padding } => Layer::Conv2d(Conv2d::from_tensors(
                change,
                None,
                stride,
                padding,
                "lora_delta",
            )),
        });
        *cache = Some((m.to_bits(), layer.clone()));
        Ok(layer)
    }

    fn build(
        down: Tensor,
        up: Tensor,
        vars: Option<(Var, Var)>,
        alpha: f64,
        kind: AdapterKind,
        owner: u64,
        dropout: Option<Dropout>,
    ) -> Self {
        let (down, up) = match kind {
            AdapterKind::Linear => (
                Layer::Linear(Linear::from_tensors(down, None, "lora_down")),
                Layer::Linear(Linear::from_tensors(up, None, "lora_up")),
            ),
            AdapterKind::Conv2d { stride, padding } => (
                Layer::Conv2d(Conv2d::from_tensors(
                    down,
                    None,
                    stride,
                    padding,
                    "lora_down",
                )),
                Layer::Conv2d(Conv2d::from_tensors(up, None, 1, 0, "lora_up")),
            ),
        };
        Self {
            down,
            up,
            dense: None,
            vars,
            alpha,
            kind,
            owner,
            multiplier: AtomicU64::new(1f64.to_bits()),
            enabled: AtomicBool::new(true),
            training: AtomicBool::new(true),
            dropout,
        }
    }

    /// The down factor (a view of the variable for trainable adapters).
    pub fn down(&self) -> &Tensor {
        self.down.weight()
    }

    /// The up factor.
    pub fn up(&self) -> &Tensor {
        self.up.weight()
    }

    /// The `(down, up)` variables of a trainable adapter.
    pub fn vars(&self) -> Option<(&Var, &Var)> {
        self.vars.as_ref().map(|(d, u)| (d, u))
    }

    /// Whether the factors are trainable variables.
    pub fn is_trainable(&self) -> bool {
        self.vars.is_some()
    }

    /// The rank r (of the loaded weights for LoHa / LoKr / DoRA adapters).
    pub fn rank(&self) -> usize {
        match &self.dense {
            Some(d) => d.weights.rank(),
            None => self.down().dims()[0],
        }
    }

    /// The loaded weights of a LoHa / LoKr / DoRA adapter.
    pub fn dense_weights(&self) -> Option<&LoraWeights> {
        self.dense.as_ref().map(|d| &d.weights)
    }

    /// alpha (the nominal scale is alpha / rank).
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The layer kind and convolution geometry.
    pub fn kind(&self) -> AdapterKind {
        self.kind
    }

    /// The id of the LoRA this adapter belongs to (one id per injection / loaded set).
    pub fn owner(&self) -> u64 {
        self.owner
    }

    /// The runtime multiplier (1 by default).
    pub fn multiplier(&self) -> f64 {
        f64::from_bits(self.multiplier.load(Ordering::Relaxed))
    }

    /// Sets the runtime multiplier; the residual is scaled by `multiplier · alpha / rank`.
    pub fn set_multiplier(&self, m: f64) {
        self.multiplier.store(m.to_bits(), Ordering::Relaxed);
    }

    /// `multiplier · alpha / rank`, the factor the residual is multiplied by.
    pub fn effective_scale(&self) -> f64 {
        match &self.dense {
            Some(d) => self.multiplier() * d.weights.scale(),
            None => self.multiplier() * self.alpha / self.rank() as f64,
        }
    }

    /// Whether the adapter contributes to its layer's output.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Enables or disables the adapter (disabled adapters are skipped entirely).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Training mode: dropout (if any) is applied only while this is on.
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    /// Whether the adapter is in training mode.
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// Whether the adapter changes its layer's output (enabled, non-zero scale).
    /// A DoRA adapter changes its layer at every multiplier (PEFT's and LyCORIS' rules), so it
    /// is active whenever enabled.
    pub fn is_active(&self) -> bool {
        let dora = self
            .dense
            .as_ref()
            .is_some_and(|d| d.weights.dora().is_some());
        self.is_enabled() && (dora || self.effective_scale() != 0.0)
    }

    /// A snapshot of the factors (copies, detached from any variable) and alpha.
    pub fn weights(&self) -> Result<LoraWeights> {
        if let Some(d) = &self.dense {
            return d.weights.map(|t| t.detach().copy());
        }
        LoraWeights::new(
            self.down().detach().copy()?,
            self.up().detach().copy()?,
            self.alpha,
        )
    }

    /// The residual `effective_scale · up(dropout(down(x)))` for layer input `x`, in `x`'s dtype.
    pub fn residual(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(d) = &self.dense {
            let layer = self.dense_layer(d)?;
            let xdt = x.dtype();
            return layer.forward(&x.to_dtype(d.dtype)?)?.to_dtype(xdt);
        }
        let xdt = x.dtype();
        let x = x.to_dtype(self.down().dtype())?;
        let h = self.down.forward(&x)?;
        let h = self.dropout(h)?.affine(self.effective_scale(), 0.0)?;
        self.up.forward(&h)?.to_dtype(xdt)
    }

    /// The frozen linear layer `(w, b)` and this adapter as one op on `x` (see
    /// [`crate::ops::lora_linear`]), when the adapter is a plain LoRA on a linear layer whose
    /// dropout is off, the layer shares `x`'s dtype and the factors one dtype; `None` otherwise.
    pub fn fused_linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
    ) -> Option<Result<Tensor>> {
        let dropout_on = self
            .dropout
            .as_ref()
            .is_some_and(|d| d.p > 0.0 && self.is_training());
        let dt = x.dtype();
        let same = w.dtype() == dt
            && b.is_none_or(|b| b.dtype() == dt)
            && self.down().dtype() == self.up().dtype();
        if self.dense.is_some() || self.kind != AdapterKind::Linear || dropout_on || !same {
            return None;
        }
        let scale = self.effective_scale();
        Some(crate::ops::lora_linear(
            x,
            w,
            b,
            self.down(),
            self.up(),
            scale,
        ))
    }

    /// Inverted dropout on the hidden activation (training mode and p > 0 only).
    fn dropout(&self, h: Tensor) -> Result<Tensor> {
        let Some(d) = &self.dropout else {
            return Ok(h);
        };
        if d.p <= 0.0 || !self.is_training() {
            return Ok(h);
        }
        let keep = 1.0 - d.p;
        let n = h.elem_count();
        let mask: Vec<f32> = {
            let mut rng = d.rng.lock().unwrap_or_else(|e| e.into_inner());
            (0..n)
                .map(|_| {
                    if rng.uniform() < d.p {
                        0.0
                    } else {
                        (1.0 / keep) as f32
                    }
                })
                .collect()
        };
        let mask = Tensor::from_vec(mask, h.shape(), &Device::Cpu)?
            .to_device(h.device())?
            .to_dtype(h.dtype())?;
        h * mask
    }
}

impl LayerResidual for LoraAdapter {
    fn owner(&self) -> u64 {
        self.owner
    }

    fn is_active(&self) -> bool {
        LoraAdapter::is_active(self)
    }

    fn residual(&self, x: &Tensor) -> Result<Tensor> {
        LoraAdapter::residual(self, x)
    }

    fn fused_linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Option<Result<Tensor>> {
        LoraAdapter::fused_linear(self, x, w, b)
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }

    fn trainable(&self) -> Vec<Tensor> {
        match &self.vars {
            Some((d, u)) => vec![d.as_tensor().clone(), u.as_tensor().clone()],
            None => Vec::new(),
        }
    }

    fn random_state(&self) -> Option<[u64; 4]> {
        let d = self.dropout.as_ref()?;
        let rng = d.rng.lock().unwrap_or_else(|e| e.into_inner());
        Some(rng.state())
    }

    fn set_random_state(&self, state: [u64; 4]) {
        if let Some(d) = &self.dropout {
            *d.rng.lock().unwrap_or_else(|e| e.into_inner()) = Rng::from_state(state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn models_with_adapters_stay_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<LoraAdapter>();
        check::<crate::models::residual::ResidualSlot>();
        check::<crate::models::unet::UNet2DConditionModel>();
        check::<crate::models::clip::ClipTextModel>();
    }

    #[test]
    fn slot_is_shared_between_clones_and_skips_inactive_adapters() {
        let dev = Device::Cpu;
        let down = Tensor::new(&[[1f32, 2.0]], &dev).unwrap();
        let up = Tensor::new(&[[3f32], [4.0]], &dev).unwrap();
        let a = Arc::new(LoraAdapter::frozen(down, up, 2.0, AdapterKind::Linear, 7).unwrap());
        let slot = crate::models::residual::ResidualSlot::new();
        let clone = slot.clone();
        clone.push(a.clone() as Arc<dyn LayerResidual>);
        assert!(slot.same(&clone) && slot.len() == 1);
        let x = Tensor::new(&[[1f32, 1.0]], &dev).unwrap();
        let base = Tensor::new(&[[10f32, 20.0]], &dev).unwrap();
        // residual = 2 · up · (down · x) = 2 · [3, 4] · 3
        let y: Vec<Vec<f32>> = slot.apply(&x, base.clone()).unwrap().to_vec2().unwrap();
        assert_eq!(y, [[28.0, 44.0]]);
        a.set_multiplier(0.5);
        let y: Vec<Vec<f32>> = slot.apply(&x, base.clone()).unwrap().to_vec2().unwrap();
        assert_eq!(y, [[19.0, 32.0]]);
        a.set_enabled(false);
        let y: Vec<Vec<f32>> = slot.apply(&x, base.clone()).unwrap().to_vec2().unwrap();
        assert_eq!(y, [[10.0, 20.0]]);
        assert_eq!(slot.remove_owner(8), 0);
        assert_eq!(slot.remove_owner(7), 1);
        assert!(clone.is_empty());
        let bad = LoraAdapter::frozen(
            Tensor::zeros((2, 3), DType::F32, &dev).unwrap(),
            Tensor::zeros((4, 3), DType::F32, &dev).unwrap(),
            1.0,
            AdapterKind::Linear,
            1,
        );
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("down [2, 3], up [4, 3]"));
    }
}
