//! The demo run (`lora demo`) and its measurements: train the demo concept (assets/demo-data,
//! "sks toy") into the bundled model by LoRA (or by full fine-tuning, for `lora bench
//! quality`), then draw the concept prompts and some world prompts with the base and the
//! trained model, sweep the LoRA scale, score every image, and write the pictures.

use super::quality::{
    concept_prompts, concept_scores, concept_templates, mean, mean_abs_diff, prompt_following,
    Following,
};
use crate::hub::ModelSource;
use crate::models::unet::UNet2DConditionModel;
use crate::models::weights::ModelWeights;
use crate::pipeline::grid::{grid, write_gif};
use crate::pipeline::image_io::save_png;
use crate::pipeline::StableDiffusion;
use crate::train::{TrainConfig, TrainHooks, Trainer};
use crate::world::{prompt_set, ConceptTemplate};
use anyhow::Context;
use candle_core::{DType, Device};
use image::RgbImage;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The LoRA scales of the sweep.
pub const SWEEP_SCALES: [f64; 6] = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5];
/// Images per concept prompt and setting.
pub const IMAGES_PER_PROMPT: usize = 3;
/// World prompts the drift is measured on.
pub const DRIFT_PROMPTS: usize = 8;
/// Seed of every measured image's latents.
pub const MEASURE_SEED: u64 = 1;

/// What to train.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Base model: a folder or Hugging Face id (None: the bundled model).
    pub model: Option<String>,
    /// The concept's images with captions.
    pub data: PathBuf,
    /// Output folder.
    pub out_dir: PathBuf,
    /// Training steps.
    pub steps: usize,
    /// Full fine-tuning instead of a rank-4 LoRA.
    pub full: bool,
    /// Learning rate.
    pub learning_rate: f64,
    /// Progress bars and notes off.
    pub quiet: bool,
}

impl DemoOptions {
    /// The demo's defaults on `model`: rank-4 LoRA on the attention projections, 300 steps, lr 1e-2.
    pub fn new(model: Option<String>, data: PathBuf, out_dir: PathBuf) -> Self {
        Self {
            model,
            data,
            out_dir,
            steps: 300,
            full: false,
            learning_rate: 1e-2,
            quiet: false,
        }
    }
}

/// The measured outcome of a demo run.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// "lora" or "full".
    pub method: String,
    /// Training steps.
    pub steps: usize,
    /// Seconds in training steps.
    pub train_seconds: f64,
    /// Bytes of the trained file (the LoRA file, or the UNet weights).
    pub file_bytes: u64,
    /// Mean loss of the first and the last 20 steps.
    pub loss_first_last: (f64, f64),
    /// Mean concept score of the base model's concept images.
    pub base_concept: f64,
    /// Mean concept score of the trained model's concept images (LoRA at scale 1).
    pub trained_concept: f64,
    /// (scale, mean concept score) of the sweep (LoRA only).
    pub sweep: Vec<(f64, f64)>,
    /// Whether the LoRA at scale 0 draws exactly the base model's images (LoRA only).
    pub scale0_equals_base: Option<bool>,
    /// Prompt following of the base model on the world prompts.
    pub base_following: Following,
    /// Prompt following of the trained model on the same prompts.
    pub trained_following: Following,
    /// Mean absolute difference of the world-prompt images, trained vs base (levels of 255).
    pub drift_levels: f64,
    /// The files written (not serialized: files we write hold no local paths).
    #[serde(skip)]
    pub outputs: Vec<PathBuf>,
    /// The files written, relative to the output folder.
    pub files: Vec<String>,
}

