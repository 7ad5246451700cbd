//! `lora bench train`: forward, LoRA step and full step (ms) plus peak RSS for two workloads,
//! random weights:
//! - `sd_block`: one SD-1.5 down-block slice (ResnetBlock2D 320 ch with a 1280 time embedding,
//!   then a Transformer2DModel: 8 heads × 40, context 77×768) on a 32×32 latent, batch 1;
//! - `sd_block2` (`--workload block2`): two such slices in a row, so the second resnet runs
//!   inside the LoRA step's graph (SD 1.5 `down_blocks.0` at 256 px without its downsampler);
//! - `sd15_unet_<resolution>`: the SD 1.5 UNet at `--resolution` (latent = resolution / 8),
//!   batch `--batch` (default 1), context 77×768.
//!
//! "LoRA step": rank-4 LoRA on to_q / to_k / to_v / to_out.0 of every attention, MSE loss to a
//! random target, backward, AdamW on the LoRA parameters. "Full step": every weight trained
//! (fp32 only; skipped for the UNet above 256 px). `--mixed-precision` runs the frozen model in
//! bf16/fp16 with f32 LoRA parameters. Every phase of every workload runs in a fresh child
//! process, so each peak RSS is that phase's own. `--torch-python` runs
//! scripts/bench_train.py (PyTorch + diffusers + PEFT, the same workloads and switches) in the
//! same invocation and prints the ratios. `--device cuda:N` runs both sides on that GPU: the
//! timings synchronise the device, and "LoRA dev" is the device memory in use (total − free,
//! the allocator's cached pool included) after the step's forward and backward, largest.

use super::blocks::{BlockPair, BlockSlice};
use super::{median, peak_rss_mb, reset_peak_rss, run_torch_script, time_runs};
use crate::lora::{inject_trainable, Component, LoraHost, LoraTargets};
use crate::models::presets::SD15_UNET_CONFIG;
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::weights::ModelWeights;
use crate::rng::Rng;
use crate::sys::HeapCounter;
use crate::train::config::MixedPrecision;
use crate::train::model::lora_file_bytes;
use crate::train::optim::{AdamW, AdamWParams};
use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use clap::Args;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

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
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Device of both sides: cpu or cuda:N (the PyTorch reference runs on the same device).
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// The figures of one workload.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Figures {
    forward_ms: f64,
    lora_step_ms: f64,
    full_step_ms: f64,
    /// Peak RSS of the process that ran the forward and LoRA steps.
    lora_peak_rss_mb: f64,
    /// Peak RSS of the process that ran the full steps (0 when skipped).
    full_peak_rss_mb: f64,
    /// Peak RSS of the measuring process (a child's own figure).
    peak_rss_mb: f64,
    lora_params: usize,
    /// Size of the rank-4 LoRA in our file format (f32 factors, no metadata).
    lora_file_bytes_f32: usize,
    /// The same with f16 factors.
    lora_file_bytes_f16: usize,
    full_params: usize,
    /// LoRA step phases (median ms): forward + loss, backward, AdamW.
    lora_phases_ms: [f64; 3],
    /// Full step phases (median ms).
    full_phases_ms: [f64; 3],
    /// Heap bytes (MB) the LoRA step's graph holds when the forward ends, beyond the model.
    #[serde(default)]
    lora_graph_mb: f64,
    /// The most heap (MB) the LoRA step's backward held at once, beyond the model.
    #[serde(default)]
    lora_backward_peak_mb: f64,
    /// Device memory in use after the LoRA step's forward / backward, largest (MB; 0 on the CPU).
    #[serde(default)]
    lora_device_mb: f64,
}

/// Median milliseconds of `v` (NaN when empty).
fn median_ms(v: Vec<f64>) -> f64 {
    median(v) * 1e3
}

/// Median milliseconds of [`time_runs`].
fn time_runs_ms(
    warmup: usize,
    runs: usize,
    f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    Ok(time_runs(warmup, runs, f)? * 1e3)
}

/// Seconds spent in the phases of the timed steps: forward + loss, backward, optimizer.
#[derive(Default)]
struct Phases {
    fwd: Vec<f64>,
    bwd: Vec<f64>,
    opt: Vec<f64>,
    /// Largest graph size seen (MB of heap beyond the model when the forward ends).
    graph_mb: f64,
    /// Largest backward peak seen (MB of heap beyond the model).
    backward_peak_mb: f64,
    /// Largest device memory in use seen after a forward or backward (MB; 0 on the CPU).
    device_mb: f64,
}

impl Phases {
    /// Samples the memory in use on `dev` (accelerators only).
    fn note_device_memory(&mut self, dev: &Device) {
        if let Some(mb) = crate::sys::device_memory_in_use_mb(dev) {
            self.device_mb = self.device_mb.max(mb);
        }
    }

