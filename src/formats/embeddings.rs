//! Learned token embeddings (textual inversion, pivotal tuning) inside LoRA files and in
//! standalone textual-inversion files.
//!
//! | where | keys | order |
//! |---|---|---|
//! | cloneofsimo | a tensor named by the token (`<s1>`, `[width]`), metadata `"<s1>": "<embed>"` | key order |
//! | kohya (A1111 bundled) | `bundle_emb.<token>.string_to_param.*` (`[n, width]`); also `bundle_emb.<token>.emb_params` | key order |
//! | ours | `learned_embeds.<token>` (`[n, width]`), metadata `lora_diffusion.tokens` (JSON list) | the list |
//! | diffusers / PEFT LoRA | none: written to a sidecar `learned_embeds.safetensors` | key order |
//!
//! Standalone files ([`read_standalone`]): diffusers / cloneofsimo `learned_embeds.safetensors`
//! or `.bin` (`{token: vector}`), A1111 `.pt` (`string_to_param` → `*`, token from `name`) and
//! A1111 `.safetensors` (`emb_params`, token from the file name). `.pt` / `.bin` go through
//! the bounded pickle reader; no code runs.

use super::io::LoraFile;
use super::keymap::short_list;
use super::{Cast, Encoded, Format};
use crate::lora::{LearnedToken, LoraSet};
use crate::pickle::{Object, TorchFile, Value};
use anyhow::{bail, Context};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The metadata value cloneofsimo marks embedding tensors with.
pub const EMBED_MARK: &str = "<embed>";
/// The key prefix of kohya / A1111 bundled embeddings.
pub const KOHYA_PREFIX: &str = "bundle_emb.";
/// The key prefix of embeddings in our format.
pub const OURS_PREFIX: &str = "learned_embeds.";
/// Our metadata entry listing the tokens in order.
pub const OURS_ORDER_KEY: &str = "lora_diffusion.tokens";
/// The file name of the sidecar written beside a LoRA file that cannot hold embeddings.
pub const SIDECAR_NAME: &str = "learned_embeds.safetensors";

fn learned(file: &Path, token: &str, t: &Tensor) -> anyhow::Result<LearnedToken> {
    crate::tensor_file::check_finite(t, &format!("embedding {token:?}"))
        .with_context(|| format!("{}", file.display()))?;
    LearnedToken::new(token, t.clone()).with_context(|| format!("{}", file.display()))
}

/// True for a cloneofsimo embedding tensor (its metadata value is `<embed>`).
pub fn is_cloneofsimo_key(file: &LoraFile, key: &str) -> bool {
    file.metadata.get(key).map(String::as_str) == Some(EMBED_MARK)
}

/// The embeddings of a cloneofsimo safetensors file, in key order.
pub fn read_cloneofsimo(file: &LoraFile) -> anyhow::Result<Vec<LearnedToken>> {
    file.tensors
        .iter()
        .filter(|(k, _)| is_cloneofsimo_key(file, k))
        .map(|(k, t)| learned(&file.path, k, t))
        .collect()
}

/// The embeddings of a kohya file (`bundle_emb.<name>.…`), in key order of the names.
pub fn read_kohya(file: &LoraFile) -> anyhow::Result<Vec<LearnedToken>> {
    let mut by_name: BTreeMap<&str, Vec<(&str, &Tensor)>> = BTreeMap::new();
    for (k, t) in &file.tensors {
        if let Some(rest) = k.strip_prefix(KOHYA_PREFIX) {
            let (name, field) = rest.split_once('.').unwrap_or((rest, ""));
            by_name.entry(name).or_default().push((field, t));
        }
    }
    let mut out = vec![];
    for (name, fields) in by_name {
        let pick = fields
            .iter()
            .find(|(f, _)| *f == "string_to_param.*")
            .or_else(|| fields.iter().find(|(f, _)| *f == "emb_params"))
            .or_else(|| fields.first().filter(|_| fields.len() == 1));
        let Some((_, t)) = pick else {
            let keys: Vec<String> = fields
                .iter()
                .map(|(f, _)| format!("{KOHYA_PREFIX}{name}.{f}"))
                .collect();
            bail!(
                "{}: bundled embedding {name:?} has keys {}; expected {KOHYA_PREFIX}{name}.string_to_param.* \
                 (SDXL clip_l / clip_g embeddings are not supported)",
                file.path.display(),
                keys.join(", ")
            );
        };
        out.push(learned(&file.path, name, t)?);
    }
    Ok(out)
}

