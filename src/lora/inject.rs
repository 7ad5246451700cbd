//! Attaching LoRAs to a host model: trainable injection ([`inject_trainable`]), loaded LoRAs
//! ([`apply_lora_set`]), extraction, runtime scale / enable / removal.
//!
//! Every attached LoRA is identified by a [`LoraHandle`] (one owner id shared by its adapters),
//! so several LoRAs can sit on the same layers, each with its own scale.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};

use crate::lora::adapter::{AdapterKind, Dropout, LoraAdapter};
use crate::lora::host::{LayerRef, LoraHost};
use crate::lora::targets::LoraTargets;
use crate::lora::{Component, LayerKey, LoraSet, LoraWeights};
use crate::models::residual::{LayerResidual, ResidualSlot};
use crate::rng::Rng;

static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

fn new_owner() -> u64 {
    NEXT_OWNER.fetch_add(1, Ordering::Relaxed)
}

/// Lists at most 12 items, one per line, and says how many more there are.
fn list(items: &[String]) -> String {
    let mut s: String = items.iter().take(12).map(|i| format!("\n  {i}")).collect();
    if items.len() > 12 {
        s.push_str(&format!("\n  ... and {} more", items.len() - 12));
    }
    s
}

#[derive(Clone)]
struct Entry {
    path: String,
    slot: ResidualSlot,
    adapter: Arc<LoraAdapter>,
}

/// One LoRA attached to a model: its adapters on every adapted layer.
#[derive(Clone)]
pub struct LoraHandle {
    owner: u64,
    component: Component,
    entries: Vec<Entry>,
}

impl std::fmt::Debug for LoraHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraHandle")
            .field("owner", &self.owner)
            .field("component", &self.component)
            .field("layers", &self.entries.len())
            .finish()
    }
}

impl LoraHandle {
    /// The owner id shared by this LoRA's adapters.
    pub fn id(&self) -> u64 {
        self.owner
    }

    /// The component it is attached to.
    pub fn component(&self) -> Component {
        self.component
    }

    /// Number of adapted layers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no layer is adapted.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `(module path, adapter)` of every adapted layer, in the host's layer order.
    pub fn adapters(&self) -> impl Iterator<Item = (&str, &Arc<LoraAdapter>)> {
        self.entries.iter().map(|e| (e.path.as_str(), &e.adapter))
    }

    /// Sets the runtime multiplier of every adapter (0 = no effect, 1 = as trained).
    pub fn set_scale(&self, multiplier: f64) {
        self.entries
            .iter()
            .for_each(|e| e.adapter.set_multiplier(multiplier));
    }

    /// The runtime multiplier (of the first adapter; all share it unless set one by one).
    pub fn scale(&self) -> f64 {
        self.entries.first().map_or(1.0, |e| e.adapter.multiplier())
    }

    /// Enables or disables every adapter of this LoRA.
    pub fn set_enabled(&self, on: bool) {
        self.entries.iter().for_each(|e| e.adapter.set_enabled(on));
    }

    /// Whether the adapters are enabled (the first one's state; all share it unless set one
    /// by one).
    pub fn is_enabled(&self) -> bool {
        self.entries.first().is_none_or(|e| e.adapter.is_enabled())
    }

    /// Switches dropout on (training) or off (evaluation) for every adapter.
    pub fn set_training(&self, on: bool) {
        self.entries.iter().for_each(|e| e.adapter.set_training(on));
    }

    /// Detaches this LoRA from the model; returns the number of adapters removed.
    pub fn remove(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.slot.remove_owner(self.owner))
            .sum()
    }

    /// A snapshot (copies) of this LoRA's factors and alphas, keyed `<component>.<path>`.
    pub fn extract(&self) -> anyhow::Result<LoraSet> {
        let mut set = LoraSet::default();
        for e in &self.entries {
            let w = e.adapter.weights()?;
            set.layers.insert(LayerKey::new(self.component, &e.path), w);
        }
        Ok(set)
    }
}