    /// Median milliseconds of each phase over the timed runs (after `warmup` runs).
    fn medians(self, warmup: usize) -> [f64; 3] {
        let m = |v: Vec<f64>| median_ms(v.into_iter().skip(warmup).collect());
        [m(self.fwd), m(self.bwd), m(self.opt)]
    }
}

/// One training step: MSE to `target` of the output of `fwd`, backward, AdamW over `vars`.
fn train_step(
    fwd: impl FnOnce() -> candle_core::Result<Tensor>,
    target: &Tensor,
    vars: &[(String, Var)],
    opt: &mut AdamW,
    phases: &mut Phases,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let base = HeapCounter::live();
    let loss = (fwd()?.to_dtype(DType::F32)? - target)?.sqr()?.mean_all()?;
    let dev = loss.device().clone();
    dev.synchronize()?;
    let t1 = Instant::now();
    phases.note_device_memory(&dev);
    let graph = HeapCounter::live().saturating_sub(base);
    HeapCounter::reset_peak();
    let grads = loss.backward()?;
    dev.synchronize()?;
    let t2 = Instant::now();
    phases.note_device_memory(&dev);
    phases.graph_mb = phases.graph_mb.max(graph as f64 / 1e6);
    phases.backward_peak_mb = phases
        .backward_peak_mb
        .max(HeapCounter::peak().saturating_sub(base) as f64 / 1e6);
    let mut g = BTreeMap::new();
    for (name, var) in vars {
        if let Some(t) = grads.get(var.as_tensor()) {
            g.insert(name.clone(), t.clone());
        }
    }
    drop(grads);
    opt.step(&g, 1.0)?;
    dev.synchronize()?;
    phases.fwd.push((t1 - t0).as_secs_f64());
    phases.bwd.push((t2 - t1).as_secs_f64());
    phases.opt.push(t2.elapsed().as_secs_f64());
    Ok(())
}

fn adamw() -> AdamW {
    AdamW::new(AdamWParams {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 1e-2,
    })
}

