//! A model in one file of the original (LDM) layout, `.safetensors` or pickled `.ckpt`: its
//! family and configs inferred from tensor shapes (or taken from a diffusers folder, as
//! diffusers' `from_single_file(config=…)`), its tensors renamed to our module paths at load.

use crate::models::clip::ClipTextConfig;
use crate::models::ldm::keys::{Part, TextLayout};
use crate::models::ldm::{self, Configs, Family, Layout, Shapes};
use crate::models::unet::UNet2DConditionConfig;
use crate::models::vae::AutoencoderKLConfig;
use crate::models::weights::ModelWeights;
use crate::pickle::TorchFile;
use crate::tensor_file::TensorFile;
use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// What a single file holds, read once from its header.
#[derive(Debug)]
pub struct SingleInfo {
    /// Every tensor's shape.
    pub shapes: Shapes,
    /// SD 1.x or 2.x.
    pub family: Family,
    /// Component configs (inferred or from the config folder).
    pub configs: Configs,
    /// The key layout.
    pub layout: Layout,
    /// The prediction type the scheduler uses.
    pub prediction_type: String,
    /// What was assumed, for the load note.
    pub notes: Vec<String>,
}

/// A single-file model and how to read it.
pub struct SingleFile {
    /// The file.
    pub path: PathBuf,
    /// A diffusers folder whose configs, tokenizer and scheduler to use instead of inferring.
    pub config_dir: Option<PathBuf>,
    /// `epsilon` / `v_prediction` / `sample`, overriding the inferred one.
    pub prediction_type: Option<String>,
    info: OnceLock<Arc<SingleInfo>>,
}

impl std::fmt::Debug for SingleFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFile")
            .field("path", &self.path)
            .field("config_dir", &self.config_dir)
            .field("prediction_type", &self.prediction_type)
            .finish()
    }
}

/// True when `path` names a single-file checkpoint by its extension.
pub fn is_single_file_name(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("safetensors" | "ckpt" | "pt" | "pth")
    )
}

enum Reader {
    Safetensors(TensorFile),
    Torch(TorchFile, HashMap<String, usize>),
}

impl Reader {
    fn open(path: &Path) -> anyhow::Result<Self> {
        if crate::pickle::is_pickle_name(path) {
            let f = TorchFile::open(path)?;
            let ids = f.state_dict_ids(".")?.into_iter().collect();
            Ok(Self::Torch(f, ids))
        } else {
            Ok(Self::Safetensors(TensorFile::open(path)?))
        }
    }

    fn shapes(&self) -> anyhow::Result<Shapes> {
        match self {
            Self::Safetensors(f) => Ok(f
                .entries
                .iter()
                .map(|(k, e)| (k.clone(), e.shape.clone()))
                .collect()),
            Self::Torch(f, ids) => ids
                .iter()
                .map(|(k, id)| Ok((k.clone(), f.info(k.clone(), *id)?.shape)))
                .collect(),
        }
    }

    /// The `global_step` entry of a `.ckpt`'s top-level dict (Lightning checkpoints).
    fn global_step(&self) -> Option<i64> {
        use crate::pickle::{Object, Value};
        let Self::Torch(f, _) = self else {
            return None;
        };
        let p = f.pickle();
        let Value::Obj(root) = &p.root else {
            return None;
        };
        let Some(Object::Dict(items)) = p.objects.get(*root) else {
            return None;
        };
        items.iter().find_map(|(k, v)| match (k, v) {
            (Value::Str(s), Value::Int(i)) if &**s == "global_step" => Some(*i),
            _ => None,
        })
    }

    fn load(&self, key: &str) -> anyhow::Result<Tensor> {
        match self {
            Self::Safetensors(f) => f.load(key, &Device::Cpu),
            Self::Torch(f, ids) => f.tensor(*ids.get(key).context("no such tensor")?),
        }
    }
}

