//! LoRA file formats: detection, reading into and writing from the one in-memory
//! [`LoraSet`], for every format in the wild.
//!
//! | [`Format`] | keys | alpha (scale = alpha / rank) |
//! |---|---|---|
//! | `ours` | `unet.<path>.lora_down.weight`, `.lora_up.weight`, `.alpha` | `.alpha` per layer; without it the `alpha` metadata entry, else the rank (scale 1) |
//! | `kohya` (A1111, ComfyUI, Civitai) | `lora_unet_<path_with_underscores>.lora_down.weight`, `lora_te_…` | `.alpha` per layer, else the rank (scale 1); written with one alpha per file, each layer's ratio folded into `lora_up` (per layer on request) |
//! | `diffusers` | `unet.<path>.lora.down.weight`, `text_encoder.<path>.lora_linear_layer.…`, `….lora_A.weight`, `….processor.to_q_lora.…` | `lora_adapter_metadata` JSON (`lora_alpha`, `alpha_pattern`); without it diffusers' rule: alpha = the rank of the first layer, for every layer of that component |
//! | `peft` | `[base_model.model.]<path>.lora_A.weight` | `lora_adapter_metadata` / `adapter_config.json`; without either diffusers' first-layer rule |
//! | `cloneofsimo` | `unet:<i>:up` / `:down` (safetensors), or a pickled list (`.pt`) | none: up holds the scale (alpha = rank) |
//!
//! diffusers' "first layer" ([`peft::first_rank`]): for the UNet the first `lora_B` / `up` key in
//! the file's sorted key order (safetensors' key order), for the text encoder the first adapted
//! layer in the model's module order (layers by index; in a layer `k_proj`, `v_proj`, `q_proj`,
//! `out_proj`, `fc1`, `fc2`), as its `get_peft_kwargs` and `load_lora_into_text_encoder` find them.
//!
//! Learned token embeddings (pivotal tuning, textual inversion) are part of a [`LoraSet`]:
//! ours, kohya (`bundle_emb.*`) and cloneofsimo files hold them; a diffusers / PEFT output gets
//! them in a sidecar `learned_embeds.safetensors` ([`embeddings`]).
//!
//! Keys map to module paths through one table ([`keymap`]); paths that keys do not spell
//! (kohya's underscores, cloneofsimo's indices) resolve against an [`Architecture`]: the
//! model's, or when none is given the built-in SD 1.x and SD 2.x ones.

pub mod arch;
pub mod check;
pub mod cloneofsimo;
pub mod diffusers;
pub mod embeddings;
pub mod io;
pub mod keymap;
pub mod kohya;
pub mod kohya_meta;
pub mod lycoris;
pub mod ours;
pub mod peft;
pub mod summary;

pub use arch::Architecture;
pub use check::check_against;
pub use embeddings::{holds_embeddings, sidecar_for};
pub use io::LoraFile;
pub(crate) use lycoris::{arch_shapes, finish_shaped};

use crate::lora::{LayerKey, LoraSet, LoraWeights};
use crate::tensor_file::OutTensor;
use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use keymap::{parse_key, short_list, KeyIndex, KeyScheme, Part};
use std::collections::BTreeMap;
use std::path::Path;

/// A LoRA file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// This project's format (see [`ours`]).
    Ours,
    /// kohya-ss sd-scripts / A1111 / ComfyUI.
    Kohya,
    /// diffusers' `pytorch_lora_weights.safetensors` (also its older attention-processor names).
    Diffusers,
    /// A raw PEFT state dict.
    Peft,
    /// cloneofsimo/lora (`.safetensors` with indexed keys, or a pickled `.pt` list).
    Cloneofsimo,
}

