//! What `lora inspect` reports about a LoRA file.

use super::check::guess_base;
use super::ours::targets;
use super::{detect, fmt_alpha, io, read_as, Architecture, Format};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// A description of one LoRA file.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// The model family its shapes point to.
    pub base: String,
    /// Adapted module names (`to_q`, `q_proj`, …).
    pub targets: Vec<String>,
    /// Adapted layers per component (`unet`, `text_encoder`).
    pub layers: BTreeMap<String, usize>,
    /// How many layers are convolutions.
    pub conv_layers: usize,
    /// rank → number of layers (LoKr layers with both sides full are in `full_rank`).
    pub ranks: BTreeMap<usize, usize>,
    /// LoKr layers whose both sides are full matrices (no rank, scale 1).
    pub full_rank: usize,
    /// Layer kind (`LoRA`, `LoHa`, `LoKr`, `DoRA`, `LoHa+DoRA`, …) → number of layers.
    pub kinds: BTreeMap<String, usize>,
    /// (alpha, scale = alpha / rank) → number of layers.
    pub alphas: BTreeMap<(String, String), usize>,
    /// Stored dtypes of the factors.
    pub dtypes: BTreeSet<String>,
    /// Learned tokens: (token, vector count, width), in file order.
    pub tokens: Vec<(String, usize, usize)>,
    /// Number of LoRA parameters (elements of all factors and learned-token vectors).
    pub parameters: usize,
    /// File size in bytes (with a `.text_encoder.pt` sibling when read).
    pub file_size: u64,
    /// The file's metadata.
    pub metadata: BTreeMap<String, String>,
    /// `(sshs_model_hash, sshs_legacy_hash)` recomputed from the file's tensors, when the file
    /// records them (see [`super::kohya_meta::hashes`]).
    pub hashes: Option<(String, String)>,
}

/// sd-scripts' hashes of a safetensors file, from its stored tensor bytes and `ss_*` metadata.
fn file_hashes(path: &Path) -> anyhow::Result<(String, String)> {
    let f = crate::tensor_file::TensorFile::open(path)?;
    let mut tensors = Vec::with_capacity(f.entries.len());
    for (name, e) in &f.entries {
        let t = crate::tensor_file::OutTensor {
            dtype: e.dtype,
            shape: e.shape.clone(),
            data: std::borrow::Cow::Borrowed(f.bytes(name)?),
        };
        tensors.push((name.clone(), t));
    }
    super::kohya_meta::hashes(&tensors, &f.metadata)
}

/// Reads and describes a LoRA file; `model` resolves keys as in [`super::read_with`].
pub fn summarize(path: &Path, model: Option<&Architecture>) -> anyhow::Result<Summary> {
    let format = detect(path)?;
    let set = read_as(path, format, model)?;
    let mut file_size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if io::is_pickle_name(path) {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !name.ends_with(".text_encoder.pt") {
            let te =
                path.with_file_name(format!("{}.text_encoder.pt", name.trim_end_matches(".pt")));
            file_size += std::fs::metadata(te).map(|m| m.len()).unwrap_or(0);
        }
    }
    let mut s = Summary {
        path: path.to_path_buf(),
        format,
        base: guess_base(&set),
        targets: targets(&set),
        layers: BTreeMap::new(),
        conv_layers: 0,
        ranks: BTreeMap::new(),
        full_rank: 0,
        kinds: BTreeMap::new(),
        alphas: BTreeMap::new(),
        dtypes: BTreeSet::new(),
        tokens: set
            .embeddings
            .iter()
            .map(|e| (e.token.clone(), e.count(), e.width()))
            .collect(),
        parameters: set.embeddings.iter().map(|e| e.vectors.elem_count()).sum(),
        file_size,
        metadata: set.metadata.clone(),
        hashes: None,
    };
    if set.metadata.contains_key("sshs_model_hash") && !io::is_pickle_name(path) {
        s.hashes = Some(file_hashes(path)?);
    }
    for (k, w) in &set.layers {
        let comp = k.prefix().to_string();
        *s.layers.entry(comp).or_default() += 1;
        s.conv_layers += w.is_conv() as usize;
        match w.low_rank() {
            Some(r) => *s.ranks.entry(r).or_default() += 1,
            None => s.full_rank += 1,
        }
        *s.kinds.entry(w.kind_label()).or_default() += 1;
        *s.alphas
            .entry((
                fmt_alpha(w.alpha()),
                fmt_alpha((w.scale() * 1e6).round() / 1e6),
            ))
            .or_default() += 1;
        for t in w.factors().all() {
            s.dtypes.insert(format!("{:?}", t.dtype()).to_lowercase());
        }
        if let Some(d) = w.dora() {
            s.dtypes
                .insert(format!("{:?}", d.magnitude.dtype()).to_lowercase());
        }
        s.parameters += w.parameters();
    }
    Ok(s)
}

