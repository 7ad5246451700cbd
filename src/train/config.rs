//! Every option of `lora train`, read from a TOML file (`--config`) and/or command-line flags
//! (flags win). Field names are the flag names with `_` for `-`, so a TOML file reads like the
//! command line: `learning_rate = 1e-4`, `instance_data_dir = "photos"`.

use super::bucket::BucketSpec;
pub use super::precision::MixedPrecision;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Learning-rate schedule after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduler {
    /// The base rate throughout (after the linear warm-up, when there is one).
    #[default]
    Constant,
    /// Linear decay from the base rate to 0 at `max_train_steps`.
    Linear,
    /// Half a cosine from the base rate to 0 at `max_train_steps`.
    Cosine,
}

impl std::str::FromStr for LrScheduler {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "constant" | "constant_with_warmup" => Ok(Self::Constant),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            _ => bail!("--lr-scheduler {s}: expected constant, linear or cosine"),
        }
    }
}

/// `--lr-scheduler` for clap (the [`LrScheduler`] names, plus `constant_with_warmup`).
fn parse_lr_scheduler(s: &str) -> Result<LrScheduler, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}

fn d_resolution() -> usize {
    512
}
fn d_min_bucket_reso() -> usize {
    256
}
fn d_max_bucket_reso() -> usize {
    1024
}
fn d_bucket_reso_steps() -> usize {
    64
}
fn d_num_class_images() -> usize {
    100
}
fn d_one() -> f64 {
    1.0
}
fn d_rank() -> usize {
    4
}
fn d_targets() -> String {
    "attn".into()
}
fn d_text_targets() -> String {
    "text-attn".into()
}
fn d_lr_text() -> f64 {
    5e-6
}
fn d_true() -> bool {
    true
}
fn d_lr() -> f64 {
    1e-4
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.999
}
fn d_wd() -> f64 {
    1e-2
}
fn d_eps() -> f64 {
    1e-8
}
fn d_steps() -> usize {
    500
}
fn d_one_usize() -> usize {
    1
}
fn d_sample_steps() -> usize {
    20
}
fn d_guidance() -> f64 {
    7.5
}
fn d_ema_decay() -> f64 {
    0.9999
}
fn d_cpu() -> String {
    "cpu".into()
}
fn d_ti_steps() -> usize {
    1000
}
fn d_lr_ti() -> f64 {
    5e-4
}
fn d_linear() -> LrScheduler {
    LrScheduler::Linear
}
fn d_save_format() -> String {
    "kohya".into()
}
fn d_output_name() -> String {
    "lora".into()
}

