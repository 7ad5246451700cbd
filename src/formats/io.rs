//! Reading the containers LoRAs come in: safetensors (tensors + string metadata, through
//! [`crate::tensor_file`], which also writes them) and PyTorch zip pickles holding a flat list
//! of tensors (cloneofsimo's `.pt`), the latter parsed with [`crate::pickle`], a bounded reader
//! that interprets opcodes and never executes code.

use crate::pickle::TorchFile;
use crate::tensor_file::TensorFile;
use anyhow::bail;
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
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

pub use crate::pickle::is_pickle_name;

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
    let tensors = file.load_all(&Device::Cpu)?;
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
/// dict of tensors (`false`; nested dicts such as `.ckpt`'s `state_dict` joined with `.`).
pub fn read_pickle(path: &Path) -> anyhow::Result<(Vec<(String, Tensor)>, bool)> {
    let file = TorchFile::open(path)?;
    if file.pickle().root_is_list() {
        let list = file.tensor_list()?;
        Ok((
            list.into_iter()
                .enumerate()
                .map(|(i, t)| (i.to_string(), t))
                .collect(),
            true,
        ))
    } else {
        Ok((file.state_dict()?, false))
    }
}
