//! Loading model weights with one combined report of missing, unexpected and mis-shaped keys.
//!
//! A model is built from a [`candle_nn::VarBuilder`] whose backend is a [`ModelWeights`]. Every
//! tensor the model asks for is recorded; a key absent from the files, or present with another
//! shape, is recorded too and answered with a zero-cost placeholder so that construction goes
//! on and every problem is found in one pass. [`ModelWeights::finish`] then turns the record
//! into one error that lists them all by name and shape.

use crate::tensor_file::TensorFiles;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Keys that checkpoints may carry as buffers and that no model needs.
const IGNORED_KEYS: &[&str] = &["text_model.embeddings.position_ids"];

/// Older diffusers checkpoints (before 0.14) name the VAE attention projections differently:
/// (current name, legacy name) pairs tried when the current name is absent.
const LEGACY_ALIASES: &[(&str, &str)] = &[
    (".to_q.", ".query."),
    (".to_k.", ".key."),
    (".to_v.", ".value."),
    (".to_out.0.", ".proj_attn."),
];

/// Where tensors come from.
enum Source {
    /// Memory-mapped safetensors files.
    Safetensors(TensorFiles),
    /// Tensors read from PyTorch pickles (loaded eagerly, on the CPU).
    Loaded(HashMap<String, Tensor>),
    /// No file at all: every request is answered with a placeholder (structure checks).
    Nothing,
    /// No file: every request is answered with seeded uniform noise (benchmarks, demos).
    Random(u64),
}

/// What happened while a model was being built.
#[derive(Default)]
struct Record {
    requested: BTreeMap<String, Vec<usize>>,
    missing: Vec<(String, Vec<usize>)>,
    mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
}

struct Inner {
    component: String,
    files: Vec<PathBuf>,
    source: Source,
    /// Shapes of every tensor the files hold.
    shapes: BTreeMap<String, Vec<usize>>,
    record: Mutex<Record>,
}

/// The tensors of one model component (e.g. `unet`) plus the record of what the model requested.
#[derive(Clone)]
pub struct ModelWeights {
    inner: Arc<Inner>,
}

fn placeholder(shape: &Shape, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    Tensor::zeros((), dtype, device)?.broadcast_as(shape)
}

/// Seeded uniform weights for `name`: ±sqrt(3/fan_in) for matrices and kernels, 1 for norm
/// weights, 0 for biases.
fn random_tensor(
    seed: u64,
    name: &str,
    shape: &Shape,
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let dims = shape.dims();
    if dims.len() <= 1 {
        let is_norm_weight = name.ends_with("weight");
        let v = if is_norm_weight { 1.0 } else { 0.0 };
        return Tensor::full(v as f32, shape, dev)?.to_dtype(dtype);
    }
    let fan_in: usize = dims[1..].iter().product();
    let bound = (3.0 / fan_in as f64).sqrt();
    let mut h = seed ^ 0x5EED;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01B3);
    }
    let mut rng = crate::rng::Rng::new(h);
    let data: Vec<f32> = (0..shape.elem_count())
        .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)
}

impl ModelWeights {
    /// Opens the weight files of `component` (safetensors, or PyTorch `.bin`/`.pt` pickles read
    /// without executing pickled code).
    pub fn from_files<P: AsRef<Path>>(component: &str, files: &[P]) -> anyhow::Result<Self> {
        let files: Vec<PathBuf> = files.iter().map(|p| p.as_ref().to_path_buf()).collect();
        if files.is_empty() {
            bail!("no weight files given for {component}");
        }
        let mut shapes = BTreeMap::new();
        let source = if files.iter().all(|f| crate::pickle::is_pickle_name(f)) {
            let mut map = HashMap::new();
            for f in &files {
                if !f.exists() {
                    bail!("weights file {} does not exist", f.display());
                }
                let tensors = crate::pickle::read_state_dict(f)
                    .map_err(|e| anyhow::anyhow!("cannot read PyTorch weights: {e:#}"))?;
                if tensors.is_empty() {
                    bail!("PyTorch weights {} hold no tensors", f.display());
                }
                for (name, t) in tensors {
                    shapes.insert(name.clone(), t.dims().to_vec());
                    map.insert(name, t);
                }
            }
            Source::Loaded(map)
        } else if files.iter().any(|f| crate::pickle::is_pickle_name(f)) {
            bail!("cannot mix safetensors and PyTorch pickle files for {component}");
        } else {
            let st = TensorFiles::open(&files)?;
            for (name, shape) in st.shapes() {
                shapes.insert(name.to_string(), shape.to_vec());
            }
            Source::Safetensors(st)
        };
        Ok(Self::new(component, files, source, shapes))
    }

