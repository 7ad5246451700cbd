//! The child side of `lora bench train`: one phase of one workload (forward and LoRA step, or
//! the full step) measured in this process, with its peak RSS, heap and phase timings.

use super::blocks::{BlockPair, BlockSlice};
use super::{median, peak_rss_mb, reset_peak_rss, time_runs};
use crate::lora::{inject_trainable, Component, LoraHost, LoraTargets};
use crate::models::presets::SD15_UNET_CONFIG;
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::weights::ModelWeights;
use crate::rng::Rng;
use crate::sys::HeapCounter;
use crate::train::config::MixedPrecision;
use crate::train::model::lora_file_bytes;
use crate::train::optim::{AdamW, AdamWParams};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use std::collections::BTreeMap;
use std::time::Instant;

/// The figures of one workload.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct Figures {
    pub(super) forward_ms: f64,
    pub(super) lora_step_ms: f64,
    pub(super) full_step_ms: f64,
    /// Peak RSS of the process that ran the forward and LoRA steps.
    pub(super) lora_peak_rss_mb: f64,
    /// Peak RSS of the process that ran the full steps (0 when skipped).
    pub(super) full_peak_rss_mb: f64,
    /// Peak RSS of the measuring process (a child's own figure).
    pub(super) peak_rss_mb: f64,
    pub(super) lora_params: usize,
    /// Size of the rank-4 LoRA in our file format (f32 factors, no metadata).
    pub(super) lora_file_bytes_f32: usize,
    /// The same with f16 factors.
    pub(super) lora_file_bytes_f16: usize,
    pub(super) full_params: usize,
    /// LoRA step phases (median ms): forward + loss, backward, AdamW.
    pub(super) lora_phases_ms: [f64; 3],
    /// Full step phases (median ms).
    pub(super) full_phases_ms: [f64; 3],
    /// Heap bytes (MB) the LoRA step's graph holds when the forward ends, beyond the model.
    #[serde(default)]
    pub(super) lora_graph_mb: f64,
    /// The most heap (MB) the LoRA step's backward held at once, beyond the model.
    #[serde(default)]
    pub(super) lora_backward_peak_mb: f64,
    /// Device memory in use after the LoRA step's forward / backward, largest (MB; 0 on the CPU).
    #[serde(default)]
    pub(super) lora_device_mb: f64,
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
pub(super) enum Phase {
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
            let targets = LoraTargets::parse(&s.targets)?;
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
pub(super) struct Switches {
    pub(super) warmup: usize,
    pub(super) runs: usize,
    pub(super) resolution: usize,
    pub(super) batch: usize,
    pub(super) mixed_precision: MixedPrecision,
    pub(super) gradient_checkpointing: bool,
    /// The LoRA targets (`lora train --targets` syntax).
    pub(super) targets: String,
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

/// The figures of `phase` of `workload` (`block`, `block2` or `unet`), measured in this process.
pub(super) fn figures(
    workload: &str,
    phase: Phase,
    s: &Switches,
    dev: &Device,
) -> anyhow::Result<Figures> {
    match workload {
        "unet" => unet_figures(phase, s, dev),
        w => block_figures(phase, s, dev, w == "block2"),
    }
}
