//! `lora demo`: the main job on the bundled model and data, no download needed — train a LoRA
//! (DreamBooth style) on assets/demo-data, then generate with it and sweep its scale.

use super::generate::{generate_images, model_source};
use crate::pipeline::grid::{grid, write_gif};
use crate::pipeline::image_io::save_png;
use crate::pipeline::{GenerateParams, StableDiffusion};
use crate::train::{TrainConfig, TrainHooks, Trainer};
use anyhow::Context;
use clap::Args;
use std::path::{Path, PathBuf};

/// Arguments of `lora demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Output folder (replaced on every run).
    #[arg(long, default_value = "target/demo")]
    out_dir: PathBuf,
    /// Training steps.
    #[arg(long, default_value_t = 200)]
    steps: usize,
}

/// Runs `lora demo`.
pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo-data");
    let source = model_source(None)?;
    let lora_dir = a.out_dir.join("lora");
    eprintln!(
        "demo: training a rank-4 LoRA on {} ({} steps) with the bundled model {}\n\
         (random weights: images are noise-like patterns; the point is the workflow)",
        data.display(),
        a.steps,
        source.describe()
    );
    let prompt = "a photo of sks toy";
    let cfg: TrainConfig = serde_json::from_value(serde_json::json!({
        "instance_data_dir": data,
        "instance_prompt": prompt,
        "resolution": 64,
        "random_flip": true,
        "rank": 4,
        "learning_rate": 1e-3,
        "max_train_steps": a.steps,
        "seed": 0,
        "output_dir": lora_dir,
        "force": true,
    }))
    .context("demo training options")?;
    let outcome = Trainer::new(cfg, TrainHooks::default())?.run()?;
    let lora_file = outcome.output.context("training produced no LoRA file")?;
    let first: f64 = outcome.losses.iter().take(20).map(|p| p.loss).sum::<f64>() / 20.0;
    let last: f64 = outcome
        .losses
        .iter()
        .rev()
        .take(20)
        .map(|p| p.loss)
        .sum::<f64>()
        / 20.0;
    eprintln!(
        "trained {} steps in {:.1}s: mean loss of the first 20 steps {first:.3}, last 20 {last:.3}",
        outcome.steps, outcome.train_seconds
    );

    let sd = StableDiffusion::load(&source, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    let set = crate::formats::read(&lora_file)?;
    let handles = sd.add_lora(&set, 1.0)?;
    let params = GenerateParams {
        prompt: prompt.into(),
        steps: 20,
        seed: 1,
        ..Default::default()
    };
    let alphas = [0.0, 0.5, 1.0, 1.5];
    let mut tiles = vec![];
    for alpha in alphas {
        for h in &handles {
            h.set_scale(alpha);
        }
        tiles.push((generate_images(&sd, &params)?.remove(0), format!("{alpha}")));
    }
    save_png(&tiles[2].0, &a.out_dir.join("sample.png"), true)?;
    save_png(
        &grid(&tiles, alphas.len()),
        &a.out_dir.join("sweep.png"),
        true,
    )?;
    write_gif(&tiles, 500, &a.out_dir.join("sweep.gif"), true)?;
    eprintln!("\nwrote, in {}:", a.out_dir.display());
    for f in [
        "lora/lora.safetensors",
        "lora/loss.png",
        "lora/loss.csv",
        "sample.png",
        "sweep.png",
        "sweep.gif",
    ] {
        eprintln!("  {f}");
    }
    eprintln!(
        "next: `lora inspect {}`, `lora generate --lora {}:0.8 --prompt \"{prompt}\" --out x.png`",
        lora_file.display(),
        lora_file.display()
    );
    Ok(())
}
