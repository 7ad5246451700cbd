//! `lora extract`: a LoRA from the difference of two full models.

use super::common::{parse_dtype, progress_bar};
use crate::formats::Format;
use crate::hub::ModelSource;
use crate::lora::extract::{count_layers, extract, ExtractOptions};
use crate::lora::svd::RandomizedOpts;
use crate::lora::targets::LoraTargets;
use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;

/// Arguments of `lora extract`.
#[derive(Args, Debug)]
pub struct ExtractArgs {
    /// The base model (diffusers folder or Hugging Face id).
    #[arg(long)]
    base: String,
    /// The fine-tuned model with the same architecture.
    #[arg(long)]
    tuned: String,
    /// Rank kept per layer.
    #[arg(long)]
    rank: usize,
    /// The LoRA file to write (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Layers: presets (attn, ff, proj, resnet, extended, text-attn, text-mlp, all) or module
    /// path patterns, comma separated.
    #[arg(long, default_value = "attn,text-attn")]
    targets: String,
    /// Output format: ours, kohya, diffusers, peft or cloneofsimo.
    #[arg(long, default_value = "ours")]
    format: String,
    /// dtype of the written factors: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Leave out layers whose change ‖ΔW‖ is at most this fraction of ‖W_base‖.
    #[arg(long, default_value_t = 0.0)]
    min_change: f64,
    /// Power iterations of the randomized SVD (more: closer to the optimal rank-R fit).
    #[arg(long, default_value_t = 3)]
    power_iters: usize,
    /// Seed of the randomized SVD.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    write: super::common::WriteFlags,
}

/// Runs `lora extract`.
pub fn run(a: ExtractArgs) -> anyhow::Result<()> {
    if a.out.exists() && !a.write.force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            a.out.display()
        );
    }
    let format = Format::parse(&a.format)?;
    let base = ModelSource::parse(&a.base).map_err(|e| anyhow::anyhow!("--base: {e:#}"))?;
    let tuned = ModelSource::parse(&a.tuned).map_err(|e| anyhow::anyhow!("--tuned: {e:#}"))?;
    let opts = ExtractOptions {
        rank: a.rank,
        targets: LoraTargets::parse(&a.targets)?,
        components: vec!["unet".into(), "text_encoder".into()],
        min_relative_change: a.min_change,
        svd: RandomizedOpts {
            power_iters: a.power_iters,
            seed: a.seed,
            ..Default::default()
        },
        dtype: parse_dtype(&a.dtype)?,
    };
    let n = count_layers(&base, &opts).with_context(|| format!("--base {}", base.describe()))?;
    let pb = progress_bar(n as u64, "extracting");
    let result = extract(&base, &tuned, &opts, &|e| {
        // suspend (not println): the per-layer lines are printed also when stdout is no terminal.
        pb.suspend(|| {
            println!(
                "{} rank {}: energy kept {:.4}% (relative error {:.4}%)",
                e.name,
                e.rank_out,
                100.0 * e.fraction(),
                100.0 * (1.0 - e.fraction()).max(0.0).sqrt()
            )
        });
        pb.inc(1);
    });
    pb.finish_and_clear();
    let (set, report) = result?;
    if !report.unchanged.is_empty() {
        println!(
            "{} targeted layers are identical in both models and were left out",
            report.unchanged.len()
        );
    }
    super::add::print_energy(&report.energy);
    super::common::write_lora(&set, &a.out, format, Some(opts.dtype), None, a.write)?;
    println!(
        "wrote {} ({format}, {} layers, rank ≤ {})",
        a.out.display(),
        set.layers.len(),
        a.rank
    );
    Ok(())
}
