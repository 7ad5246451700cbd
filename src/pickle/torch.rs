//! The `torch.save` zip container: `<archive>/data.pkl` parsed by the bounded reader, the
//! storages its persistent ids name read from `<archive>/data/<key>` once each (on first use)
//! and shared by all their views, and the views rebuilt as candle tensors.

use super::{parse, Limits, ObjId, Object, Pickle, StorageDtype, StorageRef, TensorView};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// Name, dtype and shape of one tensor, known without reading its storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Key (state dict path or list position).
    pub name: String,
    /// The dtype it loads as.
    pub dtype: DType,
    /// The dtype stored in the file.
    pub stored: StorageDtype,
    /// Shape.
    pub shape: Vec<usize>,
}

/// An opened `torch.save` zip file: the parsed pickle, and storages loaded on demand, once.
pub struct TorchFile {
    path: PathBuf,
    pickle: Pickle,
    prefix: String,
    limits: Limits,
    zip: RefCell<zip::ZipArchive<BufReader<File>>>,
    storages: RefCell<HashMap<String, Tensor>>,
    reads: Cell<usize>,
}

impl TorchFile {
    /// Opens `path` and parses its pickle with the default [`Limits`].
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, Limits::default())
    }

    /// Opens `path` and parses its pickle within `limits`.
    pub fn open_with(path: &Path, limits: Limits) -> Result<Self> {
        let what = format!("PyTorch file {}", path.display());
        let file = File::open(path).with_context(|| format!("cannot open {what}"))?;
        let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
            anyhow!("{what} is not a zip-format torch.save file (truncated, corrupt, or the legacy pre-1.6 format): {e}")
        })?;
        let pkls: Vec<String> = zip
            .file_names()
            .filter_map(|n| n.ok().map(|n| n.into_owned()))
            .filter(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
            .collect();
        let pkl = match pkls.as_slice() {
            [one] => one.clone(),
            [] => bail!("{what} holds no data.pkl"),
            _ => bail!("{what} holds several data.pkl entries: {}", pkls.join(", ")),
        };
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        let bytes = read_entry(&mut zip, &pkl, limits.max_pickle_bytes, &what)?;
        if let Ok(order) = read_entry(&mut zip, &format!("{prefix}byteorder"), 16, &what) {
            if order != b"little" {
                bail!(
                    "{what}: byteorder is {:?}; only little-endian files are read",
                    String::from_utf8_lossy(&order)
                );
            }
        }
        let pickle = parse(&bytes, &format!("{what} ({pkl})"), &limits)?;
        Ok(Self {
            path: path.to_path_buf(),
            pickle,
            prefix,
            limits,
            zip: RefCell::new(zip),
            storages: RefCell::new(HashMap::new()),
            reads: Cell::new(0),
        })
    }

    /// The parsed pickle.
    pub fn pickle(&self) -> &Pickle {
        &self.pickle
    }

    /// How many storages have been read from the zip so far.
    pub fn storages_read(&self) -> usize {
        self.reads.get()
    }

    fn what(&self) -> String {
        format!("PyTorch file {}", self.path.display())
    }

    fn view(&self, id: ObjId) -> Result<(&TensorView, &StorageRef)> {
        let view = match self.pickle.objects.get(id) {
            Some(Object::Tensor(t)) => t,
            _ => bail!("{}: object {id} is not a tensor", self.what()),
        };
        let storage = self
            .pickle
            .storage(view)
            .ok_or_else(|| anyhow!("{}: tensor {id} has no storage", self.what()))?;
        Ok((view, storage))
    }

    /// Name, dtype and shape of the tensor object `id`.
    pub fn info(&self, name: String, id: ObjId) -> Result<TensorInfo> {
        let (view, storage) = self.view(id)?;
        Ok(TensorInfo {
            name,
            dtype: storage.dtype.candle(),
            stored: storage.dtype,
            shape: view.shape.clone(),
        })
    }

    /// The tensor object `id` as a candle tensor on the CPU (its storage is read once).
    pub fn tensor(&self, id: ObjId) -> Result<Tensor> {
        let (view, storage) = self.view(id)?;
        let data = self.storage(storage)?;
        rebuild(&data, view).with_context(|| {
            format!(
                "{}: tensor on storage data/{} (shape {:?}, strides {:?}, offset {})",
                self.what(),
                storage.key,
                view.shape,
                view.stride,
                view.offset
            )
        })
    }

    /// The whole storage `s` as a 1-D tensor, read from the zip on first use.
    fn storage(&self, s: &StorageRef) -> Result<Tensor> {
        if let Some(t) = self.storages.borrow().get(&*s.key) {
            if t.dtype() != s.dtype.candle() {
                bail!(
                    "{}: storage data/{} is used as two dtypes",
                    self.what(),
                    s.key
                );
            }
            return Ok(t.clone());
        }
        let name = format!("{}data/{}", self.prefix, s.key);
        let need = s.numel.checked_mul(s.dtype.size() as u64).ok_or_else(|| {
            anyhow!(
                "{}: storage {name} claims {} elements",
                self.what(),
                s.numel
            )
        })?;
        let bytes = {
            let mut zip = self.zip.borrow_mut();
            let mut entry = zip
                .by_name(&name)
                .map_err(|e| anyhow!("{}: storage {name} is missing: {e}", self.what()))?;
            if entry.size() < need {
                bail!(
                    "{}: storage {name} has {} bytes, its {} {:?} values need {need} (truncated?)",
                    self.what(),
                    entry.size(),
                    s.numel,
                    s.dtype
                );
            }
            let mut bytes = Vec::new();
            (&mut entry)
                .take(need)
                .read_to_end(&mut bytes)
                .map_err(|e| {
                    anyhow!(
                        "{}: cannot read storage {name} (truncated?): {e}",
                        self.what()
                    )
                })?;
            if (bytes.len() as u64) < need {
                bail!(
                    "{}: storage {name} ends after {} of {need} bytes (truncated?)",
                    self.what(),
                    bytes.len()
                );
            }
            bytes
        };
        self.reads.set(self.reads.get() + 1);
        let t = storage_tensor(&bytes, s.dtype)
            .with_context(|| format!("{}: storage {name}", self.what()))?;
        self.storages
            .borrow_mut()
            .insert(s.key.to_string(), t.clone());
        Ok(t)
    }

    /// Tensor objects of the state dict with their keys (nested dicts joined with `sep`).
    pub fn state_dict_ids(&self, sep: &str) -> Result<Vec<(String, ObjId)>> {
        self.pickle
            .flat_tensors(sep, &self.limits)
            .map_err(|e| anyhow!("{}: {e}", self.what()))
    }

    /// The tensors of a state dict (nested dicts, e.g. `.ckpt`'s `state_dict`, joined with `.`).
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        self.state_dict_ids(".")?
            .into_iter()
            .map(|(k, id)| Ok((k, self.tensor(id)?)))
            .collect()
    }

    /// Name, dtype and shape of every state-dict tensor, without reading any storage.
    pub fn state_dict_info(&self) -> Result<Vec<TensorInfo>> {
        self.state_dict_ids(".")?
            .into_iter()
            .map(|(k, id)| self.info(k, id))
            .collect()
    }

    /// The tensors of a pickled flat list (`torch.save([t0, t1, …])`), in order.
    pub fn tensor_list(&self) -> Result<Vec<Tensor>> {
        let ids = self
            .pickle
            .tensor_list()
            .map_err(|e| anyhow!("{}: {e}", self.what()))?;
        ids.into_iter().map(|id| self.tensor(id)).collect()
    }
}