impl DemoReport {
    /// The report as lines for a person.
    pub fn summary(&self) -> Vec<String> {
        let m = &self.method;
        let mut out = vec![
            format!(
                "trained {m} ({} steps) in {:.1}s: mean loss of the first 20 steps {:.3}, last 20 {:.3}",
                self.steps, self.train_seconds, self.loss_first_last.0, self.loss_first_last.1
            ),
            format!(
                "concept score (closeness to the sks toy's pixels at the best shift, 0..1): base model {:.2}, {m} {:.2}",
                self.base_concept, self.trained_concept
            ),
        ];
        if !self.sweep.is_empty() {
            let s: Vec<String> = self
                .sweep
                .iter()
                .map(|(a, v)| format!("{a}: {v:.2}"))
                .collect();
            out.push(format!(
                "scale sweep (LoRA scale: concept score): {}",
                s.join(", ")
            ));
        }
        if let Some(eq) = self.scale0_equals_base {
            let how = if eq { "equal" } else { "DIFFER from" };
            out.push(format!("at scale 0 the images {how} the base model's"));
        }
        out.push(format!(
            "world prompts, base model: {}",
            self.base_following.line()
        ));
        out.push(format!(
            "world prompts, {m}: {} (images differ from the base model's by {:.1} levels on average)",
            self.trained_following.line(),
            self.drift_levels
        ));
        out
    }
}

fn load(source: &ModelSource) -> anyhow::Result<StableDiffusion> {
    StableDiffusion::load(source, DType::F32, &Device::Cpu)
}

/// The pipeline of `source` with its UNet weights read from `unet_file` (a full fine-tune's).
fn load_with_unet(source: &ModelSource, unet_file: &Path) -> anyhow::Result<StableDiffusion> {
    let mut sd = load(source)?;
    let weights = ModelWeights::from_files("unet", &[unet_file])?;
    sd.unet = UNet2DConditionModel::new(weights.var_builder(sd.dtype, &sd.device), &sd.unet_config)
        .with_context(|| format!("{} is not a UNet of this model", unet_file.display()))?;
    weights.finish()?;
    Ok(sd)
}

/// Pairs of (base, trained) images with labels, for a side-by-side grid.
fn pairs(base: &[RgbImage], trained: &[RgbImage], what: &str) -> Vec<(RgbImage, String)> {
    base.iter()
        .zip(trained)
        .flat_map(|(b, t)| {
            [
                (b.clone(), "base".to_string()),
                (t.clone(), what.to_string()),
            ]
        })
        .collect()
}

