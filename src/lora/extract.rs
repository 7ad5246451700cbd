//! `lora extract`: a LoRA from the difference of two full models (e.g. a base and a fully
//! fine-tuned checkpoint), by a truncated SVD of ΔW = W_tuned − W_base on every targeted layer.
//!
//! Each ΔW is factored in f64 by [`randomized_svd`] (exact Jacobi SVD on small layers): the
//! kept energy Σσ²_kept / ‖ΔW‖²_F it reports is exact for the factors produced, and with the
//! default 3 power iterations the error is within ~0.1 % of the Eckart–Young optimum even
//! for slowly decaying spectra (see tests/svd.rs).

use super::combine::{EnergyReport, LayerEnergy};
use super::svd::{randomized_svd, Mat, RandomizedOpts};
use super::targets::LoraTargets;
use super::{LoraSet, LoraWeights};
use crate::hub::ModelSource;
use crate::models::weights::ModelWeights;
use anyhow::{bail, Context};
use candle_core::{DType, Device};
use std::collections::BTreeMap;

/// Settings of [`extract`].
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Rank kept per layer (lower when a layer's difference has lower rank or size).
    pub rank: usize,
    /// Which layers to extract.
    pub targets: LoraTargets,
    /// Components to look at (`unet`, `text_encoder`).
    pub components: Vec<String>,
    /// Layers with ‖ΔW‖_F ≤ this · ‖W_base‖_F count as unchanged and are left out.
    pub min_relative_change: f64,
    /// Randomized SVD settings.
    pub svd: RandomizedOpts,
    /// dtype of the stored factors.
    pub dtype: DType,
}

impl ExtractOptions {
    /// Rank `rank` on the attention layers of the UNet and the text encoder.
    pub fn new(rank: usize) -> anyhow::Result<Self> {
        Ok(Self {
            rank,
            targets: LoraTargets::parse("attn,text-attn")?,
            components: vec!["unet".into(), "text_encoder".into()],
            min_relative_change: 0.0,
            svd: RandomizedOpts::default(),
            dtype: DType::F32,
        })
    }
}

/// What [`extract`] found besides the LoRA.
#[derive(Debug, Clone, Default)]
pub struct ExtractReport {
    /// Energy kept per extracted layer.
    pub energy: EnergyReport,
    /// Targeted layers left out because they did not change.
    pub unchanged: Vec<String>,
}

/// The targeted weight keys of one component (2-d and 4-d weights, embeddings excluded).
fn targeted_keys(
    w: &ModelWeights,
    component: &str,
    targets: &LoraTargets,
) -> Vec<(String, Vec<usize>)> {
    w.file_shapes()
        .iter()
        .filter_map(|(k, s)| {
            let module = k.strip_suffix(".weight")?;
            let ok = matches!(s.len(), 2 | 4)
                && !module.contains("embeddings")
                && !module.contains("embedding.");
            (ok && targets.matches(component, module)).then(|| (k.clone(), s.clone()))
        })
        .collect()
}

/// Counts the layers [`extract`] will factor (for a progress bar).
pub fn count_layers(base: &ModelSource, opts: &ExtractOptions) -> anyhow::Result<usize> {
    let mut n = 0;
    for comp in &opts.components {
        if !opts.targets.applies_to(comp) {
            continue;
        }
        let w = base.weights(comp)?;
        n += targeted_keys(&w, comp, &opts.targets).len();
    }
    Ok(n)
}

/// Extracts a rank-`opts.rank` LoRA of `tuned − base`. `on_layer` is called after each layer.
pub fn extract(
    base: &ModelSource,
    tuned: &ModelSource,
    opts: &ExtractOptions,
    on_layer: &dyn Fn(&LayerEnergy),
) -> anyhow::Result<(LoraSet, ExtractReport)> {
    if opts.rank == 0 {
        bail!("--rank must be at least 1");
    }
    let mut set = LoraSet::default();
    let mut report = ExtractReport::default();
    let cpu = Device::Cpu;
    for comp in &opts.components {
        if !opts.targets.applies_to(comp) {
            continue;
        }
        let wb = base
            .weights(comp)
            .with_context(|| format!("base model {}", base.describe()))?;
        let wt = tuned
            .weights(comp)
            .with_context(|| format!("tuned model {}", tuned.describe()))?;
        let keys = targeted_keys(&wb, comp, &opts.targets);
        let mut problems = vec![];
        for (k, s) in &keys {
            match wt.file_shapes().get(k) {
                None => problems.push(format!("{comp}.{k}: absent from the tuned model")),
                Some(t) if t != s => problems.push(format!(
                    "{comp}.{k}: shape {s:?} in the base, {t:?} in the tuned model"
                )),
                _ => {}
            }
        }
        if !problems.is_empty() {
            bail!(
                "the two models do not have the same architecture:\n  {}",
                problems
                    .iter()
                    .take(20)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n  ")
            );
        }
        let (vb, vt) = (
            wb.var_builder(DType::F64, &cpu),
            wt.var_builder(DType::F64, &cpu),
        );
        for (key, shape) in keys {
            let module = key.trim_end_matches(".weight");
            let name = format!("{comp}.{module}");
            let ctx = || format!("extracting {name}");
            let b = Mat::from_tensor(&vb.get_unchecked_dtype(&key, DType::F64).with_context(ctx)?)
                .with_context(ctx)?;
            let t = Mat::from_tensor(&vt.get_unchecked_dtype(&key, DType::F64).with_context(ctx)?)
                .with_context(ctx)?;
            let delta = t.add_scaled(&b, -1.0).with_context(ctx)?;
            let total = delta.frob_sq();
            if total == 0.0 || total <= (opts.min_relative_change.powi(2)) * b.frob_sq() {
                report.unchanged.push(name);
                continue;
            }
            let svd = randomized_svd(&delta, opts.rank, opts.svd).with_context(ctx)?;
            let (up, down) = svd.factors(opts.rank);
            let r = down.rows;
            let mut down_shape = vec![r];
            down_shape.extend_from_slice(&shape[1..]);
            let mut up_shape = vec![shape[0], r];
            up_shape.extend(std::iter::repeat_n(1, shape.len() - 2));
            let layer = LoraWeights::new(
                down.to_tensor(&down_shape, opts.dtype, &cpu)?,
                up.to_tensor(&up_shape, opts.dtype, &cpu)?,
                r as f64,
            )?;
            let energy = LayerEnergy {
                name: name.clone(),
                rank_in: shape[0].min(shape[1..].iter().product()),
                rank_out: r,
                kept: svd.energy(),
                total,
                singular_values: svd.s.clone(),
            };
            on_layer(&energy);
            report.energy.layers.push(energy);
            set.layers.insert(name.into(), layer);
        }
    }
    if set.layers.is_empty() {
        bail!(
            "no targeted layer differs between {} and {} (targets {}); nothing to extract",
            base.describe(),
            tuned.describe(),
            opts.targets
        );
    }
    set.metadata = BTreeMap::from([
        ("lora_extract.rank".to_string(), opts.rank.to_string()),
        ("lora_extract.targets".to_string(), opts.targets.to_string()),
    ]);
    Ok((set, report))
}