fn read_json<T>(
    dir: &Path,
    rel: &str,
    parse: impl FnOnce(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let p = dir.join(rel);
    if !p.is_file() {
        bail!("config folder {} has no {rel}", dir.display());
    }
    parse(&p)
}

impl SingleFile {
    /// A single file read with inferred configs.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            config_dir: None,
            prediction_type: None,
            info: OnceLock::new(),
        }
    }

    /// Takes configs, tokenizer and scheduler from the diffusers folder `dir`.
    pub fn with_config_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.config_dir = dir;
        self
    }

    /// Overrides the prediction type.
    pub fn with_prediction_type(mut self, p: Option<String>) -> Self {
        self.prediction_type = p;
        self
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    /// Family, configs and layout, read on first use.
    pub fn info(&self) -> anyhow::Result<Arc<SingleInfo>> {
        if let Some(i) = self.info.get() {
            return Ok(i.clone());
        }
        let info = Arc::new(self.read_info()?);
        Ok(self.info.get_or_init(|| info).clone())
    }

    fn read_info(&self) -> anyhow::Result<SingleInfo> {
        let file = self.name();
        if !self.path.is_file() {
            bail!("single-file model {file} does not exist");
        }
        let reader = Reader::open(&self.path)?;
        let shapes = reader.shapes()?;
        let global_step = reader.global_step();
        drop(reader);
        let family = ldm::detect(&shapes, &file)?;
        let text = Layout::text_of(family);
        let mut notes = vec![format!("{file}: {} single file", family.name())];
        let configs = match &self.config_dir {
            Some(dir) => Configs {
                unet: read_json(dir, "unet/config.json", |p| {
                    UNet2DConditionConfig::from_file(p)
                })?,
                vae: read_json(dir, "vae/config.json", |p| {
                    AutoencoderKLConfig::from_file(p)
                })?,
                text: read_json(dir, "text_encoder/config.json", |p| {
                    ClipTextConfig::from_file(p)
                })?,
            },
            None => {
                notes.push(
                    "configs inferred from tensor shapes (norm groups 32; SD 1.x: 8 heads; SD 2.x: \
                     64-channel heads, linear projections, upcast attention); tokenizer: the bundled \
                     CLIP vocabulary"
                        .into(),
                );
                Configs {
                    unet: ldm::infer_unet_config(&shapes, family, &file)?,
                    vae: ldm::infer_vae_config(&shapes, family, &file)?,
                    text: ldm::infer_text_config(&shapes, text, &file)?,
                }
            }
        };
        let layout = Layout::new(&configs.unet, &configs.vae, text)?;
        let prediction_type = match (&self.prediction_type, family) {
            (Some(p), _) => p.clone(),
            (None, Family::Sd1) => "epsilon".to_string(),
            // diffusers' rule: SD 2 base was saved at global step 875000; other SD 2 files are
            // taken as the 768 px v-prediction models.
            (None, Family::Sd2) if global_step == Some(875_000) => {
                notes.push(
                    "SD 2.x at global_step 875000 (SD 2 base): prediction type epsilon".into(),
                );
                "epsilon".to_string()
            }
            (None, Family::Sd2) => {
                notes.push(
                    "SD 2.x: prediction type v_prediction assumed (diffusers' rule: the file does not \
                     say); pass --prediction-type epsilon for SD 2 base (512 px) models"
                        .into(),
                );
                "v_prediction".to_string()
            }
        };
        Ok(SingleInfo {
            shapes,
            family,
            configs,
            layout,
            prediction_type,
            notes,
        })
    }

    /// The tensors of `component` under our module paths; every expected single-file key that
    /// is absent or of another shape is named in one error.
    pub fn weights(&self, component: &str) -> anyhow::Result<ModelWeights> {
        let info = self.info()?;
        let file = self.name();
        let map = ldm::component_map(component, &info.configs, &info.layout)?;
        let mut problems = vec![];
        for m in &map {
            let want = ldm::keys::stored_shape(&m.shape, m.part);
            match info.shapes.get(&m.ldm) {
                None => problems.push(format!("missing {} {want:?}", m.ldm)),
                Some(got) if *got != want => problems.push(format!(
                    "{}: expected shape {want:?}, the file has {got:?}",
                    m.ldm
                )),
                Some(_) => {}
            }
        }
        if !problems.is_empty() {
            let mut msg = format!(
                "{file}: the {component} of this {} single file does not match its config ({} problems):",
                info.family.name(),
                problems.len()
            );
            for p in problems.iter().take(20) {
                msg.push_str(&format!("\n  {p}"));
            }
            if problems.len() > 20 {
                msg.push_str(&format!("\n  ... and {} more", problems.len() - 20));
            }
            bail!(msg);
        }
        let reader = Reader::open(&self.path)?;
        let mut tensors = HashMap::new();
        let mut fused: HashMap<String, Tensor> = HashMap::new();
        for m in map {
            let t = match m.part {
                Part::Whole => reader.load(&m.ldm)?,
                Part::Conv1x1 => reader.load(&m.ldm)?.reshape(m.shape.as_slice())?,
                Part::Chunk { index } => {
                    let all = match fused.get(&m.ldm) {
                        Some(t) => t.clone(),
                        None => {
                            let t = reader.load(&m.ldm)?;
                            fused.insert(m.ldm.clone(), t.clone());
                            t
                        }
                    };
                    all.narrow(0, index * m.shape[0], m.shape[0])?
                        .contiguous()?
                }
            };
            tensors.insert(m.key, t);
        }
        Ok(ModelWeights::from_tensors_of(
            component, &self.path, tensors,
        ))
    }

    /// The scheduler config JSON: the folder's, else the standard SD one with the prediction type.
    pub fn scheduler_config_text(&self) -> anyhow::Result<String> {
        let info = self.info()?;
        if let Some(dir) = &self.config_dir {
            let p = dir.join("scheduler/scheduler_config.json");
            let mut v: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&p)
                    .with_context(|| format!("cannot read {}", p.display()))?,
            )
            .with_context(|| format!("{} is not valid JSON", p.display()))?;
            if let (Some(pt), Some(o)) = (&self.prediction_type, v.as_object_mut()) {
                o.insert("prediction_type".into(), pt.clone().into());
            }
            return Ok(v.to_string());
        }
        Ok(serde_json::json!({
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "set_alpha_to_one": false, "steps_offset": 1,
            "clip_sample": false, "timestep_spacing": "leading",
            "prediction_type": info.prediction_type,
        })
        .to_string())
    }

    /// The tokenizer folder (the config folder's, else the bundled one) and the pad token to
    /// use in place of its own (`!` for SD 2.x).
    pub fn tokenizer(&self) -> anyhow::Result<(PathBuf, Option<&'static str>)> {
        if let Some(dir) = &self.config_dir {
            return Ok((dir.join("tokenizer"), None));
        }
        let pad = (self.info()?.family == Family::Sd2).then_some("!");
        Ok((super::bundled_model_dir().join("tokenizer"), pad))
    }
}

/// The text layout a diffusers model's text encoder has in a single file: OpenCLIP (SD 2.x)
/// when its activation is GELU, CLIP (SD 1.x, quick-GELU) otherwise.
pub fn text_layout_of(cfg: &ClipTextConfig) -> TextLayout {
    if format!("{:?}", cfg.hidden_act).to_lowercase() == "gelu" {
        TextLayout::OpenClip
    } else {
        TextLayout::Clip
    }
}