/// A trainable LoRA injected into a model: the handle plus its named variables.
pub struct InjectedLora {
    handle: LoraHandle,
    params: Vec<(String, Var)>,
    dropout_rng: Arc<Mutex<Rng>>,
    rank: usize,
    alpha: f64,
}

impl std::fmt::Debug for InjectedLora {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InjectedLora")
            .field("handle", &self.handle)
            .field("vars", &self.params.len())
            .field("rank", &self.rank)
            .field("alpha", &self.alpha)
            .finish()
    }
}

impl InjectedLora {
    /// The attached LoRA (scale, enable, remove, extract).
    pub fn handle(&self) -> &LoraHandle {
        &self.handle
    }

    /// `(name, var)` pairs: `<component>.<path>.lora_down.weight` then `.lora_up.weight` for
    /// every adapted layer in the host's layer order.
    pub fn named_vars(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The trainable variables, in [`named_vars`](Self::named_vars) order.
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|(_, v)| v.clone()).collect()
    }

    /// Total number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The rank of every adapter.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// alpha of every adapter.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// Switches dropout on (training) or off (sampling during training).
    pub fn set_training(&self, on: bool) {
        self.handle.set_training(on);
    }

    /// The state of the dropout generator (save it in a checkpoint).
    pub fn dropout_rng_state(&self) -> [u64; 4] {
        self.dropout_rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state()
    }

    /// Restores the dropout generator from [`dropout_rng_state`](Self::dropout_rng_state).
    pub fn set_dropout_rng_state(&self, state: [u64; 4]) {
        *self.dropout_rng.lock().unwrap_or_else(|e| e.into_inner()) = Rng::from_state(state);
    }

    /// A snapshot of the current factors as a [`LoraSet`] (no metadata).
    pub fn to_lora_set(&self) -> anyhow::Result<LoraSet> {
        self.handle.extract()
    }

    /// Overwrites the variables with the factors of `set` (resuming a run). Every adapted
    /// layer must be present with the same shapes; alpha must agree.
    pub fn load_weights(&self, set: &LoraSet) -> anyhow::Result<()> {
        let comp = self.handle.component;
        let mut problems = Vec::new();
        let mut updates = Vec::new();
        for (path, a) in self.handle.adapters() {
            let key = LayerKey::new(comp, path);
            let Some(w) = set.layers.get(&key) else {
                problems.push(format!("{key}: missing"));
                continue;
            };
            let Some((dv, uv)) = a.vars() else {
                continue;
            };
            if !w.is_plain() {
                problems.push(format!(
                    "{key}: a {} layer; training resumes plain LoRA only",
                    w.kind_label()
                ));
                continue;
            }
            if (w.alpha() - a.alpha()).abs() > 1e-9 * a.alpha().abs().max(1.0) {
                problems.push(format!(
                    "{key}: alpha {} but the run uses {}",
                    w.alpha(),
                    a.alpha()
                ));
                continue;
            }
            if w.down().dims() != dv.dims() || w.up().dims() != uv.dims() {
                problems.push(format!(
                    "{key}: down {:?} / up {:?}, expected {:?} / {:?}",
                    w.down().dims(),
                    w.up().dims(),
                    dv.dims(),
                    uv.dims()
                ));
                continue;
            }
            updates.push((dv.clone(), w.down().clone()));
            updates.push((uv.clone(), w.up().clone()));
        }
        let known: std::collections::HashSet<&str> = self.handle.adapters().map(|a| a.0).collect();
        for key in set.layers.keys() {
            if let Some(p) = key.path_in(comp) {
                if !known.contains(p) {
                    problems.push(format!("{key}: not a layer of this run"));
                }
            }
        }
        if !problems.is_empty() {
            bail!(
                "LoRA weights do not fit the injected {comp} LoRA:{}",
                list(&problems)
            );
        }
        for (var, t) in updates {
            let t = t.to_dtype(var.dtype())?.to_device(var.device())?;
            var.set(&t)?;
        }
        Ok(())
    }
}

