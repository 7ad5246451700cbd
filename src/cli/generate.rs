//! `lora generate` and `lora demo`.

use super::common::{parse_device, parse_dtype, progress_bar};
use crate::atomic::check_writable;
use crate::formats::embeddings::EmbeddingSpec;
use crate::hub::{bundled_model_dir, ModelSource};
use crate::pipeline::embeddings::{collect_tokens, SourcedToken};
use crate::pipeline::image_io::{numbered_paths, save_png, to_rgb8};
use crate::pipeline::lora::{read_loras, LoraSpec};
use crate::pipeline::{decode_latents, read_init_latents, GenerateParams, StableDiffusion};
use crate::schedulers::SchedulerKind;
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

/// Options shared by every command that samples images.
#[derive(Args, Debug, Clone)]
pub struct SampleArgs {
    /// A diffusers folder, a Hugging Face id, or a single-file checkpoint in the original
    /// layout (`.safetensors` / `.ckpt`, SD 1.x or 2.x) (default: the bundled tiny model).
    #[arg(long)]
    pub model: Option<String>,
    /// Single files: the prediction type (epsilon, v_prediction, sample) when the inferred one
    /// is wrong (SD 2.x files are taken as v_prediction, as diffusers does).
    #[arg(long = "prediction-type", value_name = "KIND")]
    pub prediction_type: Option<String>,
    /// Single files: a diffusers folder whose configs, tokenizer and scheduler to use instead
    /// of those inferred (like diffusers' `from_single_file(config=...)`).
    #[arg(long = "model-config", value_name = "DIR")]
    pub model_config: Option<PathBuf>,
    #[command(flatten)]
    pub params: GenerateParams,
    /// Sampler: ddim, euler, euler-a, dpm++2m or ddpm.
    #[arg(long, default_value = "ddim")]
    pub scheduler: String,
    /// Weight dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Device: cpu, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl SampleArgs {
    /// The model source (`--model`, or the bundled model).
    pub fn source(&self) -> anyhow::Result<ModelSource> {
        let source = model_source(self.model.as_deref())?
            .with_single_file_options(self.model_config.clone(), self.prediction_type.clone())?;
        if let ModelSource::SingleFile(s) = &source {
            for n in &s.info()?.notes {
                eprintln!("note: {n}");
            }
        }
        Ok(source)
    }

    /// Generation parameters for `num_images` images.
    pub fn params(&self, num_images: usize) -> anyhow::Result<GenerateParams> {
        Ok(GenerateParams {
            num_images,
            scheduler: self.scheduler.parse::<SchedulerKind>()?,
            ..self.params.clone()
        })
    }

    /// Loads the model in the requested dtype on the requested device, with LoRAs fused in.
    pub fn load(&self, fuse: &[(crate::lora::LoraSet, f64)]) -> anyhow::Result<StableDiffusion> {
        let dtype = parse_dtype(&self.dtype)?;
        let device = parse_device(&self.device)?;
        let source = self.source()?;
        let t0 = Instant::now();
        let sd = StableDiffusion::load_fused(&source, dtype, &device, fuse)
            .with_context(|| format!("cannot load model {}", source.describe()))?;
        eprintln!(
            "loaded {} in {:.1}s",
            source.describe(),
            t0.elapsed().as_secs_f64()
        );
        Ok(sd)
    }
}

/// Arguments of `lora generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    sample: SampleArgs,
    /// Number of images (written as OUT-0.png, OUT-1.png, … when more than one).
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// A safetensors file with a tensor `latents` [num_images, C, H/f, W/f] to start from.
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// A LoRA file (any format) with an optional scale, FILE[:SCALE]; repeatable.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    loras: Vec<String>,
    /// A textual-inversion file (diffusers `learned_embeds.safetensors` / `.bin`, A1111 `.pt` /
    /// `.safetensors`) with an optional token replacing its own, FILE[:TOKEN]; repeatable. The
    /// learned tokens of `--lora` files are added as well.
    #[arg(long = "embedding", value_name = "FILE[:TOKEN]")]
    embeddings: Vec<String>,
    /// Fuse the LoRAs into the weights instead of running them as adapters.
    #[arg(long)]
    fuse: bool,
    /// Output PNG path.
    #[arg(long)]
    out: PathBuf,
    /// Overwrite existing output files.
    #[arg(long)]
    force: bool,
}

