//! Reading the containers LoRAs come in: safetensors (tensors + string metadata, through
//! [`crate::tensor_file`], which also writes them) and PyTorch zip pickles holding a flat list
//! of tensors (cloneofsimo's `.pt`), the latter parsed with candle's pickle reader, which
//! interprets opcodes and never executes code.

use crate::tensor_file::TensorFile;
use anyhow::{anyhow, bail, Context};
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// The container a LoRA file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    /// A `.safetensors` file.
    Safetensors,
    /// A PyTorch zip pickle of a flat list of tensors (cloneofsimo's `.pt`).
    PickleList,
    /// A PyTorch zip pickle of a state dict (old diffusers / kohya `.bin`, `.pt`, `.ckpt`).
    PickleDict,
}

/// The raw content of a LoRA file: tensors by key (list position for pickles) and metadata.
#[derive(Debug, Clone)]
pub struct LoraFile {
    /// Where it came from.
    pub path: PathBuf,
    /// The container.
    pub container: Container,
    /// Tensors by key, on the CPU in their stored dtype.
    pub tensors: BTreeMap<String, Tensor>,
    /// List order of a pickle (`0`, `1`, …); empty for safetensors.
    pub list: Vec<Tensor>,
    /// The safetensors `__metadata__` (empty for pickles).
    pub metadata: BTreeMap<String, String>,
}

/// True when `path` looks like a PyTorch pickle by name (`.pt`, `.pth`, `.bin`, `.ckpt`).
pub fn is_pickle_name(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("pt") | Some("pth") | Some("bin") | Some("ckpt")
    )
}

/// Reads a whole LoRA file: safetensors, or a PyTorch pickle of a tensor list or state dict.
pub fn read_file(path: &Path) -> anyhow::Result<LoraFile> {
    if !path.exists() {
        bail!("LoRA file {} does not exist", path.display());
    }
    if is_pickle_name(path) {
        let (entries, is_list) = read_pickle(path)?;
        let tensors = entries.iter().cloned().collect();
        let list = if is_list {
            entries.into_iter().map(|(_, t)| t).collect()
        } else {
            vec![]
        };
        let container = if is_list {
            Container::PickleList
        } else {
            Container::PickleDict
        };
        return Ok(LoraFile {
            path: path.to_path_buf(),
            container,
            tensors,
            list,
            metadata: BTreeMap::new(),
        });
    }
    let file = TensorFile::open(path)?;
    let mut tensors = BTreeMap::new();
    for name in file.entries.keys() {
        tensors.insert(name.clone(), file.load(name, &Device::Cpu)?);
    }
    Ok(LoraFile {
        path: path.to_path_buf(),
        container: Container::Safetensors,
        tensors,
        list: vec![],
        metadata: file.metadata,
    })
}

/// Reads a PyTorch zip file whose pickle is a flat list of tensors (`torch.save([t0, t1, …])`).
pub fn read_pickle_list(path: &Path) -> anyhow::Result<Vec<Tensor>> {
    match read_pickle(path)? {
        (entries, true) => Ok(entries.into_iter().map(|(_, t)| t).collect()),
        (_, false) => bail!(
            "PyTorch file {} holds a dict (a state dict), not cloneofsimo's flat list of tensors",
            path.display()
        ),
    }
}

