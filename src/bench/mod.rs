//! `lora bench`: speed and memory, side by side with the PyTorch reference when available.

mod blocks;
pub mod demo;
pub mod quality;
pub mod train;
mod train_phase;

use crate::models::presets::SD15_UNET_CONFIG;
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::weights::ModelWeights;
use crate::rng::Rng;
use crate::sys::parse_device;
pub use crate::sys::{peak_rss_mb, reset_peak_rss};
use anyhow::Context;
use candle_core::{DType, Tensor};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `lora bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand, Debug)]
enum BenchWhat {
    /// Seconds per UNet step (batch 2, classifier-free guidance) for the SD 1.5 config with
    /// random weights, fp32.
    Unet(UnetBench),
    /// Training speed: forward, LoRA step and full step (ms) and peak RSS, fp32 CPU.
    Train(train::TrainBench),
    /// The demo concept trained by LoRA and by full fine-tuning for the same steps: time, file
    /// size, concept score and drift on world prompts, side by side.
    Quality(quality::QualityBench),
    /// How often a model draws what world prompts ask for (colour, position, background, size,
    /// shape), read back from its images.
    Following(quality::FollowingBench),
}

#[derive(Args, Debug)]
struct UnetBench {
    /// Image size in pixels (latent = size / 8).
    #[arg(long, alias = "resolution", default_value_t = 256)]
    size: usize,
    /// Timed runs (median reported), after 2 warm-ups.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Device: cpu, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// A Python with torch + diffusers: also runs scripts/bench_unet.py and prints the ratio.
    #[arg(long)]
    torch_python: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs `lora bench`.
pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.what {
        BenchWhat::Unet(b) => unet(b),
        BenchWhat::Train(b) => train::run(b),
        BenchWhat::Quality(b) => quality::run(b),
        BenchWhat::Following(b) => quality::run_following(b),
    }
}

/// The median of `v` (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median seconds of `runs` (at least 1) timed calls of `f`, after `warmup` untimed ones.
pub fn time_runs(
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let mut times = vec![];
    for i in 0..warmup + runs.max(1) {
        let t = Instant::now();
        f()?;
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

/// The folder holding `scripts/`: `LORA_REPO` when set (a copy of the repository on another
/// machine), else the source folder this binary was built from.
fn scripts_root() -> PathBuf {
    std::env::var_os("LORA_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Runs the Python benchmark `scripts/<script>` with `args`; returns the JSON object on the
/// last line of its output.
pub fn run_torch_script(
    py: &PathBuf,
    script: &str,
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let script = scripts_root().join("scripts").join(script);
    let out = std::process::Command::new(py)
        .arg(&script)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {} {}", py.display(), script.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    serde_json::from_str(line)
        .with_context(|| format!("unexpected output of {}: {text}", script.display()))
}

fn unet(b: UnetBench) -> anyhow::Result<()> {
    let device = parse_device(&b.device)?;
    let cfg: UNet2DConditionConfig = serde_json::from_str(SD15_UNET_CONFIG)?;
    let weights = ModelWeights::random("unet", 0);
    let t0 = Instant::now();
    let unet = UNet2DConditionModel::new(weights.var_builder(DType::F32, &device), &cfg)?;
    let init_s = t0.elapsed().as_secs_f64();
    let l = b.size / 8;
    let mut rng = Rng::new(0);
    let x = rng.randn((2, 4, l, l), &device)?;
    let ctx = rng.randn((2, 77, 768), &device)?;
    let ts = Tensor::full(500f32, 2, &device)?;
    let ours = time_runs(2, b.runs, || {
        let y = unet.forward(&x, &ts, &ctx)?;
        y.sum_all()?.to_scalar::<f32>()?; // wait for the device
        Ok(())
    })?;
    let torch = match &b.torch_python {
        Some(py) => Some(torch_unet_step(py, b.size, b.runs)?),
        None => None,
    };
    if b.json {
        let mut obj = serde_json::json!({
            "unet_step_s": ours, "size": b.size, "batch": 2, "dtype": "f32",
            "peak_rss_mb": peak_rss_mb(), "init_s": init_s,
        });
        if let Some(t) = torch {
            obj["torch_unet_step_s"] = t.into();
            obj["ratio"] = (ours / t).into();
        }
        println!("{obj}");
    } else {
        println!(
            "SD 1.5 UNet, {0}x{0} (latent {l}x{l}), batch 2, fp32, random weights",
            b.size
        );
        println!(
            "  lora-diffusion: {ours:.3} s/step (median of {}), peak RSS {:.0} MB",
            b.runs,
            peak_rss_mb()
        );
        if let Some(t) = torch {
            println!("  diffusers:      {t:.3} s/step");
            println!("  ratio (ours / diffusers): {:.2}x", ours / t);
        }
    }
    Ok(())
}

fn torch_unet_step(py: &PathBuf, size: usize, runs: usize) -> anyhow::Result<f64> {
    let (latent, runs) = ((size / 8).to_string(), runs.to_string());
    let v = run_torch_script(py, "bench_unet.py", &["--latent", &latent, "--runs", &runs])?;
    v["unet_step_s"]
        .as_f64()
        .with_context(|| format!("no unet_step_s in {v}"))
}