/// The layers of `host` selected by `targets` for `component`.
pub fn target_layers<'a, H: LoraHost + ?Sized>(
    host: &'a H,
    component: Component,
    targets: &LoraTargets,
) -> Vec<LayerRef<'a>> {
    host.lora_layers()
        .into_iter()
        .filter(|l| targets.matches(component.name(), l.path()))
        .collect()
}

/// Attaches a trainable rank-`rank` LoRA to every target layer of `host` (component `unet`
/// or `text_encoder`): `down` ~ N(0, 1/rank²) (std 1/rank, as the seed and PEFT's
/// "gaussian" init), `up` = 0, both f32 variables on `device`. Dropout `dropout` acts on the
/// rank-r hidden activation in training mode, drawing from a generator forked from `rng`.
#[allow(clippy::too_many_arguments)]
pub fn inject_trainable<H: LoraHost + ?Sized>(
    host: &H,
    component: Component,
    targets: &LoraTargets,
    rank: usize,
    alpha: f64,
    dropout: f64,
    rng: &mut Rng,
    device: &Device,
) -> anyhow::Result<InjectedLora> {
    if rank == 0 {
        bail!("LoRA rank must be at least 1");
    }
    if !alpha.is_finite() || alpha <= 0.0 {
        bail!("LoRA alpha must be a positive number, got {alpha}");
    }
    if !(0.0..1.0).contains(&dropout) {
        bail!("LoRA dropout must be in [0, 1), got {dropout}");
    }
    let all = host.lora_layers();
    let layers: Vec<LayerRef> = all
        .iter()
        .copied()
        .filter(|l| targets.matches(component.name(), l.path()))
        .collect();
    if layers.is_empty() {
        let examples: Vec<String> = all.iter().take(8).map(|l| l.path().to_string()).collect();
        bail!(
            "LoRA targets \"{targets}\" match no layer of the {component} ({} layers, e.g.:{})",
            all.len(),
            list(&examples)
        );
    }
    let paths: Vec<&str> = all.iter().map(|l| l.path()).collect();
    let unmatched = targets.unmatched(component.name(), &paths);
    if !unmatched.is_empty() {
        let examples: Vec<String> = all.iter().take(8).map(|l| l.path().to_string()).collect();
        bail!(
            "LoRA target(s) {} match no layer of the {component} (presets: {}; layers are e.g.:{})",
            unmatched.join(", "),
            LoraTargets::preset_names().join(", "),
            list(&examples)
        );
    }
    let too_small: Vec<String> = layers
        .iter()
        .filter(|l| rank > l.max_rank())
        .map(|l| {
            let k = l.kernel_size();
            let input = if k > 1 {
                format!("in·k·k = {}·{k}·{k} = {}", l.in_dim(), l.in_dim() * k * k)
            } else {
                format!("in = {}", l.in_dim())
            };
            format!(
                "{component}.{}: rank {rank} > min({input}, out = {}) = {}",
                l.path(),
                l.out_dim(),
                l.max_rank()
            )
        })
        .collect();
    if !too_small.is_empty() {
        bail!(
            "LoRA rank {rank} is too large for {} target layer(s) (rank must be <= \
             min(in, out)):{}",
            too_small.len(),
            list(&too_small)
        );
    }
    let owner = new_owner();
    let dropout_rng = Arc::new(Mutex::new(Rng::new(rng.next_u64())));
    let drop = (dropout > 0.0).then(|| Dropout {
        p: dropout,
        rng: dropout_rng.clone(),
    });
    let mut entries = Vec::with_capacity(layers.len());
    let mut params = Vec::with_capacity(2 * layers.len());
    for l in &layers {
        let down = (rng.randn(l.down_shape(rank), device)? * (1.0 / rank as f64))?;
        let up = Tensor::zeros(l.up_shape(rank), DType::F32, device)?;
        let (down, up) = (Var::from_tensor(&down)?, Var::from_tensor(&up)?);
        let name = LayerKey::new(component, l.path());
        params.push((format!("{name}.lora_down.weight"), down.clone()));
        params.push((format!("{name}.lora_up.weight"), up.clone()));
        let adapter =
            LoraAdapter::trainable(down, up, alpha, AdapterKind::of(l), owner, drop.clone())
                .with_context(|| format!("LoRA for {name}"))?;
        entries.push(Entry {
            path: l.path().to_string(),
            slot: l.residuals().clone(),
            adapter: Arc::new(adapter),
        });
    }
    for e in &entries {
        e.slot.push(e.adapter.clone() as Arc<dyn LayerResidual>);
    }
    Ok(InjectedLora {
        handle: LoraHandle {
            owner,
            component,
            entries,
        },
        params,
        dropout_rng,
        rank,
        alpha,
    })
}

