//! `lora generate` and `lora demo`.

use super::common::{parse_device, parse_dtype, progress_bar};
use crate::hub::{bundled_model_dir, ModelSource};
use crate::pipeline::image_io::{check_writable, numbered_paths, save_png, to_rgb8};
use crate::pipeline::{read_init_latents, GenerateParams, StableDiffusion};
use crate::schedulers::SchedulerKind;
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `lora generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A diffusers folder or Hugging Face id (default: the bundled tiny model).
    #[arg(long)]
    model: Option<String>,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// The negative prompt (empty when absent).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Classifier-free guidance scale (1 turns guidance off).
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Sampler: ddim, euler, euler-a, dpm++2m or ddpm.
    #[arg(long, default_value = "ddim")]
    scheduler: String,
    /// DDIM eta (0: deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image height (default: the model's native size).
    #[arg(long)]
    height: Option<usize>,
    /// Image width (default: the model's native size).
    #[arg(long)]
    width: Option<usize>,
    /// Number of images (written as OUT-0.png, OUT-1.png, … when more than one).
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// A safetensors file with a tensor `latents` [num_images, C, H/f, W/f] to start from.
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// Use the text encoder layer this many before the last.
    #[arg(long, default_value_t = 0)]
    clip_skip: usize,
    /// Weight dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Device: cpu, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Output PNG path.
    #[arg(long)]
    out: PathBuf,
    /// Overwrite existing output files.
    #[arg(long)]
    force: bool,
}

/// Arguments of `lora demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Output folder.
    #[arg(long, default_value = "target/demo")]
    out_dir: PathBuf,
}

fn model_source(model: Option<&str>) -> anyhow::Result<ModelSource> {
    match model {
        Some(m) => ModelSource::parse(m),
        None => {
            let dir = bundled_model_dir();
            if !dir.join("model_index.json").is_file() {
                anyhow::bail!(
                    "the bundled model is missing from {} (pass --model)",
                    dir.display()
                );
            }
            Ok(ModelSource::Local(dir))
        }
    }
}

/// Runs `lora generate`.
pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let scheduler: SchedulerKind = a.scheduler.parse()?;
    let dtype = parse_dtype(&a.dtype)?;
    let device = parse_device(&a.device)?;
    let paths = numbered_paths(&a.out, a.num_images.max(1));
    for p in &paths {
        check_writable(p, a.force)?;
    }
    let init_latents = a.init_latents.as_deref().map(read_init_latents).transpose()?;
    let source = model_source(a.model.as_deref())?;
    let t0 = Instant::now();
    let sd = StableDiffusion::load(&source, dtype, &device)
        .with_context(|| format!("cannot load model {}", source.describe()))?;
    eprintln!("loaded {} in {:.1}s", source.describe(), t0.elapsed().as_secs_f64());
    let params = GenerateParams {
        prompt: a.prompt,
        negative_prompt: a.negative_prompt,
        steps: a.steps,
        guidance: a.guidance,
        scheduler,
        seed: a.seed,
        height: a.height,
        width: a.width,
        num_images: a.num_images,
        init_latents,
        clip_skip: a.clip_skip,
        eta: a.eta,
    };
    generate_to(&sd, &params, &paths, a.force)
}

fn generate_to(
    sd: &StableDiffusion,
    params: &GenerateParams,
    paths: &[PathBuf],
    force: bool,
) -> anyhow::Result<()> {
    let pb = progress_bar(params.steps as u64, "denoising");
    let t0 = Instant::now();
    let images = sd.generate(params, &mut |i, n| {
        pb.set_length(n as u64);
        pb.set_position(i as u64);
    })?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    for (img, path) in to_rgb8(&images)?.iter().zip(paths) {
        save_png(img, path, force)?;
        eprintln!("wrote {} ({}x{})", path.display(), img.width(), img.height());
    }
    eprintln!(
        "{} step(s) in {secs:.2}s ({:.2} it/s)",
        params.steps,
        params.steps as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// Runs `lora demo`: generates a few images with the bundled model.
pub fn demo(a: DemoArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("cannot create {}", a.out_dir.display()))?;
    let source = model_source(None)?;
    let device = candle_core::Device::Cpu;
    let sd = StableDiffusion::load(&source, candle_core::DType::F32, &device)?;
    eprintln!(
        "bundled model {} (random weights: images are noise-like patterns, not pictures)",
        source.describe()
    );
    let params = GenerateParams {
        prompt: "a photo of a sks dog on the beach".into(),
        negative_prompt: "blurry".into(),
        steps: 20,
        num_images: 2,
        ..Default::default()
    };
    let paths = numbered_paths(&a.out_dir.join("demo.png"), params.num_images);
    generate_to(&sd, &params, &paths, true)?;
    Ok(())
}