/// The complete training configuration (see `lora train --help` for each option).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Base model: a diffusers folder, a Hugging Face id or a single-file checkpoint
    /// (`.safetensors` / `.ckpt`, original layout) [default: the bundled tiny model].
    #[arg(long)]
    #[serde(default)]
    pub model: Option<String>,
    /// Single-file models: the prediction type (epsilon, v_prediction) when the inferred one is
    /// wrong (SD 2.x files are taken as v_prediction, as diffusers does).
    #[arg(long)]
    #[serde(default)]
    pub prediction_type: Option<String>,
    /// Folder of training images (png, jpg, jpeg, gif), captions in `img.txt` beside `img.png`.
    #[arg(long)]
    #[serde(default)]
    pub instance_data_dir: Option<PathBuf>,
    /// Prompt of every instance image without a caption file.
    #[arg(long)]
    #[serde(default)]
    pub instance_prompt: Option<String>,
    /// Training resolution (square), a multiple of the VAE factor.
    #[arg(long, default_value_t = d_resolution())]
    #[serde(default = "d_resolution")]
    pub resolution: usize,
    /// Center crop (else a random crop) after resizing the shorter side to the resolution.
    #[arg(long)]
    #[serde(default)]
    pub center_crop: bool,
    /// Aspect-ratio buckets (kohya's): images keep their aspect ratio at about resolution²
    /// pixels, every batch comes from one bucket.
    #[arg(long)]
    #[serde(default)]
    pub enable_bucket: bool,
    /// Smallest bucket side in pixels.
    #[arg(long, default_value_t = d_min_bucket_reso())]
    #[serde(default = "d_min_bucket_reso")]
    pub min_bucket_reso: usize,
    /// Largest bucket side in pixels.
    #[arg(long, default_value_t = d_max_bucket_reso())]
    #[serde(default = "d_max_bucket_reso")]
    pub max_bucket_reso: usize,
    /// Bucket sides are multiples of this (a multiple of 8).
    #[arg(long, default_value_t = d_bucket_reso_steps())]
    #[serde(default = "d_bucket_reso_steps")]
    pub bucket_reso_steps: usize,
    /// Buckets from the image sizes, never upscaling (min / max bucket sizes are ignored).
    #[arg(long)]
    #[serde(default)]
    pub bucket_no_upscale: bool,
    /// Flip images horizontally with probability 1/2.
    #[arg(long)]
    #[serde(default)]
    pub random_flip: bool,
    /// Encode every image with the VAE once, before training (the VAE encoder is then freed).
    #[arg(long)]
    #[serde(default)]
    pub cache_latents: bool,
    /// With a frozen text encoder: encode every caption once, before training, and free the
    /// text encoder (kept when samples are drawn during training). `false` to encode per step.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    #[serde(default = "d_true")]
    pub cache_text_embeddings: bool,
    /// Skip unreadable / too small images with a warning instead of stopping.
    #[arg(long)]
    #[serde(default)]
    pub skip_bad_images: bool,
    /// DreamBooth prior preservation with class images.
    #[arg(long)]
    #[serde(default)]
    pub with_prior_preservation: bool,
    /// Folder of class images (missing ones are generated with the base model).
    #[arg(long)]
    #[serde(default)]
    pub class_data_dir: Option<PathBuf>,
    /// Prompt of the class images.
    #[arg(long)]
    #[serde(default)]
    pub class_prompt: Option<String>,
    /// How many class images to use (generated when the folder has fewer).
    #[arg(long, default_value_t = d_num_class_images())]
    #[serde(default = "d_num_class_images")]
    pub num_class_images: usize,
    /// Weight of the prior-preservation loss.
    #[arg(long, default_value_t = d_one())]
    #[serde(default = "d_one")]
    pub prior_loss_weight: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = d_rank())]
    #[serde(default = "d_rank")]
    pub rank: usize,
    /// LoRA alpha (scale = alpha / rank); default: the rank.
    #[arg(long)]
    #[serde(default)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA input during training.
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub dropout: f64,
    /// UNet LoRA targets: comma-separated presets attn, ff, proj, resnet.
    #[arg(long, default_value_t = d_targets())]
    #[serde(default = "d_targets")]
    pub targets: String,
    /// Also train LoRA on the text encoder.
    #[arg(long)]
    #[serde(default)]
    pub train_text_encoder: bool,
    /// Text-encoder LoRA targets: text-attn, text-mlp.
    #[arg(long, default_value_t = d_text_targets())]
    #[serde(default = "d_text_targets")]
    pub text_targets: String,
    /// Learning rate of the text-encoder LoRA.
    #[arg(long, default_value_t = d_lr_text())]
    #[serde(default = "d_lr_text")]
    pub learning_rate_text: f64,
    /// Learning rate (UNet).
    #[arg(long, default_value_t = d_lr())]
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    /// AdamW beta1.
    #[arg(long, default_value_t = d_beta1())]
    #[serde(default = "d_beta1")]
    pub adam_beta1: f64,
    /// AdamW beta2.
    #[arg(long, default_value_t = d_beta2())]
    #[serde(default = "d_beta2")]
    pub adam_beta2: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = d_wd())]
    #[serde(default = "d_wd")]
    pub adam_weight_decay: f64,
    /// AdamW epsilon.
    #[arg(long, default_value_t = d_eps())]
    #[serde(default = "d_eps")]
    pub adam_epsilon: f64,
    /// Learning-rate schedule.
    #[arg(long, default_value = "constant", value_parser = parse_lr_scheduler)]
    #[serde(default)]
    pub lr_scheduler: LrScheduler,
    /// Linear warm-up steps (from 0 to the base rate).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub lr_warmup_steps: usize,
    /// Number of optimizer steps (with --pivotal: of the LoRA phase, after --ti-steps).
    #[arg(long, default_value_t = d_steps())]
    #[serde(default = "d_steps")]
    pub max_train_steps: usize,
    /// Instance images per micro-batch (plus as many class images with prior preservation).
    #[arg(long, default_value_t = d_one_usize())]
    #[serde(default = "d_one_usize")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = d_one_usize())]
    #[serde(default = "d_one_usize")]
    pub gradient_accumulation_steps: usize,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = d_one())]
    #[serde(default = "d_one")]
    pub max_grad_norm: f64,
    /// Min-SNR loss weighting with this gamma (typical 5).
    #[arg(long)]
    #[serde(default)]
    pub min_snr_gamma: Option<f64>,
    /// Offset noise strength (per-channel constant noise added to the noise).
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub noise_offset: f64,
    /// Seed of every random draw.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub seed: u64,
    /// Where the LoRA, checkpoints, loss log and samples go.
    #[arg(long)]
    #[serde(default)]
    pub output_dir: Option<PathBuf>,
    /// Format of the LoRA file: kohya (read by A1111, ComfyUI, Forge, diffusers, sd-scripts),
    /// diffusers, peft or ours.
    #[arg(long, default_value_t = d_save_format())]
    #[serde(default = "d_save_format")]
    pub save_format: String,
    /// Base name of the LoRA file: `<output-dir>/<output-name>.safetensors`.
    #[arg(long, default_value_t = d_output_name())]
    #[serde(default = "d_output_name")]
    pub output_name: String,
    /// Allow a non-empty output folder (files of a previous run are replaced).
    #[arg(long)]
    #[serde(default)]
    pub force: bool,
    /// Save a checkpoint every this many steps (0: only at the end / on Ctrl-C).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub save_steps: usize,
    /// Resume from a checkpoint folder, or `latest` (the newest in the output folder).
    #[arg(long)]
    #[serde(default)]
    pub resume: Option<String>,
    /// Prompt of the sample images drawn during training.
    #[arg(long)]
    #[serde(default)]
    pub sample_prompt: Option<String>,
    /// Draw a sample every this many steps (0: never; with a prompt and no value: at the end).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub sample_every: usize,
    /// Denoising steps of samples and of generated class images.
    #[arg(long, default_value_t = d_sample_steps())]
    #[serde(default = "d_sample_steps")]
    pub sample_steps: usize,
    /// Guidance scale of samples and of generated class images.
    #[arg(long, default_value_t = d_guidance())]
    #[serde(default = "d_guidance")]
    pub sample_guidance: f64,
    /// Pivotal tuning (cloneofsimo's `lora_pti`): textual inversion of new tokens
    /// (`--ti-steps`), then LoRA (`--max-train-steps`), the tokens saved in the LoRA file.
    #[arg(long)]
    #[serde(default)]
    pub pivotal: bool,
    /// The new tokens, `|`-separated (`"<s1>|<s2>"`); write them in the instance prompt /
    /// captions (`{}` there stands for all of them, joined).
    #[arg(long)]
    #[serde(default)]
    pub placeholder_tokens: Option<String>,
    /// One initializer per placeholder, `|`-separated: a word that is one token (`"dog|dog"`),
    /// `<rand-SIGMA>` (normal noise of that std) or `<zero>`.
    #[arg(long)]
    #[serde(default)]
    pub initializer_tokens: Option<String>,
    /// Initialise every placeholder with normal noise of std 0.017 (the original's default,
    /// `<rand-0.017>`), instead of --initializer-tokens.
    #[arg(long)]
    #[serde(default)]
    pub init_random: bool,
    /// Optimizer steps of the textual-inversion phase.
    #[arg(long, default_value_t = d_ti_steps())]
    #[serde(default = "d_ti_steps")]
    pub ti_steps: usize,
    /// Learning rate of the new token embeddings (textual-inversion phase).
    #[arg(long, default_value_t = d_lr_ti())]
    #[serde(default = "d_lr_ti")]
    pub learning_rate_ti: f64,
    /// AdamW weight decay of the textual-inversion phase.
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub weight_decay_ti: f64,
    /// After each textual-inversion step, pull each new embedding's norm towards 0.4 by
    /// min(1, 100·lr) (the original's `clip_ti_decay`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    #[serde(default = "d_true")]
    pub clip_ti_decay: bool,
    /// Learning-rate schedule of the textual-inversion phase.
    #[arg(long, default_value = "linear", value_parser = parse_lr_scheduler)]
    #[serde(default = "d_linear")]
    pub lr_scheduler_ti: LrScheduler,
    /// Warm-up steps of the textual-inversion phase.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub lr_warmup_steps_ti: usize,
    /// Keep training the new token embeddings in the LoRA phase.
    #[arg(long)]
    #[serde(default)]
    pub continue_inversion: bool,
    /// Learning rate of the embeddings in the LoRA phase [default: --learning-rate-ti].
    #[arg(long)]
    #[serde(default)]
    pub continue_inversion_lr: Option<f64>,
    /// Full fine-tuning of every UNet weight instead of LoRA (the DreamBooth baseline).
    #[arg(long)]
    #[serde(default)]
    pub full: bool,
    /// With --full: keep an exponential moving average of the UNet weights (diffusers'
    /// `EMAModel` warm-up decay) and save it instead of the last weights.
    #[arg(long)]
    #[serde(default)]
    pub use_ema: bool,
    /// The largest decay of --use-ema (warm-up: min(decay, (1 + n) / (10 + n)) at update n).
    #[arg(long, default_value_t = d_ema_decay())]
    #[serde(default = "d_ema_decay")]
    pub ema_decay: f64,
    /// Keep only each UNet transformer block's inputs (and each resnet's whose convs or norms
    /// train, and each text-encoder layer's with --train-text-encoder) and recompute the
    /// block in the backward: less memory, part of one more forward per step, the same
    /// gradients up to float rounding.
    #[arg(long)]
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Precision of the frozen model: no (f32), fp16 or bf16. The frozen weights and the
    /// activations use the half type; LoRA parameters, gradients, optimizer state and the loss
    /// stay f32; fp16 adds dynamic loss scaling (overflowing steps are skipped). `--dtype
    /// f32|f16|bf16` is the same option.
    #[arg(long, alias = "dtype", default_value_t = MixedPrecision::No)]
    #[serde(default, alias = "dtype")]
    pub mixed_precision: MixedPrecision,
    /// Device: cpu, cuda:N or metal.
    #[arg(long, default_value_t = d_cpu())]
    #[serde(default = "d_cpu")]
    pub device: String,
    /// The first fp16 loss scale (default 65536).
    #[arg(long, hide = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_loss_scale: Option<f64>,
    /// Test hook: behave as if Ctrl-C arrived after this many optimizer steps.
    #[arg(long, hide = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_after: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        // Every field has a serde default, so an empty table is the default config.
        serde_json::from_value(serde_json::json!({})).expect("defaults deserialize")
    }
}