/// The LoRA factors fitted to `layer`'s shapes: a linear-shaped LoRA on a 1×1 convolution or
/// a 1×1-conv-shaped LoRA on a Linear layer is reshaped; `None` when the shapes do not fit.
fn fit_factors(layer: &LayerRef, w: &LoraWeights) -> Option<(Tensor, Tensor)> {
    let (down, up) = w.low_rank_pair()?;
    let r = *down.dims().first()?;
    let (want_d, want_u) = (layer.down_shape(r), layer.up_shape(r));
    let same_count = |t: &Tensor, s: &[usize]| t.elem_count() == s.iter().product::<usize>();
    let squeezable = |t: &Tensor| t.dims().iter().skip(2).all(|&d| d == 1);
    let fits = if down.dims() == want_d && up.dims() == want_u {
        true
    } else {
        layer.kernel_size() == 1
            && down.rank() >= 2
            && up.rank() >= 2
            && squeezable(down)
            && squeezable(up)
            && down.dims()[1] == want_d[1]
            && up.dims()[0] == want_u[0]
            && up.dims()[1] == r
            && same_count(down, &want_d)
            && same_count(up, &want_u)
    };
    if !fits {
        return None;
    }
    Some((
        down.reshape(want_d.as_slice()).ok()?,
        up.reshape(want_u.as_slice()).ok()?,
    ))
}

/// How one loaded layer is attached.
enum Attach {
    /// Plain LoRA factors fitted to the layer, with alpha.
    LowRank(Tensor, Tensor, f64),
    /// LoHa / LoKr / DoRA: applied as a weight change.
    Dense(LoraWeights),
}