/// Reads zip entry `name` whole, refusing more than `max` bytes.
fn read_entry(
    zip: &mut zip::ZipArchive<BufReader<File>>,
    name: &str,
    max: u64,
    what: &str,
) -> Result<Vec<u8>> {
    let entry = zip
        .by_name(name)
        .map_err(|e| anyhow!("{what}: cannot read {name}: {e}"))?;
    if entry.size() > max {
        bail!(
            "{what}: {name} has {} bytes, more than the {max} read (limit)",
            entry.size()
        );
    }
    let mut bytes = Vec::new();
    entry
        .take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| anyhow!("{what}: cannot read {name} (truncated or corrupt?): {e}"))?;
    if bytes.len() as u64 > max {
        bail!("{what}: {name} holds more than {max} bytes (limit)");
    }
    Ok(bytes)
}

/// A 1-D tensor of the storage bytes, in the dtype candle holds them as.
fn storage_tensor(bytes: &[u8], dtype: StorageDtype) -> Result<Tensor> {
    let n = bytes.len() / dtype.size();
    let t = match dtype {
        StorageDtype::I8 => {
            let v: Vec<i16> = bytes.iter().map(|&b| b as i8 as i16).collect();
            Tensor::from_vec(v, n, &Device::Cpu)?
        }
        StorageDtype::Bool => {
            let v: Vec<u8> = bytes.iter().map(|&b| u8::from(b != 0)).collect();
            Tensor::from_vec(v, n, &Device::Cpu)?
        }
        _ => Tensor::from_raw_buffer(bytes, dtype.candle(), &[n], &Device::Cpu)?,
    };
    Ok(t)
}