impl Format {
    /// Every format.
    pub const ALL: [Format; 5] = [
        Format::Ours,
        Format::Kohya,
        Format::Diffusers,
        Format::Peft,
        Format::Cloneofsimo,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Format::Ours => "ours",
            Format::Kohya => "kohya",
            Format::Diffusers => "diffusers",
            Format::Peft => "peft",
            Format::Cloneofsimo => "cloneofsimo",
        }
    }

    /// Parses a command-line name.
    pub fn parse(s: &str) -> anyhow::Result<Format> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .with_context(|| format!("unknown LoRA format {s:?}; expected one of ours, kohya, diffusers, peft, cloneofsimo"))
    }

    /// The implementation.
    pub fn codec(self) -> &'static dyn LoraFormat {
        match self {
            Format::Ours => &ours::Ours,
            Format::Kohya => &kohya::Kohya,
            Format::Diffusers => &diffusers::Diffusers,
            Format::Peft => &peft::Peft,
            Format::Cloneofsimo => &cloneofsimo::Cloneofsimo,
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The architectures a read may resolve keys against.
#[derive(Debug, Clone, Copy)]
pub struct ReadContext<'a> {
    /// The model's architecture, or `None` for the built-in SD 1.x / SD 2.x ones.
    pub model: Option<&'a Architecture>,
}

impl<'a> ReadContext<'a> {
    /// The candidate architectures, most specific first.
    pub fn candidates(&self) -> Vec<&'a Architecture> {
        match self.model {
            Some(a) => vec![a],
            None => Architecture::known().to_vec(),
        }
    }
}

/// Whether a written tensor follows the output dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cast {
    /// A weight: converted to the output dtype.
    Weight,
    /// Kept as is (alphas stay f32).
    Keep,
}

/// A LoRA encoded for one format, before the dtype conversion.
#[derive(Debug, Default)]
pub struct Encoded {
    /// Keys and tensors in writing order.
    pub tensors: Vec<(String, Tensor, Cast)>,
    /// The safetensors metadata.
    pub metadata: BTreeMap<String, String>,
}

/// What every format implements.
pub trait LoraFormat: Sync {
    /// Which format this is.
    fn format(&self) -> Format;
    /// Reads a file known to be in this format.
    fn read(&self, file: &LoraFile, ctx: &ReadContext) -> anyhow::Result<LoraSet>;
    /// Encodes a LoRA; `arch` is the model architecture when known.
    fn encode(&self, set: &LoraSet, arch: Option<&Architecture>) -> anyhow::Result<Encoded>;
}

/// Options of [`write`].
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions<'a> {
    /// Output dtype of the factors (f32, f16, bf16); `None` keeps the LoRA's own.
    pub dtype: Option<DType>,
    /// Replace an existing file.
    pub force: bool,
    /// The model architecture (needed by cloneofsimo for non-SD models).
    pub arch: Option<&'a Architecture>,
    /// Write NaN / infinite values (and values the output dtype turns into infinities)
    /// instead of refusing.
    pub allow_nonfinite: bool,
    /// kohya: write each layer's own `.alpha` instead of one alpha per file (see [`kohya`]).
    pub per_layer_alpha: bool,
}

/// Tells the format of a LoRA file from its keys and metadata (header only for safetensors).
pub fn detect(path: &Path) -> anyhow::Result<Format> {
    if !path.exists() {
        bail!("LoRA file {} does not exist", path.display());
    }
    if io::is_pickle_name(path) {
        let file = io::read_file(path)?;
        if file.container == io::Container::PickleList {
            return Ok(Format::Cloneofsimo);
        }
        let keys: Vec<&str> = file.tensors.keys().map(String::as_str).collect();
        return detect_keys(&keys, &file.metadata)
            .with_context(|| format!("cannot tell the LoRA format of {}", path.display()));
    }
    let header = crate::tensor_file::read_header(path)?;
    let keys: Vec<&str> = header.entries.keys().map(String::as_str).collect();
    detect_keys(&keys, &header.metadata)
        .with_context(|| format!("cannot tell the LoRA format of {}", path.display()))
}

