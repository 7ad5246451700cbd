//! The residual hook of `Linear` and `Conv2d`: values attached to a layer's
//! [`ResidualSlot`] add `residual(x)` to the layer's output. Models only define the hook;
//! LoRA adapters implement it.

use std::any::Any;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use candle_core::{Result, Tensor};

/// A value that adds a residual to the output of the layer it is attached to.
pub trait LayerResidual: Send + Sync + std::fmt::Debug {
    /// The id of the set this residual belongs to (one id per attached LoRA).
    fn owner(&self) -> u64;

    /// Whether it changes the layer's output now (inactive residuals are skipped).
    fn is_active(&self) -> bool;

    /// The residual for the layer input `x`, shaped and typed like the layer's output.
    fn residual(&self, x: &Tensor) -> Result<Tensor>;

    /// The frozen linear layer `(w, b)` it is attached to plus this residual, as one fused op
    /// on `x`, if it offers one (equal to the layer's output plus [`LayerResidual::residual`]).
    fn fused_linear(
        &self,
        _x: &Tensor,
        _w: &Tensor,
        _b: Option<&Tensor>,
    ) -> Option<Result<Tensor>> {
        None
    }

    /// The value as `Any`, so its owner can recover the concrete type.
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;

    /// Its trainable tensors (variables), which a checkpointed block must list.
    fn trainable(&self) -> Vec<Tensor> {
        Vec::new()
    }

    /// The state of the random generator it draws from (dropout), if it has one.
    fn random_state(&self) -> Option<[u64; 4]> {
        None
    }

    /// Sets that generator to a state from [`LayerResidual::random_state`].
    fn set_random_state(&self, _state: [u64; 4]) {}
}

/// The residuals attached to one layer, shared between clones of the layer.
#[derive(Clone, Default)]
pub struct ResidualSlot(Arc<RwLock<Vec<Arc<dyn LayerResidual>>>>);

impl std::fmt::Debug for ResidualSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ResidualSlot({} attached)", self.len())
    }
}

impl ResidualSlot {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, Vec<Arc<dyn LayerResidual>>> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Vec<Arc<dyn LayerResidual>>> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot of the attached residuals, in attach order.
    pub fn attached(&self) -> Vec<Arc<dyn LayerResidual>> {
        self.read().clone()
    }

    /// The attached residuals of concrete type `T`, in attach order.
    pub fn attached_as<T: LayerResidual + 'static>(&self) -> Vec<Arc<T>> {
        self.attached()
            .into_iter()
            .filter_map(|r| r.into_any().downcast::<T>().ok())
            .collect()
    }

    /// Number of attached residuals.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether nothing is attached.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Attaches a residual (after the existing ones).
    pub fn push(&self, residual: Arc<dyn LayerResidual>) {
        self.write().push(residual);
    }

    /// Detaches every residual of `owner`; returns how many were removed.
    pub fn remove_owner(&self, owner: u64) -> usize {
        let mut v = self.write();
        let before = v.len();
        v.retain(|a| a.owner() != owner);
        before - v.len()
    }

    /// Detaches everything; returns how many were removed.
    pub fn clear(&self) -> usize {
        let mut v = self.write();
        let n = v.len();
        v.clear();
        n
    }

    /// Whether two slots are the same shared list.
    pub fn same(&self, other: &ResidualSlot) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The frozen linear layer `(w, b)` with its residuals as one fused op on `x`, when exactly
    /// one residual is active and it offers one ([`LayerResidual::fused_linear`]).
    pub fn fused_linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
    ) -> Option<Result<Tensor>> {
        let v = self.read();
        let mut active = v.iter().filter(|a| a.is_active());
        let only = active.next()?;
        if active.next().is_some() {
            return None;
        }
        only.fused_linear(x, w, b)
    }

    /// `base + Σ residual_i(x)` over the active residuals, in attach order; `base` itself
    /// (untouched) when none is active.
    pub fn apply(&self, x: &Tensor, base: Tensor) -> Result<Tensor> {
        let attached = {
            let v = self.read();
            if v.is_empty() {
                return Ok(base);
            }
            v.clone()
        };
        let mut y = base;
        for a in attached.iter().filter(|a| a.is_active()) {
            y = (y + a.residual(x)?)?;
        }
        Ok(y)
    }
}