/// The embeddings of a file in our format, in the order of `lora_diffusion.tokens`.
pub fn read_ours(file: &LoraFile) -> anyhow::Result<Vec<LearnedToken>> {
    let present: Vec<&str> = file
        .tensors
        .keys()
        .filter_map(|k| k.strip_prefix(OURS_PREFIX))
        .collect();
    let order: Vec<String> = match file.metadata.get(OURS_ORDER_KEY) {
        Some(json) => serde_json::from_str(json).with_context(|| {
            format!(
                "{}: metadata {OURS_ORDER_KEY} is not a JSON list of tokens: {json}",
                file.path.display()
            )
        })?,
        None => present.iter().map(|s| s.to_string()).collect(),
    };
    let listed: Vec<&String> = order.iter().collect();
    let unlisted: Vec<String> = present
        .iter()
        .filter(|p| !listed.iter().any(|l| l == p))
        .map(|p| format!("{OURS_PREFIX}{p}"))
        .collect();
    if !unlisted.is_empty() {
        bail!(
            "{}: embeddings not listed in {OURS_ORDER_KEY}:{}",
            file.path.display(),
            short_list(&unlisted, 10)
        );
    }
    order
        .iter()
        .map(|tok| {
            let t = file
                .tensors
                .get(&format!("{OURS_PREFIX}{tok}"))
                .with_context(|| {
                    format!(
                    "{}: {OURS_ORDER_KEY} lists {tok:?} but there is no tensor {OURS_PREFIX}{tok}",
                    file.path.display()
                )
                })?;
            learned(&file.path, tok, t)
        })
        .collect()
}

/// The tokens of `set`, each vector under its own name (`token`, `token_1`, …), for formats
/// that store one vector per token.
fn single_vectors(set: &LoraSet) -> anyhow::Result<Vec<(String, Tensor)>> {
    let mut out = vec![];
    for e in &set.embeddings {
        for (i, name) in e.token_names().into_iter().enumerate() {
            out.push((name, e.vectors.get(i)?));
        }
    }
    Ok(out)
}

/// Adds cloneofsimo's embedding tensors (`<token>`, metadata `<embed>`) to `enc`.
pub fn push_cloneofsimo(enc: &mut Encoded, set: &LoraSet) -> anyhow::Result<()> {
    for (name, v) in single_vectors(set)? {
        if enc.tensors.iter().any(|(k, _, _)| *k == name) {
            bail!("embedding token {name:?} has the name of a LoRA key");
        }
        enc.metadata.insert(name.clone(), EMBED_MARK.into());
        enc.tensors.push((name, v, Cast::Keep));
    }
    Ok(())
}

/// Adds kohya's bundled embeddings (`bundle_emb.<token>.string_to_param.*`) to `enc`.
pub fn push_kohya(enc: &mut Encoded, set: &LoraSet) -> anyhow::Result<()> {
    for e in &set.embeddings {
        if e.token.contains('.') {
            bail!(
                "embedding token {:?} contains a '.', which bundle_emb keys cannot hold",
                e.token
            );
        }
        enc.tensors.push((
            format!("{KOHYA_PREFIX}{}.string_to_param.*", e.token),
            e.vectors.clone(),
            Cast::Keep,
        ));
    }
    Ok(())
}

/// Adds our embeddings (`learned_embeds.<token>`, `lora_diffusion.tokens`) to `enc`.
pub fn push_ours(enc: &mut Encoded, set: &LoraSet) -> anyhow::Result<()> {
    if set.embeddings.is_empty() {
        return Ok(());
    }
    let order: Vec<&str> = set.embeddings.iter().map(|e| e.token.as_str()).collect();
    enc.metadata
        .insert(OURS_ORDER_KEY.into(), serde_json::to_string(&order)?);
    for e in &set.embeddings {
        enc.tensors.push((
            format!("{OURS_PREFIX}{}", e.token),
            e.vectors.clone(),
            Cast::Keep,
        ));
    }
    Ok(())
}

/// Whether a format stores learned token embeddings in the LoRA file itself.
pub fn holds_embeddings(format: Format) -> bool {
    matches!(format, Format::Ours | Format::Kohya | Format::Cloneofsimo)
}

/// The sidecar [`super::write`] puts `set`'s learned tokens in (`learned_embeds.safetensors`
/// beside `path`) when `format` cannot hold them and there are any.
pub fn sidecar_for(set: &LoraSet, path: &Path, format: Format) -> Option<PathBuf> {
    (!set.embeddings.is_empty() && !holds_embeddings(format)).then(|| sidecar_path(path))
}

/// [`sidecar_for`], refused when the sidecar exists and `force` is off.
pub fn check_sidecar(
    set: &LoraSet,
    path: &Path,
    format: Format,
    force: bool,
) -> anyhow::Result<Option<PathBuf>> {
    let side = sidecar_for(set, path, format);
    if let Some(s) = &side {
        if s.exists() && !force {
            bail!(
                "{} already exists (the {format} file cannot hold the LoRA's learned tokens, \
                 they go to this sidecar); pass --force to overwrite it",
                s.display()
            );
        }
    }
    Ok(side)
}

