//! Reading and writing the containers LoRAs come in: safetensors (tensors + string metadata)
//! and PyTorch zip pickles holding a flat list of tensors (cloneofsimo's `.pt`), the latter
//! parsed with candle's pickle reader, which interprets opcodes and never executes code.

use anyhow::{anyhow, bail, Context};
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
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

/// Key names and shapes of a safetensors file plus its metadata, read from the header only.
#[derive(Debug, Clone, Default)]
pub struct Header {
    /// Tensor name → (safetensors dtype name, shape).
    pub tensors: BTreeMap<String, (String, Vec<usize>)>,
    /// The `__metadata__` entries.
    pub metadata: BTreeMap<String, String>,
}

/// True when `path` looks like a PyTorch pickle by name (`.pt`, `.pth`, `.bin`, `.ckpt`).
pub fn is_pickle_name(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("pt") | Some("pth") | Some("bin") | Some("ckpt")
    )
}

/// Reads just the header of a safetensors file.
pub fn read_header(path: &Path) -> anyhow::Result<Header> {
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("cannot open LoRA file {}", path.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| {
        anyhow!(
            "{} is not a valid safetensors file: {len} bytes, too short for a header (truncated?)",
            path.display()
        )
    })?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || n + 8 > len {
        bail!(
            "{} is not a valid safetensors file: its header claims {n} bytes but the file has {len} (truncated or corrupt)",
            path.display()
        );
    }
    let mut text = vec![0u8; n as usize];
    f.read_exact(&mut text)
        .with_context(|| format!("cannot read the header of {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
        anyhow!(
            "{} is not a valid safetensors file: header is not JSON ({e})",
            path.display()
        )
    })?;
    let obj = json.as_object().ok_or_else(|| {
        anyhow!(
            "{} is not a valid safetensors file: header is not a JSON object",
            path.display()
        )
    })?;
    let mut header = Header::default();
    for (k, v) in obj {
        if k == "__metadata__" {
            if let Some(m) = v.as_object() {
                for (mk, mv) in m {
                    let s = mv
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| mv.to_string());
                    header.metadata.insert(mk.clone(), s);
                }
            }
            continue;
        }
        let dtype = v
            .get("dtype")
            .and_then(|d| d.as_str())
            .unwrap_or("?")
            .to_string();
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64().map(|x| x as usize))
                    .collect()
            })
            .unwrap_or_default();
        header.tensors.insert(k.clone(), (dtype, shape));
    }
    Ok(header)
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
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read LoRA file {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow!(
            "{} is not a valid safetensors file ({e}); is it truncated or corrupt ({} bytes)?",
            path.display(),
            bytes.len()
        )
    })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow!("{}: invalid safetensors header: {e}", path.display()))?;
    let metadata = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .map_err(|e| anyhow!("{}: cannot load tensor {name}: {e}", path.display()))?;
        tensors.insert(name, t);
    }
    Ok(LoraFile {
        path: path.to_path_buf(),
        container: Container::Safetensors,
        tensors,
        list: vec![],
        metadata,
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

/// Writes tensors and metadata as a safetensors file, atomically (temporary file, then
/// rename); refuses to replace an existing file unless `force`.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
    force: bool,
) -> anyhow::Result<()> {
    let meta: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let data: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let bytes = safetensors::serialize(data, Some(meta))
        .map_err(|e| anyhow!("cannot serialize {}: {e}", path.display()))?;
    let bytes = canonical_header(bytes)?;
    crate::pipeline::image_io::write_atomic(path, force, |tmp| {
        std::fs::write(tmp, &bytes).with_context(|| format!("cannot write {}", tmp.display()))
    })
}

/// Rewrites a serialized safetensors buffer's JSON header with its keys sorted (the
/// `safetensors` crate writes metadata in hash order), so equal contents give equal bytes.
pub fn canonical_header(mut bytes: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    if bytes.len() < 8 {
        bail!("serialized safetensors buffer too short");
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(len8) as usize;
    if 8 + n > bytes.len() {
        bail!("serialized safetensors header overruns the buffer");
    }
    // serde_json's map is ordered by key (no `preserve_order`), so a round trip sorts it.
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])?;
    let mut sorted = serde_json::to_vec(&header)?;
    if sorted.len() > n {
        bail!("canonical safetensors header is longer than the original");
    }
    sorted.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&sorted);
    Ok(bytes)
}

#[cfg(test)]
mod canonical_tests {
    use super::*;

    #[test]
    fn same_content_gives_same_bytes() {
        let t = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let meta: BTreeMap<String, String> = (0..20)
            .map(|i| (format!("key{i}"), format!("v{i}")))
            .collect();
        let mut outs = vec![];
        for _ in 0..4 {
            let m: HashMap<String, String> = meta.clone().into_iter().collect();
            let b = safetensors::serialize(vec![("w", &t), ("b", &t)], Some(m)).unwrap();
            outs.push(canonical_header(b).unwrap());
        }
        assert!(outs.windows(2).all(|w| w[0] == w[1]));
        let st = safetensors::SafeTensors::deserialize(&outs[0]).unwrap();
        assert_eq!(st.names().len(), 2);
        let (_, m) = safetensors::SafeTensors::read_metadata(&outs[0]).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap().get("key7").unwrap(), "v7");
    }
}