/// Adds learned tokens to `sd`, lists them, and warns when the prompts use none of them.
pub fn add_tokens(
    sd: &mut StableDiffusion,
    tokens: &[SourcedToken],
    params: &GenerateParams,
) -> anyhow::Result<()> {
    sd.add_learned_tokens(tokens)?;
    if tokens.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = tokens
        .iter()
        .map(|t| match t.token.count() {
            1 => t.token.token.clone(),
            n => format!("{} ({n} vectors)", t.token.token),
        })
        .collect();
    eprintln!("learned tokens: {}", names.join(", "));
    let absent = sd.absent_tokens(tokens, &[&params.prompt, &params.negative_prompt])?;
    if !absent.is_empty() {
        eprintln!(
            "warning: the prompt uses none of the learned tokens {} (their trigger words)",
            absent.join(", ")
        );
    }
    Ok(())
}

/// The model of `--model`, or the bundled model when absent.
pub fn model_source(model: Option<&str>) -> anyhow::Result<ModelSource> {
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
    let mut params = a.sample.params(a.num_images)?;
    parse_dtype(&a.sample.dtype)?;
    parse_device(&a.sample.device)?;
    let specs: Vec<LoraSpec> = a
        .loras
        .iter()
        .map(|s| s.parse())
        .collect::<anyhow::Result<_>>()?;
    let paths = numbered_paths(&a.out, a.num_images.max(1));
    for p in &paths {
        check_writable(p, a.force)?;
    }
    params.init_latents = a
        .init_latents
        .as_deref()
        .map(read_init_latents)
        .transpose()?;
    let loras = read_loras(&a.sample.source()?, &specs)?;
    let emb_specs: Vec<EmbeddingSpec> = a
        .embeddings
        .iter()
        .map(|s| s.parse())
        .collect::<anyhow::Result<_>>()?;
    let sources: Vec<(&std::path::Path, &crate::lora::LoraSet)> = specs
        .iter()
        .zip(&loras)
        .map(|(s, (set, _))| (s.path.as_path(), set))
        .collect();
    let tokens = collect_tokens(&sources, &emb_specs)?;
    let mut sd = if a.fuse {
        a.sample.load(&loras)?
    } else {
        let sd = a.sample.load(&[])?;
        for ((set, scale), spec) in loras.iter().zip(&specs) {
            sd.add_lora(set, *scale)
                .with_context(|| format!("cannot apply LoRA {}", spec.path.display()))?;
        }
        sd
    };
    add_tokens(&mut sd, &tokens, &params)?;
    // One prompt pair: encode it now and free what text-to-image does not run again.
    sd.cache_prompts(&[&params.prompt, &params.negative_prompt], params.clip_skip)?;
    sd.release_text_encoder();
    sd.vae.release_encoder();
    crate::sys::trim_heap();
    for s in &specs {
        eprintln!(
            "LoRA {} at scale {} ({})",
            s.path.display(),
            s.scale,
            if a.fuse { "fused" } else { "adapter" }
        );
    }
    let latents = denoise(&sd, &params)?;
    // Decoding needs the VAE only: the UNet and the rest are freed first, so the decoder's
    // large activations at full resolution do not come on top of the UNet's weights.
    let dtype = sd.dtype;
    let vae = sd.into_vae();
    crate::sys::trim_heap();
    let t0 = Instant::now();
    let images = to_rgb8(&decode_latents(&vae, dtype, &latents)?)?;
    eprintln!("decoded in {:.2}s", t0.elapsed().as_secs_f64());
    write_images(&images, &paths, a.force)
}

/// Writes `images` to `paths` (PNG), saying each.
fn write_images(images: &[image::RgbImage], paths: &[PathBuf], force: bool) -> anyhow::Result<()> {
    for (img, path) in images.iter().zip(paths) {
        save_png(img, path, force)?;
        eprintln!(
            "wrote {} ({}x{})",
            path.display(),
            img.width(),
            img.height()
        );
    }
    Ok(())
}

/// Runs the denoising loop with a progress bar: the final latents.
fn denoise(sd: &StableDiffusion, params: &GenerateParams) -> anyhow::Result<candle_core::Tensor> {
    let pb = progress_bar(params.steps as u64, "denoising");
    let t0 = Instant::now();
    let latents = sd.denoise(params, &mut |i, n| {
        pb.set_length(n as u64);
        pb.set_position(i as u64);
    })?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "{} step(s) in {secs:.2}s ({:.2} it/s)",
        params.steps,
        params.steps as f64 / secs.max(1e-9)
    );
    Ok(latents)
}

/// Generates with a progress bar, returning 8-bit images.
pub fn generate_images(
    sd: &StableDiffusion,
    params: &GenerateParams,
) -> anyhow::Result<Vec<image::RgbImage>> {
    let latents = denoise(sd, params)?;
    to_rgb8(&sd.decode(&latents)?)
}