/// The options that do not change what is trained (where files go, how often they are written),
/// left out of the training arguments recorded in the LoRA file and compared on resume.
const RUN_LOCAL: &[&str] = &[
    "output_dir",
    "cache_text_embeddings",
    "save_format",
    "output_name",
    "force",
    "resume",
    "stop_after",
    "save_steps",
    "sample_prompt",
    "sample_every",
    "sample_steps",
    "sample_guidance",
    "device",
];

impl TrainConfig {
    /// Reads a TOML file (keys = option names with `_`), then overlays `flags` (a JSON object of
    /// the options given on the command line).
    pub fn from_sources(file: Option<&Path>, flags: serde_json::Value) -> anyhow::Result<Self> {
        let mut base = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read config file {}", p.display()))?;
                let table: toml::Table = toml::from_str(&text)
                    .with_context(|| format!("config file {} is not valid TOML", p.display()))?;
                serde_json::to_value(table)
                    .with_context(|| format!("config file {}", p.display()))?
            }
            None => serde_json::json!({}),
        };
        if let (Some(obj), Some(over)) = (base.as_object_mut(), flags.as_object()) {
            for (k, v) in over {
                if !v.is_null() {
                    obj.insert(k.clone(), v.clone());
                }
            }
        }
        let origin = file.map_or("command line".to_string(), |p| {
            format!("config file {} and command line", p.display())
        });
        let cfg: Self = serde_json::from_value(base)
            .with_context(|| format!("invalid training options ({origin})"))?;
        Ok(cfg)
    }

    /// LoRA alpha (the rank when not given).
    pub fn alpha(&self) -> f64 {
        self.lora_alpha.unwrap_or(self.rank as f64)
    }

    /// Optimizer steps of the whole run: the textual-inversion steps (`--pivotal`) plus
    /// `max_train_steps`.
    pub fn total_steps(&self) -> usize {
        self.ti_phase_steps() + self.max_train_steps
    }

    /// Steps of the textual-inversion phase (0 without `--pivotal`).
    pub fn ti_phase_steps(&self) -> usize {
        if self.pivotal {
            self.ti_steps
        } else {
            0
        }
    }

    /// The bucketing options with `--enable-bucket` (min / max rounded to the steps) and the notes
    /// on their adjustment; `None` without it.
    pub fn bucket_spec(&self) -> anyhow::Result<Option<(BucketSpec, Vec<String>)>> {
        if !self.enable_bucket {
            return Ok(None);
        }
        BucketSpec::new(
            self.resolution,
            self.min_bucket_reso,
            self.max_bucket_reso,
            self.bucket_reso_steps,
            self.bucket_no_upscale,
        )
        .map(Some)
    }

    /// The LoRA file format named by `save_format`.
    pub fn lora_format(&self) -> anyhow::Result<crate::formats::Format> {
        use crate::formats::Format;
        match Format::parse(&self.save_format) {
            Ok(f @ (Format::Kohya | Format::Diffusers | Format::Peft | Format::Ours)) => Ok(f),
            _ => bail!(
                "--save-format {}: expected kohya, diffusers, peft or ours",
                self.save_format
            ),
        }
    }

    /// The dtype of the frozen weights and activations.
    pub fn weight_dtype(&self) -> anyhow::Result<candle_core::DType> {
        Ok(self.mixed_precision.dtype())
    }

    /// The options that define the training (everything but output paths and logging
    /// cadence), as a JSON object with sorted keys: recorded in the LoRA file's metadata.
    pub fn training_args(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            for k in RUN_LOCAL {
                obj.remove(*k);
            }
            // Files we write hold base names, never local paths.
            for k in ["model", "instance_data_dir", "class_data_dir"] {
                if let Some(serde_json::Value::String(p)) = obj.get_mut(k) {
                    let path = Path::new(p.as_str());
                    if path.is_absolute() || path.exists() {
                        if let Some(name) = path.file_name() {
                            *p = name.to_string_lossy().to_string();
                        }
                    }
                }
            }
        }
        v
    }

    /// The options whose change between a checkpoint and `--resume` would make the resumed
    /// run differ from an uninterrupted one; returns `(option, checkpoint value, new value)`.
    pub fn resume_conflicts(&self, saved: &serde_json::Value) -> Vec<(String, String, String)> {
        let now = self.training_args();
        let (Some(now), Some(saved)) = (now.as_object(), saved.as_object()) else {
            return vec![];
        };
        // Options newer than the checkpoint count as their default.
        let defaults = Self::default().training_args();
        let mut out = vec![];
        for (k, v) in now {
            // The number of steps may be raised to continue a finished run; checkpointing
            // changes memory and time, not the result.
            if k == "max_train_steps" || k == "gradient_checkpointing" {
                continue;
            }
            let old = saved
                .get(k)
                .or_else(|| defaults.get(k))
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            if &old != v {
                out.push((k.clone(), old.to_string(), v.to_string()));
            }
        }
        out
    }
}