/// Reads a PyTorch zip file holding a flat list of tensors (named `0`, `1`, …; `true`) or a
/// flat dict of tensors (`false`).
pub fn read_pickle(path: &Path) -> anyhow::Result<(Vec<(String, Tensor)>, bool)> {
    let what = || format!("PyTorch file {}", path.display());
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", what()))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
        anyhow!("{} is not a zip-format torch.save file (truncated, corrupt, or the legacy pre-1.6 format): {e}", what())
    })?;
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| anyhow!("{} holds no data.pkl", what()))?;
    let dir = PathBuf::from(pkl.trim_end_matches(".pkl"));
    let obj = {
        let entry = zip
            .by_name(&pkl)
            .map_err(|e| anyhow!("{}: cannot read {pkl}: {e}", what()))?;
        let mut reader = BufReader::new(entry);
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut reader)
            .map_err(|e| anyhow!("{}: cannot parse the pickle (corrupt?): {e}", what()))?;
        stack
            .finalize()
            .map_err(|e| anyhow!("{}: cannot parse the pickle: {e}", what()))?
    };
    let (items, is_list): (Vec<(String, Object)>, bool) = match obj {
        Object::List(items) => (
            items
                .into_iter()
                .enumerate()
                .map(|(i, o)| (i.to_string(), o))
                .collect(),
            true,
        ),
        Object::Dict(items) => {
            let mut named = Vec::with_capacity(items.len());
            for (k, v) in items {
                match k {
                    Object::Unicode(k) => named.push((k, v)),
                    other => bail!(
                        "{} holds a dict with a non-string key ({})",
                        what(),
                        object_kind(&other)
                    ),
                }
            }
            (named, false)
        }
        other => bail!(
            "{} holds neither a list nor a dict of tensors (found {})",
            what(),
            object_kind(&other)
        ),
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items {
        let info = item
            .into_tensor_info(Object::Unicode(i.clone()), &dir)
            .map_err(|e| anyhow!("{}: item {i} is not a tensor: {e}", what()))?
            .ok_or_else(|| anyhow!("{}: item {i} is not a tensor", what()))?;
        let mut bytes = Vec::new();
        zip.by_name(&info.path)
            .map_err(|e| {
                anyhow!(
                    "{}: storage {} of item {i} is missing: {e}",
                    what(),
                    info.path
                )
            })?
            .read_to_end(&mut bytes)
            .map_err(|e| {
                anyhow!(
                    "{}: cannot read storage {} (truncated?): {e}",
                    what(),
                    info.path
                )
            })?;
        let t = tensor_from_storage(&bytes, info.dtype, &info.layout)
            .map_err(|e| anyhow!("{}: item {i}: {e}", what()))?;
        out.push((i, t));
    }
    Ok((out, is_list))
}

fn object_kind(o: &Object) -> &'static str {
    match o {
        Object::Dict(_) => "a dict",
        Object::Tuple(_) => "a tuple",
        Object::Reduce { .. } | Object::Build { .. } => "an object",
        _ => "a scalar",
    }
}

/// A tensor from a PyTorch storage blob and the (shape, element strides, byte offset) layout
/// candle's pickle reader records.
fn tensor_from_storage(
    bytes: &[u8],
    dtype: DType,
    layout: &candle_core::Layout,
) -> anyhow::Result<Tensor> {
    let size = dtype.size_in_bytes();
    if !bytes.len().is_multiple_of(size) {
        bail!(
            "storage of {} bytes is not a whole number of {dtype:?} values",
            bytes.len()
        );
    }
    let n = bytes.len() / size;
    let storage = Tensor::from_raw_buffer(bytes, dtype, &[n], &Device::Cpu)?;
    let offset = layout.start_offset() / size;
    let dims = layout.dims().to_vec();
    let strides = layout.stride().to_vec();
    let count: usize = dims.iter().product();
    if layout.is_contiguous() {
        if offset + count > n {
            bail!("tensor {dims:?} at offset {offset} reaches past its storage of {n} values (truncated?)");
        }
        return Ok(storage.narrow(0, offset, count)?.reshape(dims)?);
    }
    let mut idx = Vec::with_capacity(count);
    let mut pos = vec![0usize; dims.len()];
    for _ in 0..count {
        let off = offset + pos.iter().zip(&strides).map(|(p, s)| p * s).sum::<usize>();
        if off >= n {
            bail!("layout {dims:?} / strides {strides:?} reaches past its storage of {n} values (truncated?)");
        }
        idx.push(off as u32);
        for d in (0..dims.len()).rev() {
            pos[d] += 1;
            if pos[d] < dims[d] {
                break;
            }
            pos[d] = 0;
        }
    }
    let idx = Tensor::from_vec(idx, count, &Device::Cpu)?;
    Ok(storage.index_select(&idx, 0)?.reshape(dims)?)
}