/// [`detect`] on key names and metadata.
pub fn detect_keys(keys: &[&str], metadata: &BTreeMap<String, String>) -> anyhow::Result<Format> {
    let count = |f: &dyn Fn(&str) -> bool| keys.iter().filter(|k| f(k)).count();
    let component = |k: &str| k.starts_with("unet.") || k.starts_with("text_encoder.");
    let scores = [
        (
            Format::Cloneofsimo,
            count(&|k| {
                let p: Vec<&str> = k.split(':').collect();
                p.len() == 3 && p[1].parse::<usize>().is_ok() && (p[2] == "up" || p[2] == "down")
            }),
        ),
        (
            Format::Kohya,
            count(&|k| k.starts_with("lora_unet_") || k.starts_with("lora_te")),
        ),
        (
            Format::Ours,
            count(&|k| {
                component(k)
                    && (k.ends_with(".lora_down.weight")
                        || k.ends_with(".lora_up.weight")
                        || k.ends_with(".hada_w1_a")
                        || k.ends_with(".lokr_w1")
                        || k.ends_with(".lokr_w1_a"))
            }),
        ),
        (
            Format::Diffusers,
            count(&|k| {
                (component(k)
                    && (k.contains(".lora.")
                        || k.contains(".lora_linear_layer.")
                        || k.contains(".lora_A.")
                        || k.contains(".lora_B.")))
                    || k.contains("_lora.down.")
                    || k.contains("_lora.up.")
            }),
        ),
        (
            Format::Peft,
            count(&|k| {
                !component(k) && (k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))
            }),
        ),
    ];
    if metadata.get(ours::FORMAT_KEY).is_some() && scores[2].1 > 0 {
        return Ok(Format::Ours);
    }
    match scores.iter().max_by_key(|(_, n)| *n) {
        Some((f, n)) if *n > 0 => Ok(*f),
        _ => {
            let sample: Vec<String> = keys.iter().take(5).map(|k| k.to_string()).collect();
            bail!(
                "no key looks like a LoRA of a known format (ours, kohya, diffusers, peft, cloneofsimo); \
                 {} keys, e.g.:{}",
                keys.len(),
                short_list(&sample, 5)
            )
        }
    }
}

/// Reads a LoRA file in any format, resolving keys against the built-in SD 1.x / 2.x
/// architectures.
pub fn read(path: &Path) -> anyhow::Result<LoraSet> {
    read_with(path, None)
}

/// Reads a LoRA file in any format; `model` (when given) is the architecture keys resolve against.
pub fn read_with(path: &Path, model: Option<&Architecture>) -> anyhow::Result<LoraSet> {
    let format = detect(path)?;
    read_as(path, format, model)
}

/// Reads a LoRA file in a given format.
pub fn read_as(
    path: &Path,
    format: Format,
    model: Option<&Architecture>,
) -> anyhow::Result<LoraSet> {
    let file = io::read_file(path)?;
    format
        .codec()
        .read(&file, &ReadContext { model })
        .with_context(|| format!("cannot read {} as a {format} LoRA", path.display()))
}

/// Writes `set` to `path` in `format` (safetensors), atomically.
pub fn write(
    set: &LoraSet,
    path: &Path,
    format: Format,
    opts: &WriteOptions,
) -> anyhow::Result<()> {
    if path.exists() && !opts.force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            path.display()
        );
    }
    if io::is_pickle_name(path) {
        bail!(
            "cannot write {}: LoRAs are written as .safetensors only",
            path.display()
        );
    }
    if set.layers.is_empty() {
        bail!("cannot write {}: the LoRA has no layers", path.display());
    }
    let sidecar = embeddings::check_sidecar(set, path, format, opts.force)?;
    let tensors = encode_tensors(set, format, opts)
        .with_context(|| format!("cannot write {} as {format}", path.display()))?;
    crate::tensor_file::write(path, tensors.0, &tensors.1, opts.force)?;
    if let Some(side) = &sidecar {
        embeddings::write_standalone(set, side, opts.force)
            .with_context(|| format!("cannot write the learned tokens to {}", side.display()))?;
    }
    Ok(())
}

