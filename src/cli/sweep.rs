//! `lora sweep`: the same seed at a series of LoRA scales, as a labelled grid PNG and a GIF.

use super::generate::{add_tokens, generate_images, SampleArgs};
use crate::atomic::check_writable;
use crate::pipeline::embeddings::collect_tokens;
use crate::pipeline::grid::{grid, write_gif};
use crate::pipeline::image_io::save_png;
use crate::pipeline::lora::{read_loras, LoraSpec};
use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;

/// Arguments of `lora sweep`.
#[derive(Args, Debug)]
pub struct SweepArgs {
    #[command(flatten)]
    sample: SampleArgs,
    /// The LoRA file (any format).
    #[arg(long)]
    lora: PathBuf,
    /// Comma-separated scales.
    #[arg(long, default_value = "0,0.25,0.5,0.75,1,1.25", value_delimiter = ',')]
    alphas: Vec<f64>,
    /// Grid PNG path.
    #[arg(long)]
    out: PathBuf,
    /// Animated GIF path (default: OUT with .gif).
    #[arg(long)]
    gif: Option<PathBuf>,
    /// Milliseconds per GIF frame.
    #[arg(long, default_value_t = 500)]
    frame_ms: u32,
    /// Overwrite existing outputs.
    #[arg(long)]
    force: bool,
}

/// Runs `lora sweep`.
pub fn run(a: SweepArgs) -> anyhow::Result<()> {
    if a.alphas.is_empty() || a.alphas.iter().any(|x| !x.is_finite()) {
        bail!("--alphas must be a comma-separated list of finite numbers");
    }
    let params = a.sample.params(1)?;
    let gif = a.gif.clone().unwrap_or_else(|| a.out.with_extension("gif"));
    check_writable(&a.out, a.force)?;
    check_writable(&gif, a.force)?;
    let spec = LoraSpec {
        path: a.lora.clone(),
        scale: 1.0,
    };
    let loras = read_loras(&a.sample.source()?, std::slice::from_ref(&spec))?;
    let mut sd = a.sample.load(&[])?;
    let tokens = collect_tokens(&[(a.lora.as_path(), &loras[0].0)], &[])?;
    add_tokens(&mut sd, &tokens, &params)?;
    let handles = sd
        .add_lora(&loras[0].0, 1.0)
        .with_context(|| format!("cannot apply LoRA {}", a.lora.display()))?;
    let mut tiles = vec![];
    for &alpha in &a.alphas {
        for h in &handles {
            h.set_scale(alpha);
        }
        eprintln!("scale {alpha}");
        let img = generate_images(&sd, &params)?.remove(0);
        tiles.push((img, format!("{alpha}")));
    }
    let cols = a.alphas.len().min(6);
    save_png(&grid(&tiles, cols), &a.out, a.force)?;
    eprintln!("wrote {} ({} scales)", a.out.display(), a.alphas.len());
    write_gif(&tiles, a.frame_ms, &gif, a.force)?;
    eprintln!("wrote {}", gif.display());
    Ok(())
}