/// The sidecar path beside a LoRA file `out`.
pub fn sidecar_path(out: &Path) -> PathBuf {
    out.with_file_name(SIDECAR_NAME)
}

/// Writes the embeddings of `set` as a `{token: vector}` textual-inversion file (diffusers'
/// `learned_embeds.safetensors` layout; a multi-vector token as `[n, width]`), atomically.
pub fn write_standalone(set: &LoraSet, path: &Path, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            path.display()
        );
    }
    let mut tensors = vec![];
    for e in &set.embeddings {
        let v = if e.count() == 1 {
            e.vectors.get(0)?
        } else {
            e.vectors.clone()
        };
        tensors.push((
            e.token.clone(),
            crate::tensor_file::OutTensor::from_tensor(&v)?,
        ));
    }
    crate::tensor_file::write(path, tensors, &BTreeMap::new(), force)
}

/// The file name stem (the token of a file that does not name its own).
fn stem(path: &Path) -> String {
    path.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string()
}

/// The string entry `key` of a pickle's root dict.
fn root_string(file: &TorchFile, key: &str) -> Option<String> {
    let p = file.pickle();
    let Some(Object::Dict(items)) = p.object(&p.root) else {
        return None;
    };
    items.iter().find_map(|(k, v)| match (k, v) {
        (Value::Str(k), Value::Str(v)) if &**k == key => Some(v.to_string()),
        _ => None,
    })
}

/// Reads a standalone textual-inversion file; `token` (from `FILE:TOKEN`) names the token of a
/// file holding one embedding (A1111 files are otherwise named by their `name` entry or the
/// file name).
pub fn read_standalone(path: &Path, token: Option<&str>) -> anyhow::Result<Vec<LearnedToken>> {
    if !path.is_file() {
        bail!("embedding file {} does not exist", path.display());
    }
    let (tensors, a1111_name): (Vec<(String, Tensor)>, Option<String>) =
        if super::io::is_pickle_name(path) {
            let file = TorchFile::open(path)?;
            let name = root_string(&file, "name");
            (file.state_dict()?, name)
        } else {
            let f = crate::tensor_file::TensorFile::open(path)?;
            let all = f.load_all(&candle_core::Device::Cpu)?;
            (all.into_iter().collect(), None)
        };
    let a1111 = tensors
        .iter()
        .find(|(k, _)| k == "string_to_param.*")
        .or_else(|| {
            tensors
                .iter()
                .find(|(k, _)| k == "emb_params")
                .filter(|_| tensors.len() == 1)
        });
    if let Some((_, t)) = a1111 {
        let name = token
            .map(str::to_string)
            .or(a1111_name)
            .unwrap_or_else(|| stem(path));
        return Ok(vec![learned(path, &name, t)?]);
    }
    if tensors.is_empty() {
        bail!("{}: no embedding tensors found", path.display());
    }
    if tensors
        .iter()
        .any(|(k, _)| k.starts_with("string_to_param"))
    {
        let keys: Vec<String> = tensors.iter().map(|(k, _)| k.clone()).collect();
        bail!(
            "{}: A1111 embedding without string_to_param.*; keys:{}",
            path.display(),
            short_list(&keys, 10)
        );
    }
    match (token, tensors.len()) {
        (Some(tok), 1) => Ok(vec![learned(path, tok, &tensors[0].1)?]),
        (Some(tok), n) => bail!(
            "{}: holds {n} embeddings ({}); :{tok} renames the token of a file with one embedding",
            path.display(),
            tensors
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        (None, _) => tensors.iter().map(|(k, t)| learned(path, k, t)).collect(),
    }
}

/// An embedding file with an optional token (`FILE[:TOKEN]` on the command line).
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingSpec {
    /// The file.
    pub path: PathBuf,
    /// The token to use instead of the file's own.
    pub token: Option<String>,
}

impl std::str::FromStr for EmbeddingSpec {
    type Err = anyhow::Error;

    /// Parses `FILE` or `FILE:TOKEN` (an existing file path wins over the split).
    fn from_str(s: &str) -> anyhow::Result<Self> {
        if !Path::new(s).exists() {
            if let Some((path, tok)) = s.rsplit_once(':') {
                if !tok.is_empty() && !tok.contains('/') {
                    return Ok(Self {
                        path: path.into(),
                        token: Some(tok.to_string()),
                    });
                }
            }
        }
        Ok(Self {
            path: s.into(),
            token: None,
        })
    }
}