/// Row-major strides of `shape`.
fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// True when `stride` is row-major for `shape` (dims of size 1 may have any stride).
fn is_row_major(shape: &[usize], stride: &[usize]) -> bool {
    let want = contiguous_strides(shape);
    shape
        .iter()
        .zip(stride.iter().zip(&want))
        .all(|(&d, (&s, &w))| d == 1 || s == w)
}

/// The view `v` of the 1-D storage tensor `data`; its extent was checked when parsing.
fn rebuild(data: &Tensor, v: &TensorView) -> Result<Tensor> {
    let count: usize = v.shape.iter().product();
    let n = data.dim(0)?;
    if count == 0 {
        return Ok(Tensor::zeros(v.shape.clone(), data.dtype(), &Device::Cpu)?);
    }
    if is_row_major(&v.shape, &v.stride) {
        if v.offset + count > n {
            bail!("the view reaches past the storage's {n} elements");
        }
        return Ok(data.narrow(0, v.offset, count)?.reshape(v.shape.clone())?);
    }
    // A permutation of a row-major layout (e.g. a transposed weight): reshape, then permute.
    let mut order: Vec<usize> = (0..v.shape.len()).collect();
    order.sort_by(|&a, &b| v.stride[b].cmp(&v.stride[a]));
    let shape: Vec<usize> = order.iter().map(|&d| v.shape[d]).collect();
    let stride: Vec<usize> = order.iter().map(|&d| v.stride[d]).collect();
    if is_row_major(&shape, &stride) && v.offset + count <= n {
        let mut inverse = vec![0usize; order.len()];
        for (i, &d) in order.iter().enumerate() {
            inverse[d] = i;
        }
        let t = data.narrow(0, v.offset, count)?.reshape(shape)?;
        return Ok(t.permute(inverse)?.contiguous()?);
    }
    // Any other strided view: gather its elements.
    let mut idx = Vec::with_capacity(count);
    let mut pos = vec![0usize; v.shape.len()];
    for _ in 0..count {
        let off = v.offset + pos.iter().zip(&v.stride).map(|(p, s)| p * s).sum::<usize>();
        if off >= n {
            bail!("the view reaches past the storage's {n} elements");
        }
        idx.push(off as i64);
        for d in (0..v.shape.len()).rev() {
            pos[d] += 1;
            if pos[d] < v.shape[d] {
                break;
            }
            pos[d] = 0;
        }
    }
    let idx = Tensor::from_vec(idx, count, &Device::Cpu)?;
    Ok(data.index_select(&idx, 0)?.reshape(v.shape.clone())?)
}

/// The tensors of the state dict in the `torch.save` file `path`.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    TorchFile::open(path)?.state_dict()
}

/// The tensors of the pickled flat list in `path`.
pub fn read_tensor_list(path: &Path) -> Result<Vec<Tensor>> {
    TorchFile::open(path)?.tensor_list()
}

/// Name, dtype and shape of every state-dict tensor in `path`, reading no storage.
pub fn read_tensor_info(path: &Path) -> Result<Vec<TensorInfo>> {
    TorchFile::open(path)?.state_dict_info()
}
