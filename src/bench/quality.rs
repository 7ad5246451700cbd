//! What a LoRA learned, measured on the bundled model's world: how well the model follows
//! world prompts ([`prompt_following`]), how much of the demo concept its images show
//! ([`concept_scores`]), and `lora bench quality`, which trains the demo concept by LoRA and by
//! full fine-tuning for the same steps and compares time, file size, concept score and drift.

use crate::pipeline::image_io::to_rgb8;
use crate::pipeline::{GenerateParams, StableDiffusion};
use crate::world::{caption_for, concept_score, prompt_set, read_scene, ConceptTemplate, Scene};
use anyhow::Context;
use image::RgbImage;
use std::path::Path;

/// Denoising steps of every measured image.
pub const MEASURE_STEPS: usize = 20;
/// Guidance of every measured image: none (the bundled model was trained without caption
/// dropout, so its unconditional branch is untrained).
pub const MEASURE_GUIDANCE: f64 = 1.0;

/// The prompts the demo and the tests draw the concept with: "a sks toy" at each position on
/// three backgrounds.
pub fn concept_prompts(subject: &str) -> Vec<String> {
    [("center", "white"), ("left", "black"), ("right", "gray")]
        .iter()
        .map(|(p, b)| caption_for(subject, p, b))
        .collect()
}

/// The templates of every `.png` in `dir` (the concept's training images), in name order.
pub fn concept_templates(dir: &Path) -> anyhow::Result<Vec<ConceptTemplate>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        anyhow::bail!("{}: no .png concept images", dir.display());
    }
    paths
        .iter()
        .map(|p| {
            let img = image::open(p)
                .with_context(|| format!("cannot read {}", p.display()))?
                .to_rgb8();
            Ok(ConceptTemplate::new(&img))
        })
        .collect()
}

/// `n` images of `prompt` (the latents of `seed`), DDIM, [`MEASURE_STEPS`] steps.
pub fn draw(
    sd: &StableDiffusion,
    prompt: &str,
    n: usize,
    seed: u64,
) -> anyhow::Result<Vec<RgbImage>> {
    let params = GenerateParams {
        prompt: prompt.into(),
        steps: MEASURE_STEPS,
        guidance: MEASURE_GUIDANCE,
        seed,
        num_images: n,
        ..Default::default()
    };
    to_rgb8(&sd.generate(&params, &mut |_, _| {})?)
}

/// Shares of images whose reading matches the prompt, per attribute.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Following {
    /// Prompts measured (one image each).
    pub prompts: usize,
    /// Shape colour right.
    pub colour: f64,
    /// Position right.
    pub position: f64,
    /// Background colour right.
    pub background: f64,
    /// Size right.
    pub size: f64,
    /// Outline (circle / square / triangle) right.
    pub shape: f64,
}

impl Following {
    /// The rates on one line.
    pub fn line(&self) -> String {
        format!(
            "colour {:.0}%, position {:.0}%, background {:.0}%, size {:.0}%, shape {:.0}% ({} prompts)",
            self.colour * 100.0,
            self.position * 100.0,
            self.background * 100.0,
            self.size * 100.0,
            self.shape * 100.0,
            self.prompts
        )
    }
}

/// The prompt-following rates of `sd` over [`prompt_set`]`(n)`, one image per prompt with the
/// latents of `seed + i`, and the images (in prompt order).
pub fn prompt_following(
    sd: &StableDiffusion,
    n: usize,
    seed: u64,
) -> anyhow::Result<(Following, Vec<(Scene, RgbImage)>)> {
    let mut hits = [0usize; 5];
    let mut out = vec![];
    for (i, scene) in prompt_set(n).into_iter().enumerate() {
        let img = draw(sd, &scene.caption(), 1, seed + i as u64)?.remove(0);
        let r = read_scene(&img);
        let same = |a: &Option<String>, b: &str| a.as_deref() == Some(b);
        hits[0] += same(&r.colour, &scene.colour) as usize;
        hits[1] += same(&r.position, &scene.position) as usize;
        hits[2] += (r.background == scene.background) as usize;
        hits[3] += same(&r.size, &scene.size) as usize;
        hits[4] += same(&r.shape, &scene.shape) as usize;
        out.push((scene, img));
    }
    let rate = |h: usize| h as f64 / n.max(1) as f64;
    let f = Following {
        prompts: n,
        colour: rate(hits[0]),
        position: rate(hits[1]),
        background: rate(hits[2]),
        size: rate(hits[3]),
        shape: rate(hits[4]),
    };
    Ok((f, out))
}

/// The concept score of each image of each prompt ([`concept_prompts`]), `per_prompt` images
/// each from the latents of `seed`.
pub fn concept_scores(
    sd: &StableDiffusion,
    prompts: &[String],
    per_prompt: usize,
    seed: u64,
    templates: &[ConceptTemplate],
) -> anyhow::Result<(Vec<f64>, Vec<RgbImage>)> {
    let mut scores = vec![];
    let mut images = vec![];
    for p in prompts {
        for img in draw(sd, p, per_prompt, seed)? {
            scores.push(concept_score(&img, templates));
            images.push(img);
        }
    }
    Ok((scores, images))
}

