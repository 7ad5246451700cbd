//! Where a diffusers model lives: a local folder, or a Hugging Face id resolved through the
//! standard HF cache (downloading what is missing unless offline).

pub mod single;

use anyhow::{bail, Context};
use single::SingleFile;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A diffusers model: a local folder or a Hugging Face repository.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A folder holding model_index.json, unet/, text_encoder/, vae/, tokenizer/, scheduler/.
    Local(PathBuf),
    /// A Hugging Face model id such as `stable-diffusion-v1-5/stable-diffusion-v1-5`.
    Hub {
        /// The repository id.
        id: String,
        /// The revision (branch, tag or commit), `main` by default.
        revision: String,
    },
    /// One file in the original (LDM) layout, `.safetensors` or `.ckpt`.
    SingleFile(Arc<SingleFile>),
}

/// The folder of the small model bundled with the project (random weights, real CLIP vocab).
pub fn bundled_model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-sd")
}

fn offline() -> bool {
    ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"].iter().any(|v| {
        std::env::var(v)
            .map(|s| matches!(s.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
            .unwrap_or(false)
    })
}

impl ModelSource {
    /// Interprets `--model`: an existing path is a local folder; `owner/name[@rev]` that is not a
    /// path is a Hugging Face id; anything else is an error naming the path.
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let path = Path::new(spec);
        if path.exists() {
            if !path.is_dir() {
                if single::is_single_file_name(path) {
                    return Ok(Self::single_file(path, None, None));
                }
                bail!(
                    "--model {spec}: is a file but not a .safetensors / .ckpt single-file checkpoint; \
                     expected such a file, a diffusers folder (with model_index.json) or a Hugging Face id"
                );
            }
            return Ok(Self::Local(path.to_path_buf()));
        }
        let looks_like_id = !spec.starts_with('.')
            && !spec.starts_with('/')
            && spec.split('/').count() == 2
            && spec
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./@".contains(c));
        if !looks_like_id {
            bail!(
                "--model {spec}: no such folder (and not a Hugging Face id of the form owner/name)"
            );
        }
        let (id, revision) = match spec.split_once('@') {
            Some((id, rev)) => (id.to_string(), rev.to_string()),
            None => (spec.to_string(), "main".to_string()),
        };
        Ok(Self::Hub { id, revision })
    }

    /// A single-file model; `config_dir` (a diffusers folder) supplies configs, tokenizer and
    /// scheduler instead of the inferred ones, `prediction_type` overrides the inferred one.
    pub fn single_file(
        path: &Path,
        config_dir: Option<PathBuf>,
        prediction_type: Option<String>,
    ) -> Self {
        Self::SingleFile(Arc::new(
            SingleFile::new(path.to_path_buf())
                .with_config_dir(config_dir)
                .with_prediction_type(prediction_type),
        ))
    }

    /// The same model with `--prediction-type` / `--model-config` applied (single files only;
    /// an error for other sources when either is given).
    pub fn with_single_file_options(
        self,
        config_dir: Option<PathBuf>,
        prediction_type: Option<String>,
    ) -> anyhow::Result<Self> {
        match self {
            Self::SingleFile(s) => Ok(Self::single_file(&s.path, config_dir.or(s.config_dir.clone()), prediction_type.or(s.prediction_type.clone()))),
            other if config_dir.is_none() && prediction_type.is_none() => Ok(other),
            other => bail!(
                "--model-config / --prediction-type apply to single-file models; {} is a diffusers model \
                 (its scheduler/ and component configs are used)",
                other.describe()
            ),
        }
    }

    /// The weights of `component` (`unet`, `text_encoder`, `vae`) under our module paths.
    pub fn weights(&self, component: &str) -> anyhow::Result<crate::models::weights::ModelWeights> {
        match self {
            Self::SingleFile(s) => s.weights(component),
            _ => crate::models::weights::ModelWeights::from_files(
                component,
                &self.component_weights(component)?,
            ),
        }
    }

    /// A short human-readable name.
    pub fn describe(&self) -> String {
        match self {
            Self::Local(p) => p.display().to_string(),
            Self::SingleFile(s) => s.path.display().to_string(),
            Self::Hub { id, revision } if revision == "main" => id.clone(),
            Self::Hub { id, revision } => format!("{id}@{revision}"),
        }
    }

    /// A name for files we write: the folder's base name for a local model (never a local
    /// path), the id (and revision) for a Hugging Face model.
    pub fn public_name(&self) -> String {
        match self {
            Self::Local(p) => p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            Self::SingleFile(s) => s
                .path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            _ => self.describe(),
        }
    }

    /// The path of a file of the model (e.g. `unet/config.json`), or `None` when the model has
    /// no such file. Hub files come from the HF cache, else are downloaded unless offline.
    pub fn file(&self, rel: &str) -> anyhow::Result<Option<PathBuf>> {
        match self {
            Self::Local(dir) => {
                let p = dir.join(rel);
                Ok(p.is_file().then_some(p))
            }
            Self::SingleFile(s) => Ok(s
                .config_dir
                .as_ref()
                .map(|d| d.join(rel))
                .filter(|p| p.is_file())),
            Self::Hub { id, revision } => {
                let repo = hf_hub::Repo::with_revision(
                    id.clone(),
                    hf_hub::RepoType::Model,
                    revision.clone(),
                );
                let cache = hf_hub::Cache::from_env();
                if let Some(p) = cache.repo(repo.clone()).get(rel) {
                    return Ok(Some(p));
                }
                if offline() {
                    return Ok(None);
                }
                let api = hf_hub::api::sync::ApiBuilder::from_env()
                    .build()
                    .context("cannot set up the Hugging Face client")?;
                match api.repo(repo).get(rel) {
                    Ok(p) => Ok(Some(p)),
                    // A missing file answers 404: the model simply has no such file.
                    Err(e) if e.to_string().contains("404") => Ok(None),
                    Err(e) => bail!(
                        "model {}: {rel} is not in the Hugging Face cache ({}) and could not be \
                         downloaded: {e}. Download it on a connected machine, e.g. \
                         `huggingface-cli download {id} --revision {revision}`, or pass a local folder",
                        self.describe(),
                        cache.path().display()
                    ),
                }
            }
        }
    }

    /// Like [`ModelSource::file`] but an absent file is an error naming the model and the file.
    pub fn require(&self, rel: &str) -> anyhow::Result<PathBuf> {
        match self.file(rel)? {
            Some(p) => Ok(p),
            None => {
                match self {
                    Self::SingleFile(s) => bail!(
                        "single-file model {} has no {rel}: a single file holds weights only",
                        s.path.display()
                    ),
                    Self::Local(dir) => bail!(
                    "model folder {} has no {rel} (is it a diffusers folder with model_index.json, \
                     unet/, text_encoder/, vae/, tokenizer/, scheduler/?)",
                    dir.display()
                ),
                    Self::Hub { id, revision } => bail!(
                    "model {}: {rel} is not in the Hugging Face cache ({}){}; download it with \
                     `huggingface-cli download {id} --revision {revision}` or pass a local folder",
                    self.describe(),
                    hf_hub::Cache::from_env().path().display(),
                    if offline() { " and HF_HUB_OFFLINE is set" } else { "" }
                ),
                }
            }
        }
    }

    /// The weight files of a component folder such as `unet`: safetensors preferred, then a
    /// sharded index, then PyTorch `.bin`.
    pub fn component_weights(&self, component: &str) -> anyhow::Result<Vec<PathBuf>> {
        if let Self::Local(dir) = self {
            return crate::models::weights::component_weight_files(&dir.join(component));
        }
        if let Self::SingleFile(s) = self {
            bail!(
                "model {}: a single file has no {component}/ folder (its weights load through \
                 ModelSource::weights)",
                s.path.display()
            );
        }
        let stems = ["diffusion_pytorch_model", "model", "pytorch_model"];
        for ext in ["safetensors", "bin"] {
            for stem in stems {
                if let Some(p) = self.file(&format!("{component}/{stem}.{ext}"))? {
                    return Ok(vec![p]);
                }
                if let Some(index) = self.file(&format!("{component}/{stem}.{ext}.index.json"))? {
                    let text = std::fs::read_to_string(&index)
                        .with_context(|| format!("cannot read {}", index.display()))?;
                    let json: serde_json::Value = serde_json::from_str(&text)
                        .with_context(|| format!("{} is not valid JSON", index.display()))?;
                    let mut names: Vec<String> = json
                        .get("weight_map")
                        .and_then(|m| m.as_object())
                        .map(|m| {
                            m.values()
                                .filter_map(|v| v.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default();
                    names.sort();
                    names.dedup();
                    return names
                        .iter()
                        .map(|n| self.require(&format!("{component}/{n}")))
                        .collect();
                }
            }
        }
        bail!(
            "model {}: no weights for {component} (looked for {component}/diffusion_pytorch_model.safetensors, \
             model.safetensors, sharded index, .bin)",
            self.describe()
        )
    }
}

/// The parts of model_index.json we check: which class each component is.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    /// `_class_name`, e.g. StableDiffusionPipeline.
    pub class_name: String,
    /// component name → (library, class), e.g. unet → (diffusers, UNet2DConditionModel).
    pub components: Vec<(String, String, String)>,
}

impl ModelIndex {
    /// Reads model_index.json of `source`.
    pub fn read(source: &ModelSource) -> anyhow::Result<Self> {
        let path = source.require("model_index.json")?;
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let obj = json
            .as_object()
            .with_context(|| format!("{} is not a JSON object", path.display()))?;
        let class_name = obj
            .get("_class_name")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let mut components = vec![];
        for (k, v) in obj {
            if k.starts_with('_') {
                continue;
            }
            if let Some([lib, class]) = v.as_array().map(|a| a.as_slice()) {
                if let (Some(lib), Some(class)) = (lib.as_str(), class.as_str()) {
                    components.push((k.clone(), lib.to_string(), class.to_string()));
                }
            }
        }
        Ok(Self {
            class_name,
            components,
        })
    }

    /// Errors when a component we need is absent or of a class we do not implement.
    pub fn check_supported(&self, source: &ModelSource) -> anyhow::Result<()> {
        let want = [
            ("unet", &["UNet2DConditionModel"][..]),
            ("text_encoder", &["CLIPTextModel"][..]),
            ("vae", &["AutoencoderKL"][..]),
            ("tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"][..]),
        ];
        for (name, classes) in want {
            match self.components.iter().find(|c| c.0 == name) {
                None => bail!(
                    "model {}: model_index.json lists no `{name}` component (a Stable Diffusion \
                     pipeline needs unet, text_encoder, vae, tokenizer, scheduler)",
                    source.describe()
                ),
                Some((_, _, class)) if !classes.contains(&class.as_str()) => bail!(
                    "model {}: component `{name}` is a {class}; supported: {}",
                    source.describe(),
                    classes.join(", ")
                ),
                _ => {}
            }
        }
        Ok(())
    }
}