/// Attaches the `component` part of a loaded LoRA as frozen adapters with runtime multiplier
/// `scale`. Fails, listing every problem at once, when a key names no layer of the model (or
/// no known component) or a factor's shape does not fit its layer.
pub fn apply_lora_set<H: LoraHost + ?Sized>(
    host: &H,
    component: Component,
    set: &LoraSet,
    scale: f64,
) -> anyhow::Result<LoraHandle> {
    let layers = host.lora_layers();
    let by_path: HashMap<&str, &LayerRef> = layers.iter().map(|l| (l.path(), l)).collect();
    let mut problems = Vec::new();
    let mut found = Vec::new();
    for (key, w) in &set.layers {
        let Some(path) = key.path_in(component) else {
            if key.component().is_none() {
                problems.push(format!(
                    "{key}: no known component (expected unet. or text_encoder.)"
                ));
            }
            continue;
        };
        let Some(layer) = by_path.get(path) else {
            problems.push(format!("{key}: no such layer in the {component}"));
            continue;
        };
        if !w.alpha().is_finite() {
            problems.push(format!("{key}: alpha is {}", w.alpha()));
            continue;
        }
        if !w.is_plain() {
            let (ds, ws) = (w.delta_shape(), layer.weight().dims().to_vec());
            if ds.iter().product::<usize>() == ws.iter().product::<usize>() && ds[0] == ws[0] {
                found.push((path, *layer, Attach::Dense(w.clone())));
            } else {
                problems.push(format!(
                    "{key}: layer weight {ws:?}, the {} layer adapts a weight of shape {ds:?}",
                    w.kind_label()
                ));
            }
            continue;
        }
        match fit_factors(layer, w) {
            Some((d, u)) => found.push((path, *layer, Attach::LowRank(d, u, w.alpha()))),
            None => {
                let r = w.down().dims().first().copied().unwrap_or(0);
                problems.push(format!(
                    "{key}: layer weight {:?} needs down {:?} and up {:?}, the LoRA has down \
                     {:?} and up {:?}",
                    layer.weight().dims(),
                    layer.down_shape(r),
                    layer.up_shape(r),
                    w.down().dims(),
                    w.up().dims()
                ));
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "LoRA does not fit the {component} ({} problem(s)):{}",
            problems.len(),
            list(&problems)
        );
    }
    // Attach in the host's layer order.
    let order: HashMap<&str, usize> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| (l.path(), i))
        .collect();
    found.sort_by_key(|f| order.get(f.0).copied().unwrap_or(usize::MAX));
    let owner = new_owner();
    let mut entries = Vec::with_capacity(found.len());
    for (path, layer, attach) in found {
        let (dt, dev) = (layer.dtype(), layer.weight().device());
        let adapter = match attach {
            Attach::LowRank(d, u, alpha) => {
                let d = d.to_dtype(dt)?.to_device(dev)?;
                let u = u.to_dtype(dt)?.to_device(dev)?;
                LoraAdapter::frozen(d, u, alpha, AdapterKind::of(layer), owner)
            }
            Attach::Dense(w) => {
                LoraAdapter::dense(w, layer.weight(), AdapterKind::of(layer), owner)
            }
        }
        .with_context(|| format!("LoRA for {component}.{path}"))?;
        adapter.set_multiplier(scale);
        entries.push(Entry {
            path: path.to_string(),
            slot: layer.residuals().clone(),
            adapter: Arc::new(adapter),
        });
    }
    for e in &entries {
        e.slot.push(e.adapter.clone() as Arc<dyn LayerResidual>);
    }
    Ok(LoraHandle {
        owner,
        component,
        entries,
    })
}

/// The factors and alpha of every adapter on `host`, keyed `<component>.<path>`. A layer
/// carrying several LoRAs is an error (extract them one by one with [`LoraHandle::extract`]).
pub fn extract<H: LoraHost + ?Sized>(host: &H, component: Component) -> anyhow::Result<LoraSet> {
    let mut layers = BTreeMap::new();
    for l in host.lora_layers() {
        let adapters = l.residuals().attached_as::<LoraAdapter>();
        match adapters.as_slice() {
            [] => {}
            [a] => {
                layers.insert(LayerKey::new(component, l.path()), a.weights()?);
            }
            many => bail!(
                "layer {component}.{} carries {} LoRAs; extract them one by one through \
                 their handles",
                l.path(),
                many.len()
            ),
        }
    }
    Ok(LoraSet {
        layers,
        embeddings: vec![],
        metadata: BTreeMap::new(),
    })
}

/// Calls `f` on every LoRA adapter attached to `host`.
fn for_each_adapter<H: LoraHost + ?Sized>(host: &H, f: impl Fn(&LoraAdapter)) {
    for l in host.lora_layers() {
        l.residuals()
            .attached_as::<LoraAdapter>()
            .iter()
            .for_each(|a| f(a));
    }
}

/// Sets the runtime multiplier of every adapter on `host`.
pub fn set_scale<H: LoraHost + ?Sized>(host: &H, multiplier: f64) {
    for_each_adapter(host, |a| a.set_multiplier(multiplier));
}

/// Enables or disables every adapter on `host`.
pub fn set_enabled<H: LoraHost + ?Sized>(host: &H, on: bool) {
    for_each_adapter(host, |a| a.set_enabled(on));
}

/// Detaches every adapter from `host`; returns how many were removed.
pub fn remove_all<H: LoraHost + ?Sized>(host: &H) -> usize {
    host.lora_layers()
        .iter()
        .map(|l| l.residuals().clear())
        .sum()
}