fn counts<K: fmt::Display>(m: impl IntoIterator<Item = (K, usize)>) -> String {
    let v: Vec<(String, usize)> = m.into_iter().map(|(k, n)| (k.to_string(), n)).collect();
    if v.len() == 1 {
        return v[0].0.clone();
    }
    v.iter()
        .map(|(k, n)| format!("{k} ({n} layers)"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// cloneofsimo's per-layer `unet:<i>:rank` metadata entries.
fn is_index_rank(k: &str) -> bool {
    let p: Vec<&str> = k.split(':').collect();
    p.len() == 3 && p[1].parse::<usize>().is_ok() && p[2] == "rank"
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "file:        {}", self.path.display())?;
        writeln!(f, "format:      {}", self.format)?;
        writeln!(f, "base model:  {}", self.base)?;
        let layers: Vec<String> = self
            .layers
            .iter()
            .map(|(c, n)| format!("{n} {c}"))
            .collect();
        let conv = if self.conv_layers > 0 {
            format!(" ({} conv)", self.conv_layers)
        } else {
            String::new()
        };
        writeln!(f, "layers:      {}{conv}", layers.join(", "))?;
        writeln!(f, "targets:     {}", self.targets.join(", "))?;
        writeln!(
            f,
            "kind:        {}",
            counts(self.kinds.iter().map(|(k, n)| (k, *n)))
        )?;
        let mut ranks: Vec<(String, usize)> = self
            .ranks
            .iter()
            .map(|(k, n)| (k.to_string(), *n))
            .collect();
        if self.full_rank > 0 {
            ranks.push(("full (LoKr, both sides full)".into(), self.full_rank));
        }
        writeln!(f, "rank:        {}", counts(ranks))?;
        let alphas = counts(
            self.alphas
                .iter()
                .map(|((a, s), n)| (format!("{a} (scale {s})"), *n)),
        );
        writeln!(f, "alpha:       {alphas}")?;
        writeln!(
            f,
            "dtype:       {}",
            self.dtypes.iter().cloned().collect::<Vec<_>>().join(", ")
        )?;
        if !self.tokens.is_empty() {
            let list: Vec<String> = self
                .tokens
                .iter()
                .map(|(t, n, w)| {
                    let v = if *n == 1 { "vector" } else { "vectors" };
                    format!("{t} ({n} {v} of width {w})")
                })
                .collect();
            writeln!(f, "tokens:      {}", list.join(", "))?;
        }
        writeln!(f, "parameters:  {}", self.parameters)?;
        writeln!(
            f,
            "file size:   {} ({} bytes)",
            human(self.file_size),
            self.file_size
        )?;
        if let Some((model, legacy)) = &self.hashes {
            let said = (
                self.metadata.get("sshs_model_hash"),
                self.metadata.get("sshs_legacy_hash"),
            );
            let verdict = if said == (Some(model), Some(legacy)) {
                "match the tensors"
            } else {
                "DO NOT match the tensors (the file was changed after they were computed)"
            };
            writeln!(f, "sshs hashes: {verdict}: model {model}, legacy {legacy}")?;
        }
        if self.metadata.is_empty() {
            writeln!(f, "metadata:    (none)")?;
        } else {
            writeln!(f, "metadata:")?;
            let ranks: Vec<&String> = self.metadata.keys().filter(|k| is_index_rank(k)).collect();
            if !ranks.is_empty() {
                writeln!(
                    f,
                    "  <component>:<i>:rank: {} entries (cloneofsimo per-layer ranks)",
                    ranks.len()
                )?;
            }
            for (k, v) in self.metadata.iter().filter(|(k, _)| !is_index_rank(k)) {
                let one_line = v.split_whitespace().collect::<Vec<_>>().join(" ");
                let shown: String = one_line.chars().take(160).collect();
                let more = if one_line.chars().count() > 160 {
                    " …"
                } else {
                    ""
                };
                writeln!(f, "  {k}: {shown}{more}")?;
            }
        }
        Ok(())
    }
}
