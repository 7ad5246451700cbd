//! `lora bench train`: forward, LoRA step and full step (ms) plus peak RSS for two workloads,
//! fp32, random weights:
//! - `sd_block`: one SD-1.5 down-block slice (ResnetBlock2D 320 ch with a 1280 time embedding,
//!   then a Transformer2DModel: 8 heads × 40, context 77×768) on a 32×32 latent, batch 1;
//! - `sd15_unet_256`: the SD 1.5 UNet at 256×256 (32×32 latent), batch 1, context 77×768.
//!
//! "LoRA step": rank-4 LoRA on to_q / to_k / to_v / to_out.0 of every attention, MSE loss to a
//! random target, backward, AdamW on the LoRA parameters. "Full step": every weight trained.
//! `--torch-python` runs scripts/bench_train.py (PyTorch + diffusers + PEFT, the same
//! workloads) in the same invocation and prints the ratios.

use super::{median, peak_rss_mb, reset_peak_rss, run_torch_script, time_runs};
use crate::lora::{inject_trainable, Component, LoraHost, LoraTargets};
use crate::models::blocks::{
    ResnetBlock2D, ResnetBlock2DConfig, Transformer2DConfig, Transformer2DModel,
};
use crate::models::presets::SD15_UNET_CONFIG;
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::walk::{LayerRef, LayerWalk};
use crate::models::weights::ModelWeights;
use crate::rng::Rng;
use crate::train::model::lora_file_bytes;
use crate::train::optim::{AdamW, AdamWParams};
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
    /// Which workloads: all, block or unet.
    #[arg(long, default_value = "all")]
    workload: String,
    /// A Python with torch + diffusers + peft: also runs scripts/bench_train.py and prints ratios.
    #[arg(long)]
    torch_python: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// LoRA steps with gradient checkpointing (every resnet / transformer block recomputed in
    /// the backward); the full step is then skipped.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Latent side of the block workload.
    #[arg(long, default_value_t = 32)]
    block_latent: usize,
}

/// The down-block slice of the SD-block workload.
struct BlockSlice {
    resnet: ResnetBlock2D,
    attn: Transformer2DModel,
}

impl BlockSlice {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let rcfg = ResnetBlock2DConfig {
            temb_channels: Some(1280),
            eps: 1e-5,
            ..ResnetBlock2DConfig::new(320, 320)
        };
        let tcfg = Transformer2DConfig {
            num_attention_heads: 8,
            attention_head_dim: 40,
            in_channels: 320,
            num_layers: 1,
            cross_attention_dim: 768,
            norm_num_groups: 32,
            use_linear_projection: false,
            only_cross_attention: false,
            upcast_attention: false,
        };
        Ok(Self {
            resnet: ResnetBlock2D::new(vb.pp("resnet"), &rcfg)?,
            attn: Transformer2DModel::new(vb.pp("attn"), &tcfg)?,
        })
    }

    fn set_gradient_checkpointing(&mut self, on: bool) {
        self.resnet.set_gradient_checkpointing(on);
        self.attn.set_gradient_checkpointing(on);
    }

    fn forward(&self, x: &Tensor, temb: &Tensor, ctx: &Tensor) -> candle_core::Result<Tensor> {
        self.attn.forward(&self.resnet.forward(x, Some(temb))?, ctx)
    }
}

impl LayerWalk for BlockSlice {
    fn walk<'a>(&'a self, f: &mut dyn FnMut(LayerRef<'a>)) {
        self.resnet.walk(f);
        self.attn.walk(f);
    }
}

/// The figures of one workload.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Figures {
    forward_ms: f64,
    lora_step_ms: f64,
    full_step_ms: f64,
    /// Peak RSS over the forward and LoRA phases.
    lora_peak_rss_mb: f64,
    /// Peak RSS over the whole workload (the full step dominates).
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
}

