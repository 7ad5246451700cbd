//! Prior preservation: class images. When the class folder holds fewer than
//! `--num-class-images` images, the missing ones are generated with the base model (before any
//! LoRA is attached) from the class prompt, as diffusers' DreamBooth script does.

use super::data::list_images;
use crate::pipeline::image_io::{save_png, to_rgb8};
use crate::pipeline::{GenerateParams, StableDiffusion};
use anyhow::Context;
use std::path::{Path, PathBuf};

/// Generation settings for class images.
#[derive(Debug, Clone)]
pub struct ClassGen {
    /// The class prompt.
    pub prompt: String,
    /// How many class images are wanted in total.
    pub count: usize,
    /// Image size (square).
    pub resolution: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance: f64,
    /// Base seed; image i uses seed + i.
    pub seed: u64,
}

/// Makes sure `dir` holds at least `g.count` images, generating the missing ones as
/// `class-<i>.png` (never replacing an existing file); returns the paths written.
pub fn ensure_class_images(
    sd: &StableDiffusion,
    dir: &Path,
    g: &ClassGen,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create class folder {}", dir.display()))?;
    let have = list_images(dir, "class")?.len();
    let missing = g.count.saturating_sub(have);
    let mut written = vec![];
    let mut i = 0usize;
    while written.len() < missing {
        let path = dir.join(format!("class-{i:05}.png"));
        let seed = g.seed.wrapping_add(i as u64);
        i += 1;
        if path.exists() {
            continue;
        }
        let params = GenerateParams {
            prompt: g.prompt.clone(),
            steps: g.steps,
            guidance: g.guidance,
            seed,
            height: Some(g.resolution),
            width: Some(g.resolution),
            ..Default::default()
        };
        let img = sd
            .generate(&params, &mut |_, _| {})
            .with_context(|| format!("cannot generate class image {}", path.display()))?;
        let rgb = to_rgb8(&img)?;
        save_png(&rgb[0], &path, false)?;
        written.push(path);
        progress(written.len(), missing);
    }
    Ok(written)
}