    /// Weights from tensors already in memory (e.g. a model made in a test).
    pub fn from_tensors(component: &str, tensors: HashMap<String, Tensor>) -> Self {
        let shapes = tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        Self::new(component, vec![], Source::Loaded(tensors), shapes)
    }

    /// Weights converted from `file` (e.g. a single-file checkpoint); errors name that file.
    pub fn from_tensors_of(component: &str, file: &Path, tensors: HashMap<String, Tensor>) -> Self {
        let shapes = tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        Self::new(
            component,
            vec![file.to_path_buf()],
            Source::Loaded(tensors),
            shapes,
        )
    }

    /// Every tensor of the files, loaded on the CPU in its stored dtype.
    pub fn load_all(&self) -> anyhow::Result<HashMap<String, Tensor>> {
        self.inner
            .shapes
            .keys()
            .map(|k| {
                let t = match &self.inner.source {
                    Source::Safetensors(st) => {
                        st.load(k, &Device::Cpu).map_err(candle_core::Error::wrap)?
                    }
                    Source::Loaded(map) => map[k].clone(),
                    Source::Nothing | Source::Random(_) => unreachable!("no shapes without files"),
                };
                Ok((k.clone(), t))
            })
            .collect::<candle_core::Result<_>>()
            .with_context(|| format!("cannot read the weights of {}", self.describe_files()))
    }

    /// One tensor of the files, loaded on the CPU in its stored dtype.
    pub fn load_one(&self, name: &str) -> anyhow::Result<Tensor> {
        if !self.inner.shapes.contains_key(name) {
            bail!("{} has no tensor {name}", self.describe_files());
        }
        let t = match &self.inner.source {
            Source::Safetensors(st) => st.load(name, &Device::Cpu)?,
            Source::Loaded(map) => map[name].clone(),
            Source::Nothing | Source::Random(_) => unreachable!("no shapes without files"),
        };
        Ok(t)
    }

    /// The same files' tensors with some replaced (e.g. LoRA-fused weights); error reports
    /// still name the original files.
    pub fn with_replacements(&self, replacements: HashMap<String, Tensor>) -> anyhow::Result<Self> {
        let mut all = self.load_all()?;
        for (k, t) in replacements {
            all.insert(k, t);
        }
        let shapes = all
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        Ok(Self::new(
            &self.inner.component,
            self.inner.files.clone(),
            Source::Loaded(all),
            shapes,
        ))
    }

    /// No weights: every parameter is seeded uniform noise in ±sqrt(3/fan_in) (unit-variance
    /// activations), for benchmarks and smoke runs; norm weights get 1 and biases 0.
    pub fn random(component: &str, seed: u64) -> Self {
        Self::new(component, vec![], Source::Random(seed), BTreeMap::new())
    }

    /// No weights: the model is built from zero-cost placeholders, to check its structure.
    pub fn structure_only(component: &str) -> Self {
        Self::new(component, vec![], Source::Nothing, BTreeMap::new())
    }