/// Every weight of a model built by `build` as a variable (random values).
fn var_model<M>(
    build: &dyn Fn(VarBuilder<'static>) -> candle_core::Result<M>,
    dev: &Device,
) -> anyhow::Result<(M, Vec<(String, Var)>)> {
    let probe = ModelWeights::structure_only("bench");
    build(probe.var_builder(DType::F32, dev))?;
    let random = ModelWeights::random("bench", 0).var_builder(DType::F32, dev);
    let varmap = candle_nn::VarMap::new();
    let mut vars = vec![];
    {
        let mut data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        for (key, shape) in probe.requested() {
            let var = Var::from_tensor(&random.get(shape.as_slice(), &key)?)?;
            data.insert(key.clone(), var.clone());
            vars.push((key, var));
        }
    }
    let model = build(VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
    Ok((model, vars))
}

/// Which steps one child process measures.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Forward (no gradients) and the LoRA step.
    Lora,
    /// The full-fine-tuning step.
    Full,
}

/// Measures one phase of a workload: `build` makes the model from a VarBuilder, `fwd` runs it,
/// `checkpoint` switches gradient checkpointing on. The peak RSS is this process's (one phase
/// per process).
fn measure<M: LoraHost>(
    build: &dyn Fn(VarBuilder<'static>) -> candle_core::Result<M>,
    fwd: &dyn Fn(&M) -> candle_core::Result<Tensor>,
    checkpoint: &dyn Fn(&mut M),
    phase: Phase,
    s: &Switches,
    dev: &Device,
) -> anyhow::Result<Figures> {
    let (warmup, runs) = (s.warmup, s.runs);
    let mut f = Figures::default();
    reset_peak_rss();
    match phase {
        Phase::Lora => {
            let dtype = s.mixed_precision.dtype();
            let mut model = build(ModelWeights::random("bench", 0).var_builder(dtype, dev))?;
            if s.gradient_checkpointing {
                checkpoint(&mut model);
            }
            f.forward_ms = time_runs_ms(warmup, runs, || {
                fwd(&model)?;
                dev.synchronize()?;
                Ok(())
            })?;
            op_times("forward", warmup + runs);
            let target = Rng::new(1).randn(fwd(&model)?.dims(), dev)?;
            let targets = LoraTargets::parse("attn")?;
            let lora = inject_trainable(
                &model,
                Component::Unet,
                &targets,
                4,
                4.0,
                0.0,
                &mut Rng::new(2),
                dev,
            )?;
            let vars = lora.named_vars().to_vec();
            f.lora_params = lora.num_parameters();
            let mut set = lora.to_lora_set()?;
            f.lora_file_bytes_f32 = lora_file_bytes(&set, &BTreeMap::new())?.len();
            for w in set.layers.values_mut() {
                *w = w.map(|t| t.to_dtype(DType::F16))?;
            }
            f.lora_file_bytes_f16 = lora_file_bytes(&set, &BTreeMap::new())?.len();
            let mut opt = adamw();
            opt.add_group(&vars, 1e-4)?;
            let mut ph = Phases::default();
            crate::ops::profile::take();
            f.lora_step_ms = time_runs_ms(warmup, runs, || {
                train_step(|| fwd(&model), &target, &vars, &mut opt, &mut ph)
            })?;
            op_times("LoRA step", warmup + runs);
            (f.lora_graph_mb, f.lora_backward_peak_mb) = (ph.graph_mb, ph.backward_peak_mb);
            f.lora_device_mb = ph.device_mb;
            f.lora_phases_ms = ph.medians(warmup);
            f.lora_peak_rss_mb = peak_rss_mb();
        }
        Phase::Full => {
            let (model, vars) = var_model(build, dev)?;
            f.full_params = vars.iter().map(|(_, v)| v.elem_count()).sum();
            let target = Rng::new(1).randn(fwd(&model)?.dims(), dev)?;
            let mut opt = adamw();
            opt.add_group(&vars, 1e-5)?;
            let mut ph = Phases::default();
            f.full_step_ms = time_runs_ms(warmup, runs, || {
                train_step(|| fwd(&model), &target, &vars, &mut opt, &mut ph)
            })?;
            f.full_phases_ms = ph.medians(warmup);
        }
    }
    f.peak_rss_mb = peak_rss_mb();
    Ok(f)
}

/// With `LORA_OP_TIMES` set: the fused ops' wall time per step, inclusive (nested ops, such
/// as the conv inside the resnet op, counted in both) and on their own, on stderr.
fn op_times(label: &str, steps: usize) {
    if !crate::ops::profile::enabled() {
        return;
    }
    let rows = crate::ops::profile::take();
    let per = |s: f64| s * 1e3 / steps.max(1) as f64;
    eprintln!("  {label}: op wall time per step (ms; inclusive, own), {steps} steps");
    for &(name, pass, secs, own, calls) in &rows {
        eprintln!(
            "    {name:<28} {pass:<9?} {:>9.1} ms {:>9.1} ms  {:>6} calls",
            per(secs),
            per(own),
            calls / steps.max(1) as u64
        );
    }
    let own: f64 = rows.iter().map(|r| r.3).sum();
    eprintln!("    {:<38} {:>9.1} ms", "timed ops, own time", per(own));
}

/// The switches a phase runs under.
struct Switches {
    warmup: usize,
    runs: usize,
    resolution: usize,
    batch: usize,
    mixed_precision: MixedPrecision,
    gradient_checkpointing: bool,
}

fn block_figures(phase: Phase, s: &Switches, dev: &Device, pair: bool) -> anyhow::Result<Figures> {
    let mut rng = Rng::new(0);
    let x = rng.randn((1, 320, 32, 32), dev)?;
    let temb = rng.randn((1, 1280), dev)?;
    let ctx = rng.randn((1, 77, 768), dev)?;
    let dt = s.mixed_precision.dtype();
    let (x, temb, ctx) = (x.to_dtype(dt)?, temb.to_dtype(dt)?, ctx.to_dtype(dt)?);
    if pair {
        return measure(
            &|vb| BlockPair::new(vb),
            &|m: &BlockPair| m.forward(&x, &temb, &ctx),
            &|m: &mut BlockPair| m.set_gradient_checkpointing(true),
            phase,
            s,
            dev,
        );
    }
    measure(
        &|vb| BlockSlice::new(vb),
        &|m: &BlockSlice| m.forward(&x, &temb, &ctx),
        &|m: &mut BlockSlice| m.set_gradient_checkpointing(true),
        phase,
        s,
        dev,
    )
}

fn unet_figures(phase: Phase, s: &Switches, dev: &Device) -> anyhow::Result<Figures> {
    let cfg: UNet2DConditionConfig = serde_json::from_str(SD15_UNET_CONFIG)?;
    let mut rng = Rng::new(0);
    let l = s.resolution / 8;
    let n = s.batch;
    let x = rng.randn((n, 4, l, l), dev)?;
    let ctx = rng.randn((n, 77, 768), dev)?;
    let ts = Tensor::new(vec![500f32; n], dev)?;
    measure(
        &|vb| UNet2DConditionModel::new(vb, &cfg),
        &|m: &UNet2DConditionModel| m.forward(&x, &ts, &ctx),
        &|m: &mut UNet2DConditionModel| m.set_gradient_checkpointing(true),
        phase,
        s,
        dev,
    )
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
    };
    let dev = crate::sys::parse_device(&b.device)?;
    let f = match unet {
        true => unet_figures(phase, &s, &dev)?,
        false => block_figures(phase, &s, &dev, workload == "block2")?,
    };
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
    let mut args = vec![
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

fn print_text(name: &str, f: &Figures, torch: Option<&serde_json::Value>) {
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
    println!(
        "  rank-4 attention LoRA: {} params, file {:.2} MB (f32) / {:.2} MB (f16); full: {} params",
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
            print_text(&title, f, torch.as_ref());
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
