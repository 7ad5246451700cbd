//! `lora bench train`: forward, LoRA step and full step (ms) plus peak RSS for two workloads,
//! random weights:
//! - `sd_block`: one SD-1.5 down-block slice (ResnetBlock2D 320 ch with a 1280 time embedding,
//!   then a Transformer2DModel: 8 heads × 40, context 77×768) on a 32×32 latent, batch 1;
//! - `sd_block2` (`--workload block2`): two such slices in a row, so the second resnet runs
//!   inside the LoRA step's graph (SD 1.5 `down_blocks.0` at 256 px without its downsampler);
//! - `sd15_unet_<resolution>`: the SD 1.5 UNet at `--resolution` (latent = resolution / 8),
//!   batch `--batch` (default 1), context 77×768.
//!
//! "LoRA step": rank-4 LoRA on `--targets` (default attn: to_q / to_k / to_v / to_out.0), MSE loss to a
//! random target, backward, AdamW on the LoRA parameters. "Full step": every weight trained
//! (fp32 only; skipped for the UNet above 256 px). `--mixed-precision` runs the frozen model in
//! bf16/fp16 with f32 LoRA parameters. Every phase of every workload runs in a fresh child
//! process, so each peak RSS is that phase's own. `--torch-python` runs
//! scripts/bench_train.py (PyTorch + diffusers + PEFT, the same workloads and switches) in the
//! same invocation and prints the ratios. `--device cuda:N` runs both sides on that GPU: the
//! timings synchronise the device, and "LoRA dev" is the device memory in use (total − free,
//! the allocator's cached pool included) after the step's forward and backward, largest.

use super::run_torch_script;
use super::train_phase::{self, Figures, Phase, Switches};
use crate::train::config::MixedPrecision;
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