/// The mean of `v` (0 when empty).
pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Mean absolute difference of two equally sized images, in levels of 255.
pub fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
    let n = a.as_raw().len().max(1) as f64;
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .sum::<f64>()
        / n
}

/// Arguments of `lora bench quality`.
#[derive(clap::Args, Debug)]
pub struct QualityBench {
    /// Training steps of both methods.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Learning rate of the LoRA.
    #[arg(long, default_value_t = 1e-2)]
    lora_learning_rate: f64,
    /// Learning rate of full fine-tuning.
    #[arg(long, default_value_t = 1e-4)]
    full_learning_rate: f64,
    /// Output folder (both runs' files and quality.json).
    #[arg(long, default_value = "target/bench-quality")]
    out_dir: std::path::PathBuf,
}

/// Runs `lora bench quality`: the demo concept trained by LoRA and by full fine-tuning for the
/// same steps, side by side.
pub fn run(b: QualityBench) -> anyhow::Result<()> {
    use super::demo::{run_demo, DemoOptions};
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo-data");
    let mut reports = vec![];
    for (full, lr) in [(false, b.lora_learning_rate), (true, b.full_learning_rate)] {
        let mut o = DemoOptions::new(None, data.clone(), b.out_dir.clone());
        (o.steps, o.full, o.learning_rate, o.quiet) = (b.steps, full, lr, true);
        eprintln!(
            "training the demo concept by {} ({} steps, lr {lr:e})…",
            if full { "full fine-tuning" } else { "LoRA" },
            b.steps
        );
        reports.push(run_demo(&o)?);
    }
    let (l, f) = (&reports[0], &reports[1]);
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "", "LoRA (r=4)", "full", "ratio"
    );
    let row = |name: &str, a: f64, b: f64, prec: usize| {
        println!("{name:<34} {a:>12.prec$} {b:>12.prec$} {:>8.2}", a / b);
    };
    row("training seconds", l.train_seconds, f.train_seconds, 1);
    row(
        "file MB",
        l.file_bytes as f64 / 1e6,
        f.file_bytes as f64 / 1e6,
        3,
    );
    row(
        "concept score (base model)",
        l.base_concept,
        f.base_concept,
        2,
    );
    row(
        "concept score (trained)",
        l.trained_concept,
        f.trained_concept,
        2,
    );
    row(
        "world colour following",
        l.trained_following.colour,
        f.trained_following.colour,
        2,
    );
    row(
        "world position following",
        l.trained_following.position,
        f.trained_following.position,
        2,
    );
    row(
        "drift on world prompts (levels)",
        l.drift_levels,
        f.drift_levels,
        1,
    );
    println!("base model world following: {}", l.base_following.line());
    let p = b.out_dir.join("quality.json");
    crate::atomic::write_file(&p, true, |tmp| {
        std::fs::write(tmp, serde_json::to_string_pretty(&reports)?)
            .with_context(|| format!("cannot write {}", p.display()))
    })?;
    println!("wrote {}", p.display());
    Ok(())
}

/// Arguments of `lora bench following`.
#[derive(clap::Args, Debug)]
pub struct FollowingBench {
    /// Model folder (default: the bundled model).
    #[arg(long)]
    model: Option<String>,
    /// Number of world prompts (one image each).
    #[arg(long, default_value_t = 30)]
    prompts: usize,
    /// Seed of the first image's latents (image i uses seed + i).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write the images as one labelled grid.
    #[arg(long)]
    grid: Option<std::path::PathBuf>,
}

/// Runs `lora bench following`: how often the model draws what world prompts ask for.
pub fn run_following(b: FollowingBench) -> anyhow::Result<()> {
    let source = match &b.model {
        Some(m) => crate::hub::ModelSource::parse(m)?,
        None => crate::hub::ModelSource::Local(crate::hub::bundled_model_dir()),
    };
    let sd = StableDiffusion::load(&source, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    let (f, images) = prompt_following(&sd, b.prompts, b.seed)?;
    for (scene, img) in &images {
        let r = read_scene(img);
        println!(
            "{:<55} read: {} {} {} {}, {} background",
            scene.caption(),
            r.size.as_deref().unwrap_or("-"),
            r.colour.as_deref().unwrap_or("-"),
            r.shape.as_deref().unwrap_or("-"),
            r.position.as_deref().unwrap_or("-"),
            r.background
        );
    }
    println!("{}", f.line());
    if let Some(p) = &b.grid {
        let tiles: Vec<(RgbImage, String)> = images
            .iter()
            .enumerate()
            .map(|(i, (_, img))| (img.clone(), format!("{i}")))
            .collect();
        crate::pipeline::image_io::save_png(&crate::pipeline::grid::grid(&tiles, 10), p, true)?;
        println!("wrote {}", p.display());
    }
    Ok(())
}