/// The bytes of `set` as a safetensors file in `format` (deterministic: equal sets give equal
/// bytes).
pub fn encode_bytes(set: &LoraSet, format: Format, opts: &WriteOptions) -> anyhow::Result<Vec<u8>> {
    let (tensors, metadata) = encode_tensors(set, format, opts)?;
    crate::tensor_file::to_bytes(tensors, &metadata)
}

/// The tensors (cast to the output dtype) and metadata `format` writes for `set`.
#[allow(clippy::type_complexity)]
fn encode_tensors(
    set: &LoraSet,
    format: Format,
    opts: &WriteOptions,
) -> anyhow::Result<(
    Vec<(String, crate::tensor_file::OutTensor<'static>)>,
    BTreeMap<String, String>,
)> {
    let folded;
    let set = if format == Format::Kohya && !opts.per_layer_alpha {
        folded = kohya::uniform_alpha(set)?;
        &folded
    } else {
        set
    };
    let enc = format.codec().encode(set, opts.arch)?;
    let dtype = match opts.dtype {
        Some(d) => d,
        None => set
            .layers
            .values()
            .next()
            .map(|l| l.dtype())
            .unwrap_or(DType::F32),
    };
    let mut tensors = Vec::with_capacity(enc.tensors.len());
    for (k, t, cast) in enc.tensors {
        if !opts.allow_nonfinite {
            crate::tensor_file::check_finite(&t, &format!("tensor {k}"))
                .context("refusing to write it (--allow-nonfinite writes it anyway)")?;
        }
        let cast_to = match cast {
            Cast::Weight if t.dtype() != dtype => Some(dtype),
            _ => None,
        };
        let t = match cast_to {
            Some(d) => t.to_dtype(d)?,
            None => t,
        };
        // Only a narrowing cast can turn finite values into infinities.
        if !opts.allow_nonfinite && cast_to.is_some() {
            crate::tensor_file::check_finite(&t, &format!("tensor {k} in {dtype:?}"))
                .with_context(|| {
                    format!("its values overflow {dtype:?}; write f32 or bf16 (or pass --allow-nonfinite)")
                })?;
        }
        let t = OutTensor::from_tensor(&t).with_context(|| format!("tensor {k}"))?;
        tensors.push((k, t));
    }
    let mut metadata = enc.metadata;
    if format == Format::Kohya {
        kohya_meta::add_hashes(&tensors, &mut metadata)?;
    }
    Ok((tensors, metadata))
}

/// The factors and alpha of one layer as found in a file, before validation.
#[derive(Debug, Default)]
pub(crate) struct RawLayer {
    pub down: Option<Tensor>,
    pub up: Option<Tensor>,
    pub alpha: Option<f64>,
    /// LyCORIS factors and DoRA magnitudes by name.
    pub extra: BTreeMap<crate::lora::FactorName, Tensor>,
}

/// The value of a 0-d (or one-element) tensor.
pub(crate) fn scalar(t: &Tensor) -> candle_core::Result<f64> {
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    match v.as_slice() {
        [x] => Ok(*x),
        _ => candle_core::bail!("expected one value, found a tensor of shape {:?}", t.dims()),
    }
}

/// Groups a file's keys into layers under `scheme`. Every key that matches no row (and is
/// not `skip`ped) is listed in one error.
pub(crate) fn gather(
    file: &LoraFile,
    scheme: &KeyScheme,
    index: &KeyIndex,
    skip: impl Fn(&str) -> bool,
) -> anyhow::Result<BTreeMap<LayerKey, RawLayer>> {
    let mut layers: BTreeMap<LayerKey, RawLayer> = BTreeMap::new();
    let mut unknown = vec![];
    let mut dup = vec![];
    for (key, t) in &file.tensors {
        if skip(key) {
            continue;
        }
        let Some(p) = parse_key(scheme, key, index) else {
            unknown.push(key.clone());
            continue;
        };
        let l = layers.entry(p.layer.clone()).or_default();
        let slot_taken = match p.part {
            Part::Down => l.down.replace(t.clone()).is_some(),
            Part::Up => l.up.replace(t.clone()).is_some(),
            Part::Alpha => l
                .alpha
                .replace(scalar(t).with_context(|| format!("alpha {key}"))?)
                .is_some(),
            Part::Extra(name) => l.extra.insert(name, t.clone()).is_some(),
        };
        if slot_taken {
            dup.push(format!("{key} (a second {:?} for {})", p.part, p.layer));
        }
    }
    if !unknown.is_empty() {
        let hint = if unknown.iter().any(|k| {
            k.starts_with("lora_te2_") || k.contains("input_blocks") || k.contains("text_encoder_2")
        }) {
            "\n  (SDXL and SGM/LDM-named LoRAs are not supported)"
        } else if unknown
            .iter()
            .any(|k| k.contains("hada_") || k.contains("lokr_") || k.contains("dora_scale"))
        {
            "\n  (LyCORIS LoHa / LoKr / DoRA weights are read from kohya-named files only)"
        } else {
            ""
        };
        bail!(
            "{}: {} of {} keys are not {} LoRA keys of a known layer:{}{hint}",
            file.path.display(),
            unknown.len(),
            file.tensors.len(),
            scheme.name,
            short_list(&unknown, 20)
        );
    }
    if !dup.is_empty() {
        bail!(
            "{}: several keys for the same tensor:{}",
            file.path.display(),
            short_list(&dup, 20)
        );
    }
    if layers.is_empty() {
        bail!("{}: no LoRA layers found", file.path.display());
    }
    Ok(layers)
}

/// The LoRA of `file` from its gathered layers, validated (both factors present, factor shapes
/// consistent; alpha from the file, else `default_alpha(layer, rank)`), with the file's metadata.
pub(crate) fn finish(
    file: &LoraFile,
    raw: BTreeMap<LayerKey, RawLayer>,
    default_alpha: impl Fn(&LayerKey, usize) -> anyhow::Result<f64>,
) -> anyhow::Result<LoraSet> {
    finish_shaped(file, raw, default_alpha, &|_| None)
}

/// Metadata keys that describe a file's own format and are not carried into another file.
pub(crate) fn is_format_key(k: &str, v: &str) -> bool {
    matches!(
        k,
        "format"
            | "rank"
            | "alpha"
            | "targets"
            | "lora_adapter_metadata"
            | "unet"
            | "text_encoder"
            | "ss_network_dim"
            | "ss_network_alpha"
            | "ss_network_module"
            | "ss_network_args"
            | "ss_v2"
            | "ss_base_model_version"
            | "sshs_model_hash"
            | "sshs_legacy_hash"
    ) || k.starts_with("lora_diffusion.")
        || k.starts_with("unet:")
        || k.starts_with("text_encoder:")
        || v == "<embed>"
}

impl Encoded {
    /// No tensors yet; the metadata of `set` that another format should carry over.
    pub(crate) fn carrying(set: &LoraSet) -> Self {
        let metadata = set
            .metadata
            .iter()
            .filter(|(k, v)| !is_format_key(k, v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Self {
            metadata,
            tensors: vec![],
        }
    }
}

/// The most common value of `f` over the layers (ties: the smallest), e.g. the rank.
pub(crate) fn common<T: Ord + Clone>(set: &LoraSet, f: impl Fn(&LoraWeights) -> T) -> Option<T> {
    let mut counts: BTreeMap<T, usize> = BTreeMap::new();
    for l in set.layers.values() {
        *counts.entry(f(l)).or_default() += 1;
    }
    let best = counts.values().copied().max()?;
    counts.into_iter().find(|(_, n)| *n == best).map(|(v, _)| v)
}

/// Formats an alpha without noise (`8`, `0.5`).
pub(crate) fn fmt_alpha(a: f64) -> String {
    if a.fract() == 0.0 && a.abs() < 1e15 {
        format!("{}", a as i64)
    } else {
        format!("{a}")
    }
}

/// An f64 as a totally ordered key (for [`common`]).
pub(crate) fn ord_f64(a: f64) -> i64 {
    (a * 1e6).round() as i64
}
