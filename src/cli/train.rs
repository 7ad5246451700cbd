//! `lora train`: DreamBooth LoRA (or full) fine-tuning from flags and/or a TOML file.

use crate::train::{LrScheduler, TrainConfig, TrainHooks, Trainer};
use anyhow::bail;
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

fn is_false(b: &bool) -> bool {
    !*b
}

/// Arguments of `lora train`. Every option can also be given in the `--config` TOML file under
/// its name with `_` (e.g. `learning_rate = 1e-4`); flags override the file.
#[derive(Args, Debug, Serialize, Default)]
pub struct TrainArgs {
    /// A TOML file with training options (keys = option names with `_`).
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Base model: a diffusers folder or Hugging Face id [default: the bundled tiny model].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    /// Folder of training images; `name.txt` beside `name.png` is that image's caption.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    instance_data_dir: Option<PathBuf>,
    /// Prompt of every instance image without a caption file, e.g. "a photo of sks dog".
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    instance_prompt: Option<String>,
    /// Training resolution (square) [default: 512].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    resolution: Option<usize>,
    /// Center crop (default: random crop) after resizing the shorter side to the resolution.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    center_crop: bool,
    /// Flip images horizontally at random.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    random_flip: bool,
    /// Encode every image with the VAE once before training (random crops are then drawn once).
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    cache_latents: bool,
    /// Skip unreadable or too small images with a warning instead of stopping.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    skip_bad_images: bool,
    /// DreamBooth prior preservation with class images.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    with_prior_preservation: bool,
    /// Folder of class images (missing ones are generated with the base model).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    class_data_dir: Option<PathBuf>,
    /// Prompt of the class images, e.g. "a photo of a dog".
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    class_prompt: Option<String>,
    /// Number of class images [default: 100].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    num_class_images: Option<usize>,
    /// Weight of the prior-preservation loss [default: 1.0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    prior_loss_weight: Option<f64>,
    /// LoRA rank [default: 4].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    rank: Option<usize>,
    /// LoRA alpha; the scale is alpha / rank [default: the rank].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_alpha: Option<f64>,
    /// Dropout on the LoRA hidden activation [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dropout: Option<f64>,
    /// UNet LoRA targets: presets attn, ff, proj, resnet, extended or module-path patterns,
    /// comma-separated [default: attn].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    targets: Option<String>,
    /// Also train a LoRA on the text encoder.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    train_text_encoder: bool,
    /// Text-encoder LoRA targets: text-attn, text-mlp [default: text-attn].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    text_targets: Option<String>,
    /// Learning rate of the text-encoder LoRA [default: 5e-6].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    learning_rate_text: Option<f64>,
    /// Learning rate [default: 1e-4].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    learning_rate: Option<f64>,
    /// AdamW beta1 [default: 0.9].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_beta1: Option<f64>,
    /// AdamW beta2 [default: 0.999].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_beta2: Option<f64>,
    /// AdamW weight decay [default: 0.01].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_weight_decay: Option<f64>,
    /// AdamW epsilon [default: 1e-8].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_epsilon: Option<f64>,
    /// Learning-rate schedule: constant, linear or cosine [default: constant].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lr_scheduler: Option<LrScheduler>,
    /// Linear warm-up steps [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lr_warmup_steps: Option<usize>,
    /// Optimizer steps [default: 500].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_train_steps: Option<usize>,
    /// Instance images per micro-batch [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    gradient_accumulation_steps: Option<usize>,
    /// Clip the global gradient norm (0: off) [default: 1.0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_grad_norm: Option<f64>,
    /// Min-SNR loss weighting gamma (typical: 5) [default: off].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    min_snr_gamma: Option<f64>,
    /// Offset-noise strength (typical: 0.05) [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    noise_offset: Option<f64>,
    /// Random seed (runs are bit-reproducible on the CPU) [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    /// Output folder: lora.safetensors, checkpoint-<step>/, loss.csv, loss.png, samples/.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    output_dir: Option<PathBuf>,
    /// Write into a non-empty output folder (files of the same name are replaced).
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    force: bool,
    /// Save a checkpoint every N steps (0: only on Ctrl-C) [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    save_steps: Option<usize>,
    /// Continue from a checkpoint folder, or `latest` (the newest in --output-dir).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    resume: Option<String>,
    /// Prompt of sample images drawn during training (and at the end).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    sample_prompt: Option<String>,
    /// Draw a sample every N steps [default: only at the end].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    sample_every: Option<usize>,
    /// Denoising steps of samples and generated class images [default: 20].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    sample_steps: Option<usize>,
    /// Guidance scale of samples and generated class images [default: 7.5].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    sample_guidance: Option<f64>,
    /// Fine-tune every UNet weight (the DreamBooth baseline) instead of LoRA.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    full: bool,
    /// Weight dtype: f32, f16 or bf16 [default: f32].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dtype: Option<String>,
    /// Device: cpu, cuda:N or metal [default: cpu].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    /// Testing aid: stop as Ctrl-C would after this many steps.
    #[arg(long, hide = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_after: Option<usize>,
}

/// The configuration from `--config` plus the flags.
pub fn config_from(a: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let flags = serde_json::to_value(a)?;
    TrainConfig::from_sources(a.config.as_deref(), flags)
}

/// Runs `lora train`.
pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    let cfg = config_from(&a)?;
    let hooks = TrainHooks::default();
    let flag = hooks.interrupt.clone();
    // First Ctrl-C: finish the step, save a checkpoint, exit. Second: exit at once.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!(
            "\nCtrl-C: saving a checkpoint after the current step (Ctrl-C again to quit now)"
        );
    });
    let out_dir = cfg.output_dir.clone().unwrap_or_default();
    let mut trainer = Trainer::new(cfg, hooks)?;
    let n = trainer.trainable().named_vars().len();
    let params: usize = trainer
        .trainable()
        .named_vars()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    eprintln!(
        "training {params} parameters in {n} tensors ({:.2} MB in f32)",
        params as f64 * 4.0 / 1e6
    );
    let outcome = trainer.run()?;
    if outcome.interrupted {
        let ck = outcome
            .checkpoint
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        bail!(
            "interrupted at step {}; checkpoint saved to {ck}; continue with the same options \
             plus --resume {ck}",
            outcome.steps
        );
    }
    let last = outcome.losses.last().map_or(f64::NAN, |p| p.loss);
    eprintln!(
        "trained to step {} ({} steps in {:.1}s, {:.2} it/s), last loss {last:.4}",
        outcome.steps,
        outcome.steps_this_run,
        outcome.train_seconds,
        outcome.steps_this_run as f64 / outcome.train_seconds.max(1e-9)
    );
    if let Some(p) = outcome.output {
        let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        eprintln!("wrote {} ({:.2} MB)", p.display(), size as f64 / 1e6);
    }
    eprintln!(
        "loss log: {} and {}",
        out_dir.join("loss.csv").display(),
        out_dir.join("loss.png").display()
    );
    Ok(())
}