    fn new(
        component: &str,
        files: Vec<PathBuf>,
        source: Source,
        shapes: BTreeMap<String, Vec<usize>>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                component: component.to_string(),
                files,
                source,
                shapes,
                record: Mutex::new(Record::default()),
            }),
        }
    }

    /// A VarBuilder over these weights, converting to `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// The component name given at creation.
    pub fn component(&self) -> &str {
        &self.inner.component
    }

    /// Every tensor name the files hold, with its shape.
    pub fn file_shapes(&self) -> &BTreeMap<String, Vec<usize>> {
        &self.inner.shapes
    }

    /// Every (key, shape) the model requested so far.
    pub fn requested(&self) -> BTreeMap<String, Vec<usize>> {
        self.lock().requested.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        // A poisoned lock only means another thread panicked while recording; the data is
        // still a valid record.
        self.inner.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn describe_files(&self) -> String {
        if self.inner.files.is_empty() {
            "in-memory tensors".to_string()
        } else {
            let v: Vec<String> = self
                .inner
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            v.join(", ")
        }
    }

    /// Checks that the model found every key with its shape and that the files hold nothing
    /// else; one error lists every problem.
    pub fn finish(&self) -> anyhow::Result<()> {
        if matches!(self.inner.source, Source::Nothing | Source::Random(_)) {
            return Ok(());
        }
        let rec = self.lock();
        let unexpected: Vec<(&String, &Vec<usize>)> = self
            .inner
            .shapes
            .iter()
            .filter(|(k, _)| !rec.requested.contains_key(*k) && !IGNORED_KEYS.contains(&k.as_str()))
            .collect();
        if rec.missing.is_empty() && rec.mismatched.is_empty() && unexpected.is_empty() {
            return Ok(());
        }
        let mut msg = format!(
            "weights of {} ({}) do not match the model built from its config:",
            self.inner.component,
            self.describe_files()
        );
        const SHOW: usize = 20;
        let mut section = |title: &str, lines: Vec<String>| {
            if lines.is_empty() {
                return;
            }
            msg.push_str(&format!("\n  {} {title}:", lines.len()));
            for l in lines.iter().take(SHOW) {
                msg.push_str(&format!("\n    {l}"));
            }
            if lines.len() > SHOW {
                msg.push_str(&format!("\n    ... and {} more", lines.len() - SHOW));
            }
        };
        section(
            "missing keys (expected by the model, absent from the file)",
            rec.missing
                .iter()
                .map(|(k, s)| format!("{k} {s:?}"))
                .collect(),
        );
        section(
            "shape mismatches",
            rec.mismatched
                .iter()
                .map(|(k, want, got)| format!("{k}: model expects {want:?}, file has {got:?}"))
                .collect(),
        );
        section(
            "unexpected keys (in the file, unknown to the model)",
            unexpected
                .iter()
                .map(|(k, s)| format!("{k} {s:?}"))
                .collect(),
        );
        bail!(msg)
    }

    /// The legacy key holding `name` in this file, if any.
    fn legacy_name(&self, name: &str) -> Option<String> {
        LEGACY_ALIASES.iter().find_map(|(new, old)| {
            let candidate = name.replacen(new, old, 1);
            (candidate != name && self.inner.shapes.contains_key(&candidate)).then_some(candidate)
        })
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = match &self.inner.source {
            Source::Safetensors(st) => st
                .load(name, &Device::Cpu)
                .map_err(candle_core::Error::wrap)?,
            Source::Loaded(map) => match map.get(name) {
                Some(t) => t.clone(),
                None => candle_core::bail!("no tensor {name}"),
            },
            Source::Nothing | Source::Random(_) => candle_core::bail!("no tensor {name}"),
        };
        let what = format!("weight {name} of {}", self.describe_files());
        crate::tensor_file::check_finite(&t, &what)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        t.to_dtype(dtype)?.to_device(dev)
    }
}

impl candle_nn::var_builder::SimpleBackend for ModelWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let want = s.dims().to_vec();
        let key = {
            let mut rec = self.lock();
            rec.requested.insert(name.to_string(), want.clone());
            match self.inner.source {
                Source::Nothing => {
                    drop(rec);
                    return placeholder(&s, dtype, dev);
                }
                Source::Random(seed) => {
                    drop(rec);
                    return random_tensor(seed, name, &s, dtype, dev);
                }
                _ => {}
            }
            let (name, found) = match self.inner.shapes.get(name) {
                Some(shape) => (name.to_string(), Some(shape)),
                None => match self.legacy_name(name) {
                    Some(old) => {
                        rec.requested.insert(old.clone(), want.clone());
                        let shape = self.inner.shapes.get(&old);
                        (old, shape)
                    }
                    None => (name.to_string(), None),
                },
            };
            match found {
                None => {
                    rec.missing.push((name, want));
                    drop(rec);
                    return placeholder(&s, dtype, dev);
                }
                Some(got) if *got != want => {
                    rec.mismatched.push((name, want, got.clone()));
                    drop(rec);
                    return placeholder(&s, dtype, dev);
                }
                Some(_) => name,
            }
        };
        self.load(&key, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        {
            let mut rec = self.lock();
            let shape = self.inner.shapes.get(name).cloned().unwrap_or_default();
            rec.requested.insert(name.to_string(), shape);
        }
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.shapes.contains_key(name)
    }
}

/// Finds the weight files of a diffusers component folder (`unet/`, `vae/`, `text_encoder/`):
/// safetensors preferred, sharded checkpoints through their `*.index.json`, else PyTorch `.bin`.
pub fn component_weight_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!("model component folder {} does not exist", dir.display());
    }
    let stems = ["diffusion_pytorch_model", "model", "pytorch_model"];
    for ext in ["safetensors", "bin"] {
        for stem in stems {
            let single = dir.join(format!("{stem}.{ext}"));
            if single.is_file() {
                return Ok(vec![single]);
            }
            let index = dir.join(format!("{stem}.{ext}.index.json"));
            if index.is_file() {
                return sharded_files(&index);
            }
        }
    }
    bail!(
        "no weights in {}: expected diffusion_pytorch_model.safetensors, model.safetensors, \
         a sharded *.safetensors.index.json or pytorch_model.bin",
        dir.display()
    )
}

fn sharded_files(index: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no weight_map object", index.display()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    let files: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    for f in &files {
        if !f.is_file() {
            bail!(
                "shard {} listed in {} does not exist",
                f.display(),
                index.display()
            );
        }
    }
    Ok(files)
}
