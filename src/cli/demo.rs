//! `lora demo`: the main job on the bundled model and data, no download needed — train a rank-4
//! LoRA on a concept the bundled model has never seen (assets/demo-data, "sks toy"), then draw
//! it beside the base model, sweep the LoRA scale and print the measured scores.

use crate::bench::demo::{run_demo, DemoOptions};
use clap::Args;
use std::path::{Path, PathBuf};

/// Arguments of `lora demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Output folder (its demo files are replaced on every run).
    #[arg(long, default_value = "target/demo")]
    out_dir: PathBuf,
    /// Training steps.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Full fine-tuning of the UNet instead of a LoRA (the DreamBooth baseline).
    #[arg(long)]
    full: bool,
    /// Learning rate [default: 1e-2 for the LoRA, 1e-4 with --full].
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Another model folder of the bundled model's world (default: the bundled model).
    #[arg(long)]
    model: Option<String>,
}

/// The demo's concept images.
pub fn demo_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo-data")
}

/// Runs `lora demo`.
pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let data = demo_data();
    let mut o = DemoOptions::new(a.model.clone(), data.clone(), a.out_dir.clone());
    o.steps = a.steps;
    o.full = a.full;
    if a.full {
        o.learning_rate = 1e-4;
    }
    if let Some(lr) = a.learning_rate {
        o.learning_rate = lr;
    }
    eprintln!(
        "demo: training a {} on {} ({} steps) into the bundled model (assets/tiny-sd, which \
         draws flat shapes and has never seen the sks toy)",
        if a.full {
            "full fine-tune"
        } else {
            "rank-4 LoRA"
        },
        data.display(),
        a.steps
    );
    let r = run_demo(&o)?;
    eprintln!();
    for line in r.summary() {
        eprintln!("{line}");
    }
    eprintln!("\nwrote:");
    for f in &r.outputs {
        eprintln!("  {}", f.display());
    }
    if let Some(file) = r.outputs.iter().find(|p| p.ends_with("lora.safetensors")) {
        eprintln!(
            "next: `lora inspect {}`, `lora generate --lora {}:0.8 --prompt \"a sks toy on the \
             right, black background\" --guidance 1 --out x.png`",
            file.display(),
            file.display()
        );
    }
    Ok(())
}
