//! Checkpoints that let `--resume` continue exactly: the trained tensors, the AdamW moments,
//! the step, every RNG state and the data order, written to `checkpoint-<step>/` through a
//! temporary folder that is renamed when complete. Tensors are written by
//! [`crate::tensor_file`]'s byte-deterministic writer.

use super::plot::LossPoint;
use super::scaler::LossScaler;
use crate::tensor_file::{out_tensors, to_bytes};
use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Reads every tensor of a safetensors file onto `device`; the error names the file.
pub fn read_safetensors(path: &Path, device: &Device) -> anyhow::Result<BTreeMap<String, Tensor>> {
    crate::tensor_file::TensorFile::open(path)
        .and_then(|f| f.load_all(device))
        .with_context(|| format!("cannot read {}", path.display()))
}

/// The order in which training items are visited: a permutation per epoch, drawn from the
/// data RNG when the previous one is used up (with buckets: the epoch's images batch after
/// batch, and the batch lengths).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataOrder {
    /// The current epoch's permutation of item indices.
    pub perm: Vec<usize>,
    /// The next position in `perm`.
    pub cursor: usize,
    /// Epochs started so far.
    pub epoch: usize,
    /// With buckets, the lengths of the epoch's batches, in order (`perm` is cut into them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub batches: Vec<usize>,
}

/// Everything besides tensors that a resumed run needs (`trainer_state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// File format version (1).
    pub version: u32,
    /// Optimizer steps completed.
    pub step: usize,
    /// State of the data RNG (shuffling, crops, flips).
    pub data_rng: [u64; 4],
    /// State of the noise RNG (latent sampling, noise, timesteps).
    pub noise_rng: [u64; 4],
    /// States of the LoRA dropout RNGs (UNet, then text encoder).
    pub dropout_rng: Vec<[u64; 4]>,
    /// The data order.
    pub order: DataOrder,
    /// With buckets and prior preservation, the order class images are drawn in.
    #[serde(default)]
    pub class_order: DataOrder,
    /// The loss log so far.
    pub losses: Vec<LossPoint>,
    /// The training options of the run (`TrainConfig::training_args`).
    pub training_args: serde_json::Value,
    /// The fp16 loss scaler (`--mixed-precision fp16` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<LossScaler>,
    /// With `--pivotal`: the phase of the next step (1 textual inversion, 2 LoRA); the
    /// optimizer state is that phase's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<u8>,
}

/// The files of one checkpoint folder.
pub struct CheckpointFiles {
    /// The folder.
    pub dir: PathBuf,
}

impl CheckpointFiles {
    /// `<output_dir>/checkpoint-<step>`.
    pub fn for_step(output_dir: &Path, step: usize) -> Self {
        Self {
            dir: output_dir.join(format!("checkpoint-{step}")),
        }
    }

    /// The trained tensors by name.
    pub fn params(&self) -> PathBuf {
        self.dir.join("params.safetensors")
    }

    /// The AdamW moments.
    pub fn optimizer(&self) -> PathBuf {
        self.dir.join("optimizer.safetensors")
    }

    /// [`TrainerState`] as JSON.
    pub fn state(&self) -> PathBuf {
        self.dir.join("trainer_state.json")
    }
}

/// What a checkpoint holds.
pub struct Checkpoint {
    /// Trained tensors by parameter name.
    pub params: BTreeMap<String, Tensor>,
    /// AdamW moments (`m.<name>`, `v.<name>`).
    pub optimizer: BTreeMap<String, Tensor>,
    /// The moving averages of `--use-ema` (`ema.<name>`, `ema.updates`), empty without it.
    pub ema: BTreeMap<String, Tensor>,
    /// The rest of the state.
    pub state: TrainerState,
}

/// Writes a checkpoint folder for `ckpt.state.step` under `output_dir` (replacing an older one
/// of the same step); `extra` files (e.g. `lora.safetensors`) are written into it too.
pub fn save(
    output_dir: &Path,
    ckpt: &Checkpoint,
    extra: &[(&str, Vec<u8>)],
) -> anyhow::Result<PathBuf> {
    let files = CheckpointFiles::for_step(output_dir, ckpt.state.step);
    let no_metadata = BTreeMap::new();
    crate::atomic::write_dir(&files.dir, |tmp| {
        let write = |name: &str, bytes: &[u8]| {
            let p = tmp.join(name);
            std::fs::write(&p, bytes).with_context(|| format!("cannot write {}", p.display()))
        };
        write(
            "params.safetensors",
            &to_bytes(out_tensors(&ckpt.params)?, &no_metadata)?,
        )?;
        write(
            "optimizer.safetensors",
            &to_bytes(out_tensors(&ckpt.optimizer)?, &no_metadata)?,
        )?;
        if !ckpt.ema.is_empty() {
            write(
                "ema.safetensors",
                &to_bytes(out_tensors(&ckpt.ema)?, &no_metadata)?,
            )?;
        }
        write(
            "trainer_state.json",
            serde_json::to_string_pretty(&ckpt.state)?.as_bytes(),
        )?;
        for (name, bytes) in extra {
            write(name, bytes)?;
        }
        Ok(())
    })?;
    Ok(files.dir)
}

/// Reads a checkpoint folder; errors name the missing or unreadable file.
pub fn load(dir: &Path, device: &Device) -> anyhow::Result<Checkpoint> {
    let files = CheckpointFiles {
        dir: dir.to_path_buf(),
    };
    if !dir.is_dir() {
        bail!("--resume {}: no such checkpoint folder", dir.display());
    }
    let state_path = files.state();
    let text = std::fs::read_to_string(&state_path).with_context(|| {
        format!(
            "--resume {}: cannot read {} (is this a checkpoint-<step> folder?)",
            dir.display(),
            state_path.display()
        )
    })?;
    let state: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid trainer state", state_path.display()))?;
    if state.version != 1 {
        bail!(
            "{}: unsupported checkpoint version {}",
            state_path.display(),
            state.version
        );
    }
    Ok(Checkpoint {
        params: read_safetensors(&files.params(), device)?,
        optimizer: read_safetensors(&files.optimizer(), device)?,
        ema: match files.dir.join("ema.safetensors") {
            p if p.is_file() => read_safetensors(&p, device)?,
            _ => BTreeMap::new(),
        },
        state,
    })
}

/// The checkpoint folder with the highest step in `output_dir`, if any.
pub fn latest(output_dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(output_dir).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join("trainer_state.json")
                .is_file()
                .then_some((step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
        .map(|(_, p)| p)
}