/// Runs the demo: trains, measures, writes `compare.png`, `sweep.png`, `sweep.gif` (LoRA),
/// `scores.json` and the trainer's outputs into `out_dir`.
pub fn run_demo(o: &DemoOptions) -> anyhow::Result<DemoReport> {
    let templates: Vec<ConceptTemplate> = concept_templates(&o.data)?;
    let method = if o.full { "full" } else { "lora" };
    let train_dir = o.out_dir.join(method);
    let cfg: TrainConfig = serde_json::from_value(serde_json::json!({
        "model": o.model,
        "instance_data_dir": o.data,
        "instance_prompt": "a sks toy",
        "resolution": 64,
        "rank": 4,
        "full": o.full,
        "cache_latents": true,
        "learning_rate": o.learning_rate,
        "max_train_steps": o.steps,
        "seed": 0,
        "output_dir": train_dir,
        "force": true,
    }))
    .context("demo training options")?;
    let hooks = TrainHooks {
        quiet: o.quiet,
        ..Default::default()
    };
    let outcome = Trainer::new(cfg, hooks)?.run()?;
    let file = outcome.output.context("training produced no output file")?;
    let window = |it: &mut dyn Iterator<Item = f64>| {
        let v: Vec<f64> = it.take(20).collect();
        mean(&v)
    };
    let first = window(&mut outcome.losses.iter().map(|p| p.loss));
    let last = window(&mut outcome.losses.iter().rev().map(|p| p.loss));

    let t0 = Instant::now();
    let prompts = concept_prompts("sks toy");
    let source = match &o.model {
        Some(m) => ModelSource::parse(m)?,
        None => ModelSource::Local(crate::hub::bundled_model_dir()),
    };
    let base = load(&source)?;
    let (base_scores, base_images) =
        concept_scores(&base, &prompts, IMAGES_PER_PROMPT, MEASURE_SEED, &templates)?;
    let (base_following, base_world) = prompt_following(&base, DRIFT_PROMPTS, MEASURE_SEED)?;
    let (trained, handles) = match o.full {
        false => (None, base.add_lora(&crate::formats::read(&file)?, 1.0)?),
        true => (Some(load_with_unet(&source, &file)?), vec![]),
    };
    let sd = trained.as_ref().unwrap_or(&base);

    // The sweep (LoRA only); its scale-1 images are the trained model's.
    let mut sweep = vec![];
    let mut frames = vec![];
    let mut scale0_equals_base = None;
    let mut at_one = None;
    if !o.full {
        for &s in &SWEEP_SCALES {
            handles.iter().for_each(|h| h.set_scale(s));
            let (scores, images) =
                concept_scores(sd, &prompts, IMAGES_PER_PROMPT, MEASURE_SEED, &templates)?;
            if s == 0.0 {
                scale0_equals_base = Some(images == base_images);
            }
            sweep.push((s, mean(&scores)));
            frames.push((images[0].clone(), format!("scale {s}")));
            if s == 1.0 {
                at_one = Some((scores, images));
            }
        }
        handles.iter().for_each(|h| h.set_scale(1.0));
    }
    let (trained_scores, trained_images) = match at_one {
        Some(v) => v,
        None => concept_scores(sd, &prompts, IMAGES_PER_PROMPT, MEASURE_SEED, &templates)?,
    };
    let (trained_following, trained_world) = prompt_following(sd, DRIFT_PROMPTS, MEASURE_SEED)?;
    let drift_levels = mean(
        &base_world
            .iter()
            .zip(&trained_world)
            .map(|((_, a), (_, b))| mean_abs_diff(a, b))
            .collect::<Vec<_>>(),
    );

    let mut outputs = vec![];
    if !frames.is_empty() {
        let p = o.out_dir.join("sweep.png");
        save_png(&grid(&frames, frames.len()), &p, true)?;
        outputs.push(p);
        let p = o.out_dir.join("sweep.gif");
        let mut looped = frames.clone();
        looped.extend(frames.iter().rev().skip(1).take(frames.len() - 2).cloned());
        write_gif(&looped, 400, &p, true)?;
        outputs.push(p);
    }
    // One image per concept prompt and two world prompts, base beside trained.
    let pick = |v: &[RgbImage]| -> Vec<RgbImage> {
        v.iter().step_by(IMAGES_PER_PROMPT).cloned().collect()
    };
    let mut tiles = pairs(&pick(&base_images), &pick(&trained_images), method);
    let world_b: Vec<RgbImage> = base_world.iter().take(2).map(|(_, i)| i.clone()).collect();
    let world_t: Vec<RgbImage> = trained_world
        .iter()
        .take(2)
        .map(|(_, i)| i.clone())
        .collect();
    tiles.extend(pairs(&world_b, &world_t, method));
    let p = o.out_dir.join("compare.png");
    save_png(&grid(&tiles, 2), &p, true)?;
    outputs.push(p);
    outputs.push(train_dir.join("loss.png"));
    outputs.push(file.clone());

    let report = DemoReport {
        method: method.to_string(),
        steps: outcome.steps,
        train_seconds: outcome.train_seconds,
        file_bytes: std::fs::metadata(&file)?.len(),
        loss_first_last: (first, last),
        base_concept: mean(&base_scores),
        trained_concept: mean(&trained_scores),
        sweep,
        scale0_equals_base,
        base_following,
        trained_following,
        drift_levels,
        files: outputs
            .iter()
            .chain(std::iter::once(&o.out_dir.join("scores.json")))
            .map(|p| {
                let rel = p.strip_prefix(&o.out_dir).unwrap_or(p);
                rel.to_string_lossy().replace('\\', "/")
            })
            .collect(),
        outputs: outputs.clone(),
    };
    let p = o.out_dir.join("scores.json");
    let mut json = serde_json::to_value(&report)?;
    json["measure_seconds"] = serde_json::json!(t0.elapsed().as_secs_f64());
    json["prompts"] = serde_json::json!(prompts);
    json["world_prompts"] = serde_json::json!(prompt_set(DRIFT_PROMPTS)
        .iter()
        .map(|s| s.caption())
        .collect::<Vec<_>>());
    crate::atomic::write_file(&p, true, |tmp| {
        std::fs::write(tmp, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {}", p.display()))
    })?;
    let mut report = report;
    report.outputs.push(p);
    Ok(report)
}