/// Arguments of `lora bench train`.
#[derive(Args, Debug)]
pub struct TrainBench {
    /// Timed runs of the block workload (median reported), after 2 warm-ups.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Timed runs of the UNet workload, after 1 warm-up.
    #[arg(long, default_value_t = 3)]
    unet_runs: usize,
    /// Which workloads: all, block, block2 or unet (all = block and unet).
    #[arg(long, default_value = "all")]
    workload: String,
    /// Image size of the UNet workload in pixels (256, 512, 768; latent = size / 8).
    #[arg(long, default_value_t = 256)]
    resolution: usize,
    /// Batch size of the UNet workload.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    batch: u16,
    /// Precision of the frozen model: no, bf16 or fp16 (LoRA parameters stay f32).
    #[arg(long, default_value_t = MixedPrecision::No)]
    mixed_precision: MixedPrecision,
    /// Skip the full-fine-tuning step.
    #[arg(long)]
    no_full: bool,
    /// LoRA steps with gradient checkpointing (transformer blocks, and resnets whose convs or
    /// norms train, recomputed in the backward); the full step is then skipped.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Internal: measure one phase (`block:lora`, `unet:full`, …) in this process, print JSON.
    #[arg(long, hide = true)]
    phase: Option<String>,
    /// A Python with torch + diffusers + peft: also runs scripts/bench_train.py and prints ratios.
    #[arg(long)]
    torch_python: Option<PathBuf>,
    /// LoRA targets of the LoRA step, as `lora train --targets` takes them (UNet presets such
    /// as attn, resnet, extended, or module names); the PyTorch reference adapts the same
    /// module names through PEFT.
    #[arg(long, default_value = "attn")]
    targets: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Device of both sides: cpu or cuda:N (the PyTorch reference runs on the same device).
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Runs one phase in this process and prints its figures as JSON (the child side).
fn run_phase(b: &TrainBench, spec: &str) -> anyhow::Result<()> {
    let (workload, phase) = spec
        .split_once(':')
        .with_context(|| format!("--phase {spec}: expected <workload>:<lora|full>"))?;
    let phase = match phase {
        "lora" => Phase::Lora,
        "full" => Phase::Full,
        p => anyhow::bail!("--phase {spec}: unknown phase {p}"),
    };
    let unet = workload == "unet";
    let s = Switches {
        warmup: if unet { 1 } else { 2 },
        runs: if unet { b.unet_runs } else { b.runs },
        resolution: b.resolution,
        batch: usize::from(b.batch),
        mixed_precision: b.mixed_precision,
        gradient_checkpointing: b.gradient_checkpointing,
        targets: b.targets.clone(),
    };
    let dev = crate::sys::parse_device(&b.device)?;
    let f = train_phase::figures(workload, phase, &s, &dev)?;
    println!("{}", serde_json::to_string(&f)?);
    Ok(())
}

/// Runs `phase` of `workload` in a fresh child process of this executable.
fn child_figures(b: &TrainBench, workload: &str, phase: &str) -> anyhow::Result<Figures> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["bench", "train", "--phase", &format!("{workload}:{phase}")])
        .args(["--runs", &b.runs.to_string()])
        .args(["--unet-runs", &b.unet_runs.to_string()])
        .args(["--resolution", &b.resolution.to_string()])
        .args(["--batch", &b.batch.to_string()])
        .args(["--mixed-precision", &b.mixed_precision.to_string()])
        .args(["--targets", &b.targets])
        .args(["--device", &b.device]);
    if b.gradient_checkpointing {
        cmd.arg("--gradient-checkpointing");
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot start the benchmark child process")?;
    if !out.status.success() {
        anyhow::bail!("the {workload}:{phase} benchmark failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    serde_json::from_str(line)
        .with_context(|| format!("unexpected output of the {workload}:{phase} child: {text}"))
}

/// Our figures for `workload`: the LoRA phase and (unless skipped) the full phase, each in its
/// own process.
fn workload_figures(b: &TrainBench, workload: &str, full: bool) -> anyhow::Result<Figures> {
    let mut f = child_figures(b, workload, "lora")?;
    f.peak_rss_mb = f.lora_peak_rss_mb;
    if full {
        let g = child_figures(b, workload, "full")?;
        f.full_params = g.full_params;
        f.full_step_ms = g.full_step_ms;
        f.full_phases_ms = g.full_phases_ms;
        f.full_peak_rss_mb = g.peak_rss_mb;
    }
    Ok(f)
}

/// Runs scripts/bench_train.py for one workload with the same switches; returns its JSON.
fn torch_figures(
    py: &PathBuf,
    b: &TrainBench,
    workload: &str,
    full: bool,
) -> anyhow::Result<serde_json::Value> {
    let runs = match workload {
        "unet" => b.unet_runs,
        _ => b.runs,
    }
    .to_string();
    let res = b.resolution.to_string();
    let batch = b.batch.to_string();
    let mp = b.mixed_precision.to_string();
    let modules = crate::lora::LoraTargets::parse(&b.targets)?
        .module_names(crate::lora::targets::UNET)?
        .join(",");
    if modules.is_empty() {
        anyhow::bail!(
            "--targets {}: no UNet module for the PyTorch reference to adapt",
            b.targets
        );
    }
    let mut args = vec![
        "--target-modules",
        &modules,
        "--workload",
        workload,
        "--runs",
        &runs,
        "--resolution",
        &res,
        "--batch",
        &batch,
        "--mixed-precision",
        &mp,
        "--device",
        &b.device,
    ];
    if !full {
        args.push("--no-full");
    }
    if b.gradient_checkpointing {
        args.push("--gradient-checkpointing");
    }
    run_torch_script(py, "bench_train.py", &args)
}

fn print_text(name: &str, targets: &str, f: &Figures, torch: Option<&serde_json::Value>) {
    println!("{name}");
    let t = |k: &str| torch.and_then(|v| v[k].as_f64());
    for (label, key, ours) in [
        ("forward", "forward_ms", f.forward_ms),
        ("LoRA step", "lora_step_ms", f.lora_step_ms),
        ("full step", "full_step_ms", f.full_step_ms),
        ("LoRA RSS", "lora_peak_rss_mb", f.lora_peak_rss_mb),
        ("full RSS", "peak_rss_mb", f.full_peak_rss_mb),
        ("LoRA dev", "lora_device_mb", f.lora_device_mb),
    ] {
        if ours == 0.0 {
            continue;
        }
        let unit = if label.ends_with("RSS") || label.ends_with("dev") {
            "MB"
        } else {
            "ms"
        };
        match t(key) {
            Some(p) => println!(
                "  {label:<10} {ours:>9.1} {unit}   PyTorch {p:>9.1} {unit}   ratio {:.2}x",
                ours / p
            ),
            None => println!("  {label:<10} {ours:>9.1} {unit}"),
        }
    }
    println!("  LoRA step / forward {:.2}", f.lora_step_ms / f.forward_ms);
    if f.lora_graph_mb > 0.0 {
        let graph = match t("lora_graph_mb") {
            Some(p) => format!(
                "   PyTorch saved tensors {p:.1} MB   ratio {:.2}x",
                f.lora_graph_mb / p
            ),
            None => String::new(),
        };
        println!(
            "  LoRA graph {:.1} MB kept by the forward{graph}; backward peak {:.1} MB (heap beyond the model)",
            f.lora_graph_mb, f.lora_backward_peak_mb
        );
    }
    for (label, p) in [
        ("LoRA step", f.lora_phases_ms),
        ("full step", f.full_phases_ms),
    ] {
        if p[0] > 0.0 {
            println!(
                "  {label} phases: forward+loss {:.1} ms, backward {:.1} ms, AdamW {:.1} ms",
                p[0], p[1], p[2]
            );
        }
    }
    let reference = match torch.and_then(|v| v["lora_params"].as_u64()) {
        Some(n) if n as usize != f.lora_params => format!(" (PyTorch + PEFT: {n}, NOT THE SAME)"),
        _ => String::new(),
    };
    println!(
        "  rank-4 {targets} LoRA: {}{reference} params, file {:.2} MB (f32) / {:.2} MB (f16); full: {} params",
        f.lora_params,
        f.lora_file_bytes_f32 as f64 / 1e6,
        f.lora_file_bytes_f16 as f64 / 1e6,
        f.full_params
    );
}

/// Runs `lora bench train`.
pub fn run(b: TrainBench) -> anyhow::Result<()> {
    if let Some(spec) = &b.phase {
        return run_phase(&b, spec);
    }
    let (do_block, do_unet) = match b.workload.as_str() {
        "all" => (true, true),
        "block" | "block2" => (true, false),
        "unet" => (false, true),
        w => anyhow::bail!("--workload {w}: expected all, block, block2 or unet"),
    };
    crate::lora::LoraTargets::parse(&b.targets).context("--targets")?;
    let block = if b.workload == "block2" {
        "block2"
    } else {
        "block"
    };
    if b.resolution == 0 || !b.resolution.is_multiple_of(64) {
        anyhow::bail!("--resolution {}: must be a multiple of 64", b.resolution);
    }
    let fp32 = b.mixed_precision == MixedPrecision::No;
    let full_block = !b.no_full && fp32 && !b.gradient_checkpointing;
    let full_unet = full_block && b.resolution <= 256;
    let mut results: Vec<(String, Figures, Option<serde_json::Value>)> = vec![];
    if do_block {
        let torch = match &b.torch_python {
            Some(py) => Some(torch_figures(py, &b, block, full_block)?),
            None => None,
        };
        let f = workload_figures(&b, block, full_block)?;
        results.push((format!("sd_{block}"), f, torch));
    }
    if do_unet {
        let torch = match &b.torch_python {
            Some(py) => Some(torch_figures(py, &b, "unet", full_unet)?),
            None => None,
        };
        let f = workload_figures(&b, "unet", full_unet)?;
        results.push((format!("sd15_unet_{}", b.resolution), f, torch));
    }
    let mut precision = match b.mixed_precision {
        MixedPrecision::No => "fp32".to_string(),
        m => format!("{m} (frozen model), f32 LoRA"),
    };
    if b.gradient_checkpointing {
        precision.push_str(", gradient checkpointing");
    }
    if b.json {
        let mut obj = serde_json::Map::new();
        for (name, f, torch) in &results {
            let mut v = serde_json::to_value(f)?;
            if let Some(t) = torch {
                for (k, tk) in [
                    ("forward_ms", "forward_ms"),
                    ("lora_step_ms", "lora_step_ms"),
                    ("full_step_ms", "full_step_ms"),
                    ("lora_peak_rss_mb", "lora_peak_rss_mb"),
                    ("full_peak_rss_mb", "peak_rss_mb"),
                    ("lora_device_mb", "lora_device_mb"),
                ] {
                    let ours = v[k].as_f64().unwrap_or(0.0);
                    if let (Some(p), true) = (t[tk].as_f64(), ours > 0.0) {
                        v[format!("ratio_{k}")] = (ours / p).into();
                    }
                }
                v["torch"] = t.clone();
            }
            obj.insert(name.clone(), v);
        }
        obj.insert(
            "mixed_precision".into(),
            b.mixed_precision.to_string().into(),
        );
        obj.insert("resolution".into(), b.resolution.into());
        obj.insert("device".into(), b.device.clone().into());
        obj.insert("batch".into(), b.batch.into());
        obj.insert(
            "gradient_checkpointing".into(),
            b.gradient_checkpointing.into(),
        );
        obj.insert(
            "threads".into(),
            candle_core::utils::get_num_threads().into(),
        );
        obj.insert("blas".into(), crate::ops::blas_name().into());
        obj.insert("targets".into(), b.targets.clone().into());
        obj.insert("gemm_kernels".into(), crate::ops::gemm_kernels().into());
        println!("{}", serde_json::Value::Object(obj));
    } else {
        println!(
            "{precision}, {}, random weights, {} threads, {}; each phase in a fresh process",
            b.device,
            candle_core::utils::get_num_threads(),
            cpu_products()
        );
        for (name, f, torch) in &results {
            let title = if name == "sd_block" {
                "SD-block (ResnetBlock2D 320 + transformer block, 32x32 latent, context 77x768)"
                    .to_string()
            } else if name == "sd_block2" {
                "SD-block x2 (two resnet + transformer slices, 32x32 latent, context 77x768)"
                    .to_string()
            } else {
                format!(
                    "SD 1.5 UNet, {0}x{0} (latent {1}x{1}), batch {2}, context 77x768",
                    b.resolution,
                    b.resolution / 8,
                    b.batch
                )
            };
            print_text(&title, &b.targets, f, torch.as_ref());
        }
    }
    Ok(())
}

/// Which kernels run the CPU products, as the bench header says it.
fn cpu_products() -> String {
    let gemm = crate::ops::gemm_kernels();
    match crate::ops::blas_name() {
        Some(blas) => {
            format!("large CPU products on {blas}, the others on the gemm crate's {gemm} kernels")
        }
        None => format!("CPU products on the gemm crate's {gemm} kernels (no BLAS in use)"),
    }
}