impl Phases {
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
    let loss = (fwd()? - target)?.sqr()?.mean_all()?;
    let t1 = Instant::now();
    let grads = loss.backward()?;
    let t2 = Instant::now();
    let mut g = BTreeMap::new();
    for (name, var) in vars {
        if let Some(t) = grads.get(var.as_tensor()) {
            g.insert(name.clone(), t.clone());
        }
    }
    drop(grads);
    opt.step(&g, 1.0)?;
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

/// Measures one workload: `build` makes the model from a VarBuilder, `fwd` runs it;
/// `checkpointing` switches gradient checkpointing on for the LoRA step (and skips the full step).
fn measure<M: LoraHost>(
    build: &dyn Fn(VarBuilder<'static>) -> candle_core::Result<M>,
    fwd: &dyn Fn(&M) -> candle_core::Result<Tensor>,
    (warmup, runs): (usize, usize),
    checkpointing: Option<&dyn Fn(&mut M)>,
    dev: &Device,
) -> anyhow::Result<Figures> {
    let mut f = Figures::default();
    reset_peak_rss();
    {
        let mut model = build(ModelWeights::random("bench", 0).var_builder(DType::F32, dev))?;
        if let Some(on) = checkpointing {
            on(&mut model);
        }
        f.forward_ms = time_runs_ms(warmup, runs, || {
            fwd(&model)?;
            Ok(())
        })?;
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
        f.lora_step_ms = time_runs_ms(warmup, runs, || {
            train_step(|| fwd(&model), &target, &vars, &mut opt, &mut ph)
        })?;
        f.lora_phases_ms = ph.medians(warmup);
        f.lora_peak_rss_mb = peak_rss_mb();
    }
    if checkpointing.is_some() {
        f.full_step_ms = f64::NAN;
        f.full_phases_ms = [f64::NAN; 3];
        f.peak_rss_mb = peak_rss_mb();
        return Ok(f);
    }
    {
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
    f.peak_rss_mb = peak_rss_mb();
    Ok(f)
}

fn block_figures(b: &TrainBench, dev: &Device) -> anyhow::Result<Figures> {
    let mut rng = Rng::new(0);
    let x = rng.randn((1, 320, b.block_latent, b.block_latent), dev)?;
    let temb = rng.randn((1, 1280), dev)?;
    let ctx = rng.randn((1, 77, 768), dev)?;
    measure(
        &|vb| BlockSlice::new(vb),
        &|m: &BlockSlice| m.forward(&x, &temb, &ctx),
        (2, b.runs),
        b.gradient_checkpointing
            .then_some(&|m: &mut BlockSlice| m.set_gradient_checkpointing(true)),
        dev,
    )
}

fn unet_figures(b: &TrainBench, dev: &Device) -> anyhow::Result<Figures> {
    let cfg: UNet2DConditionConfig = serde_json::from_str(SD15_UNET_CONFIG)?;
    let mut rng = Rng::new(0);
    let x = rng.randn((1, 4, 32, 32), dev)?;
    let ctx = rng.randn((1, 77, 768), dev)?;
    let ts = Tensor::new(&[500f32], dev)?;
    measure(
        &|vb| UNet2DConditionModel::new(vb, &cfg),
        &|m: &UNet2DConditionModel| m.forward(&x, &ts, &ctx),
        (1, b.unet_runs),
        b.gradient_checkpointing
            .then_some(&|m: &mut UNet2DConditionModel| m.set_gradient_checkpointing(true)),
        dev,
    )
}

/// Runs scripts/bench_train.py for one workload; returns its JSON object.
fn torch_figures(py: &PathBuf, workload: &str, runs: usize) -> anyhow::Result<serde_json::Value> {
    let runs = runs.to_string();
    run_torch_script(
        py,
        "bench_train.py",
        &["--workload", workload, "--runs", &runs],
    )
}

fn print_text(name: &str, f: &Figures, torch: Option<&serde_json::Value>) {
    println!("{name}");
    let t = |k: &str| torch.and_then(|v| v[k].as_f64());
    for (label, key, ours) in [
        ("forward", "forward_ms", f.forward_ms),
        ("LoRA step", "lora_step_ms", f.lora_step_ms),
        ("full step", "full_step_ms", f.full_step_ms),
    ] {
        match t(key) {
            Some(p) => println!(
                "  {label:<10} {ours:>9.1} ms   PyTorch {p:>9.1} ms   ratio {:.2}x",
                ours / p
            ),
            None => println!("  {label:<10} {ours:>9.1} ms"),
        }
    }
    println!(
        "  LoRA step / forward {:.2}, full step / LoRA step {:.2}",
        f.lora_step_ms / f.forward_ms,
        f.full_step_ms / f.lora_step_ms
    );
    for (label, p) in [
        ("LoRA step", f.lora_phases_ms),
        ("full step", f.full_phases_ms),
    ] {
        println!(
            "  {label} phases: forward+loss {:.1} ms, backward {:.1} ms, AdamW {:.1} ms",
            p[0], p[1], p[2]
        );
    }
    println!(
        "  peak RSS {:.0} MB (forward + LoRA phases {:.0} MB){}",
        f.peak_rss_mb,
        f.lora_peak_rss_mb,
        t("peak_rss_mb").map_or(String::new(), |p| format!("   PyTorch {p:.0} MB"))
    );
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
    let dev = Device::Cpu;
    let (do_block, do_unet) = match b.workload.as_str() {
        "all" => (true, true),
        "block" => (true, false),
        "unet" => (false, true),
        w => anyhow::bail!("--workload {w}: expected all, block or unet"),
    };
    // PyTorch first: this process keeps freed memory (see `sys::tune_allocator`), so the
    // reference must not run beside our own full-UNet step.
    let mut torch: Vec<Option<serde_json::Value>> = vec![None, None];
    if let Some(py) = &b.torch_python {
        if do_block {
            torch[0] = Some(torch_figures(py, "block", b.runs)?);
        }
        if do_unet {
            torch[1] = Some(torch_figures(py, "unet", b.unet_runs)?);
        }
    }
    let mut results: Vec<(&str, Figures, Option<serde_json::Value>)> = vec![];
    if do_block {
        results.push(("sd_block", block_figures(&b, &dev)?, torch[0].take()));
    }
    if do_unet {
        let f = unet_figures(&b, &dev)?;
        results.push(("sd15_unet_256", f, torch[1].take()));
    }
    if b.json {
        let mut obj = serde_json::Map::new();
        for (name, f, torch) in &results {
            let mut v = serde_json::to_value(f)?;
            if let Some(t) = torch {
                for k in ["forward_ms", "lora_step_ms", "full_step_ms"] {
                    if let Some(p) = t[k].as_f64() {
                        v[format!("ratio_{k}")] = (v[k].as_f64().unwrap_or(f64::NAN) / p).into();
                    }
                }
                v["torch"] = t.clone();
            }
            obj.insert(name.to_string(), v);
        }
        obj.insert("dtype".into(), "f32".into());
        obj.insert(
            "threads".into(),
            candle_core::utils::get_num_threads().into(),
        );
        println!("{}", serde_json::Value::Object(obj));
    } else {
        println!(
            "fp32 CPU, random weights, {} threads",
            candle_core::utils::get_num_threads()
        );
        for (name, f, torch) in &results {
            let title = if *name == "sd_block" {
                "SD-block (ResnetBlock2D 320 + transformer block, 32x32 latent, context 77x768)"
            } else {
                "SD 1.5 UNet, 256x256 (latent 32x32), batch 1, context 77x768"
            };
            print_text(title, f, torch.as_ref());
        }
    }
    Ok(())
}
